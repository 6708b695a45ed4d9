"""Metrics: numbers computed from a model's output, one per batch row.

Built-in metrics read the logits at the last position (the last real token: prompts are
left-padded). Answers are token strings, checked to be single tokens, or token ids. Any callable
from the model's output to one value per row is a metric too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import MetricError, NnsightTestError


def logits_of(output: Any) -> Any:
    """The logits tensor in a model output (ModelOutput.logits, a tensor, or a tuple's first element)."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not hasattr(logits, "ndim"):
        raise MetricError(
            f"cannot find logits in a {type(output).__name__} output: use a metric function for this model"
        )
    return logits


def token_id(tokenizer: Any, token: str | int) -> int:
    """The id of a single-token answer; MetricError naming the tokenization when it is not one token."""
    if isinstance(token, int) and not isinstance(token, bool):
        if tokenizer is not None and not 0 <= token < len(tokenizer):
            raise MetricError(f"token id {token} is out of range: the vocabulary has {len(tokenizer)} ids")
        return token
    if not isinstance(token, str) or token == "":
        raise MetricError(f"answer {token!r} is not a token string or id")
    if tokenizer is None:
        raise MetricError(f"answer {token!r} is a string, but the model has no tokenizer: pass a token id")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise MetricError(
            f"answer {token!r} is {len(ids)} tokens {pieces} for this tokenizer: metrics need single-token answers "
            "(for GPT-2 style tokenizers mind the leading space: ' Paris'), or pass a token id"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and token.strip() != tokenizer.unk_token:
        raise MetricError(f"answer {token!r} is not in the vocabulary (it tokenizes to {tokenizer.unk_token})")
    return ids[0]


@dataclass(frozen=True, eq=False)
class Metric:
    """A metric over the model's output: `fn(output, reference) -> tensor[batch]`, bound to token ids.

    `takes_mask`: fn is `fn(output, reference, mask)` with the real-token mask [batch, T] (1 = a real
    token). `padding_safe`: its values do not depend on padding (built-ins and mask-taking metrics);
    a padding-blind metric is only ever run on batches of equal-length prompts. Metrics compare by
    identity: two metrics with one name (closures of one function) stay two metrics.
    """

    name: str
    fn: Callable[..., Any]
    needs_reference: bool = False
    takes_mask: bool = False
    padding_safe: bool = True
    last_only: bool = False  # reads only the last position's logits, so forwards compute no others

    def __call__(self, output: Any, reference: Any = None, mask: Any = None) -> Any:
        if self.takes_mask:
            return self.fn(output, reference, mask)
        return self.fn(output, reference)

    def __str__(self) -> str:
        return self.name


class MetricSpec:
    """A metric before it meets a tokenizer: `bind(model)` checks the answers and returns a Metric."""

    def __init__(
        self,
        name: str,
        tokens: tuple[Any, ...],
        build: Callable[..., Callable[[Any, Any], Any]],
        needs_reference: bool = False,
    ):
        self.name, self.tokens, self.build, self.needs_reference = name, tokens, build, needs_reference

    def bind(self, model: Any) -> Metric:
        tokenizer = getattr(model, "tokenizer", None)
        ids = [token_id(tokenizer, t) for t in self.tokens]
        # every built-in reads the last position
        return Metric(self.name, self.build(*ids), self.needs_reference, last_only=True)

    def __repr__(self) -> str:
        return self.name


def _last(output: Any) -> Any:
    logits = logits_of(output)
    return logits[:, -1, :].float() if logits.ndim == 3 else logits.float()


def logit_diff(answer: str | int, distractor: str | int) -> MetricSpec:
    """logit[answer] - logit[distractor] at the last position.

    >>> logit_diff("Paris", "Berlin")
    logit_diff('Paris', 'Berlin')
    """
    return MetricSpec(
        f"logit_diff({answer!r}, {distractor!r})",
        (answer, distractor),
        lambda a, b: lambda out, ref: _last(out)[:, a] - _last(out)[:, b],
    )


def prob(token: str | int) -> MetricSpec:
    """Probability of `token` at the last position."""
    return MetricSpec(f"prob({token!r})", (token,), lambda a: lambda out, ref: _last(out).softmax(-1)[:, a])


def logprob(token: str | int) -> MetricSpec:
    """Log-probability of `token` at the last position."""
    return MetricSpec(f"logprob({token!r})", (token,), lambda a: lambda out, ref: _last(out).log_softmax(-1)[:, a])


def rank(token: str | int) -> MetricSpec:
    """Rank of `token` at the last position (0 = the top prediction)."""
    return MetricSpec(
        f"rank({token!r})", (token,), lambda a: lambda out, ref: (_last(out) > _last(out)[:, a : a + 1]).sum(-1).float()
    )


def kl_div() -> MetricSpec:
    """KL(reference || run) of the next-token distributions at the last position; the reference is the clean run."""

    def build() -> Callable[[Any, Any], Any]:
        def fn(out: Any, ref: Any) -> Any:
            logp = _last(out).log_softmax(-1)
            ref_logp = ref.float().log_softmax(-1).to(logp.device)
            return (ref_logp.exp() * (ref_logp - logp)).sum(-1)

        return fn

    return MetricSpec("kl_div()", (), build, needs_reference=True)


def last_position(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Declare that a metric function reads only the last position's logits (`out.logits[:, -1]`), so sweeps and
    populations compute the LM head there alone. Undeclared functions get the logits of every position.

    >>> @last_position                                                      # doctest: +SKIP
    ... def paris_minus_berlin(out):
    ...     return out.logits[:, -1, PARIS] - out.logits[:, -1, BERLIN]
    """
    fn.nnsight_last_position = True  # type: ignore[attr-defined]
    return fn


def as_metric(model: Any, metric: Any) -> Metric:
    """A bound Metric from a MetricSpec, a Metric, or a user function `output -> value per row`."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, MetricSpec) or callable(
        getattr(metric, "bind", None)
    ):  # MetricSpec, embeddings.EmbeddingSpec
        return metric.bind(model)
    if callable(metric):
        name = getattr(metric, "__name__", type(metric).__name__)
        if _takes_mask(metric):  # metric(output, mask): sees the real-token mask, so padding cannot move it
            return Metric(name, _guarded(metric, name, with_mask=True), takes_mask=True)
        last = getattr(metric, "nnsight_last_position", False) is True  # @last_position: the LM head runs there alone
        return Metric(name, _guarded(metric, name), padding_safe=last, last_only=last)
    raise MetricError(
        f"metric {metric!r} is not a metric: expected logit_diff(...), prob(...), logprob(...), rank(...), kl_div(), cosine_to(...), distance_to(...), pooled_embedding(...) or a function of the model output"
    )


def _takes_mask(metric: Callable[..., Any]) -> bool:
    """Whether a user metric takes two positional arguments, `(output, mask)`."""
    import inspect

    try:
        params = list(inspect.signature(metric).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2  # `lambda out, k=3: ...` keeps its default: only a required second parameter is the mask


def _guarded(metric: Callable[..., Any], name: str, with_mask: bool = False) -> Callable[..., Any]:
    """A user metric whose failure inside a trace becomes one MetricError naming it (its own frames kept as the cause)."""

    def fn(out: Any, ref: Any, mask: Any = None) -> Any:
        try:
            return metric(out, mask) if with_mask else metric(out)
        except NnsightTestError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("nnsight"):  # nnsight's own control flow
                raise
            raise MetricError(
                f"metric {name} raised {type(exc).__name__}: {exc}; expected a function of the model output "
                "returning one value per row"
            ) from exc

    return fn


def per_row(values: Any, rows: int, metric: Metric) -> Any:
    """Check a metric returned one finite-or-not value per row; a single number for several rows is an error."""
    import torch

    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    t = t.detach().float().reshape(-1).cpu()
    if t.numel() == 1 and rows > 1:
        raise MetricError(
            f"metric {metric.name} returned one number for a batch of {rows} rows: return one value per row (shape [{rows}]), or run with batch_size=1"
        )
    if t.numel() != rows:
        raise MetricError(f"metric {metric.name} returned {t.numel()} values for {rows} rows: expected shape [{rows}]")
    return t
