"""matplotlib for the views: a font that has CJK glyphs (else Chinese labels draw as empty boxes,
"tofu"), found once through fontconfig and matplotlib's font manager, and a heatmap helper.

Latin text keeps DejaVu Sans; matplotlib (≥ 3.6) falls back glyph by glyph along `font.family`, so
a CJK font later in the list draws only what DejaVu lacks.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Sequence

from llmkit.plots import pyplot

PROBE_CHAR = "猫"
CJK_NAME_HINTS = ("wqy", "cjk", "han", "noto sans sc", "noto sans tc", "droid sans fallback", "uming", "ukai",
                  "source han", "simhei", "simsun", "pingfang", "hiragino", "msyh")


def _candidate_files() -> list[str]:
    from matplotlib import font_manager

    files = []
    if shutil.which("fc-list"):  # fontconfig knows which fonts cover Chinese
        try:
            out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
            files += [line.split(":")[0].strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    known = [f.fname for f in font_manager.fontManager.ttflist]
    files += sorted(known, key=lambda f: not any(h in f.lower() for h in CJK_NAME_HINTS))
    return list(dict.fromkeys(files))


@lru_cache(maxsize=1)
def cjk_font() -> tuple[str | None, str]:
    """(family name of a font with CJK glyphs, "") or (None, why none was found)."""
    from matplotlib import font_manager, ft2font

    for path in _candidate_files():
        try:
            if not ft2font.FT2Font(path).get_char_index(ord(PROBE_CHAR)):
                continue
            font_manager.fontManager.addfont(path)
            return font_manager.FontProperties(fname=path).get_name(), ""
        except (OSError, RuntimeError, ValueError):
            continue
    return None, ("no font with CJK glyphs was found (fontconfig, matplotlib's font manager): Chinese labels "
                  "will draw as boxes; install one, e.g. apt-get install fonts-wqy-zenhei")


@contextmanager
def figure_style() -> Iterator[object]:
    """pyplot with the CJK fallback font, for drawing and saving a figure."""
    plt = pyplot()
    name, _ = cjk_font()
    families = ["DejaVu Sans"] + ([name] if name else [])
    # a CJK font of weight 500 makes matplotlib log "Failed to find font weight normal" per label
    log = logging.getLogger("matplotlib.font_manager")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with plt.rc_context({"font.family": families, "axes.unicode_minus": False}):
            yield plt
    finally:
        log.setLevel(level)


def heatmap(ax, values, rows: Sequence[str], cols: Sequence[str], *, title: str = "", vmax: float | None = None,
            cmap: str = "Blues", fontsize: int = 8) -> object:
    """An annotated-axes heatmap of a (rows, cols) array; returns the image for a colorbar."""
    image = ax.imshow(values, cmap=cmap, vmin=0.0 if vmax is not None else None, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90 if max(map(len, cols), default=0) * len(cols) > 24 else 0,
                  fontsize=fontsize)
    ax.set_yticks(range(len(rows)), rows, fontsize=fontsize)
    if title:
        ax.set_title(title, fontsize=fontsize + 1)
    return image
