"""Compatibility notes in failures: one line naming the nnsight API change behind a known error.

`hint_for(exc)` recognises the errors that code written for another nnsight line raises
(reproduced with nnsight 0.8.1 in tests/test_hints.py; older wordings from the version notes):
a module read out of execution order or one that never ran (OutOfOrderError, MissedProviderError,
"was not provided"), `.value` on a saved result, a name saved inside a comprehension or an inner
function, or left unsaved, that does not escape the trace, and a bad layer index reported as
AttributeError (0.8). `output_index_hint` covers raw trace code: an IndexError/TypeError from a line
indexing a module's `.output`, explained by the test's model's structure record (the structure lock:
a container change seen this run, or a bare tensor where the code indexes [0]). `attach` adds the
line to a failed test's report. Standard library only: it never imports nnsight, and matches only
when nnsight is already loaded.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
from types import TracebackType
from typing import Any, Iterator

from .compat import is_not_reached
from .environment import package_version

SECTION = "pytest-nnsight hint"
TRACE_METHODS = ("trace", "generate", "session", "invoke", "scan", "edit")
_NAME_RE = re.compile(r"(?:local variable|name) '(?P<name>\w+)'")
_REQUESTED_RE = re.compile(r"'(?:model\.)?(?P<path>[\w.]+?)\.(?P<part>output|input|inputs)(?:\.i\d+)?'")


def versions() -> str:
    return f"installed nnsight {package_version('nnsight')}, transformers {package_version('transformers')}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _frames(tb: TracebackType | None) -> list[Any]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]  # innermost first


def _is_trace_with(node: ast.With) -> bool:
    for item in node.items:
        call = item.context_expr
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in TRACE_METHODS:
            return True
    return False


def _binding_in_trace(frame: Any, name: str) -> str | None:
    """How `name` is bound inside a `with model.trace(...)` block of `frame`'s function: comprehension, inner, unsaved, saved."""
    if "site-packages" in frame.f_code.co_filename:
        return None
    try:
        source = textwrap.dedent(inspect.getsource(frame.f_code))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    for block in (n for n in ast.walk(tree) if isinstance(n, ast.With) and _is_trace_with(n)):
        for stmt in block.body:
            for node in ast.walk(stmt):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    inner = {
                        t.id
                        for n in ast.walk(node)
                        if isinstance(n, ast.Assign)
                        for t in n.targets
                        if isinstance(t, ast.Name)
                    }
                    if name in inner:
                        return "inner"
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                        value = node.value
                        if isinstance(value, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                            return "comprehension"
                        saved = (
                            any(isinstance(n, ast.Attribute) and n.attr == "save" for n in ast.walk(value))
                            if value
                            else False
                        )
                        return "saved" if saved else "unsaved"
    return None


# What an unbound name's binding in the trace (`_binding_in_trace`) means; `{name}` is the name.
_UNBOUND_HINTS = {
    "comprehension": (
        "'{name}' was saved inside a comprehension in the trace, which does not escape it (nnsight 0.5+ re-executes the "
        "block; only names assigned directly in it leave): create the list before the `with` and append saved values"
    ),
    "inner": (
        "'{name}' was saved inside an inner function of the trace, which does not escape it (nnsight 0.5+): "
        "assign the saved value directly in the trace body, or append it to a list created before the `with`"
    ),
    "unsaved": (
        "'{name}' was assigned in the trace without .save(); since nnsight 0.5 only saved values survive the block "
        "(0.4 kept every proxy): add .save()"
    ),
    "saved": (
        "'{name}' is assigned in the trace but that line never ran: on nnsight 0.8 the statements after a "
        "`for ... in tracer.iter[...]` loop or an early stop do not run (H9)"
    ),
}


def _unbound_hint(exc: BaseException, tb: TracebackType | None) -> str | None:
    m = _NAME_RE.search(str(exc))
    if m is None:
        return None
    name = m.group("name")
    for frame in _frames(tb or exc.__traceback__):
        how = _binding_in_trace(frame, name)
        if how is not None:
            return _UNBOUND_HINTS[how].format(name=name)
    return None


def hint_for(exc: BaseException, tb: TracebackType | None = None) -> str | None:
    """The likely API change behind `exc` and the installed versions, as one line; None for unrelated errors."""
    if "nnsight" not in sys.modules:
        return None
    for e in _chain(exc):
        text = str(e).splitlines()[0] if str(e) else ""
        full = str(e)
        if is_not_reached(e):
            m = _REQUESTED_RE.search(full)
            what = f"{m.group('path')}.{m.group('part')}" if m else "a module's value"
            return (
                f"{SECTION}: {what} was read out of execution order inside one trace, or its module never ran in this forward "
                "(nnsight 0.5+ enforces execution order; 0.8 raises OutOfOrderError for both, 0.7 MissedProviderError): read modules "
                f"in the order the forward runs them (model_structure(model) lists it); {versions()}"
            )
        if isinstance(e, AttributeError) and "has no attribute 'value'" in text:
            return (
                f"{SECTION}: `.value` on a saved result: since nnsight 0.5 a saved value is the tensor itself after the trace "
                f"(0.4 proxies needed .value): drop `.value`; {versions()}"
            )
        if isinstance(e, AttributeError) and "'Envoy' object" in text and re.search(r"attribute '\d+'", text):
            return (
                f"{SECTION}: an index the module list does not have; nnsight 0.8 reports it as AttributeError (IndexError before 0.8, "
                f"H13): check the range with len(...); {versions()}"
            )
        if isinstance(e, NameError):
            line = _unbound_hint(e, tb if e is exc else e.__traceback__)
            if line:
                return f"{SECTION}: {line}; {versions()}"
    return None


_OUTPUT_INDEX_RE = re.compile(r"\.output\s*\[")
_OUTPUT_ZERO_RE = re.compile(r"\.output\s*\[\s*0\s*\]")


def _source_lines(exc: BaseException, tb: TracebackType | None) -> list[str]:
    """The source lines of the user's frames in the traceback (innermost first) and the error's own text."""
    import linecache

    out = []
    for frame_tb in _frames_tb(tb or exc.__traceback__):
        code = frame_tb.tb_frame.f_code
        if "site-packages" in code.co_filename or "/pytest_nnsight/" in code.co_filename.replace("\\", "/"):
            continue
        line = linecache.getline(code.co_filename, frame_tb.tb_lineno).strip()
        if line:
            out.append(line)
    return out + str(exc).splitlines()


def _frames_tb(tb: TracebackType | None) -> list[TracebackType]:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next
    return out[::-1]


def output_index_hint(exc: BaseException, tb: TracebackType | None, models: list[str]) -> str | None:
    """An IndexError/TypeError from indexing a module's `.output` in a trace, for a model whose structure record shows
    the output container changed this run (the structure lock), or is a bare tensor where the code indexes [0] (H1-H3)."""
    from . import structure_lock
    from .structure import parse_tensor, render

    errors = [e for e in _chain(exc) if isinstance(e, (IndexError, TypeError))]
    if not errors:
        return None
    lines = _source_lines(exc, tb)
    if not any(_OUTPUT_INDEX_RE.search(ln) for ln in lines):
        return None
    changed = structure_lock.changed_models()
    for label in models:
        verdict = changed.get(label)
        container = [
            ln
            for ln in (verdict.lines if verdict else [])
            if any(m in ln for m in ("now selects", "now fails on a", "container changed"))
        ]
        if container:
            after = f" after {', '.join(verdict.changes)}" if verdict.changes else ""
            return (
                f"{SECTION}: this code indexes a module's .output, and the structure of {label} changed{after}: "
                + " | ".join(container)
                + f" (H1-H3; docs/hazards.md); {versions()}"
            )
    if not any(_OUTPUT_ZERO_RE.search(ln) for ln in lines):
        return None
    for label, record in structure_lock.records().items():
        if models and label not in models:
            continue
        for path, entry in (record.get("modules") or {}).items():
            out = entry.get("output")
            if path.endswith(".*") and parse_tensor(out) and entry.get("calls"):
                return (
                    f"{SECTION}: this code indexes .output[0], but {path} of {label} returns a bare {render(out, short=True)} "
                    f"here, not a tuple: .output[0] is batch row 0, so [0][:, pos] indexes the wrong axes (transformers 5; "
                    f"H1 in docs/hazards.md): index .output directly; {versions()}"
                )
    return None


def attach(report: Any, call: Any, item: Any = None) -> None:
    """Add the hint to a failed test's report as its own section (it travels with the report through xdist)."""
    excinfo = getattr(call, "excinfo", None)
    if excinfo is None or not getattr(report, "failed", False) or report.when not in ("setup", "call"):
        return
    try:
        line = hint_for(excinfo.value, excinfo.tb)
        if line is None and item is not None:
            from .structure_lock import models_of

            line = output_index_hint(excinfo.value, excinfo.tb, models_of(item))
    except Exception:  # noqa: BLE001 - a hint must never break the report
        return
    longrepr = getattr(report, "longrepr", None)
    if line and hasattr(longrepr, "addsection"):
        longrepr.addsection(SECTION, line)


compatibility_hint = hint_for  # the public name (pytest_nnsight.compatibility_hint)
