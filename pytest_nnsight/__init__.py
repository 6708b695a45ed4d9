"""pytest-nnsight: interpretability findings as pytest tests.

The plugin loads by itself once installed (entry point ``pytest11``). Importing this package
does not import torch, transformers or nnsight; the intervention API (``patch``, ``sweep``, ...)
loads them on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .environment import library_versions
from .errors import (
    BatchingMismatchError,
    BrokenExperimentError,
    InterventionError,
    MetricError,
    ModelLoadError,
    ModelSpecError,
    ModelUnavailableError,
    ModelUsageError,
    NnsightTestError,
    NonFiniteMetricError,
    PositionError,
    SettingsError,
    SiteError,
)
from .models import LoadedModel, ModelCache, ModelKey, wrap
from .results import Effect, EffectMap, Measured
from .settings import Settings

__version__ = "0.1.0"

# names that import torch: loaded on first access so `import pytest_nnsight` stays light
_LAZY = {
    "patch": "interventions", "ablate": "interventions", "steer": "interventions", "patch_layer": "interventions",
    "Prompt": "interventions", "TopTokens": "interventions",
    "sweep": "sweeps",
    "attribution_patch": "attribution", "check_attribution": "attribution", "AttributionCheck": "attribution",
    "logit_diff": "metrics", "prob": "metrics", "logprob": "metrics", "rank": "metrics", "kl_div": "metrics",
    "Site": "sites", "block": "sites", "attn_out": "sites", "mlp_out": "sites", "head": "sites", "embed": "sites", "blocks": "sites",
    "assert_restores": "assertions", "assert_drops": "assertions", "assert_beats_controls": "assertions",
    "assert_peaks_at": "assertions", "assert_top_token": "assertions", "FindingFailed": "assertions",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pytest_nnsight' has no attribute {name!r}")


__all__ = sorted(
    [
        "BatchingMismatchError", "BrokenExperimentError", "Effect", "EffectMap", "InterventionError", "LoadedModel", "Measured",
        "MetricError", "ModelCache", "ModelKey", "ModelLoadError", "ModelSpecError", "ModelUnavailableError", "ModelUsageError",
        "NnsightTestError", "NonFiniteMetricError", "PositionError", "Settings", "SettingsError", "SiteError", "library_versions", "wrap",
        *_LAZY,
    ]
)
