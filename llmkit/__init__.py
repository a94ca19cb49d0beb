"""llmkit: a complete large-language-model system in one small, readable PyTorch codebase."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a model directory or checkpoint: see `llmkit.api.load`."""
    from llmkit.api import load as _load

    return _load(path, **kwargs)
