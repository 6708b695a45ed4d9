"""Linear probes on cached activations: "site S linearly encodes property P at position p".

A probe is multinomial logistic regression in torch (float64, standardized features, zero init,
full-batch L-BFGS: deterministic, no sklearn). Held-out accuracy comes with a Wilson 95% interval,
a majority-class baseline and a control task (the same probe on shuffled labels, same split).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

from .errors import ProbeError
from .findings import record_check, record_probe
from .results import EffectMap, Measured
from .stats import wilson_interval


def stratified_split(labels: Sequence[int], test_fraction: float = 0.25, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, test) indices: per class, a seeded shuffle sends round(test_fraction * n_c) to test (at least 1, at most n_c - 1).

    A class with a single example goes to train only.
    """
    import torch

    if not 0 < test_fraction < 1:
        raise ProbeError(f"test_fraction {test_fraction!r}: expected a fraction strictly between 0 and 1")
    gen = torch.Generator().manual_seed(seed)
    train: list[int] = []
    test: list[int] = []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        order = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        test += order[:k]
        train += order[k:]
    return sorted(train), sorted(test)


def _encode(labels: Sequence[Hashable], n: int, what: str) -> tuple[list[int], tuple[str, ...]]:
    if isinstance(labels, (str, bytes)):
        raise ProbeError(f"labels is a string {labels[:40]!r}: expected a sequence with one label per prompt")
    labels = list(labels)
    if len(labels) != n:
        raise ProbeError(
            f"labels has {len(labels)} entries but {what} holds {n} examples: give one label per prompt, in prompt order"
        )
    try:
        classes = sorted(set(labels), key=lambda x: (str(type(x)), x))
    except TypeError:
        raise ProbeError("labels must be hashable and comparable (str, int or bool), one per prompt") from None
    if len(classes) < 2:
        raise ProbeError(
            f"labels hold a single class ({classes[0]!r} x {n}): a probe needs at least two classes to separate"
        )
    index = {c: i for i, c in enumerate(classes)}
    return [index[y] for y in labels], tuple(str(c) for c in classes)


def _fit(x: Any, y: Any, n_classes: int, l2: float, max_iter: int) -> Any:
    """Weights [d + 1, K] of a multinomial logistic regression (zero init, L-BFGS, float64)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # [N, d] x [d, K] products: thread start-up costs more than it saves (10x on 2 cores)
    try:
        return _lbfgs(x, y, n_classes, l2, max_iter)
    finally:
        torch.set_num_threads(threads)


def _lbfgs(x: Any, y: Any, n_classes: int, l2: float, max_iter: int) -> Any:
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.clone()
        w = torch.zeros(x.shape[1] + 1, n_classes, dtype=torch.float64, requires_grad=True)
        xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        opt = torch.optim.LBFGS(
            [w],
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure() -> Any:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xb @ w, y) + 0.5 * l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()


def _predict(w: Any, x: Any) -> Any:
    import torch

    return (torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1) @ w).argmax(1)


PCA_POINTS = 2000  # activations drawn in a probe's PCA plot (the first ones, in prompt order)


@dataclass(frozen=True)
class ProbeResult:
    """Held-out accuracy of a linear probe with its Wilson 95% interval and baselines."""

    site: str
    position: str
    accuracy: float
    correct: int
    n_test: int
    n_train: int
    ci: tuple[float, float]
    train_accuracy: float
    majority: float  # accuracy of always predicting the training set's most common class
    control: float  # accuracy of the same probe on shuffled labels (same split)
    classes: tuple[str, ...]
    split: str
    seed: int = 0
    l2: float = 1e-2
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def baseline(self) -> float:
        """The stronger of the two baselines."""
        return max(self.majority, self.control)

    def context(self) -> list[tuple[str, str]]:
        lo, hi = self.ci
        return [
            ("site", self.site),
            ("position", self.position),
            (
                "classes",
                f"{len(self.classes)} ({', '.join(self.classes[:6])}{', ...' if len(self.classes) > 6 else ''})",
            ),
            ("split", self.split),
            (
                "measured",
                f"held-out accuracy {self.accuracy:.4g} ({self.correct} / {self.n_test}), 95% CI [{lo:.3f}, {hi:.3f}]; train {self.train_accuracy:.3g}",
            ),
            ("baselines", f"majority class {self.majority:.4g}, control task (shuffled labels) {self.control:.4g}"),
        ]

    def __post_init__(self) -> None:
        object.__setattr__(self, "accuracy", Measured(self.accuracy, f"probe accuracy at {self.site}", self.context()))

    def __repr__(self) -> str:
        return (
            f"ProbeResult({self.site} @ {self.position}: accuracy {self.accuracy:.3f} [{self.ci[0]:.3f}, {self.ci[1]:.3f}] "
            f"on {self.n_test}, majority {self.majority:.3f}, control {self.control:.3f})"
        )


def fit_probe(
    features: Any,
    labels: Sequence[Hashable],
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-2,
    max_iter: int = 200,
    control: bool = True,
    site: str = "features",
    position: str = "",
) -> ProbeResult:
    """Fit a linear probe on `features` [N, d] for `labels` (N) and score it on a stratified held-out split.

    >>> r = fit_probe(torch.randn(200, 8) + torch.tensor(labels)[:, None], labels)   # doctest: +SKIP
    >>> r.accuracy, r.ci, r.majority, r.control                                       # doctest: +SKIP
    """
    import torch

    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ProbeError(f"features {shape}: expected a 2-D tensor [examples, d]")
    y_list, classes = _encode(labels, features.shape[0], "features")
    train, test = stratified_split(y_list, test_fraction, seed)
    if not test:
        raise ProbeError(
            f"no held-out examples: every class has a single example among {len(y_list)}; give at least two per class"
        )
    x = features.detach().to("cpu", torch.float64)
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
    x = (x - mean) / std
    y = torch.tensor(y_list)
    ti, si = torch.tensor(train), torch.tensor(test)

    def score(targets: Any) -> tuple[int, float]:
        w = _fit(x[ti], targets[ti], len(classes), l2, max_iter)
        return int((_predict(w, x[si]) == targets[si]).sum()), float(
            (_predict(w, x[ti]) == targets[ti]).double().mean()
        )

    correct, train_acc = score(y)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))]
    control_acc = score(shuffled)[0] / len(test) if control else float("nan")
    most = Counter(y[ti].tolist()).most_common(1)[0][0]
    majority = float((y[si] == most).double().mean())
    split = f"stratified by label, seed {seed}: {len(train)} train / {len(test)} test ({test_fraction:g} of each class held out)"
    result = ProbeResult(
        site,
        position,
        correct / len(test),
        correct,
        len(test),
        len(train),
        wilson_interval(correct, len(test)),
        train_acc,
        majority,
        control_acc,
        classes,
        split,
        seed,
        l2,
        extra={"pca": pca_2d(features.detach().to("cpu", torch.float64)), "labels": [classes[i] for i in y_list]},
    )
    record_probe(result)  # the report draws the PCA beside the accuracies
    return result


def pca_2d(x: Any, max_points: int = PCA_POINTS) -> dict[str, Any]:
    """The first two principal components of `x` [N, d] (centred, not scaled): points, explained variance ratios.

    Signs are fixed (each component's largest loading positive), so the picture is the same on every run.
    """
    import torch

    x = x[:max_points] - x[:max_points].mean(0)
    if x.shape[0] < 2 or x.shape[1] < 1:
        return {"points": [[0.0, 0.0] for _ in range(x.shape[0])], "explained": [0.0, 0.0]}
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:2]
    comps = comps * torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    points = x @ comps.T
    if points.shape[1] < 2:
        points = torch.cat([points, torch.zeros(points.shape[0], 2 - points.shape[1], dtype=points.dtype)], 1)
    var = s.square()
    explained = (var[:2] / var.sum().clamp_min(1e-300)).tolist() + [0.0] * (2 - min(2, len(var)))
    return {
        "points": [[round(float(a), 6), round(float(b), 6)] for a, b in points.tolist()],
        "explained": [float(e) for e in explained[:2]],
    }


def probe(acts: Any, site: Any, labels: Sequence[Hashable], *, index: int = -1, **kwargs: Any) -> ProbeResult:
    """A probe on cached activations (`activation_cache.get(...)`) at `site`, stored position `index` (default the last).

    >>> acts = activation_cache.get(model, prompts, sites="blocks", positions="last")   # doctest: +SKIP
    >>> assert_probe(probe(acts, "resid_post.0", countries), 0.9, over_baseline=0.5)          # doctest: +SKIP
    """
    name = acts.tensor_name(site)  # SiteNotCachedError names the cached sites
    label = next((s for s in acts.sites if acts.names.get(s) == name), name)
    if len(labels) != len(acts):
        raise ProbeError(
            f"labels has {len(labels)} entries but the cached activations hold {len(acts)} prompts: give one label per prompt, in prompt order"
        )
    widths = {len(p) for p in acts.positions}
    if len(widths) > 1:
        raise ProbeError(
            "the entry stores whole sequences of different lengths, so a stored position index means different tokens: "
            "cache positions='last' (or an int, a word, a '{slot}') to probe"
        )
    width = widths.pop() if widths else 0
    if not -width <= index < width:
        raise ProbeError(f"position index {index} is out of range: the entry stores {width} position(s) per prompt")
    toks = {t[index] for t in acts.tokens}
    where = f"stored position {index}" + (
        f" (tokens: {', '.join(sorted(toks)[:4])}{', ...' if len(toks) > 4 else ''})" if toks else ""
    )
    return fit_probe(acts.at(site, index), labels, site=label, position=where, **kwargs)


@dataclass(frozen=True)
class ProbeSweep:
    """Probe accuracy per site (rows, forward order); `to_map()` gives an EffectMap that snapshots like a patching map."""

    results: tuple[ProbeResult, ...]
    position: str

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(r.site for r in self.results)

    @property
    def values(self) -> tuple[tuple[float, ...], ...]:
        return tuple((float(r.accuracy),) for r in self.results)

    def __getitem__(self, site: str | int) -> ProbeResult:
        return self.results[self.sites.index(site) if isinstance(site, str) else site]

    def row(self, site: str | int) -> tuple[float, ...]:
        return (float(self[site].accuracy),)

    def first_above(self, threshold: float, *, over_baseline: float = 0.0) -> str | None:
        """The first site whose accuracy reaches `threshold` and beats both baselines by `over_baseline`."""
        for r in self.results:
            if r.accuracy >= threshold and r.accuracy >= r.baseline + over_baseline:
                return r.site
        return None

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(((r.site, float(r.accuracy)) for r in self.results), key=lambda c: -c[1])[:k]

    def argmax(self) -> tuple[str, float]:
        return self.top(1)[0]

    def to_map(self) -> EffectMap:
        """Rows: sites; one column (the probed position); values: held-out accuracy; raw: control-task accuracy."""
        chance = max(r.majority for r in self.results)
        return EffectMap(
            self.values,
            self.sites,
            (self.position,),
            "probe accuracy",
            "",
            "",
            1.0,
            chance,
            kind="probe",
            raw=tuple((float(r.control),) for r in self.results),
            positions=(0,),
        )

    def to_text(self) -> str:
        width = max(len(s) for s in self.sites)
        lines = [f"{'site':<{width}}  accuracy  95% CI          majority  control"]
        for r in self.results:
            lines.append(
                f"{r.site:<{width}}  {r.accuracy:8.3f}  [{r.ci[0]:.3f}, {r.ci[1]:.3f}]  {r.majority:8.3f}  {r.control:7.3f}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "ProbeSweep(" + ", ".join(f"{r.site} {r.accuracy:.2f}" for r in self.results) + f" @ {self.position})"


def probe_sites(
    acts: Any, labels: Sequence[Hashable], sites: Sequence[Any] | None = None, *, index: int = -1, **kwargs: Any
) -> ProbeSweep:
    """A probe per site (default: every cached site, in forward order) at stored position `index`."""
    chosen = list(acts.sites) if sites is None else list(sites)
    if not chosen:
        raise ProbeError("no sites to probe: cache at least one site")
    results = tuple(probe(acts, s, labels, index=index, **kwargs) for s in chosen)
    return ProbeSweep(results, results[0].position)


def assert_probe(
    result: ProbeResult, min_accuracy: float, *, over_baseline: float | None = None, lower_bound: bool = False
) -> None:
    """The probe's held-out accuracy is >= `min_accuracy` (its Wilson lower bound with `lower_bound=True`),
    and beats the majority-class and control-task baselines by `over_baseline` when given."""
    __tracebackhide__ = True
    from .assertions import _fail

    measured = result.ci[0] if lower_bound else float(result.accuracy)
    what = "the 95% lower bound of held-out accuracy" if lower_bound else "held-out accuracy"
    record_probe(result)  # a probe fitted outside the test (a fixture) is drawn in the report once asserted
    record_check(
        f"{what} of the probe at {result.site}",
        measured,
        ">=",
        min_accuracy,
        site=result.site,
        passed=measured >= min_accuracy
        and (over_baseline is None or float(result.accuracy) >= result.baseline + over_baseline),
    )
    problems = []
    if not measured >= min_accuracy:
        problems.append(f"{what} {measured:.4g} < {min_accuracy:g}")
    if over_baseline is not None and not float(result.accuracy) >= result.baseline + over_baseline:
        problems.append(f"accuracy {float(result.accuracy):.4g} < baseline {result.baseline:.4g} + {over_baseline:g}")
    if problems:
        where = f" at {result.position}" if result.position else ""
        claim = f"claim: {result.site} linearly encodes the labels{where}: {what} >= {min_accuracy:g}"
        if over_baseline is not None:
            claim += f" and beats the baselines by {over_baseline:g}"
        expected = f"{what} >= {min_accuracy:g}" + (
            f", accuracy >= max(majority, control) + {over_baseline:g}" if over_baseline is not None else ""
        )
        _fail(
            claim,
            result.context() + [("expected", expected), ("failed", "; ".join(problems))],
            "probe the other layers (probe_sites) to see where the property becomes decodable, or add examples to narrow the interval",
        )
