"""Which CUDA device a process uses: xdist workers spread round-robin over the visible GPUs.

`assign_device` is a pure function of the device setting, the visible device count and the xdist
worker id, so the assignment is testable without GPUs; `current_device` feeds it from torch and
the environment. Standard library only at import time: torch is imported inside `current_device`.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from .errors import SettingsError

_WORKER_RE = re.compile(r"^gw(\d+)$")


def worker_index(worker: str | None) -> int | None:
    """The N of an xdist worker id 'gwN', or None outside xdist (or for an id xdist did not make)."""
    match = _WORKER_RE.match(worker.strip()) if worker else None
    return int(match.group(1)) if match else None


def assign_device(
    requested: str, *, cuda_available: bool, device_count: int, worker: str | None = None, torch_version: str = ""
) -> str:
    """The concrete device for a process: 'cuda' and 'auto' pin xdist worker gwN to cuda:(N % device_count).

    Outside xdist, 'cuda' and 'auto' (with CUDA) stay 'cuda' (torch's current device); 'cuda:N' is
    kept as given after checking it is visible; 'cpu' is 'cpu'. Raises SettingsError naming the value.

    >>> assign_device("cuda", cuda_available=True, device_count=4, worker="gw5")
    'cuda:1'
    """
    if requested == "cpu":
        return "cpu"
    has_cuda = cuda_available and device_count > 0
    if requested == "auto" and not has_cuda:
        return "cpu"
    if not requested.startswith("cuda") and requested != "auto":
        raise SettingsError(f"invalid device {requested!r}: expected auto, cpu, cuda or cuda:N")
    if not has_cuda:
        torch_name = f"torch {torch_version}" if torch_version else "torch"
        raise SettingsError(f"device {requested!r} asked for, but {torch_name} sees no CUDA device: use cpu or auto")
    if ":" in requested:
        index = int(requested.split(":", 1)[1])
        if index >= device_count:
            raise SettingsError(
                f"device {requested!r} asked for, but only {device_count} CUDA device(s) are visible: use cuda:0 .. cuda:{device_count - 1}"
            )
        return requested
    n = worker_index(worker)
    return "cuda" if n is None else f"cuda:{n % device_count}"


def physical_device(device: str, env: Mapping[str, str] | None = None) -> str | None:
    """The physical GPU behind a logical 'cuda:N' when CUDA_VISIBLE_DEVICES narrows the view, else None.

    >>> physical_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,3"})
    '3'
    """
    env = os.environ if env is None else env
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible or not device.startswith("cuda"):
        return None
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return visible[index] if index < len(visible) else None


def describe(device: str, env: Mapping[str, str] | None = None) -> str:
    """'cuda:1' or 'cuda:1 (GPU 3 of CUDA_VISIBLE_DEVICES=2,3)', for the report header."""
    env = os.environ if env is None else env
    phys = physical_device(device, env)
    return device if phys is None else f"{device} (GPU {phys} of CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})"


def worker_assignment(requested: str, *, cuda_available: bool, device_count: int, workers: int) -> list[str]:
    """The device of each of `workers` xdist workers, gw0 first (what the controller's header shows)."""
    return [
        assign_device(requested, cuda_available=cuda_available, device_count=device_count, worker=f"gw{i}")
        for i in range(workers)
    ]


def current_worker() -> str | None:
    """This process's xdist worker id (env PYTEST_XDIST_WORKER, set by xdist in each worker), or None."""
    return os.environ.get("PYTEST_XDIST_WORKER") or None


def cuda_state() -> tuple[bool, int]:
    """(CUDA available, visible device count) as torch sees them (CUDA_VISIBLE_DEVICES applied)."""
    import torch

    available = torch.cuda.is_available()
    return available, (torch.cuda.device_count() if available else 0)


def current_device(requested: str, worker: str | None = None) -> str:
    """`assign_device` for this process: torch's view of CUDA and this xdist worker's id."""
    if requested == "cpu":
        return "cpu"
    import torch

    available, count = cuda_state()
    return assign_device(
        requested,
        cuda_available=available,
        device_count=count,
        worker=worker or current_worker(),
        torch_version=torch.__version__,
    )


def header(requested: str, *, workers: int = 0, worker: str | None = None, cuda: tuple[bool, int] | None = None) -> str:
    """The device part of the report header: the setting and, with CUDA, the device of this process or of each worker.

    `workers` > 0 on the xdist controller lists each worker's device; `cuda` is (available, count),
    read from torch when None. 'auto' is described without importing torch when torch is not loaded yet.
    """
    import sys

    auto_text = "auto (CUDA when available, else CPU)"
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and cuda is None and "torch" not in sys.modules:
        return auto_text
    available, count = cuda if cuda is not None else cuda_state()
    if not (available and count):
        return auto_text if requested == "auto" else requested
    name = auto_text if requested == "auto" else requested
    gpus = f"{count} visible GPU{'s' if count != 1 else ''}"
    if workers and worker is None and ":" not in requested:
        pairs = ", ".join(
            f"gw{i} {d}"
            for i, d in enumerate(
                worker_assignment(requested, cuda_available=True, device_count=count, workers=workers)
            )
        )
        return f"{name} -> xdist workers round-robin over {gpus}: {pairs}"
    assigned = assign_device(requested, cuda_available=True, device_count=count, worker=worker)
    who = f" for xdist worker {worker}" if worker else ""
    return f"{name} -> {describe(assigned)}{who}, {gpus}"
