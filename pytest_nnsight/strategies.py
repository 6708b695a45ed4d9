"""Hypothesis strategies for prompt variants: filled templates, counterfactual pairs, filler prefixes.

Every argument is checked when the strategy is built (a `ValueError` naming the argument), and
counterfactual pairs are matched against the tokenizer once, eagerly: generation never filters,
so hypothesis health checks do not trip on unmatched words.

>>> from pytest_nnsight.wordlists import CAPITALS, CAPITAL_TEMPLATES          # doctest: +SKIP
>>> @given(pair=counterfactual_pairs(model, CAPITAL_TEMPLATES, {"country": CAPITALS}))  # doctest: +SKIP
... def test_capital(model, pair): ...
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from hypothesis import strategies as st

from .errors import StrategyError
from .prompts import Prompt
from .settings import register_hypothesis_profiles

register_hypothesis_profiles()  # so settings.load_profile("nnsight-ci") works once strategies are imported

SLOT = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class CounterfactualPair:
    """Clean and corrupt prompts differing only in one slot; same token length, slot at the same position."""

    clean: Prompt
    corrupt: Prompt
    answer: str  # the clean prompt's expected answer
    distractor: str  # the corrupt prompt's answer
    template: str

    def __repr__(self) -> str:
        return (
            f"CounterfactualPair({self.clean.text!r} -> {self.answer!r} | {self.corrupt.text!r} -> {self.distractor!r})"
        )


class Slots(dict):
    """A prompt's slot values; hashable (never mutated after the Prompt is built), so pairs can be deduplicated."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def slots_in(template: str) -> list[str]:
    """The slot names of a template, in order of first appearance."""
    return list(dict.fromkeys(SLOT.findall(template)))


def fill(template: str, values: Mapping[str, str]) -> Prompt:
    """The template with every `{slot}` replaced by `values[slot]`, as a Prompt carrying its slots."""
    text = SLOT.sub(lambda m: values[m.group(1)], template)
    return Prompt(text, Slots(values))


def _templates(templates: Any, name: str = "templates") -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = [templates]
    if not isinstance(templates, Sequence) or not templates:
        raise StrategyError(
            f"{name}={templates!r}: expected a non-empty list of template strings like 'The capital of {{country}} is'"
        )
    for t in templates:
        if not isinstance(t, str) or not t.strip():
            raise StrategyError(f"{name} contains {t!r}: every template must be a non-empty string")
    return tuple(templates)


def _word_list(slot: str, words: Any) -> tuple[str, ...]:
    if isinstance(words, Mapping):
        words = list(words)
    if isinstance(words, str) or not isinstance(words, Sequence) or not words:
        raise StrategyError(
            f"word list for slot {{{slot}}} is {words!r}: expected a non-empty list of words (or a mapping word -> answer)"
        )
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise StrategyError(f"word list for slot {{{slot}}} contains {w!r}: every word must be a non-empty string")
    return tuple(dict.fromkeys(words))


def _check_slots(templates: Sequence[str], lists: Mapping[str, Any], argument: str) -> None:
    for t in templates:
        missing = [s for s in slots_in(t) if s not in lists]
        if missing:
            have = ", ".join(sorted(lists)) or "none"
            raise StrategyError(
                f"template {t!r} has slot(s) {', '.join('{' + s + '}' for s in missing)} without a word list: pass them in {argument} (given: {have})"
            )


def prompts(templates: Any, **word_lists: Any) -> st.SearchStrategy[Prompt]:
    """Prompts drawn from `templates` with each `{slot}` filled from `word_lists[slot]`.

    Shrinks toward the first template and the first word of each list, so put the simplest first.

    >>> prompts(["The capital of {country} is"], country=["France", "Spain"])   # doctest: +SKIP
    """
    ts = _templates(templates)
    _check_slots(ts, word_lists, "word_lists (keyword arguments)")
    lists = {s: _word_list(s, w) for s, w in word_lists.items()}

    def one(template: str) -> st.SearchStrategy[Prompt]:
        return st.fixed_dictionaries({s: st.sampled_from(lists[s]) for s in slots_in(template)}).map(
            lambda v: fill(template, v)
        )

    return st.sampled_from(ts).flatmap(one)


def _tokenizer(model_or_tokenizer: Any) -> Any:
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tok is None or not callable(tok) or not hasattr(tok, "convert_ids_to_tokens"):
        raise StrategyError(
            f"model_or_tokenizer={type(model_or_tokenizer).__name__}: expected an nnsight model with a tokenizer, or a Hugging Face tokenizer"
        )
    return tok


def _slot_tokens(
    tok: Any, template: str, values: Mapping[str, str], slot: str
) -> tuple[int, tuple[int, ...], list[str]]:
    """(token count, token indices covering the slot's first occurrence, tokens) of the filled template."""
    text = fill(template, values).text
    head = template[: template.index("{" + slot + "}")]
    start = len(SLOT.sub(lambda m: values[m.group(1)], head))
    end = start + len(values[slot])
    enc = tok(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    covering = tuple(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start)
    unk = getattr(tok, "unk_token_id", None)
    tokens = tok.convert_ids_to_tokens(ids)
    if unk is not None and any(ids[i] == unk for i in covering):
        covering = ()  # an unknown word is not a usable single token
    return len(ids), covering, tokens


@dataclass(frozen=True)
class _Block:
    """The usable words of one template, grouped so any two in a group line up token for token."""

    template: str
    words: tuple[str, ...]
    partners: tuple[tuple[int, ...], ...]  # per word: indices (into words) of words with a different answer


class PairSpace:
    """Every counterfactual pair the strategy can draw, enumerable: `len(space)` and `space[i]`."""

    def __init__(
        self, blocks: Sequence[_Block], answers: Mapping[str, str], vary: str, others: Mapping[str, tuple[str, ...]]
    ):
        self.blocks, self.answers, self.vary, self.others = tuple(blocks), answers, vary, others
        self._sizes = []
        for b in self.blocks:
            rest = 1
            for s in slots_in(b.template):
                if s != vary:
                    rest *= len(others[s])
            self._sizes.append(sum(len(p) for p in b.partners) * rest)

    def __len__(self) -> int:
        return sum(self._sizes)

    def __getitem__(self, index: int) -> CounterfactualPair:
        if not 0 <= index < len(self):
            raise IndexError(index)
        for b, size in zip(self.blocks, self._sizes):  # noqa: B007  (b is the block the loop stops at)
            if index < size:
                break
            index -= size
        rest_slots = [s for s in slots_in(b.template) if s != self.vary]
        values: dict[str, str] = {}
        for s in reversed(rest_slots):
            index, k = divmod(index, len(self.others[s]))
            values[s] = self.others[s][k]
        for i, partners in enumerate(b.partners):
            if index < len(partners):
                return self.make(b, i, partners[index], values)
            index -= len(partners)
        raise IndexError(index)  # unreachable

    def make(self, block: _Block, i: int, j: int, values: Mapping[str, str]) -> CounterfactualPair:
        a, b = block.words[i], block.words[j]
        return CounterfactualPair(
            fill(block.template, {**values, self.vary: a}),
            fill(block.template, {**values, self.vary: b}),
            self.answers[a],
            self.answers[b],
            block.template,
        )

    def sample(self, n: int, seed: int = 0) -> list[CounterfactualPair]:
        """`n` distinct pairs, the same ones for the same seed; StrategyError when fewer exist."""
        if n > len(self):
            raise StrategyError(
                f"n={n} is larger than the {len(self)} distinct counterfactual pairs these templates and words give: lower n or add words/templates"
            )
        return [self[i] for i in sorted(random.Random(seed).sample(range(len(self)), n))]


def counterfactual_pairs(
    model_or_tokenizer: Any,
    templates: Any,
    words: Mapping[str, Any],
    vary: str = "country",
    *,
    answer: Callable[[str], str] | None = None,
    single_token: bool = True,
    min_words: int = 2,
) -> st.SearchStrategy[CounterfactualPair]:
    """Clean/corrupt pairs that differ only in slot `vary`, with the expected answer and distractor.

    `words` maps each slot to a list of words; the `vary` slot maps to `{word: answer}` (or a list
    plus `answer=`, a function word -> answer). Each template's words are tokenized once, here:
    words that are not one known token (`single_token=True`) are dropped for that template, the
    others grouped so every drawn pair has equal token length with the slot at the same position.
    A template with fewer than `min_words` usable words raises StrategyError naming the bad ones.

    Shrinks toward the first template, the earliest words of each list and the nearest partner,
    so the simplest failing pair is e.g. ('The capital of France is', 'The capital of Germany is').
    The strategy carries `.space`, every pair it can draw (`len(strategy.space)`, `.sample(n)`).
    """
    tok = _tokenizer(model_or_tokenizer)
    ts = _templates(templates)
    if not isinstance(words, Mapping):
        raise StrategyError(f"words={words!r}: expected a dict slot -> word list, e.g. {{'country': CAPITALS}}")
    if not isinstance(vary, str) or vary not in words:
        raise StrategyError(
            f"vary={vary!r}: expected one of the slots in words ({', '.join(map(repr, words)) or 'none given'})"
        )
    if not isinstance(min_words, int) or min_words < 2:
        raise StrategyError(f"min_words={min_words!r}: expected an int >= 2 (a pair needs two words)")
    _check_slots(ts, words, "words")
    for t in ts:
        if vary not in slots_in(t):
            raise StrategyError(f"template {t!r} has no {{{vary}}} slot, so vary={vary!r} cannot change it")
    lists = {s: _word_list(s, w) for s, w in words.items()}
    answers = _answers(words[vary], lists[vary], answer, vary)

    blocks, bad = [], {}
    for t in ts:
        others = {s: lists[s][0] for s in slots_in(t) if s != vary}
        groups: dict[tuple, list[str]] = {}
        for w in lists[vary]:
            n, covering, tokens = _slot_tokens(tok, t, {**others, vary: w}, vary)
            if not covering or (single_token and len(covering) != 1):
                what = (
                    "unknown to the tokenizer"
                    if not covering
                    else f"{len(covering)} tokens {[tokens[i] for i in covering]}"
                )
                bad.setdefault(t, []).append(f"{w!r} ({what})")
                continue
            groups.setdefault((n, covering), []).append(w)
        usable = [g for g in groups.values() if len({answers[w] for w in g}) >= 2]
        if sum(len(g) for g in usable) < min_words:
            why = "; ".join(bad.get(t, [])) or "the usable words share one answer or tokenize to different lengths"
            raise StrategyError(
                f"template {t!r}: only {sum(len(g) for g in groups.values())} of {len(lists[vary])} words for {{{vary}}} tokenize "
                f"usably and {sum(len(g) for g in usable)} can form pairs (need {min_words}); words that tokenize badly: {why}. Use words that are single tokens of this tokenizer "
                "(GPT-2 style: mind the leading space) or pass single_token=False"
            )
        for g in usable:
            partners = tuple(tuple(j for j in range(len(g)) if answers[g[j]] != answers[g[i]]) for i in range(len(g)))
            blocks.append(_Block(t, tuple(g), partners))
    space = PairSpace(blocks, answers, vary, {s: v for s, v in lists.items() if s != vary})

    @st.composite
    def draw_pair(draw: Any) -> CounterfactualPair:
        block = draw(st.sampled_from(space.blocks))
        i = draw(st.integers(0, len(block.words) - 1))
        j = draw(st.sampled_from(block.partners[i]))
        values = {s: draw(st.sampled_from(space.others[s])) for s in slots_in(block.template) if s != vary}
        return space.make(block, i, j, values)

    strategy = draw_pair()
    strategy.space = space  # type: ignore[attr-defined]
    return strategy


def _answers(given: Any, words: Sequence[str], answer: Callable[[str], str] | None, vary: str) -> dict[str, str]:
    if isinstance(given, Mapping) and answer is None:
        out = dict(given)
    elif answer is not None:
        if not callable(answer):
            raise StrategyError(f"answer={answer!r}: expected a function word -> answer")
        out = {}
        for w in words:
            try:
                out[w] = answer(w)
            except Exception as exc:
                raise StrategyError(
                    f"answer function {getattr(answer, '__name__', answer)!r} failed for {vary} word {w!r}: {type(exc).__name__}: {exc}"
                ) from exc
    else:
        raise StrategyError(
            f"words[{vary!r}] is a list without answers: pass a mapping word -> answer (e.g. CAPITALS) or answer=function"
        )
    for w, a in out.items():
        if not isinstance(a, str) or not a.strip():
            raise StrategyError(f"the answer for {vary} word {w!r} is {a!r}: expected a non-empty string")
    return out


def fillers(words: Sequence[str] | None = None, *, max_words: int = 1, cased: bool = False) -> st.SearchStrategy[str]:
    """Filler prefixes: 1..max_words entries of `words` (default: the bundled model's CAPITAL_FILLERS) joined by spaces.

    `cased=True` also draws the casing of each filler (as is, lower, upper). Shrinks toward one
    filler, the first of the list, as written.
    """
    from .wordlists import CAPITAL_FILLERS

    pool = _word_list("filler", list(CAPITAL_FILLERS) if words is None else words)
    if not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1:
        raise StrategyError(f"max_words={max_words!r}: expected an int >= 1")
    one = st.sampled_from(pool)
    if cased:
        one = st.tuples(one, st.sampled_from((str, str.lower, str.upper))).map(lambda x: x[1](x[0]))
    return st.lists(one, min_size=1, max_size=max_words).map(" ".join)


def with_filler(prompt: Prompt, filler: str) -> Prompt:
    """`prompt` with `filler` prepended (slots kept, so '{country}' still resolves)."""
    return Prompt(f"{filler} {prompt.text}" if filler else prompt.text, Slots(prompt.slots))


def perturbed_pairs(
    pairs: st.SearchStrategy[CounterfactualPair], prefixes: st.SearchStrategy[str] | None = None
) -> st.SearchStrategy[tuple[CounterfactualPair, CounterfactualPair]]:
    """(pair, the same pair with one filler prefix on both prompts): for claims that fillers change nothing.

    Shrinks as `pairs` and `prefixes` do.
    """
    prefixes = fillers() if prefixes is None else prefixes

    def add(args: tuple[CounterfactualPair, str]) -> tuple[CounterfactualPair, CounterfactualPair]:
        p, f = args
        return p, CounterfactualPair(
            with_filler(p.clean, f), with_filler(p.corrupt, f), p.answer, p.distractor, p.template
        )

    return st.tuples(pairs, prefixes).map(add)
