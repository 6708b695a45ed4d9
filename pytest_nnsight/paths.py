"""Path patching: the effect of a sender on the metric only through one receiver's input.

Senders write into the residual stream: `embed`, `attn_out.L`, `mlp_out.L` and `head_out.L.H` (one head's
share of the attention output, through its slice of the output projection). Receivers read it:
`q_in.L.H`, `k_in.L.H`, `v_in.L.H` (one head's query, key or value input), `mlp_in.L` and `logits`.
With every other path frozen at the target run, the receiver's input is exactly

    norm(resid_target + (sender_source - sender_target))

because the residual stream is the sum of what the components wrote. It is computed from one cached
run with the model's own norm and projection modules, then written into one trace of the target prompt,
where everything after the receiver runs freely. GPT-2's fused `c_attn` (q | k | v, each n_heads x
head_dim wide) is split by columns, so one head's query, key or value input can be patched alone.
`tests/test_paths.py` checks this against the three-run path patching of Wang et al. written in nnsight.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import settings as _settings
from .errors import BatchingMismatchError, CircuitError, SiteError, check_positive_int
from .families import Layout, layout_of
from .findings import recorded
from .metrics import Metric, as_metric
from .prompts import pair_positions, resolve_position, slots_of, text_of
from .results import Effect, check_direction, fixed
from .sites import Site, _head_index, _layer_index, model_name
from .sweeps import tolerance_for
from .trace import Edit, normalized, reference_logits, run

SENDER_FORMS = "embed, attn_out.L, mlp_out.L or head_out.L.H"
RECEIVER_FORMS = "q_in.L.H, k_in.L.H, v_in.L.H (one head's query, key or value input), mlp_in.L or logits"
_SENDER = re.compile(r"^(?:head_out\.(-?\d+)\.(-?\d+)|(attn_out|mlp_out)\.(-?\d+)|(embed))$")
_RECEIVER = re.compile(r"^(?:([qkv])_in\.(-?\d+)\.(-?\d+)|mlp_in\.(-?\d+)|(logits))$")


@dataclass(frozen=True)
class Sender:
    """A component writing into the residual stream; `time` orders writes and reads in the forward pass."""

    label: str
    kind: str  # embed | attn | mlp | head
    layer: int  # -1 for embed
    head: int | None = None

    @property
    def time(self) -> float:
        return -1.0 if self.kind == "embed" else 2 * self.layer + (1.5 if self.kind == "mlp" else 0.5)

    @property
    def node(self) -> str:
        return self.label


@dataclass(frozen=True)
class Receiver:
    """A component input reading the residual stream: a head's q/k/v input, an MLP's input, or the logits."""

    label: str
    kind: str  # q | k | v | mlp | logits
    layer: int  # n_layers for logits
    head: int | None = None

    @property
    def time(self) -> float:
        return 2 * self.layer + (1.0 if self.kind == "mlp" else 0.0)

    @property
    def node(self) -> str:
        """The circuit node this input belongs to: head_out.L.H, mlp_out.L or logits."""
        if self.kind in "qkv":
            return f"head_out.{self.layer}.{self.head}"
        return f"mlp_out.{self.layer}" if self.kind == "mlp" else "logits"


def _label_of(spec: Any, what: str, forms: str) -> str:
    if isinstance(spec, Site) and spec.label:
        return spec.label
    if not isinstance(spec, str):
        raise CircuitError(f"{what} {spec!r} ({type(spec).__name__}) is not a name: expected {forms}")
    return spec.strip()


def _index(model: Any, what: str, spec: str, layer: str, head: str | None = None) -> tuple[int, int | None]:
    try:
        li = _layer_index(model, int(layer))
        return li, None if head is None else _head_index(model, li, int(head))
    except SiteError as exc:
        raise CircuitError(f"{what} {spec!r}: {exc}") from None


def parse_sender(model: Any, spec: Any) -> Sender:
    """A Sender from `embed`, `attn_out.L`, `mlp_out.L` or `head_out.L.H` (negative layers and heads count from the end)."""
    label = _label_of(spec, "sender", SENDER_FORMS)
    found = _SENDER.match(label)
    if not found:
        if _RECEIVER.match(label):
            raise CircuitError(
                f"{label!r} is a receiver (a component's input), not a sender: senders are {SENDER_FORMS}"
            )
        if label.startswith(("resid_", "block")):
            raise CircuitError(
                f"sender {label!r} is the residual stream, the sum of every path before it, not one component: "
                f"senders are {SENDER_FORMS}"
            )
        raise CircuitError(f"unknown sender {label!r}: expected {SENDER_FORMS}")
    if found.group(5):
        return Sender("embed", "embed", -1)
    if found.group(1) is not None:
        layer, head = _index(model, "sender", label, found.group(1), found.group(2))
        return Sender(f"head_out.{layer}.{head}", "head", layer, head)
    layer, _ = _index(model, "sender", label, found.group(4))
    kind = found.group(3)
    return Sender(f"{kind}.{layer}", kind.split("_")[0], layer)


def parse_receiver(model: Any, spec: Any) -> Receiver:
    """A Receiver from `q_in.L.H`, `k_in.L.H`, `v_in.L.H`, `mlp_in.L` or `logits`."""
    label = _label_of(spec, "receiver", RECEIVER_FORMS)
    found = _RECEIVER.match(label)
    if not found:
        if label.startswith("head_out.") or label.startswith("attn_out."):
            raise CircuitError(
                f"receiver {label!r} is an output; a head receives through its inputs: name q_in, k_in or v_in "
                f"(e.g. {label.replace('head_out', 'k_in').replace('attn_out', 'k_in')}{'.0' if label.startswith('attn_out') else ''}); "
                f"receivers are {RECEIVER_FORMS}"
            )
        if _SENDER.match(label):
            raise CircuitError(
                f"{label!r} is a sender (a component's output), not a receiver: receivers are {RECEIVER_FORMS}"
            )
        raise CircuitError(f"unknown receiver {label!r}: expected {RECEIVER_FORMS}")
    if found.group(5):
        return Receiver("logits", "logits", layout_of(model).n_layers)
    if found.group(1):
        layer, head = _index(model, "receiver", label, found.group(2), found.group(3))
        return Receiver(f"{found.group(1)}_in.{layer}.{head}", found.group(1), layer, head)
    layer, _ = _index(model, "receiver", label, found.group(4))
    return Receiver(f"mlp_in.{layer}", "mlp", layer)


def check_edge(sender: Sender, receiver: Receiver) -> None:
    """CircuitError unless `sender` writes before `receiver` reads (no edge from a later layer to an earlier one)."""
    if not sender.time < receiver.time:
        raise CircuitError(
            f"no edge {sender.label} -> {receiver.label}: {receiver.label} reads the residual stream before {sender.label} writes "
            "into it (an edge goes from an earlier component to a later one: a layer's heads feed its own MLP and later layers)"
        )


def all_senders(model: Any) -> list[Sender]:
    """embed, then per layer every head and the MLP."""
    lay = layout_of(model)
    out = [Sender("embed", "embed", -1)]
    for layer in range(lay.n_layers):
        out += [Sender(f"head_out.{layer}.{h}", "head", layer, h) for h in range(lay.n_heads)]
        out.append(Sender(f"mlp_out.{layer}", "mlp", layer))
    return out


def all_receivers(model: Any) -> list[Receiver]:
    """Per layer every head's q, k and v input and the MLP's input, then the logits."""
    lay = layout_of(model)
    out = []
    for layer in range(lay.n_layers):
        out += [Receiver(f"{k}_in.{layer}.{h}", k, layer, h) for h in range(lay.n_heads) for k in "qkv"]
        out.append(Receiver(f"mlp_in.{layer}", "mlp", layer))
    return out + [Receiver("logits", "logits", lay.n_layers)]


def all_edges(model: Any) -> list[tuple[Sender, Receiver]]:
    """Every (sender, receiver) pair of the model in which the sender writes before the receiver reads."""
    receivers = all_receivers(model)
    return [(s, r) for s in all_senders(model) for r in receivers if s.time < r.time]


# -- where a family's receivers read ---------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """Where a family's layers read the residual stream: the norm before attention, the fused q|k|v projection
    (each part n_heads x head_dim wide), the norm before the MLP; paths relative to one layer."""

    ln_attn: str
    qkv: str
    ln_mlp: str


ADAPTERS = {"gpt2": Adapter("ln_1", "attn.c_attn", "ln_2")}


@dataclass(frozen=True)
class Bound:
    """An Adapter bound to one model: full paths, sizes and the torch modules used to compute receiver inputs."""

    model: Any
    lay: Layout
    adapter: Adapter

    def module(self, path: str) -> Any:
        return getattr(self.model, "_module", self.model).get_submodule(path)

    def sender_site(self, s: Sender) -> Site:
        if s.kind == "embed":
            return Site(self.lay.path("embed"))
        if s.kind == "head":
            return Site(self.lay.in_layer(s.layer, "head_proj"), part="input")
        return Site(self.lay.in_layer(s.layer, s.kind))

    def resid_site(self, r: Receiver) -> Site:
        """The residual stream as the receiver's norm reads it (the norm's input)."""
        if r.kind == "logits":
            return Site(self.lay.path("final_norm"), part="input")
        return Site(
            f"{self.lay.layer(r.layer)}.{self.adapter.ln_mlp if r.kind == 'mlp' else self.adapter.ln_attn}",
            part="input",
        )

    def write_site(self, r: Receiver) -> Site:
        """Where the receiver's input is written: its columns of the q|k|v output, the MLP's input, the final norm's output."""
        if r.kind == "logits":
            return Site(self.lay.path("final_norm"), label=r.label)
        if r.kind == "mlp":
            return Site(self.lay.in_layer(r.layer, "mlp"), part="input", label=r.label)
        n = self.lay.n_heads
        return Site(
            f"{self.lay.layer(r.layer)}.{self.adapter.qkv}",
            head="qkv".index(r.kind) * n + r.head,
            n_heads=3 * n,
            label=r.label,
        )

    def delta(self, s: Sender, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the sender adds to the residual stream in the source run minus the target run, [T, d], zero off `mask`."""
        diff = source - target
        if s.kind == "head":
            width = diff.shape[-1] // self.lay.n_heads
            keep = torch.zeros_like(diff)
            keep[..., s.head * width : (s.head + 1) * width] = diff[..., s.head * width : (s.head + 1) * width]
            proj = self.module(self.lay.in_layer(s.layer, "head_proj"))
            # the head's slice of the output projection, bias cancelled
            diff = proj(keep) - proj(torch.zeros_like(keep))
        return diff * mask.to(diff.dtype).unsqueeze(-1)

    def receive(self, r: Receiver, resid: torch.Tensor) -> torch.Tensor:
        """The receiver's input computed from a residual stream `resid` [..., T, d] by the model's own modules."""
        if r.kind == "logits":
            return self.module(self.lay.path("final_norm"))(resid)
        layer = self.lay.layer(r.layer)
        if r.kind == "mlp":
            return self.module(f"{layer}.{self.adapter.ln_mlp}")(resid)
        qkv = self.module(f"{layer}.{self.adapter.qkv}")(self.module(f"{layer}.{self.adapter.ln_attn}")(resid))
        d, n = self.lay.d_model, self.lay.n_heads
        start = "qkv".index(r.kind) * d + r.head * (d // n)
        return qkv[..., start : start + d // n]


def bind(model: Any) -> Bound:
    """The path-patching adapter of the model's family; CircuitError saying why when the family has none."""
    lay = layout_of(model)
    adapter = ADAPTERS.get(lay.family.name)
    if adapter is None:
        raise CircuitError(
            f"path patching does not know where {model_name(model)} ({lay.family.name} family) reads its receiver inputs "
            f"(the norm before attention, the q/k/v projections, the norm before the MLP): supported families: {', '.join(ADAPTERS)}. "
            "Use patch() or sweep() on its sites, or add an entry to pytest_nnsight.paths.ADAPTERS"
        )
    if lay.path("final_norm") is None:
        raise CircuitError(f"path patching needs a final norm before the logits; {lay.family.name} has none")
    bound = Bound(model, lay, adapter)
    qkv = bound.module(f"{lay.layer(0)}.{adapter.qkv}")
    width = getattr(qkv, "nf", None) or getattr(qkv, "out_features", None)
    if width is not None and width != 3 * lay.d_model:
        raise CircuitError(
            f"{lay.layer(0)}.{adapter.qkv} computes {width} features, not q | k | v of {lay.d_model} each (a cross-attention "
            "or grouped-query layout): its q, k and v inputs cannot be split by columns, so this model has no q_in/k_in/v_in receivers"
        )
    return bound


# -- one pair: cache, receiver values, patched runs -----------------------------------------------------


@dataclass
class PairCache:
    """One clean/corrupt pair's cached run: metrics, tokens, sender outputs and receiver residuals (row 0 source, 1 target)."""

    bound: Bound
    source: str
    target: str
    tokens: list[str]
    target_tokens: list[str]
    src: float
    tgt: float
    acts: dict[Site, torch.Tensor]
    sender_mask: torch.Tensor
    receiver_positions: list[int]
    reference: Any

    def delta(self, s: Sender) -> torch.Tensor:
        site = self.bound.sender_site(s)
        with torch.inference_mode():
            return self.bound.delta(s, self.acts[site][0], self.acts[site][1], self.sender_mask)

    def value(self, s: Sender, r: Receiver, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The receiver's input with only the sender's direct path switched to the source run: [positions, width]."""
        resid = self.acts[self.bound.resid_site(r)][1]
        with torch.inference_mode():
            out = self.bound.receive(r, resid + (self.delta(s) if delta is None else delta))
        return out[self.receiver_positions]

    def edit(self, r: Receiver, rows: Sequence[int], values: Sequence[torch.Tensor]) -> Edit:
        pos = self.receiver_positions
        return Edit(
            self.bound.write_site(r),
            tuple(row for row in rows for _ in pos),
            tuple(pos) * len(rows),
            torch.cat(list(values)),
        )


def cache_pair(
    model: Any,
    clean: Any,
    corrupt: Any,
    metric: Metric,
    senders: Sequence[Sender],
    receivers: Sequence[Receiver],
    *,
    position: Any = None,
    receiver_position: Any = None,
    direction: str = "clean->corrupt",
    bound: Bound | None = None,
) -> PairCache:
    """Run source and target once, saving every sender's output and every receiver's residual."""
    bound = bound or bind(model)
    ct, xt, _ = pair_positions(model, clean, corrupt, "last")
    spos = list(range(len(ct))) if position is None else pair_positions(model, clean, corrupt, position)[2]
    rpos = (
        list(range(len(ct)))
        if receiver_position is None
        else resolve_position(ct, receiver_position, prompt=text_of(clean), slots=slots_of(clean))
    )
    source, target = (clean, corrupt) if direction == "clean->corrupt" else (corrupt, clean)
    reference = reference_logits(model, metric, text_of(clean))
    sites = list(dict.fromkeys([bound.sender_site(s) for s in senders] + [bound.resid_site(r) for r in receivers]))
    base, acts = run(model, [text_of(source), text_of(target)], metric, save=sites, reference=reference)
    mask = torch.zeros(len(ct), dtype=torch.bool)
    mask[spos] = True
    mask = mask.to(next(iter(acts.values())).device)
    return PairCache(
        bound,
        text_of(source),
        text_of(target),
        ct,
        xt if direction == "clean->corrupt" else ct,
        float(base[0]),
        float(base[1]),
        acts,
        mask,
        rpos,
        reference,
    )


def path_patch(
    model: Any,
    clean: Any,
    corrupt: Any,
    *,
    sender: Any,
    receiver: Any,
    metric: Any,
    position: Any = None,
    receiver_position: Any = None,
    direction: str = "clean->corrupt",
    min_gap: float = 1e-4,
) -> Effect:
    """The effect of `sender` on the metric only through `receiver`'s input, every other path frozen at the target run.

    `receiver` may be a list: the sender's path through all of those inputs at once (e.g. every head's v input of a
    layer). `position`: the sender positions switched to the source run (default all); `receiver_position`: the
    positions of the receiver's input written (default all). `normalized` is (patched - corrupt) / (clean - corrupt).

    >>> effect = path_patch(model, clean, corrupt, sender="head_out.0.0", receiver="k_in.1.2",   # doctest: +SKIP
    ...                     metric=logit_diff("t5", "t60"))
    """
    check_direction(direction)
    m = as_metric(model, metric)
    bound = bind(model)
    s = parse_sender(model, sender)
    receivers = _parse_all(model, receiver, parse_receiver, None, "receiver")
    for r in receivers:
        check_edge(s, r)
    pc = cache_pair(
        model,
        clean,
        corrupt,
        m,
        [s],
        receivers,
        position=position,
        receiver_position=receiver_position,
        direction=direction,
        bound=bound,
    )
    patched, _ = run(
        model, pc.target, m, edits=[pc.edit(r, [0], [pc.value(s, r)]) for r in receivers], reference=pc.reference
    )
    spos = [i for i, keep in enumerate(pc.sender_mask.tolist()) if keep]
    label = f"{s.label} -> {'+'.join(r.label for r in receivers)}"
    eff = normalized(float(patched[0]), pc.tgt, pc.src, min_gap=min_gap, what=f"path patching {label}")
    return recorded(
        Effect(
            "path patch",
            label,
            tuple(spos),
            tuple(pc.target_tokens[p] for p in spos),
            m.name,
            pc.source,
            pc.target,
            pc.src,
            pc.tgt,
            float(patched[0]),
            eff,
            direction,
            tuple(pc.target_tokens),
        )
    )


# -- many edges of one pair, batched ------------------------------------------------------------------


@dataclass(frozen=True)
class PathMap:
    """Path-patching effects of senders (rows) through receivers (columns); NaN where no edge exists (a receiver
    that reads before the sender writes)."""

    values: tuple[tuple[float, ...], ...]
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    metric: str
    clean_prompt: str
    corrupt_prompt: str
    clean: float
    corrupt: float
    raw: tuple[tuple[float, ...], ...] = ()
    kind: str = "path patch"

    @classmethod
    def from_grids(
        cls,
        grid: Sequence[Sequence[float]],
        raw: Sequence[Sequence[float]],
        senders: Sequence[Any],
        receivers: Sequence[Any],
        metric: Any,
        clean: Any,
        corrupt: Any,
        src: float,
        tgt: float,
        direction: str,
        kind: str = "path patch",
    ) -> "PathMap":
        """The map of `grid` (normalized) and `raw` over sender x receiver sites; `src`/`tgt` are the metric on the
        patch's source and target runs, stored as clean/corrupt whichever way `direction` patched."""
        clean_m, corrupt_m = (src, tgt) if direction == "clean->corrupt" else (tgt, src)
        return cls(
            tuple(map(tuple, grid)),
            tuple(s.label for s in senders),
            tuple(r.label for r in receivers),
            metric.name,
            text_of(clean),
            text_of(corrupt),
            clean_m,
            corrupt_m,
            tuple(map(tuple, raw)),
            kind=kind,
        )

    def __getitem__(self, edge: tuple[str, str]) -> float:
        """map[sender, receiver]."""
        sender, receiver = edge
        try:
            return self.values[self.senders.index(sender)][self.receivers.index(receiver)]
        except ValueError:
            raise CircuitError(
                f"edge {sender} -> {receiver} is not in this map: senders {list(self.senders)}, receivers {list(self.receivers)}"
            ) from None

    def edges(self) -> list[tuple[str, str, float]]:
        """Every existing edge as (sender, receiver, effect), in map order."""
        return [
            (s, r, v)
            for s, row in zip(self.senders, self.values)
            for r, v in zip(self.receivers, row)
            if not math.isnan(v)
        ]

    def top(self, k: int = 5) -> list[tuple[str, str, float]]:
        """The k edges of largest |effect|."""
        return sorted(self.edges(), key=lambda e: -abs(e[2]))[:k]

    def to_text(self, digits: int = 2) -> str:
        """An aligned table, senders down, receivers across; '.' where no edge exists."""
        head = [""] + list(self.receivers)
        rows = [
            [s] + ["." if math.isnan(v) else fixed(v, digits) for v in row] for s, row in zip(self.senders, self.values)
        ]
        widths = [max(len(x[c]) for x in [head] + rows) for c in range(len(head))]
        return "\n".join("  ".join(x[c].rjust(widths[c]) for c in range(len(head))) for x in [head] + rows)

    def __repr__(self) -> str:
        top = self.top(1)
        peak = f", peak {top[0][2]:.3g} at {top[0][0]} -> {top[0][1]}" if top else ""
        return f"PathMap({len(self.senders)} senders x {len(self.receivers)} receivers, {self.metric}{peak})"


def _parse_all(model: Any, specs: Any, parse: Any, default: Any, what: str) -> list[Any]:
    if default is not None and (specs is None or specs == "all"):
        return default(model)
    if isinstance(specs, (str, Site)):
        specs = [specs]
    if not isinstance(specs, (list, tuple)) or not specs:
        raise CircuitError(
            f"{what}={specs!r}: expected one name or a non-empty list of names"
            + (", or None for all" if default else "")
        )
    return list(dict.fromkeys(parse(model, s) for s in specs))


def path_sweep(
    model: Any,
    clean: Any,
    corrupt: Any,
    *,
    senders: Any = None,
    receivers: Any = None,
    metric: Any,
    position: Any = None,
    receiver_position: Any = None,
    batch_size: int = 32,
    direction: str = "clean->corrupt",
    check_batching: bool | None = None,
    check_cells: int | None = None,
    min_gap: float = 1e-4,
) -> PathMap:
    """`path_patch` for every sender x receiver edge (None: all of the model's), several edges per forward.

    With `check_batching` (None follows --nnsight-check-batching) a sample of edges is re-run one trace each and
    BatchingMismatchError raised when they disagree.

    >>> paths = path_sweep(model, clean, corrupt, metric=logit_diff("t5", "t60"), receivers=["k_in.1.0", "logits"])   # doctest: +SKIP
    >>> paths.top(3)                                                                                                  # doctest: +SKIP
    """
    check_positive_int("batch_size", batch_size)
    check_direction(direction)
    m = as_metric(model, metric)
    bound = bind(model)
    S = _parse_all(model, senders, parse_sender, all_senders, "senders")
    R = _parse_all(model, receivers, parse_receiver, all_receivers, "receivers")
    edges = [(i, j) for i, s in enumerate(S) for j, r in enumerate(R) if s.time < r.time]
    if not edges:
        raise CircuitError(
            f"no edge among senders {[s.label for s in S]} and receivers {[r.label for r in R]}: every receiver reads "
            "before every sender writes"
        )
    pc = cache_pair(
        model,
        clean,
        corrupt,
        m,
        S,
        R,
        position=position,
        receiver_position=receiver_position,
        direction=direction,
        bound=bound,
    )
    what = f"path sweep over {len(edges)} edges"
    normalized(pc.tgt, pc.tgt, pc.src, min_gap=min_gap, what=what)
    deltas = {i: pc.delta(S[i]) for i in {i for i, _ in edges}}
    raw = run_edges(model, pc, [(S[i], R[j], deltas[i]) for i, j in edges], m, batch_size)

    active = _settings.settings_of(model)
    if check_batching if check_batching is not None else active.check_batching:
        n = check_cells or active.check_batching_cells
        verify_edges(model, pc, [(S[i], R[j]) for i, j in edges], raw, m, n)

    grid = [[math.nan] * len(R) for _ in S]
    raw_grid = [[math.nan] * len(R) for _ in S]
    for (i, j), v in zip(edges, raw):
        raw_grid[i][j] = v
        grid[i][j] = normalized(v, pc.tgt, pc.src, min_gap=min_gap, what=what)
    return PathMap.from_grids(grid, raw_grid, S, R, m, clean, corrupt, pc.src, pc.tgt, direction)


def run_edges(
    model: Any, pc: PairCache, edges: Sequence[tuple[Sender, Receiver, torch.Tensor]], metric: Metric, batch_size: int
) -> list[float]:
    """The metric with each edge path-patched, one row per edge, `batch_size` rows per forward."""
    out: list[float] = []
    for start in range(0, len(edges), batch_size):
        chunk = edges[start : start + batch_size]
        by_receiver: dict[Receiver, tuple[list[int], list[torch.Tensor]]] = {}
        for row, (s, r, delta) in enumerate(chunk):
            rows, values = by_receiver.setdefault(r, ([], []))
            rows.append(row)
            values.append(pc.value(s, r, delta))
        edits = [pc.edit(r, rows, values) for r, (rows, values) in by_receiver.items()]
        values, _ = run(model, [pc.target] * len(chunk), metric, edits=edits, reference=pc.reference)
        out += [float(v) for v in values]
    return out


def verify_edges(
    model: Any,
    pc: PairCache,
    edges: Sequence[tuple[Sender, Receiver]],
    batched: Sequence[float],
    metric: Metric,
    n: int,
) -> None:
    """Re-run `n` sampled edges one trace each; BatchingMismatchError when any differs from its batched value."""
    picks = random.Random(0).sample(range(len(edges)), min(n, len(edges)))
    tol = tolerance_for(next(iter(pc.acts.values())).dtype)
    bad = []
    for k in picks:
        s, r = edges[k]
        single, _ = run(model, pc.target, metric, edits=[pc.edit(r, [0], [pc.value(s, r)])], reference=pc.reference)
        diff = abs(float(single[0]) - batched[k])
        if not diff <= tol:
            bad.append(
                f"  {s.label} -> {r.label}: batched {batched[k]:.6g}, single {float(single[0]):.6g}, |diff| {diff:.3g}"
            )
    if bad:
        raise BatchingMismatchError(
            f"batched path sweep disagrees with single-edge runs beyond {tol:g} in {len(bad)} of {len(picks)} checked edges:\n"
            + "\n".join(bad)
            + "\nthe batched path is wrong for this model: run with batch_size=1 and report it"
        )
