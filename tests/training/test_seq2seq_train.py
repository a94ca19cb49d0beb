"""Encoder-decoder training through the one loop: denoising batches, the seq2seq loss, exact resume,
and fine-tuning records (llmkit.training.seq2seq, seq2seq_finetune, llmkit.data.seq2seq_records)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmkit.config import preset
from llmkit.data.seq2seq_noise import SENTINEL_TOKENS, reassemble_spans
from llmkit.data.seq2seq_records import read_seq2seq_records, tokenize_examples
from llmkit.errors import DatasetError
from llmkit.io.checkpoint import latest_checkpoint, load_tensors
from llmkit.models.build import build_model
from llmkit.tokenizer import Tokenizer
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer
from llmkit.training.seq2seq import (IGNORE, DenoisingBatches, PairBatches, add_special_tokens, denoising_tokens,
                                     evaluate_seq2seq, seq2seq_loss)
from train_helpers import max_tensor_diff, train_losses

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small gain nothing from a second thread, and on a busy machine two threads
    spin-wait on each other (measured: 60x slower per step under load)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 12)) + ". " + " ".join(rng.choice(WORDS, 7)) + "!\n" for _ in range(300)]
    tok = Tokenizer.train(texts, 300)
    for objective in ("span_corruption", "text_infilling"):
        add_special_tokens(tok, denoising_tokens(objective))
    return tok


@pytest.fixture(scope="module")
def stream(tokenizer) -> np.ndarray:
    rng = np.random.default_rng(1)
    text = " ".join(" ".join(rng.choice(WORDS, 9)) + "." for _ in range(400))
    return np.array(tokenizer.encode(text), dtype=np.int64)


def test_added_special_tokens_keep_existing_ids(tokenizer):
    before = tokenizer.vocab_size
    add_special_tokens(tokenizer, SENTINEL_TOKENS)  # idempotent: already there
    assert tokenizer.vocab_size == before
    ids = [tokenizer.token_to_id(t) for t in SENTINEL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 100)) and ids[0] > tokenizer.eos_id
    assert ids[3] in tokenizer.encode("alpha <|sentinel_3|> beta")  # the literal text maps to the token


def test_span_corruption_batches_fill_the_context_and_reassemble(tokenizer, stream):
    batches = DenoisingBatches(stream, "span_corruption", seq_len=64, batch_size=4, seed=3, tokenizer=tokenizer,
                               start_id=0)
    b = batches.batch(2)
    assert b.input_ids.shape == (4, 64) and bool(b.attention_mask.all())  # fixed lengths: no padding
    again = batches.batch(2)
    assert torch.equal(b.input_ids, again.input_ids) and torch.equal(b.labels, again.labels)
    assert not torch.equal(b.input_ids, batches.batch(3).input_ids)
    sentinels = [tokenizer.token_to_id(t) for t in SENTINEL_TOKENS]
    n = batches.raw_len
    for row, window in zip(range(4), batches.windows.windows(2).tolist()):
        source, target = b.input_ids[row].tolist()[:-1], b.labels[row].tolist()[:-1]  # drop EOS
        assert reassemble_spans(source, target, sentinels) == stream[window * n: window * n + n].tolist()
    assert (b.decoder_input_ids[:, 0] == 0).all() and torch.equal(b.decoder_input_ids[:, 1:], b.labels[:, :-1])


def test_bart_batches_target_the_original_window(tokenizer, stream):
    batches = DenoisingBatches(stream, "text_infilling", seq_len=48, batch_size=4, seed=3, tokenizer=tokenizer,
                               start_id=2)
    b = batches.batch(0)
    n = batches.raw_len
    for row, window in enumerate(batches.windows.windows(0).tolist()):
        assert b.labels[row].tolist() == stream[window * n: window * n + n].tolist() + [tokenizer.eos_id]
        source = b.input_ids[row][b.attention_mask[row]].tolist()
        assert tokenizer.mask_id in source and len(source) <= 48 and source[-1] == tokenizer.eos_id
        assert sorted(source[:-1]) != sorted(b.labels[row].tolist()[:-1])  # noised, not a copy


def test_eval_batches_are_fixed_across_calls(tokenizer, stream):
    batches = DenoisingBatches(stream, "span_corruption", seq_len=64, batch_size=4, seed=3, tokenizer=tokenizer,
                               start_id=0)
    first = list(batches.eval_batches(stream[:1200], max_batches=3))
    second = list(batches.eval_batches(stream[:1200], max_batches=3))
    assert len(first) == 3 and all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, second))
    short = list(batches.eval_batches(stream[:41], max_batches=3))  # shorter than one T5 window (70)
    assert len(short) == 1 and short[0].input_ids.shape[0] == 1 and short[0].input_ids.shape[1] < 40
    with pytest.raises(DatasetError, match="validation split"):
        next(batches.eval_batches(stream[:2], max_batches=3))


def copy_task_pairs(n: int = 8) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(n):
        seq = rng.integers(10, 40, rng.integers(2, 7)).tolist()
        pairs.append((seq + [1], seq[::-1] + [1]))  # reverse the source; 1 is EOS
    return pairs


def train_run(out, steps, *, resume=False, name="t5v11-tiny", dropout=0.1):
    # min_lr_ratio=1: a constant LR after warmup, so steps=10 then 20 follows one 20-step schedule
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, min_lr_ratio=1.0, eval_interval=10,
                      eval_batches=2, log_interval=1, keep_checkpoints=2)
    model_cfg = preset(name, vocab_size=64, dropout=dropout)  # dropout: resume must restore the RNG too
    torch.manual_seed(0)
    model = build_model(model_cfg)
    pairs = copy_task_pairs()
    batches = PairBatches(pairs, batch_size=8, seed=1, pad_id=2, start_id=model_cfg.decoder_start_token_id)
    held_out = PairBatches(pairs[:4], batch_size=8, seed=1, pad_id=2, start_id=model_cfg.decoder_start_token_id)
    trainer = Trainer(model, cfg, loss_fn=seq2seq_loss, get_batch=batches.batch, out_dir=out,
                      evaluate=lambda m: evaluate_seq2seq(m, held_out.in_order()),
                      checkpoint_json={"config.json": {"format": "llmkit", "model": model_cfg.to_dict()}},
                      fingerprint={"model_config": model_cfg.non_default_fields()})
    if resume:
        trainer.resume()
    trainer.run()
    return trainer


@pytest.mark.parametrize("name", ["t5v11-tiny", "bart-tiny"])
def test_seq2seq_loss_falls(tmp_path, name):
    """Eight source → reversed-source pairs: memorising them needs the encoder (the targets differ
    only through their sources), so the loss can only fall this far if gradients reach it."""
    trainer = train_run(tmp_path / "run", 40, name=name)
    losses = train_losses(tmp_path / "run")
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (38, 39, 40)])
    assert last < 0.3 * first, (first, last)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_acc" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and 0 <= evals[-1]["val_acc"] <= 1
    assert trainer.state.tokens_seen > 0


def test_seq2seq_resume_is_exact(tmp_path):
    straight = train_run(tmp_path / "straight", 20)
    train_run(tmp_path / "split", 10)
    resumed = train_run(tmp_path / "split", 20, resume=True)
    assert resumed.state.step == 20
    a = load_tensors(latest_checkpoint(tmp_path / "straight" / "checkpoints") / "model.safetensors")
    b = load_tensors(latest_checkpoint(tmp_path / "split" / "checkpoints") / "model.safetensors")
    # same machine, same kernels, same order: resume is bitwise (0.0 measured on AVX-512, AVX2, default kernels)
    assert max_tensor_diff(a, b) < 1e-6
    assert train_losses(tmp_path / "split") == pytest.approx(train_losses(tmp_path / "straight"), abs=1e-6)
    assert straight.state.tokens_seen == resumed.state.tokens_seen


def test_loss_ignores_padding():
    model_cfg = preset("t5-tiny", vocab_size=64)
    model = build_model(model_cfg).eval()
    short = PairBatches([([5, 6, 1], [7, 1])], batch_size=1, seed=0, pad_id=2, start_id=0).batch(0)
    padded = PairBatches([([5, 6, 1], [7, 1]), ([5, 6, 7, 8, 9, 1], [7, 8, 9, 10, 1])], batch_size=2, seed=0,
                         pad_id=2, start_id=0).in_order()
    batch = next(padded)
    assert (batch.labels[0, 2:] == IGNORE).all()
    with torch.no_grad():
        alone = evaluate_seq2seq(model, iter([short]))["val_loss"]
        row0 = type(batch)(batch.input_ids[:1], batch.attention_mask[:1], batch.decoder_input_ids[:1],
                           batch.labels[:1])
        # padding changes only summation order: 4.8e-7 on a loss of 7.7 measured (AVX-512 / AVX2 / default)
        assert evaluate_seq2seq(model, iter([row0]))["val_loss"] == pytest.approx(alone, abs=1e-5)


def test_records_map_instructions_and_truncate_with_a_count(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps({"source": "alpha beta", "target": "beta alpha"}),
                               "",
                               json.dumps({"instruction": "Reverse", "input": "gamma delta", "output": "delta gamma"}),
                               json.dumps({"instruction": "Say hi", "output": "hi"}),
                               json.dumps({"source": " ".join(WORDS * 20), "target": "long"})]) + "\n")
    examples = read_seq2seq_records(path)
    assert [(e.source, e.target) for e in examples[:3]] == [
        ("alpha beta", "beta alpha"), ("Reverse\n\ngamma delta", "delta gamma"), ("Say hi", "hi")]
    assert examples[1].where == f"{path}:3"
    pairs = tokenize_examples(examples, tokenizer, max_source_len=32, max_target_len=32)
    assert pairs.truncated_sources == 1 and pairs.truncated_targets == 0
    assert len(pairs.pairs[3][0]) == 32 and pairs.pairs[3][0][-1] == tokenizer.eos_id
    assert pairs.pairs[0][1] == tokenizer.encode("beta alpha") + [tokenizer.eos_id]


@pytest.mark.parametrize("line, message", [
    ('{"source": "a", "target": ""}', r":1: field 'target' is empty"),
    ('{"source": "a"}', r":1: missing field 'target'"),
    ('{"instruction": "a", "output": "  "}', r":1: field 'output' is empty"),
    ('{"source": "a", "target": 3}', r":1: field 'target' must be a string"),
    ('{"text": "a"}', r":1: missing field 'source'/'target'"),
    ('{"source": "a", "target": "b"', r":1:\d+: invalid JSON"),
    ('["a", "b"]', r":1: expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DatasetError, match=message):
        read_seq2seq_records(path)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_finetune_a_hugging_face_model_keeps_its_special_tokens(tmp_path, kind):
    """A transformers T5/BART directory fine-tunes like an llmkit run: sources and targets are encoded
    with the model's own post-processor (T5: text </s>; BART: <s> text </s>), and the output keeps
    its EOS so `llmkit.load` → generate stops where the base model would."""
    pytest.importorskip("transformers")
    import llmkit
    from seq2seq_helpers import WORDS as HF_WORDS, bart_model, save_hf_dir, t5_model
    from llmkit.training.seq2seq_finetune import finetune_seq2seq

    base = save_hf_dir(t5_model(gated=True) if kind == "t5" else bart_model(), tmp_path / "hf", kind)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"source": f"{a} {b}", "target": f"{b} {a}"}) + "\n"
                            for a, b in zip(HF_WORDS[:10], HF_WORDS[10:20])))
    cfg = TrainConfig(steps=4, batch_size=4, eval_interval=2, eval_batches=1, log_interval=1, val_fraction=0.2,
                      lr=1e-3, warmup_steps=1)
    state = finetune_seq2seq(base, data, tmp_path / "ft", cfg)
    assert state.step == 4
    lm = llmkit.load(tmp_path / "ft")
    eos = 1 if kind == "t5" else 2
    assert lm.tokenizer.eos_token == "</s>" and lm.tokenizer.eos_id == eos and lm.eos_ids == [eos]
    pairs = tokenize_examples(read_seq2seq_records(data), lm.tokenizer, max_source_len=64, max_target_len=64).pairs
    assert pairs[0][0] == ([] if kind == "t5" else [0]) + [lm.tokenizer.token_to_id(w) for w in ("w0", "w10")] + [eos]
    assert isinstance(lm.generate("w1 w2", max_new_tokens=3, temperature=0), str)
