"""Circuit snapshots: one edge per line with its score; the edge set exact unless a rank tolerance is given, scores
within tolerance; a changed circuit fails naming the edges added, dropped and re-ranked. Plugin runs use pytester."""

import json

import pytest

from pytest_nnsight.circuits import Circuit
from pytest_nnsight.snapshots.compare import Tolerance, compare_findings, explain
from pytest_nnsight.snapshots.encode import dumps, to_value

EDGES = (("embed", "v_in.0.0"), ("head_out.0.0", "k_in.1.3"), ("head_out.0.0", "k_in.1.1"), ("head_out.1.2", "logits"))
SCORES = (1.16, 0.28, 0.25, 0.16)
TOL = Tolerance(1e-3, 0.0)


def rec(edges=EDGES, scores=SCORES, **kw):
    return to_value(Circuit(edges, scores, metric="logit_diff", method="eap-ig", **kw))


def test_a_circuit_is_stored_one_ranked_edge_per_line():
    text = dumps({"finding": rec(scores=(0.16, 0.28, 0.25, 1.16))})
    assert '["head_out.1.2", "logits", 1.16]' in text.splitlines()[7]  # ranked by |score|: the largest first
    assert json.loads(text)["finding"]["@type"] == "Circuit"


def test_same_circuit_within_tolerance_matches():
    assert compare_findings(rec(), rec(scores=(1.1605, 0.28, 0.25, 0.16)), TOL).ok


def test_a_moved_score_is_a_moved_cell_named_by_its_edge():
    cmp = compare_findings(rec(), rec(scores=(1.16, 0.28, 0.25, 0.19)), TOL)
    assert not cmp.ok and not cmp.structural
    assert any("edges.head_out.1.2 -> logits  0.16 -> 0.19" in line for line in explain(cmp))


def test_added_and_dropped_edges_fail_with_their_ranks():
    new = (EDGES[0], EDGES[1], ("mlp_out.1", "logits"), EDGES[3])
    cmp = compare_findings(rec(), rec(edges=new, scores=(1.16, 0.28, 0.255, 0.16)), TOL)
    assert not cmp.ok
    text = "\n".join(explain(cmp))
    assert (
        "the circuit changed (the edge set must match exactly): edges added: mlp_out.1 -> logits (rank 3); "
        "edges dropped: head_out.0.0 -> k_in.1.1 (rank 3)" in text
    )


def test_rank_tolerance_accepts_changes_near_the_cut_and_small_rerankings_only():
    near = (EDGES[0], EDGES[1], EDGES[2], ("mlp_out.1", "logits"))  # the last edge swapped for another
    assert not compare_findings(rec(), rec(edges=near), TOL).ok
    cmp = compare_findings(rec(), rec(edges=near), TOL, rank_tolerance=1)
    assert cmp.ok and "1 edge(s) added and 1 dropped near the cut" in "\n".join(explain(cmp))
    far = (("mlp_out.1", "logits"), EDGES[1], EDGES[2], EDGES[3])  # the top edge replaced
    assert "only edges within 1 ranks of the cut" in "\n".join(
        explain(compare_findings(rec(), rec(edges=far), TOL, rank_tolerance=1))
    )
    old, swapped = rec(), rec(scores=(1.16, 0.25, 0.28, 0.16))  # stored ranked by |score|: k_in.1.1 now before k_in.1.3
    ok = compare_findings(old, swapped, Tolerance(0.1, 0), rank_tolerance=1)
    assert ok.ok and "edges re-ranked: head_out.0.0 -> k_in.1.3 2 -> 3, head_out.0.0 -> k_in.1.1 3 -> 2" in "\n".join(
        explain(ok)
    )
    strict = compare_findings(old, swapped, Tolerance(0.1, 0), rank_tolerance=0)
    assert "edges re-ranked beyond rank_tolerance 0" in "\n".join(explain(strict))


def test_node_circuits_compare_their_nodes():
    a, b = (
        to_value(Circuit(nodes=("head_out.0.0", "head_out.1.2"))),
        to_value(Circuit(nodes=("head_out.0.0", "head_out.1.3"))),
    )
    assert compare_findings(a, a, TOL).ok
    assert "nodes added ['head_out.1.3'], dropped ['head_out.1.2']" in "\n".join(explain(compare_findings(a, b, TOL)))


TEST = """
from pytest_nnsight.circuits import Circuit

def test_circuit(finding_snapshot):
    edges = [("embed", "v_in.0.0"), ("head_out.0.0", "k_in.1.3"), ("head_out.0.0", "k_in.1.1"), ("head_out.1.2", "logits")]
    scores = [1.16, 0.28, 0.25, float(__import__("os").environ.get("LAST", "0.16"))]
    assert Circuit(edges, scores, metric="m", method="eap") == finding_snapshot(rank_tolerance=RANK)
"""


@pytest.mark.parametrize("rank", [None, 1])
def test_circuit_snapshot_lifecycle_in_pytest(pytester, monkeypatch, rank):
    pytester.makepyfile(test_circ=TEST.replace("RANK", str(rank)))
    pytester.runpytest("-p", "no:hypothesispytest", "--snapshot-update").assert_outcomes(passed=1)
    path = pytester.path / "__snapshots__" / "test_circ" / "test_circuit.json"
    pytester.runpytest("-p", "no:hypothesispytest").assert_outcomes(passed=1)
    stored = json.loads(path.read_text())
    stored["finding"]["edges"][3] = ["mlp_out.1", "logits", 0.16]  # the recorded circuit had another last edge
    path.write_text(dumps(stored))
    result = pytester.runpytest("-p", "no:hypothesispytest")
    if rank is None:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*the circuit changed (the edge set must match exactly): edges added: head_out.1.2 -> logits (rank 4);"
                " edges dropped: mlp_out.1 -> logits (rank 4)*"
            ]
        )
    else:
        result.assert_outcomes(passed=1)
    path.unlink()  # record afresh (with a rank tolerance the edited file still matched, so an update keeps it)
    pytester.runpytest("-p", "no:hypothesispytest", "--snapshot-update").assert_outcomes(passed=1)
    monkeypatch.setenv("LAST", "0.3")  # now the last edge moves up two ranks and its score by 0.14
    result = pytester.runpytest("-p", "no:hypothesispytest")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*edges.head_out.1.2 -> logits  0.16 -> 0.3*"])
    result.stdout.fnmatch_lines(
        [
            "*edges re-ranked: head_out.0.0 -> k_in.1.3 2 -> 3, head_out.0.0 -> k_in.1.1 3 -> 4, head_out.1.2 -> logits 4 -> 2*"
        ]
        if rank is None
        else ["*edges re-ranked beyond rank_tolerance 1: *head_out.1.2 -> logits 4 -> 2*"]
    )
