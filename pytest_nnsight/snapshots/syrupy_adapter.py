"""Every reach into syrupy's private internals, in one place. Tested on syrupy 7.x (pyproject pins >=7,<8).

syrupy's public extension points (serialize, matches, read/write_snapshot) cover storage and comparison.
Four things have no public hook, and are read or done here:
- the outcome of the assertion that just ran (`SnapshotAssertion._execution_results`, `_executions`);
- undoing per-assertion options after it ran (`SnapshotAssertion._post_assert_actions`);
- remaking the `snapshot` fixture's assertion as a subclass of SnapshotAssertion (its constructor's fields);
- the session's set of collected modules, from which a module skipped at collection must be removed so
  its snapshots are not reported unused (`config._syrupy._collected_modules`).
The assertion classes also override `SnapshotAssertion._assert` (extension.py, structure_ext.py) to set
options before syrupy compares. A syrupy release that moves any of these fails tests/test_snapshots.py.
Standard library only; syrupy's classes are imported where needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

A = TypeVar("A")


def assertion_like(snapshot: Any, cls: type[A], extension_class: type, **extra: Any) -> A:
    """`snapshot` (the `snapshot` fixture's assertion) remade as `cls` with `extension_class`: what syrupy's
    `use_extension` does, for a subclass of SnapshotAssertion (use_extension remakes `snapshot`'s own class).
    Copies every field syrupy's constructor takes (session, test location, update flags, include/exclude/matcher)."""
    fields = {f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot) if f.init}
    return cls(**{**fields, "extension_class": extension_class, **extra})


def last_result(assertion: Any) -> Any:
    """syrupy's record of the assertion that just ran (asserted_data, recalled_data, success), or None."""
    results = getattr(assertion, "_execution_results", {})
    return results.get(getattr(assertion, "_executions", 0) - 1)


def after_this_assertion(assertion: Any, action: Callable[[], Any]) -> None:
    """Run `action` once the current assertion has been compared (syrupy calls these, then clears them)."""
    assertion._post_assert_actions.append(action)


def forget_collected_module(config: Any, path: Any) -> None:
    """Tell syrupy that the module at `path` was not collected (a whole-module skip), so its snapshots stay."""
    modules = getattr(getattr(config, "_syrupy", None), "_collected_modules", None)
    if isinstance(modules, set):
        from syrupy.location import PyTestLocation

        modules.discard(PyTestLocation.module_path_key(path))
