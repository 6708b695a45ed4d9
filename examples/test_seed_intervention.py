"""The seed document's `InterventionExp.patch_layer`, as tests, on the bundled model and on GPT-2.

The seed writes the source prompt's hidden state at (layer, pos) into the target run and prints
the top-5 next tokens. As a finding: writing "France"'s last-position state into the "Germany"
run makes the model answer with France's capital, and a full sweep shows where that state lives.
"""

import pytest

from pytest_nnsight import assert_top_token, logit_diff, patch_layer, sweep
from pytest_nnsight.sites import blocks

# per model: clean/corrupt country, their capitals as single tokens of that model's tokenizer
CASES = {
    "bundled:capitals": ("The capital of {} is", "France", "Paris", "Germany", "Berlin"),
    "gpt2": ("The capital of{} is", " France", " Paris", " Italy", " Rome"),
}


def case(request):
    return CASES[request.node.callspec.params["model"]]


class InterventionExp:
    """The seed's class, its bookkeeping replaced by one call."""

    def __init__(self, model):
        self.model = model

    def patch_layer(self, prompt, source_prompt, layer, pos):
        result = patch_layer(self.model, corrupt=prompt, clean=source_prompt, layer=layer, position=pos, k=5)
        return {"top_probs": list(result.probs), "top_tokens": list(result.tokens), "result": result}


@pytest.mark.nnsight_models("bundled:capitals", "gpt2")
def test_patching_the_last_position_transfers_the_answer(model, request):
    template, country, capital, other, _ = case(request)
    exp = InterventionExp(model)
    last_layer = model.config.n_layer - 1
    out = exp.patch_layer(template.format(other), template.format(country), last_layer, -1)
    print(f"\n{out['result']!r}")
    assert len(out["top_tokens"]) == 5 and out["top_probs"] == sorted(out["top_probs"], reverse=True)
    assert_top_token(model, out["result"], capital)


@pytest.mark.nnsight_models("bundled:capitals", "gpt2")
def test_block_sweep_moves_from_subject_to_last_position(model, request):
    template, country, capital, other, other_capital = case(request)
    effects = sweep(
        model,
        template.format(country),
        template.format(other),
        metric=logit_diff(capital, other_capital),
        sites=blocks(model),
    )
    print(f"\n{effects!r}\n{effects.to_text()}")
    subject = effects.tokens.index(
        model.tokenizer.convert_ids_to_tokens(model.tokenizer(country, add_special_tokens=False)["input_ids"])[0]
    )
    last = len(effects.tokens) - 1
    assert effects[effects.sites[-1], last] >= 0.99  # the final residual at the last position carries everything
    assert effects[effects.sites[0], subject] >= 0.5 or effects[effects.sites[0], last] >= 0.9
