"""Plugin settings: each resolved once as command line > environment > ini key > default.

This module imports only the standard library, so `pytest --help` never loads torch or nnsight.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import SettingsError

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


def parse_positive_int(value: str | int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if n < 1:
        raise ValueError("expected a positive integer")
    return n


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


OPTIONS: tuple[Option, ...] = (
    Option("device", "device models are loaded on: auto (CUDA when available, else CPU), cpu, cuda or cuda:N", "auto", parse_device, "DEVICE"),
    Option("dtype", "dtype models are loaded in: auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, float16 or bfloat16", "auto", parse_dtype, "DTYPE"),
    Option("offline", "never touch a model hub: load only local, cached and bundled weights", False, parse_bool),
    Option("require_models", "fail, instead of skip, tests whose model weights cannot be had (for CI on GPU runners)", False, parse_bool),
    Option("check_batching", "re-run a sample of batched sweep cells one at a time and fail when they disagree", False, parse_bool),
    Option("check_batching_cells", "how many cells of each sweep --nnsight-check-batching re-runs", 3, parse_positive_int, "N"),
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
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def source_of(self, noun: str) -> str:
        return self.sources.get(noun, "default")


#: The settings of the running pytest session (set in pytest_configure); library code outside pytest sees None.
ACTIVE: Settings | None = None


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
