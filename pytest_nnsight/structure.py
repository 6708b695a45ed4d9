"""The graph inspector: what each module of a model returns and takes, recorded with plain torch hooks.

`model_structure(model)` runs a short probe prompt twice (batch 2 at its tokenized length L, batch
3 at length 2L) with forward hooks on the underlying torch module, so the record does not depend
on nnsight's tracing. Each tensor dimension that follows the batch becomes `b`, one that follows
the sequence `s` (hidden sizes stay numbers). Beside the modules it records what changes results
silently: the tokenizer's padding side, pad token and returned keys, the attention implementation,
and whether attention weights are materialized. Repeated blocks with identical records collapse
(`transformer.h.*`). `structure_diff.explain` turns two records into user-level consequences.

>>> assert model_structure(model) == structure_snapshot      # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ArgumentError, ModelUsageError
from .specs import _is_tensor, spec_of  # noqa: F401  (spec_of is imported from here too)

DEFAULT_PROBE = "The capital of France is"
ROOT = "model"  # how the root module's path "" is shown
BATCHES = (2, 3)  # the two probe batch sizes: a dim going 2 -> 3 is the batch


@dataclass
class ModelStructure:
    """A model's recorded structure: modules in call order, tokenizer and attention facts; `record` is JSON-ready."""

    model: str
    probe: str
    record: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> dict[str, Any]:
        return self.record["modules"]

    def __repr__(self) -> str:
        return f"<ModelStructure of {self.model}: {len(self.record.get('modules', {}))} entries, probe {self.probe!r}>"


# -- values as specs ----------------------------------------------------------------------------


def _dim(a: int, b: int, s: tuple[int, int]) -> Any:
    if a == b:
        return a
    if (a, b) == BATCHES:
        return "b"
    if (a, b) == s:
        return "s"
    if (a, b) == (BATCHES[0] * s[0], BATCHES[1] * s[1]):
        return "b*s"
    if a - s[0] == b - s[1]:
        return f"s{a - s[0]:+d}"
    return "?"


def symbolic(first: Any, second: Any, s: tuple[int, int]) -> Any:
    """Merge the specs of the two probe runs: dims that follow the batch or sequence become 'b'/'s'."""
    if isinstance(first, tuple) and first[:1] == ("Tensor",):
        if not (isinstance(second, tuple) and len(second[1]) == len(first[1])):
            dims = [str(d) for d in first[1]]
        else:
            dims = [str(_dim(a, b, s)) for a, b in zip(first[1], second[1])]
        return f"Tensor[{','.join(dims)}] {first[2]}"
    if isinstance(first, dict) and isinstance(second, dict) and first.keys() == second.keys():
        (kind, a), (_, b) = next(iter(first.items())), next(iter(second.items()))
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return {kind: [symbolic(x, y, s) for x, y in zip(a, b)]}
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            return {kind: {k: symbolic(a[k], b[k], s) for k in a}}
    return symbolic(first, first, (-1, -1)) if isinstance(first, (tuple, dict)) else first


# -- recording ------------------------------------------------------------------------------------


def _root_of(model: Any) -> Any:
    return getattr(model, "_model", None) or getattr(model, "_module", None) or model


def _probe_inputs(model: Any, tokenizer: Any, prompt: str, inputs: Any) -> tuple[dict[str, Any], list[str]]:
    import torch

    if inputs is not None:
        enc = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
        keys = list(enc)
    else:
        if tokenizer is None:
            raise ModelUsageError(
                f"{type(_root_of(model)).__name__} has no tokenizer: pass tokenizer= or inputs= (token ids [1, L]) to model_structure"
            )
        enc = dict(tokenizer(prompt, return_tensors="pt"))
        keys = list(enc)
    for k, v in enc.items():
        if not (isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == 1):
            raise ArgumentError(
                f"model_structure input {k!r} has shape {tuple(getattr(v, 'shape', ()))}: expected one row, [1, L]"
            )
    length = next(iter(enc.values())).shape[1]
    if length < 4:
        raise ArgumentError(
            f"probe {prompt!r} is {length} token(s) long: use one of at least 4 tokens, so batch and sequence dims stay apart"
        )
    return enc, keys


def _forward(
    root: Any, enc: dict[str, Any], names: dict[int, str], positional: bool
) -> tuple[dict[str, list[Any]], list[str], Any]:
    """One forward with hooks on every module: per path the first call's specs and the call count; call order."""
    import torch

    seen: dict[str, list[Any]] = {}
    order: list[str] = []

    def pre(module: Any, args: tuple, kwargs: dict) -> None:
        name = names[id(module)]
        if name not in seen:
            order.append(name)

    def post(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        name = names[id(module)]
        if name in seen:
            seen[name][0] += 1
            return
        first = args[0] if args else next(iter(kwargs.values()), None)
        signature = f"{len(args)} args; kwargs: {', '.join(sorted(kwargs)) or '-'}"
        seen[name] = [1, spec_of(first), signature, spec_of(output)]

    handles = []
    for module in {id(m): m for m in root.modules() if id(m) in names}.values():
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = root(*enc.values()) if positional else root(**enc)
    finally:
        for h in handles:
            h.remove()
    return seen, order, out


def _model_modules(root: Any) -> list[tuple[str, Any]]:
    """(path, module) of the model's own modules: nnsight's (`generator` on <= 0.7, compat.is_nnsight_module) left out."""
    from .compat import is_nnsight_module

    out, skipped = [], []
    for path, module in root.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skipped):
            continue
        if path and is_nnsight_module(module):
            skipped.append(path)
            continue
        out.append((path, module))
    return out


def _attention(root: Any, enc: dict[str, Any]) -> dict[str, Any]:
    """The attention implementation and whether output_attentions=True gives weights (SDPA gives none)."""
    import torch

    config = getattr(root, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if config is None or not hasattr(config, "output_attentions"):
        return {"implementation": impl, "weights": "unknown (not a transformers model)"}
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = root(**enc, output_attentions=True)
    except Exception as exc:  # noqa: BLE001 - a model without the switch: say so, do not fail the record
        return {"implementation": impl, "weights": f"unknown ({type(exc).__name__} with output_attentions=True)"}
    att = out.get("attentions") if isinstance(out, Mapping) else None
    if att is None:
        weights = "not materialized (output_attentions=True returns no attentions)"
    elif len(att) and all(_is_tensor(a) for a in att):
        length = next(iter(enc.values())).shape[1]
        dims = ["b" if i == 0 else "s" if d == length else str(d) for i, d in enumerate(att[0].shape)]
        weights = f"materialized ({len(att)} x Tensor[{','.join(dims)}])"
    else:
        weights = (
            f"not materialized (output_attentions=True returns {tuple(None if a is None else '?' for a in att)!r})"
        )
    return {"implementation": impl, "weights": weights}


def generalize(path: str) -> str:
    """`transformer.h.3.attn` -> `transformer.h.*.attn`: numbered children of a container become `*`."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _indices(path: str) -> str:
    return ",".join(part for part in path.split(".") if part.isdigit())


def collapse(modules: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge numbered modules (`h.0`, `h.1`, ...) with identical records into one `h.*` entry with their indices."""
    groups: dict[str, list[str]] = {}
    for path in modules:
        groups.setdefault(generalize(path), []).append(path)
    out: dict[str, dict[str, Any]] = {}
    for path, entry in modules.items():
        g = generalize(path)
        members = groups[g]
        if g == path or len(members) == 1:
            out[path] = entry
        elif all(modules[m] == entry for m in members):
            if g not in out:
                out[g] = {**entry, "indices": [_indices(m) for m in members]}
        else:
            out[path] = entry
    return out


def expand(modules: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The inverse of `collapse`: one entry per concrete module path."""
    out: dict[str, dict[str, Any]] = {}
    for path, entry in modules.items():
        if "indices" not in entry:
            out[path] = entry
            continue
        rest = {k: v for k, v in entry.items() if k != "indices"}
        for idx in entry["indices"]:
            parts, it = [], iter(str(idx).split(","))
            for part in path.split("."):
                parts.append(next(it) if part == "*" else part)
            out[".".join(parts)] = rest
    return out


def model_structure(
    model: Any, tokenizer: Any = None, *, prompt: str = DEFAULT_PROBE, inputs: Any = None, semantics: bool = True
) -> ModelStructure:
    """Record `model`'s structure on `prompt` (an nnsight wrapper, or a torch module with `tokenizer`).

    A bare torch module with a tokenizer is wrapped with `pytest_nnsight.models.wrap` first, so the
    tokenizer is pinned as the fixtures pin it. `inputs=` (ids [1, L] or a dict) replaces the prompt.
    For a language model, `record["nnsight"]` adds what nnsight itself does (`semantics.probe`: padding
    and position ids, a block's `.output` inside a trace, gradients); `semantics=False` leaves it out.

    Examples:
        >>> s = model_structure(nnsight_model("bundled:capitals"))      # doctest: +SKIP
        >>> s.modules()["transformer.h.*"]["output"]                     # doctest: +SKIP
        'Tensor[b,s,64] float32'
    """
    import torch

    from .sites import model_name

    if isinstance(model, torch.nn.Module) and tokenizer is not None:
        from .models import wrap

        model = wrap(model, tokenizer)
    root = _root_of(model)
    if not isinstance(root, torch.nn.Module):
        raise ModelUsageError(
            f"model_structure needs an nnsight-wrapped model or a torch.nn.Module, got {type(model).__name__}"
        )
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    enc, keys = _probe_inputs(model, tok, prompt, inputs)
    length = next(iter(enc.values())).shape[1]
    device = next(iter(root.parameters()), torch.empty(0)).device
    run_a = {k: v.repeat(BATCHES[0], 1).to(device) for k, v in enc.items()}
    run_b = {k: torch.cat([v, v], dim=1).repeat(BATCHES[1], 1).to(device) for k, v in enc.items()}
    names = {id(m): n for n, m in reversed(_model_modules(root))}
    positional = inputs is not None and not isinstance(inputs, Mapping)  # bare ids go in as forward(ids)
    seen_a, order, _ = _forward(root, run_a, names, positional)
    seen_b, _, _ = _forward(root, run_b, names, positional)
    lengths = (length, 2 * length)
    modules: dict[str, dict[str, Any]] = {}
    for path in order:
        calls, inp, sig, out = seen_a[path]
        other = seen_b.get(path, seen_a[path])
        modules[path or ROOT] = {
            "class": type(root.get_submodule(path)).__name__,
            "calls": calls,
            "input": symbolic(inp, other[1], lengths),
            "signature": sig,
            "output": symbolic(out, other[3], lengths),
        }
    for path, module in _model_modules(root):
        if path and path not in seen_a:
            modules[path] = {"class": type(module).__name__, "calls": 0}
    call_order = list(dict.fromkeys(generalize(p or ROOT) for p in order))
    record = {
        "probe": prompt if inputs is None else f"inputs of length {length}",
        "tokenizer": None
        if tok is None
        else {
            "padding_side": getattr(tok, "padding_side", None),
            "pad_token": getattr(tok, "pad_token", None),
            "keys": keys,
        },
        "attention": _attention(root, run_a),
        "call_order": call_order,
        "modules": collapse(modules),
    }
    if semantics and inputs is None:
        from .semantics import probe

        found = probe(model)
        if found:
            record["nnsight"] = found
    return ModelStructure(model_name(model), record["probe"], record)


# -- rendering --------------------------------------------------------------------------------------

TENSOR_RE = re.compile(r"^Tensor\[(?P<dims>[^\]]*)\] (?P<dtype>\w+)$")


def parse_tensor(spec: Any) -> tuple[list[str], str] | None:
    """('Tensor[b,s,32] float32') -> (['b', 's', '32'], 'float32'); None for anything else."""
    m = TENSOR_RE.match(spec) if isinstance(spec, str) else None
    return (m.group("dims").split(",") if m.group("dims") else [], m.group("dtype")) if m else None


def render(spec: Any, *, short: bool = False, dtype: bool = True) -> str:
    """A spec as one line: `tuple(Tensor[b,s,32], ...)` when short, every element otherwise."""
    t = parse_tensor(spec)
    if t is not None:
        return f"Tensor[{','.join(t[0])}]" + (f" {t[1]}" if dtype and not short else "")
    if spec is None:
        return "None"
    if isinstance(spec, dict) and len(spec) == 1:
        kind, body = next(iter(spec.items()))
        if isinstance(body, list):
            if short and len(body) > 1:
                return f"{kind}({render(body[0], short=True)}, ...)"
            return f"{kind}(" + ", ".join(render(v, short=short, dtype=dtype) for v in body) + ")"
        if isinstance(body, dict):
            return f"{kind}(" + ", ".join(f"{k}={render(v, short=short, dtype=dtype)}" for k, v in body.items()) + ")"
    return str(spec)
