"""llmkit: a complete large-language-model system in one small, readable PyTorch codebase.

The public surface is `llmkit.load(path)`; everything else lives in the submodules.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch

    from llmkit.api import LanguageModel


def load(path: str | Path, *, device: "str | torch.device" = "cpu",
         dtype: "str | torch.dtype | None" = None, quantize: str | None = None) -> "LanguageModel":
    """Load a model and its tokenizer; device "auto"|"cpu"|"cuda"|…, dtype None|"auto"|"fp32"|"bf16"|"fp16",
    quantize None|"int4" (see `llmkit.api.load`; `lm.runtime.describe()` says what was chosen and why)."""
    from llmkit.api import load as _load  # deferred: `import llmkit` stays cheap for the CLI

    return _load(path, device=device, dtype=dtype, quantize=quantize)
