"""What the plugin's hooks do for findings snapshots: run state, skip records, the summary.

Imports only pytest and the standard library (the `finding_snapshot` fixture, in fixtures.py, loads
syrupy's classes), so the plugin stays light at start-up.

Skipped is not stale. syrupy already keeps the snapshots of tests skipped at setup or in the call
(they count as skipped items, never as unused). Two gaps remain, and are closed here:
a module skipped as a whole at collection (``pytest.skip(allow_module_level=True)``,
``pytest.importorskip``) yields no items, but syrupy still counts it as collected, so its snapshots
would be reported unused and deleted by ``--snapshot-update``; ``module_skipped`` removes such a
module from syrupy's collected modules, which is how syrupy recognises a module kept out of the run.
And the extension's own discovery (``FindingSnapshotExtension.discover_snapshots``) leaves out the
files of tests this run skipped, whatever syrupy version does the accounting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pytest

from .. import findings
from .syrupy_adapter import forget_collected_module


@dataclass
class SnapshotState:
    """One pytest run's snapshot settings and records (a stack, for pytest run inside pytest)."""

    update: bool = False
    refresh_env: bool = False
    atol: float | None = None
    rtol: float | None = None
    skipped_tests: set[tuple[str, str, str]] = field(default_factory=set)  # (test dir, module stem, snapshot name)
    skipped_modules: set[tuple[str, str]] = field(default_factory=set)  # (test dir, module stem)
    events: list[tuple[str, str]] = field(default_factory=list)  # (test, line) from assertions without a test item
    config: Any = None
    versions: dict[str, str] | None = None  # library versions, read once per run (~50 ms each time)


_STACK: list[SnapshotState] = []


def active() -> SnapshotState:
    """The running session's state (a default one outside pytest)."""
    return _STACK[-1] if _STACK else SnapshotState()


def configure(config: pytest.Config, settings: Any) -> None:
    _STACK.append(
        SnapshotState(
            update=bool(getattr(config.option, "update_snapshots", False)),
            refresh_env=bool(getattr(settings, "snapshot_refresh_env", False)),
            atol=getattr(settings, "snapshot_atol", None),
            rtol=getattr(settings, "snapshot_rtol", None),
            config=config,
        )
    )


def unconfigure(config: pytest.Config) -> None:
    if _STACK and _STACK[-1].config is config:
        _STACK.pop()


def _split(rootpath: Path, relpath: str) -> tuple[str, str]:
    p = (rootpath / relpath).absolute()
    return str(p.parent), p.stem


def record_skipped_test(report: pytest.TestReport) -> None:
    """Remember a test skipped at setup or in its call, so its snapshots are not stale."""
    if report.skipped and report.when in ("setup", "call") and _STACK and _STACK[-1].config is not None:
        d, stem = _split(_STACK[-1].config.rootpath, report.location[0])
        _STACK[-1].skipped_tests.add((d, stem, report.location[2]))


def module_skipped(report: pytest.CollectReport) -> None:
    """A module skipped as a whole at collection keeps its snapshots: tell syrupy it was not collected."""
    config = _STACK[-1].config if _STACK else None
    if config is None or not (report.skipped and report.nodeid.endswith((".py", ".pyi")) and "::" not in report.nodeid):
        return
    path = (config.rootpath / report.nodeid).absolute()
    _STACK[-1].skipped_modules.add((str(path.parent), path.stem))
    forget_collected_module(config, path)


def _stem_matches(stem: str, name: str) -> bool:
    return stem == name or stem.startswith((name + ".", name + "["))


def protected(snapshot_location: str) -> bool:
    """True when the snapshot file belongs to a test or module this run skipped."""
    state = active()
    loc = Path(snapshot_location)
    collection_dir, snap_dir = loc.parent, loc.parent.parent
    test_dir, module = str(snap_dir.parent.absolute()), collection_dir.name
    if (test_dir, module) in state.skipped_modules:
        return True
    return any(d == test_dir and m == module and _stem_matches(loc.stem, name) for d, m, name in state.skipped_tests)


def note(line: str) -> None:
    """A line for the snapshots section: sent with the running test's finding record (back from xdist workers too)."""
    if findings.current() is not None:
        findings.record_note(line)
    else:
        active().events.append(("", line))


def terminal_summary(terminalreporter: Any, notes: Sequence[tuple[str, str]] = ()) -> None:
    """The 'pytest-nnsight snapshots' section: findings re-verified under a new environment, refreshed, ...

    `notes`: (nodeid, line) pairs collected from the run's finding records (run_records.RunRecords.notes)."""
    lines = [f"{nodeid}: {line}" for nodeid, line in notes]
    lines += [line for _, line in active().events]
    if lines:
        terminalreporter.section("pytest-nnsight snapshots")
        for line in lines:
            terminalreporter.write_line(line)
