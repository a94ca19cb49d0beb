"""Speculative decoding inside the engine (Speculator, `--draft`): while one greedy request runs alone each
step is a draft's guesses checked by one forward; every request still gets exactly the tokens it gets
alone without a draft, whether the draft is always right (the model itself), mostly wrong (a random
1-layer sibling), or the request is sampled or shares the batch."""

import time

import pytest

from llmkit.cli import main
from llmkit.errors import GenerationError
from llmkit.inference.engine import Engine
from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from engine_helpers import chain_model, drain, model, prompts, tiny, tok, tokens_of  # noqa: F401 (fixtures)
from post_training_helpers import save_tiny_model

GREEDY = SamplingParams(temperature=0.0)


def settled_stats(engine, tokens: int) -> dict:
    """The engine's stats once they count `tokens` tokens (they are updated just after events go out)."""
    deadline = time.monotonic() + 10
    while engine.stats()["tokens_total"] < tokens and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats()


@pytest.mark.parametrize("which", ["itself", "a 1-layer sibling"])
def test_every_request_gets_what_it_gets_alone_without_a_draft(model, tok, which):
    draft = model if which == "itself" else tiny("llama-tiny", vocab_size=tok.vocab_size, n_layers=1)
    ps = prompts(lengths=[3, 9, 1, 14], seed=3)
    budgets = [30, 12, 25, 9]
    settings = [(GREEDY, None), (GREEDY, None), (SamplingParams(temperature=1.0, top_k=40), 7), (GREEDY, None)]
    alone = [generate(model, [p], max_new_tokens=n, params=s, seed=seed)[0]
             for p, n, (s, seed) in zip(ps, budgets, settings)]
    with Engine(model, tok, max_batch=2, eos_ids=[], draft=draft, draft_tokens=3) as engine:
        first = drain(engine.submit(ps[0], max_new_tokens=budgets[0], params=GREEDY))  # alone: every step a round
        at = settled_stats(engine, tokens=budgets[0])
        # three at once on two rows: batched steps, and rounds again whenever one greedy request is left
        handles = [engine.submit(ps[i], max_new_tokens=budgets[i], params=settings[i][0], seed=settings[i][1])
                   for i in (1, 2, 3)]
        results = [first] + [drain(h) for h in handles]
        stats = engine.stats()
    assert [tokens_of(r) for r in results] == alone
    assert [r[-1].completion_tokens for r in results] == budgets and stats["running"] == 0
    assert at["draft_proposed"] > 0
    if draft is model:  # always right: each round yields draft_tokens + 1 tokens, so far fewer steps
        assert at["draft_accepted"] == at["draft_proposed"] and at["steps"] <= budgets[0] // 4 + 2
    else:
        assert at["draft_accepted"] < at["draft_proposed"]


def test_logprobs_of_a_round_are_those_of_ordinary_steps(model, tok):
    prompt = prompts(lengths=[5], seed=8)[0]
    events = []
    for draft in (None, model):
        with Engine(model, tok, max_batch=1, eos_ids=[], draft=draft, draft_tokens=4) as engine:
            events.append(drain(engine.submit(prompt, max_new_tokens=12, params=GREEDY, logprobs=2))[:-1])
            proposed = settled_stats(engine, tokens=12)["draft_proposed"]
    plain, drafted = events
    assert proposed > 0 and [e.token_id for e in drafted] == [e.token_id for e in plain]
    for a, b in zip(plain, drafted):
        # fp32: one forward over 5 positions and 5 one-position steps sum in different orders (~1e-6 apart)
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert [t for t, _, _ in b.top_logprobs] == [t for t, _, _ in a.top_logprobs]


def test_a_stop_string_inside_a_round_ends_the_answer_where_it_would_end(tok):
    ids = tok.encode("the quick中🙂")
    model = chain_model(tok.vocab_size, ids, end=tok.eos_id)
    answers = []
    for draft in (None, model):  # the chain itself as the draft: it is always right, 5 tokens per round
        with Engine(model, tok, max_batch=2, eos_ids=[tok.eos_id], draft=draft, draft_tokens=4) as engine:
            answers.append((drain(engine.submit(ids[:1], max_new_tokens=50, params=GREEDY, stop=["uic"])),
                            drain(engine.submit(ids[:1], max_new_tokens=50, params=GREEDY))))
    (stopped, whole), (stopped_draft, whole_draft) = answers
    for plain, drafted in ((stopped, stopped_draft), (whole, whole_draft)):
        assert "".join(e.text for e in drafted[:-1]) + drafted[-1].text == \
            "".join(e.text for e in plain[:-1]) + plain[-1].text
        assert (drafted[-1].reason, drafted[-1].completion_tokens) == (plain[-1].reason, plain[-1].completion_tokens)
    assert stopped[-1].reason == "stop" and whole[-1].reason == "stop"


def test_drafts_that_cannot_draft_are_refused(model, tok):
    with pytest.raises(GenerationError, match="vocabulary"):
        Engine(model, tok, draft=tiny("llama-tiny", vocab_size=tok.vocab_size + 1))
    with pytest.raises(GenerationError, match="Transformer"):
        Engine(model, tok, draft=tiny("mamba-tiny", vocab_size=tok.vocab_size))
    with pytest.raises(GenerationError, match="draft_tokens"):
        Engine(model, tok, draft=model, draft_tokens=0)


def test_generate_and_chat_with_draft_print_the_same_answer(tmp_path, capsys):
    target = save_tiny_model(tmp_path / "target", seed=0)
    draft = save_tiny_model(tmp_path / "draft", seed=1, preset_name="gpt2-tiny")  # same tokenizer, other model
    flags = ["--max-new-tokens", "8", "--dtype", "fp32", "--temperature", "0"]
    outputs = []
    for extra in ([], ["--draft", str(draft), "--draft-tokens", "3"]):
        assert main(["generate", "--model", str(target), "--prompt", "What is", *flags, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    for extra in ([], ["--draft", str(target)]):  # the model itself as its draft: every guess kept
        assert main(["chat", "--model", str(target), "Say hello.", *flags, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("What is") and outputs[2] == outputs[3]
    assert main(["generate", "--model", str(target), "--prompt", "x", "--draft", str(draft)]) == 2
    assert "--temperature 0" in capsys.readouterr().err  # generate samples at 1.0 unless told otherwise
