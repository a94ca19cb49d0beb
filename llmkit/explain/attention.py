"""The attention view: per layer and head heatmaps for a sentence (encoder, decoder and cross
attention), heads ranked by how much one word attends to others, and the share of attention that
goes to the first token (the "attention sink", Xiao et al. 2023, arXiv 2309.17453).

A causal decoder cannot attend forwards: in 猫坐在垫子上, 坐 sees 猫 but not 垫子 (its weight is
exactly 0). For a word after the query the ranking reads the edge that exists, from that word back
to the query (垫子 → 坐), and says so.
"""

from __future__ import annotations

import torch

from llmkit.errors import ConfigError
from llmkit.explain.figures import heatmap
from llmkit.explain.page import ViewResult
from llmkit.explain.pieces import positions_of
from llmkit.explain.recording import Knockout, Recording, recording
from llmkit.explain.subject import FOCUS, Subject

INTUITION = ("当模型处理“猫坐在垫子上”这句话时，“坐”这个词需要关注“猫”（主语）和“垫子”（宾语）: when the model reads "
             "the sentence, 坐 (sit) should attend to 猫 (cat, the subject) and 垫子 (mat, the object).")
SITE_TITLES = {"decoder.self": "decoder self-attention", "encoder.self": "encoder self-attention",
               "decoder.cross": "cross-attention (decoder → encoder)"}


@torch.inference_mode()
def record(subject: Subject, knockout: Knockout | None = None) -> tuple[Recording, torch.Tensor | None]:
    """One forward on the reference kernel with probes: the maps, and the logits (None for a bare encoder)."""
    with recording(subject.model, knockout) as maps:
        return maps, subject.run()


def site_sides(subject: Subject, site: str) -> tuple[tuple[list, str], tuple[list, str]]:
    """(pieces, text) of a site's queries (rows) and of its keys (columns)."""
    source = (subject.pieces, subject.text)
    target = (subject.target_pieces, subject.target) if subject.arch == "encoder-decoder" else source
    return {"encoder.self": (source, source), "decoder.self": (target, target), "decoder.cross": (target, source)}[site]


def site_labels(subject: Subject, site: str) -> tuple[list[str], list[str]]:
    (rows, _), (cols, _) = site_sides(subject, site)
    return [p.label for p in rows], [p.label for p in cols]


def focus_words(subject: Subject, query: str | None, keys: list[str] | None) -> tuple[str | None, list[str]]:
    text = subject.text
    default_query, default_keys = FOCUS.get(text, (None, ()))
    return (query or default_query), list(keys or default_keys)


def rank_heads(subject: Subject, maps: Recording, site: str, query: str, keys: list[str]) -> dict:
    """Every head scored by the attention along the query's edges, best first."""
    (pieces_rows, row_text), (pieces_cols, col_text) = site_sides(subject, site)
    q_pos = positions_of(pieces_rows, row_text, query)
    if not q_pos:
        raise ConfigError(f"--query {query!r} is not in the text {row_text!r}")
    causal = site != "encoder.self" and site != "decoder.cross"
    edges, notes = [], []  # (label, query row, key columns)
    for key in keys:
        k_pos = positions_of(pieces_cols, col_text, key)
        if not k_pos:
            raise ConfigError(f"--keys: {key!r} is not in the text {col_text!r}")
        if k_pos[0] == 0 and len(k_pos) > 1 and site != "decoder.cross":
            k_pos = k_pos[1:]  # the first token also collects the attention sink: counted apart
            notes.append(f"{key} starts the text, and the first token collects attention whatever it is (the "
                         f"sink, its own column): {query}→{key} counts {key}'s other tokens")
        if causal and min(k_pos) > q_pos[-1]:  # the forward edge is masked: read the edge that exists
            edges.append((f"{key}→{query}", k_pos[-1], q_pos))
        else:
            edges.append((f"{query}→{key}", q_pos[-1], k_pos))
    scores = []
    for layer, weights in enumerate(maps.layers(site)):
        for head in range(weights.shape[0]):
            shares = [float(weights[head, row, columns].sum()) for _, row, columns in edges]
            scores.append({"layer": layer, "head": head, "edges": shares, "total": sum(shares),
                           "first_token": float(weights[head, q_pos[-1], 0])})
    scores.sort(key=lambda s: -s["total"])
    notes += [f"{label}: {query} comes before {label.split('→')[0]}, and a causal model cannot attend forwards "
             f"(that weight is exactly 0), so the edge read is {label}" for label, _, _ in edges
             if not label.startswith(query + "→")]
    return {"site": site, "query": query, "keys": keys, "edges": [e[0] for e in edges], "ranking": scores,
            "notes": notes}


def sink_shares(maps: Recording, site: str) -> list[list[float]]:
    """Per layer and head, the mean weight a query puts on the first key (queries after the first)."""
    out = []
    for weights in maps.layers(site):
        rows = weights[:, 1:, 0] if weights.shape[1] > 1 else weights[:, :, 0]
        out.append(rows.mean(-1).tolist())
    return out


def attention_view(subject: Subject, *, query: str | None = None, keys: list[str] | None = None,
                   top: int = 8) -> ViewResult:
    subject.require_attention("attention")
    maps, _ = record(subject)
    query, keys = focus_words(subject, query, keys)
    main = "decoder.cross" if subject.arch == "encoder-decoder" else maps.sites()[0]
    ranking = rank_heads(subject, maps, main, query, keys) if query and keys else None
    data = {"model": subject.name, "text": subject.text, "target": subject.target, "sites": {}, "ranking": ranking}
    heatmaps, tables, lines = [], [], []
    for site in maps.sites():
        rows, cols = site_labels(subject, site)
        layers = maps.layers(site)
        data["sites"][site] = {"rows": rows, "cols": cols, "weights": [w.tolist() for w in layers],
                               "first_token_share": sink_shares(maps, site)}
        heatmaps.append({"title": SITE_TITLES[site], "rows": rows, "cols": cols, "vmax": 1.0,
                         "maps": [{"name": f"layer {l} head {h}", "values": w[h].tolist()}
                                  for l, w in enumerate(layers) for h in range(w.shape[0])]
                         + [{"name": f"layer {l} mean of heads", "values": w.mean(0).tolist()}
                            for l, w in enumerate(layers)]})
        sink = sink_shares(maps, site)
        lines.append(f"{SITE_TITLES[site]}: {len(layers)} layers × {layers[0].shape[0]} heads; share of attention "
                     f"on the first token ({cols[0]}), mean over heads, by layer: "
                     + " ".join(f"{sum(s) / len(s):.2f}" for s in sink))
    notes = []
    if ranking:
        best = ranking["ranking"][:top]
        tables.append({"title": f"heads ranked by attention along {', '.join(ranking['edges'])}",
                       "columns": ["layer", "head", *ranking["edges"], "total", "→ first token"],
                       "rows": [[s["layer"], s["head"], *s["edges"], s["total"], s["first_token"]] for s in best]})
        lines.append(f"heads ranked by {' + '.join(ranking['edges'])} ({SITE_TITLES[main]}):")
        lines += [f"  layer {s['layer']:>2} head {s['head']:>2}: " + "  ".join(
            f"{e} {v:.3f}" for e, v in zip(ranking["edges"], s["edges"])) + f"  (first token {s['first_token']:.3f})"
            for s in best[:5]]
        notes += ranking["notes"]
    picks = ([(s["layer"], s["head"]) for s in ranking["ranking"][:top]] if ranking else
             [(len(maps.layers(main)) - 1, h) for h in range(min(top, maps.layers(main)[-1].shape[0]))])

    def draw(plt):
        rows, cols = site_labels(subject, main)
        n = len(picks)
        width = min(n, 4)
        fig, axes = plt.subplots((n + width - 1) // width, width, figsize=(3.2 * width, 3.0 * ((n + width - 1) // width)),
                                 squeeze=False)
        for ax, (layer, head) in zip(axes.flat, picks):
            heatmap(ax, maps.layers(main)[layer][head].numpy(), rows, cols, title=f"layer {layer} head {head}", vmax=1.0)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"{subject.name}: {SITE_TITLES[main]}" + (f", heads ranked by {', '.join(ranking['edges'])}"
                                                                if ranking else ", last layer"), fontsize=10)
        return fig

    return ViewResult("attention", f"Attention: {subject.name}", INTUITION, data, draw, tables=tables,
                      heatmaps=heatmaps, lines=lines, notes=notes)
