"""The size dial: --depth scales a preset; auto picks the deepest model that sees enough tokens."""

import pytest
import torch

from llmkit.config import preset
from llmkit.errors import ConfigError
from llmkit.models.build import build_model
from llmkit.training.objectives import next_token_loss
from llmkit.training.sizing import (at_depth, choose_depth, measure_tokens_per_s, parse_depth,
                                    train_flops_per_token)


def test_depth_4_of_the_llama_demo_is_the_demo_itself():
    demo = preset("llama-demo", vocab_size=8192)
    sized = at_depth(demo, 4)
    assert sized.to_dict() == demo.to_dict()


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_depth_sets_layers_width_and_heads_keeping_the_gqa_ratio_where_it_divides(depth):
    cfg = at_depth(preset("llama-demo", vocab_size=512), depth)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim) == (depth, 64 * depth, depth, 64)
    assert cfg.n_kv_heads == (depth // 2 if depth % 2 == 0 else depth)
    assert sum(p.numel() for p in build_model(cfg).parameters()) == cfg.num_params()


def test_depth_refuses_a_recurrent_body_and_bad_values():
    with pytest.raises(ConfigError, match="Transformer"):
        at_depth(preset("rwkv-tiny"), 2)
    for bad in ("0", "-1", "x", "1.5", "1000"):
        with pytest.raises(ConfigError, match="--depth"):
            parse_depth(bad)
    assert parse_depth("auto") == "auto" and parse_depth("3") == 3 and parse_depth(None) is None


def test_auto_takes_the_deepest_model_with_enough_tokens_per_parameter():
    ref = preset("llama-demo", vocab_size=8192)
    flops_ref = train_flops_per_token(ref, 256)
    choice = choose_depth(ref, tokens_per_s=5000.0, seconds=240.0, seq_len=256, tokens_per_param=0.2)
    chosen, deeper = at_depth(ref, choice.depth), at_depth(ref, choice.depth + 1)
    assert choice.predicted_tokens >= 0.2 * chosen.num_params()
    deeper_tokens = 5000.0 * flops_ref / train_flops_per_token(deeper, 256) * 240.0
    assert deeper_tokens < 0.2 * deeper.num_params()
    # a faster machine or a longer budget never gets a smaller model; a slower one never a bigger
    faster = choose_depth(ref, tokens_per_s=20000.0, seconds=240.0, seq_len=256, tokens_per_param=0.2)
    slower = choose_depth(ref, tokens_per_s=1000.0, seconds=240.0, seq_len=256, tokens_per_param=0.2)
    assert slower.depth <= choice.depth <= faster.depth and slower.depth < faster.depth
    assert f"depth {choice.depth}" in choice.line


def test_measuring_speed_runs_real_passes_and_leaves_no_gradients():
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=128)
    model = build_model(cfg)
    ids = torch.randint(0, 128, (2, 33))
    batch = (ids[:, :-1], ids[:, 1:])
    rate = measure_tokens_per_s(model, next_token_loss, batch, torch.enable_grad, tokens=64)
    assert rate > 0
    assert all(p.grad is None for p in model.parameters())


# -- through pretrain ----------------------------------------------------------------------------

from llmkit.io.checkpoint import list_checkpoints, read_json  # noqa: E402
from llmkit.training.config import TrainConfig  # noqa: E402
from llmkit.training.pretrain import pretrain  # noqa: E402
from train_helpers import _one_thread, corpus  # noqa: E402,F401 (fixtures)

SMALL = dict(preset="llama-tiny", vocab_size=300, tokenizer_sample_bytes=50_000, seq_len=32, batch_size=4,
             eval_interval=5, eval_batches=2, log_interval=5, dtype="fp32", threads=1)


def saved_layers(run):
    return read_json(list_checkpoints(run / "checkpoints")[-1] / "config.json")["model"]["n_layers"]


def test_a_fixed_depth_trains_that_model(tmp_path, corpus):
    pretrain([corpus], tmp_path / "run", TrainConfig(steps=5, depth="2", **SMALL))
    model = read_json(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "config.json")["model"]
    assert (model["n_layers"], model["d_model"], model["n_heads"]) == (2, 128, 2)


def test_auto_depth_is_chosen_from_the_budget_announced_and_kept_on_resume(tmp_path, corpus):
    events = []
    cfg = TrainConfig(steps=8, depth="auto", time_budget=0.2, **SMALL)
    pretrain([corpus], tmp_path / "run", cfg, on_event=lambda kind, info: events.append((kind, info)))
    chosen = [info for kind, info in events if kind == "depth"]
    assert len(chosen) == 1 and chosen[0]["tokens_per_s"] > 0
    assert saved_layers(tmp_path / "run") == chosen[0]["depth"]
    events.clear()
    pretrain([corpus], tmp_path / "run", TrainConfig(**{**cfg.__dict__, "steps": 10}), resume=True,
             on_event=lambda kind, info: events.append((kind, info)))
    assert not [info for kind, info in events if kind == "depth"]  # not re-measured: the saved depth
    assert saved_layers(tmp_path / "run") == chosen[0]["depth"]


def test_auto_depth_needs_a_budget():
    with pytest.raises(ConfigError, match="--time-budget"):
        TrainConfig(depth="auto")
