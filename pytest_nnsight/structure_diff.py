"""Explain how two recorded model structures differ, in the terms of the code that reads them.

Each rule turns one transition into a line naming the module and the consequence: a tuple output
that became a tensor (`.output[0]` now selects batch row 0, hazards H1/H2), a shape or dtype
change, attention weights no longer returned, a module renamed, removed, added or run twice (H7),
the call order, the tokenizer's padding side (H4/H5/H6) and keys (H7), the attention
implementation. Lines about numbered modules with the same change collapse to `transformer.h.*`.
Standard library only.
"""

from __future__ import annotations

from typing import Any

from .structure import expand, generalize, parse_tensor, render

ORDER_HINT = "inside one trace nnsight (0.5+) requires reading modules in execution order, so code written in the old order raises OutOfOrderError"


def _kind(spec: Any) -> str:
    if spec is None:
        return "none"
    if parse_tensor(spec) is not None:
        return "tensor"
    if isinstance(spec, dict) and len(spec) == 1:
        body = next(iter(spec.values()))
        return "sequence" if isinstance(body, list) else "mapping" if isinstance(body, dict) else "object"
    return "object"


def _body(spec: Any) -> Any:
    return next(iter(spec.values()))


def _tensor_change(where: str, old: str, new: str) -> list[str]:
    (od, ot), (nd, nt) = parse_tensor(old), parse_tensor(new)  # type: ignore[misc]
    out = []
    if od != nd:
        what = f"{where} shape changed from [{','.join(od)}] to [{','.join(nd)}]"
        if len(od) != len(nd):
            out.append(
                f"{what}; it has {len(nd)} dimensions instead of {len(od)}, so indexing like .{where}[:, pos, :] reads or writes other axes"
            )
        elif [d for d in od if not d.isdigit()] != [d for d in nd if not d.isdigit()]:
            out.append(f"{what}; the batch/sequence axes moved, so .{where}[:, pos] indexes another axis")
        else:
            out.append(f"{what}; saved values, patches and steering vectors of the old width no longer fit")
    if ot != nt:
        out.append(
            f"{where} dtype changed from {ot} to {nt}; numbers move at {nt} precision and the snapshot tolerance by dtype changes"
        )
    return out


def explain_value(where: str, old: Any, new: Any) -> list[str]:
    """Why code reading `.output`/`.input` breaks when its spec goes from `old` to `new` (empty when equal)."""
    if old == new:
        return []
    ko, kn = _kind(old), _kind(new)
    ro, rn = render(old, short=True), render(new, short=True)
    if ko == "sequence" and kn == "tensor":
        first = _body(old)[0] if _body(old) else None
        dims = (parse_tensor(new) or ([], ""))[0]
        row = "batch row 0" if dims[:1] == ["b"] else "the first slice along dimension 0"
        what = "the hidden states" if _kind(first) == "tensor" else f"element 0 ({render(first, short=True)})"
        line = (
            f"{where} changed from {ro} to {rn}; code that reads .{where}[0] now selects {row} instead of {what}"
            f", and writes to .{where}[0] change only {row} (H1/H2)"
        )
        return [line]
    if ko == "tensor" and kn == "sequence":
        return [
            f"{where} changed from {ro} to {rn}; code that indexes .{where}[:, pos] now fails on a {next(iter(new))} "
            f"(TypeError), and .{where}[0] now means element 0 ({render(_body(new)[0] if _body(new) else None, short=True)}), not batch row 0 (H1/H3)"
        ]
    if ko == kn == "tensor":
        return _tensor_change(where, old, new)
    if ko == kn == "sequence":
        a, b = _body(old), _body(new)
        out = []
        if next(iter(old)) != next(iter(new)):
            out.append(f"{where} container changed from {next(iter(old))} to {next(iter(new))}")
        if len(a) != len(b):
            out.append(
                f"{where} now has {len(b)} elements (was {len(a)}): {render(old)} -> {render(new)}; "
                f"code that unpacks it or reads .{where}[{min(len(a), len(b))}] breaks"
            )
        for i, (x, y) in enumerate(zip(a, b)):
            if x == y:
                continue
            if y is None and _kind(x) == "tensor":
                out.append(
                    f"{where}[{i}] is now None (was {render(x, short=True)}); code that reads it (e.g. attention weights) gets None"
                )
            elif x is None:
                out.append(f"{where}[{i}] is now {render(y, short=True)} (was None)")
            else:
                out += explain_value(f"{where}[{i}]", x, y)
        return out
    if ko == kn == "mapping":
        a, b = _body(old), _body(new)
        out = []
        if next(iter(old)) != next(iter(new)):
            out.append(f"{where} class changed from {next(iter(old))} to {next(iter(new))}")
        gone, added = [k for k in a if k not in b], [k for k in b if k not in a]
        if gone:
            now = f" (it now has {', '.join(added)})" if added else ""
            out.append(
                f"{where} no longer has {', '.join(gone)}{now}; code that reads .{where}.{gone[0]} may fail, get None, or rely on a deprecated alias"
            )
        elif added:
            out.append(f"{where} now also has {', '.join(added)}")
        for k in a:
            if k in b and a[k] != b[k]:
                out += explain_value(f"{where}.{k}", a[k], b[k])
        return out
    return [f"{where} changed from {render(old, short=True)} to {render(new, short=True)}"]


def _module_changes(path: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    if old.get("class") != new.get("class"):
        out.append(f"class changed from {old.get('class')} to {new.get('class')}")
    co, cn = old.get("calls", 0), new.get("calls", 0)
    if co != cn:
        if cn == 0:
            out.append(
                f"no longer runs in the forward pass (ran {co}x); reading its .output in a trace raises OutOfOrderError (0.8) / MissedProviderError (0.7)"
            )
        elif co == 0:
            out.append(f"now runs in the forward pass ({cn}x; it did not before)")
        else:
            out.append(
                f"now runs {cn} times per forward (was {co}); .output sees the first call only, and an extra input through it "
                "(e.g. token_type_ids through wte, H7) changes the numbers with identical weights"
            )
    if co and cn:
        out += explain_value("output", old.get("output"), new.get("output"))
        out += explain_value("input", old.get("input"), new.get("input"))
        if old.get("signature") != new.get("signature"):
            out.append(
                f"call signature changed: {_signature_change(old.get('signature'), new.get('signature'))} (.inputs[0][i] / .inputs[1][name] may read another argument)"
            )
    return out


def _signature_change(old: Any, new: Any) -> str:
    """'6 args; kwargs: a, b' -> '4 args; kwargs: b, c' as '6 -> 4 args; kwargs +c -a'."""

    def parts(sig: Any) -> tuple[str, set[str]]:
        head, _, kw = str(sig).partition("; kwargs: ")
        return head.split(" ")[0], {k.strip() for k in kw.split(",") if k.strip() and k.strip() != "-"}

    (na, ka), (nb, kb) = parts(old), parts(new)
    out = [f"{na} -> {nb} args" if na != nb else f"{nb} args"]
    if ka != kb:
        out.append("kwargs " + " ".join([f"+{k}" for k in sorted(kb - ka)] + [f"-{k}" for k in sorted(ka - kb)]))
    return "; ".join(out)


# How much a line matters to code that reads the model, most first: what `.output` is (container, shape,
# dtype), a module gone, how prompts are padded and what the tokenizer feeds; then what nnsight does with
# the model; then the rest; call signatures (noise to most code) last.
_RANK = (
    (0, ("now selects", "now fails on a", "container changed", "is now None")),
    (1, (" shape changed", " dtype changed", "module removed", "renamed to", "no longer runs")),
    (
        2,
        (
            "tokenizer: padding side",
            "tokenizer: pad token",
            "tokenizer: now returns",
            "tokenizer: no longer returns",
            "nnsight:",
        ),
    ),
    (9, ("call signature changed",)),
)


def explain_semantics(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed in nnsight's own handling of the model (`semantics.probe`), in the terms of raw trace code."""
    from .semantics import DIFFERS, SAME

    lines: list[str] = []
    po, pn = old.get("padding"), new.get("padding")
    if po != pn and po is not None and pn is not None:
        if pn == DIFFERS:
            lines.append(
                "nnsight: in a padded batch, model.trace([short, long]), the short row's last-position logits now differ from "
                "the same prompt alone (nnsight < 0.8 adds no position_ids under left padding; right padding puts a pad "
                "last), so batched raw traces give other numbers than single ones (H4/H5); the plugin's own verbs correct it"
            )
        elif pn == SAME:
            lines.append(
                f"nnsight: in a padded batch the short row's last-position logits are now the same as the prompt alone ({po} "
                "before; nnsight 0.8 adds position_ids), so numbers recorded from batched raw traces move (H4)"
            )
        else:
            lines.append(f"nnsight: the padding probe now gives {pn} (was {po})")
    bo, bn = old.get("block_output"), new.get("block_output")
    where = new.get("block") or old.get("block") or "the first block"
    if bo != bn and bo is not None and bn is not None:
        for text in explain_value("output", bo, bn):
            lines.append(f"nnsight: inside a trace, {where}.{text}")
    go, gn = old.get("gradient"), new.get("gradient")
    if go != gn and go is not None and gn is not None:
        lines.append(
            f"nnsight: gradients at {where} inside `with loss.backward():` are now {gn} (were {go}); "
            "code that reads .grad there gets another value or an error (H8)"
        )
    return lines


def rank(line: str) -> int:
    """The position class of an explanation line (0 = read first); lines keep their order within a class."""
    for value, marks in _RANK:
        if any(m in line for m in marks):
            return value
    return 5


def _collapse_lines(lines: list[tuple[str, str]], paths: set[str]) -> list[str]:
    """`(path, text)` pairs -> lines; a text shared by every numbered sibling prints once as `h.*`."""
    by_group: dict[tuple[str, str], list[str]] = {}
    for path, text in lines:
        by_group.setdefault((generalize(path), text), []).append(path)
    siblings: dict[str, set[str]] = {}
    for p in paths:
        siblings.setdefault(generalize(p), set()).add(p)
    out, done = [], set()
    for path, text in lines:
        g = generalize(path)
        members = by_group[(g, text)]
        if g != path and len(members) > 1 and set(members) == siblings.get(g, set()):
            if (g, text) not in done:
                done.add((g, text))
                out.append(f"{g}: {text}")
        else:
            out.append(f"{path}: {text}")
    return out


def explain(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every difference between two structure records, one line each, naming the module and the consequence."""
    lines: list[str] = []
    to, tn = old.get("tokenizer") or {}, new.get("tokenizer") or {}
    if to.get("padding_side") != tn.get("padding_side"):
        side = tn.get("padding_side")
        why = (
            (
                "shorter prompts in a batch now end with pad tokens, so position -1 / 'last' reads a pad and batched results "
                "differ from single-prompt runs (H4/H5)"
            )
            if side == "right"
            else (
                "shorter prompts in a batch now start with pad tokens, so a fixed position (output[:, 2]) points at another "
                "token in shorter rows (H6)"
            )
        )
        lines.append(f"tokenizer: padding side changed from {to.get('padding_side')} to {side}; {why}")
    if to.get("pad_token") != tn.get("pad_token"):
        lines.append(
            f"tokenizer: pad token changed from {to.get('pad_token')!r} to {tn.get('pad_token')!r}; padded batches feed other ids"
        )
    ko, kn = list(to.get("keys") or []), list(tn.get("keys") or [])
    for key in (k for k in kn if k not in ko):
        extra = (
            (
                "; GPT-2-style models embed them with wte and add them, so logits change with identical weights (H7); "
                "pin tokenizer.model_input_names = ['input_ids', 'attention_mask']"
            )
            if key == "token_type_ids"
            else "; the model receives another input"
        )
        lines.append(f"tokenizer: now returns {key}{extra}")
    for key in (k for k in ko if k not in kn):
        lines.append(f"tokenizer: no longer returns {key}; the model no longer receives it")
    ao, an = old.get("attention") or {}, new.get("attention") or {}
    if ao.get("implementation") != an.get("implementation"):
        lines.append(
            f"attention: implementation changed from {ao.get('implementation')!r} to {an.get('implementation')!r}; "
            "numbers move at float tolerance, and only eager attention returns weights"
        )
    wo, wn = str(ao.get("weights")), str(an.get("weights"))
    if wo != wn:
        if wo.startswith("materialized") and wn.startswith("not materialized"):
            lines.append(
                f"attention: weights are no longer materialized: {wn}; code that reads patterns from "
                "attn.output[1] or model.output.attentions gets None or an empty tuple (load with attn_implementation='eager')"
            )
        elif wo.startswith("not materialized") and wn.startswith("not materialized"):
            cut = len("not materialized (output_attentions=True returns ")
            lines.append(
                f"attention: still no weights, but output_attentions=True now returns {wn[cut:-1]} (was {wo[cut:-1]}); "
                "code that indexes model.output.attentions gets another error or None"
            )
        else:
            lines.append(f"attention: weights changed from {wo} to {wn}")
    mo, mn = expand(old.get("modules") or {}), expand(new.get("modules") or {})
    gone, added = [p for p in mo if p not in mn], [p for p in mn if p not in mo]
    per_module: list[tuple[str, str]] = []
    for p in list(gone):
        twin = next(
            (
                q
                for q in added
                if mn[q].get("class") == mo[p].get("class")
                and mn[q].get("output") == mo[p].get("output")
                and q.rpartition(".")[0] == p.rpartition(".")[0]
            ),
            None,
        )
        if twin is not None:
            added.remove(twin)
            gone.remove(p)
            per_module.append(
                (
                    p,
                    f"renamed to {twin} ({mo[p].get('class')}); code that reads model.{p} now fails with AttributeError: use {twin}",
                )
            )
    for p in gone:
        per_module.append(
            (p, f"module removed (was {mo[p].get('class')}); code that reads model.{p} now fails with AttributeError")
        )
    for p in added:
        per_module.append((p, f"new module ({mn[p].get('class')}, runs {mn[p].get('calls', 0)}x)"))
    for p in mo:
        if p in mn and mo[p] != mn[p]:
            per_module += [(p, text) for text in _module_changes(p, mo[p], mn[p])]
    module_lines = _collapse_lines(per_module, set(mo) | set(mn))
    lines += module_lines
    co, cn = old.get("call_order") or [], new.get("call_order") or []
    common_o, common_n = [p for p in co if p in cn], [p for p in cn if p in co]
    if common_o != common_n:
        first = next(i for i, (a, b) in enumerate(zip(common_o, common_n)) if a != b)
        lines.append(f"call order changed: {common_n[first]} now runs before {common_o[first]}; {ORDER_HINT}")
    lines += explain_semantics(old.get("nnsight") or {}, new.get("nnsight") or {})
    return sorted(lines, key=rank)  # stable: the consequential lines first, signature noise last
