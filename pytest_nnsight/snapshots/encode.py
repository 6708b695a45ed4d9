"""A finding as diff-friendly JSON: results, tensors, arrays and plain numbers, rounded, with their labels.

Floats are rounded to `decimals` places; NaN and infinities are stored explicitly as the strings
"NaN", "Infinity" and "-Infinity". Dataclass results (Effect, EffectMap, PopulationResult, ...)
become an object with an "@type" and their fields in declaration order; a list of numbers sits on
one line, so a changed cell shows as a one-line diff. Imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from ..errors import SnapshotFileError, SnapshotValueError

FORMAT = "pytest-nnsight finding"
VERSION = 1
DECIMALS = 6
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float(x: float, decimals: int) -> Any:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    r = round(float(x), decimals)
    return 0.0 if r == 0 else r  # no "-0.0" churn


def _is_tensor(data: Any) -> bool:
    return type(data).__module__.startswith("torch") and hasattr(data, "detach") and hasattr(data, "dtype")


def _is_numpy(data: Any) -> bool:
    return type(data).__module__.startswith("numpy") and hasattr(data, "dtype") and hasattr(data, "tolist")


def to_value(data: Any, decimals: int = DECIMALS, path: str = "finding") -> Any:
    """`data` as a JSON tree: floats rounded, tuples as lists, dataclasses and tensors as typed objects."""
    if data is None or isinstance(data, (bool, str)):
        return data
    if isinstance(data, int):
        return data
    if isinstance(data, float):  # Measured too
        return _float(data, decimals)
    if (
        dataclasses.is_dataclass(data)
        and not isinstance(data, type)
        and callable(getattr(data, "snapshot_record", None))
    ):
        # e.g. a Circuit: one edge per line
        return to_value({"@type": type(data).__name__, **data.snapshot_record()}, decimals, path)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        out: dict[str, Any] = {"@type": type(data).__name__}
        for f in dataclasses.fields(data):
            out[f.name] = to_value(getattr(data, f.name), decimals, f"{path}.{f.name}")
        return out
    if _is_tensor(data):
        t = data.detach().cpu()
        values = (
            t.float().tolist()
            if t.is_floating_point() and str(t.dtype) in ("torch.bfloat16", "torch.float16")
            else t.tolist()
        )
        return {
            "@type": "tensor",
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
            "values": to_value(values, decimals, path),
        }
    if _is_numpy(data):
        if getattr(data, "ndim", 0) == 0 and hasattr(data, "item"):
            return to_value(data.item(), decimals, path)
        return {
            "@type": "ndarray",
            "dtype": str(data.dtype),
            "shape": list(data.shape),
            "values": to_value(data.tolist(), decimals, path),
        }
    if isinstance(data, Mapping):
        out = {}
        for k, v in data.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise SnapshotValueError(
                    f"cannot snapshot {path}: dict key {k!r} ({type(k).__name__}) is not a string or number"
                )
            out[str(k)] = to_value(v, decimals, f"{path}[{k!r}]")
        return out
    if isinstance(data, (list, tuple)):
        return [to_value(v, decimals, f"{path}[{i}]") for i, v in enumerate(data)]
    raise SnapshotValueError(
        f"cannot snapshot {path}: a {type(data).__name__} is not a number, a label, a result dataclass, a tensor, an array, "
        "or a dict/list of those; convert it first (e.g. float(x) or x.tolist())"
    )


def record(data: Any, environment: dict[str, Any], decimals: int = DECIMALS) -> dict[str, Any]:
    """The whole snapshot: format header, the environment that produced it, the finding."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "decimals": decimals,
        "environment": dict(environment),
        "finding": to_value(data, decimals),
    }


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def _dump(obj: Any, indent: int) -> str:
    pad, inner = "  " * indent, "  " * (indent + 1)
    if _scalar(obj):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, list):
        if all(_scalar(x) for x in obj):
            return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
        return "[\n" + ",\n".join(inner + _dump(x, indent + 1) for x in obj) + "\n" + pad + "]"
    if not obj:
        return "{}"
    items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dump(v, indent + 1)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"


def dumps(rec: dict[str, Any]) -> str:
    """JSON text, one row of numbers per line, ending with a newline."""
    return _dump(rec, 0) + "\n"


def loads(text: str, location: str = "<snapshot>") -> dict[str, Any]:
    """Parse and validate a snapshot; SnapshotFileError naming the file (and line) when it is broken."""
    fix = "fix the file, or delete it and run pytest --snapshot-update to record the finding again"
    try:
        rec = json.loads(text, parse_constant=lambda c: NONFINITE[c])
    except json.JSONDecodeError as exc:
        raise SnapshotFileError(
            f"findings snapshot {location}, line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}); {fix}"
        ) from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise SnapshotFileError(
            f'findings snapshot {location}: not a pytest-nnsight finding (no "format": "{FORMAT}" header); {fix}'
        )
    version = rec.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SnapshotFileError(f'findings snapshot {location}: "version" is {version!r}, expected an integer; {fix}')
    if version > VERSION:
        raise SnapshotFileError(
            f"findings snapshot {location}: format version {version} was written by a newer pytest-nnsight; "
            f"this one reads version {VERSION}: upgrade pytest-nnsight"
        )
    for key, kind in (("environment", dict), ("finding", object)):
        if key not in rec or not isinstance(rec[key], kind):
            raise SnapshotFileError(f"findings snapshot {location}: missing or malformed {key!r} section; {fix}")
    return rec
