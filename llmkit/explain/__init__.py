"""`llmkit explain`: the article's intuitions as pictures, drawn from the code that trains and serves.

Each view (one file each) takes a Subject (a loaded model and a text) and returns a ViewResult, which
page.write_view turns into VIEW.json, VIEW.png and a self-contained VIEW.html. Attention is recorded
by the model's own reference kernel through per-layer probes (recording.py); nothing runs when no
view is recording.
"""

from __future__ import annotations

VIEWS = ("tokens", "attention", "knockout", "sampling", "logit-lens", "cache", "positions", "compare")


def run_view(name: str, subject, **options):
    """The ViewResult of view `name` on `subject`; `options` are the view's own keywords."""
    if name == "tokens":
        from llmkit.explain.tokens import tokens_view

        return tokens_view(subject)
    if name == "attention":
        from llmkit.explain.attention import attention_view

        return attention_view(subject, **options)
    if name == "knockout":
        from llmkit.explain.knockout import knockout_view

        return knockout_view(subject, **options)
    if name == "sampling":
        from llmkit.explain.sampling import sampling_view

        return sampling_view(subject, **options)
    if name == "logit-lens":
        from llmkit.explain.logit_lens import logit_lens_view

        return logit_lens_view(subject, **options)
    if name == "cache":
        from llmkit.explain.cache import cache_view

        return cache_view(subject, **options)
    if name == "positions":
        from llmkit.explain.positions import positions_view

        return positions_view(subject, **options)
    raise ValueError(f"unknown view {name!r}")
