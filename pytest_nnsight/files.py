"""Writing and hashing the files the plugin owns: snapshots, reports, finding specs, cache entries."""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from pathlib import Path


def _file_mode(target: Path) -> int:
    """The mode a plain write would give `target`: its current mode, else 0o666 less the umask."""
    try:
        return target.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, data: str | bytes) -> int:
    """Write to a temp file beside `path`, fsync, then os.replace: a reader never sees half a file. Returns the size.

    Temp files of the same target left by a killed run are removed afterwards (each target has one writer).
    """
    target = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(target))  # mkstemp makes it 0600
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    return len(raw)


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
