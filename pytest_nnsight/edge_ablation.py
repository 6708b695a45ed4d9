"""Edge-level ablation: run a circuit of EDGES, every edge outside it ablated at its receiver.

A receiver r of the circuit (a kept head's q/k/v input, a kept MLP's input, the logits) reads

    norm(resid_r - sum over kept senders s with (s, r) not in the circuit of (s_run - s_ablated))

so it sees only the senders the circuit connects to it; components outside the circuit's nodes are ablated at their
output, as at node level. A receiver's input depends on the senders before it, which depend on earlier receivers:
one pass per stage of the forward pass (each layer's q/k/v inputs, then its MLP input, then the logits) computes that
stage's inputs from the previous pass, exact by induction; the last pass measures the metric.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .graph import Circuit
from .paths import Bound, Receiver, Sender, all_receivers, all_senders
from .prompts import text_of
from .sites import Site
from .trace import Edit, run


def _node_edits(sites: dict, values: list, rows: Sequence[int], ablated: set[str]) -> list[Edit]:
    edits = []
    for label, site in sites.items():
        if label in ablated:
            T = values[rows[0]][label].shape[0]
            edits.append(
                Edit(
                    site,
                    tuple(r for r in range(len(rows)) for _ in range(T)),
                    tuple(range(T)) * len(rows),
                    torch.cat([values[i][label] for i in rows]),
                )
            )
    return edits


def edge_level_metric(
    model: Any,
    bound: Bound,
    circuit: Circuit,
    plist: list,
    metric_of: Any,
    sites: dict,
    values: list,
    embed_values: list,
    outside: set[str],
    kept: Sequence[Sender],
    batch_size: int,
) -> list[float]:
    """The metric per pair (clean prompt) with the circuit's edges only; `values`/`embed_values` hold the ablated values."""
    edges = set(circuit.edges)
    keep = [Sender("embed", "embed", -1)] + list(kept)
    nodes = {s.label for s in kept} | {"logits"}
    receivers = [r for r in all_receivers(model) if r.node in nodes]
    missing = {r: [s for s in keep if s.time < r.time and (s.label, r.label) not in edges] for r in receivers}
    missing = {r: ss for r, ss in missing.items() if ss}
    stages = sorted({r.time for r in missing})
    senders_at = {s.label: s for s in all_senders(model)}
    embed_site = Site(bound.lay.path("embed"))
    out = [0.0] * len(plist)
    by_len: dict[int, list[int]] = {}
    for i in range(len(plist)):
        by_len.setdefault(values[i][next(iter(values[i]))].shape[0], []).append(i)
    for group in by_len.values():
        for start in range(0, len(group), batch_size):
            rows = group[start : start + batch_size]
            texts = [text_of(plist[i][0]) for i in rows]
            base = _node_edits(sites, values, rows, outside)
            written: dict[Receiver, torch.Tensor] = {}  # receiver -> [rows, T, width]
            for stage in stages:
                now = [r for r in missing if r.time == stage]
                save = list(dict.fromkeys([bound.sender_site(s) for s in keep] + [bound.resid_site(r) for r in now]))
                _, acts = run(model, texts, metric_of(rows), edits=base + _writes(bound, written), save=save)
                with torch.inference_mode():
                    for r in now:
                        resid = acts[bound.resid_site(r)].clone()
                        for s in missing[r]:
                            resid -= _contribution(
                                bound, senders_at.get(s.label, s), acts, embed_site, values, embed_values, rows
                            )
                        written[r] = bound.receive(r, resid)
            result, _ = run(model, texts, metric_of(rows), edits=base + _writes(bound, written))
            for i, v in zip(rows, result.tolist()):
                out[i] = v
    return out


def _writes(bound: Bound, written: dict[Receiver, torch.Tensor]) -> list[Edit]:
    edits = []
    for r, value in written.items():
        n, T, _ = value.shape
        edits.append(
            Edit(
                bound.write_site(r),
                tuple(k for k in range(n) for _ in range(T)),
                tuple(range(T)) * n,
                value.reshape(n * T, -1),
            )
        )
    return edits


def _contribution(
    bound: Bound, s: Sender, acts: dict, embed_site: Site, values: list, embed_values: list, rows: Sequence[int]
) -> torch.Tensor:
    """What sender s adds to the residual stream in this run minus what its ablated value would add, [rows, T, d]."""
    actual = acts[embed_site] if s.kind == "embed" else acts[bound.sender_site(s)]
    ablated = actual.clone()
    for k, i in enumerate(rows):
        if s.kind == "embed":
            ablated[k] = embed_values[i]["embed"]
        elif s.kind == "head":
            width = actual.shape[-1] // bound.lay.n_heads
            ablated[k, :, s.head * width : (s.head + 1) * width] = values[i][s.label]
        else:
            ablated[k] = values[i][s.label]
    mask = torch.ones(actual.shape[1], dtype=torch.bool, device=actual.device)
    with torch.inference_mode():
        return torch.stack([bound.delta(s, actual[k], ablated[k], mask) for k in range(len(rows))])
