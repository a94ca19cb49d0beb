"""`llmkit quantize` (and `--kv-cache int8`) end to end, as real subprocesses on a tiny model trained in the test: each
method writes a directory that generate and chat run quantised, convert refuses, and bad flags or
inputs end in one line, exit 2, with no output directory left behind (those run in process: cheaper)."""

from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit.cli import main
from bounded_llmkit import run_all
from conftest import make_corpus

QUANTIZED = {  # name → flags
    "int8": ("--method", "rtn", "--bits", "8"),
    "gptq": ("--method", "gptq", "--bits", "4", "--group-size", "32", "--calibration", "{corpus}",
             "--calibration-samples", "4"),
    "awq": ("--method", "awq", "--bits", "4", "--group-size", "64", "--symmetric", "--calibration-samples", "2"),
}
BAD = {  # name → (flags after --model RUN, what the error line says)
    "bits_3": (("--bits", "3"), "invalid choice"),
    "int8_asymmetric": (("--bits", "8", "--asymmetric"), "int8 is symmetric only"),
    "odd_group": (("--group-size", "33"), "--group-size must be an even number"),
    "unknown_method": (("--method", "hqq"), "invalid choice"),
    "calibration_for_rtn": (("--calibration", "{corpus}"), "round-to-nearest needs none"),
    "calibration_missing": (("--method", "gptq", "--calibration", "{root}/nowhere"), "no such file or directory"),
    "calibration_too_short": (("--method", "awq", "--calibration", "{root}/short.txt"), "fewer than one calibration"),
    "samples_zero": (("--method", "gptq", "--calibration-samples", "0"), "--calibration-samples must be ≥ 1"),
    "model_missing": (("--model", "{root}/no_model"), "no such model"),
    "out_taken": (("--out", "{root}/taken"), "already exists and is not empty"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    corpus = make_corpus(root / "corpus")
    (root / "short.txt").write_text("too short\n", encoding="utf-8")
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("mine", encoding="utf-8")
    run = root / "run"
    trained = run_all({"train": ["train", "--data", corpus, "--out", run, "--preset", "llama-tiny", "--steps", "10",
                                 "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--warmup-steps", "2",
                                 "--threads", "1", "--dtype", "fp32"]}, root)["train"]
    assert trained.returncode == 0, trained.stderr
    fill = lambda flags: [str(f).format(corpus=corpus, root=root) for f in flags]  # noqa: E731
    commands = {name: ["quantize", "--model", run, *fill(flags), "--out", root / name, "--threads", "1"]
                for name, flags in QUANTIZED.items()}
    results = run_all(commands, root)
    for name in QUANTIZED:
        assert results[name].returncode == 0, results[name].stderr
    later = {}
    for name in QUANTIZED:
        later[f"generate_{name}"] = ["generate", "--model", root / name, "--prompt", "The model", "--max-new-tokens", "8",
                                     "--temperature", "0", "--threads", "1"]
    later["chat"] = ["chat", "--model", root / "gptq", "hello", "--max-new-tokens", "4", "--threads", "1"]
    later["generate_kv_int8"] = ["generate", "--model", root / "gptq", "--prompt", "The model", "--max-new-tokens", "8",
                                 "--temperature", "0", "--threads", "1", "--kv-cache", "int8"]
    later["convert"] = ["convert", "--model", root / "gptq", "--out", root / "hf_out"]
    results.update(run_all(later, root))
    return dict(root=root, run=run, corpus=corpus, results=results, fill=fill)


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantize_writes_a_model_that_loads_quantised(name, cli):
    res = cli["results"][name]
    out = cli["root"] / name
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    scheme = json.loads((out / "config.json").read_text())["quantization"]
    assert scheme["method"] == QUANTIZED[name][1] and scheme["bits"] == int(QUANTIZED[name][3])
    assert f"wrote {out}" in res.stderr
    if scheme["method"] != "rtn":  # a progress line per block, and where the calibration came from
        assert res.stderr.count(f"{scheme['method']}: stack.blocks.") == 2
        assert ("the model's own samples" in res.stderr) == (name == "awq")
    assert not list(cli["root"].glob(f".{name}.*"))  # no temporary directory left
    lm, full = llmkit.load(out), llmkit.load(cli["run"])
    x = torch.tensor([lm.tokenizer.encode("def decode(self, s):\n    return s")])
    with torch.no_grad():
        got, ref = lm.model(x), full.model(x)
    # a 10-step model's logits span ~±3; 4-bit weights move them by a fraction of that, not by their scale
    assert 0 < float((got - ref).abs().max()) < 0.5 * float(ref.abs().max())


@pytest.mark.parametrize("command", [*(f"generate_{name}" for name in QUANTIZED), "chat"])
def test_generate_and_chat_run_the_quantised_model(command, cli):
    res = cli["results"][command]
    assert res.returncode == 0, res.stderr
    assert "weights (saved quantised" in res.stderr.splitlines()[0]  # then "; KERNEL)" where a kernel is named
    assert res.stdout.startswith("The model") if command.startswith("generate") else res.stdout.strip()


def test_generate_with_an_int8_kv_cache(cli):
    res = cli["results"]["generate_kv_int8"]
    assert res.returncode == 0, res.stderr
    line = res.stderr.splitlines()[0]
    assert "weights (saved quantised" in line and line.endswith("), int8 KV cache")
    assert res.stdout.startswith("The model")


def test_convert_refuses_a_quantised_model_in_one_line(cli):
    res = cli["results"]["convert"]
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "is quantised (int4 gptq g32 asymmetric)" in res.stderr and not (cli["root"] / "hf_out").exists()


@pytest.mark.parametrize("name", BAD)
def test_bad_flags_and_inputs_end_in_one_line_and_leave_nothing(name, cli, capsys):
    """In process (llmkit.cli.main, what the `llmkit` script runs): the same exit status and stderr."""
    flags, message = BAD[name]
    argv = ["quantize", "--model", str(cli["run"]), "--out", str(cli["root"] / f"bad_{name}"), *cli["fill"](flags)]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err.splitlines()[-1]
    if message != "invalid choice":  # argparse prints its usage first; ours is one line
        assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not (cli["root"] / f"bad_{name}").exists()
    assert not list(cli["root"].glob(f".bad_{name}.*"))
    assert [p.name for p in (cli["root"] / "taken").iterdir()] == ["keep.txt"]
