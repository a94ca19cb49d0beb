"""The PPO picture: mean score and KL to the reference per PPO step (two panels, shared x axis),
read from metrics.jsonl and written atomically, like llmkit/plots.py's loss curve."""

from __future__ import annotations

from pathlib import Path

from llmkit.plots import pyplot, read_metrics, save_figure


def plot_reward_kl(metrics_path: str | Path, out_path: str | Path, *, title: str = "llmkit ppo") -> Path | None:
    plt = pyplot()
    rows = read_metrics(metrics_path)
    rows = [r for r in rows if "score" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=110, sharex=True)
    top.plot(steps, [r["score"] for r in rows], color="#4C72B0", linewidth=1.2, label="score (reward function/model)")
    top.plot(steps, [r["reward"] for r in rows], color="#55A868", linewidth=1.0, alpha=0.8,
             label="score − β·KL − no-EOS penalty (what PPO maximises)")
    top.set_ylabel("mean per response")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, [r["kl"] for r in rows], color="#DD8452", linewidth=1.2, label="KL(policy ‖ reference)")
    bottom.set_ylabel("nats per response")
    bottom.set_xlabel("PPO step")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    top.set_title(title)
    return save_figure(fig, out_path)
