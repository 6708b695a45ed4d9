"""pytest-nnsight: interpretability findings as pytest tests.

The plugin loads by itself once installed (entry point ``pytest11``). Importing this package
does not import torch, transformers or nnsight; the intervention API (``patch``, ``sweep``, ...)
loads them on first use.

The top level holds the verbs, metrics, sites, assertions, result types and the base error; the
rest lives in documented submodules: ``pytest_nnsight.errors`` (every error class),
``.strategies``, ``.populations``, ``.snapshots``, ``.replay``, ``.testing``, ``.sites``,
``.families``, ``.probing``, ``.patterns``, ``.activation_cache``, ``.circuits``, ``.generation``.
"""

from __future__ import annotations

import sys
import warnings
from importlib import import_module
from typing import Any

from .errors import FindingFailed as FindingFailed, NnsightTestError as NnsightTestError  # re-exported
from .results import Effect as Effect, EffectMap as EffectMap, Measured as Measured  # re-exported

__version__ = "0.1.0"

# The public API, name -> module; the names that import torch load on first access.
_API = {
    # verbs: (model, clean, corrupt, *, site(s)=, position(s)=, metric=, ...)
    "patch": "interventions",
    "ablate": "interventions",
    "steer": "interventions",
    "patch_layer": "interventions",
    "sweep": "sweeps",
    "attribution_patch": "attribution",
    "check_attribution": "attribution",
    "population": "populations",
    "read": "reading",
    "probe_sites": "probing",
    "attention_pattern": "patterns",
    # metrics
    "logit_diff": "metrics",
    "prob": "metrics",
    "logprob": "metrics",
    "rank": "metrics",
    "kl_div": "metrics",
    # sites and prompts
    "site": "sites",
    "Site": "sites",
    "Prompt": "prompts",
    # assertions
    "assert_restores": "assertions",
    "assert_drops": "assertions",
    "assert_beats_controls": "assertions",
    "assert_peaks_at": "assertions",
    "assert_top_token": "assertions",
    "assert_population": "populations",
    "assert_probe": "probing",
    "assert_attends": "patterns",
    "assert_previous_token_head": "patterns",
    # result types (Effect, EffectMap, Measured are imported above)
    "TopTokens": "interventions",
    "PopulationResult": "populations",
    "AttributionCheck": "attribution",
    # circuits, the logit lens and generation
    "logit_lens": "lens",
    "generate": "generation",
    "path_patch": "circuits",
    "Circuit": "circuits",
    "faithfulness": "circuits",
}

# Names the top level exported before the API was curated: they still import from here for one
# release, with a DeprecationWarning naming their module (where they stay, without a warning).
_MOVED = {
    **dict.fromkeys(["block", "attn_out", "mlp_out", "head", "embed", "blocks", "resolve_site"], "sites"),
    **dict.fromkeys(["counterfactual_pairs", "CounterfactualPair"], "strategies"),
    **dict.fromkeys(["FindingSnapshotExtension", "Tolerance", "calibrate_tolerance"], "snapshots"),
    **dict.fromkeys(["ActivationCache", "Activations"], "activation_cache"),
    **dict.fromkeys(
        ["Family", "register_family", "family_of", "validate", "n_layers", "n_heads", "d_model"], "families"
    ),
    **dict.fromkeys(["probe", "fit_probe", "ProbeResult", "ProbeSweep"], "probing"),
    **dict.fromkeys(["model_structure", "ModelStructure"], "structure"),
    **dict.fromkeys(["LoadedModel", "ModelCache", "ModelKey", "wrap"], "models"),
    **dict.fromkeys(
        [
            "ArgumentError",
            "ArgumentTypeError",
            "ActivationCacheError",
            "ActivationCacheWarning",
            "BatchingMismatchError",
            "BrokenExperimentError",
            "EagerAttentionWarning",
            "FamilyMismatchError",
            "InterventionError",
            "MetricError",
            "ModelLoadError",
            "ModelSpecError",
            "ModelUnavailableError",
            "ModelUsageError",
            "NonFiniteMetricError",
            "PositionError",
            "ProbeError",
            "ReplayError",
            "SettingsError",
            "SiteError",
            "SiteNotCachedError",
            "UnknownArchitectureError",
        ],
        "errors",
    ),
    "previous_token_scores": "patterns",
    "wilson_interval": "stats",
    "weights_fingerprint": "fingerprint",
    "compatibility_hint": "hints",
    "FindingSpec": "replay",
    "Settings": "settings",
    "library_versions": "environment",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        module = f"{__name__}.{_MOVED[name]}"
        if not sys._getframe(1).f_code.co_filename.startswith(
            "<frozen importlib"
        ):  # `from pytest_nnsight import x` asks twice
            warnings.warn(
                f"importing {name} from pytest_nnsight is deprecated and stops working in the next release: "
                f"import it from {module} (the top level keeps only the public API, pytest_nnsight.__all__)",
                DeprecationWarning,
                stacklevel=2,
            )
        return getattr(import_module(module), name)  # not cached: every old import warns
    raise AttributeError(f"module 'pytest_nnsight' has no attribute {name!r}")


__all__ = sorted(["Effect", "EffectMap", "FindingFailed", "Measured", "NnsightTestError", *_API])
