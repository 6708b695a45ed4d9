"""Findings snapshots: syrupy extension with tolerance, recorded environment, drift reports. Run with pytester."""

import json
import math
import os

import pytest

from pytest_nnsight import findings
from pytest_nnsight.errors import SnapshotFileError, SnapshotValueError
from pytest_nnsight.snapshots.compare import Tolerance, calibrate_tolerance, compare_findings, explain
from pytest_nnsight.snapshots.encode import dumps, loads, record, to_value
from pytest_nnsight.snapshots.extension import atomic_write

FINDING = """
import json, os
from pytest_nnsight import EffectMap

def effects():
    values = json.loads(os.environ.get("VALUES", "[[0.1, 0.2, 0.05], [0.0, 0.9, 1.0]]"))
    tokens = tuple(os.environ.get("TOKENS", "The capital is").split())
    return EffectMap(tuple(map(tuple, values)), ("resid_post.0", "resid_post.1"), tokens, "logit_diff(Paris, Berlin)",
                     "The capital France", "The capital Germany", 2.0, -1.0)

def test_map(finding_snapshot):
    assert effects() == finding_snapshot(atol=float(os.environ.get("ATOL", "1e-4")))
"""
MOVED = "[[0.1, 0.2, 0.05], [0.0, 0.3, 0.5]]"


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch):
    # under `pytest -n`, the inner runs inherit PYTEST_XDIST_WORKER and syrupy would act as a worker
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_TESTRUNUID", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(name, raising=False)


def _run(pytester, *args):
    # hypothesis' pytest plugin re-imports hypothesis in every inline run (~1.5 s): not needed here
    return pytester.runpytest("-p", "no:hypothesispytest", *args)


def _snap(pytester, module="test_finding", name="test_map"):
    return pytester.path / "__snapshots__" / module / f"{name}.json"


def _edit_env(path, **changes):
    rec = json.loads(path.read_text())
    rec["environment"].update(changes)
    path.write_text(dumps(rec))


@pytest.fixture
def recorded(pytester):
    pytester.makepyfile(test_finding=FINDING)
    result = _run(pytester, "--snapshot-update")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 snapshot generated*"])
    return _snap(pytester)


def test_new_snapshot_fails_until_recorded_then_passes(pytester, recorded):
    rec = json.loads(recorded.read_text())
    assert rec["environment"]["nnsight"] and rec["environment"]["torch"] and "python" in rec["environment"]
    assert rec["finding"]["@type"] == "EffectMap" and rec["finding"]["sites"] == ["resid_post.0", "resid_post.1"]
    assert "      [0.0, 0.9, 1.0]" in recorded.read_text()  # one row per line: diff-friendly
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*pytest-nnsight snapshots*")


def test_changed_environment_within_tolerance_passes_and_is_reported_reverified(pytester, recorded):
    _edit_env(recorded, nnsight="0.7.0")
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*pytest-nnsight snapshots*", "*test_map: re-verified under a new environment: nnsight 0.7.0 -> *"]
    )
    assert json.loads(recorded.read_text())["environment"]["nnsight"] == "0.7.0"  # a pass rewrites nothing


def test_drift_leads_with_the_environment_change_then_the_cell_diff(pytester, recorded, monkeypatch):
    _edit_env(recorded, transformers="4.57.6")
    monkeypatch.setenv("VALUES", MOVED)
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*this finding drifted after transformers 4.57.6 -> *",
            "*cells moved beyond tolerance: 2 / 8 (25.0%)*tolerance: atol=0.0001, rtol=0.0001*",
            "*abs error: max 0.6, mean *, median *",
            "*rel error: max *",
            "*moved cells (old -> new):*",
            "*values[[]resid_post.1 / 1 'capital'[]]  0.9 -> 0.3*",
            "*values[[]resid_post.1 / 2 'is'[]]*1 -> 0.5*",
            "*peak: old 1 at resid_post.1 / 2 'is', new 0.5 at resid_post.1 / 2 'is'*",
            "*run pytest --snapshot-update to accept the change*",
        ]
    )
    _run(pytester, "--snapshot-update").stdout.fnmatch_lines(["*1 snapshot updated*"])
    assert json.loads(recorded.read_text())["environment"]["transformers"] != "4.57.6"
    _run(pytester).assert_outcomes(passed=1)


def test_tolerance_per_call_and_from_ini(pytester, recorded, monkeypatch):
    monkeypatch.setenv("VALUES", "[[0.1, 0.2, 0.05], [0.0, 0.95, 1.0]]")
    _run(pytester).assert_outcomes(failed=1)
    monkeypatch.setenv("ATOL", "0.1")
    _run(pytester).assert_outcomes(passed=1)
    monkeypatch.delenv("ATOL")
    pytester.makeini("[pytest]\nnnsight_snapshot_atol = 0.1\n")
    pytester.makepyfile(
        test_finding=FINDING.replace('finding_snapshot(atol=float(os.environ.get("ATOL", "1e-4")))', "finding_snapshot")
    )
    _run(pytester).assert_outcomes(passed=1)


def test_label_or_shape_change_always_mismatches(pytester, recorded, monkeypatch):
    monkeypatch.setenv("TOKENS", "The city is")
    monkeypatch.setenv("ATOL", "100")
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the finding's shape or labels changed*", "*tokens[[]1[]]: 'capital' -> 'city'*"])


def test_refresh_env_rewrites_only_the_environment(pytester, recorded, monkeypatch):
    _edit_env(recorded, torch="2.9.0")
    monkeypatch.setenv("VALUES", "[[0.1, 0.2, 0.05], [0.0, 0.90001, 1.0]]")  # within tolerance
    result = _run(pytester, "--nnsight-snapshot-refresh-env")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_map: environment refreshed (torch 2.9.0 -> *); values kept*"])
    rec = json.loads(recorded.read_text())
    assert rec["environment"]["torch"] != "2.9.0" and rec["finding"]["values"][1][1] == 0.9


SKIPPABLE = """
import os, pytest

@pytest.mark.skipif(bool(os.environ.get("SKIP_GPU")), reason="needs a GPU")
def test_gpu_finding(finding_snapshot):
    assert {"effect": [0.5, 0.25]} == finding_snapshot

def test_cpu_finding(finding_snapshot):
    assert {"effect": [1.0]} == finding_snapshot

def test_skips_inside(finding_snapshot):
    if os.environ.get("SKIP_GPU"):
        pytest.skip("hub model not cached")
    assert [0.75] == finding_snapshot
"""
MODULE_SKIP = """
import os, pytest
if os.environ.get("SKIP_GPU"):
    pytest.skip("whole module needs a GPU", allow_module_level=True)

def test_module_finding(finding_snapshot):
    assert [3.0] == finding_snapshot
"""


def test_skipped_is_not_stale(pytester, monkeypatch):
    pytester.makepyfile(test_skippable=SKIPPABLE, test_gpu_module=MODULE_SKIP)
    _run(pytester, "--snapshot-update").assert_outcomes(passed=4)
    files = [
        _snap(pytester, "test_skippable", n) for n in ("test_gpu_finding", "test_cpu_finding", "test_skips_inside")
    ]
    files.append(_snap(pytester, "test_gpu_module", "test_module_finding"))
    assert all(f.exists() for f in files)
    monkeypatch.setenv("SKIP_GPU", "1")
    for args in ([], ["--snapshot-update"]):
        result = _run(pytester, *args)
        result.assert_outcomes(passed=1, skipped=3)
        result.stdout.no_fnmatch_line("*unused*")
        result.stdout.no_fnmatch_line("*deleted*")
        assert all(f.exists() for f in files), args
    # a test really removed is still reported unused
    monkeypatch.delenv("SKIP_GPU")
    pytester.makepyfile(test_skippable=SKIPPABLE.split("def test_skips_inside")[0])
    _run(pytester).stdout.fnmatch_lines(["*1 snapshot unused*"])


WEIGHTS = """
import os, torch

def model():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    if os.environ.get("PERTURB"):
        with torch.no_grad():
            m.weight[0, 0] += 1e-3
    return m

def test_weights(finding_snapshot):
    across = bool(os.environ.get("ACROSS"))
    assert {"effect": [0.5]} == finding_snapshot(model=model(), across_weights=across)
"""


def test_changed_weights_fail_unless_the_test_opts_in(pytester, monkeypatch):
    pytester.makepyfile(test_w=WEIGHTS)
    _run(pytester, "--snapshot-update").assert_outcomes(passed=1)
    env = json.loads(_snap(pytester, "test_w", "test_weights").read_text())["environment"]
    assert (
        env["model"] == "Linear" and len(env["weights"]) == 32 and env["device"] == "cpu" and env["dtype"] == "float32"
    )
    _run(pytester).assert_outcomes(passed=1)
    monkeypatch.setenv("PERTURB", "1")
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*the model's weights changed: fingerprint * -> * (model Linear)*", "*across_weights=True*"]
    )
    monkeypatch.setenv("ACROSS", "1")
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*re-verified under a new environment: weights *"])


def test_malformed_or_future_snapshot_names_the_file_and_is_never_overwritten(pytester, recorded):
    recorded.write_text('{\n  "format": "pytest-nnsight finding",\n  "version": 1,\n  oops\n}\n')
    for args in ([], ["--snapshot-update"]):
        result = _run(pytester, *args)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            ["*SnapshotFileError: findings snapshot *test_map.json, line 4 column 3: not valid JSON*"]
        )
        assert "oops" in recorded.read_text()
    recorded.write_text(
        json.dumps({"format": "pytest-nnsight finding", "version": 99, "environment": {}, "finding": 1})
    )
    result = _run(pytester)
    result.stdout.fnmatch_lines(["*format version 99 was written by a newer pytest-nnsight*"])


# ---- without pytester: encoding, comparison, calibration, atomic writes ----


def test_nan_is_stored_explicitly_and_matches_only_nan():
    rec = loads(dumps(record({"v": [math.nan, math.inf, 1.0]}, {})))
    assert rec["finding"] == {"v": ["NaN", "Infinity", 1.0]}
    tol = Tolerance(1e-3, 0)
    assert compare_findings(rec["finding"], to_value({"v": [math.nan, math.inf, 1.0]}), tol).ok
    cmp = compare_findings(rec["finding"], to_value({"v": [0.0, math.inf, 1.0]}), tol)
    assert not cmp.ok and "1 / 3" in "\n".join(explain(cmp))


def test_bad_input_gives_clear_errors():
    with pytest.raises(SnapshotValueError, match=r"finding\['a'\]\[1\]: a object is not a number"):
        to_value({"a": [1.0, object()]})
    with pytest.raises(ValueError, match="atol=-1: a tolerance must be a finite number >= 0"):
        Tolerance(-1, 0)
    with pytest.raises(SnapshotFileError, match="not a pytest-nnsight finding"):
        loads("[1, 2]", "x.json")


def test_tensors_and_arrays_keep_shape_and_dtype():
    import numpy as np
    import torch

    t = to_value(torch.tensor([[1.0, 2.0]], dtype=torch.float16))
    assert t == {"@type": "tensor", "dtype": "float16", "shape": [1, 2], "values": [[1.0, 2.0]]}
    a = to_value(np.array([0.1234567891, 2.0]))
    assert a["@type"] == "ndarray" and a["values"] == [0.123457, 2.0]


def test_calibrate_tolerance_states_its_rule():
    noise = iter([0.0, 1e-5, -2e-5, 0.0, 3e-5, 0.0])
    tol = calibrate_tolerance(lambda: [1.0 + next(noise), 2.0], repeats=3)
    assert tol.atol == pytest.approx(2e-4) and "10 x the largest difference over 3 runs" in tol.rule
    two = calibrate_tolerance(lambda: [1.0], lambda: [1.01], repeats=1)
    assert two.atol == pytest.approx(0.1) and two.rtol == pytest.approx(0.1)
    with pytest.raises(ValueError, match="repeats"):
        calibrate_tolerance(lambda: [1.0], repeats=1)


def test_atomic_write_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    target = tmp_path / "snap.json"
    atomic_write(target, "old\n")

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, "new\n" * 1000)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["snap.json"]


def test_public_lifecycle_helper(pytester):
    from pytest_nnsight.testing import check_snapshot_lifecycle

    stages = check_snapshot_lifecycle(pytester, FINDING, args=("-p", "no:hypothesispytest"))
    assert stages[0] == "fail (not recorded)" and stages[-1] == "pass"


def test_under_xdist_reverified_is_reported_and_skipped_survive(pytester, monkeypatch):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_skippable=SKIPPABLE)
    # recorded in one process (writing under -n: test_faults)
    _run(pytester, "--snapshot-update").assert_outcomes(passed=3)
    cpu = _snap(pytester, "test_skippable", "test_cpu_finding")
    _edit_env(cpu, nnsight="0.7.0")
    monkeypatch.setenv("SKIP_GPU", "1")
    result = _run(pytester, "-n", "2", "--snapshot-update")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.no_fnmatch_line("*deleted*")
    assert _snap(pytester, "test_skippable", "test_gpu_finding").exists()
    # --snapshot-update records the new environment
    assert json.loads(cpu.read_text())["environment"]["nnsight"] != "0.7.0"
    _edit_env(cpu, nnsight="0.7.0")
    _run(pytester, "-n", "2").stdout.fnmatch_lines(
        ["*test_cpu_finding: re-verified under a new environment: nnsight 0.7.0 -> *"]
    )


def test_population_results_and_nested_dataclasses_serialize_generically():
    from pytest_nnsight.interventions import Prompt
    from pytest_nnsight.populations import PopulationResult
    from pytest_nnsight.strategies import CounterfactualPair

    pair = CounterfactualPair(
        Prompt("The capital of France is", {"country": "France"}),
        Prompt("The capital of Spain is", {"country": "Spain"}),
        "Paris",
        "Madrid",
        "The capital of {country} is",
    )
    result = PopulationResult(
        n=1,
        effects=(0.97,),
        passed=1,
        rate=1.0,
        lower_bound=0.2,
        mean=0.97,
        std=0.0,
        threshold=0.8,
        site="resid_post.0",
        position="last",
        metric="logit_diff",
        variants=(pair,),
    )
    value = to_value(result)
    assert value["@type"] == "PopulationResult" and value["effects"] == [0.97]
    assert value["variants"][0]["clean"] == {
        "@type": "Prompt",
        "text": "The capital of France is",
        "slots": {"country": "France"},
    }
    moved = to_value(PopulationResult(**{**result.__dict__, "effects": (0.5,), "mean": 0.5}))
    assert len(compare_findings(value, moved, Tolerance(1e-3, 0)).moved) == 2


def test_plain_use_extension_named_snapshots_and_with_tolerance(pytester, monkeypatch):
    # not test_api.py: this process has imported tests/test_api.py under that module name (import file mismatch)
    pytester.makepyfile(
        test_extension_api="""
import os
from pytest_nnsight.snapshots import FindingSnapshotExtension

def shift():
    return float(os.environ.get("SHIFT", "0"))

def test_plain(snapshot):
    assert {"effect": 0.5 + shift()} == snapshot.use_extension(FindingSnapshotExtension)

def test_named(finding_snapshot):
    loose = finding_snapshot.with_tolerance(atol=0.5)
    assert [1.0 + shift()] == loose(name="loose")
    assert [2.0] == finding_snapshot(name="exact")
"""
    )
    _run(pytester, "--snapshot-update").assert_outcomes(passed=2)
    assert (
        _snap(pytester, "test_extension_api", "test_named[loose]").exists()
        and _snap(pytester, "test_extension_api", "test_named[exact]").exists()
    )
    monkeypatch.setenv("SHIFT", "0.1")
    result = _run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_plain*", "*cells moved beyond tolerance: 1 / 1 (100.0%)*"])


def test_a_dtype_change_is_an_environment_change_not_a_weights_change():
    from pytest_nnsight.snapshots.extension import FindingSnapshotExtension

    env = {"nnsight": "0.8.1", "device": "cpu", "dtype": "float32", "model": "m", "weights": "aaa"}
    old = dumps(record([1.0, 2.0], env))
    ext = FindingSnapshotExtension()
    half = dumps(record([1.01, 2.02], {**env, "device": "cuda", "dtype": "bfloat16", "weights": "bbb"}))
    assert ext.matches(serialized_data=half, snapshot_data=old)  # bfloat16 defaults: atol 5e-2, rtol 2e-2
    assert ext.last.weights is None and ext.last.changes == ["device cpu -> cuda", "dtype float32 -> bfloat16"]
    notes = findings.current().finding.notes  # the note travels with the running test's record
    assert notes and "re-verified under a new environment: device cpu -> cuda" in notes[-1]
    notes.clear()  # not a note of this run's own snapshots
    other_weights = dumps(record([1.0, 2.0], {**env, "weights": "bbb"}))
    assert not ext.matches(serialized_data=other_weights, snapshot_data=old)
    assert (
        "the model's weights changed: fingerprint aaa -> bbb (model m)" in list(ext.diff_lines(other_weights, old))[0]
    )
