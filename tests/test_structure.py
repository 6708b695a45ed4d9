"""Structure snapshots (the graph inspector): records, explanations, and one test per silent upgrade hazard.

Library changes are simulated on a tiny GPT-2 (transformers 5 here): `tuple_blocks` makes every block
return `(hidden,)` as transformers 4.57 did (H1/H2), and the next module unwraps it, as 4.57's GPT2Model did.
"""

import pytest
import torch

from pytest_nnsight import logit_diff, patch, steer
from pytest_nnsight.errors import InterventionError, PositionError
from pytest_nnsight.models import wrap
from pytest_nnsight.structure import collapse, expand, model_structure
from pytest_nnsight.structure_diff import explain
from pytest_nnsight.testing import tiny_gpt2, word_tokenizer

PROMPT = "The capital of France is"


def tuple_blocks(module, layers=None):
    """Make GPT-2 blocks return `(hidden,)` like transformers 4.57, with the next module taking element 0."""
    blocks = module.transformer.h
    chosen = range(len(blocks)) if layers is None else layers
    for i in chosen:
        blocks[i].register_forward_hook(lambda _m, _a, out: (out,))
    for nxt in [*blocks, module.transformer.ln_f]:
        nxt.register_forward_pre_hook(lambda _m, args: (args[0][0], *args[1:]) if isinstance(args[0], tuple) else None)
    return module


def structure(module=None, tok=None, **kw):
    if module is None:
        module, tok = tiny_gpt2()
    return model_structure(wrap(module, tok), **kw).record


def test_record_is_symbolic_collapsed_and_in_call_order():
    rec = structure()
    mods = rec["modules"]
    assert mods["transformer.h.*"]["output"] == "Tensor[b,s,32] float32" and mods["transformer.h.*"]["indices"] == [
        "0",
        "1",
    ]
    assert mods["transformer.h.*.attn"]["output"] == {"tuple": ["Tensor[b,s,32] float32", None]}
    assert mods["lm_head"]["output"] == f"Tensor[b,s,{len(word_tokenizer())}] float32"
    assert mods["transformer.wpe"]["output"] == "Tensor[1,s,32] float32"  # positions broadcast over the batch
    assert mods["transformer.h"]["calls"] == 0  # a ModuleList never runs
    order = rec["call_order"]
    assert (
        order.index("transformer.wte")
        < order.index("transformer.h.*")
        < order.index("transformer.ln_f")
        < order.index("lm_head")
    )
    assert rec["tokenizer"] == {"padding_side": "left", "pad_token": "<pad>", "keys": ["input_ids", "attention_mask"]}
    assert rec["attention"]["implementation"] == "sdpa"
    assert expand(collapse(expand(mods))) == expand(mods)


def test_symbolic_dims_do_not_depend_on_the_probe_length():
    a = structure(prompt="The capital of France is")
    b = structure(prompt="When Mary and John went to the store , John gave a drink to")
    assert a["modules"] == b["modules"]


def test_plain_module_with_ids_and_module_with_tokenizer():
    net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 3))
    from pytest_nnsight.models import wrap as wrap_plain

    rec = model_structure(wrap_plain(net), inputs=torch.arange(5).unsqueeze(0)).record
    assert rec["modules"]["1"]["output"] == "Tensor[b,s,3] float32" and rec["tokenizer"] is None
    assert rec["attention"]["weights"].startswith("unknown")
    module, tok = tiny_gpt2()
    # a torch module + tokenizer is wrapped first
    assert model_structure(module, tok).record["modules"] == structure()["modules"]


def test_short_probe_is_refused_with_its_length():
    with pytest.raises(ValueError, match=r"probe 'Paris' is 2 token\(s\) long: use one of at least 4"):
        structure(prompt="Paris")


def test_h1_h2_block_tuple_to_tensor_is_explained():
    """H1/H2: transformers 4.57 -> 5 turned GPT-2 block outputs from (hidden,) into hidden: .output[0] means batch row 0."""
    old, new = structure(tuple_blocks(tiny_gpt2()[0]), tiny_gpt2()[1]), structure()
    lines = explain(old, new)
    assert (
        "transformer.h.*: output changed from tuple(Tensor[b,s,32]) to Tensor[b,s,32]; code that reads .output[0] now "
        "selects batch row 0 instead of the hidden states, and writes to .output[0] change only batch row 0 (H1/H2)"
    ) in lines, lines
    back = explain(new, old)
    assert any(
        line.startswith("transformer.h.*: output changed from Tensor[b,s,32] to tuple(Tensor[b,s,32])")
        and "TypeError" in line
        for line in back
    ), back


def test_change_in_one_layer_names_that_layer_only():
    lines = explain(structure(tuple_blocks(tiny_gpt2()[0], layers=[1]), tiny_gpt2()[1]), structure())
    assert any(line.startswith("transformer.h.1: output changed") for line in lines), lines
    assert not any(line.startswith(("transformer.h.*: output", "transformer.h.0: output")) for line in lines), lines


def test_h1_h2_patch_reads_the_hidden_states_on_tuple_and_tensor_blocks():
    """H1/H2 prevented: patch() normalizes block outputs, so a finding gives the same number on either container."""
    effects = []
    for module in (tiny_gpt2()[0], tuple_blocks(tiny_gpt2()[0])):
        model = wrap(module, tiny_gpt2()[1])
        effects.append(
            patch(
                model,
                "The capital of France is",
                "The capital of Germany is",
                site="transformer.h.0",
                position="last",
                metric=logit_diff("Paris", "Berlin"),
            )
        )
    assert effects[0].normalized == pytest.approx(effects[1].normalized, abs=1e-5), (effects[0], effects[1])
    assert effects[0].intervened == pytest.approx(effects[1].intervened, abs=1e-5)


def test_h4_padding_side_change_is_explained_and_pinned():
    """H4: nnsight <= 0.7 kept right padding, 0.8 pads left: the snapshot names it; wrap() pins left either way."""
    module, tok = tiny_gpt2()
    tok.padding_side = "right"
    model = wrap(module, tok)
    assert model.tokenizer.padding_side == "left"  # prevented: the fixtures' wrapper pins it
    old = model_structure(model).record
    model.tokenizer.padding_side = "right"  # what a wrapper that keeps the tokenizer's side gives
    lines = explain(old, model_structure(model).record)
    assert lines[0] == (
        "tokenizer: padding side changed from left to right; shorter prompts in a batch now end with pad tokens, "
        "so position -1 / 'last' reads a pad and batched results differ from single-prompt runs (H4/H5)"
    ), lines
    # the nnsight probe sees the consequence itself: the padded row's last logits no longer equal the prompt alone
    assert len(lines) == 2 and lines[1].startswith(
        "nnsight: in a padded batch, model.trace([short, long]), the short row's "
        "last-position logits now differ from the same prompt alone"
    ), lines
    assert old["nnsight"]["padding"] == "same as alone"


def test_h5_batched_last_token_equals_single_prompt_under_the_pinned_tokenizer():
    """H5: left padding without position ids shifted batched logits on <= 0.7; with the plugin's wrapper they match."""
    module, tok = tiny_gpt2()
    tok.padding_side = "right"
    model = wrap(module, tok)
    short, long = "The capital of France is", "When Mary and John went to the store , John gave"
    with torch.inference_mode():
        with model.trace([short, long]):
            batched = model.lm_head.output[:, -1].save()
        with model.trace(short):
            single = model.lm_head.output[:, -1].save()
    diff = (batched[0] - single[0]).abs().max().item()
    assert diff < 1e-5, (
        f"short prompt batched with a longer one: last-token logits differ by {diff} (padding side {model.tokenizer.padding_side})"
    )


def test_h6_prompts_of_different_lengths_are_refused_not_shifted():
    """H6: absolute positions move under padding; patch() refuses prompts of different token lengths instead."""
    module, tok = tiny_gpt2()
    model = wrap(module, tok)
    with pytest.raises(PositionError):
        patch(
            model,
            "The capital of France is",
            "The capital of the city of Germany is",
            site="transformer.h.0",
            position=2,
            metric=logit_diff("Paris", "Berlin"),
        )


def test_h7_token_type_ids_are_pinned_out_and_explained_when_they_return():
    """H7: a tokenizer emitting token_type_ids makes GPT-2 run wte twice; wrap() drops them, the snapshot names them."""
    module, _ = tiny_gpt2()
    model = wrap(module, word_tokenizer(token_type_ids=True))
    old = model_structure(model).record
    assert old["tokenizer"]["keys"] == ["input_ids", "attention_mask"]  # prevented
    model.tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    lines = explain(old, model_structure(model).record)
    assert any(
        line.startswith("tokenizer: now returns token_type_ids; GPT-2-style models embed them") for line in lines
    ), lines
    assert any(line.startswith("transformer.wte: now runs 2 times per forward (was 1)") for line in lines), lines


def test_sdpa_attention_weights_not_materialized_is_explained():
    """SDPA returns no attention weights (None / an empty attentions tuple); eager does. The snapshot names the switch."""
    module, tok = tiny_gpt2()
    module.set_attn_implementation("eager")
    old = structure(module, tok)
    assert old["attention"]["weights"] == "materialized (2 x Tensor[b,4,s,s])"
    module.set_attn_implementation("sdpa")
    lines = explain(old, structure(module, tok))
    # what code reads comes first (the attention output's element 1), then the attention setup behind it
    assert (
        lines[0]
        == "transformer.h.*.attn: output[1] is now None (was Tensor[b,4,s,s]); code that reads it (e.g. attention weights) gets None"
    ), lines
    assert lines[1].startswith("attention: implementation changed from 'eager' to 'sdpa'"), lines
    assert lines[2].startswith("attention: weights are no longer materialized"), lines


def test_dtype_and_width_changes_are_explained():
    lines = explain(structure(), structure(tiny_gpt2()[0].to(torch.float64), tiny_gpt2()[1]))
    assert (
        "transformer.ln_f: output dtype changed from float32 to float64; numbers move at float64 precision and the snapshot tolerance by dtype changes"
        in lines
    )
    lines = explain(structure(), structure(*tiny_gpt2(n_embd=64)))
    assert any(
        line.startswith(
            "transformer.h.*: output shape changed from [b,s,32] to [b,s,64]; saved values, patches and steering vectors"
        )
        for line in lines
    ), lines


def test_module_renamed_removed_added_and_call_order():
    def rec(mods, order):
        return {"modules": mods, "call_order": order}

    lin = {
        "class": "Linear",
        "calls": 1,
        "input": "Tensor[b,s,8] float32",
        "signature": "1 args; kwargs: -",
        "output": "Tensor[b,s,8] float32",
    }
    ln = {**lin, "class": "LayerNorm"}
    old = rec(
        {"model": lin, "norm": ln, "proj": lin, "drop": {"class": "Dropout", "calls": 1}}, ["model", "norm", "proj"]
    )
    new = rec(
        {"model": lin, "final_norm": ln, "proj": lin, "extra": {**lin, "class": "GELU"}},
        ["model", "proj", "final_norm"],
    )
    lines = explain(old, new)
    assert (
        "norm: renamed to final_norm (LayerNorm); code that reads model.norm now fails with AttributeError: use final_norm"
        in lines
    )
    assert "drop: module removed (was Dropout); code that reads model.drop now fails with AttributeError" in lines
    assert "extra: new module (GELU, runs 1x)" in lines
    assert not any("call order" in line for line in lines)  # a rename is not an order change
    moved = explain(rec({"a": lin, "b": lin}, ["a", "b"]), rec({"a": lin, "b": lin}, ["b", "a"]))
    assert moved == [
        "call order changed: b now runs before a; inside one trace nnsight (0.5+) requires reading modules in "
        "execution order, so code written in the old order raises OutOfOrderError"
    ]


def test_h10_h11_broadcastable_values_are_refused():
    """H10/H11: nnsight accepts a broadcastable wrong shape (0.4's validate=True is ignored on 0.7+); steer() checks it exactly."""
    module, tok = tiny_gpt2()
    model = wrap(module, tok)
    with pytest.raises(InterventionError, match="broadcastable shape would silently change every position"):
        steer(
            model,
            PROMPT,
            site="transformer.h.0",
            position="last",
            vector=torch.ones(1),
            metric=logit_diff("Paris", "Berlin"),
        )


def test_h13_bad_layer_is_a_site_error_on_every_nnsight():
    """H13: a bad layer is IndexError on <= 0.7, AttributeError on 0.8; pytest-nnsight raises SiteError either way."""
    from pytest_nnsight.errors import SiteError
    from pytest_nnsight.sites import block

    model = wrap(*tiny_gpt2())
    with pytest.raises(SiteError, match="5"):
        block(model, 5)


def test_h8_attribution_gradients_are_real():
    """H8: the 0.4 gradient idiom gives None on 0.8 with no error; attribution_patch() gets real, non-zero gradients."""
    from pytest_nnsight import attribution_patch

    model = wrap(*tiny_gpt2())
    effects = attribution_patch(
        model, "The capital of France is", "The capital of Germany is", metric=logit_diff("Paris", "Berlin")
    )
    values = torch.as_tensor(effects.values, dtype=torch.float64)
    assert torch.isfinite(values).all() and values.abs().max() > 0, effects


# H14 (nnsight 0.8 reads -v from sys.argv at import): checked in the fresh interpreter of
# tests/test_plugin.py::test_ten_tests_load_the_model_once_and_verbose_leaves_nnsight_debug_off, with its control.


SNAPSHOT_TEST = """
import os
from pytest_nnsight.models import wrap
from pytest_nnsight.testing import tiny_gpt2

def tuple_blocks(module):
    for block in module.transformer.h:
        block.register_forward_hook(lambda _m, _a, out: (out,))
    for nxt in [*module.transformer.h, module.transformer.ln_f]:
        nxt.register_forward_pre_hook(lambda _m, args: (args[0][0], *args[1:]) if isinstance(args[0], tuple) else None)
    return module

def test_tiny_structure(structure_snapshot):
    module, tok = tiny_gpt2()
    if os.environ.get("SIMULATE_TRANSFORMERS_4"):
        tuple_blocks(module)
    structure_snapshot(wrap(module, tok))

def test_assert_form(structure_snapshot):
    from pytest_nnsight.structure import model_structure
    assert model_structure(wrap(*tiny_gpt2())) == structure_snapshot
"""


def test_structure_snapshot_fails_with_the_explanation_when_a_block_output_changes(pytester, monkeypatch):
    """Done-when: recorded with tuple blocks (transformers 4.57), run with tensor blocks (5.x): the failure explains."""
    pytester.makepyfile(test_structure_snap=SNAPSHOT_TEST)
    monkeypatch.setenv("SIMULATE_TRANSFORMERS_4", "1")
    pytester.runpytest_inprocess("--snapshot-update").assert_outcomes(passed=2)
    written = pytester.path / "__snapshots__" / "test_structure_snap" / "test_tiny_structure[structure].json"
    assert written.is_file(), sorted(p.name for p in pytester.path.rglob("*.json"))
    pytester.runpytest_inprocess().assert_outcomes(passed=2)
    text = written.read_text()
    written.write_text(text.replace('"torch": "', '"torch": "0.0.0-old+', 1))  # the same structure from another torch
    upgraded = pytester.runpytest_inprocess()
    upgraded.assert_outcomes(passed=2)
    upgraded.stdout.fnmatch_lines(
        ["*test_tiny_structure: structure unchanged under a new environment: torch 0.0.0-old+* -> *"]
    )
    written.write_text(text)
    monkeypatch.delenv("SIMULATE_TRANSFORMERS_4")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    explanation = (
        "transformer.h.*: output changed from tuple(Tensor[b,s,32]) to Tensor[b,s,32]; code that reads .output[0] now "
        "selects batch row 0 instead of the hidden states"
    )
    assert "the structure of GPT2LMHeadModel changed (same library versions):" in out, out
    assert explanation in out and "run pytest --snapshot-update to accept the change" in out, out
    # the failing run did not overwrite it
    assert "SIMULATE" not in written.read_text() and '"tuple"' in written.read_text()
