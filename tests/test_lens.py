"""The logit lens against a hand-written computation (transformers' hidden states through ln_f and lm_head), and its claim."""

import pytest
import torch

from pytest_nnsight.errors import ArgumentError, MetricError
from pytest_nnsight.lens import LogitLens, assert_emerges_at, logit_lens

PROMPT = "The capital of France is"


def hand_lens(model, prompt, answer_id):
    """Ranks and probs per layer x position from a plain transformers forward, no pytest-nnsight code."""
    hf = model._module
    ids = model.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = hf(**ids, output_hidden_states=True)
        hs = out.hidden_states  # embeddings, block 0 .. block L-2 outputs, ln_f(block L-1 output)
        rows = [hf.lm_head(hf.transformer.ln_f(h[0])) for h in hs[:-1]] + [out.logits[0]]
    ranks = [[int((r[p] > r[p, answer_id]).sum()) for p in range(r.shape[0])] for r in rows]
    probs = [[float(r[p].softmax(-1)[answer_id]) for p in range(r.shape[0])] for r in rows]
    return ranks, probs


def test_lens_matches_a_hand_written_logit_lens(capitals):
    lens = logit_lens(capitals, PROMPT, answer="Paris")
    ranks, probs = hand_lens(capitals, PROMPT, lens.answer_id)
    assert lens.sites == ("embed", "resid_post.0", "resid_post.1")
    assert [list(r) for r in lens.ranks] == ranks
    assert torch.allclose(torch.tensor(lens.probs), torch.tensor(probs), atol=1e-6)
    assert lens.tokens == ("<bos>", "The", "capital", "of", "France", "is")


def test_lens_on_a_three_layer_random_model_matches_by_hand(nnsight_models):
    from pytest_nnsight.testing import tiny_gpt2

    module, tok = tiny_gpt2(seed=3, n_layer=3)
    model = nnsight_models.get(module, tok, device="cpu")
    lens = logit_lens(model, "When Mary and John went to the store", answer="John")
    ranks, probs = hand_lens(model, "When Mary and John went to the store", lens.answer_id)
    assert len(lens.sites) == 4
    assert [list(r) for r in lens.ranks] == ranks
    assert torch.allclose(torch.tensor(lens.probs), torch.tensor(probs), atol=1e-6)


def test_last_row_is_the_models_own_prediction(capitals):
    lens = logit_lens(capitals, PROMPT, answer="Berlin", positions="last")
    with torch.inference_mode():
        logits = capitals._module(**capitals.tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]
    assert lens.positions == (5,)
    assert lens.ranks[-1][0] == int((logits > logits[lens.answer_id]).sum())
    assert lens.top[-1][0] == capitals.tokenizer.convert_ids_to_tokens(int(logits.argmax()))


def test_emergence_claim_passes_and_fails_with_the_ranks(capitals):
    lens = logit_lens(capitals, PROMPT, answer="Paris")
    first = lens.emergence("last")
    assert first is not None
    layer = lens.sites.index(first) - 1  # row 0 is embed
    assert_emerges_at(lens, layer=layer)
    wrong = layer + 1 if layer + 1 < len(lens.sites) - 1 else layer - 1
    with pytest.raises(AssertionError) as info:
        assert_emerges_at(lens, layer=wrong)
    text = str(info.value)
    assert f"becomes top-1 at resid_post.{wrong}" in text
    assert "ranks:" in text and "embed: " in text and "(0 = top-1)" in text
    assert f"first top-1 at {first}" in text


def test_emergence_over_variants_states_a_pass_rate(capitals):
    lenses = [
        logit_lens(capitals, t, answer=a, positions="last")
        for t, a in [
            ("The capital of France is", "Paris"),
            ("The capital of Spain is", "Madrid"),
            ("France has its capital in", "Paris"),
        ]
    ]
    emerged = [x.emergence() for x in lenses]
    layer = int(emerged[0].split(".")[1])
    assert_emerges_at(lenses, layer=layer, min_rate=emerged.count(emerged[0]) / 3)
    wrong = 1 - layer
    with pytest.raises(AssertionError) as info:
        assert_emerges_at(lenses, layer=wrong, min_rate=0.5)
    text = str(info.value)
    assert f"claim: the answer becomes top-1 at resid_post.{wrong} and stays top-1 in at least 50% of 3 prompts" in text
    assert "pass rate:" in text and "'The capital of France is' -> 'Paris'" in text and "ranks [" in text
    with pytest.raises(ArgumentError, match=r"a non-empty list of them"):
        assert_emerges_at([], layer=0)


def test_lens_rows_and_columns_reject_bad_values(capitals):
    lens = logit_lens(capitals, PROMPT, answer="Paris", positions=[4, 5])
    with pytest.raises(ArgumentError, match=r"layer 7 is out of range: the model has 2 layers, valid 0..1"):
        lens.row(7)
    with pytest.raises(ArgumentError, match=r"position 2 is not in this lens: it covers positions \[4, 5\]"):
        lens.column(2)
    assert isinstance(lens, LogitLens) and lens.ranks_at(-1) == {s: lens.ranks[i][1] for i, s in enumerate(lens.sites)}


def test_unknown_and_multi_token_answers_are_named(capitals):
    with pytest.raises(MetricError, match=r"'Atlantis' is not in the vocabulary"):
        logit_lens(capitals, PROMPT, answer="Atlantis")
    with pytest.raises(MetricError, match=r"'Paris Berlin' is 2 tokens"):
        logit_lens(capitals, PROMPT, answer="Paris Berlin")
    with pytest.raises(ArgumentError, match="expects a LogitLens or a non-empty list"):
        assert_emerges_at("not a lens", layer=0)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gptj"])
def test_lens_and_greedy_generation_on_other_families_match_transformers(nnsight_models, family):
    """The lens decodes through each family's own final norm and head; generation equals transformers' cached generate."""
    from pytest_nnsight.generation import generate
    from pytest_nnsight.testing import tiny_model

    module, tok = tiny_model(family, seed=2)
    model = nnsight_models.get(module, tok, device="cpu")
    prompt = "When Mary and John went to the store"
    lens = logit_lens(model, prompt, answer="John")
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = module(**ids, output_hidden_states=True)
        norm = module.get_submodule(
            {"gpt_neox": "gpt_neox.final_layer_norm", "llama": "model.norm", "gptj": "transformer.ln_f"}[family]
        )
        head = module.get_output_embeddings()
        rows = [head(norm(h[0])) for h in out.hidden_states[:-1]] + [out.logits[0]]
        new = module.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[
            0, ids["input_ids"].shape[1] :
        ].tolist()
    assert [list(r) for r in lens.ranks] == [
        [int((r[p] > r[p, lens.answer_id]).sum()) for p in range(r.shape[0])] for r in rows
    ]
    assert list(generate(model, prompt, max_new_tokens=4).token_ids[0]) == new
    assert list(generate(model, prompt, max_new_tokens=4, use_cache=True).token_ids[0]) == new
