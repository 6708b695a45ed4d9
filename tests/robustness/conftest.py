"""Helpers of the robustness suite: what a clean error is, and a digest of the files a user owns."""

from __future__ import annotations

import hashlib
import re
import traceback
from pathlib import Path

import pytest

import pytest_nnsight.activation_cache  # noqa: F401  (imported before any inline pytester run, which would
import pytest_nnsight.interventions  # noqa: F401   drop modules it first imported and leave two MetricSpec classes)
import pytest_nnsight.sweeps  # noqa: F401
from pytest_nnsight.errors import NnsightTestError

NNSIGHT_FRAME = re.compile(r"[/\\]nnsight[/\\]")


def shown_frames(exc: BaseException) -> list[str]:
    """Files of every frame Python would print for `exc`, following the chain it would show too."""
    files, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        files += [f.filename for f in traceback.extract_tb(exc.__traceback__)]
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return files


def check_clean_error(exc: BaseException, kind: type = NnsightTestError, *fragments: str) -> None:
    """`exc` is ours (of `kind`), its message matches every fragment (the bad value, what is accepted), and no nnsight frame shows."""
    __tracebackhide__ = True
    assert isinstance(exc, NnsightTestError), f"{type(exc).__name__} is not one of ours: {exc}"
    assert isinstance(exc, kind), f"expected {kind.__name__}, got {type(exc).__name__}: {exc}"
    text = str(exc)
    for fragment in fragments:
        assert re.search(fragment, text), f"message does not match {fragment!r}:\n{text}"
    deep = [f for f in shown_frames(exc) if NNSIGHT_FRAME.search(f)]
    assert not deep, f"the error shows nnsight's internals ({len(deep)} frames, e.g. {deep[0]}): {text}"


@pytest.fixture
def clean_error():
    """check_clean_error(exc, kind, *fragments)."""
    return check_clean_error


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (names relative), to prove nothing the user owns changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def user_files(tmp_path):
    """A directory of files 'the user owns', and a function that asserts they are byte-for-byte unchanged."""
    root = tmp_path / "user"
    root.mkdir()

    class Owned:
        path = root

        def snapshot(self) -> None:
            self.before = digest(root)

        def unchanged(self) -> None:
            __tracebackhide__ = True
            after = digest(root)
            assert after == self.before, f"user files changed: before {self.before}, after {after}"

    return Owned()
