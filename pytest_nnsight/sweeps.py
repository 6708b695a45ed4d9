"""Sweeps: the effect of patching every (site, position) cell, run batched and checked against single runs.

Several patched copies of the corrupt prompt go through one forward (chunked by `batch_size`,
so memory grows with the batch, not with the number of cells). Because batching is where silent
errors live (padded prompts mispredicting: nnsight #672, TransformerLens #1609), `check_batching`
re-runs a sample of cells one trace each and fails when they disagree.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from . import settings as _settings
from .errors import ArgumentError, BatchingMismatchError
from .findings import record_map
from .prompts import pair_positions, slots_of, text_of
from .trace import Edit, normalized, reference_logits, run
from .metrics import as_metric
from .results import EffectMap
from .sites import Site, resolve_position, resolve_sites


def sweep(
    model: Any,
    clean: Any,
    corrupt: Any,
    metric: Any,
    *,
    sites: Any = "blocks",
    positions: Any = None,
    batch_size: int = 32,
    direction: str = "clean->corrupt",
    check_batching: bool | None = None,
    check_cells: int | None = None,
    min_gap: float = 1e-4,
) -> EffectMap:
    """Patch every (site, position) cell from one run into the other; returns an EffectMap of normalized effects.

    `sites`: 'blocks' (default: every block's output), 'attn', 'mlp', or a list of sites (heads too).
    `positions`: None for every position, or anything `position=` accepts (a slice, a list, 'last').
    `check_batching`: None follows --nnsight-check-batching.

    >>> effects = sweep(model, "The capital of France is", "The capital of Germany is",   # doctest: +SKIP
    ...                 logit_diff("Paris", "Berlin"))
    >>> effects.argmax()                                                                   # doctest: +SKIP
    ('block 1', 5, 'is', 1.0)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ArgumentError(f"batch_size {batch_size!r}: expected a positive int")
    if direction not in ("clean->corrupt", "corrupt->clean"):
        raise ArgumentError(f"direction {direction!r}: expected 'clean->corrupt' or 'corrupt->clean'")
    m = as_metric(model, metric)
    site_list = resolve_sites(model, sites)
    ct, xt, _ = pair_positions(model, clean, corrupt, "last")
    cols = list(range(len(ct))) if positions is None else resolve_position(ct, positions, prompt=text_of(clean), slots=slots_of(clean))
    source, target = (clean, corrupt) if direction == "clean->corrupt" else (corrupt, clean)
    reference = reference_logits(model, m, text_of(clean))
    base, acts = run(model, [text_of(source), text_of(target)], m, save=site_list, reference=reference)
    src, tgt = float(base[0]), float(base[1])
    what = f"sweeping {len(site_list)} sites x {len(cols)} positions"
    normalized(tgt, tgt, src, min_gap=min_gap, what=what)  # refuses a broken experiment before any cell runs

    cells = [(i, p) for i in range(len(site_list)) for p in cols]
    raw = torch.empty(len(cells))
    for start in range(0, len(cells), batch_size):
        chunk = cells[start : start + batch_size]
        edits = []
        for i, site in enumerate(site_list):
            rows = [r for r, (si, _) in enumerate(chunk) if si == i]
            if rows:
                pos = [chunk[r][1] for r in rows]
                edits.append(Edit(site, tuple(rows), tuple(pos), acts[site][0, pos]))
        values, _ = run(model, [text_of(target)] * len(chunk), m, edits=edits, reference=reference)
        raw[start : start + len(chunk)] = values

    grid = [[0.0] * len(cols) for _ in site_list]
    raw_grid = [[0.0] * len(cols) for _ in site_list]
    for (i, p), v in zip(cells, raw.tolist()):
        j = cols.index(p)
        raw_grid[i][j] = v
        grid[i][j] = normalized(v, tgt, src, min_gap=min_gap, what=what)

    active = _settings.ACTIVE
    if check_batching if check_batching is not None else (active is not None and active.check_batching):
        n = check_cells or (active.check_batching_cells if active is not None else 3)
        verify_cells(model, target, m, site_list, acts, cells, raw, reference, n, dtype=acts[site_list[0]].dtype)

    effects = EffectMap(
        tuple(tuple(r) for r in grid), tuple(str(s) for s in site_list), tuple(ct[p] for p in cols), m.name,
        text_of(clean), text_of(corrupt), src if direction == "clean->corrupt" else tgt, tgt if direction == "clean->corrupt" else src,
        raw=tuple(tuple(r) for r in raw_grid), positions=tuple(cols),
    )
    record_map(effects)  # for the findings report (a no-op outside a test)
    return effects


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
