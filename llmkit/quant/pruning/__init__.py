"""Pruning: magnitude, Wanda and SparseGPT, unstructured (per row, per layer or global), 2:4, or whole
attention heads and MLP neurons (the shapes shrink), saved as an ordinary model.

`PruneScheme` (scheme.py) names what to do; `prune_model` (apply.py) does it, one transformer block at
a time on the calibration set that GPTQ and AWQ use (llmkit/quant/calibrate.py); masks.py chooses
weights, sparsegpt.py runs GPTQ's error-feedback sweep with zeros, structured.py removes heads and
neurons, saved.py writes the result, recovery.py fine-tunes it with the zeros held. See
docs/quantization.md, "Pruning".
"""

from llmkit.quant.pruning.scheme import PruneScheme

__all__ = ["PruneScheme"]
