"""The records of a run: open a recorder around each test and fixture, send its record on the report, gather them.

The plugin's hooks call `start`/`finish` around a test's call and `start_fixture`/`finish_fixture` around a
fixture's set-up; `attach` puts the item's records on its report as plain dicts (`report.nnsight_findings`),
which pytest-xdist serializes back to the controller; there `RunRecords` rebuilds them as `records.Finding`
with the test's outcome, for the terminal summary, the report and the review. Imports only the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .findings import MAX_ITEMS, Recorder, close_recorder, open_recorder
from .records import Finding, fmt, number, percent

# on a TestReport: the records it carries, as plain dicts (the test's own, its fixtures')
REPORT_ATTR = "nnsight_findings"
MARKER = "finding(claim): the claim this test checks, in words; the findings summary and report show it (default: the test name)."


def start(item: Any) -> Recorder:
    """Open the recorder of `item` (the plugin's pytest_runtest_call wrapper)."""
    return open_recorder(Finding(item.nodeid, _claim(item), marked=item.get_closest_marker("finding") is not None))


def start_fixture(fixturedef: Any, request: Any) -> Recorder:
    """Open a recorder for a fixture being set up: sweeps and populations computed in (module- or session-scoped)
    fixtures are recorded as a finding of their own, naming the tests that use the fixture."""
    name, scope = fixturedef.argname, fixturedef.scope
    return open_recorder(
        Finding(
            f"{fixturedef.baseid or '<conftest>'}::<fixture {name}>",
            f"measured in fixture {name!r} ({scope}-scoped)",
            fixture=name,
            scope=scope,
        )
    )


def finish_fixture(fixturedef: Any, request: Any, rec: Recorder) -> None:
    """Close a fixture's recorder; a record with anything in it rides on the reports of the test that set the fixture up."""
    finding = close_recorder(rec)
    if not (finding.measured() or finding.notes or finding.unserved):
        return
    session = getattr(request, "session", None)
    finding.used_by = [
        i.nodeid for i in getattr(session, "items", []) if fixturedef in _fixturedefs(i, fixturedef.argname)
    ][:MAX_ITEMS]
    item = getattr(request, "_pyfuncitem", None) or getattr(request, "node", None)
    if item is not None:
        _pending(item).append(finding)


# pytest.StashKey[list[Finding]], made on first use (this module imports only the standard library)
_PENDING: Any = None


def _pending(item: Any) -> list[Finding]:
    """The item's records not yet sent on a report (pytest's item.stash; a plain list where an item has no stash)."""
    global _PENDING
    stash = getattr(item, "stash", None)
    if stash is None:
        return []
    if _PENDING is None:
        import pytest

        _PENDING = pytest.StashKey[list]()
    return stash.setdefault(_PENDING, [])


def _fixturedefs(item: Any, name: str) -> Sequence[Any]:
    info = getattr(item, "_fixtureinfo", None)
    return tuple(getattr(info, "name2fixturedefs", {}).get(name, ())) if info is not None else ()


def finish(item: Any, rec: Recorder) -> None:
    """Close the test's recorder, keep its record in the item's stash, add its key numbers to the JUnit XML properties."""
    finding = close_recorder(rec)
    if not (finding.measured() or finding.marked or finding.notes or finding.unserved):
        return
    _pending(item).append(finding)  # sent by attach() when the call's report is made
    try:
        item.user_properties.extend(junit_properties(finding))
    except Exception:
        pass


def attach(item: Any, report: Any) -> None:
    """Put the item's pending records on its report, as plain dicts (a marked test skipped or failing at setup gets a bare one).

    A fixture's record goes on the report of the phase that set the fixture up; the test's own on its call report.
    """
    pending = _pending(item)
    own = [f for f in pending if not f.fixture]
    send = [f for f in pending if f.fixture]
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if not own and report.when == "setup" and item.get_closest_marker("finding") is not None:
            own = [Finding(item.nodeid, _claim(item), marked=True)]
        send += own
        own = []
    pending[:] = own
    if send:
        setattr(report, REPORT_ATTR, [f.to_dict() for f in send])


def _claim(item: Any) -> str:
    """The finding marker's claim (`finding("...")` or `finding(claim="...")`), else the test's name."""
    marker = item.get_closest_marker("finding")
    claim = (marker.args[0] if marker.args else marker.kwargs.get("claim")) if marker is not None else None
    return str(claim) if claim else str(item.name)


def junit_properties(finding: Finding) -> Iterator[tuple[str, Any]]:
    """Key numbers of a record as (name, value) pairs for `item.user_properties` (JUnit XML <property>)."""
    yield "nnsight_claim", finding.claim
    check = finding.primary_check()
    if check is not None:
        yield "nnsight_measured", check.measured
        yield "nnsight_threshold", f"{check.op} {check.threshold}"
        yield "nnsight_checks_passed", f"{sum(c.passed for c in finding.checks)}/{len(finding.checks)}"
    elif finding.effects:
        yield "nnsight_measured", finding.effects[-1].normalized
    for p in finding.populations[:1]:
        yield "nnsight_pass_rate", p.rate
        yield "nnsight_variants", f"{p.passed}/{p.n}"
        yield "nnsight_wilson_lower", p.lower_bound
    for m in finding.maps[:1]:
        peak = max(
            ((v, i, j) for i, row in enumerate(m.values) for j, v in enumerate(row) if v is not None), default=None
        )
        if peak is not None:
            yield (
                "nnsight_map_peak",
                f"{peak[0]:.6g} at {m.sites[peak[1]]} / {m.positions[peak[2]]} {m.tokens[peak[2]]!r}",
            )
    for s in finding.snapshots[:1]:
        yield "nnsight_snapshot_status", s.status
    for line in finding.notes:  # read by the version matrix (CI/matrix_collect.py) from the JUnit properties
        yield "nnsight_snapshot", line


@dataclass
class RunRecords:
    """The finding records of one run, in report order (the controller's, under xdist), and the snapshot notes."""

    records: list[Finding] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (nodeid, line) for the snapshots section
    unserved: dict[str, list[str]] = field(default_factory=dict)  # nodeid -> models the fixtures did not serve
    band: float = 1.5  # |normalized effect| above this is suspicious (--nnsight-suspicious-effect)

    def add(self, report: Any) -> None:
        """Keep the records a report carries, with the test's outcome, duration and failure message."""
        for data in getattr(report, REPORT_ATTR, None) or ():
            if not isinstance(data, dict):
                continue
            finding = Finding.from_dict(data)
            self.notes += [(report.nodeid, line) for line in finding.notes if (report.nodeid, line) not in self.notes]
            if finding.unserved:
                seen = self.unserved.setdefault(finding.nodeid, [])
                seen += [m for m in finding.unserved if m not in seen]
            if not (finding.measured() or finding.marked):
                continue  # notes only (a structure snapshot re-verified): not a finding
            if finding.fixture:
                finding.outcome, finding.when, finding.duration = "fixture", "setup", None
            else:
                finding.outcome, finding.when = report.outcome, report.when
                finding.duration = number(getattr(report, "duration", None))
                if hasattr(report, "wasxfail"):
                    finding.outcome = "xfailed" if report.skipped else "xpassed"
                elif report.when == "setup" and report.failed:
                    finding.outcome = "error"
                if report.failed:
                    finding.message = failure_message(report)
            finding.suspicious = suspicious(finding, self.band)
            self.records.append(finding)


MESSAGE_LINES = 8


def failure_message(report: Any) -> str:
    """The first lines of a failed test's assertion text (pytest's `E` lines), else its crash line."""
    text = getattr(report, "longreprtext", "") or ""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    lines = [line for line in lines if line]
    if lines:
        # 'pytest_nnsight.errors.FindingFailed: ' -> 'FindingFailed: '
        lines[0] = re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", lines[0])
    if not lines:
        crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
        tail = text.strip().splitlines()
        msg = str(getattr(crash, "message", "") or "") or (tail[-1] if tail else "")
        lines = msg.splitlines()[:MESSAGE_LINES] if msg else []
    more = f"\n... ({len(lines) - MESSAGE_LINES} more lines)" if len(lines) > MESSAGE_LINES else ""
    return "\n".join(lines[:MESSAGE_LINES]) + more


def suspicious(finding: Finding, band: float) -> list[str]:
    """Implausible values of a record: normalized patch effects with |effect| > band, and NaN anywhere."""
    out: list[str] = []

    def big(v: Any) -> bool:
        return v is not None and abs(v) > band

    for e in finding.effects:
        if e.nan:
            out.append(f"NaN effect of the {e.kind} at {e.site}")
        elif e.kind == "patch" and big(e.normalized):
            out.append(f"normalized effect {e.normalized:.4g} of the patch at {e.site} (|effect| > {band:g})")
    for m in finding.maps:
        if m.nan_cells:
            out.append(f"{m.nan_cells} NaN cells in the {m.kind} map of {m.metric}")
        if m.kind in ("patch", "attribution"):
            cells = [
                (abs(v), m.sites[i], m.positions[j])
                for i, row in enumerate(m.values)
                for j, v in enumerate(row)
                if big(v)
            ]
            if cells:
                worst = max(cells)
                out.append(
                    f"{len(cells)} cells of the {m.kind} map with |effect| > {band:g} (largest {worst[0]:.4g} at {worst[1]} / {worst[2]})"
                )
    for p in finding.populations:
        if p.nan:
            out.append(f"{p.nan} of {p.n} variants with a NaN effect at {p.site} (clean and corrupt barely differ)")
        over = [v for v in p.effects if big(v)]
        if over:
            out.append(
                f"{len(over)} of {p.n} variants with |effect| > {band:g} at {p.site} (largest {max(map(abs, over)):.4g})"
            )
    return out[:20]


def summary_line(finding: Finding, *, outcome: bool = True) -> str:
    """One finding in one line: outcome, claim, measured vs threshold, variants, snapshot status, suspicious values."""
    parts = [f"{finding.outcome.upper()} {finding.claim}" if outcome else finding.claim]
    check = finding.primary_check()
    if check is not None:
        shown = [check] + [c for c in finding.checks if c is not check][: 1 if len(finding.checks) == 2 else 0]
        more = f" (+{len(finding.checks) - len(shown)} more checks)" if len(finding.checks) > len(shown) else ""
        for c in shown:
            versus = f"{c.op} {fmt(c.threshold)}" if c.threshold is not None else ("(holds)" if c.passed else "(fails)")
            parts.append(f"{c.what}: {fmt(c.measured)} {versus}")
        parts[-1] += more
    elif finding.effects:
        e = finding.effects[-1]
        parts.append(f"normalized effect of the {e.kind} at {e.site}: {fmt(e.normalized)} (no threshold recorded)")
    for p in finding.populations:
        parts.append(
            f"variants {p.passed}/{p.n} >= {fmt(p.threshold)} ({percent(p.rate)}, Wilson lower {fmt(p.lower_bound)})"
        )
    vals = finding.variant_effects()
    if vals and not finding.populations:
        parts.append(f"{len(vals)} variants: effect {min(vals):.3g}..{max(vals):.3g}")
    for s in finding.snapshots:
        parts.append(f"snapshot {s.status}" + (f" ({s.detail})" if s.detail else ""))
    if finding.suspicious:
        parts.append("SUSPICIOUS: " + "; ".join(finding.suspicious[:3]))
    if finding.message:
        parts.append("failed: " + finding.message.splitlines()[0][:160])
    return " | ".join(parts) + f"  [{finding.nodeid}]"


def terminal_summary(terminalreporter: Any, records: RunRecords, show: bool) -> None:
    """The 'pytest-nnsight findings' section: shown with -v or --nnsight-summary, quiet otherwise."""
    odd = [r for r in records.records if r.suspicious]
    if odd:  # shown whatever the verbosity: an implausible number that passed is the worst kind of pass
        terminalreporter.section("pytest-nnsight suspicious values")
        for finding in odd:
            terminalreporter.write_line(f"{finding.outcome.upper()} {finding.claim}  [{finding.nodeid}]", yellow=True)
            for line in finding.suspicious:
                terminalreporter.write_line(f"  {line}")
    if not show or not records.records:
        return
    terminalreporter.section("pytest-nnsight findings")
    for finding in records.records:
        terminalreporter.write_line(summary_line(finding))


def unserved_summary(terminalreporter: Any, records: RunRecords, asked: Sequence[str]) -> None:
    """'pytest-nnsight settings not applied': the run asked for options that travel with served models
    (`asked`: --nnsight-check-batching, --nnsight-remote ...), and some tests ran verbs on models the fixtures
    did not serve, which ran with the defaults instead. Said, never silent."""
    if not asked or not records.unserved:
        return
    terminalreporter.section("pytest-nnsight settings not applied")
    n = len(records.unserved)
    terminalreporter.write_line(
        f"{' and '.join(asked)} did not reach {n} test{'s' if n != 1 else ''} that ran verbs on a model the fixtures "
        "did not serve (such a model runs with the default settings):",
        yellow=True,
    )
    for nodeid, models in records.unserved.items():
        terminalreporter.write_line(f"  {nodeid}: {', '.join(models)}")
    terminalreporter.write_line(
        "serve the model through nnsight_model(module, tokenizer) to have the run's options apply to it, "
        "or pass check_batching=True to the verb"
    )
