"""Sites and positions: every accepted form resolves to the module and tokens a hand-written nnsight trace reads,
and every misuse fails before a forward pass with a message that names the valid choices."""

import pytest
import torch

from pytest_nnsight.errors import PositionError, SiteError
from pytest_nnsight.interventions import Prompt, ablate, patch, patch_layer, run, steer
from pytest_nnsight.metrics import as_metric, logit_diff, prob
from pytest_nnsight.sites import (
    Site,
    attn_out,
    block,
    blocks,
    embed,
    head,
    mlp_out,
    resolve_position,
    resolve_site,
    resolve_sites,
    site,
    tokens_of,
)
from pytest_nnsight.sweeps import sweep

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
TOKENS = ["<bos>", "The", "capital", "of", "France", "is"]
LD = logit_diff("Paris", "Berlin")


def saved(model, sites, prompt=CLEAN):
    """The activations `run` saves at `sites` for one prompt."""
    _, acts = run(model, prompt, as_metric(model, prob("Paris")), save=sites)
    return acts


# -- sites ----------------------------------------------------------------------------------------


def test_envoy_path_and_model_prefixed_path_name_the_same_site(capitals):
    expected = Site("transformer.h.0")
    assert resolve_site(capitals, capitals.transformer.h[0]) == expected
    assert resolve_site(capitals, "transformer.h.0") == expected
    assert resolve_site(capitals, "model.transformer.h.0") == expected
    assert resolve_site(capitals, capitals.transformer.h[1].attn.c_proj) == Site("transformer.h.1.attn.c_proj")
    assert resolve_site(capitals, expected) is expected


def test_envoy_site_reads_the_same_tensor_as_a_hand_trace(capitals):
    site = resolve_site(capitals, capitals.transformer.h[1])
    with torch.inference_mode():
        with capitals.trace(CLEAN):
            hand = capitals.transformer.h[1].output.save()
    torch.testing.assert_close(saved(capitals, [site])[site], hand, atol=1e-6, rtol=0)


def test_input_part_is_the_previous_blocks_output(capitals):
    site = resolve_site(capitals, "transformer.h.1:input")
    assert site == Site("transformer.h.1", part="input") and str(site) == "transformer.h.1:input"
    with torch.inference_mode():
        with capitals.trace(CLEAN):
            hand_out0 = capitals.transformer.h[0].output.save()
            hand_in = capitals.transformer.h[1].input.save()
    acts = saved(capitals, [site, block(capitals, 0)])
    torch.testing.assert_close(acts[site], hand_in, atol=1e-6, rtol=0)
    torch.testing.assert_close(acts[site], hand_out0, atol=1e-6, rtol=0)


def test_named_helpers_point_at_the_gpt2_modules(capitals):
    assert block(capitals, 1) == Site("transformer.h.1", label="resid_post.1")
    assert block(capitals, -1) == block(capitals, 1)
    assert attn_out(capitals, 0) == Site("transformer.h.0.attn", label="attn_out.0")
    assert mlp_out(capitals, 1) == Site("transformer.h.1.mlp", label="mlp_out.1")
    assert embed(capitals) == Site("transformer.drop", label="embed")
    assert blocks(capitals) == [block(capitals, 0), block(capitals, 1)]
    assert [str(s) for s in blocks(capitals)] == ["resid_post.0", "resid_post.1"]
    assert resolve_sites(capitals, "blocks") == blocks(capitals)
    assert resolve_sites(capitals, "attn") == [attn_out(capitals, 0), attn_out(capitals, 1)]
    assert resolve_sites(capitals, "mlp") == [mlp_out(capitals, 0), mlp_out(capitals, 1)]
    assert resolve_sites(capitals, ["transformer.h.0", capitals.transformer.h[1]]) == [
        Site("transformer.h.0"),
        Site("transformer.h.1"),
    ]


def test_named_helpers_read_what_a_hand_trace_reads(capitals):
    # the attention module returns a tuple (out, weights) under transformers 5: the site is its first element
    with torch.inference_mode():
        with capitals.trace(CLEAN):
            emb = capitals.transformer.drop.output.save()
            attn = capitals.transformer.h[0].attn.output[0].save()
            mlp = capitals.transformer.h[0].mlp.output.save()
            out0 = capitals.transformer.h[0].output.save()
    sites = [embed(capitals), attn_out(capitals, 0), mlp_out(capitals, 0), block(capitals, 0)]
    acts = saved(capitals, sites)
    for s, hand in zip(sites, [emb, attn, mlp, out0]):
        assert acts[s].shape == (1, 6, 64), s
        torch.testing.assert_close(acts[s], hand, atol=1e-6, rtol=0)
    # invariant of the residual stream: block output = embeddings + attention + MLP
    torch.testing.assert_close(acts[block(capitals, 0)], emb + attn + mlp, atol=1e-5, rtol=0)


def test_short_spellings_are_the_vocabulary(capitals):
    """block/attn_out/mlp_out/head/embed are site(...) under another name: equal Sites, one label, negative indices."""
    pairs = [
        (block(capitals, 1), site(capitals, "resid_post", 1), "resid_post.1"),
        (block(capitals, -2), site(capitals, "resid_post", 0), "resid_post.0"),
        (attn_out(capitals, -1), site(capitals, "attn_out", 1), "attn_out.1"),
        (mlp_out(capitals, 0), site(capitals, "mlp_out", 0), "mlp_out.0"),
        (head(capitals, 1, -1), site(capitals, "head_out", 1, 3), "head_out.1.3"),
        (head(capitals, -1, 2), resolve_site(capitals, "head_out.-1.2"), "head_out.1.2"),
        (embed(capitals), site(capitals, "embed"), "embed"),
    ]
    for short, long, label in pairs:
        assert short == long and str(short) == label
        assert resolve_site(capitals, label) == short  # a row label names its site
    for group, name in [("blocks", "resid_post"), ("attn", "attn_out"), ("mlp", "mlp_out")]:
        assert resolve_sites(capitals, group) == resolve_sites(capitals, name)


def test_head_site_is_a_slice_of_the_output_projection_input(capitals):
    site = head(capitals, 1, 2)
    assert (site.path, site.part, site.head, site.n_heads, str(site)) == (
        "transformer.h.1.attn.c_proj",
        "input",
        2,
        4,
        "head_out.1.2",
    )
    with torch.inference_mode():
        with capitals.trace(CLEAN):
            merged = capitals.transformer.h[1].attn.c_proj.input.save()
    acts = saved(capitals, [head(capitals, 1, i) for i in range(4)])
    assert acts[site].shape == (1, 6, 16)
    torch.testing.assert_close(acts[site], merged[..., 32:48], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([acts[head(capitals, 1, i)] for i in range(4)], -1), merged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer", [2, -3, 7])
def test_out_of_range_layer_names_the_valid_range(capitals, layer):
    with pytest.raises(
        SiteError, match=rf"layer {layer} is out of range: .* has 2 layers, valid 0\.\.1 \(or -2\.\.-1\)"
    ):
        block(capitals, layer)
    with pytest.raises(SiteError, match=r"valid 0\.\.1"):
        mlp_out(capitals, layer)


def test_non_int_layer_is_refused(capitals):
    with pytest.raises(SiteError, match=r"layer '1' is not an int: expected 0\.\.1"):
        block(capitals, "1")


def test_out_of_range_index_in_a_path_names_the_valid_range(capitals):
    with pytest.raises(
        SiteError,
        match=r"index 2 in site 'transformer\.h\.2' is out of range: transformer\.h has 2 entries, valid 0\.\.1",
    ):
        resolve_site(capitals, "transformer.h.2")
    with pytest.raises(SiteError, match=r"valid 0\.\.1"):
        resolve_site(capitals, "model.transformer.h.9:input")
    with pytest.raises(
        SiteError, match=r"index 5 in site 'transformer\.h\.5\.attn' is out of range: transformer\.h has 2 entries"
    ):
        resolve_site(capitals, "transformer.h.5.attn")


def test_bundled_model_is_named_by_its_id_in_messages(capitals):
    with pytest.raises(SiteError, match=r"bundled:capitals has 2 layers"):
        block(capitals, 2)


def test_digit_under_a_module_that_is_no_list_is_an_unknown_site(capitals):
    with pytest.raises(SiteError, match=r"unknown site 'transformer\.drop\.0'"):
        resolve_site(capitals, "transformer.drop.0")


def test_unknown_path_lists_close_matches(capitals):
    with pytest.raises(SiteError) as info:
        resolve_site(capitals, "transformer.h.0.atn")
    message = str(info.value)
    assert "unknown site 'transformer.h.0.atn'" in message
    assert "close matches: transformer.h.0.attn" in message


def test_path_with_no_close_match_lists_the_top_level_modules(capitals):
    with pytest.raises(
        SiteError, match=r"unknown site 'zzz' in GPT2LMHeadModel; top-level modules: transformer, lm_head"
    ):
        resolve_site(capitals, "zzz")


def test_bad_part_and_bad_spec_types_are_refused(capitals):
    with pytest.raises(SiteError, match=r"names part 'weights': expected one of output, input"):
        resolve_site(capitals, "transformer.h.0:weights")
    with pytest.raises(SiteError, match=r"site 5 is not a Site, an envoy or a path string"):
        resolve_site(capitals, 5)
    with pytest.raises(SiteError, match=r"an empty list of sites"):
        resolve_sites(capitals, [])
    with pytest.raises(SiteError, match=r"unknown site 'transformer\.nope'"):
        resolve_site(capitals, Site("transformer.nope"))


@pytest.mark.parametrize("index", [4, -5, 1.0, "0", True])
def test_bad_head_index_names_the_valid_range(capitals, index):
    with pytest.raises(SiteError, match=rf"head {index!r} is out of range: layer 0 has 4 heads, valid 0\.\.3"):
        head(capitals, 0, index)


def test_site_errors_are_value_errors(capitals):
    with pytest.raises(ValueError):
        block(capitals, 5)


# -- positions ------------------------------------------------------------------------------------


def test_tokens_of_includes_the_bos_token(capitals):
    assert tokens_of(capitals, CLEAN) == TOKENS


@pytest.mark.parametrize(
    "position, expected",
    [
        (4, [4]),
        (0, [0]),
        (-1, [5]),
        (-6, [0]),
        ("last", [5]),
        (slice(1, 3), [1, 2]),
        (slice(-2, None), [4, 5]),
        (slice(None, None, 2), [0, 2, 4]),
        ([5, 1, -1], [1, 5]),
        ((2, 3), [2, 3]),
        ("France", [4]),
        (" France ", [4]),
        ("capital of", [2, 3]),
        ("<bos>", [0]),
    ],
)
def test_each_position_form_resolves_to_token_indices(capitals, position, expected):
    tokens = tokens_of(capitals, CLEAN)
    assert resolve_position(tokens, position, prompt=CLEAN) == expected


def test_template_slot_resolves_to_the_words_tokens(capitals):
    tokens = tokens_of(capitals, CLEAN)
    assert resolve_position(tokens, "{country}", prompt=CLEAN, slots={"country": "France"}) == [4]
    assert resolve_position(tokens, "{what}", prompt=CLEAN, slots={"what": "capital of"}) == [2, 3]
    assert resolve_position(tokens, "{n}", prompt=CLEAN, slots={"n": -2}) == [4]


@pytest.mark.parametrize("position", [6, -7, 100])
def test_out_of_range_position_names_the_valid_range_and_tokens(capitals, position):
    tokens = tokens_of(capitals, CLEAN)
    with pytest.raises(PositionError) as info:
        resolve_position(tokens, position, prompt=CLEAN)
    message = str(info.value)
    assert f"position {position} is out of range" in message
    assert "valid 0..5 or -6..-1" in message
    assert "[0:<bos> 1:The 2:capital 3:of 4:France 5:is]" in message


def test_out_of_range_entry_in_a_list_is_refused(capitals):
    with pytest.raises(PositionError, match=r"position 9 is out of range"):
        resolve_position(tokens_of(capitals, CLEAN), [1, 9], prompt=CLEAN)


def test_absent_word_shows_the_tokenization(capitals):
    with pytest.raises(PositionError) as info:
        resolve_position(tokens_of(capitals, CLEAN), "Spain", prompt=CLEAN)
    assert "word 'Spain' does not occur as whole tokens in prompt 'The capital of France is'" in str(info.value)
    assert "4:France" in str(info.value)


def test_part_of_a_token_is_not_a_word(capitals):
    with pytest.raises(PositionError, match="'Fran' does not occur"):
        resolve_position(tokens_of(capitals, CLEAN), "Fran", prompt=CLEAN)


def test_ambiguous_word_lists_where_it_occurs(capitals):
    prompt = "The capital of France is the capital"
    with pytest.raises(
        PositionError, match=r"word 'capital' is ambiguous: it occurs at \[2, 7\] .*give an int position instead"
    ):
        resolve_position(tokens_of(capitals, prompt), "capital", prompt=prompt)


def test_slot_without_slots_says_plain_prompts_carry_none(capitals):
    with pytest.raises(
        PositionError,
        match=r"'\{country\}' names a template slot .* its slots: none \(plain prompt strings carry no slots\)",
    ):
        resolve_position(tokens_of(capitals, CLEAN), "{country}", prompt=CLEAN)
    with pytest.raises(PositionError, match=r"its slots: \{city\}"):
        resolve_position(tokens_of(capitals, CLEAN), "{country}", prompt=CLEAN, slots={"city": "Paris"})


@pytest.mark.parametrize("position", [True, 1.5, [], ["France"], slice(7, 9), None])
def test_other_position_types_are_refused(capitals, position):
    with pytest.raises(PositionError):
        resolve_position(tokens_of(capitals, CLEAN), position, prompt=CLEAN)


def test_slot_position_through_patch_equals_the_word_position(capitals):
    by_slot = patch(
        capitals,
        Prompt(CLEAN, {"country": "France"}),
        Prompt(CORRUPT, {"country": "Germany"}),
        site="transformer.drop",
        position="{country}",
        metric=LD,
    )
    by_word = patch(capitals, CLEAN, CORRUPT, site="transformer.drop", position="France", metric=LD)
    assert by_slot.positions == by_word.positions == (4,)
    assert by_slot.position_tokens == ("Germany",)  # the token of the run that is patched
    assert float(by_slot.normalized) == pytest.approx(float(by_word.normalized), abs=1e-6)


def test_slot_at_different_indices_in_the_two_prompts_is_refused(capitals):
    clean = Prompt(CLEAN, {"country": "France"})
    corrupt = Prompt("Germany has its capital in", {"country": "Germany"})
    with pytest.raises(
        PositionError, match=r"slot \{country\} sits at \[4\] in the clean prompt but at \[1\] in the corrupt one"
    ):
        patch(capitals, clean, corrupt, site="transformer.h.0", position="{country}", metric=LD)


def test_prompts_of_different_lengths_print_both_tokenizations(capitals):
    with pytest.raises(PositionError) as info:
        patch(capitals, CLEAN, "The capital city of Germany is", site="transformer.h.0", position="last", metric=LD)
    message = str(info.value)
    assert "different lengths (6 vs 7)" in message
    assert "clean:   [0:<bos> 1:The 2:capital 3:of 4:France 5:is]" in message
    assert "corrupt: [0:<bos> 1:The 2:capital 3:city 4:of 5:Germany 6:is]" in message
    with pytest.raises(PositionError, match=r"(?s)clean: .*3:of 4:France.*corrupt: .*3:city"):
        sweep(capitals, CLEAN, "The capital city of Germany is", metric=LD)


def test_a_bad_position_in_patch_prints_both_tokenizations(capitals):
    with pytest.raises(
        PositionError, match=r"(?s)word 'Spain' does not occur.*clean:   \[.*4:France.*\]\n  corrupt: \[.*4:Germany.*\]"
    ):
        patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="Spain", metric=LD)


LONG = " ".join([CLEAN] * 7)  # 36 tokens; the model's context is 32


@pytest.mark.parametrize(
    "call",
    [
        lambda m: patch(m, LONG, LONG.replace("France", "Germany"), site="transformer.h.0", position="last", metric=LD),
        lambda m: sweep(m, LONG, LONG.replace("France", "Germany"), metric=LD),
        lambda m: ablate(m, LONG, site="transformer.h.0", position="last", metric=LD),
        lambda m: steer(m, LONG, site="transformer.h.0", position="last", metric=LD, vector=torch.zeros(64)),
        lambda m: patch_layer(m, corrupt=LONG, clean=LONG, layer=0, position=-1),
    ],
    ids=["patch", "sweep", "ablate", "steer", "patch_layer"],
)
def test_prompt_longer_than_the_context_is_a_position_error(capitals, call):
    assert len(tokens_of(capitals, LONG)) == 36
    with pytest.raises(PositionError, match=r"is 36 tokens, longer than the model's context of 32"):
        call(capitals)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, p: patch(m, p, p, site="transformer.h.0", position="last", metric=LD),
        lambda m, p: sweep(m, p, p, metric=LD),
        lambda m, p: ablate(m, p, site="transformer.h.0", position="last", metric=LD),
        lambda m, p: steer(m, p, site="transformer.h.0", position="last", metric=LD, vector=torch.zeros(64)),
        lambda m, p: patch_layer(m, corrupt=p, clean=CLEAN, layer=0, position=-1),
    ],
    ids=["patch", "sweep", "ablate", "steer", "patch_layer"],
)
@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_a_position_error(capitals, call, prompt):
    with pytest.raises(PositionError, match=r"is empty: expected text the model can read"):
        call(capitals, prompt)


def test_a_word_of_the_corrupt_prompt_names_the_same_position(capitals):
    by_corrupt_word = patch(capitals, CLEAN, CORRUPT, site="transformer.drop", position="Germany", metric=LD)
    by_clean_word = patch(capitals, CLEAN, CORRUPT, site="transformer.drop", position="France", metric=LD)
    assert by_corrupt_word.positions == by_clean_word.positions == (4,)
    assert float(by_corrupt_word.normalized) == float(by_clean_word.normalized)
    with pytest.raises(PositionError, match=r"(?s)word 'Italy' does not occur.*clean: .*corrupt: "):
        patch(capitals, CLEAN, CORRUPT, site="transformer.drop", position="Italy", metric=LD)
