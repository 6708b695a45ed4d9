"""The capitals finding over generated variants: per-example (hypothesis shrinks a failure) and population forms.

The last test is a finding that holds on the seed prompt ('We flew to France ...') but not in general:
strict xfail, and its failure names the breaking variant.
"""

import pytest
import torch
from hypothesis import given, settings, target

from pytest_nnsight import bundled, logit_diff, patch
from pytest_nnsight.populations import assert_population, population
from pytest_nnsight.strategies import counterfactual_pairs, fillers, perturbed_pairs, prompts
from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS, HELD_OUT_TEMPLATES

TOKENIZER = bundled.tokenizer("bundled:capitals")  # strategies are built at collection: the tokenizer, not the weights
PAIRS = counterfactual_pairs(TOKENIZER, CAPITAL_TEMPLATES, {"country": CAPITALS})


def top_token(model, text):
    with torch.inference_mode():
        with model.trace(text):
            logits = model.lm_head.output[0, -1].save()
    return model.tokenizer.convert_ids_to_tokens([int(logits.argmax())])[0]


@pytest.mark.finding(
    "block 0 at the last position restores >= 0.7 of the capital's logit difference in every generated variant"
)
@settings(max_examples=20, deadline=None)
@given(pair=PAIRS)
def test_block0_last_position_restores_the_capital(capitals, pair):
    effect = patch(
        capitals,
        pair.clean,
        pair.corrupt,
        site="transformer.h.0",
        position="last",
        metric=logit_diff(pair.answer, pair.distractor),
    )
    target(-float(effect.normalized), label="weakest variant")
    assert effect.normalized >= 0.7


@pytest.mark.finding(
    "block 0 at the last position restores >= 0.7 in at least 90% of 64 variants (Wilson 95% lower bound)"
)
def test_block0_last_position_restores_the_capital_in_90_percent(capitals):
    result = population(capitals, PAIRS, site="transformer.h.0", position="last", n=64, threshold=0.7)
    print(result)
    assert_population(result, min_rate=0.9, on="lower_bound")


@pytest.mark.finding("filler prefixes do not change the answer")
@settings(max_examples=20, deadline=None)
@given(pair=perturbed_pairs(PAIRS, fillers()))
def test_filler_prefixes_do_not_change_the_answer(capitals, pair):
    plain, perturbed = pair
    assert top_token(capitals, perturbed.clean.text) == top_token(capitals, plain.clean.text) == plain.answer


@pytest.mark.xfail(
    strict=True, reason="true for 'We flew to France ...' but the held-out template fails for other countries"
)
@settings(max_examples=30, deadline=None)
@given(prompt=prompts(HELD_OUT_TEMPLATES[:1], country=list(CAPITALS)))
def test_held_out_template_names_the_capital(capitals, prompt):
    assert top_token(capitals, prompt.text) == CAPITALS[prompt.slots["country"]], f"breaking variant: {prompt.text!r}"


@pytest.fixture(scope="module")
def capitals(nnsight_models):
    """Module-scoped so hypothesis's function-scoped-fixture health check stays quiet; the session cache still loads it once."""
    return nnsight_models.get("bundled:capitals")
