"""Circuits: a set of nodes (heads, MLPs, the embeddings) or of edges between them, optionally with a score per edge.

Node names are the sender vocabulary (`embed`, `head_out.L.H`, `mlp_out.L`) plus `logits`; an edge is
(sender, receiver) with a receiver input (`q_in.L.H`, `k_in.L.H`, `v_in.L.H`, `mlp_in.L`, `logits`). A
circuit is checked against a model with `Circuit.check(model)`: unknown names, heads or layers out of range
and edges from a later component to an earlier one are refused with the accepted forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .errors import CircuitError
from .paths import Receiver, Sender, all_senders, check_edge, parse_receiver, parse_sender


@dataclass(frozen=True)
class Circuit:
    """Nodes, or edges (sender, receiver) with optional scores; `nodes` of an edge circuit are the edges' endpoints.

    >>> Circuit(nodes=("head_out.0.0", "head_out.1.2"))                                  # doctest: +SKIP
    >>> Circuit(edges=(("head_out.0.0", "k_in.1.2"), ("head_out.1.2", "logits")))       # doctest: +SKIP
    """

    edges: tuple[tuple[str, str], ...] = ()
    scores: tuple[float, ...] = ()
    nodes: tuple[str, ...] = ()
    metric: str = ""
    method: str = ""

    def __post_init__(self) -> None:
        edges = tuple(tuple(e) for e in self.edges)
        if any(len(e) != 2 or not all(isinstance(x, str) for x in e) for e in edges):
            raise CircuitError(
                f"edges={self.edges!r:.120}: expected (sender, receiver) pairs of names, e.g. ('head_out.0.0', 'k_in.1.2')"
            )
        if self.scores and len(self.scores) != len(edges):
            raise CircuitError(f"{len(self.scores)} scores for {len(edges)} edges: give one score per edge, or none")
        if any(not isinstance(n, str) for n in self.nodes):
            raise CircuitError(
                f"nodes={self.nodes!r:.120}: expected names such as 'head_out.1.2', 'mlp_out.0', 'embed'"
            )
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))
        if not self.nodes and edges:
            ends: list[str] = []
            for s, r in edges:
                ends += [s, _node_of_receiver(r)]
            object.__setattr__(self, "nodes", tuple(dict.fromkeys(ends)))
        else:
            object.__setattr__(self, "nodes", tuple(dict.fromkeys(self.nodes)))

    def check(self, model: Any) -> "Circuit":
        """The circuit with canonical names (negative indices resolved); CircuitError on a name, layer, head or edge the
        model does not have."""
        edges = []
        for s, r in self.edges:  # edges first, so an error names the edge as given
            sender, receiver = parse_sender(model, s), parse_receiver(model, r)
            check_edge(sender, receiver)
            edges.append((sender.label, receiver.label))
        nodes = tuple(dict.fromkeys(node_label(model, n) for n in self.nodes))
        return Circuit(tuple(edges), self.scores, nodes if not self.edges else (), self.metric, self.method)

    def components(self, model: Any) -> list[Sender]:
        """The ablatable nodes of the circuit (heads and MLPs; an attn_out.L node stands for all heads of layer L)."""
        return [s for s in ablatable(model) if s.label in self._expanded(model)]

    def _expanded(self, model: Any) -> set[str]:
        out = set()
        for n in self.check(model).nodes:
            if n.startswith("attn_out."):
                layer = n.split(".")[1]
                out |= {s.label for s in ablatable(model) if s.kind == "head" and str(s.layer) == layer}
            out.add(n)
        return out

    def ranked(self) -> list[tuple[str, str, float]]:
        """Edges as (sender, receiver, score), largest |score| first (edge order when there are no scores)."""
        if not self.scores:
            return [(s, r, math.nan) for s, r in self.edges]
        return sorted(((s, r, v) for (s, r), v in zip(self.edges, self.scores)), key=lambda e: -abs(e[2]))

    def snapshot_record(self) -> dict[str, Any]:
        """What a findings snapshot stores: the edges ranked, each with its score, one per line (or the nodes)."""
        rec: dict[str, Any] = {"metric": self.metric, "method": self.method, "nodes": list(self.nodes)}
        rec["edges"] = [[s, r] + ([] if math.isnan(v) else [v]) for s, r, v in self.ranked()]
        return rec

    def heads(self) -> list[str]:
        return [n for n in self.nodes if n.startswith("head_out.")]

    def __len__(self) -> int:
        return len(self.edges) or len(self.nodes)

    def __repr__(self) -> str:
        if self.edges:
            top = ", ".join(f"{s} -> {r}" + ("" if math.isnan(v) else f" {v:.3g}") for s, r, v in self.ranked()[:3])
            return f"Circuit({len(self.edges)} edges over {len(self.nodes)} nodes: {top}{', ...' if len(self.edges) > 3 else ''})"
        return f"Circuit(nodes: {', '.join(self.nodes)})"

    def to_text(self) -> str:
        """One edge per line with its rank and score (or one node per line)."""
        if not self.edges:
            return "\n".join(self.nodes)
        return "\n".join(
            f"{k + 1:>3}. {s} -> {r}" + ("" if math.isnan(v) else f"  {v:+.4f}")
            for k, (s, r, v) in enumerate(self.ranked())
        )


def _node_of_receiver(label: str) -> str:
    kind, _, rest = label.partition(".")
    if kind in ("q_in", "k_in", "v_in"):
        return f"head_out.{rest}"
    if kind == "mlp_in":
        return f"mlp_out.{rest}"
    return label


def node_label(model: Any, spec: str) -> str:
    """The canonical name of a node: a sender name, or `logits`; CircuitError naming the accepted forms otherwise."""
    if spec == "logits":
        return spec
    try:
        return parse_sender(model, spec).label
    except CircuitError as exc:
        raise CircuitError(
            f"node {spec!r}: {exc}; nodes are embed, head_out.L.H, mlp_out.L, attn_out.L (all heads of a layer) or logits"
        ) from None


def ablatable(model: Any) -> list[Sender]:
    """The nodes faithfulness ablates when they are outside a circuit: every head and every MLP."""
    return [s for s in all_senders(model) if s.kind in ("head", "mlp")]


def circuit_of(edges: Iterable[tuple[str, str, float]], **meta: Any) -> Circuit:
    """A scored edge circuit from (sender, receiver, score) triples, kept in the given order."""
    triples = list(edges)
    return Circuit(tuple((s, r) for s, r, _ in triples), tuple(v for _, _, v in triples), **meta)


def receivers_of(circuit: Circuit, model: Any) -> list[Receiver]:
    return [parse_receiver(model, r) for _, r in circuit.edges]


def as_circuit(value: Any) -> Circuit:
    """A Circuit from a Circuit, a list of node names or a list of (sender, receiver) edges."""
    if isinstance(value, Circuit):
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) for v in value):
        return Circuit(nodes=tuple(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return Circuit(edges=tuple(tuple(v) for v in value))
    raise CircuitError(
        f"circuit {value!r:.100}: expected a Circuit, a non-empty list of node names (e.g. ['head_out.0.0', 'mlp_out.1']) "
        "or of (sender, receiver) edges"
    )


def rank_of(edges: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    return {e: k for k, e in enumerate(edges)}
