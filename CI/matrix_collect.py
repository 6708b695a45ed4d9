"""A pytest plugin the version matrix loads (`-p matrix_collect`): one JSON record per test, for the drift report.

Stdlib and pytest only. It reads what pytest-nnsight's snapshot extension already notes on each
report (`nnsight_snapshot` user properties: "re-verified under a new environment: ...") and the
failure text ("this finding drifted after ..."), and writes them to the file named by
$PYTEST_NNSIGHT_MATRIX_RESULTS when the session ends.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

ENV_VAR = "PYTEST_NNSIGHT_MATRIX_RESULTS"
_RECORDS: dict[str, dict[str, Any]] = {}


def _message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    return str(report.longrepr or "")


def _drift_lines(text: str) -> list[str]:
    """The drift summary of a snapshot failure: the 'drifted after' line and the statistics under it."""
    # the exception's own lines, not the source
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    out: list[str] = []
    for i, ln in enumerate(lines):
        if "drifted after" in ln:
            out = [ln] + [x for x in lines[i + 1 : i + 6] if x]
            break
    return out


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    rec = _RECORDS.setdefault(
        report.nodeid,
        {
            "nodeid": report.nodeid,
            "outcome": "passed",
            "when": "",
            "duration": 0.0,
            "message": "",
            "snapshot": [],
            "drift": [],
        },
    )
    rec["duration"] = round(rec["duration"] + float(report.duration), 3)
    for key, value in getattr(report, "user_properties", ()) or ():
        if key == "nnsight_snapshot" and value not in rec["snapshot"]:
            rec["snapshot"].append(str(value))
    if report.skipped and rec["outcome"] == "passed":
        xfail = hasattr(report, "wasxfail")  # an expected failure (strict=False xfail) reports as skipped
        rec.update(
            outcome="xfailed" if xfail else "skipped",
            when=report.when,
            message=str(getattr(report, "wasxfail", "")) if xfail else _message(report),
        )
    elif report.failed:
        full = str(report.longrepr or "")
        rec.update(
            outcome="failed" if report.when == "call" else "error",
            when=report.when,
            message=_whole_lines(_message(report)),
            drift=_drift_lines(full),
            exception=_exception_name(report),
        )


def _whole_lines(text: str, limit: int = 20000) -> str:
    """The message, cut only between lines (an explanation line is never cut in the middle)."""
    if len(text) <= limit:
        return text
    kept = text[:limit].rsplit("\n", 1)[0]
    return kept + f"\n... ({text.count(chr(10)) - kept.count(chr(10))} more line(s))"


def _structure_lock() -> dict[str, Any]:
    """What pytest-nnsight's structure lock said about each served model (the matrix runs it with warn)."""
    try:
        from pytest_nnsight import structure_lock
    except ImportError:
        return {}
    lock = structure_lock.active()
    if lock is None:
        return {}
    return {
        label: {"status": v.status, "changes": v.changes, "lines": v.lines, "seconds": round(v.seconds, 3)}
        for label, v in lock.verdicts.items()
    }


def _exception_name(report: pytest.TestReport) -> str:
    msg = _message(report)
    head = msg.split(":", 1)[0].strip()
    return head.rsplit(".", 1)[-1] if head and " " not in head else ""


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _RECORDS[report.nodeid] = {
            "nodeid": report.nodeid,
            "outcome": "error",
            "when": "collect",
            "duration": 0.0,
            "message": str(report.longrepr)[-2000:],
            "snapshot": [],
            "drift": [],
            "exception": "",
        }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(ENV_VAR)
    if not path or hasattr(session.config, "workerinput"):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(
            {"exitstatus": int(exitstatus), "tests": list(_RECORDS.values()), "structure": _structure_lock()},
            handle,
            indent=1,
        )
    os.replace(tmp, path)
