"""The public API: a curated top level, every error class in errors.py, old spellings that warn, and read()."""

from __future__ import annotations

import ast
import builtins
import inspect
import types
import warnings
from pathlib import Path

import pytest
import torch

import pytest_nnsight
from pytest_nnsight import (
    NnsightTestError,
    Prompt,
    attribution_patch,
    check_attribution,
    errors,
    logit_diff,
    patch_layer,
    population,
    read,
    site,
    sweep,
)
from pytest_nnsight.errors import ArgumentTypeError, PositionError, SiteError
from pytest_nnsight.strategies import CounterfactualPair

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
LD = logit_diff("Paris", "Berlin")
PACKAGE = Path(pytest_nnsight.__file__).parent


def test_the_top_level_is_small_and_every_name_resolves():
    assert len(pytest_nnsight.__all__) <= 45
    assert len(set(pytest_nnsight.__all__)) == len(pytest_nnsight.__all__)
    for name in pytest_nnsight.__all__:
        value = getattr(pytest_nnsight, name)
        # a submodule of the same name would replace the function once imported (as `prompts` and `replay` did)
        assert not isinstance(value, types.ModuleType), name
        assert not (PACKAGE / f"{name}.py").exists(), f"{name} names both a top-level object and a submodule"


def test_every_exception_class_lives_in_errors():
    """Classes deriving from an exception (builtin or ours) are defined in errors.py and nowhere else."""
    known = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    known |= {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)}
    outside = []
    for file in PACKAGE.rglob("*.py"):
        if file.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & known:
                    outside.append(f"{file.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not outside, outside


def test_errors_share_the_base_class_and_a_builtin():
    for name, cls in vars(errors).items():
        if not (isinstance(cls, type) and issubclass(cls, BaseException)) or cls is NnsightTestError:
            continue
        if issubclass(cls, Warning) or name == "FindingFailed":  # a warning, and a failed claim (an AssertionError)
            continue
        assert issubclass(cls, NnsightTestError), name
        assert [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (BaseException, Exception, object)], (
            name
        )


@pytest.mark.parametrize("name", sorted(pytest_nnsight._MOVED))
def test_a_name_moved_off_the_top_level_still_imports_with_a_warning(name):
    module = f"pytest_nnsight.{pytest_nnsight._MOVED[name]}"
    with pytest.warns(
        DeprecationWarning, match=rf"importing {name} from pytest_nnsight is deprecated .*import it from {module}"
    ):
        value = getattr(pytest_nnsight, name)
    assert value is getattr(__import__(module, fromlist=[name]), name)  # and from its module, silently
    assert name not in pytest_nnsight.__all__


def test_from_import_of_a_moved_name_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from pytest_nnsight import Settings  # noqa: F401
    assert [str(w.message).split(":")[0] for w in caught] == [
        "importing Settings from pytest_nnsight is deprecated and stops working in the next release"
    ]


def test_verbs_take_the_prompts_then_keywords():
    for verb in (
        sweep,
        attribution_patch,
        check_attribution,
        pytest_nnsight.patch,
        pytest_nnsight.ablate,
        pytest_nnsight.steer,
    ):
        params = list(inspect.signature(verb).parameters.values())
        keyword = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        assert "metric" in keyword, verb.__name__
        assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD][0] == "model"
    assert {"site", "position", "metric", "threshold"} <= {
        p.name for p in inspect.signature(population).parameters.values() if p.kind is p.KEYWORD_ONLY
    }


# -- old spellings: the same result, and a warning naming the new one ----------------------------


def test_sweep_with_a_positional_metric_warns_and_measures_the_same(capitals):
    new = sweep(capitals, CLEAN, CORRUPT, metric=LD, positions="last")
    with pytest.warns(
        DeprecationWarning,
        match=r"passing metric to sweep\(\) by position .*write sweep\(model, clean, corrupt, metric=\.\.\.\)",
    ):
        old = sweep(capitals, CLEAN, CORRUPT, LD, positions="last")
    assert old.sites == new.sites and [v for r in old.values for v in r] == pytest.approx(
        [v for r in new.values for v in r], abs=1e-6
    )


def test_a_value_given_by_position_and_by_keyword_is_refused(capitals):
    with pytest.raises(ArgumentTypeError, match=r"sweep\(\) got metric twice"):
        sweep(capitals, CLEAN, CORRUPT, LD, metric=LD)
    with pytest.raises(ArgumentTypeError, match=r"sweep\(\) missing required keyword argument\(s\): metric="):
        sweep(capitals, CLEAN, CORRUPT)
    with pytest.raises(
        ArgumentTypeError, match=r"sweep\(\) takes 3 positional arguments \(model, clean, corrupt\) but 5 were given"
    ):
        sweep(capitals, CLEAN, CORRUPT, LD, "blocks")


def test_attribution_with_positional_metric_and_map_warns(capitals):
    with pytest.warns(DeprecationWarning, match=r"passing metric to attribution_patch\(\) by position"):
        approx = attribution_patch(capitals, CLEAN, CORRUPT, LD, positions="last")
    assert approx.values == attribution_patch(capitals, CLEAN, CORRUPT, metric=LD, positions="last").values
    with pytest.warns(DeprecationWarning, match=r"passing metric, approx to check_attribution\(\) by position"):
        old = check_attribution(capitals, CLEAN, CORRUPT, LD, approx, top=2)
    new = check_attribution(capitals, CLEAN, CORRUPT, metric=LD, approx=approx, top=2)
    assert (old.cells, old.true) == (new.cells, new.true)


def test_population_with_positional_site_and_position_warns(capitals):
    pairs = [
        CounterfactualPair(
            Prompt(CLEAN, {"country": "France"}),
            Prompt(CORRUPT, {"country": "Germany"}),
            "Paris",
            "Berlin",
            "The capital of {country} is",
        )
    ]
    with pytest.warns(
        DeprecationWarning, match=r"passing site, position to population\(\) by position .*site=\.\.\., position=\.\.\."
    ):
        old = population(capitals, pairs, "resid_post.0", "last", threshold=0.5)
    assert old.effects == population(capitals, pairs, site="resid_post.0", position="last", threshold=0.5).effects


def test_positional_patch_layer_keeps_its_meaning_and_warns(capitals):
    """patch_layer(model, prompt, source_prompt, ...) patched the first prompt from the second: never swapped silently."""
    new = patch_layer(capitals, clean=CLEAN, corrupt=CORRUPT, layer=1, position=-1)
    with pytest.warns(
        DeprecationWarning, match=r"prompt patched first, the source second.*clean=source_prompt, corrupt=prompt"
    ):
        old = patch_layer(capitals, CORRUPT, CLEAN, 1, -1)
    assert old == new and old.tokens[0] == "Paris" and old.prompt == CORRUPT
    with pytest.warns(DeprecationWarning, match=r"keywords prompt=, source_prompt= and pos="):
        assert patch_layer(capitals, prompt=CORRUPT, source_prompt=CLEAN, layer=1, pos=-1) == new
    with (
        pytest.raises(ArgumentTypeError, match=r"got both clean= and its old name source_prompt="),
        pytest.warns(DeprecationWarning),
    ):
        patch_layer(capitals, clean=CLEAN, source_prompt=CLEAN, corrupt=CORRUPT, layer=1, position=-1)


def test_patch_layer_patches_a_whole_layer(capitals):
    """Every position of a block's output from the clean run: the rest of the forward is the clean run's."""
    with torch.inference_mode():
        with capitals.trace(CLEAN):
            logits = capitals.lm_head.output.save()
    clean_probs = torch.softmax(logits[0, -1].float(), dim=-1)
    result = patch_layer(capitals, clean=CLEAN, corrupt=CORRUPT, layer=0, position=slice(None))
    assert result.positions == tuple(range(6))
    top = torch.topk(clean_probs, 5)
    assert list(result.probs) == pytest.approx(top.values.tolist(), abs=1e-5)


def test_patch_layer_finds_a_word_in_either_prompt(capitals):
    by_index = patch_layer(capitals, clean=CLEAN, corrupt=CORRUPT, layer=0, position=4)
    assert patch_layer(capitals, clean=CLEAN, corrupt=CORRUPT, layer=0, position="France") == by_index
    assert patch_layer(capitals, clean=CLEAN, corrupt=CORRUPT, layer=0, position="Germany") == by_index
    with pytest.raises(PositionError, match=r"names 6 tokens in the clean prompt but 7 in the corrupt one"):
        patch_layer(capitals, clean=CLEAN, corrupt="The capital city of Germany is", layer=0, position=slice(None))


# -- read ------------------------------------------------------------------------------------------


def test_read_returns_what_a_hand_written_trace_saves(capitals):
    with torch.inference_mode():
        with capitals.trace(CLEAN):
            attn = capitals.transformer.h[0].attn.output[0].save()
            block1 = capitals.transformer.h[1].output.save()
    acts = read(capitals, CLEAN, ["resid_post.1", "attn_out.0"])
    assert list(acts) == ["resid_post.1", "attn_out.0"]
    torch.testing.assert_close(acts["resid_post.1"], block1, atol=0, rtol=0)
    torch.testing.assert_close(acts["attn_out.0"], attn, atol=0, rtol=0)
    assert not acts["resid_post.1"].requires_grad and acts["resid_post.1"].shape == (1, 6, 64)


def test_read_a_batch_at_named_positions(capitals):
    whole = read(capitals, [CLEAN, CORRUPT], site(capitals, "embed"))["embed"]
    assert whole.shape == (2, 6, 64)
    last = read(capitals, [CLEAN, "The capital city of Germany is"], ["embed", "resid_post"], positions="last")
    assert list(last) == ["embed", "resid_post.0", "resid_post.1"] and last["embed"].shape == (2, 1, 64)
    torch.testing.assert_close(last["embed"][0], whole[0, -1:], atol=1e-6, rtol=0)  # left padding accounted for
    with pytest.raises(PositionError, match=r"different token lengths \(6, 7\) and positions=None"):
        read(capitals, [CLEAN, "The capital city of Germany is"], "embed")
    with pytest.raises(SiteError, match=r"unknown site"):
        read(capitals, CLEAN, "transformer.nope")
