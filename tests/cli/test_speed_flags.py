"""--device/--dtype/--threads/--quantize for the decoding commands (llmkit/commands/speed.py): the
one runtime line on stderr, the warning for a bf16 measured slower, the int4 layers computing in
the runtime's precision, an absent device as one error line, and exact outputs with --dtype fp32."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.commands.speed import add_speed_flags, load_for_generation
from llmkit.errors import ConfigError
from llmkit.inference.optimize import prepare_for_decoding
from llmkit.layers.quantized import Int4Linear
from post_training_helpers import save_tiny_model

LLMKIT = str(Path(sys.executable).with_name("llmkit"))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("speed_flags") / "run")


def parse(argv: list[str], *, quantize: bool = True) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_speed_flags(p, quantize=quantize)
    return p.parse_args(argv)


def fake_cpu(monkeypatch, *, native: bool, t32: float, t16: float) -> None:
    monkeypatch.setattr("llmkit.runtime.native_bf16", lambda: native)
    monkeypatch.setattr("llmkit.runtime.measure", lambda shapes, weights_in_dtype: (t32, t16))


def test_flags_and_their_defaults():
    args = parse([])
    assert (args.device, args.dtype, args.threads, args.quantize) == ("auto", "auto", None, "auto")
    args = parse(["--device", "cpu", "--dtype", "bf16", "--threads", "1", "--quantize", "int4"])
    assert (args.device, args.dtype, args.threads, args.quantize) == ("cpu", "bf16", 1, "int4")
    assert not hasattr(parse([], quantize=False), "quantize")  # embed, score: nothing to quantise
    with pytest.raises(SystemExit):
        parse(["--dtype", "fp8"])


@pytest.mark.parametrize("native, t32, t16, dtype, compute", [
    (False, 0.1, 0.01, "fp32", torch.float32),  # emulated bf16: fp32 activations, fp32 prefill
    (True, 0.1, 0.04, "bf16", torch.bfloat16),  # native and faster: bf16, as before
])
def test_auto_int4_computes_in_the_chosen_precision_and_says_so(tiny, monkeypatch, capsys, native, t32, t16,
                                                               dtype, compute):
    fake_cpu(monkeypatch, native=native, t32=t32, t16=t16)
    lm = load_for_generation(tiny, parse(["--device", "cpu", "--quantize", "int4"]))
    layers = [m for m in lm.model.modules() if isinstance(m, Int4Linear)]
    assert layers and {m.compute_dtype for m in layers} == {compute}
    assert next(lm.model.parameters()).dtype == compute
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("device cpu (") and f", {dtype}: " in lines[0]
    # vocab 300 is not a multiple of 16: torch's kernel cannot take the head, llmkit's own can (8-bit)
    head = "8-bit head" if lm.model.decoding_report.int8_linears else "head unquantised"
    assert f", int4 weights ({head}" in lines[0] and lines[0].endswith(f"{lm.model.decoding_report.kernel})")
    assert len(lm.generate("the quick", max_new_tokens=4, temperature=0.0)) > 0


def test_quantize_auto_keeps_a_checkpoint_as_stored(tiny, capsys):
    """The default, --quantize auto, keeps what the file holds: an llmkit checkpoint's full-precision
    layers stay as they are (a GGUF's own blocks are kept: tests/io/test_gguf_kept.py); an unknown
    value from Python is refused in one line."""
    lm = load_for_generation(tiny, parse(["--device", "cpu", "--dtype", "fp32"]))
    assert not any(isinstance(m, Int4Linear) for m in lm.model.modules())
    assert "int4" not in capsys.readouterr().err
    with pytest.raises(ConfigError, match="quantize must be one of none, auto, int4"):
        llmkit.load(tiny, quantize="int3")


def test_explicit_bf16_measured_slower_warns_and_still_runs(tiny, monkeypatch, capsys):
    fake_cpu(monkeypatch, native=False, t32=0.01, t16=0.15)
    lm = load_for_generation(tiny, parse(["--dtype", "bf16", "--threads", "1"]))
    assert next(lm.model.parameters()).dtype == torch.bfloat16 and torch.get_num_threads() == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "1 thread)" in lines[0] and "bf16: as asked" in lines[0]
    assert lines[1].startswith("warning: ") and "15.0× slower" in lines[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLMKIT, *args], capture_output=True, text=True, timeout=300)


@no_cuda
@pytest.mark.parametrize("command", [
    ("generate", "--prompt", "hi"), ("chat", "hi"), ("embed", "hi"), ("score", "--prompt", "a", "--response", "b"),
])
def test_device_cuda_without_cuda_is_one_error_line_and_exit_2(tiny, command):
    result = run(command[0], "--model", str(tiny), *command[1:], "--device", "cuda")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: CUDA is not available"), result.stderr
    assert result.stdout == ""


def test_generate_with_dtype_fp32_is_the_librarys_greedy_output(tiny):
    """--dtype fp32 (never auto, which may differ between machines): the CLI's int4 text is exactly what
    the library produces with the same preparation."""
    result = run("generate", "--model", str(tiny), "--prompt", "the quick", "--max-new-tokens", "8",
                 "--temperature", "0", "--dtype", "fp32", "--quantize", "int4", "--threads", "2")
    assert result.returncode == 0, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and ", fp32: as asked, int4 weights" in err[0] and "2 threads" in err[0]
    lm = llmkit.load(tiny, dtype="fp32")
    prepare_for_decoding(lm.model, quantize="int4", dtype=lm.runtime.torch_dtype)
    assert result.stdout == "the quick" + lm.generate("the quick", max_new_tokens=8, temperature=0.0) + "\n"
