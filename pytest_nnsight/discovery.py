"""Edge attribution patching (EAP) and circuit discovery, checked against true path patching.

EAP linearizes path patching: the effect of edge (sender s, receiver r) is approximated by
(s_source - s_target) . d metric / d resid_r, where resid_r is the residual stream as r alone reads it.
One forward and one backward give d metric / d (r's input) for every receiver (the q|k|v projection's output,
the MLP's input, the final norm's output); a small local backward through r's norm and projection turns it into
d metric / d resid_r. So every edge of a batch of pairs costs one forward and one backward. The integrated-gradients
variant (`method="eap-ig"`) averages the gradient over `steps` runs whose embeddings move from the target run to the
source run (midpoints), all in one batch. `check_edges` re-runs the top edges with true path patching and reports
the rank correlation and the largest error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .attribution import _differentiable
from .errors import ArgumentError, CircuitError, MetricError, check_positive_int
from .findings import record_circuit
from .graph import Circuit, circuit_of
from .metrics import Metric, as_metric, logit_diff
from .paths import (
    Bound,
    PathMap,
    Receiver,
    Sender,
    _parse_all,
    all_receivers,
    all_senders,
    bind,
    parse_receiver,
    parse_sender,
    path_sweep,
)
from .prompts import pair_positions, text_of
from .results import check_direction
from .sites import Site, execution_order, site_value
from .trace import _translate, normalized, run

METHODS = ("eap", "eap-ig")


def _row_metric(metrics: Sequence[Metric]) -> Metric:
    """One Metric over a batch whose row r is measured by metrics[r] (each distinct metric computed once).

    Metrics are told apart by identity, never by name: per-pair closures share one name but measure different things.
    """
    if len({id(m) for m in metrics}) == 1:
        return metrics[0]
    groups: dict[int, tuple[Metric, list[int]]] = {}
    for r, m in enumerate(metrics):
        groups.setdefault(id(m), (m, []))[1].append(r)

    def fn(out: Any, ref: Any, mask: Any = None) -> Any:
        values = None
        for m, rows in groups.values():
            v = m(out, None, mask).reshape(-1)
            idx = torch.tensor(rows, device=v.device)
            part = torch.zeros_like(v).index_copy(0, idx, v[idx])
            values = part if values is None else values + part
        return values

    return Metric("per-pair metric", fn, takes_mask=True, padding_safe=all(m.padding_safe for m in metrics))


def _write_site(bound: Bound, r: Receiver) -> Site:
    """The full tensor holding r's input (the whole q|k|v output for a head's q/k/v)."""
    site = bound.write_site(r)
    return Site(site.path, part=site.part)


@dataclass
class Attribution:
    """Raw EAP scores [pairs, edges] (approximate metric change), with each pair's source and target metric."""

    scores: torch.Tensor
    src: list[float]
    tgt: list[float]


def attribute(
    model: Any,
    pairs: Sequence[tuple[Any, Any]],
    metrics: Sequence[Metric],
    edges: Sequence[tuple[Sender, Receiver]],
    *,
    method: str = "eap",
    steps: int = 5,
    bound: Bound | None = None,
) -> Attribution:
    """EAP scores of `edges` for pairs of prompts of one token length: one cached forward, one forward and backward."""
    bound = bound or bind(model)
    senders = list(dict.fromkeys(s for s, _ in edges))
    receivers = list(dict.fromkeys(r for _, r in edges))
    n = len(pairs)
    texts = [text_of(p) for pair in pairs for p in pair]
    send_sites = list(dict.fromkeys(bound.sender_site(s) for s in senders))
    embed_site = Site(bound.lay.path("embed"))
    base, acts = run(
        model,
        texts,
        _row_metric([m for m in metrics for _ in (0, 1)]),
        save=list(dict.fromkeys(send_sites + [embed_site])),
    )
    width = acts[embed_site].shape[1]
    mask = torch.ones(width, dtype=torch.bool, device=acts[embed_site].device)
    with torch.inference_mode():
        deltas = {
            s: torch.stack(
                [
                    bound.delta(s, acts[bound.sender_site(s)][2 * i], acts[bound.sender_site(s)][2 * i + 1], mask)
                    for i in range(n)
                ]
            )
            for s in senders
        }

    k = steps if method == "eap-ig" else 1
    rows = [text_of(pair[1]) for pair in pairs for _ in range(k)]
    alphas = torch.tensor([(j + 0.5) / k for _ in range(n) for j in range(k)]) if method == "eap-ig" else None
    emb_src, emb_tgt = acts[embed_site][0::2], acts[embed_site][1::2]
    interp = None
    if alphas is not None:
        with torch.inference_mode(False):
            a = alphas.to(emb_src.device, emb_src.dtype)[:, None, None]
            src_rows, tgt_rows = emb_src.repeat_interleave(k, 0).clone(), emb_tgt.repeat_interleave(k, 0).clone()
            interp = tgt_rows + a * (src_rows - tgt_rows)
    write_sites = list(dict.fromkeys(_write_site(bound, r) for r in receivers))
    resid_sites = list(dict.fromkeys(bound.resid_site(r) for r in receivers))
    grads, resids = _gradients(
        model, rows, _row_metric([m for m in metrics for _ in range(k)]), write_sites, resid_sites, embed_site, interp
    )

    scores = torch.zeros(n, len(edges), dtype=torch.float64)
    for r in receivers:
        g_out = grads[_write_site(bound, r)]
        if r.kind in "qkv":
            d, h = bound.lay.d_model, bound.lay.n_heads
            start = "qkv".index(r.kind) * d + r.head * (d // h)
            g_out = g_out[..., start : start + d // h]
        with torch.inference_mode(False), torch.enable_grad():
            x = resids[bound.resid_site(r)].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad((bound.receive(r, x) * g_out).sum(), x)  # no parameter's .grad is touched
        g_resid = grad.detach().reshape(n, k, *x.shape[1:]).mean(1).double()
        for e, (s, rr) in enumerate(edges):
            if rr == r:
                scores[:, e] = (deltas[s].double() * g_resid).sum((-1, -2))
    return Attribution(scores, [float(v) for v in base[0::2]], [float(v) for v in base[1::2]])


def _gradients(
    model: Any,
    rows: Sequence[str],
    metric: Metric,
    write_sites: Sequence[Site],
    resid_sites: Sequence[Site],
    embed_site: Site,
    interp: torch.Tensor | None,
) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
    """One forward and backward: d metric / d (each write site), and the residuals the receivers' norms read, detached."""
    order = execution_order(
        model, set(write_sites) | set(resid_sites) | ({embed_site} if interp is not None else set())
    )
    saved: dict[Site, Any] = {}
    grads: list[Any] = []
    values: list[Any] = []
    try:
        with torch.inference_mode(False), torch.enable_grad(), _differentiable(model):
            with model.trace(list(rows)):
                for site in order:
                    value = site_value(model, site)
                    if site == embed_site and interp is not None:
                        value[:] = interp
                    if site in resid_sites:
                        saved[site] = value.detach().clone().save()
                    if site in write_sites:
                        values.append(value)
                out = metric(model.output, None)
                if not (isinstance(out, torch.Tensor) and out.requires_grad):
                    raise MetricError(
                        f"metric {metric.name} is not differentiable: edge attribution needs gradients; use logit_diff, "
                        "logprob or prob, or path_sweep() for this metric"
                    )
                with out.sum().backward(inputs=values):
                    for v in reversed(values):
                        grads.append(v.grad.detach().clone().save())
    except MetricError as exc:  # ours, raised inside the trace: drop nnsight's frames from what pytest shows
        raise exc.with_traceback(None)  # noqa: B904
    except (AttributeError, IndexError, ValueError, RuntimeError, TypeError, NotImplementedError) as exc:
        err = _translate(exc, model, order)
        # nnsight's own exception, for debugging; not chained, so tracebacks stay short (as trace.run)
        err.original = exc
        raise err from None
    writes = [s for s in order if s in write_sites]
    return dict(zip(writes, grads[::-1])), saved


def _edges(model: Any, senders: Any, receivers: Any) -> list[tuple[Sender, Receiver]]:
    S = _parse_all(model, senders, parse_sender, all_senders, "senders")
    R = _parse_all(model, receivers, parse_receiver, all_receivers, "receivers")
    edges = [(s, r) for s in S for r in R if s.time < r.time]
    if not edges:
        raise CircuitError(f"no edge among senders {[s.label for s in S]} and receivers {[r.label for r in R]}")
    return edges


def _check_method(method: str, steps: int) -> None:
    if method not in METHODS:
        raise ArgumentError(
            f"method {method!r}: expected 'eap' (one gradient at the target run) or 'eap-ig' (integrated gradients)"
        )
    check_positive_int("steps", steps, "a positive int (the integrated-gradients steps)")


def edge_attribution(
    model: Any,
    clean: Any,
    corrupt: Any,
    *,
    metric: Any,
    senders: Any = None,
    receivers: Any = None,
    method: str = "eap",
    steps: int = 5,
    direction: str = "clean->corrupt",
    min_gap: float = 1e-4,
) -> PathMap:
    """EAP scores of every sender x receiver edge for one pair, as a PathMap like `path_sweep` (kind 'edge attribution').

    >>> approx = edge_attribution(model, clean, corrupt, metric=logit_diff("t5", "t8"))   # doctest: +SKIP
    >>> check_edges(model, clean, corrupt, approx, metric=logit_diff("t5", "t8")).rank_correlation   # doctest: +SKIP
    """
    _check_method(method, steps)
    check_direction(direction)
    m = as_metric(model, metric)
    if m.needs_reference:
        raise MetricError(
            f"metric {m.name} compares with a reference run, which edge attribution does not make: use logit_diff, logprob or prob"
        )
    pair_positions(model, clean, corrupt, "last")
    S = _parse_all(model, senders, parse_sender, all_senders, "senders")
    R = _parse_all(model, receivers, parse_receiver, all_receivers, "receivers")
    edges = [(s, r) for s in S for r in R if s.time < r.time]
    if not edges:
        raise CircuitError(f"no edge among senders {[s.label for s in S]} and receivers {[r.label for r in R]}")
    source, target = (clean, corrupt) if direction == "clean->corrupt" else (corrupt, clean)
    att = attribute(model, [(source, target)], [m], edges, method=method, steps=steps)
    src, tgt = att.src[0], att.tgt[0]
    what = f"edge attribution over {len(edges)} edges"
    normalized(tgt, tgt, src, min_gap=min_gap, what=what)
    index = {(s, r): e for e, (s, r) in enumerate(edges)}
    grid = [[math.nan] * len(R) for _ in S]
    raw = [[math.nan] * len(R) for _ in S]
    for i, s in enumerate(S):
        for j, r in enumerate(R):
            if (s, r) in index:
                v = float(att.scores[0, index[(s, r)]])
                raw[i][j], grid[i][j] = tgt + v, v / (src - tgt)
    kind = f"edge attribution ({method}{f', {steps} steps' if method == 'eap-ig' else ''})"
    return PathMap.from_grids(grid, raw, S, R, m, clean, corrupt, src, tgt, direction, kind=kind)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 2 values or a constant side."""

    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    if len(a) < 2:
        return math.nan
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


@dataclass(frozen=True)
class EdgeCheck:
    """EAP estimates of the top edges next to true path patching: Spearman rank correlation and the largest error."""

    edges: tuple[tuple[str, str], ...]
    approx: tuple[float, ...]
    true: tuple[float, ...]
    rank_correlation: float
    max_error: float

    def to_text(self) -> str:
        rows = [f"{s} -> {r}" for s, r in self.edges]
        width = max([len(x) for x in rows] + [4])
        lines = [f"{'edge':<{width}}  {'approx':>8}  {'true':>8}  {'|error|':>8}"]
        lines += [
            f"{e:<{width}}  {a:8.4f}  {t:8.4f}  {abs(a - t):8.4f}" for e, a, t in zip(rows, self.approx, self.true)
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"EdgeCheck({len(self.edges)} edges: rank correlation {self.rank_correlation:.3f}, max |approx - true| {self.max_error:.3g})"


def check_edges(
    model: Any,
    clean: Any,
    corrupt: Any,
    approx: PathMap,
    *,
    metric: Any,
    top: int = 10,
    direction: str = "clean->corrupt",
) -> EdgeCheck:
    """Path-patch the `top` edges of largest |approx| for real (one batched sweep) and compare ranks and values."""
    if not isinstance(approx, PathMap):
        raise ArgumentError(f"approx is a {type(approx).__name__}: expected the PathMap of edge_attribution")
    if not isinstance(top, int) or isinstance(top, bool) or top < 2:
        raise ArgumentError(f"top {top!r}: expected an int >= 2 (a rank correlation needs two edges)")
    chosen = approx.top(top)
    true_map = path_sweep(
        model,
        clean,
        corrupt,
        metric=metric,
        senders=list(dict.fromkeys(s for s, _, _ in chosen)),
        receivers=list(dict.fromkeys(r for _, r, _ in chosen)),
        direction=direction,
    )
    true = [true_map[s, r] for s, r, _ in chosen]
    est = [v for _, _, v in chosen]
    return EdgeCheck(
        tuple((s, r) for s, r, _ in chosen),
        tuple(est),
        tuple(true),
        spearman(est, true),
        max(abs(a - t) for a, t in zip(est, true)),
    )


def _pair_list(pairs: Any, metric: Any, model: Any) -> tuple[list[tuple[Any, Any]], list[Metric]]:
    from .strategies import CounterfactualPair

    if getattr(pairs, "space", None) is not None:
        raise ArgumentError(
            "pairs is a strategy: draw a list first, e.g. counterfactual_pairs(...).space.sample(n, seed)"
        )
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ArgumentError(
            f"pairs={pairs!r:.80}: expected a non-empty list of CounterfactualPair or (clean, corrupt) tuples"
        )
    out, metrics = [], []
    for p in pairs:
        if isinstance(p, CounterfactualPair):
            out.append((p.clean, p.corrupt))
            metrics.append(as_metric(model, metric if metric is not None else logit_diff(p.answer, p.distractor)))
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            if metric is None:
                raise ArgumentError(f"pair {p!r:.80} carries no answer: pass metric= (or CounterfactualPair objects)")
            out.append((p[0], p[1]))
            metrics.append(as_metric(model, metric))
        else:
            raise ArgumentError(f"pair {p!r:.80}: expected a CounterfactualPair or a (clean, corrupt) tuple")
    return out, metrics


def edge_scores(
    model: Any,
    pairs: Any,
    *,
    metric: Any = None,
    senders: Any = None,
    receivers: Any = None,
    method: str = "eap",
    steps: int = 5,
    batch_size: int = 16,
    min_gap: float = 1e-4,
) -> tuple[list[tuple[Sender, Receiver]], list[float]]:
    """Mean normalized EAP score per edge over `pairs` (pairs whose clean and corrupt barely differ are left out)."""
    _check_method(method, steps)
    plist, metrics = _pair_list(pairs, metric, model)
    edges = _edges(model, senders, receivers)
    bound = bind(model)
    by_len: dict[int, list[int]] = {}
    for i, (c, x) in enumerate(plist):
        by_len.setdefault(len(pair_positions(model, c, x, "last")[0]), []).append(i)
    total = torch.zeros(len(edges), dtype=torch.float64)
    used = 0
    for idx in by_len.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            att = attribute(
                model,
                [plist[i] for i in chunk],
                [metrics[i] for i in chunk],
                edges,
                method=method,
                steps=steps,
                bound=bound,
            )
            for row in range(len(chunk)):
                gap = att.src[row] - att.tgt[row]
                if abs(gap) > min_gap and math.isfinite(gap):
                    total += att.scores[row] / gap
                    used += 1
    if not used:
        raise CircuitError(
            f"no pair among {len(plist)} changes the metric (clean and corrupt differ by <= {min_gap:g} in every pair)"
        )
    return edges, (total / used).tolist()


def discover(
    model: Any,
    pairs: Any,
    *,
    metric: Any = None,
    top_k: int | None = None,
    threshold: float | None = None,
    senders: Any = None,
    receivers: Any = None,
    method: str = "eap",
    steps: int = 5,
    batch_size: int = 16,
) -> Circuit:
    """The circuit of the `top_k` edges of largest |mean EAP score| over `pairs` (or every edge with |score| >= `threshold`).

    Scores are normalized per pair like path_patch's effect ((approx - corrupt) / (clean - corrupt)), then averaged.
    `pairs`: CounterfactualPair objects (metric default logit_diff(answer, distractor)) or (clean, corrupt) with `metric=`.

    >>> circuit = discover(model, pairs, top_k=8)      # doctest: +SKIP
    >>> circuit.ranked()[:2]                           # doctest: +SKIP
    """
    if (top_k is None) == (threshold is None):
        raise ArgumentError(f"top_k={top_k!r}, threshold={threshold!r}: give exactly one of them")
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0
    ):
        raise ArgumentError(f"threshold {threshold!r}: expected a number >= 0 (compared with |score|)")
    edges, scores = edge_scores(
        model,
        pairs,
        metric=metric,
        senders=senders,
        receivers=receivers,
        method=method,
        steps=steps,
        batch_size=batch_size,
    )
    ranked = sorted(zip(edges, scores), key=lambda e: -abs(e[1]))
    kept = ranked[:top_k] if top_k is not None else [e for e in ranked if abs(e[1]) >= threshold]
    if not kept:
        raise CircuitError(
            f"no edge has |score| >= {threshold}: the largest is {abs(ranked[0][1]):.4g} ({ranked[0][0][0].label} -> {ranked[0][0][1].label})"
        )
    m = metric if metric is not None else "logit_diff(answer, distractor)"
    circuit = circuit_of(
        ((s.label, r.label, v) for (s, r), v in kept),
        metric=str(m),
        method=method + (f" ({steps} steps)" if method == "eap-ig" else ""),
    )
    record_circuit(circuit)  # for the findings report's drawing (a no-op outside a test)
    return circuit
