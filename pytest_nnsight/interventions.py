"""Interventions: patch, ablate and steer one site, each returning an `Effect`; the seed's `patch_layer`.

Prompts and positions live in `prompts.py`, the trace runner in `trace.py`; the names they used to
export from here still import from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .batching import encode, groups, mixed_lengths_ok
from .errors import ArgumentError, ArgumentTypeError, InterventionError, PositionError
from . import forward as _forward
from .metrics import Metric, as_metric, logits_of
from .prompts import Prompt, check_context, describe_positions, pair_positions, resolve_position, slots_of, text_of, tokens_of
from .prompts import show_tokens  # noqa: F401  (moved to prompts.py)
from .results import Effect
from .sites import Site, resolve_site
from .trace import Edit, normalized, reference_logits, run
from .trace import _apply, _cause_line, _reference, _translate  # noqa: F401  (moved to trace.py)

__all__ = [  # re-exported for code that imported them from here before prompts.py and trace.py
    "Edit", "Prompt", "TopTokens", "ablate", "check_context", "normalized", "pair_positions", "patch", "patch_layer",
    "reference_logits", "run", "slots_of", "steer", "text_of",
]


def patch(
    model: Any,
    clean: Any,
    corrupt: Any,
    *,
    site: Any,
    position: Any,
    metric: Any,
    direction: str = "clean->corrupt",
    controls: bool = False,
    control_position: Any = None,
    min_gap: float = 1e-4,
    seed: int = 0,
) -> Effect:
    """Activation patching: write one run's activation at (site, position) into the other run.

    direction 'clean->corrupt' (default) measures how much the patch restores the clean behaviour;
    'corrupt->clean' how much it breaks it. `controls=True` adds the same patch from a random donor
    of matched norm and at `control_position` (default: the first other non-special position).

    >>> effect = patch(model, "The capital of France is", "The capital of Germany is",   # doctest: +SKIP
    ...                site="transformer.h.0", position="France", metric=logit_diff("Paris", "Berlin"))
    """
    if direction not in ("clean->corrupt", "corrupt->clean"):
        raise ArgumentError(f"direction {direction!r}: expected 'clean->corrupt' or 'corrupt->clean'")
    m = as_metric(model, metric)
    s = resolve_site(model, site)
    ct, xt, pos = pair_positions(model, clean, corrupt, position)
    source, target = (clean, corrupt) if direction == "clean->corrupt" else (corrupt, clean)
    base, reference, src_act = _baselines(model, metric, m, s, text_of(clean), text_of(source), text_of(target), direction)
    values = src_act[pos]
    patched, _ = run(model, text_of(target), m, edits=[Edit(s, (0,) * len(pos), tuple(pos), values)], reference=reference)
    what = f"patching {s} at {describe_positions(ct, pos)}"
    eff = normalized(float(patched[0]), float(base[1]), float(base[0]), min_gap=min_gap, what=what)
    ctrl: dict[str, float] = {}
    if controls:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(values.shape, generator=gen).to(values.device, values.dtype)
        donor = noise / noise.norm(dim=-1, keepdim=True) * values.norm(dim=-1, keepdim=True)
        r, _ = run(model, text_of(target), m, edits=[Edit(s, (0,) * len(pos), tuple(pos), donor)], reference=reference)
        ctrl["random_donor"] = normalized(float(r[0]), float(base[1]), float(base[0]), min_gap=min_gap, what=what)
        other = _control_positions(model, ct, pos, control_position, text_of(clean))
        if other:
            r, _ = run(model, text_of(target), m, edits=[Edit(s, (0,) * len(other), tuple(other), src_act[other])], reference=reference)
            ctrl[f"position {other[0]} {ct[other[0]]!r}"] = normalized(float(r[0]), float(base[1]), float(base[0]), min_gap=min_gap, what=what)
    target_tokens = xt if direction == "clean->corrupt" else ct
    return Effect(
        "patch", str(s), tuple(pos), tuple(target_tokens[p] for p in pos), m.name, text_of(source), text_of(target),
        float(base[0]), float(base[1]), float(patched[0]), eff, direction, tuple(target_tokens), controls=ctrl,
    )


def _baselines(model: Any, spec: Any, m: Metric, s: Site, clean: str, source: str, target: str, direction: str) -> tuple[Any, Any, torch.Tensor]:
    """The unpatched metric of [source, target], the reference logits and the source activation at `s`; within a test,
    computed once per (model, prompts, metric object, direction) and once per site (see forward.baseline_scope)."""
    cache = _forward.baselines()
    key = (id(_forward.module_of(model)), source, target, id(spec), direction, _forward.weights_version(model)) if cache is not None else None
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        reference = reference_logits(model, m, clean)
        base, acts = run(model, [source, target], m, save=[s], reference=reference)
        hit = {"keep": (model, spec), "base": base, "reference": reference, "acts": {s: acts[s][0]}}  # keep: ids stay unique
        if cache is not None:
            cache[key] = hit
    if s not in hit["acts"]:
        none = Metric("none", lambda out, ref: torch.zeros(1), last_only=True)
        _, acts = run(model, source, none, save=[s], lean=True)
        hit["acts"][s] = acts[s][0]
    return hit["base"], hit["reference"], hit["acts"][s]


def _control_positions(model: Any, tokens: Sequence[str], pos: Sequence[int], control: Any, prompt: str) -> list[int]:
    if control is not None:
        return resolve_position(tokens, control, prompt=prompt)
    special = set(getattr(getattr(model, "tokenizer", None), "all_special_tokens", []) or [])
    for i, t in enumerate(tokens):
        if i not in pos and t not in special:
            return [i]
    return []


def ablate(
    model: Any,
    prompt: Any,
    *,
    site: Any,
    position: Any,
    metric: Any,
    method: str = "zero",
    reference_prompts: Sequence[Any] = (),
    donor: Any = None,
) -> Effect:
    """Ablation: replace the activation at (site, position) with zeros, its mean over `reference_prompts`, or a `donor` prompt's.

    `normalized` is the change relative to the unablated metric, (ablated - unablated) / |unablated|;
    `effect.delta` is the raw change (negative when the ablation lowers the metric).
    """
    if method not in ("zero", "mean", "resample"):
        raise ArgumentError(f"ablation method {method!r}: expected 'zero', 'mean' or 'resample'")
    m = as_metric(model, metric)
    s = resolve_site(model, site)
    text = text_of(prompt)
    tokens = tokens_of(model, text)
    check_context(model, tokens, text)
    pos = resolve_position(tokens, position, prompt=text, slots=slots_of(prompt))
    reference = reference_logits(model, m, text)
    base, acts = run(model, text, m, save=[s], reference=reference)
    width = acts[s].shape[-1]
    if method == "zero":
        values = torch.zeros(len(pos), width, device=acts[s].device, dtype=acts[s].dtype)
        how = "zero ablation"
    elif method == "mean":
        if not reference_prompts:
            raise ArgumentError("mean ablation needs reference_prompts: the prompts whose mean activation replaces this one")
        values = _mean_activation(model, s, reference_prompts, position, pos)
        how = f"mean ablation ({len(reference_prompts)} prompts)"
    else:
        if donor is None:
            raise ArgumentError("resample ablation needs donor=: the prompt whose activation replaces this one")
        values = _mean_activation(model, s, [donor], position, pos)
        how = f"resample ablation (from {text_of(donor)!r})"
    ablated, _ = run(model, text, m, edits=[Edit(s, (0,) * len(pos), tuple(pos), values)], reference=reference)
    b, a = float(base[0]), float(ablated[0])
    rel = (a - b) / abs(b) if b != 0 else math.copysign(math.inf, a - b) if a != b else 0.0
    return Effect(how, str(s), tuple(pos), tuple(tokens[p] for p in pos), m.name, "", text, b, b, a, rel, "ablation", tuple(tokens))


def _mean_activation(model: Any, site: Site, prompts: Sequence[Any], position: Any, own: Sequence[int]) -> torch.Tensor:
    """Mean over prompts of the activation at `position` resolved in each prompt (left padding accounted for).

    A word of the ablated prompt ('France') that a reference prompt lacks stands for the same indices `own`.
    """
    texts = [text_of(p) for p in prompts]
    token_lists = [tokens_of(model, t) for t in texts]
    rows: list[Any] = [None] * len(texts)
    for idx in groups([len(t) for t in token_lists], len(texts), mixed=mixed_lengths_ok(model)):
        chunk = [texts[i] for i in idx]
        batch = encode(model, chunk)
        m = Metric("none", lambda out, ref, k=len(chunk): torch.zeros(k))
        _, acts = run(model, chunk, m, save=[site])
        for r, i in enumerate(idx):
            tokens, prompt = token_lists[i], prompts[i]
            try:
                pos = resolve_position(tokens, position, prompt=text_of(prompt), slots=slots_of(prompt))
            except PositionError:
                if not (isinstance(position, str) and not position.startswith("{") and position != "last" and max(own) < len(tokens)):
                    raise
                pos = list(own)
            if len(pos) != len(own):
                raise PositionError(f"position {position!r} names {len(pos)} tokens in {text_of(prompt)!r} but {len(own)} in the ablated prompt")
            rows[i] = acts[site][r, batch.padded(r, pos)]
    return torch.stack(rows).mean(0)


def steer(model: Any, prompt: Any, *, site: Any, position: Any, vector: torch.Tensor, metric: Any, alpha: float = 1.0) -> Effect:
    """Steering: add `alpha * vector` to the activation at (site, position); `vector` must be [d] of that site."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ArgumentTypeError(f"alpha={alpha!r} ({type(alpha).__name__}): expected a finite number")
    if not math.isfinite(alpha):
        raise ArgumentError(f"alpha={alpha!r}: expected a finite number")
    m = as_metric(model, metric)
    s = resolve_site(model, site)
    text = text_of(prompt)
    tokens = tokens_of(model, text)
    check_context(model, tokens, text)
    pos = resolve_position(tokens, position, prompt=text, slots=slots_of(prompt))
    reference = reference_logits(model, m, text)
    base, acts = run(model, text, m, save=[s], reference=reference)
    width = acts[s].shape[-1]
    if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (width,):
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise InterventionError(f"steering vector of shape {shape} does not fit {s}: expected a tensor of shape ({width},); a broadcastable shape would silently change every position")
    if vector.device != acts[s].device:
        raise InterventionError(f"steering vector is on {vector.device} but the model runs on {acts[s].device}: move it with .to({str(acts[s].device)!r})")
    if not torch.isfinite(vector).all():
        raise InterventionError(f"steering vector for {s} contains NaN or inf: expected finite values")
    values = (alpha * vector.to(acts[s].dtype)).expand(len(pos), width)
    steered, _ = run(model, text, m, edits=[Edit(s, (0,) * len(pos), tuple(pos), values, op="add")], reference=reference)
    b, a = float(base[0]), float(steered[0])
    rel = (a - b) / abs(b) if b != 0 else (math.inf if a != b else 0.0)
    return Effect(f"steering (alpha={alpha:g})", str(s), tuple(pos), tuple(tokens[p] for p in pos), m.name, "", text, b, b, a, rel, "steering", tuple(tokens))


@dataclass(frozen=True)
class TopTokens:
    """The seed's `patch_layer` result: the next-token distribution after a patch, top k."""

    prompt: str
    source_prompt: str
    site: str
    position: int
    tokens: tuple[str, ...]
    probs: tuple[float, ...]

    def __repr__(self) -> str:
        top = ", ".join(f"{t!r} {p:.3f}" for t, p in zip(self.tokens, self.probs))
        return f"TopTokens({self.site} @ {self.position}: {top})"


def patch_layer(model: Any, prompt: str, source_prompt: str, layer: int, pos: int, k: int = 5) -> TopTokens:
    """The seed document's InterventionExp.patch_layer: the source prompt's hidden state at (layer, pos) written into the prompt's run; top-k tokens after."""
    from .sites import block

    s = block(model, layer)
    source_prompt, prompt = text_of(source_prompt), text_of(prompt)
    st, pt = tokens_of(model, source_prompt), tokens_of(model, prompt)
    check_context(model, st, source_prompt)
    check_context(model, pt, prompt)
    p_src = resolve_position(st, pos, prompt=source_prompt)
    p_dst = resolve_position(pt, pos, prompt=prompt)
    holder: list[torch.Tensor] = []

    def last_logits(out: Any, ref: Any) -> torch.Tensor:
        holder.append(logits_of(out)[0, -1].detach().float().cpu())
        return torch.zeros(1)

    keep = Metric("last logits", last_logits)
    _, acts = run(model, source_prompt, keep, save=[s])
    holder.clear()
    run(model, prompt, keep, edits=[Edit(s, (0,), (p_dst[0],), acts[s][0, p_src])])
    probs = holder[0].softmax(-1)
    top = torch.topk(probs, k)
    tok = model.tokenizer
    return TopTokens(prompt, source_prompt, str(s), p_dst[0], tuple(tok.decode([int(i)]) for i in top.indices), tuple(float(v) for v in top.values))
