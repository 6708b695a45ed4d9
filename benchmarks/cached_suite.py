"""The suite `make bench` runs twice for `cache_rerun_speedup` (copied to a temp dir as test_cached_suite.py).

Each test asks the activation cache for a different set of clean runs on the bundled model, as
suites of representational findings do; the checks themselves are cheap. The first run computes
and stores every set, the second loads them all (and must run no forward pass).
"""

import json
import os

import pytest

from pytest_nnsight.bundled import path_of
from pytest_nnsight.sites import blocks, embed
from pytest_nnsight.wordlists import CAPITAL_FILLERS

TASK = json.loads((path_of("bundled:capitals") / "manifest.json").read_text())["task"]
COUNTRIES = list(TASK["capitals"])
TEMPLATES = TASK["templates"] + TASK["held_out_templates"]


@pytest.fixture(scope="module")
def model(nnsight_models):
    return nnsight_models.get("bundled:capitals")


PREFIXES = ["", "So ,", *CAPITAL_FILLERS]  # one test per prefix: 6 prompt sets of 480 prompts


@pytest.mark.parametrize("prefix", PREFIXES)
def test_country_set(activation_cache, model, prefix):
    prompts = [f"{prefix} {t.format(country=c)}".strip() for t in TEMPLATES for c in COUNTRIES]
    acts = activation_cache.get(model, prompts, sites=[embed(model), *blocks(model)], positions="last", batch_size=16)
    print(f"\nSET {prefix!r} source={acts.source} forwards={activation_cache.forwards}")
    expected = os.environ.get("CACHED_SUITE_EXPECT")  # set by benchmarks/run.py: computed, then loaded
    assert expected is None or acts.source == expected
    assert acts.source != "loaded" or activation_cache.forwards == 0
    last = acts[str(blocks(model)[1])][:, 0].float()  # the label of block 1, whatever the site vocabulary calls it
    assert last.shape == (len(prompts), 64) and bool(last.isfinite().all())
    # the country sets apart the final residual stream: same-country rows closer than a random pair
    by_country = last.view(len(TEMPLATES), len(COUNTRIES), 64)
    within = (by_country - by_country.mean(0)).norm(dim=-1).mean()
    assert within < (last - last.mean(0)).norm(dim=-1).mean()
