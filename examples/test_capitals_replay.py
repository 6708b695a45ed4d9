"""Recorded findings, checked twice: through nnsight now, and replayed with plain torch hooks (no nnsight).

Each file in `findings/` is a `FindingSpec` written by `scripts/record_findings.py`: the setup of
one patching finding on the bundled capitals model and the numbers it gave. The test recomputes it
through pytest-nnsight's `patch` and compares with the recorded numbers; when they differ,
the replay says whether nnsight's tracing or the model's own numbers changed.
"""

from pathlib import Path

import pytest

from pytest_nnsight.replay import FindingSpec, compute_with_nnsight, diagnose, replay

SPECS = sorted((Path(__file__).parent / "findings").glob("*.json"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_recorded_finding_holds(nnsight_model, path):
    spec = FindingSpec.load(path)
    now = compute_with_nnsight(spec, nnsight_model(spec.model))
    status, why = diagnose(spec.recorded, now, replay(spec).values, atol=spec.tolerance)
    moved = {
        q: f"{spec.recorded[q]:.6g} -> {now[q]:.6g}"
        for q in now
        if abs(now[q] - spec.recorded[q]) > spec.tolerance + 1e-4 * abs(spec.recorded[q])
    }
    assert status == "stable", (
        f"{spec.name} ({spec.clean!r} <- {spec.corrupt!r}, {spec.sites[0].label or spec.sites[0].path} @ {list(spec.positions)}, {spec.metric}): {status}: {why}; moved: {moved}"
    )
