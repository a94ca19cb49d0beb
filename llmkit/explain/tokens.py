"""The tokens view: how the text becomes byte-level BPE pieces and ids, CJK shown as characters."""

from __future__ import annotations

from llmkit.explain.page import ViewResult
from llmkit.explain.pieces import is_byte_level
from llmkit.explain.subject import Subject

PER_ROW = 12  # token boxes per row of the figure


def tokens_view(subject: Subject) -> ViewResult:
    text, pieces, tok = subject.text, subject.pieces, subject.lm.tokenizer
    n_bytes = len(text.encode("utf-8"))
    n_text = sum(not p.special for p in pieces)
    rebuild = ("the tokens' bytes rebuild the text exactly" if subject.exact else
               "this tokenizer is not byte-level: tokens are labelled by the character offsets it reports")
    data = {"model": subject.name, "text": text, "ids": subject.ids, "pieces": [p.to_dict() for p in pieces],
            "byte_level": is_byte_level(tok), "rebuilds_text": subject.exact, "characters": len(text),
            "bytes": n_bytes, "tokens": len(pieces), "text_tokens": n_text}
    rows = [[i, p.id, p.label, p.token, p.hex or "", "special" if p.special else
             ("part of a character" if "…" in p.label else "")] for i, p in enumerate(pieces)]
    lines = [f"{len(text)} characters, {n_bytes} UTF-8 bytes → {len(pieces)} tokens "
             f"({n_bytes / max(n_text, 1):.2f} bytes per text token); {rebuild}",
             "  " + " | ".join(f"{p.label}={p.id}" for p in pieces)]

    def draw(plt):
        n_rows = (len(pieces) + PER_ROW - 1) // PER_ROW
        fig, ax = plt.subplots(figsize=(min(len(pieces), PER_ROW) * 1.05 + 0.6, 1.5 * n_rows + 0.7))
        for i, p in enumerate(pieces):
            x, y = i % PER_ROW, -(i // PER_ROW) * 1.5
            colour = "#dddddd" if p.special else ("#f6d7a7" if "…" in p.label else ("#cfe0f5", "#d9f0d3")[i % 2])
            ax.add_patch(plt.Rectangle((x + 0.04, y), 0.92, 1.0, color=colour))
            ax.text(x + 0.5, y + 0.62, p.label, ha="center", va="center", fontsize=12 if len(p.label) < 6 else 8)
            ax.text(x + 0.5, y + 0.2, str(p.id), ha="center", va="center", fontsize=7, color="#444")
        ax.set_xlim(0, min(len(pieces), PER_ROW))
        ax.set_ylim(-(n_rows - 1) * 1.5 - 0.1, 1.1)
        ax.axis("off")
        ax.set_title(f"{subject.name}: {len(text)} characters → {len(pieces)} tokens "
                     "(orange: a token holding part of a character)", fontsize=9)
        return fig

    return ViewResult("tokens", f"Tokens: {subject.name}",
                      "Text becomes byte-level BPE tokens; a Chinese character is 3 UTF-8 bytes and may be "
                      "split between tokens (文字 → 字节 → 词元).", data, draw,
                      tables=[{"title": "tokens", "columns": ["#", "id", "text", "vocabulary spelling", "bytes",
                                                               "note"], "rows": rows}],
                      lines=lines, notes=[rebuild])
