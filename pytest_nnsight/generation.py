"""Findings about generated text: greedy or seeded sampled generation with an intervention at every step.

`generate` runs the decoding loop itself, one traced forward per new token over the whole sequence
(no KV cache), with the intervention applied inside that trace. So it does not depend on nnsight's
`generate` loop, whose semantics differ between versions (hazard H9: `tracer.iter`, `t.result` read
last, 0.8 skipping code after the loop, EOS ending `iter[:N]` early), and an intervention at
"every generated step" means the same thing on every version: every forward sees it at the positions
it names. The test suite checks the loop against transformers' own greedy `generate` (with its KV
cache), and batched generation (left padding, explicit position ids) against one prompt at a time.
`use_cache=True` passes the KV cache between steps (the cache keyword and output differ between transformers 4
and 5: `compat.cache_input_name`, `compat.cache_of`); it is checked to give the same tokens as the full recompute.

Metrics score the continuations (`exact_continuation`, `contains`, `token_accuracy`, `text_metric`);
`generation_population` runs a baseline and an intervened generation over prompt variants and scores
both, and `assert_generation` states a claim with a pass rate (and its Wilson bound).

>>> heads = [Ablate(f"head_out.1.{h}") for h in range(4)]                                  # doctest: +SKIP
>>> result = generation_population(model, prompts, max_new_tokens=6, metric=token_accuracy(expected),
...                                intervention=heads)                                        # doctest: +SKIP
>>> assert_generation(result, at_least=0.9, min_rate=0.9)                                     # doctest: +SKIP
>>> assert_generation(result, run="intervened", at_most=0.5, min_rate=0.9)                     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import ArgumentError, ArgumentTypeError, InterventionError, MetricError
from .findings import record_check, record_generation
from .stats import wilson_interval

__all__ = [
    "Decoding",
    "Generation",
    "Ablate",
    "Steer",
    "Patch",
    "generate",
    "TextMetric",
    "exact_continuation",
    "contains",
    "token_accuracy",
    "text_metric",
    "GenerationPopulation",
    "generation_population",
    "assert_generation",
]

WHERE = ("all", "prompt", "generated")
DECODING_KEYS = frozenset(
    {"do_sample", "temperature", "top_k", "seed", "min_new_tokens", "stop_at_eos", "batch_size", "use_cache"}
)


# --- configuration and results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """How text was decoded; stored with every generation (and its snapshot) so a re-run can reproduce it.

    Greedy by default. `do_sample=True` samples from softmax(logits / temperature), restricted to the
    `top_k` most likely tokens when given, with one generator per prompt seeded from (`seed`, the prompt):
    the same prompt gives the same text alone or in any batch. EOS ends a row (unless `stop_at_eos=False`)
    once `min_new_tokens` tokens are out; before that EOS cannot be chosen.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    min_new_tokens: int = 0
    stop_at_eos: bool = True
    use_cache: bool = False

    def describe(self) -> str:
        how = (
            "greedy"
            if not self.do_sample
            else f"sampled (temperature {self.temperature:g}, top_k {self.top_k}, seed {self.seed})"
        )
        eos = f", min_new_tokens {self.min_new_tokens}" if self.min_new_tokens else ""
        return (
            f"{how}, max_new_tokens {self.max_new_tokens}{eos}"
            + ("" if self.stop_at_eos else ", EOS does not stop")
            + (", KV cache" if self.use_cache else "")
        )


@dataclass(frozen=True)
class Generation:
    """Continuations of `prompts`: text (special tokens dropped), token strings and ids (EOS kept), the decoding, the intervention."""

    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    token_ids: tuple[tuple[int, ...], ...]
    config: Decoding
    intervention: str = "none"

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        shown = "; ".join(f"{p!r} -> {t!r}" for p, t in list(zip(self.prompts, self.texts))[:3])
        more = f"; ... ({len(self)} prompts)" if len(self) > 3 else ""
        return f"Generation({self.config.describe()}, intervention {self.intervention}: {shown}{more})"


# --- interventions applied at every step ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ablate:
    """Replace `site` at `positions` with zeros (`method='zero'`) or its mean over every token of `reference_prompts`
    (`method='mean'`), in every forward of the generation.

    `positions`: 'all' (every real token, the default), 'prompt', 'generated' (every new token), or positions of
    the prompt ('last', an int, negative from the prompt's end, a word, a list of ints), resolved in each prompt's
    own tokens.
    """

    site: Any
    positions: Any = "all"
    method: str = "zero"
    reference_prompts: Sequence[Any] = ()

    def describe(self) -> str:
        return f"{self.method} ablation of {self.site} at {self.positions!r}"


@dataclass(frozen=True)
class Steer:
    """Add `alpha * vector` to `site` at `positions` (as in Ablate) in every forward of the generation."""

    site: Any
    vector: Any
    alpha: float = 1.0
    positions: Any = "all"

    def describe(self) -> str:
        return f"steering {self.site} (alpha {self.alpha:g}) at {self.positions!r}"


@dataclass(frozen=True)
class Patch:
    """Write `source`'s activation at `site`, prompt positions `positions`, into the same positions of every generation
    (each prompt must be at least as long as the largest position)."""

    site: Any
    source: Any
    positions: Any

    def describe(self) -> str:
        return f"patching {self.site} at {self.positions!r} from {str(self.source)!r}"


@dataclass
class _Bound:
    site: Any
    where: Any  # "all" | "prompt" | "generated" | {prompt: its token indices}
    op: str
    value: Any  # [d] tensor written (or added) at every selected position, or [k, d] per prompt position (patch)
    name: str


def _as_list(intervention: Any) -> list[Any]:
    if intervention is None:
        return []
    items = list(intervention) if isinstance(intervention, (list, tuple)) else [intervention]
    for it in items:
        if not isinstance(it, (Ablate, Steer, Patch)):
            raise ArgumentTypeError(
                f"intervention {it!r:.80}: expected Ablate(...), Steer(...), Patch(...) or a list of them"
            )
    return items


def _where(model: Any, positions: Any, prompts: Sequence[str]) -> Any:
    """'all' / 'prompt' / 'generated' as given; anything else resolved in each prompt's own tokens: {prompt: [indices]}."""
    from .prompts import resolve_position, tokens_of

    if isinstance(positions, str) and positions in WHERE:
        return positions
    return {p: resolve_position(tokens_of(model, p), positions, prompt=p) for p in dict.fromkeys(prompts)}


def _bind(model: Any, intervention: Any, prompts: Sequence[str]) -> list[_Bound]:
    import torch

    from .metrics import Metric
    from .prompts import text_of, tokens_of
    from .sites import resolve_site
    from .trace import run

    bound = []
    for it in _as_list(intervention):
        s = resolve_site(model, it.site)
        none = Metric("none", lambda out, ref: torch.zeros(1))
        probe = text_of(it.source) if isinstance(it, Patch) else prompts[0]
        _, acts = run(model, probe, none, save=[s])
        width, dtype, device = acts[s].shape[-1], acts[s].dtype, acts[s].device
        if isinstance(it, Ablate):
            if it.method not in ("zero", "mean"):
                raise ArgumentError(f"ablation method {it.method!r}: expected 'zero' or 'mean' during generation")
            where = _where(model, it.positions, prompts)
            if it.method == "zero":
                value = torch.zeros(width, dtype=dtype, device=device)
            else:
                if not it.reference_prompts:
                    raise ArgumentError(
                        "mean ablation needs reference_prompts=: the prompts whose mean activation (over every token) replaces the site"
                    )
                value = _mean_over_tokens(model, s, [text_of(p) for p in it.reference_prompts])
            bound.append(_Bound(s, where, "set", value, it.describe()))
        elif isinstance(it, Steer):
            vec = it.vector
            if isinstance(it.alpha, bool) or not isinstance(it.alpha, (int, float)) or not math.isfinite(it.alpha):
                raise ArgumentError(f"alpha={it.alpha!r}: expected a finite number")
            if not isinstance(vec, torch.Tensor) or tuple(vec.shape) != (width,):
                shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
                raise InterventionError(
                    f"steering vector of shape {shape} does not fit {s}: expected a tensor of shape ({width},)"
                )
            if not torch.isfinite(vec).all():
                raise InterventionError(f"steering vector for {s} contains NaN or inf: expected finite values")
            where = _where(model, it.positions, prompts)
            bound.append(_Bound(s, where, "add", (float(it.alpha) * vec.to(device=device, dtype=dtype)), it.describe()))
        else:
            src = text_of(it.source)
            if isinstance(it.positions, str) and it.positions in WHERE:
                raise ArgumentError(
                    f"{it.describe()}: a patch needs prompt positions (an int, a word of the source, a list), "
                    f"not {it.positions!r}"
                )
            pos = _where(model, it.positions, [src])[src]
            shortest = min(len(tokens_of(model, p)) for p in prompts)
            if max(pos) >= shortest:
                raise ArgumentError(
                    f"{it.describe()}: position {max(pos)} is beyond the shortest prompt ({shortest} tokens)"
                )
            bound.append(_Bound(s, {p: list(pos) for p in prompts}, "set", acts[s][0, pos], it.describe()))
    return bound


def _mean_over_tokens(model: Any, site: Any, texts: Sequence[str]) -> Any:
    import torch

    from .metrics import Metric
    from .trace import run

    rows = []
    for t in texts:  # one prompt per trace: no padding to exclude
        _, acts = run(model, t, Metric("none", lambda out, ref: torch.zeros(1)), save=[site])
        rows.append(acts[site][0])
    return torch.cat(rows).mean(0)


def _edits(
    bound: Sequence[_Bound], texts: Sequence[str], pads: Sequence[int], lengths: Sequence[int], total: int
) -> list[Any]:
    import torch

    from .trace import Edit

    out = []
    for b in bound:
        rows, pos, vals = [], [], []
        for r, (pad, n) in enumerate(zip(pads, lengths)):
            if isinstance(b.where, str):
                start = pad + n if b.where == "generated" else pad
                stop = pad + n if b.where == "prompt" else total
                ps = list(range(start, stop))
                v = [b.value] * len(ps)
            else:
                ps = [pad + p for p in b.where[texts[r]]]
                v = list(b.value) if b.value.dim() == 2 else [b.value] * len(ps)
            rows += [r] * len(ps)
            pos += ps
            vals += v
        if rows:
            out.append(Edit(b.site, tuple(rows), tuple(pos), torch.stack(vals), op=b.op))
    return out


# --- the decoding loop ---------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name}={value!r} ({type(value).__name__}): expected an int >= {minimum}")
    if value < minimum:
        raise ArgumentError(f"{name}={value!r}: expected an int >= {minimum}")
    return value


def _context(model: Any) -> int | None:
    from .sites import module_of

    cfg = getattr(module_of(model), "config", None)
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def _config(
    max_new_tokens: Any,
    do_sample: bool = False,
    temperature: Any = 1.0,
    top_k: Any = None,
    seed: Any = None,
    min_new_tokens: Any = 0,
    stop_at_eos: bool = True,
    use_cache: bool = False,
) -> Decoding:
    """Check the decoding arguments of `generate` (same defaults) and freeze them into a `Decoding`."""
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("min_new_tokens", min_new_tokens, 0)
    if min_new_tokens > max_new_tokens:
        raise ArgumentError(
            f"min_new_tokens={min_new_tokens} is larger than max_new_tokens={max_new_tokens}: expected 0..{max_new_tokens}"
        )
    if not isinstance(do_sample, bool):
        raise ArgumentTypeError(f"do_sample={do_sample!r}: expected True or False")
    if not isinstance(use_cache, bool):
        raise ArgumentTypeError(f"use_cache={use_cache!r}: expected True or False")
    if do_sample:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not (math.isfinite(temperature) and temperature > 0)
        ):
            raise ArgumentError(f"temperature={temperature!r}: expected a finite number > 0")
        if top_k is not None:
            _positive_int("top_k", top_k)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ArgumentError(f"seed={seed!r}: sampled generation needs an int seed, so the finding is reproducible")
        return Decoding(
            max_new_tokens, True, float(temperature), top_k, seed, min_new_tokens, bool(stop_at_eos), use_cache
        )
    return Decoding(max_new_tokens, False, 1.0, None, None, min_new_tokens, bool(stop_at_eos), use_cache)


def _prompt_texts(prompts: Any) -> list[str]:
    from .prompts import text_of

    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or hasattr(prompts, "text"):
        prompts = [prompts]
    if not prompts:
        raise ArgumentError("prompts=[]: expected a prompt or a non-empty list of prompts")
    return [text_of(p) for p in prompts]


def generate(
    model: Any,
    prompts: Any,
    *,
    max_new_tokens: int,
    intervention: Any = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    min_new_tokens: int = 0,
    stop_at_eos: bool = True,
    batch_size: int = 32,
    use_cache: bool = False,
) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt, with `intervention` (Ablate, Steer, Patch or a list)
    applied in every forward; greedy unless `do_sample=True` (then `seed` is required).

    Prompts are left-padded together, `batch_size` per forward, with explicit position ids: the result equals
    generating one prompt at a time (checked in the test suite). Each step recomputes the whole sequence unless
    `use_cache=True`, which keeps the KV cache between steps (the same tokens, checked; faster on long generations).

    >>> generate(model, "t1 t2 t3 t1", max_new_tokens=2).texts                  # doctest: +SKIP
    ('t2 t3',)
    """
    config = _config(max_new_tokens, do_sample, temperature, top_k, seed, min_new_tokens, stop_at_eos, use_cache)
    gen = _generate(model, prompts, config, intervention, batch_size)
    record_generation(gen)
    return gen


def _generate(model: Any, prompts: Any, config: Decoding, intervention: Any, batch_size: int) -> Generation:
    """`generate` with its decoding arguments already checked (`_config`), recording nothing: `generate` records one
    generation, `generation_population` records the baseline and intervened runs together."""
    max_new_tokens = config.max_new_tokens
    _positive_int("batch_size", batch_size)
    texts = _prompt_texts(prompts)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        from .errors import ModelUsageError

        raise ModelUsageError(
            "generate needs a model with a tokenizer: load it through the nnsight_model fixture or wrap it with one"
        )
    _check_generative(model)
    from .remote import is_remote

    if is_remote(model):
        from .errors import ModelUsageError

        raise ModelUsageError(
            "generate runs the model in this process: it reads each step's next-token logits inside the trace, "
            "which a remote (--nnsight-remote / NDIF) trace does not send back; run generation findings locally"
        )
    encoded = [list(tok(t)["input_ids"]) for t in texts]
    limit = _context(model)
    for t, ids in zip(texts, encoded):
        if limit and len(ids) + max_new_tokens > limit:
            raise ArgumentError(
                f"max_new_tokens={max_new_tokens} with prompt {t[:60]!r} ({len(ids)} tokens) goes beyond the model's context of {limit} "
                f"positions: expected max_new_tokens <= {max(limit - len(ids), 0)} for this prompt"
            )
    bound = _bind(model, intervention, texts)
    label = "; ".join(b.name for b in bound) or "none"
    out_ids: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        out_ids += _decode(
            model, tok, texts[start : start + batch_size], encoded[start : start + batch_size], bound, config
        )
    special = set(getattr(tok, "all_special_ids", []) or [])
    return Generation(
        tuple(texts),
        tuple(tok.decode([i for i in ids if i not in special]).strip() for ids in out_ids),
        tuple(tuple(tok.convert_ids_to_tokens(ids)) for ids in out_ids),
        tuple(tuple(ids) for ids in out_ids),
        config,
        label,
    )


def _check_generative(model: Any) -> None:
    """Refuse a model that predicts no next token (an encoder, a base model without its LM head): its output's argmax
    would be a hidden unit, not a token."""
    from .errors import ModelUsageError
    from .families import find_layout
    from .sites import model_name, module_of

    root = module_of(model)
    layout = find_layout(model)
    can = getattr(root, "can_generate", None)
    generative = (
        (layout.path("lm_head") is not None) if layout is not None else (bool(can()) if callable(can) else False)
    )
    if not generative:
        kind = f"a {layout.family.name} model without an LM head" if layout is not None else f"a {type(root).__name__}"
        raise ModelUsageError(
            f"generate needs a causal language model with an LM head; {model_name(model)} is {kind}, "
            "so its outputs are not next-token logits"
        )


def _generator(seed: int, text: str) -> Any:
    import torch

    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _decode(
    model: Any, tok: Any, texts: Sequence[str], encoded: Sequence[list[int]], bound: Sequence[_Bound], config: Decoding
) -> list[list[int]]:
    import torch

    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(getattr(model, "_module", model), "config", None), "eos_token_id", None)
    pad_id = getattr(tok, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (eos if eos is not None else 0)
    lengths = [len(ids) for ids in encoded]
    longest = max(lengths)
    pads = [longest - n for n in lengths]
    ids = torch.tensor([[pad_id] * p + e for p, e in zip(pads, encoded)], dtype=torch.long)
    mask = torch.tensor([[0] * p + [1] * n for p, n in zip(pads, lengths)], dtype=torch.long)
    gens = [_generator(config.seed, t) for t in texts] if config.do_sample else []
    out: list[list[int]] = [[] for _ in texts]
    done = [False] * len(texts)
    cache = None
    for step in range(config.max_new_tokens):
        if not config.use_cache:
            # [B, V] float32 on CPU
            logits, _ = _next_logits(model, ids, mask, _edits(bound, texts, pads, lengths, ids.shape[1]))
        elif step == 0:  # the prompts, keeping their keys and values
            logits, cache = _next_logits(
                model, ids, mask, _edits(bound, texts, pads, lengths, ids.shape[1]), cache=True
            )
        else:  # only the newest token, attending to the cache: the edits of the positions it stands at
            logits, cache = _next_logits(model, ids[:, -1:], mask, _newest_edits(bound, len(texts)), cache=cache)
        if eos is not None and step < config.min_new_tokens:
            logits[:, eos] = -math.inf
        new = []
        for r in range(len(texts)):
            if done[r]:
                new.append(pad_id)
                continue
            if config.do_sample:
                row = logits[r] / config.temperature
                if config.top_k is not None and config.top_k < row.numel():
                    kth = torch.topk(row, config.top_k).values[-1]
                    row = row.masked_fill(row < kth, -math.inf)
                choice = int(torch.multinomial(row.softmax(-1), 1, generator=gens[r]))
            else:
                choice = int(logits[r].argmax())
            out[r].append(choice)
            if config.stop_at_eos and eos is not None and choice == eos:
                done[r] = True
            new.append(choice)
        ids = torch.cat([ids, torch.tensor(new, dtype=torch.long)[:, None]], 1)
        mask = torch.cat([mask, torch.ones(len(texts), 1, dtype=torch.long)], 1)
        if all(done):
            break
    return out


def _newest_edits(bound: Sequence[_Bound], rows: int) -> list[Any]:
    """With the KV cache a step's input is the newest token alone (position 0): it is a generated position, so 'all'
    and 'generated' edits apply there; prompt positions are in the cache already."""
    import torch

    from .trace import Edit

    return [
        Edit(b.site, tuple(range(rows)), (0,) * rows, torch.stack([b.value] * rows), op=b.op)
        for b in bound
        if b.where in ("all", "generated")
    ]


def _next_logits(model: Any, ids: Any, mask: Any, edits: Sequence[Any], cache: Any = None) -> tuple[Any, Any]:
    """One traced forward over the padded batch with `edits` applied: the last position's logits (float32 on CPU) and,
    when `cache` is given (True to start one), the KV cache to pass to the next step.

    With a cache, `ids` holds only the new tokens, `mask` covers cache and new tokens."""
    import torch

    from . import compat
    from .metrics import Metric, logits_of
    from .sites import module_of
    from .trace import run

    device = next(module_of(model).parameters()).device
    # position ids from the mask, as transformers' generate computes them, so left padding shifts no position on any
    # nnsight version (0.8 adds them itself for string prompts, earlier versions do not: compat.injects_position_ids)
    position_ids = compat.left_pad_positions(mask)[:, -ids.shape[1] :]
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device)}
    if cache is not None:
        batch["use_cache"] = True
        if cache is not True:
            batch[compat.cache_input_name(model)] = cache
    holder: list[Any] = []

    def last(out: Any, ref: Any) -> Any:
        holder.append(
            (
                logits_of(out)[:, -1, :].detach().float().cpu().clone(),
                compat.cache_of(out) if cache is not None else None,
            )
        )
        return torch.zeros(1)

    run(model, batch, Metric("next-token logits", last), edits=edits)
    logits, new_cache = holder[-1]
    if cache is not None and new_cache is None:
        raise InterventionError("generate(use_cache=True): the model returned no KV cache; generate without use_cache")
    return logits.clone(), new_cache  # a normal tensor: the trace ran under inference mode


# --- metrics on generated text -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextMetric:
    """A score of each continuation: `fn(model, generation, k) -> float` for prompt k."""

    name: str
    fn: Callable[[Any, Generation, int], float]
    # what the continuation is compared with (a string, one per prompt, or a function), if anything
    expected: Any = None

    def expected_texts(self, generation: Generation) -> tuple[str, ...]:
        """The expected continuation of each prompt, or () for a metric without one."""
        if self.expected is None:
            return ()
        return tuple(_expected_for(self.expected, generation, k) for k in range(len(generation)))

    def __call__(self, model: Any, generation: Generation) -> tuple[float, ...]:
        return tuple(float(self.fn(model, generation, k)) for k in range(len(generation)))

    def __str__(self) -> str:
        return self.name


def _expected_for(expected: Any, generation: Generation, k: int) -> str:
    if callable(expected):
        value = expected(generation.prompts[k])
    elif isinstance(expected, str):
        value = expected
    elif isinstance(expected, Sequence):
        if len(expected) != len(generation):
            raise MetricError(
                f"expected continuations: {len(expected)} given for {len(generation)} prompts; give one per prompt, one string, or a function of the prompt"
            )
        value = expected[k]
    else:
        raise MetricError(
            f"expected={expected!r:.60}: expected a string, a list of strings (one per prompt) or a function prompt -> string"
        )
    if not isinstance(value, str) or not value.strip():
        raise MetricError(
            f"expected continuation {value!r} for prompt {generation.prompts[k]!r}: expected non-empty text"
        )
    return value


def _expected_ids(model: Any, text: str) -> list[int]:
    tok = model.tokenizer
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in ids and getattr(tok, "unk_token", None) not in text.split():
        bad = [w for w in text.split() if tok(w, add_special_tokens=False)["input_ids"] == [unk]]
        raise MetricError(
            f"expected continuation {text!r} has words the tokenizer does not know ({', '.join(map(repr, bad)) or 'unknown'}): "
            "they tokenize to the unknown token, which the model never generates as a match"
        )
    return ids


def token_accuracy(expected: Any) -> TextMetric:
    """The share of the expected continuation's tokens generated at the same place (missing tokens count as wrong).

    `expected`: one string, a list (one per prompt), or a function prompt -> string.
    """

    def fn(model: Any, gen: Generation, k: int) -> float:
        want = _expected_ids(model, _expected_for(expected, gen, k))
        got = gen.token_ids[k]
        return sum(1 for i, t in enumerate(want) if i < len(got) and got[i] == t) / len(want)

    return TextMetric(f"token_accuracy({_name(expected)})", fn, expected)


def exact_continuation(expected: Any) -> TextMetric:
    """1.0 when the generated tokens begin with exactly the expected continuation's tokens, else 0.0."""

    def fn(model: Any, gen: Generation, k: int) -> float:
        want = _expected_ids(model, _expected_for(expected, gen, k))
        return float(list(gen.token_ids[k][: len(want)]) == want)

    return TextMetric(f"exact_continuation({_name(expected)})", fn, expected)


def contains(text: Any) -> TextMetric:
    """1.0 when the generated text contains `text` (one string, one per prompt, or a function of the prompt), else 0.0."""

    def fn(model: Any, gen: Generation, k: int) -> float:
        return float(_expected_for(text, gen, k) in gen.texts[k])

    return TextMetric(f"contains({_name(text)})", fn, text)


def text_metric(fn: Callable[[str, str], Any], name: str | None = None) -> TextMetric:
    """A user score: `fn(prompt, continuation_text) -> number or bool`, called once per prompt."""
    if not callable(fn):
        raise ArgumentTypeError(
            f"text_metric expects a function (prompt, continuation) -> number, got {type(fn).__name__}"
        )
    label = name or getattr(fn, "__name__", "text_metric")

    def score(model: Any, gen: Generation, k: int) -> float:
        try:
            value = fn(gen.prompts[k], gen.texts[k])
        except Exception as exc:
            raise MetricError(
                f"text metric {label} raised {type(exc).__name__}: {exc} on prompt {gen.prompts[k]!r}"
            ) from exc
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)):
            raise MetricError(
                f"text metric {label} returned {value!r} ({type(value).__name__}) for {gen.prompts[k]!r}: expected a number or a bool"
            )
        return float(value)

    return TextMetric(label, score)


def _name(expected: Any) -> str:
    if isinstance(expected, str):
        return repr(expected)
    if callable(expected):
        return getattr(expected, "__name__", "fn")
    return "per prompt"


# --- claims over prompt variants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPopulation:
    """A baseline and (with an intervention) an intervened generation of n prompt variants, each scored by `metric`."""

    metric: str
    baseline: Generation
    baseline_scores: tuple[float, ...]
    intervened: Generation | None = None
    intervened_scores: tuple[float, ...] = ()
    expected: tuple[str, ...] = field(default=())  # each prompt's expected continuation, when the metric has one

    @property
    def n(self) -> int:
        return len(self.baseline)

    def scores(self, run: str = "baseline") -> tuple[float, ...]:
        if run not in ("baseline", "intervened"):
            raise ArgumentError(f"run={run!r}: expected 'baseline' or 'intervened'")
        if run == "intervened" and self.intervened is None:
            raise ArgumentError(
                "run='intervened': this result has no intervened generation (pass intervention= to generation_population)"
            )
        return self.baseline_scores if run == "baseline" else self.intervened_scores

    def mean(self, run: str = "baseline") -> float:
        s = self.scores(run)
        return sum(s) / len(s)

    def __repr__(self) -> str:
        tail = f", intervened mean {self.mean('intervened'):.3g}" if self.intervened is not None else ""
        return f"GenerationPopulation({self.metric} over {self.n} prompts: baseline mean {self.mean():.3g}{tail})"


def generation_population(
    model: Any,
    prompts: Any,
    *,
    metric: TextMetric,
    max_new_tokens: int,
    intervention: Any = None,
    n: int | None = None,
    **decoding: Any,
) -> GenerationPopulation:
    """Generate from every prompt variant without and (given `intervention`) with the intervention, and score both.

    `prompts`: a list of prompts (str or Prompt); `n` takes the first n. `decoding`: do_sample, temperature, top_k,
    seed, min_new_tokens, stop_at_eos, batch_size (as in `generate`). The report shows both texts side by side.
    """
    if not isinstance(metric, TextMetric):
        raise ArgumentTypeError(
            f"metric={metric!r:.60}: expected token_accuracy(...), exact_continuation(...), contains(...) or text_metric(fn)"
        )
    unknown = sorted(set(decoding) - DECODING_KEYS)
    if unknown:
        raise ArgumentTypeError(
            f"generation_population got unexpected argument(s) {', '.join(unknown)}: the decoding arguments "
            f"are {', '.join(sorted(DECODING_KEYS))}"
        )
    texts = _prompt_texts(prompts)
    if n is not None:
        _positive_int("n", n)
        if n > len(texts):
            raise ArgumentError(f"n={n} is larger than the {len(texts)} prompts given: lower n or pass more prompts")
        texts = texts[:n]
    batch_size = decoding.pop("batch_size", 32)
    config = _config(max_new_tokens, **decoding)
    base = _generate(model, texts, config, None, batch_size)
    base_scores = metric(model, base)
    inter, inter_scores = None, ()
    if intervention is not None:
        inter = _generate(model, texts, config, intervention, batch_size)
        inter_scores = metric(model, inter)
    scores = {f"baseline {metric.name}": base_scores}
    if inter is not None:
        scores[f"intervened {metric.name}"] = inter_scores
    expected = metric.expected_texts(base)
    record_generation(base, inter, scores, expected)
    return GenerationPopulation(metric.name, base, base_scores, inter, inter_scores, expected)


def assert_generation(
    result: GenerationPopulation,
    *,
    run: str = "baseline",
    at_least: float | None = None,
    at_most: float | None = None,
    min_rate: float = 1.0,
    on: str = "rate",
    show: int = 5,
) -> None:
    """Each variant's score (of the `run` 'baseline' or 'intervened') is >= `at_least` (or <= `at_most`) in at least
    `min_rate` of the variants, stated on the raw pass rate or (`on='lower_bound'`) its Wilson 95% lower bound."""
    __tracebackhide__ = True
    from .assertions import _fail

    if not isinstance(result, GenerationPopulation):
        raise ArgumentTypeError(
            f"assert_generation expects a GenerationPopulation (from generation_population), got {type(result).__name__}"
        )
    if (at_least is None) == (at_most is None):
        raise ArgumentError("assert_generation needs exactly one of at_least= or at_most=")
    if on not in ("rate", "lower_bound"):
        raise ArgumentError(f"on={on!r}: expected 'rate' or 'lower_bound' (Wilson 95%)")
    if isinstance(min_rate, bool) or not isinstance(min_rate, (int, float)) or not 0 <= min_rate <= 1:
        raise ArgumentError(f"min_rate={min_rate!r}: expected a rate between 0 and 1")
    scores = result.scores(run)
    gen = result.baseline if run == "baseline" else result.intervened
    bound = at_least if at_least is not None else at_most
    op = ">=" if at_least is not None else "<="
    ok = [(s >= bound) if op == ">=" else (s <= bound) for s in scores]
    passed = sum(ok)
    rate = passed / len(scores)
    lower = wilson_interval(passed, len(scores))[0]
    value = rate if on == "rate" else lower
    what = f"{run} {result.metric} {op} {bound:g}"
    record_check(
        f"share of variants with {what}" + (" (Wilson lower bound)" if on == "lower_bound" else ""),
        value,
        ">=",
        min_rate,
        detail=f"{passed}/{len(scores)}",
    )
    if value >= min_rate:
        return
    order = sorted(range(len(scores)), key=lambda k: scores[k] if op == ">=" else -scores[k])
    worst = "".join(
        f"\n    {scores[k]:.3g}: {gen.prompts[k]!r} -> {gen.texts[k]!r}"
        + (f" (expected {result.expected[k]!r})" if result.expected else "")
        + (f" (baseline {result.baseline.texts[k]!r})" if run == "intervened" else "")
        for k in order[:show]
        if not ok[k]
    )
    _fail(
        f"claim: {what} in at least {min_rate:.0%} of {len(scores)} prompt variants"
        + (" (Wilson 95% lower bound)" if on == "lower_bound" else ""),
        [
            ("pass rate", f"{rate:.3f} ({passed} / {len(scores)})"),
            ("wilson", f"{lower:.3f} (95% lower bound)"),
            ("mean", f"{sum(scores) / len(scores):.4g} ({run}); baseline mean {result.mean('baseline'):.4g}"),
            ("decoding", gen.config.describe()),
            ("intervention", gen.intervention),
            ("worst", worst),
            (
                "expected",
                f"{'pass rate' if on == 'rate' else 'Wilson lower bound'} >= {min_rate:g}, measured {value:.3f}",
            ),
        ],
        "read the worst continuations above against the prompts; a different bound or intervention may be the claim that holds",
    )
