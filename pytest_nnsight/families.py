"""Model families: one small declarative table of module paths per architecture, behind one site vocabulary.

A `Family` names where the layers, attention, MLP, head projection, embeddings, final norm and
LM head live, so sites like ``"resid_post.3"`` or ``"head_out.1.2"`` mean the same component on
GPT-2, Pythia, Llama or BERT. Users add an architecture from their conftest:

>>> register_family(Family("mymodel", model_types=("my_model",), base="backbone", layers="blocks",   # doctest: +SKIP
...                        attn="attn", mlp="ffn", head_proj="attn.out", pattern="attn", embed="embed",
...                        final_norm="norm", lm_head="head"))

`validate(model)` runs one probe forward and checks the table against the model: every site
exists, runs in the expected order, has the expected shape, and ``resid_post.L`` is ``resid_pre.L+1``.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

from .errors import ArgumentTypeError, EagerAttentionWarning, FamilyMismatchError, UnknownArchitectureError

LAYER_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "pattern", "head_out")
GLOBAL_SITES = ("embed", "final_norm", "logits")


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its components; paths are dotted torch module names.

    `base`: the child of a task model (``GPT2LMHeadModel.transformer``) holding the layers; a bare base
    model (``GPT2Model``) is recognised too. `layers`, `embed`, `final_norm` are relative to the base;
    `attn` (output[0] is the attention's contribution), `mlp`, `head_proj` (its input is the concatenated
    heads) and `pattern` (output[1] is the weights under eager attention) are relative to one layer;
    `lm_head` is relative to the task model. `n_layers`/`n_heads`/`d_model` are config attribute names, first found wins.
    """

    name: str
    model_types: tuple[str, ...]
    base: str
    layers: str
    attn: str
    mlp: str
    head_proj: str
    pattern: str
    embed: str
    final_norm: str | None = None
    lm_head: str | None = None
    n_layers: tuple[str, ...] = ("num_hidden_layers", "n_layer")
    n_heads: tuple[str, ...] = ("num_attention_heads", "n_head")
    d_model: tuple[str, ...] = ("hidden_size", "n_embd")
    returns_weights: bool = True  # the `pattern` module returns (out, weights) under eager attention
    classes: tuple[str, ...] = ()  # class names matched when the config has no model_type

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(self.model_types)})"


GPT2 = Family("gpt2", ("gpt2",), "transformer", "h", "attn", "mlp", "attn.c_proj", "attn", "drop", "ln_f", "lm_head")
GPT_NEOX = Family(
    "gpt_neox",
    ("gpt_neox",),
    "gpt_neox",
    "layers",
    "attention",
    "mlp",
    "attention.dense",
    "attention",
    "emb_dropout",
    "final_layer_norm",
    "embed_out",
)
LLAMA = Family(
    "llama",
    ("llama", "mistral", "qwen2", "qwen3"),
    "model",
    "layers",
    "self_attn",
    "mlp",
    "self_attn.o_proj",
    "self_attn",
    "embed_tokens",
    "norm",
    "lm_head",
)
GPTJ = Family("gptj", ("gptj",), "transformer", "h", "attn", "mlp", "attn.out_proj", "attn", "drop", "ln_f", "lm_head")
# post-LN encoder: attn_out/mlp_out are the contributions before each residual add + LayerNorm; no final norm.
# The `output` children are served as `E_output` by nnsight 0.8; sites.envoy_at maps the name.
BERT = Family(
    "bert",
    ("bert",),
    "bert",
    "encoder.layer",
    "attention.output.dense",
    "output.dense",
    "attention.output.dense",
    "attention.self",
    "embeddings",
    None,
    None,
)

_FAMILIES: list[Family] = [GPT2, GPT_NEOX, LLAMA, GPTJ, BERT]


def register_family(family: Family) -> Family:
    """Add (or replace, by name) a family; later registrations win detection. Call it from a conftest."""
    if not isinstance(family, Family):
        raise ArgumentTypeError(f"register_family expects a Family, got {type(family).__name__}")
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name] + [family]
    _RESOLVED.clear()
    return family


def unregister_family(name: str) -> None:
    """Remove a registered family by name (for tests that register one temporarily)."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != name]
    _RESOLVED.clear()


def families() -> list[Family]:
    """The registered families, built-in first."""
    return list(_FAMILIES)


def _root(model: Any) -> Any:
    return getattr(model, "_module", model)


def _has(root: Any, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


@dataclass(frozen=True)
class Layout:
    """A family bound to one model: full module paths and sizes."""

    family: Family
    prefix: str  # "transformer." for a task model, "" for a bare base model
    has_lm_head: bool
    n_layers: int
    n_heads: int
    d_model: int
    head_path: str | None = None  # the LM head found on this model, when the family's name for it is not there

    def layer(self, i: int) -> str:
        return f"{self.prefix}{self.family.layers}.{i}"

    def in_layer(self, i: int, what: str) -> str:
        return f"{self.layer(i)}.{getattr(self.family, what)}"

    def path(self, what: str) -> str | None:
        """The full path of a global component (embed, final_norm, lm_head), or None when the model lacks it."""
        if what == "lm_head":
            return (self.head_path or self.family.lm_head) if self.has_lm_head else None
        rel = getattr(self.family, what)
        return None if rel is None else f"{self.prefix}{rel}"


_RESOLVED: "weakref.WeakKeyDictionary[Any, Layout | None]" = weakref.WeakKeyDictionary()


def _config_int(config: Any, names: tuple[str, ...], what: str, family: Family) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise FamilyMismatchError(f"family {family.name!r}: the config has none of {', '.join(names)} to read {what} from")


def _bind(root: Any, family: Family) -> Layout | None:
    for prefix in (f"{family.base}." if family.base else "", ""):
        if _has(root, f"{prefix}{family.layers}"):
            task = bool(family.lm_head) and (prefix != "" or not family.base)
            head = (
                family.lm_head if task and _has(root, family.lm_head) else (_output_embeddings(root) if task else None)
            )
            config = getattr(root, "config", None)
            n = len(root.get_submodule(f"{prefix}{family.layers}"))
            heads = _config_int(config, family.n_heads, "n_heads", family) if config is not None else 0
            width = _config_int(config, family.d_model, "d_model", family) if config is not None else 0
            return Layout(family, prefix, head is not None, n, heads, width, None if head == family.lm_head else head)
    return None


def _output_embeddings(root: Any) -> str | None:
    """The path of the model's LM head by transformers' own accessor, for a family whose name for it moved
    (GPT-NeoX's `embed_out` is `lm_head` from transformers 5); None when it has none."""
    getter = getattr(root, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if head is None:
        return None
    return next((name for name, m in root.named_modules() if m is head and name), None)


def find_layout(model: Any) -> Layout | None:
    """The family layout of `model`, or None for an unknown architecture. Cached per model.

    Detection: the config's `model_type` (or the class name), then, for unlisted types, the first
    family whose layer list and attention module exist (e.g. a renamed GPT-2 variant).
    """
    root = _root(model)
    try:
        if root in _RESOLVED:
            return _RESOLVED[root]
    except TypeError:
        return _detect(root)
    layout = _detect(root)
    _RESOLVED[root] = layout
    return layout


def _detect(root: Any) -> Layout | None:
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    cls = type(root).__name__
    for fam in reversed(_FAMILIES):
        if (model_type and model_type in fam.model_types) or cls in fam.classes:
            layout = _bind(root, fam)
            if layout is not None:
                return layout
    for fam in reversed(_FAMILIES):  # structural fallback
        layout = _bind(root, fam)
        if layout is not None and layout.n_layers and _has(root, layout.in_layer(0, "attn")):
            return layout
    return None


def layout_of(model: Any) -> Layout:
    """The family layout of `model`; UnknownArchitectureError listing the supported families otherwise."""
    layout = find_layout(model)
    if layout is None:
        root = _root(model)
        model_type = getattr(getattr(root, "config", None), "model_type", None)
        raise UnknownArchitectureError(
            f"unknown architecture {type(root).__name__}"
            + (f" (model_type {model_type!r})" if model_type else "")
            + ": named sites (resid_post.3, head_out.1.2, ...) need a model family; supported: "
            + ", ".join(str(f) for f in _FAMILIES)
            + ". Register one from your conftest with pytest_nnsight.register_family(Family(name=..., model_types=(...), "
            "base=..., layers=..., attn=..., mlp=..., head_proj=..., pattern=..., embed=...)), or name sites by module path"
        )
    return layout


def family_of(model: Any) -> Family:
    """The Family describing `model` (UnknownArchitectureError when none does)."""
    return layout_of(model).family


def n_layers(model: Any) -> int:
    """Number of layers (blocks) of the model."""
    return layout_of(model).n_layers


def n_heads(model: Any) -> int:
    """Number of attention (query) heads per layer."""
    return layout_of(model).n_heads


def d_model(model: Any) -> int:
    """Width of the residual stream."""
    return layout_of(model).d_model


# -- eager attention for patterns ----------------------------------------------------------------

_WARNED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def ensure_eager(model: Any) -> bool:
    """Switch the model to eager attention (SDPA returns no weights), warning once per model that it did.

    Returns whether it switched (the caller then forgets what it cached about the forward pass)."""
    root = _root(model)
    config = getattr(root, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if config is None or current in (None, "eager"):
        return False
    try:
        root.set_attn_implementation("eager")
    except (AttributeError, ValueError, TypeError):
        config._attn_implementation = "eager"
    if root not in _WARNED:
        _WARNED.add(root)
        warnings.warn(
            EagerAttentionWarning(
                f"reading attention patterns of {type(root).__name__}: switched its attention from {current!r} to 'eager' "
                "(the only implementation that returns weights) for the rest of the session; results may move by ~1e-6. "
                "Load it with attn_implementation='eager' to avoid the switch"
            ),
            stacklevel=3,
        )
    return True


# -- validation ----------------------------------------------------------------------------------


def validate(model: Any, layout: Layout | None = None) -> Layout:
    """One probe forward checking the family table against `model`; FamilyMismatchError naming the site otherwise.

    Checks that every mapped module exists, that they run in order (embed, then per layer resid_pre <
    attn_out < mlp_out < resid_post, then final_norm and logits), their shapes ([B, T, d_model]; the head
    projection input splits into n_heads; patterns [B, H, T, T] under eager attention), that embed is
    resid_pre.0 and resid_post.L is resid_pre.L+1.
    """
    layout = layout or layout_of(model)
    root = _root(model)
    fail = _Mismatch(layout.family.name, type(root).__name__)
    watch = _watched_sites(layout)
    seen = _probe_forward(root, watch, fail)
    _check_shapes(root, layout, watch, seen, fail)
    _check_order(layout.n_layers, seen, fail)
    _check_residual_chain(layout.n_layers, seen, fail)
    return layout


@dataclass(frozen=True)
class _Mismatch:
    """Raises the FamilyMismatchError of one validation, naming the site and what was wrong there."""

    family: str
    model: str

    def __call__(self, site: str, why: str) -> None:
        raise FamilyMismatchError(
            f"model family {self.family!r} does not fit {self.model} at site {site}: {why}. The library may have "
            "renamed or restructured its modules: fix the Family table (pytest_nnsight.register_family) or name sites by module path"
        )


def _watched_sites(layout: Layout) -> dict[str, tuple[str, str]]:
    """site -> (module path, 'input' or 'output'), for every site of the vocabulary the family maps."""
    watch: dict[str, tuple[str, str]] = {"embed": (layout.path("embed"), "output")}
    for i in range(layout.n_layers):
        watch[f"resid_pre.{i}"] = (layout.layer(i), "input")
        watch[f"attn_out.{i}"] = (layout.in_layer(i, "attn"), "output")
        watch[f"mlp_out.{i}"] = (layout.in_layer(i, "mlp"), "output")
        watch[f"head_out.{i}"] = (layout.in_layer(i, "head_proj"), "input")
        watch[f"pattern.{i}"] = (layout.in_layer(i, "pattern"), "output")
        watch[f"resid_post.{i}"] = (layout.layer(i), "output")
    if layout.path("final_norm"):
        watch["final_norm"] = (layout.path("final_norm"), "output")
    if layout.path("lm_head"):
        watch["logits"] = (layout.path("lm_head"), "output")
    return watch


def _first(value: Any, item: int = 0) -> Any:
    if isinstance(value, (tuple, list)):
        return value[item] if len(value) > item else None
    return value if item == 0 else None


def _probe_forward(root: Any, watch: dict[str, tuple[str, str]], fail: _Mismatch) -> dict[str, tuple[int, Any]]:
    """One forward of a [2, 5] batch with hooks on every watched module: site -> (when it ran, its value)."""
    import torch

    modules = {}
    for site, (path, _) in watch.items():
        try:
            modules[site] = root.get_submodule(path)
        except AttributeError:
            fail(site, f"no module {path!r}")
    seen: dict[str, tuple[int, Any]] = {}

    def record(site: str, value: Any) -> None:
        if site not in seen:
            seen[site] = (len(seen), value)

    handles = []
    for site, (_, part) in watch.items():
        mod = modules[site]
        item = 1 if site.startswith("pattern.") else 0
        if part == "input":

            def pre(_m: Any, args: tuple, kwargs: dict, s: str = site) -> None:
                record(s, args[0] if args else kwargs.get("hidden_states"))

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(_m: Any, _a: Any, out: Any, s: str = site, k: int = item) -> None:
                record(s, _first(out, k))

            handles.append(mod.register_forward_hook(post))
    vocab = getattr(getattr(root, "config", None), "vocab_size", None) or 8
    try:
        device = next(root.parameters()).device
        ids = (torch.arange(2 * 5, device=device).reshape(2, 5) % max(vocab - 3, 1)) + min(3, vocab - 1)
        with torch.inference_mode():
            root(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    for site in watch:
        if site not in seen:
            fail(site, f"module {watch[site][0]!r} did not run in a forward pass")
    return seen


def _check_shapes(
    root: Any, layout: Layout, watch: dict[str, tuple[str, str]], seen: dict[str, tuple[int, Any]], fail: _Mismatch
) -> None:
    """[B, T, d_model] everywhere, the head projection's input splitting into n_heads, patterns [B, H, T, T] under eager."""
    import torch

    B, T, d, H = 2, 5, layout.d_model, layout.n_heads
    eager = getattr(getattr(root, "config", None), "_attn_implementation", None) == "eager"
    for site, (_, value) in seen.items():
        name = site.split(".")[0]
        if name == "pattern":
            if layout.family.returns_weights and eager and (value is None or tuple(value.shape) != (B, H, T, T)):
                fail(
                    site,
                    f"expected attention weights [{B}, {H}, {T}, {T}] under eager attention, got {None if value is None else list(value.shape)}",
                )
            continue
        if not isinstance(value, torch.Tensor):
            fail(site, f"expected a tensor, got {type(value).__name__}")
        shape = tuple(value.shape)
        if name == "head_out":
            if shape[:2] != (B, T) or len(shape) != 3 or shape[2] % H:
                fail(
                    site,
                    f"expected the head projection's input [{B}, {T}, n_heads * head_dim] with n_heads {H}, got {list(shape)}",
                )
        elif name == "logits":
            if shape[:2] != (B, T):
                fail(site, f"expected [{B}, {T}, vocab], got {list(shape)}")
        elif shape != (B, T, d):
            fail(site, f"expected [{B}, {T}, d_model={d}], got {list(shape)}")


def _check_order(n_layers: int, seen: dict[str, tuple[int, Any]], fail: _Mismatch) -> None:
    """embed, then per layer resid_pre < attn_out < mlp_out < resid_post, then final_norm and logits."""

    def before(a: str, b: str) -> None:
        if a in seen and b in seen and not seen[a][0] < seen[b][0]:
            fail(b, f"ran before {a}; expected {a} first")

    before("embed", "resid_pre.0")
    for i in range(n_layers):
        for a, b in (
            (f"resid_pre.{i}", f"attn_out.{i}"),
            (f"attn_out.{i}", f"mlp_out.{i}"),
            (f"mlp_out.{i}", f"resid_post.{i}"),
        ):
            before(a, b)
        if i + 1 < n_layers:
            before(f"resid_post.{i}", f"resid_pre.{i + 1}")
    last = f"resid_post.{n_layers - 1}"
    before(last, "final_norm")
    before("final_norm", "logits")
    before(last, "logits")


def _check_residual_chain(n_layers: int, seen: dict[str, tuple[int, Any]], fail: _Mismatch) -> None:
    """embed is resid_pre.0, and resid_post.L is resid_pre.L+1: nothing runs between the layers."""
    import torch

    if not torch.equal(seen["embed"][1], seen["resid_pre.0"][1]):
        fail("embed", "its output is not the input of layer 0 (resid_pre.0)")
    for i in range(n_layers - 1):
        if not torch.equal(seen[f"resid_post.{i}"][1], seen[f"resid_pre.{i + 1}"][1]):
            fail(f"resid_post.{i}", f"it differs from resid_pre.{i + 1}: something runs between the layers")


def check_on_load(model: Any) -> str | None:
    """For the model cache: validate a model of a known family and return the family's name; None for unknown ones."""
    layout = find_layout(model)
    if layout is None:
        return None
    validate(model, layout)
    return layout.family.name
