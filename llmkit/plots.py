"""Pictures of a run: the loss curve from metrics.jsonl (train loss per log step, validation loss
per evaluation), written atomically next to it."""

from __future__ import annotations

import io
from pathlib import Path

from llmkit.errors import CheckpointError
from llmkit.io.checkpoint import atomic_write_bytes
from llmkit.io.input_files import iter_lines
from llmkit.io.safe_json import parse_json


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(metrics_path: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, streamed through the bounded readers (docs/security.md).
    A last line that does not parse is a write cut short by a crash and is left out; a bad line
    anywhere else is a CheckpointError naming file:line."""
    rows: list[dict] = []
    pending: CheckpointError | None = None  # the previous line's error, raised once a line follows it
    for number, raw in iter_lines(metrics_path, error=CheckpointError, what="metrics file"):
        if pending is not None:
            raise pending
        if not raw.strip():
            continue
        try:
            row = parse_json(raw, where=f"{metrics_path}:{number}", error=CheckpointError, one_line=True)
        except CheckpointError as exc:
            pending = exc
            continue
        if not isinstance(row, dict):
            raise CheckpointError(f"{metrics_path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def save_figure(fig, out_path: str | Path) -> Path:
    """Render `fig` to PNG and write it atomically (a crash never leaves half a picture)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())
    return Path(out_path)


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    plt = pyplot()
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4C72B0", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#DD8452", linewidth=1.5, markersize=4)
        step, loss = val[-1]
        ax.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(-10, 8), fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("llmkit training")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_path)
