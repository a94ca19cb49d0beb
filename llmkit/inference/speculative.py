"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), greedy: a small draft model guesses
the next k tokens one by one; the target model checks all of them in one forward over k + 1
positions (on a CPU that costs little more than one token: decoding is bound by reading the weights,
not by the arithmetic); the guesses up to the first one the target disagrees with are kept, plus the
target's own token at that point. Every token emitted is the target's greedy choice, so the output
is the target's greedy output; the draft only decides how many tokens each target forward yields.

Both models run on the decoding states of llmkit/inference/decoding_state.py (a KV cache on the
shared timeline): rejected guesses are forgotten by rewinding each state's timeline. The draft may be
any llmkit decoder with the same vocabulary (a smaller model of the family, or the target's own first
layers). Transformer bodies only: a recurrent state cannot be rewound without a copy per guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from llmkit.errors import GenerationError
from llmkit.inference.decoding_state import AttentionState
from llmkit.inference.scheduler import check_max_new_tokens


@dataclass
class SpeculationStats:
    rounds: int = 0  # target forwards after the prefill
    proposed: int = 0  # draft guesses checked
    accepted: int = 0  # guesses the target agreed with
    emitted: list[int] = field(default_factory=list)  # tokens per round

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.proposed, 1)


def _state(model: nn.Module, role: str) -> AttentionState:
    cfg = model.cfg
    if cfg.arch != "decoder" or cfg.body != "transformer":
        raise GenerationError(f"speculative decoding needs Transformer decoders; the {role} is "
                              f"arch={cfg.arch!r}, body={cfg.body!r}")
    return AttentionState(model, max_rows=1)


@torch.inference_mode()
def speculative_generate(target: nn.Module, draft: nn.Module, prompt: Sequence[int], *, max_new_tokens: int,
                         draft_tokens: int = 4, eos_ids: Sequence[int] = (),
                         stats: SpeculationStats | None = None) -> Iterator[int]:
    """Yield the target's greedy continuation of `prompt` (EOS excluded), `draft_tokens` guesses per round."""
    big, small = _state(target, "target"), _state(draft, "draft")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise GenerationError(f"the draft's vocabulary ({draft.cfg.vocab_size}) is not the target's "
                              f"({target.cfg.vocab_size}): they must share a tokenizer")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise GenerationError(f"draft_tokens must be an integer ≥ 1, got {draft_tokens!r}")
    big.check(prompt)
    small.check(prompt)
    check_max_new_tokens(max_new_tokens)
    stats = stats if stats is not None else SpeculationStats()
    limit = min(max_new_tokens, big.room(len(prompt)), small.room(len(prompt)))
    if limit == 0:
        return
    eos, device = set(eos_ids), big.device
    reserve = limit + draft_tokens + 1
    prefills = []
    for state in (big, small):
        prefill = state.prefill([list(prompt)])
        prefill.advance()
        state.join(prefill, reserve=reserve)
        prefills.append(prefill.logits)
    token = int(prefills[0][0].argmax())  # the target's first token; the draft's prefill only fills its cache
    draft_pending = [token]  # tokens the draft has not been fed yet
    produced = 0
    while True:
        if token in eos:
            return
        yield token
        produced += 1
        if produced >= limit:
            return
        # guesses, at most what still fits: the target feeds `token` and the k guesses
        k = min(draft_tokens, limit - produced - 1)
        guesses: list[int] = []
        if k > 0:
            logits = small.extend(torch.tensor([draft_pending], device=device), reserve)[0, -1]
            guesses.append(int(logits.argmax()))
            for _ in range(k - 1):
                guesses.append(int(small.step(torch.tensor([guesses[-1]], device=device), reserve)[0].argmax()))
        checked = big.extend(torch.tensor([[token] + guesses], device=device), reserve)[0].argmax(-1).tolist()
        agree = 0
        while agree < len(guesses) and guesses[agree] == checked[agree] and guesses[agree] not in eos:
            agree += 1
        stats.rounds += 1
        stats.proposed += len(guesses)
        stats.accepted += agree
        stats.emitted.append(agree + 1)
        big.rewind(len(guesses) - agree)  # keep token + the agreed guesses
        if guesses:  # the draft read its pending tokens and every guess but the last
            fed = len(guesses) - 1
            if agree <= fed:
                small.rewind(fed - agree)
                draft_pending = []
            else:  # every guess agreed: the draft still has to read its last one
                draft_pending = [guesses[-1]]
        for guess in guesses[:agree]:
            yield guess
            produced += 1
            if produced >= limit:
                return
        token = checked[agree]  # the target's own next token
        draft_pending = draft_pending + [token]


class Speculator:
    """Speculative decoding inside the continuous batch (llmkit/inference/scheduler.py): while one greedy
    request runs alone — a CLI answer, a server with one client — each step is a round of the draft's
    guesses checked by one target forward over them, yielding 1 to `draft_tokens` + 1 tokens instead of
    one; as soon as a second request runs or waits, steps are the batch's ordinary decode steps again.

    The draft keeps its own one-row decoding state and follows the request it last guessed for: when a
    different request (or the same one after other rows ran) is next alone, the draft reads what it
    missed first, all of it in one prefill when it changed requests. Every token kept is the target's
    greedy choice, so the request's output is what it would be without the draft."""

    def __init__(self, target_state, draft: nn.Module, *, draft_tokens: int = 4) -> None:
        if not isinstance(target_state, AttentionState):
            raise GenerationError("speculative decoding needs a Transformer decoder with a KV cache as the model")
        self.small = _state(draft, "draft")
        if target_state.cfg.vocab_size != draft.cfg.vocab_size:
            raise GenerationError(f"the draft's vocabulary ({draft.cfg.vocab_size}) is not the model's "
                                  f"({target_state.cfg.vocab_size}): they must share a tokenizer")
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise GenerationError(f"draft_tokens must be an integer ≥ 1, got {draft_tokens!r}")
        self.big, self.draft_tokens = target_state, draft_tokens
        self.stats = SpeculationStats()
        self.owner = None  # the request whose tokens the draft has read
        self.fed = 0  # how many of them (its prompt, then its generated tokens)

    def round(self, request, eos: set[int], reserve: int) -> tuple[list[int], torch.Tensor] | None:
        """The target's next greedy tokens for `request` (running alone, its newest token `pending` not
        yet read by the target) and the target's logits that chose them (one row each), or None when no
        guess fits (the caller takes an ordinary step)."""
        sequence = request.prompt + request.generated  # the last one is `pending`
        k = min(self.draft_tokens, request.limit - len(request.generated) - 1,
                self.small.cfg.max_seq_len - len(sequence))
        if k < 1:
            return None
        small, device = self.small, self.big.device
        reserve = max(reserve, k + 1)
        if self.owner is not request or self.fed > len(sequence):
            self.owner = None  # while the draft is being rebuilt it follows nobody
            if small.n:
                small.drop({0})
            prefill = small.prefill([sequence])
            prefill.advance()
            small.join(prefill, reserve=reserve)
            logits = prefill.logits[0]
        else:
            logits = small.extend(torch.tensor([sequence[self.fed:]], device=device), reserve)[0, -1]
        self.owner = request
        guesses = [int(logits.argmax())]
        for _ in range(k - 1):
            guesses.append(int(small.step(torch.tensor([guesses[-1]], device=device), reserve)[0].argmax()))
        logits = self.big.extend(torch.tensor([[request.pending] + guesses], device=device), reserve)[0]
        checked = logits.argmax(-1).tolist()
        agree = 0
        while agree < k and guesses[agree] == checked[agree] and guesses[agree] not in eos:
            agree += 1
        self.big.rewind(k - agree)  # the target keeps `pending` and the agreed guesses
        kept = min(agree, k - 1)  # the draft read every guess but the last
        small.rewind(k - 1 - kept)
        self.fed = len(sequence) + kept
        self.stats.rounds += 1
        self.stats.proposed += k
        self.stats.accepted += agree  # (not stats.emitted: a server's rounds are countless)
        return guesses[:agree] + [checked[agree]], logits[:agree + 1]

    def forget(self) -> None:
        """Follow no request (after a failed step the draft's state may be half-written)."""
        self.owner = None
