"""Sweeps: the effect of patching every (site, position) cell, run batched and checked against single runs.

Several patched copies of the corrupt prompt go through one forward (chunked by `batch_size`,
so memory grows with the batch, not with the number of cells). Because batching is where silent
errors live (padded prompts mispredicting: nnsight #672, TransformerLens #1609), `check_batching`
re-runs a sample of cells one trace each and fails when they disagree.
"""

from __future__ import annotations

import random
import weakref
from typing import Any, Sequence

import torch

from . import forward as _forward, settings as _settings
from .batching import ids_of
from .deprecation import UNSET, moved_positionals, required
from .errors import ArgumentError, BatchingMismatchError
from .findings import record_map
from .metrics import as_metric, logits_of, per_row
from .prompts import TokenPrompt, pair_positions, slots_of, text_of
from .results import Direction, EffectMap, Reuse
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
    args = moved_positionals("sweep", "model, clean, corrupt", old, ("metric",), {"metric": metric})  # the old sweep(m, c, x, metric)
    required("sweep", args)
    metric = args["metric"]
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ArgumentError(f"batch_size {batch_size!r}: expected a positive int (or None to size chunks by memory_budget)")
    if memory_budget is not None and (not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget < 1):
        raise ArgumentError(f"memory_budget {memory_budget!r}: expected a positive number of bytes")
    if direction not in ("clean->corrupt", "corrupt->clean"):
        raise ArgumentError(f"direction {direction!r}: expected 'clean->corrupt' or 'corrupt->clean'")
    if reuse not in ("prefix", "none"):
        raise ArgumentError(f"reuse {reuse!r}: expected 'prefix' or 'none'")
    m = as_metric(model, metric)
    site_list = resolve_sites(model, sites)
    ct, xt, _ = pair_positions(model, clean, corrupt, "last")
    cols = list(range(len(ct))) if positions is None else resolve_position(ct, positions, prompt=text_of(clean), slots=slots_of(clean))
    source, target = (clean, corrupt) if direction == "clean->corrupt" else (corrupt, clean)
    what = f"sweeping {len(site_list)} sites x {len(cols)} positions"
    cells = [(i, p) for i in range(len(site_list)) for p in cols]
    plan = _forward.plan_for(model) if reuse == "prefix" else None
    starts = [plan.start_of(s) for s in site_list] if plan is not None else []
    if plan is None or any(s is None for s in starts):
        plan = None
    rows = batch_size or _forward.rows_per_chunk(plan, model, len(ct), m.last_only, memory_budget or _forward.DEFAULT_MEMORY_BUDGET)
    done = None
    if plan is not None:
        done = prefix_cells(model, plan, starts, text_of(source), text_of(target), m, site_list, cells, rows,
                            clean_first=direction == "clean->corrupt", min_gap=min_gap, what=what)
        plan = plan if done is not None else None
    if done is not None:
        src, tgt, acts, raw = done
    else:
        src, tgt, acts, raw = plain_cells(model, text_of(source), text_of(target), text_of(clean), m, site_list, cells, rows, min_gap=min_gap, what=what)

    grid = [[0.0] * len(cols) for _ in site_list]
    raw_grid = [[0.0] * len(cols) for _ in site_list]
    for (i, p), v in zip(cells, raw.tolist()):
        j = cols.index(p)
        raw_grid[i][j] = v
        grid[i][j] = normalized(v, tgt, src, min_gap=min_gap, what=what)

    active = _settings.settings_of(model)
    if check_batching if check_batching is not None else active.check_batching:
        n = check_cells or active.check_batching_cells
        key = ("prefix" if plan is not None else "plain", tuple(map(str, site_list)), min(rows, len(cells)), len(ct), m.last_only)
        if not _verdict_known(model, key, n):
            reference = reference_logits(model, m, text_of(clean))
            verify_cells(model, target, m, site_list, acts, cells, raw, reference, n, dtype=acts[site_list[0]].dtype)
            _remember_verdict(model, key, n)

    effects = EffectMap(
        tuple(tuple(r) for r in grid), tuple(str(s) for s in site_list), tuple(ct[p] for p in cols), m.name,
        text_of(clean), text_of(corrupt), src if direction == "clean->corrupt" else tgt, tgt if direction == "clean->corrupt" else src,
        raw=tuple(tuple(r) for r in raw_grid), positions=tuple(cols),
    )
    record_map(effects)  # for the findings report (a no-op outside a test)
    return effects


def prefix_cells(
    model: Any, plan: Any, starts: Sequence[Any], source: str, target: str, metric: Any, site_list: Sequence[Site],
    cells: Sequence[tuple[int, int]], rows: int, *, clean_first: bool, min_gap: float, what: str,
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
        todo = [_forward.Row(starts[cells[k][0]], (cells[k][1],), acts[site_list[cells[k][0]]][0, [cells[k][1]]]) for k in chunk]
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
    model: Any, source: str, target: str, clean: str, metric: Any, site_list: Sequence[Site], cells: Sequence[tuple[int, int]],
    rows: int, *, min_gap: float, what: str,
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
        values, saved = run(model, inputs, metric, edits=edits, save=site_list if first else (), reference=reference, lean=True)
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
    model: Any, target: Any, metric: Any, site_list: Sequence[Site], acts: dict, cells: Sequence[tuple[int, int]],
    batched: torch.Tensor, reference: Any, n: int, *, dtype: torch.dtype,
) -> None:
    """Re-run `n` sampled cells one trace each; BatchingMismatchError when any differs from its batched value."""
    picks = random.Random(0).sample(range(len(cells)), min(n, len(cells)))
    tol = tolerance_for(dtype)
    bad = []
    for k in picks:
        i, p = cells[k]
        single, _ = run(model, text_of(target), metric, edits=[Edit(site_list[i], (0,), (p,), acts[site_list[i]][0, [p]])], reference=reference)
        diff = abs(float(single[0]) - float(batched[k]))
        if not diff <= tol:
            bad.append(f"  {site_list[i]} @ {p}: batched {float(batched[k]):.6g}, single {float(single[0]):.6g}, |diff| {diff:.3g}")
    if bad:
        raise BatchingMismatchError(
            f"batched sweep disagrees with single-cell runs beyond {tol:g} in {len(bad)} of {len(picks)} checked cells:\n"
            + "\n".join(bad)
            + "\nthe batched path is wrong for this model (padding, position ids or batch-dependent modules): run with batch_size=1 and report it"
        )
