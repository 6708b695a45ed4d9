"""Fault injection: a pytest run SIGKILLed while it writes snapshots, the activation cache or the report leaves no
truncated or half-written file, and the rerun passes; two xdist workers writing concurrently lose nothing, and a later run
loads what they wrote (this is also the activation cache's xdist test: eight askers of four keys, one entry each)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

# Loaded by the child run: with FAULT_AT set, the chosen write signals the parent (a marker file) and hangs until killed.
CONFTEST = """
import os, time
from pathlib import Path

FAULT = os.environ.get("FAULT_AT", "")
MARK = Path(os.environ.get("FAULT_MARK", "fault.marker"))


def _hang(where):
    MARK.write_text(str(where))
    time.sleep(300)


if FAULT:
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        d = str(dst)
        if (FAULT == "snapshot" and "__snapshots__" in d and d.endswith(".json")) or (
            FAULT == "cache-manifest" and os.path.basename(d).startswith("ac-") and d.endswith(".json")) or (
            FAULT == "report" and d.endswith("findings.md")):  # findings.json is already in place then: kill between files
            _hang(d)
        return _replace(src, dst, *args, **kwargs)

    os.replace = replace

if FAULT == "cache-rows":  # in the middle of streaming rows into the data file
    from pytest_nnsight import cache_store

    _write_rows, _calls = cache_store._StreamWriter.write_rows, []

    def write_rows(self, name, first_row, tensor):
        _write_rows(self, name, first_row, tensor)
        _calls.append(name)
        if len(_calls) == 3:
            self.fh.flush()
            _hang(self.fh.name)

    cache_store._StreamWriter.write_rows = write_rows
"""

TESTS = """
import pytest
from pytest_nnsight import assert_restores, logit_diff, patch, sweep

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
PROMPTS = [f"The capital of {c} is" for c in ("France", "Germany", "Italy", "Spain", "Japan", "Egypt", "Chile", "Kenya")]


def test_cached(activation_cache, nnsight_model):
    acts = activation_cache.get(nnsight_model("bundled:capitals"), PROMPTS, sites="blocks", positions="last", batch_size=2)
    assert tuple(acts["resid_post.0"].shape) == (8, 1, 64)

def test_map(nnsight_model, finding_snapshot):
    model = nnsight_model("bundled:capitals")
    assert sweep(model, CLEAN, CORRUPT, logit_diff("Paris", "Berlin"), check_batching=False) == finding_snapshot(model=model)


def test_effect(nnsight_model, finding_snapshot):
    model = nnsight_model("bundled:capitals")
    effect = patch(model, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=logit_diff("Paris", "Berlin"))
    assert_restores(effect, 0.5)
    assert effect == finding_snapshot(model=model)

"""

ARGS = (
    "-p",
    "no:cacheprovider",
    "--nnsight-device",
    "cpu",
    "--nnsight-cache-dir",
    "cache",
    "--nnsight-report",
    "report",
)


def _child(cwd: Path, fault: str, *args: str, timeout: float = 120, base: tuple[str, ...] = ARGS) -> str:
    """Run pytest in a subprocess; with a fault, SIGKILL it once the chosen write signals. Returns its output."""
    mark = cwd / "fault.marker"
    mark.unlink(missing_ok=True)
    env = {**os.environ, "FAULT_AT": fault, "FAULT_MARK": str(mark)}
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *base, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while fault and not mark.exists():
        if proc.poll() is not None:
            out = proc.stdout.read().decode()
            pytest.fail(
                f"the run ended (exit {proc.returncode}) before the {fault} write it should be killed in:\n{out}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {fault} write within {timeout} s")
        time.sleep(0.05)
    if fault:
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=timeout)
    if fault:
        assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-write (exit {proc.returncode})"
    return out.decode()


def check_files(root: Path) -> dict[str, int]:
    """Every data file parses (snapshots, manifests, report JSON) and every cache entry matches its checksum."""
    counts = {"snapshots": 0, "manifests": 0, "report": 0}
    for p in root.rglob("*.json"):
        if p.name.startswith("."):
            continue
        data = json.loads(p.read_text())  # a truncated file fails here
        if "__snapshots__" in p.parts:
            assert data["format"] == "pytest-nnsight finding" and "finding" in data, p
            counts["snapshots"] += 1
        elif p.name.startswith("ac-"):
            blob = p.parent / data["data"]
            assert blob.stat().st_size == data["bytes"], f"{blob.name}: size differs from its manifest"
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == data["sha256"], (
                f"{blob.name}: checksum differs from its manifest"
            )
            counts["manifests"] += 1
        elif p.name == "findings.json":
            assert data["findings"], p
            counts["report"] += 1
    return counts


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


def test_killed_mid_write_then_rerun(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_findings=TESTS)
    root = pytester.path

    # 1. killed in the middle of streaming rows into a cache entry: no manifest commits the half-written data
    _child(root, "cache-rows", "--snapshot-update")
    assert check_files(root) == {"snapshots": 0, "manifests": 0, "report": 0}
    assert leftovers(root), "the kill should have caught a temp file mid-write"
    # 2. killed while the first snapshot is moved into place (syrupy writes at the end): none, or whole ones
    _child(root, "snapshot", "--snapshot-update")
    assert check_files(root)["snapshots"] <= 1
    # 3. killed between the report's files: findings.json is whole or absent, snapshots and the cache entry are in place
    _child(root, "report", "--snapshot-update")
    after_report = check_files(root)
    assert after_report["snapshots"] == 2 and after_report["manifests"] == 1, after_report
    # 4. the rerun, without updating anything, passes and leaves only whole files
    result = pytester.runpytest_inprocess(*ARGS)
    result.assert_outcomes(passed=3)
    assert check_files(root) == {"snapshots": 2, "manifests": 1, "report": 1}
    assert leftovers(root) == [], f"temp files a killed run left are still there after the rerun: {leftovers(root)}"


XDIST_TESTS = """
import pytest
from pytest_nnsight import ablate, logit_diff

COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Egypt", "Chile", "Kenya"]


@pytest.mark.parametrize("i", range(8))
def test_snapshot(nnsight_model, finding_snapshot, i):
    model = nnsight_model("bundled:capitals")
    effect = ablate(model, f"The capital of {COUNTRIES[i]} is", site="transformer.h.0", position=4, metric=logit_diff("Paris", "Berlin"))
    assert effect == finding_snapshot(model=model)


@pytest.mark.parametrize("i", range(8))
def test_cache(activation_cache, nnsight_model, i):
    model = nnsight_model("bundled:capitals")
    prompts = [f"The capital of {c} is" for c in COUNTRIES[: 2 + i % 4]]  # 4 keys, each asked for by two tests
    acts = activation_cache.get(model, prompts, sites="blocks", positions="last")
    assert acts["resid_post.1"].shape[0] == len(prompts)
    print(f"CACHE key={len(prompts)} source={acts.source}")
"""


def test_two_xdist_workers_lose_nothing(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_parallel=XDIST_TESTS)
    root = pytester.path
    # the activation cache in its default directory (under .pytest_cache, as every worker must resolve it alike)
    out = _child(
        root, "", "-n", "2", "--snapshot-update", base=("--nnsight-device", "cpu", "--nnsight-report", "report")
    )
    assert "16 passed" in out, out
    counts = check_files(root)
    assert counts["snapshots"] == 8 and counts["manifests"] == 4, f"{counts}\n{out}"
    assert len(list((root / ".pytest_cache" / "d" / "nnsight-activations").glob("ac-*.json"))) == 4, out
    assert leftovers(root) == []
    rerun = pytester.runpytest_inprocess("--nnsight-device", "cpu", "-s", "-p", "no:randomly")
    rerun.assert_outcomes(passed=16)
    # the entries the workers wrote are the ones a later run uses: every asker of the four keys loads, none recomputes
    sources = re.findall(r"CACHE key=(\d) source=(\w+)", rerun.stdout.str())
    assert sorted(k for k, _ in sources) == ["2", "2", "3", "3", "4", "4", "5", "5"], sources
    assert {s for _, s in sources} <= {"loaded", "memory"}, sources
