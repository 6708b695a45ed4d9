"""Issue 14's figures, measured on today's code (run: .venv/bin/python benchmarks/batching_figures.py).

1. population() with per-pair metric closures that share one __name__, batched vs each pair alone: 'before' re-creates
   the old grouping of rows by metric name, 'after' is the shipped grouping by identity (decoder and encoder).
2. An encoder population over pairs of different token lengths, batched vs single, left and right padding: 'before'
   forces mixed lengths into one padded trace (what the old code did), 'after' is the shipped equal-length rule.
"""

from __future__ import annotations

import statistics

import torch

import pytest_nnsight.populations as pops
from pytest_nnsight.embeddings import cosine_to, embed, mean_pool
from pytest_nnsight.metrics import Metric, logits_of
from pytest_nnsight.models import ModelCache
from pytest_nnsight.prompts import Prompt
from pytest_nnsight.settings import Settings
from pytest_nnsight.strategies import CounterfactualPair, Slots, counterfactual_pairs
from pytest_nnsight.testing import tiny_bert
from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS


def by_name(metrics):
    """The old _row_metric: rows grouped by the metric's display name."""
    groups: dict = {}
    for r, m in enumerate(metrics):
        groups.setdefault(m.name, (m, []))[1].append(r)

    def fn(out, ref, mask):
        values = None
        for m, rows in groups.values():
            v = m(out, None, mask).reshape(-1).float()
            idx = torch.tensor(rows, device=v.device)
            values = torch.zeros_like(v) if values is None else values
            values = values.index_copy(0, idx, v[idx])
        return values

    return Metric("per-variant metric", fn, takes_mask=True)


def per_pair_case(name, model, pairs, site, position, metric, threshold):
    single = [pops.population(model, [p], site, position, metric, threshold=threshold).effects[0] for p in pairs]
    real = pops._row_metric
    try:
        pops._row_metric = by_name
        before = pops.population(model, pairs, site, position, metric, threshold=threshold)
    finally:
        pops._row_metric = real
    after = pops.population(model, pairs, site, position, metric, threshold=threshold)
    print(
        f"[1] {name}: single runs mean effect {statistics.mean(single):.4f}, pass {sum(e >= threshold for e in single)}/{len(single)}"
    )
    for label, r in (("before (by name)", before), ("after (by identity)", after)):
        err = max(abs(a - b) for a, b in zip(r.effects, single))
        print(f"    {label:20}: mean effect {r.mean:.4f}, pass {r.passed}/{r.n}, max |batched - single| {err:.3g}")


def main() -> None:
    torch.set_num_threads(1)
    cache = ModelCache(Settings(device="cpu"))
    capitals = cache.get("bundled:capitals")
    pairs = counterfactual_pairs(capitals, CAPITAL_TEMPLATES, {"country": CAPITALS}).space.sample(10, 0)

    def decoder_metric(p):
        a, b = capitals.tokenizer.convert_tokens_to_ids([p.answer, p.distractor])
        return lambda out: logits_of(out)[:, -1, a] - logits_of(out)[:, -1, b]

    per_pair_case(
        "decoder bundled:capitals, logit-diff closures", capitals, pairs, "transformer.h.0", "last", decoder_metric, 0.5
    )

    bert = cache.get(*tiny_bert(seed=1))
    countries = ["France", "Germany", "Italy", "Spain"]
    templates = ["The capital of {} is", "When Mary went to {} the city", "John gave a drink in {}"]
    enc_pairs = [
        CounterfactualPair(Prompt(t.format(a), Slots(country=a)), Prompt(t.format(b), Slots(country=b)), a, b, t)
        for t in templates
        for a, b in zip(countries, countries[1:] + countries[:1])
    ][:10]
    target = {p: embed(bert, p.clean.text) for p in enc_pairs}

    def encoder_metric(p):
        ref = target[p]
        return lambda out, mask: torch.nn.functional.cosine_similarity(mean_pool(out, mask), ref.unsqueeze(0), dim=-1)

    per_pair_case(
        "encoder tiny BERT, cosine-to-target closures",
        bert,
        enc_pairs,
        "resid_post.0",
        "{country}",
        encoder_metric,
        0.9,
    )

    templates = (
        "The capital of {c} is",
        "When Mary went to the store the capital of {c} is",
        "John gave a drink in {c}",
        "the city of {c}",
    )
    c = ("France", "Germany", "Italy", "Spain", "France")
    mixed = [
        CounterfactualPair(
            Prompt(t.format(c=c[k]), Slots(country=c[k])),
            Prompt(t.format(c=c[k + 1]), Slots(country=c[k + 1])),
            "",
            "",
            t,
        )
        for k, t in enumerate(templates)
    ]
    for side in ("left", "right"):
        model = ModelCache(Settings(device="cpu")).get(*tiny_bert(padding_side=side))
        metric = lambda p: cosine_to(p.clean.text)  # noqa: E731
        single = [
            pops.population(model, [p], "resid_post.0", "{country}", metric, threshold=0.5).effects[0] for p in mixed
        ]
        real = pops.may_mix
        try:
            pops.may_mix = lambda m, ms: True
            before = pops.population(model, mixed, "resid_post.0", "{country}", metric, threshold=0.5)
        finally:
            pops.may_mix = real
        after = pops.population(model, mixed, "resid_post.0", "{country}", metric, threshold=0.5)
        for label, r in (("mixed lengths padded (before)", before), ("equal-length rule (after)", after)):
            print(
                f"[2] encoder, {side:5} padding, {label:30}: max |batched - single| effect {max(abs(a - b) for a, b in zip(r.effects, single)):.3g}"
            )


if __name__ == "__main__":
    main()
