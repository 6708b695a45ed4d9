"""Benchmarks of pytest-nnsight (`make bench`): prints a table and writes benchmarks/results.json.

Each entry is {"name", "value", "unit", "target", "passed"}; every ratio is measured side by side
in the same run (variants interleaved round-robin, median of the repetitions), so load on the
machine affects both sides alike. Runs on CPU here and on CUDA where available (--device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
# read when torch loads: OpenMP spin-waits distort per-cell loops on a loaded box
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from pytest_nnsight.interventions import patch  # noqa: E402
from pytest_nnsight.metrics import logit_diff  # noqa: E402
from pytest_nnsight.models import ModelCache  # noqa: E402
from pytest_nnsight.settings import Settings  # noqa: E402
from pytest_nnsight.sweeps import sweep  # noqa: E402

CLEAN = "As everyone knows , the capital city of France is"
CORRUPT = "As everyone knows , the capital city of Germany is"


def interleaved(variants: dict[str, Callable[[], Any]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each variant, run round-robin so drift hits all alike."""
    from side_by_side import interleaved as times_of  # one timing loop for every benchmark (benchmarks/ is on sys.path)

    return {k: statistics.median(v) for k, v in times_of(variants, reps, warmup).items()}


def naive_sweep(model: Any, answer: int, distractor: int) -> torch.Tensor:
    """One nnsight trace per (layer, position) cell, written by hand as a user would."""
    n_layers = len(model.transformer.h)
    with torch.inference_mode():
        acts = []
        with model.trace(CLEAN):
            for i in range(n_layers):
                acts.append(model.transformer.h[i].output.detach().clone().save())
            clean_logits = model.lm_head.output[0, -1].save()
        with model.trace(CORRUPT):
            corrupt_logits = model.lm_head.output[0, -1].save()
        clean_ld = float(clean_logits[answer] - clean_logits[distractor])
        corrupt_ld = float(corrupt_logits[answer] - corrupt_logits[distractor])
        seq = acts[0].shape[1]
        out = torch.empty(n_layers, seq)
        for layer in range(n_layers):
            for pos in range(seq):
                with model.trace(CORRUPT):
                    model.transformer.h[layer].output[:, pos, :] = acts[layer][:, pos, :]
                    logits = model.lm_head.output[0, -1].save()
                out[layer, pos] = (float(logits[answer] - logits[distractor]) - corrupt_ld) / (clean_ld - corrupt_ld)
    return out


def raw_lean_blocks(model: Any, answer: int, distractor: int) -> torch.Tensor:
    """The block-output sweep with plain torch hooks: every cell batched into one forward, last-position logits, no KV cache."""
    hf, tok = model._module, model.tokenizer
    clean = tok(CLEAN, return_tensors="pt")["input_ids"]
    corrupt = tok(CORRUPT, return_tensors="pt")["input_ids"]
    blocks, t = hf.transformer.h, clean.shape[1]
    saved: list[torch.Tensor] = []
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731 (transformers 4 returns a tuple)
    with torch.inference_mode():
        hs = [b.register_forward_hook(lambda _m, _a, out: saved.append(first(out)[0].clone())) for b in blocks]
        try:
            base = hf(torch.cat([clean, corrupt]), logits_to_keep=1, use_cache=False).logits[:, -1]
        finally:
            for h in hs:
                h.remove()
        c, x = base[:, answer] - base[:, distractor]
        hooks = []
        for layer, b in enumerate(blocks):

            def write(_m: Any, _a: Any, out: Any, layer: int = layer) -> None:
                h = first(out)
                h[torch.arange(layer * t, (layer + 1) * t), torch.arange(t)] = saved[layer]

            hooks.append(b.register_forward_hook(write))
        try:
            out = hf(corrupt.expand(len(blocks) * t, t), logits_to_keep=1, use_cache=False).logits[:, -1]
        finally:
            for h in hooks:
                h.remove()
        patched = (out[:, answer] - out[:, distractor]).view(len(blocks), t)
    return ((patched - x) / (c - x)).double()


def hand_patch(model: Any, layer: int, pos: int, answer: int, distractor: int) -> float:
    """The single-patch experiment written by hand in nnsight: clean, corrupt and patched runs."""
    with torch.inference_mode():
        with model.trace(CLEAN):
            act = model.transformer.h[layer].output[:, pos, :].detach().clone().save()
            clean_logits = model.lm_head.output[0, -1].save()
        with model.trace(CORRUPT):
            corrupt_logits = model.lm_head.output[0, -1].save()
        with model.trace(CORRUPT):
            model.transformer.h[layer].output[:, pos, :] = act
            patched_logits = model.lm_head.output[0, -1].save()
    ld = lambda logits: float(logits[answer] - logits[distractor])  # noqa: E731
    return (ld(patched_logits) - ld(corrupt_logits)) / (ld(clean_logits) - ld(corrupt_logits))


def bench_sweep_and_patch(device: str, reps: int) -> list[dict[str, Any]]:
    model = ModelCache(Settings(device=device)).get("bundled:capitals")
    tok = model.tokenizer
    answer, distractor = tok.convert_tokens_to_ids(["Paris", "Berlin"])
    metric = logit_diff("Paris", "Berlin")
    batched = sweep(model, CLEAN, CORRUPT, metric=metric, check_batching=False)
    naive = naive_sweep(model, answer, distractor)
    diff = float((batched.tensor() - naive.double()).abs().max())
    t = interleaved(
        {
            "naive": lambda: naive_sweep(model, answer, distractor),
            "batched": lambda: sweep(model, CLEAN, CORRUPT, metric=metric, check_batching=False),
        },
        reps,
    )
    speedup = t["naive"] / t["batched"]
    cells = batched.shape[0] * batched.shape[1]
    lean = raw_lean_blocks(model, answer, distractor)
    lean_diff = float((batched.tensor() - lean).abs().max())
    tr = interleaved(
        {
            "raw": lambda: raw_lean_blocks(model, answer, distractor),
            "ours": lambda: sweep(model, CLEAN, CORRUPT, metric=metric, check_batching=False),
        },
        reps * 2,
    )
    vs_raw = tr["ours"] / tr["raw"]

    layer, pos = 1, len(batched.tokens) - 1
    ours = float(patch(model, CLEAN, CORRUPT, site=f"transformer.h.{layer}", position=pos, metric=metric).normalized)
    theirs = hand_patch(model, layer, pos, answer, distractor)
    tp = interleaved(
        {
            "hand": lambda: hand_patch(model, layer, pos, answer, distractor),
            "patch": lambda: patch(model, CLEAN, CORRUPT, site=f"transformer.h.{layer}", position=pos, metric=metric),
        },
        reps * 4,
    )
    overhead = tp["patch"] / tp["hand"]
    return [
        {
            "name": "sweep_speedup",
            "value": round(speedup, 2),
            "unit": "x",
            "target": ">= 10",
            "passed": speedup >= 10 and diff <= 1e-5,
            "detail": f"{cells} cells on bundled:capitals ({device}): naive {t['naive'] * 1e3:.1f} ms, batched {t['batched'] * 1e3:.1f} ms, max |diff| {diff:.2e}",
        },
        {
            "name": "sweep_vs_raw_capitals",
            "value": round(vs_raw, 3),
            "unit": "ratio",
            "target": "<= 1.2",
            "passed": vs_raw <= 1.2 and lean_diff <= 1e-5,
            "detail": f"{cells} cells on bundled:capitals ({device}): sweep {tr['ours'] * 1e3:.1f} ms, raw torch hooks (one batched forward, last-position "
            f"logits, no KV cache) {tr['raw'] * 1e3:.1f} ms, medians of {reps * 2} interleaved rounds; max |diff| {lean_diff:.2e}",
        },
        {
            "name": "patch_overhead",
            "value": round(overhead, 3),
            "unit": "ratio",
            "target": "<= 1.10",
            "passed": overhead <= 1.10 and abs(ours - theirs) <= 1e-5,
            "detail": f"patch() {tp['patch'] * 1e3:.2f} ms vs hand-written {tp['hand'] * 1e3:.2f} ms; effects {ours:.6f} vs {theirs:.6f}",
        },
    ]


PEAK_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from pytest_nnsight.models import ModelCache
from pytest_nnsight.settings import Settings  # noqa: E402
from pytest_nnsight.sweeps import sweep
from pytest_nnsight.testing import tiny_gpt2
from pytest_nnsight import sites
positions, batch, device = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
words = [f"w{i}" for i in range(8000)]
module, tok = tiny_gpt2(n_layer=8, n_embd=128, words=words)
model = ModelCache(Settings(device=device)).get(module, tok)
clean = " ".join(words[:40]); corrupt = " ".join(words[1:41])
metric = lambda out: out.logits[:, -1, 5] - out.logits[:, -1, 6]
sweep(model, clean, corrupt, metric=metric, sites=sites.blocks(model)[:1], positions=[0], batch_size=1, check_batching=False)
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats(); before = torch.cuda.max_memory_allocated()
else:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = sweep(model, clean, corrupt, metric=metric, positions=slice(0, positions), batch_size=batch, check_batching=False)
peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"cells": m.shape[0] * m.shape[1], "peak_mb": (peak - before) / 2**20}))
"""


def bench_peak_memory(device: str) -> list[dict[str, Any]]:
    """Peak memory added by a sweep, each configuration in a fresh process (RSS high-water mark on CPU)."""
    runs = {}
    for positions, batch in ((10, 16), (41, 16), (41, 64)):
        samples = []
        for _ in range(3):  # the RSS high-water mark moves by ~10 MB between identical runs: the median of 3
            out = subprocess.run(
                [sys.executable, "-c", PEAK_CHILD, str(HERE.parent), str(positions), str(batch), device],
                capture_output=True,
                text=True,
                check=True,
            )
            samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
        samples.sort(key=lambda r: r["peak_mb"])
        runs[(positions, batch)] = samples[1]
    few, many, wide = runs[(10, 16)], runs[(41, 16)], runs[(41, 64)]
    flat = many["peak_mb"] <= 1.25 * few["peak_mb"] + 4
    grows = wide["peak_mb"] > 1.5 * many["peak_mb"]
    entries = []
    for (positions, batch), r in runs.items():
        entries.append(
            {
                "name": f"sweep_peak_mem_bs{batch}_cells{r['cells']}",
                "value": round(r["peak_mb"], 1),
                "unit": "MB",
                "target": "flat in cells, grows with batch_size",
                "passed": flat and grows,
                "detail": f"8-layer random GPT-2 (d 128, vocab 8003), 41-token prompt, {positions} positions, batch_size {batch}, {device}; median of 3 processes",
            }
        )
    return entries


def bench_variants(device: str, reps: int) -> list[dict[str, Any]]:
    """Population assertion over 64 variants (batched) vs 64 separate patch() calls, same numbers."""
    from pytest_nnsight.populations import population
    from pytest_nnsight.strategies import counterfactual_pairs
    from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS

    model = ModelCache(Settings(device=device)).get("bundled:capitals")
    pairs = counterfactual_pairs(model, CAPITAL_TEMPLATES, {"country": CAPITALS}).space.sample(64, seed=0)

    def separate() -> list[Any]:
        return [
            patch(
                model,
                p.clean,
                p.corrupt,
                site="transformer.h.0",
                position="last",
                metric=logit_diff(p.answer, p.distractor),
            )
            for p in pairs
        ]

    def batched() -> Any:
        return population(model, pairs, site="transformer.h.0", position="last", threshold=0.7)

    singles, pop = separate(), batched()
    raw_diff = max(
        max(abs(e.clean - c), abs(e.corrupt - x), abs(float(e.intervened) - q))
        for e, c, x, q in zip(singles, pop.clean, pop.corrupt, pop.patched)
    )
    eff_diff = max(abs(float(e.normalized) - v) for e, v in zip(singles, pop.effects))
    t = interleaved({"separate": separate, "batched": batched}, max(3, reps // 3), warmup=1)
    speedup = t["separate"] / t["batched"]
    return [
        {
            "name": "variants_speedup",
            "value": round(speedup, 2),
            "unit": "x",
            "target": ">= 5",
            "passed": speedup >= 5 and raw_diff <= 1e-5,
            "detail": f"64 variants on bundled:capitals ({device}): separate {t['separate'] * 1e3:.0f} ms, population {t['batched'] * 1e3:.0f} ms; "
            f"max |diff| of clean/corrupt/patched metrics {raw_diff:.2e}, of normalized effects {eff_diff:.2e}",
        }
    ]


def bench_cache_rerun(device: str) -> list[dict[str, Any]]:
    """Wall time of a suite of cached activations (benchmarks/cached_suite.py) on its first run over its second.

    Both runs are pytest sessions in this process (imports warm, so the ratio measures the suite, not
    interpreter start-up), with the activation cache in a fresh temp dir; the second must load every set.
    """
    import shutil
    import tempfile

    import pytest

    work = Path(tempfile.mkdtemp(prefix="nnsight-cache-bench-"))
    try:
        shutil.copy(HERE / "cached_suite.py", work / "test_cached_suite.py")
        (work / "pytest.ini").write_text("[pytest]\n")
        args = [
            str(work),
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "-p",
            "no:anyio",  # anyio cannot import after nnsight
            "--rootdir",
            str(work),
            "-c",
            str(work / "pytest.ini"),
            "--nnsight-cache-dir",
            str(work / "cache"),
            "--nnsight-device",
            device,
        ]
        ModelCache(Settings(device=device)).get("bundled:capitals")  # imports warm before the first timed run
        times, codes = {}, {}
        for run in ("computed", "loaded"):
            os.environ["CACHED_SUITE_EXPECT"] = run
            t = time.perf_counter()
            codes[run] = int(pytest.main(args))
            times[run] = time.perf_counter() - t
    finally:
        os.environ.pop("CACHED_SUITE_EXPECT", None)
        shutil.rmtree(work, ignore_errors=True)
    speedup = times["computed"] / times["loaded"]
    ok = all(c == 0 for c in codes.values())
    return [
        {
            "name": "cache_rerun_speedup",
            "value": round(speedup, 2),
            "unit": "x",
            "target": ">= 3",
            "passed": speedup >= 3 and ok,
            "detail": f"6 tests x 480 prompts x 3 sites on bundled:capitals ({device}): first run {times['computed']:.2f} s (computes, stores), "
            f"second {times['loaded']:.2f} s (loads, no forward pass); exit codes {codes['computed']}/{codes['loaded']}",
        }
    ]


def bench_deterministic_cost(device: str, reps: int = 4) -> list[dict[str, Any]]:
    """Wall time of the examples suite with --nnsight-deterministic over without (pytest sessions in this process, interleaved)."""
    import pytest

    base = [
        str(HERE.parent / "examples"),
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-p",
        "no:anyio",
        "--rootdir",
        str(HERE.parent),
        "--nnsight-device",
        device,
        "--nnsight-no-cache",
    ]
    ModelCache(Settings(device=device)).get("bundled:capitals")  # imports warm before the first timed run
    pytest.main(base)  # one untimed run: the examples' own imports and first traces
    times: dict[str, list[float]] = {"off": [], "on": []}
    codes = set()
    modes = (("off", []), ("on", ["--nnsight-deterministic"]))
    for rep in range(reps):  # ABBA order: in-process runs slow down a little run after run, this cancels that drift
        for mode, extra in modes if rep % 2 == 0 else modes[::-1]:
            t = time.perf_counter()
            codes.add(int(pytest.main(base + extra)))
            times[mode].append(time.perf_counter() - t)
    off, on = statistics.mean(times["off"]), statistics.mean(times["on"])
    cost = on / off
    return [
        {
            "name": "deterministic_cost",
            "value": round(cost, 3),
            "unit": "x",
            "target": "<= 1.2",
            "passed": cost <= 1.2 and codes == {0},
            "detail": f"examples/ suite ({device}), mean of {reps} (ABBA order): {off:.2f} s without, {on:.2f} s with --nnsight-deterministic; exit codes {sorted(codes)}",
        }
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument(
        "--rounds-gpt2s", type=int, default=3, help="interleaved rounds of the GPT-2-small side-by-side benchmark"
    )
    parser.add_argument(
        "--skip-side-by-side",
        action="store_true",
        help="leave out the GPT-2-small side by side and the scaling runs (minutes on CPU)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    entries = (
        bench_sweep_and_patch(args.device, args.reps)
        + bench_variants(args.device, args.reps)
        + bench_peak_memory(args.device)
        + bench_cache_rerun(args.device)
    )
    entries += bench_deterministic_cost(args.device)
    from circuits_bench import bench_eap_speedup, bench_path_sweep_speedup  # benchmarks/circuits_bench.py (issue 18)

    entries += bench_eap_speedup(args.device, args.reps, interleaved) + bench_path_sweep_speedup(
        args.device, args.reps, interleaved
    )
    from generation_bench import bench_generation_batching  # benchmarks/generation_bench.py (issue 18)

    entries += bench_generation_batching(args.device, args.reps, interleaved)
    if not args.skip_side_by_side:
        # benchmarks/side_by_side.py: the GPT-2-small shape against TransformerLens and raw hooks
        from side_by_side import (
            scaling,
            side_by_side,
        )

        entries += side_by_side(args.device, args.rounds_gpt2s)
        entries += scaling(args.device)
    from side_by_side import write_entries

    rc = write_entries(entries, Path(args.out))
    print(f"wrote {args.out}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
