"""Named assertions for common claims; each failure starts with the claim, then aligned context, then what to try.

Plain `assert effect.normalized >= 0.8` works too: the plugin's assertion hook explains Measured values.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .errors import ArgumentError, FindingFailed, NonFiniteMetricError
from .findings import record_check, record_effect, record_peaks
from .results import Effect, EffectMap


def _fail(claim: str, lines: Sequence[tuple[str, str]], hint: str) -> None:
    __tracebackhide__ = True
    width = max([len(k) for k, _ in lines] + [9]) + 1
    text = "\n".join([claim] + [f"{k + ':':<{width}} {v}" for k, v in lines] + [f"try: {hint}"])
    raise FindingFailed(text)


def _finite(value: float, what: str, effect: Effect | None = None) -> None:
    if not math.isfinite(value):
        where = f" at {effect.site} on {effect.target_prompt!r}" if effect is not None else ""
        raise NonFiniteMetricError(
            f"{what} is {value}{where}: the model output or the metric is not finite, so the claim cannot hold"
        )


def assert_restores(effect: Effect, at_least: float) -> None:
    """The patch restores at least `at_least` of the clean behaviour (normalized effect)."""
    __tracebackhide__ = True
    record_effect(effect)  # a hand-built Effect too (the verbs already recorded theirs; recorded once)
    record_check(
        f"normalized effect of the {effect.kind} at {effect.site}", effect.normalized, ">=", at_least, site=effect.site
    )
    _finite(effect.normalized, "the normalized effect", effect)
    if not effect.normalized >= at_least:
        _fail(
            f"claim: patching {effect.site} restores at least {at_least:g} of {effect.metric}",
            effect.context() + [("expected", f"normalized >= {at_least:g}, measured {float(effect.normalized):.4g}")],
            "sweep the sites and positions (pytest_nnsight.sweep) to see where the effect is",
        )


def assert_drops(effect: Effect, by_at_least: float, *, relative: bool = False) -> None:
    """The ablation lowers the metric by at least `by_at_least` (absolute, or relative to the unablated value)."""
    __tracebackhide__ = True
    drop = float(effect.target) - float(effect.intervened)
    measured = drop / abs(effect.target) if relative and effect.target else drop
    record_effect(effect)  # a hand-built Effect too (the verbs already recorded theirs; recorded once)
    record_check(
        f"{'relative ' if relative else ''}drop of {effect.metric} from the {effect.kind} at {effect.site}",
        measured,
        ">=",
        by_at_least,
        site=effect.site,
    )
    _finite(measured, "the drop", effect)
    if not measured >= by_at_least:
        kind = "relative drop" if relative else "drop"
        _fail(
            f"claim: {effect.kind} of {effect.site} lowers {effect.metric} by at least {by_at_least:g}"
            + (" (relative)" if relative else ""),
            effect.context() + [("expected", f"{kind} >= {by_at_least:g}, measured {measured:.4g}")],
            "ablate another site or position, or a mean ablation if zeros are off-distribution",
        )


def assert_beats_controls(effect: Effect, margin: float) -> None:
    """The effect beats each of its controls (random matched-norm donor, irrelevant position) by `margin`."""
    __tracebackhide__ = True
    if not effect.controls:
        raise ArgumentError("this effect carries no controls: run the intervention with controls=True")
    record_effect(effect)  # a hand-built Effect too (the verbs already recorded theirs; recorded once)
    record_check(
        f"effect at {effect.site} minus its strongest control",
        float(effect.normalized) - max(effect.controls.values()),
        ">=",
        margin,
        site=effect.site,
    )
    _finite(effect.normalized, "the normalized effect", effect)
    losing = {k: v for k, v in effect.controls.items() if not float(effect.normalized) - v >= margin}
    if losing:
        _fail(
            f"claim: the effect at {effect.site} beats its controls by at least {margin:g}",
            effect.context()
            + [
                ("losing to", ", ".join(f"{k} ({v:.4g})" for k, v in losing.items())),
                ("expected", f"effect {float(effect.normalized):.4g} >= control + {margin:g}"),
            ],
            "a control this strong means the effect may be noise at this site: check a random donor across seeds",
        )


def assert_top_token(model: Any, result: Any, token: str) -> None:
    """After a patch_layer-style intervention the top next token is `token`."""
    __tracebackhide__ = True
    top = result.tokens[0] if result.tokens else None
    record_check(
        f"probability of the top token {top!r} (claimed {token!r}) after patching {result.site}",
        result.probs[0] if result.probs else None,
        ">=",
        None,
        site=str(result.site),
        passed=top is not None and top.strip() == token.strip(),
    )
    if top is None or top.strip() != token.strip():
        _fail(
            f"claim: the top token after patching {result.site} is {token!r}",
            [
                ("site", result.site),
                ("position", str(result.position)),
                ("prompt", f"{result.prompt!r} <- {result.source_prompt!r}"),
                ("measured", ", ".join(f"{t!r} {p:.3f}" for t, p in zip(result.tokens, result.probs))),
                ("expected", f"top token {token!r}"),
            ],
            "check the layer and position, or compare the logit difference instead of the argmax",
        )


def _cells(effects: EffectMap, cells: Sequence[tuple[Any, int]]) -> list[tuple[int, int]]:
    out = []
    for site, pos in cells:
        row = effects.sites.index(site) if isinstance(site, str) else site
        out.append((row, effects.positions.index(pos if pos >= 0 else effects.positions[pos])))
    return out


def assert_peaks_at(
    effects: EffectMap, cells: Sequence[tuple[Any, int]], *, at_least: float = 0.5, elsewhere_at_most: float = 0.2
) -> None:
    """The map's effect is >= `at_least` at each of `cells` (site, token index) and <= `elsewhere_at_most` everywhere else."""
    __tracebackhide__ = True
    want = set(_cells(effects, cells))
    bad = []
    for i, row in enumerate(effects.values):
        for j, v in enumerate(row):
            if not math.isfinite(v):
                bad.append((i, j, v, "finite"))
            elif (i, j) in want and not v >= at_least:
                bad.append((i, j, v, f">= {at_least:g}"))
            elif (i, j) not in want and not abs(v) <= elsewhere_at_most:
                bad.append((i, j, v, f"|x| <= {elsewhere_at_most:g}"))
    record_peaks(effects, sorted(want), bad, at_least, elsewhere_at_most)
    if bad:
        detail = "; ".join(
            f"{effects.sites[i]} @ {effects.positions[j]} {effects.tokens[j]!r}: {v:.3g} (want {w})"
            for i, j, v, w in bad[:8]
        )
        _fail(
            f"claim: the effect map peaks at {', '.join(f'{effects.sites[i]} @ {effects.positions[j]}' for i, j in sorted(want))}",
            [
                ("prompt", f"{effects.corrupt_prompt!r} <- {effects.clean_prompt!r}"),
                ("metric", f"{effects.metric} (clean {effects.clean:.4g}, corrupt {effects.corrupt:.4g})"),
                ("failing", f"{len(bad)} of {len(effects.sites) * len(effects.tokens)} cells: {detail}"),
                ("map", "cells marked ! failed\n" + effects.to_text(mark=[(i, j) for i, j, _, _ in bad])),
            ],
            "look at the map above: the peak may sit one layer or one position away from the claim",
        )
