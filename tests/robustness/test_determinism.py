"""Determinism: two runs give bit-identical effect maps and snapshot files; batch sizes of a sweep agree to 1e-5;
--nnsight-deterministic turns on torch's deterministic algorithms and seeds every test alike."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from pytest_nnsight import logit_diff, sweep
from pytest_nnsight.sites import attn_out, block, embed

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"

SUITE = """
import json
from pytest_nnsight import attribution_patch, logit_diff, patch, sweep

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
LD = logit_diff("Paris", "Berlin")


def test_map(nnsight_model, finding_snapshot):
    model = nnsight_model("bundled:capitals")
    effects = sweep(model, CLEAN, CORRUPT, LD, sites="resid_pre", batch_size=5)
    with open("maps.json", "a") as f:  # full precision (repr), not the snapshot's 6 decimals
        f.write(json.dumps({"values": effects.values, "raw": effects.raw}) + "\\n")
    assert effects == finding_snapshot(model=model)


def test_effect_and_attribution(nnsight_model, finding_snapshot):
    model = nnsight_model("bundled:capitals")
    effect = patch(model, CLEAN, CORRUPT, site="attn_out.1", position="last", metric=LD, controls=True)
    approx = attribution_patch(model, CLEAN, CORRUPT, LD)
    with open("maps.json", "a") as f:
        f.write(json.dumps({"effect": [effect.clean, effect.corrupt, effect.intervened], "controls": effect.controls,
                            "attribution": approx.values}) + "\\n")
    assert {"effect": effect, "attribution": approx} == finding_snapshot(model=model)
"""


def _start(cwd) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nnsight-device",
            "cpu",
            "--snapshot-update",
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _result(proc: subprocess.Popen, cwd) -> tuple[bytes, dict[str, str]]:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    snaps = {
        str(p.relative_to(cwd)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((cwd / "__snapshots__").rglob("*.json"))
    }
    return (cwd / "maps.json").read_bytes(), snaps


def test_two_runs_give_bit_identical_maps_and_snapshots(pytester):
    # two fresh interpreters, each in its own copy of the suite, run side by side (each pays ~10 s of imports)
    dirs = [pytester.mkdir(name) for name in ("a", "b")]
    for d in dirs:
        (d / "test_suite.py").write_text(SUITE)
    procs = [_start(d) for d in dirs]
    try:
        (maps_a, snaps_a), (maps_b, snaps_b) = [_result(p, d) for p, d in zip(procs, dirs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert len(snaps_a) == 2, snaps_a
    assert snaps_a == snaps_b, "the snapshot files differ between two identical runs"
    assert maps_a == maps_b, f"effect maps differ between two identical runs:\n{maps_a.decode()}\n{maps_b.decode()}"


@pytest.mark.parametrize(
    "sites, sizes", [("blocks", (1, 3, 7, 64)), ("head_out", (5, 13, 64))], ids=["blocks", "heads"]
)
def test_sweep_results_agree_across_batch_sizes(capitals, sites, sizes):
    maps = {
        bs: sweep(
            capitals,
            CLEAN,
            CORRUPT,
            metric=logit_diff("Paris", "Berlin"),
            sites=sites,
            batch_size=bs,
            check_batching=False,
        )
        for bs in sizes
    }
    ref = maps[sizes[0]]
    for bs, m in maps.items():
        assert m.sites == ref.sites and m.tokens == ref.tokens
        worst = max(abs(a - b) for ra, rb in zip(m.raw, ref.raw) for a, b in zip(ra, rb))
        assert worst <= 1e-5, (
            f"batch_size={bs} differs from batch_size={sizes[0]} by {worst:.3g} (raw logit_diff) on {CLEAN!r} <- {CORRUPT!r}"
        )


def test_sweep_over_mixed_sites_agrees_across_batch_sizes(capitals):
    sites = [embed(capitals), attn_out(capitals, 0), block(capitals, 0), "head_out.1.2", block(capitals, 1)]
    a = sweep(
        capitals, CLEAN, CORRUPT, metric=logit_diff("Paris", "Berlin"), sites=sites, batch_size=2, check_batching=False
    )
    b = sweep(
        capitals, CLEAN, CORRUPT, metric=logit_diff("Paris", "Berlin"), sites=sites, batch_size=30, check_batching=False
    )
    worst = max(abs(x - y) for rx, ry in zip(a.values, b.values) for x, y in zip(rx, ry))
    assert worst <= 1e-5, f"batch sizes 2 and 30 differ by {worst:.3g}"


DETERMINISTIC_TESTS = """
import os, random

import numpy
import torch

FIRST = {}


def _draws():
    return (random.random(), float(torch.rand(1)), float(numpy.random.rand()))


def test_a():
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    if not torch.cuda.is_available():
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    FIRST["a"] = _draws()
    _draws()  # consume more: the next test must not see the difference


def test_b():
    assert _draws() == FIRST["a"], "every test starts from the same seeds"
"""


@pytest.mark.parametrize("how", ["flag", "ini"])
def test_deterministic_option_turns_on_algorithms_and_seeds_each_test(pytester, how):
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    pytester.makepyfile(DETERMINISTIC_TESTS)
    if how == "ini":
        pytester.makeini("[pytest]\nnnsight_deterministic = true\n")
    result = pytester.runpytest_inprocess("-p", "no:randomly", *(["--nnsight-deterministic"] if how == "flag" else []))
    result.assert_outcomes(passed=2)
    assert (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ) == before, "the run left torch's deterministic mode changed"


def test_without_the_option_nothing_is_seeded(pytester):
    pytester.makepyfile(DETERMINISTIC_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(failed=2)
