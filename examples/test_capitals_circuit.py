"""How the subject reaches the answer in `bundled:capitals`: path patching from the subject's embedding, and its circuit.

Measured on the shipped weights over 24 seeded counterfactual pairs (8 templates x 48 countries; nnsight 0.8.1,
transformers 5.24, torch 2.13 CPU):
- the subject's embedding acts only through the VALUE inputs of the layer-0 heads: through all four at once the path
  restores 0.9997 of the logit difference (min 0.993); through their queries and keys at most 0.006; directly into any
  layer-1 input, the last MLP or the logits 0.000. Each head's value input alone carries 0.18-0.25 (mean): the four
  heads share the move from the subject to the last position, and only jointly carry all of it;
- edge attribution (EAP-IG, 5 steps) ranks those four edges first (0.22-0.27), then mlp_out.0, the four layer-0 heads
  and mlp_out.1 into the logits; the top 10 edges' circuit holds no layer-1 head and keeps 0.992 of the metric with the
  layer-1 heads mean-ablated (min 0.949, 24/24 pairs >= 0.9).
"""

import pytest

from pytest_nnsight import logit_diff
from pytest_nnsight.circuits import assert_edges, assert_faithful, discover, faithfulness, path_patch
from pytest_nnsight.strategies import counterfactual_pairs
from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS

VALUES_0 = [f"v_in.0.{h}" for h in range(4)]


@pytest.fixture(scope="module")
def capitals(nnsight_models):
    return nnsight_models.get("bundled:capitals")


@pytest.fixture(scope="module")
def pairs(capitals):
    return counterfactual_pairs(capitals.tokenizer, CAPITAL_TEMPLATES, {"country": CAPITALS}).space.sample(24, 0)


def _path(model, pair, receiver):
    return float(
        path_patch(
            model,
            pair.clean,
            pair.corrupt,
            sender="embed",
            position="{country}",
            receiver=receiver,
            metric=logit_diff(pair.answer, pair.distractor),
        ).normalized
    )


@pytest.mark.finding(
    "the subject's embedding reaches the last position through the layer-0 heads' value inputs, and nowhere else"
)
def test_subject_reaches_the_last_position_through_layer_0_attention(capitals, pairs):
    through_values = [_path(capitals, p, VALUES_0) for p in pairs]
    assert min(through_values) >= 0.95  # measured min 0.993, mean 0.9997
    for p in pairs[:6]:
        assert abs(_path(capitals, p, [f"{k}_in.0.{h}" for h in range(4) for k in "qk"])) <= 0.02  # measured <= 0.006
        later = [f"{k}_in.1.{h}" for h in range(4) for k in "qkv"] + ["mlp_in.0", "mlp_in.1", "logits"]
        assert abs(_path(capitals, p, later)) <= 0.01  # measured 0.000: nothing else reads the subject's embedding
    alone = [_path(capitals, pairs[0], r) for r in VALUES_0]
    assert all(0.05 <= a <= 0.6 for a in alone)  # every head carries a share; none carries it all


@pytest.fixture(scope="module")
def circuit(capitals, pairs):
    return discover(capitals, pairs, top_k=10, method="eap-ig", steps=5)


@pytest.mark.finding(
    "discovery ranks the subject -> layer-0 value edges first; the circuit needs no layer-1 head and is faithful"
)
def test_capitals_circuit_is_layer_0_attention_and_the_mlps(capitals, pairs, circuit):
    assert_edges(circuit, [("embed", v) for v in VALUES_0])
    assert {s for s, _ in circuit.edges[:4]} == {"embed"}  # the four value edges rank first
    assert not [n for n in circuit.nodes if n.startswith("head_out.1.")]
    result = faithfulness(capitals, circuit, pairs, ablation="mean")
    assert_faithful(result, at_least=0.9, min_rate=0.8)  # measured 24/24 >= 0.9 (Wilson 95% lower 0.86), mean 0.992


@pytest.mark.finding("the capitals circuit (edges ranked by EAP-IG score) is unchanged")
def test_capitals_circuit_snapshot(capitals, circuit, finding_snapshot):
    assert circuit == finding_snapshot(model=capitals, atol=2e-3, rank_tolerance=1)
