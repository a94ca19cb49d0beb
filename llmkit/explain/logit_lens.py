"""The logit lens (nostalgebraist 2020): the next-token distribution read out after every layer, by
applying the model's own final norm and LM head to the residual stream there. Layer "embeddings" is
the input to the first block; the last row is the model's own output, bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from llmkit.explain.figures import heatmap
from llmkit.explain.page import ViewResult
from llmkit.explain.pieces import id_label
from llmkit.explain.subject import Subject


def readout(model) -> tuple[object, Callable[[Tensor], Tensor]]:
    """(the blocks whose outputs are read, hidden → logits) for each family, from the model's own modules."""
    cfg = model.cfg
    if cfg.arch == "encoder-decoder":
        return model.decoder.blocks, lambda h: model.logits(model.decoder.final_norm(h))
    if cfg.arch == "encoder":
        return model.stack.blocks, lambda h: model.lm_head(model.head_transform(model.stack.final_norm(h)))

    def head(h: Tensor) -> Tensor:
        logits = model.lm_head(model.stack.final_norm(h))
        return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap) if cfg.logit_softcap else logits

    return model.stack.blocks, head


@torch.inference_mode()
def lens_logits(subject: Subject) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """Per layer (embeddings first), the (T, vocab) logits read out there; the model's own logits; and
    the (1, T, d) residual stream at each read-out point."""
    from llmkit.explain.tuned_lens import capturing

    _, head = readout(subject.model)
    with capturing(subject.model) as seen:  # forward hooks for this one forward only
        logits = subject.logits()
    return [head(h)[0].float() for h in seen], logits, seen


def logit_lens_view(subject: Subject, *, top: int = 5, tuned=None) -> ViewResult:
    """`tuned`: a TunedLensFit (llmkit/explain/tuned_lens.py) to read out beside the plain lens."""
    subject.require_logits("logit-lens")
    tok = subject.lm.tokenizer
    layers, final, stream = lens_logits(subject)
    ids, pieces = subject.predicted_side()
    names = ["embeddings"] + [f"layer {i}" for i in range(len(layers) - 1)]
    encoder = subject.arch == "encoder"  # masked LM: each position predicts itself, not the next token
    actual = [ids[t] if encoder else (ids[t + 1] if t + 1 < len(ids) else None) for t in range(len(ids))]
    probs = [l.softmax(-1) for l in layers]
    top1 = [[id_label(tok, int(i)) for i in p.argmax(-1)] for p in probs]
    p_actual = [[float(p[t, a]) if a is not None else None for t, a in enumerate(actual)] for p in probs]
    last = probs[-1].shape[0] - 1
    final_top = [[(id_label(tok, int(i)), float(p[last, i])) for i in p[last].topk(top).indices] for p in probs]
    same = bool(torch.equal(layers[-1], final))
    cols = [p.label for p in pieces]
    data = {"model": subject.name, "text": subject.text, "layers": names, "positions": cols,
            "next_ids": actual, "top1": top1, "p_next": p_actual, "last_position_top": final_top,
            "last_layer_equals_logits": same, "max_abs_difference_last_layer": float((layers[-1] - final).abs().max())}
    agree = [next((names[k] for k in range(len(names)) if all(top1[j][t] == top1[-1][t] for j in range(k, len(names)))),
                  names[-1]) for t in range(len(cols))]
    lines = [f"{len(names) - 1} layers; the last layer's read-out equals the model's logits: {same}",
             f"last position ({cols[-1]}): top-1 by layer: " + " ".join(f"{row[-1]}" for row in top1)]
    lines += [f"  {cols[t]}: settles on {top1[-1][t]!r} from {agree[t]}" for t in range(len(cols))]

    def draw(plt):
        grid = [[v if v is not None else float("nan") for v in row] for row in p_actual]
        fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.32 * len(names) + 1.6))
        image = heatmap(ax, grid, names, [f"{c}→{id_label(tok, a) if a is not None else '?'}" for c, a in
                                         zip(cols, actual)], vmax=1.0, cmap="viridis")
        for j, row in enumerate(top1):
            for t, label in enumerate(row):
                ax.text(t, j, label, ha="center", va="center", fontsize=7,
                        color="white" if (grid[j][t] == grid[j][t] and grid[j][t] < 0.5) else "black")
        fig.colorbar(image, ax=ax, label="p(next token)" if not encoder else "p(token itself)")
        ax.set_title(f"{subject.name}: logit lens (text: top-1 read out after each layer)", fontsize=9)
        return fig

    heatmaps = [{"title": "p(actual next token) after each layer", "rows": names, "cols": cols, "vmax": 1.0,
                 "maps": [{"name": "p(next)", "values": p_actual}]}]
    tables = [{"title": f"top-{top} at the last position ({cols[-1]}), by layer",
               "columns": ["layer", *[f"#{i + 1}" for i in range(top)]],
               "rows": [[n, *[f"{t} {p:.3f}" for t, p in row]] for n, row in zip(names, final_top)]}]
    result = ViewResult("logit-lens", f"Logit lens: {subject.name}",
                        "Each layer refines a guess at the next token: read the residual stream through the "
                        "final norm and the LM head after every layer (预测下一个词).", data, draw,
                        tables=tables, heatmaps=heatmaps, lines=lines)
    if tuned is not None:
        add_tuned_lens(result, subject, tuned, stream, final, names, actual)
    return result


@torch.inference_mode()
def add_tuned_lens(result: ViewResult, subject: Subject, fit, stream: list[Tensor], final: Tensor,
                   names: list[str], actual: list[int | None]) -> None:
    """The tuned lens's read-outs beside the plain ones: p(next) per layer, and the KL of each lens to the
    model's own distribution on this text and on the held-out tokens."""
    from llmkit.explain.tuned_lens import kl_to_final

    tok = subject.lm.tokenizer
    _, head = readout(subject.model)
    tuned = [head(fit.lens(i, h))[0].float() for i, h in enumerate(stream)]
    kl_plain = [float(kl_to_final(final, head(h)[0])) for h in stream]
    kl_tuned = [float(kl_to_final(final, l)) for l in tuned]
    probs = [l.softmax(-1) for l in tuned]
    p_next = [[float(p[t, a]) if a is not None else None for t, a in enumerate(actual)] for p in probs]
    result.data["tuned_lens"] = {
        "steps": fit.steps, "train_tokens": fit.train_tokens, "data": fit.data, "checkpoint": str(fit.directory),
        "held_out_tokens": fit.held_out_tokens, "top1": [[id_label(tok, int(i)) for i in p.argmax(-1)] for p in probs],
        "p_next": p_next, "kl_logit_lens": kl_plain, "kl_tuned_lens": kl_tuned,
        "held_out_kl_logit_lens": fit.held_out_kl_plain, "held_out_kl_tuned_lens": fit.held_out_kl_tuned}
    result.heatmaps[0]["maps"].append({"name": "p(next), tuned lens", "values": p_next})
    result.tables.append({"title": "KL(model ‖ read-out) in nats by layer: logit lens and tuned lens, on this "
                                   f"text and on {fit.held_out_tokens} held-out tokens",
                          "columns": ["layer", "logit lens", "tuned lens", "held out: logit", "held out: tuned"],
                          "rows": [[n, a, b, c, d] for n, a, b, c, d in zip(
                              names, kl_plain, kl_tuned, fit.held_out_kl_plain, fit.held_out_kl_tuned)]})
    result.lines.append(f"tuned lens ({fit.steps} steps on {fit.train_tokens:,} tokens of {fit.data}; "
                        f"{fit.directory}): mean KL to the model's distribution, logit lens → tuned lens: "
                        f"this text {sum(kl_plain[:-1]) / max(len(kl_plain) - 1, 1):.3f} → "
                        f"{sum(kl_tuned[:-1]) / max(len(kl_tuned) - 1, 1):.3f}, held out "
                        f"{sum(fit.held_out_kl_plain[:-1]) / max(len(kl_plain) - 1, 1):.3f} → "
                        f"{sum(fit.held_out_kl_tuned[:-1]) / max(len(kl_tuned) - 1, 1):.3f} nats (before the last layer)")
    result.notes.append("Tuned lens (Belrose et al. 2023): one affine map per layer, trained with llmkit's training "
                        "loop to make the read-out match the model's own distribution; it starts as the identity "
                        "(the logit lens); the last layer, the model's own output, is read without one.")
