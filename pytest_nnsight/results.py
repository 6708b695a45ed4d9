"""Result objects of interventions and sweeps, and numbers that explain themselves in a failed assert.

Imports only the standard library: the plugin's assertion hook reads these without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, get_args

from .errors import ArgumentError, NonFiniteMetricError

#: which run's activation goes into which: the clean one's into the corrupt run (restoring), or the reverse (breaking)
Direction = Literal["clean->corrupt", "corrupt->clean"]
#: how an ablation replaces an activation
AblationMethod = Literal["zero", "mean", "resample"]
#: whether sweeps and populations start patched rows from cached layers ('prefix') or run every row whole ('none')
Reuse = Literal["prefix", "none"]
#: an Effect's direction: a patch's, or the kind of single-prompt intervention
EffectDirection = Literal["clean->corrupt", "corrupt->clean", "ablation", "steering"]


def check_direction(direction: Any) -> None:
    """ArgumentError unless `direction` is a Direction: every verb that patches one run into another checks it first."""
    if direction not in get_args(Direction):
        raise ArgumentError(f"direction {direction!r}: expected 'clean->corrupt' or 'corrupt->clean'")


def check_reuse(reuse: Any) -> None:
    """ArgumentError unless `reuse` is a Reuse: sweeps and populations check it before any run."""
    if reuse not in get_args(Reuse):
        raise ArgumentError(f"reuse {reuse!r}: expected 'prefix' or 'none'")


class Measured(float):
    """A float measured by an intervention; `assert effect.normalized >= 0.8` shows where it came from.

    Comparing (<, <=, >, >=, ==, !=) a NaN or infinite Measured raises NonFiniteMetricError, so a
    broken run never passes an assert.
    """

    what: str
    context: tuple[tuple[str, str], ...]

    def __new__(cls, value: float, what: str = "value", context: Sequence[tuple[str, str]] = ()) -> "Measured":
        obj = super().__new__(cls, value)
        obj.what, obj.context = what, tuple(context)
        return obj

    def _check(self) -> None:
        __tracebackhide__ = True
        if not math.isfinite(self):
            where = "; ".join(f"{k} {v}" for k, v in self.context[:3])
            raise NonFiniteMetricError(
                f"{self.what} is {float(self)} ({where}): the model output or the metric is not finite"
            )

    def __lt__(self, other: Any) -> bool:
        __tracebackhide__ = True
        self._check()
        return float(self) < other

    def __le__(self, other: Any) -> bool:
        __tracebackhide__ = True
        self._check()
        return float(self) <= other

    def __gt__(self, other: Any) -> bool:
        __tracebackhide__ = True
        self._check()
        return float(self) > other

    def __ge__(self, other: Any) -> bool:
        __tracebackhide__ = True
        self._check()
        return float(self) >= other

    def __eq__(self, other: object) -> bool:
        __tracebackhide__ = True
        self._check()
        return float(self) == other

    def __ne__(self, other: object) -> bool:
        __tracebackhide__ = True
        self._check()
        return float(self) != other

    __hash__ = float.__hash__

    def __repr__(self) -> str:
        return f"{float(self):.4g}"

    def explain(self, op: str, other: Any) -> list[str]:
        """Failure text: the claim, aligned context lines, what to try."""
        lines = [f"{float(self):.4g} {op} {other!r}", f"claim: {self.what} {op} {other!r}"]
        width = max([len(k) for k, _ in self.context] + [9])
        lines += [f"{k + ':':<{width + 1}} {v}" for k, v in self.context]
        lines.append(f"{'expected:':<{width + 1}} {self.what} {op} {other!r}")
        lines.append(
            "try: check the site and position against the tokenization above, or sweep to see where the effect is"
        )
        return lines


def _fmt(x: float) -> str:
    return f"{x:.4g}"


@dataclass(frozen=True)
class Effect:
    """The result of one intervention (patch, ablation, steering) on one prompt pair.

    `normalized` is (intervened - target) / (source - target): for clean-into-corrupt patching
    the share of the clean behaviour the patch restores (1 = fully, 0 = not at all).
    """

    kind: str
    site: str
    positions: tuple[int, ...]
    position_tokens: tuple[str, ...]
    metric: str
    source_prompt: str
    target_prompt: str
    source: float  # metric on the unpatched run that supplies the activation (clean, for clean->corrupt)
    target: float  # metric on the unpatched run that is intervened on
    intervened: float
    normalized: float
    direction: EffectDirection = "clean->corrupt"
    tokens: tuple[str, ...] = ()
    top_tokens: tuple[tuple[str, float], ...] = ()
    controls: dict[str, float] = field(default_factory=dict)

    @property
    def clean(self) -> float:
        return self.source if self.direction == "clean->corrupt" else self.target

    @property
    def corrupt(self) -> float:
        return self.target if self.direction == "clean->corrupt" else self.source

    @property
    def delta(self) -> float:
        """intervened - target: the raw change the intervention made to the metric."""
        return Measured(self.intervened - self.target, f"change in {self.metric} from the {self.kind}", self.context())

    def context(self) -> list[tuple[str, str]]:
        pos = ", ".join(f"{p} {t!r}" for p, t in zip(self.positions, self.position_tokens))
        ctx = [
            ("site", self.site),
            ("position", pos),
            (
                "prompt",
                f"{self.target_prompt!r}"
                + (f" <- {self.source_prompt!r} ({self.direction})" if self.source_prompt else ""),
            ),
            ("tokens", " ".join(f"{i}:{t}" for i, t in enumerate(self.tokens))),
            ("metric", self.metric),
            (
                "measured",
                f"{_fmt(self.intervened)} after the {self.kind}, {_fmt(self.target)} before"
                + (f", {_fmt(self.source)} on the source prompt" if self.source_prompt else ""),
            ),
        ]
        if self.controls:
            ctx.append(("controls", ", ".join(f"{k} {_fmt(v)}" for k, v in self.controls.items())))
        return ctx

    def __post_init__(self) -> None:
        ctx = self.context()
        object.__setattr__(
            self, "normalized", Measured(self.normalized, f"normalized effect of the {self.kind} at {self.site}", ctx)
        )
        object.__setattr__(
            self, "intervened", Measured(self.intervened, f"{self.metric} after the {self.kind} at {self.site}", ctx)
        )

    def __repr__(self) -> str:
        pos = ",".join(map(str, self.positions))
        return (
            f"Effect({self.kind} {self.site} @ {pos}: {self.metric} {_fmt(self.target)} -> {_fmt(self.intervened)}, "
            f"normalized {_fmt(self.normalized)})"
        )


def fixed(v: float, digits: int = 2) -> str:
    """`v` with `digits` decimals; a value that rounds to zero prints 0.00, never -0.00."""
    text = f"{v:.{digits}f}"
    return text[1:] if text.startswith("-") and not text[1:].strip("0.") else text


@dataclass(frozen=True)
class EffectMap:
    """An effect per (site, position): rows are sites in forward order, columns the prompt's tokens."""

    values: tuple[tuple[float, ...], ...]
    sites: tuple[str, ...]
    tokens: tuple[str, ...]
    metric: str
    clean_prompt: str
    corrupt_prompt: str
    clean: float
    corrupt: float
    kind: str = "patch"
    raw: tuple[tuple[float, ...], ...] = ()  # the metric itself per cell, before normalizing
    positions: tuple[int, ...] = ()  # token index of each column (all positions unless the sweep chose some)

    def __post_init__(self) -> None:
        if not self.positions:
            object.__setattr__(self, "positions", tuple(range(len(self.tokens))))

    def tensor(self) -> Any:
        import torch

        return torch.tensor(self.values, dtype=torch.float64)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.sites), len(self.tokens))

    def __getitem__(self, cell: tuple[Any, int]) -> float:
        """map[site, position]: site by label or row number, position by token index."""
        site, pos = cell
        row = self.sites.index(site) if isinstance(site, str) else site
        return self.values[row][self.positions.index(pos)]

    def row(self, site: str | int) -> tuple[float, ...]:
        return self.values[self.sites.index(site) if isinstance(site, str) else site]

    def column(self, position: int) -> tuple[float, ...]:
        """The effects at token index `position`, one per site."""
        j = self.positions.index(position)
        return tuple(r[j] for r in self.values)

    def top(self, k: int = 3) -> list[tuple[str, int, str, float]]:
        """The k largest cells as (site, token index, token, value)."""
        cells = [
            (self.sites[i], self.positions[j], self.tokens[j], v)
            for i, r in enumerate(self.values)
            for j, v in enumerate(r)
        ]
        return sorted(cells, key=lambda c: -c[3] if math.isfinite(c[3]) else math.inf)[:k]

    def argmax(self) -> tuple[str, int, str, float]:
        return self.top(1)[0]

    def to_text(self, mark: Sequence[tuple[int, int]] = (), digits: int = 2) -> str:
        """The map as an aligned table; cells in `mark` (row, column) are flagged with '!'."""
        marked = set(mark)
        head = [""] + [f"{p}:{t}" for p, t in zip(self.positions, self.tokens)]
        rows = [
            [s] + [fixed(v, digits) + ("!" if (i, j) in marked else " ") for j, v in enumerate(r)]
            for i, (s, r) in enumerate(zip(self.sites, self.values))
        ]
        widths = [max(len(x[c]) for x in [head] + rows) for c in range(len(head))]
        return "\n".join("  ".join(x[c].rjust(widths[c]) for c in range(len(head))) for x in [head] + rows)

    def __repr__(self) -> str:
        s, p, t, v = self.argmax()
        return f"EffectMap({len(self.sites)} sites x {len(self.tokens)} positions, {self.metric}, peak {v:.3g} at {s} / {p} {t!r})"
