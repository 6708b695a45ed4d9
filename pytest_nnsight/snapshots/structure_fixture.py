"""The `structure_snapshot` fixture: imports only pytest (syrupy's classes load when the fixture runs)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def structure_snapshot(snapshot: Any) -> Any:
    """A snapshot of a model's structure: what each module returns and takes, tokenizer and attention facts.

    Fails on a change with one line per module saying what code that reads it now gets, e.g.
    ``transformer.h.*: output changed from tuple(Tensor[b,s,768], ...) to Tensor[b,s,768]; code that
    reads .output[0] now selects batch row 0 instead of the hidden states``. Record with --snapshot-update.

    Example::

        def test_capitals_structure(nnsight_model, structure_snapshot):
            structure_snapshot(nnsight_model("bundled:capitals"))     # or: assert model_structure(m) == structure_snapshot
    """
    from .structure_ext import StructureSnapshotAssertion

    return StructureSnapshotAssertion.from_snapshot(snapshot)
