"""Generation benchmark for `make bench` (issue 18): `generate` over 40 prompts batched vs one prompt at a time, with the
token ids checked equal, and transformers' own cached `generate` per prompt as a reference point. Variants interleaved
(run.interleaved), medians."""

from __future__ import annotations

import random
from typing import Any, Callable

from pytest_nnsight.generation import Ablate, generate
from pytest_nnsight.models import ModelCache
from pytest_nnsight.settings import Settings


def _prompts(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seq = rng.sample([f"t{i}" for i in range(64)], rng.randint(6, 10))
        out.append(" ".join(seq + seq[:1]))
    return out


def bench_generation_batching(
    device: str, reps: int, interleaved: Callable[..., dict[str, float]]
) -> list[dict[str, Any]]:
    """40 repeated sequences x 5 greedy tokens with the 4 layer-1 heads ablated at every step, on bundled:induction."""
    import torch

    model = ModelCache(Settings(device=device)).get("bundled:induction")
    prompts = _prompts()
    heads = [Ablate(f"head_out.1.{h}") for h in range(4)]
    tok, hf = model.tokenizer, model._module

    def batched() -> Any:
        return generate(model, prompts, max_new_tokens=5, intervention=heads)

    def batched_cache() -> Any:
        return generate(model, prompts, max_new_tokens=5, intervention=heads, use_cache=True)

    def single() -> list[Any]:
        return [generate(model, p, max_new_tokens=5, intervention=heads) for p in prompts]

    def hf_each() -> None:  # no intervention: the cost of transformers' cached loop alone, for scale
        with torch.inference_mode():
            for p in prompts:
                hf.generate(
                    **tok(p, return_tensors="pt").to(hf.device), max_new_tokens=5, do_sample=False, pad_token_id=0
                )

    reference = batched().token_ids
    same = reference == tuple(g.token_ids[0] for g in single()) and reference == batched_cache().token_ids
    t = interleaved(
        {"batched": batched, "batched_cache": batched_cache, "single": single, "hf": hf_each},
        max(3, reps // 3),
        warmup=1,
    )
    speedup = t["single"] / t["batched"]
    return [
        {
            "name": "generation_batching_speedup",
            "value": round(speedup, 2),
            "unit": "x",
            "target": ">= 5",
            "passed": speedup >= 5 and same,
            "detail": f"40 prompts x 5 tokens, 4 heads ablated, bundled:induction ({device}): batched {t['batched'] * 1e3:.0f} ms "
            f"(with use_cache=True {t['batched_cache'] * 1e3:.0f} ms), one prompt "
            f"at a time {t['single'] * 1e3:.0f} ms, transformers' cached generate per prompt (no intervention) {t['hf'] * 1e3:.0f} ms; "
            f"token ids batched == single == cached: {same}",
        }
    ]
