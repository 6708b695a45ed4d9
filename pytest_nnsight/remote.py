"""NDIF remote execution: `--nnsight-remote ndif` runs the interventions' traces with nnsight's `remote=True`.

For models too large for the runner. `local` runs nnsight's in-process simulation of the remote path
(the trace is serialized and deserialized with local modules hidden, as on the server), which checks
that findings will run remotely without a key or network. Standard library only at import time.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from . import settings as _settings
from .errors import SettingsError

API_KEY_ENV = "NDIF_API_KEY"
KEY_URL = "https://login.ndif.us"


def check_remote(settings: _settings.Settings, env: Mapping[str, str] | None = None) -> None:
    """SettingsError when remote mode 'ndif' is on without an API key in NDIF_API_KEY (the key is never printed)."""
    env = os.environ if env is None else env
    if settings.remote == "ndif" and not env.get(API_KEY_ENV, "").strip():
        raise SettingsError(
            f"nnsight_remote 'ndif' from {settings.source_of('remote')} needs an NDIF API key in the environment variable "
            f"{API_KEY_ENV} (get one at {KEY_URL}; in CI store it as a secret), which is not set: set it, or use "
            "--nnsight-remote local to check the remote path in-process, or off"
        )


def trace_kwargs(model: Any = None, settings: _settings.Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for `model.trace(...)`: {'remote': True} for a model served for NDIF under 'ndif',
    {'remote': 'local'} for any model under 'local', else {} (a local model runs locally under 'ndif').
    Without `settings`, the ones attached to `model` when it was served (`settings.settings_of`)."""
    mode = (settings if settings is not None else _settings.settings_of(model)).remote
    if mode == "ndif" and (model is None or id(model) in NDIF_MODELS):
        return {"remote": True}
    if mode == "local":
        return {"remote": "local"}
    return {}


def is_remote(model: Any = None, settings: _settings.Settings | None = None) -> bool:
    """Whether `model`'s traces leave this process (edits' values then move to the activation's device inside the trace)."""
    return bool(trace_kwargs(model, settings))


#: wrappers served for NDIF (id -> wrapper; the session's model cache keeps them alive anyway)
NDIF_MODELS: dict[int, Any] = {}
