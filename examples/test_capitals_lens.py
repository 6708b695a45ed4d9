"""The logit lens on the bundled capitals model agrees with the patching map about where the capital appears.

Measured on the shipped weights, 8 trained templates x 12 countries (corrupt: the next country): at the last position
the capital is top-1 from `resid_post.0` on in 96 / 96 prompts, and the first layer whose last-position patch restores
at least half of logit(capital) - logit(other capital) is also `resid_post.0` in 96 / 96 (its effect there 0.99-1.0).
Through the embeddings alone (row `embed`) the capital is never top-1 at the last position.
"""

import pytest

from pytest_nnsight import logit_diff, sweep
from pytest_nnsight.lens import assert_emerges_at, logit_lens
from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS

COUNTRIES = list(CAPITALS.items())


@pytest.fixture(scope="module")
def capitals(nnsight_models):
    return nnsight_models.get("bundled:capitals")


@pytest.mark.finding("the logit lens makes Paris top-1 at the last position from layer 0 on, not before")
def test_capital_emerges_at_layer_0(capitals):
    lens = logit_lens(capitals, "The capital of France is", answer="Paris")
    print(lens.to_text())
    assert_emerges_at(lens, layer=0, position="last")


@pytest.mark.finding(
    "the capital is top-1 at the last position from layer 0 on in >= 95% of 96 prompts (8 templates x 12 countries)"
)
def test_capital_emerges_at_layer_0_across_templates_and_countries(capitals):
    lenses = [
        logit_lens(capitals, t.format(country=c), answer=a, positions="last")
        for t in CAPITAL_TEMPLATES
        for c, a in COUNTRIES[:12]
    ]
    assert_emerges_at(lenses, layer=0, min_rate=0.95)


@pytest.mark.finding(
    "where the lens shows the capital is where patching the last position restores it (every template, 3 countries)"
)
@pytest.mark.parametrize("template", CAPITAL_TEMPLATES)
def test_lens_emergence_is_the_first_layer_the_patching_map_restores(capitals, template):
    for i in range(3):
        (country, capital), (other, distractor) = COUNTRIES[i], COUNTRIES[i + 1]
        clean, corrupt = template.format(country=country), template.format(country=other)
        lens = logit_lens(capitals, clean, answer=capital, positions="last")
        effects = sweep(
            capitals, clean, corrupt, metric=logit_diff(capital, distractor), sites="resid_post", positions=[-1]
        )
        first_restoring = next((site for site, row in zip(effects.sites, effects.values) if row[0] >= 0.5), None)
        assert lens.emergence("last") == first_restoring, (
            f"{clean!r}: lens {lens.ranks_at('last')}, patching {effects.to_text()}"
        )


@pytest.mark.finding("the logit-lens map of 'The capital of France is' (ranks and probabilities of Paris) is unchanged")
def test_lens_map_snapshot(capitals, finding_snapshot):
    lens = logit_lens(capitals, "The capital of France is", answer="Paris")
    assert lens == finding_snapshot(model=capitals, atol=1e-4, rtol=1e-3)
