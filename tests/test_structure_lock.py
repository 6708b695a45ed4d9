"""The structure lock on every served model (pytest_nnsight.structure_lock), through pytester.

A library change is simulated by editing the lock as transformers 4.57 would have recorded it: GPT-2
blocks returning `(hidden,)`. The served model (transformers 5 here) returns the bare tensor.
"""

import json
import re

import pytest

from pytest_nnsight.structure_lock import LOCK_NAME, parse_mode

# raw nnsight code: no structure fixture, no plugin verb
RAW = """
import torch

def test_raw_last_logits(nnsight_model):
    model = nnsight_model("bundled:capitals")
    with torch.inference_mode():
        with model.trace("The capital of France is"):
            hidden = model.transformer.h[0].output.save()
            logits = model.lm_head.output.save()
    assert hidden.shape[-1] == 64 and logits.shape[0] == 1

def test_raw_again(nnsight_model):
    model = nnsight_model("bundled:capitals")
    with torch.inference_mode():
        with model.trace("The capital of Spain is"):
            logits = model.lm_head.output.save()
    assert logits.ndim == 3
"""

SEED_PATCH = """
import torch

def test_seed_patch_line(nnsight_model):
    model = nnsight_model("bundled:capitals")
    with torch.inference_mode():
        with model.trace("The capital of France is"):
            model.transformer.h[0].output[0][:, 2, :] = 0
            logits = model.lm_head.output.save()
    assert logits.ndim == 3
"""


def _lock(pytester):
    return pytester.path / "__snapshots__" / LOCK_NAME


def _as_recorded_under_transformers_4(pytester):
    """Rewrite the lock as a transformers 4.57 run would have written it: blocks return a tuple."""
    path = _lock(pytester)
    data = json.loads(path.read_text())
    entry = data["models"]["bundled:capitals"]
    blocks = entry["structure"]["modules"]["transformer.h.*"]
    blocks["output"] = {"tuple": [blocks["output"]]}
    entry["structure"]["nnsight"]["block_output"] = {"tuple": [entry["structure"]["nnsight"]["block_output"]]}
    entry["environment"]["transformers"] = "4.57.6"
    path.write_text(json.dumps(data, indent=1))


def _bump_first_float(node):
    """Move the first recorded number by 1.0 (a drifted value); True when one was found."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, float):
            node[key] = value + 1.0
            return True
        if isinstance(value, (dict, list)) and _bump_first_float(value):
            return True
    return False


def _summary_line(result, model="bundled:capitals"):
    lines = [ln for ln in result.stdout.lines if ln.startswith(f"{model}: ") and "probe(s)" in ln]
    assert len(lines) == 1, result.stdout.str()
    return lines[0]


def test_lock_fails_raw_trace_tests_after_a_container_change(pytester):
    pytester.makepyfile(test_raw=RAW)
    first = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    first.assert_outcomes(passed=2)
    assert _lock(pytester).is_file(), "the first serve records the model in the lock"
    assert re.match(
        r"bundled:capitals: recorded in __snapshots__/\.nnsight-structure\.lock \(first serve\); 1 probe\(s\), \d+ ms",
        _summary_line(first),
    )

    _as_recorded_under_transformers_4(pytester)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)  # every test using the model
    out = result.stdout.str()
    failures = out.split("= FAILURES =", 1)[1].split("short test summary info", 1)[0]  # under CI pytest does not cut
    # summaries
    assert failures.count("the structure of bundled:capitals changed after transformers 4.57.6 -> ") == 2, out
    result.stdout.fnmatch_lines(
        [
            "*the structure of bundled:capitals changed after transformers 4.57.6 -> * (structure lock __snapshots__/.nnsight-structure.lock):",
            "*transformer.h.*: output changed from tuple(Tensor[[]b,s,64]) to Tensor[[]b,s,64]; code that reads .output[[]0] now selects "
            "batch row 0 instead of the hidden states, and writes to .output[[]0] change only batch row 0 (H1/H2)",
            "*nnsight: inside a trace, transformer.h.0.output changed from tuple(Tensor[[]b,s,64]) to Tensor[[]b,s,64]*",
            "*accept it with --snapshot-update or --nnsight-structure-lock update*",
        ]
    )
    assert re.search(r"bundled:capitals: CHANGED \(2 line\(s\); tests using it fail\); 1 probe\(s\)", out), out

    # switched off, the same tests run (and pass: they index .output directly); warn reports without failing
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "--nnsight-structure-lock", "off").assert_outcomes(passed=2)
    warned = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--nnsight-structure-lock", "warn")
    warned.assert_outcomes(passed=2)
    assert "CHANGED (2 line(s); warn only)" in _summary_line(warned)
    # --snapshot-update accepts the change and rewrites the lock; the next run passes
    accepted = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--snapshot-update")
    accepted.assert_outcomes(passed=2)
    assert "changed and accepted" in _summary_line(accepted)
    assert "tuple" not in json.dumps(
        json.loads(_lock(pytester).read_text())["models"]["bundled:capitals"]["structure"]["modules"]["transformer.h.*"]
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_lock_passes_and_costs_one_probe_per_model(pytester):
    pytester.makepyfile(
        test_raw=RAW,
        test_more="""
        def test_third(nnsight_model):
            assert nnsight_model("bundled:capitals") is nnsight_model("bundled:capitals")

        def test_other_model(nnsight_model):
            nnsight_model("bundled:induction")
    """,
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=4)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    # five serves of bundled:capitals in three tests, one of bundled:induction: one structure probe each
    assert re.match(r"bundled:capitals: unchanged; 1 probe\(s\), \d+ ms$", _summary_line(result)), result.stdout.str()
    assert re.match(r"bundled:induction: unchanged; 1 probe\(s\), \d+ ms$", _summary_line(result, "bundled:induction"))
    assert sorted(json.loads(_lock(pytester).read_text())["models"]) == ["bundled:capitals", "bundled:induction"]


def test_raw_output_indexing_error_gets_a_hint_naming_the_container(pytester):
    """The seed's patch line on transformers 5: IndexError with a hint; after a recorded container change the hint names it."""
    pytester.makepyfile(test_raw=RAW, test_seed=SEED_PATCH)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*IndexError: too many indices*",
            "pytest-nnsight hint: this code indexes .output[[]0], but transformer.h.* of bundled:capitals returns a "
            "bare Tensor[[]b,s,64] here, not a tuple: .output[[]0] is batch row 0*",
        ]
    )
    _as_recorded_under_transformers_4(pytester)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--nnsight-structure-lock", "warn")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "pytest-nnsight hint: this code indexes a module's .output, and the structure of bundled:capitals "
            "changed after transformers 4.57.6 -> *: transformer.h.*: output changed from tuple(Tensor[[]b,s,64]) "
            "to Tensor[[]b,s,64]; code that reads .output[[]0] now selects batch row 0*"
        ]
    )


def test_numeric_snapshot_drift_names_the_structure_change_first(pytester):
    pytester.makepyfile(
        test_snap="""
        import torch

        def test_raw_values(nnsight_model, finding_snapshot):
            model = nnsight_model("bundled:capitals")
            with torch.inference_mode():
                with model.trace("The capital of France is"):
                    logits = model.lm_head.output[0, -1, :4].save()
            assert {"logits": [float(x) for x in logits]} == finding_snapshot
    """
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "--snapshot-update").assert_outcomes(passed=1)
    snap = next((pytester.path / "__snapshots__").rglob("test_raw_values*.json"))
    data = json.loads(snap.read_text())
    data["environment"]["transformers"] = "4.57.6"
    assert _bump_first_float(data["finding"]), data["finding"]
    snap.write_text(json.dumps(data))
    _as_recorded_under_transformers_4(pytester)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--nnsight-structure-lock", "warn")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    first = out.index(
        "this finding drifted in the same run as a structure change of bundled:capitals (transformers 4.57.6 -> "
    )
    assert first < out.index("this finding drifted after"), out
    assert "transformer.h.*: output changed from tuple(Tensor[b,s,64]) to Tensor[b,s,64]" in out[first : first + 400]


@pytest.mark.parametrize(
    "raw, mode", [("on", "on"), ("WARN", "warn"), ("update", "update"), ("off", "off"), ("false", "off"), ("1", "on")]
)
def test_modes(raw, mode):
    assert parse_mode(raw) == mode


def test_bad_mode_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess("--nnsight-structure-lock", "strict")
    assert result.ret != 0
    result.stderr.fnmatch_lines(
        ["*invalid nnsight_structure_lock 'strict' from command line option --nnsight-structure-lock: expected on*"]
    )


def _write_many(path, worker):
    from pytest_nnsight.structure_lock import StructureLock

    lock = StructureLock(path)
    for i in range(10):
        lock.write(f"model-{worker}-{i}", {"environment": {}, "structure": {"worker": worker}})


def test_concurrent_writers_keep_every_entry(tmp_path):
    """xdist workers each record their models in one lock: four processes, ten writes each, no entry lost, no temp left."""
    import multiprocessing

    path = tmp_path / "__snapshots__" / LOCK_NAME
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(json.loads(path.read_text())["models"]) == 40
    assert [p.name for p in path.parent.iterdir()] == [LOCK_NAME]


def test_a_model_the_probe_cannot_record_is_served_unguarded(pytester, monkeypatch):
    """The lock never fails a test for its own sake: a probe error is reported in the summary, the test runs."""
    from pytest_nnsight import structure

    def broken(*args, **kwargs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(structure, "model_structure", broken)
    pytester.makepyfile(test_raw=RAW)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert _summary_line(result).startswith("bundled:capitals: not recorded: RuntimeError: probe exploded; 1 probe(s)")
    assert not _lock(pytester).exists()
