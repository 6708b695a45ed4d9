"""Circuits as findings: path patching, circuit faithfulness, completeness and minimality, edge attribution and discovery.

The public home of the circuit API (`paths`, `graph`, `discovery` and `faithfulness` hold the code):

- `path_patch(model, clean, corrupt, *, sender=, receiver=, metric=)`: the effect of a sender (`embed`, `attn_out.L`,
  `mlp_out.L`, `head_out.L.H`) only through a receiver's input (`q_in.L.H`, `k_in.L.H`, `v_in.L.H`, `mlp_in.L`,
  `logits`), every other path frozen; `path_sweep(...)` over senders x receivers, batched, returns a `PathMap`.
- `Circuit(nodes=...)` or `Circuit(edges=..., scores=...)`; `faithfulness`, `completeness`, `minimality` over pairs,
  asserted with `assert_faithful`, `assert_complete`, `assert_minimal` (a mean, or a pass rate with its Wilson bound).
- `edge_attribution(...)` (EAP, or EAP-IG with `method="eap-ig", steps=`) approximates `path_sweep` with one forward and
  backward; `check_edges(...)` compares it with true path patching; `discover(model, pairs, top_k=|threshold=)` returns a
  scored `Circuit`, which `finding_snapshot` stores and compares edge by edge.

>>> from pytest_nnsight.circuits import path_patch, discover, faithfulness, assert_faithful   # doctest: +SKIP
"""

from __future__ import annotations

from .circuit_checks import (
    CircuitResult,
    assert_complete,
    assert_edges,
    assert_faithful,
    assert_minimal,
    completeness,
    faithfulness,
    minimality,
)
from .discovery import EdgeCheck, check_edges, discover, edge_attribution, edge_scores, spearman
from .graph import Circuit
from .paths import ADAPTERS, PathMap, Receiver, Sender, all_edges, all_receivers, all_senders, path_patch, path_sweep

__all__ = [
    "ADAPTERS",
    "Circuit",
    "CircuitResult",
    "EdgeCheck",
    "PathMap",
    "Receiver",
    "Sender",
    "all_edges",
    "all_receivers",
    "all_senders",
    "assert_complete",
    "assert_edges",
    "assert_faithful",
    "assert_minimal",
    "check_edges",
    "completeness",
    "discover",
    "edge_attribution",
    "edge_scores",
    "faithfulness",
    "minimality",
    "path_patch",
    "path_sweep",
    "spearman",
]
