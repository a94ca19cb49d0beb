"""File formats and crash-safe on-disk protocols (checkpoints, atomic writes)."""
