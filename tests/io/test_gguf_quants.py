"""The vectorised Q8_0/Q4_0/Q4_1/Q5_0 dequantisers equal the `gguf` package's reference, bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from llmkit.io.gguf_quants import dequantize_simple


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 4, 64)])
def test_simple_formats_match_gguf_reference(qtype, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10, size=shape[:-1] + (1,))).astype(np.float32)
    raw = quantize(x, qtype)
    ours = dequantize_simple(raw, qtype)
    reference = torch.from_numpy(dequantize(raw, qtype).astype(np.float32))
    assert ours.shape == reference.shape == shape
    assert torch.equal(ours, reference)
    assert (ours - torch.from_numpy(x)).abs().max() > 0  # it really was quantised (lossy)


def test_other_types_fall_back():
    raw = quantize(np.ones((2, 256), dtype=np.float32), QT.Q8_0)
    assert dequantize_simple(raw, QT.Q5_K) is None
