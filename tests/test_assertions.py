"""Named assertions and plain `assert` on measured values: what passes, what fails, and what the failure shows.

The messages are checked on hand-built results (exact numbers) and, as users see them, in a pytester run on the
bundled model: the claim, aligned `site:`/`position:`/`prompt:`/`measured:`/`expected:` lines, the `!`-marked table,
and the test's own line as the failing one (the helpers hide their frames)."""

import fnmatch
import math
import re

import pytest

from pytest_nnsight import Effect, EffectMap
from pytest_nnsight.assertions import (
    FindingFailed,
    assert_beats_controls,
    assert_drops,
    assert_peaks_at,
    assert_restores,
    assert_top_token,
)
from pytest_nnsight.errors import NonFiniteMetricError
from pytest_nnsight.interventions import TopTokens


def effect(**kw):
    base = dict(
        kind="patch",
        site="resid_post.0",
        positions=(5,),
        position_tokens=("is",),
        metric="logit_diff('Paris', 'Berlin')",
        source_prompt="The capital of France is",
        target_prompt="The capital of Germany is",
        source=10.0,
        target=-10.0,
        intervened=0.0,
        normalized=0.5,
        tokens=("<bos>", "The", "capital", "of", "Germany", "is"),
    )
    base.update(kw)
    return Effect(**base)


def ablation(target, intervened):
    rel = (intervened - target) / abs(target)
    return effect(
        kind="zero ablation",
        source_prompt="",
        source=target,
        target=target,
        intervened=intervened,
        normalized=rel,
        direction="ablation",
    )


# -- assert_restores ------------------------------------------------------------------------------


def test_assert_restores_passes_at_and_above_the_bound():
    assert_restores(effect(normalized=0.9), at_least=0.9)
    assert_restores(effect(normalized=1.2), at_least=0.9)


def test_assert_restores_failure_lists_the_context():
    with pytest.raises(FindingFailed) as info:
        assert_restores(effect(normalized=0.5), at_least=0.9)
    lines = str(info.value).splitlines()
    assert lines[0] == "claim: patching resid_post.0 restores at least 0.9 of logit_diff('Paris', 'Berlin')"
    assert "site:      resid_post.0" in lines
    assert "position:  5 'is'" in lines
    assert "prompt:    'The capital of Germany is' <- 'The capital of France is' (clean->corrupt)" in lines
    assert "measured:  0 after the patch, -10 before, 10 on the source prompt" in lines
    assert "expected:  normalized >= 0.9, measured 0.5" in lines
    assert lines[-1].startswith("try: ")
    assert isinstance(info.value, AssertionError)


def test_assert_restores_refuses_nan():
    with pytest.raises(
        NonFiniteMetricError, match="the normalized effect is nan at resid_post.0 on 'The capital of Germany is'"
    ):
        assert_restores(effect(normalized=math.nan), at_least=0.0)


# -- plain assert on Measured ---------------------------------------------------------------------


def test_measured_keeps_its_value_and_explains_itself():
    e = effect(normalized=0.25)
    assert e.normalized == 0.25 and e.normalized < 0.3 and e.normalized >= 0.25 and isinstance(e.normalized, float)
    lines = e.normalized.explain(">=", 0.99)
    assert lines[0] == "0.25 >= 0.99"
    assert any(line.startswith("site:") and "resid_post.0" in line for line in lines)
    assert any(line.startswith("expected:") and ">= 0.99" in line for line in lines)
    assert float(e.delta) == 10.0 and e.delta > 9


def test_assertrepr_hook_flips_reversed_comparisons():
    from pytest_nnsight.plugin import pytest_assertrepr_compare

    m = effect(normalized=0.25).normalized
    assert pytest_assertrepr_compare(None, "<=", 0.99, m)[0] == "0.25 >= 0.99"
    assert pytest_assertrepr_compare(None, ">=", m, 0.99)[0] == "0.25 >= 0.99"
    assert pytest_assertrepr_compare(None, ">=", 0.25, 0.99) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_measured_raises_on_every_order_comparison(value):
    m = effect(normalized=value).normalized
    for compare in (
        lambda: m < 0.5,
        lambda: m <= 0.5,
        lambda: m > 0.5,
        lambda: m >= 0.5,
        lambda: 0.5 < m,
        lambda: 0.5 >= m,
    ):
        with pytest.raises(NonFiniteMetricError):
            compare()


# -- assert_drops ---------------------------------------------------------------------------------


def test_assert_drops_absolute_and_relative():
    e = ablation(target=10.0, intervened=4.0)  # drop 6, relative 0.6
    assert_drops(e, 6.0)
    assert_drops(e, 0.6, relative=True)
    with pytest.raises(FindingFailed) as info:
        assert_drops(e, 6.5)
    message = str(info.value)
    assert message.startswith(
        "claim: zero ablation of resid_post.0 lowers logit_diff('Paris', 'Berlin') by at least 6.5\n"
    )
    assert "expected:  drop >= 6.5, measured 6" in message
    assert "measured:  4 after the zero ablation, 10 before" in message
    with pytest.raises(
        FindingFailed, match=r"(?s)by at least 0\.7 \(relative\).*expected:  relative drop >= 0\.7, measured 0\.6"
    ):
        assert_drops(e, 0.7, relative=True)


def test_assert_drops_relative_to_a_negative_metric_uses_its_size():
    assert_drops(ablation(target=-10.0, intervened=-16.0), 0.6, relative=True)
    with pytest.raises(FindingFailed):
        assert_drops(ablation(target=-10.0, intervened=-4.0), 0.0)  # the metric rose


def test_assert_drops_refuses_nan():
    with pytest.raises(NonFiniteMetricError, match="the drop is nan"):
        assert_drops(ablation(target=10.0, intervened=math.nan), 1.0)


# -- assert_beats_controls ------------------------------------------------------------------------


def test_assert_beats_controls_names_the_controls_it_loses_to():
    e = effect(normalized=0.9, controls={"random_donor": 0.1, "position 1 'The'": 0.6})
    assert_beats_controls(e, 0.3)
    with pytest.raises(FindingFailed) as info:
        assert_beats_controls(e, 0.5)
    message = str(info.value)
    assert message.startswith("claim: the effect at resid_post.0 beats its controls by at least 0.5\n")
    assert "losing to: position 1 'The' (0.6)\n" in message  # and not to the random donor
    assert "controls:  random_donor 0.1, position 1 'The' 0.6" in message
    assert "expected:  effect 0.9 >= control + 0.5" in message


def test_assert_beats_controls_needs_controls():
    with pytest.raises(ValueError, match=r"run the intervention with controls=True"):
        assert_beats_controls(effect(), 0.1)


# -- assert_top_token -----------------------------------------------------------------------------


def top(tokens):
    return TopTokens(
        "The capital of Germany is",
        "The capital of France is",
        "resid_post.1",
        5,
        tuple(tokens),
        (0.9, 0.05, 0.01)[: len(tokens)],
    )


def test_assert_top_token_compares_the_first_token_ignoring_spaces():
    assert_top_token(None, top(["Paris", "Rome"]), "Paris")
    assert_top_token(None, top([" Paris", "Rome"]), "Paris")
    with pytest.raises(FindingFailed) as info:
        assert_top_token(None, top(["Rome", "Paris"]), "Paris")
    message = str(info.value)
    assert message.startswith("claim: the top token after patching resid_post.1 is 'Paris'\n")
    assert "measured:  'Rome' 0.900, 'Paris' 0.050" in message
    assert "prompt:    'The capital of Germany is' <- 'The capital of France is'" in message
    with pytest.raises(FindingFailed):
        assert_top_token(None, top([]), "Paris")


# -- assert_peaks_at ------------------------------------------------------------------------------


def emap(values):
    return EffectMap(
        tuple(tuple(r) for r in values),
        ("embed", "resid_post.0", "resid_post.1"),
        ("<bos>", "France", "is"),
        "ld",
        "The France is",
        "The Germany is",
        10.0,
        -10.0,
    )


PEAKED = [[0.0, 1.0, 0.0], [0.0, 0.01, 0.98], [0.0, 0.0, 1.0]]


def test_assert_peaks_at_passes_on_the_claimed_cells():
    assert_peaks_at(emap(PEAKED), [("embed", 1), ("resid_post.0", 2), (2, -1)], at_least=0.9, elsewhere_at_most=0.05)


def test_assert_peaks_at_marks_exactly_the_failing_cells():
    values = [row[:] for row in PEAKED]
    values[1][2], values[1][1], values[0][0] = 0.4, 0.3, math.nan
    with pytest.raises(FindingFailed) as info:
        assert_peaks_at(
            emap(values), [("embed", 1), ("resid_post.0", 2), ("resid_post.1", 2)], at_least=0.9, elsewhere_at_most=0.05
        )
    message = str(info.value)
    assert message.startswith("claim: the effect map peaks at embed @ 1, resid_post.0 @ 2, resid_post.1 @ 2\n")
    assert "failing:   3 of 9 cells:" in message
    assert (
        "resid_post.0 @ 2 'is': 0.4 (want >= 0.9)" in message
        and "resid_post.0 @ 1 'France': 0.3 (want |x| <= 0.05)" in message
    )
    assert "embed @ 0 '<bos>': nan (want finite)" in message
    table = message[message.index("cells marked ! failed") :].splitlines()[1:5]
    assert table[0].split() == ["0:<bos>", "1:France", "2:is"]
    assert table[1].split() == ["embed", "nan!", "1.00", "0.00"]
    assert table[2].split() == ["resid_post.0", "0.00", "0.30!", "0.40!"]
    assert table[3].split() == ["resid_post.1", "0.00", "0.00", "1.00"]


# -- as users see it ------------------------------------------------------------------------------

FINDINGS = """\
import copy

import pytest
import torch

from pytest_nnsight import ablate, assert_beats_controls, assert_drops, assert_peaks_at, assert_top_token, logit_diff, patch, patch_layer, sweep
from pytest_nnsight.sites import blocks

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
LD = logit_diff("Paris", "Berlin")


@pytest.fixture(scope="module")
def capitals(nnsight_models):
    return nnsight_models.get("bundled:capitals", device="cpu")


def test_strong_cell(capitals):
    effect = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=LD)
    assert effect.normalized >= 0.9


def test_weak_cell(capitals):
    effect = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="France", metric=LD)
    assert effect.normalized >= 0.99


def test_peaks(capitals):
    effects = sweep(capitals, CLEAN, CORRUPT, LD, sites=blocks(capitals))
    assert_peaks_at(effects, [("resid_post.0", 4), ("resid_post.1", 5)], at_least=0.9, elsewhere_at_most=0.05)


def test_drops(capitals):
    effect = ablate(capitals, CLEAN, site="transformer.h.0", position="France", metric=LD)
    assert_drops(effect, 5.0)


def test_controls(capitals):
    effect = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="France", metric=LD, controls=True)
    assert_beats_controls(effect, 0.5)


def test_top_token(capitals):
    result = patch_layer(capitals, CORRUPT, CLEAN, 1, -1)
    assert_top_token(capitals, result, "Berlin")


def test_nan_never_passes(capitals, nnsight_models):
    module = copy.deepcopy(capitals._module)
    with torch.no_grad():
        module.transformer.ln_f.weight[0] = float("nan")
    broken = nnsight_models.get(module, capitals.tokenizer)
    effect = patch(broken, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=LD)
    assert not effect.normalized < 0.5
"""


def section(result, name):
    """The failure report of one test in a pytester run."""
    text = result.stdout.str()
    match = re.search(rf"_{{3,}} {name} _{{3,}}\n(.*?)(?=\n_{{3,}} test_|\n={{3,}} )", text, re.S)
    assert match, f"no failure section for {name} in:\n{text}"
    return match.group(1)


def has_line(report, pattern):
    return any(fnmatch.fnmatchcase(line, pattern) for line in report.splitlines())


def line_of(source, needle):
    return next(i for i, line in enumerate(source.splitlines(), 1) if needle in line)


@pytest.fixture
def result(pytester):
    pytester.makepyfile(test_findings=FINDINGS)
    return pytester.runpytest("-p", "no:cacheprovider")


def test_failures_as_users_see_them(result):
    result.assert_outcomes(passed=1, failed=6)
    path = "test_findings.py"

    weak = section(result, "test_weak_cell")
    assert f"{path}:{line_of(FINDINGS, 'assert effect.normalized >= 0.99')}: AssertionError" in weak
    for expected in [
        "E       AssertionError: assert 0.000* >= 0.99",
        "E         claim: normalized effect of the patch at transformer.h.0 >= 0.99",
        "E         site:      transformer.h.0",
        "E         position:  4 'Germany'",
        "E         prompt:    'The capital of Germany is' <- 'The capital of France is' (clean->corrupt)",
        "E         measured:  -16.* after the patch, -16.* before, 16.* on the source prompt",
        "E         expected:  normalized effect of the patch at transformer.h.0 >= 0.99",
    ]:
        assert has_line(weak, expected), expected

    peaks = section(result, "test_peaks")
    assert (
        '>       assert_peaks_at(effects, [("resid_post.0", 4), ("resid_post.1", 5)], at_least=0.9, elsewhere_at_most=0.05)'
        in peaks
    )
    assert "FindingFailed: claim: the effect map peaks at resid_post.0 @ 4, resid_post.1 @ 5" in peaks
    assert has_line(
        peaks,
        "E       failing:   2 of 12 cells: resid_post.0 @ 4 'France': 0.000* (want >= 0.9); resid_post.0 @ 5 'is': 1 (want |x| <= 0.05)",
    )
    table = [line for line in peaks.splitlines() if line.startswith("E       resid_post.")]
    assert [line.split()[-2:] for line in table] == [["0.00!", "1.00!"], ["0.00", "1.00"]]

    drops = section(result, "test_drops")
    assert ">       assert_drops(effect, 5.0)" in drops
    assert (
        "FindingFailed: claim: zero ablation of transformer.h.0 lowers logit_diff('Paris', 'Berlin') by at least 5"
        in drops
    )
    assert re.search(r"E       expected:  drop >= 5, measured -?0\.0\d+", drops)
    assert "E       prompt:    'The capital of France is'" in drops

    controls = section(result, "test_controls")
    assert ">       assert_beats_controls(effect, 0.5)" in controls
    assert "E       losing to: random_donor (" in controls and "position 1 'The' (" in controls

    top = section(result, "test_top_token")
    assert '>       assert_top_token(capitals, result, "Berlin")' in top
    assert "E       measured:  'Paris' 0.9" in top and "E       expected:  top token 'Berlin'" in top

    nan = section(result, "test_nan_never_passes")
    assert "NonFiniteMetricError: normalized effect of the patch at transformer.h.0 is nan" in nan

    # the helpers hide their frames: each failure points at the test's own line, never into pytest_nnsight
    for name, needle in [
        ("test_peaks", "assert_peaks_at("),
        ("test_drops", "assert_drops("),
        ("test_controls", "assert_beats_controls("),
        ("test_top_token", "assert_top_token("),
    ]:
        report = section(result, name)
        assert f"{path}:{line_of(FINDINGS, needle)}: FindingFailed" in report, name
        assert "pytest_nnsight/assertions.py" not in report and "_fail(" not in report, name
