"""llmkit's own int4/int8 CPU kernels (llmkit/quant/kernels): every vector path computes the dequantised
fp32 matmul up to summation order; the library is built once and cached; without it (no compiler, or
LLMKIT_NATIVE_KERNELS=0) the layers fall back to torch's kernel and plain PyTorch."""

import os
import subprocess
import sys

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.inference.generate import generate
from llmkit.inference.kv_cache import KVCache
from llmkit.inference.optimize import prepare_for_decoding
from llmkit.inference.sampling import SamplingParams
from llmkit.layers.quantized import (Int4Linear, Int8Linear, QuantizedWeight, WeightFormat,
                                     dequantize_weight, quantize_weight, quantized_layer)
from llmkit.models.build import build_model
from llmkit.quant import kernels

NATIVE = kernels.native()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"llmkit's kernels are unavailable here: "
                                                         f"{kernels.unavailable_reason()}")
# every vector path this CPU runs: 0 portable C++, 1 AVX2, 2 AVX-512
ISAS = list(range(NATIVE.isa + 1)) if NATIVE is not None else []
U = 2.0 ** -24  # fp32 unit roundoff


def _weights(n=40, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 5] *= 20  # an outlier column: its groups get a large step
    return w


def _bound(codes, scale, offset, x, bits):
    """An fp32 error bound for x·wᵀ computed two ways (kernel: per-group sums of code·x scaled once, plus
    the offset times Σx; reference: the dequantised weight, then the matmul): each sum of K terms is
    within K·u of the sum of their magnitudes, and every term is at most (|code − mid|·scale + |offset|)·|x|
    (int4; int8: |code|·scale), so |difference| ≤ 2·(K + 4)·u·that magnitude."""
    N, K = codes.shape
    step = scale.float().repeat_interleave(K // scale.shape[1], 1)
    if bits == 4:
        magnitude = codes.float() * step + (offset.float() - 8 * scale.float()).abs().repeat_interleave(K // scale.shape[1], 1)
    else:
        magnitude = codes.float().abs() * step
    return 2 * (K + 4) * U * (x.double().abs() @ magnitude.double().t()).float() + 1e-30


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [32, 64, 256])  # 256: one scale per row here
# 1 row: its own kernel; 2: a tile of rows sharing one expansion of the weights; 11: a panel of expanded
# weights for all rows (many_rows.inc)
@pytest.mark.parametrize("rows", [1, 2, 11])
def test_int4_kernel_is_the_dequantised_fp32_matmul(isa, group, rows):
    codes, scale, offset = quantize_weight(_weights(), WeightFormat(4, group, False))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(40, generator=torch.Generator().manual_seed(7))
    got = NATIVE.ops.linear(x, packed, scale, offset, group, bias, None, isa)
    expected = x @ dequantize_weight(codes, scale, offset).t() + bias
    assert got.dtype == torch.float32 and got.shape == (rows, 40)
    err, bound = (got - expected).abs(), _bound(codes, scale, offset, x, 4)
    assert bool((err <= bound).all()), float((err / bound).max())


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [32, 256])
@pytest.mark.parametrize("rows", [1, 3, 6, 11])
def test_int8_kernel_is_the_dequantised_fp32_matmul(isa, group, rows):
    codes, scale, _ = quantize_weight(_weights(seed=1), WeightFormat(8, group, True))
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    got = NATIVE.ops.linear(x, codes, scale, scale, group, None, None, isa)  # int8: no offset
    expected = x @ dequantize_weight(codes, scale, torch.zeros_like(scale)).t()
    err, bound = (got - expected).abs(), _bound(codes, scale, None, x, 8)
    assert bool((err <= bound).all()), float((err / bound).max())


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_dequantisation_is_bit_identical_to_the_reference(isa):
    for group in (32, 128):
        codes, scale, offset = quantize_weight(_weights(k=384, seed=group), WeightFormat(4, group, False))
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        expected = dequantize_weight(codes, scale, offset)
        assert torch.equal(NATIVE.ops.int4_dequantize(packed, scale, offset, group, isa), expected)
        for dtype in (torch.float32, torch.bfloat16):  # into a larger reused buffer, as prefill does
            buffer = torch.full((expected.numel() + 7,), 7.0, dtype=dtype)
            NATIVE.ops.int4_dequantize_into(packed, scale, offset, group, buffer, isa)
            assert torch.equal(buffer[:expected.numel()].view_as(expected), expected.to(dtype))
            assert float(buffer[-1]) == 7.0  # nothing written past N·K


@needs_native
def test_layers_use_the_native_kernel_with_bf16_inputs_awq_and_bf16_bias():
    """The layer's one call: (…, K) in, AWQ's divisor and the bias applied, the input's dtype out; many
    rows take the dequantised path, which is the same weight."""
    codes, scale, offset = quantize_weight(_weights(), WeightFormat(4, 32, False))
    s = torch.rand(256, generator=torch.Generator().manual_seed(4)) + 0.5
    bias = torch.randn(40, generator=torch.Generator().manual_seed(5))
    layer = quantized_layer(QuantizedWeight(codes, scale, offset, bias.bfloat16(), s), compute_dtype=torch.float32)
    assert layer.native is not None and not layer.kernel_passes  # torch's packing is not made
    assert layer.kernel_name() == f"{NATIVE.describe()} kernel"
    w = dequantize_weight(codes, scale, offset)
    for shape in [(1, 1, 256), (2, 3, 256), (layer.native_max_rows() + 1, 256)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
        expected = (x / s) @ w.t() + bias.bfloat16().float()
        got = layer(x.bfloat16()).float()  # bf16 in, bf16 out: the output's rounding (2^-9 relative) dominates
        assert got.shape == (*shape[:-1], 40)
        torch.testing.assert_close(got, expected, atol=0.02, rtol=2 ** -7)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # fp32: summation order only


@needs_native
def test_fp16_activations_take_the_dequantised_path():
    """The kernels take fp32 or bf16 activations; an fp16 model (`--dtype fp16`) multiplies by the
    dequantised weight in fp16 instead of failing in the kernel's argument check."""
    layer = Int4Linear(torch.nn.Linear(256, 40).half())  # an fp16 model's layer: computes in fp16
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(6))
    expected = x @ layer.dequantize(torch.float32).t() + layer.bias.float()
    got = layer(x.half())
    assert got.dtype == torch.float16
    # fp16's error model: x, the dequantised weights and the output each rounded to fp16 (2^-11 relative;
    # the CPU's fp16 matmul sums in fp32), so |error| ≤ 3·2^-11·Σ|w·x|; here Σ|w·x| ≤ 7.2 (256 weights of
    # mean |w| 0.031, Linear's init, times |x| ~ 0.8), a bound of 0.011: atol 0.02 holds it with room
    torch.testing.assert_close(got.float(), expected, atol=0.02, rtol=2 ** -9)


@needs_native
def test_an_int4_model_decodes_in_fp32_like_its_dequantised_model():
    """With fp32 activations the kernel leaves only summation order between the int4 model and an fp32
    model holding the dequantised weights: logits within 1e-5 of their scale (the bf16 path of torch's
    kernel needed 4 %), and the same greedy tokens."""
    cfg = ModelConfig(vocab_size=96, max_seq_len=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2,
                      norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    q = build_model(cfg).eval()
    q.load_state_dict(m.state_dict())
    report = prepare_for_decoding(q, quantize="int4", dtype=torch.float32)
    assert report.kernel.startswith(f"{NATIVE.describe()} kernel") and NATIVE.describe() in report.describe()
    assert isinstance(q.lm_head, Int8Linear)
    prepare_for_decoding(m)
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, (Int4Linear, Int8Linear)):
                m.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    ids = torch.randint(1, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = m(ids[:, -1:]), q(ids[:, -1:])  # one row per prompt: the kernel's path
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()
    greedy = SamplingParams(temperature=0.0)
    prompts = [ids[0, 7:].tolist(), ids[1].tolist()]  # two lengths: a padded batch
    assert generate(q, prompts, max_new_tokens=24, params=greedy) == generate(m, prompts, max_new_tokens=24,
                                                                              params=greedy)


def test_switched_off_the_layers_fall_back_to_torch_and_say_so(monkeypatch):
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert kernels.native() is None and kernels.unavailable_reason() == f"{kernels.SWITCH}=0"
    layer = Int4Linear(torch.nn.Linear(64, 48))
    assert layer.native is None
    assert layer.kernel_name() in ("torch int4 kernel", "dequantise + matmul")
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x.bfloat16().float() @ layer.dequantize().t() + layer.bias,
                               atol=0.05, rtol=0.02)  # torch's kernel: bf16 activations and output


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def test_without_a_compiler_a_model_still_runs_on_plain_pytorch(tmp_path):
    """A machine without a C++ compiler: the build fails (in about a second), one line says why, and the
    int4 model decodes through torch's kernel."""
    code = ("import torch; from llmkit.quant import kernels; from llmkit.layers.quantized import Int4Linear\n"
            "layer = Int4Linear(torch.nn.Linear(64, 48))\n"
            "print('native', layer.native, '|', layer.kernel_name(), '|', kernels.unavailable_reason())\n"
            "print('shape', tuple(layer(torch.randn(1, 64)).shape))")
    done = _run(code, {"LLMKIT_CACHE_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler"),
                       "CC": str(tmp_path / "no-such-compiler")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "native None |" in done.stdout and "shape (1, 48)" in done.stdout
    reason = done.stdout.split("|")[-1].strip().splitlines()[0]
    assert reason and "Error" in reason, done.stdout
    assert f"llmkit: no native int4/int8 kernels ({reason}); using torch's" in done.stderr


@needs_native
def test_the_library_is_built_once_and_later_processes_only_load_it():
    """The suite's one build (on a fresh machine; cached after): the library is in the cache, and a new
    process loads it without building (nothing said on stderr) and picks the same vector path."""
    assert kernels.library_path().exists()
    done = _run("from llmkit.quant import kernels; k = kernels.native(); print(k.describe() if k else kernels.unavailable_reason())", {})
    assert done.returncode == 0 and done.stdout.strip() == NATIVE.describe(), done.stdout + done.stderr
    assert "building" not in done.stderr


def _tiny_int4(**overrides):
    cfg = dict(vocab_size=96, max_seq_len=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2,
               norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
    torch.manual_seed(0)
    m = build_model(ModelConfig(**{**cfg, **overrides})).eval()
    report = prepare_for_decoding(m, quantize="int4", dtype=torch.float32)
    return m, report


def _with_awq_divisors(m):
    """Give every block projection an AWQ per-channel divisor (in 0.5..1.5), as `llmkit quantize --method
    awq` leaves them: the layer divides its input by it before the product."""
    g = torch.Generator().manual_seed(11)
    for block in m.stack.blocks:
        for layer in (block.attn.qkv_proj, block.attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj):
            layer.act_scale = torch.rand(layer.in_features, generator=g) + 0.5
            layer._prepare_native()


@needs_native
@pytest.mark.parametrize("overrides,awq", [({}, False), ({"qkv_bias": True, "n_kv_heads": 1}, False), ({}, True)],
                         ids=["llama", "qwen2 (MQA)", "llama + AWQ divisors"])
def test_a_block_in_one_native_call_decodes_as_its_layers_do(overrides, awq):
    """The whole-block step (llmkit/quant/kernels/block.py) against the same block's layers, on every
    decode step of a greedy generation: logits within 1e-5 of their scale (fp32; the steps differ in
    summation order and the softmax's exp, < 2e-7 relative), the same tokens."""
    m, report = _tiny_int4(**overrides)
    if awq:
        _with_awq_divisors(m)
    blocks = list(m.stack.blocks)
    assert report.block_steps == 2 and "one call per block" in report.kernel
    served = []

    def counted(step):  # records whether the native step served a call (a tensor) or declined (None)
        return lambda x, args: served.append(step(x, args)) or served[-1]

    steps = [counted(b.decode_step) for b in blocks]
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = {}
        for name, use_steps in (("fused", True), ("layers", False)):
            for b, step in zip(blocks, steps):
                b.decode_step = step if use_steps else None
            cache = KVCache.empty(m.cfg, 1, 40)
            m(ids, cache=cache)  # the prompt: several positions, always the layers
            out = [m(torch.tensor([[t]]), cache=cache) for t in (5, 17, 33, 2)]  # four one-token steps
            logits[name] = torch.cat(out, 1)
    ref = logits["layers"]
    assert [y is None for y in served] == [True] * 2 + [False] * 8  # the prompt declined; each token served
    assert (logits["fused"] - ref).abs().max() < 1e-5 * ref.abs().max()
    greedy = SamplingParams(temperature=0.0)
    for b, step in zip(blocks, steps):
        b.decode_step = step
    with_steps = generate(m, [ids[0].tolist()], max_new_tokens=20, params=greedy)
    assert served[-1] is not None  # the generation's decode steps were served too
    for b in blocks:
        b.decode_step = None
    assert with_steps == generate(m, [ids[0].tolist()], max_new_tokens=20, params=greedy)


@needs_native
def test_a_block_step_follows_a_conversion_after_preparation():
    """.to() after prepare_for_decoding rebuilds the layers' kernel arguments: the step declines where a
    layer no longer fits it — a bf16 qkv bias, which the kernel does not add — rather than decode without
    that bias, and serves again, with the new arguments, once the model is fp32 again."""
    m, _ = _tiny_int4(qkv_bias=True, n_kv_heads=1)
    blocks = list(m.stack.blocks)
    served = []
    for b in blocks:
        b.decode_step = (lambda step: lambda x, args: served.append(step(x, args)) or served[-1])(b.decode_step)
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(3))

    def last_logits(dtype):
        with torch.inference_mode():
            cache = KVCache.empty(m.cfg, 1, 40, dtype=dtype)
            m(ids, cache=cache)
            return m(torch.tensor([[5]]), cache=cache)

    def layers_logits(dtype):  # the same with every block on its layers
        steps = [b.decode_step for b in blocks]
        for b in blocks:
            b.decode_step = None
        try:
            return last_logits(dtype)
        finally:
            for b, step in zip(blocks, steps):
                b.decode_step = step

    last_logits(torch.float32)
    assert served[-1] is not None  # the one-token step ran natively
    m.to(torch.bfloat16)
    served.clear()
    got = last_logits(torch.bfloat16)
    assert served and all(y is None for y in served)  # declined: the bias would have been dropped
    assert torch.equal(got, layers_logits(torch.bfloat16))
    m.to(torch.float32)  # (the bf16 rounding of the other weights stays: compare with the layers again)
    served.clear()
    got = last_logits(torch.float32)
    assert served[-1] is not None
    ref = layers_logits(torch.float32)
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()  # as test_a_block_in_one_native_call_…


@needs_native
def test_a_bf16_models_block_step_keeps_its_stream_and_cache_in_bf16():
    """A bf16 model: the step reads and writes its bf16 stream and cache and computes in fp32 between, so
    it is no further from the fp32 model than the bf16 layers are: each of ~10 bf16 roundings in series
    per block (2^-9 relative) adds, ≲ 2 × 10 × 2^-9 ≈ 4 % of the logit scale over two blocks."""
    m32, _ = _tiny_int4()
    m16, report = _tiny_int4()
    m16.to(torch.bfloat16)
    assert report.block_steps == 2
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    logits = {}
    with torch.inference_mode():
        for name, model, steps in (("fp32", m32, True), ("bf16 step", m16, True), ("bf16 layers", m16, False)):
            saved = [b.decode_step for b in model.stack.blocks]
            if not steps:
                for b in model.stack.blocks:
                    b.decode_step = None
            cache = KVCache.empty(model.cfg, 1, 40, dtype=next(model.parameters()).dtype)
            model(ids, cache=cache)
            logits[name] = torch.cat([model(torch.tensor([[t]]), cache=cache).float() for t in (5, 17, 33)], 1)
            for b, step in zip(model.stack.blocks, saved):
                b.decode_step = step
    ref = logits["fp32"]
    step_error = (logits["bf16 step"] - ref).abs().max()
    print(f"bf16 vs fp32 max |Δlogit|: step {step_error:.4f}, layers {(logits['bf16 layers'] - ref).abs().max():.4f}"
          f" of {ref.abs().max():.2f}")
    assert step_error < 0.04 * ref.abs().max()
    assert not torch.equal(logits["bf16 step"], logits["bf16 layers"])  # the step served (it rounds less)
    assert step_error <= (logits["bf16 layers"] - ref).abs().max() * 1.5  # no worse than the layers


@needs_native
def test_the_kernels_spread_their_work_over_torch_threads():
    """at::parallel_for in the library runs on torch's pool (built with OpenMP, as torch's at::parallel_for
    needs: without it every product ran on the calling thread alone), sized by torch.set_num_threads."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert NATIVE.ops.parallel_threads(8) == 2
        torch.set_num_threads(1)
        assert NATIVE.ops.parallel_threads(8) == 1
    finally:
        torch.set_num_threads(before)
