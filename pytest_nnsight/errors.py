"""The exceptions pytest-nnsight raises: one base class, misuse errors also subclass the builtin that fits.

`check_positive_int` is the one count check the verbs share (batch sizes, top-k), so its message reads the same everywhere.
"""

from __future__ import annotations


class NnsightTestError(Exception):
    """Base class of every error raised by pytest-nnsight."""


class ArgumentError(NnsightTestError, ValueError):
    """An argument of a public function has a value it does not accept (a direction, a method, a batch size, a tolerance)."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of a public function has a type it does not accept."""


def check_positive_int(name: str, value: object, expected: str = "a positive int") -> None:
    """ArgumentError naming `name` unless `value` is an int >= 1 (a bool is not a count): batch sizes, top-k, steps."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArgumentError(f"{name} {value!r}: expected {expected}")


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
        super().__init__(f"model {model_id!r} is not available: {why.rstrip('. ')}. {how}")


class ModelLoadError(NnsightTestError, RuntimeError):
    """A checkpoint exists but cannot be loaded: a corrupt file, a mismatched fingerprint."""


class ModelUsageError(NnsightTestError, TypeError):
    """A served model was used in a way it cannot support, e.g. a prompt given to a model without a tokenizer."""


class SiteError(NnsightTestError, ValueError):
    """A site names no module of the model, a layer or head out of range, or a part that does not exist."""


class PositionError(NnsightTestError, ValueError):
    """A position is out of range, absent from the prompt, ambiguous, or the prompts do not line up."""


class MetricError(NnsightTestError, ValueError):
    """A metric cannot be computed: a multi-token answer, an unknown word, a wrong-shaped user metric."""


class InterventionError(NnsightTestError, RuntimeError):
    """An intervention cannot run: a shape that does not fit, a site never reached, a device mismatch."""


class BrokenExperimentError(NnsightTestError, ValueError):
    """Clean and corrupt runs barely differ, so a normalised effect would divide noise by noise."""


class NonFiniteMetricError(NnsightTestError, ArithmeticError):
    """A metric came out NaN or infinite; comparisons with it never pass."""


class BatchingMismatchError(NnsightTestError, AssertionError):
    """A batched sweep disagrees with the same cells run one at a time (--nnsight-check-batching)."""


class ActivationCacheError(NnsightTestError, OSError):
    """The activation cache cannot work here: its directory is not writable, or pytest's cache is off."""


class ActivationCacheWarning(UserWarning):
    """A cached activation entry was corrupt (checksum, size or manifest) and is being recomputed."""


class SiteNotCachedError(NnsightTestError, LookupError):
    """Activations were asked for at a site the cache entry does not hold."""

    def __str__(self) -> str:  # LookupError would show the repr of the message
        return str(self.args[0]) if self.args else ""


class ProbeError(NnsightTestError, ValueError):
    """A probe cannot be fitted: labels of the wrong length, a single class, too few examples to split."""


class CircuitError(NnsightTestError, ValueError):
    """A sender, receiver, node or edge the model does not have, an edge against the order of the forward pass,
    a receiver input the architecture does not expose, or a circuit that is empty or the whole model."""


class SnapshotFileError(NnsightTestError, ValueError):
    """A findings snapshot file is malformed, hand-broken or from a newer format; the message names the file and line."""


class SnapshotValueError(NnsightTestError, TypeError):
    """A value given to a findings snapshot cannot be stored: not a number, a label, a result, a tensor or an array."""


class UnknownArchitectureError(SiteError):
    """A named site was asked of a model whose architecture no registered family describes."""


class FamilyMismatchError(ModelLoadError):
    """A family's table does not fit the model it claims (a renamed module, a changed shape or order)."""


class EagerAttentionWarning(UserWarning):
    """Reading attention patterns switched a model's attention implementation to eager."""


class StrategyError(NnsightTestError, ValueError):
    """A strategy was built from arguments that cannot produce valid variants."""


class ReplayError(NnsightTestError, ValueError):
    """A finding that cannot be written as a spec or replayed; the message names what and what is accepted."""


class FindingFailed(AssertionError):
    """A claim about a model did not hold (an assertion failure, not misuse: it is an AssertionError only)."""


class StructureChangedError(NnsightTestError, AssertionError):
    """The served model's structure differs from the one recorded in the structure lock."""
