"""Cost of the structure lock: one probe (model_structure with the nnsight semantics) per model per run, against one
plain trace of the same model; medians of 5, the variants interleaved, one thread.

    .venv/bin/python benchmarks/structure_lock_probe.py
"""

from __future__ import annotations

import statistics
import time

import torch

from pytest_nnsight.models import ModelCache, wrap
from pytest_nnsight.settings import Settings
from pytest_nnsight.structure import model_structure
from pytest_nnsight.testing import tiny_gpt2


def bench(name: str, model: object) -> None:
    probe, torch_only, plain = [], [], []
    model_structure(model)  # warm-up
    for _ in range(5):
        t = time.perf_counter()
        model_structure(model)
        probe.append(time.perf_counter() - t)
        t = time.perf_counter()
        model_structure(model, semantics=False)
        torch_only.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            with model.trace("The capital of France is"):
                model.lm_head.output.save()
        plain.append(time.perf_counter() - t)
    p, q, r = statistics.median(probe), statistics.median(torch_only), statistics.median(plain)
    print(
        f"{name}: probe {p * 1000:.0f} ms (torch-hook part {q * 1000:.0f} ms), one trace {r * 1000:.1f} ms, probe/trace {p / r:.1f}x"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    bench("bundled:capitals (2L/64d)", ModelCache(Settings(device="cpu")).get("bundled:capitals"))
    module, tok = tiny_gpt2(n_layer=12, n_embd=768, n_head=12)
    bench("random GPT-2 12L/768d", wrap(module, tok))
