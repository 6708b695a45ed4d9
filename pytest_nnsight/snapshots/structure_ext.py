"""Structure snapshots: a model's module tree as a syrupy snapshot that explains what changed.

``StructureSnapshotExtension`` stores `structure.model_structure(...)` as JSON beside the findings
snapshots (``__snapshots__/<test module>/<test>[structure].json``), written atomically, and
compares records exactly. On a change the failure names each module and the consequence for code
that reads it (`structure_diff.explain`), after the library versions that changed.

>>> assert model_structure(model) == structure_snapshot     # doctest: +SKIP
>>> structure_snapshot(model)                               # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.single_file import SingleFileSnapshotExtension

from ..environment import library_versions
from ..errors import SnapshotFileError
from ..structure import DEFAULT_PROBE, ModelStructure, model_structure
from ..structure_diff import explain
from . import hooks
from .compare import environment_changes
from .encode import dumps
from .extension import ACCEPT, FindingSnapshotExtension, Options
from .syrupy_adapter import assertion_like

FORMAT = "pytest-nnsight structure"
VERSION = 1


def loads(text: str, location: str = "<snapshot>") -> dict[str, Any]:
    """Parse and validate a structure snapshot; SnapshotFileError naming the file when it is broken."""
    fix = "fix the file, or delete it and run pytest --snapshot-update to record the structure again"
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SnapshotFileError(
            f"structure snapshot {location}, line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}); {fix}"
        ) from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise SnapshotFileError(
            f'structure snapshot {location}: not a pytest-nnsight structure (no "format": "{FORMAT}" header); {fix}'
        )
    if not isinstance(rec.get("version"), int) or rec["version"] > VERSION:
        raise SnapshotFileError(
            f"structure snapshot {location}: format version {rec.get('version')!r}, this pytest-nnsight reads {VERSION}; {fix}"
        )
    if not isinstance(rec.get("environment"), dict) or not isinstance(rec.get("structure"), dict):
        raise SnapshotFileError(
            f"structure snapshot {location}: missing or malformed 'environment' or 'structure' section; {fix}"
        )
    return rec


def structure_environment(structure: ModelStructure) -> dict[str, Any]:
    """Library versions and the model that produced a structure record."""
    state = hooks.active()
    if state.versions is None:
        state.versions = library_versions()
    return {**state.versions, "model": structure.model}


class StructureSnapshotExtension(FindingSnapshotExtension):
    """Model structures as JSON, compared exactly, explained module by module on a change."""

    probe: str = DEFAULT_PROBE

    def serialize(self, data: Any, *, exclude: Any = None, include: Any = None, matcher: Any = None) -> str:
        structure = data if isinstance(data, ModelStructure) else model_structure(data, prompt=self.probe)
        rec = {
            "format": FORMAT,
            "version": VERSION,
            "environment": structure_environment(structure),
            "structure": structure.record,
        }
        return dumps(rec)

    def read_snapshot_data_from_location(self, *, snapshot_location: str, snapshot_name: str, session_id: str) -> Any:
        text = SingleFileSnapshotExtension.read_snapshot_data_from_location(
            self, snapshot_location=snapshot_location, snapshot_name=snapshot_name, session_id=session_id
        )
        if text is None:
            return None
        loads(text, snapshot_location)
        self._location = snapshot_location
        return text

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        new, old = loads(serialized_data, "<received>"), loads(snapshot_data, self._location or "<snapshot>")
        if new["structure"] != old["structure"]:
            return False
        changes = environment_changes(old["environment"], new["environment"])
        if not changes:
            return True
        update = hooks.active().update if self.options.update is None else self.options.update
        if update:
            return False  # --snapshot-update records the new environment
        hooks.note(f"structure unchanged under a new environment: {', '.join(changes)}")
        return True

    def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
        if not snapshot_data:
            yield "no structure recorded yet: run pytest --snapshot-update to record it"
            return
        new, old = loads(serialized_data, "<received>"), loads(snapshot_data, self._location or "<snapshot>")
        changes = environment_changes(old["environment"], new["environment"])
        model = new["environment"].get("model")
        yield (
            f"the structure of {model} changed"
            + (f" after {', '.join(changes)}" if changes else " (same library versions)")
            + ":"
        )
        lines = explain(old["structure"], new["structure"])
        yield from lines or ["(the records differ only in fields without an explanation rule; compare the JSON)"]
        yield ACCEPT


@dataclass(eq=False, order=False, repr=False)
class StructureSnapshotAssertion(SnapshotAssertion):
    """syrupy's snapshot assertion for model structures; its files are named `<test>[structure].json`.

    >>> assert model_structure(model) == structure_snapshot      # doctest: +SKIP
    """

    @classmethod
    def from_snapshot(cls, snapshot: SnapshotAssertion) -> "StructureSnapshotAssertion":
        """The equivalent of ``snapshot.use_extension(StructureSnapshotExtension)``, as this class."""
        return assertion_like(snapshot, cls, StructureSnapshotExtension)

    @property
    def index(self) -> Any:
        if self._custom_index:
            return self._custom_index
        return "structure" if not self.num_executions else f"structure.{self.num_executions}"

    def __call__(self, model: Any = None, tokenizer: Any = None, *, prompt: str = DEFAULT_PROBE, **kwargs: Any) -> Any:
        """`structure_snapshot(model)` records and asserts the model's structure; keywords alone pass to syrupy."""
        __tracebackhide__ = True
        if model is None:
            return super().__call__(**kwargs)
        if kwargs:
            super().__call__(**kwargs)
        structure = model if isinstance(model, ModelStructure) else model_structure(model, tokenizer, prompt=prompt)
        if not self == structure:
            raise AssertionError("\n".join(self.get_assert_diff()))
        return None

    def __repr__(self) -> str:
        return f"<structure_snapshot of {self.test_location.snapshot_name}: {self.num_executions} assertion(s)>"

    def _assert(self, data: Any) -> bool:
        ext = self.extension
        if isinstance(ext, StructureSnapshotExtension):
            ext.options = Options(item=getattr(self.test_location, "item", None), update=self.update_snapshots)
        return super()._assert(data)
