"""Claims over populations of prompt variants: pass rate, Wilson 95% lower bound, mean, spread, worst variants.

`population` runs every pair batched: one trace per chunk for the clean and corrupt runs (saving the
site's activation), then one trace per chunk of patched corrupt runs. Prompts of different lengths
are left-padded by nnsight 0.8, so each row's positions are shifted by its padding.

>>> pairs = counterfactual_pairs(model, CAPITAL_TEMPLATES, {"country": CAPITALS})              # doctest: +SKIP
>>> result = population(model, pairs, site="resid_post.0", position="last", n=64, threshold=0.7)  # doctest: +SKIP
>>> assert_population(result, min_rate=0.9)                                                    # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import forward as _forward
from .assertions import _fail
from .batching import encode, groups, lengths_of, may_mix
from .deprecation import UNSET, moved_positionals, required
from .errors import ArgumentError, BatchingMismatchError, BrokenExperimentError, MetricError, check_positive_int
from .findings import record_population
from .metrics import Metric, as_metric, logit_diff, per_row
from .prompts import pair_positions, text_of
from .results import Direction, Reuse, check_direction, check_reuse
from .sites import resolve_site
from .stats import wilson_interval
from .strategies import CounterfactualPair, StrategyError
from .trace import Edit, normalized, run


@dataclass(frozen=True)
class PopulationResult:
    """The effect of one intervention over n variants, with the claim `effect >= threshold` per variant."""

    n: int
    effects: tuple[float, ...]  # normalized effect per variant (NaN where clean and corrupt barely differ)
    passed: int
    rate: float
    lower_bound: float  # Wilson 95% lower bound of the pass rate
    mean: float
    std: float
    threshold: float
    site: str
    position: Any
    metric: str
    variants: tuple[CounterfactualPair, ...]
    clean: tuple[float, ...] = ()
    corrupt: tuple[float, ...] = ()
    patched: tuple[float, ...] = ()

    @property
    def failed(self) -> int:
        return self.n - self.passed

    def worst(self, k: int = 5) -> list[tuple[float, CounterfactualPair]]:
        """The k variants with the smallest effect (NaN first), as (effect, pair)."""
        order = sorted(range(self.n), key=lambda i: (not math.isnan(self.effects[i]), self.effects[i]))
        return [(self.effects[i], self.variants[i]) for i in order[:k]]

    def __repr__(self) -> str:
        return (
            f"PopulationResult({self.site} @ {self.position!r}: {self.passed}/{self.n} >= {self.threshold:g} "
            f"(rate {self.rate:.3f}, Wilson lower {self.lower_bound:.3f}), mean {self.mean:.3g} ± {self.std:.3g})"
        )


def _pairs(pairs: Any, n: int | None, seed: int) -> list[CounterfactualPair]:
    """The variants to evaluate: n drawn from a strategy (the same for the same seed), or the first n distinct given."""
    space = getattr(pairs, "space", None)
    if space is not None:
        if n is None:
            raise StrategyError(
                f"a strategy of pairs needs n=: how many of its {len(space)} distinct variants to evaluate"
            )
        return space.sample(n, seed)
    if not isinstance(pairs, Sequence) or not pairs or not all(isinstance(p, CounterfactualPair) for p in pairs):
        raise StrategyError(
            f"pairs={pairs!r:.80}: expected counterfactual_pairs(...) with n=, or a non-empty list of CounterfactualPair"
        )
    pairs = list(pairs)
    if n is not None:
        distinct = list(dict.fromkeys(pairs))
        if n > len(distinct):
            raise StrategyError(
                f"n={n} is larger than the {len(distinct)} distinct variants given: lower n or pass more pairs"
            )
        pairs = distinct[:n]
    return pairs


def _row_metric(metrics: Sequence[Metric]) -> Metric:
    """One Metric over a batch whose row r is measured by metrics[r] (each distinct metric computed once)."""
    groups: dict[int, tuple[Metric, list[int]]] = {}
    for r, m in enumerate(metrics):
        if m.needs_reference:
            raise MetricError(
                f"metric {m.name} needs a reference run, which population() does not provide: use logit_diff, prob, logprob or rank"
            )
        # keyed by the metric object, not its name: per-pair closures share one __name__ but measure different things
        groups.setdefault(id(m), (m, []))[1].append(r)

    def fn(out: Any, ref: Any, mask: Any) -> Any:
        values = None
        for m, rows in groups.values():
            v = m(out, None, mask).reshape(-1).float()
            idx = torch.tensor(rows, device=v.device)
            values = torch.zeros_like(v) if values is None else values
            values = values.index_copy(0, idx, v[idx])
        return values

    return Metric(
        "per-variant metric",
        fn,
        takes_mask=True,
        padding_safe=all(m.padding_safe for m in metrics),
        last_only=all(m.last_only for m in metrics),
    )


@dataclass(frozen=True)
class _Pairs:
    """A population request, resolved: the site, and per pair its source and target prompts, positions and metric."""

    model: Any
    site: Any
    sources: list[Any]  # the prompts whose activation is patched in (the clean ones for 'clean->corrupt')
    targets: list[Any]  # the prompts patched into
    positions: list[list[int]]  # each pair's patched token positions
    metrics: list[Metric]  # each pair's bound metric
    batch_size: int
    mixed: bool  # prompts of different token lengths may share a left-padded trace

    def one(self, i: int) -> _Pairs:
        """Pair i alone in a trace of its own: what the batching check compares the batched values with."""
        return _Pairs(
            self.model,
            self.site,
            [self.sources[i]],
            [self.targets[i]],
            [self.positions[i]],
            [self.metrics[i]],
            2,
            False,
        )


def _measure(req: _Pairs) -> tuple[list[float], list[float], list[float]]:
    """Clean, corrupt and patched metric values per pair, batched (mixed lengths only when `req.mixed`)."""
    model, s, bound, positions = req.model, req.site, req.metrics, req.positions
    # 1) clean and corrupt runs, two rows per pair, saving the site's activation at each pair's positions
    lengths = lengths_of(model, [text_of(t) for t in req.targets])
    half = max(1, req.batch_size // 2)
    count = len(req.targets)
    src_vals, tgt_vals, donors = [0.0] * count, [0.0] * count, [None] * count
    for idx in groups(lengths, half, mixed=req.mixed):
        texts = [t for i in idx for t in (text_of(req.sources[i]), text_of(req.targets[i]))]
        batch = encode(model, texts)
        values, acts = run(model, texts, _row_metric([bound[i] for i in idx for _ in (0, 1)]), save=[s], lean=True)
        for k, i in enumerate(idx):
            donors[i] = acts[s][2 * k, batch.padded(2 * k, positions[i])]
            src_vals[i], tgt_vals[i] = float(values[2 * k]), float(values[2 * k + 1])

    # 2) patched runs: the target prompts, each with its donor written at its positions inside the padded batch
    patched = [0.0] * count
    for idx in groups(lengths, req.batch_size, mixed=req.mixed):
        texts = [text_of(req.targets[i]) for i in idx]
        batch = encode(model, texts)
        rows, pos = [], []
        for r, i in enumerate(idx):
            rows += [r] * len(positions[i])
            pos += batch.padded(r, positions[i])
        edit = Edit(s, tuple(rows), tuple(pos), torch.cat([donors[i] for i in idx]))
        values, _ = run(model, texts, _row_metric([bound[i] for i in idx]), edits=[edit], lean=True)
        for i, v in zip(idx, values.tolist()):
            patched[i] = v
    return src_vals, tgt_vals, patched


def _prefix_rows(req: _Pairs, plan: Any, start: Any) -> tuple[list[float], list[float], list[float]] | None:
    """`_measure`'s numbers by prefix reuse: per chunk one forward of [clean, corrupt] rows records the donors and the corrupt
    rows' residuals; the patched rows then start at the patched block (padding shifts each row's positions)."""
    model, s, bound, positions = req.model, req.site, req.metrics, req.positions
    n = len(req.sources)
    src_vals, tgt_vals, patched = [0.0] * n, [0.0] * n, [0.0] * n
    check = _forward.needs_identity_check(plan)
    lengths = lengths_of(model, [text_of(t) for t in req.targets])
    for idx in groups(lengths, max(1, req.batch_size // 2), mixed=req.mixed):
        texts = [t for i in idx for t in (text_of(req.sources[i]), text_of(req.targets[i]))]
        metric = _row_metric([bound[i] for i in idx for _ in (0, 1)])
        batch = _forward.encode(model, texts)
        mask = batch.get("attention_mask")
        kwargs = _forward.forward_kwargs(plan.root, keep_last=all(bound[i].last_only for i in idx))
        target_rows = list(range(1, 2 * len(idx), 2))
        cap, acts = _forward.capture(plan, batch, kwargs, read=[s], target_rows=target_rows)
        values = per_row(metric(cap.output, None, mask), len(texts), metric)
        rows = []
        for k, i in enumerate(idx):
            src_vals[i], tgt_vals[i] = float(values[2 * k]), float(values[2 * k + 1])
            shift_src = int(mask[2 * k].argmax()) if mask is not None else 0  # first real token of a left-padded row
            shift_tgt = int(mask[2 * k + 1].argmax()) if mask is not None else 0
            rows.append(
                _forward.Row(
                    start,
                    tuple(p + shift_tgt for p in positions[i]),
                    acts[s][2 * k, [p + shift_src for p in positions[i]]],
                    source=k,
                )
            )
        metrics = [bound[i] for i in idx]
        if check:
            rows.append(_forward.Row(_forward.Start(0), (), None, source=0))
            metrics.append(bound[idx[0]])
        row_metric = _row_metric(metrics)
        keep_last = all(m.last_only for m in metrics)
        row_mask = (
            None if mask is None else mask[torch.tensor([target_rows[r.source] for r in rows], device=mask.device)]
        )

        def finish(
            hidden: torch.Tensor,
            metric: Any = row_metric,
            last: bool = keep_last,
            m: Any = row_mask,
            n: int = len(rows),
        ) -> Any:
            return per_row(metric(_forward.head_logits(plan, hidden, last), None, m), n, metric)

        out = _forward.replay(plan, cap, rows, finish)
        if check:
            if not _forward.identity_checked(
                plan, float(out[-1]), tgt_vals[idx[0]], 1e-4 if acts[s].dtype == torch.float32 else 5e-2
            ):
                return None
            out, check = out[:-1], False
        for i, v in zip(idx, out.tolist()):
            patched[i] = v
    return src_vals, tgt_vals, patched


def _check_batching(model: Any, flag: bool | None) -> bool:
    """Whether to re-run pairs alone: `check_batching=`, else the served model's --nnsight-check-batching."""
    from . import settings as _settings

    return flag if flag is not None else _settings.settings_of(model).check_batching


def _verify(req: _Pairs, batched: tuple[list[float], list[float], list[float]], n: int | None) -> None:
    """Re-run a sample of pairs one at a time; BatchingMismatchError when a batched value differs beyond the dtype's tolerance."""
    import random

    from . import settings as _settings
    from .sweeps import tolerance_for

    n = n or _settings.settings_of(req.model).check_batching_cells
    picks = random.Random(0).sample(range(len(req.targets)), min(n, len(req.targets)))
    module = getattr(req.model, "_module", req.model)
    tol = tolerance_for(next(module.parameters()).dtype)
    bad = []
    for i in picks:
        single = _measure(req.one(i))
        for name, values, one in zip(("clean", "corrupt", "patched"), batched, single):
            diff = abs(values[i] - one[0])
            if not diff <= tol and not (math.isnan(values[i]) and math.isnan(one[0])):
                bad.append(
                    f"  pair {i} {name}: batched {values[i]:.6g}, single {one[0]:.6g}, |diff| {diff:.3g}: {text_of(req.targets[i])!r}"
                )
    if bad:
        raise BatchingMismatchError(
            f"batched population disagrees with single-pair runs beyond {tol:g} in {len(bad)} values of {len(picks)} checked pairs:\n"
            + "\n".join(bad)
            + "\nthe batched path is wrong for this model (padding, position ids or batch-dependent modules): pass same_length=True or batch_size=2 and report it"
        )


def population(
    model: Any,
    pairs: Any,
    *old: Any,
    site: Any = UNSET,
    position: Any = UNSET,
    metric: Callable[[CounterfactualPair], Any] | None = UNSET,
    threshold: float = UNSET,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    direction: Direction = "clean->corrupt",
    min_gap: float = 1e-4,
    same_length: bool = False,
    check_batching: bool | None = None,
    check_pairs: int | None = None,
    reuse: Reuse = "prefix",
) -> PopulationResult:
    """Patch `site` at `position` from clean into corrupt for every pair; effect per pair, batched.

    `pairs`: counterfactual_pairs(...) with `n=` (n distinct variants, the same for the same seed) or
    a list of CounterfactualPair. `metric(pair)` gives each pair's metric (default
    logit_diff(pair.answer, pair.distractor)). `batch_size` rows go through one forward.
    Prompts of different token lengths share left-padded traces only where that cannot move a number
    (a causal decoder nnsight 0.8 left-pads with position ids, measured by a padding-safe metric); otherwise,
    and with `same_length=True`, only prompts of equal token length share a trace.
    `check_batching` (None follows --nnsight-check-batching) re-runs `check_pairs` pairs alone and fails
    with BatchingMismatchError when a batched value differs. `reuse='prefix'` (default) starts each patched row at the
    patched block from the corrupt run's cached residual (pytest_nnsight.forward); 'none' runs plain nnsight traces.

    >>> result = population(model, counterfactual_pairs(templates, fillers), n=64,   # doctest: +SKIP
    ...                     site="resid_post.0", position="last", threshold=0.7)
    """
    args = moved_positionals(
        "population",
        "model, pairs",
        old,
        ("site", "position", "metric"),
        {"site": site, "position": position, "metric": metric, "threshold": threshold},
    )
    metric = None if args["metric"] is UNSET else args["metric"]
    required("population", {k: args[k] for k in ("site", "position", "threshold")})
    site, position, threshold = args["site"], args["position"], args["threshold"]
    _check_arguments(reuse, batch_size, direction, threshold)
    variants = _pairs(pairs, n, seed)
    req = _resolve(model, variants, site, position, metric, direction, batch_size, same_length)
    batched = _measure_pairs(req, reuse)
    if _check_batching(model, check_batching) and len(variants) > 1:
        _verify(req, batched, check_pairs)
    name = "logit_diff(answer, distractor)" if metric is None else getattr(metric, "__name__", "metric(pair)")
    result = _summarize(variants, batched, str(req.site), position, name, threshold, min_gap)
    record_population(result)
    return result


def _check_arguments(reuse: Any, batch_size: Any, direction: Any, threshold: Any) -> None:
    """Refuse a bad reuse, batch size, direction or threshold before any pair is drawn or run."""
    check_reuse(reuse)
    check_positive_int("batch_size", batch_size)
    check_direction(direction)
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ArgumentError(f"threshold={threshold!r}: expected a finite number")


def _resolve(
    model: Any,
    variants: Sequence[CounterfactualPair],
    site: Any,
    position: Any,
    metric: Callable[[CounterfactualPair], Any] | None,
    direction: Direction,
    batch_size: int,
    same_length: bool,
) -> _Pairs:
    """Resolve the site, each pair's metric, prompts and positions (errors name the bad value) into one request."""
    s = resolve_site(model, site)
    make = metric if metric is not None else (lambda p: logit_diff(p.answer, p.distractor))
    bound = [as_metric(model, make(p)) for p in variants]
    restoring = direction == "clean->corrupt"
    sources = [p.clean if restoring else p.corrupt for p in variants]
    targets = [p.corrupt if restoring else p.clean for p in variants]
    positions = [pair_positions(model, p.clean, p.corrupt, position)[2] for p in variants]
    return _Pairs(
        model, s, sources, targets, positions, bound, batch_size, mixed=not same_length and may_mix(model, bound)
    )


def _measure_pairs(req: _Pairs, reuse: Reuse) -> tuple[list[float], list[float], list[float]]:
    """Clean, corrupt and patched values per pair: by prefix reuse where the site starts a block and the replay holds, else plain traces."""
    plan = _forward.plan_for(req.model) if reuse == "prefix" else None
    start = plan.start_of(req.site) if plan is not None else None
    done = _prefix_rows(req, plan, start) if start is not None else None
    return done if done is not None else _measure(req)


def _summarize(
    variants: Sequence[CounterfactualPair],
    batched: tuple[list[float], list[float], list[float]],
    site: str,
    position: Any,
    metric: str,
    threshold: float,
    min_gap: float,
) -> PopulationResult:
    """Each pair's normalized effect (NaN where its runs barely differ), then the pass rate, Wilson bound, mean and spread."""
    src_vals, tgt_vals, patched = batched
    effects = []
    for i, p in enumerate(variants):
        try:
            effects.append(normalized(patched[i], tgt_vals[i], src_vals[i], min_gap=min_gap, what=f"{p!r}"))
        except BrokenExperimentError:
            effects.append(math.nan)
    finite = [e for e in effects if math.isfinite(e)]
    passed = sum(1 for e in effects if math.isfinite(e) and e >= threshold)
    mean = sum(finite) / len(finite) if finite else math.nan
    std = math.sqrt(sum((e - mean) ** 2 for e in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    count = len(variants)
    return PopulationResult(
        count,
        tuple(effects),
        passed,
        passed / count,
        wilson_interval(passed, count)[0],
        mean,
        std,
        float(threshold),
        site,
        position,
        metric,
        tuple(variants),
        tuple(src_vals),
        tuple(tgt_vals),
        tuple(patched),
    )


def assert_population(
    result: PopulationResult, min_rate: float = 0.9, *, on: str = "lower_bound", show: int = 5
) -> None:
    """At least `min_rate` of the variants pass (stated on the Wilson 95% lower bound by default, or on the raw rate)."""
    __tracebackhide__ = True
    if on not in ("lower_bound", "rate"):
        raise ArgumentError(f"on={on!r}: expected 'lower_bound' (Wilson 95%) or 'rate'")
    if not 0 <= min_rate <= 1:
        raise ArgumentError(f"min_rate={min_rate!r}: expected a rate between 0 and 1")
    value = result.lower_bound if on == "lower_bound" else result.rate
    record_population(result, min_rate=min_rate, on=on)
    if value >= min_rate:
        return
    worst = []
    for eff, p in result.worst(show):
        if math.isnan(eff) or eff >= result.threshold:
            note = "clean and corrupt barely differ" if math.isnan(eff) else "passes"
        else:
            note = f"< {result.threshold:g}"
        worst.append(
            f"\n    {eff:.4g} ({note}): {p.clean.text!r} -> {p.answer!r} | {p.corrupt.text!r} -> {p.distractor!r}"
        )
    what = "Wilson 95% lower bound of the pass rate" if on == "lower_bound" else "pass rate"
    _fail(
        f"claim: patching {result.site} at {result.position!r} restores >= {result.threshold:g} of {result.metric} "
        f"in at least {min_rate:.0%} of variants ({what})",
        [
            ("pass rate", f"{result.rate:.3f} ({result.passed} / {result.n})"),
            ("wilson", f"{result.lower_bound:.3f} (95% lower bound)"),
            ("effect", f"mean {result.mean:.4g} ± {result.std:.4g} (std)"),
            ("failed", f"{result.failed} / {result.n} failed ({result.failed / result.n:.0%})"),
            ("worst", "".join(worst)),
            ("expected", f"{what} >= {min_rate:g}, measured {value:.3f}"),
        ],
        "look at the worst variants above: a template or word the finding does not cover, or raise n if the bound is just short",
    )
