"""Values as specs: a JSON-ready description of what a module returned ('Tensor[2,6,32] float32', tuples, dicts).

Shared by the structure record (structure.py) and the nnsight semantics probes (semantics.py). Standard library only.
"""

from __future__ import annotations

from typing import Any, Mapping


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "shape") and hasattr(x, "dtype")


def spec_of(x: Any) -> Any:
    """A JSON-ready description of a value with raw shapes: 'Tensor[2,6,32] float32', {'tuple': [...]}, null."""
    if x is None:
        return None
    if _is_tensor(x):
        return ("Tensor", tuple(int(d) for d in x.shape), str(x.dtype).replace("torch.", ""))
    if isinstance(x, bool):
        return f"bool={x}"
    if isinstance(x, (int, float, str)):
        return type(x).__name__
    if isinstance(x, (tuple, list)):
        return {type(x).__name__: [spec_of(v) for v in x]}
    if isinstance(x, Mapping):
        return {type(x).__name__: {str(k): spec_of(v) for k, v in x.items()}}
    return f"<{type(x).__name__}>"
