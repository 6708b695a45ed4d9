"""Metrics, patch, ablate, steer and patch_layer on the bundled capitals model, each checked against the same
experiment written by hand as plain nnsight traces (one prompt per trace, no batching, no library code)."""

import copy
import math
import re

import pytest
import torch

from pytest_nnsight.assertions import assert_restores, assert_top_token
from pytest_nnsight.errors import BrokenExperimentError, InterventionError, MetricError, NonFiniteMetricError
from pytest_nnsight.interventions import Edit, ablate, patch, patch_layer, run, steer
from pytest_nnsight.metrics import as_metric, kl_div, logit_diff, logprob, prob, rank
from pytest_nnsight.models import ModelCache
from pytest_nnsight.settings import Settings
from pytest_nnsight.sites import block

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
SPAIN = "Everyone knows that the capital of Spain is"  # longer: batched with CLEAN it is left-padded
LD = logit_diff("Paris", "Berlin")
TOL = 1e-5


def ids(model, *words):
    return [model.tokenizer.convert_tokens_to_ids(w) for w in words]


def hand_logits(model, prompt, envoy=None, positions=None, values=None, add=False):
    """Last-position logits of one plain trace; optionally write (or add) `values` at `positions` of `envoy(model).output`."""
    with torch.inference_mode():
        with model.trace(prompt):
            if envoy is not None:
                out = envoy(model).output
                hidden = out[0] if isinstance(out, tuple) else out
                if add:
                    hidden[:, positions, :] += values
                else:
                    hidden[:, positions, :] = values
            logits = model.lm_head.output.save()
    return logits[0, -1]


def hand_act(model, prompt, envoy):
    """The activation at `envoy(model).output` in one plain trace, cloned."""
    with torch.inference_mode():
        with model.trace(prompt):
            out = envoy(model).output
            act = (out[0] if isinstance(out, tuple) else out).clone().save()
    return act[0]


def hand_ld(model, logits):
    paris, berlin = ids(model, "Paris", "Berlin")
    return float(logits[paris] - logits[berlin])


# -- metrics --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_logits(capitals):
    return {p: hand_logits(capitals, p) for p in (CLEAN, CORRUPT, SPAIN)}


def test_the_trained_model_answers_the_capitals(capitals, plain_logits):
    tok = capitals.tokenizer
    assert tok.convert_ids_to_tokens(int(plain_logits[CLEAN].argmax())) == "Paris"
    assert tok.convert_ids_to_tokens(int(plain_logits[CORRUPT].argmax())) == "Berlin"
    assert tok.convert_ids_to_tokens(int(plain_logits[SPAIN].argmax())) == "Madrid"


def _rank(logits, i):
    return float((logits.argsort(descending=True) == i).nonzero()[0, 0])


BUILTINS = {
    "logit_diff": (logit_diff("Paris", "Berlin"), lambda l, m: float(l[ids(m, "Paris")[0]] - l[ids(m, "Berlin")[0]])),
    "prob": (prob("Madrid"), lambda l, m: float(l.softmax(-1)[ids(m, "Madrid")[0]])),
    "logprob": (logprob("Paris"), lambda l, m: float(l.log_softmax(-1)[ids(m, "Paris")[0]])),
    "rank_top": (rank("Paris"), lambda l, m: _rank(l, ids(m, "Paris")[0])),
    "rank_other": (rank("Rome"), lambda l, m: _rank(l, ids(m, "Rome")[0])),
    "token_ids": (logit_diff(10, 11), lambda l, m: float(l[10] - l[11])),
}


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_metric_matches_a_hand_computation_per_row(capitals, plain_logits, name):
    spec, hand = BUILTINS[name]
    values, _ = run(capitals, [CLEAN, SPAIN], as_metric(capitals, spec))  # SPAIN is longer: CLEAN's row is left-padded
    expected = [hand(plain_logits[p], capitals) for p in (CLEAN, SPAIN)]
    assert values.shape == (2,)
    assert values.tolist() == pytest.approx(expected, abs=TOL)


def test_rank_of_a_non_top_token_is_positive(capitals):
    values, _ = run(capitals, [CLEAN, SPAIN], as_metric(capitals, rank("Rome")))
    assert (values > 0).all()


def test_kl_div_is_kl_of_the_clean_distribution_to_the_run(capitals, plain_logits):
    reference = plain_logits[CLEAN][None]
    metric = as_metric(capitals, kl_div())
    assert metric.needs_reference
    values, _ = run(capitals, [CORRUPT, SPAIN, CLEAN], metric, reference=reference)
    log_p = reference.log_softmax(-1)[0]
    expected = [float((log_p.exp() * (log_p - plain_logits[p].log_softmax(-1))).sum()) for p in (CORRUPT, SPAIN, CLEAN)]
    assert values.tolist() == pytest.approx(expected, abs=TOL)
    assert expected[0] > 1 and abs(expected[2]) < 1e-6


def test_string_and_id_answers_give_the_same_metric(capitals):
    paris, berlin = ids(capitals, "Paris", "Berlin")
    by_word, _ = run(capitals, CLEAN, as_metric(capitals, LD))
    by_id, _ = run(capitals, CLEAN, as_metric(capitals, logit_diff(paris, berlin)))
    assert float(by_word[0]) == float(by_id[0])
    assert str(as_metric(capitals, LD)) == "logit_diff('Paris', 'Berlin')"


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            logit_diff("Paris Berlin", "Rome"),
            r"answer 'Paris Berlin' is 2 tokens \['Paris', 'Berlin'\] for this tokenizer: metrics need single-token answers",
        ),
        (logit_diff("Paris", "Atlantis"), r"answer 'Atlantis' is not in the vocabulary \(it tokenizes to <unk>\)"),
        (prob(""), r"answer '' is not a token string or id"),
        (rank(135), r"token id 135 is out of range: the vocabulary has 135 ids"),
        (logprob(-1), r"token id -1 is out of range"),
        (3, r"metric 3 is not a metric: expected logit_diff"),
    ],
)
def test_bad_answers_are_metric_errors_naming_the_token(capitals, spec, message):
    with pytest.raises(MetricError, match=message):
        as_metric(capitals, spec)
    with pytest.raises(MetricError, match=message):  # refused before any forward pass
        patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=spec)


def test_user_function_metric_gives_one_value_per_row(capitals, plain_logits):
    paris = ids(capitals, "Paris")[0]

    def paris_prob(output):
        return output.logits[:, -1].softmax(-1)[:, paris]

    values, _ = run(capitals, [CLEAN, SPAIN, CORRUPT], as_metric(capitals, paris_prob))
    expected = [float(plain_logits[p].softmax(-1)[paris]) for p in (CLEAN, SPAIN, CORRUPT)]
    assert values.tolist() == pytest.approx(expected, abs=1e-6)
    effect = patch(capitals, CLEAN, CORRUPT, site="transformer.h.1", position="last", metric=paris_prob)
    assert effect.metric == "paris_prob"
    assert float(effect.clean) == pytest.approx(expected[0], abs=1e-6)
    assert float(effect.corrupt) == pytest.approx(expected[2], abs=1e-6)


def test_user_metric_returning_a_scalar_for_a_batch_is_a_metric_error(capitals):
    paris = ids(capitals, "Paris")[0]

    def total(output):
        return output.logits[:, -1, paris].sum()

    run(capitals, CLEAN, as_metric(capitals, total))  # one row, one number: fine
    with pytest.raises(
        MetricError,
        match=r"metric total returned one number for a batch of 2 rows: return one value per row \(shape \[2\]\)",
    ):
        run(capitals, [CLEAN, CORRUPT], as_metric(capitals, total))
    with pytest.raises(MetricError, match=r"metric total returned one number for a batch of 2 rows"):
        patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=total)


def test_user_metric_returning_the_wrong_count_is_a_metric_error(capitals):
    def three(output):
        return output.logits[:, -1, :3].flatten()

    with pytest.raises(MetricError, match=r"metric three returned 6 values for 2 rows: expected shape \[2\]"):
        run(capitals, [CLEAN, CORRUPT], as_metric(capitals, three))


# -- patch ----------------------------------------------------------------------------------------

H0 = lambda m: m.transformer.h[0]  # noqa: E731
H1 = lambda m: m.transformer.h[1]  # noqa: E731
EMB = lambda m: m.transformer.drop  # noqa: E731

CELLS = {
    "block0-last": ("transformer.h.0", H0, "last", [5]),
    "block0-subject": ("transformer.h.0", H0, "France", [4]),
    "embed-subject": ("transformer.drop", EMB, "France", [4]),
    "block1-last": ("transformer.h.1", H1, -1, [5]),
    "attn0-last": ("transformer.h.0.attn", lambda m: m.transformer.h[0].attn, 5, [5]),
    "block0-two": ("transformer.h.0", H0, [4, 5], [4, 5]),
}


@pytest.mark.parametrize("direction", ["clean->corrupt", "corrupt->clean"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_patch_equals_a_hand_written_nnsight_patch(capitals, cell, direction):
    site, envoy, position, positions = CELLS[cell]
    source, target = (CLEAN, CORRUPT) if direction == "clean->corrupt" else (CORRUPT, CLEAN)
    src_act = hand_act(capitals, source, envoy)
    ld_source = hand_ld(capitals, hand_logits(capitals, source))
    ld_target = hand_ld(capitals, hand_logits(capitals, target))
    ld_patched = hand_ld(capitals, hand_logits(capitals, target, envoy, positions, src_act[positions]))
    expected = (ld_patched - ld_target) / (ld_source - ld_target)

    effect = patch(capitals, CLEAN, CORRUPT, site=site, position=position, metric=LD, direction=direction)
    assert effect.direction == direction
    assert effect.positions == tuple(positions)
    assert (effect.source_prompt, effect.target_prompt) == (source, target)
    assert float(effect.source) == pytest.approx(ld_source, abs=TOL)
    assert float(effect.target) == pytest.approx(ld_target, abs=TOL)
    assert float(effect.intervened) == pytest.approx(ld_patched, abs=TOL)
    assert float(effect.normalized) == pytest.approx(expected, abs=TOL)
    assert float(effect.clean) == pytest.approx(ld_source if direction == "clean->corrupt" else ld_target, abs=TOL)


def test_patch_finds_the_known_mechanism(capitals):
    # measured first by the hand-written patch above: the subject's information reaches the last position in layer 0
    last = patch(capitals, CLEAN, CORRUPT, site=block(capitals, 0), position="last", metric=LD)
    subject = patch(capitals, CLEAN, CORRUPT, site=capitals.transformer.h[0], position="France", metric=LD)
    embedded = patch(capitals, CLEAN, CORRUPT, site="transformer.drop", position="France", metric=LD)
    assert last.normalized >= 0.95
    assert abs(subject.normalized) <= 0.05
    assert embedded.normalized >= 0.95
    assert last.clean > 5 and last.corrupt < -5  # clean answers Paris, corrupt Berlin


def test_patch_reports_the_patched_runs_tokens(capitals):
    effect = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="France", metric=LD)
    assert effect.position_tokens == ("Germany",)
    assert effect.tokens == ("<bos>", "The", "capital", "of", "Germany", "is")
    back = patch(
        capitals, CLEAN, CORRUPT, site="transformer.h.0", position="France", metric=LD, direction="corrupt->clean"
    )
    assert back.position_tokens == ("France",)


def test_controls_are_present_and_the_position_control_is_a_real_patch(capitals):
    effect = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=LD, controls=True)
    assert set(effect.controls) == {"random_donor", "position 1 'The'"}
    src = hand_act(capitals, CLEAN, H0)
    ld_clean, ld_corrupt = (
        hand_ld(capitals, hand_logits(capitals, CLEAN)),
        hand_ld(capitals, hand_logits(capitals, CORRUPT)),
    )
    ld_pos1 = hand_ld(capitals, hand_logits(capitals, CORRUPT, H0, [1], src[[1]]))
    assert effect.controls["position 1 'The'"] == pytest.approx(
        (ld_pos1 - ld_corrupt) / (ld_clean - ld_corrupt), abs=TOL
    )
    assert all(v == v for v in effect.controls.values())  # finite, not NaN
    assert effect.controls["random_donor"] != pytest.approx(float(effect.normalized), abs=1e-3)
    assert "controls" in dict(effect.context())


def test_random_donor_control_depends_on_the_seed_only(capitals):
    kw = dict(site="transformer.h.0", position="last", metric=LD, controls=True)
    a, b = patch(capitals, CLEAN, CORRUPT, seed=1, **kw), patch(capitals, CLEAN, CORRUPT, seed=1, **kw)
    c = patch(capitals, CLEAN, CORRUPT, seed=2, **kw)
    assert a.controls["random_donor"] == b.controls["random_donor"]
    assert a.controls["random_donor"] != c.controls["random_donor"]


def test_explicit_control_position(capitals):
    effect = patch(
        capitals,
        CLEAN,
        CORRUPT,
        site="transformer.h.0",
        position="last",
        metric=LD,
        controls=True,
        control_position="capital",
    )
    assert "position 2 'capital'" in effect.controls
    no_controls = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=LD)
    assert no_controls.controls == {}


def test_normalized_guard_refuses_identical_prompts(capitals):
    with pytest.raises(BrokenExperimentError, match=r"the two runs barely differ .* gap 0 <= min_gap"):
        patch(capitals, CLEAN, CLEAN, site="transformer.h.0", position="last", metric=LD)
    with pytest.raises(BrokenExperimentError, match=r"min_gap 100"):  # the real gap is ~33
        patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=LD, min_gap=100)


def test_bad_direction_is_a_value_error(capitals):
    with pytest.raises(ValueError, match=r"direction 'both'"):
        patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=LD, direction="both")


@pytest.fixture
def bump_block1_input_in_place(capitals):
    """A forward pre-hook that changes block 1's input in place, i.e. the very tensor block 0 returned (nnsight #630)."""
    offset = torch.linspace(-50.0, 50.0, 64)

    def bump(module, args):
        args[0].add_(offset)

    handle = capitals._module.transformer.h[1].register_forward_pre_hook(bump)
    yield
    handle.remove()


def test_saved_activations_are_clones(capitals, bump_block1_input_in_place):
    with torch.inference_mode():
        with capitals.trace(CLEAN):
            shared = capitals.transformer.h[0].output.save()
            cloned = capitals.transformer.h[0].output.clone().save()
    # an uncloned save sees the later in-place change
    assert float((shared - cloned).abs().max()) == pytest.approx(50.0)
    site = block(capitals, 0)
    _, acts = run(capitals, CLEAN, as_metric(capitals, LD), save=[site])
    torch.testing.assert_close(acts[site], cloned, atol=1e-6, rtol=0)

    # the patch must carry block 0's output as it was, not as block 1's hook left it
    ld_corrupt = hand_ld(capitals, hand_logits(capitals, CORRUPT))
    ld_clean = hand_ld(capitals, hand_logits(capitals, CLEAN))
    ld_good = hand_ld(capitals, hand_logits(capitals, CORRUPT, H0, [5], cloned[0, [5]]))
    ld_stale = hand_ld(capitals, hand_logits(capitals, CORRUPT, H0, [5], shared[0, [5]]))
    assert abs(ld_good - ld_stale) > 1e-3
    effect = patch(capitals, CLEAN, CORRUPT, site=site, position="last", metric=LD)
    assert float(effect.intervened) == pytest.approx(ld_good, abs=TOL)
    assert float(effect.normalized) == pytest.approx((ld_good - ld_corrupt) / (ld_clean - ld_corrupt), abs=TOL)


@pytest.mark.parametrize(
    "values, message",
    [
        (torch.zeros(1, 63), r"cannot write a \[1, 63\] value at resid_post.0"),
        (torch.zeros(1, 65), r"cannot write a \[1, 65\] value"),
        (torch.zeros(2, 64), r"cannot write a \[2, 64\] value"),
        (torch.zeros(64), r"cannot write a \[64\] value"),
        (
            torch.zeros(1, 64, device="meta"),
            r"value for resid_post.0 is on meta but the model runs on cpu: move it with \.to\('cpu'\)",
        ),
    ],
    ids=["narrow", "wide", "extra-row", "unbatched", "device"],
)
def test_edit_that_does_not_fit_is_an_intervention_error(capitals, values, message):
    edit = Edit(block(capitals, 0), (0,), (5,), values)
    with pytest.raises(InterventionError, match=message):
        run(capitals, CORRUPT, as_metric(capitals, LD), edits=[edit])
    after, _ = run(capitals, CORRUPT, as_metric(capitals, LD))  # the failed trace left the model usable
    assert float(after[0]) == pytest.approx(hand_ld(capitals, hand_logits(capitals, CORRUPT)), abs=TOL)


def test_run_applies_a_set_and_an_add_edit_like_a_hand_trace(capitals):
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    values, _ = run(
        capitals, CORRUPT, as_metric(capitals, LD), edits=[Edit(block(capitals, 0), (0,), (4,), v[None], op="add")]
    )
    assert float(values[0]) == pytest.approx(
        hand_ld(capitals, hand_logits(capitals, CORRUPT, H0, [4], v[None], add=True)), abs=TOL
    )


# -- NaN --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model(capitals):
    module = copy.deepcopy(capitals._module)
    with torch.no_grad():
        module.transformer.ln_f.weight[0] = float("nan")  # every logit becomes NaN
    return ModelCache(Settings(device="cpu")).get(module, capitals.tokenizer)


def test_nan_model_outputs_nan(nan_model):
    assert torch.isnan(hand_logits(nan_model, CLEAN)).all()


def test_nan_effect_never_passes_a_comparison(nan_model):
    effect = patch(nan_model, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=LD)
    with pytest.raises(
        NonFiniteMetricError,
        match=r"normalized effect of the patch at transformer.h.0 is nan \(site transformer.h.0; position 5 .is.; prompt",
    ):
        assert effect.normalized >= 0.5
    with pytest.raises(NonFiniteMetricError):
        assert not effect.normalized < 0.5
    with pytest.raises(NonFiniteMetricError):
        assert 0.5 <= effect.normalized
    with pytest.raises(NonFiniteMetricError):
        assert effect.intervened > -1e9
    with pytest.raises(NonFiniteMetricError):
        assert_restores(effect, at_least=0.5)
    with pytest.raises(NonFiniteMetricError):
        assert effect.normalized != 0.0
    with pytest.raises(NonFiniteMetricError):
        assert not effect.normalized == 0.0


def test_nan_is_an_arithmetic_error_not_an_assertion(nan_model):
    effect = patch(nan_model, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=LD)
    with pytest.raises(ArithmeticError):
        effect.normalized > 0


# -- ablate ---------------------------------------------------------------------------------------


def test_zero_ablation_equals_a_hand_trace(capitals):
    base = hand_ld(capitals, hand_logits(capitals, CLEAN))
    ablated = hand_ld(capitals, hand_logits(capitals, CLEAN, H0, [5], torch.zeros(1, 64)))
    effect = ablate(capitals, CLEAN, site="transformer.h.0", position="last", metric=LD)
    assert effect.kind == "zero ablation" and effect.positions == (5,)
    assert float(effect.target) == pytest.approx(base, abs=TOL)
    assert float(effect.intervened) == pytest.approx(ablated, abs=TOL)
    assert float(effect.delta) == pytest.approx(ablated - base, abs=TOL)
    assert float(effect.normalized) == pytest.approx((ablated - base) / abs(base), abs=TOL)
    assert ablated < base - 1  # zeroing the last position's residual destroys the answer


REFERENCES = ["The capital of Germany is", SPAIN, "Japan has its capital in"]  # three lengths: padded when batched


def test_mean_ablation_equals_the_hand_mean_over_unbatched_traces(capitals):
    mean = torch.stack([hand_act(capitals, p, H0)[-1] for p in REFERENCES]).mean(0)
    expected = hand_ld(capitals, hand_logits(capitals, CLEAN, H0, [5], mean[None]))
    effect = ablate(
        capitals, CLEAN, site="transformer.h.0", position="last", metric=LD, method="mean", reference_prompts=REFERENCES
    )
    assert effect.kind == "mean ablation (3 prompts)"
    assert float(effect.intervened) == pytest.approx(expected, abs=TOL)


def test_mean_ablation_by_word_uses_the_same_index_where_a_reference_lacks_the_word(capitals):
    # documented fallback: 'France' is index 4 of the ablated prompt, and index 4 of each reference stands in for it
    mean = torch.stack([hand_act(capitals, p, H0)[4] for p in REFERENCES]).mean(0)
    expected = hand_ld(capitals, hand_logits(capitals, CLEAN, H0, [4], mean[None]))
    effect = ablate(
        capitals,
        CLEAN,
        site="transformer.h.0",
        position="France",
        metric=LD,
        method="mean",
        reference_prompts=REFERENCES,
    )
    assert float(effect.intervened) == pytest.approx(expected, abs=TOL)


def test_resample_ablation_equals_patching_the_donors_activation(capitals):
    donor = "The capital of Japan is"
    act = hand_act(capitals, donor, EMB)[4]
    expected = hand_ld(capitals, hand_logits(capitals, CLEAN, EMB, [4], act[None]))
    effect = ablate(
        capitals, CLEAN, site="transformer.drop", position="France", metric=LD, method="resample", donor=donor
    )
    assert effect.kind == "resample ablation (from 'The capital of Japan is')"
    assert float(effect.intervened) == pytest.approx(expected, abs=TOL)
    # Japan's embedding at the subject: Tokyo now beats Paris, so LD(Paris, Berlin) falls
    assert float(effect.intervened) < 0


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(method="bogus"), r"ablation method 'bogus'"),
        (dict(method="mean"), r"mean ablation needs reference_prompts"),
        (dict(method="resample"), r"resample ablation needs donor="),
    ],
)
def test_ablation_misuse_is_a_value_error(capitals, kw, message):
    with pytest.raises(ValueError, match=message):
        ablate(capitals, CLEAN, site="transformer.h.0", position="last", metric=LD, **kw)


# -- steer ----------------------------------------------------------------------------------------


def test_steering_equals_adding_the_vector_by_hand(capitals):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    expected = hand_ld(capitals, hand_logits(capitals, CLEAN, H0, [4, 5], 3.0 * v.expand(2, 64), add=True))
    effect = steer(capitals, CLEAN, site="transformer.h.0", position=slice(4, None), vector=v, alpha=3.0, metric=LD)
    assert effect.kind == "steering (alpha=3)" and effect.positions == (4, 5)
    assert float(effect.target) == pytest.approx(hand_ld(capitals, hand_logits(capitals, CLEAN)), abs=TOL)
    assert float(effect.intervened) == pytest.approx(expected, abs=TOL)
    zero = steer(capitals, CLEAN, site="transformer.h.0", position="last", vector=torch.zeros(64), metric=LD)
    assert float(zero.delta) == pytest.approx(0.0, abs=TOL)


def test_steering_from_a_zero_metric_is_an_infinity_of_the_change_sign(capitals):
    """A metric exactly 0 without the edit: `normalized` is an infinity with the sign of the change (as in ablate)."""
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    before = hand_ld(capitals, hand_logits(capitals, CLEAN))
    after = hand_ld(capitals, hand_logits(capitals, CLEAN, H0, [4, 5], 3.0 * v.expand(2, 64), add=True))
    assert abs(after - before) > 0.1
    cut, up = (before + after) / 2, after > before
    paris, berlin = ids(capitals, "Paris", "Berlin")

    def falls_past_cut(output):  # 0 on the unedited run, negative on the steered one
        ld = output.logits[:, -1, paris] - output.logits[:, -1, berlin]
        return -((ld - cut) if up else (cut - ld)).clamp(min=0)

    effect = steer(
        capitals, CLEAN, site="transformer.h.0", position=slice(4, None), vector=v, alpha=3.0, metric=falls_past_cut
    )
    assert float(effect.target) == 0.0 and float(effect.intervened) < 0
    assert float(effect.normalized) == -math.inf


@pytest.mark.parametrize("shape", [(1, 64), (65,), (64, 1), (32,)])
def test_steering_vector_of_the_wrong_shape_names_the_expected_shape(capitals, shape):
    with pytest.raises(
        InterventionError,
        match=rf"steering vector of shape {re.escape(str(tuple(shape)))} does not fit resid_post.0: expected a tensor of shape \(64,\)",
    ):
        steer(capitals, CLEAN, site=block(capitals, 0), position="last", vector=torch.zeros(shape), metric=LD)


def test_steering_vector_on_another_device_or_not_finite(capitals):
    with pytest.raises(InterventionError, match=r"steering vector is on meta but the model runs on cpu"):
        steer(
            capitals, CLEAN, site="transformer.h.0", position="last", vector=torch.zeros(64, device="meta"), metric=LD
        )
    with pytest.raises(InterventionError, match=r"contains NaN or inf"):
        steer(
            capitals, CLEAN, site="transformer.h.0", position="last", vector=torch.full((64,), float("nan")), metric=LD
        )
    with pytest.raises(InterventionError, match=r"steering vector of shape list"):
        steer(capitals, CLEAN, site="transformer.h.0", position="last", vector=[0.0] * 64, metric=LD)


# -- patch_layer ----------------------------------------------------------------------------------


def seed_patch_layer(model, prompt, source_prompt, layer, pos):
    """The seed's InterventionExp.patch_layer, with `.output[0]` dropped for transformers 5 (a block returns a tensor)."""
    with model.trace(source_prompt):
        src_hidden = model.transformer.h[layer].output[:, pos, :].save()
    with model.trace(prompt):
        model.transformer.h[layer].output[:, pos, :] = src_hidden
        logits = model.lm_head.output.save()
    probs = torch.softmax(logits[0, -1], dim=-1)
    top = torch.topk(probs, 5)
    return {"top_probs": top.values.tolist(), "top_tokens": [model.tokenizer.decode([int(i)]) for i in top.indices]}


@pytest.mark.parametrize("layer, pos", [(1, -1), (0, -1), (0, 4), (1, 2)])
def test_patch_layer_matches_the_seeds_hand_written_version(capitals, layer, pos):
    expected = seed_patch_layer(capitals, CORRUPT, CLEAN, layer, pos)
    result = patch_layer(capitals, corrupt=CORRUPT, clean=CLEAN, layer=layer, position=pos)
    assert list(result.tokens) == expected["top_tokens"]
    assert list(result.probs) == pytest.approx(expected["top_probs"], abs=1e-6)
    assert result.site == f"resid_post.{layer}" and result.position == pos % 6


def test_patch_layer_at_the_last_position_transfers_the_answer(capitals):
    result = patch_layer(capitals, corrupt=CORRUPT, clean=CLEAN, layer=1, position=-1)
    assert result.tokens[0] == "Paris" and result.probs[0] > 0.5
    assert list(result.probs) == sorted(result.probs, reverse=True)
    assert_top_token(capitals, result, "Paris")


@pytest.mark.parametrize(
    "message, cause",
    [
        (
            "Inplace update to inference tensor outside InferenceMode",
            "Inplace update to inference tensor outside InferenceMode",
        ),
        # nnsight 0.5-0.7 wrap the whole traceback; the cause is its last line (measured by the version matrix on 0.7.0)
        (
            'Traceback (most recent call last):\n  File "x.py", line 3, in f\n    y()\nRuntimeError: Inplace update to inference tensor',
            "RuntimeError: Inplace update to inference tensor",
        ),
    ],
)
def test_translated_trace_errors_keep_the_cause_line(message, cause):
    from pytest_nnsight.interventions import _translate

    NNsightException = type("NNsightException", (Exception,), {})
    err = _translate(NNsightException(message), None, ["transformer.h.0"])
    assert isinstance(err, InterventionError)
    assert cause in str(err) and "Traceback (most recent" not in str(err)
