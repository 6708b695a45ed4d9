"""--nnsight-review: in a terminal, accepted findings snapshots are written and rejected ones are not; without one, nothing is.

The interactive run is a real pytest process whose stdin is a pseudo-terminal (pty) fed scripted answers.
"""

import json
import os
import pty
import subprocess
import sys

import pytest

from pytest_nnsight import review
from pytest_nnsight.records import Finding, SnapshotRecord

TWO_FINDINGS = """
import pytest
from pytest_nnsight.results import EffectMap

@pytest.mark.finding("the map of a")
def test_a(finding_snapshot):
    m = EffectMap(((0.0, 1.0), (0.5, 0.25)), ("resid_post.0", "resid_post.1"), ("a", "b"), "m", "x a", "x b", 1.0, 0.0)
    assert m == finding_snapshot(atol=1e-6, rtol=0)

@pytest.mark.finding("the map of b")
def test_b(finding_snapshot):
    m = EffectMap(((0.2, 0.8),), ("resid_post.0",), ("c", "d"), "m", "x c", "x d", 1.0, 0.0)
    assert m == finding_snapshot(atol=1e-6, rtol=0)
"""


def _drifted_and_new(pytester):
    """test_a's recording drifted (nnsight version and one cell changed), test_b's recording is missing (new)."""
    pytester.makepyfile(test_two=TWO_FINDINGS)
    pytester.runpytest_inprocess("--snapshot-update").assert_outcomes(passed=2)
    snaps = pytester.path / "__snapshots__" / "test_two"
    a, b = snaps / "test_a.json", snaps / "test_b.json"
    stored = json.loads(a.read_text())
    stored["environment"]["nnsight"] = "0.0.1"
    stored["finding"]["values"][0][1] = 0.75
    a.write_text(json.dumps(stored))
    b.unlink()
    return a, b


def _run_in_a_terminal(pytester, answers: str, *args: str) -> tuple[int, str]:
    """pytest in a subprocess whose stdin is a terminal, with the answers typed in advance."""
    master, slave = pty.openpty()
    try:
        os.write(master, answers.encode())
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:xdist", *args],
            cwd=pytester.path,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
            env={**os.environ, "PYTEST_ADDOPTS": "", "COLUMNS": "200"},
        )
    finally:
        os.close(slave)
        os.close(master)
    return proc.returncode, proc.stdout


def test_review_in_a_terminal_writes_the_accepted_finding_only(pytester):
    a, b = _drifted_and_new(pytester)
    recorded_a = a.read_text()
    code, out = _run_in_a_terminal(pytester, "y\nn\n", "--nnsight-review")
    assert code == 1, out  # the run itself failed: both snapshot assertions failed before the review
    assert "[1/2] drifted: the map of a" in out and "[2/2] new: the map of b" in out, out
    assert "environment: nnsight 0.0.1 -> " in out and "1 / 6 cells moved beyond tolerance" in out, out
    assert "resid_post.0 / 1 'b': 0.75 -> 1" in out, out
    figure = next(line.split("figure:", 1)[1].split(" (")[0].strip() for line in out.splitlines() if "figure:" in line)
    assert figure.endswith("test_a-drift0.png") and os.path.getsize(figure) > 1000, out
    assert "review: 1 accepted (written), 1 kept as recorded" in out, out
    accepted = json.loads(a.read_text())
    assert a.read_text() != recorded_a and accepted["finding"]["values"][0] == [0.0, 1.0]
    assert accepted["environment"]["nnsight"] != "0.0.1"  # written with this run's environment
    assert not b.exists()  # rejected: no recording made
    pytester.runpytest_inprocess().assert_outcomes(passed=1, failed=1)  # a now matches; b still has no recording


def test_review_without_a_terminal_shows_the_same_and_writes_nothing(pytester):
    a, b = _drifted_and_new(pytester)
    before = a.read_bytes()
    result = pytester.runpytest_inprocess("--nnsight-review")  # stdin is not a terminal here
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*not a terminal: showing the findings to review and writing nothing*",
            "[[]1/2] drifted: the map of a",
            "*environment: nnsight 0.0.1 -> *",
            "[[]2/2] new: the map of b",
        ]
    )
    assert "accept?" not in result.stdout.str()
    assert a.read_bytes() == before and not b.exists()


def test_review_with_nothing_to_review_says_so(pytester):
    pytester.makepyfile(test_one="def test_a():\n    pass\n")
    result = pytester.runpytest_inprocess("--nnsight-review")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*no drifted or new findings snapshots to review*"])


def _candidate(tmp_path, name, status="new"):
    snap = SnapshotRecord(name, status, path=str(tmp_path / f"{name}.json"), received=f"{name}!")
    return review.Candidate(Finding(f"t.py::{name}", name, snapshots=[snap], outcome="failed"), snap, None)


@pytest.mark.parametrize(
    "answers, written", [(["y", "y"], ["a", "b"]), (["", "y"], []), (["maybe", "n", "y"], ["b"]), (["Yes", "q"], ["a"])]
)
def test_answers(tmp_path, answers, written):
    """y accepts, n keeps, q and end of input ('') stop, anything else asks again."""
    found = [_candidate(tmp_path, "a"), _candidate(tmp_path, "b")]
    typed = iter(answers)
    lines = []
    accepted, rest = review.review(found, lines.append, lambda prompt: next(typed))
    assert [c.snapshot.name for c in accepted] == written
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == written
    assert all((tmp_path / f"{n}.json").read_text() == f"{n}!" for n in written)
    assert len(accepted) + len(rest) == 2


def test_without_ask_nothing_is_written(tmp_path):
    found = [_candidate(tmp_path, "a"), _candidate(tmp_path, "b", status="drifted")]
    lines = []
    accepted, rest = review.review(found, lines.append, None)
    assert not accepted and len(rest) == 2 and not list(tmp_path.iterdir())
    assert lines[0] == "[1/2] new: a" and any(line.startswith("[2/2] drifted: b") for line in lines)
