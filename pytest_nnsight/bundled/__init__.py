"""Small trained models shipped inside the package, addressed as `bundled:NAME`.

Each lives in a folder beside this file with `config.json`, `model.safetensors`, the tokenizer
files and `manifest.json` (how it was trained, its accuracy, the sha256 of its weights).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, ModelSpecError
from ..files import sha256_of  # noqa: F401  (bundled.sha256_of: part of this module's API)

PREFIX = "bundled:"
ROOT = Path(__file__).parent


def names() -> list[str]:
    """Names of the bundled models, e.g. ['capitals']."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "manifest.json").is_file())


def path_of(model_id: str) -> Path:
    """The folder of `bundled:NAME`; ModelSpecError listing the bundled names when NAME is unknown."""
    name = model_id[len(PREFIX) :] if model_id.startswith(PREFIX) else model_id
    folder = ROOT / name
    if not name or "/" in name or not (folder / "manifest.json").is_file():
        known = ", ".join(PREFIX + n for n in names()) or "none"
        raise ModelSpecError(f"unknown bundled model {model_id!r}: the bundled models are {known}")
    return folder


@cache
def manifest(model_id: str) -> dict[str, Any]:
    """The training record of a bundled model (task data, command, seeds, accuracy, weights sha256)."""
    return json.loads((path_of(model_id) / "manifest.json").read_text(encoding="utf-8"))


def verified_path(model_id: str) -> Path:
    """The folder of a bundled model after checking its weights against the recorded sha256."""
    folder = path_of(model_id)
    weights = folder / "model.safetensors"
    expected = manifest(model_id).get("weights_sha256")
    if not weights.is_file():
        raise ModelLoadError(
            f"bundled model {model_id!r} is missing its weights file {str(weights)!r}; reinstall pytest-nnsight"
        )
    actual = sha256_of(weights)
    if expected and actual != expected:
        raise ModelLoadError(
            f"bundled model file {str(weights)!r} does not match its recorded sha256 "
            f"(expected {expected[:16]}..., found {actual[:16]}...): the file is corrupt or was replaced; reinstall pytest-nnsight "
            "or retrain it with scripts/train_bundled.py"
        )
    return folder


def tokenizer(model_id: str) -> Any:
    """The tokenizer of a bundled model alone (no weights loaded), e.g. for building strategies at collection time.

    Pinned as the model fixtures pin it (left padding), so token positions agree with the served model.
    """
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(path_of(model_id)), local_files_only=True)
    tok.padding_side = "left"
    return tok
