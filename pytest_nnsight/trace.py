"""The trace runner: one forward pass with edits applied in execution order, inside one nnsight trace.

`run` saves activations detached and cloned (a later in-place op cannot change them: nnsight issue
#630) and evaluates the metric inside the trace, so only one number per row leaves it. Errors nnsight
raises from deep inside a trace come back as one `InterventionError` naming the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import compat
from .batching import _device, encode
from .errors import BrokenExperimentError, InterventionError, NnsightTestError, PositionError
from .forward import forward_kwargs
from .metrics import Metric, logits_of, per_row
from .remote import is_remote, trace_kwargs
from .sites import Site, execution_order, site_value


@dataclass(frozen=True)
class Edit:
    """Write `values[k]` (op 'set') or add it (op 'add') at (rows[k], positions[k]) of a site; op 'copy' writes there
    the same site and position of batch row `values[k]` of the same forward (a donor row traced alongside)."""

    site: Site
    rows: tuple[int, ...]
    positions: tuple[int, ...]
    values: torch.Tensor  # [k, d]
    op: str = "set"


def run(
    model: Any,
    inputs: Any,
    metric: Metric,
    *,
    edits: Sequence[Edit] = (),
    save: Sequence[Site] = (),
    reference: Any = None,
    lean: bool = False,
) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
    """One forward over `inputs` with `edits` applied; returns (metric per row on CPU, saved activations).

    `lean`: no key/value cache, and the LM head on the last position only when the metric reads no other
    (`Metric.last_only`; see pytest_nnsight.forward.forward_kwargs)."""
    rows = len(inputs) if isinstance(inputs, list) else 1
    batch = encode(model, inputs)  # the served tokenizer, its padding side, and each row's real-token mask
    mask = batch.mask.to(_device(model)) if metric.takes_mask else None
    order = execution_order(model, {e.site for e in edits} | set(save))
    by_site: dict[Site, list[Edit]] = {}
    for e in edits:
        by_site.setdefault(e.site, []).append(e)
    saved: dict[Site, torch.Tensor] = {}
    result: list[Any] = []
    remote = is_remote(model)  # --nnsight-remote: the trace runs where the model is, so edits move to its device
    try:
        with torch.inference_mode():
            extra = forward_kwargs(getattr(model, "_module", model), keep_last=metric.last_only) if lean else {}
            args, kwargs = (
                compat.trace_args(model, batch.args, batch.kwargs),
                compat.trace_kwargs_of(model, batch.args, batch.kwargs),
            )
            with model.trace(*args, **kwargs, **extra, **trace_kwargs(model)):
                for site in order:
                    value = site_value(model, site)
                    if site in save:
                        saved[site] = value.detach().clone().save()
                    for e in by_site.get(site, ()):
                        _apply(value, e, move=remote)
                result.append(metric(model.output, reference, mask).save())
    except NnsightTestError as exc:  # ours, raised inside the trace: drop nnsight's frames from what pytest shows
        raise exc.with_traceback(None)  # noqa: B904 - keeps its own cause (a user metric's frames)
    except (AttributeError, LookupError, ValueError, RuntimeError, TypeError) as exc:
        err = _translate(exc, model, order)
        err.original = exc  # nnsight's own exception, for debugging; not chained, so tracebacks stay short
        raise err from None
    return per_row(result[0], rows, metric), saved


def _apply(value: torch.Tensor, edit: Edit, move: bool = False) -> None:
    if edit.op == "copy":  # values: the batch row each patched row copies from, within this same forward
        rows = torch.tensor(edit.rows, device=value.device)
        pos = torch.tensor(edit.positions, device=value.device)
        src_rows = edit.values.to(device=value.device)
        with compat.edit_mode(value):
            value[rows, pos, :] = value[src_rows, pos, :].clone()
        return
    expected = (len(edit.rows), value.shape[-1])
    if tuple(edit.values.shape) != expected:
        # a broadcastable shape would be accepted by torch and overwrite more than asked (hazard H11)
        raise InterventionError(
            f"cannot write a [{', '.join(map(str, edit.values.shape))}] value at {edit.site} (activation shape "
            f"[{', '.join(map(str, value.shape))}]): expected exactly [{expected[0]}, {expected[1]}], one row per patched cell"
        )
    if value.shape[-1] != edit.values.shape[-1]:
        raise InterventionError(
            f"cannot write a [{', '.join(map(str, edit.values.shape))}] value into {edit.site} of shape [{', '.join(map(str, value.shape))}]: the last dimension differs"
        )
    if edit.values.device != value.device and not move:
        raise InterventionError(
            f"value for {edit.site} is on {edit.values.device} but the model runs on {value.device}: move it with .to({str(value.device)!r})"
        )
    rows = torch.tensor(edit.rows, device=value.device)
    pos = torch.tensor(edit.positions, device=value.device)
    src = edit.values.to(device=value.device, dtype=value.dtype)  # a no-op locally (devices checked above)
    with compat.edit_mode(value):
        if edit.op == "add":
            value[rows, pos, :] += src
        else:
            value[rows, pos, :] = src


def _translate(exc: Exception, model: Any, sites: Sequence[Site]) -> Exception:
    """One clear message for the errors nnsight raises from deep inside a trace, whatever its version calls them."""
    if isinstance(exc, (InterventionError, PositionError)):
        return exc
    name = type(exc).__name__
    text = _cause_line(exc) or name
    where = ", ".join(map(str, sites)) or "the model output"
    if compat.is_not_reached(exc):
        return InterventionError(
            f"site(s) {where} were not reached in the forward pass ({name}: {text}); is the module used by this model's forward?"
        )
    if "expanded size" in text or "shape" in text:
        return InterventionError(f"a value written at {where} does not fit its shape: {text}")
    return InterventionError(f"the trace failed at {where}: {name}: {text}")


_cause_line = compat.cause_line


def normalized(intervened: float, target: float, source: float, *, min_gap: float, what: str) -> float:
    """(intervened - target) / (source - target), refusing when source and target barely differ."""
    gap = source - target
    if not (math.isfinite(source) and math.isfinite(target)):
        return math.nan
    if abs(gap) <= min_gap:
        raise BrokenExperimentError(
            f"{what}: the two runs barely differ ({source:.6g} vs {target:.6g}, gap {gap:.3g} <= min_gap {min_gap:g}), so the "
            "normalized effect would divide noise by noise. The corrupt prompt must change the metric: pick one that flips the answer."
        )
    return (intervened - target) / gap


def reference_logits(model: Any, metric: Metric, clean: str) -> Any:
    """The clean prompt's last-position logits for metrics that compare against them (kl_div); None otherwise."""
    if not metric.needs_reference:
        return None
    batch = encode(model, clean)
    with torch.inference_mode():
        with model.trace(
            *compat.trace_args(model, batch.args, batch.kwargs),
            **compat.trace_kwargs_of(model, batch.args, batch.kwargs),
            **trace_kwargs(model),
        ):
            last = logits_of(model.output)[:, -1, :].detach().clone().save()
    return last


_reference = reference_logits  # the name sweeps and attribution imported before trace.py
