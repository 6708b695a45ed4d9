"""The compatibility record: which (nnsight, transformers, torch) combinations the version matrix has checked.

`CI/matrix.py --write-compat pytest_nnsight/compatibility.json` writes the table; the plugin's
report header says whether the installed combination is in it. Standard library only: versions
are read with importlib.metadata, so the header costs no torch or nnsight import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .environment import package_version

TABLE = Path(__file__).with_name("compatibility.json")
PACKAGES = ("nnsight", "transformers", "torch")


def normalize(version: str) -> str:
    """A version without its local part ('2.13.0+cpu' -> '2.13.0'): CPU and CUDA builds of one release count as one."""
    return version.split("+", 1)[0]


def installed() -> tuple[str, str, str]:
    """The installed (nnsight, transformers, torch) versions, normalized."""
    return tuple(normalize(package_version(p)) for p in PACKAGES)  # type: ignore[return-value]


def load_table(path: Path | None = None) -> list[dict[str, Any]]:
    """The checked combinations of the table at `path` (default: the shipped one); [] when there is no table."""
    p = Path(path or TABLE)
    if not p.is_file():
        return []
    data = json.loads(p.read_text(encoding="utf-8"))
    rows = data.get("combinations", []) if isinstance(data, dict) else []
    return [r for r in rows if isinstance(r, dict) and all(isinstance(r.get(k), str) for k in PACKAGES)]


def lookup(rows: list[dict[str, Any]], combination: tuple[str, str, str]) -> dict[str, Any] | None:
    """The table's row for `combination`, or None."""
    for r in rows:
        if tuple(normalize(r[k]) for k in PACKAGES) == tuple(combination):
            return r
    return None


def _numbers(version: str) -> tuple[int, ...]:
    from .compat import parse_version

    return parse_version(version)


def newer_than_checked(rows: list[dict[str, Any]], combination: tuple[str, str, str]) -> list[str]:
    """The installed nnsight / transformers that are newer than every release of them in the table: ['nnsight 0.9.0']."""
    out = []
    for i, name in enumerate(PACKAGES[:2]):
        checked = [_numbers(r[name]) for r in rows]
        mine = _numbers(combination[i])
        if checked and mine and mine > max(checked):
            out.append(f"{name} {combination[i]}")
    return out


def header_line(path: Path | None = None, combination: tuple[str, str, str] | None = None) -> str:
    """One report-header line: whether the version matrix has checked the installed combination, and how it went.

    An nnsight or transformers newer than any the table holds is not refused: the line warns that the run
    is outside the checked range, where a passing test may hide a changed meaning (hazards H1-H14).
    """
    combo = combination or installed()
    what = f"nnsight {combo[0]}, transformers {combo[1]}, torch {combo[2]}"
    try:
        rows = load_table(path)
    except (OSError, ValueError) as exc:
        return f"pytest-nnsight compatibility: the table {str(path or TABLE)!r} is unreadable ({type(exc).__name__}); {what} is unchecked"
    newer = newer_than_checked(rows, combo)
    if newer:
        newest = ", ".join(f"{p} {max((r[p] for r in rows), key=_numbers)}" for p in PACKAGES[:2])
        return (
            f"pytest-nnsight WARNING: {' and '.join(newer)} is outside the checked range (newest checked: {newest}): "
            "run the version matrix (CI/matrix.py) before trusting this run"
        )
    row = lookup(rows, combo)
    if row is None:
        known = "; ".join(f"{r['nnsight']}/{r['transformers']}/{r['torch']}" for r in rows) or "none"
        return (
            f"pytest-nnsight compatibility: {what} has NOT been checked by the version matrix "
            f"(checked nnsight/transformers/torch: {known}); run CI/matrix.py to check your findings under it"
        )
    state = "all pass" if row.get("ok") else "NOT all pass"
    return (
        f"pytest-nnsight compatibility: {what} checked by the version matrix on {row.get('checked', '?')} "
        f"(env {row.get('env', '?')}): {row.get('passed', '?')}/{row.get('total', '?')} example findings pass ({state})"
    )
