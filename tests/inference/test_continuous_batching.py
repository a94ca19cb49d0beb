"""Continuous batching: a request's tokens are the same whether it runs alone or joins a running batch.

Eight prompts of different lengths join at different decode steps, in a batch of 4 rows (so requests
wait, rows are freed and reused), with prefill chunks of 4 positions (so long prompts are prefilled
between other rows' decode steps). Each request's output must equal `generate` run on it alone,
token for token, for every family the one loop serves.
"""

import pytest
import torch

from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.scheduler import Request, Scheduler
from engine_helpers import JOIN_AT, MAX_NEW, prompts, tiny

GREEDY = SamplingParams(temperature=0.0)
# per-request settings: greedy, plain sampling, truncations, and penalties (which keep per-row state)
MIXED = [GREEDY, SamplingParams(temperature=0.9), SamplingParams(temperature=1.2, top_k=12),
         SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.0, min_p=0.05),
         SamplingParams(temperature=0.0, repetition_penalty=1.5), SamplingParams(temperature=1.0, presence_penalty=1.0),
         SamplingParams(temperature=0.7, frequency_penalty=0.5, top_k=30)]
FAMILIES = ["llama-tiny", "gpt2-tiny", "t5-tiny", "bart-tiny", "rwkv-tiny", "mamba-tiny"]


@torch.inference_mode()
def run_joined(model, requests: list[Request], join_at: list[int], *, max_batch=4, chunk=4, use_cache=True):
    """Add request i before decode step join_at[i]; run until all end. Returns the largest batch seen."""
    scheduler = Scheduler(model, max_batch=max_batch, prefill_chunk=chunk, use_cache=use_cache)
    order = sorted(range(len(requests)), key=lambda i: join_at[i])
    step, widest, queued = 0, 0, 0
    while order or scheduler.busy:
        while order and join_at[order[0]] <= step:
            scheduler.add(requests[order.pop(0)])
        scheduler.step()
        widest, queued = max(widest, len(scheduler.running)), max(queued, len(scheduler.waiting))
        step += 1
    return widest, queued


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_requests_joining_a_running_batch_equal_running_alone(family):
    model = tiny(family)
    ps = prompts()
    alone = [generate(model, [p], max_new_tokens=n, params=GREEDY)[0] for p, n in zip(ps, MAX_NEW)]
    requests = [Request(p, n, GREEDY) for p, n in zip(ps, MAX_NEW)]
    widest, queued = run_joined(model, requests, JOIN_AT)
    assert [r.generated for r in requests] == alone
    assert widest == 4 and queued > 0  # the batch filled and requests waited for rows
    assert all(r.finish_reason == "length" for r in requests)


@pytest.mark.parametrize("family", ["llama-tiny", "bart-tiny", "rwkv-tiny"])
def test_seeded_sampling_per_request_equals_running_alone(family):
    model = tiny(family)
    ps = prompts(seed=1)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    alone = [generate(model, [p], max_new_tokens=n, params=s, seed=seed)[0]
             for p, n, s, seed in zip(ps, MAX_NEW, MIXED, seeds)]
    requests = [Request(p, n, s, seed) for p, n, s, seed in zip(ps, MAX_NEW, MIXED, seeds)]
    run_joined(model, requests, JOIN_AT)
    assert [r.generated for r in requests] == alone
    # the samples are samples: a different seed changes some request's tokens
    other = [Request(p, n, s, seed + 100) for p, n, s, seed in zip(ps, MAX_NEW, MIXED, seeds)]
    run_joined(model, other, JOIN_AT)
    assert [r.generated for r in other] != alone


@pytest.mark.parametrize("family", ["llama-tiny", "t5-tiny"])
def test_without_the_cache_the_batch_still_equals_alone(family):
    model = tiny(family)
    ps = prompts(lengths=[5, 2, 8, 3])
    alone = [generate(model, [p], max_new_tokens=6, params=GREEDY, use_cache=False)[0] for p in ps]
    requests = [Request(p, 6, GREEDY) for p in ps]
    run_joined(model, requests, [0, 1, 1, 4], max_batch=2, use_cache=False)
    assert [r.generated for r in requests] == alone


def test_one_batch_of_many_prompts_equals_each_alone_with_eos():
    """generate() on a batch (all joining at step 0) with an EOS that ends some rows early."""
    model = tiny("llama-tiny")
    ps = prompts()
    free = [generate(model, [p], max_new_tokens=10, params=GREEDY)[0] for p in ps]
    eos = free[0][3]
    expected = [out[:out.index(eos)] if eos in out else out for out in free]
    assert len({len(e) for e in expected}) > 1
    assert generate(model, ps, max_new_tokens=10, params=GREEDY, eos_ids=[eos]) == expected


@torch.inference_mode()
def test_a_finished_request_frees_its_row_at_the_next_step():
    model = tiny("llama-tiny")
    scheduler = Scheduler(model, max_batch=2)
    long = [Request(p, 50, GREEDY) for p in prompts(lengths=[4, 6, 5])]
    for r in long:
        scheduler.add(r)
    scheduler.step()
    scheduler.step()
    assert len(scheduler.running) == 2 and list(scheduler.waiting) == [long[2]]
    scheduler.finish(long[0], "cancelled")
    emitted, ended = scheduler.step()
    assert ended == [long[0]] and long[0] not in scheduler.running
    assert all(e.request is not long[0] for e in emitted)  # no token after the cancellation
    assert long[2] in scheduler.running  # the freed row was given to the waiting request
    before = len(long[0].generated)
    scheduler.step()
    assert len(long[0].generated) == before


@torch.inference_mode()
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps():
    model = tiny("llama-tiny")
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=8)
    short, long = Request(prompts(lengths=[3])[0], 30, GREEDY), Request(prompts(lengths=[60])[0], 5, GREEDY)
    scheduler.add(short)
    scheduler.step()
    scheduler.add(long)
    steps = 0
    while not long.generated:
        before = len(short.generated)
        scheduler.step()
        steps += 1
        assert len(short.generated) == before + 1  # the running row decoded on every step meanwhile
    assert steps == 60 // 8 + 1  # ceil(60 / 8) chunks
    while scheduler.busy:
        scheduler.step()
    assert long.generated == generate(model, [long.prompt], max_new_tokens=5, params=GREEDY)[0]
    assert short.generated == generate(model, [short.prompt], max_new_tokens=30, params=GREEDY)[0]


@torch.inference_mode()
def test_a_row_stops_at_its_own_context_limit_in_a_batch():
    model = tiny("llama-tiny", max_seq_len=24)
    scheduler = Scheduler(model, max_batch=2)
    a, b = Request(prompts(lengths=[20])[0], 100, GREEDY), Request(prompts(lengths=[4])[0], 100, GREEDY)
    scheduler.add(a)
    scheduler.add(b)
    while scheduler.busy:
        scheduler.step()
    assert (len(a.generated), len(b.generated)) == (4, 20)  # prompt + output fill 24 positions each
    assert a.finish_reason == b.finish_reason == "length"


def test_int4_layers_serve_a_batch_in_bf16():
    """The int4 kernel wants contiguous bf16 rows; a batch's last positions (prefill's last_only) are a
    strided view, which once stopped every batched request of a bf16 quantised model (SmolLM2 with
    --dtype auto on a bf16 CPU). bf16 rounds differently per batch shape, so only the run is checked."""
    from llmkit.inference.optimize import prepare_for_decoding

    model = tiny("llama-tiny", vocab_size=128).to(torch.bfloat16)  # a vocabulary the 8-bit head kernel takes
    report = prepare_for_decoding(model, quantize="int4", dtype=torch.bfloat16)
    assert report.int4_linears > 0 and report.int8_linears == 1
    out = generate(model, prompts(lengths=[5, 2, 9]), max_new_tokens=6, params=GREEDY)
    assert [len(o) for o in out] == [6, 6, 6]


@torch.inference_mode()
def test_a_shared_prompt_beginning_is_computed_once():
    """With a prefix cache, a prompt that begins like an earlier one (a system prompt, the next turn of a
    chat) prefills only the rest, and still gets the tokens it gets alone."""
    model = tiny("llama-tiny")
    system, a, b = prompts(lengths=[20, 6, 9], seed=7)
    scheduler = Scheduler(model, max_batch=3, prefix_cache_tokens=200)
    first, second = Request(system + a, 8, GREEDY), Request(system + b, 8, GREEDY)
    third = Request(system + a + [5, 6, 7], 8, GREEDY)  # the next turn: all of `first`'s prompt is shared
    for r in (first, second, third):
        scheduler.add(r)
    while scheduler.busy:
        scheduler.step()
    cache = scheduler.state.prefix_cache
    assert cache.reused == 20 + 26 and cache.held == 26 + 29 + 29
    for r in (first, second, third):
        assert r.generated == generate(model, [r.prompt], max_new_tokens=8, params=GREEDY)[0]
    small = Scheduler(model, max_batch=1, prefix_cache_tokens=30)  # room for one prompt: the oldest goes
    for r in (Request(system + a, 2, GREEDY), Request(system + b, 2, GREEDY)):
        small.add(r)
    while small.busy:
        small.step()
    assert list(small.state.prefix_cache.entries) == [tuple(system + b)]
