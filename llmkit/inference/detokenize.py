"""Incremental detokenisation: tokens in one at a time, printable text out as soon as it is final.

Two things keep text back:
- a character split across tokens (byte-level BPE writes a CJK character or an emoji as 2–4 byte
  tokens): the decoded text then ends in U+FFFD until the last byte arrives, and nothing is released
  until it does;
- a possible stop string: text that could be the beginning of one (the longest tail of the pending
  text that is a prefix of some stop string) waits for the next token. When a stop string appears,
  everything before it is released, the stop string and everything after it never are.

Decoding re-reads only a short window of tokens (those since the last release, plus the window
before them, which gives tokenizers that treat a word's first piece specially, like SentencePiece's
leading space, the same context), so the cost per token does not grow with the output.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.window = 0  # decoding starts at tokens[window]
        self.read = 0  # the text of tokens[window:read] has been taken into `pending` or released
        self.pending = ""  # decoded, not yet released (it may begin a stop string)
        self.stopped = False  # a stop string was found: nothing more is released

    def push(self, token: int) -> str:
        """Add one token; the text that became final ("" if none)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self.window:self.read])
        after = self.tokenizer.decode(self.tokens[self.window:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # no new character yet, or the last one is still incomplete
        self.pending += after[len(before):]
        self.window, self.read = self.read, len(self.tokens)
        return self._release(final=False)

    def finish(self) -> str:
        """Everything still held back (an incomplete character comes out as U+FFFD), unless stopped."""
        if self.stopped:
            return ""
        before = self.tokenizer.decode(self.tokens[self.window:self.read])
        after = self.tokenizer.decode(self.tokens[self.window:])
        if len(after) > len(before):
            self.pending += after[len(before):]
        self.window = self.read = len(self.tokens)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        found = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if found:
            cut = min(found)[0]
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = 0 if final else self._stop_prefix_length()
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def _stop_prefix_length(self) -> int:
        """The longest tail of `pending` that some stop string begins with."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best
