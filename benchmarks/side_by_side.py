"""Side by side: a resid_pre patching sweep on a GPT-2-small-shaped random model by four tools, in one run.

Contenders (interleaved round-robin, medians over rounds, every map checked equal to ours):
- pytest-nnsight `sweep` (prefix reuse, last-position logits, no KV cache);
- TransformerLens 4.x `generic_activation_patch` (what `get_act_patch_resid_pre` runs), on a TransformerBridge built
  from the same weights (optional `bench` extra; skipped with a note when it is not installed);
- nnsight, one trace per cell, written by hand;
- raw torch hooks, every cell batched into one forward, last-position logits and no KV cache ("raw lean").
The per-cell contenders run on a sample of cells (two per layer) and are extrapolated to all cells.
The model is built from a config (12 layers, d 768, vocab 50257, seeded random weights, no download) with a word
tokenizer; the prompts are 16 tokens.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent


def gpt2s(n_layer: int = 12, n_embd: int = 768, n_head: int = 12, vocab: int = 50257, seed: int = 0) -> tuple[Any, Any]:
    """A seeded random GPT-2 of the given shape and a word tokenizer of `vocab` ids (w0, w1, ...)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pytest_nnsight.testing import word_tokenizer

    tok = word_tokenizer([f"w{i}" for i in range(vocab - 3)])
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg._attn_implementation = "eager"  # what TransformerLens's bridge runs: every contender the same attention kernels
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.eval()
    return model, tok


def prompts(tokens: int) -> tuple[str, str]:
    """Clean and corrupt prompts of `tokens` tokens (bos included) differing in one word, a third of the way in."""
    words = [f"w{100 + i}" for i in range(tokens - 1)]
    other = list(words)
    other[len(words) // 3] = "w7"
    return " ".join(words), " ".join(other)


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, run round-robin after `warmup` rounds (run.py takes their medians)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            gc.collect()  # garbage one contender leaves (nnsight traces make plenty) is not charged to the next
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return times


class Contenders:
    """The four ways to compute the same resid_pre map, on one model and prompt pair."""

    def __init__(
        self, device: str, dtype: torch.dtype = torch.float32, n_layer: int = 12, n_embd: int = 768, tokens: int = 16
    ):
        from pytest_nnsight.models import ModelCache
        from pytest_nnsight.settings import Settings

        self.hf, self.tok = gpt2s(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64))
        self.hf.to(device=device, dtype=dtype)
        self.model = ModelCache(Settings(device=device, dtype=str(dtype).split(".")[-1])).get(self.hf, self.tok)
        self.clean, self.corrupt = prompts(tokens)
        self.device, self.dtype, self.n_layer = device, dtype, n_layer
        self.ids = {
            k: self.tok(p, return_tensors="pt")["input_ids"].to(device)
            for k, p in (("clean", self.clean), ("corrupt", self.corrupt))
        }
        self.tokens = self.ids["clean"].shape[1]
        self.sample = [
            (layer, p) for layer in range(n_layer) for p in (len(prompts(tokens)[0].split()) // 3 + 1, self.tokens - 1)
        ]
        self.tl = None
        with (
            torch.inference_mode()
        ):  # the answer pair the prompts move most: a wide gap, so normalizing amplifies no rounding
            moved = (self.hf(self.ids["clean"]).logits[0, -1] - self.hf(self.ids["corrupt"]).logits[0, -1]).float()
        self.answer, self.distractor = int(moved.argmax()), int(moved.argmin())

    # -- pytest-nnsight -----------------------------------------------------------------------------------------
    def ours(self) -> torch.Tensor:
        from pytest_nnsight.metrics import logit_diff
        from pytest_nnsight.sweeps import sweep

        return sweep(
            self.model,
            self.clean,
            self.corrupt,
            metric=logit_diff(self.answer, self.distractor),
            sites="resid_pre",
            check_batching=False,
        ).tensor()

    # -- raw torch hooks, batched, lean ----------------------------------------------------------------------------
    def raw_lean(self) -> torch.Tensor:
        hf, n, t = self.hf, self.n_layer, self.tokens
        clean_in: list[torch.Tensor] = []
        with torch.inference_mode():
            hs = [
                b.register_forward_pre_hook(lambda _m, args: clean_in.append(args[0].clone())) for b in hf.transformer.h
            ]
            try:
                base = (
                    hf(torch.cat([self.ids["clean"], self.ids["corrupt"]]), logits_to_keep=1, use_cache=False)
                    .logits[:, -1]
                    .float()
                )
            finally:
                for h in hs:
                    h.remove()
            ld = base[:, self.answer] - base[:, self.distractor]
            rows = n * t
            hooks = []
            for layer, block in enumerate(hf.transformer.h):

                def write(_m: Any, args: tuple, layer: int = layer) -> None:
                    h = args[0]
                    r = torch.arange(layer * t, (layer + 1) * t, device=h.device)
                    h[r, torch.arange(t, device=h.device)] = clean_in[layer][0]

                hooks.append(block.register_forward_pre_hook(write))
            try:
                out = hf(self.ids["corrupt"].expand(rows, t), logits_to_keep=1, use_cache=False).logits[:, -1].float()
            finally:
                for h in hooks:
                    h.remove()
            patched = (out[:, self.answer] - out[:, self.distractor]).view(n, t)
        return ((patched - ld[1]) / (ld[0] - ld[1])).double().cpu()

    # -- nnsight, one trace per cell -------------------------------------------------------------------------------
    def nnsight_per_cell(self, cells: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        model, out = self.model, {}
        with torch.inference_mode():
            acts = []
            with model.trace(self.clean):
                for i in range(self.n_layer):
                    acts.append(model.transformer.h[i].input.detach().clone().save())
                clean_logits = model.lm_head.output[0, -1].save()
            with model.trace(self.corrupt):
                corrupt_logits = model.lm_head.output[0, -1].save()
            c = float(clean_logits[self.answer] - clean_logits[self.distractor])
            x = float(corrupt_logits[self.answer] - corrupt_logits[self.distractor])
            for layer, pos in cells:
                with model.trace(self.corrupt):
                    model.transformer.h[layer].input[:, pos, :] = acts[layer][:, pos, :]
                    logits = model.lm_head.output[0, -1].save()
                out[(layer, pos)] = (float(logits[self.answer] - logits[self.distractor]) - x) / (c - x)
        return out

    # -- TransformerLens ---------------------------------------------------------------------------------------------
    def tl_ready(self) -> str | None:
        """None when TransformerLens is importable and a bridge of the same weights is built; else why not."""
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as exc:
            return f"TransformerLens not installed ({exc}); pip install -e '.[bench]'"
        tok = copy.deepcopy(self.tok)
        tok.init_kwargs.update(name_or_path="local", add_bos_token=True)  # it re-loads tokenizers by name otherwise
        hf = copy.deepcopy(self.hf)  # the bridge switches its model to eager attention
        os.environ.setdefault("TQDM_DISABLE", "1")
        self.tl = TransformerBridge.boot_transformers(
            "gpt2", hf_model=hf, tokenizer=tok, device=self.device, dtype=self.dtype
        )
        return None

    def transformerlens(self, cells: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        import pandas as pd
        from transformer_lens import patching

        b = self.tl
        with torch.inference_mode():
            clean_logits, cache = b.run_with_cache(self.ids["clean"])
            corrupt_logits = b(self.ids["corrupt"])
            c = float(clean_logits[0, -1, self.answer] - clean_logits[0, -1, self.distractor])
            x = float(corrupt_logits[0, -1, self.answer] - corrupt_logits[0, -1, self.distractor])
            metric = lambda lg: (lg[0, -1, self.answer] - lg[0, -1, self.distractor] - x) / (c - x)  # noqa: E731
            df = pd.DataFrame({"layer": [layer for layer, _ in cells], "pos": [p for _, p in cells]})
            vals = patching.generic_activation_patch(
                b, self.ids["corrupt"], cache, metric, patching.layer_pos_patch_setter, "resid_pre", index_df=df
            )
        return {cell: float(v) for cell, v in zip(cells, vals)}


def side_by_side(
    device: str, rounds: int, dtype: torch.dtype = torch.float32, suffix: str = ""
) -> list[dict[str, Any]]:
    """The four contenders on the GPT-2-small-shaped model: entries sweep_vs_{transformerlens,nnsight_per_cell,raw_lean}_gpt2s."""
    c = Contenders(device, dtype)
    ours = c.ours()
    cells = c.n_layer * c.tokens
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    raw = c.raw_lean()
    diffs = {"raw lean": float((raw - ours).abs().max())}
    per = c.nnsight_per_cell(c.sample)
    diffs["nnsight per cell"] = max(abs(v - float(ours[k])) for k, v in per.items())
    why_no_tl = c.tl_ready()
    variants: dict[str, Callable[[], Any]] = {
        "ours": c.ours,
        "raw lean": c.raw_lean,
        "nnsight per cell": lambda: c.nnsight_per_cell(c.sample),
    }
    if why_no_tl is None:
        tl = c.transformerlens(c.sample)
        diffs["TransformerLens"] = max(abs(v - float(ours[k])) for k, v in tl.items())
        variants["TransformerLens"] = lambda: c.transformerlens(c.sample)
    times = interleaved(variants, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    scale = cells / len(c.sample)
    full = {"ours": med["ours"], "raw lean": med["raw lean"], "nnsight per cell": med["nnsight per cell"] * scale}
    if "TransformerLens" in med:
        full["TransformerLens"] = med["TransformerLens"] * scale
    where = f"{cells} cells (resid_pre, 12 layers x {c.tokens} positions) on a random GPT-2-small shape (d 768, vocab 50257), {device} {str(dtype).split('.')[-1]}"
    sampled = f"; per-cell contenders timed on {len(c.sample)} sampled cells (2 per layer) and scaled x{scale:g}"
    times_txt = ", ".join(f"{k} {v:.2f} s" for k, v in full.items())
    maps = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    ok_maps = all(v <= tol for v in diffs.values())
    detail = f"{where}; medians of {rounds} interleaved rounds: {times_txt}{sampled}; max |diff| of maps vs ours: {maps} (tolerance {tol:g})"
    entries = []
    if "TransformerLens" in full:
        r = full["TransformerLens"] / full["ours"]
        entries.append(
            {
                "name": f"sweep_vs_transformerlens_gpt2s{suffix}",
                "value": round(r, 2),
                "unit": "x",
                "target": ">= 8",
                "passed": r >= 8 and ok_maps,
                "detail": detail,
            }
        )
    else:
        entries.append(
            {
                "name": f"sweep_vs_transformerlens_gpt2s{suffix}",
                "value": None,
                "unit": "x",
                "target": ">= 8",
                "passed": False,
                "detail": f"not run: {why_no_tl}",
            }
        )
    r = full["nnsight per cell"] / full["ours"]
    entries.append(
        {
            "name": f"sweep_vs_nnsight_per_cell_gpt2s{suffix}",
            "value": round(r, 2),
            "unit": "x",
            "target": ">= 8",
            "passed": r >= 8 and ok_maps,
            "detail": detail,
        }
    )
    r = full["ours"] / full["raw lean"]
    entries.append(
        {
            "name": f"sweep_vs_raw_lean_gpt2s{suffix}",
            "value": round(r, 3),
            "unit": "ratio",
            "target": "<= 1.0",
            "passed": r <= 1.0 and ok_maps,
            "detail": detail,
        }
    )
    return entries


SCALING_CHILD = r"""
import json, resource, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/benchmarks")
from side_by_side import Contenders
layers, tokens, width, device, rounds = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
c = Contenders(device, n_layer=layers, n_embd=width, tokens=tokens)
from pytest_nnsight.metrics import logit_diff
from pytest_nnsight.sweeps import sweep
sweep(c.model, c.clean, c.corrupt, metric=logit_diff(c.answer, c.distractor), sites="resid_pre.0", positions=[c.tokens - 1], check_batching=False)  # warm: one cell
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.max_memory_allocated()
    c.ours()
    peak = torch.cuda.max_memory_allocated() - before
else:  # the process's high-water mark was set by loading the model: sample the resident set during the sweep instead
    import os, threading
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    before, top, done = rss(), [0], threading.Event()
    def sample():
        while not done.is_set():
            top[0] = max(top[0], rss()); time.sleep(0.001)
    th = threading.Thread(target=sample); th.start()
    c.ours()
    done.set(); th.join()
    peak = top[0] - before
ours, raw = [], []
for _ in range(rounds):
    t = time.perf_counter(); c.ours(); ours.append(time.perf_counter() - t)
    t = time.perf_counter(); c.raw_lean(); raw.append(time.perf_counter() - t)
print(json.dumps({"cells": layers * c.tokens, "ours_s": statistics.median(ours), "raw_s": statistics.median(raw), "peak_mb": peak / 2**20}))
"""


def scaling(device: str, rounds: int = 3, width: int = 128) -> list[dict[str, Any]]:
    """Time and peak memory of a full resid_pre sweep against positions (16, 32, 64) and layers (12, 24), each in a
    fresh process (peak: CUDA's peak allocation, or on CPU the resident set sampled every millisecond during the sweep,
    over its level before); the cost per cell is reported relative to raw lean hooks doing the same cells (flat or falling)."""
    configs = [(12, 16), (12, 32), (12, 64), (24, 16)]
    runs = {}
    for layers, tokens in configs:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                SCALING_CHILD,
                str(HERE.parent),
                str(layers),
                str(tokens),
                str(width),
                device,
                str(rounds),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        runs[(layers, tokens)] = json.loads(out.stdout.strip().splitlines()[-1])
    rel = {k: r["ours_s"] / r["raw_s"] for k, r in runs.items()}
    flat = rel[(12, 64)] <= rel[(12, 16)] * 1.15 and rel[(24, 16)] <= rel[(12, 16)] * 1.15
    entries = []
    for (layers, tokens), r in runs.items():
        per_cell_ms = r["ours_s"] / r["cells"] * 1e3
        entries.append(
            {
                "name": f"sweep_scaling_L{layers}_T{tokens}",
                "value": round(rel[(layers, tokens)], 3),
                "unit": "ratio",
                "target": "cost per cell vs raw lean flat or falling",
                "passed": flat,
                "detail": f"{r['cells']} cells, GPT-2 shape {layers} layers x d {width} (vocab 50257), {tokens} tokens, {device}: ours {r['ours_s']:.2f} s "
                f"({per_cell_ms:.2f} ms per cell), raw lean {r['raw_s']:.2f} s, peak memory {r['peak_mb']:.0f} MB; median of {rounds}",
            }
        )
    return entries


def write_entries(entries: list[dict[str, Any]], path: Path) -> int:
    """Print `entries` as an aligned table (PASS / FAIL against each target) and write them to `path` as JSON, atomically
    (one run's figures only: an entry a benchmark no longer produces does not linger); 0 when every entry passed, else 1."""
    from pytest_nnsight.files import atomic_write

    width = {k: max(len(str(e[k])) for e in entries) for k in ("name", "unit", "target")}
    for e in entries:
        print(
            f"{e['name']:<{width['name']}}  {e['value']!s:>8} {e['unit']:<{width['unit']}} target {e['target']:<{width['target']}} "
            f"{'PASS' if e['passed'] else 'FAIL'}  {e.get('detail', '')}"
        )
    atomic_write(path, json.dumps(entries, indent=2) + "\n")
    return 0 if all(e["passed"] for e in entries) else 1


def main() -> int:
    import argparse

    sys.path.insert(0, str(HERE.parent))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scaling", action="store_true")
    args = parser.parse_args()
    entries = side_by_side(args.device, args.rounds)
    if args.scaling:
        entries += scaling(args.device)
    for e in entries:
        print(json.dumps(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
