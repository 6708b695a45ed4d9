"""Every nnsight / transformers version difference the plugin relies on, and nothing else.

The plugin supports nnsight 0.5.x to 0.8.x (and newer, unchecked) on transformers 4.57 and 5.x.
Code elsewhere in the package calls these helpers instead of testing versions itself, so one file
says what differs between releases and why (measured in `nnsight-versions.md`; hazards H1-H14 in
docs/hazards.md). The version matrix (CI/matrix.py) checks each of them in real environments.
Which combinations were checked is the separate shipped table (`compatibility.py`).

Imports only the standard library at module load; torch and nnsight inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
import weakref
from typing import Any, Iterator

from .environment import package_version


def parse_version(text: str) -> tuple[int, ...]:
    """'0.8.1' -> (0, 8, 1); '0.9.0.dev2+cpu' -> (0, 9, 0); () when no number leads the text."""
    out = []
    for part in text.split("+", 1)[0].split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
        if m.group() != part:  # '0rc1': a pre-release ends the numeric part
            break
    return tuple(out)


@functools.cache
def installed(name: str) -> tuple[int, ...]:
    """The installed version of `name` as numbers, read without importing it; () when not installed."""
    return parse_version(package_version(name))


def nnsight_at_least(*version: int) -> bool:
    """Whether the installed nnsight is `version` or newer."""
    return installed("nnsight") >= tuple(version)


# -- wrapping ------------------------------------------------------------------------------------------


def language_model_class(nnsight: Any) -> Any:
    """The causal-LM wrapper class: `TransformersModel` on nnsight 0.8+, `LanguageModel` before (0.8 deprecates it)."""
    return getattr(nnsight, "TransformersModel", None) or nnsight.LanguageModel


LANGUAGE_MODEL_CLASSES = ("LanguageModel", "TransformersModel")


def is_language_model(model: Any) -> bool:
    """Whether `model` is nnsight's causal-LM wrapper (it takes prompt strings and tokenizes them itself)."""
    return any(c.__name__ in LANGUAGE_MODEL_CLASSES for c in type(model).__mro__)


def wrap_language_model(nnsight: Any, source: Any, **kwargs: Any) -> Any:
    """`source` (a pre-loaded module or a repo id) in the causal-LM wrapper of the installed nnsight.

    0.8 warns that LanguageModel is deprecated (a FutureWarning, which fails `-W error` suites): the
    notice is for nnsight users, not test output. nnsight <= 0.7 leaves `.config` None on a wrapper of a
    pre-loaded module; it is set to the module's config, so `model.config.n_layer` works on every line.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = language_model_class(nnsight)(source, **kwargs)
    config = getattr(source, "config", None)
    if config is not None and getattr(wrapped, "config", None) is None:
        # object.__setattr__: an Envoy's own __setattr__ (0.6) forwards the name to the module and leaves None in place
        object.__setattr__(wrapped, "config", config)
    return wrapped


# -- running edits -------------------------------------------------------------------------------------


@contextlib.contextmanager
def edit_mode(value: Any) -> Iterator[None]:
    """Where an in-place edit of `value` runs: inside inference mode when `value` was made in it.

    The plugin runs traces under `torch.inference_mode()`. nnsight 0.8 runs the trace body in the
    caller's thread (greenlets), so the mode holds there; nnsight <= 0.7 runs it in a worker thread
    where an outer inference mode is off, and an in-place write to an activation made in inference
    mode raises "Inplace update to inference tensor outside InferenceMode". Re-entering the mode for
    the write is a no-op on 0.8.
    """
    import torch

    if isinstance(value, torch.Tensor) and value.is_inference() and not torch.is_inference_mode_enabled():
        with torch.inference_mode():
            yield
    else:
        yield


def injects_position_ids() -> bool:
    """Whether the installed nnsight adds left-pad-corrected `position_ids` to a padded batch itself (0.8+)."""
    return nnsight_at_least(0, 8)


def left_pad_positions(mask: Any) -> Any:
    """`position_ids` for a `[rows, tokens]` attention mask: a left-padded row counts from its first real token
    (as nnsight 0.8 counts it, and as the same prompt run alone); any other row from 0."""
    import torch

    mask = mask.long()
    counted = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    left_padded = (mask.diff(dim=-1) >= 0).all(-1, keepdim=True)
    return torch.where(left_padded, counted, plain)


def cache_input_name(model: Any) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` from transformers 5, `past_key_values` before
    (transformers 5 still accepts `past_key_values`, with a deprecation notice)."""
    import inspect

    module = getattr(model, "_module", model)
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned: `output.cache` from transformers 5, `output.past_key_values` before; None without one.

    Read by key, so transformers 5 prints no deprecation notice for the old attribute."""
    for key in ("cache", "past_key_values"):
        try:
            if key in output and output[key] is not None:
                return output[key]
        except (TypeError, KeyError):
            continue
    return None


def lean_forward_kwargs(module: Any, *, keep_last: bool) -> dict[str, Any]:
    """Keywords for a lean forward of a transformers model: `logits_to_keep=1` when only the last position's logits are
    read (transformers < 4.45 spells it `num_logits_to_keep`; models without either compute every position), and
    `use_cache=False`, each only where the model's forward accepts it (encoders and custom modules take neither)."""
    params = _forward_params(module)
    out: dict[str, Any] = {}
    if "use_cache" in params:
        out["use_cache"] = False
    if keep_last:
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in params:
                out[name] = 1
                break
    return out


_FORWARD_PARAMS: "weakref.WeakKeyDictionary[Any, frozenset[str]]" = weakref.WeakKeyDictionary()


def _forward_params(module: Any) -> frozenset[str]:
    import inspect

    try:
        return _FORWARD_PARAMS[module]
    except (KeyError, TypeError):
        pass
    try:
        params = frozenset(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        params = frozenset()
    try:
        _FORWARD_PARAMS[module] = params
    except TypeError:
        pass
    return params


def trace_inputs(model: Any, inputs: Any) -> Any:
    """What to give `model.trace` for `inputs` (a prompt or a list of prompts).

    A batch of prompts of different lengths is left-padded (the plugin pins the side). nnsight 0.8
    then supplies `position_ids` that keep each row's tokens at their own positions; nnsight <= 0.7
    does not, and a padded row's logits differ from the same prompt run alone (hazard H4/H5: a shared
    clean trace moved a metric by 0.29). Where the installed nnsight does not, the batch is tokenized
    here, as nnsight would, and passed with those `position_ids`. Anything else passes unchanged.
    """
    if (
        injects_position_ids()
        or not isinstance(inputs, list)
        or len(inputs) < 2
        or not all(isinstance(p, str) for p in inputs)
    ):
        return inputs
    tok = getattr(model, "tokenizer", None)
    if tok is None or getattr(tok, "padding_side", None) != "left" or not is_language_model(model):
        return inputs
    enc = dict(tok(inputs, return_tensors="pt", padding=True))
    mask = enc.get("attention_mask")
    if mask is None or bool(mask.all()):
        return inputs
    enc["position_ids"] = left_pad_positions(mask)
    return enc


def _keyword_only_opens_no_invoke(args: tuple, kwargs: dict) -> bool:
    """nnsight 0.5 opens the trace's invoke only for positional inputs: `model.trace(input_ids=..., attention_mask=...)`
    runs the body outside any forward ("Cannot return output of Envoy that is not interleaving"); 0.6+ count keywords."""
    return not args and "input_ids" in kwargs and not nnsight_at_least(0, 6)


def trace_args(model: Any, args: tuple, kwargs: dict) -> tuple:
    """Positional inputs for `model.trace`: on nnsight 0.5, keyword-only token ids move to the first position."""
    return (kwargs["input_ids"],) if _keyword_only_opens_no_invoke(args, kwargs) else tuple(args)


def trace_kwargs_of(model: Any, args: tuple, kwargs: dict) -> dict:
    """Keyword inputs for `model.trace`, matching `trace_args`."""
    if _keyword_only_opens_no_invoke(args, kwargs):
        return {k: v for k, v in kwargs.items() if k != "input_ids"}
    return dict(kwargs)


# -- errors ---------------------------------------------------------------------------------------------

# "the module was not reached": 0.5/0.6 ValueError "... was not provided" or OutOfOrderError "Did you call an
# Envoy out of order?"; 0.7 MissedProviderError; 0.8 OutOfOrderError "... the model already ran past it" (H13).
NOT_REACHED_CLASSES = ("OutOfOrderError", "MissedProviderError")
NOT_REACHED_TEXT = ("was not provided", "ran past it", "Did you call an Envoy out of order")


def is_not_reached(exc: BaseException) -> bool:
    """Whether nnsight (any line) says a requested module value never came: read out of order, or the module never ran."""
    text = str(exc)
    return type(exc).__name__ in NOT_REACHED_CLASSES or any(s in text for s in NOT_REACHED_TEXT)


def cause_line(exc: BaseException) -> str:
    """The line of an nnsight error that names its cause: the first, or the last where nnsight 0.5-0.7 put a
    whole formatted traceback in the message (0.8 raises the original exception unwrapped)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


# -- structure records -----------------------------------------------------------------------------------

# nnsight <= 0.7 attaches its own modules to a wrapped causal LM (`generator`, `generator.streamer`, classes of
# nnsight.modeling.language: the generate loop's hooks); they never run in a forward and are not the model's, so
# a structure record taken under 0.7 and compared under 0.8 said "new module, runs 0x".
NNSIGHT_MODULE_NAMES = ("generator", "generator.streamer")


def is_nnsight_module(module: Any) -> bool:
    """Whether a submodule is nnsight's own, not the model's (its class comes from nnsight): left out of structure records."""
    return (type(module).__module__ or "").split(".", 1)[0] == "nnsight"
