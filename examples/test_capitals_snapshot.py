"""The capitals finding as a snapshot: the whole patching map, not just its peak, kept across upgrades.

The first run with ``--snapshot-update`` records the map (embeddings and every block x every
token) to ``__snapshots__/test_capitals_snapshot/`` with the environment that produced it
(library versions, device, dtype, model, weights fingerprint). Later runs pass while the numbers
stay within tolerance; after ``pip install -U nnsight`` a run that still passes reports the finding
as re-verified, one that moved fails with "this finding drifted after nnsight X -> Y" and the cells
that moved. ``--nnsight-snapshot-refresh-env`` accepts an upgrade without rewriting the numbers.
"""

import pytest

from pytest_nnsight import logit_diff, sweep
from pytest_nnsight.sites import blocks, embed


@pytest.mark.finding("the whole patching map of France -> Germany (embeddings and blocks x tokens) is unchanged")
def test_capitals_patching_map(nnsight_model, finding_snapshot):
    capitals = nnsight_model("bundled:capitals")
    effects = sweep(
        capitals,
        "The capital of France is",
        "The capital of Germany is",
        metric=logit_diff("Paris", "Berlin"),
        sites=[embed(capitals), *blocks(capitals)],
    )
    assert effects == finding_snapshot(model=capitals, atol=1e-3, rtol=1e-3)
