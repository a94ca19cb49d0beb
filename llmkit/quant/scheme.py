"""The quantisation scheme: what `llmkit quantize` asks for and what a quantised directory's
config.json records under "quantization" (checked when read: the file may come from anywhere)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llmkit.errors import ConfigError

METHODS = ("rtn", "gptq", "awq")
DEFAULT_INT4_GROUP = 128  # the group size GPTQ and AWQ report their main results at


@dataclass(frozen=True)
class QuantScheme:
    method: str = "rtn"
    bits: int = 4
    group_size: int | None = None  # None: int4 → DEFAULT_INT4_GROUP, int8 → one scale per output channel
    symmetric: bool = False  # int8 is always symmetric

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantisation method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise ConfigError(f"--bits must be 8 or 4, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 2 or self.group_size % 2):
            raise ConfigError(f"--group-size must be an even number ≥ 2, got {self.group_size!r}")
        if self.bits == 8 and not self.symmetric:
            raise ConfigError("int8 is symmetric only (w ≈ code · scale); drop --asymmetric or use --bits 4")

    @classmethod
    def create(cls, method: str, bits: int, group_size: int | None, symmetric: bool | None) -> "QuantScheme":
        """The command line's defaults: int8 symmetric, int4 asymmetric unless told."""
        return cls(method, bits, group_size, bits == 8 if symmetric is None else symmetric)

    def group_for(self, in_features: int) -> int:
        if self.group_size is not None:
            return self.group_size
        return in_features if self.bits == 8 else DEFAULT_INT4_GROUP

    def describe(self) -> str:
        group = "per channel" if self.bits == 8 and self.group_size is None else f"g{self.group_for(0)}"
        kind = "" if self.bits == 8 else (" symmetric" if self.symmetric else " asymmetric")
        return f"int{self.bits} {self.method} {group}{kind}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> "QuantScheme":
        if not isinstance(data, dict) or set(data) - set(cls.__dataclass_fields__):
            raise ConfigError(f"{where}: \"quantization\" must be an object with keys "
                              f"{', '.join(cls.__dataclass_fields__)}")
        try:
            return cls(**data)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{where}: quantization: {exc}") from None
