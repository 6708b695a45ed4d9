"""What nnsight itself does with a model: probes through real nnsight traces, for the structure record.

The structure record (`structure.model_structure`) is taken with plain torch hooks, so it cannot see
what changes inside nnsight. These probes run the idioms raw test code uses and record the outcome as
categories (never raw numbers, so the record is stable across runs):

- `padding`: a left-padded row of `model.trace([short, long])` against the short prompt alone, at the
  last position: `same as alone` on nnsight 0.8 (it adds position_ids), `differs from alone` on <= 0.7
  (hazards H4/H5).
- `block_output`: what `.output` of the first block is inside a trace (a tuple on transformers 4.57, a
  tensor on 5: H1/H2), with symbolic dims like the torch record.
- `gradient`: whether `with loss.backward(): block.output.grad.save()` gives the gradient.

`structure_diff.explain_semantics` explains a change in any of them like a container change.
"""

from __future__ import annotations

from typing import Any

from .specs import spec_of

SHORT, LONG = "The capital of France is", "Everyone knows that the capital of the country of France is"
SAME, DIFFERS = "same as alone", "differs from alone"
TOLERANCE = 1e-3  # relative to the logits' scale; nnsight 0.8 agrees to ~2e-6, <= 0.7 moves them by ~0.1-0.4


def _block_path(model: Any) -> str | None:
    try:
        from .sites import block

        return block(model, 0).path
    except Exception:  # noqa: BLE001 - a model without a known block layout: no block probes
        return None


def _spec(value: Any, batch: int, length: int) -> Any:
    return _symbolic(spec_of(value), batch, length)


def _symbolic(spec: Any, batch: int, length: int) -> Any:
    if isinstance(spec, tuple) and spec and spec[0] == "Tensor":
        dims = ["b" if i == 0 and d == batch else "s" if d == length else str(d) for i, d in enumerate(spec[1])]
        return f"Tensor[{','.join(dims)}] {spec[2]}"
    if isinstance(spec, dict) and len(spec) == 1:
        kind, body = next(iter(spec.items()))
        if isinstance(body, list):
            return {kind: [_symbolic(v, batch, length) for v in body]}
        if isinstance(body, dict):
            return {kind: {k: _symbolic(v, batch, length) for k, v in body.items()}}
    return spec


def _error(exc: BaseException) -> str:
    from .compat import cause_line

    return f"error ({type(exc).__name__}: {cause_line(exc)[:120]})"


def probe(model: Any) -> dict[str, Any]:
    """The nnsight semantics of `model` (an nnsight language-model wrapper with a tokenizer); {} otherwise."""
    import torch

    from .compat import is_language_model
    from .metrics import logits_of
    from .sites import envoy_at

    if not is_language_model(model) or getattr(model, "tokenizer", None) is None:
        return {}
    out: dict[str, Any] = {}
    path = _block_path(model)
    length = int(model.tokenizer(SHORT, return_tensors="pt")["input_ids"].shape[1])
    holder: list[Any] = []
    try:
        with torch.inference_mode():
            with model.trace(SHORT):
                if path is not None:
                    holder.append(_spec(envoy_at(model, path).output, 1, length))
                alone = logits_of(model.output)[:, -1, :].detach().clone().save()
            with model.trace([SHORT, LONG]):
                padded = logits_of(model.output)[:, -1, :].detach().clone().save()
        scale = float(alone.abs().max()) or 1.0
        diff = float((padded[0] - alone[0]).abs().max()) / scale
        out["padding"] = SAME if diff <= TOLERANCE else DIFFERS
    except Exception as exc:  # noqa: BLE001 - the probe records what happened, it never fails the record
        out["padding"] = _error(exc)
    if path is not None:
        out["block"] = path
        out["block_output"] = holder[0] if holder else "not read"
        out["gradient"] = _gradient(model, path)
    return out


def _gradient(model: Any, path: str) -> str:
    """`with loss.backward(): g = block.output.grad.save()` inside a trace (the nnsight 0.5+ idiom)."""
    import torch

    from .metrics import logits_of
    from .sites import envoy_at

    grads: list[Any] = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            with model.trace(SHORT):
                hidden = envoy_at(model, path).output
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                loss = logits_of(model.output)[:, -1, :].sum()
                with loss.backward():
                    grad = hidden.grad
                    grads.append(grad.detach().clone().save() if grad is not None else None)
    except Exception as exc:  # noqa: BLE001
        return _error(exc)
    if not grads:
        return "not assigned (the backward block did not run)"
    g = grads[0]
    return (
        "available"
        if isinstance(g, torch.Tensor) and bool(torch.isfinite(g).all())
        else f"unavailable ({type(g).__name__})"
    )
