"""Each view on tiny models of every family: what it reports is what the model computes (the logit
lens's last layer is the model's logits; cache bytes are the bytes of real cache tensors), and a view
that does not apply says why in one line."""

from __future__ import annotations

import pytest
import torch

from explain_helpers import tiny_lm
from llmkit.errors import ConfigError
from llmkit.explain import run_view
from llmkit.explain.cache import cache_view
from llmkit.explain.logit_lens import lens_logits
from llmkit.explain.subject import Subject
from llmkit.inference.generate import new_cache

TEXT = "猫坐在垫子上"


def subject(name="llama-tiny", text=TEXT, **overrides) -> Subject:
    return Subject.create(tiny_lm(name, **overrides), text)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "t5-tiny", "bart-tiny", "rwkv-tiny", "mamba-tiny",
                                  "bert-tiny"])
def test_logit_lens_last_layer_is_the_models_logits(name):
    s = subject(name)
    layers, logits, _ = lens_logits(s)
    depth = s.cfg.decoder_layers if s.arch == "encoder-decoder" else s.cfg.n_layers
    assert len(layers) == depth + 1
    assert torch.equal(layers[-1], logits)
    assert not torch.equal(layers[0], logits)


def test_attention_ranks_heads_for_the_articles_sentence():
    result = run_view("attention", subject())
    ranking = result.data["ranking"]
    assert ranking["edges"] == ["坐→猫", "垫子→坐"]  # 垫子 comes after 坐: the causal edge is read backwards
    totals = [r["total"] for r in ranking["ranking"]]
    assert totals == sorted(totals, reverse=True) and len(totals) == 2 * 4
    assert any("cannot attend forwards" in n for n in result.notes)
    english = run_view("attention", subject(text="The cat sat on the mat."))
    assert english.data["ranking"]["edges"] == ["sat→cat", "mat→sat"]


@pytest.mark.parametrize("name, sites", [("bert-tiny", ["encoder.self"]),
                                         ("t5-tiny", ["encoder.self", "decoder.self", "decoder.cross"])])
def test_attention_covers_encoder_decoder_and_cross_attention(name, sites):
    result = run_view("attention", subject(name))
    assert list(result.data["sites"]) == sites
    if name == "bert-tiny":  # bidirectional: 坐 sees 垫子 directly
        assert result.data["ranking"]["edges"] == ["坐→猫", "坐→垫子"]


@pytest.mark.parametrize("view", ["attention", "knockout", "positions"])
def test_views_without_attention_say_why(view):
    with pytest.raises(ConfigError, match="RWKV") as info:
        run_view(view, subject("rwkv-tiny"))
    assert "\n" not in str(info.value)


def test_knockout_reports_a_control_that_does_not_move_and_heads_that_do():
    result = run_view("knockout", subject(), every_head=True)
    conditions = {c["name"]: c for c in result.data["conditions"]}
    control = next(c for n, c in conditions.items() if n.startswith("control"))
    assert control["delta"] == 0.0
    assert any(c["delta"] != 0.0 for n, c in conditions.items() if n.startswith("heads"))
    grid = result.data["every_head_delta"]
    assert len(grid) == 2 and len(grid[0]) == 4


def real_cache_bytes(cache) -> int:
    """Bytes of every tensor storage the cache object holds (views of one storage counted once)."""
    storages = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(vars(cache))
    return sum(storages.values())


@pytest.mark.parametrize("name, overrides, int8", [
    ("llama-tiny", {}, False), ("gpt2-tiny", {}, False), ("llama-tiny", {"n_kv_heads": 1}, False),
    ("llama-tiny", {"attention_pattern": "sliding_window", "attention_window": 8}, False),
    ("llama-tiny", {}, True), ("rwkv-tiny", {}, False), ("mamba-tiny", {}, False), ("t5-tiny", {}, False)])
def test_reported_cache_bytes_equal_the_real_cache(name, overrides, int8):
    lm = tiny_lm(name, **overrides)
    lm.model.kv_cache = "int8" if int8 else "full"
    s = Subject.create(lm, TEXT)
    context = 24
    reported = cache_view(s, context=context).data["total_bytes"]
    model = s.model
    cache = new_cache(model, 1, context, dtype=torch.float32, device="cpu")
    with torch.inference_mode():
        ids = torch.randint(8, s.cfg.vocab_size, (1, context))
        if s.arch == "encoder-decoder":
            memory = model.encode(torch.tensor([s.ids]))
            model.decode(ids, memory, cache=cache)
        else:
            model(ids, cache=cache)
    assert real_cache_bytes(cache) == reported


@pytest.mark.parametrize("name, overrides, scheme", [("llama-tiny", {}, "rope"), ("gpt2-tiny", {}, "learned"),
                                                     ("t5-tiny", {}, "relative"),
                                                     ("gpt2-tiny", {"position": "alibi"}, "alibi")])
def test_positions_view_for_each_scheme(name, overrides, scheme):
    result = run_view("positions", subject(name, **overrides))
    assert result.data["scheme"] == scheme
    if scheme == "rope":  # the score of q, k moved apart, from the model's own rotation
        assert len(result.data["score"]) == 128
        s = subject(name)
        q_all_ones = torch.ones(s.cfg.head_dim)
        assert result.data["score_all_ones"][0] == pytest.approx(float(q_all_ones @ q_all_ones) * s.cfg.head_dim ** -0.5)


def test_sampling_view_stages_and_tokens():
    result = run_view("sampling", subject(), max_new_tokens=4, seed=3, temperature=0.8, top_k=50, top_p=0.9)
    steps = result.data["steps"]
    assert len(steps) == 4 and result.data["tokens"] == [s["drawn"] for s in steps]
    for step in steps:
        kept = step["kept"]
        assert kept["top_k"] <= 50 and kept["top_p"] <= kept["top_k"]
        drawn = next(c for c in step["candidates"] if c["id"] == step["drawn"])
        assert drawn["min_p"] > 0  # the drawn token survived every stage


@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny", "rwkv-tiny", "mamba-tiny"])
def test_sampling_view_text_is_what_generate_writes(name):
    lm = tiny_lm(name)
    options = dict(max_new_tokens=5, seed=9, temperature=1.1, top_k=30, repetition_penalty=1.2)
    result = run_view("sampling", Subject.create(lm, "猫坐在"), **options)
    expected = lm.generate("猫坐在", **options)
    assert result.data["text"] == (expected if lm.config.arch == "encoder-decoder" else "猫坐在" + expected)
