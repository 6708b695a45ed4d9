"""Compare two recorded findings within a tolerance, and say what moved. Standard library only.

A number cell matches when |new - old| <= atol + rtol * |old| (numpy's isclose rule), or both are
NaN, or both are the same infinity. Labels (strings, ints, bools), keys and lengths must be equal:
a change of shape or labels is always a mismatch.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ArgumentError, ArgumentTypeError
from ..sites import renamed_label
from .encode import NONFINITE, to_value

#: (atol, rtol) by the dtype that produced the finding, used unless the test or an ini key sets one.
DTYPE_DEFAULTS: dict[str, tuple[float, float]] = {
    "float64": (1e-6, 1e-6),
    "float32": (1e-4, 1e-4),
    "float16": (2e-2, 1e-2),
    "bfloat16": (5e-2, 2e-2),
}
ENV_ORDER = ("nnsight", "torch", "transformers", "python", "device", "dtype", "model", "revision")


@dataclass(frozen=True)
class Tolerance:
    """How far a number may move and still be the same finding; `rule` says where it came from."""

    atol: float
    rtol: float
    rule: str = ""

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ArgumentError(f"{name}={v!r}: a tolerance must be a finite number >= 0")

    def allows(self, old: float, new: float) -> bool:
        if math.isnan(old) or math.isnan(new):
            return math.isnan(old) and math.isnan(new)
        if math.isinf(old) or math.isinf(new):
            return old == new
        return abs(new - old) <= self.atol + self.rtol * abs(old)

    def __str__(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g}" + (f" ({self.rule})" if self.rule else "")


def default_tolerance(dtype: str | None, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The tolerance for a finding made in `dtype`; `atol`/`rtol` (from ini keys) override the dtype's."""
    d_atol, d_rtol = DTYPE_DEFAULTS.get(str(dtype or "float32").replace("torch.", ""), DTYPE_DEFAULTS["float32"])
    rule = f"default for {dtype or 'float32'}" if atol is None and rtol is None else "from nnsight_snapshot_atol/rtol"
    return Tolerance(d_atol if atol is None else atol, d_rtol if rtol is None else rtol, rule)


def _num(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, float):
        return x
    if isinstance(x, str) and x in NONFINITE:
        return NONFINITE[x]
    return None


@dataclass
class Cell:
    path: tuple[Any, ...]
    old: float
    new: float

    @property
    def abs_err(self) -> float:
        if self.old == self.new or (math.isnan(self.old) and math.isnan(self.new)):
            return 0.0
        return abs(self.new - self.old) if math.isfinite(self.new - self.old) else math.inf

    @property
    def rel_err(self) -> float:
        return (
            self.abs_err / abs(self.old)
            if self.old not in (0.0,) and math.isfinite(self.old)
            else (0.0 if self.abs_err == 0 else math.inf)
        )


@dataclass
class Comparison:
    """The outcome of comparing a received finding with the stored one."""

    tolerance: Tolerance
    structural: list[str] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    moved: list[Cell] = field(default_factory=list)
    old_finding: Any = None
    new_finding: Any = None
    rank_tolerance: int | None = None  # circuits: how far an edge may move in rank, or drop out near the cut
    notes: list[str] = field(default_factory=list)  # circuits: re-ranked edges within tolerance

    @property
    def ok(self) -> bool:
        return not self.structural and not self.moved


def _fmt_path(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "finding"


def _walk(old: Any, new: Any, path: tuple[Any, ...], cmp: Comparison) -> None:
    if isinstance(old, dict) and isinstance(new, dict) and old.get("@type") == new.get("@type") == "Circuit":
        return _circuit(old, new, path, cmp)
    o, n = _num(old), _num(new)
    if o is not None and n is not None:
        cell = Cell(path, o, n)
        cmp.cells.append(cell)
        if not cmp.tolerance.allows(o, n):
            cmp.moved.append(cell)
        return
    if isinstance(old, dict) and isinstance(new, dict):
        if set(old) != set(new):
            added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
            cmp.structural.append(
                f"{_fmt_path(path)}: keys changed"
                + (f", added {added}" if added else "")
                + (f", removed {removed}" if removed else "")
            )
        for k in old:
            if k in new:
                _walk(old[k], new[k], path + (k,), cmp)
        return
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            labels = all(not isinstance(x, (list, dict)) and _num(x) is None for x in old + new)
            what = f": {old} -> {new}" if labels and len(old) + len(new) <= 40 else ""
            cmp.structural.append(f"{_fmt_path(path)}: length {len(old)} -> {len(new)}{what}")
            return
        for i, (a, b) in enumerate(zip(old, new)):
            _walk(a, b, path + (i,), cmp)
        return
    if type(old) is not type(new) or old != new:
        cmp.structural.append(f"{_fmt_path(path)}: {old!r} -> {new!r}")


def _edge_list(circuit: dict) -> list[tuple[str, str, Any]]:
    return [
        (e[0], e[1], e[2] if len(e) > 2 else None)
        for e in circuit.get("edges", [])
        if isinstance(e, list) and len(e) >= 2
    ]


def _circuit(old: dict, new: dict, path: tuple[Any, ...], cmp: Comparison) -> None:
    """Circuits compare by edge: the edge set exactly (or within `rank_tolerance` of the cut), scores within tolerance."""
    where = _fmt_path(path)
    for key in ("metric", "method"):
        if old.get(key) != new.get(key):
            cmp.structural.append(f"{where}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if not old.get("edges") and not new.get("edges"):
        if old.get("nodes") != new.get("nodes"):
            added = [n for n in new.get("nodes", []) if n not in old.get("nodes", [])]
            dropped = [n for n in old.get("nodes", []) if n not in new.get("nodes", [])]
            cmp.structural.append(f"{where}: nodes added {added}, dropped {dropped}")
        return
    o, n = _edge_list(old), _edge_list(new)
    rank_o, rank_n = {(s, r): k for k, (s, r, _) in enumerate(o)}, {(s, r): k for k, (s, r, _) in enumerate(n)}
    tol = cmp.rank_tolerance
    added = [e for e in rank_n if e not in rank_o]
    dropped = [e for e in rank_o if e not in rank_n]
    near_cut = (
        tol is not None
        and all(rank_n[e] >= len(n) - tol for e in added)
        and all(rank_o[e] >= len(o) - tol for e in dropped)
    )
    if (added or dropped) and not near_cut:
        name = lambda e, ranks: f"{e[0]} -> {e[1]} (rank {ranks[e] + 1})"  # noqa: E731
        rule = (
            "the edge set must match exactly"
            if tol is None
            else f"only edges within {tol} ranks of the cut may come and go"
        )
        cmp.structural.append(
            f"{where}: the circuit changed ({rule}): "
            + "; ".join(
                part
                for part in (
                    f"edges added: {', '.join(name(e, rank_n) for e in added)}" if added else "",
                    f"edges dropped: {', '.join(name(e, rank_o) for e in dropped)}" if dropped else "",
                )
                if part
            )
        )
    elif added or dropped:
        cmp.notes.append(
            f"{where}: {len(added)} edge(s) added and {len(dropped)} dropped near the cut (within rank_tolerance {tol})"
        )
    moves = [(e, rank_o[e], rank_n[e]) for e in rank_o if e in rank_n and rank_o[e] != rank_n[e]]
    text = ", ".join(f"{s} -> {r} {a + 1} -> {b + 1}" for (s, r), a, b in moves[:10])
    if moves and tol is not None and any(abs(a - b) > tol for _, a, b in moves):
        cmp.structural.append(f"{where}: edges re-ranked beyond rank_tolerance {tol}: {text}")
    elif moves:
        cmp.notes.append(f"{where}: edges re-ranked: {text}")
    scores_n = {(s, r): v for s, r, v in n}
    for s, r, v in o:
        if (s, r) in scores_n:
            _walk(v, scores_n[(s, r)], path + ("edges", f"{s} -> {r}"), cmp)


def compare_findings(old: Any, new: Any, tolerance: Tolerance, rank_tolerance: int | None = None) -> Comparison:
    """Compare two `finding` trees (as encode.to_value makes them) cell by cell; circuits edge by edge."""
    cmp = Comparison(tolerance, old_finding=old, new_finding=new, rank_tolerance=rank_tolerance)
    _walk(old, new, (), cmp)
    return cmp


def _map_of(finding: Any) -> dict | None:
    if isinstance(finding, dict) and isinstance(finding.get("sites"), list) and isinstance(finding.get("values"), list):
        return finding
    return None


def cell_label(finding: Any, path: tuple[Any, ...]) -> str:
    """A cell named by its axis labels when the finding has them: `values[block 1 / 5 'is']`."""
    m = _map_of(finding)
    if m is not None and len(path) == 3 and path[0] in ("values", "raw") and isinstance(path[1], int):
        i, j = path[1], path[2]
        sites, tokens, positions = (
            m.get("sites", []),
            m.get("tokens", []),
            m.get("positions") or list(range(len(m.get("tokens", [])))),
        )
        if i < len(sites) and j < len(tokens):
            return f"{path[0]}[{sites[i]} / {positions[j] if j < len(positions) else j} {tokens[j]!r}]"
    return _fmt_path(path)


def peak(finding: Any) -> str | None:
    m = _map_of(finding)
    if m is None:
        return None
    best = None
    for i, row in enumerate(m["values"]):
        for j, v in enumerate(row if isinstance(row, list) else []):
            x = _num(v)
            if x is not None and math.isfinite(x) and (best is None or x > best[0]):
                best = (x, i, j)
    if best is None:
        return "none (no finite cell)"
    return f"{best[0]:.4g} at {cell_label(m, ('values', best[1], best[2]))[7:-1]}"


def _g(x: float) -> str:
    return f"{x:.4g}"


def _renamed(change: str) -> bool:
    """Whether a structural change is an old site label turned into its vocabulary name."""
    found = re.match(r"^sites\[\d+\]: '(.+)' -> '(.+)'$", change)
    return bool(found) and renamed_label(found.group(1)) == found.group(2)


def explain(cmp: Comparison, show: int = 10) -> list[str]:
    """The cell diff: what share moved, error statistics, the first moved cells, the peaks."""
    lines: list[str] = []
    if cmp.structural:
        lines.append("the finding's shape or labels changed (always a mismatch):")
        lines += [f"  {s}" for s in cmp.structural[:show]]
        if len(cmp.structural) > show:
            lines.append(f"  ... only showing the first {show} of {len(cmp.structural)} changes")
        if any(_renamed(s) for s in cmp.structural):
            lines.append(
                "  (site labels were renamed to the one vocabulary: 'block N' is 'resid_post.N', 'attn N' 'attn_out.N', "
                "'mlp N' 'mlp_out.N', 'head L.H' 'head_out.L.H'; if only labels changed, --snapshot-update re-records them)"
            )
    lines += cmp.notes[:show]
    n, k = len(cmp.cells), len(cmp.moved)
    if n:
        lines.append(f"cells moved beyond tolerance: {k} / {n} ({100 * k / n:.1f}%)   tolerance: {cmp.tolerance}")
        abs_e = [c.abs_err for c in cmp.cells]
        rel_e = [c.rel_err for c in cmp.cells if c.old != 0 and math.isfinite(c.old)]
        lines.append(
            f"abs error: max {_g(max(abs_e))}, mean {_g(statistics.fmean(abs_e))}, median {_g(statistics.median(abs_e))}"
        )
        if rel_e:
            lines.append(
                f"rel error: max {_g(max(rel_e))}, mean {_g(statistics.fmean(rel_e))}, median {_g(statistics.median(rel_e))}"
                + (f" (over the {len(rel_e)} cells not 0 before)" if len(rel_e) < n else "")
            )
    if cmp.moved:
        width = max(len(cell_label(cmp.old_finding, c.path)) for c in cmp.moved[:show])
        lines.append("moved cells (old -> new):")
        for c in cmp.moved[:show]:
            lines.append(
                f"  {cell_label(cmp.old_finding, c.path):<{width}}  {_g(c.old)} -> {_g(c.new)}  (abs {_g(c.abs_err)}, rel {_g(c.rel_err)})"
            )
        if k > show:
            lines.append(f"  ... only showing the first {show} of {k} moved cells")
    old_peak, new_peak = peak(cmp.old_finding), peak(cmp.new_finding)
    if old_peak is not None and new_peak is not None:
        lines.append(f"peak: old {old_peak}, new {new_peak}")
    return lines


def environment_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two recorded environments, weights aside: ['nnsight 0.7.0 -> 0.8.1']."""
    keys = [k for k in ENV_ORDER if k in old or k in new] + sorted(
        k for k in set(old) | set(new) if k not in ENV_ORDER and k != "weights"
    )
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]


def calibrate_tolerance(
    *runs: Callable[[], Any], repeats: int = 3, factor: float = 10.0, floor: float = 1e-6
) -> Tolerance:
    """A tolerance from measured noise: run each callable `repeats` times, compare every result with the first.

    Rule: atol = factor x the largest absolute difference seen (at least `floor`), rtol = factor x
    the largest relative one (0 when the values never moved). Pass one callable to measure run-to-run
    noise, or two (e.g. the finding in float32 and in the test's dtype) to measure the dtype's.

    >>> tol = calibrate_tolerance(lambda: sweep(model, clean, corrupt, metric))   # doctest: +SKIP
    >>> assert effects == finding_snapshot(tolerance=tol)                        # doctest: +SKIP
    """
    if not runs or not all(callable(r) for r in runs):
        raise ArgumentTypeError("calibrate_tolerance(*runs): pass one or more callables that each return the finding")
    if not isinstance(repeats, int) or repeats < 1 or (len(runs) == 1 and repeats < 2):
        raise ArgumentError(
            f"repeats={repeats!r}: expected an int >= 1 (>= 2 with a single callable, to see any noise)"
        )
    if not (factor >= 1):
        raise ArgumentError(f"factor={factor!r}: expected a number >= 1")
    results = [to_value(run(), 12) for run in runs for _ in range(repeats)]
    max_abs = max_rel = 0.0
    for other in results[1:]:
        cmp = compare_findings(results[0], other, Tolerance(0.0, 0.0))
        if cmp.structural:
            raise ArgumentError(
                "calibrate_tolerance: the runs disagree in shape or labels: " + "; ".join(cmp.structural[:3])
            )
        for c in cmp.cells:
            if math.isfinite(c.abs_err):
                max_abs = max(max_abs, c.abs_err)
            if math.isfinite(c.rel_err):
                max_rel = max(max_rel, c.rel_err)
    what = f"{len(results)} runs of {len(runs)} callable{'s' if len(runs) > 1 else ''}"
    rule = f"{factor:g} x the largest difference over {what}: abs {max_abs:.3g}, rel {max_rel:.3g}; atol at least {floor:g}"
    return Tolerance(max(factor * max_abs, floor), factor * max_rel, rule)


def tolerance_from(
    atol: float | None, rtol: float | None, tolerance: Tolerance | None, default: Tolerance
) -> Tolerance:
    """The per-call tolerance: an explicit Tolerance, else atol/rtol over the default."""
    if tolerance is not None:
        if not isinstance(tolerance, Tolerance):
            raise ArgumentTypeError(f"tolerance={tolerance!r}: expected a Tolerance (from calibrate_tolerance)")
        return tolerance
    if atol is None and rtol is None:
        return default
    return Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol, "set by the test")
