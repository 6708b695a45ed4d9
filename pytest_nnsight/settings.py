"""Plugin settings: each resolved once as command line > environment > ini key > default.

This module imports only the standard library, so `pytest --help` never loads torch or nnsight.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import SettingsError
from .findings import current, record_unserved

DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_device(value: str) -> str:
    v = value.strip().lower()
    if not DEVICE_RE.match(v):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return v


def parse_dtype(value: str) -> str:
    v = value.strip().lower()
    if v not in DTYPES:
        raise ValueError("expected " + ", ".join(DTYPES[:-1]) + " or " + DTYPES[-1])
    return v


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError("expected true or false (1/0, yes/no, on/off)")


def parse_profile(value: str) -> str:
    v = value.strip()
    if not re.match(r"^[\w.:-]+$", v):
        raise ValueError("expected a hypothesis profile name such as nnsight-dev or nnsight-ci")
    return v


def parse_path(value: str) -> str:
    v = str(value).strip()
    if not v:
        raise ValueError("expected a directory path")
    return v


def parse_tolerance(value: str | float) -> float:
    try:
        x = float(str(value).strip())
    except ValueError:
        raise ValueError("expected a number >= 0, such as 1e-4") from None
    if not (x >= 0) or x == float("inf"):
        raise ValueError("expected a finite number >= 0, such as 1e-4")
    return x


def parse_positive_int(value: str | int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if n < 1:
        raise ValueError("expected a positive integer")
    return n


def parse_remote(value: str | bool) -> str:
    v = str(value).strip().lower()
    if v in ("ndif", "local", "off"):
        return v
    if v in _TRUE:
        return "ndif"
    if v in _FALSE:
        return "off"
    raise ValueError("expected off, ndif (run traces on NDIF) or local (simulate the remote path in-process)")


@dataclass(frozen=True)
class Option:
    """One setting: its noun names the option, the environment variable and the ini key."""

    noun: str
    help: str
    default: Any
    parse: Callable[[str], Any]
    metavar: str | None = None  # None: a flag without a value

    @property
    def flag(self) -> str:
        return "--nnsight-" + self.noun.replace("_", "-")

    @property
    def dest(self) -> str:
        return "nnsight_" + self.noun

    @property
    def env(self) -> str:
        return "PYTEST_NNSIGHT_" + self.noun.upper()

    @property
    def ini(self) -> str:
        return "nnsight_" + self.noun


STRUCTURE_LOCK_MODES = ("on", "warn", "update", "off")


def parse_structure_lock(value: str | bool) -> str:
    """A structure lock mode from an option value: on, warn, update or off (true/false also accepted)."""
    v = str(value).strip().lower()
    if v in STRUCTURE_LOCK_MODES:
        return v
    if v in ("1", "true", "yes"):
        return "on"
    if v in ("0", "false", "no", ""):
        return "off"
    raise ValueError(
        "expected on (record, then fail tests when the structure changed), warn, update (accept the change) or off"
    )


OPTIONS: tuple[Option, ...] = (
    Option(
        "device",
        "device models are loaded on: auto (CUDA when available, else CPU), cpu, cuda or cuda:N",
        "auto",
        parse_device,
        "DEVICE",
    ),
    Option(
        "dtype",
        "dtype models are loaded in: auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, float16 or bfloat16",
        "auto",
        parse_dtype,
        "DTYPE",
    ),
    Option("offline", "never touch a model hub: load only local, cached and bundled weights", False, parse_bool),
    Option(
        "require_models",
        "fail, instead of skip, tests whose model weights cannot be had (for CI on GPU runners)",
        False,
        parse_bool,
    ),
    Option(
        "check_batching",
        "re-run a sample of batched work (sweep cells, population pairs, activation-cache prompts) one at a "
        "time and fail when they disagree",
        False,
        parse_bool,
    ),
    Option(
        "check_batching_cells",
        "how many cells, pairs or prompts of each batched call --nnsight-check-batching re-runs",
        3,
        parse_positive_int,
        "N",
    ),
    Option(
        "suspicious_effect",
        "flag normalized effects with |effect| above this (and NaN) as suspicious in the findings summary and report",
        1.5,
        parse_tolerance,
        "X",
    ),
    Option(
        "hypothesis_profile",
        "hypothesis settings profile to load: nnsight-dev, nnsight-ci or any registered one; unset leaves "
        "the hypothesis profile alone",
        None,
        parse_profile,
        "NAME",
    ),
    Option(
        "cache_dir",
        "directory of the on-disk activation cache (relative paths: from the rootdir); unset: inside pytest's "
        "cache dir, so --cache-clear clears it",
        None,
        parse_path,
        "DIR",
    ),
    Option(
        "cache_clear",
        "delete the activation cache's entries at the start of the run (only them: pytest's other caches stay)",
        False,
        parse_bool,
    ),
    Option(
        "no_cache",
        "run without the activation cache: compute activations every time and keep them in memory",
        False,
        parse_bool,
    ),
    Option(
        "snapshot_atol",
        "absolute tolerance of finding_snapshot comparisons; unset: by dtype (1e-4 float32, 2e-2 float16, "
        "5e-2 bfloat16)",
        None,
        parse_tolerance,
        "ATOL",
    ),
    Option(
        "snapshot_rtol",
        "relative tolerance of finding_snapshot comparisons; unset: by dtype (1e-4 float32, 1e-2 float16, "
        "2e-2 bfloat16)",
        None,
        parse_tolerance,
        "RTOL",
    ),
    Option(
        "deterministic",
        "torch deterministic algorithms for the run (warn_only: ops without a deterministic kernel warn) "
        "and the same seeds (random, torch, numpy) before every test; on CUDA also CUBLAS_WORKSPACE_CONFIG",
        False,
        parse_bool,
    ),
    Option(
        "snapshot_refresh_env",
        "rewrite only the recorded environment of findings snapshots whose values are still within "
        "tolerance (accept an upgrade without rewriting numbers)",
        False,
        parse_bool,
    ),
    Option(
        "summary",
        "show the findings summary (claim, measured vs threshold, variants, snapshot status) at the end of the "
        "run; -v shows it too",
        False,
        parse_bool,
    ),
    Option(
        "report",
        "write a findings report (findings.json, findings.md, index.html, figures/*.png) into this directory",
        None,
        parse_path,
        "DIR",
    ),
    Option(
        "review",
        "at the end of the run, walk the drifted and new findings snapshots one by one in the terminal (claim, "
        "environment change, numbers, side-by-side figure) and write only the accepted ones; without a terminal, print "
        "the same summary and write nothing",
        False,
        parse_bool,
    ),
    Option(
        "remote",
        "run intervention traces on NDIF (nnsight remote=True) for models too large for the runner: off, ndif "
        "(needs the API key in env NDIF_API_KEY) or local (nnsight's in-process simulation of the remote path)",
        "off",
        parse_remote,
        "MODE",
    ),
    Option(
        "structure_lock",
        "the structure lock on every served model: on (the first serve of a model id records its structure "
        "in __snapshots__/.nnsight-structure.lock; later runs fail every test using it, with the explained change, when it "
        "changed), warn (report a change, fail nothing, write nothing), update (accept the served structures, as "
        "--snapshot-update does) or off",
        "on",
        parse_structure_lock,
        "MODE",
    ),
)
OPTIONS_BY_NOUN: Mapping[str, Option] = {o.noun: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one pytest run, stored on `config.stash`."""

    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    require_models: bool = False
    check_batching: bool = False
    check_batching_cells: int = 3
    suspicious_effect: float = 1.5
    hypothesis_profile: str | None = None
    cache_dir: str | None = None
    cache_clear: bool = False
    no_cache: bool = False
    snapshot_atol: float | None = None
    snapshot_rtol: float | None = None
    snapshot_refresh_env: bool = False
    deterministic: bool = False
    summary: bool = False
    report: str | None = None
    review: bool = False
    remote: str = "off"
    structure_lock: str = "on"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def source_of(self, noun: str) -> str:
        return self.sources.get(noun, "default")


#: every option at its default: the settings of a model no fixture served
DEFAULTS = Settings()


#: hypothesis settings profiles for model tests: no deadline (the first forward pass is slow), no
#: health check about function-scoped fixtures (the model fixtures are cached per session).
HYPOTHESIS_PROFILES: Mapping[str, Mapping[str, Any]] = {
    "nnsight-dev": {"max_examples": 25, "deadline": None},
    "nnsight-ci": {"max_examples": 50, "deadline": None, "derandomize": True, "database": None, "print_blob": True},
}


def register_hypothesis_profiles() -> None:
    """Register HYPOTHESIS_PROFILES with hypothesis (imported here, only when asked for)."""
    from hypothesis import HealthCheck, settings

    for name, values in HYPOTHESIS_PROFILES.items():
        settings.register_profile(
            name, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], **values
        )


_PREVIOUS_HYPOTHESIS_PROFILES: list[str] = []  # a stack: pytester runs nest sessions in one process


def restore_hypothesis_profile() -> None:
    """Load the profile that was current before the last load_hypothesis_profile (pytest_unconfigure)."""
    if _PREVIOUS_HYPOTHESIS_PROFILES:
        from hypothesis import settings

        settings.load_profile(_PREVIOUS_HYPOTHESIS_PROFILES.pop())


def load_hypothesis_profile(name: str, source: str) -> None:
    """Register ours and load profile `name`; SettingsError naming the source when hypothesis does not know it."""
    register_hypothesis_profiles()
    from hypothesis import settings
    from hypothesis.errors import InvalidArgument

    previous = settings.get_current_profile_name()
    try:
        settings.load_profile(name)
    except InvalidArgument:
        settings.load_profile(previous)  # hypothesis has already switched its current name to the unknown one
        raise SettingsError(
            f"invalid nnsight_hypothesis_profile {name!r} from {source}: no such hypothesis profile; "
            f"expected {' or '.join(HYPOTHESIS_PROFILES)} or one registered in a conftest.py"
        ) from None
    _PREVIOUS_HYPOTHESIS_PROFILES.append(previous)


# No module global holds the session's settings: they live on config.stash (plugin, fixtures), and the core reads them
# from the model it runs on (`settings_of`) or takes them as arguments (tests/test_layout.py checks).

#: id(model) -> (weak reference to the model, its run settings); filled by `attach` when the fixtures serve a model
_SERVED: dict[int, tuple[Callable[[], Any], Settings]] = {}


def attach(model: Any, settings: Settings) -> Any:
    """Give `model` (an nnsight wrapper) its run settings, read back by `settings_of`; returns `model`.

    The model fixtures attach the session's settings to every model they serve; a test may attach its own.

    >>> m = type("M", (), {})()
    >>> settings_of(attach(m, Settings(check_batching=True))).check_batching
    True
    """
    key = id(model)
    try:
        ref: Callable[[], Any] = weakref.ref(model, lambda _r, k=key: _SERVED.pop(k, None))
    except TypeError:  # not weak-referenceable: held for the process (the model cache holds served models anyway)
        ref = lambda m=model: m  # noqa: E731
    _SERVED[key] = (ref, settings)
    return model


def settings_of(model: Any) -> Settings:
    """The run settings attached to `model` (see `attach`); the defaults for a model the user wrapped themselves.

    >>> settings_of(object()).remote
    'off'
    """
    entry = _SERVED.get(id(model))
    if entry is not None and entry[0]() is model:
        return entry[1]
    if current() is not None:  # inside a test: the run's summary names the tests the run's options did not reach
        record_unserved(_describe(model))
    return DEFAULTS


def _describe(model: Any) -> str:
    """The wrapper's class, the module it wraps and, where known, its checkpoint: 'LanguageModel of GPT2LMHeadModel (gpt2)'."""
    what = type(model).__name__
    try:
        inner = getattr(model, "_module", None)
        name = getattr(getattr(inner if inner is not None else model, "config", None), "_name_or_path", "")
    except Exception:  # a description never stops a verb
        return what
    what += f" of {type(inner).__name__}" if inner is not None else ""
    return f"{what} ({name})" if isinstance(name, str) and name else what


def resolve(
    cli: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    ini: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve every option as command line > environment > ini > default.

    `cli` and `ini` map option nouns to raw values (None or "" when unset).
    Raises SettingsError naming the bad value and where it came from.

    >>> resolve({"device": "cpu"}, env={}, ini={}).device
    'cpu'
    """
    env = os.environ if env is None else env
    ini = ini or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        candidates = (
            (cli.get(opt.noun), f"command line option {opt.flag}"),
            (env.get(opt.env), f"environment variable {opt.env}"),
            (ini.get(opt.noun), f"ini key {opt.ini} in the config file"),
        )
        for raw, where in candidates:
            if raw is None or (isinstance(raw, str) and raw.strip() == "" and where.startswith("ini")):
                continue
            try:
                values[opt.noun] = opt.parse(raw)
            except ValueError as exc:
                raise SettingsError(f"invalid {opt.ini} {raw!r} from {where}: {exc}") from None
            sources[opt.noun] = where
            break
        else:
            values[opt.noun] = opt.default
    return Settings(**values, sources=sources)
