"""The `llmkit` command as the tests run it in a subprocess: the console script beside this interpreter
(what `make` installs into the venv), else `python -m llmkit.cli` (an environment without the script)."""

from __future__ import annotations

import sys
from pathlib import Path


def llmkit_cmd() -> list[str]:
    script = Path(sys.executable).with_name("llmkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmkit.cli"]
