"""Device and precision for decoding: `llmkit.load(device=, dtype="auto")` decides by
llmkit.runtime's rule on the model's decoding shapes and records it as `lm.runtime`, with the CPU's
bf16 support and the probe's timings faked both ways; `dtype=None` keeps the weights as loaded."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.errors import ConfigError
from llmkit.runtime import decoding_shapes, make_runtime
from post_training_helpers import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("decoding_runtime") / "run")


def fake_cpu(monkeypatch, *, native: bool, t32: float = 0.1, t16: float = 0.1) -> list:
    """This CPU has (or lacks) native bf16, and the probe measures t32 and t16 seconds; returns its calls."""
    calls = []

    def probe(shapes, weights_in_dtype):
        calls.append((list(shapes), weights_in_dtype))
        return t32, t16
    monkeypatch.setattr("llmkit.runtime.native_bf16", lambda: native)
    monkeypatch.setattr("llmkit.runtime.measure", probe)
    return calls


def weights_dtype(lm) -> torch.dtype:
    return next(lm.model.parameters()).dtype


def test_decoding_shapes_probe_one_token_and_a_prompt():
    lm_model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    assert decoding_shapes(lm_model) == [(1, 64, 256), (1, 256, 64), (64, 64, 256), (64, 256, 64)]
    rt = make_runtime("cpu", "auto", shapes=decoding_shapes(lm_model), training=False, native=True,
                      probe=lambda shapes, weights_in_dtype: (0.1, 0.04))
    assert (rt.dtype, rt.torch_dtype) == ("bf16", torch.bfloat16)


@pytest.mark.parametrize("native, t32, t16, expected, probed", [
    (False, 0.1, 0.01, "fp32", False),  # emulated bf16: fp32 without asking the probe
    (True, 0.1, 0.04, "bf16", True),    # native and measured faster
    (True, 0.1, 0.2, "fp32", True),     # native but measured slower
])
def test_auto_precision_follows_native_bf16_and_the_probe(tiny, monkeypatch, native, t32, t16, expected, probed):
    calls = fake_cpu(monkeypatch, native=native, t32=t32, t16=t16)
    lm = llmkit.load(tiny, dtype="auto")
    assert lm.runtime.dtype == expected and weights_dtype(lm) == lm.runtime.torch_dtype
    assert lm.runtime.device == torch.device("cpu") and lm.runtime.warning is None
    assert lm.runtime.describe().startswith("device cpu (") and f"{expected}: " in lm.runtime.describe()
    if probed:  # on the model's decoding shapes, with the weights stored in bf16 (as decoding keeps them)
        assert calls == [(decoding_shapes(lm.model), True)]
    else:
        assert calls == [] and "no native bf16" in lm.runtime.reason
    assert len(lm.generate("the quick", max_new_tokens=4, temperature=0.0)) > 0


def test_explicit_bf16_runs_with_a_warning_where_it_is_slower(tiny, monkeypatch):
    fake_cpu(monkeypatch, native=False, t32=0.01, t16=0.2)
    lm = llmkit.load(tiny, dtype="bf16")
    assert weights_dtype(lm) == torch.bfloat16 and lm.runtime.dtype == "bf16"
    assert lm.runtime.warning.startswith("warning: ") and "20.0× slower" in lm.runtime.warning
    # a torch dtype is the same request
    assert llmkit.load(tiny, dtype=torch.bfloat16).runtime.warning == lm.runtime.warning


def test_default_keeps_the_weights_as_stored_and_measures_nothing(tiny, monkeypatch):
    calls = fake_cpu(monkeypatch, native=True, t32=0.1, t16=0.01)
    lm = llmkit.load(tiny)
    assert weights_dtype(lm) == torch.float32 and calls == []
    assert (lm.runtime.dtype, lm.runtime.reason) == ("fp32", "as loaded")
    fp32 = llmkit.load(tiny, dtype="fp32")  # explicit fp32: no probe either
    assert fp32.runtime.dtype == "fp32" and calls == []
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids), fp32.model(ids))


def test_auto_on_this_machine_loads_and_generates(tiny):
    """No fakes: whatever the probe picks here, the model loads in it and greedy decoding runs."""
    lm = llmkit.load(tiny, device="auto", dtype="auto")
    assert lm.runtime.dtype in ("fp32", "bf16") and weights_dtype(lm) == lm.runtime.torch_dtype
    print(lm.runtime.describe())
    out = list(lm.stream("the quick", max_new_tokens=4, temperature=0.0))
    assert out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_that_is_not_here_is_refused_before_reading_the_file():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        llmkit.load("/nonexistent/model", device="cuda")
