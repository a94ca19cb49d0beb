"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned
Lens", arXiv 2303.08112): the logit lens with one learned affine map per read-out point, h → h + A·h + b,
trained so that reading the residual stream through the map, the model's final norm and its LM head
gives the model's own next-token distribution, i.e. minimising KL(final ‖ read-out).

The maps start at the identity (A = 0, b = 0), so an untrained tuned lens is the logit lens, and
AdamW's weight decay pulls A back towards it. The last read-out point is the model's own output,
whose best map is the identity, and it keeps the identity without training: its KL and gradient are 0
at the start, but Adam divides what float32 rounding leaves of that gradient by its own size, and
60 steps moved a trained last map by up to 2·10⁻³ (measured) for nothing. The model is frozen; only the maps learn, through the one training loop
(llmkit/training/loop.py's Trainer), which writes them as a checkpoint (with metrics.jsonl) under
the explain output's tuned-lens/ directory; a second run with the same model and data resumes from
it, so a finished lens is not trained again. The loop's evaluation reports the held-out KL of both
lenses on the last tenth of the token stream, which training never reads.

Decoder-only models in fp32 (the maps train in fp32; a bf16 or int4 model would need its own).
"""

from __future__ import annotations

import hashlib
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.errors import ConfigError

SEQ_LEN = 128
BATCH = 4
HELD_OUT_SHARE = 0.1
DEFAULT_DATA_CHARS = 1_000_000  # the default data: top-level stdlib modules until this many characters


class TunedLens(nn.Module):
    """One affine map per read-out point before the last (the embeddings, then after each block but the
    last), each the identity at first; the last point, the model's own output, is read as it is."""

    def __init__(self, points: int, d_model: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(points - 1))
        for m in self.maps:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, point: int, hidden: Tensor) -> Tensor:
        return hidden + self.maps[point](hidden) if point < len(self.maps) else hidden


@dataclass
class TunedLensFit:
    lens: TunedLens
    steps: int
    train_tokens: int
    held_out_tokens: int
    held_out_kl_plain: list[float]  # per read-out point, on the held-out tokens
    held_out_kl_tuned: list[float]
    directory: Path
    data: str  # what it was trained on, in words


@contextmanager
def capturing(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, each forward of `model` appends the residual stream at every read-out point:
    the input to the first block, then each block's output (a shared block, ALBERT's, once per layer)."""
    from llmkit.explain.logit_lens import readout

    blocks, _ = readout(model)
    seen: list[Tensor] = []
    first = next(iter(blocks))
    hooks = [first.register_forward_pre_hook(lambda module, args: seen.append(args[0]) if not seen else None)]
    hooks += [b.register_forward_hook(lambda module, args, out: seen.append(out)) for b in dict.fromkeys(blocks)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def kl_to_final(final_logits: Tensor, read_out: Tensor) -> Tensor:
    """KL(final ‖ read-out) in nats, averaged over positions: what the read-out misses of the model's
    own next-token distribution."""
    vocab = final_logits.shape[-1]
    target = final_logits.float().reshape(-1, vocab).log_softmax(-1)
    return F.kl_div(read_out.float().reshape(-1, vocab).log_softmax(-1), target, log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def kl_by_point(model: nn.Module, lens: TunedLens | None, windows: Tensor) -> tuple[list[float], list[float]]:
    """Per read-out point, KL(final ‖ logit lens) and KL(final ‖ tuned lens) on `windows` (B, T) of ids."""
    from llmkit.explain.logit_lens import readout

    _, head = readout(model)
    with capturing(model) as seen:
        final = model(windows)
    plain = [float(kl_to_final(final, head(h))) for h in seen]
    tuned = [float(kl_to_final(final, head(lens(i, h)))) for i, h in enumerate(seen)] if lens is not None else []
    return plain, tuned


def default_texts() -> tuple[list[str], str]:
    """The Python standard library's top-level modules (every machine has them; the demo trains on
    them), in name order, up to DEFAULT_DATA_CHARS characters."""
    from llmkit.data.corpus import read_text_file
    from llmkit.errors import DatasetError

    texts, size = [], 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            text = read_text_file(path)
        except DatasetError:
            continue
        texts.append(text)
        size += len(text)
        if size >= DEFAULT_DATA_CHARS:
            break
    return texts, f"{len(texts)} top-level modules of {root}"


def read_texts(paths: Sequence[str]) -> tuple[list[str], str]:
    from llmkit.data.corpus import find_text_files, read_text_file

    files, _ = find_text_files(paths)
    return [read_text_file(f) for f in files], f"{len(files)} text files under {', '.join(paths)}"


def token_stream(tokenizer, texts: Sequence[str]) -> Tensor:
    """The texts' ids end to end, each document after EOS (as llmkit's training streams are)."""
    ids: list[int] = []
    for text in texts:
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        ids += tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long)


def windows_at(stream: Tensor, index: int, *, batch: int, seq_len: int) -> Tensor:
    """Batch `index`: `batch` windows of `seq_len` ids at starts drawn from the index (a pure function
    of it, as the loop's exact resume needs)."""
    generator = torch.Generator().manual_seed(index)
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch,), generator=generator)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def fit_tuned_lens(lm, out_dir: str | Path, *, steps: int, texts: Sequence[str], data: str,
                   seq_len: int = SEQ_LEN, batch: int = BATCH, lr: float = 1e-3,
                   on_event: Callable[[str, dict], None] | None = None,
                   on_step: Callable[[dict], None] | None = None) -> TunedLensFit:
    """Train (or resume, or reload) a tuned lens for `lm` on `texts` with the one training loop."""
    from llmkit.explain.logit_lens import readout
    from llmkit.training.config import TrainConfig
    from llmkit.training.loop import Trainer

    model, cfg = lm.model, lm.model.cfg
    if cfg.arch != "decoder" or cfg.body != "transformer":
        raise ConfigError("--tuned: the tuned lens is trained for decoder-only Transformers (this model is "
                          f"{cfg.arch}, {cfg.body})")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ConfigError("--tuned trains in fp32: run it with --dtype fp32 and without --quantize")
    stream = token_stream(lm.tokenizer, texts)
    seq_len = min(seq_len, cfg.max_seq_len)
    held = max(int(len(stream) * HELD_OUT_SHARE), seq_len)
    if len(stream) - held < seq_len:
        raise ConfigError(f"--tuned-data holds {len(stream)} tokens; the tuned lens needs at least "
                          f"{seq_len + held} ({seq_len} to train on and {held} held out)")
    train, held_out = stream[:-held], stream[-held:]
    held_windows = held_out[:len(held_out) // seq_len * seq_len].reshape(-1, seq_len)[:8]
    device = next(model.parameters()).device
    lens = TunedLens(cfg.n_layers + 1, cfg.d_model)
    _, head = readout(model)

    def get_batch(index: int) -> dict[str, Tensor]:
        ids = windows_at(train, index, batch=batch, seq_len=seq_len).to(device)
        with torch.no_grad(), capturing(model) as seen:
            final = model(ids)
        return {"hidden": torch.stack(seen), "final": final, "tokens": ids.numel()}

    def loss_fn(lens: TunedLens, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        points = len(lens.maps)  # (the last read-out point has no map)
        kl = sum(kl_to_final(batch["final"], head(lens(i, batch["hidden"][i]))) for i in range(points)) / points
        return kl, {"tokens": batch["tokens"]}

    def evaluate(lens: TunedLens) -> dict[str, float]:
        plain, tuned = kl_by_point(model, lens, held_windows.to(device))
        return {"val_kl_logit_lens": sum(plain[:-1]) / len(lens.maps),
                "val_kl_tuned_lens": sum(tuned[:-1]) / len(lens.maps)}

    train_cfg = TrainConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, warmup_steps=max(1, steps // 10),
                            eval_interval=steps, log_interval=max(1, steps // 20), eval_batches=1, keep_checkpoints=1,
                            device=str(device), dtype="fp32", schedule="cosine")
    identity = {"model": str(lm.path), "layers": cfg.n_layers, "d_model": cfg.d_model, "vocab": cfg.vocab_size,
                "data": hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:16], "seq_len": seq_len}
    out = Path(out_dir)
    trainer = Trainer(lens, train_cfg, loss_fn=loss_fn, get_batch=get_batch, out_dir=out, evaluate=evaluate,
                      fingerprint=identity, checkpoint_json={"tuned_lens.json": {**identity, "data_text": data}})
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # the model only carries gradients to the maps; its weights are not trained
        p.requires_grad_(False)
    try:
        resumed = trainer.resume(on_event)
        if on_event is not None:
            if resumed is not None:
                on_event("resume", {"path": resumed, "step": trainer.state.step})
            trainer.announce(on_event)
        trainer.run(on_step=on_step, on_event=on_event)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    lens.eval()
    plain, tuned = kl_by_point(model, lens, held_windows.to(device))
    return TunedLensFit(lens, trainer.state.step, len(train), held_windows.numel(), plain, tuned, out, data)
