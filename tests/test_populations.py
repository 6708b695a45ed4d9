"""Population claims: batched numbers equal single patch() runs, Wilson bounds, failure text; per-example @given via pytester."""

import math

import pytest

from pytest_nnsight.assertions import FindingFailed
from pytest_nnsight.interventions import patch
from pytest_nnsight.metrics import logit_diff
from pytest_nnsight.populations import assert_population, population, wilson_interval
from pytest_nnsight.strategies import StrategyError, counterfactual_pairs
from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS, HELD_OUT_TEMPLATES


@pytest.mark.parametrize(
    "k, n, low, high",
    [(5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (0, 10, 0.0, 0.2775)],  # published Wilson 95% intervals
)
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize("k, n", [(1, 3), (45, 64), (90, 100), (999, 1000)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    # the Wilson bounds are the roots L of (k/n - L)^2 = z^2 L (1 - L) / n
    z = 1.959963984540054
    for bound in wilson_interval(k, n):
        assert (k / n - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / n, rel=1e-9, abs=1e-12)


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="k=3, n=2"):
        wilson_interval(3, 2)


@pytest.fixture(scope="module")
def pairs(capitals):
    return counterfactual_pairs(capitals, CAPITAL_TEMPLATES + HELD_OUT_TEMPLATES, {"country": CAPITALS})


@pytest.mark.parametrize("position", ["last", "{country}"])
# left padding (the default) must not move the numbers either
@pytest.mark.parametrize("same_length, tol", [(True, 1e-5), (False, 1e-5)])
def test_population_equals_single_patch_runs(capitals, pairs, position, same_length, tol):
    result = population(
        capitals,
        pairs,
        site="transformer.h.0",
        position=position,
        n=24,
        threshold=0.7,
        batch_size=16,
        same_length=same_length,
    )
    assert result.n == 24 and len(set(result.variants)) == 24
    assert len({v.template for v in result.variants}) > 1  # different lengths, so rows are left-padded
    for i, (p, eff) in enumerate(zip(result.variants, result.effects)):
        single = patch(
            capitals,
            p.clean,
            p.corrupt,
            site="transformer.h.0",
            position=position,
            metric=logit_diff(p.answer, p.distractor),
        )
        raw = (result.clean[i], result.corrupt[i], result.patched[i])
        assert raw == pytest.approx((single.source, single.target, float(single.intervened)), rel=tol, abs=tol)
        # the normalized effect divides by clean - corrupt, which amplifies batch-size float rounding on small gaps
        assert eff == pytest.approx(
            float(single.normalized), abs=tol * max(1.0, 16 / abs(single.source - single.target))
        )


def test_population_summary_numbers(capitals, pairs):
    r = population(capitals, pairs, site="transformer.h.0", position="last", n=40, threshold=0.9)
    passing = [e for e in r.effects if e >= 0.9]
    assert r.passed == len(passing) and r.rate == len(passing) / 40
    assert r.mean == pytest.approx(sum(r.effects) / 40)
    assert r.std == pytest.approx(math.sqrt(sum((e - r.mean) ** 2 for e in r.effects) / 39))
    assert r.worst(1)[0][0] == min(r.effects)
    # same seed, same variants
    assert (
        population(capitals, pairs, site="transformer.h.0", position="last", n=40, threshold=0.9).effects == r.effects
    )


def test_assert_population_failure_text(capitals, pairs):
    r = population(capitals, pairs, site="transformer.h.0", position="{country}", n=20, threshold=0.7)
    with pytest.raises(FindingFailed) as info:
        assert_population(r, min_rate=0.9)
    text = str(info.value)
    assert text.startswith("claim: patching transformer.h.0 at '{country}' restores >= 0.7")
    for part in ["pass rate: 0.000 (0 / 20)", "wilson:", "mean ", "20 / 20 failed (100%)", "worst:", "try:"]:
        assert part in text
    worst = r.worst(1)[0][1]
    assert text.index(repr(worst.clean.text)) < text.index("expected:")


def test_assert_population_on_lower_bound_vs_rate(capitals):
    few = counterfactual_pairs(capitals, ["The capital of {country} is"], {"country": CAPITALS})
    r = population(capitals, few, site="transformer.h.0", position="last", n=10, threshold=0.5)
    assert r.passed == 10 and r.lower_bound == pytest.approx(0.7225, abs=1e-4)
    assert_population(r, min_rate=0.9, on="rate")
    with pytest.raises(FindingFailed, match="Wilson 95% lower bound"):
        assert_population(r, min_rate=0.9)  # 10 / 10 is not enough evidence for 90%


def test_population_bad_input(capitals):
    small = counterfactual_pairs(
        capitals, ["The capital of {country} is"], {"country": {"France": "Paris", "Spain": "Madrid"}}
    )
    with pytest.raises(StrategyError, match="n=3 is larger than the 2 distinct"):
        population(capitals, small, site="transformer.h.0", position="last", n=3, threshold=0.5)
    with pytest.raises(StrategyError, match="needs n="):
        population(capitals, small, site="transformer.h.0", position="last", threshold=0.5)
    with pytest.raises(ValueError, match="on='mean'"):
        assert_population(
            population(capitals, small, site="transformer.h.0", position="last", n=2, threshold=0.5), on="mean"
        )


PER_EXAMPLE = """
import pytest
from hypothesis import given, settings, target
from pytest_nnsight import logit_diff, patch
from pytest_nnsight.strategies import counterfactual_pairs
from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS
from pytest_nnsight.models import ModelCache
from pytest_nnsight.settings import Settings

PAIRS = counterfactual_pairs(ModelCache(Settings(device="cpu")).get("bundled:capitals"), CAPITAL_TEMPLATES, {"country": CAPITALS})

def effect(model, pair, position):
    e = patch(model, pair.clean, pair.corrupt, site="transformer.h.0", position=position, metric=logit_diff(pair.answer, pair.distractor))
    target(-float(e.normalized), label="weakest effect")
    return e

@settings(max_examples=10)  # the rest from the profile under test (no deadline, health checks that fit models)
@given(pair=PAIRS)
def test_holds(nnsight_model, pair):
    assert effect(nnsight_model("bundled:capitals"), pair, "last").normalized >= 0.7

@settings(max_examples=10)
@given(pair=PAIRS)
def test_fails(nnsight_model, pair):
    assert effect(nnsight_model("bundled:capitals"), pair, "{country}").normalized >= 0.5
"""


def test_per_example_runs_without_health_check_errors_and_shrinks(pytester):
    pytester.makepyfile(test_inner=PER_EXAMPLE)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--nnsight-device=cpu", "--nnsight-hypothesis-profile=nnsight-ci"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_fails(*", "*text='The capital of France is'*", "*text='The capital of Germany is'*"]
    )
    result.stdout.no_fnmatch_line("*FailedHealthCheck*")
    result.stdout.no_fnmatch_line("*DeadlineExceeded*")


def test_profiles_are_selectable_and_validated(pytester):
    pytester.makepyfile(
        """
        from hypothesis import settings
        def test_profile():
            s = settings()
            print("PROFILE", s.derandomize, s.database, s.deadline, s.max_examples)
        """
    )
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", "--nnsight-hypothesis-profile=nnsight-ci")
    result.stdout.fnmatch_lines(["*PROFILE True None None 50*"])
    bad = pytester.runpytest("-p", "no:cacheprovider", "--nnsight-hypothesis-profile=nope")
    bad.stderr.fnmatch_lines(
        ["*invalid nnsight_hypothesis_profile 'nope' from command line option --nnsight-hypothesis-profile*nnsight-ci*"]
    )
