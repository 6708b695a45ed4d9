"""Word lists and templates shipped for the strategies, so a test starts without writing any.

`CAPITALS`, `CAPITAL_TEMPLATES` and `HELD_OUT_TEMPLATES` are read from the bundled capitals model's
manifest (the words it was trained on: every one a single token of its tokenizer). `FIRST_NAMES`
are common English first names for indirect-object-style prompts on GPT-2-style tokenizers.
Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

_MANIFEST = Path(__file__).resolve().parent / "bundled" / "capitals" / "manifest.json"


def _task() -> dict:
    return json.loads(_MANIFEST.read_text(encoding="utf-8"))["task"]


_TASK = _task()

#: country -> capital, the 48 pairs the bundled capitals model was trained on (manifest order).
CAPITALS: Mapping[str, str] = MappingProxyType(dict(_TASK["capitals"]))

#: The 8 templates (slot `{country}`) the bundled capitals model was trained on.
CAPITAL_TEMPLATES: tuple[str, ...] = tuple(_TASK["templates"])

#: 2 templates held out from training: the model only partly generalises to them.
HELD_OUT_TEMPLATES: tuple[str, ...] = tuple(_TASK["held_out_templates"])

#: Filler prefixes made of the bundled model's vocabulary, for invariance claims. These keep the
#: bundled model's answer on the trained templates; "My friend says" and "We flew to" do not always.
CAPITAL_FILLERS: tuple[str, ...] = (
    "I read that",
    "Everyone knows that",
    "As everyone knows ,",
    "Q :",
)

#: Common English first names (each a single token, with its leading space, for GPT-2's tokenizer).
FIRST_NAMES: tuple[str, ...] = (
    "Mary",
    "John",
    "James",
    "Anna",
    "David",
    "Sarah",
    "Michael",
    "Laura",
    "Paul",
    "Emma",
    "Mark",
    "Lisa",
    "Peter",
    "Kate",
    "Tom",
    "Alice",
    "Daniel",
    "Rachel",
    "Chris",
    "Jessica",
)

#: Templates for indirect-object identification with two name slots.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {a} and {b} went to the store , {b} gave a drink to",
    "After {a} and {b} met at the park , {b} handed a book to",
)
