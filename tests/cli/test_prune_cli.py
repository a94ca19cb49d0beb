"""`llmkit prune` end to end, as real processes: a trained run pruned four ways (one with a recovery
fine-tune), each output loaded by `llmkit.load` and run by `generate`; bad flags and inputs are one
line (in process, through llmkit.cli.main) and leave nothing behind."""

import json

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.quant.pruning.apply import block_linears
from bounded_llmkit import run_all
from tests.conftest import make_corpus

PRUNED = {  # name → flags
    "wanda": ("--method", "wanda", "--calibration", "{corpus}", "--calibration-samples", "4"),
    "sparsegpt_2_4": ("--method", "sparsegpt", "--pattern", "2:4", "--calibration-samples", "2"),
    "heads": ("--method", "magnitude", "--pattern", "heads", "--sparsity", "0.5"),
    "neurons_finetuned": ("--method", "magnitude", "--pattern", "neurons", "--finetune-steps", "3", "--data",
                          "{corpus}", "--batch-size", "2", "--seq-len", "32"),
}
BAD = {  # name → (flags after --model RUN, what the error line says)
    "unknown_method": (("--method", "obs"), "invalid choice"),
    "unknown_pattern": (("--pattern", "1:4"), "invalid choice"),
    "sparsity_one": (("--sparsity", "1"), "between 0 and 1"),
    "sparsity_nan": (("--sparsity", "nan"), "must be a finite number"),
    "two_four_at_30": (("--pattern", "2:4", "--sparsity", "0.3"), "removes 2 of every 4"),
    "global_wanda": (("--method", "wanda", "--scope", "global"), "only |w| allows"),
    "calibration_for_magnitude": (("--method", "magnitude", "--calibration", "{corpus}"), "magnitude needs none"),
    "calibration_missing": (("--calibration", "{root}/nowhere"), "no such file or directory"),
    "calibration_too_short": (("--calibration", "{root}/short.txt"), "fewer than one calibration"),
    "samples_zero": (("--calibration-samples", "0"), "--calibration-samples must be ≥ 1"),
    "finetune_without_data": (("--method", "magnitude", "--finetune-steps", "2"), "needs --data"),
    "data_without_finetune": (("--method", "magnitude", "--data", "{corpus}"), "give --finetune-steps"),
    "data_missing": (("--method", "magnitude", "--finetune-steps", "2", "--data", "{root}/nowhere"),
                     "no such file or directory"),
    "gqa_group_of_none": (("--method", "magnitude", "--pattern", "heads"), "removes 0"),  # 0.25 of 2 groups
    "model_missing": (("--model", "{root}/no_model"), "no such model"),
    "out_taken": (("--out", "{root}/taken"), "already exists and is not empty"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
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
    results = run_all({name: ["prune", "--model", run, *fill(flags), "--out", root / name, "--threads", "1"]
                       for name, flags in PRUNED.items()}, root)
    for name in PRUNED:
        assert results[name].returncode == 0, results[name].stderr
    results.update(run_all({f"generate_{name}": ["generate", "--model", root / name, "--prompt", "The model",
                                                 "--max-new-tokens", "8", "--temperature", "0", "--threads", "1"]
                            for name in PRUNED}, root))
    return dict(root=root, run=run, corpus=corpus, results=results, fill=fill)


@pytest.mark.parametrize("name", PRUNED)
def test_prune_writes_a_model_that_loads_and_generates(name, cli):
    res, out = cli["results"][name], cli["root"] / name
    assert f"wrote {out}" in res.stderr.splitlines()[-1]
    assert not list(cli["root"].glob(f".{name}.*"))  # no temporary directory left
    lm, full = llmkit.load(out), llmkit.load(cli["run"])
    config = out / "config.json" if (out / "config.json").exists() else next(out.glob("checkpoints/*/config.json"))
    record = json.loads(config.read_text())["pruning"]
    assert record["method"] == PRUNED[name][1] and record["measured_sparsity"] > 0.1
    weights = {n: lm.model.get_submodule(n).weight for ns in block_linears(lm.model).values() for n in ns}
    if name == "wanda":
        assert all(int((W == 0).sum()) == W.numel() // 2 for W in weights.values())
        assert res.stderr.count("wanda: stack.blocks.") == 2  # a progress line per block
    elif name == "sparsegpt_2_4":
        assert all(bool(((W.reshape(-1, 4) == 0).sum(1) == 2).all()) for W in weights.values())
        assert "the model's own samples" in res.stderr
    elif name == "heads":
        assert (lm.config.n_heads, lm.config.n_kv_heads) == (2, 1)  # one GQA group of two, kept whole
    else:
        assert lm.config.d_ff == full.config.d_ff - round(0.25 * full.config.d_ff)
        assert (out / "metrics.jsonl").exists() and "step 3" in res.stderr
    generated = cli["results"][f"generate_{name}"]
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("The model")
    x = torch.tensor([lm.tokenizer.encode("def decode(self, s):\n    return s")])
    with torch.no_grad():
        assert torch.isfinite(lm.model(x)).all()


@pytest.mark.parametrize("name", BAD)
def test_bad_flags_and_inputs_end_in_one_line_and_leave_nothing(name, cli, capsys):
    flags, message = BAD[name]
    argv = ["prune", "--model", str(cli["run"]), "--out", str(cli["root"] / f"bad_{name}"), *cli["fill"](flags)]
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
