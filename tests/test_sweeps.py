"""Batched sweeps equal the naive one-trace-per-cell map written by hand; check_batching catches a broken batch path;
EffectMap helpers read the map the way the table shows it."""

import math

import pytest
import torch

from pytest_nnsight import EffectMap, sweeps
from pytest_nnsight.errors import BatchingMismatchError, BrokenExperimentError
from pytest_nnsight.interventions import Prompt
from pytest_nnsight.metrics import logit_diff
from pytest_nnsight.settings import Settings
from pytest_nnsight.sites import attn_out, blocks, embed, head, mlp_out
from pytest_nnsight.sweeps import sweep

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
TOKENS = ("<bos>", "The", "capital", "of", "France", "is")
LD = logit_diff("Paris", "Berlin")
TOL = 1e-5


def ld_of(model, logits):
    paris, berlin = model.tokenizer.convert_tokens_to_ids(["Paris", "Berlin"])
    return float(logits[0, -1, paris] - logits[0, -1, berlin])


def plain_ld(model, prompt):
    with torch.inference_mode():
        with model.trace(prompt):
            logits = model.lm_head.output.save()
    return ld_of(model, logits)


def naive_block_map(model, source, target, n_layers=2, n_pos=6):
    """One trace per cell, by hand: block `l`'s output at position `p` of `source` written into `target`."""
    ld_source, ld_target = plain_ld(model, source), plain_ld(model, target)
    raw = []
    for layer in range(n_layers):
        with torch.inference_mode():
            with model.trace(source):
                src = model.transformer.h[layer].output.clone().save()
        row = []
        for p in range(n_pos):
            with torch.inference_mode():
                with model.trace(target):
                    model.transformer.h[layer].output[:, p, :] = src[:, p, :]
                    logits = model.lm_head.output.save()
            row.append(ld_of(model, logits))
        raw.append(row)
    values = [[(v - ld_target) / (ld_source - ld_target) for v in row] for row in raw]
    return values, raw, ld_source, ld_target


@pytest.fixture(scope="module")
def naive(capitals):
    return naive_block_map(capitals, CLEAN, CORRUPT)


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batched_sweep_equals_the_naive_map(capitals, naive, batch_size):
    values, raw, ld_clean, ld_corrupt = naive
    effects = sweep(capitals, CLEAN, CORRUPT, metric=LD, batch_size=batch_size, check_batching=False)
    assert effects.shape == (2, 6)
    assert (
        effects.sites == ("resid_post.0", "resid_post.1")
        and effects.tokens == TOKENS
        and effects.positions == tuple(range(6))
    )
    assert (effects.clean_prompt, effects.corrupt_prompt, effects.metric) == (
        CLEAN,
        CORRUPT,
        "logit_diff('Paris', 'Berlin')",
    )
    assert effects.clean == pytest.approx(ld_clean, abs=TOL) and effects.corrupt == pytest.approx(ld_corrupt, abs=TOL)
    torch.testing.assert_close(torch.tensor(effects.raw), torch.tensor(raw), atol=TOL, rtol=0)
    torch.testing.assert_close(effects.tensor(), torch.tensor(values, dtype=torch.float64), atol=TOL, rtol=0)


def test_the_naive_map_shows_the_known_mechanism(naive):
    # measured, not assumed: after block 0 everything the answer needs sits at the last position
    values = naive[0]
    assert values[0][5] >= 0.95 and values[1][5] >= 0.95
    assert max(abs(v) for row in values for v in row[:5]) <= 0.05


def test_sweep_in_the_other_direction_equals_the_naive_map(capitals):
    values, raw, ld_corrupt, ld_clean = naive_block_map(capitals, CORRUPT, CLEAN)
    effects = sweep(capitals, CLEAN, CORRUPT, metric=LD, direction="corrupt->clean", batch_size=5)
    torch.testing.assert_close(torch.tensor(effects.raw), torch.tensor(raw), atol=TOL, rtol=0)
    torch.testing.assert_close(effects.tensor(), torch.tensor(values, dtype=torch.float64), atol=TOL, rtol=0)
    assert effects.clean == pytest.approx(ld_clean, abs=TOL) and effects.corrupt == pytest.approx(ld_corrupt, abs=TOL)


def test_head_sweep_equals_hand_patching_each_heads_slice(capitals):
    sites = [head(capitals, 0, i) for i in range(4)]
    effects = sweep(capitals, CLEAN, CORRUPT, metric=LD, sites=sites, batch_size=7)
    assert effects.sites == ("head_out.0.0", "head_out.0.1", "head_out.0.2", "head_out.0.3")
    ld_clean, ld_corrupt = plain_ld(capitals, CLEAN), plain_ld(capitals, CORRUPT)
    with torch.inference_mode():
        with capitals.trace(CLEAN):
            src = capitals.transformer.h[0].attn.c_proj.input.clone().save()
    for h in range(4):
        cols = slice(16 * h, 16 * (h + 1))
        for p in range(6):
            with torch.inference_mode():
                with capitals.trace(CORRUPT):
                    capitals.transformer.h[0].attn.c_proj.input[:, p, cols] = src[:, p, cols]
                    logits = capitals.lm_head.output.save()
            expected = (ld_of(capitals, logits) - ld_corrupt) / (ld_clean - ld_corrupt)
            assert effects[h, p] == pytest.approx(expected, abs=TOL), (h, p)
    assert max(effects.column(5)) > 0.1  # the heads do move the answer at the last position


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_attn_and_mlp_sweeps_equal_hand_patches(capitals, kind):
    effects = sweep(capitals, CLEAN, CORRUPT, metric=LD, sites=kind)
    assert effects.sites == (f"{kind}_out.0", f"{kind}_out.1")
    helper = attn_out if kind == "attn" else mlp_out
    assert effects.sites == tuple(str(helper(capitals, i)) for i in range(2))
    ld_clean, ld_corrupt = plain_ld(capitals, CLEAN), plain_ld(capitals, CORRUPT)
    for layer in range(2):
        module = lambda m: m.transformer.h[layer].attn if kind == "attn" else m.transformer.h[layer].mlp  # noqa: E731, B023  (used within this iteration)
        with torch.inference_mode():
            with capitals.trace(CLEAN):
                out = module(capitals).output
                src = (out[0] if kind == "attn" else out).clone().save()
        for p in (4, 5):
            with torch.inference_mode():
                with capitals.trace(CORRUPT):
                    out = module(capitals).output
                    (out[0] if kind == "attn" else out)[:, p, :] = src[:, p, :]
                    logits = capitals.lm_head.output.save()
            expected = (ld_of(capitals, logits) - ld_corrupt) / (ld_clean - ld_corrupt)
            assert effects[layer, p] == pytest.approx(expected, abs=TOL), (layer, p)


def test_mixed_site_list_keeps_its_order_and_input_sites_match_outputs(capitals):
    effects = sweep(
        capitals, CLEAN, CORRUPT, metric=LD, sites=[embed(capitals), "transformer.h.1:input", *blocks(capitals)]
    )
    assert effects.sites == ("embed", "transformer.h.1:input", "resid_post.0", "resid_post.1")
    # block 1's input is block 0's output: the two rows are the same patch
    assert effects.row("transformer.h.1:input") == pytest.approx(effects.row("resid_post.0"), abs=TOL)
    assert effects["embed", 4] >= 0.95


@pytest.mark.parametrize(
    "positions, expected",
    [([1, 5], (1, 5)), ("last", (5,)), (slice(3, None), (3, 4, 5)), ("France", (4,)), (-2, (4,))],
)
def test_positions_select_columns_of_the_full_map(capitals, naive, positions, expected):
    effects = sweep(capitals, CLEAN, CORRUPT, metric=LD, positions=positions)
    assert effects.positions == expected
    assert effects.tokens == tuple(TOKENS[p] for p in expected)
    assert effects.shape == (2, len(expected))
    for p in expected:
        assert effects.column(p) == pytest.approx([naive[0][0][p], naive[0][1][p]], abs=TOL)


def test_slot_positions_in_a_sweep(capitals):
    effects = sweep(
        capitals,
        Prompt(CLEAN, {"country": "France"}),
        Prompt(CORRUPT, {"country": "Germany"}),
        metric=LD,
        positions="{country}",
    )
    assert effects.positions == (4,) and effects.tokens == ("France",)


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.0, "8"])  # None sizes chunks by memory
def test_bad_batch_size_is_a_value_error(capitals, batch_size):
    with pytest.raises(ValueError, match="batch_size .*: expected a positive int"):
        sweep(capitals, CLEAN, CORRUPT, metric=LD, batch_size=batch_size)


def test_sweep_refuses_a_broken_experiment_before_running_cells(capitals, monkeypatch):
    calls = []
    real = sweeps.run
    monkeypatch.setattr(sweeps, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with pytest.raises(BrokenExperimentError, match=r"sweeping 2 sites x 6 positions: the two runs barely differ"):
        sweep(capitals, CLEAN, CLEAN, metric=LD, reuse="none")
    assert len(calls) == 1  # only the unpatched pair ran
    monkeypatch.setattr(sweeps, "run_cells", lambda *a, **kw: calls.append(2))
    with pytest.raises(BrokenExperimentError, match=r"the two runs barely differ"):
        sweep(capitals, CLEAN, CLEAN, metric=LD)  # prefix reuse: refused before any patched row
    assert calls == [1]


# -- check_batching -------------------------------------------------------------------------------


@pytest.fixture
def count_runs(monkeypatch):
    """Wrap sweeps.run (these tests sweep with reuse='none', the plain path); `broken=True` adds 0.5 to the metric of
    every batched patched run (single cells stay right). Cached batching verdicts are dropped, so every check runs."""
    sweeps.forget_verdicts()
    state = {"single": 0, "batched": 0, "broken": False}
    real = sweeps.run

    def wrapped(model, inputs, metric, **kw):
        values, saved = real(model, inputs, metric, **kw)
        if kw.get("edits"):
            key = "batched" if isinstance(inputs, list) else "single"
            state[key] += 1
            if key == "batched" and state["broken"]:
                values = values + 0.5
        return values, saved

    monkeypatch.setattr(sweeps, "run", wrapped)
    return state


def test_check_batching_reruns_the_asked_cells_and_passes(capitals, count_runs, naive):
    effects = sweep(capitals, CLEAN, CORRUPT, metric=LD, batch_size=4, check_batching=True, check_cells=5, reuse="none")
    # 4 rows a trace: [clean, corrupt] + 2 cells, then 4, 4, 2
    assert count_runs == {
        "single": 5,
        "batched": 4,
        "broken": False,
    }
    torch.testing.assert_close(torch.tensor(effects.raw), torch.tensor(naive[1]), atol=TOL, rtol=0)


def test_check_batching_catches_a_broken_batch_path(capitals, count_runs):
    count_runs["broken"] = True
    with pytest.raises(BatchingMismatchError) as info:
        sweep(capitals, CLEAN, CORRUPT, metric=LD, check_batching=True, check_cells=3, reuse="none")
    message = str(info.value)
    assert "batched sweep disagrees with single-cell runs beyond 0.0001 in 3 of 3 checked cells" in message
    assert "|diff| 0.5" in message
    assert "run with batch_size=1 and report it" in message
    assert isinstance(info.value, AssertionError)


def test_check_batching_follows_the_setting_and_is_what_catches_the_bug(capitals, count_runs, attach_settings):
    count_runs["broken"] = True
    # without the check a broken batch passes silently
    sweep(capitals, CLEAN, CORRUPT, metric=LD, check_batching=False, reuse="none")
    # the model carries its run settings
    attach_settings(capitals, Settings(check_batching=True, check_batching_cells=2))
    with pytest.raises(BatchingMismatchError, match="in 2 of 2 checked cells"):
        sweep(capitals, CLEAN, CORRUPT, metric=LD, reuse="none")
    attach_settings(capitals, Settings(check_batching=False))
    sweep(capitals, CLEAN, CORRUPT, metric=LD, reuse="none")


def test_check_batching_catches_a_broken_prefix_path(capitals, monkeypatch):
    sweeps.forget_verdicts()
    real = sweeps.run_cells
    monkeypatch.setattr(sweeps, "run_cells", lambda *a, **kw: real(*a, **kw) + 0.5)
    with pytest.raises(
        BatchingMismatchError, match=r"in 4 of 12 checked cells"
    ):  # the 8 cells before 'Germany' run no row
        sweep(capitals, CLEAN, CORRUPT, metric=LD, check_batching=True, check_cells=12)


def test_tolerance_for_low_precision_dtypes():
    assert sweeps.tolerance_for(torch.float32) == 1e-4
    assert sweeps.tolerance_for(torch.float16) > 1e-3 and sweeps.tolerance_for(torch.bfloat16) > sweeps.tolerance_for(
        torch.float16
    )


# -- EffectMap helpers ----------------------------------------------------------------------------

NAN = float("nan")


@pytest.fixture
def emap():
    return EffectMap(
        values=((0.1, 0.9, NAN), (0.5, -0.2, 0.3)),
        sites=("resid_post.0", "resid_post.1"),
        tokens=("a", "b", "c"),
        metric="m",
        clean_prompt="x a b",
        corrupt_prompt="x a c",
        clean=2.0,
        corrupt=-1.0,
        positions=(2, 4, 6),
    )


def test_effect_map_cells_rows_and_columns(emap):
    assert emap.shape == (2, 3)
    assert emap["resid_post.1", 6] == 0.3 and emap[0, 2] == 0.1
    assert emap.row("resid_post.1") == emap.row(1) == (0.5, -0.2, 0.3)
    assert emap.column(4) == (0.9, -0.2)
    with pytest.raises(ValueError):
        emap.column(3)  # a token index the map does not hold
    t = emap.tensor()
    assert t.dtype == torch.float64 and t.shape == (2, 3) and math.isnan(float(t[0, 2]))


def test_effect_map_top_and_argmax_put_nan_last(emap):
    assert emap.argmax() == ("resid_post.0", 4, "b", 0.9)
    assert emap.top(3) == [("resid_post.0", 4, "b", 0.9), ("resid_post.1", 2, "a", 0.5), ("resid_post.1", 6, "c", 0.3)]
    everything = emap.top(10)
    assert len(everything) == 6 and math.isnan(everything[-1][3])


def test_effect_map_to_text_marks_cells(emap):
    lines = emap.to_text(mark=[(1, 1)]).splitlines()
    assert lines[0].split() == ["2:a", "4:b", "6:c"]
    assert lines[1].split() == ["resid_post.0", "0.10", "0.90", "nan"]
    assert lines[2].split() == ["resid_post.1", "0.50", "-0.20!", "0.30"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "0.900" in emap.to_text(digits=3) and "!" not in emap.to_text()


def test_effect_map_repr_names_the_peak(emap):
    assert repr(emap) == "EffectMap(2 sites x 3 positions, m, peak 0.9 at resid_post.0 / 4 'b')"


def test_effect_map_default_positions_are_all_tokens():
    m = EffectMap(((1.0, 2.0),), ("s",), ("a", "b"), "m", "p", "q", 1.0, 0.0)
    assert m.positions == (0, 1) and m.column(1) == (2.0,)


def test_real_sweep_helpers(capitals, naive):
    effects = sweep(capitals, CLEAN, CORRUPT, metric=LD)
    site, pos, tok, value = effects.argmax()
    best = max(((i, p) for i in range(2) for p in range(6)), key=lambda c: naive[0][c[0]][c[1]])
    assert (site, pos, tok) == (f"resid_post.{best[0]}", best[1], TOKENS[best[1]])
    assert value == pytest.approx(naive[0][best[0]][best[1]], abs=TOL)
    text = effects.to_text()
    assert text.splitlines()[0].split() == [f"{i}:{t}" for i, t in enumerate(TOKENS)]
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["resid_post.0", "resid_post.1"]
