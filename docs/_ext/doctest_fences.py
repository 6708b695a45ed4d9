"""A griffe extension for the API reference: `>>>` examples in a docstring's text become pycon code blocks.

The package's docstrings carry short `>>>` examples outside a Google "Examples:" section; markdown
would read their `>` as nested quotes. Each run of `>>>` / `...` lines, with the output lines right
after it, is fenced as ```pycon and its `# doctest:` flags dropped. Loaded by mkdocs.yml.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

FLAG = re.compile(r"\s*#\s*doctest:.*$")


def fence(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    in_code = False
    while i < len(lines):
        stripped = lines[i].lstrip()
        if stripped.startswith("```"):
            in_code = not in_code
        if in_code or not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(FLAG.sub("", lines[i][len(indent) :]))
            i += 1
        out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        stack: list[Any] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias:
                continue
            doc = obj.docstring
            if doc is not None and ">>>" in doc.value and "Examples:" not in doc.value:
                doc.value = fence(doc.value)
            stack.extend(obj.members.values())
