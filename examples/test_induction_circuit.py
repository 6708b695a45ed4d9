"""The induction circuit of `bundled:induction`, discovered, confirmed by path patching, checked for faithfulness, snapshotted.

The model reads `<bos> x0 .. x9 q` and predicts the symbol that followed q in the list. Two kinds of counterfactual
pairs (24 each, seeded):
- key pairs swap q's first occurrence with a later symbol: the answer's position moves, so what changes is WHERE the
  layer-1 heads attend, i.e. their keys;
- value pairs replace the answer symbol by an unused one: what changes is WHAT they copy, i.e. their values.

Measured on the shipped weights (nnsight 0.8.1, transformers 5.24, torch 2.13 CPU; the numbers are in the asserts'
comments). Edge attribution with integrated gradients (5 steps) over both kinds, top 16 edges:
  embed -> v_in.0.0 (0.45), embed -> v_in.0.2 (0.39), head_out.1.{0..3} -> logits (0.18-0.19 each),
  head_out.0.0 -> k_in.1.{0..3} (0.095-0.097 each), head_out.0.2 -> v_in.1.{0..3} (0.084-0.092), mlp_out.1 -> logits
  (0.027), embed -> q_in.0.3 (0.022; the 17th edge scores 0.020, hence rank_tolerance=1 in the snapshot).
So the circuit holds heads 0.0 (the previous-token head: each symbol's previous neighbour, read by the layer-1 heads'
KEYS), 0.2 (the current symbol, read by their VALUES), 0.3 (through its query only), all four layer-1 heads and
mlp_out.1; it leaves out heads 0.1 and mlp_out.0. Not the two-head story: one previous-token head feeds four
induction heads, and a second layer-0 head carries the copied value.
"""

import random

import pytest

from pytest_nnsight import logit_diff
from pytest_nnsight.circuits import assert_edges, assert_faithful, discover, faithfulness, path_patch
from pytest_nnsight.prompts import Prompt
from pytest_nnsight.strategies import CounterfactualPair

KEY_EDGES = [("head_out.0.0", f"k_in.1.{h}") for h in range(4)]
CIRCUIT_HEADS = [
    "head_out.0.0",
    "head_out.0.2",
    "head_out.0.3",
    "head_out.1.0",
    "head_out.1.1",
    "head_out.1.2",
    "head_out.1.3",
]


def recall_pairs(n: int, kind: str, seed: int, length: int = 10) -> list[CounterfactualPair]:
    """`n` seeded pairs of one kind ('key' or 'value'); every prompt is <bos> + 10 symbols + the query (12 tokens)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        symbols = rng.sample(range(64), length + 1)
        seq = [f"t{i}" for i in symbols[:length]]
        q = rng.randrange(1, length - 3)
        k = rng.randrange(q + 2, length - 1)
        corrupt = list(seq)
        if kind == "key":
            corrupt[q], corrupt[k] = corrupt[k], corrupt[q]
            distractor = seq[k + 1]  # in the corrupt list q is followed by what followed the swapped symbol
        else:
            corrupt[q + 1] = distractor = f"t{symbols[length]}"
        out.append(
            CounterfactualPair(
                Prompt(" ".join(seq + [seq[q]]), {}),
                Prompt(" ".join(corrupt + [seq[q]]), {}),
                seq[q + 1],
                distractor,
                kind,
            )
        )
    return out


KEY, VALUE = recall_pairs(24, "key", seed=1), recall_pairs(24, "value", seed=2)


@pytest.fixture(scope="module")
def induction(nnsight_models):
    return nnsight_models.get("bundled:induction")  # the session cache: loaded once, shared by the tests below


@pytest.fixture(scope="module")
def circuit(induction):
    return discover(induction, KEY + VALUE, top_k=16, method="eap-ig", steps=5)


@pytest.mark.finding(
    "discovery finds the previous-token head 0.0 feeding all four layer-1 heads through their key input"
)
def test_discovery_finds_the_previous_token_head_feeding_the_induction_heads_keys(circuit):
    assert_edges(circuit, KEY_EDGES)
    assert sorted(n for n in circuit.nodes if n.startswith(("head_out", "mlp_out"))) == CIRCUIT_HEADS + ["mlp_out.1"]


@pytest.mark.finding(
    "path patching confirms head 0.0 -> the layer-1 heads' keys carries the key-swap effect (mean >= 0.9, each pair >= 0.7)"
)
def test_path_patching_confirms_the_key_edge(induction):
    effects = [
        float(
            path_patch(
                induction,
                p.clean,
                p.corrupt,
                sender="head_out.0.0",
                receiver=[r for _, r in KEY_EDGES],
                metric=logit_diff(p.answer, p.distractor),
            ).normalized
        )
        for p in KEY[:12]
    ]
    assert sum(effects) / len(effects) >= 0.9  # measured 0.962 over 24 pairs (min 0.848)
    assert min(effects) >= 0.7
    one = path_patch(
        induction,
        KEY[0].clean,
        KEY[0].corrupt,
        sender="head_out.0.0",
        receiver="k_in.1.0",
        metric=logit_diff(KEY[0].answer, KEY[0].distractor),
    )
    # one head's key alone carries a share: the four heads split the work (0.17-0.19)
    assert 0.1 <= one.normalized <= 0.5
    q = path_patch(
        induction,
        KEY[0].clean,
        KEY[0].corrupt,
        sender="head_out.0.0",
        receiver=[f"q_in.1.{h}" for h in range(4)],
        metric=logit_diff(KEY[0].answer, KEY[0].distractor),
    )
    assert abs(q.normalized) <= 0.05  # not through the queries


@pytest.mark.finding("the discovered circuit keeps >= 0.9 of the metric with every other head and MLP mean-ablated")
def test_discovered_circuit_is_faithful_under_mean_ablation(induction, circuit):
    result = faithfulness(induction, circuit, KEY + VALUE, ablation="mean")
    assert_faithful(result, at_least=0.9)  # the mean: measured 0.95 over 96 pairs (these 48: 0.95)
    # as a population claim: 39/48 key and 38/48 value pairs of a larger sample keep >= 0.9 (81%, Wilson 95% lower 0.66-0.68)
    assert_faithful(result, at_least=0.9, min_rate=0.6)
    assert_faithful(result, at_least=0.5, min_rate=0.85)  # nearly every pair keeps half (min 0.23 over 96)


@pytest.mark.finding("the induction circuit (edges ranked by EAP-IG score) is unchanged")
def test_induction_circuit_snapshot(induction, circuit, finding_snapshot):
    assert circuit == finding_snapshot(model=induction, atol=2e-3, rank_tolerance=1)
