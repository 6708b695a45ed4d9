"""The structure lock: every model the plugin serves is compared against its recorded structure.

The first time a model id is served in a repository, its structure record (`structure.model_structure`:
what each module returns, tokenizer and attention facts, and what nnsight does with it) is written to
`__snapshots__/.nnsight-structure.lock` under the rootdir. Later runs record the served model once
per run (one probe per model) and compare: when it changed, every test using that model fails with the
explained difference (`structure_diff.explain`), so raw nnsight code in a test is guarded without a
structure test. `--snapshot-update` or `--nnsight-structure-lock update` accepts the change, `warn`
reports it without failing (the version matrix runs so), `off` switches the lock off.

Imports only the standard library at module load (the record loads torch when a model is served).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import StructureChangedError  # noqa: F401  (re-exported; every error class lives in errors.py)
from .settings import STRUCTURE_LOCK_MODES as MODES, parse_structure_lock as parse_mode  # noqa: F401

# JSON; a dot name: syrupy skips it (any other file there counts as an unused snapshot)
LOCK_NAME = ".nnsight-structure.lock"
SNAPSHOT_DIR = "__snapshots__"
FORMAT = "pytest-nnsight structure lock"
VERSION = 1


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """One writer at a time in `directory` (xdist workers may each record a model): flock on the directory itself,
    so no lock file is left behind; where there is no flock (Windows), writers are not serialized."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class Verdict:
    """What the lock said about one model this run."""

    label: str
    status: str  # recorded / unchanged / changed / accepted / error
    lines: list[str] = field(default_factory=list)  # the explanation of a change
    changes: list[str] = field(default_factory=list)  # library versions that changed since the record
    seconds: float = 0.0
    record: dict[str, Any] | None = None  # the served model's record (this run)


@dataclass
class StructureLock:
    """One pytest run's lock: the file, the mode and the verdict per served model."""

    path: Path
    mode: str = "on"
    update: bool = False  # --snapshot-update
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    item: Any = None  # the running test
    probes: dict[str, int] = field(default_factory=dict)  # structure records taken per model this run
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # -- the file ----------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise StructureChangedError(
                f"structure lock {self.path}: not valid JSON ({exc}); delete it and rerun to record "
                "every served model again"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("models"), dict):
            raise StructureChangedError(
                f'structure lock {self.path}: not a pytest-nnsight structure lock (no "format": "{FORMAT}"); '
                "delete it and rerun to record every served model again"
            )
        return data["models"]

    def write(self, label: str, entry: dict[str, Any]) -> None:
        """Merge one model's entry into the file (re-read first: xdist workers may each add a model)."""
        from .files import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.path.parent):
            models = self.read()
            models[label] = entry
            text = json.dumps({"format": FORMAT, "version": VERSION, "models": dict(sorted(models.items()))}, indent=1)
            atomic_write(self.path, text + "\n")

    # -- serving ------------------------------------------------------------------------------------
    def check(self, label: str, wrapper: Any) -> Verdict:
        """The verdict for a served model: recorded on the first serve of the run, then reused."""
        with self._lock:
            verdict = self.verdicts.get(label)
            if verdict is None:
                verdict = self.verdicts[label] = self._first_check(label, wrapper)
            return verdict

    def _first_check(self, label: str, wrapper: Any) -> Verdict:
        from .environment import library_versions
        from .snapshots.compare import environment_changes
        from .structure import model_structure
        from .structure_diff import explain

        start = time.perf_counter()
        self.probes[label] = self.probes.get(label, 0) + 1
        try:
            record = model_structure(wrapper).record
        except Exception as exc:  # noqa: BLE001 - a model the probe cannot record is served unguarded, never failed
            return Verdict(
                label,
                "error",
                [f"not recorded: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"],
                seconds=time.perf_counter() - start,
            )
        seconds = time.perf_counter() - start
        versions = library_versions()
        entry = {"environment": versions, "structure": record}
        stored = self.read().get(label)
        if stored is None:
            if self.mode == "warn":  # read-only (the version matrix): nothing recorded
                return Verdict(label, "not in the lock", seconds=seconds, record=record)
            self.write(label, entry)
            return Verdict(label, "recorded", seconds=seconds, record=record)
        old = stored.get("structure") or {}
        changes = environment_changes(stored.get("environment") or {}, versions)
        if old == record:
            return Verdict(label, "unchanged", changes=changes, seconds=seconds, record=record)
        lines = explain(old, record) or [
            "(the records differ only in fields without an explanation rule; compare the lock file's JSON)"
        ]
        if self.update or self.mode == "update":
            self.write(label, entry)
            return Verdict(label, "accepted", lines, changes, seconds, record)
        return Verdict(label, "changed", lines, changes, seconds, record)

    def failure(self, verdict: Verdict) -> str | None:
        """The failure text for a test using a changed model (None when it passes)."""
        if verdict.status != "changed" or self.mode != "on":
            return None
        return "\n".join(message_lines(verdict, self.path))


def message_lines(verdict: Verdict, path: Path) -> list[str]:
    after = f" after {', '.join(verdict.changes)}" if verdict.changes else " (same library versions)"
    return [
        f"the structure of {verdict.label} changed{after} (structure lock {SNAPSHOT_DIR}/{path.name}):",
        *verdict.lines,
        "accept it with --snapshot-update or --nnsight-structure-lock update; switch the lock off with --nnsight-structure-lock off",
    ]


_STACK: list[StructureLock] = []  # one per running session (pytester nests sessions in one process)


def active() -> StructureLock | None:
    return _STACK[-1] if _STACK else None


def configure(rootpath: Path, mode: str, update: bool) -> StructureLock | None:
    lock = StructureLock(Path(rootpath) / SNAPSHOT_DIR / LOCK_NAME, mode, update) if mode != "off" else None
    _STACK.append(lock)  # type: ignore[arg-type]  # None keeps the stack aligned with the sessions
    return lock


def unconfigure() -> None:
    if _STACK:
        _STACK.pop()


def start_item(item: Any) -> None:
    """The test about to run: models served from now on are noted as its models."""
    lock = active()
    if lock is not None:
        lock.item = item


def served(lock: StructureLock, label: str) -> None:
    """Note a served model on the running test (its hints and snapshot lines name that model's change)."""
    item = lock.item
    if item is None:
        return
    labels = getattr(item, "_nnsight_models", None)
    if labels is None:
        labels = item._nnsight_models = []
    if label not in labels:
        labels.append(label)


def models_of(item: Any) -> list[str]:
    """The models served while `item` ran (its setup included); all models of the session when none was noted
    (a session-scoped fixture served it for an earlier test)."""
    lock = active()
    noted = list(getattr(item, "_nnsight_models", None) or [])
    return noted or ([] if lock is None else list(lock.verdicts))


def on_serve(loaded: Any, lock: StructureLock | None, rootpath: Path | None = None) -> None:
    """ModelCache's hook: check the served model against the lock; StructureChangedError when the lock fails it."""
    if lock is None:
        return
    label = label_of(loaded.key, loaded.info, rootpath)
    if label is None:
        return
    verdict = lock.check(label, loaded.model)
    served(lock, label)
    message = lock.failure(verdict)
    if message:
        raise StructureChangedError(message)


def label_of(key: Any, info: dict[str, Any], rootpath: Path | None = None) -> str | None:
    """The lock's name for a served model: its id (a path relative to the rootdir), @revision, and a non-default
    dtype; None for a module object passed in (no stable id across runs)."""
    import tempfile

    source = str(key.source)
    if source.startswith("module:") or source.startswith(tempfile.gettempdir().rstrip("/") + "/"):
        return None  # a module object, or a checkpoint in a temp dir: no identity that lasts across runs
    if rootpath is not None:
        try:
            source = Path(source).relative_to(rootpath).as_posix() if Path(source).is_absolute() else source
        except ValueError:
            pass
    label = source + (f"@{key.revision}" if key.revision else "")
    dtype = str(info.get("dtype", "float32")).replace("torch.", "")
    return label + ("" if dtype in ("float32", "auto") else f" [{dtype}]")


def changed_models() -> dict[str, Verdict]:
    """Models whose structure changed (or was accepted as changed) in the running session."""
    lock = active()
    if lock is None:
        return {}
    return {k: v for k, v in lock.verdicts.items() if v.status in ("changed", "accepted")}


def records() -> dict[str, dict[str, Any]]:
    """The structure record of each model served in the running session."""
    lock = active()
    return {} if lock is None else {k: v.record for k, v in lock.verdicts.items() if v.record}


def summary_lines() -> list[str]:
    """The terminal summary: one line per served model, with the probe cost."""
    lock = active()
    if lock is None or not lock.verdicts:
        return []
    out = []
    for label, v in lock.verdicts.items():
        what = {
            "recorded": f"recorded in {SNAPSHOT_DIR}/{lock.path.name} (first serve)",
            "unchanged": "unchanged",
            "changed": f"CHANGED ({len(v.lines)} line(s); "
            + ("tests using it fail)" if lock.mode == "on" else "warn only)"),
            "accepted": "changed and accepted (lock rewritten)",
            "error": v.lines[0] if v.lines else "not recorded",
        }.get(v.status, v.status)
        out.append(f"{label}: {what}; {lock.probes.get(label, 0)} probe(s), {v.seconds * 1000:.0f} ms")
    return out
