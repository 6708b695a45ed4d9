"""The syrupy extension for findings, and the `finding_snapshot` assertion with per-call tolerance.

One JSON file per snapshot (syrupy's single-file layout: ``__snapshots__/<test module>/<test>.json``),
written atomically. ``matches`` compares numbers within a tolerance instead of text, and reads the
recorded environment: a finding that still holds under new library versions passes and is reported
as re-verified; one that moved fails with the environment change first, then the cell diff.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Any, Iterator

from syrupy.assertion import SnapshotAssertion
from syrupy.data import SnapshotCollections
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from ..environment import library_versions
from ..errors import ArgumentTypeError
from ..files import atomic_write  # noqa: F401  (also imported from here by tests)
from ..findings import record_snapshot
from . import hooks
from .compare import (
    Comparison,
    Tolerance,
    compare_findings,
    default_tolerance,
    environment_changes,
    explain,
    tolerance_from,
)
from .encode import DECIMALS, dumps, loads, record
from .syrupy_adapter import after_this_assertion, assertion_like

ACCEPT = "run pytest --snapshot-update to accept the change"


def _first_param(model: Any) -> Any:
    root = getattr(model, "_module", model)
    for getter in ("parameters", "buffers"):
        for p in getattr(root, getter, lambda: ())():
            return p
    return None


def snapshot_environment(
    model: Any = None, cache: Any = None, data: Any = None, settings: Any = None
) -> dict[str, Any]:
    """What produced a finding: library versions, device type, dtype, model id and revision, weights fingerprint.

    `settings` (the run's, given by the fixture) name the device and dtype of a finding with no model or tensor."""
    state = hooks.active()
    if state.versions is None:
        state.versions = library_versions()
    env: dict[str, Any] = dict(state.versions)
    s = settings
    device = dtype = model_id = revision = weights = None
    if model is not None:
        p = _first_param(model)
        if p is not None:
            device, dtype = p.device.type, str(p.dtype).replace("torch.", "")
        model_id = type(getattr(model, "_module", model)).__name__
        entry = None
        if cache is not None:
            try:
                entry = cache.info(model)
            except Exception:
                entry = None
        if entry is not None:
            model_id, revision = entry.info.get("id", entry.key.source), entry.key.revision
        from ..fingerprint import weights_fingerprint

        weights = weights_fingerprint(model, cache)
    elif type(data).__module__.startswith("torch") and hasattr(data, "device"):
        device, dtype = data.device.type, str(data.dtype).replace("torch.", "")
    else:
        if s is not None and s.device != "auto":
            device = s.device.split(":")[0]
        elif "torch" in sys.modules:
            device = "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
        dtype = s.dtype if s is not None and s.dtype != "auto" else None
    env.update(device=device, dtype=dtype, model=model_id, revision=revision, weights=weights)
    return env


@dataclass(kw_only=True)
class _TestOptions:
    """The options a test sets on `finding_snapshot`: fields of the assertion (keyword-only, so they can follow
    syrupy's required ones), handed to the extension in `Options`."""

    atol: float | None = None
    rtol: float | None = None
    tolerance: Tolerance | None = None
    model: Any = None
    across_weights: bool = False
    cache: Any = None
    rank_tolerance: int | None = None  # circuits: ranks an edge may move, or edges near the cut that may come and go
    settings: Any = None  # the run's Settings, from the fixture (None: every option at its default)


@dataclass
class Options(_TestOptions):
    """The options of one comparison, set by the assertion just before it runs."""

    item: Any = None
    update: bool | None = None


@dataclass
class Outcome:
    received: str
    stored: str
    comparison: Comparison
    changes: list[str]
    weights: tuple[Any, Any] | None  # (old, new) fingerprints when they differ
    model: Any = None


class FindingSnapshotExtension(SingleFileSnapshotExtension):
    """Findings as JSON files compared with numeric tolerance: ``snapshot.use_extension(FindingSnapshotExtension)``."""

    file_extension = "json"
    _write_mode = WriteMode.TEXT
    decimals: int = DECIMALS
    show_cells: int = 10

    def __init__(self) -> None:
        self.options = Options()
        self.last: Outcome | None = None
        self._location: str | None = None

    def serialize(self, data: Any, *, exclude: Any = None, include: Any = None, matcher: Any = None) -> str:
        env = snapshot_environment(self.options.model, self.options.cache, data, self.options.settings)
        return dumps(record(data, env, self.decimals))

    def read_snapshot_data_from_location(self, *, snapshot_location: str, snapshot_name: str, session_id: str) -> Any:
        text = super().read_snapshot_data_from_location(
            snapshot_location=snapshot_location, snapshot_name=snapshot_name, session_id=session_id
        )
        if text is None:
            return None
        loads(text, snapshot_location)  # a broken file: SnapshotFileError naming it, never an overwrite
        self._location = snapshot_location
        return text

    @classmethod
    def write_snapshot_collection(cls, *, snapshot_collection: Any, name_order: Any = None) -> None:
        data = next(iter(snapshot_collection)).data
        if not isinstance(data, str):
            raise TypeError(f"FindingSnapshotExtension writes text, got {type(data).__name__}")
        atomic_write(snapshot_collection.location, data)

    def discover_snapshots(
        self, *, test_location: Any, ignore_extensions: list[str] | None = None
    ) -> SnapshotCollections:
        found = super().discover_snapshots(test_location=test_location, ignore_extensions=ignore_extensions)
        kept = SnapshotCollections()
        for collection in found:
            if not hooks.protected(collection.location):  # skipped is not stale
                kept.add(collection)
        return kept

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        opts, state = self.options, hooks.active()
        new, old = loads(serialized_data, "<received>"), loads(snapshot_data, self._location or "<snapshot>")
        env_old, env_new = old["environment"], new["environment"]
        default = default_tolerance(env_new.get("dtype") or env_old.get("dtype"), state.atol, state.rtol)
        cmp = compare_findings(
            old["finding"],
            new["finding"],
            tolerance_from(opts.atol, opts.rtol, opts.tolerance, default),
            rank_tolerance=opts.rank_tolerance,
        )
        changes = environment_changes(env_old, env_new)
        w_old, w_new = env_old.get("weights"), env_new.get("weights")
        # a fingerprint hashes the weights as loaded: in another dtype it differs without the weights changing
        same_dtype = env_old.get("dtype") == env_new.get("dtype")
        weights = (w_old, w_new) if w_old and w_new and w_old != w_new and same_dtype else None
        self.last = Outcome(serialized_data, snapshot_data, cmp, changes, weights, env_new.get("model"))
        if not cmp.ok or (weights and not opts.across_weights):
            return False
        if not changes and not weights:
            return True
        update = state.update if opts.update is None else opts.update
        if update:
            return False  # --snapshot-update records the new environment (and values) too
        what = ", ".join(changes + (["weights " + " -> ".join(str(w)[:12] for w in weights)] if weights else []))
        if state.refresh_env and self._location:
            old["environment"] = env_new
            atomic_write(self._location, dumps(old))
            hooks.note(f"environment refreshed ({what}); values kept, within {cmp.tolerance}")
        else:
            hooks.note(f"re-verified under a new environment: {what} (within {cmp.tolerance})")
        return True

    def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
        if not snapshot_data:
            yield "no finding recorded yet: run pytest --snapshot-update to record it"
            return
        out = self.last
        if out is None or out.received != serialized_data or out.stored != snapshot_data:
            self.matches(serialized_data=serialized_data, snapshot_data=snapshot_data)
            out = self.last
        assert out is not None
        structural = _structure_change_line(self.options.item)
        if structural and not out.weights:
            yield structural
        if out.weights and not self.options.across_weights:
            yield f"the model's weights changed: fingerprint {out.weights[0]} -> {out.weights[1]} (model {out.model})"
            yield "the finding was recorded on other weights; pass across_weights=True to compare across them"
        elif out.changes:
            yield "this finding drifted after " + ", ".join(out.changes) + " (--snapshot-update accepts it)"
        else:
            yield "this finding moved beyond tolerance in the same environment (--snapshot-update accepts it)"
        yield from explain(out.comparison, self.show_cells)
        yield ACCEPT if not out.weights else "run pytest --snapshot-update to record the finding on these weights"


def _structure_change_line(item: Any) -> str | None:
    """The first line of a drift in a run where a model of this test changed structure (the structure lock)."""
    from .. import structure_lock

    changed = structure_lock.changed_models()
    models = [m for m in structure_lock.models_of(item) if m in changed] if item is not None else list(changed)
    if not models:
        return None
    v = changed[models[0]]
    first = v.lines[0] if v.lines else "see the structure lock"
    return (
        f"this finding drifted in the same run as a structure change of {v.label}"
        + (f" ({', '.join(v.changes)})" if v.changes else "")
        + f": {first}"
        + (f" (+{len(v.lines) - 1} more line(s) in the structure lock failure)" if len(v.lines) > 1 else "")
    )


@dataclass(eq=False, order=False, repr=False)
class FindingSnapshotAssertion(SnapshotAssertion, _TestOptions):
    """syrupy's snapshot assertion using FindingSnapshotExtension, with tolerance, model and weights options.

    >>> assert effects == finding_snapshot(model=model, atol=1e-3, rtol=0)   # doctest: +SKIP
    """

    _OWN = tuple(f.name for f in fields(_TestOptions))  # the options a test sets

    @classmethod
    def from_snapshot(
        cls, snapshot: SnapshotAssertion, *, cache: Any = None, settings: Any = None
    ) -> "FindingSnapshotAssertion":
        """The equivalent of ``snapshot.use_extension(FindingSnapshotExtension)``, as this class."""
        return assertion_like(snapshot, cls, FindingSnapshotExtension, cache=cache, settings=settings)

    def with_defaults(self, **kwargs: Any) -> "FindingSnapshotAssertion":
        new = super().with_defaults(**kwargs)
        for name in self._OWN:
            setattr(new, name, getattr(self, name))
        return new  # type: ignore[return-value]

    @staticmethod
    def _check(atol: Any, rtol: Any, tolerance: Any) -> None:
        if atol is not None or rtol is not None:
            # raises on a negative or non-number
            Tolerance(0.0 if atol is None else atol, 0.0 if rtol is None else rtol)
        if tolerance is not None and not isinstance(tolerance, Tolerance):
            raise ArgumentTypeError(f"tolerance={tolerance!r}: expected a Tolerance (from calibrate_tolerance)")

    def with_tolerance(
        self, atol: float | None = None, rtol: float | None = None, *, tolerance: Tolerance | None = None
    ) -> "FindingSnapshotAssertion":
        """A copy comparing every assertion with this tolerance (a new assertion: its own snapshot index)."""
        self._check(atol, rtol, tolerance)
        new = self.with_defaults()
        new.atol, new.rtol, new.tolerance = atol, rtol, tolerance
        return new

    def __call__(
        self,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        tolerance: Tolerance | None = None,
        model: Any = None,
        across_weights: bool | None = None,
        rank_tolerance: int | None = None,
        **kwargs: Any,
    ) -> "FindingSnapshotAssertion":
        """Options for the next assertion only; syrupy's own keywords (name=, ...) pass through.

        `rank_tolerance=k` (circuits): an edge may move up to k ranks, and edges within k ranks of the cut may come
        and go; without it the edge set must match exactly."""
        self._check(atol, rtol, tolerance)
        if rank_tolerance is not None and (
            isinstance(rank_tolerance, bool) or not isinstance(rank_tolerance, int) or rank_tolerance < 0
        ):
            raise ArgumentTypeError(f"rank_tolerance={rank_tolerance!r}: expected an int >= 0 (ranks an edge may move)")
        for name, value in (
            ("atol", atol),
            ("rtol", rtol),
            ("tolerance", tolerance),
            ("model", model),
            ("across_weights", across_weights),
            ("rank_tolerance", rank_tolerance),
        ):
            if value is not None:
                previous = getattr(self, name)
                setattr(self, name, value)
                after_this_assertion(self, lambda n=name, v=previous: setattr(self, n, v))
        return super().__call__(**kwargs)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<finding_snapshot of {self.test_location.snapshot_name}: {self.num_executions} assertion(s)>"

    def _assert(self, data: Any) -> bool:
        ext = self.extension
        if isinstance(ext, FindingSnapshotExtension):
            ext.options = Options(
                **{n: getattr(self, n) for n in self._OWN},
                item=getattr(self.test_location, "item", None),
                update=self.update_snapshots,
            )
        ok = super()._assert(data)
        record_snapshot(self, data)  # new, matched, re-verified, drifted: for the findings report
        return ok
