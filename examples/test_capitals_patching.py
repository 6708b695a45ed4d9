"""Activation patching on the bundled capitals model: where does the country's information live?

Patch the clean run's activation ("... France is") into the corrupt run ("... Germany is") at
one (site, position) cell and measure how much of `logit(Paris) - logit(Berlin)` comes back.
The finding: the information sits at the subject token after the embeddings, and at the last
token after block 0, whose attention moves it there.
"""

import pytest

from pytest_nnsight import assert_peaks_at, assert_restores, logit_diff, patch, sweep
from pytest_nnsight.sites import blocks, embed

TEMPLATES = ["The capital of {} is", "Everyone knows that the capital of {} is", "Q : what is the capital of {} ? A :"]
PAIRS = [
    ("France", "Paris", "Germany", "Berlin"),
    ("Japan", "Tokyo", "Kenya", "Nairobi"),
    ("Peru", "Lima", "Norway", "Oslo"),
]


@pytest.fixture
def capitals(nnsight_model):
    return nnsight_model("bundled:capitals")


@pytest.mark.finding(
    "the country sits at the subject token after the embeddings, then at the last token from block 0 on"
)
@pytest.mark.parametrize("template", TEMPLATES)
def test_subject_then_last_position(capitals, template):
    country, capital, other, other_capital = PAIRS[0]
    clean, corrupt = template.format(country), template.format(other)
    effects = sweep(
        capitals, clean, corrupt, metric=logit_diff(capital, other_capital), sites=[embed(capitals), *blocks(capitals)]
    )
    print(f"\n{effects!r}\n{effects.to_text()}")
    subject = effects.tokens.index(country)
    last = len(effects.tokens) - 1
    assert_peaks_at(
        effects,
        [("embed", subject), ("resid_post.0", last), ("resid_post.1", last)],
        at_least=0.9,
        elsewhere_at_most=0.05,
    )


@pytest.mark.finding("patching the last position after block 0 restores the capital (>= 0.9 of the logit difference)")
@pytest.mark.parametrize("country, capital, other, other_capital", PAIRS)
def test_last_position_after_block_0_restores_the_answer(capitals, country, capital, other, other_capital):
    effect = patch(
        capitals,
        f"The capital of {country} is",
        f"The capital of {other} is",
        site="transformer.h.0",
        position="last",
        metric=logit_diff(capital, other_capital),
        controls=True,
    )
    print(f"\n{effect!r} controls {effect.controls}")
    assert effect.normalized >= 0.9
    assert_restores(effect, at_least=0.9)


@pytest.mark.finding("after block 0 the subject position no longer matters (|effect| <= 0.05)")
def test_subject_position_after_block_0_no_longer_matters(capitals):
    effect = patch(
        capitals,
        "The capital of France is",
        "The capital of Germany is",
        site=capitals.transformer.h[0],
        position="France",
        metric=logit_diff("Paris", "Berlin"),
    )
    assert abs(effect.normalized) <= 0.05
