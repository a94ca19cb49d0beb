"""The engine (llmkit/inference/engine.py): requests from several threads in one continuous batch,
each getting what it would get alone; cancellation freeing its row; a full engine refusing with
EngineFull; stop strings and split characters handled in the text it streams; asyncio reading."""

import asyncio
import threading
import time

import pytest
import torch

from llmkit.errors import GenerationError
from llmkit.inference.engine import Engine, EngineFull, Finished, TokenEvent
from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from engine_helpers import chain_model, drain, model, prompts, tiny, tok, tokens_of  # noqa: F401 (fixtures)

GREEDY = SamplingParams(temperature=0.0)


def test_concurrent_requests_get_what_they_get_alone(model, tok):
    ps = prompts(lengths=[3, 9, 1, 14, 6, 20, 2, 11], seed=3)
    budgets = [12, 7, 15, 9, 13, 6, 10, 8]
    sampled = SamplingParams(temperature=1.0, top_k=40)
    settings = [(GREEDY, None) if i % 2 else (sampled, 100 + i) for i in range(8)]
    alone = [generate(model, [p], max_new_tokens=n, params=s, seed=seed)[0]
             for p, n, (s, seed) in zip(ps, budgets, settings)]
    results: dict[int, list] = {}
    with Engine(model, tok, max_batch=4, eos_ids=[]) as engine:
        def client(i):
            handle = engine.submit(ps[i], max_new_tokens=budgets[i], params=settings[i][0], seed=settings[i][1])
            results[i] = drain(handle)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = engine.stats()
    assert [tokens_of(results[i]) for i in range(8)] == alone
    assert all(results[i][-1].reason == "length" and results[i][-1].prompt_tokens == len(ps[i]) and
               results[i][-1].completion_tokens == budgets[i] for i in range(8))
    assert stats["requests_total"] == 8 and stats["tokens_total"] == sum(budgets)
    assert stats["running"] == stats["queued"] == 0


def test_cancel_frees_the_row_within_two_steps(model, tok):
    with Engine(model, tok, max_batch=2, eos_ids=[]) as engine:
        handle = engine.submit(prompts(lengths=[5])[0], max_new_tokens=100)
        events = iter(handle)
        assert isinstance(next(events), TokenEvent)
        at = engine.stats()["steps"]
        handle.cancel()
        rest = list(events)
        stats = engine.stats()
    assert isinstance(rest[-1], Finished) and rest[-1].reason == "cancelled"
    assert rest[-1].completion_tokens < 100
    assert stats["running"] == 0 and stats["steps"] - at <= 2


def test_a_full_engine_refuses_and_recovers(model, tok):
    with Engine(model, tok, max_batch=1, max_queued=1, eos_ids=[]) as engine:
        first = engine.submit([5, 6, 7], max_new_tokens=100)
        second = engine.submit([5, 6], max_new_tokens=100)
        with pytest.raises(EngineFull):
            engine.submit([8], max_new_tokens=4)
        assert engine.stats()["running"] + engine.stats()["queued"] == 2
        first.cancel()
        second.cancel()
        assert drain(first)[-1].reason == drain(second)[-1].reason == "cancelled"
        assert drain(engine.submit([8], max_new_tokens=4))[-1].reason == "length"


def test_bad_requests_are_refused_at_submit_with_one_line(model, tok):
    with Engine(model, tok, max_batch=2) as engine:
        for prompt, options in [([], {}), ([1] * 128, {}), ([1, tok.vocab_size], {}), ("abc", {}),
                                ([1, 2], dict(max_new_tokens=0)), ([1, 2], dict(seed="x")),
                                ([1, 2], dict(stop="\n")), ([1, 2], dict(logprobs=-1))]:
            with pytest.raises(GenerationError) as info:
                engine.submit(prompt, **options)
            assert "\n" not in str(info.value)
        with pytest.raises(GenerationError, match="128 tokens.*context is 128"):
            engine.submit([1] * 128)


def test_stop_strings_and_split_characters_in_the_streamed_text(tok):
    text = "the quick中🙂"  # the, " ", qu, ick, then 3 + 4 byte tokens: all different, as a chain needs
    ids = tok.encode(text)
    start, rest = ids[0], ids[1:]
    eos = tok.eos_id
    model = chain_model(tok.vocab_size, ids, end=eos)
    with Engine(model, tok, max_batch=2, eos_ids=[eos]) as engine:
        plain = drain(engine.submit([start], max_new_tokens=50))
        assert tokens_of(plain) == rest and plain[-1].reason == "stop"  # EOS ended it
        pieces = [e.text for e in plain[:-1]]
        assert "".join(pieces) + plain[-1].text == tok.decode(rest)
        assert "中" in pieces and "🙂" in pieces  # each came out whole, with "" for its first bytes
        assert pieces[-4:] == ["", "", "", "🙂"]
        # a stop string spanning two tokens ("qu" | "ick"): caught, and not emitted
        stopped = drain(engine.submit([start], max_new_tokens=50, stop=["uic"]))
    assert "".join(e.text for e in stopped[:-1]) + stopped[-1].text == " q"
    assert stopped[-1].reason == "stop" and len(stopped) < len(plain)


def test_logprobs_are_the_raw_log_softmax(model, tok):
    prompt = prompts(lengths=[4])[0]
    with Engine(model, tok, max_batch=2, eos_ids=[]) as engine:
        events = drain(engine.submit(prompt, max_new_tokens=3, params=GREEDY, logprobs=3))
        bare = drain(engine.submit(prompt, max_new_tokens=3, params=GREEDY, logprobs=None))
    with torch.no_grad():
        ids = torch.tensor([prompt + tokens_of(events)])
        expected = torch.log_softmax(model(ids)[0, len(prompt) - 1:-1].float(), dim=-1)
    for step, event in enumerate(events[:-1]):
        # fp32: a cached decode step and a full forward sum in different orders (~1e-6 apart measured)
        assert event.logprob == pytest.approx(float(expected[step, event.token_id]), abs=1e-4)
        best = expected[step].topk(3)
        assert [t for t, _, _ in event.top_logprobs] == best.indices.tolist()
        assert [text for _, text, _ in event.top_logprobs] == [tok.decode([t]) for t in best.indices.tolist()]
        assert event.top_logprobs[0][0] == event.token_id  # greedy picks the most likely
    assert all(e.logprob is None and e.top_logprobs == [] for e in bare[:-1])


def test_asyncio_readers_get_the_same_events_without_blocking_the_loop(model, tok, monkeypatch):
    """While the engine works, the readers' loop stays free: a ticker task keeps running. Each forward is
    slowed by a sleep (which releases the GIL), so the loop has time to tick however loaded the machine
    is (with the tiny model alone, two busy test workers once left it 3 ticks); a loop blocked by a
    waiting reader would still get none until the request ends."""
    ps = prompts(lengths=[3, 7, 5], seed=4)
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)

    async def main(engine):
        ticks = 0

        async def ticker():  # runs only if the loop is free while the engine works
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick = asyncio.create_task(ticker())
        results = await asyncio.gather(*[collect(engine.submit(p, max_new_tokens=6, params=GREEDY)) for p in ps])
        tick.cancel()
        return results, ticks

    async def collect(handle):
        return [event async for event in handle.aiter()]

    with Engine(model, tok, max_batch=2, eos_ids=[]) as engine:
        results, ticks = asyncio.run(main(engine))
    assert [tokens_of(r) for r in results] == [generate(model, [p], max_new_tokens=6, params=GREEDY)[0] for p in ps]
    assert [r[-1].reason for r in results] == ["length"] * 3
    assert ticks > 10


def test_close_finishes_pending_requests_as_cancelled(model, tok):
    engine = Engine(model, tok, max_batch=1, max_queued=4, eos_ids=[])
    handles = [engine.submit([4, 5, 6], max_new_tokens=120) for _ in range(3)]
    engine.close()
    assert [drain(h)[-1].reason for h in handles] == ["cancelled"] * 3
    with pytest.raises(GenerationError, match="closed"):
        engine.submit([1], max_new_tokens=1)
