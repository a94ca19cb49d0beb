"""Up to how many rows llmkit's kernels multiply a quantised layer is measured on the machine
(llmkit/quant/kernels/crossover.py), and prepare_for_decoding applies and reports it. The probe's rule is
tested on made-slow ways of multiplying, so that its answer does not depend on this machine's speeds."""

import time

import pytest
import torch
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.inference.optimize import prepare_for_decoding
from llmkit.layers.quantized import NATIVE_MAX_ROWS, Int4Linear, Int8Linear, is_quantized
from llmkit.models.build import build_model
from llmkit.quant import kernels
from llmkit.quant.kernels import crossover

NATIVE = kernels.native()
pytestmark = pytest.mark.skipif(NATIVE is None or NATIVE.isa < 1,
                                reason="llmkit's vector kernels are unavailable here")
SLOW_S = 0.02  # added to a way's calls: far above either way's own time on a 64×256 weight (< 1 ms)


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(crossover, "_measured", {})


def _layer():
    torch.manual_seed(0)
    return Int4Linear(torch.nn.Linear(256, 64), compute_dtype=torch.float32)


def _slowed(fn, from_rows=0, by=SLOW_S):
    def slow(x, *args, **kwargs):
        if x.shape[0] >= from_rows:
            time.sleep(by)
        return fn(x, *args, **kwargs)
    return slow


def test_the_kernel_keeps_every_row_count_where_the_matmul_is_slower(monkeypatch):
    monkeypatch.setattr(crossover.F, "linear", _slowed(F.linear))
    layer = _layer()
    rows, measured = crossover.kernel_max_rows(layer, torch.float32)
    assert rows == crossover.NO_LIMIT and "faster than dequantise + fp32 matmul at 16 to 1,024 rows" in measured


def test_the_kernel_stops_below_the_first_row_count_where_it_is_slower(monkeypatch):
    """The matmul made slower by half the delay everywhere and the kernel by all of it from 64 rows: the
    kernel wins at 16 and 32 rows and loses at 64 whatever the two cost on this CPU."""
    monkeypatch.setattr(crossover.F, "linear", _slowed(F.linear, by=SLOW_S / 2))
    layer = _layer()
    layer._native_op = _slowed(layer._native_op, from_rows=64)
    rows, measured = crossover.kernel_max_rows(layer, torch.float32)
    assert rows == 32 and measured.startswith("dequantise + fp32 matmul faster from 64 rows")
    layer.kernel_max_rows = rows
    assert layer.native_max_rows() == max(32, NATIVE_MAX_ROWS[NATIVE.isa])  # never below the floor


def test_a_kernel_slower_everywhere_keeps_only_the_floor(monkeypatch):
    layer = _layer()
    layer._native_op = _slowed(layer._native_op)
    assert crossover.kernel_max_rows(layer, torch.float32)[0] == 0
    layer.kernel_max_rows = 0
    assert layer.native_max_rows() == NATIVE_MAX_ROWS[NATIVE.isa]


def _model():
    cfg = ModelConfig(vocab_size=96, max_seq_len=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      init_std=0.2, norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.mark.parametrize("measured", [(crossover.NO_LIMIT, "as measured"), (32, "as measured")])
def test_prepare_for_decoding_applies_the_measured_limit_and_says_it(monkeypatch, measured):
    """Every quantised layer the kernels serve takes the measured limit; a prompt within it never
    dequantises a weight, a longer one does; the runtime line says which."""
    monkeypatch.setattr(crossover, "kernel_max_rows", lambda layer, dtype: measured)
    model = _model()
    report = prepare_for_decoding(model, quantize="int4", dtype=torch.float32)
    layers = [m for m in model.modules() if is_quantized(m)]
    assert layers and {m.kernel_max_rows for m in layers} == {measured[0]}
    if measured[0] == crossover.NO_LIMIT:
        assert report.kernel.endswith("prompts too (as measured)")
    else:
        assert report.kernel.endswith(f"prompts over {max(32, NATIVE_MAX_ROWS[NATIVE.isa])} tokens dequantised "
                                      "(as measured)")
    dequantised = []
    for layer in layers:
        original = layer._weight_for_product
        layer._weight_for_product = lambda dtype, original=original: dequantised.append(dtype) or original(dtype)
    ids = torch.randint(1, 96, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    assert bool(dequantised) == (measured[0] < 200)


def test_an_int8_model_is_probed_on_its_largest_layer_other_than_the_head(monkeypatch):
    """A model quantised to int8 only (`llmkit quantize --bits 8`) is measured too — on a block layer:
    the head multiplies one row per prompt, and probing it at 1,024 rows would take most of a second."""
    probed = []
    monkeypatch.setattr(crossover, "kernel_max_rows", lambda layer, dtype: probed.append(layer) or (48, "as measured"))
    model = _model()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear(child, compute_dtype=torch.float32))
    prepare_for_decoding(model, dtype=torch.float32)
    largest = max((m for m in model.modules() if isinstance(m, Int8Linear) and m is not model.lm_head),
                  key=lambda m: m.in_features * m.out_features)
    assert probed == [largest]
    assert {m.kernel_max_rows for m in model.modules() if is_quantized(m)} == {48}
