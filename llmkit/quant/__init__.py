"""Weight-only quantisation that is saved and reloaded: round-to-nearest, GPTQ and AWQ.

`QuantScheme` names the format (int8 per channel or group; int4 per group, symmetric or not) and
the method; `quantize_model` applies it to a decoder in place (llmkit/quant/apply.py), and
llmkit/quant/saved.py writes the result as safetensors with a config that `llmkit.load` reads back.
The layers themselves are llmkit/layers/quantized.py. See docs/quantization.md.
"""

from llmkit.quant.scheme import QuantScheme

__all__ = ["QuantScheme"]
