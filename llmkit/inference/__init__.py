"""Sampling, the KV cache and the autoregressive generation loop."""
