"""Attribution patching: the gradient approximation of activation patching, and a check of it against real patching.

Activation patching needs one forward per (site, position) cell; attribution patching needs two
forwards and one backward for the whole map, by linearizing the metric around the run that is
patched into: patched ~ target + (source_act - target_act) . d metric / d target_act. The
linearization can be badly wrong where the model is far from linear (nonlinear layers, saturated
softmax), so `check_attribution` re-runs the top cells with real patching and reports the error.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from . import compat
from .assertions import _fail
from .batching import _device, encode
from .deprecation import UNSET, moved_positionals, required
from .errors import ArgumentError, ArgumentTypeError, MetricError, SiteError, check_positive_int
from .forward import forward_kwargs
from .metrics import Metric, as_metric, per_row
from .prompts import pair_positions, text_of
from .results import Direction, EffectMap, check_direction
from .sites import (
    Site,
    execution_order,
    module_of,
    resolve_position,
    resolve_site,
    resolve_sites,
    site_value,
)
from .trace import Edit, _translate, normalized, reference_logits, run


def attribution_patch(
    model: Any,
    clean: Any,
    corrupt: Any,
    *old: Any,
    metric: Any = UNSET,
    sites: Any = "blocks",
    positions: Any = None,
    direction: Direction = "clean->corrupt",
    min_gap: float = 1e-4,
) -> EffectMap:
    """Approximate `sweep()` with two forwards and one backward: effect ~ (source - target activation) . gradient / (source - target metric).

    Same map as `sweep` (sites, tokens, positions, normalized values; `raw` = target + the linear
    term, i.e. the approximated patched metric), with kind 'attribution'. Check it with `check_attribution`.

    >>> approx = attribution_patch(model, "The capital of France is", "The capital of Germany is",   # doctest: +SKIP
    ...                            metric=logit_diff("Paris", "Berlin"), sites=["embed", "resid_post"])
    >>> approx.argmax()                                                                                # doctest: +SKIP
    ('embed', 4, 'France', 0.97)
    """
    args = moved_positionals("attribution_patch", "model, clean, corrupt", old, ("metric",), {"metric": metric})
    required("attribution_patch", args)
    metric = args["metric"]
    check_direction(direction)
    m = as_metric(model, metric)
    site_list = resolve_sites(model, sites)
    ct, _, _ = pair_positions(model, clean, corrupt, "last")
    cols = list(range(len(ct))) if positions is None else resolve_position(ct, positions, prompt=text_of(clean))
    source, target = (clean, corrupt) if direction == "clean->corrupt" else (corrupt, clean)
    reference = reference_logits(model, m, text_of(clean))

    src_metric, src_acts = run(model, text_of(source), m, save=site_list, reference=reference, lean=True)
    src = float(src_metric[0])
    tgt, tgt_acts, grads = gradients(model, text_of(target), m, site_list, reference=reference)
    what = f"attribution over {len(site_list)} sites x {len(cols)} positions"
    normalized(tgt, tgt, src, min_gap=min_gap, what=what)  # refuses a broken experiment before reporting any cell

    grid: list[list[float]] = []
    raw_grid: list[list[float]] = []
    with torch.no_grad():
        for site in site_list:
            delta = src_acts[site][0, cols].double() - tgt_acts[site][0, cols].double().to(src_acts[site].device)
            dots = (delta * grads[site][0, cols].double().to(delta.device)).sum(-1).tolist()
            raw_grid.append([tgt + d for d in dots])
            grid.append([normalized(tgt + d, tgt, src, min_gap=min_gap, what=what) for d in dots])

    clean_metric, corrupt_metric = (src, tgt) if direction == "clean->corrupt" else (tgt, src)
    return EffectMap(
        tuple(tuple(r) for r in grid),
        tuple(str(s) for s in site_list),
        tuple(ct[p] for p in cols),
        m.name,
        text_of(clean),
        text_of(corrupt),
        clean_metric,
        corrupt_metric,
        kind="attribution",
        raw=tuple(tuple(r) for r in raw_grid),
        positions=tuple(cols),
    )


def gradients(
    model: Any,
    prompt: str,
    metric: Metric,
    sites: Sequence[Site],
    *,
    reference: Any = None,
) -> tuple[float, dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
    """One forward and backward of `prompt`: (metric, activations, d metric / d activation) per site, all detached.

    Gradients go only to the site tensors (backward `inputs=`), so no parameter's `.grad` is touched.

    >>> value, acts, grads = gradients(model, "The capital of Germany is", as_metric(model, logit_diff("Paris", "Berlin")),   # doctest: +SKIP
    ...                                blocks(model))
    """
    # A head is a view of its projection's input; a hook on the view never fires (the model uses the
    # full tensor), so take the gradient of the full tensor once and slice the head afterwards.
    full = {s: dataclasses.replace(s, head=None, n_heads=None, label=None) for s in sites}
    order = execution_order(model, set(full.values()))
    if reference is not None:
        with torch.inference_mode(False):
            reference = reference.clone()  # an inference tensor cannot enter a graph that is differentiated
    acts: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    out: list[Any] = []
    picks: list[int] = []  # picks[k]: which gradient belongs to order[k]
    batch = encode(model, prompt)  # the served tokenizer (an encoder takes text here too)
    mask = batch.mask.to(_device(model)) if metric.takes_mask else None
    args, kwargs = (
        compat.trace_args(model, batch.args, batch.kwargs),
        compat.trace_kwargs_of(model, batch.args, batch.kwargs),
    )
    try:
        with torch.inference_mode(False), torch.enable_grad(), _differentiable(model):
            with model.trace(
                *args, **kwargs, **forward_kwargs(getattr(model, "_module", model), keep_last=metric.last_only)
            ):
                values = []
                for site in order:
                    values.append(site_value(model, site))
                    acts.append(values[-1].detach().clone().save())
                value = metric(model.output, reference, mask)
                if not (isinstance(value, torch.Tensor) and value.requires_grad):
                    raise MetricError(
                        f"metric {metric.name} is not differentiable (it returned {type(value).__name__}"
                        + (" without a gradient" if isinstance(value, torch.Tensor) else "")
                        + "): attribution patching needs gradients; use logit_diff, logprob or prob, or sweep() for this metric"
                    )
                out.append(value.detach().clone().save())
                # Two sites can be one tensor (e.g. the embeddings and block 0's input): ask for its gradient once.
                distinct = [v for k, v in enumerate(values) if all(v is not u for u in values[:k])]
                # Gradients arrive last layer first: nnsight 0.8 needs `.grad` read in reverse execution order.
                with value.sum().backward(inputs=distinct):
                    for v in reversed(distinct):
                        grads.append(v.grad.detach().clone().save())
                for v in values:
                    picks.append(next(k for k, u in enumerate(distinct) if u is v))
    except MetricError:
        raise
    except (AttributeError, IndexError, ValueError, RuntimeError, TypeError, NotImplementedError) as exc:
        raise _translate(exc, model, order) from exc
    grads = grads[::-1]
    by_full = {s: (acts[k], grads[picks[k]]) for k, s in enumerate(order)}
    value_row = per_row(out[0], 1, metric)
    act_of = {s: _select_head(by_full[full[s]][0], s) for s in sites}
    grad_of = {s: _select_head(by_full[full[s]][1], s) for s in sites}
    return float(value_row[0]), act_of, grad_of


def _select_head(hidden: torch.Tensor, site: Site) -> torch.Tensor:
    """The slice of a projection's input that one head writes, as `site_value` selects it inside a trace."""
    if site.head is None:
        return hidden
    b, t, d = hidden.shape
    return hidden.view(b, t, site.n_heads, d // site.n_heads)[:, :, site.head, :]


@contextmanager
def _differentiable(model: Any) -> Iterator[None]:
    """Every parameter requires grad for the duration (a frozen model has no graph to differentiate), then restored.

    Backward runs with `inputs=` the site tensors, so this never fills a parameter's `.grad`.
    """
    frozen = [p for p in module_of(model).parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


# -- checking the approximation ------------------------------------------------------------------


@dataclass(frozen=True)
class AttributionCheck:
    """Attribution-patching estimates of some cells next to the effects real patching measures there.

    `passed` when every |approx - true| is at most `atol` (both on the normalized scale of `sweep`).
    """

    cells: tuple[tuple[str, int, str], ...]  # (site, token index, token)
    approx: tuple[float, ...]
    true: tuple[float, ...]
    max_error: float
    atol: float
    passed: bool
    metric: str = ""
    clean_prompt: str = ""
    corrupt_prompt: str = ""

    @property
    def errors(self) -> tuple[float, ...]:
        return tuple(
            abs(a - t) if math.isfinite(a) and math.isfinite(t) else math.inf for a, t in zip(self.approx, self.true)
        )

    def to_text(self) -> str:
        """The checked cells as an aligned table; cells beyond `atol` are flagged with '!'."""
        head_row = ["site", "position", "approx", "true", "|error|"]
        rows = [
            [site, f"{pos} {tok!r}", f"{a:.4f}", f"{t:.4f}", f"{e:.4f}" + ("!" if not e <= self.atol else " ")]
            for (site, pos, tok), a, t, e in zip(self.cells, self.approx, self.true, self.errors)
        ]
        widths = [max(len(r[c]) for r in [head_row] + rows) for c in range(len(head_row))]
        return "\n".join(
            "  ".join(r[c].ljust(widths[c]) if c < 2 else r[c].rjust(widths[c]) for c in range(len(head_row)))
            for r in [head_row] + rows
        )

    def raise_if_failed(self) -> "AttributionCheck":
        """FindingFailed with the approx-vs-true table when any cell is off by more than `atol`; else self."""
        __tracebackhide__ = True
        if not self.passed:
            bad = sum(not e <= self.atol for e in self.errors)
            _fail(
                f"claim: attribution patching matches activation patching within {self.atol:g} on its top {len(self.cells)} cells",
                [
                    ("prompt", f"{self.corrupt_prompt!r} <- {self.clean_prompt!r}"),
                    ("metric", self.metric),
                    (
                        "measured",
                        f"max |approx - true| {self.max_error:.4g} > atol {self.atol:g} in {bad} of {len(self.cells)} cells",
                    ),
                    ("cells", "cells marked ! exceed atol\n" + self.to_text()),
                ],
                "the linear approximation breaks where the model is nonlinear: trust sweep() for these cells, "
                "or attribute to finer sites ('attn', 'mlp') where the linearization is closer",
            )
        return self

    def __repr__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return f"AttributionCheck({verdict}: max |approx - true| {self.max_error:.3g} {'<=' if self.passed else '>'} atol {self.atol:g} over {len(self.cells)} cells)"

    def __str__(self) -> str:
        return repr(self) + "\n" + self.to_text()


def check_attribution(
    model: Any,
    clean: Any,
    corrupt: Any,
    *old: Any,
    metric: Any = UNSET,
    approx: EffectMap = UNSET,
    top: int = 5,
    atol: float = 0.1,
    sites: Any = None,
    direction: Direction = "clean->corrupt",
    min_gap: float = 1e-4,
) -> AttributionCheck:
    """Patch the `top` cells of largest |approx| for real, one trace per cell, and compare; see `AttributionCheck.raise_if_failed`.

    `sites` defaults to the sites named by the map's row labels; give the `sites=` of `attribution_patch` when they were unlabeled.

    >>> check_attribution(model, clean, corrupt, metric=logit_diff("Paris", "Berlin"), approx=approx, top=5).raise_if_failed()  # doctest: +SKIP
    """
    args = moved_positionals(
        "check_attribution", "model, clean, corrupt", old, ("metric", "approx"), {"metric": metric, "approx": approx}
    )
    required("check_attribution", args)
    metric, approx = args["metric"], args["approx"]
    check_direction(direction)
    if not isinstance(approx, EffectMap):
        raise ArgumentTypeError(
            f"approx is a {type(approx).__name__}: expected the EffectMap returned by attribution_patch"
        )
    check_positive_int("top", top)
    if not (isinstance(atol, (int, float)) and atol >= 0):
        raise ArgumentError(f"atol {atol!r}: expected a non-negative number")
    if (approx.clean_prompt, approx.corrupt_prompt) != (text_of(clean), text_of(corrupt)):
        raise ArgumentError(
            f"approx was computed for {approx.clean_prompt!r} vs {approx.corrupt_prompt!r}, not {text_of(clean)!r} vs {text_of(corrupt)!r}"
        )
    m = as_metric(model, metric)
    if m.name != approx.metric:
        raise ArgumentError(f"approx was computed with metric {approx.metric}, not {m.name}")
    if sites is None:
        try:
            site_list = [resolve_site(model, label) for label in approx.sites]  # row labels are site names
        except SiteError as exc:
            raise SiteError(f"{exc}; pass the sites= given to attribution_patch") from None
    else:
        site_list = resolve_sites(model, sites)
    if [str(s) for s in site_list] != list(approx.sites):
        raise SiteError(f"sites {[str(s) for s in site_list]} do not match the map's rows {list(approx.sites)}")
    pair_positions(model, clean, corrupt, "last")

    ranked = sorted(
        ((i, j) for i in range(len(approx.sites)) for j in range(len(approx.positions))),
        key=lambda c: -abs(approx.values[c[0]][c[1]]) if math.isfinite(approx.values[c[0]][c[1]]) else -math.inf,
    )[:top]
    needed = list(dict.fromkeys(site_list[i] for i, _ in ranked))
    source, target = (clean, corrupt) if direction == "clean->corrupt" else (corrupt, clean)
    reference = reference_logits(model, m, text_of(clean))
    base, acts = run(model, [text_of(source), text_of(target)], m, save=needed, reference=reference)
    src, tgt = float(base[0]), float(base[1])
    what = f"checking attribution on {len(ranked)} cells"

    true = []
    for i, j in ranked:
        site, pos = site_list[i], approx.positions[j]
        patched, _ = run(
            model, text_of(target), m, edits=[Edit(site, (0,), (pos,), acts[site][0, [pos]])], reference=reference
        )
        true.append(normalized(float(patched[0]), tgt, src, min_gap=min_gap, what=what))
    estimates = [float(approx.values[i][j]) for i, j in ranked]
    errors = [abs(a - t) if math.isfinite(a) and math.isfinite(t) else math.inf for a, t in zip(estimates, true)]
    worst = max(errors) if errors else 0.0
    return AttributionCheck(
        tuple((approx.sites[i], approx.positions[j], approx.tokens[j]) for i, j in ranked),
        tuple(estimates),
        tuple(true),
        worst,
        float(atol),
        worst <= atol,
        m.name,
        approx.clean_prompt,
        approx.corrupt_prompt,
    )
