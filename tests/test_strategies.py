"""Strategies: filled templates, counterfactual pairs matched by the tokenizer, fillers; argument errors."""

import pytest
from hypothesis import given, settings, strategies as st

from pytest_nnsight.interventions import Prompt
from pytest_nnsight.strategies import (
    CounterfactualPair,
    StrategyError,
    counterfactual_pairs,
    fillers,
    perturbed_pairs,
    prompts,
)
from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS, FIRST_NAMES, HELD_OUT_TEMPLATES

COUNTRIES = ["France", "Germany", "Italy"]


def test_wordlists_match_the_bundled_manifest():
    assert len(CAPITALS) == 48 and CAPITALS["France"] == "Paris" and CAPITALS["Iceland"] == "Reykjavik"
    assert len(CAPITAL_TEMPLATES) == 8 and CAPITAL_TEMPLATES[0] == "The capital of {country} is"
    assert len(HELD_OUT_TEMPLATES) == 2 and len(FIRST_NAMES) >= 10


@given(p=prompts(["The capital of {country} is", "{country} has its capital in"], country=COUNTRIES))
def test_prompts_fill_every_slot(p):
    assert isinstance(p, Prompt) and "{" not in p.text
    assert p.slots["country"] in COUNTRIES and p.slots["country"] in p.text


def test_prompts_shrink_to_first_template_and_word():
    from hypothesis import find

    found = find(
        prompts(["The capital of {country} is", "{country} has its capital in"], country=COUNTRIES), lambda p: True
    )
    assert found.text == "The capital of France is"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: prompts([], country=COUNTRIES), "templates=[]"),
        (lambda: prompts(["The capital of {country} is"]), "slot(s) {country} without a word list"),
        (lambda: prompts(["The capital of {country} is"], country=[]), "word list for slot {country}"),
        (lambda: prompts(["The capital of {country} is"], country=["France", ""]), "contains ''"),
    ],
)
def test_prompts_reject_bad_arguments_eagerly(call, message):
    with pytest.raises(
        StrategyError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("[", r"\[")
    ):
        call()


@settings(max_examples=60)
@given(data=st.data())
def test_pairs_line_up_token_for_token(capitals, data):
    pair = data.draw(counterfactual_pairs(capitals, CAPITAL_TEMPLATES, {"country": CAPITALS}))
    assert isinstance(pair, CounterfactualPair)
    tok = capitals.tokenizer
    clean, corrupt = tok.tokenize(pair.clean.text), tok.tokenize(pair.corrupt.text)
    assert len(clean) == len(corrupt)
    diff = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
    assert (
        len(diff) == 1
        and clean[diff[0]] == pair.clean.slots["country"]
        and corrupt[diff[0]] == pair.corrupt.slots["country"]
    )
    assert (
        pair.answer == CAPITALS[pair.clean.slots["country"]]
        and pair.distractor == CAPITALS[pair.corrupt.slots["country"]]
    )
    assert pair.answer != pair.distractor


def test_pair_space_counts_and_samples(capitals):
    strategy = counterfactual_pairs(
        capitals, ["The capital of {country} is"], {"country": {"France": "Paris", "Spain": "Madrid", "Peru": "Lima"}}
    )
    assert len(strategy.space) == 6  # 3 words x 2 partners each
    assert len(set(strategy.space.sample(6))) == 6
    assert strategy.space.sample(4, seed=3) == strategy.space.sample(4, seed=3)
    with pytest.raises(StrategyError, match="n=7 is larger than the 6 distinct"):
        strategy.space.sample(7)


def test_pairs_drop_unknown_words_and_name_them_when_too_few(capitals):
    words = {"France": "Paris", "Germany": "Berlin", "Narnia": "Cair", "Atlantis": "Poseidonis"}
    strategy = counterfactual_pairs(capitals, ["The capital of {country} is"], {"country": words})
    assert {p.clean.slots["country"] for p in strategy.space.sample(2)} == {"France", "Germany"}
    with pytest.raises(StrategyError, match=r"only 1 of 3 words.*'Narnia' \(unknown to the tokenizer\); 'Atlantis'"):
        counterfactual_pairs(
            capitals,
            ["The capital of {country} is"],
            {"country": {"France": "Paris", "Narnia": "Cair", "Atlantis": "P"}},
        )


def test_pairs_bad_arguments(capitals):
    with pytest.raises(StrategyError, match="vary='city'"):
        counterfactual_pairs(capitals, CAPITAL_TEMPLATES, {"country": CAPITALS}, vary="city")
    with pytest.raises(StrategyError, match="without answers"):
        counterfactual_pairs(capitals, CAPITAL_TEMPLATES, {"country": ["France", "Spain"]})
    with pytest.raises(StrategyError, match="answer function 'boom' failed for country word 'France'"):

        def boom(word):
            raise KeyError(word)

        counterfactual_pairs(capitals, CAPITAL_TEMPLATES, {"country": ["France", "Spain"]}, answer=boom)
    with pytest.raises(StrategyError, match="model_or_tokenizer=int"):
        counterfactual_pairs(3, CAPITAL_TEMPLATES, {"country": CAPITALS})
    with pytest.raises(StrategyError, match=r"slot\(s\) \{city\} without a word list"):
        counterfactual_pairs(capitals, ["{country} and {city}"], {"country": CAPITALS})


def test_answer_function(capitals):
    strategy = counterfactual_pairs(
        capitals, ["The capital of {country} is"], {"country": ["France", "Spain"]}, answer=CAPITALS.__getitem__
    )
    assert {(p.answer, p.distractor) for p in strategy.space.sample(2)} == {("Paris", "Madrid"), ("Madrid", "Paris")}


@given(f=fillers(["I read that", "Q :"], max_words=2, cased=True))
def test_fillers(f):
    words = f.split()
    assert 2 <= len(words) <= 6 and f.lower().replace("q :", "").replace("i read that", "").strip() == ""


def test_perturbed_pairs_keep_slots(capitals):
    from hypothesis import find

    base = counterfactual_pairs(capitals, CAPITAL_TEMPLATES, {"country": CAPITALS})
    plain, perturbed = find(perturbed_pairs(base), lambda x: True)
    assert perturbed.clean.text == "I read that " + plain.clean.text and perturbed.clean.slots == plain.clean.slots
    with pytest.raises(StrategyError, match="max_words=0"):
        fillers(max_words=0)
