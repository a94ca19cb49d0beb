"""Beam search with a length penalty, with the semantics of transformers' `num_beams > 1` decoding, so
both return the same sequence for the same model (tested against it): `beam_generate` for any family
(decoder-only: GPT-2, LLaMA, RWKV, Mamba; encoder-decoder: T5, BART), on `beam_search`.

Per source, `num_beams` hypotheses run side by side. Each step scores every (hypothesis, next token)
pair by its summed log-probability and keeps the 2·num_beams best candidates (twice as many so that
enough remain after some end at EOS). Of these:
- candidates ranked within the first num_beams that end (EOS, or the length limit) become finished
  hypotheses, scored sum_logprob / generated_length ** length_penalty (length_penalty > 0 favours longer
  outputs, < 0 shorter ones); the num_beams best finished hypotheses are kept;
- the best num_beams candidates that did not end continue.
A source is done when no running hypothesis can still beat its worst kept finished one: with
early_stopping=True as soon as num_beams are finished; False (the default) when the best running score
divided by the current length ** length_penalty cannot beat the worst finished score; "never" when
it cannot even at the maximum length (the exact rule when length_penalty > 0).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from llmkit.errors import GenerationError

NEG = -1.0e9  # "never pick": large but finite, so sums of it stay ordered and never turn into NaN


def beam_search(next_logits: Callable[[Tensor, Tensor | None], Tensor], *, batch: int, start_id: int,
                max_new_tokens: int, num_beams: int = 4, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_ids: Sequence[int] = (),
                device: torch.device | str = "cpu") -> list[list[int]]:
    """Best hypothesis per source, as token lists without EOS.

    `next_logits(tokens, parents)` feeds each of the batch·num_beams rows its newest token (rows are
    source-major: row b·num_beams + k is beam k of source b) and returns next-token logits (rows, V).
    `parents` (rows,) says which old row each row continues (reorder the decoding state first), or
    None on the first step.
    """
    if num_beams < 1:
        raise GenerationError(f"num_beams must be ≥ 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise GenerationError(f"early_stopping must be true, false or 'never', got {early_stopping!r}")
    B, K, L = batch, num_beams, max_new_tokens + 1  # L: sequence length with the start token
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos)) * K  # candidates per source each step
    in_top_k = torch.arange(keep, device=device) < K
    running = torch.full((B, K, L), start_id, dtype=torch.long, device=device)
    running_scores = torch.full((B, K), NEG, device=device)
    running_scores[:, 0] = 0.0  # all beams start identical: only the first may expand on step one
    finished = running.clone()
    finished_scores = torch.full((B, K), NEG, device=device)
    finished_len = torch.zeros((B, K), dtype=torch.long, device=device)
    is_finished = torch.zeros((B, K), dtype=torch.bool, device=device)
    improvable = torch.ones((B, 1), dtype=torch.bool, device=device)
    source = torch.arange(B, device=device)[:, None]
    parents = None
    for length in range(1, L):  # `length` tokens (start included) are known; choose token `length`
        logits = next_logits(running[:, :, length - 1].reshape(-1), parents)
        log_probs = torch.log_softmax(logits.float(), dim=-1).view(B, K, -1)
        V = log_probs.shape[-1]
        scores = (log_probs + running_scores[:, :, None]).view(B, K * V)
        top_scores, top_index = torch.topk(scores, k=keep)  # (B, keep)
        from_beam, token = top_index // V, top_index % V
        candidates = running[source, from_beam]  # (B, keep, L)
        candidates[:, :, length] = token
        ends = torch.isin(token, eos) | (length + 1 >= L)

        # continuing hypotheses: the best K candidates that did not end
        alive_scores = top_scores + ends.float() * NEG
        pick = torch.topk(alive_scores, k=K).indices
        running = candidates[source, pick]
        running_scores = alive_scores.gather(1, pick)
        parents = (from_beam.gather(1, pick) + source * K).reshape(-1)

        # finished hypotheses: ended candidates ranked within the first K, length-penalised
        just_ended = ends & in_top_k
        penalised = top_scores / (length ** length_penalty)
        if early_stopping is True:
            penalised = penalised + is_finished.all(dim=1, keepdim=True).float() * NEG
        penalised = penalised + (~improvable).float() * NEG + (~just_ended).float() * NEG
        merged_scores = torch.cat([finished_scores, penalised], dim=1)
        best = torch.topk(merged_scores, k=K).indices
        finished = torch.cat([finished, candidates], dim=1)[source, best]
        finished_scores = merged_scores.gather(1, best)
        finished_len = torch.cat([finished_len, torch.full_like(token, length + 1)], dim=1).gather(1, best)
        is_finished = torch.cat([is_finished, just_ended], dim=1).gather(1, best)

        # can a running hypothesis still beat the worst finished one? (transformers' heuristic)
        hypothetical = L - 1 if early_stopping == "never" and length_penalty > 0 else length
        best_possible = running_scores[:, :1] / (hypothetical ** length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_possible > worst).any(dim=1, keepdim=True)
        all_full = bool(is_finished.all()) and early_stopping is True
        if not bool(improvable.any()) or all_full or bool(ends.all()):
            break

    outputs = []
    for b in range(B):
        tokens = finished[b, 0, 1:int(finished_len[b, 0])].tolist()
        if tokens and tokens[-1] in eos_ids:
            tokens = tokens[:-1]
        outputs.append(tokens)
    return outputs


@torch.inference_mode()
def beam_generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool | str = False,
                  eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """The best beam for each prompt (EOS excluded), for every family, through the one decoding-state
    interface (llmkit/inference/decoding_state.py) the sampling loop uses: a decoder-only model
    continues each prompt, an encoder-decoder reads it as its source. Every hypothesis is a row; the
    prompt is prefilled once per prompt and its rows copied to the beams, and each step reorders the
    rows to follow their parents before the next decode step."""
    from llmkit.inference.decoding_state import decoding_state
    from llmkit.inference.scheduler import check_max_new_tokens

    if not prompts:
        raise GenerationError("every prompt needs at least one token")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise GenerationError(f"num_beams must be an integer ≥ 1, got {num_beams!r}")
    if early_stopping not in (True, False, "never"):
        raise GenerationError(f"early_stopping must be true, false or 'never', got {early_stopping!r}")
    state = decoding_state(model, max_rows=len(prompts) * num_beams, pad_id=pad_id)
    for prompt in prompts:
        state.check(prompt)
    check_max_new_tokens(max_new_tokens)
    # one length for every hypothesis: what fits after the longest prompt
    max_new_tokens = min([max_new_tokens] + [state.room(len(p)) for p in prompts])
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    prefill = state.prefill([list(p) for p in prompts])
    prefill.advance()
    state.join(prefill, reserve=max_new_tokens + 1)
    state.reorder([b for b in range(len(prompts)) for _ in range(num_beams)])  # every beam starts as its prompt
    first = prefill.logits.repeat_interleave(num_beams, dim=0)

    def next_logits(tokens: Tensor, parents: Tensor | None) -> Tensor:
        if parents is None:  # the first token of every beam follows the prompt: the prefill's logits
            return first
        state.reorder(parents.tolist())
        return state.step(tokens, reserve=max_new_tokens + 1)

    # the search's start token stands for the prompt, which the state already holds (it is never fed)
    return beam_search(next_logits, batch=len(prompts), start_id=0, max_new_tokens=max_new_tokens,
                       num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                       eos_ids=eos_ids, device=state.device)
