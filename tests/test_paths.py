"""Path patching against the three-run path patching of Wang et al. written by hand in nnsight (freeze every other
component at the target run, record the receiver's input, patch it alone), batched == single, and bad input."""

import math

import pytest
import torch

from pytest_nnsight.errors import BatchingMismatchError, CircuitError
from pytest_nnsight.metrics import logit_diff
from pytest_nnsight.models import wrap
from pytest_nnsight.paths import all_edges, path_patch, path_sweep

CLEAN = "When Mary and John went to the store John gave a drink to"
CORRUPT = "When John and Mary went to the store Mary gave a drink to"
N_LAYERS, N_HEADS, D = 2, 4, 32


def reference(model, sender, receiver, positions=None):
    """Three runs, by hand: cache clean and corrupt; rerun corrupt with the sender from clean and every other head and
    MLP frozen at corrupt, saving the receiver's input; rerun corrupt with only that input written. Returns the
    normalized effect on logit(Mary) - logit(John)."""
    tok = model.tokenizer
    mary, john = tok.convert_tokens_to_ids("Mary"), tok.convert_tokens_to_ids("John")
    h = model.transformer.h
    runs = {}
    with torch.inference_mode():
        for name, prompt in (("clean", CLEAN), ("corrupt", CORRUPT)):
            z, mlp = [], []
            with model.trace(prompt):
                emb = model.transformer.drop.output.detach().clone().save()
                for layer in range(N_LAYERS):
                    z.append(h[layer].attn.c_proj.input.detach().clone().save())
                    mlp.append(h[layer].mlp.output.detach().clone().save())
                logits = model.lm_head.output.detach().clone().save()
            runs[name] = (emb, z, mlp, float(logits[0, -1, mary] - logits[0, -1, john]))
        c_emb, c_z, c_mlp, clean_ld = runs["clean"]
        x_emb, x_z, x_mlp, corrupt_ld = runs["corrupt"]
        kind, *idx = sender.split(".")
        pos = list(range(x_emb.shape[1])) if positions is None else positions
        receivers = receiver if isinstance(receiver, list) else [receiver]  # a list: q/k/v inputs of one layer
        rkind, *ridx = receivers[0].split(".")
        rlayer = N_LAYERS if rkind == "logits" else int(ridx[0])
        width = D // N_HEADS

        # run 2: the sender from clean, every other component frozen at corrupt; save the receiver's input
        with model.trace(CORRUPT):
            if kind == "embed":
                model.transformer.drop.output[:, pos, :] = c_emb[:, pos, :]
            for layer in range(N_LAYERS):
                if layer == rlayer and rkind in ("q_in", "k_in", "v_in"):
                    saved = h[layer].attn.c_attn.output.detach().clone().save()
                    break
                z = x_z[layer].clone()
                if kind == "head_out" and int(idx[0]) == layer:
                    cols = slice(int(idx[1]) * width, (int(idx[1]) + 1) * width)
                    z[:, pos, cols] = c_z[layer][:, pos, cols]
                if kind == "attn_out" and int(idx[0]) == layer:
                    z[:, pos, :] = c_z[layer][:, pos, :]
                h[layer].attn.c_proj.input[:] = z
                if layer == rlayer and rkind == "mlp_in":
                    saved = h[layer].mlp.input.detach().clone().save()
                    break
                m = x_mlp[layer].clone()
                if kind == "mlp_out" and int(idx[0]) == layer:
                    m[:, pos, :] = c_mlp[layer][:, pos, :]
                h[layer].mlp.output[:] = m
            if rkind == "logits":
                saved = model.transformer.ln_f.output.detach().clone().save()

        # run 3: corrupt with only the receiver's input written
        with model.trace(CORRUPT):
            if rkind in ("q_in", "k_in", "v_in"):
                new = h[rlayer].attn.c_attn.output.clone()
                for one in receivers:
                    kind, _, head = one.split(".")
                    start = "qkv".index(kind[0]) * D + int(head) * width
                    new[:, :, start : start + width] = saved[:, :, start : start + width]
                h[rlayer].attn.c_attn.output[:] = new
            elif rkind == "mlp_in":
                h[rlayer].mlp.input[:] = saved
            else:
                model.transformer.ln_f.output[:] = saved
            logits = model.lm_head.output.detach().clone().save()
        patched = float(logits[0, -1, mary] - logits[0, -1, john])
    return (patched - corrupt_ld) / (clean_ld - corrupt_ld)


EDGES = [
    ("head_out.0.1", "k_in.1.2", None),
    ("head_out.0.3", "q_in.1.0", None),
    ("head_out.0.0", "v_in.1.3", None),
    ("embed", "k_in.0.2", None),
    ("embed", "k_in.1.2", [2, 4]),
    ("head_out.0.1", "mlp_in.1", None),
    ("head_out.0.2", "mlp_in.0", None),
    ("mlp_out.0", "v_in.1.1", None),
    ("head_out.1.2", "logits", None),
    ("attn_out.0", "logits", [9, 13]),
    ("mlp_out.1", "logits", None),
    ("embed", ["v_in.1.0", "v_in.1.1", "v_in.1.2", "v_in.1.3"], [2, 4, 9]),  # one sender through several inputs at once
    ("head_out.0.0", ["q_in.1.2", "k_in.1.2"], None),
]


@pytest.mark.parametrize("sender,receiver,positions", EDGES)
def test_path_patch_equals_hand_written_three_run_path_patching(tiny_ioi, mary_john, sender, receiver, positions):
    expected = reference(tiny_ioi, sender, receiver, positions)
    effect = path_patch(
        tiny_ioi, CLEAN, CORRUPT, sender=sender, receiver=receiver, metric=mary_john, position=positions
    )
    assert math.isfinite(expected)
    assert abs(float(effect.normalized) - expected) <= 1e-4, (sender, receiver, float(effect.normalized), expected)
    assert effect.site == f"{sender} -> {'+'.join(receiver) if isinstance(receiver, list) else receiver}"


def test_some_edge_of_the_tiny_model_matters(tiny_ioi, mary_john):
    """Guards the comparison above against comparing zeros: the random model has edges with a visible effect."""
    effects = [abs(reference(tiny_ioi, s, r, p)) for s, r, p in EDGES]
    assert sum(e > 0.01 for e in effects) >= 5, effects
    several = path_patch(
        tiny_ioi,
        CLEAN,
        CORRUPT,
        sender="embed",
        receiver=["v_in.1.0", "v_in.1.1", "v_in.1.2", "v_in.1.3"],
        metric=mary_john,
    )
    alone = [
        path_patch(tiny_ioi, CLEAN, CORRUPT, sender="embed", receiver=f"v_in.1.{h}", metric=mary_john).normalized
        for h in range(4)
    ]
    # the joint path is measured, not the sum of the single ones
    assert abs(float(several.normalized) - sum(alone)) > 1e-3


def test_batched_sweep_equals_single_edges(tiny_ioi, mary_john):
    paths = path_sweep(tiny_ioi, CLEAN, CORRUPT, metric=mary_john, batch_size=17, check_batching=False)
    edges = paths.edges()
    assert len(edges) == len(all_edges(tiny_ioi)) == 110  # embed 27 + 4 heads x 15 + mlp0 14 + 4 heads x 2 + mlp1 1
    one = path_sweep(tiny_ioi, CLEAN, CORRUPT, metric=mary_john, batch_size=1, check_batching=False)
    assert max(abs(a[2] - b[2]) for a, b in zip(edges, one.edges())) <= 1e-5
    for sender, receiver, value in edges[::11]:
        single = path_patch(tiny_ioi, CLEAN, CORRUPT, sender=sender, receiver=receiver, metric=mary_john)
        assert abs(float(single.normalized) - value) <= 1e-5, (sender, receiver)
    assert math.isnan(paths["head_out.1.0", "k_in.0.1"])  # no edge backwards: NaN in the grid, absent from edges()


def test_sweep_batching_check_catches_a_wrong_batched_value(tiny_ioi, mary_john, monkeypatch):
    from pytest_nnsight import paths

    real = paths.run_edges

    def off_by_one(*args, **kwargs):
        return [v + 1.0 for v in real(*args, **kwargs)]

    monkeypatch.setattr(paths, "run_edges", off_by_one)
    with pytest.raises(BatchingMismatchError, match="single-edge runs"):
        path_sweep(
            tiny_ioi,
            CLEAN,
            CORRUPT,
            metric=mary_john,
            senders=["embed"],
            receivers=["logits", "mlp_in.0"],
            check_batching=True,
        )


def test_corrupt_to_clean_direction_is_the_mirror(tiny_ioi, mary_john):
    fwd = path_patch(tiny_ioi, CLEAN, CORRUPT, sender="head_out.0.1", receiver="logits", metric=mary_john)
    back = path_patch(
        tiny_ioi, CLEAN, CORRUPT, sender="head_out.0.1", receiver="logits", metric=mary_john, direction="corrupt->clean"
    )
    mirrored = path_patch(
        tiny_ioi, CORRUPT, CLEAN, sender="head_out.0.1", receiver="logits", metric=logit_diff("John", "Mary")
    )
    assert abs(float(back.intervened) - (-float(mirrored.intervened))) <= 1e-5
    assert fwd.clean == back.clean and fwd.corrupt == back.corrupt


@pytest.mark.parametrize(
    "sender,receiver,match",
    [
        ("head_out.1.0", "k_in.0.1", r"no edge head_out.1.0 -> k_in.0.1: k_in.0.1 reads .* before"),
        ("head_out.1.0", "q_in.1.2", r"no edge head_out.1.0 -> q_in.1.2"),
        ("mlp_out.0", "mlp_in.0", r"no edge mlp_out.0 -> mlp_in.0"),
        ("head_out.0.7", "logits", r"sender 'head_out.0.7': head 7 is out of range: .* valid 0..3"),
        ("head_out.5.0", "logits", r"layer 5 is out of range: .* valid 0..1"),
        ("resid_post.0", "logits", r"resid_post.0.* the residual stream.*senders are embed, attn_out.L"),
        ("embed", "head_out.1.0", r"receiver 'head_out.1.0' is an output.*k_in.1.0"),
        ("embed", "attn_in.1", r"unknown receiver 'attn_in.1': expected q_in.L.H"),
        ("k_in.1.0", "logits", r"'k_in.1.0' is a receiver .* not a sender"),
        (3, "logits", r"sender 3 \(int\) is not a name"),
    ],
)
def test_bad_edges_name_the_value_and_what_is_accepted(tiny_ioi, mary_john, sender, receiver, match):
    with pytest.raises(CircuitError, match=match):
        path_patch(tiny_ioi, CLEAN, CORRUPT, sender=sender, receiver=receiver, metric=mary_john)


def test_a_family_without_split_inputs_is_refused_with_the_reason():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pytest_nnsight.testing import word_tokenizer

    tok = word_tokenizer()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
        )
    )
    wrapped = wrap(llama.eval(), tok)
    with pytest.raises(CircuitError, match=r"llama family\) reads its receiver inputs .* supported families: gpt2"):
        path_patch(wrapped, CLEAN, CORRUPT, sender="embed", receiver="logits", metric=logit_diff("Mary", "John"))


from hypothesis import (  # noqa: E402
    given,
    settings,
    strategies as st,  # noqa: E402
)


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_any_batch_of_edges_equals_each_edge_alone(tiny_ioi, mary_john, data):
    """Property: whatever edges, sender positions and batch size, a batched sweep gives each edge's path_patch."""
    from pytest_nnsight.paths import all_receivers, all_senders

    senders = data.draw(
        st.lists(st.sampled_from([s.label for s in all_senders(tiny_ioi)]), min_size=1, max_size=4, unique=True)
    )
    receivers = data.draw(
        st.lists(st.sampled_from([r.label for r in all_receivers(tiny_ioi)]), min_size=1, max_size=4, unique=True)
    )
    positions = data.draw(st.none() | st.lists(st.integers(0, 13), min_size=1, max_size=3, unique=True))
    batch = data.draw(st.integers(1, 7))
    try:
        paths = path_sweep(
            tiny_ioi,
            CLEAN,
            CORRUPT,
            metric=mary_john,
            senders=senders,
            receivers=receivers,
            position=positions,
            batch_size=batch,
            check_batching=False,
        )
    except CircuitError as exc:  # every receiver reads before every sender writes
        assert "no edge among" in str(exc)
        return
    for sender, receiver, value in paths.edges():
        alone = path_patch(
            tiny_ioi, CLEAN, CORRUPT, sender=sender, receiver=receiver, metric=mary_john, position=positions
        )
        assert abs(float(alone.normalized) - value) <= 1e-5, (sender, receiver, positions, batch)


def test_edge_scores_of_pairs_of_several_lengths_batched_equal_each_pair_alone(tiny_ioi, mary_john):
    from pytest_nnsight.discovery import edge_scores

    pairs = [
        (
            "When Mary and John went to the store John gave a drink to",
            "When John and Mary went to the store Mary gave a drink to",
        ),
        (
            "When Mary and John went to the city John gave a drink to",
            "When John and Mary went to the city Mary gave a drink to",
        ),
        (
            "Mary and John went to the store John gave a drink to",
            "John and Mary went to the store Mary gave a drink to",
        ),
    ]
    edges, together = edge_scores(tiny_ioi, pairs, metric=mary_john, method="eap-ig", steps=3, batch_size=2)
    alone = [edge_scores(tiny_ioi, [p], metric=mary_john, method="eap-ig", steps=3)[1] for p in pairs]
    assert max(abs(t - sum(a[k] for a in alone) / 3) for k, t in enumerate(together)) <= 1e-5
