"""Attention patterns: read a head's weights and assert claims about where it attends.

Reading a pattern switches the model to eager attention once (SDPA returns no weights) and warns
that it did (families.ensure_eager). Each prompt runs alone, so positions never shift under padding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .assertions import _fail
from .compat import is_language_model
from .errors import ArgumentError, ModelUsageError, PositionError
from .prompts import describe_positions, resolve_position, tokens_of
from .sites import resolve_site, site_value


def _trace_inputs(model: Any, prompt: str) -> tuple[tuple, dict]:
    if is_language_model(model):
        return (prompt,), {}
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ModelUsageError(
            f"{type(model).__name__} has no tokenizer: serve it with tokenizer= to read patterns of prompts"
        )
    return (), dict(tok(prompt, return_tensors="pt"))


def attention_pattern(model: Any, prompt: str, layer: int, head: int | None = None) -> torch.Tensor:
    """The attention weights of `layer` on one prompt, on CPU: [heads, query, key], or [query, key] for one `head`.

    >>> attention_pattern(model, "t3 t7 t1", layer=0, head=0)[-1]   # doctest: +SKIP
    tensor([0.0010, 0.0020, 0.9900, 0.0070])
    """
    s = resolve_site(model, f"pattern.{layer}" + ("" if head is None else f".{head}"))
    args, kwargs = _trace_inputs(model, prompt)
    with torch.inference_mode():
        with model.trace(*args, **kwargs):
            weights = site_value(model, s).detach().clone().save()
    return weights[0].float().cpu()


def assert_attends(model: Any, prompt: str, *, layer: int, head: int, query: Any, key: Any, at_least: float) -> float:
    """Head `head` of `layer` at position `query` attends to position(s) `key` with total weight >= `at_least`.

    Positions take anything `position=` does: an int, 'last', a word of the prompt. Returns the weight.

    >>> assert_attends(model, "When Mary and John went to the store, John gave a drink to",   # doctest: +SKIP
    ...                layer=9, head=9, query="last", key="Mary", at_least=0.5)
    """
    __tracebackhide__ = True
    tokens = tokens_of(model, prompt)
    q = resolve_position(tokens, query, prompt=prompt)
    k = resolve_position(tokens, key, prompt=prompt)
    if len(q) != 1:
        raise PositionError(f"query {query!r} names {len(q)} positions: name one query position")
    pattern = attention_pattern(model, prompt, layer, head)
    weight = float(pattern[q[0], k].sum())
    if not weight >= at_least:
        top = pattern[q[0]].topk(min(3, pattern.shape[-1]))
        _fail(
            f"claim: head {layer}.{head} at {describe_positions(tokens, q)} attends to {describe_positions(tokens, k)} with weight >= {at_least:g}",
            [
                ("site", f"pattern.{layer}.{head}"),
                ("prompt", repr(prompt)),
                ("measured", f"{weight:.4g}"),
                (
                    "attends to",
                    ", ".join(f"{int(i)} {tokens[int(i)]!r} {float(v):.3f}" for v, i in zip(top.values, top.indices)),
                ),
            ],
            "check the layer/head numbering of this model family, or look at the whole row with attention_pattern()",
        )
    return weight


def previous_token_scores(model: Any, prompts: Sequence[str], *, layer: int, head: int, start: int = 1) -> list[float]:
    """Per prompt: the head's mean attention from each query position q >= `start` to q - 1."""
    scores = []
    for prompt in prompts:
        pattern = attention_pattern(model, prompt, layer, head)
        t = pattern.shape[-1]
        q = torch.arange(max(start, 1), t)
        scores.append(float(pattern[q, q - 1].mean()) if len(q) else float("nan"))
    return scores


def assert_previous_token_head(
    model: Any,
    prompts: Sequence[str],
    *,
    layer: int,
    head: int,
    min_weight: float = 0.5,
    on_at_least: float = 0.9,
    start: int = 1,
) -> list[float]:
    """Head `head` of `layer` is a previous-token head: on at least `on_at_least` of `prompts` its mean attention
    to the previous token (see previous_token_scores) is >= `min_weight`. Returns the per-prompt scores.

    >>> assert_previous_token_head(model, ["t3 t7 t1 t9", "t2 t5 t8"], layer=0, head=0, min_weight=0.9)   # doctest: +SKIP
    """
    __tracebackhide__ = True
    if not prompts:
        raise ArgumentError("assert_previous_token_head needs at least one prompt")
    scores = previous_token_scores(model, prompts, layer=layer, head=head, start=start)
    failing = sorted(
        ((s, p) for s, p in zip(scores, prompts) if not s >= min_weight), key=lambda x: x[0] if x[0] == x[0] else -1
    )
    passed = len(prompts) - len(failing)
    if not passed / len(prompts) >= on_at_least:
        _fail(
            f"claim: head {layer}.{head} is a previous-token head (weight >= {min_weight:g}) on at least {on_at_least:.0%} of prompts",
            [
                ("site", f"pattern.{layer}.{head}"),
                (
                    "measured",
                    f"{len(failing)} / {len(prompts)} failed ({len(failing) / len(prompts):.0%}); mean score {sum(scores) / len(scores):.3f}",
                ),
                ("worst", "; ".join(f"{p!r}: {s:.3f}" for s, p in failing[:5])),
            ],
            "a previous-token head may sit in another layer: scan heads with previous_token_scores()",
        )
    return scores
