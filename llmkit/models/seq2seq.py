"""Encoder-decoder language model (T5, BART): a bidirectional encoder Stack and a causal decoder Stack
whose blocks add cross-attention to the encoder output, over one shared token embedding.

`model(input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None)` returns
decoder logits (B, T_dec, vocab), as transformers' `...ForConditionalGeneration` does (teacher
forcing: decoder_input_ids are the targets shifted right behind `cfg.decoder_start_token_id`, see
`shift_right`). For generation, `encode` once, then `decode` step by step with a `new_cache`.
Masks are 1 for real tokens and 0 for padding (right padding, as T5/BART tokenizers produce).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.models.build import init_normal
from llmkit.inference.seq2seq_cache import Seq2SeqCache
from llmkit.layers.linear import Linear
from llmkit.models.transformer import Embeddings, Stack


class Seq2SeqLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)  # the token table (shared) and the encoder's positions / norm
        self.decoder_embeddings = Embeddings(cfg)  # the decoder's own positions / norm (BART)
        self.encoder = Stack(cfg, causal=False)
        self.decoder = Stack(cfg, causal=True, cross_attention=True, n_layers=cfg.decoder_layers)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.final_logits_bias:  # BART's: a saved buffer, not trained (zeros in every released checkpoint)
            self.register_buffer("final_logits_bias", torch.zeros(cfg.vocab_size))
        self.tie_weights()
        self.apply(partial(init_normal, std=cfg.init_std))
        for name, p in self.named_parameters():  # GPT-2's depth-scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / (2 * (cfg.n_layers + cfg.decoder_layers)) ** 0.5)
        if cfg.rescale_head:
            # T5 v1.0 multiplies the tied head's input by d_model^-0.5; with a 0.02-std table its first
            # logits are ~0.02 and it barely learns (0% exact match on the seq2seq demo after 400 steps).
            # T5 initialises the shared table with std 1.0, which makes the rescaled logits O(1).
            nn.init.normal_(self.embeddings.embed.weight, mean=0.0, std=1.0)

    def tie_weights(self) -> None:
        # One token table serves both stacks (and the head when tied). It is registered only under
        # `embeddings.embed`; the decoder's Embeddings holds a plain reference, so the table is saved,
        # counted and optimised once.
        self.decoder_embeddings._modules.pop("embed", None)
        object.__setattr__(self.decoder_embeddings, "embed", self.embeddings.embed)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embeddings.embed.weight

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced decoder logits (B, T_dec, vocab) for source `input_ids` (B, S)."""
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask=attention_mask,
                           decoder_attention_mask=decoder_attention_mask)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder's final hidden states (B, S, C)."""
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device).expand(B, S)
        x = self.embeddings(input_ids, positions)
        return self.encoder(x, positions, key_mask=attention_mask)

    def decode(self, decoder_input_ids: Tensor, memory: Tensor, *, attention_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None, cache: Seq2SeqCache | None = None,
               positions: Tensor | None = None) -> Tensor:
        """Decoder logits (B, T, vocab) for decoder_input_ids (B, T) attending to `memory` (B, S, C),
        whose real positions `attention_mask` (B, S) marks. With a cache, decoder_input_ids are the new
        positions only and `decoder_attention_mask`, if given, covers cached and new ones. `positions`
        (B, T): each row's own (a continuous batch left-pads decoder rows); default cache.pos onwards."""
        return self.logits(self.decoder_hidden_states(decoder_input_ids, memory, attention_mask=attention_mask,
                                                      decoder_attention_mask=decoder_attention_mask, cache=cache,
                                                      positions=positions))

    def decoder_hidden_states(self, decoder_input_ids: Tensor, memory: Tensor, *,
                              attention_mask: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                              cache: Seq2SeqCache | None = None, positions: Tensor | None = None) -> Tensor:
        B, T = decoder_input_ids.shape
        offset = cache.pos if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + T, device=decoder_input_ids.device).expand(B, T)
        x = self.decoder_embeddings(decoder_input_ids, positions)
        memory_mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None
        x = self.decoder(x, positions, key_mask=decoder_attention_mask, cache=cache, memory=memory,
                         memory_mask=memory_mask)
        if cache is not None:
            cache.advance(T)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        if self.cfg.rescale_head:  # T5 with a tied head: the embedding's scale is d^0.5 too large for logits
            hidden = hidden * self.cfg.d_model ** -0.5
        logits = self.lm_head(hidden)
        return logits + self.final_logits_bias if self.cfg.final_logits_bias else logits

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> Seq2SeqCache:
        """Decoding state for `batch` rows of up to `max_len` decoder positions."""
        return Seq2SeqCache(self.cfg, batch, max_len, dtype=dtype, device=device)


def shift_right(labels: Tensor, *, start_id: int, pad_id: int, ignore_index: int = -100) -> Tensor:
    """Teacher-forcing decoder inputs from targets (B, T): start_id, then the targets but the last,
    with ignored label positions (-100) replaced by pad_id (transformers' `_shift_right`)."""
    shifted = torch.full_like(labels, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == ignore_index, pad_id)
