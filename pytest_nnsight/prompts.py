"""Prompts and positions: what the model reads and which tokens a position names. Standard library only.

A position is an int (negative counts from the end), "last", a slice, a list of ints, a word of the
prompt ("France") or a template slot ("{country}") of a `Prompt`; each resolves to token indices here,
before any forward pass, so a bad one fails with the prompt's tokenization in the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import PositionError

Position = Any  # int | str | slice | Sequence[int]


def tokens_of(model: Any, prompt: str) -> list[str]:
    """The tokens the model sees for `prompt` (special tokens included), as strings."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise PositionError("this model has no tokenizer, so positions can only be ints or slices")
    ids = list(prompt.ids) if isinstance(prompt, TokenPrompt) else tok(prompt)["input_ids"]
    return Tokens(tok.convert_ids_to_tokens(ids), normalizer_of(tok))


class Tokens(list):
    """A prompt's tokens, carrying the tokenizer's normalizer so a position word is matched as the tokenizer sees it."""

    def __init__(self, tokens: Any, normalize: Any = None) -> None:
        super().__init__(tokens)
        self.normalize = normalize


def normalizer_of(tok: Any) -> Any:
    """The tokenizer's own text normalizer (lowercasing, accent stripping for uncased BERT/MiniLM), or None."""
    norm = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
    return None if norm is None else norm.normalize_str


def show_tokens(tokens: Sequence[str]) -> str:
    return " ".join(f"{i}:{t}" for i, t in enumerate(tokens))


def _word(tok: str) -> str:
    return re.sub(r"^(Ġ|▁|##)", "", tok).strip()


SLOT_RE = re.compile(r"^\{(\w+)\}$")


def resolve_position(
    tokens: Sequence[str], position: Position, *, prompt: str = "", slots: Mapping[str, str] | None = None
) -> list[int]:
    """Token indices (non-negative) that `position` names in a prompt tokenized as `tokens`.

    Accepts an int (negative counts from the end), "last", a slice, a list of ints, a word of the
    prompt ("France", matched on whole tokens, possibly several in a row) or a template slot
    ("{country}", given `slots`).
    """
    n = len(tokens)
    where = f"in prompt {prompt!r} tokenized as [{show_tokens(tokens)}]"
    if isinstance(position, bool):
        raise PositionError(
            f"position {position!r} is a bool: expected an int, 'last', a slice, a word or a '{{slot}}'"
        )
    if isinstance(position, int):
        if not -n <= position < n:
            raise PositionError(f"position {position} is out of range {where}: valid 0..{n - 1} or -{n}..-1")
        return [position % n]
    if isinstance(position, slice):
        picked = list(range(n))[position]
        if not picked:
            raise PositionError(f"position slice {position} selects no token {where}")
        return picked
    if (
        isinstance(position, (list, tuple))
        and position
        and all(isinstance(p, int) and not isinstance(p, bool) for p in position)
    ):
        return sorted({resolve_position(tokens, p, prompt=prompt)[0] for p in position})
    if isinstance(position, str):
        if position == "last":
            return [n - 1]
        slot = SLOT_RE.match(position)
        if slot:
            name = slot.group(1)
            if not slots or name not in slots:
                known = ", ".join("{" + s + "}" for s in (slots or {})) or "none (plain prompt strings carry no slots)"
                raise PositionError(
                    f"position {position!r} names a template slot this prompt does not have; its slots: {known}"
                )
            return resolve_position(tokens, slots[name], prompt=prompt)
        return _find_word(tokens, position, where)
    raise PositionError(
        f"position {position!r} ({type(position).__name__}) is not an int, 'last', a slice, a list of ints, a word or a '{{slot}}'"
    )


def _find_word(tokens: Sequence[str], word: str, where: str) -> list[int]:
    target = word.strip()
    spans = _spans(tokens, target)
    normalize = getattr(tokens, "normalize", None)
    if (
        not spans and normalize is not None and normalize(target) != target
    ):  # an uncased tokenizer reads 'Paris' as 'paris'
        spans = _spans(tokens, normalize(target))
    if not spans:
        raise PositionError(f"word {word!r} does not occur as whole tokens {where}")
    if len(spans) > 1:
        raise PositionError(
            f"word {word!r} is ambiguous: it occurs at {[s[0] for s in spans]} {where}; give an int position instead"
        )
    return spans[0]


def _spans(tokens: Sequence[str], target: str) -> list[list[int]]:
    words = [_word(t) for t in tokens]
    spans = []
    for start in range(len(tokens)):
        text = ""
        for end in range(start, len(tokens)):
            text += words[end]
            if text == target.replace(" ", ""):
                spans.append(list(range(start, end + 1)))
                break
            if not target.replace(" ", "").startswith(text):
                break
    return spans


def describe_positions(tokens: Sequence[str], positions: Sequence[int]) -> str:
    return ", ".join(f"{p} {tokens[p]!r}" for p in positions)


@dataclass(frozen=True)
class Prompt:
    """A prompt with the words filling its template slots, so positions like '{country}' resolve."""

    text: str
    slots: Mapping[str, str]

    def __str__(self) -> str:
        return self.text


def text_of(prompt: Any) -> str:
    if isinstance(prompt, Prompt):
        return prompt.text
    if isinstance(prompt, Mapping) and "input_ids" in prompt:  # a BatchEncoding / dict of tensors: token ids as given
        return token_prompt(None, prompt)
    if not isinstance(prompt, str):
        raise PositionError(f"prompt {prompt!r} is not a string: expected a str (or a Prompt with slots)")
    if not prompt.strip():
        raise PositionError(f"prompt {prompt!r} is empty: expected text the model can read")
    return prompt


class TokenPrompt(str):
    """A prompt given as token ids (a BatchEncoding or a dict of tensors): the str is the decoded text, for messages only."""

    ids: tuple[int, ...]

    def __new__(cls, text: str, ids: Sequence[int]) -> "TokenPrompt":
        obj = super().__new__(cls, text)
        obj.ids = tuple(int(i) for i in ids)
        return obj

    def __reduce__(self) -> Any:
        return (TokenPrompt, (str(self), self.ids))


def token_prompt(model: Any, encoding: Mapping[str, Any]) -> TokenPrompt:
    """A TokenPrompt from `{'input_ids': [T] or [1, T], 'attention_mask': ...}`; only its real (mask 1) tokens are kept."""
    ids = encoding.get("input_ids")
    if ids is None:
        raise PositionError(
            f"a prompt given as a mapping needs 'input_ids' (a BatchEncoding or a dict of tensors); it has {', '.join(map(str, encoding))}"
        )
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    mask = encoding.get("attention_mask")
    mask = mask.tolist() if hasattr(mask, "tolist") else mask
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise PositionError(
                f"a prompt given as token ids holds {len(ids)} rows: pass one prompt (shape [1, T] or [T]) per prompt"
            )
        ids, mask = ids[0], (mask[0] if mask is not None else None)
    if mask is not None:
        ids = [i for i, keep in zip(ids, mask) if keep]
    if not ids:
        raise PositionError("a prompt given as token ids is empty: expected at least one real token")
    tok = getattr(model, "tokenizer", None) if model is not None else None
    text = tok.decode(ids) if tok is not None else "<token ids " + " ".join(map(str, ids)) + ">"
    return TokenPrompt(text, ids)


def slots_of(prompt: Any) -> Mapping[str, str] | None:
    return prompt.slots if isinstance(prompt, Prompt) else None


def check_context(model: Any, tokens: Sequence[str], prompt: str) -> None:
    limit = getattr(getattr(getattr(model, "_module", model), "config", None), "n_positions", None) or getattr(
        getattr(getattr(model, "_module", model), "config", None), "max_position_embeddings", None
    )
    if limit and len(tokens) > limit:
        raise PositionError(
            f"prompt {prompt[:60]!r}... is {len(tokens)} tokens, longer than the model's context of {limit}"
        )


def pair_positions(model: Any, clean: Any, corrupt: Any, position: Any) -> tuple[list[str], list[str], list[int]]:
    """Tokenize both prompts, check they line up, and resolve `position` to the same indices in both."""
    ct, xt = tokens_of(model, text_of(clean)), tokens_of(model, text_of(corrupt))
    check_context(model, ct, text_of(clean))
    both = f"\n  clean:   [{show_tokens(ct)}]\n  corrupt: [{show_tokens(xt)}]"
    if len(ct) != len(xt):
        raise PositionError(
            f"clean and corrupt prompts tokenize to different lengths ({len(ct)} vs {len(xt)}), so positions do not line up:{both}"
        )
    try:
        pos = resolve_position(ct, position, prompt=text_of(clean), slots=slots_of(clean))
    except PositionError as exc:
        try:  # a word of the corrupt prompt ('Germany') names the same position
            if not (isinstance(position, str) and position != "last" and not position.startswith("{")):
                raise
            pos = resolve_position(xt, position, prompt=text_of(corrupt))
        except PositionError:
            raise PositionError(f"{exc}{both}") from None
    if slots_of(corrupt) is not None and isinstance(position, str) and position.startswith("{"):
        other = resolve_position(xt, position, prompt=text_of(corrupt), slots=slots_of(corrupt))
        if other != pos:
            raise PositionError(
                f"slot {position} sits at {pos} in the clean prompt but at {other} in the corrupt one:{both}"
            )
    return ct, xt, pos
