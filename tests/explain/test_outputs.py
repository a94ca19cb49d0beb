"""What the views write: JSON, a PNG whose Chinese labels are real glyphs (not tofu boxes), and an
HTML page that loads nothing from the network and, in headless Chromium, draws the heatmap."""

from __future__ import annotations

import io
import json
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from explain_helpers import tiny_lm
from llmkit.explain import VIEWS, run_view
from llmkit.explain.figures import cjk_font, figure_style
from llmkit.explain.page import write_view
from llmkit.explain.subject import Subject

CHROMIUM = "/usr/bin/chromium"
HOSTILE = "猫坐在</script><script>alert(1)</script><img src=x onerror=alert(2)>垫子上"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    s = Subject.create(tiny_lm(), "猫坐在垫子上")
    written = {view: write_view(run_view(view, s), out) for view in VIEWS if view != "compare"}
    return out, written


def render_text(text: str, families: list[str] | None) -> np.ndarray:
    """`text` drawn alone at 40 pt, as grey levels; families None → the views' own style."""
    from llmkit.plots import pyplot

    def draw(plt):
        fig = plt.figure(figsize=(1.2, 1.0), dpi=50)
        fig.text(0.5, 0.5, text, fontsize=40, ha="center", va="center")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        return plt.imread(io.BytesIO(buffer.getvalue()), format="png")[..., :3].mean(-1)

    if families is None:
        with figure_style() as plt:
            return draw(plt)
    plt = pyplot()
    with plt.rc_context({"font.family": families}):
        return draw(plt)


def test_pngs_render_cjk_glyphs_not_tofu():
    name, why = cjk_font()
    if name is None:
        pytest.skip(why)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # matplotlib warns "Glyph … missing from font(s)" for tofu
        styled = render_text("猫", None)
    known = render_text("猫", [name])  # the glyph from the CJK font itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tofu = render_text("猫", ["DejaVu Sans"])  # DejaVu has no 猫: its missing-glyph box
    # the fallback font may sit a pixel or two off the baseline: compare the inked boxes, not positions
    # measured with WenQuanYi Zen Hei: 0.12 against its own glyph (anti-aliasing at another sub-pixel
    # offset), 0.54 against the box; a wide margin either way
    near, box = ink_difference(styled, known), ink_difference(styled, tofu)
    assert near < 0.25 and box > 2 * near


def ink_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of the two images' inked boxes (dark pixels), padded to one size."""
    def crop(image):
        rows, cols = np.nonzero(image < 0.5)
        return image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]

    a, b = crop(a), crop(b)
    shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    pad = [np.pad(x, ((0, shape[0] - x.shape[0]), (0, shape[1] - x.shape[1])), constant_values=1.0) for x in (a, b)]
    return float(np.abs(pad[0] - pad[1]).mean())


def test_outputs_are_written_and_json_parses(pages):
    out, written = pages
    for view, paths in written.items():
        assert set(paths) == {"json", "png", "html"}, view
        document = json.loads(paths["json"].read_text(encoding="utf-8"))
        assert document["view"] == view and document["data"]
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.scripts, self.csp, self._in_script = [], [], None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href", "action", "data", "poster", "srcset"):
            if key in attrs:
                self.urls.append(attrs[key])
        if tag == "meta" and attrs.get("http-equiv", "").lower() == "content-security-policy":
            self.csp = attrs["content"]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def test_html_loads_nothing_from_the_network(pages, tmp_path):
    hostile = write_view(run_view("attention", Subject.create(tiny_lm(), HOSTILE)), tmp_path)["html"]
    for path in [p["html"] for p in pages[1].values()] + [hostile]:
        page = Sources()
        page.feed(path.read_text(encoding="utf-8"))
        assert page.csp and "default-src 'none'" in page.csp
        assert all(url.startswith("data:") for url in page.urls), page.urls  # only the inline figure
        code = "\n".join(page.scripts)
        assert not re.search(r"https?://|\bfetch\s*\(|XMLHttpRequest|\bimport\s*\(|WebSocket|EventSource|"
                             r"innerHTML|outerHTML|document\.write", code)
    text = hostile.read_text(encoding="utf-8")
    assert "<img src=x" not in text and text.count("</script>") == 2  # model text cannot close the data script


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (make test installs it via apt)")
def test_chromium_shows_the_attention_heatmap(pages):
    sync_api = pytest.importorskip("playwright.sync_api")
    page_path = pages[1]["attention"]["html"]
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            canvas = page.locator("canvas.heatmap").first
            shot = canvas.screenshot()
            title = page.locator("#title").text_content()
        finally:
            browser.close()
    assert not errors, errors
    assert "Attention" in title
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    from llmkit.plots import pyplot

    pixels = pyplot().imread(io.BytesIO(shot), format="png")[..., :3]
    blue = (pixels[..., 2] > pixels[..., 0] + 0.03)  # cells run from white to dark blue; labels are grey
    assert blue.mean() > 0.15, "no heatmap cells drawn"  # the causal triangle fills ~40% of the canvas
    shades = np.unique((pixels[blue] * 20).round(), axis=0)
    assert len(shades) > 5  # many weights, many shades: a map, not a blank or one-colour block
