"""The sampling view: at each generated token, the top candidates and their probabilities after each
stage of the sampling chain (raw, penalties, temperature, top-k, top-p, min-p), and the token drawn.

The tokens are drawn by the generation loop itself (`generate_stream`, which `llmkit generate` runs),
so the same seed gives the same tokens. The stages are computed by `sampling_stages`, which runs the
very stage functions `sample` runs, from the logits of the sequence so far (one forward without the
cache: equal to the cached step's logits to fp32 rounding).
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from llmkit.errors import ConfigError
from llmkit.explain.page import ViewResult
from llmkit.explain.pieces import id_label
from llmkit.explain.subject import Subject
from llmkit.inference.sampling import STAGES, PenaltyState, SamplingParams, sampling_stages

CANDIDATES = 8


@torch.inference_mode()
def next_logits(subject: Subject, prompt: list[int], new: list[int]) -> torch.Tensor:
    """(1, vocab) next-token logits after `prompt` and the tokens generated so far."""
    model = subject.model
    device = next(model.parameters()).device
    if subject.arch == "encoder-decoder":
        decoded = torch.tensor([[subject.cfg.decoder_start_token_id, *new]], device=device)
        return model(torch.tensor([prompt], device=device), decoded)[:, -1].float()
    return model(torch.tensor([prompt + new], device=device), last_only=True)[:, -1].float()


def sampling_view(subject: Subject, *, max_new_tokens: int = 8, seed: int | None = None,
                  stop: Sequence[str] = (), **sampling) -> ViewResult:
    from llmkit.inference.generate import generate_stream
    from llmkit.inference.seq2seq_generate import source_ids

    subject.require_logits("sampling")
    lm, tok = subject.lm, subject.lm.tokenizer
    if subject.arch == "encoder":
        raise ConfigError(f"sampling: {subject.name} is an encoder; it does not generate text")
    params = SamplingParams(**sampling)
    seed = random.randrange(2**63) if seed is None else seed  # reported, so `llmkit generate --seed` repeats it
    seq2seq = subject.arch == "encoder-decoder"
    prompt = source_ids(tok, subject.text) if seq2seq else subject.ids
    context = torch.tensor([[subject.cfg.decoder_start_token_id]] if seq2seq else [prompt])
    penalty = PenaltyState(params, context, subject.cfg.vocab_size)
    tokens, steps, cut = [], [], -1
    for step in generate_stream(lm.model, [prompt], max_new_tokens=max_new_tokens, params=params,
                                eos_ids=lm.eos_ids, pad_id=tok.pad_id or 0, use_cache=True, seed=seed):
        steps.append(_step(tok, next_logits(subject, prompt, tokens), params, penalty, step[0]))
        tokens.append(step[0])
        penalty.record(torch.tensor([[step[0]]]), torch.tensor([False]))
        cut = min((i for i in (tok.decode(tokens).find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: generation ends here, its text cut where the string starts
            break
    limit = subject.cfg.max_seq_len - (1 if seq2seq else len(prompt))
    if cut < 0 and len(tokens) < min(max_new_tokens, limit):  # it ended on an end-of-sequence token
        steps.append(_step(tok, next_logits(subject, prompt, tokens), params, penalty, None))
    text = tok.decode(tokens)
    text = text[:cut] if cut >= 0 else text
    shown = text if seq2seq else subject.text + text
    return _result(subject, params, seed, tokens, shown, steps)


def _step(tok, logits: torch.Tensor, params: SamplingParams, penalty: PenaltyState, drawn: int | None) -> dict:
    stages = sampling_stages(logits, params, seen=penalty.seen, generated_counts=penalty.counts)
    probs = {name: stage.softmax(-1)[0] for name, stage in stages}
    final = probs[STAGES[-1]]
    ranked = probs["raw"].topk(CANDIDATES).indices.tolist()
    extra = [i for i in final.topk(min(3, final.numel())).indices.tolist() if i not in ranked and float(final[i]) > 0]
    candidates = ranked + extra + ([drawn] if drawn is not None and drawn not in ranked + extra else [])
    return {"drawn": drawn, "drawn_label": id_label(tok, drawn) if drawn is not None else "(end of sequence)",
            "kept": {name: int((p > 0).sum()) for name, p in probs.items()},
            "candidates": [{"id": i, "label": id_label(tok, i), **{n: float(probs[n][i]) for n in STAGES}}
                           for i in candidates]}


def _result(subject, params, seed, tokens, text, steps) -> ViewResult:
    settings = {k: getattr(params, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                                "presence_penalty", "frequency_penalty")}
    lines = [f"seed {seed}: {text!r}"]
    lines += [f"  step {i}: drew {s['drawn_label']!r}; tokens kept per stage: "
              + " ".join(f"{n} {s['kept'][n]}" for n in STAGES) for i, s in enumerate(steps)]
    data = {"model": subject.name, "prompt": subject.text, "seed": seed, "params": settings, "tokens": tokens,
            "text": text, "stages": list(STAGES), "steps": steps}
    rows = [[i, s["drawn_label"], c["label"], *[c[n] for n in STAGES]] for i, s in enumerate(steps)
            for c in s["candidates"]]

    def draw(plt):
        shown = steps[:4]
        fig, axes = plt.subplots(len(shown), 1, figsize=(10, 2.6 * len(shown) + 0.4), squeeze=False)
        colours = ["#8C8C8C", "#937860", "#4C72B0", "#55A868", "#C44E52", "#8172B3"]
        for ax, (i, s) in zip(axes[:, 0], enumerate(shown)):
            cands = s["candidates"][:CANDIDATES + 2]
            width = 0.8 / len(STAGES)
            for k, name in enumerate(STAGES):
                ax.bar([x + k * width for x in range(len(cands))], [c[name] for c in cands], width,
                       label=name, color=colours[k])
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cands))],
                          [("▶" if c["id"] == s["drawn"] else "") + c["label"] for c in cands], fontsize=9)
            ax.set_ylabel("probability")
            ax.set_title(f"step {i}: drew {s['drawn_label']}", fontsize=9)
        axes[0, 0].legend(fontsize=7, ncol=len(STAGES), loc="lower center", bbox_to_anchor=(0.5, 1.12))
        changed = {k: v for k, v in settings.items() if v != getattr(SamplingParams(), k)}
        fig.suptitle(f"{subject.name}: sampling chain, seed {seed}" + "".join(f", {k}={v}" for k, v in changed.items()),
                     fontsize=9)
        return fig

    return ViewResult("sampling", f"Sampling: {subject.name}",
                      "Temperature sharpens or flattens the next-token distribution; top-k keeps the k most "
                      "likely, top-p the smallest set reaching p (采样策略: Temperature 越高越随机; Top-k; Top-p).",
                      data, draw, tables=[{"title": f"candidates at each step (▶ = drawn), seed {seed}",
                                           "columns": ["step", "drawn", "candidate", *STAGES], "rows": rows}],
                      lines=lines, notes=[f"llmkit generate with --seed {seed} and the same flags prints: {text}"])
