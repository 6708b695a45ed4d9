"""Recording what a finding test measures while it runs: the sink the verbs, assertions and snapshots write into.

The assertion helpers, verbs, sweeps and the snapshot fixture call the `record_*` functions; they
write into the `Finding` (pytest_nnsight.records) of the test now running (opened by
`run_records.start` from the plugin's `pytest_runtest_call` wrapper) and do nothing, at the cost of
one global read, when no test is running. Recording never changes a test's outcome: every recorder
swallows its own errors. Imports only the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .records import (
    PCA,
    Check,
    CircuitRecord,
    Drift,
    EffectRecord,
    Finding,
    GenerationRecord,
    LensRecord,
    MapDrift,
    MapRecord,
    PopulationDrift,
    PopulationRecord,
    ProbeRecord,
    SnapshotRecord,
    number,
)

MAX_ITEMS = 500  # per list: a hypothesis test recording each example stays bounded
MAX_VALUES = 4096  # per population: effects kept for the histogram
MAX_PROBES = 24  # per test: a probe sweep over every layer of a deep model stays bounded


@dataclass(eq=False)  # identity: the stack finds and removes this recorder, not one with an equal finding
class Recorder:
    """The Finding of the test (or fixture) now running, and the result objects already recorded into it.

    Results are matched by identity (the object itself is kept, so its id cannot be reused): a map asserted after
    the sweep that made it only adds its claimed cells; a population asserted after it was measured only adds `min_rate`.
    """

    finding: Finding
    _seen: list[tuple[Any, Any]] = field(default_factory=list, repr=False)  # (result object, its record)

    def seen(self, obj: Any) -> Any:
        """The record already made from `obj`, or None."""
        return next((rec for o, rec in self._seen if o is obj), None)

    def remember(self, obj: Any, record: Any) -> None:
        self._seen.append((obj, record))


_STACK: list[Recorder] = []  # a stack: pytest run inside a test (pytester) records into the inner test


def current() -> Recorder | None:
    """The running test's recorder, or None outside a test."""
    return _STACK[-1] if _STACK else None


def open_recorder(finding: Finding) -> Recorder:
    """Record into `finding` until `close_recorder` (the plugin opens one per test call and per fixture set-up)."""
    rec = Recorder(finding)
    _STACK.append(rec)
    return rec


def close_recorder(rec: Recorder) -> Finding:
    """Stop recording into `rec`; returns its finding."""
    if rec in _STACK:
        _STACK.remove(rec)
    return rec.finding


def _safe(fn: Callable[..., None]) -> Callable[..., None]:
    """Run a recorder only inside a test, and never let it raise into the test."""

    def wrapped(*args: Any, **kwargs: Any) -> None:
        if not _STACK:
            return
        try:
            fn(_STACK[-1], *args, **kwargs)
        except Exception:  # a report must never change a test's outcome
            pass

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


def _text(x: Any) -> str | None:
    """A plain str (None stays None): a str subclass (TokenPrompt) in a record would stop xdist sending the report."""
    return None if x is None else str(x)


def _is_nan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _append(items: list[Any], entry: Any) -> bool:
    if len(items) < MAX_ITEMS:
        items.append(entry)
        return True
    return False


@_safe
def record_check(
    rec: Recorder,
    what: str,
    measured: Any,
    op: str,
    threshold: Any,
    *,
    site: str = "",
    detail: str = "",
    passed: bool | None = None,
) -> None:
    """A claim `measured op threshold` (op: >=, <=) checked by an assertion helper, and whether it held."""
    m, t = number(measured), number(threshold)
    if passed is None:
        passed = m is not None and t is not None and (m >= t if op == ">=" else m <= t)
    _append(rec.finding.checks, Check(what, m, op, t, bool(passed), site, detail))


@_safe
def record_effect(rec: Recorder, effect: Any) -> None:
    """One intervention's Effect (patch, ablation, steering): its normalized value and raw numbers; once per object."""
    if rec.seen(effect) is not None:
        return
    entry = EffectRecord(
        effect.kind,
        effect.site,
        list(effect.positions),
        list(effect.position_tokens),
        effect.metric,
        _text(effect.target_prompt),
        number(effect.source),
        number(effect.target),
        number(effect.intervened),
        number(effect.normalized),
        {k: number(v) for k, v in effect.controls.items()},
        _is_nan(effect.normalized),
    )
    if _append(rec.finding.effects, entry):
        rec.remember(effect, entry)


def recorded(effect: Any) -> Any:
    """`effect`, recorded for the findings report: the verbs return `recorded(Effect(...))`."""
    record_effect(effect)
    return effect


@_safe
def record_map(
    rec: Recorder, effects: Any, failing: Sequence[tuple[int, int]] = (), claimed: Sequence[tuple[int, int]] = ()
) -> None:
    """An EffectMap (sites x positions, with token strings); the same map again only adds failing and claimed cells."""
    entry = rec.seen(effects)
    if entry is None:
        entry = MapRecord(
            list(effects.sites),
            list(effects.positions),
            list(effects.tokens),
            [[number(v) for v in row] for row in effects.values],
            effects.metric,
            effects.kind,
            _text(effects.clean_prompt),
            _text(effects.corrupt_prompt),
            number(effects.clean),
            number(effects.corrupt),
            nan_cells=sum(1 for row in effects.values for v in row if _is_nan(v)),
        )
        if not _append(rec.finding.maps, entry):
            return
        rec.remember(effects, entry)
    entry.mark(failing, claimed)


@_safe
def record_peaks(
    rec: Recorder,
    effects: Any,
    claimed: Sequence[tuple[int, int]],
    bad: Sequence[tuple[Any, ...]],
    at_least: float,
    elsewhere_at_most: float,
) -> None:
    """assert_peaks_at's map with its claimed and failing cells, and its two checks (peak cells, everywhere else)."""
    want = set(claimed)
    inside = [effects.values[i][j] for i, j in want]
    outside = [abs(v) for i, row in enumerate(effects.values) for j, v in enumerate(row) if (i, j) not in want]
    record_map(effects, failing=[(b[0], b[1]) for b in bad], claimed=sorted(want))
    nan = math.nan
    record_check(
        "smallest effect at the claimed cells",
        min(inside) if inside and all(map(math.isfinite, inside)) else nan,
        ">=",
        at_least,
    )
    record_check(
        "largest |effect| elsewhere",
        max(outside) if outside and all(map(math.isfinite, outside)) else (0.0 if not outside else nan),
        "<=",
        elsewhere_at_most,
    )


@_safe
def record_population(rec: Recorder, result: Any, min_rate: float | None = None, on: str | None = None) -> None:
    """A PopulationResult: effect per variant, pass rate, Wilson bound; `min_rate`/`on` once asserted."""
    entry = rec.seen(result)
    if entry is None:
        entry = PopulationRecord(
            result.site,
            repr(result.position),
            result.metric,
            result.n,
            result.passed,
            number(result.rate),
            number(result.lower_bound),
            number(result.mean),
            number(result.std),
            number(result.threshold),
            [number(e) for e in result.effects[:MAX_VALUES]],
            nan=sum(1 for e in result.effects if _is_nan(e)),
        )
        if not _append(rec.finding.populations, entry):
            return
        rec.remember(result, entry)
    if min_rate is not None:
        entry.min_rate = number(min_rate)
    if on is not None:
        entry.on = on


@_safe
def record_circuit(
    rec: Recorder, circuit: Any, claimed: Sequence[tuple[str, str]] = (), missing: Sequence[tuple[str, str]] = ()
) -> None:
    """A Circuit (edges with scores, or nodes), with the edges a test claims and those it found missing, for the drawing."""
    entry = CircuitRecord(
        circuit.metric,
        circuit.method,
        list(circuit.nodes),
        [[s, r, number(v)] for s, r, v in circuit.ranked()],
        [list(e) for e in claimed],
        [list(e) for e in missing],
    )
    for old in (
        rec.finding.circuits
    ):  # the same circuit recorded again (discover, then a claim on it): keep the one with claims
        if old.edges == entry.edges and old.nodes == entry.nodes:
            old.claimed = [list(e) for e in sorted({tuple(e) for e in old.claimed + entry.claimed})]
            old.missing = [list(e) for e in sorted({tuple(e) for e in old.missing + entry.missing})]
            return
    _append(rec.finding.circuits, entry)


@_safe
def record_probe(rec: Recorder, result: Any) -> None:
    """A ProbeResult: accuracy, interval, baselines, and the 2-D PCA of the probed activations coloured by label."""
    if len(rec.finding.probes) >= MAX_PROBES or rec.seen(result) is not None:  # fitted here, then asserted
        return
    extra = getattr(result, "extra", None) or {}
    pca = extra.get("pca") or {}
    points = [list(p) for p in pca.get("points", [])]
    labels = [str(x) for x in extra.get("labels", [])][: len(points)]
    entry = ProbeRecord(
        str(result.site),
        str(result.position),
        number(result.accuracy),
        [number(result.ci[0]), number(result.ci[1])],
        number(result.majority),
        number(result.control),
        int(result.n_test),
        len(result.classes),
        PCA(points, list(pca.get("explained", [])), labels),
    )
    rec.finding.probes.append(entry)
    rec.remember(result, entry)


@_safe
def record_lens(rec: Recorder, lens: Any) -> None:
    """A LogitLens: the answer's rank and probability per site x position, for the report's heatmap."""
    _append(
        rec.finding.lenses,
        LensRecord(
            _text(lens.prompt),
            lens.answer,
            list(lens.sites),
            list(lens.positions),
            [lens.tokens[p] for p in lens.positions],
            [list(r) for r in lens.ranks],
            [[number(v) for v in row] for row in lens.probs],
        ),
    )


@_safe
def record_generation(
    rec: Recorder, baseline: Any, intervened: Any = None, scores: Any = None, expected: Any = ()
) -> None:
    """Generated text per prompt, baseline and intervened side by side, with the decoding and the scores.

    A single generation goes in the column its intervention names: 'baseline' when it had none, else 'intervened'.
    """
    if intervened is None and baseline.intervention != "none":
        baseline, intervened, columns = None, baseline, ("intervened",)
    else:
        columns = ("baseline",) if intervened is None else ("baseline", "intervened")
    first = baseline if baseline is not None else intervened
    rows = []
    for k, prompt in enumerate(first.prompts[:MAX_ITEMS]):
        row: dict[str, Any] = {"prompt": _text(prompt)}
        if expected:
            row["expected"] = expected[k]
        for name, gen in zip(("baseline", "intervened"), (baseline, intervened)):
            if name in columns:
                row[name] = gen.texts[k]
        for name, values in (scores or {}).items():
            row[name] = number(values[k])
        rows.append(row)
    _append(
        rec.finding.generations,
        GenerationRecord(first.config.describe(), intervened.intervention if intervened is not None else "", rows),
    )


@_safe
def record_note(rec: Recorder, line: str) -> None:
    """A line for the terminal's snapshots section ('re-verified under a new environment: ...'), sent with the record."""
    if line not in rec.finding.notes:
        rec.finding.notes.append(line)


@_safe
def record_unserved(rec: Recorder, model: str) -> None:
    """A verb ran on a model the fixtures did not serve, so it ran with the default settings, not the run's options."""
    if model not in rec.finding.unserved and len(rec.finding.unserved) < 20:
        rec.finding.unserved.append(model)


@_safe
def record_snapshot(rec: Recorder, assertion: Any, data: Any) -> None:
    """The status of the finding_snapshot assertion that just ran: new, written, matched, re-verified, drifted, updated."""
    from .snapshots.syrupy_adapter import last_result  # stdlib only

    res = last_result(assertion)
    if res is None:
        return
    out = getattr(assertion.extension, "last", None)
    compared = out is not None and out.received == res.asserted_data and out.stored == res.recalled_data
    if res.recalled_data is None:
        status, detail = (
            ("written", "recorded by --snapshot-update") if res.success else ("new", "no finding recorded yet")
        )
    elif not compared:
        status, detail = ("matched" if res.success else "failed"), ""
    elif not out.comparison.ok or (out.weights and not res.success):
        status = "updated" if res.success else "drifted"
        what = ", ".join(out.changes) or ("weights" if out.weights else "same environment")
        cmp = out.comparison
        moved = (
            f"{len(cmp.moved)} / {len(cmp.cells)} values moved beyond {cmp.tolerance}"
            if cmp.moved
            else "; ".join(cmp.structural[:2])
        )
        detail = "; ".join(x for x in (what, moved) if x)
    elif out.changes or out.weights:
        status, detail = (
            ("re-verified" if res.success and not res.updated else "updated"),
            ", ".join(out.changes) or "weights changed",
        )
    else:
        status, detail = "matched", ""
    entry = SnapshotRecord(res.snapshot_name, status, detail, str(res.snapshot_location))
    if status in ("new", "drifted") and isinstance(
        res.asserted_data, str
    ):  # what --nnsight-review writes when accepted
        entry.received = res.asserted_data
    if compared and (
        status in ("drifted", "updated")
        or (status == "re-verified" and any(c.abs_err > 0 for c in out.comparison.cells))
    ):
        entry.drift = drift_of(out.comparison, out.changes, out.weights)
    _append(rec.finding.snapshots, entry)
    if hasattr(data, "sites") and hasattr(data, "values") and hasattr(data, "tokens"):
        record_map(data)


def _grid(values: Any) -> list[list[float | None]]:
    return (
        [[number(v) for v in row] if isinstance(row, list) else [] for row in values]
        if isinstance(values, list)
        else []
    )


def drift_of(cmp: Any, changes: Sequence[str], weights: Any = None) -> Drift:
    """The recorded and the new finding side by side, for the report's drift figure and the review.

    `moved`: cells beyond tolerance; `changed`: cells whose value differs at all (a re-verified finding
    has none moved, maybe some changed). A map gives both grids; a population both effect lists.
    """
    moved = {c.path for c in cmp.moved}
    abs_errs = [c.abs_err for c in cmp.cells]
    out = Drift(
        list(changes) + ([f"weights {weights[0]} -> {weights[1]}"] if weights else []),
        str(cmp.tolerance),
        len(cmp.cells),
        len(moved),
        sum(1 for e in abs_errs if e > 0),
        number(max(abs_errs, default=0.0)),
        list(cmp.structural[:10]),
    )
    old, new = cmp.old_finding, cmp.new_finding
    if all(
        isinstance(f, dict) and isinstance(f.get("values"), list) and isinstance(f.get("sites"), list)
        for f in (old, new)
    ):
        cells = [
            (c.path[1], c.path[2], c.path in moved, c.abs_err > 0)
            for c in cmp.cells
            if len(c.path) == 3 and c.path[0] == "values" and isinstance(c.path[1], int)
        ]
        out.map = MapDrift(
            list(new["sites"]),
            list(new.get("tokens") or []),
            list(new.get("positions") or range(len(new.get("tokens") or []))),
            list(old["sites"]),
            list(old.get("tokens") or []),
            _grid(old["values"]),
            _grid(new["values"]),
            str(new.get("metric", "")),
            [[i, j] for i, j, m, _ in cells if m],
            [[i, j] for i, j, _, ch in cells if ch],
        )
    elif all(isinstance(f, dict) and isinstance(f.get("effects"), list) for f in (old, new)):
        out.population = PopulationDrift(
            [number(v) for v in old["effects"][:MAX_VALUES]],
            [number(v) for v in new["effects"][:MAX_VALUES]],
            number(new.get("threshold")),
            str(new.get("site", "")),
            sum(1 for c in cmp.cells if c.path in moved and c.path[:1] == ("effects",)),
        )
    return out
