"""Is a circuit the mechanism? Faithfulness, completeness and minimality over a population of pairs, and their assertions.

Every head and MLP outside the circuit is ablated (the embeddings and the logits are always kept); values are
measured on each pair's clean prompt, relative to the full model (`full`) and to the model with every head and
MLP ablated (`empty`):

- faithfulness = (m(circuit) - m(empty)) / (m(full) - m(empty)): the share of the metric the circuit alone keeps;
- completeness = (m(full) - m(full without the circuit)) / (m(full) - m(empty)): the share removed by ablating it;
- minimality, per node v: (m(circuit) - m(circuit without v)) / (m(full) - m(empty)): what v adds.

Ablation: "mean" (the node's mean over the corrupt prompts, per position when they share one token length,
else over positions too), "resample" (the node's value on the pair's own corrupt prompt) or "zero".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .assertions import _fail
from .discovery import _pair_list, _row_metric
from .edge_ablation import edge_level_metric
from .errors import ArgumentError, CircuitError
from .findings import record_check, record_circuit
from .graph import Circuit, ablatable, as_circuit
from .metrics import Metric
from .paths import Sender, bind
from .prompts import pair_positions, text_of
from .sites import Site
from .stats import wilson_interval
from .trace import Edit, run

ABLATIONS = ("mean", "resample", "zero")


@dataclass(frozen=True)
class CircuitResult:
    """One circuit claim measured over pairs: a value per pair (and per node for minimality), with the runs it came from."""

    claim: str  # faithfulness | completeness | minimality
    circuit: Circuit
    ablation: str
    metric: str
    prompts: tuple[str, ...]  # each pair's clean prompt
    values: tuple[float, ...]  # per pair (minimality: the weakest node's contribution in that pair)
    full: tuple[float, ...]
    empty: tuple[float, ...]
    ablated: tuple[float, ...]  # m(circuit) for faithfulness and minimality, m(full without circuit) for completeness
    nodes: tuple[str, ...] = ()  # minimality: the circuit's ablatable nodes
    node_values: tuple[tuple[float, ...], ...] = ()  # minimality: [node][pair]

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def node_means(self) -> dict[str, float]:
        """Minimality: each node's mean marginal contribution."""
        return {n: _mean(vs) for n, vs in zip(self.nodes, self.node_values)}

    def passed(self, at_least: float) -> int:
        return sum(1 for v in self.values if math.isfinite(v) and v >= at_least)

    def weakest(self, k: int = 5) -> list[tuple[float, str]]:
        order = sorted(range(len(self.values)), key=lambda i: (math.isfinite(self.values[i]), self.values[i]))
        return [(self.values[i], self.prompts[i]) for i in order[:k]]

    def __repr__(self) -> str:
        return (
            f"CircuitResult({self.claim} of {len(self.circuit.nodes)}-node circuit, {self.ablation} ablation: mean {self.mean:.3f} "
            f"over {len(self.values)} pairs, min {min(self.values):.3f})"
        )


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _site(bound: Any, s: Sender) -> Site:
    if s.kind == "embed":
        return Site(bound.lay.path("embed"))
    if s.kind == "head":
        return Site(bound.lay.in_layer(s.layer, "head_proj"), part="input", head=s.head, n_heads=bound.lay.n_heads)
    return Site(bound.lay.in_layer(s.layer, "mlp"))


def _prepare(
    model: Any, circuit: Any, pairs: Any, metric: Any, ablation: str
) -> tuple[Any, Circuit, list[Sender], list[Sender], list, list]:
    if ablation not in ABLATIONS:
        raise ArgumentError(f"ablation {ablation!r}: expected 'mean', 'resample' or 'zero'")
    bound = bind(model)
    c = as_circuit(circuit).check(model)
    everything = ablatable(model)
    inside = c.components(model)
    if not inside:
        raise CircuitError(
            f"circuit {c!r} holds no head or MLP: an empty circuit keeps nothing to measure (the embeddings and logits "
            "are always kept); name heads (head_out.L.H) or MLPs (mlp_out.L)"
        )
    if len(inside) == len(everything):
        raise CircuitError(
            f"circuit {c!r} holds every head and MLP of the model: nothing outside it to ablate, so the claim would hold "
            "by construction; leave out the components the mechanism does not need"
        )
    plist, metrics = _pair_list(pairs, metric, model)
    for clean, corrupt in plist:
        pair_positions(model, clean, corrupt, "last")
    return bound, c, everything, inside, plist, metrics


def _values(model: Any, bound: Any, everything: list[Sender], plist: list, ablation: str) -> tuple[dict, list]:
    """Ablation values per node: [pair] -> {node label: tensor [T, width]}; from one run over the corrupt prompts."""
    sites = {s.label: _site(bound, s) for s in everything}
    corrupt = [text_of(x) for _, x in plist]
    lengths = [len(pair_positions(model, c, x, "last")[0]) for c, x in plist]
    none = Metric("none", lambda out, ref: torch.zeros(len(corrupt)))
    _, acts = run(model, corrupt, none, save=list(dict.fromkeys(sites.values())))
    longest = max(lengths)
    per_pair: list[dict[str, torch.Tensor]] = []
    same = len(set(lengths)) == 1
    for i, n in enumerate(lengths):
        pad = longest - n
        vals = {}
        for label, site in sites.items():
            a = acts[site]  # a head's slice already (site_value selects it)
            if ablation == "zero":
                vals[label] = torch.zeros_like(a[i, pad:])
            elif ablation == "resample":
                vals[label] = a[i, pad:]
            elif same:
                vals[label] = a.mean(0)
            else:
                rows = torch.cat([a[j, longest - lengths[j] :] for j in range(len(lengths))])
                vals[label] = rows.mean(0).expand(n, -1)
        per_pair.append(vals)
    return sites, per_pair


def _measure(
    model: Any, plist: list, metrics: list, sites: dict, values: list, variants: list[set[str]], batch_size: int
) -> list[list[float]]:
    """metric[variant][pair]: each pair's clean prompt with the nodes of each variant ablated; one row per (pair, variant)."""
    rows = [(i, v) for i in range(len(plist)) for v in range(len(variants))]
    out = [[math.nan] * len(plist) for _ in variants]
    by_len: dict[int, list[tuple[int, int]]] = {}
    for i, v in rows:
        by_len.setdefault(len(values[i][next(iter(values[i]))]), []).append((i, v))
    for chunk_rows in by_len.values():
        for start in range(0, len(chunk_rows), batch_size):
            chunk = chunk_rows[start : start + batch_size]
            edits = []
            for label, site in sites.items():
                picked = [(r, i) for r, (i, v) in enumerate(chunk) if label in variants[v]]
                if picked:
                    T = values[picked[0][1]][label].shape[0]
                    edits.append(
                        Edit(
                            site,
                            tuple(r for r, _ in picked for _ in range(T)),
                            tuple(range(T)) * len(picked),
                            torch.cat([values[i][label] for _, i in picked]),
                        )
                    )
            res, _ = run(
                model,
                [text_of(plist[i][0]) for i, _ in chunk],
                _row_metric([metrics[i] for i, _ in chunk]),
                edits=edits,
            )
            for (i, v), value in zip(chunk, res.tolist()):
                out[v][i] = value
    return out


def _share(a: float, b: float, full: float, empty: float) -> float:
    gap = full - empty
    return (a - b) / gap if abs(gap) > 1e-6 and math.isfinite(gap) else math.nan


def faithfulness(
    model: Any,
    circuit: Any,
    pairs: Any,
    *,
    metric: Any = None,
    ablation: str = "mean",
    level: str = "nodes",
    batch_size: int = 32,
) -> CircuitResult:
    """The share of the full model's metric the circuit keeps with every other head and MLP ablated, per pair.

    `level="edges"` (edge circuits): also every edge between kept components that the circuit does not hold is ablated
    at its receiver (the embeddings included), so the circuit's components see only the senders it connects to them.

    >>> result = faithfulness(model, circuit, pairs, ablation="mean")     # doctest: +SKIP
    >>> assert_faithful(result, at_least=0.9, min_rate=0.9)               # doctest: +SKIP
    """
    if level not in ("nodes", "edges"):
        raise ArgumentError(
            f"level {level!r}: expected 'nodes' (ablate the heads and MLPs outside the circuit) or 'edges' (also the "
            "edges outside it)"
        )
    bound, c, everything, inside, plist, metrics = _prepare(model, circuit, pairs, metric, ablation)
    if level == "edges" and not c.edges:
        raise CircuitError(f"level='edges' needs a circuit of edges; {c!r} names nodes only: use level='nodes'")
    sites, values = _values(model, bound, everything, plist, ablation)
    keep = {s.label for s in inside}
    outside = {s.label for s in everything} - keep
    if level == "nodes":
        full, empty, kept = _measure(model, plist, metrics, sites, values, [set(), set(sites), outside], batch_size)
    else:
        full, empty = _measure(model, plist, metrics, sites, values, [set(), set(sites)], batch_size)
        _, embed_values = _values(model, bound, [Sender("embed", "embed", -1)], plist, ablation)
        kept = edge_level_metric(
            model,
            bound,
            c,
            plist,
            lambda rows: _row_metric([metrics[i] for i in rows]),
            sites,
            values,
            embed_values,
            outside,
            inside,
            batch_size,
        )
    shares = [_share(k, e, f, e) for k, f, e in zip(kept, full, empty)]
    return CircuitResult(
        "faithfulness",
        c,
        ablation if level == "nodes" else f"{ablation}, edges",
        _metric_name(metrics),
        tuple(text_of(p[0]) for p in plist),
        tuple(shares),
        tuple(full),
        tuple(empty),
        tuple(kept),
    )


def _metric_name(metrics: list) -> str:
    return metrics[0].name if len({m.name for m in metrics}) == 1 else "per-pair metric"


def completeness(
    model: Any, circuit: Any, pairs: Any, *, metric: Any = None, ablation: str = "mean", batch_size: int = 32
) -> CircuitResult:
    """The share of the full model's metric that ablating the circuit's heads and MLPs removes, per pair."""
    bound, c, everything, inside, plist, metrics = _prepare(model, circuit, pairs, metric, ablation)
    sites, values = _values(model, bound, everything, plist, ablation)
    full, empty, without = _measure(
        model, plist, metrics, sites, values, [set(), set(sites), {s.label for s in inside}], batch_size
    )
    shares = [_share(f, w, f, e) for w, f, e in zip(without, full, empty)]
    return CircuitResult(
        "completeness",
        c,
        ablation,
        metrics[0].name if len({m.name for m in metrics}) == 1 else "per-pair metric",
        tuple(text_of(p[0]) for p in plist),
        tuple(shares),
        tuple(full),
        tuple(empty),
        tuple(without),
    )


def minimality(
    model: Any, circuit: Any, pairs: Any, *, metric: Any = None, ablation: str = "mean", batch_size: int = 32
) -> CircuitResult:
    """Each node's marginal contribution: the circuit's metric minus the circuit's without that node, as a share, per pair."""
    bound, c, everything, inside, plist, metrics = _prepare(model, circuit, pairs, metric, ablation)
    sites, values = _values(model, bound, everything, plist, ablation)
    outside = {s.label for s in everything} - {s.label for s in inside}
    variants = [set(), set(sites), outside] + [outside | {s.label} for s in inside]
    full, empty, kept, *drops = _measure(model, plist, metrics, sites, values, variants, batch_size)
    node_values = tuple(tuple(_share(k, d, f, e) for k, d, f, e in zip(kept, drop, full, empty)) for drop in drops)
    per_pair = tuple(min((nv[i] for nv in node_values), default=math.nan) for i in range(len(plist)))
    return CircuitResult(
        "minimality",
        c,
        ablation,
        metrics[0].name if len({m.name for m in metrics}) == 1 else "per-pair metric",
        tuple(text_of(p[0]) for p in plist),
        per_pair,
        tuple(full),
        tuple(empty),
        tuple(kept),
        tuple(s.label for s in inside),
        node_values,
    )


# -- assertions ------------------------------------------------------------------------------------------


def _check_args(result: Any, claim: str, at_least: Any, min_rate: Any, on: str) -> None:
    if not isinstance(result, CircuitResult) or result.claim != claim:
        raise ArgumentError(
            f"result is {getattr(result, 'claim', type(result).__name__)!r}: expected the CircuitResult of {claim}(...)"
        )
    if isinstance(at_least, bool) or not isinstance(at_least, (int, float)) or not math.isfinite(at_least):
        raise ArgumentError(f"at_least={at_least!r}: expected a finite number")
    if min_rate is not None and not (isinstance(min_rate, (int, float)) and 0 <= min_rate <= 1):
        raise ArgumentError(f"min_rate={min_rate!r}: expected a rate between 0 and 1, or None to claim the mean")
    if on not in ("lower_bound", "rate"):
        raise ArgumentError(f"on={on!r}: expected 'lower_bound' (Wilson 95%) or 'rate'")


def _population_claim(
    result: CircuitResult, what: str, at_least: float, min_rate: float | None, on: str, show: int, hint: str
) -> None:
    __tracebackhide__ = True
    n = len(result.values)
    passed = result.passed(at_least)
    low = wilson_interval(passed, n)[0]
    if min_rate is None:
        measured, ok = result.mean, math.isfinite(result.mean) and result.mean >= at_least
        expected = f"mean {what} >= {at_least:g}, measured {result.mean:.4g}"
        claim = f"claim: the circuit's mean {what} over {n} pairs is >= {at_least:g}"
    else:
        measured = low if on == "lower_bound" else passed / n
        ok = measured >= min_rate
        kind = "Wilson 95% lower bound of the pass rate" if on == "lower_bound" else "pass rate"
        expected = f"{kind} >= {min_rate:g}, measured {measured:.3f}"
        claim = f"claim: {what} >= {at_least:g} in at least {min_rate:.0%} of {n} pairs ({kind})"
    record_check(
        f"{what} of the circuit ({result.ablation} ablation)",
        measured,
        ">=",
        min_rate if min_rate is not None else at_least,
        site=", ".join(result.circuit.nodes[:8]),
    )
    if ok:
        return
    worst = "".join(f"\n    {v:.4g}: {p!r}" for v, p in result.weakest(show))
    lines = [
        ("circuit", f"{len(result.circuit.nodes)} nodes: {', '.join(result.circuit.nodes)}"),
        (
            "ablation",
            f"{result.ablation} (every head and MLP outside the circuit)"
            if result.claim != "completeness"
            else f"{result.ablation} (the circuit's heads and MLPs)",
        ),
        ("metric", result.metric),
        ("pass rate", f"{passed / n:.3f} ({passed} / {n} >= {at_least:g}), Wilson 95% lower bound {low:.3f}"),
        (what, f"mean {result.mean:.4g}, min {min(result.values):.4g}"),
        ("weakest", worst),
    ]
    if result.nodes:
        weak = sorted(result.node_means().items(), key=lambda kv: (math.isfinite(kv[1]), kv[1]))[:show]
        lines.append(("nodes", ", ".join(f"{n} {v:.4g}" for n, v in weak) + " (weakest first, mean contribution)"))
    lines.append(("expected", expected))
    _fail(claim, lines, hint)


def assert_faithful(
    result: CircuitResult,
    at_least: float = 0.9,
    *,
    min_rate: float | None = None,
    on: str = "lower_bound",
    show: int = 5,
) -> None:
    """The circuit keeps at least `at_least` of the metric: on average, or (with `min_rate`) in that share of pairs."""
    __tracebackhide__ = True
    _check_args(result, "faithfulness", at_least, min_rate, on)
    _population_claim(
        result,
        "faithfulness",
        at_least,
        min_rate,
        on,
        show,
        "a missing component: run discover() with a larger top_k, or minimality() to see what each node adds",
    )


def assert_complete(
    result: CircuitResult,
    at_least: float = 0.9,
    *,
    min_rate: float | None = None,
    on: str = "lower_bound",
    show: int = 5,
) -> None:
    """Ablating the circuit removes at least `at_least` of the metric: on average, or in `min_rate` of the pairs."""
    __tracebackhide__ = True
    _check_args(result, "completeness", at_least, min_rate, on)
    _population_claim(
        result,
        "completeness",
        at_least,
        min_rate,
        on,
        show,
        "other components carry the behaviour too (backup heads): path_sweep() from the rest of the model to the logits shows them",
    )


def assert_minimal(result: CircuitResult, at_least: float = 0.01, *, show: int = 5) -> None:
    """Every node of the circuit adds at least `at_least` of the metric (its mean marginal contribution over the pairs)."""
    __tracebackhide__ = True
    _check_args(result, "minimality", at_least, None, "rate")
    means = result.node_means()
    weak = {n: v for n, v in means.items() if not (math.isfinite(v) and v >= at_least)}
    record_check(
        "smallest marginal contribution of a circuit node",
        min(means.values()),
        ">=",
        at_least,
        site=", ".join(result.nodes[:8]),
    )
    if not weak:
        return
    ranked = sorted(means.items(), key=lambda kv: (math.isfinite(kv[1]), kv[1]))
    _fail(
        f"claim: every node of the circuit adds >= {at_least:g} of {result.metric} ({result.ablation} ablation)",
        [
            ("circuit", f"{len(result.nodes)} ablatable nodes: {', '.join(result.nodes)}"),
            ("nodes", ", ".join(f"{n} {v:.4g}" for n, v in ranked[:show]) + " (weakest first, mean over pairs)"),
            ("failing", f"{len(weak)} of {len(means)} nodes: {', '.join(weak)}"),
            ("expected", f"each node's mean contribution >= {at_least:g}"),
        ],
        "drop the failing nodes from the circuit and check faithfulness again",
    )


def assert_edges(circuit: Circuit, edges: Sequence[tuple[str, str]], *, show: int = 10) -> None:
    """The circuit holds every edge in `edges` (sender, receiver); the report draws them as claimed, missing ones in magenta.

    >>> assert_edges(discover(model, pairs, top_k=12), [("head_out.0.0", "k_in.1.0")])   # doctest: +SKIP
    """
    __tracebackhide__ = True
    if not isinstance(circuit, Circuit):
        raise ArgumentError(
            f"circuit is a {type(circuit).__name__}: expected a Circuit (from discover or Circuit(edges=...))"
        )
    wanted = [tuple(e) for e in edges]
    if not wanted or any(len(e) != 2 for e in wanted):
        raise ArgumentError(f"edges={edges!r:.100}: expected a non-empty list of (sender, receiver) pairs")
    have = set(circuit.edges)
    missing = [e for e in wanted if e not in have]
    record_circuit(circuit, claimed=[e for e in wanted if e in have], missing=missing)
    record_check(
        f"claimed edges present in the circuit ({len(wanted)} claimed)", len(wanted) - len(missing), ">=", len(wanted)
    )
    if not missing:
        return
    rank = {(s, r): k + 1 for k, (s, r, _) in enumerate(circuit.ranked())}
    _fail(
        f"claim: the circuit holds the edges {', '.join(f'{s} -> {r}' for s, r in wanted)}",
        [
            ("missing", ", ".join(f"{s} -> {r}" for s, r in missing)),
            (
                "present",
                ", ".join(f"{s} -> {r} (rank {rank[e]})" for e in wanted if e in have for s, r in [e]) or "none",
            ),
            (
                "circuit",
                f"{len(circuit.edges)} edges ({circuit.method or 'given'}, {circuit.metric}), top {min(show, len(circuit.edges))}:\n"
                + "\n".join(circuit.to_text().splitlines()[:show]),
            ),
        ],
        "raise top_k (or lower threshold) if the edge ranks just below the cut; path_patch() the edge to see its true effect",
    )
