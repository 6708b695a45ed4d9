"""Circuit benchmarks for `make bench` (issue 18): edge attribution vs path patching every edge, batched path sweep vs
one trace per edge. Same model, same pairs, variants interleaved (run.interleaved), medians."""

from __future__ import annotations

from typing import Any, Callable

from pytest_nnsight.circuits import all_edges, edge_scores, path_sweep, spearman
from pytest_nnsight.metrics import as_metric, logit_diff
from pytest_nnsight.models import ModelCache
from pytest_nnsight.paths import cache_pair, run_edges
from pytest_nnsight.settings import Settings


def _pairs(n: int) -> list[Any]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from test_induction_circuit import recall_pairs  # the example's seeded key-swap pairs

    return recall_pairs(n, "key", seed=1)


def _one_trace_per_edge(model: Any, pair: Any, edges: list) -> list[float]:
    """Path patching done edge by edge: one cached run of the pair, then one trace per edge."""
    m = as_metric(model, logit_diff(pair.answer, pair.distractor))
    pc = cache_pair(
        model,
        pair.clean,
        pair.corrupt,
        m,
        list(dict.fromkeys(s for s, _ in edges)),
        list(dict.fromkeys(r for _, r in edges)),
    )
    out = []
    for s, r in edges:
        out += run_edges(model, pc, [(s, r, pc.delta(s))], m, batch_size=1)
    return [(v - pc.tgt) / (pc.src - pc.tgt) for v in out]


def bench_eap_speedup(device: str, reps: int, interleaved: Callable[..., dict[str, float]]) -> list[dict[str, Any]]:
    """Edge attribution (one forward + backward per batch of pairs) vs path patching each of the 110 edges one trace at a time."""
    model = ModelCache(Settings(device=device)).get("bundled:induction")
    pairs = _pairs(4)
    edges = all_edges(model)

    def eap() -> Any:
        return edge_scores(model, pairs, method="eap")

    def per_edge() -> list[list[float]]:
        return [_one_trace_per_edge(model, p, edges) for p in pairs]

    _, approx = eap()
    true = [sum(col) / len(col) for col in zip(*per_edge())]
    rho = spearman(approx, true)
    t = interleaved({"per_edge": per_edge, "eap": eap}, max(3, reps // 5), warmup=1)
    speedup = t["per_edge"] / t["eap"]
    return [
        {
            "name": "eap_speedup",
            "value": round(speedup, 2),
            "unit": "x",
            "target": ">= 20",
            "passed": speedup >= 20,
            "detail": f"{len(edges)} edges x {len(pairs)} pairs on bundled:induction ({device}): path patching one trace per edge "
            f"{t['per_edge'] * 1e3:.0f} ms, edge attribution {t['eap'] * 1e3:.0f} ms; Spearman(EAP, true) over all edges {rho:.3f}",
        }
    ]


def bench_path_sweep_speedup(
    device: str, reps: int, interleaved: Callable[..., dict[str, float]]
) -> list[dict[str, Any]]:
    """path_sweep over every sender x receiver edge (batched, 32 rows a forward) vs one trace per edge, same numbers."""
    model = ModelCache(Settings(device=device)).get("bundled:induction")
    pair = _pairs(1)[0]
    metric = logit_diff(pair.answer, pair.distractor)
    edges = all_edges(model)

    def batched() -> Any:
        return path_sweep(model, pair.clean, pair.corrupt, metric=metric, check_batching=False)

    def single() -> list[float]:
        return _one_trace_per_edge(model, pair, edges)

    diff = max(abs(a[2] - b) for a, b in zip(batched().edges(), single()))
    t = interleaved({"single": single, "batched": batched}, max(3, reps // 3), warmup=1)
    speedup = t["single"] / t["batched"]
    return [
        {
            "name": "path_sweep_speedup",
            "value": round(speedup, 2),
            "unit": "x",
            "target": ">= 5",
            "passed": speedup >= 5 and diff <= 1e-5,
            "detail": f"{len(edges)} edges of one pair on bundled:induction ({device}): one trace per edge {t['single'] * 1e3:.0f} ms, "
            f"path_sweep {t['batched'] * 1e3:.0f} ms; max |diff| of effects {diff:.2e}",
        }
    ]
