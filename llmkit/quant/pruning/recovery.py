"""A short recovery fine-tune of a pruned model: next-token training on text through the one training
loop, with every removed weight held at zero (apply.hold_zeros), so the pattern survives it.

The text (--data: files or directories, read like training data) is tokenised with the model's own
tokenizer; its last tenth (at least one window) is held out and evaluated before and after. The run
directory is an ordinary fine-tuning run (checkpoints/, metrics.jsonl, loss.png); its checkpoint's
config.json carries the "pruning" record, so `llmkit.load(run)` reads the result like any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from llmkit.data.batches import TokenBatches, eval_batches
from llmkit.data.corpus import find_text_files, tokenize_files
from llmkit.errors import DatasetError
from llmkit.io.run_dir import hold_run_dir
from llmkit.quant.pruning.apply import hold_zeros, keep_masks
from llmkit.training import finetune
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer, TrainState
from llmkit.training.objectives import evaluate_lm, next_token_loss
from llmkit.training.pretrain import run_trainer

Event = Callable[[str, dict[str, Any]], None]
HELD_OUT = 0.1


def recovery_finetune(lm: Any, data: Sequence[str | Path], run_dir: Path, cfg: TrainConfig, *,
                      pruning: dict[str, Any], hold: bool, on_event: Event | None = None,
                      on_step: Callable[[dict], None] | None = None) -> TrainState:
    """Train `lm.model` for cfg.steps on the text of `data`, writing the run to `run_dir`; with `hold`,
    weights that are zero now stay zero (unstructured and 2:4 masks)."""
    emit = on_event or (lambda kind, info: None)
    files, skipped = find_text_files(list(data))
    emit("files", {"files": len(files), "skipped": skipped})
    eos = lm.tokenizer.eos_id if lm.tokenizer.eos_id is not None else (lm.eos_ids or [0])[0]
    tokens = tokenize_files(lm.tokenizer, files, eos_id=eos)
    seq_len = finetune.context_length(lm, cfg) if cfg.seq_len else min(lm.model.cfg.max_seq_len, 256)
    n_val = max(seq_len + 1, int(tokens.size * HELD_OUT))
    if tokens.size < 2 * n_val:
        raise DatasetError(f"{', '.join(map(str, data))}: {tokens.size} tokens of text; a fine-tune at --seq-len "
                           f"{seq_len} needs at least {2 * n_val}")
    train, val = tokens[:-n_val], tokens[-n_val:]
    emit("tokens", {"train_tokens": int(train.size), "val_tokens": int(val.size)})
    batches = TokenBatches(train, seq_len, cfg.batch_size, cfg.seed)

    def evaluate(model) -> dict[str, float]:
        return evaluate_lm(model, eval_batches(val, seq_len, cfg.batch_size, max_batches=cfg.eval_batches))

    model = lm.model.float()
    emit("eval", {"step": 0, **evaluate(model.eval())})  # where the pruned model starts
    handles = hold_zeros(model, keep_masks(model)) if hold else []
    model.train()
    run = finetune.FinetuneRun(lm, model, cfg, run_dir, "prune-recovery", data_fingerprint=finetune.fingerprint_of(
        [str(f) for f in files], int(tokens.size), seq_len, cfg.seed))
    meta = {**finetune.checkpoint_meta(run), "pruning": pruning}
    try:
        with hold_run_dir(run_dir):
            lm.tokenizer.save(run_dir)
            trainer = Trainer(model, cfg, loss_fn=next_token_loss, get_batch=batches.batch, out_dir=run_dir,
                              evaluate=evaluate, checkpoint_json={"config.json": meta},
                              checkpoint_files={"tokenizer.json": run_dir / "tokenizer.json"},
                              fingerprint={"kind": run.kind, "data": run.data_fingerprint,
                                           "model_config": lm.model.cfg.non_default_fields()})
            return run_trainer(trainer, run_dir, resume=False, emit=emit, on_step=on_step)
    finally:
        for handle in handles:
            handle.remove()
        model.eval()

