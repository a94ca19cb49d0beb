"""Tiny randomly initialised transformers T5 / BART models, saved as Hugging Face directories with a
small word-level tokenizer, for the seq2seq parity tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # with 4 special tokens, every model id decodes to a token


def tokenizer_json(kind: str) -> str:
    """A word-level tokenizer.json over WORDS with the family's special tokens and post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>", "<extra_id_0>"] if kind == "t5" else ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    if kind == "t5":  # T5 appends </s>; BART wraps in <s> ... </s>
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok.to_str()


def t5_model(*, gated: bool, seed: int = 0, layers: int = 2, decoder_layers: int | None = None,
             eos_scale: float = 1.0):
    """A T5 v1.0 (ReLU MLP, tied head with the d^-0.5 rescale) or v1.1 (gated-GELU, untied head).
    `eos_scale` > 1 enlarges EOS's embedding row (v1.0's tied head then predicts EOS more often)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=layers,
                      num_decoder_layers=decoder_layers, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=20, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    if gated:  # transformers 5 ties the head at construction; a v1.1 checkpoint has its own
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.5)
    with torch.no_grad():  # random init leaves the relative bias small: make positions matter
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 1.0)
        model.shared.weight[1] *= eos_scale
    return model.eval()


def bart_model(*, seed: int = 0, eos_bias: float | None = None):
    """A BART (post-norm, learned positions offset by 2, GELU, random final_logits_bias); `eos_bias`
    sets EOS's logit bias (this model copies its input token, and starts from EOS: ~4.7 makes some
    rows stop at once and others never)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.2)
    model = BartForConditionalGeneration(config)
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)  # zeros in releases; random here so the test sees it
        if eos_bias is not None:
            model.final_logits_bias[0, 2] = eos_bias
    return model.eval()


def save_hf_dir(model, directory: Path, kind: str) -> Path:
    """save_pretrained (safetensors) plus tokenizer.json and tokenizer_config.json."""
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(tokenizer_json(kind), encoding="utf-8")
    pad, eos = ("<pad>", "</s>")
    (directory / "tokenizer_config.json").write_text(
        f'{{"pad_token": "{pad}", "eos_token": "{eos}"}}', encoding="utf-8")
    return directory


def padded_batch(lengths: list[int], *, seed: int, low: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids (B, max) and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(low, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def until_eos(tokens: list[int], eos: int) -> list[int]:
    """transformers' output row (start token removed) cut at its first EOS, as llmkit returns it."""
    return tokens[:tokens.index(eos)] if eos in tokens else tokens
