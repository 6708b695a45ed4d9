"""What each finding test measured, recorded while it runs, for the terminal summary, the report and JUnit XML.

The assertion helpers, populations, sweeps and the snapshot fixture call the `record_*` functions;
they write into the recorder of the test now running (set by the plugin's `pytest_runtest_call`
wrapper) and do nothing, at the cost of one global read, when no test is running. Recording never
changes a test's outcome: every recorder swallows its own errors. The record travels on the test's
report as a plain dict (`report.nnsight_finding`), which pytest-xdist serializes back to the
controller with the rest of the report. Imports only the standard library.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

REPORT_ATTR = "nnsight_finding"  # the record's attribute on a TestReport
FIXTURE_ATTR = "nnsight_fixture_findings"  # records of fixtures set up for that test, on its report
MARKER = "finding(claim): the claim this test checks, in words; the findings summary and report show it (default: the test name)."
MAX_ITEMS = 500  # per list: a hypothesis test recording each example stays bounded
MAX_VALUES = 4096  # per population: effects kept for the histogram


@dataclass
class Recorder:
    """What one test measured: checks (value vs threshold), effect maps, effects, populations, snapshot statuses."""

    nodeid: str
    claim: str
    marked: bool = False
    checks: list[dict[str, Any]] = field(default_factory=list)
    maps: list[dict[str, Any]] = field(default_factory=list)
    effects: list[dict[str, Any]] = field(default_factory=list)
    populations: list[dict[str, Any]] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    lenses: list[dict[str, Any]] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)
    circuits: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    _map_ids: dict[int, int] = field(default_factory=dict, repr=False)
    _effects_seen: list[Any] = field(default_factory=list, repr=False)  # the Effect objects recorded (identity, not equality)

    def empty(self) -> bool:
        return not (self.checks or self.maps or self.effects or self.populations or self.snapshots or self.lenses or self.generations
                    or self.circuits or self.probes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_map_ids")
        d.pop("_effects_seen")
        return d


_STACK: list[Recorder] = []  # a stack: pytest run inside a test (pytester) records into the inner test


def current() -> Recorder | None:
    """The running test's recorder, or None outside a test."""
    return _STACK[-1] if _STACK else None


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


def _num(x: Any) -> float | None:
    """A JSON-safe float: None for NaN and infinities (JSON has neither)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _text(x: Any) -> str | None:
    """A plain str (None stays None): a str subclass (TokenPrompt) in a record would stop xdist sending the report."""
    return None if x is None else str(x)


def _is_nan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _append(items: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    if len(items) < MAX_ITEMS:
        items.append(entry)


@_safe
def record_check(rec: Recorder, what: str, measured: Any, op: str, threshold: Any, *, site: str = "", detail: str = "",
                 passed: bool | None = None) -> None:
    """A claim `measured op threshold` (op: >=, <=) checked by an assertion helper, and whether it held."""
    m, t = _num(measured), _num(threshold)
    if passed is None:
        passed = m is not None and t is not None and (m >= t if op == ">=" else m <= t)
    _append(rec.checks, {"what": what, "measured": m, "op": op, "threshold": t, "passed": passed, "site": site, "detail": detail})


@_safe
def record_effect(rec: Recorder, effect: Any) -> None:
    """One intervention's Effect (patch, ablation, steering): its normalized value and raw numbers; once per object."""
    if any(seen is effect for seen in rec._effects_seen):
        return
    rec._effects_seen.append(effect)
    _append(rec.effects, {"kind": effect.kind, "site": effect.site, "positions": list(effect.positions),
                          "tokens": list(effect.position_tokens), "metric": effect.metric, "prompt": _text(effect.target_prompt),
                          "source": _num(effect.source), "target": _num(effect.target), "intervened": _num(effect.intervened),
                          "normalized": _num(effect.normalized), "controls": {k: _num(v) for k, v in effect.controls.items()},
                          "nan": _is_nan(effect.normalized)})


def recorded(effect: Any) -> Any:
    """`effect`, recorded for the findings report: the verbs return `recorded(Effect(...))`."""
    record_effect(effect)
    return effect


@_safe
def record_map(rec: Recorder, effects: Any, failing: Sequence[tuple[int, int]] = (), claimed: Sequence[tuple[int, int]] = ()) -> None:
    """An EffectMap (sites x positions, with token strings); the same map again only adds failing and claimed cells."""
    key = id(effects)
    if key in rec._map_ids:
        entry = rec.maps[rec._map_ids[key]]
    else:
        if len(rec.maps) >= MAX_ITEMS:
            return
        entry = {"sites": list(effects.sites), "positions": list(effects.positions), "tokens": list(effects.tokens),
                 "values": [[_num(v) for v in row] for row in effects.values], "metric": effects.metric, "kind": effects.kind,
                 "clean_prompt": _text(effects.clean_prompt), "corrupt_prompt": _text(effects.corrupt_prompt),
                 "clean": _num(effects.clean), "corrupt": _num(effects.corrupt), "failing": [], "claimed": [],
                 "nan_cells": sum(1 for row in effects.values for v in row if _is_nan(v))}
        rec._map_ids[key] = len(rec.maps)
        rec.maps.append(entry)
    entry["failing"] = sorted({*map(tuple, entry["failing"]), *((int(i), int(j)) for i, j in failing)})
    entry["claimed"] = sorted({*map(tuple, entry["claimed"]), *((int(i), int(j)) for i, j in claimed)})
    entry["failing"] = [list(c) for c in entry["failing"]]
    entry["claimed"] = [list(c) for c in entry["claimed"]]


@_safe
def record_peaks(rec: Recorder, effects: Any, claimed: Sequence[tuple[int, int]], bad: Sequence[tuple[Any, ...]], at_least: float,
                 elsewhere_at_most: float) -> None:
    """assert_peaks_at's map with its claimed and failing cells, and its two checks (peak cells, everywhere else)."""
    want = set(claimed)
    inside = [effects.values[i][j] for i, j in want]
    outside = [abs(v) for i, row in enumerate(effects.values) for j, v in enumerate(row) if (i, j) not in want]
    record_map(effects, failing=[(b[0], b[1]) for b in bad], claimed=sorted(want))
    nan = math.nan
    record_check("smallest effect at the claimed cells", min(inside) if inside and all(map(math.isfinite, inside)) else nan, ">=", at_least)
    record_check("largest |effect| elsewhere", max(outside) if outside and all(map(math.isfinite, outside)) else (0.0 if not outside else nan),
                 "<=", elsewhere_at_most)


@_safe
def record_population(rec: Recorder, result: Any, min_rate: float | None = None, on: str | None = None) -> None:
    """A PopulationResult: effect per variant, pass rate, Wilson bound; `min_rate`/`on` once asserted."""
    for entry in rec.populations:
        if entry["_id"] == id(result):
            entry.update({k: v for k, v in (("min_rate", _num(min_rate)), ("on", on)) if v is not None})
            return
    _append(rec.populations, {
        "_id": id(result), "site": result.site, "position": repr(result.position), "metric": result.metric, "n": result.n,
        "passed": result.passed, "rate": _num(result.rate), "lower_bound": _num(result.lower_bound), "mean": _num(result.mean),
        "std": _num(result.std), "threshold": _num(result.threshold), "effects": [_num(e) for e in result.effects[:MAX_VALUES]],
        "min_rate": _num(min_rate), "on": on, "nan": sum(1 for e in result.effects if _is_nan(e)),
    })


@_safe
def record_circuit(rec: Recorder, circuit: Any, claimed: Sequence[tuple[str, str]] = (), missing: Sequence[tuple[str, str]] = ()) -> None:
    """A Circuit (edges with scores, or nodes), with the edges a test claims and those it found missing, for the drawing."""
    entry = {"metric": circuit.metric, "method": circuit.method, "nodes": list(circuit.nodes),
             "edges": [[s, r, _num(v)] for s, r, v in circuit.ranked()], "claimed": [list(e) for e in claimed],
             "missing": [list(e) for e in missing]}
    for old in rec.circuits:  # the same circuit recorded again (discover, then a claim on it): keep the one with claims
        if old["edges"] == entry["edges"] and old["nodes"] == entry["nodes"]:
            old["claimed"] = sorted({tuple(e) for e in old["claimed"] + entry["claimed"]})
            old["missing"] = sorted({tuple(e) for e in old["missing"] + entry["missing"]})
            return
    _append(rec.circuits, entry)


MAX_PROBES = 24  # per test: a probe sweep over every layer of a deep model stays bounded


@_safe
def record_probe(rec: Recorder, result: Any) -> None:
    """A ProbeResult: accuracy, interval, baselines, and the 2-D PCA of the probed activations coloured by label."""
    if len(rec.probes) >= MAX_PROBES or any(p["_id"] == id(result) for p in rec.probes):  # fitted here, then asserted
        return
    extra = getattr(result, "extra", None) or {}
    pca = extra.get("pca") or {}
    labels = [str(x) for x in extra.get("labels", [])][: len(pca.get("points", []))]
    rec.probes.append({"_id": id(result), "site": str(result.site), "position": str(result.position), "accuracy": _num(result.accuracy),
                       "ci": [_num(result.ci[0]), _num(result.ci[1])], "majority": _num(result.majority), "control": _num(result.control),
                       "n_test": int(result.n_test), "classes": len(result.classes),
                       "pca": {"points": pca.get("points", []), "explained": pca.get("explained", []), "labels": labels}})


@_safe
def record_lens(rec: Recorder, lens: Any) -> None:
    """A LogitLens: the answer's rank and probability per site x position, for the report's heatmap."""
    _append(rec.lenses, {"prompt": _text(lens.prompt), "answer": lens.answer, "sites": list(lens.sites), "positions": list(lens.positions),
                         "tokens": [lens.tokens[p] for p in lens.positions], "ranks": [list(r) for r in lens.ranks],
                         "probs": [[_num(v) for v in row] for row in lens.probs]})


@_safe
def record_generation(rec: Recorder, baseline: Any, intervened: Any = None, scores: Any = None, expected: Any = ()) -> None:
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
        row = {"prompt": _text(prompt)}
        if expected:
            row["expected"] = expected[k]
        for name, gen in zip(("baseline", "intervened"), (baseline, intervened)):
            if name in columns:
                row[name] = gen.texts[k]
        for name, values in (scores or {}).items():
            row[name] = _num(values[k])
        rows.append(row)
    _append(rec.generations, {"config": first.config.describe(), "intervention": intervened.intervention if intervened is not None else "",
                              "rows": rows})


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
        status, detail = ("written", "recorded by --snapshot-update") if res.success else ("new", "no finding recorded yet")
    elif not compared:
        status, detail = ("matched" if res.success else "failed"), ""
    elif not out.comparison.ok or (out.weights and not res.success):
        status = "updated" if res.success else "drifted"
        what = ", ".join(out.changes) or ("weights" if out.weights else "same environment")
        cmp = out.comparison
        moved = f"{len(cmp.moved)} / {len(cmp.cells)} values moved beyond {cmp.tolerance}" if cmp.moved else "; ".join(cmp.structural[:2])
        detail = "; ".join(x for x in (what, moved) if x)
    elif out.changes or out.weights:
        status, detail = ("re-verified" if res.success and not res.updated else "updated"), ", ".join(out.changes) or "weights changed"
    else:
        status, detail = "matched", ""
    entry = {"name": res.snapshot_name, "status": status, "detail": detail, "path": str(res.snapshot_location)}
    if status in ("new", "drifted"):  # what --nnsight-review writes when the finding is accepted
        entry["received"] = res.asserted_data if isinstance(res.asserted_data, str) else None
    if compared and (status in ("drifted", "updated") or (status == "re-verified" and any(c.abs_err > 0 for c in out.comparison.cells))):
        entry["drift"] = drift_of(out.comparison, out.changes, out.weights)
    _append(rec.snapshots, entry)
    if hasattr(data, "sites") and hasattr(data, "values") and hasattr(data, "tokens"):
        record_map(data)


def _grid(values: Any) -> list[list[float | None]]:
    return [[_num(v) for v in row] if isinstance(row, list) else [] for row in values] if isinstance(values, list) else []


def drift_of(cmp: Any, changes: Sequence[str], weights: Any = None) -> dict[str, Any]:
    """The recorded and the new finding side by side, for the report's drift figure and the review.

    `moved`: cells beyond tolerance; `changed`: cells whose value differs at all (a re-verified finding
    has none moved, maybe some changed). A map gives both grids; a population both effect lists.
    """
    moved = {c.path for c in cmp.moved}
    abs_errs = [c.abs_err for c in cmp.cells]
    out: dict[str, Any] = {
        "changes": list(changes) + ([f"weights {weights[0]} -> {weights[1]}"] if weights else []),
        "tolerance": str(cmp.tolerance), "cells": len(cmp.cells), "moved": len(moved),
        "changed": sum(1 for e in abs_errs if e > 0), "max_abs": _num(max(abs_errs, default=0.0)),
        "structural": list(cmp.structural[:10]),
    }
    old, new = cmp.old_finding, cmp.new_finding
    if all(isinstance(f, dict) and isinstance(f.get("values"), list) and isinstance(f.get("sites"), list) for f in (old, new)):
        cells = [(c.path[1], c.path[2], c.path in moved, c.abs_err > 0) for c in cmp.cells
                 if len(c.path) == 3 and c.path[0] == "values" and isinstance(c.path[1], int)]
        out["map"] = {"sites": list(new["sites"]), "tokens": list(new.get("tokens") or []),
                      "positions": list(new.get("positions") or range(len(new.get("tokens") or []))),
                      "old_sites": list(old["sites"]), "old_tokens": list(old.get("tokens") or []),
                      "old": _grid(old["values"]), "new": _grid(new["values"]), "metric": str(new.get("metric", "")),
                      "moved": [[i, j] for i, j, m, _ in cells if m], "changed": [[i, j] for i, j, _, ch in cells if ch]}
    elif all(isinstance(f, dict) and isinstance(f.get("effects"), list) for f in (old, new)):
        out["population"] = {"old": [_num(v) for v in old["effects"][:MAX_VALUES]], "new": [_num(v) for v in new["effects"][:MAX_VALUES]],
                             "threshold": _num(new.get("threshold")), "site": str(new.get("site", "")),
                             "moved": sum(1 for c in cmp.cells if c.path in moved and c.path[:1] == ("effects",))}
    return out


# --- the run's side: start and finish a test, collect the records of a run --------------------------------


def start(item: Any) -> Recorder:
    """Open the recorder of `item` (the plugin's pytest_runtest_call wrapper)."""
    rec = Recorder(item.nodeid, _claim(item), marked=item.get_closest_marker("finding") is not None)
    _STACK.append(rec)
    return rec


def start_fixture(fixturedef: Any, request: Any) -> Recorder:
    """Open a recorder for a fixture being set up: sweeps and populations computed in (module- or session-scoped)
    fixtures are recorded as a finding of their own, naming the tests that use the fixture."""
    name, scope = fixturedef.argname, fixturedef.scope
    rec = Recorder(f"{fixturedef.baseid or '<conftest>'}::<fixture {name}>", f"measured in fixture {name!r} ({scope}-scoped)")
    _STACK.append(rec)
    return rec


def finish_fixture(fixturedef: Any, request: Any, rec: Recorder) -> None:
    """Close a fixture's recorder; a non-empty record rides on the setup report of the test that set the fixture up."""
    if rec in _STACK:
        _STACK.remove(rec)
    if rec.empty():
        return
    session = getattr(request, "session", None)
    users = [i.nodeid for i in getattr(session, "items", []) if fixturedef in _fixturedefs(i, fixturedef.argname)]
    record = dict(rec.to_dict(), fixture=fixturedef.argname, scope=fixturedef.scope, used_by=users[:MAX_ITEMS])
    for p in record["populations"]:
        p.pop("_id", None)
    item = getattr(request, "_pyfuncitem", None) or getattr(request, "node", None)
    if item is not None:
        pending = _stashed(item, "fixture_findings")
        if pending is None:
            pending = []
            if not _stash(item, "fixture_findings", pending):
                return
        pending.append(record)


_KEYS: dict[str, Any] = {}


def _key(name: str) -> Any:
    """A pytest.StashKey per record kind, made on first use (this module imports only the standard library at load)."""
    if name not in _KEYS:
        import pytest

        _KEYS[name] = pytest.StashKey[Any]()
    return _KEYS[name]


def _stashed(item: Any, name: str) -> Any:
    """What finish()/finish_fixture() left in the item's stash for its reports (the one channel), or None."""
    stash = getattr(item, "stash", None)
    return stash.get(_key(name), None) if stash is not None else None


def _stash(item: Any, name: str, value: Any) -> bool:
    stash = getattr(item, "stash", None)
    if stash is None:
        return False
    stash[_key(name)] = value
    return True


def _fixturedefs(item: Any, name: str) -> Sequence[Any]:
    info = getattr(item, "_fixtureinfo", None)
    return tuple(getattr(info, "name2fixturedefs", {}).get(name, ())) if info is not None else ()


def finish(item: Any, rec: Recorder) -> None:
    """Close the recorder, keep its record on the item, add its key numbers to the JUnit XML properties."""
    if rec in _STACK:
        _STACK.remove(rec)
    if rec.empty() and not rec.marked:
        return
    for p in rec.populations + rec.probes:
        p.pop("_id", None)
    _stash(item, "finding", rec.to_dict())  # read by attach() when the call's report is made
    try:
        item.user_properties.extend(junit_properties(rec.to_dict()))
    except Exception:
        pass


def attach(item: Any, report: Any) -> None:
    """Put the item's record on its report (call phase; a marked test skipped or failing at setup gets a bare one)."""
    fixture_records = _stashed(item, "fixture_findings")
    if fixture_records:  # measured while fixtures were set up (this phase, or during the call for a fixture it requested)
        setattr(report, FIXTURE_ATTR, list(fixture_records))
        fixture_records.clear()
    record = _stashed(item, "finding")
    if record is None and report.when == "setup" and report.outcome != "passed" and item.get_closest_marker("finding") is not None:
        record = Recorder(item.nodeid, _claim(item), marked=True).to_dict()
    if record is not None and (report.when == "call" or (report.when == "setup" and report.outcome != "passed")):
        setattr(report, REPORT_ATTR, record)


def _claim(item: Any) -> str:
    """The finding marker's claim (`finding("...")` or `finding(claim="...")`), else the test's name."""
    marker = item.get_closest_marker("finding")
    claim = (marker.args[0] if marker.args else marker.kwargs.get("claim")) if marker is not None else None
    return str(claim) if claim else str(item.name)


def primary_check(record: dict[str, Any]) -> dict[str, Any] | None:
    """The check to show first: the first one that failed, else the one with the smallest margin."""
    checks = record.get("checks") or []
    failed = [c for c in checks if not c["passed"]]
    if failed:
        return failed[0]
    def margin(c: dict[str, Any]) -> float:
        if c["measured"] is None or c["threshold"] is None:
            return math.inf
        return c["measured"] - c["threshold"] if c["op"] == ">=" else c["threshold"] - c["measured"]
    return min(checks, key=margin) if checks else None


def variant_effects(record: dict[str, Any]) -> list[float]:
    """Normalized effects of one intervention repeated over prompts (a hypothesis test's examples): >= 3 at one kind and site."""
    effects = record.get("effects") or []
    if len(effects) < 3 or len({(e["kind"], e["site"]) for e in effects}) != 1:
        return []
    return [e["normalized"] for e in effects if e["normalized"] is not None]


def junit_properties(record: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Key numbers of a record as (name, value) pairs for `item.user_properties` (JUnit XML <property>)."""
    yield "nnsight_claim", record["claim"]
    check = primary_check(record)
    if check is not None:
        yield "nnsight_measured", check["measured"]
        yield "nnsight_threshold", f"{check['op']} {check['threshold']}"
        yield "nnsight_checks_passed", f"{sum(c['passed'] for c in record['checks'])}/{len(record['checks'])}"
    elif record.get("effects"):
        yield "nnsight_measured", record["effects"][-1]["normalized"]
    for p in record.get("populations", [])[:1]:
        yield "nnsight_pass_rate", p["rate"]
        yield "nnsight_variants", f"{p['passed']}/{p['n']}"
        yield "nnsight_wilson_lower", p["lower_bound"]
    for m in record.get("maps", [])[:1]:
        peak = max(((v, i, j) for i, row in enumerate(m["values"]) for j, v in enumerate(row) if v is not None), default=None)
        if peak is not None:
            yield "nnsight_map_peak", f"{peak[0]:.6g} at {m['sites'][peak[1]]} / {m['positions'][peak[2]]} {m['tokens'][peak[2]]!r}"
    for s in record.get("snapshots", [])[:1]:
        yield "nnsight_snapshot_status", s["status"]


@dataclass
class RunRecords:
    """The finding records of one run, in report order (the controller's, under xdist)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    band: float = 1.5  # |normalized effect| above this is suspicious (--nnsight-suspicious-effect)

    def add(self, report: Any) -> None:
        for fixture in getattr(report, FIXTURE_ATTR, None) or ():
            if isinstance(fixture, dict):
                fixture = dict(fixture, outcome="fixture", duration=None, when="setup")
                fixture["suspicious"] = suspicious(fixture, self.band)
                self.records.append(fixture)
        record = getattr(report, REPORT_ATTR, None)
        if not isinstance(record, dict):
            return
        record = dict(record, outcome=report.outcome, duration=_num(getattr(report, "duration", None)), when=report.when)
        if hasattr(report, "wasxfail"):
            record["outcome"] = "xfailed" if report.skipped else "xpassed"
        elif report.when == "setup" and report.failed:
            record["outcome"] = "error"
        if report.failed:
            record["message"] = failure_message(report)
        record["suspicious"] = suspicious(record, self.band)
        self.records.append(record)


MESSAGE_LINES = 8


def failure_message(report: Any) -> str:
    """The first lines of a failed test's assertion text (pytest's `E` lines), else its crash line."""
    text = getattr(report, "longreprtext", "") or ""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    lines = [line for line in lines if line]
    if lines:
        lines[0] = re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", lines[0])  # 'pytest_nnsight.errors.FindingFailed: ' -> 'FindingFailed: '
    if not lines:
        crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
        tail = text.strip().splitlines()
        msg = str(getattr(crash, "message", "") or "") or (tail[-1] if tail else "")
        lines = msg.splitlines()[:MESSAGE_LINES] if msg else []
    more = f"\n... ({len(lines) - MESSAGE_LINES} more lines)" if len(lines) > MESSAGE_LINES else ""
    return "\n".join(lines[:MESSAGE_LINES]) + more


def suspicious(record: dict[str, Any], band: float) -> list[str]:
    """Implausible values of a record: normalized patch effects with |effect| > band, and NaN anywhere."""
    out: list[str] = []

    def big(v: Any) -> bool:
        return v is not None and abs(v) > band

    for e in record.get("effects") or []:
        if e.get("nan"):
            out.append(f"NaN effect of the {e['kind']} at {e['site']}")
        elif e["kind"] == "patch" and big(e["normalized"]):
            out.append(f"normalized effect {e['normalized']:.4g} of the patch at {e['site']} (|effect| > {band:g})")
    for m in record.get("maps") or []:
        if m.get("nan_cells"):
            out.append(f"{m['nan_cells']} NaN cells in the {m['kind']} map of {m['metric']}")
        if m["kind"] in ("patch", "attribution"):
            cells = [(abs(v), m["sites"][i], m["positions"][j]) for i, row in enumerate(m["values"]) for j, v in enumerate(row) if big(v)]
            if cells:
                worst = max(cells)
                out.append(f"{len(cells)} cells of the {m['kind']} map with |effect| > {band:g} (largest {worst[0]:.4g} at {worst[1]} / {worst[2]})")
    for p in record.get("populations") or []:
        if p.get("nan"):
            out.append(f"{p['nan']} of {p['n']} variants with a NaN effect at {p['site']} (clean and corrupt barely differ)")
        over = [v for v in p.get("effects") or [] if big(v)]
        if over:
            out.append(f"{len(over)} of {p['n']} variants with |effect| > {band:g} at {p['site']} (largest {max(map(abs, over)):.4g})")
    return out[:20]


def fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def summary_line(record: dict[str, Any], *, outcome: bool = True) -> str:
    """One finding in one line: outcome, claim, measured vs threshold, variants, snapshot status, suspicious values."""
    parts = [f"{record['outcome'].upper()} {record['claim']}" if outcome else record["claim"]]
    check = primary_check(record)
    if check is not None:
        shown = [check] + [c for c in record["checks"] if c is not check][: 1 if len(record["checks"]) == 2 else 0]
        more = f" (+{len(record['checks']) - len(shown)} more checks)" if len(record["checks"]) > len(shown) else ""
        for c in shown:
            versus = f"{c['op']} {fmt(c['threshold'])}" if c["threshold"] is not None else ("(holds)" if c["passed"] else "(fails)")
            parts.append(f"{c['what']}: {fmt(c['measured'])} {versus}")
        parts[-1] += more
    elif record.get("effects"):
        e = record["effects"][-1]
        parts.append(f"normalized effect of the {e['kind']} at {e['site']}: {fmt(e['normalized'])} (no threshold recorded)")
    for p in record.get("populations", []):
        parts.append(f"variants {p['passed']}/{p['n']} >= {fmt(p['threshold'])} ({p['rate']:.1%}, Wilson lower {fmt(p['lower_bound'])})")
    vals = variant_effects(record)
    if vals and not record.get("populations"):
        parts.append(f"{len(vals)} variants: effect {min(vals):.3g}..{max(vals):.3g}")
    for s in record.get("snapshots", []):
        parts.append(f"snapshot {s['status']}" + (f" ({s['detail']})" if s["detail"] else ""))
    if record.get("suspicious"):
        parts.append("SUSPICIOUS: " + "; ".join(record["suspicious"][:3]))
    if record.get("message"):
        parts.append("failed: " + record["message"].splitlines()[0][:160])
    return " | ".join(parts) + f"  [{record['nodeid']}]"


def terminal_summary(terminalreporter: Any, records: RunRecords, show: bool) -> None:
    """The 'pytest-nnsight findings' section: shown with -v or --nnsight-summary, quiet otherwise."""
    odd = [r for r in records.records if r.get("suspicious")]
    if odd:  # shown whatever the verbosity: an implausible number that passed is the worst kind of pass
        terminalreporter.section("pytest-nnsight suspicious values")
        for record in odd:
            terminalreporter.write_line(f"{record['outcome'].upper()} {record['claim']}  [{record['nodeid']}]", yellow=True)
            for line in record["suspicious"]:
                terminalreporter.write_line(f"  {line}")
    if not show or not records.records:
        return
    terminalreporter.section("pytest-nnsight findings")
    for record in records.records:
        terminalreporter.write_line(summary_line(record))
