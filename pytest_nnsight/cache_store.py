"""Files of the activation cache: atomic writes, a cross-process lock, checksums, and a safetensors
file written batch by batch (header first, rows seeked into place). Standard library only at import.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import ActivationCacheError
from .files import sha256_of  # noqa: F401  (re-exported for activation_cache)

PREFIX = "ac-"
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}


# -- the directory -------------------------------------------------------------------------------


def clear_directory(directory: Path) -> int:
    """Delete the cache entries (and leftovers) in `directory`; files we did not write are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for p in directory.iterdir():
        if p.is_file() and p.name.startswith(PREFIX) and p.suffix in (".json", ".safetensors", ".tmp", ".lock"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def check_writable(directory: Path, source: str = "default") -> Path:
    """Create `directory` and prove a file can be written there; ActivationCacheError naming it otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f"{PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ActivationCacheError(
            f"activation cache directory {str(directory)!r} (from {source}) is not writable: {type(exc).__name__}: {exc.strerror or exc}. "
            "Point --nnsight-cache-dir (ini nnsight_cache_dir) at a writable directory, or pass --nnsight-no-cache "
            "to run the tests without caching activations"
        ) from None
    return directory


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (xdist workers); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: compute-and-rename, the last manifest rename wins
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# -- a safetensors file written in batches ---------------------------------------------------------


class _StreamWriter:
    """A safetensors file whose header is written first and whose rows are written batch by batch."""

    def __init__(
        self, path: Path, tensors: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str]
    ) -> None:
        if sys.byteorder != "little":
            raise ActivationCacheError(
                "safetensors files are little-endian; this machine is not: run with --nnsight-no-cache"
            )
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, (code, shape) in tensors.items():
            n = _BYTES[code]
            for s in shape:
                n *= s
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, start + n]}
            self.offsets[name] = (start, int(n // shape[0]) if shape and shape[0] else 0)
            start += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.fh = open(path, "w+b")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)
        self.fh.truncate(self.base + start)

    def write_rows(self, name: str, first_row: int, tensor: Any) -> None:
        import torch

        begin, row_bytes = self.offsets[name]
        self.fh.seek(self.base + begin + first_row * row_bytes)
        self.fh.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
