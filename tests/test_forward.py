"""Prefix reuse (pytest_nnsight.forward) gives the plain nnsight path's numbers: sweeps over every kind of layer site and
left-padded populations, on tiny seeded GPT-2, Llama-style and NeoX models (float32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from pytest_nnsight import forward, sweeps
from pytest_nnsight.metrics import as_metric, last_position, logit_diff
from pytest_nnsight.models import ModelCache
from pytest_nnsight.populations import population
from pytest_nnsight.prompts import Prompt
from pytest_nnsight.settings import Settings
from pytest_nnsight.strategies import CounterfactualPair
from pytest_nnsight.sweeps import sweep
from pytest_nnsight.testing import tiny_model

FAMILIES = ("gpt2", "llama", "gpt_neox")
CLEAN, CORRUPT = (
    "When Mary and John went to the store , John gave a drink to",
    "When Mary and John went to the store , Mary gave a drink to",
)
TOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    module, tok = tiny_model(request.param, n_layer=3)
    return ModelCache(Settings(device="cpu")).get(module, tok)


def raw(effects) -> torch.Tensor:
    return torch.tensor(effects.raw, dtype=torch.float64)


@pytest.mark.parametrize("sites", ["resid_pre", "resid_post", "attn_out", "mlp_out", "head_out", "embed"])
def test_prefix_sweep_equals_the_plain_path(tiny, sites):
    metric = logit_diff("Mary", "John")
    fast = sweep(tiny, CLEAN, CORRUPT, metric=metric, sites=sites, check_batching=False)
    plain = sweep(tiny, CLEAN, CORRUPT, metric=metric, sites=sites, check_batching=False, reuse="none")
    assert forward.plan_for(tiny) is not None  # the prefix path ran (it refuses a model it cannot replay)
    torch.testing.assert_close(raw(fast), raw(plain), atol=TOL, rtol=0)
    assert (fast.clean, fast.corrupt) == pytest.approx((plain.clean, plain.corrupt), abs=TOL)


def test_prefix_sweep_in_small_chunks_and_the_other_direction(tiny):
    metric = logit_diff("Mary", "John")
    plain = sweep(
        tiny,
        CLEAN,
        CORRUPT,
        metric=metric,
        sites="resid_post",
        direction="corrupt->clean",
        check_batching=False,
        reuse="none",
    )
    for batch_size in (1, 5):
        fast = sweep(
            tiny,
            CLEAN,
            CORRUPT,
            metric=metric,
            sites="resid_post",
            direction="corrupt->clean",
            batch_size=batch_size,
            check_batching=False,
        )
        torch.testing.assert_close(raw(fast), raw(plain), atol=TOL, rtol=0)


def test_full_logit_user_metric_and_kl_match_the_plain_path(tiny):
    seen = []

    def mean_logit_of_mary(out):  # reads every position: gets the full logits
        seen.append(out.logits.shape[1])
        return out.logits[:, :, 3].mean(-1)

    fast = sweep(tiny, CLEAN, CORRUPT, metric=mean_logit_of_mary, sites="resid_pre", check_batching=False)
    assert set(seen) == {len(tiny.tokenizer(CLEAN)["input_ids"])}
    plain = sweep(
        tiny, CLEAN, CORRUPT, metric=mean_logit_of_mary, sites="resid_pre", check_batching=False, reuse="none"
    )
    torch.testing.assert_close(raw(fast), raw(plain), atol=TOL, rtol=0)


def test_a_declared_last_position_metric_gets_one_position(tiny):
    seen = []

    @last_position
    def mary_minus_john(out):
        seen.append(out.logits.shape[1])
        return out.logits[:, -1, 3] - out.logits[:, -1, 4]

    assert as_metric(tiny, mary_minus_john).last_only and as_metric(tiny, logit_diff("Mary", "John")).last_only
    sweep(tiny, CLEAN, CORRUPT, metric=mary_minus_john, sites="resid_pre", check_batching=False)
    assert set(seen) == {1}


def pairs_of_three_lengths() -> list[CounterfactualPair]:
    templates = [
        "When {a} and {b} went to the store , {b} gave a drink to",
        "When {a} and {b} went to the store {b} gave a drink to",
        "{a} and {b} went to the store , {b} gave a drink to",
        "{a} and {b} went , {b} gave a drink to",
    ]
    pairs = []
    for t in templates:
        for a, b in (("Mary", "John"), ("John", "Mary")):
            clean = Prompt(t.format(a=a, b=b), {"a": a, "b": b})
            corrupt = Prompt(t.format(a=a, b=a), {"a": a, "b": a})
            pairs.append(CounterfactualPair(clean, corrupt, a, b, t))
    return pairs


@pytest.mark.parametrize("site", ["resid_post.0", "resid_pre.2", "attn_out.1", "mlp_out.2", "head_out.1.2"])
def test_left_padded_population_by_prefix_reuse_equals_the_plain_path(tiny, site):
    pairs = pairs_of_three_lengths()
    assert len({len(tiny.tokenizer(p.clean.text)["input_ids"]) for p in pairs}) == 3  # rows really are padded
    fast = population(tiny, pairs, site=site, position="last", threshold=0.5, batch_size=6)
    plain = population(tiny, pairs, site=site, position="last", threshold=0.5, batch_size=6, reuse="none")
    for name in ("clean", "corrupt", "patched"):
        torch.testing.assert_close(
            torch.tensor(getattr(fast, name)), torch.tensor(getattr(plain, name)), atol=TOL, rtol=0
        )


def test_a_replay_that_does_not_reproduce_the_model_falls_back_to_the_plain_path(monkeypatch):
    module, tok = tiny_model("gpt2", seed=3)
    model = ModelCache(Settings(device="cpu")).get(module, tok)
    plan = forward.plan_for(model)
    real_head = plan.lm_head
    plan.lm_head = lambda h: real_head(h) * 1.5  # a forward the replay does not know about
    metric = logit_diff("Mary", "John")
    effects = sweep(model, CLEAN, CORRUPT, metric=metric, sites="resid_post", check_batching=False)
    assert forward.plan_for(model) is None  # refused for this model from now on
    plain = sweep(model, CLEAN, CORRUPT, metric=metric, sites="resid_post", check_batching=False, reuse="none")
    torch.testing.assert_close(raw(effects), raw(plain), atol=TOL, rtol=0)


def test_forward_kwargs_follow_the_forward_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids, num_logits_to_keep=0, use_cache=None):
            return input_ids

    class Encoder(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    assert forward.forward_kwargs(Old(), keep_last=True) == {"use_cache": False, "num_logits_to_keep": 1}
    assert forward.forward_kwargs(Old(), keep_last=False) == {"use_cache": False}
    assert forward.forward_kwargs(Encoder(), keep_last=True) == {}


def test_chunk_rows_follow_the_memory_budget(tiny):
    plan = forward.plan_for(tiny)
    small = forward.rows_per_chunk(plan, tiny, 16, True, 2**20)
    big = forward.rows_per_chunk(plan, tiny, 16, True, 2**24)
    assert 1 <= small < big
    assert forward.rows_per_chunk(plan, tiny, 16, False, 2**24) < big  # full logits cost more per row
    assert forward.rows_per_chunk(plan, tiny, 16, True, 1) == 1


def test_batching_verdict_is_cached_per_model_sites_and_chunk_shape(tiny, monkeypatch):
    sweeps.forget_verdicts()
    calls = []
    real = sweeps.verify_cells
    monkeypatch.setattr(sweeps, "verify_cells", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    metric = logit_diff("Mary", "John")
    for _ in range(2):
        sweep(tiny, CLEAN, CORRUPT, metric=metric, sites="resid_post", check_batching=True, check_cells=3)
    assert len(calls) == 1  # the second sweep of the same shape reuses the verdict
    sweep(tiny, CLEAN, CORRUPT, metric=metric, sites="mlp_out", check_batching=True, check_cells=3)
    sweep(tiny, CLEAN, CORRUPT, metric=metric, sites="resid_post", batch_size=4, check_batching=True, check_cells=3)
    assert len(calls) == 3  # other sites, another chunk shape: checked again
    sweeps.forget_verdicts()


# -- baselines of repeated patch() calls --------------------------------------------------------------------------


@pytest.fixture
def count_patch_runs(monkeypatch):
    from pytest_nnsight import interventions

    calls = []
    real = interventions.run
    monkeypatch.setattr(
        interventions,
        "run",
        lambda model, inputs, metric, **kw: (
            calls.append(len(inputs) if isinstance(inputs, list) else 1) or real(model, inputs, metric, **kw)
        ),
    )
    return calls


def test_repeated_patches_on_one_pair_share_their_baselines(tiny, count_patch_runs):
    from pytest_nnsight.interventions import patch

    metric = logit_diff("Mary", "John")
    plain = [
        patch(tiny, CLEAN, CORRUPT, site=s, position=p, metric=metric)
        for s, p in (("resid_post.0", 3), ("resid_post.0", 5), ("mlp_out.1", 5))
    ]
    count_patch_runs.clear()
    with forward.baseline_scope():
        cached = [
            patch(tiny, CLEAN, CORRUPT, site=s, position=p, metric=metric)
            for s, p in (("resid_post.0", 3), ("resid_post.0", 5), ("mlp_out.1", 5))
        ]
    # first: [clean, corrupt] + patched; same site again: patched only; a new site: the clean activation there + patched
    assert count_patch_runs == [2, 1, 1, 1, 1]
    for a, b in zip(plain, cached):
        assert (a.clean, a.corrupt, float(a.intervened), float(a.normalized)) == pytest.approx(
            (b.clean, b.corrupt, float(b.intervened), float(b.normalized)), abs=TOL
        )


def test_baselines_are_keyed_by_metric_identity_not_name(tiny):
    from pytest_nnsight.interventions import patch

    def make(a, b):
        def ld(out):  # every closure is named 'ld'
            return out.logits[:, -1, a] - out.logits[:, -1, b]

        return ld

    tok = tiny.tokenizer
    mary, john, store = tok.convert_tokens_to_ids(["Mary", "John", "store"])
    with forward.baseline_scope():
        first = patch(tiny, CLEAN, CORRUPT, site="resid_post.0", position=-1, metric=make(mary, john))
        second = patch(tiny, CLEAN, CORRUPT, site="resid_post.0", position=-1, metric=make(store, john))
    alone = patch(tiny, CLEAN, CORRUPT, site="resid_post.0", position=-1, metric=make(store, john))
    assert second.clean != pytest.approx(first.clean)
    assert (second.clean, second.corrupt) == pytest.approx((alone.clean, alone.corrupt), abs=TOL)


def test_an_in_place_weight_edit_recomputes_the_baselines(count_patch_runs):
    from pytest_nnsight.interventions import patch

    module, tok = tiny_model("gpt2", seed=5)
    model = ModelCache(Settings(device="cpu")).get(module, tok)
    metric = logit_diff("Mary", "John")
    with forward.baseline_scope():
        before = patch(model, CLEAN, CORRUPT, site="resid_post.0", position=-1, metric=metric)
        with torch.no_grad():
            module.lm_head.weight.mul_(2.0)
        after = patch(model, CLEAN, CORRUPT, site="resid_post.0", position=-1, metric=metric)
    assert count_patch_runs == [2, 1, 2, 1]
    fresh = patch(model, CLEAN, CORRUPT, site="resid_post.0", position=-1, metric=metric)
    assert after.clean != pytest.approx(before.clean)
    assert (after.clean, after.corrupt) == pytest.approx((fresh.clean, fresh.corrupt), abs=TOL)


def test_the_plugin_opens_a_baseline_scope_per_test(pytester):
    pytester.makepyfile("""
        from pytest_nnsight import forward

        def test_one():
            assert forward.baselines() == {}
            forward.baselines()["x"] = 1

        def test_two():
            assert forward.baselines() == {}
    """)
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)
    assert forward.baselines() is not None  # this test's own scope


def test_a_model_emitting_inf_for_a_while_is_not_refused_for_good():
    """A non-finite target says nothing about the replay: that sweep runs the plain path, and the model is checked again."""
    module, tok = tiny_model("gpt2", seed=4)
    model = ModelCache(Settings(device="cpu")).get(module, tok)
    metric = logit_diff("Mary", "John")
    handle = module.lm_head.register_forward_hook(lambda mod, args, out: out * float("inf"))
    try:
        broken = sweep(model, CLEAN, CORRUPT, metric=metric, sites="resid_post", check_batching=False)
    finally:
        handle.remove()
    assert not torch.isfinite(raw(broken)).any()  # no finite cell while the model emits inf
    assert forward.plan_for(model) is not None and forward.needs_identity_check(forward.plan_for(model))
    fast = sweep(model, CLEAN, CORRUPT, metric=metric, sites="resid_post", check_batching=False)
    assert not forward.needs_identity_check(forward.plan_for(model))  # trusted now: the prefix path ran
    plain = sweep(model, CLEAN, CORRUPT, metric=metric, sites="resid_post", check_batching=False, reuse="none")
    torch.testing.assert_close(raw(fast), raw(plain), atol=TOL, rtol=0)
