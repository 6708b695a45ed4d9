"""The forward path of sweeps and populations: tokenize once, keep only the logits a metric reads, reuse the prefix.

A patch at layer L leaves layers 0..L-1 exactly as in the unpatched run, so a sweep computes them once:
one forward of the target prompt records the residual stream entering every block (and the arguments
each block was called with: attention mask, rotary embeddings, position ids), and each patched row then
starts at its own block from that cached residual. Rows are run in one pass over the layers whose batch
grows as the rows starting at each layer join it, so a full layer sweep computes about half the blocks of
a plain batched sweep. The LM head runs on the positions the metric reads (the last one for every
built-in metric) and no key/value cache is built.

This path calls the torch modules directly (no nnsight trace) for models of a known family (GPT-2,
NeoX, Llama-style, GPT-J) and sites inside the layers; anything else runs on the plain nnsight path.
The batching check compares a sample of its cells with single plain traces (`sweeps.verify_cells`),
and an unpatched row replayed from layer 0 must reproduce the target run before the path is trusted.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # torch is imported lazily (plugin load stays light); annotations only
    import torch

from .sites import Site, module_of  # stdlib only: the plugin opens baseline scopes without importing torch

#: bytes a chunk of patched rows may hold (activations of the widest layer plus kept logits); sweep(memory_budget=)
DEFAULT_MEMORY_BUDGET = 512 * 2**20


# -- version differences live in compat.py (which keywords the installed transformers' forward takes) ----------------

from .compat import lean_forward_kwargs as forward_kwargs  # noqa: E402, F401  (re-exported: trace.py and attribution.py use it)

# -- inputs ---------------------------------------------------------------------------------------------------------


def encode(model: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and (for left-padded batches) position ids counted from each row's first token,
    on the model's device: the batch nnsight builds for the same prompts (its left-pad position fix included)."""

    tok = model.tokenizer
    enc = tok(list(texts), return_tensors="pt", padding=True)
    device = next(module_of(model).parameters()).device
    batch = {"input_ids": enc["input_ids"].to(device)}
    mask = enc.get("attention_mask")
    if mask is not None:
        mask = mask.to(device)
        batch["attention_mask"] = mask
        if not bool(mask.all()) and getattr(tok, "padding_side", "right") == "left":
            from .compat import left_pad_positions

            batch["position_ids"] = left_pad_positions(mask)
    return batch


def expand(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """One encoded prompt repeated over `rows` rows without copying or re-tokenizing."""

    return {k: v.expand(rows, *v.shape[1:]) for k, v in batch.items()}


# -- prefix reuse ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Where a patched row enters the replay: block `layer` (n_layers: the final norm), either by writing the cached
    residual entering that block (`module` None) or through a hook on `module` inside the block."""

    layer: int
    module: str | None = None
    part: str = "output"
    item: int = 0
    head: int | None = None
    n_heads: int | None = None


@dataclass
class Plan:
    """The modules a replay runs: the layers, the final norm and the LM head of one model."""

    root: Any
    layers: list[Any]
    layer_paths: list[str]
    final_norm: Any
    lm_head: Any
    embed_path: str | None

    def start_of(self, site: Site) -> Start | None:
        """Where a row patched at `site` enters the replay, or None when this path cannot patch it."""
        if site.item != 0:
            return None
        if site.path in self._index and site.head is None:
            i = self._index[site.path]
            return Start(i if site.part == "input" else i + 1)
        if site.path == self.embed_path and site.part == "output" and site.head is None:
            return Start(0)
        for i, prefix in enumerate(self.layer_paths):
            if site.path.startswith(prefix + "."):
                return Start(i, site.path[len(prefix) + 1 :], site.part, site.item, site.head, site.n_heads)
        return None

    @property
    def _index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.layer_paths)}


_PLANS: "weakref.WeakKeyDictionary[Any, Plan | None]" = weakref.WeakKeyDictionary()


def plan_for(model: Any) -> Plan | None:
    """The replay plan of a model of a known decoder family with an LM head; None otherwise (remote models too)."""
    from .families import find_layout
    from .remote import is_remote

    if is_remote(model):
        return None
    root = module_of(model)
    if root in _PLANS:
        return _PLANS[root]
    plan = None
    layout = find_layout(model)
    head = _lm_head(root, layout)
    if layout is not None and head is not None and layout.family.name in REPLAYABLE and layout.path("final_norm"):
        paths = [layout.layer(i) for i in range(layout.n_layers)]
        plan = Plan(
            root,
            [root.get_submodule(p) for p in paths],
            paths,
            root.get_submodule(layout.path("final_norm")),
            head,
            layout.path("embed"),
        )
    _PLANS[root] = plan
    return plan


def _lm_head(root: Any, layout: Any) -> Any:
    """The LM head: the family's path, else transformers' own accessor (GPT-NeoX's `embed_out` is `lm_head` in 5.x)."""
    import torch

    if layout is not None and layout.has_lm_head:
        return root.get_submodule(layout.path("lm_head"))
    getter = getattr(root, "get_output_embeddings", None)
    head = getter() if callable(getter) and layout is not None and layout.prefix else None
    return head if isinstance(head, torch.nn.Module) else None


#: families whose forward is embed -> blocks -> final norm -> LM head, nothing else between (checked once per model)
REPLAYABLE = {"gpt2", "gpt_neox", "llama", "gptj"}


@dataclass
class Capture:
    """One unpatched forward of the target prompts: the residual entering every block (and the final norm), the
    arguments each block was called with, and the model output."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # n_layers + 1 entries, [B, T, d]
    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # per block: (args after the hidden states, kwargs)
    output: Any = None


def capture(
    plan: Plan,
    batch: dict[str, torch.Tensor],
    kwargs: dict[str, Any],
    read: Sequence[Site] = (),
    target_rows: Sequence[int] | None = None,
) -> tuple[Capture, dict[Site, torch.Tensor]]:
    """Run the model once on `batch`, recording what a replay of the `target_rows` (default: all) needs and the
    activations at `read` of every row (detached clones)."""
    import torch

    cap = Capture()
    saved: dict[Site, torch.Tensor] = {}
    handles = []

    def pre(_m: Any, args: tuple, kw: dict) -> None:
        hidden = args[0] if args else kw["hidden_states"]
        cap.hidden.append(hidden.detach().clone())
        rest = {k: v for k, v in kw.items() if k != "hidden_states"}
        cap.calls.append((tuple(args[1:]), rest))

    def final(_m: Any, args: tuple) -> None:
        cap.hidden.append(args[0].detach().clone())

    try:
        for layer in plan.layers:
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(plan.final_norm.register_forward_pre_hook(final))
        for site in read:
            handles.append(_reader(plan.root, site, saved))
        with torch.inference_mode():
            cap.output = plan.root(**batch, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if len(cap.hidden) != len(plan.layers) + 1:
        raise RuntimeError(f"replay capture saw {len(cap.hidden)} residuals for {len(plan.layers)} layers")
    if target_rows is not None:
        rows = list(target_rows)
        total = batch["input_ids"].shape[0]
        idx = torch.tensor(rows, device=cap.hidden[0].device)
        cap.hidden = [h.index_select(0, idx) for h in cap.hidden]
        cap.calls = [_take(c, rows, total) for c in cap.calls]
    return cap, saved


def _reader(root: Any, site: Site, saved: dict[Site, torch.Tensor]) -> Any:

    module = root.get_submodule(site.path)

    def keep(value: Any) -> None:
        value = value[site.item] if isinstance(value, tuple) else value
        if site.head is not None:
            b, t, d = value.shape
            value = value.view(b, t, site.n_heads, d // site.n_heads)[:, :, site.head, :]
        saved[site] = value.detach().clone()

    if site.part == "input":
        return module.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    return module.register_forward_hook(lambda _m, _a, out: keep(out))


@dataclass(frozen=True)
class Row:
    """One replayed row: from target row `source` (0 for a one-prompt sweep), entering at `start`, writing `values`
    [k, d] at `positions` of the start's site (no positions: an unpatched row)."""

    start: Start
    positions: tuple[int, ...]
    values: torch.Tensor | None
    source: int = 0


def replay(plan: Plan, cap: Capture, rows: Sequence[Row], finish: Callable[[torch.Tensor], Any]) -> Any:
    """Run `rows` from their start blocks to the end in one pass whose batch grows layer by layer; returns
    `finish(hidden after the final norm's input, rows in the order given)`."""
    import torch

    n = len(plan.layers)
    order = sorted(range(len(rows)), key=lambda r: rows[r].start.layer)
    batch_b = cap.hidden[0].shape[0]
    hidden: torch.Tensor | None = None
    sources: list[int] = []
    placed: list[int] = []  # original row index of each batch row
    k = 0
    with torch.inference_mode():
        for layer in range(n + 1):
            joining = []
            while k < len(order) and rows[order[k]].start.layer == layer:
                joining.append(order[k])
                k += 1
            if joining:
                src = torch.tensor([rows[r].source for r in joining], device=cap.hidden[layer].device)
                new = cap.hidden[layer].index_select(0, src)
                for j, r in enumerate(joining):
                    row = rows[r]
                    if row.start.module is None and row.positions:
                        new[j, list(row.positions)] = row.values.to(new.dtype)
                hidden = new if hidden is None else torch.cat([hidden, new])
                sources += [rows[r].source for r in joining]
                placed += joining
            if hidden is None or layer == n:
                continue
            inner = [
                (b, rows[r])
                for b, r in enumerate(placed)
                if rows[r].start.layer == layer and rows[r].start.module is not None and rows[r].positions
            ]
            handles = _patch_hooks(plan.layers[layer], inner)
            try:
                args, kw = _take(cap.calls[layer], sources, batch_b)
                out = plan.layers[layer](hidden, *args, **kw)
            finally:
                for h in handles:
                    h.remove()
            hidden = out[0] if isinstance(out, tuple) else out
        if hidden is None:
            raise ValueError("replay of no rows")
        inverse = torch.empty(len(placed), dtype=torch.long, device=hidden.device)
        inverse[torch.tensor(placed, device=hidden.device)] = torch.arange(len(placed), device=hidden.device)
        return finish(hidden.index_select(0, inverse))


def _take(call: tuple[tuple, dict], sources: list[int], batch_b: int) -> tuple[tuple, dict]:
    """A block's recorded arguments for the batch rows `sources` (rows of the recorded batch); batch-1 tensors broadcast."""
    import torch

    if batch_b == 1:
        return call
    idx = None

    def pick(v: Any) -> Any:
        nonlocal idx
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch_b:
            if idx is None:
                idx = torch.tensor(sources, device=v.device)
            return v.index_select(0, idx.to(v.device))
        if isinstance(v, tuple):
            return tuple(pick(x) for x in v)
        return v

    args, kw = call
    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kw.items()}


def _patch_hooks(layer: Any, inner: list[tuple[int, Row]]) -> list[Any]:
    by_module: dict[tuple[str, str], list[tuple[int, Row]]] = {}
    for b, row in inner:
        by_module.setdefault((row.start.module, row.start.part), []).append((b, row))
    handles = []
    for (path, part), items in by_module.items():
        module = layer.get_submodule(path)

        def write(value: Any, items: list[tuple[int, Row]] = items) -> None:
            hidden = value[items[0][1].start.item] if isinstance(value, tuple) else value
            for b, row in items:
                target = hidden
                if row.start.head is not None:
                    bb, t, d = hidden.shape
                    target = hidden.view(bb, t, row.start.n_heads, d // row.start.n_heads)[:, :, row.start.head, :]
                target[b, list(row.positions)] = row.values.to(target.dtype)

        if part == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, write=write: write(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, write=write: write(out)))
    return handles


_TRUSTED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def needs_identity_check(plan: Plan) -> bool:
    """Whether this model's replay has not yet shown that an unpatched row reproduces the target run."""
    return plan.root not in _TRUSTED


def identity_checked(plan: Plan, replayed: float, target: float, tol: float) -> bool:
    """Trust the replay of this model when an unpatched row from layer 0 gave the target's metric; otherwise this model
    runs on the plain nnsight path from now on (its forward does more than blocks, final norm and LM head)."""
    if not math.isfinite(target):
        return False  # inconclusive (a model emitting inf or NaN right now): the plain path runs this call, the next checks again
    if abs(replayed - target) <= tol:
        _TRUSTED.add(plan.root)
        return True
    _PLANS[plan.root] = None
    return False


def head_logits(plan: Plan, hidden: torch.Tensor, keep_last: bool) -> Any:
    """The model output a metric reads: final norm and LM head on the last position (or all of them)."""
    from transformers.modeling_outputs import CausalLMOutput

    h = hidden[:, -1:, :] if keep_last else hidden
    return CausalLMOutput(logits=plan.lm_head(plan.final_norm(h)))


def rows_per_chunk(plan: Plan | None, model: Any, tokens: int, keep_last: bool, budget: int) -> int:
    """How many patched rows fit `budget` bytes: per row, the widest activation of a block (about 8 x d_model per
    token for the MLP, plus heads x tokens attention scores) over `tokens`, and the kept logits (vocab per position)."""
    import torch

    root = module_of(model)
    cfg = getattr(root, "config", None)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 768
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 12
    vocab = getattr(cfg, "vocab_size", None) or 50257
    width = 4 if next(root.parameters()).dtype == torch.float32 else 2
    per_row = width * (tokens * (8 * d + heads * tokens) + (1 if keep_last else tokens) * vocab * 2)
    return max(1, int(budget // max(per_row, 1)))


# -- baselines of repeated patch() calls within one test ----------------------------------------------------------

_BASELINES: list[dict[tuple, dict[str, Any]]] = []  # a stack: pytest run inside a test (pytester) gets its own scope


class baseline_scope:
    """Within this scope (the plugin opens one around every test), `patch()` computes the unpatched runs of one
    (model, prompts, metric, direction) once. Metrics are keyed by object identity, never by name (per-pair closures
    share a `__name__`), and the model by identity and the version counters of its weights (an in-place edit of a
    weight recomputes them)."""

    def __enter__(self) -> "baseline_scope":
        _BASELINES.append({})
        return self

    def __exit__(self, *exc: Any) -> None:
        _BASELINES.pop()


def baselines() -> dict[tuple, dict[str, Any]] | None:
    """The open scope's cache of baselines, or None outside any scope (nothing is cached then)."""
    return _BASELINES[-1] if _BASELINES else None


def weights_version(model: Any) -> tuple[int, ...]:
    """The in-place version counters of a model's parameters: they move when a weight is edited in place."""
    return tuple(p._version for p in module_of(model).parameters())
