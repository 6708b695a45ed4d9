"""Circuits: faithfulness against ablation written by hand in nnsight, the identities tying completeness and minimality
to faithfulness, batched == single, edge attribution against finite differences of path patching, and bad input."""

import math

import pytest
import torch

from pytest_nnsight.assertions import FindingFailed
from pytest_nnsight.circuits import (
    Circuit,
    assert_complete,
    assert_faithful,
    assert_minimal,
    completeness,
    discover,
    edge_attribution,
    faithfulness,
    minimality,
    path_sweep,
    spearman,
)
from pytest_nnsight.errors import ArgumentError, CircuitError
from pytest_nnsight.metrics import logit_diff
from pytest_nnsight.models import wrap
from pytest_nnsight.paths import all_edges
from pytest_nnsight.testing import tiny_gpt2

PAIRS = [
    (
        "When Mary and John went to the store John gave a drink to",
        "When John and Mary went to the store Mary gave a drink to",
    ),
    (
        "When Mary and John went to the city John gave a drink to",
        "When John and Mary went to the city Mary gave a drink to",
    ),
    (
        "When John and Mary went to the store Mary gave a drink to",
        "When Mary and John went to the store John gave a drink to",
    ),
]
NODES = ("head_out.0.1", "head_out.1.2", "mlp_out.0")


def hand_ablated(model, prompt, donor, keep, how):
    """logit(Mary) - logit(John) on `prompt` with every head and MLP not in `keep` zeroed or taken from `donor`, by hand."""
    tok = model.tokenizer
    mary, john = tok.convert_tokens_to_ids("Mary"), tok.convert_tokens_to_ids("John")
    h = model.transformer.h
    with torch.inference_mode():
        z, mlp = [], []
        with model.trace(donor):
            for layer in range(2):
                z.append(h[layer].attn.c_proj.input.detach().clone().save())
                mlp.append(h[layer].mlp.output.detach().clone().save())
        with model.trace(prompt):
            for layer in range(2):
                new = h[layer].attn.c_proj.input.clone()
                for head in range(4):
                    if f"head_out.{layer}.{head}" not in keep:
                        cols = slice(head * 8, (head + 1) * 8)
                        new[:, :, cols] = 0 if how == "zero" else z[layer][:, :, cols]
                h[layer].attn.c_proj.input[:] = new
                if f"mlp_out.{layer}" not in keep:
                    h[layer].mlp.output[:] = 0 if how == "zero" else mlp[layer]
            logits = model.lm_head.output.detach().clone().save()
    return float(logits[0, -1, mary] - logits[0, -1, john])


@pytest.mark.parametrize("how", ["zero", "resample"])
def test_faithfulness_equals_hand_written_ablation(tiny_ioi, mary_john, how):
    result = faithfulness(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, ablation=how)
    everything = {f"head_out.{l}.{h}" for l in range(2) for h in range(4)} | {"mlp_out.0", "mlp_out.1"}
    for i, (clean, corrupt) in enumerate(PAIRS):
        kept = hand_ablated(tiny_ioi, clean, corrupt, set(NODES), how)
        empty = hand_ablated(tiny_ioi, clean, corrupt, set(), how)
        full = hand_ablated(tiny_ioi, clean, corrupt, everything, how)
        assert (
            abs(result.ablated[i] - kept) <= 1e-4
            and abs(result.empty[i] - empty) <= 1e-4
            and abs(result.full[i] - full) <= 1e-4
        )
        assert abs(result.values[i] - (kept - empty) / (full - empty)) <= 1e-4
    assert len({round(v, 3) for v in result.values}) > 1  # three different pairs, three different numbers


def test_mean_ablation_uses_the_mean_over_the_corrupt_prompts(tiny_ioi, mary_john):
    """All three corrupt prompts have one length: each node takes its per-position mean over them."""
    hf = tiny_ioi._module
    corrupt = [x for _, x in PAIRS]
    result = faithfulness(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, ablation="mean")
    h = tiny_ioi.transformer.h
    with torch.inference_mode():
        zs, ms = [], []
        with tiny_ioi.trace(corrupt):
            for layer in range(2):
                zs.append(h[layer].attn.c_proj.input.detach().clone().mean(0, keepdim=True).save())
                ms.append(h[layer].mlp.output.detach().clone().mean(0, keepdim=True).save())
        with tiny_ioi.trace(PAIRS[0][0]):
            for layer in range(2):
                new = h[layer].attn.c_proj.input.clone()
                for head in range(4):
                    if f"head_out.{layer}.{head}" not in NODES:
                        new[:, :, head * 8 : (head + 1) * 8] = zs[layer][:, :, head * 8 : (head + 1) * 8]
                h[layer].attn.c_proj.input[:] = new
                if f"mlp_out.{layer}" not in NODES:
                    h[layer].mlp.output[:] = ms[layer]
            logits = tiny_ioi.lm_head.output.detach().clone().save()
    tok = tiny_ioi.tokenizer
    expected = float(
        logits[0, -1, tok.convert_tokens_to_ids("Mary")] - logits[0, -1, tok.convert_tokens_to_ids("John")]
    )
    assert abs(result.ablated[0] - expected) <= 1e-4
    assert hf is tiny_ioi._module


def test_batched_equals_one_row_per_forward(tiny_ioi, mary_john):
    a = minimality(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, ablation="resample")
    b = minimality(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, ablation="resample", batch_size=1)
    assert max(abs(x - y) for x, y in zip(a.ablated + a.empty + a.full, b.ablated + b.empty + b.full)) <= 1e-5
    assert max(abs(x - y) for xs, ys in zip(a.node_values, b.node_values) for x, y in zip(xs, ys)) <= 1e-5


def test_completeness_and_minimality_are_tied_to_faithfulness(tiny_ioi, mary_john):
    c = Circuit(nodes=NODES)
    rest = [f"head_out.{l}.{h}" for l in range(2) for h in range(4) if f"head_out.{l}.{h}" not in NODES] + ["mlp_out.1"]
    comp = completeness(tiny_ioi, c, PAIRS, metric=mary_john, ablation="resample")
    other = faithfulness(tiny_ioi, rest, PAIRS, metric=mary_john, ablation="resample")
    # removing C == keeping only the rest
    assert max(abs(x - (1 - y)) for x, y in zip(comp.values, other.values)) <= 1e-4
    mini = minimality(tiny_ioi, c, PAIRS, metric=mary_john, ablation="resample")
    whole = faithfulness(tiny_ioi, c, PAIRS, metric=mary_john, ablation="resample")
    for node, values in zip(mini.nodes, mini.node_values):
        without = faithfulness(tiny_ioi, [n for n in NODES if n != node], PAIRS, metric=mary_john, ablation="resample")
        assert max(abs(v - (w - wo)) for v, w, wo in zip(values, whole.values, without.values)) <= 1e-4, node


def test_edge_circuit_nodes_are_its_endpoints_and_attn_out_means_every_head(tiny_ioi):
    c = Circuit(edges=(("head_out.0.1", "k_in.1.2"), ("head_out.1.2", "logits"), ("embed", "mlp_in.0")))
    assert c.nodes == ("head_out.0.1", "head_out.1.2", "logits", "embed", "mlp_out.0")
    assert [s.label for s in c.components(tiny_ioi)] == ["head_out.0.1", "mlp_out.0", "head_out.1.2"]
    assert [s.label for s in Circuit(nodes=("attn_out.1",)).components(tiny_ioi)] == [
        f"head_out.1.{h}" for h in range(4)
    ]


def test_assert_faithful_names_the_weakest_pairs_and_the_nodes(tiny_ioi, mary_john):
    result = faithfulness(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, ablation="resample")
    worst = min(result.values)
    with pytest.raises(FindingFailed) as info:
        assert_faithful(result, at_least=worst + 10)
    text = str(info.value)
    assert text.startswith(f"claim: the circuit's mean faithfulness over 3 pairs is >= {worst + 10:g}")
    assert (
        "head_out.0.1, head_out.1.2, mlp_out.0" in text
        and f"{worst:.4g}: {PAIRS[result.values.index(worst)][0]!r}" in text
    )
    with pytest.raises(FindingFailed, match=r"Wilson 95% lower bound .* measured 0.\d+"):
        assert_faithful(result, at_least=worst - 1, min_rate=0.9)  # 3 / 3 pass, but 3 pairs bound the rate at 0.44
    assert_faithful(result, at_least=worst - 1, min_rate=0.4)
    assert_faithful(result, at_least=result.mean - 1e-9)


def test_assert_minimal_and_complete_name_the_failing_nodes(tiny_ioi, mary_john):
    mini = minimality(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, ablation="resample")
    weakest = min(mini.node_means(), key=mini.node_means().get)
    with pytest.raises(FindingFailed, match=rf"nodes: +{weakest} "):
        assert_minimal(mini, at_least=max(mini.node_means().values()) + 1)
    comp = completeness(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, ablation="resample")
    with pytest.raises(FindingFailed, match="claim: the circuit's mean completeness"):
        assert_complete(comp, at_least=comp.mean + 1)
    with pytest.raises(ArgumentError, match="expected the CircuitResult of minimality"):
        assert_minimal(comp)


def test_edge_attribution_is_the_derivative_of_path_patching():
    """Path patching a small fraction +-eps of the sender's change moves the metric by +-eps x the EAP score (central
    differences on every edge, in float64 weights; the metric itself comes back in float32, hence eps 3e-3)."""
    from pytest_nnsight.metrics import as_metric
    from pytest_nnsight.paths import cache_pair, run_edges

    hf, tok = tiny_gpt2(seed=3)
    model = wrap(hf.double(), tok)
    m = as_metric(model, logit_diff("Mary", "John"))
    clean, corrupt = PAIRS[0]
    approx = edge_attribution(model, clean, corrupt, metric=m)
    edges = all_edges(model)
    pc = cache_pair(model, clean, corrupt, m, [s for s, _ in edges], [r for _, r in edges])
    eps = 3e-3
    up = run_edges(model, pc, [(s, r, eps * pc.delta(s)) for s, r in edges], m, batch_size=128)
    down = run_edges(model, pc, [(s, r, -eps * pc.delta(s)) for s, r in edges], m, batch_size=128)
    gap = approx.clean - approx.corrupt
    derivative = [(u - d) / (2 * eps) / gap for u, d in zip(up, down)]
    estimate = [approx[s.label, r.label] for s, r in edges]
    assert max(abs(x - y) for x, y in zip(derivative, estimate)) <= 2e-3
    assert sum(abs(x) > 0.1 for x in estimate) >= 10  # not a comparison of zeros


def test_edge_attribution_ranks_edges_like_true_path_patching(tiny_ioi, mary_john):
    """Measured on this model and pair (all 110 edges): Spearman vs true path patching 0.876 for EAP, 0.906 for EAP-IG
    (4-64 steps); on the top 10 edges EAP-IG's rank correlation is 1.0 and its max error 0.088, EAP's 0.818 and 0.68
    (the linearization misses saturation: embed -> v_in.0.0 is 0.11 by EAP, 0.77 truly). Bounds with margin:"""
    from pytest_nnsight.circuits import check_edges

    clean, corrupt = PAIRS[0]
    true = path_sweep(tiny_ioi, clean, corrupt, metric=mary_john, check_batching=False)
    eap = edge_attribution(tiny_ioi, clean, corrupt, metric=mary_john)
    ig = edge_attribution(tiny_ioi, clean, corrupt, metric=mary_john, method="eap-ig", steps=8)
    t = [v for _, _, v in true.edges()]
    assert spearman([v for _, _, v in eap.edges()], t) >= 0.8
    assert spearman([v for _, _, v in ig.edges()], t) >= 0.85
    checked = check_edges(tiny_ioi, clean, corrupt, ig, metric=mary_john, top=10)
    assert checked.rank_correlation >= 0.9 and checked.max_error <= 0.2
    assert checked.max_error < check_edges(tiny_ioi, clean, corrupt, eap, metric=mary_john, top=10).max_error
    assert checked.true == tuple(true[s, r] for s, r in checked.edges)
    assert ig.kind == "edge attribution (eap-ig, 8 steps)" and len(ig.edges()) == len(all_edges(tiny_ioi))


def test_discover_keeps_the_top_edges_by_score(tiny_ioi, mary_john):
    top = discover(tiny_ioi, PAIRS, metric=mary_john, top_k=5)
    assert len(top.edges) == 5 and [abs(v) for v in top.scores] == sorted((abs(v) for v in top.scores), reverse=True)
    cut = abs(top.scores[-1])
    by_threshold = discover(tiny_ioi, PAIRS, metric=mary_john, threshold=cut)
    assert by_threshold.edges[:5] == top.edges and all(abs(v) >= cut for v in by_threshold.scores)


@pytest.mark.parametrize(
    "circuit,match",
    [
        (Circuit(nodes=("embed",)), r"holds no head or MLP: an empty circuit"),
        (
            Circuit(nodes=tuple(f"head_out.{l}.{h}" for l in range(2) for h in range(4)) + ("mlp_out.0", "mlp_out.1")),
            r"holds every head and MLP",
        ),
        (
            Circuit(nodes=("head_out.0.9",)),
            r"node 'head_out.0.9': .*head 9 is out of range.*nodes are embed, head_out.L.H",
        ),
        (Circuit(nodes=("neuron.3",)), r"node 'neuron.3': unknown sender"),
        (Circuit(edges=(("head_out.1.0", "k_in.0.2"),)), r"no edge head_out.1.0 -> k_in.0.2"),
        (Circuit(edges=(("head_out.0.0", "k_in.3.2"),)), r"receiver 'k_in.3.2': layer 3 is out of range"),
        ([], r"expected a Circuit, a non-empty list"),
    ],
)
def test_bad_circuits_are_refused_naming_the_value(tiny_ioi, mary_john, circuit, match):
    with pytest.raises(CircuitError, match=match):
        faithfulness(tiny_ioi, circuit, PAIRS, metric=mary_john)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ablation": "median"}, r"ablation 'median': expected 'mean', 'resample' or 'zero'"),
        ({"metric": None}, r"carries no answer: pass metric="),
    ],
)
def test_bad_arguments_are_refused(tiny_ioi, mary_john, kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        faithfulness(tiny_ioi, Circuit(nodes=NODES), PAIRS, **{"metric": mary_john, **kwargs})


def test_discover_needs_exactly_one_cut(tiny_ioi, mary_john):
    with pytest.raises(ArgumentError, match="give exactly one of them"):
        discover(tiny_ioi, PAIRS, metric=mary_john, top_k=3, threshold=0.1)
    with pytest.raises(ArgumentError, match="method 'acdc'"):
        discover(tiny_ioi, PAIRS, metric=mary_john, top_k=3, method="acdc")
    with pytest.raises(CircuitError, match=r"no edge has \|score\| >= 1000"):
        discover(tiny_ioi, PAIRS, metric=mary_john, threshold=1000)


def test_a_circuit_reads_and_prints(tiny_ioi):
    c = Circuit(edges=(("embed", "v_in.0.0"), ("head_out.0.0", "k_in.1.2")), scores=(0.2, -0.9))
    assert c.ranked()[0] == ("head_out.0.0", "k_in.1.2", -0.9)
    assert "1. head_out.0.0 -> k_in.1.2  -0.9000" in c.to_text()
    assert c.check(tiny_ioi) == c
    assert Circuit(nodes=("head_out.-1.-1",)).check(tiny_ioi).nodes == ("head_out.1.3",)
    with pytest.raises(CircuitError, match="2 scores for 1 edges"):
        Circuit(edges=(("embed", "logits"),), scores=(1.0, 2.0))
    assert math.isnan(Circuit(edges=(("embed", "logits"),)).ranked()[0][2])


REPORTED = """
import pytest
from pytest_nnsight.circuits import Circuit, assert_edges

CIRCUIT = Circuit(edges=[("embed", "v_in.0.0"), ("head_out.0.0", "k_in.1.2"), ("head_out.1.2", "logits")], scores=[1.1, 0.3, -0.2],
                  metric="logit_diff", method="eap-ig (5 steps)")

def test_claimed_edges():
    assert_edges(CIRCUIT, [("head_out.0.0", "k_in.1.2")])

def test_missing_edge():
    assert_edges(CIRCUIT, [("head_out.0.0", "k_in.1.2"), ("head_out.0.1", "k_in.1.2")])
"""


def test_the_report_draws_the_circuit_with_claimed_and_missing_edges(pytester):
    pytest.importorskip("matplotlib")
    pytester.makepyfile(test_reported=REPORTED)
    result = pytester.runpytest_inprocess("--nnsight-report", "out", "-p", "no:hypothesispytest")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*claim: the circuit holds the edges head_out.0.0 -> k_in.1.2, head_out.0.1 -> k_in.1.2",
            "*missing: *head_out.0.1 -> k_in.1.2",
            "*present: *head_out.0.0 -> k_in.1.2 (rank 2)",
        ]
    )
    out = pytester.path / "out"
    page = (out / "index.html").read_text()
    assert page.count("<table class='circuit'>") == 2
    assert "head_out.0.0 &rarr; k_in.1.2</td><td>+0.3000</td><td>claimed" in page and "claimed, missing" in page
    figures = sorted(p.name for p in (out / "figures").glob("*circuit*.png"))
    assert figures == ["test_claimed_edges-circuit0.png", "test_missing_edge-circuit0.png"]
    assert (out / "figures" / figures[0]).read_bytes()[:4] == b"\x89PNG"
    assert "| 2 | head_out.0.0 -> k_in.1.2 | +0.3000 | claimed |" in (out / "findings.md").read_text()


def test_circuit_drawing_places_nodes_by_layer():
    from pytest_nnsight.report_circuits import layout

    pos = layout(["embed", "head_out.0.0", "head_out.0.3", "mlp_out.0", "head_out.1.2", "mlp_out.1", "logits"])
    assert pos["embed"] == (1.5, 0.0) and pos["logits"] == (1.5, 5.0)
    assert pos["head_out.0.3"] == (3.0, 1.0) and pos["mlp_out.0"] == (1.15, 2.0) and pos["head_out.1.2"] == (2.0, 3.0)
    assert pos["mlp_out.1"] == (1.85, 4.0)  # MLPs alternate sides: mlp 0 -> logits does not run through mlp 1


def _complete_edges(model, nodes):
    kept = set(nodes) | {"embed", "logits"}
    return [(s.label, r.label) for s, r in all_edges(model) if s.label in kept and r.node in kept]


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_edge_level_with_every_edge_between_the_nodes_equals_node_level(tiny_ioi, mary_john, how):
    nodes = faithfulness(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, ablation=how)
    edges = faithfulness(
        tiny_ioi, Circuit(edges=_complete_edges(tiny_ioi, NODES)), PAIRS, metric=mary_john, ablation=how, level="edges"
    )
    assert max(abs(a - b) for a, b in zip(nodes.ablated, edges.ablated)) <= 1e-5
    assert edges.ablation == f"{how}, edges"


def test_edge_level_ablates_a_missing_edge_at_its_receiver_only(tiny_ioi, mary_john):
    """Drop head 0.1 -> k_in.1.2 and mlp_out.0 -> logits from the complete circuit: by hand, head 1.2's key input then
    reads the residual stream without head 0.1's contribution, the final norm without the MLP's (zero ablation), and
    nothing else changes. Three traces: the key needs layer 0's run, the logits need the run with the key written."""
    dropped = {("head_out.0.1", "k_in.1.2"), ("mlp_out.0", "logits")}
    circuit = Circuit(edges=[e for e in _complete_edges(tiny_ioi, NODES) if e not in dropped])
    result = faithfulness(tiny_ioi, circuit, PAIRS[:1], metric=mary_john, ablation="zero", level="edges")
    hf, h = tiny_ioi._module, tiny_ioi.transformer.h
    tok = tiny_ioi.tokenizer
    mary, john = tok.convert_tokens_to_ids("Mary"), tok.convert_tokens_to_ids("John")

    def ablate(layer):
        new = h[layer].attn.c_proj.input.clone()
        for head in range(4):
            if f"head_out.{layer}.{head}" not in NODES:
                new[:, :, head * 8 : (head + 1) * 8] = 0
        h[layer].attn.c_proj.input[:] = new
        if f"mlp_out.{layer}" not in NODES:
            h[layer].mlp.output[:] = 0

    with torch.inference_mode():
        with tiny_ioi.trace(PAIRS[0][0]):
            ablate(0)
            z0 = h[0].attn.c_proj.input.detach().clone().save()
            mlp0 = h[0].mlp.output.detach().clone().save()
            resid1 = h[1].ln_1.input.detach().clone().save()
        only = torch.zeros_like(z0)
        only[:, :, 8:16] = z0[:, :, 8:16]
        proj = hf.transformer.h[0].attn.c_proj
        contribution = proj(only) - proj(torch.zeros_like(only))
        key = hf.transformer.h[1].attn.c_attn(hf.transformer.h[1].ln_1(resid1 - contribution))[:, :, 32 + 16 : 32 + 24]
        with tiny_ioi.trace(PAIRS[0][0]):
            ablate(0)
            h[1].attn.c_attn.output[:, :, 32 + 16 : 32 + 24] = key
            ablate(1)
            final = tiny_ioi.transformer.ln_f.input.detach().clone().save()
        normed = hf.transformer.ln_f(final - mlp0)
        with tiny_ioi.trace(PAIRS[0][0]):
            ablate(0)
            h[1].attn.c_attn.output[:, :, 32 + 16 : 32 + 24] = key
            ablate(1)
            tiny_ioi.transformer.ln_f.output[:] = normed
            logits = tiny_ioi.lm_head.output.detach().clone().save()
    expected = float(logits[0, -1, mary] - logits[0, -1, john])
    assert abs(result.ablated[0] - expected) <= 1e-4
    node_level = faithfulness(tiny_ioi, Circuit(nodes=NODES), PAIRS[:1], metric=mary_john, ablation="zero")
    assert abs(node_level.ablated[0] - expected) > 1e-2  # the dropped edges made a difference


def test_edge_level_needs_edges(tiny_ioi, mary_john):
    with pytest.raises(CircuitError, match="level='edges' needs a circuit of edges"):
        faithfulness(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, level="edges")
    with pytest.raises(ArgumentError, match="level 'paths'"):
        faithfulness(tiny_ioi, Circuit(nodes=NODES), PAIRS, metric=mary_john, level="paths")
