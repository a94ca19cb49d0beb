"""Reward model and DPO: losses against hand-computed values, DPO(policy = reference) = log 2, pairs
that truncation makes identical are dropped, and tiny seeded runs learn an easy preference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import llmkit
from llmkit.config import preset
from llmkit.data.chat_examples import IGNORE, render_prompt_response
from llmkit.errors import CheckpointError, ConfigError
from llmkit.models.causal_lm import CausalLM
from llmkit.models.heads import RewardModel, bradley_terry_loss, last_token_index, load_reward_model
from llmkit.training.preference import (dpo, dpo_loss, make_dpo_loss, pair_batch, prepare_pairs, sequence_logprobs,
                                        train_reward_model)
from post_training_helpers import easy_preferences, fast_config, save_tiny_model, write_jsonl
from train_helpers import rows_of


def test_bradley_terry_matches_hand_computed_values():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    # -log σ(1) = log(1 + e^-1) = 0.313262; -log σ(-2) = log(1 + e^2) = 2.126928
    assert loss.item() == pytest.approx((0.313262 + 2.126928) / 2, abs=1e-6)
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([3.0])).item() == pytest.approx(math.log(2))


def test_dpo_loss_matches_hand_computed_values():
    loss, stats = dpo_loss(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0]),
                           torch.tensor([-2.0, -2.0]), beta=0.5)
    # pair 1: rewards 0.5·1 = 0.5 and 0.5·-1 = -0.5 → -log σ(1) = 0.313262
    # pair 2: rewards 0 and 0.5·1 = 0.5 → -log σ(-0.5) = log(1 + e^0.5) = 0.974077
    assert loss.item() == pytest.approx((0.313262 + 0.974077) / 2, abs=1e-6)
    assert stats["reward_chosen"].item() == pytest.approx(0.25)
    assert stats["reward_rejected"].item() == pytest.approx(0.0)
    assert stats["reward_margin"].item() == pytest.approx(0.25)
    assert stats["reward_accuracy"].item() == 0.5


def test_dpo_with_policy_equal_to_reference_is_log_2():
    torch.manual_seed(0)
    model = CausalLM(preset("llama-tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (4, 10))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    loss, stats = make_dpo_loss(copy.deepcopy(model), beta=0.1)(model, (ids, labels, torch.ones_like(ids)))
    # identical policy and reference: margin exactly 0, loss = fp32 log(2) (1.9e-9 from the float64 value), measured
    # (AVX-512 / AVX2 / default)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_sequence_logprobs_sum_the_supervised_tokens_only():
    torch.manual_seed(0)
    model = CausalLM(preset("gpt2-tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 6))
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, ids[0, 3], ids[0, 4], IGNORE]])
    logp = model(ids).log_softmax(-1)[0]
    want = logp[2, ids[0, 3]] + logp[3, ids[0, 4]]
    # the same log_softmax gathered and summed (2 terms of |x| ≲ 5): 0.0 measured (AVX-512 / AVX2 / default)
    assert sequence_logprobs(model, ids, labels).item() == pytest.approx(want.item(), abs=1e-5)


def test_reward_is_read_at_the_last_real_token_with_either_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    torch.manual_seed(0)
    rm = RewardModel(preset("llama-tiny", vocab_size=64)).eval()
    row = torch.randint(1, 64, (1, 3))
    alone = rm(row)
    right = rm(torch.cat([row, torch.zeros(1, 2, dtype=torch.long)], 1), attention_mask=mask[:1])
    left = rm(torch.cat([torch.zeros(1, 2, dtype=torch.long), row], 1), attention_mask=mask[1:2])
    # padding changes only summation order: ≤ 1.8e-7 measured (AVX-512 / AVX2 / default)
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)


def test_pairs_identical_after_truncation_are_dropped_and_counted(tmp_path):
    lm = llmkit.load(save_tiny_model(tmp_path / "base"))
    rows = [{"prompt": "What is 2+3?", "chosen": "yes hello world", "rejected": "yes hello fox"},
            {"prompt": "What is 2+3?", "chosen": "yes", "rejected": "no"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    full = len(render_prompt_response(lm, "What is 2+3?", "yes", "").ids)
    events = []
    pairs, _ = prepare_pairs(lm, path, full, "truncate", lambda kind, info: events.append((kind, info)))
    assert len(pairs) == 1 and dict(events)["pairs"]["counts"] == {"truncated": 2, "identical after truncation": 1}
    chosen, rejected = pairs[0]
    ids, labels, mask = pair_batch(pairs, pad_id=2)
    assert ids.shape[0] == 2 and ids[0, : len(chosen.ids)].tolist() == chosen.ids
    assert ids[1, : len(rejected.ids)].tolist() == rejected.ids


def test_tiny_reward_model_beats_chance_and_loads_back(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "prefs.jsonl", easy_preferences(60))
    train_reward_model(base, data, tmp_path / "rm", fast_config(val_fraction=0.2))
    evals = [r for r in rows_of(tmp_path / "rm") if "val_accuracy" in r]
    assert evals and evals[-1]["val_accuracy"] >= 0.75, evals  # 12 held-out pairs; chance is 0.5
    assert all("accuracy" in r for r in rows_of(tmp_path / "rm") if "train_loss" in r)
    rm, lm = load_reward_model(tmp_path / "rm")
    good = render_prompt_response(lm, "What is 7+7?", "yes hello world").ids
    bad = render_prompt_response(lm, "What is 7+7?", "no the quick brown fox").ids
    with torch.no_grad():
        assert rm(torch.tensor([good])).item() > rm(torch.tensor([bad])).item()
    # llmkit.load gives the reward model's backbone as a plain LM (the head is set aside).
    backbone = llmkit.load(tmp_path / "rm").model.state_dict()
    assert all(torch.equal(v, rm.state_dict()[k]) for k, v in backbone.items())
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(base)


def test_tiny_dpo_run_starts_at_log_2_and_prefers_chosen(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "prefs.jsonl", easy_preferences(40))
    dpo(base, data, tmp_path / "dpo", fast_config(steps=8, eval_interval=8), beta=0.5)
    train = [r for r in rows_of(tmp_path / "dpo") if "train_loss" in r]
    assert train[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy == reference
    assert train[-1]["reward_margin"] > 0 and train[-1]["reward_accuracy"] > 0.5
    final = [r for r in rows_of(tmp_path / "dpo") if "val_reward_margin" in r][-1]
    assert final["val_reward_margin"] > 0 and final["val_loss"] < math.log(2)
    assert {"reward_chosen", "reward_rejected"} <= set(train[-1])
    assert llmkit.load(tmp_path / "dpo").model.cfg == llmkit.load(base).model.cfg
    with pytest.raises(ConfigError, match="--beta"):
        dpo(base, data, tmp_path / "dpo2", fast_config(), beta=0.0)
