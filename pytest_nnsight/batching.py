"""Batching that never changes an answer: how prompts are tokenized, padded and grouped into traces.

Every forward of the plugin goes through `encode`, which tokenizes with the served (pinned) tokenizer
and records, per row, where the real tokens sit in the padded batch (`offsets`) and the real-token
`mask`. Causal decoders served through nnsight's language wrapper (0.8+) are left-padded with
mask-derived position ids, so prompts of different lengths may share a trace there. Any other model
(an encoder with absolute positions and non-causal attention, an unknown module) only ever shares a
trace between prompts of equal token length, so no padding is ever seen: `mixed_lengths_ok` decides,
and `groups` splits a batch accordingly. A metric that never sees the mask (a plain user function
of the output) is padding-blind, so its rows are batched by equal length too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from . import compat
from .errors import PositionError
from .prompts import TokenPrompt, token_prompt  # noqa: F401  (re-exported)

EQUAL_LENGTH_NOTE = "batches only prompts of equal token length (absolute positions or non-causal attention: padding could move its numbers)"


def is_text_model(model: Any) -> bool:
    """Whether nnsight's language wrapper serves `model` (it tokenizes text itself); the wrapper class of each
    nnsight line is known to compat.py."""
    return compat.is_language_model(model)


def mixed_lengths_ok(model: Any) -> bool:
    """Prompts of different lengths may share a trace of `model` without moving a number.

    True only for causal decoders served through nnsight's language wrapper, left-padded with mask-derived
    position ids (nnsight 0.8 adds them, compat.trace_inputs before); encoders and plain modules batch
    prompts of equal token length only.
    """
    if not is_text_model(model):
        return False
    return getattr(getattr(model, "tokenizer", None), "padding_side", None) == "left"


def ids_of(model: Any, prompt: str) -> list[int]:
    """The token ids the model sees for one prompt (special tokens included)."""
    if isinstance(prompt, TokenPrompt):
        return list(prompt.ids)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise PositionError("this model has no tokenizer, so it cannot take text prompts: give token ids or tensors")
    return list(tok(prompt)["input_ids"])


def lengths_of(model: Any, prompts: Sequence[str]) -> list[int]:
    """Token counts of several prompts, in one batched tokenizer call."""
    if not prompts:
        return []
    if any(isinstance(p, TokenPrompt) for p in prompts):
        return [len(ids_of(model, p)) for p in prompts]
    return [len(ids) for ids in model.tokenizer(list(prompts))["input_ids"]]


@dataclass(frozen=True)
class Batch:
    """Prompts ready for one trace: `args`/`kwargs` for model.trace, the real-token `mask` [rows, T] and each row's `offsets`."""

    args: tuple
    kwargs: dict
    mask: Any
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    def padded(self, row: int, positions: Sequence[int]) -> list[int]:
        """Indices of `positions` (in the row's own tokens) inside the padded batch."""
        return [p + self.offsets[row] for p in positions]


def encode(model: Any, prompts: Any) -> Batch:
    """Tokenize a prompt or a list of prompts for one trace, with the served tokenizer and its padding side."""
    import torch

    if not isinstance(prompts, (str, list)):  # already model inputs (a dict of tensors, a tensor): passed as they are
        return _as_given(model, prompts)
    texts = list(prompts) if isinstance(prompts, list) else [prompts]
    id_rows = [ids_of(model, p) for p in texts]
    tok = model.tokenizer
    right = getattr(tok, "padding_side", "right") == "right"
    width = max(len(r) for r in id_rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(id_rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(id_rows), width), dtype=torch.long)
    offsets = []
    for r, row in enumerate(id_rows):
        start = 0 if right else width - len(row)
        ids[r, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, start : start + len(row)] = 1
        offsets.append(start)
    lengths = tuple(len(r) for r in id_rows)
    if is_text_model(model):
        if any(isinstance(p, TokenPrompt) for p in texts):
            inputs: Any = [list(r) for r in id_rows]  # nnsight pads token-id lists the same way as text
        else:
            # left-pad position ids where nnsight (<= 0.7) adds none
            inputs = compat.trace_inputs(model, [str(t) for t in texts]) if isinstance(prompts, list) else str(texts[0])
        return Batch((inputs,), {}, mask, tuple(offsets), lengths)
    device = _device(model)
    ids = ids.to(device)
    accepted = _forward_params(model)
    if accepted is not None and "input_ids" not in accepted:
        return Batch((ids,), {}, mask, tuple(offsets), lengths)  # a plain module: token ids positionally
    kwargs = {"input_ids": ids}
    if accepted is None or "attention_mask" in accepted:
        kwargs["attention_mask"] = mask.to(device)
    return Batch((), kwargs, mask, tuple(offsets), lengths)


def _as_given(model: Any, inputs: Any) -> Batch:
    """A batch the caller built itself: its attention mask (all ones when it has none) gives the offsets."""
    import torch

    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mask is None:
        shape = tuple(ids.shape) if hasattr(ids, "shape") else (1, 1)
        mask = torch.ones(shape if len(shape) == 2 else (1, shape[-1]), dtype=torch.long)
    mask = mask.detach().cpu().long()
    offsets = tuple(int(row.argmax()) if bool(row.any()) else 0 for row in mask)
    lengths = tuple(int(row.sum()) for row in mask)
    return Batch((compat.trace_inputs(model, inputs),), {}, mask, offsets, lengths)


def _forward_params(model: Any) -> set[str] | None:
    """Names the module's forward takes, or None when it takes **kwargs (anything)."""
    import inspect

    module = getattr(model, "_module", model)
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _device(model: Any) -> Any:
    module = getattr(model, "_module", model)
    try:
        return next(module.parameters()).device
    except StopIteration:
        return "cpu"


def groups(lengths: Sequence[int], size: int, *, mixed: bool) -> list[list[int]]:
    """Indices in chunks of at most `size`; unless `mixed`, each chunk holds prompts of one token length only."""
    order = list(range(len(lengths))) if mixed else sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if not chunks or len(chunks[-1]) == size or (not mixed and lengths[chunks[-1][0]] != lengths[i]):
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def runs(lengths: Sequence[int], size: int, *, mixed: bool) -> list[range]:
    """Consecutive slices of at most `size`; unless `mixed`, a slice ends where the token length changes."""
    out: list[range] = []
    start = 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or i - start == size or (not mixed and lengths[i] != lengths[start]):
            out.append(range(start, i))
            start = i
    return out


def may_mix(model: Any, metrics: Sequence[Any] = ()) -> bool:
    """Whether prompts of different lengths may share a trace of `model` measured by `metrics`."""
    return mixed_lengths_ok(model) and all(getattr(m, "padding_safe", True) for m in metrics)
