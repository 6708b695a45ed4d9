"""Sweeps: the effect of patching every (site, position) cell, run batched and checked against single runs.

Several patched copies of the corrupt prompt go through one forward (chunked by `batch_size`,
so memory grows with the batch, not with the number of cells). Because batching is where silent
errors live (padded prompts mispredicting: nnsight #672, TransformerLens #1609), `check_batching`
re-runs a sample of cells one trace each and fails when they disagree.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import forward as _forward, settings as _settings
from .batching import ids_of
from .deprecation import UNSET, moved_positionals, required
from .errors import BatchingMismatchError, check_positive_int
from .findings import record_map
from .metrics import Metric, as_metric, logits_of, per_row
from .prompts import TokenPrompt, pair_positions, slots_of, text_of
from .results import Direction, EffectMap, Reuse, check_direction, check_reuse
from .sites import Site, module_of, resolve_position, resolve_sites
from .trace import Edit, normalized, reference_logits, run


def sweep(
    model: Any,
    clean: Any,
    corrupt: Any,
    *old: Any,
    metric: Any = UNSET,
    sites: Any = "blocks",
    positions: Any = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    direction: Direction = "clean->corrupt",
    check_batching: bool | None = None,
    check_cells: int | None = None,
    min_gap: float = 1e-4,
    reuse: Reuse = "prefix",
) -> EffectMap:
    """Patch every (site, position) cell from one run into the other; returns an EffectMap of normalized effects.

    `sites`: 'blocks' (default: every block's output), 'attn', 'mlp', or a list of sites (heads too).
    `positions`: None for every position, or anything `position=` accepts (a slice, a list, 'last').
    `batch_size`: patched rows per forward; None sizes chunks by `memory_budget` bytes (default 512 MiB).
    `reuse`: 'prefix' (default) computes the layers before each patched one once (see pytest_nnsight.forward);
    'none' runs every cell through a plain nnsight trace. `check_batching`: None follows --nnsight-check-batching.

    >>> effects = sweep(model, "The capital of France is", "The capital of Germany is",   # doctest: +SKIP
    ...                 metric=logit_diff("Paris", "Berlin"))
    >>> effects.argmax()                                                                   # doctest: +SKIP
    ('resid_post.1', 5, 'is', 1.0)
    """
    # the old sweep(m, c, x, metric)
    args = moved_positionals("sweep", "model, clean, corrupt", old, ("metric",), {"metric": metric})
    required("sweep", args)
    _check_arguments(batch_size, memory_budget, direction, reuse)
    req = _resolve(model, clean, corrupt, args["metric"], sites, positions, direction, min_gap)
    plan, starts = _prefix_plan(req, reuse)
    rows = batch_size or _forward.rows_per_chunk(
        plan, model, len(req.tokens), req.metric.last_only, memory_budget or _forward.DEFAULT_MEMORY_BUDGET
    )
    measured, plan = _measure_cells(req, plan, starts, rows)
    effects = _assemble(req, measured)
    _verify_batching(req, measured, plan, rows, check_batching, check_cells)
    record_map(effects)  # for the findings report (a no-op outside a test)
    return effects


@dataclass(frozen=True)
class _Sweep:
    """One sweep request, resolved: the metric, sites, token columns, cells, and which prompt is patched into which."""

    model: Any
    clean: Any
    corrupt: Any
    metric: Metric
    sites: list[Site]
    tokens: list[str]  # the clean prompt's tokens
    cols: list[int]  # the swept token positions
    cells: list[tuple[int, int]]  # (index into sites, position), site-major
    restoring: bool  # direction 'clean->corrupt': the clean run's activations go into the corrupt run
    min_gap: float
    what: str  # how refusals name this sweep

    @property
    def source(self) -> Any:
        return self.clean if self.restoring else self.corrupt

    @property
    def target(self) -> Any:
        return self.corrupt if self.restoring else self.clean


def _check_arguments(batch_size: Any, memory_budget: Any, direction: Any, reuse: Any) -> None:
    """Refuse a bad batch size, memory budget, direction or reuse before any model runs."""
    if batch_size is not None:
        check_positive_int("batch_size", batch_size, "a positive int (or None to size chunks by memory_budget)")
    if memory_budget is not None:
        check_positive_int("memory_budget", memory_budget, "a positive number of bytes")
    check_direction(direction)
    check_reuse(reuse)


def _resolve(
    model: Any, clean: Any, corrupt: Any, metric: Any, sites: Any, positions: Any, direction: Direction, min_gap: float
) -> _Sweep:
    """Resolve the metric, sites and swept positions (errors name the bad value) into one request the phases share."""
    m = as_metric(model, metric)
    site_list = resolve_sites(model, sites)
    ct, _, _ = pair_positions(model, clean, corrupt, "last")
    cols = (
        list(range(len(ct)))
        if positions is None
        else resolve_position(ct, positions, prompt=text_of(clean), slots=slots_of(clean))
    )
    cells = [(i, p) for i in range(len(site_list)) for p in cols]
    what = f"sweeping {len(site_list)} sites x {len(cols)} positions"
    return _Sweep(model, clean, corrupt, m, site_list, ct, cols, cells, direction == "clean->corrupt", min_gap, what)


def _prefix_plan(req: _Sweep, reuse: Reuse) -> tuple[Any, list[Any]]:
    """The prefix-reuse plan and each site's start, or (None, []) with reuse='none' or a site no block boundary precedes."""
    plan = _forward.plan_for(req.model) if reuse == "prefix" else None
    starts = [plan.start_of(s) for s in req.sites] if plan is not None else []
    if plan is None or any(s is None for s in starts):
        return None, []
    return plan, starts


def _measure_cells(
    req: _Sweep, plan: Any, starts: Sequence[Any], rows: int
) -> tuple[tuple[float, float, dict, torch.Tensor], Any]:
    """(src, tgt, source activations, raw metric per cell) and the plan used: prefix reuse where it holds, else plain traces."""
    if plan is not None:
        done = prefix_cells(
            req.model,
            plan,
            starts,
            text_of(req.source),
            text_of(req.target),
            req.metric,
            req.sites,
            req.cells,
            rows,
            clean_first=req.restoring,
            min_gap=req.min_gap,
            what=req.what,
        )
        if done is not None:
            return done, plan
    plain = plain_cells(
        req.model,
        text_of(req.source),
        text_of(req.target),
        text_of(req.clean),
        req.metric,
        req.sites,
        req.cells,
        rows,
        min_gap=req.min_gap,
        what=req.what,
    )
    return plain, None


def _assemble(req: _Sweep, measured: tuple[float, float, dict, torch.Tensor]) -> EffectMap:
    """The EffectMap: each cell's raw metric and its effect normalized between the target run (0) and the source run (1)."""
    src, tgt, _, raw = measured
    grid = [[0.0] * len(req.cols) for _ in req.sites]
    raw_grid = [[0.0] * len(req.cols) for _ in req.sites]
    for (i, p), v in zip(req.cells, raw.tolist()):
        j = req.cols.index(p)
        raw_grid[i][j] = v
        grid[i][j] = normalized(v, tgt, src, min_gap=req.min_gap, what=req.what)
    return EffectMap(
        tuple(tuple(r) for r in grid),
        tuple(str(s) for s in req.sites),
        tuple(req.tokens[p] for p in req.cols),
        req.metric.name,
        text_of(req.clean),
        text_of(req.corrupt),
        src if req.restoring else tgt,
        tgt if req.restoring else src,
        raw=tuple(tuple(r) for r in raw_grid),
        positions=tuple(req.cols),
    )


def _verify_batching(
    req: _Sweep,
    measured: tuple[float, float, dict, torch.Tensor],
    plan: Any,
    rows: int,
    flag: bool | None,
    check_cells: int | None,
) -> None:
    """Under check_batching, re-run a sample of cells one trace each, once per model, path, sites and chunk shape."""
    active = _settings.settings_of(req.model)
    if not (flag if flag is not None else active.check_batching):
        return
    n = check_cells or active.check_batching_cells
    key = (
        "prefix" if plan is not None else "plain",
        tuple(map(str, req.sites)),
        min(rows, len(req.cells)),
        len(req.tokens),
        req.metric.last_only,
    )
    if _verdict_known(req.model, key, n):
        return
    _, _, acts, raw = measured
    reference = reference_logits(req.model, req.metric, text_of(req.clean))
    verify_cells(
        req.model, req.target, req.metric, req.sites, acts, req.cells, raw, reference, n, dtype=acts[req.sites[0]].dtype
    )
    _remember_verdict(req.model, key, n)


def prefix_cells(
    model: Any,
    plan: Any,
    starts: Sequence[Any],
    source: str,
    target: str,
    metric: Any,
    site_list: Sequence[Site],
    cells: Sequence[tuple[int, int]],
    rows: int,
    *,
    clean_first: bool,
    min_gap: float,
    what: str,
) -> tuple[float, float, dict, torch.Tensor] | None:
    """Every cell by prefix reuse: one forward of [source, target] records the source activations and the target's
    residual entering each block; cells then start at their own block (chunks of `rows`, in layer order)."""
    batch = _forward.encode(model, [source, target])
    kwargs = _forward.forward_kwargs(plan.root, keep_last=metric.last_only)
    cap, acts = _forward.capture(plan, batch, kwargs, read=site_list, target_rows=[1])
    reference = _last_logits(cap.output, 0 if clean_first else 1) if metric.needs_reference else None
    mask = batch.get("attention_mask")
    base = per_row(metric(cap.output, reference, mask), 2, metric)
    src, tgt = float(base[0]), float(base[1])
    normalized(tgt, tgt, src, min_gap=min_gap, what=what)  # refuses a broken experiment before any cell runs
    same = [torch.equal(acts[site_list[i]][0, p], acts[site_list[i]][1, p]) for i, p in cells]
    acts = {s: a[:1] for s, a in acts.items()}
    raw = torch.full((len(cells),), tgt)  # a patch writing the value already there changes nothing (e.g. positions
    # before the first token where the prompts differ, in a causal model): such cells keep the target's metric
    order = sorted((k for k in range(len(cells)) if not same[k]), key=lambda k: (starts[cells[k][0]].layer, k))
    check = _forward.needs_identity_check(plan)
    for at in range(0, len(order), rows):
        chunk = order[at : at + rows]
        todo = [
            _forward.Row(starts[cells[k][0]], (cells[k][1],), acts[site_list[cells[k][0]]][0, [cells[k][1]]])
            for k in chunk
        ]
        if check:
            todo.append(_forward.Row(_forward.Start(0), (), None))
        values = run_cells(plan, cap, todo, metric, reference, None if mask is None else mask[1:].expand(len(todo), -1))
        if check:
            if not _forward.identity_checked(plan, float(values[-1]), tgt, tolerance_for(acts[site_list[0]].dtype)):
                return None  # this model's forward is not blocks -> final norm -> LM head: the plain path runs it
            values, check = values[:-1], False
        raw[torch.tensor(chunk)] = values
    return src, tgt, acts, raw


def run_cells(plan: Any, cap: Any, todo: Sequence[Any], metric: Any, reference: Any, mask: Any = None) -> torch.Tensor:
    """The metric of each replayed row (the batched path that --nnsight-check-batching checks)."""

    def finish(hidden: torch.Tensor) -> torch.Tensor:
        return per_row(metric(_forward.head_logits(plan, hidden, metric.last_only), reference, mask), len(todo), metric)

    return _forward.replay(plan, cap, todo, finish)


def _last_logits(output: Any, row: int) -> torch.Tensor:
    return logits_of(output)[row : row + 1, -1, :].detach().clone()


def plain_cells(
    model: Any,
    source: str,
    target: str,
    clean: str,
    metric: Any,
    site_list: Sequence[Site],
    cells: Sequence[tuple[int, int]],
    rows: int,
    *,
    min_gap: float,
    what: str,
) -> tuple[float, float, dict, torch.Tensor]:
    """Every cell through plain nnsight traces of `rows` patched copies of the target (no prefix reuse). The target's
    token ids are prepared once; the first trace also runs the source and target rows, each patched row copying the
    source row's activation in the same forward (a small sweep is one trace)."""
    reference = reference_logits(model, metric, clean)
    tgt_ids = TokenPrompt(target, ids_of(model, target))
    src_ids = TokenPrompt(source, ids_of(model, source))
    raw = torch.empty(len(cells))
    acts: dict = {}
    src = tgt = None
    start = 0
    while start < len(cells):
        first = src is None
        chunk = cells[start : start + (max(1, rows - 2) if first else rows)]
        offset = 2 if first else 0
        edits = []
        for i, site in enumerate(site_list):
            picked = [r for r, (si, _) in enumerate(chunk) if si == i]
            if picked:
                pos = tuple(chunk[r][1] for r in picked)
                rows_at = tuple(r + offset for r in picked)
                if first:
                    edits.append(Edit(site, rows_at, pos, torch.zeros(len(picked), dtype=torch.long), op="copy"))
                else:
                    edits.append(Edit(site, rows_at, pos, acts[site][0, list(pos)]))
        inputs = ([src_ids, tgt_ids] if first else []) + [tgt_ids] * len(chunk)
        values, saved = run(
            model, inputs, metric, edits=edits, save=site_list if first else (), reference=reference, lean=True
        )
        if first:
            src, tgt = float(values[0]), float(values[1])
            acts = {s: a[:1] for s, a in saved.items()}
            normalized(tgt, tgt, src, min_gap=min_gap, what=what)  # refuses a broken experiment before any other chunk
            values = values[2:]
        raw[start : start + len(chunk)] = values
        start += len(chunk)
    if src is None:  # no cell: the unpatched pair alone
        base, acts = run(model, [src_ids, tgt_ids], metric, save=site_list, reference=reference, lean=True)
        src, tgt = float(base[0]), float(base[1])
        normalized(tgt, tgt, src, min_gap=min_gap, what=what)
    return src, tgt, acts, raw


#: batching checks that passed this session, per model: (path, sites, chunk rows, tokens, last-only) -> cells checked
_VERDICTS: "weakref.WeakKeyDictionary[Any, dict[tuple, int]]" = weakref.WeakKeyDictionary()


def _verdict_known(model: Any, key: tuple, n: int) -> bool:
    """Whether the batching check already passed for this model, sites and chunk shape with at least `n` cells."""
    return _VERDICTS.get(module_of(model), {}).get(key, 0) >= n


def _remember_verdict(model: Any, key: tuple, n: int) -> None:
    _VERDICTS.setdefault(module_of(model), {})[key] = n


def forget_verdicts() -> None:
    """Drop the cached batching-check verdicts (the next sweep of every shape is checked again)."""
    _VERDICTS.clear()


def tolerance_for(dtype: torch.dtype) -> float:
    """Absolute tolerance for batched vs single-run agreement of a metric, by the model's dtype."""
    return {torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)


def verify_cells(
    model: Any,
    target: Any,
    metric: Any,
    site_list: Sequence[Site],
    acts: dict,
    cells: Sequence[tuple[int, int]],
    batched: torch.Tensor,
    reference: Any,
    n: int,
    *,
    dtype: torch.dtype,
) -> None:
    """Re-run `n` sampled cells one trace each; BatchingMismatchError when any differs from its batched value."""
    picks = random.Random(0).sample(range(len(cells)), min(n, len(cells)))
    tol = tolerance_for(dtype)
    bad = []
    for k in picks:
        i, p = cells[k]
        single, _ = run(
            model,
            text_of(target),
            metric,
            edits=[Edit(site_list[i], (0,), (p,), acts[site_list[i]][0, [p]])],
            reference=reference,
        )
        diff = abs(float(single[0]) - float(batched[k]))
        if not diff <= tol:
            bad.append(
                f"  {site_list[i]} @ {p}: batched {float(batched[k]):.6g}, single {float(single[0]):.6g}, |diff| {diff:.3g}"
            )
    if bad:
        raise BatchingMismatchError(
            f"batched sweep disagrees with single-cell runs beyond {tol:g} in {len(bad)} of {len(picks)} checked cells:\n"
            + "\n".join(bad)
            + "\nthe batched path is wrong for this model (padding, position ids or batch-dependent modules): run with batch_size=1 and report it"
        )
