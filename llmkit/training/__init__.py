"""The one training loop, its configuration and its objectives."""
