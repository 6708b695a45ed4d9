"""pytest-nnsight: interpretability findings as pytest tests.

The plugin loads by itself once installed (entry point ``pytest11``). Importing this package
does not import torch, transformers or nnsight; they load when a model is first needed.
"""

from __future__ import annotations

from .environment import library_versions
from .errors import (
    ModelLoadError,
    ModelSpecError,
    ModelUnavailableError,
    ModelUsageError,
    NnsightTestError,
    SettingsError,
)
from .models import LoadedModel, ModelCache, ModelKey, wrap
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "LoadedModel",
    "ModelCache",
    "ModelKey",
    "ModelLoadError",
    "ModelSpecError",
    "ModelUnavailableError",
    "ModelUsageError",
    "NnsightTestError",
    "Settings",
    "SettingsError",
    "library_versions",
    "wrap",
]
