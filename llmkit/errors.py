"""The error types llmkit raises for bad user input.

Every message is one line that names what is wrong and where (a file, a file:line, a flag or a
field). The CLI prints `error: <message>` and exits with status 2; library users catch
`LlmkitError`. Internal invariants use `assert` instead.
"""


class LlmkitError(ValueError):
    """Base class: a user-facing, one-line error."""


class ConfigError(LlmkitError):
    """A model or training configuration field is missing, unknown or out of range."""


class DatasetError(LlmkitError):
    """A corpus or record file cannot be used (encoding, syntax, empty, schema)."""


class CheckpointError(LlmkitError):
    """A checkpoint or model directory is missing, incomplete or corrupt."""


class ModelFormatError(CheckpointError):
    """A model file (safetensors, GGUF, config.json) is malformed or unsupported."""


class GenerationError(LlmkitError):
    """A generation request is invalid (prompt too long, bad sampling values)."""


class NonFiniteError(LlmkitError):
    """A loss or gradient became NaN/Inf during training."""
