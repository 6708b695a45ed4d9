"""Findings snapshots: syrupy snapshots of effects, maps and arrays, compared with numeric tolerance.

``encode`` turns results into diff-friendly JSON, ``compare`` compares two of them within a
tolerance and explains what moved, ``extension`` is the syrupy extension and the
``finding_snapshot`` assertion, ``hooks`` the stdlib-only glue the plugin calls.
Names load lazily so that importing the plugin does not import syrupy's extensions.

>>> assert effects == finding_snapshot(atol=1e-3)        # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "FindingSnapshotExtension": "extension",
    "FindingSnapshotAssertion": "extension",
    "snapshot_environment": "extension",
    "Tolerance": "compare",
    "calibrate_tolerance": "compare",
    "default_tolerance": "compare",
    "compare_findings": "compare",
    "to_record": "encode",
    "dumps": "encode",
    "loads": "encode",
    "FORMAT": "encode",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pytest_nnsight.snapshots' has no attribute {name!r}")


__all__ = sorted(_LAZY)
