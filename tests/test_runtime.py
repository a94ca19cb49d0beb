"""Device and precision choice (llmkit/runtime.py): the rule with the CPU's bf16 support and the
probe's timings faked both ways, devices that are not there, and moving batches to a device."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from llmkit.errors import ConfigError
from llmkit.runtime import (Runtime, choose_dtype, cpu_capability, linear_shapes, make_runtime, measure,
                            model_device, native_bf16, resolve_device, to_device)

CPU = torch.device("cpu")
SHAPES = [(256, 256, 1024)]


def probe(t32: float, t16: float):
    calls = []

    def fake(shapes, weights_in_dtype):
        calls.append((list(shapes), weights_in_dtype))
        return t32, t16
    fake.calls = calls
    return fake


@pytest.mark.parametrize("training", [True, False])
def test_auto_is_fp32_without_native_bf16_and_never_probes(training):
    fake = probe(0.1, 0.01)  # even a probe that favours bf16 is not asked
    choice = choose_dtype("auto", CPU, SHAPES, training=training, native=False, probe=fake)
    assert (choice.dtype, choice.reason, fake.calls) == ("fp32", "no native bf16", [])


@pytest.mark.parametrize("training", [True, False])
def test_auto_takes_bf16_only_when_native_and_measured_faster(training):
    faster = choose_dtype("auto", CPU, SHAPES, training=training, native=True, probe=probe(0.1, 0.04))
    assert faster.dtype == "bf16" and "2.5× faster" in faster.reason
    slower = choose_dtype("auto", CPU, SHAPES, training=training, native=True, probe=probe(0.1, 0.2))
    assert slower.dtype == "fp32" and "2.0× slower" in slower.reason
    # within the noise margin: fp32, so a busy machine cannot flip the choice between runs
    level = choose_dtype("auto", CPU, SHAPES, training=training, native=True, probe=probe(0.1, 0.095))
    assert level.dtype == "fp32"


def test_probe_shapes_and_weights_follow_training_or_decoding():
    fake = probe(0.1, 0.04)
    choose_dtype("auto", CPU, SHAPES, training=True, native=True, probe=fake)
    choose_dtype("auto", CPU, SHAPES, training=False, native=True, probe=fake)
    assert fake.calls == [(SHAPES, False), (SHAPES, True)]  # autocast over fp32 weights; bf16 weights


def test_tiny_training_models_stay_fp32():
    choice = choose_dtype("auto", CPU, SHAPES, training=True, native=True, probe=probe(0.001, 0.0001))
    assert choice.dtype == "fp32" and "too small" in choice.reason


def test_explicit_bf16_runs_with_a_warning_when_slower():
    choice = choose_dtype("bf16", CPU, SHAPES, training=True, native=False, probe=probe(3.4, 75.0))
    assert choice.dtype == "bf16"
    assert "22.1× slower" in choice.warning and "no native bf16" in choice.warning
    assert choose_dtype("bf16", CPU, SHAPES, training=True, native=True, probe=probe(0.1, 0.05)).warning is None
    assert choose_dtype("fp32", CPU, SHAPES, training=True, native=True, probe=probe(9, 1)).dtype == "fp32"


def test_bad_precisions_are_one_line_errors():
    with pytest.raises(ConfigError, match="fp16 needs loss scaling"):
        choose_dtype("fp16", CPU, SHAPES, training=True)
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        choose_dtype("fp8", CPU, SHAPES, training=False)


def test_native_bf16_reads_the_cpu_flags():
    assert native_bf16({"avx2", "fma"}) is False
    assert native_bf16({"avx512f", "avx512_bf16"}) is True
    assert native_bf16({"amx_tile", "amx_bf16"}) is True
    assert native_bf16({"fp", "asimd", "bf16"}) is True  # Arm


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_devices_that_are_not_here_are_clear_errors():
    assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_device("cpu") == CPU
    with pytest.raises(ConfigError, match=r"--device cuda: CUDA is not available here"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"--device cuda:1: CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_with_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("hello world\n" * 200)
    done = subprocess.run([sys.executable, "-m", "llmkit", "train", "--data", str(data), "--out", str(tmp_path / "o"),
                           "--preset", "gpt2-tiny", "--steps", "2", "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --device cuda: CUDA is not available"), done.stderr
    assert "Traceback" not in done.stderr


def test_describe_names_the_cpu_capability_threads_and_reason():
    runtime = make_runtime("cpu", "fp32", 1, shapes=SHAPES, training=True)
    assert runtime.describe() == f"device cpu ({cpu_capability()}, 1 thread), fp32: as asked"
    assert torch.get_num_threads() == 1
    assert runtime.to_dict()["cpu_capability"] == cpu_capability()


def test_autocast_is_a_no_op_in_fp32_and_bf16_otherwise():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with Runtime(CPU, "fp32", 1, "").autocast():
        assert (x @ w).dtype == torch.float32
    with Runtime(CPU, "bf16", 1, "").autocast():
        assert (x @ w).dtype == torch.bfloat16


@dataclass
class Pair:
    ids: torch.Tensor
    label: int


def test_to_device_moves_every_tensor_in_a_batch():
    meta = torch.device("meta")
    batch = (torch.zeros(2), [torch.ones(3), {"m": torch.ones(1)}], Pair(torch.arange(3), 4), "text")
    moved = to_device(batch, meta)
    assert moved[0].device == meta and moved[1][0].device == meta and moved[1][1]["m"].device == meta
    assert moved[2].ids.device == meta and moved[2].label == 4 and moved[3] == "text"


def test_a_model_on_the_meta_device_reports_it():
    model = torch.nn.Linear(4, 4, device="meta")
    assert model_device(model).type == "meta"
    assert linear_shapes(model, 8) == []  # nothing to measure on meta


def test_measure_times_both_precisions_quickly():
    t32, t16 = measure([(64, 64, 64)], False, budget_s=0.05)
    assert t32 > 0 and t16 > 0
