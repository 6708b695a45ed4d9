"""Attribution patching on the bundled capitals model: same map layout as sweep(), peaks in the same cells,
exact gradients (checked by finite differences), an honest check against real patching, and no leaked graphs."""

import dataclasses
import math
import re

import pytest
import torch

from pytest_nnsight.assertions import FindingFailed
from pytest_nnsight.attribution import AttributionCheck, attribution_patch, check_attribution, gradients
from pytest_nnsight.errors import MetricError, PositionError
from pytest_nnsight.interventions import Edit, run
from pytest_nnsight.metrics import as_metric, logit_diff
from pytest_nnsight.sites import blocks, embed, head, resolve_site
from pytest_nnsight.sweeps import sweep

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
SUBJECT, LAST = 4, 5  # <bos> The capital of France is

# Measured on the bundled model (nnsight 0.8.1, torch 2.13 CPU): on the top 5 cells of embed + blocks the largest
# |attribution - true patching| is 0.627 for this pair and at most 0.633 over the 8 trained templates x 3 country
# pairs (the logit difference swings by ~33, far outside the linear regime: the true curve along the patch is
# sigmoid-like, 0.21 / 0.73 / 0.95 / 1.0 at a quarter / half / three quarters / all of it). Tolerance with margin:
MEASURED_MAX_ERROR = 0.633
ATOL = 0.75


@pytest.fixture(scope="module")
def model():
    from pytest_nnsight.models import ModelCache
    from pytest_nnsight.settings import Settings

    return ModelCache(Settings(device="cpu", offline=True)).get("bundled:capitals")


@pytest.fixture(scope="module")
def ld():
    return logit_diff("Paris", "Berlin")


@pytest.fixture(scope="module")
def sites(model):
    return [embed(model), *blocks(model)]


@pytest.fixture(scope="module")
def approx(model, ld, sites):
    return attribution_patch(model, CLEAN, CORRUPT, metric=ld, sites=sites)


@pytest.fixture(scope="module")
def true_map(model, ld, sites):
    return sweep(model, CLEAN, CORRUPT, metric=ld, sites=sites, check_batching=False)


def test_map_layout_equals_sweep(model, ld, approx, true_map):
    assert approx.kind == "attribution"
    for field in ("sites", "tokens", "positions", "metric", "clean_prompt", "corrupt_prompt"):
        assert getattr(approx, field) == getattr(true_map, field), field
    assert approx.shape == true_map.shape == (3, 6)
    assert len(approx.raw) == 3 and all(len(r) == 6 for r in approx.raw)
    # the unpatched runs are the same runs
    assert approx.clean == pytest.approx(true_map.clean, abs=1e-4)
    assert approx.corrupt == pytest.approx(true_map.corrupt, abs=1e-4)
    # raw is the approximate patched metric: normalizing it gives the values
    gap = approx.clean - approx.corrupt
    for vr, rr in zip(approx.values, approx.raw):
        for v, r in zip(vr, rr):
            assert v == pytest.approx((r - approx.corrupt) / gap, abs=1e-9)


def test_default_sites_and_positions_match_sweep(model, ld):
    a = attribution_patch(model, CLEAN, CORRUPT, metric=ld, positions="last")
    s = sweep(model, CLEAN, CORRUPT, metric=ld, positions="last", check_batching=False)
    assert (
        (a.sites, a.tokens, a.positions)
        == (s.sites, s.tokens, s.positions)
        == (("resid_post.0", "resid_post.1"), ("is",), (LAST,))
    )


def test_peaks_where_true_patching_peaks(approx, true_map):
    # the known mechanism: the subject at the embeddings, the last position after each block
    for m in (approx, true_map):
        assert max(range(6), key=lambda j: m.row("embed")[j]) == SUBJECT
        assert max(range(6), key=lambda j: m.row("resid_post.0")[j]) == LAST
        assert max(range(6), key=lambda j: m.row("resid_post.1")[j]) == LAST
    peaks = {("embed", SUBJECT), ("resid_post.0", LAST), ("resid_post.1", LAST)}
    for site in approx.sites:
        for p in approx.positions:
            if (site, p) in peaks:
                assert approx[site, p] > 0.3  # underestimates (0.37 / 0.66 / 0.71 vs 1.0), never misses
            else:
                assert abs(approx[site, p]) < 0.01 and abs(true_map[site, p]) < 0.01


def test_gradient_is_exact_by_finite_differences(model, ld, approx, sites):
    """The linear term equals the slope of the real patched metric at the corrupt run (a tight check that the tolerance above is not)."""
    m = as_metric(model, ld)
    _, clean_acts = run(model, CLEAN, m, save=sites)
    _, corrupt_acts = run(model, CORRUPT, m, save=sites)
    eps = 1e-3
    gap = approx.clean - approx.corrupt
    for site, pos in [(sites[0], SUBJECT), (sites[1], LAST), (sites[2], LAST)]:
        step = clean_acts[site][0, [pos]] - corrupt_acts[site][0, [pos]]
        up, _ = run(model, CORRUPT, m, edits=[Edit(site, (0,), (pos,), corrupt_acts[site][0, [pos]] + eps * step)])
        down, _ = run(model, CORRUPT, m, edits=[Edit(site, (0,), (pos,), corrupt_acts[site][0, [pos]] - eps * step)])
        slope = (float(up[0]) - float(down[0])) / (2 * eps) / gap
        assert approx[str(site), pos] == pytest.approx(slope, abs=2e-3), str(site)


def test_heads_sum_to_their_projection_input(model, ld):
    """Head sites share one tensor (the c_proj input): its gradient is read once and sliced per head."""
    heads = [head(model, 0, h) for h in range(4)]
    a = attribution_patch(model, CLEAN, CORRUPT, metric=ld, sites=[*heads, "transformer.h.0.attn.c_proj:input"])
    assert a.sites[:4] == ("head_out.0.0", "head_out.0.1", "head_out.0.2", "head_out.0.3")
    for j in range(len(a.positions)):
        assert sum(a.values[i][j] for i in range(4)) == pytest.approx(a.values[4][j], abs=1e-6)
    assert a.row(4)[LAST] > 0.1


def test_check_attribution_passes_with_measured_tolerance(model, ld, approx):
    check = check_attribution(model, CLEAN, CORRUPT, metric=ld, approx=approx, top=5, atol=ATOL)
    assert isinstance(check, AttributionCheck)
    assert check.passed and check.raise_if_failed() is check
    assert len(check.cells) == len(check.approx) == len(check.true) == 5
    assert {c[:2] for c in check.cells[:3]} == {("embed", SUBJECT), ("resid_post.0", LAST), ("resid_post.1", LAST)}
    assert all(t == pytest.approx(1.0, abs=0.01) for t in check.true[:3])  # real patching restores fully there
    assert check.max_error == pytest.approx(max(check.errors))
    assert 0.4 < check.max_error <= MEASURED_MAX_ERROR + 0.01
    assert "passed" in repr(check)


def test_check_attribution_fails_readably_when_atol_is_tiny(model, ld, approx):
    check = check_attribution(model, CLEAN, CORRUPT, metric=ld, approx=approx, top=3, atol=1e-3)
    assert not check.passed
    assert "FAILED" in repr(check)
    with pytest.raises(FindingFailed) as info:
        check.raise_if_failed()
    text = str(info.value)
    assert text.startswith("claim: attribution patching matches activation patching within 0.001 on its top 3 cells")
    assert "approx" in text and "true" in text and "|error|" in text
    assert re.search(r"embed +4 'France'", text) and "!" in text
    assert "The capital of Germany is" in text and "try:" in text


def test_check_attribution_rejects_a_map_of_other_prompts(model, ld, approx):
    with pytest.raises(ValueError, match="computed for"):
        check_attribution(model, "The capital of Italy is", CORRUPT, metric=ld, approx=approx)


def test_corrupt_to_clean_direction(model, ld, sites):
    """Linearizing around the clean run is worse here: measured max top-5 error 0.899 for this pair (at most 0.899 over
    8 templates x 3 pairs); the peaks still sit in the same cells, so the check flags exactly those three."""
    a = attribution_patch(model, CLEAN, CORRUPT, metric=ld, sites=sites, direction="corrupt->clean")
    s = sweep(model, CLEAN, CORRUPT, metric=ld, sites=sites, direction="corrupt->clean", check_batching=False)
    assert (a.sites, a.tokens) == (s.sites, s.tokens)
    assert (a.clean, a.corrupt) == (pytest.approx(s.clean, abs=1e-4), pytest.approx(s.corrupt, abs=1e-4))
    for row in ("embed", "resid_post.0", "resid_post.1"):
        assert max(range(6), key=lambda j: a.row(row)[j]) == max(range(6), key=lambda j: s.row(row)[j])
    check = check_attribution(model, CLEAN, CORRUPT, metric=ld, approx=a, direction="corrupt->clean", atol=0.5)
    for (site, pos, _), t in zip(check.cells, check.true):
        assert t == pytest.approx(s[site, pos], abs=1e-4)  # "true" is real patching in the same direction
    flagged = {c[:2] for c, e in zip(check.cells, check.errors) if e > 0.5}
    assert flagged == {("embed", SUBJECT), ("resid_post.0", LAST), ("resid_post.1", LAST)}
    assert 0.8 < check.max_error < 0.95 and not check.passed


def test_multi_token_answer_is_a_metric_error(model):
    with pytest.raises(MetricError, match="single-token"):
        attribution_patch(model, CLEAN, CORRUPT, metric=logit_diff("Paris Rome", "Berlin"))


def test_prompts_of_different_lengths_are_a_position_error(model, ld):
    with pytest.raises(PositionError, match="line up"):
        attribution_patch(model, CLEAN, "The capital city of Germany is", metric=ld)


def test_unknown_direction(model, ld):
    with pytest.raises(ValueError, match="direction"):
        attribution_patch(model, CLEAN, CORRUPT, metric=ld, direction="both")


def _tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors_in(x)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _tensors_in(getattr(obj, f.name))


def test_no_graph_leaks_and_parameter_grads_stay_none(model, ld, sites):
    params = list(model._module.parameters())
    assert all(p.grad is None for p in params)
    a = attribution_patch(model, CLEAN, CORRUPT, metric=ld, sites=sites)
    assert all(p.grad is None for p in params), "backward filled parameter .grad"
    assert not list(_tensors_in(a))
    for row in a.values + a.raw:
        assert all(type(v) is float and math.isfinite(v) for v in row)
    assert type(a.clean) is float and type(a.corrupt) is float
    value, acts, grads = gradients(model, CORRUPT, as_metric(model, ld), sites)
    assert type(value) is float
    for t in [*acts.values(), *grads.values()]:
        assert not t.requires_grad and t.grad_fn is None
    assert all(p.grad is None for p in params)
    check = check_attribution(model, CLEAN, CORRUPT, metric=ld, approx=a, atol=ATOL)
    assert not list(_tensors_in(check))


def test_existing_parameter_grads_are_left_alone(model, ld):
    p = model._module.lm_head.weight
    marker = torch.full_like(p, 0.5)
    p.grad = marker.clone()
    try:
        attribution_patch(model, CLEAN, CORRUPT, metric=ld)
        assert torch.equal(p.grad, marker)
    finally:
        p.grad = None


def test_works_inside_inference_mode_and_on_a_frozen_model(model, ld, approx, sites):
    params = list(model._module.parameters())
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.inference_mode():
            a = attribution_patch(model, CLEAN, CORRUPT, metric=ld, sites=sites)
        assert all(not p.requires_grad for p in params)  # restored as found
    finally:
        for p in params:
            p.requires_grad_(True)
    for r1, r2 in zip(a.values, approx.values):
        assert r1 == pytest.approx(r2, abs=1e-5)


def test_site_labels_round_trip(model):
    """check_attribution rebuilds the sites from the map's row labels: a label names its site."""
    for site in [embed(model), *blocks(model), head(model, 1, 2), head(model, -1, -1)]:
        assert resolve_site(model, str(site)) == site


def test_non_differentiable_metric_is_a_metric_error(model):
    from pytest_nnsight.metrics import rank

    with pytest.raises(MetricError, match="not differentiable"):
        attribution_patch(model, CLEAN, CORRUPT, metric=rank("Paris"))
