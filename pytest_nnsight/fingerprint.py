"""A cheap fingerprint of a model's weights: what makes a cached activation or a snapshot stale.

Per parameter and persistent buffer (what a checkpoint stores; name, shape, dtype, float64 sum, L2 norm and a position-weighted sum of a
strided sample, so swapped or permuted values change it too), reduced on the model's device and
moved to the CPU in one transfer, then hashed. Cached per served model in the ModelCache entry's
``info["weights_fingerprint"]``, so a session computes it once per model.
"""

from __future__ import annotations

import hashlib
from typing import Any

INFO_KEY = "weights_fingerprint"
_SAMPLE = 1024  # elements per tensor in the position-weighted sample


def _module(model: Any) -> Any:
    return getattr(model, "_module", model)


def compute_weights_fingerprint(model: Any) -> str:
    """sha256 (hex, 32 chars) over per-tensor statistics of every parameter and persistent buffer of `model`.

    Non-persistent buffers (causal masks, rotary caches) are left out: they are not weights, and transformers
    releases add and drop them (GPT-2's `attn.bias` in 4.57, gone in 5.x) without changing any number.
    """
    import torch

    root = _module(model)
    named = sorted(list(root.named_parameters()) + _persistent_buffers(root), key=lambda kv: kv[0])
    header = hashlib.sha256()
    stats = []
    with torch.no_grad():
        for name, tensor in named:
            header.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
            if tensor.numel() == 0 or not (
                tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32, torch.bool, torch.uint8)
            ):
                continue
            flat = tensor.detach().reshape(-1)
            flat = flat.double() if not flat.is_floating_point() else flat
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step][:_SAMPLE].double()
            ramp = torch.arange(1, sample.numel() + 1, device=sample.device, dtype=torch.float64)
            stats.append(
                torch.stack(
                    [
                        flat.sum(dtype=torch.float64),
                        torch.linalg.vector_norm(flat, dtype=torch.float64),
                        (sample * ramp).sum(),
                    ]
                )
            )
        values = torch.stack(stats).cpu() if stats else torch.zeros(0, 3, dtype=torch.float64)
    # 12 significant digits: stable across reruns on one device, sensitive to any real change of a weight
    header.update(";".join(f"{v:.12g}" for v in values.reshape(-1).tolist()).encode())
    return header.hexdigest()[:32]


def weights_fingerprint(model: Any, cache: Any = None) -> str:
    """The fingerprint of `model`'s weights, cached in `cache.info(model).info` when `cache` served it.

    >>> weights_fingerprint(nnsight_models.get("bundled:capitals"), nnsight_models)   # doctest: +SKIP
    '3f0c...'
    """
    entry = None
    if cache is not None:
        try:
            entry = cache.info(model)
        except Exception:  # a model the cache did not serve: compute, do not remember
            entry = None
    if entry is not None and INFO_KEY in entry.info:
        return entry.info[INFO_KEY]
    value = compute_weights_fingerprint(model)
    if entry is not None:
        entry.info[INFO_KEY] = value
    return value


def _persistent_buffers(root: Any) -> list[tuple[str, Any]]:
    """(name, tensor) of the buffers a state_dict would save."""
    out = []
    for prefix, module in root.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for local, tensor in module.named_buffers(recurse=False):
            if tensor is not None and local not in skip:
                out.append((f"{prefix}.{local}" if prefix else local, tensor))
    return out
