"""Interventions: patch, ablate and steer one site, each returning an `Effect`; the seed's `patch_layer`.

Prompts and positions live in `prompts.py`, the trace runner in `trace.py`; the names they used to
export from here still import from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import forward as _forward
from .batching import encode, groups, mixed_lengths_ok
from .deprecation import UNSET, deprecated, required
from .errors import ArgumentError, ArgumentTypeError, InterventionError, PositionError
from .findings import recorded
from .metrics import Metric, as_metric, logits_of
from .prompts import (
    Prompt,
    check_context,
    describe_positions,
    pair_positions,
    resolve_position,
    show_tokens,
    slots_of,
    text_of,
    tokens_of,
)
from .remote import trace_kwargs
from .results import AblationMethod, Direction, Effect
from .sites import Site, resolve_site, site
from .trace import Edit, _apply, _cause_line, _reference, _translate, normalized, reference_logits, run  # noqa: F401  (moved to trace.py)

__all__ = [  # re-exported for code that imported them from here before prompts.py and trace.py
    "Edit",
    "Prompt",
    "TopTokens",
    "ablate",
    "check_context",
    "normalized",
    "pair_positions",
    "patch",
    "patch_layer",
    "reference_logits",
    "run",
    "slots_of",
    "steer",
    "text_of",
]


def patch(
    model: Any,
    clean: Any,
    corrupt: Any,
    *,
    site: Any,
    position: Any,
    metric: Any,
    direction: Direction = "clean->corrupt",
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
    base, reference, src_act = _baselines(
        model, metric, m, s, text_of(clean), text_of(source), text_of(target), direction
    )
    values = src_act[pos]
    patched, _ = run(
        model, text_of(target), m, edits=[Edit(s, (0,) * len(pos), tuple(pos), values)], reference=reference
    )
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
            r, _ = run(
                model,
                text_of(target),
                m,
                edits=[Edit(s, (0,) * len(other), tuple(other), src_act[other])],
                reference=reference,
            )
            ctrl[f"position {other[0]} {ct[other[0]]!r}"] = normalized(
                float(r[0]), float(base[1]), float(base[0]), min_gap=min_gap, what=what
            )
    target_tokens = xt if direction == "clean->corrupt" else ct
    return recorded(
        Effect(
            kind="patch",
            site=str(s),
            positions=tuple(pos),
            position_tokens=tuple(target_tokens[p] for p in pos),
            metric=m.name,
            source_prompt=text_of(source),
            target_prompt=text_of(target),
            source=float(base[0]),
            target=float(base[1]),
            intervened=float(patched[0]),
            normalized=eff,
            direction=direction,
            tokens=tuple(target_tokens),
            controls=ctrl,
        )
    )


def _baselines(
    model: Any, spec: Any, m: Metric, s: Site, clean: str, source: str, target: str, direction: str
) -> tuple[Any, Any, torch.Tensor]:
    """The unpatched metric of [source, target], the reference logits and the source activation at `s`; within a test,
    computed once per (model, prompts, metric object, direction) and once per site (see forward.baseline_scope)."""
    cache = _forward.baselines()
    # a remote run never reuses local runs
    key = (
        (
            id(_forward.module_of(model)),
            source,
            target,
            id(spec),
            direction,
            _forward.weights_version(model),
            tuple(sorted(trace_kwargs(model).items())),
        )
        if cache is not None
        else None
    )
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        reference = reference_logits(model, m, clean)
        base, acts = run(model, [source, target], m, save=[s], reference=reference)
        # keep: ids stay unique
        hit = {
            "keep": (model, spec),
            "base": base,
            "reference": reference,
            "acts": {s: acts[s][0]},
        }
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
    method: AblationMethod = "zero",
    reference_prompts: Sequence[Any] = (),
    donor: Any = None,
) -> Effect:
    """Ablation: replace the activation at (site, position) with zeros, its mean over `reference_prompts`, or a `donor` prompt's.

    `normalized` is the change relative to the unablated metric, (ablated - unablated) / |unablated|;
    `effect.delta` is the raw change (negative when the ablation lowers the metric).
    """
    if method not in ("zero", "mean", "resample"):
        raise ArgumentError(f"ablation method {method!r}: expected 'zero', 'mean' or 'resample'")
    one = _Unedited.measure(model, prompt, site, position, metric)
    pos = one.positions
    if method == "zero":
        values = torch.zeros(len(pos), one.act.shape[-1], device=one.act.device, dtype=one.act.dtype)
        how = "zero ablation"
    elif method == "mean":
        if not reference_prompts:
            raise ArgumentError(
                "mean ablation needs reference_prompts: the prompts whose mean activation replaces this one"
            )
        values = _mean_activation(model, one.site, reference_prompts, position, pos)
        how = f"mean ablation ({len(reference_prompts)} prompts)"
    else:
        if donor is None:
            raise ArgumentError("resample ablation needs donor=: the prompt whose activation replaces this one")
        values = _mean_activation(model, one.site, [donor], position, pos)
        how = f"resample ablation (from {text_of(donor)!r})"
    return one.effect(model, values, "set", kind=how, direction="ablation")


@dataclass(frozen=True)
class _Unedited:
    """One prompt's unedited run, measured at one site: what `ablate` and `steer` share before and after their edit."""

    metric: Metric
    site: Site
    text: str
    tokens: list[str]
    positions: list[int]
    reference: Any
    value: float  # the metric without the edit
    act: torch.Tensor  # the activation at `site`, [1, seq, d]

    @classmethod
    def measure(cls, model: Any, prompt: Any, site: Any, position: Any, metric: Any) -> _Unedited:
        m = as_metric(model, metric)
        s = resolve_site(model, site)
        text = text_of(prompt)
        tokens = tokens_of(model, text)
        check_context(model, tokens, text)
        pos = resolve_position(tokens, position, prompt=text, slots=slots_of(prompt))
        reference = reference_logits(model, m, text)
        base, acts = run(model, text, m, save=[s], reference=reference)
        return cls(m, s, text, tokens, pos, reference, float(base[0]), acts[s])

    def effect(self, model: Any, values: torch.Tensor, op: str, *, kind: str, direction: str) -> Effect:
        """Run the prompt again with `values` set or added (`op`) at the positions; the change as a recorded Effect.

        `normalized` is (edited - unedited) / |unedited|, a signed infinity when the unedited metric is 0.
        """
        pos = self.positions
        edited, _ = run(
            model,
            self.text,
            self.metric,
            edits=[Edit(self.site, (0,) * len(pos), tuple(pos), values, op=op)],
            reference=self.reference,
        )
        b, a = self.value, float(edited[0])
        rel = (a - b) / abs(b) if b != 0 else math.copysign(math.inf, a - b) if a != b else 0.0
        return recorded(
            Effect(
                kind=kind,
                site=str(self.site),
                positions=tuple(pos),
                position_tokens=tuple(self.tokens[p] for p in pos),
                metric=self.metric.name,
                source_prompt="",
                target_prompt=self.text,
                source=b,
                target=b,
                intervened=a,
                normalized=rel,
                direction=direction,
                tokens=tuple(self.tokens),
            )
        )


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
                if not (
                    isinstance(position, str)
                    and not position.startswith("{")
                    and position != "last"
                    and max(own) < len(tokens)
                ):
                    raise
                pos = list(own)
            if len(pos) != len(own):
                raise PositionError(
                    f"position {position!r} names {len(pos)} tokens in {text_of(prompt)!r} but {len(own)} in the ablated prompt"
                )
            rows[i] = acts[site][r, batch.padded(r, pos)]
    return torch.stack(rows).mean(0)


def steer(
    model: Any, prompt: Any, *, site: Any, position: Any, vector: torch.Tensor, metric: Any, alpha: float = 1.0
) -> Effect:
    """Steering: add `alpha * vector` to the activation at (site, position); `vector` must be [d] of that site."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ArgumentTypeError(f"alpha={alpha!r} ({type(alpha).__name__}): expected a finite number")
    if not math.isfinite(alpha):
        raise ArgumentError(f"alpha={alpha!r}: expected a finite number")
    one = _Unedited.measure(model, prompt, site, position, metric)
    s, act = one.site, one.act
    width = act.shape[-1]
    if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (width,):
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise InterventionError(
            f"steering vector of shape {shape} does not fit {s}: expected a tensor of shape ({width},); a broadcastable shape would silently change every position"
        )
    if vector.device != act.device:
        raise InterventionError(
            f"steering vector is on {vector.device} but the model runs on {act.device}: move it with .to({str(act.device)!r})"
        )
    if not torch.isfinite(vector).all():
        raise InterventionError(f"steering vector for {s} contains NaN or inf: expected finite values")
    values = (alpha * vector.to(act.dtype)).expand(len(one.positions), width)
    return one.effect(model, values, "add", kind=f"steering (alpha={alpha:g})", direction="steering")


@dataclass(frozen=True)
class TopTokens:
    """`patch_layer`'s result: the next-token distribution of the patched run, top k.

    `prompt` is the prompt patched (corrupt), `source_prompt` the one the activation comes from (clean);
    `position` is the first patched position of `prompt`, `positions` all of them.
    """

    prompt: str
    source_prompt: str
    site: str
    position: int
    tokens: tuple[str, ...]
    probs: tuple[float, ...]
    positions: tuple[int, ...] = ()

    def __repr__(self) -> str:
        top = ", ".join(f"{t!r} {p:.3f}" for t, p in zip(self.tokens, self.probs))
        where = self.position if len(self.positions) <= 1 else f"{self.positions[0]}..{self.positions[-1]}"
        return f"TopTokens({self.site} @ {where}: {top})"


_OLD_ORDER = ("prompt", "source_prompt", "layer", "pos", "k")


def patch_layer(
    model: Any,
    *old: Any,
    clean: Any = UNSET,
    corrupt: Any = UNSET,
    layer: int = UNSET,
    position: Any = UNSET,
    k: int = UNSET,
    prompt: Any = UNSET,
    source_prompt: Any = UNSET,
    pos: Any = UNSET,
) -> TopTokens:
    """Write the clean run's residual stream after block `layer` at `position` into the corrupt run; the top-k next tokens after.

    `position` is anything `patch` accepts, resolved in each prompt: an int (negative from the end), "last", a
    slice (`slice(None)` patches the whole layer; both prompts then need the same token length), a list, a word
    of either prompt (a word only one prompt has names the same indices in the other) or a slot.

    The old spelling `patch_layer(model, prompt, source_prompt, layer, pos, k)` (prompts by position: the one
    patched first, the source second) and the keywords `prompt=`, `source_prompt=`, `pos=` still work with a
    DeprecationWarning.

    >>> patch_layer(model, clean="The capital of France is", corrupt="The capital of Germany is",   # doctest: +SKIP
    ...             layer=1, position="last").tokens[0]
    ' Paris'
    """
    given = {"prompt": prompt, "source_prompt": source_prompt, "layer": layer, "pos": pos, "k": k}
    if old:
        if len(old) > len(_OLD_ORDER):
            raise ArgumentTypeError(
                f"patch_layer() takes 1 positional argument (model) but {1 + len(old)} were given: pass clean=, corrupt=, layer=, position="
            )
        for name, value in zip(_OLD_ORDER, old):
            if given[name] is not UNSET:
                raise ArgumentTypeError(f"patch_layer() got {name} twice, by position and as {name}=")
            given[name] = value
        deprecated(
            "patch_layer(model, prompt, source_prompt, layer, pos) with its arguments by position (the prompt patched first, the source second)",
            "write patch_layer(model, clean=source_prompt, corrupt=prompt, layer=layer, position=pos), the order of patch()",
        )
    elif any(given[n] is not UNSET for n in ("prompt", "source_prompt", "pos")):
        deprecated(
            "patch_layer's keywords prompt=, source_prompt= and pos=",
            "write corrupt= (the prompt patched), clean= (the source) and position=",
        )
    clean = _one_of("clean", clean, "source_prompt", given["source_prompt"])
    corrupt = _one_of("corrupt", corrupt, "prompt", given["prompt"])
    position = _one_of("position", position, "pos", given["pos"])
    layer, k = given["layer"], 5 if given["k"] is UNSET else given["k"]
    required("patch_layer", {"clean": clean, "corrupt": corrupt, "layer": layer, "position": position})
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArgumentError(f"k={k!r}: expected a positive int, the number of top tokens to return")

    s = site(model, "resid_post", layer)
    clean_text, corrupt_text = text_of(clean), text_of(corrupt)
    ct, xt = tokens_of(model, clean_text), tokens_of(model, corrupt_text)
    check_context(model, ct, clean_text)
    check_context(model, xt, corrupt_text)
    p_src, p_dst = _positions_in_both(ct, xt, position, clean, corrupt)
    holder: list[torch.Tensor] = []

    def last_logits(out: Any, ref: Any) -> torch.Tensor:
        holder.append(logits_of(out)[0, -1].detach().float().cpu())
        return torch.zeros(1)

    keep = Metric("last logits", last_logits)
    _, acts = run(model, clean_text, keep, save=[s])
    holder.clear()
    run(model, corrupt_text, keep, edits=[Edit(s, (0,) * len(p_dst), tuple(p_dst), acts[s][0, p_src])])
    probs = holder[0].softmax(-1)
    top = torch.topk(probs, min(k, probs.shape[-1]))
    tok = model.tokenizer
    return TopTokens(
        corrupt_text,
        clean_text,
        str(s),
        p_dst[0],
        tuple(tok.decode([int(i)]) for i in top.indices),
        tuple(float(v) for v in top.values),
        tuple(p_dst),
    )


def _one_of(name: str, value: Any, old_name: str, old_value: Any) -> Any:
    if value is not UNSET and old_value is not UNSET:
        raise ArgumentTypeError(f"patch_layer() got both {name}= and its old name {old_name}=: pass {name}= only")
    return old_value if value is UNSET else value


def _positions_in_both(
    ct: Sequence[str], xt: Sequence[str], position: Any, clean: Any, corrupt: Any
) -> tuple[list[int], list[int]]:
    """`position` resolved in the clean and in the corrupt prompt; a word only one of them has names the same indices in both."""
    both = f"\n  clean:   [{show_tokens(ct)}]\n  corrupt: [{show_tokens(xt)}]"
    found: list[list[int] | None] = []
    errors: list[PositionError] = []
    for tokens, p in ((ct, clean), (xt, corrupt)):
        try:
            found.append(resolve_position(tokens, position, prompt=text_of(p), slots=slots_of(p)))
        except PositionError as exc:
            found.append(None)
            errors.append(exc)
    src, dst = found
    if src is None and dst is None:
        raise PositionError(f"{errors[0]}; nor in the corrupt prompt:{both}")
    if src is None or dst is None:
        is_word = isinstance(position, str) and position != "last" and not position.startswith("{")
        known, other = (dst, ct) if src is None else (src, xt)
        if not is_word or max(known) >= len(other):
            raise PositionError(f"{errors[0]}{both}")
        src = dst = known
    if len(src) != len(dst):
        raise PositionError(
            f"position {position!r} names {len(src)} tokens in the clean prompt but {len(dst)} in the corrupt one, so the patch "
            f"has no one-to-one cells: give prompts of the same token length or positions both have{both}"
        )
    return src, dst
