"""Metrics for encoders (BERT, MiniLM): pooled embeddings over each row's real tokens, never over padding.

`mean_pool(output, mask)` and `cls_pool(output, mask)` are the helpers a custom metric `metric(output, mask)`
uses; `cosine_to`, `distance_to` and `pooled_embedding` are built-in metrics that receive the mask themselves.

>>> effect = patch(model, "The capital of France is", "The capital of Germany is", site="resid_post.1",   # doctest: +SKIP
...                position="France", metric=cosine_to("The capital of France is"))
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import MetricError
from .metrics import Metric

POOLINGS = ("mean", "cls")


def hidden_of(output: Any) -> Any:
    """The final hidden states [batch, T, d] in an encoder's output (last_hidden_state, or a tuple's first element)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)):
        hidden = output[0]
    if hidden is None and hasattr(output, "ndim"):
        hidden = output
    if hidden is None or getattr(hidden, "ndim", 0) != 3:
        raise MetricError(
            f"cannot find hidden states [batch, tokens, d] in a {type(output).__name__} output: pooled-embedding "
            "metrics need an encoder's last_hidden_state (BERT, MiniLM); for a language model use logit_diff or prob"
        )
    return hidden


def mean_pool(output: Any, mask: Any) -> Any:
    """Mean of the final hidden states over each row's real tokens ([batch, d]): pad positions are left out.

    >>> def my_metric(output, mask):                  # doctest: +SKIP
    ...     return mean_pool(output, mask).norm(dim=-1)
    """
    hidden = hidden_of(output).float()
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.device).float().unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def cls_pool(output: Any, mask: Any) -> Any:
    """The final hidden state of each row's first real token ([CLS] for BERT), [batch, d], under either padding side."""
    hidden = hidden_of(output).float()
    if mask is None:
        return hidden[:, 0]
    import torch

    first = mask.to(hidden.device).long().argmax(-1)  # the first 1 of each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def pooled(output: Any, mask: Any, pooling: str = "mean") -> Any:
    """The pooled embedding of each row: 'mean' over real tokens or 'cls' (the first real token)."""
    return mean_pool(output, mask) if pooling == "mean" else cls_pool(output, mask)


class EmbeddingSpec:
    """A pooled-embedding metric before it meets a model: `bind(model)` embeds a text reference with that model."""

    def __init__(self, name: str, reference: Any, pooling: str, build: Callable[[Any], Callable[..., Any]]):
        if pooling not in POOLINGS:
            raise MetricError(f"pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
        if reference is not None and not isinstance(reference, str) and not hasattr(reference, "ndim"):
            raise MetricError(
                f"reference {reference!r:.60}: expected a text (embedded with the model) or a tensor of shape [d]"
            )
        if hasattr(reference, "ndim") and reference.ndim != 1:
            raise MetricError(f"reference embedding of shape {tuple(reference.shape)}: expected shape [d]")
        self.name, self.reference, self.pooling, self.build = name, reference, pooling, build
        self.needs_reference = False

    def bind(self, model: Any) -> Metric:
        ref = self.reference
        if isinstance(ref, str):
            ref = embed(model, ref, self.pooling)
        elif ref is not None:
            ref = ref.detach().float()
        return Metric(self.name, self.build(ref), takes_mask=True)

    def __repr__(self) -> str:
        return self.name


def embed(model: Any, text: str, pooling: str = "mean") -> Any:
    """The pooled embedding [d] of one prompt (run alone: no padding), as a float32 CPU tensor."""
    import torch

    from .trace import run

    holder: list[Any] = []

    def keep(out: Any, ref: Any, mask: Any) -> Any:
        vec = pooled(out, mask, pooling)
        holder.append(vec[0].detach().float().cpu().clone())
        return torch.zeros(1)

    run(model, text, Metric("embedding", keep, takes_mask=True))
    return holder[0]


def _describe(reference: Any) -> str:
    return repr(reference) if isinstance(reference, str) else f"<tensor [{reference.shape[0]}]>"


def pooled_embedding(dim: int, pooling: str = "mean") -> EmbeddingSpec:
    """Component `dim` of the pooled embedding (mean over real tokens, or 'cls'): one number per row."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise MetricError(f"dim={dim!r}: expected an int index into the embedding")
    return EmbeddingSpec(
        f"pooled_embedding({dim}, {pooling!r})",
        None,
        pooling,
        lambda ref: lambda out, r, mask: pooled(out, mask, pooling)[:, dim],
    )


def cosine_to(reference: Any, pooling: str = "mean") -> EmbeddingSpec:
    """Cosine similarity of each row's pooled embedding to `reference` (a text embedded by the model, or a [d] tensor).

    >>> cosine_to("The capital of France is Paris")
    cosine_to('The capital of France is Paris', 'mean')
    """

    def build(ref: Any) -> Callable[..., Any]:
        def fn(out: Any, r: Any, mask: Any) -> Any:
            vec = pooled(out, mask, pooling)
            return torch_cosine(vec, ref.to(vec.device))

        return fn

    return EmbeddingSpec(f"cosine_to({_describe(reference)}, {pooling!r})", reference, pooling, build)


def distance_to(reference: Any, pooling: str = "mean") -> EmbeddingSpec:
    """Euclidean distance of each row's pooled embedding to `reference` (a text embedded by the model, or a [d] tensor)."""

    def build(ref: Any) -> Callable[..., Any]:
        def fn(out: Any, r: Any, mask: Any) -> Any:
            vec = pooled(out, mask, pooling)
            return (vec - ref.to(vec.device)).norm(dim=-1)

        return fn

    return EmbeddingSpec(f"distance_to({_describe(reference)}, {pooling!r})", reference, pooling, build)


def torch_cosine(vec: Any, ref: Any) -> Any:
    import torch

    return torch.nn.functional.cosine_similarity(vec, ref.unsqueeze(0).expand_as(vec), dim=-1)
