"""Probing the bundled capitals model: at which layer does the last position linearly encode the country?

The activations of 384 prompts (48 countries x 8 templates) at the last position are computed once,
stored in the activation cache (pytest's cache dir) and reused by every test here and by later runs.
A linear probe per site reads the country (48 classes) from them. The finding agrees with the
patching map (test_capitals_patching.py): the embedding at the last position carries nothing about
the country; after block 0, whose attention moves it there, the country is decodable.
"""

import json

import pytest

from pytest_nnsight import logit_diff, sweep
from pytest_nnsight.bundled import path_of
from pytest_nnsight.probing import assert_probe, probe_sites
from pytest_nnsight.sites import blocks, embed

MANIFEST = json.loads((path_of("bundled:capitals") / "manifest.json").read_text())
COUNTRIES = list(MANIFEST["task"]["capitals"])
PROMPTS = [t.format(country=c) for t in MANIFEST["task"]["templates"] for c in COUNTRIES]
LABELS = [c for _ in MANIFEST["task"]["templates"] for c in COUNTRIES]


@pytest.fixture(scope="module")
def capitals(nnsight_models):
    return nnsight_models.get("bundled:capitals")


def country_activations(activation_cache, model):
    return activation_cache.get(model, PROMPTS, sites=[embed(model), *blocks(model)], positions="last")


@pytest.fixture(scope="module")
def probes(activation_cache, capitals):
    """A probe per site for the country at the last position (stratified 75/25 split, seed 0)."""
    result = probe_sites(country_activations(activation_cache, capitals), LABELS)
    print(f"\n{result.to_text()}")
    return result


@pytest.mark.finding("a linear probe decodes the country at the last position from block 0 on, not from the embeddings")
def test_country_is_decodable_at_the_last_position_from_block_0(probes):
    assert_probe(probes["resid_post.0"], 0.9, over_baseline=0.5)
    assert_probe(probes["resid_post.1"], 0.9, over_baseline=0.5)
    embedding = probes["embed"]  # the last token ('is', 'in', ...) does not depend on the country
    assert embedding.accuracy <= embedding.baseline + 0.1


@pytest.mark.finding("the first decodable layer is the first causal one in the patching map (block 0)")
def test_decodable_layer_agrees_with_the_patching_map(capitals, probes):
    first_decodable = probes.first_above(0.9, over_baseline=0.5)
    for template in (
        "The capital of {} is",
        "Everyone knows that the capital of {} is",
        "Q : what is the capital of {} ? A :",
    ):
        effects = sweep(
            capitals,
            template.format("France"),
            template.format("Germany"),
            metric=logit_diff("Paris", "Berlin"),
            sites=[embed(capitals), *blocks(capitals)],
        )
        last = effects.positions[-1]
        first_causal = next((s for s, v in zip(effects.sites, effects.column(last)) if v >= 0.9), None)
        assert first_decodable == first_causal == "resid_post.0", (
            f"{template}:\n{effects.to_text()}\n{probes.to_text()}"
        )


def test_cache_is_reused_between_tests_without_a_forward_pass(activation_cache, capitals, probes):
    if not activation_cache.enabled:
        pytest.skip("the activation cache is off (--nnsight-no-cache); run without it to see the reuse")
    before = activation_cache.forwards
    acts = country_activations(activation_cache, capitals)  # the same key the `probes` fixture used
    assert acts.source == "loaded"
    assert activation_cache.forwards == before
