"""SFT: the loss mask covers exactly the replies, the length policy never leaves an example without a
supervised token, LoRA merges exactly, and a tiny run learns and loads back with its chat format."""

from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit.api import LanguageModel
from llmkit.config import preset
from llmkit.data.chat_examples import IGNORE, Example, fit_length, pack, pad_batch, render_supervised
from llmkit.errors import ConfigError, DatasetError
from llmkit.io.checkpoint import load_tensors, require_checkpoint
from llmkit.io.hf import save_hf
from llmkit.layers.lora import LoraConfig, LoRALinear, apply_lora, merge_lora
from llmkit.models.causal_lm import CausalLM
from llmkit.training.sft import sft, sft_loss
from post_training_helpers import (CHATML, addition_records, fast_config, save_tiny_hf_chat_model, save_tiny_model,
                                   tiny_tokenizer, write_jsonl)
from train_helpers import rows_of

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 2+4?"},
                {"role": "assistant", "content": "It is 6."}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def spans(example: Example) -> list[tuple[bool, list[int]]]:
    """Maximal runs of (supervised?, ids)."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.ids, example.labels):
        supervised = label != IGNORE
        assert not supervised or label == token
        if out and out[-1][0] == supervised:
            out[-1][1].append(token)
        else:
            out.append((supervised, [token]))
    return out


@pytest.mark.parametrize("template, replies, prompt_start", [
    (None, ["5<|end|>", "It is 6.<|end|>"], "<|system|>\nBe brief.<|end|>\n<|user|>\n"),
    (CHATML, ["5<|im_end|>", "It is 6.<|im_end|>"], "<|im_start|>system\nBe brief.<|im_end|>\n"),
])
def test_mask_covers_exactly_the_assistant_replies(tok, template, replies, prompt_start):
    lm = LanguageModel(CausalLM(preset("llama-tiny", vocab_size=tok.vocab_size)), tok, "x", chat_template=template)
    example = render_supervised(lm, CONVERSATION)
    parts = spans(example)
    assert [tok.decode(ids) for supervised, ids in parts if supervised] == replies
    prompts = [tok.decode(ids) for supervised, ids in parts if not supervised]
    assert len(prompts) == 2 and prompts[0].startswith("<|eos|>" + prompt_start)  # llmkit's prefix: EOS
    assert prompts[0].endswith("What is 2+3?" + ("<|end|>\n<|assistant|>\n" if template is None else
                                                 "<|im_end|>\n<|im_start|>assistant\n"))
    # Inference sees the same tokens: the prompt part is what chat_ids gives for the conversation so far.
    assert example.ids[: len(parts[0][1])] == lm.chat_ids(CONVERSATION[:2])
    assert example.ids[: -len(parts[-1][1])] == lm.chat_ids(CONVERSATION[:4])


def test_length_policy_never_leaves_an_unsupervised_example(tok):
    ex = Example(ids=list(range(10)), labels=[IGNORE] * 6 + [6, 7, 8, 9], where="f.jsonl:3")
    cut, what = fit_length(ex, 8, "truncate")
    assert (cut.ids, cut.labels, what) == (list(range(8)), [IGNORE] * 6 + [6, 7], "truncated")
    assert fit_length(ex, 6, "truncate") == (None, "prompt fills the context")
    assert fit_length(ex, 8, "drop") == (None, "too long")
    assert fit_length(ex, 10, "error") == (ex, None)
    with pytest.raises(DatasetError, match=r"^f.jsonl:3: 10 tokens, longer than the context of 8"):
        fit_length(ex, 8, "error")
    with pytest.raises(ConfigError, match="--overlength"):
        fit_length(ex, 8, "cut")


def test_packing_keeps_labels_and_batches_pad_without_supervision():
    a = Example([1, 2, 3], [IGNORE, 2, 3], "a")
    b = Example([4, 5], [IGNORE, 5], "b")
    c = Example([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9], "c")
    rows = pack([a, b, c], 5)
    assert [(r.ids, r.labels) for r in rows] == [([1, 2, 3, 4, 5], [IGNORE, 2, 3, IGNORE, 5]),
                                                 ([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9])]
    ids, labels, mask = pad_batch(rows, pad_id=0)
    assert ids[1].tolist() == [6, 7, 8, 9, 0] and labels[1].tolist()[-1] == IGNORE and mask[1].tolist() == [1] * 4 + [0]


def test_sft_loss_ignores_prompt_tokens():
    torch.manual_seed(0)
    model = CausalLM(preset("llama-tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    loss, metrics = sft_loss(model, (ids, labels, torch.ones_like(ids)))
    logits = model(ids)[:, 4:-1]  # positions 4..7 predict tokens 5..8
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 5:].reshape(-1))
    # the same logits, a mean of 8 cross-entropies (≈ 4.2) in another order: 4.8e-7 measured (AVX-512 / AVX2 / default),
    # within allclose's 1e-6 + 1e-5·|want|
    assert metrics["supervised_tokens"] == 8 and torch.allclose(loss, want, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_lora_merge_equals_unmerged_outputs(name):
    torch.manual_seed(0)
    model = CausalLM(preset(name, vocab_size=64)).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 7))
    before = model(x)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")))
    assert len(names) == 3 * model.cfg.n_layers
    assert torch.allclose(model(x), before)  # B starts at zero: the adapted model is the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.2)  # B starts at zero; make the update real
    unmerged = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base)
    # W + BA merged vs applied separately: fp32 summation order; 3.1e-7 measured (AVX-512 / AVX2 / default)
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    changed = {k for k in base if not torch.equal(base[k], model.state_dict()[k])}
    assert changed == {f"{n}.weight" for n in names}


def test_lora_rejects_unknown_targets_by_name():
    model = CausalLM(preset("llama-tiny", vocab_size=64))
    with pytest.raises(ConfigError, match=r"--lora-targets qkv matched no layer; .*q_proj"):
        apply_lora(model, LoraConfig(targets=("qkv",)))
    with pytest.raises(ConfigError, match="--lora-rank"):
        LoraConfig(rank=0)


def test_tiny_sft_run_learns_and_loads_back(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "sft.jsonl", addition_records(40))
    sft(base, data, tmp_path / "out", fast_config())
    train = [r["train_loss"] for r in rows_of(tmp_path / "out") if "train_loss" in r]
    assert len(train) == 12 and sum(train[-3:]) / 3 < 0.7 * sum(train[:3]) / 3, train
    assert any("val_loss" in r for r in rows_of(tmp_path / "out"))
    lm = llmkit.load(tmp_path / "out")
    end = lm.tokenizer.token_to_id("<|end|>")
    assert lm.eos_ids == [lm.tokenizer.eos_id, end]  # generation stops at the default template's turn end
    meta = json.loads((require_checkpoint(tmp_path / "out" / "checkpoints") / "config.json").read_text())
    assert meta["trained_with"] == "sft" and "lora" not in meta


def test_lora_sft_run_changes_only_adapted_layers_and_loads_merged(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "sft.jsonl", addition_records(20))
    sft(base, data, tmp_path / "out", fast_config(steps=4, eval_interval=4),
        lora=LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")), packing=True)
    stored = load_tensors(require_checkpoint(tmp_path / "out" / "checkpoints") / "model.safetensors")
    assert any(k.endswith("lora_A") for k in stored)  # adapters kept for exact resume
    before, after = llmkit.load(base).model.state_dict(), llmkit.load(tmp_path / "out").model.state_dict()
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    # Export (what `llmkit convert` does) writes the merged weights.
    tuned = llmkit.load(tmp_path / "out")
    save_hf(tuned.model, tuned.tokenizer, tmp_path / "hf", prefix_ids=tuned.prefix_ids, eos_ids=tuned.eos_ids)
    x = torch.tensor([tuned.chat_ids([{"role": "user", "content": "What is 1+2?"}])])
    # the saved merged weights are the in-memory ones: 0.0 measured (AVX-512 / AVX2 / default)
    assert torch.allclose(llmkit.load(tmp_path / "hf").model(x), tuned.model(x), atol=1e-5)


def test_sft_of_a_model_with_its_own_chat_format_keeps_it(tmp_path):
    source = llmkit.load(save_tiny_hf_chat_model(tmp_path / "hf"))
    assert source.chat_template == CHATML and source.tokenizer.eos_token == "<|end|>"
    data = write_jsonl(tmp_path / "sft.jsonl", addition_records(8))
    sft(tmp_path / "hf", data, tmp_path / "out", fast_config(steps=1, eval_interval=1))
    tuned = llmkit.load(tmp_path / "out")
    assert tuned.chat_template == CHATML
    assert (tuned.prefix_ids, tuned.eos_ids) == (source.prefix_ids, source.eos_ids)
    assert tuned.tokenizer.eos_token == "<|end|>" and tuned.tokenizer.eos_id == source.tokenizer.eos_id
    messages = [{"role": "user", "content": "What is 1+1?"}]
    assert tuned.chat_ids(messages) == source.chat_ids(messages)


def test_records_whose_prompt_fills_the_context_are_dropped_and_counted(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    long_prompt = {"instruction": "What is 2+3? " * 10, "output": "5"}
    data = write_jsonl(tmp_path / "sft.jsonl", [long_prompt] * 3)
    events = []
    with pytest.raises(DatasetError, match=r"0 usable examples in .*sft.jsonl \(3 lines read; dropped: 3 prompt "
                                           r"fills the context; context 32 tokens\)"):
        sft(base, data, tmp_path / "out", fast_config(seq_len=32), on_event=lambda k, i: events.append((k, i)))
    assert not (tmp_path / "out").exists()
    short = write_jsonl(tmp_path / "mixed.jsonl", [long_prompt] + addition_records(3))
    with pytest.raises(DatasetError, match="longer than the context"):
        sft(base, short, tmp_path / "out", fast_config(seq_len=32), overlength="error")
    sft(base, short, tmp_path / "out", fast_config(seq_len=32, steps=1), on_event=lambda k, i: events.append((k, i)))
    lengths = [info for kind, info in events if kind == "lengths"][-1]
    assert lengths["examples"] == 3 and lengths["counts"] == {"prompt fills the context": 1}
    assert any(kind == "warning" and "1 of 4 records were dropped" in info["message"] for kind, info in events)
