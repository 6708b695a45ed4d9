"""One finding, several model families: the site vocabulary (resid_pre.L, resid_post.L, head_out.L.H, ...)
names the same component on GPT-2 and Llama-style models, so the test is written once and parametrized.

The finding (true of any causal LM, so it holds on these seeded random models): the country's
information enters only at the subject token, so patching the residual stream *before* layer 0 at
the subject restores the clean answer fully, and so does patching the last layer's output at the
last position; patching the subject after the last layer does nothing to the next-token logits.
"""

import pytest

from pytest_nnsight import assert_restores, logit_diff, patch
from pytest_nnsight.families import n_layers
from pytest_nnsight.testing import tiny_model

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"


@pytest.fixture(params=["gpt2", "llama"])
def model(request, nnsight_model):
    return nnsight_model(*tiny_model(request.param, seed=3))


@pytest.mark.finding("on GPT-2 and Llama alike the country enters at the subject and leaves at the last position")
def test_country_enters_at_the_subject_and_leaves_at_the_last_position(model):
    metric = logit_diff("Paris", "Berlin")
    last = n_layers(model) - 1
    assert_restores(patch(model, CLEAN, CORRUPT, site="resid_pre.0", position="France", metric=metric), 0.999)
    assert_restores(patch(model, CLEAN, CORRUPT, site=f"resid_post.{last}", position="last", metric=metric), 0.999)
    late = patch(model, CLEAN, CORRUPT, site=f"resid_post.{last}", position="France", metric=metric)
    assert abs(late.normalized) < 1e-4
