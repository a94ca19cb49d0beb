"""The compare view: one view for two models side by side (an untrained and a trained checkpoint, the
demo model and SmolLM2, fp32 and int4 weights): both figures in one picture, both tables in one page."""

from __future__ import annotations

import io

from llmkit.explain.page import ViewResult, render_png


def compare_view(left: ViewResult, right: ViewResult, left_name: str, right_name: str) -> ViewResult:
    pictures = [render_png(left), render_png(right)]

    def draw(plt):
        shown = [p for p in pictures if p is not None]
        images = [plt.imread(io.BytesIO(p), format="png") for p in shown]
        tall, wide = max(i.shape[0] for i in images) / 110, max(i.shape[1] for i in images) / 110
        stacked = wide > 1.3 * tall  # wide figures one above the other, tall ones side by side
        fig, axes = plt.subplots(len(images) if stacked else 1, 1 if stacked else len(images), squeeze=False,
                                 figsize=(wide, len(images) * (tall + 0.4)) if stacked else
                                 (len(images) * wide, tall + 0.4))
        axes = axes[:, 0] if stacked else axes[0]
        for ax, image, name in zip(axes, images, (left_name, right_name)):
            ax.imshow(image)
            ax.set_title(name, fontsize=10)
            ax.axis("off")
        return fig

    def tagged(items: list[dict], name: str) -> list[dict]:
        return [{**item, "title": f"{name}: {item['title']}"} for item in items]

    lines = [f"[{left_name}]", *left.lines, f"[{right_name}]", *right.lines]
    return ViewResult("compare", f"{left.view} compared: {left_name} | {right_name}", left.intuition,
                      {"view": left.view, "left": {"name": left_name, **left.data},
                       "right": {"name": right_name, **right.data}},
                      draw, tables=tagged(left.tables, left_name) + tagged(right.tables, right_name),
                      heatmaps=tagged(left.heatmaps, left_name) + tagged(right.heatmaps, right_name),
                      lines=lines, notes=[f"{left_name}: {n}" for n in left.notes] +
                      [f"{right_name}: {n}" for n in right.notes])
