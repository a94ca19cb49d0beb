"""The public Python surface: `llmkit.load(path)` → LanguageModel (.model, .tokenizer, .generate, .runtime).

A path is a training output directory (its newest complete checkpoint is used), one checkpoint
directory (`config.json` + `model.safetensors` + `tokenizer.json`), or a Hugging Face model
directory (GPT-2, LLaMA, Mistral, Qwen2; see llmkit.io.hf). Weights are read with safetensors
only: nothing is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from llmkit.config import ModelConfig
from llmkit.errors import CheckpointError, ConfigError, GenerationError
from llmkit.inference.engine import Engine
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.beam import beam_generate
from llmkit.inference.seq2seq_generate import source_ids
from llmkit.inference.session import run_alone
from llmkit.io.checkpoint import load_tensors, read_json, require_checkpoint, verify_checkpoint
from llmkit.io.finetuned import load_finetuned_tensors, read_chat_info
from llmkit.io.gguf import load_gguf
from llmkit.io.gguf_reader import is_gguf_file
from llmkit.io.hf import hf_chat_template, is_hf_dir, load_hf, refuse_pickles
from llmkit.models.build import build_model, skip_init, tie_weights
from llmkit.runtime import DTYPES, Runtime, decoding_shapes, dtype_name, make_runtime, model_device, model_dtype, resolve_device
from llmkit.tokenizer import Tokenizer
from llmkit.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, render_chat

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model file or directory")
    if (path / "manifest.json").exists():
        verify_checkpoint(path)
        return path
    if (path / "checkpoints").is_dir():
        return require_checkpoint(path / "checkpoints")
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    refuse_pickles(path)  # a .bin / .pt file given as the model, or a directory holding only those
    raise CheckpointError(f"{path}: not a model directory (no checkpoints/, manifest.json or model.safetensors)")


def load(path: str | Path, *, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, quantize: str | None = None) -> "LanguageModel":
    """Load a model and its tokenizer.

    Args:
        path: a `llmkit train` output directory, a checkpoint directory, a Hugging Face model
            directory (config.json with a model_type, safetensors weights, tokenizer.json), or a
            GGUF file.
        device: where to put the weights: "auto" (CUDA, then MPS, then the CPU), "cpu", "cuda",
            "cuda:N", "mps" (see llmkit.runtime.resolve_device).
        dtype: the weights' dtype: "auto" (the fastest safe one here, by llmkit.runtime.choose_dtype
            on the model's decoding shapes), "fp32", "bf16", "fp16" or a torch dtype; None (the
            default) keeps float32 for Hugging Face and GGUF weights, and llmkit checkpoints as stored.
        quantize: "auto" or "int4" when the model is loaded to generate (as `--quantize` does; "int4"
            then quantises the remaining layers through llmkit.inference.optimize.prepare_for_decoding):
            a GGUF file's Q4_0, Q4_1, Q4_K, Q5_0 and Q8_0 layers keep the file's own codes, and Q6_K
            layers are repacked into int8 groups of 32, with no full-precision copy in memory; for
            decoding only. Other models load as without it; None or "none": every layer in full precision.
    The choice, with its reason, is `lm.runtime` (`lm.runtime.describe()` says it in one line).
    """
    if quantize not in (None, "none", "auto", "int4"):
        raise ConfigError(f"quantize must be one of none, auto, int4 (or None), got {quantize!r}")
    where = resolve_device(device)  # first: an absent device is an error before any file is read
    if is_gguf_file(path):
        g = load_gguf(path, keep_quantized=quantize in ("auto", "int4") and where.type == "cpu")
        return LanguageModel(g.model.eval(), g.tokenizer, Path(path), prefix_ids=g.prefix_ids, eos_ids=g.eos_ids,
                             chat_template=g.chat_template).placed(where, dtype)
    if is_hf_dir(path) and not (Path(path) / "manifest.json").exists():
        model, tokenizer, prefix_ids, eos_ids = load_hf(path)
        return LanguageModel(model.eval(), tokenizer, Path(path), prefix_ids=prefix_ids, eos_ids=eos_ids,
                             chat_template=hf_chat_template(path)).placed(where, dtype)
    ckpt = resolve_checkpoint(path)
    meta = read_json(ckpt / "config.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{ckpt / 'config.json'}: neither an llmkit checkpoint (no \"model\" object) "
                              "nor a Hugging Face config (no \"model_type\")")
    cfg = ModelConfig.from_dict(meta["model"], where=str(ckpt / "config.json"))
    weights = ckpt / "model.safetensors"
    if "quantization" in meta:  # `llmkit quantize` output: int4/int8 layers built from their saved codes
        from llmkit.quant.saved import load_quantized_model

        model = load_quantized_model(meta, load_tensors(weights), where=str(weights))
    else:
        with skip_init():  # load_finetuned_tensors fills every parameter or refuses the file
            model = build_model(cfg)
            if "task" in meta:  # a finetune-tokens / finetune-qa run: the encoder inside its per-token head
                from llmkit.models.token_heads import task_model

                model = task_model(model, meta["task"], where=str(ckpt / "config.json"))
        # Fine-tuned checkpoints (llmkit sft/reward/dpo) may carry LoRA adapters, merged here, and heads.
        load_finetuned_tensors(model, meta, load_tensors(weights), where=str(weights))
        tie_weights(model)
    model.eval()
    chat = read_chat_info(meta, str(ckpt / "config.json"))  # kept from the model a run started from
    if chat is None:
        return LanguageModel(model, Tokenizer.load(ckpt), ckpt).placed(where, dtype)
    return LanguageModel(model, Tokenizer.load(ckpt, **chat.token_names()), ckpt, prefix_ids=chat.prefix_ids,
                         eos_ids=chat.eos_ids, chat_template=chat.template).placed(where, dtype)


def _runtime_as_loaded(model: nn.Module) -> Runtime:
    """The Runtime of a model nobody chose a precision for: where it is, in the dtype it has."""
    return Runtime(model_device(model), dtype_name(model_dtype(model)), torch.get_num_threads(), "as loaded")


@dataclass
class LanguageModel:
    model: nn.Module
    tokenizer: Tokenizer
    path: Path
    # Ids put before every prompt, and ids that end generation. None → llmkit's own convention: its
    # training streams separate documents with EOS, so EOS is also "a document starts here".
    prefix_ids: list[int] | None = None
    eos_ids: list[int] | None = None
    chat_template: str | None = None  # the model's own; None → DEFAULT_CHAT_TEMPLATE (role tokens)
    # Where and in what precision the model runs, and why (None → read off the model: "as loaded").
    runtime: Runtime | None = None

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = _runtime_as_loaded(self.model)
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        seq2seq = getattr(getattr(self.model, "cfg", None), "arch", None) == "encoder-decoder"
        default_prefix = [] if seq2seq else eos  # a seq2seq source ends with EOS instead (see source_ids)
        self.prefix_ids = list(default_prefix if self.prefix_ids is None else self.prefix_ids)
        self.eos_ids = list(eos if self.eos_ids is None else self.eos_ids)

    def placed(self, device: torch.device, dtype: str | torch.dtype | None) -> "LanguageModel":
        """This model moved to `device` with its weights in `dtype` (see `load`), `runtime` set to match."""
        if dtype is None:
            self.model.to(device)
            self.runtime = _runtime_as_loaded(self.model)
            return self
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():  # float64, say: no choice to make
            self.model.to(device=device, dtype=dtype)
            self.runtime = Runtime(device, dtype_name(dtype), torch.get_num_threads(), "as asked")
            return self
        spec = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
        self.runtime = make_runtime(str(device), spec, shapes=decoding_shapes(self.model), training=False)
        self.model.to(device=device, dtype=self.runtime.torch_dtype)
        return self

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def stream(self, prompt: str, *, max_new_tokens: int = 128, stop: Sequence[str] = (),
               seed: int | None = None, use_cache: bool = True, draft: nn.Module | None = None,
               **sampling: Any) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as it is generated (for an encoder-decoder,
        its output for `prompt` as the encoder input).

        Args:
            prompt: text to continue (or to transform, for an encoder-decoder).
            max_new_tokens: token budget; generation also ends at EOS, a stop string or the context limit.
            stop: strings that end generation (not included in the output).
            seed: makes sampling repeatable.
            use_cache: False recomputes the whole sequence every step (slow; for comparison).
            draft: a smaller Transformer decoder with the same vocabulary (e.g. `llmkit.load(...).model`):
                speculative decoding of a greedy answer, which it leaves unchanged.
            **sampling: temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                frequency_penalty (see llmkit.inference.sampling; temperature 0 is greedy).
        """
        ids = (source_ids(self.tokenizer, prompt) if self.config.arch == "encoder-decoder"  # the encoder's input
               else self.prefix_ids + self.tokenizer.encode(prompt))
        yield from self.stream_ids(ids, max_new_tokens=max_new_tokens,
                                   stop=stop, seed=seed, use_cache=use_cache, draft=draft, **sampling)

    def stream_ids(self, ids: list[int], *, max_new_tokens: int = 128, stop: Sequence[str] = (),
                   seed: int | None = None, use_cache: bool = True, draft: nn.Module | None = None,
                   **sampling: Any) -> Iterator[str]:
        """`stream` for a prompt that is already token ids (no prefix is added)."""
        if self.config.arch == "encoder":
            raise GenerationError("an encoder-only model (BERT family) does not generate text; use `llmkit embed`, "
                                  "or lm.model(ids) for masked-LM logits")
        unknown = sorted(set(sampling) - SAMPLING_FIELDS)
        if unknown:
            raise GenerationError(f"unknown sampling option(s): {', '.join(unknown)}")
        params = SamplingParams(**sampling)
        # one request through the one loop (the engine's, run in this thread): a decoder continues `ids`,
        # an encoder-decoder reads them as its source and writes a new sequence
        events = run_alone(self.model, self.tokenizer, ids, max_new_tokens=max_new_tokens, params=params, seed=seed,
                           stop=tuple(stop), eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_id or 0,
                           use_cache=use_cache, draft=draft)
        for event in events:
            if event.text:
                yield event.text

    def engine(self, *, max_batch: int = 8, max_queued: int = 32) -> Engine:
        """A generation engine for this model (llmkit.inference.engine): many concurrent requests in one
        continuous batch, each with its own settings; EOS ids and padding are this model's. Close it
        (or use it in a `with` block) when done."""
        return Engine(self.model, self.tokenizer, max_batch=max_batch, max_queued=max_queued,
                      eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_id or 0)

    def beam_search(self, prompt: str, *, num_beams: int = 4, max_new_tokens: int = 128, length_penalty: float = 1.0,
                    early_stopping: bool | str = False) -> str:
        """The best of `num_beams` hypotheses for `prompt` (its continuation for a decoder, its output for
        an encoder-decoder), with transformers' length_penalty / early_stopping semantics (see
        llmkit.inference.beam)."""
        if self.config.arch == "encoder":
            raise GenerationError("an encoder-only model (BERT family) does not generate text")
        ids = (source_ids(self.tokenizer, prompt) if self.config.arch == "encoder-decoder"
               else self.prefix_ids + self.tokenizer.encode(prompt))
        best = beam_generate(self.model, [ids], max_new_tokens=max_new_tokens, num_beams=num_beams,
                             length_penalty=length_penalty, early_stopping=early_stopping, eos_ids=self.eos_ids,
                             pad_id=self.tokenizer.pad_id or 0)[0]
        return self.tokenizer.decode(best)

    def generate(self, prompt: str, **kwargs: Any) -> str:
        """The whole continuation of `prompt` as one string; same options as `stream`."""
        return "".join(self.stream(prompt, **kwargs))

    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template, ready for the reply."""
        tok = self.tokenizer
        text = render_chat(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True,
                           bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        ids = tok.encode(text)
        # Most templates write the BOS token themselves; add the model's prefix only when they did not.
        if self.prefix_ids and ids[: len(self.prefix_ids)] != self.prefix_ids:
            ids = self.prefix_ids + ids
        return ids

    def chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Iterator[str]:
        """Stream the assistant's reply to `messages` ([{"role": "system"|"user"|"assistant",
        "content": str}, ...]); same options as `stream`."""
        yield from self.stream_ids(self.chat_ids(messages), **kwargs)

    def tag(self, text: str) -> list[dict[str, Any]]:
        """Entities in `text` found by a token classifier (a `llmkit finetune-tokens` output or a
        transformers *ForTokenClassification directory): [{"type", "text", "start", "end", "score"}]."""
        from llmkit.inference.token_tasks import tag

        return tag(self.model, self.tokenizer, text)

    def answer(self, question: str, context: str, **settings: Any) -> dict[str, Any]:
        """The span of `context` answering `question`, by an extractive QA model (`llmkit finetune-qa`
        output or a *ForQuestionAnswering directory): {"answer", "start", "end", "score", "null_margin"}.
        An answer of "" (start = end = 0) is "no answer" (SQuAD 2.0): the null score beat the best span by
        more than `null_threshold` (a setting; by default the model's own, from its fine-tune)."""
        from llmkit.inference.token_tasks import answer

        return answer(self.model, self.tokenizer, question, context, **settings)
