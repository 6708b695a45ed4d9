"""The exceptions pytest-nnsight raises: one base class, misuse errors also subclass the builtin that fits."""

from __future__ import annotations


class NnsightTestError(Exception):
    """Base class of every error raised by pytest-nnsight."""


class SettingsError(NnsightTestError, ValueError):
    """An option, environment variable or ini key has a value pytest-nnsight does not accept."""


class ModelSpecError(NnsightTestError, ValueError):
    """A model was named in a form that is neither a hub id, a local path, a `bundled:` name nor a module."""


class ModelUnavailableError(NnsightTestError, OSError):
    """The weights of a model cannot be had here (offline, not cached, unknown id, missing path).

    The fixtures turn this into a skip, or a failure under `--nnsight-require-models`.
    """

    def __init__(self, model_id: str, why: str, how: str) -> None:
        self.model_id, self.why, self.how = model_id, why, how
        super().__init__(f"model {model_id!r} is not available: {why}. {how}")


class ModelLoadError(NnsightTestError, RuntimeError):
    """A checkpoint exists but cannot be loaded: a corrupt file, a mismatched fingerprint."""


class ModelUsageError(NnsightTestError, TypeError):
    """A served model was used in a way it cannot support, e.g. a prompt given to a model without a tokenizer."""
