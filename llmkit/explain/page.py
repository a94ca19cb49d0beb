"""A view's three outputs: VIEW.json (its data), VIEW.png (its figure) and VIEW.html, one
self-contained page that works offline.

The page loads nothing: its data is inline JSON (with <, > and & escaped, so no text can close the
script element), its script and style are inline, the figure is a data: URI, and a
Content-Security-Policy forbids every other source. The policy allows the page's own script and style
by their SHA-256 hashes, not any inline code: were some text ever to slip out of its escaping, the
browser still would not run it. Model text reaches the page only through `textContent` and canvas
`fillText`, never as HTML. `llmkit serve` sends the same page, and the same policy as a header
(llmkit/serve/explain_routes.py).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmkit.explain.figures import figure_style
from llmkit.explain.page_script import SCRIPT
from llmkit.io.checkpoint import atomic_write_bytes

STYLE = """body{font-family:system-ui,"DejaVu Sans","WenQuanYi Zen Hei",sans-serif;margin:1.5em;max-width:1200px}
h1{font-size:1.4em}.intuition{background:#f4f6fa;border-left:4px solid #4C72B0;padding:.6em 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;font-size:.9em}
th{background:#eef}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
.map{margin:1em 0}.map select{margin:0 .5em}canvas{border:1px solid #ddd}.hover{font-family:monospace;min-height:1.2em}
.note{color:#555;font-size:.9em}"""


def csp_hash(code: str) -> str:
    """A CSP source that allows exactly this inline <script> or <style> text."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(code.encode("utf-8")).digest()).decode("ascii") + "'"


CSP = f"default-src 'none'; img-src data:; style-src {csp_hash(STYLE)}; script-src {csp_hash(SCRIPT)}"


@dataclass
class ViewResult:
    view: str
    title: str
    intuition: str  # the article's picture this view draws, in a sentence
    data: dict
    draw: Callable[[object], object] | None = None  # pyplot → a Figure
    tables: list[dict] = field(default_factory=list)  # {"title", "columns", "rows"}
    heatmaps: list[dict] = field(default_factory=list)  # {"title", "rows", "cols", "maps": [{"name", "values"}]}
    lines: list[str] = field(default_factory=list)  # what the command prints
    notes: list[str] = field(default_factory=list)


def rounded(value):
    """JSON-ready: floats to 6 significant digits (the data stays readable and small), inf as null."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def render_png(result: ViewResult) -> bytes | None:
    if result.draw is None:
        return None
    with figure_style() as plt:
        fig = result.draw(plt)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
    return buffer.getvalue()


def page_json(payload: dict) -> str:
    """JSON that is safe inside <script>: no text in it can end the element or open a comment."""
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_html(result: ViewResult, png: bytes | None) -> str:
    payload = rounded({"view": result.view, "title": result.title, "intuition": result.intuition,
                       "tables": result.tables, "heatmaps": result.heatmaps, "notes": result.notes})
    image = (f'<img alt="{html.escape(result.view)} figure" src="data:image/png;base64,'
             f'{base64.b64encode(png).decode("ascii")}">' if png else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmkit explain {html.escape(result.view)}</title><style>{STYLE}</style></head>
<body><h1 id="title"></h1><p class="intuition" id="intuition"></p>
<div id="maps"></div>{image}<div id="tables"></div><div id="notes"></div>
<script id="data" type="application/json">{page_json(payload)}</script>
<script>{SCRIPT}</script></body></html>
"""


def json_document(result: ViewResult) -> bytes:
    """VIEW.json's bytes: the view's name, title, data and notes."""
    document = rounded({"view": result.view, "title": result.title, "data": result.data, "notes": result.notes})
    return json.dumps(document, ensure_ascii=False, indent=1, allow_nan=False).encode("utf-8")


def write_view(result: ViewResult, out_dir: str | Path) -> dict[str, Path]:
    """Write VIEW.json, VIEW.png (when the view draws one) and VIEW.html into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    written["json"] = out / f"{result.view}.json"
    atomic_write_bytes(written["json"], json_document(result))
    png = render_png(result)
    if png is not None:
        written["png"] = out / f"{result.view}.png"
        atomic_write_bytes(written["png"], png)
    written["html"] = out / f"{result.view}.html"
    atomic_write_bytes(written["html"], render_html(result, png).encode("utf-8"))
    return written
