"""Hostile generation settings and weights, through the library (issue 18, class 7).

- every sampling setting at its extremes either samples a valid token or is a GenerationError, and
  a tiny temperature is the greedy choice rather than NaN;
- NaN or infinite weights in safetensors or GGUF files are refused at load, naming the tensor.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.errors import GenerationError, ModelFormatError
from llmkit.inference.sampling import SamplingParams, sample
from post_training_helpers import save_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from gguf_tiny import write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import llmkit

    return llmkit.load(save_tiny_model(tmp_path_factory.mktemp("lm") / "run"))


# ---- sampling ----------------------------------------------------------------------------------

EXTREME = {  # every setting at the edges of its range: each must give a valid token
    "temperature": [5e-324, 1e-45, 1e-30, 1e-6, 100.0],
    "top_k": [1, 2, 49, 50, 10**9],
    "top_p": [5e-324, 1e-300, 1e-12, 0.5, 1.0],
    "min_p": [0.0, 1e-300, 0.999999, 1.0],
    "repetition_penalty": [1e-3, 0.5, 2.0, 1e3],
    "presence_penalty": [-2.0, 2.0],
    "frequency_penalty": [-2.0, 2.0],
}
INVALID = {
    "temperature": [-1.0, -0.0 - 1e-9, math.nan, math.inf, 101.0, "0.5", True, None],
    "top_k": [-1, 1.5, True, "3", None],
    "top_p": [0.0, -1.0, 1.0000001, math.nan, math.inf],
    "min_p": [-1e-9, 1.1, math.nan],
    "repetition_penalty": [0.0, 1e-300, 1e300, -1.0, math.nan, math.inf],
    "presence_penalty": [2.1, -3.0, math.nan],
    "frequency_penalty": [2.1, -math.inf],
}
LOGITS = {
    "normal": torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 5,
    "huge": torch.tensor([[3e38, -3e38, 1.0] + [0.0] * 47] * 3),
    "infinite": torch.tensor([[math.inf, -math.inf, 1.0] + [0.0] * 47] * 3),
    "flat": torch.zeros(3, 50),
}


@pytest.mark.parametrize("logits", list(LOGITS))
@pytest.mark.parametrize("name,value", [(n, v) for n, vs in EXTREME.items() for v in vs])
def test_extreme_sampling_settings_sample_a_valid_token(name, value, logits):
    params = SamplingParams(**{name: value})
    x = LOGITS[logits]
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[:, :10] = True  # penalties apply to these
    counts = seen.long() * 3
    for seed in range(4):
        token = sample(x.clone(), params, generator=torch.Generator().manual_seed(seed), seen=seen,
                       generated_counts=counts)
        assert token.shape == (3,) and bool(((token >= 0) & (token < x.shape[1])).all())


@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-30])
def test_a_tiny_temperature_is_the_greedy_choice(temperature):
    x = LOGITS["normal"]
    for seed in range(8):
        token = sample(x, SamplingParams(temperature=temperature), generator=torch.Generator().manual_seed(seed))
        assert token.tolist() == x.argmax(dim=-1).tolist()


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in INVALID.items() for v in vs])
def test_out_of_range_sampling_settings_are_refused(name, value):
    with pytest.raises(GenerationError, match=name):
        SamplingParams(**{name: value})


def test_nan_logits_are_a_generation_error():
    x = LOGITS["normal"].clone()
    x[1, 7] = math.nan
    with pytest.raises(GenerationError, match="NaN logits"):
        sample(x, SamplingParams())


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"),
    (dict(seed=1.5), "seed"), (dict(temperature=1e-300 * -1), "temperature")])
def test_generate_validates_every_setting(tiny_lm, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        tiny_lm.generate("hello", **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-45), dict(repetition_penalty=1e-3, temperature=0.7),
                                    dict(top_p=5e-324, temperature=2.0), dict(seed=2**64 - 1), dict(seed=-2**63),
                                    dict(max_new_tokens=0), dict(top_k=10**9, min_p=1.0, temperature=100.0)])
def test_generate_at_the_extremes_returns_text(tiny_lm, kwargs):
    assert isinstance(tiny_lm.generate("hello", **{"max_new_tokens": 3, **kwargs}), str)


# ---- non-finite weights ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_safetensors_weights_are_refused(tmp_path, bad):
    import llmkit
    from llmkit.io.hf import save_hf
    from safetensors.torch import load_file, save_file

    lm = llmkit.load(save_tiny_model(tmp_path / "run"))
    hf = save_hf(lm.model, lm.tokenizer, tmp_path / "hf", prefix_ids=lm.prefix_ids, eos_ids=lm.eos_ids)
    tensors = load_file(hf / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name].view(-1)[tensors[name].numel() // 2] = bad
    save_file(tensors, hf / "model.safetensors")
    with pytest.raises(ModelFormatError, match="NaN or infinite") as caught:
        llmkit.load(hf)
    assert str(hf) in str(caught.value)


@pytest.mark.parametrize("tensor", ["token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"])
def test_non_finite_gguf_weights_are_refused(tmp_path, tensor):
    from llmkit.io.gguf import load_gguf

    weights = write_gguf(tmp_path / "ok.gguf", d=32, heads=2, kv_heads=1, ff=64, context=32)
    bad = weights[tensor].copy()
    bad.reshape(-1)[3] = np.nan
    write_gguf(tmp_path / "bad.gguf", d=32, heads=2, kv_heads=1, ff=64, context=32, tensors={tensor: bad})
    load_gguf(tmp_path / "ok.gguf")
    with pytest.raises(ModelFormatError, match=f"bad.gguf: tensor {tensor} holds NaN or infinite"):
        load_gguf(tmp_path / "bad.gguf")
