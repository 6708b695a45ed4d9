"""The finding record: what one test (or fixture) measured, as dataclasses, and its plain-dict form.

A test's `Finding` is filled while it runs (`findings.Recorder`), travels on its report as `to_dict()`
(pytest-xdist sends only plain data back to the controller), and is rebuilt there with
`Finding.from_dict`; the terminal summary, the report and the review read the dataclasses.
`findings.json` holds the same dicts. Numbers are JSON-safe: None stands for NaN and infinities.
Imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, TypeVar

Number = Optional[float]  # None: NaN or infinite (JSON has neither)
Cell = list[int]  # [row, column] of a map
T = TypeVar("T")


@dataclass
class Check:
    """A claim `measured op threshold` (op: '>=' or '<='), as an assertion helper checked it."""

    what: str
    measured: Number
    op: str
    threshold: Number
    passed: bool
    site: str = ""
    detail: str = ""

    def margin(self) -> float:
        """How far the measurement is on the passing side of the threshold (inf when either is unknown)."""
        if self.measured is None or self.threshold is None:
            return math.inf
        return self.measured - self.threshold if self.op == ">=" else self.threshold - self.measured


@dataclass
class EffectRecord:
    """One intervention (patch, ablation, steering): the metric clean, corrupt and intervened, and the normalized effect."""

    kind: str
    site: str
    positions: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    metric: str = ""
    prompt: str | None = None
    source: Number = None
    target: Number = None
    intervened: Number = None
    normalized: Number = None
    controls: dict[str, Number] = field(default_factory=dict)
    nan: bool = False


@dataclass
class MapRecord:
    """An effect map (sites x positions, with the token at each position) and the cells a test claimed or found failing."""

    sites: list[str]
    positions: list[int]
    tokens: list[str]
    values: list[list[Number]]
    metric: str = ""
    kind: str = ""
    clean_prompt: str | None = None
    corrupt_prompt: str | None = None
    clean: Number = None
    corrupt: Number = None
    failing: list[Cell] = field(default_factory=list)
    claimed: list[Cell] = field(default_factory=list)
    nan_cells: int = 0

    def mark(self, failing: Any = (), claimed: Any = ()) -> None:
        """Add failing and claimed cells (a map asserted twice keeps both sets), sorted, each once."""
        self.failing = [list(c) for c in sorted({*map(tuple, self.failing), *((int(i), int(j)) for i, j in failing)})]
        self.claimed = [list(c) for c in sorted({*map(tuple, self.claimed), *((int(i), int(j)) for i, j in claimed)})]


@dataclass
class PopulationRecord:
    """A population of counterfactual variants: the effect of each, the pass rate and its Wilson lower bound."""

    site: str
    position: str
    metric: str
    n: int
    passed: int
    rate: Number
    lower_bound: Number
    mean: Number
    std: Number
    threshold: Number
    effects: list[Number] = field(default_factory=list)
    min_rate: Number = None  # set once assert_population ran
    on: str | None = None
    nan: int = 0


@dataclass
class MapDrift:
    """A drifted map: the recorded and the new grid, and which cells moved beyond tolerance or changed at all."""

    sites: list[str]
    tokens: list[str]
    positions: list[int]
    old_sites: list[str]
    old_tokens: list[str]
    old: list[list[Number]]
    new: list[list[Number]]
    metric: str = ""
    moved: list[Cell] = field(default_factory=list)
    changed: list[Cell] = field(default_factory=list)


@dataclass
class PopulationDrift:
    """A drifted population: the recorded and the new effect of each variant."""

    old: list[Number]
    new: list[Number]
    threshold: Number = None
    site: str = ""
    moved: int = 0


@dataclass
class Drift:
    """What changed between the recorded finding and this run's: the environment, the cells, the shape."""

    changes: list[str] = field(default_factory=list)
    tolerance: str = ""
    cells: int = 0
    moved: int = 0
    changed: int = 0
    max_abs: Number = None
    structural: list[str] = field(default_factory=list)
    map: MapDrift | None = None
    population: PopulationDrift | None = None

    def headline(self) -> str:
        """One line: how many cells moved beyond tolerance, and the largest change."""
        if not self.cells:
            return "; ".join(self.structural[:2]) or "the finding's shape changed"
        within = f", {self.changed} changed within tolerance" if self.changed and not self.moved else ""
        return (
            f"{self.moved} / {self.cells} cells moved beyond tolerance ({self.tolerance}){within}; "
            f"largest change {fmt(self.max_abs)}"
        )

    def environment_line(self) -> str:
        return "environment: " + (", ".join(self.changes) or "unchanged (same versions, device, dtype and weights)")


@dataclass
class SnapshotRecord:
    """A finding_snapshot assertion's status: new, written, matched, re-verified, drifted, updated or failed."""

    name: str
    status: str
    detail: str = ""
    path: str = ""
    received: str | None = None  # the text --nnsight-review writes when a new or drifted finding is accepted
    drift: Drift | None = None


@dataclass
class LensRecord:
    """A logit lens: the answer's rank and probability per site x position."""

    prompt: str | None
    answer: str
    sites: list[str]
    positions: list[int]
    tokens: list[str]
    ranks: list[list[int]]
    probs: list[list[Number]]


@dataclass
class GenerationRecord:
    """Generated text per prompt, baseline and intervened side by side.

    `rows` is a table: 'prompt', then 'expected', 'baseline', 'intervened' where present, then one column per score
    (the names the test chose), so a row is a mapping of column to value.
    """

    config: str
    intervention: str
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CircuitRecord:
    """A circuit's nodes and ranked edges [sender, receiver, score], and the edges a test claimed or found missing."""

    metric: str
    method: str
    nodes: list[str] = field(default_factory=list)
    edges: list[list[Any]] = field(default_factory=list)
    claimed: list[list[str]] = field(default_factory=list)
    missing: list[list[str]] = field(default_factory=list)


@dataclass
class PCA:
    """A 2-D projection of the probed activations, one label per point."""

    points: list[list[float]] = field(default_factory=list)
    explained: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


@dataclass
class ProbeRecord:
    """A linear probe: held-out accuracy with its interval, the majority and control baselines, and the PCA it saw."""

    site: str
    position: str
    accuracy: Number
    ci: list[Number]
    majority: Number
    control: Number
    n_test: int
    classes: int
    pca: PCA = field(default_factory=PCA)


@dataclass
class Finding:
    """What one test (or one fixture's set-up) measured, and, once the run collects it, how the test ended."""

    nodeid: str
    claim: str
    marked: bool = False  # the test carries @pytest.mark.finding
    checks: list[Check] = field(default_factory=list)
    maps: list[MapRecord] = field(default_factory=list)
    effects: list[EffectRecord] = field(default_factory=list)
    populations: list[PopulationRecord] = field(default_factory=list)
    snapshots: list[SnapshotRecord] = field(default_factory=list)
    lenses: list[LensRecord] = field(default_factory=list)
    generations: list[GenerationRecord] = field(default_factory=list)
    circuits: list[CircuitRecord] = field(default_factory=list)
    probes: list[ProbeRecord] = field(default_factory=list)
    # lines for the snapshots section (re-verified under a new environment)
    notes: list[str] = field(default_factory=list)
    # models a verb ran on that the fixtures did not serve: the run's --nnsight-check-batching/--nnsight-remote missed them
    unserved: list[str] = field(default_factory=list)
    outcome: str = ""  # set by the run: passed, failed, error, skipped, xfailed, xpassed, fixture
    when: str = ""
    duration: Number = None
    message: str = ""  # the first lines of a failed test's assertion text
    suspicious: list[str] = field(default_factory=list)
    fixture: str = ""  # measured while this fixture was set up ...
    scope: str = ""
    used_by: list[str] = field(default_factory=list)  # ... by these tests
    figures: list[str] = field(default_factory=list)  # written by the report

    def measured(self) -> bool:
        """Whether anything was recorded (a test that measured nothing is not a finding unless marked)."""
        return any(
            (
                self.checks,
                self.maps,
                self.effects,
                self.populations,
                self.snapshots,
                self.lenses,
                self.generations,
                self.circuits,
                self.probes,
            )
        )

    def primary_check(self) -> Check | None:
        """The check to show first: the first one that failed, else the one with the smallest margin."""
        failed = [c for c in self.checks if not c.passed]
        if failed:
            return failed[0]
        return min(self.checks, key=Check.margin) if self.checks else None

    def variant_effects(self) -> list[float]:
        """Normalized effects of one intervention repeated over prompts (a hypothesis test's examples): >= 3 at one kind and site."""
        if len(self.effects) < 3 or len({(e.kind, e.site) for e in self.effects}) != 1:
            return []
        return [e.normalized for e in self.effects if e.normalized is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, str, numbers, None): what travels on the report and goes into findings.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """The record again from `to_dict()`'s output; keys it does not know are ignored, missing ones take defaults."""
        return _build(cls, data)


def number(x: Any) -> float | None:
    """A JSON-safe float: None for NaN, infinities and what is not a number (JSON has neither)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any) -> str:
    """A recorded number for people: 4 significant digits, 'n/a' for a missing one (NaN)."""
    return "n/a" if x is None else f"{x:.4g}"


def percent(x: Any) -> str:
    """A recorded rate as a percentage with one decimal, 'n/a' for a missing one."""
    return "n/a" if x is None else f"{x:.1%}"


def _build(cls: type[T], data: Any) -> T:
    """`cls` (a dataclass) from a dict, nested records included."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = _value(hints[f.name], data[f.name])
    return cls(**kwargs)


def _value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    record = _record_type(hint)
    if record is not None and isinstance(value, dict):
        return _build(record, value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        inner = _record_type(item)
        if inner is not None:
            return [_build(inner, v) if isinstance(v, dict) else v for v in value]
        return list(value)
    return value


def _record_type(hint: Any) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), or None."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0] if dataclasses.is_dataclass(args[0]) else None
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, vars(sys.modules[__name__]))
    return _HINTS[cls]
