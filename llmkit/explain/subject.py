"""What a view looks at: a loaded model, a text, the ids the model reads for it and their pieces.

The ids are framed as the model is used: a decoder reads its prefix (BOS) + the text, as `generate`
does; an encoder reads `[CLS] text [SEP]` (or EOS + text for llmkit's own tokenizers), as `embed` does;
an encoder-decoder reads the text as its source and a target (the text again unless given), after its
decoder start token, as teacher-forced training does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.errors import ConfigError
from llmkit.explain.pieces import Piece, frame_pieces

DEFAULT_TEXT = "猫坐在垫子上"
# The article's sentence (and its English twin): the word that reads and the words it should attend to.
FOCUS = {"猫坐在垫子上": ("坐", ("猫", "垫子")), "The cat sat on the mat.": ("sat", ("cat", "mat"))}


@dataclass
class Subject:
    lm: object  # llmkit.api.LanguageModel
    text: str
    ids: list[int]
    pieces: list[Piece]
    exact: bool  # the pieces' bytes rebuild the text
    target: str | None = None  # encoder-decoder: the decoder's text
    target_ids: list[int] | None = None
    target_pieces: list[Piece] | None = None
    label: str | None = None  # the name shown (compare: which side); None → the model's file name

    @classmethod
    def create(cls, lm, text: str, *, target: str | None = None, label: str | None = None) -> "Subject":
        from llmkit.inference.embed import encoder_ids
        from llmkit.inference.seq2seq_generate import source_ids

        tok, cfg = lm.tokenizer, lm.model.cfg
        if not text:
            raise ConfigError("--text is empty: give a sentence to explain")
        if cfg.arch == "encoder-decoder":
            ids = source_ids(tok, text)
            target = text if target is None else target
            target_ids = [cfg.decoder_start_token_id] + tok.encode(target)
            target_pieces, _ = frame_pieces(tok, target, target_ids)
        elif cfg.arch == "encoder":
            ids, target_ids, target_pieces = encoder_ids(tok, text, cfg.max_seq_len)[0], None, None
        else:
            ids, target_ids, target_pieces = lm.prefix_ids + tok.encode(text), None, None
        if len(ids) > cfg.max_seq_len:
            raise ConfigError(f"--text is {len(ids)} tokens; the model's context is {cfg.max_seq_len}")
        pieces, exact = frame_pieces(tok, text, ids)
        return cls(lm, text, ids, pieces, exact, target, target_ids, target_pieces, label)

    @property
    def model(self):
        return self.lm.model

    @property
    def cfg(self):
        return self.lm.model.cfg

    @property
    def name(self) -> str:
        return self.label or self.lm.path.name

    @property
    def arch(self) -> str:
        return self.cfg.arch

    @property
    def recurrent(self) -> bool:
        return self.cfg.body != "transformer"

    def labels(self, side: str = "input") -> list[str]:
        pieces = self.target_pieces if side == "target" else self.pieces
        return [p.label for p in pieces]

    def require_attention(self, view: str) -> None:
        if self.recurrent:
            raise ConfigError(f"{view}: {self.name} is a {self.cfg.body.upper()} model, which has no attention "
                              "(a recurrence carries the past in a fixed-size state); try the tokens, "
                              "logit-lens, sampling or cache views")

    def require_logits(self, view: str) -> None:
        if self.arch == "encoder" and not self.cfg.mlm_head:
            raise ConfigError(f"{view}: {self.name} is a bare encoder (no language-model head), so it "
                              "predicts no tokens; try the tokens, attention or cache views")

    def predicted_side(self) -> tuple[list[int], list[Piece]]:
        """The ids the logits' rows read (the decoder's for an encoder-decoder) and their pieces."""
        if self.arch == "encoder-decoder":
            return self.target_ids, self.target_pieces
        return self.ids, self.pieces

    @torch.inference_mode()
    def run(self) -> Tensor | None:
        """One forward: the logits, or None for a bare encoder (whose hidden states are computed)."""
        if self.arch == "encoder" and not self.cfg.mlm_head:
            device = next(self.model.parameters()).device
            self.model.hidden_states(torch.tensor([self.ids], device=device))
            return None
        return self.logits()

    @torch.inference_mode()
    def logits(self, copies: int | None = None) -> Tensor:
        """(T, vocab) float32 logits of one forward: next-token logits for a decoder, the decoder's
        for an encoder-decoder, masked-LM logits for an encoder; (copies, T, vocab) for a batch of
        `copies` copies of the input (one knockout per row)."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([self.ids], device=device).expand(copies or 1, -1)
        if self.arch == "encoder-decoder":
            target = torch.tensor([self.target_ids], device=device).expand(copies or 1, -1)
            out = self.model(ids, target).float()
        else:
            out = self.model(ids).float()
        return out if copies else out[0]
