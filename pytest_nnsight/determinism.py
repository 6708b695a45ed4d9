"""--nnsight-deterministic: torch's deterministic algorithms for the run, and the same seeds before every test.

torch is imported only when the option is on. Decision: `torch.use_deterministic_algorithms(True,
warn_only=True)`. Every op that has a deterministic implementation uses it; an op that has none
(some CUDA backward kernels, e.g. an embedding's gradient in `attribution_patch`) warns with its
name instead of failing every test that touches it: a finding whose nondeterminism is below its
tolerance stays testable, and `-W error::UserWarning` turns the warnings into failures for a
strict run. On CUDA, `CUBLAS_WORKSPACE_CONFIG=:4096:8` is set (unless already set) and cuDNN's
benchmark mode is off. The previous state is restored at the end of the run (pytest in pytest).
"""

from __future__ import annotations

import os
import random
from typing import Any

SEED = 0
CUBLAS = "CUBLAS_WORKSPACE_CONFIG"
_SAVED: list[dict[str, Any]] = []  # a stack: a pytest run inside a test restores the outer run's state


def enable() -> None:
    """Turn on deterministic algorithms (warn_only), and on CUDA the cuBLAS workspace setting and cuDNN determinism."""
    import torch

    state: dict[str, Any] = {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "env": os.environ.get(CUBLAS),
    }
    _SAVED.append(state)
    if torch.cuda.is_available() and state["env"] is None:
        os.environ[CUBLAS] = ":4096:8"  # what torch asks for before deterministic cuBLAS (CUDA >= 10.2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def disable() -> None:
    """Restore what `enable` changed."""
    if not _SAVED:
        return
    state = _SAVED.pop()
    import torch

    torch.use_deterministic_algorithms(state["algorithms"], warn_only=state["warn_only"])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state["cudnn"]
    if state["env"] is None:
        os.environ.pop(CUBLAS, None)
    else:
        os.environ[CUBLAS] = state["env"]


def seed_all(seed: int = SEED) -> None:
    """The same seed before every test, whatever ran before it: python's random, torch (all devices) and numpy."""
    random.seed(seed)
    import torch

    torch.manual_seed(seed)  # seeds every CUDA device too
    try:
        import numpy
    except ImportError:  # numpy is optional
        return
    numpy.random.seed(seed)
