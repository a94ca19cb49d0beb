"""`llmkit extend`, run as real subprocesses on small checkpoints written in the test: the extended
config and weights, the short fine-tune through the training loop, and one-line errors (exit 2)
that leave no output directory behind."""

from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit.config import preset
from llmkit.io.checkpoint import load_tensors, save_checkpoint
from llmkit.io.weights import model_tensors
from llmkit.models.causal_lm import CausalLM
from llmkit.tokenizer import Tokenizer
from conftest import make_corpus
from test_cli import Runner


def write_checkpoint(root, tokenizer_dir, cfg):
    """A run directory as `llmkit train` leaves it, for a freshly initialised model of `cfg`."""
    model = CausalLM(cfg)
    return save_checkpoint(root / "checkpoints", 5, tensors={"model.safetensors": model_tensors(model)},
                           json_files={"config.json": {"format": "llmkit", "version": llmkit.__version__,
                                                       "model": cfg.to_dict()}},
                           copy_files={"tokenizer.json": tokenizer_dir / "tokenizer.json"})


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    root = tmp_path_factory.mktemp("extend")
    corpus = make_corpus(root / "corpus")
    tok = Tokenizer.train([(corpus / "notes.txt").read_text()], 280)
    tok.save(root / "tok")
    rope = write_checkpoint(root / "rope_run", root / "tok", preset("llama-tiny", vocab_size=tok.vocab_size,
                                                                     max_seq_len=32))
    learned = write_checkpoint(root / "gpt2_run", root / "tok", preset("gpt2-tiny", vocab_size=tok.vocab_size))
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("x")
    r = Runner(root)
    src = ("--model", root / "rope_run")
    r.start("linear", "extend", *src, "--factor", "4", "--method", "linear", "--out", root / "linear")
    r.start("ntk", "extend", *src, "--factor", "2", "--method", "ntk", "--out", root / "ntk")
    r.start("yarn_ft", "extend", *src, "--factor", "2", "--method", "yarn", "--out", root / "yarn_ft",
            "--finetune-steps", "3", "--data", corpus, "--seq-len", "48", "--batch-size", "2", "--lr", "1e-3")
    bad = {
        "learned": ("--model", root / "gpt2_run", "--factor", "2", "--method", "linear"),
        "factor_small": (*src, "--factor", "0.5", "--method", "yarn"),
        "no_data": (*src, "--factor", "2", "--method", "linear", "--finetune-steps", "2"),
        "missing_model": ("--model", root / "no_such_run", "--factor", "2", "--method", "linear"),
    }
    for name, args in bad.items():
        r.start(name, "extend", *args, "--out", root / f"out_{name}")
    r.start("out_not_empty", "extend", *src, "--factor", "2", "--method", "linear", "--out", root / "full")
    r.wait()
    r.run("again", "extend", "--model", root / "linear", "--factor", "2", "--method", "linear",
          "--out", root / "out_again")
    return dict(root=root, r=r, rope=rope, learned=learned, bad=(*bad, "again"))


def test_extend_writes_the_longer_context_and_keeps_the_weights(ext):
    result = ext["r"].results["linear"]
    assert result.returncode == 0, result.stderr
    assert "context 32 → 128" in result.stderr
    lm = llmkit.load(ext["root"] / "linear")
    cfg = lm.model.cfg
    assert (cfg.max_seq_len, cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_seq_len) == (128, "linear", 4.0, 32)
    source = load_tensors(ext["rope"] / "model.safetensors")
    extended = load_tensors(next((ext["root"] / "linear" / "checkpoints").iterdir()) / "model.safetensors")
    assert source.keys() == extended.keys()
    assert all(torch.equal(source[k], extended[k]) for k in source)
    ids = torch.randint(0, cfg.vocab_size, (1, 120))  # past the original 32 positions
    with torch.no_grad():
        assert torch.isfinite(lm.model(ids)).all()
    meta = json.loads((next((ext["root"] / "linear" / "checkpoints").iterdir()) / "config.json").read_text())
    assert meta["extended_from"]["factor"] == 4.0 and meta["extended_from"]["method"] == "linear"


def test_ntk_is_dynamic_rope_scaling(ext):
    assert ext["r"].results["ntk"].returncode == 0, ext["r"].results["ntk"].stderr
    cfg = llmkit.load(ext["root"] / "ntk").model.cfg
    assert (cfg.max_seq_len, cfg.rope_scaling, cfg.rope_original_max_seq_len) == (64, "dynamic", 32)


def test_finetune_trains_the_extended_model_through_the_training_loop(ext):
    result = ext["r"].results["yarn_ft"]
    assert result.returncode == 0, result.stderr
    out = ext["root"] / "yarn_ft"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in row and row["step"] == 3 for row in rows)
    assert (out / "checkpoints" / "step-00000003").is_dir() and (out / "loss.png").is_file()
    lm = llmkit.load(out)
    assert (lm.model.cfg.rope_scaling, lm.model.cfg.max_seq_len) == ("yarn", 64)
    source = load_tensors(ext["rope"] / "model.safetensors")
    tuned = model_tensors(lm.model)
    assert not torch.equal(source["embeddings.embed.weight"], tuned["embeddings.embed.weight"])  # it trained
    assert source.keys() == tuned.keys()


@pytest.mark.parametrize("name,fragment", [
    ("learned", "position='learned'"), ("factor_small", "--factor must be a number > 1"),
    ("no_data", "--finetune-steps needs --data"), ("missing_model", "no such model"),
    ("again", "already extended"), ("out_not_empty", "already exists and is not empty"),
])
def test_bad_input_is_one_line_and_exit_2(ext, name, fragment):
    result = ext["r"].results[name]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    if name in ext["bad"]:
        assert not (ext["root"] / f"out_{name}").exists()  # nothing half-written
    else:
        assert [p.name for p in (ext["root"] / "full").iterdir()] == ["keep.txt"]
