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
    ArgumentError,
    ArgumentTypeError,
    ActivationCacheError,
    ActivationCacheWarning,
    ProbeError,
    SiteNotCachedError,
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
    "Prompt": "prompts", "TopTokens": "interventions",
    "sweep": "sweeps",
    "attribution_patch": "attribution", "check_attribution": "attribution", "AttributionCheck": "attribution",
    "logit_diff": "metrics", "prob": "metrics", "logprob": "metrics", "rank": "metrics", "kl_div": "metrics",
    "Site": "sites", "block": "sites", "attn_out": "sites", "mlp_out": "sites", "head": "sites", "embed": "sites", "blocks": "sites",
    "population": "populations", "assert_population": "populations", "PopulationResult": "populations", "wilson_interval": "stats",
    "counterfactual_pairs": "strategies", "prompts": "strategies", "CounterfactualPair": "strategies",
    "assert_restores": "assertions", "assert_drops": "assertions", "assert_beats_controls": "assertions",
    "assert_peaks_at": "assertions", "assert_top_token": "assertions", "FindingFailed": "assertions",
    "FindingSnapshotExtension": "snapshots", "Tolerance": "snapshots", "calibrate_tolerance": "snapshots",
    "ActivationCache": "activation_cache", "Activations": "activation_cache", "weights_fingerprint": "fingerprint",
    "Family": "families", "register_family": "families", "family_of": "families", "validate": "families",
    "n_layers": "families", "n_heads": "families", "d_model": "families", "UnknownArchitectureError": "families",
    "FamilyMismatchError": "families", "EagerAttentionWarning": "families", "site": "sites", "resolve_site": "sites",
    "attention_pattern": "patterns", "assert_attends": "patterns", "assert_previous_token_head": "patterns",
    "previous_token_scores": "patterns",
    "probe": "probing", "probe_sites": "probing", "fit_probe": "probing", "assert_probe": "probing",
    "ProbeResult": "probing", "ProbeSweep": "probing",
    "model_structure": "structure", "ModelStructure": "structure", "compatibility_hint": "hints",
    "FindingSpec": "replay", "replay": "replay", "ReplayError": "replay",
    "logit_lens": "lens", "generate": "generation",
    "path_patch": "circuits", "Circuit": "circuits", "faithfulness": "circuits",
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
        "ActivationCacheError", "ActivationCacheWarning", "ProbeError", "SiteNotCachedError",
        "ArgumentError", "ArgumentTypeError",
        *_LAZY,
    ]
)
