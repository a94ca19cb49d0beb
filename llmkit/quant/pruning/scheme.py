"""The pruning scheme: what `llmkit prune` asks for and what a pruned model's config.json records
under "pruning" (with the sparsity measured on the weights afterwards)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from llmkit.errors import ConfigError

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4", "heads", "neurons")
SCOPES = ("row", "layer", "global")  # which weights an unstructured mask compares with each other
# Half the weights is the figure the Wanda and SparseGPT papers report; removing whole heads or
# neurons costs far more per weight removed, so their default is a quarter.
DEFAULT_SPARSITY = {"unstructured": 0.5, "2:4": 0.5, "heads": 0.25, "neurons": 0.25}


@dataclass(frozen=True)
class PruneScheme:
    method: str = "wanda"
    pattern: str = "unstructured"
    sparsity: float = 0.5  # the fraction removed: of each row's weights, each matrix's, all of them, or of the units
    scope: str = "row"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"unknown pruning pattern {self.pattern!r}; choose one of: {', '.join(PATTERNS)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown pruning scope {self.scope!r}; choose one of: {', '.join(SCOPES)}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or \
                not math.isfinite(self.sparsity) or not 0 < self.sparsity < 1:
            raise ConfigError(f"--sparsity must be a fraction between 0 and 1 (exclusive), got {self.sparsity!r}")
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ConfigError(f"--pattern 2:4 removes 2 of every 4 weights, 50 %; --sparsity {self.sparsity:g} "
                              "cannot apply (leave it out)")
        if self.scope != "row":
            if self.pattern != "unstructured":
                raise ConfigError(f"--scope {self.scope} is for --pattern unstructured; {self.pattern} fixes its own "
                                  "groups")
            if self.method == "sparsegpt":
                raise ConfigError("--scope: SparseGPT chooses its mask row by row as it updates the weights; "
                                  "only --scope row applies")
            if self.scope == "global" and self.method != "magnitude":
                raise ConfigError("--scope global compares weights across layers, which only |w| allows: "
                                  "use --method magnitude, or --scope row|layer")

    @classmethod
    def create(cls, method: str, pattern: str, sparsity: float | None, scope: str | None) -> "PruneScheme":
        """The command line's defaults: the pattern's usual sparsity, unstructured masks per row."""
        return cls(method, pattern, DEFAULT_SPARSITY.get(pattern, 0.5) if sparsity is None else sparsity,
                   scope or "row")

    @property
    def structured(self) -> bool:
        return self.pattern in ("heads", "neurons")

    @property
    def calibrated(self) -> bool:
        return self.method != "magnitude"

    def describe(self) -> str:
        if self.pattern == "2:4":
            return f"{self.method} 2:4"
        what = {"heads": " of attention heads", "neurons": " of MLP neurons"}.get(self.pattern, f" per {self.scope}")
        kind = "" if self.structured else "unstructured "
        return f"{self.method} {kind}{self.sparsity * 100:g}%{what}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> "PruneScheme":
        fields = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or not fields <= set(data):
            raise ConfigError(f"{where}: \"pruning\" must be an object with keys {', '.join(fields)}")
        try:
            return cls(**{k: data[k] for k in fields})
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{where}: pruning: {exc}") from None
