"""Where to intervene: sites (a module's output or input, a named component, one attention head) and positions.

A site is resolved once against the model (so a bad path or layer fails before any forward pass)
and read or written inside a trace through `site_value`, which hides the tuple-vs-tensor change
of block outputs between transformers 4 and 5 (hazard H1).
"""

from __future__ import annotations

import difflib
import re
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import SiteError
from .families import GLOBAL_SITES, LAYER_SITES, ensure_eager, find_layout, layout_of
from .prompts import Position, describe_positions, resolve_position, show_tokens, tokens_of  # noqa: F401  (moved to prompts.py)

PARTS = ("output", "input")


@dataclass(frozen=True)
class Site:
    """A place in the model: `path` of a module (relative to the model root), its `part`, optionally one head.

    `item` picks an element of a tuple output: 0 (the hidden states) except for attention patterns (1).
    """

    path: str
    part: str = "output"
    head: int | None = None
    n_heads: int | None = None
    label: str | None = None
    item: int = 0

    def __str__(self) -> str:
        return self.label or (self.path + ("" if self.part == "output" else f":{self.part}"))


def module_of(model: Any) -> Any:
    """The torch module under an nnsight wrapper (or the module itself)."""
    return getattr(model, "_module", model)


def model_name(model: Any) -> str:
    """A readable name: the hub id, `bundled:NAME` for bundled models, or the module's class."""
    cfg = getattr(module_of(model), "config", None)
    name = getattr(cfg, "_name_or_path", "") or type(module_of(model)).__name__
    match = re.search(r"pytest_nnsight[/\\]bundled[/\\](\w+)[/\\]?$", name)
    return f"bundled:{match.group(1)}" if match else name


def n_layers(model: Any) -> int:
    """Number of layers of a model of a known family (see pytest_nnsight.families)."""
    return layout_of(model).n_layers


def _layer_index(model: Any, layer: int) -> int:
    n = n_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise SiteError(f"layer {layer!r} is not an int: expected 0..{n - 1} (or -{n}..-1)")
    if not -n <= layer < n:
        raise SiteError(
            f"layer {layer} is out of range: {model_name(model)} has {n} layers, valid 0..{n - 1} (or -{n}..-1)"
        )
    return layer % n


def _head_index(model: Any, layer: int, index: Any) -> int:
    heads = layout_of(model).n_heads
    if not isinstance(index, int) or isinstance(index, bool) or not -heads <= index < heads:
        raise SiteError(
            f"head {index!r} is out of range: layer {layer} has {heads} heads, valid 0..{heads - 1} (or -{heads}..-1)"
        )
    return index % heads


def site(model: Any, name: str, layer: int | None = None, head: int | None = None) -> Site:
    """A site of the standard vocabulary, the same on every model family.

    Per layer: resid_pre, resid_post, attn_out, mlp_out, pattern (attention weights [B, H, T, T], or
    [B, T, T] of one head), head_out (one head's output before the output projection, needs `head`).
    Global: embed, final_norm, logits. The string form `resolve_site(model, "resid_post.3")` is equivalent.

    >>> site(model, "head_out", 1, 2) == resolve_site(model, "head_out.1.2")   # doctest: +SKIP
    True
    """
    lay = layout_of(model)
    if name in GLOBAL_SITES:
        if layer is not None or head is not None:
            raise SiteError(f"site {name!r} is global: it takes no layer or head")
        path = lay.path({"embed": "embed", "final_norm": "final_norm", "logits": "lm_head"}[name])
        if path is None:
            raise SiteError(
                f"{model_name(model)} ({lay.family.name} family) has no {name} site"
                + (" (a base model without an LM head)" if name == "logits" else "")
            )
        return Site(path, label=name)
    if name not in LAYER_SITES:
        raise SiteError(
            f"unknown site name {name!r}: expected one of {', '.join(LAYER_SITES + GLOBAL_SITES)} (or a module path)"
        )
    if layer is None:
        raise SiteError(
            f"site {name!r} needs a layer: e.g. {name}.0" + (".0 (layer, head)" if name == "head_out" else "")
        )
    layer = _layer_index(model, layer)
    if name == "head_out":
        if head is None:
            raise SiteError(f"site 'head_out' needs a head: head_out.{layer}.H with H in 0..{lay.n_heads - 1}")
        h = _head_index(model, layer, head)
        return Site(
            lay.in_layer(layer, "head_proj"), part="input", head=h, n_heads=lay.n_heads, label=f"head_out.{layer}.{h}"
        )
    if name == "pattern":
        if not lay.family.returns_weights:
            raise SiteError(f"the {lay.family.name} family's attention returns no weights: no pattern site")
        if ensure_eager(model):  # the switch changes the forward pass: probe its order again
            _ORDER_CACHE.pop(module_of(model), None)
        h = None if head is None else _head_index(model, layer, head)
        return Site(
            lay.in_layer(layer, "pattern"),
            item=1,
            head=h,
            n_heads=lay.n_heads,
            label=f"pattern.{layer}" + ("" if h is None else f".{h}"),
        )
    if head is not None:
        raise SiteError(f"site {name!r} takes no head (only head_out and pattern do)")
    if name == "resid_pre":
        return Site(lay.layer(layer), part="input", label=f"resid_pre.{layer}")
    if name == "resid_post":
        return Site(lay.layer(layer), label=f"resid_post.{layer}")
    return Site(lay.in_layer(layer, "attn" if name == "attn_out" else "mlp"), label=f"{name}.{layer}")


# The short spellings of `site(...)`: the same Site, label and index rules (negative indices count from the end).


def block(model: Any, layer: int) -> Site:
    """The residual stream after block `layer` (the block's output): `site(model, "resid_post", layer)`."""
    return site(model, "resid_post", layer)


def attn_out(model: Any, layer: int) -> Site:
    """The attention output of block `layer`: `site(model, "attn_out", layer)`."""
    return site(model, "attn_out", layer)


def mlp_out(model: Any, layer: int) -> Site:
    """The MLP output of block `layer`: `site(model, "mlp_out", layer)`."""
    return site(model, "mlp_out", layer)


def head(model: Any, layer: int, index: int) -> Site:
    """One attention head's output of block `layer`, before the output projection mixes the heads:
    `site(model, "head_out", layer, index)`."""
    return site(model, "head_out", layer, index)


def embed(model: Any) -> Site:
    """The embeddings entering block 0 (token + position embeddings where the model adds them): `site(model, "embed")`."""
    return site(model, "embed")


def blocks(model: Any) -> list[Site]:
    """Every block's output, first to last: the group 'resid_post' (also spelled 'blocks')."""
    return [block(model, i) for i in range(n_layers(model))]


def _every(name: str) -> Any:
    def sites_of(model: Any) -> list[Site]:
        if name == "head_out":
            return [site(model, name, i, h) for i in range(n_layers(model)) for h in range(layout_of(model).n_heads)]
        return [site(model, name, i) for i in range(n_layers(model))]

    return sites_of


NAMED = {
    "blocks": _every("resid_post"),  # short spellings of three of the vocabulary's groups below
    "attn": _every("attn_out"),
    "mlp": _every("mlp_out"),
    **{name: _every(name) for name in ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out", "pattern")},
}
VOCAB_RE = re.compile(
    r"^(resid_pre|resid_post|attn_out|mlp_out|pattern|head_out)\.(-?\d+)(?:\.(-?\d+))?$|^(embed|final_norm|logits)$"
)


_OLD_LABEL = re.compile(r"^(block|attn|mlp) (-?\d+)$|^head (-?\d+)\.(-?\d+)$")
_OLD_NAME = {"block": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}


def renamed_label(label: str) -> str | None:
    """The vocabulary label of a row label from before the one vocabulary ('block 3' -> 'resid_post.3'), else None."""
    old = _OLD_LABEL.match(label) if isinstance(label, str) else None
    if old is None:
        return None
    if old.group(1):
        return f"{_OLD_NAME[old.group(1)]}.{old.group(2)}"
    return f"head_out.{old.group(3)}.{old.group(4)}"


def resolve_site(model: Any, spec: Any) -> Site:
    """A Site from a Site, a vocabulary name ('resid_post.3', 'head_out.1.2', 'embed'), an nnsight envoy
    (`model.transformer.h[3]`) or a path ('transformer.h.3', 'transformer.h.3:input')."""
    if isinstance(spec, Site):
        _check_path(model, spec.path)
        return spec
    path = getattr(spec, "path", None)
    if isinstance(path, str) and not isinstance(spec, str):  # an envoy
        return resolve_site(model, path.split(".", 1)[1] if path.startswith("model.") else "")
    if isinstance(spec, str):
        vocab = VOCAB_RE.match(spec.strip())
        if vocab:
            known = find_layout(model) is not None
            if (
                known or vocab.group(1) or not _path_exists(model, spec.strip())
            ):  # a raw path 'embed' still works on unknown models
                if vocab.group(4):
                    return site(model, vocab.group(4))
                return site(
                    model, vocab.group(1), int(vocab.group(2)), None if vocab.group(3) is None else int(vocab.group(3))
                )
    if not isinstance(spec, str):
        raise SiteError(
            f"site {spec!r} is not a Site, an envoy or a path string: expected e.g. 'transformer.h.0' or model.transformer.h[0]"
        )
    path, _, part = spec.partition(":")
    part = part or "output"
    if part not in PARTS:
        raise SiteError(f"site {spec!r} names part {part!r}: expected one of {', '.join(PARTS)}")
    if path.startswith("model.") and not _path_exists(
        model, path
    ):  # nnsight names the root 'model'; Llama has a child 'model'
        path = path[len("model.") :]
    if not path.strip():  # the root's output is a ModelOutput, not an activation to patch
        top = ", ".join(n for n, _ in module_of(model).named_children())
        raise SiteError(
            f"site {spec!r} names the whole model: expected a module inside it, e.g. a path under {top or 'the root'}"
        )
    _check_path(model, path)
    return Site(path, part=part)


def resolve_sites(model: Any, spec: Any) -> list[Site]:
    """A list of sites from one site, a list of them, or a named group ('blocks', 'attn', 'mlp', or a vocabulary
    name over every layer: 'resid_pre', 'resid_post', 'attn_out', 'mlp_out', 'pattern', 'head_out' (every layer x head));
    a group inside a list stands for its sites: ["embed", "resid_post"]."""
    if isinstance(spec, str) and spec in NAMED:
        return NAMED[spec](model)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise SiteError("an empty list of sites: name at least one site, or use 'blocks', 'attn' or 'mlp'")
        return unique_labels(
            [
                one
                for s in spec
                for one in (NAMED[s](model) if isinstance(s, str) and s in NAMED else [resolve_site(model, s)])
            ]
        )
    try:
        return [resolve_site(model, spec)]
    except SiteError as exc:
        if isinstance(spec, str) and not any(c in spec for c in ".:"):  # 'heads': meant a group?
            raise SiteError(f"{exc}; or a group of sites: {', '.join(NAMED)}") from None
        raise


def unique_labels(sites: list[Site]) -> list[Site]:
    """`sites`, refused when two different sites share one display label: results key their rows by label
    (effect maps, cached activations, the report), so the second would silently read as the first."""
    seen: dict[str, Site] = {}
    for s in sites:
        other = seen.setdefault(str(s), s)
        if _where(other) != _where(s):
            raise SiteError(
                f"two different sites are both labelled {str(s)!r} ({_where(other)} and {_where(s)}): results key rows by "
                "label, so one would read as the other; give them distinct labels"
            )
    return sites


def _where(s: Site) -> tuple[Any, ...]:
    return (s.path, s.part, s.head, s.item)


def _path_exists(model: Any, path: str) -> bool:
    try:
        module_of(model).get_submodule(path)
        return True
    except AttributeError:
        return False


def _check_path(model: Any, path: str) -> None:
    root = module_of(model)
    if path == "":
        return
    try:
        root.get_submodule(path)
        return
    except AttributeError:
        pass
    names = [name for name, _ in root.named_modules() if name]
    parts = path.split(".")
    for k, part in enumerate(parts):  # the first index out of range, also inside a longer path ('transformer.h.5.attn')
        if not part.isdigit() or k == 0:
            continue
        parent = ".".join(parts[:k])
        try:
            container = root.get_submodule(parent)
        except AttributeError:
            break
        if hasattr(container, "__len__") and int(part) >= len(container):  # a ModuleList/Sequential
            raise SiteError(
                f"index {part} in site {path!r} is out of range: {parent} has {len(container)} entries, valid 0..{len(container) - 1}"
            )
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
    hint = (
        f"close matches: {', '.join(close)}"
        if close
        else f"top-level modules: {', '.join(n for n in names if '.' not in n)}"
    )
    raise SiteError(f"unknown site {path!r} in {type(root).__name__}; {hint}")


def envoy_at(model: Any, path: str) -> Any:
    """The nnsight envoy at a module path (call inside a trace, in execution order)."""
    envoy = model
    for name in path.split(".") if path else ():
        if name.isdigit():
            envoy = envoy[int(name)]
        else:
            envoy = getattr(envoy, "E_output" if name == "output" and hasattr(envoy, "E_output") else name)
    return envoy


def site_value(model: Any, site: Site) -> Any:
    """Inside a trace: the tensor at `site` (a view, so writing into it patches the model)."""
    envoy = envoy_at(model, site.path)
    value = envoy.output if site.part == "output" else envoy.input
    hidden = value[site.item] if isinstance(value, tuple) else value
    if site.item == 1:  # attention weights [B, H, T, T]
        if hidden is None:
            raise SiteError(
                f"{site}: the attention module returned no weights; pattern sites switch the model to eager attention, "
                "so it was switched back or loaded with an implementation that ignores the switch"
            )
        return hidden if site.head is None else hidden[:, site.head]
    if site.head is not None:
        b, t, d = hidden.shape
        hidden = hidden.view(b, t, site.n_heads, d // site.n_heads)[:, :, site.head, :]
    return hidden


def execution_order(model: Any, sites: Iterable[Site]) -> list[Site]:
    """`sites` sorted in the order the forward pass reaches them (nnsight 0.8 requires that order in a trace)."""
    order = _event_order(model)
    return sorted(sites, key=lambda s: (order.get((s.path, s.part), -1), s.head or 0))


_ORDER_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], int]]" = weakref.WeakKeyDictionary()


def _event_order(model: Any) -> dict[tuple[str, str], int]:
    """When each module's input and output become available in one probe forward; cached per model."""
    root = module_of(model)
    cached = _ORDER_CACHE.get(root)
    if cached is not None:
        return cached
    import torch

    order: dict[tuple[str, str], int] = {}

    def note(key: tuple[str, str]) -> None:
        order.setdefault(key, len(order))

    handles = []
    for name, m in root.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(lambda *_a, n=name: note((n, "input"))))
            handles.append(m.register_forward_hook(lambda *_a, n=name: note((n, "output"))))
    try:
        device = next(root.parameters()).device
        with torch.inference_mode():
            root(torch.ones(1, 2, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    _ORDER_CACHE[root] = order
    return order
