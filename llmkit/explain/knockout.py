"""The knockout view: remove attention edges or heads and measure the change in the log-probability
of a predicted token. Attention weights say where a head looks; knocking it out says whether the
prediction needed it ("weights are not explanations, effects are").

By default, on the article's sentence: the heads that link 坐 with 猫 and 垫子 most (the attention
view's ranking) are removed, together and one by one, and the view reports what that does to the
prediction of 垫子 after 猫坐在. A control removes an edge whose weight is exactly 0 (a future
token): the prediction must not move at all.
"""

from __future__ import annotations

import torch

from llmkit.errors import ConfigError
from llmkit.explain.attention import focus_words, rank_heads, record, site_sides
from llmkit.explain.page import ViewResult
from llmkit.explain.pieces import id_label, positions_of
from llmkit.explain.recording import Knockout, recording
from llmkit.explain.subject import FOCUS, Subject


def target_positions(subject: Subject, predict: str | None) -> tuple[list[int], str]:
    """The positions of the tokens to predict — every token of `predict` (default: the last word of the
    article's sentence), else the last token — and the word. A word's log-probability is the sum over
    its tokens (the chain rule), so a character split over byte tokens counts whole."""
    ids, pieces = subject.predicted_side()
    text = subject.target if subject.arch == "encoder-decoder" else subject.text
    word = predict or (FOCUS[subject.text][1][-1] if subject.text in FOCUS else None)
    if word is None:
        return [len(ids) - 1], pieces[-1].label
    found = positions_of(pieces, text, word)
    if not found:
        raise ConfigError(f"--predict {word!r} is not in the text {text!r}")
    if found[0] == 0:
        raise ConfigError(f"--predict {word!r} is the first token: nothing comes before it to predict it from")
    return found, word


def knockout_view(subject: Subject, *, heads: list[tuple[int, int | None]] | None = None,
                  edges: list[tuple[str, str]] | None = None, predict: str | None = None,
                  query: str | None = None, keys: list[str] | None = None, top: int = 3,
                  every_head: bool = False) -> ViewResult:
    subject.require_attention("knockout")
    if subject.arch == "encoder":
        raise ConfigError(f"knockout: {subject.name} is an encoder, which predicts masked tokens rather than the "
                          "next one; the view measures a next-token log-probability (use a decoder or T5/BART)")
    site = "decoder.cross" if subject.arch == "encoder-decoder" else "decoder.self"
    ids, pieces = subject.predicted_side()
    positions, word = target_positions(subject, predict)
    targets, rows = torch.tensor([ids[p] for p in positions]), torch.tensor([p - 1 for p in positions])
    tok = subject.lm.tokenizer
    maps, logits = record(subject)
    n_layers, n_heads = len(maps.layers(site)), maps.layers(site)[0].shape[0]

    def word_logp(out: torch.Tensor) -> float:
        return float(out[rows].log_softmax(-1).gather(-1, targets[:, None]).sum())

    base = word_logp(logits)

    def effect(knockout: Knockout) -> dict:
        _, knocked = record(subject, knockout)
        logp = word_logp(knocked)
        return {"logp": logp, "delta": logp - base, "top": id_label(tok, int(knocked[rows[0]].argmax()))}

    query, keys = focus_words(subject, query, keys)
    chosen = heads
    if chosen is None and query and keys:
        chosen = [(s["layer"], s["head"]) for s in rank_heads(subject, maps, site, query, keys)["ranking"][:top]]
    chosen = [(l, h) for l, head in (chosen or []) for h in (range(n_heads) if head is None else [head])]
    for l, h in chosen:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise ConfigError(f"--head {l}.{h}: the model has {n_layers} layers of {n_heads} heads")
    conditions = []
    if chosen:
        names = ", ".join(f"L{l}.H{h}" for l, h in chosen)
        conditions.append((f"heads {names} together", effect(Knockout(site, heads=set(chosen)))))
        if len(chosen) > 1:
            conditions += [(f"head L{l}.H{h} alone", effect(Knockout(site, heads={(l, h)}))) for l, h in chosen]
        layer = chosen[0][0]
        conditions.append((f"all {n_heads} heads of layer {layer}",
                           effect(Knockout(site, heads={(layer, h) for h in range(n_heads)}))))
    (row_pieces, row_text), (col_pieces, col_text) = site_sides(subject, site)
    for a, b in edges or []:
        q, k = positions_of(row_pieces, row_text, a), positions_of(col_pieces, col_text, b)
        if not q or not k:
            raise ConfigError(f"--edge {a}:{b}: both words must be in the text")
        spec = [(None, None, q[-1], j) for j in k]
        conditions.append((f"edge {a}→{b} in every layer and head", effect(Knockout(site, edges=spec))))
    if site == "decoder.self" and len(ids) > 1:  # control: a future key has weight exactly 0
        conditions.append((f"control: edge {pieces[0].label}→{pieces[1].label} (a future token, weight 0)",
                           effect(Knockout(site, edges=[(None, None, 0, 1)]))))
    grid = None
    if every_head:  # one forward per layer, its heads knocked out one per row of a batch
        grid = []
        for l in range(n_layers):
            with recording(subject.model, Knockout(site, rows=[{(l, h)} for h in range(n_heads)])):
                batch = subject.logits(copies=n_heads)
            grid.append([word_logp(batch[h]) - base for h in range(n_heads)])
    return _result(subject, pieces, positions, word, base, logits[rows[0]], conditions, grid, site)


def _result(subject, pieces, positions, label, base, logits, conditions, grid, site) -> ViewResult:
    tok = subject.lm.tokenizer
    text = subject.target if subject.arch == "encoder-decoder" else subject.text
    first = pieces[positions[0]]
    context = text[:first.start] if first.start >= 0 else "".join(p.label for p in pieces[:positions[0]])
    probs = logits.softmax(-1)
    top = [(id_label(tok, int(i)), float(probs[i])) for i in probs.topk(5).indices]
    lines = [f"log p({label} | {context}) = {base:.3f} (p = {float(torch.tensor(base).exp()):.4f}, "
             f"{len(positions)} token(s)); the model's top guesses for its first token: "
             + ", ".join(f"{t} {p:.3f}" for t, p in top)]
    lines += [f"  {name}: log p {c['logp']:.3f}  Δ {c['delta']:+.3f}  (top now {c['top']})" for name, c in conditions]
    data = {"model": subject.name, "text": subject.text, "site": site, "positions": positions,
            "target_ids": [pieces[p].id for p in positions], "target": label, "context": context,
            "baseline_logp": base, "baseline_top": top,
            "conditions": [{"name": n, **c} for n, c in conditions], "every_head_delta": grid}
    if grid is not None:
        flat = sorted(((d, l, h) for l, row in enumerate(grid) for h, d in enumerate(row)), key=lambda x: x[0])
        lines.append("every head alone, largest drops: " + ", ".join(f"L{l}.H{h} {d:+.3f}" for d, l, h in flat[:5]))

    def draw(plt):
        panels = 2 if grid is not None else 1
        fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 0.45 * max(len(conditions), 4) + 1.4), squeeze=False)
        ax = axes[0, 0]
        names = [n for n, _ in conditions][::-1]
        deltas = [c["delta"] for _, c in conditions][::-1]
        ax.barh(range(len(names)), deltas, color=["#C44E52" if d < 0 else "#55A868" for d in deltas])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.axvline(0, color="#333", linewidth=0.8)
        ax.set_xlabel(f"Δ log p({label}) after {context}")
        ax.set_title(f"{subject.name}: knockouts (baseline log p = {base:.2f})", fontsize=9)
        if grid is not None:
            bound = max(abs(d) for row in grid for d in row) or 1.0
            image = axes[0, 1].imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
            axes[0, 1].set_xlabel("head")
            axes[0, 1].set_ylabel("layer")
            axes[0, 1].set_title(f"each head knocked out alone: Δ log p({label})", fontsize=9)
            fig.colorbar(image, ax=axes[0, 1])
        return fig

    tables = [{"title": f"knockouts: Δ log p of {label!r} after {context!r} (baseline {base:.4f})",
               "columns": ["knocked out", "log p", "Δ log p", "top guess for its first token"],
               "rows": [[n, c["logp"], c["delta"], c["top"]] for n, c in conditions]}]
    heatmaps = []
    if grid is not None:
        heatmaps.append({"title": "drop in log p when one head is knocked out (−Δ, clipped at 0)",
                         "rows": [f"layer {l}" for l in range(len(grid))], "cols": [f"h{h}" for h in range(len(grid[0]))],
                         "maps": [{"name": "−Δ log p", "values": [[max(-d, 0.0) for d in row] for row in grid]}]})
    return ViewResult("knockout", f"Knockout: {subject.name}",
                      "Weights are not explanations, effects are: remove a head or an edge and watch the "
                      "prediction (垫子 after 猫坐在) change.", data, draw, tables=tables, heatmaps=heatmaps,
                      lines=lines)
