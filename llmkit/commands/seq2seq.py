"""Subcommands of this area (registered by llmkit.cli.build_parser)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `llmkit` parser (none yet)."""
