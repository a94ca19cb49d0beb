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
def lens_logits(subject: Subject) -> tuple[list[Tensor], Tensor]:
    """Per layer (embeddings first), the (T, vocab) logits read out there; and the model's own logits."""
    blocks, head = readout(subject.model)
    seen: list[Tensor] = []
    first = next(iter(blocks))
    # forward hooks only for this one forward; a shared block (ALBERT) fires once per layer
    hooks = [first.register_forward_pre_hook(lambda module, args: seen.append(args[0]) if not seen else None)]
    hooks += [b.register_forward_hook(lambda module, args, out: seen.append(out)) for b in dict.fromkeys(blocks)]
    try:
        logits = subject.logits()
    finally:
        for hook in hooks:
            hook.remove()
    return [head(h)[0].float() for h in seen], logits


def logit_lens_view(subject: Subject, *, top: int = 5) -> ViewResult:
    subject.require_logits("logit-lens")
    tok = subject.lm.tokenizer
    layers, final = lens_logits(subject)
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
    return ViewResult("logit-lens", f"Logit lens: {subject.name}",
                      "Each layer refines a guess at the next token: read the residual stream through the "
                      "final norm and the LM head after every layer (预测下一个词).", data, draw,
                      tables=tables, heatmaps=heatmaps, lines=lines)
