"""Pictures of a run: the loss curve from metrics.jsonl (train loss per log step, validation loss
per evaluation), written atomically next to it."""

from __future__ import annotations

import io
import json
from pathlib import Path

from llmkit.io.checkpoint import atomic_write_bytes


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(metrics_path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]


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
