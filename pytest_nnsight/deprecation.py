"""Old spellings that keep working for one release, each with a DeprecationWarning naming the new one.

Standard library only. A verb's old positional arguments after the prompts (`sweep(model, clean,
corrupt, metric)`) map onto their keywords here; a value given both ways is refused, never guessed.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from .errors import ArgumentTypeError


class Unset:
    """The default of a keyword that must be given (possibly positionally, the old way)."""

    def __repr__(self) -> str:
        return "<required>"


UNSET: Any = Unset()


def deprecated(old: str, new: str, *, stacklevel: int = 2) -> None:
    """Warn that `old` still works for this release only; `new` is what to write instead.

    `stacklevel` 2 points the warning at the caller of the function that calls this one."""
    warnings.warn(
        f"{old} is deprecated and stops working in the next release: {new}",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def moved_positionals(
    verb: str, head: str, old: Sequence[Any], names: Sequence[str], given: dict[str, Any]
) -> dict[str, Any]:
    """`given` (keyword -> value or UNSET) with `old` positional values assigned to `names` in order, warning once.

    `head` is the verb's positional part as the user should write it, e.g. 'model, clean, corrupt'.
    """
    if not old:
        return dict(given)
    if len(old) > len(names):
        raise ArgumentTypeError(
            f"{verb}() takes {head.count(',') + 1} positional arguments ({head}) but {head.count(',') + 1 + len(old)} were given: "
            f"pass {', '.join(f'{n}=' for n in names)} by keyword"
        )
    out = dict(given)
    for name, value in zip(names, old):
        if given.get(name, UNSET) is not UNSET:
            raise ArgumentTypeError(f"{verb}() got {name} twice, by position and as {name}=: pass it once, as {name}=")
        out[name] = value
    moved = names[: len(old)]
    deprecated(
        f"passing {', '.join(moved)} to {verb}() by position",
        f"write {verb}({head}, {', '.join(f'{n}=...' for n in moved)})",
        stacklevel=3,
    )
    return out


def required(verb: str, values: dict[str, Any]) -> None:
    """ArgumentTypeError naming the keywords still UNSET."""
    missing = [k for k, v in values.items() if v is UNSET]
    if missing:
        raise ArgumentTypeError(f"{verb}() missing required keyword argument(s): {', '.join(f'{m}=' for m in missing)}")
