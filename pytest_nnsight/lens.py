"""The logit lens: where in depth an answer becomes the model's prediction.

`logit_lens(model, prompt, answer=...)` reads the residual stream after the embeddings and after
every layer (`embed`, `resid_post.0` .. `resid_post.L-1`) in one trace, then runs each through the
model's own final norm and unembedding (the family's `final_norm` and `logits` sites) and records,
at every position, the answer's rank (0 = top-1) and probability. The last row is the model's own
output. `assert_emerges_at(lens, layer=L)` claims "the answer becomes top-1 at layer L" and fails
with the measured ranks per layer.

>>> lens = logit_lens(model, "The capital of France is", answer="Paris")    # doctest: +SKIP
>>> assert_emerges_at(lens, layer=1)                                          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ArgumentError, MetricError, SiteError
from .findings import record_check, record_lens

__all__ = ["LogitLens", "logit_lens", "assert_emerges_at"]


@dataclass(frozen=True)
class LogitLens:
    """The answer's rank and probability through depth: rows are sites (`embed`, `resid_post.L`), columns positions.

    `ranks[i][j]` is the answer's rank (0 = top-1) when site i at position j is decoded through the final
    norm and unembedding; `probs[i][j]` its probability; `top[i][j]` the top-1 token there.
    """

    prompt: str
    answer: str
    answer_id: int
    sites: tuple[str, ...]
    positions: tuple[int, ...]
    tokens: tuple[str, ...]
    ranks: tuple[tuple[int, ...], ...]
    probs: tuple[tuple[float, ...], ...]
    top: tuple[tuple[str, ...], ...]

    def column(self, position: Any = "last") -> int:
        """The column index of a position: an int token index (negative from the end) or 'last'."""
        if position == "last":
            position = len(self.tokens) - 1
        if isinstance(position, bool) or not isinstance(position, int):
            raise ArgumentError(f"position {position!r}: expected an int token index or 'last'")
        p = position % len(self.tokens) if -len(self.tokens) <= position < len(self.tokens) else position
        if p not in self.positions:
            raise ArgumentError(
                f"position {position!r} is not in this lens: it covers positions {list(self.positions)} "
                f"of [{_show(self.tokens)}]"
            )
        return self.positions.index(p)

    def row(self, layer: Any) -> int:
        """The row index of a layer: an int L (resid_post.L, negative from the end), 'embed' or a site label."""
        if isinstance(layer, str):
            if layer in self.sites:
                return self.sites.index(layer)
            raise ArgumentError(
                f"layer {layer!r} is not a row of this lens: expected an int 0..{len(self.sites) - 2} or one of {', '.join(self.sites)}"
            )
        n = len(self.sites) - 1
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ArgumentError(
                f"layer {layer!r} is out of range: the model has {n} layers, valid 0..{n - 1} (or 'embed')"
            )
        return 1 + layer % n

    def ranks_at(self, position: Any = "last") -> dict[str, int]:
        """The answer's rank at every row, at one position."""
        j = self.column(position)
        return {s: self.ranks[i][j] for i, s in enumerate(self.sites)}

    def emergence(self, position: Any = "last") -> str | None:
        """The first row from which the answer stays top-1 to the last layer, or None if it is not top-1 at the end."""
        j = self.column(position)
        first = None
        for i in range(len(self.sites) - 1, -1, -1):
            if self.ranks[i][j] != 0:
                break
            first = self.sites[i]
        return first

    def to_text(self) -> str:
        """The rank map as aligned text (rows: sites, columns: position:token)."""
        head = ["site"] + [f"{p}:{self.tokens[p]}" for p in self.positions]
        rows = [[s] + [str(r) for r in ranks] for s, ranks in zip(self.sites, self.ranks)]
        width = [max(len(r[k]) for r in [head] + rows) for k in range(len(head))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, width)) for r in [head] + rows)

    def __repr__(self) -> str:
        return (
            f"LogitLens({self.answer!r} in {self.prompt!r}: emerges at {self.emergence('last')} at the last position)"
        )


def _show(tokens: Sequence[str]) -> str:
    return " ".join(f"{i}:{t}" for i, t in enumerate(tokens))


def logit_lens(model: Any, prompt: Any, *, answer: str | int, positions: Any = None) -> LogitLens:
    """The answer's rank and probability at every layer x position, decoding the residual stream with the model's own head.

    Rows: `embed` (the residual stream entering layer 0) and `resid_post.L` for every layer; the last row is
    the model's own prediction. `positions`: None (every token), or anything a site position accepts ('last',
    an int, a word, a slice, a list). The answer must be one token (MetricError with the tokenization otherwise).

    >>> logit_lens(model, "The capital of France is", answer="Paris").ranks_at("last")   # doctest: +SKIP
    {'embed': 61, 'resid_post.0': 3, 'resid_post.1': 0}
    """
    import torch

    from .families import layout_of
    from .metrics import Metric, token_id
    from .prompts import check_context, resolve_position, slots_of, text_of, tokens_of
    from .sites import module_of, site
    from .trace import run

    text = text_of(prompt)
    layout = layout_of(model)
    norm_path, head_path = layout.path("final_norm"), layout.path("lm_head")
    if head_path is None:
        raise SiteError(
            f"the logit lens needs an unembedding: this {layout.family.name} model has no logits site (a base model without an LM head)"
        )
    tokenizer = getattr(model, "tokenizer", None)
    answer_id = token_id(tokenizer, answer)
    tokens = tokens_of(model, text)
    check_context(model, tokens, text)
    cols = (
        list(range(len(tokens)))
        if positions is None
        else resolve_position(tokens, positions, prompt=text, slots=slots_of(prompt))
    )
    rows = [site(model, "embed")] + [site(model, "resid_post", i) for i in range(layout.n_layers)]
    none = Metric("none", lambda out, ref: torch.zeros(1))
    _, acts = run(model, text, none, save=rows)
    root = module_of(model)
    norm = root.get_submodule(norm_path) if norm_path else torch.nn.Identity()
    head = root.get_submodule(head_path)
    ranks, probs, top = [], [], []
    with torch.inference_mode():
        for s in rows:
            logits = head(norm(acts[s][0, cols])).float()  # [positions, vocab]
            if logits.shape[-1] <= answer_id:
                raise MetricError(f"answer id {answer_id} is outside the model's {logits.shape[-1]} logits")
            p = logits.softmax(-1)
            ranks.append(tuple(int(v) for v in (logits > logits[:, answer_id : answer_id + 1]).sum(-1)))
            probs.append(tuple(float(v) for v in p[:, answer_id]))
            best = logits.argmax(-1).tolist()
            top.append(tuple(tokenizer.convert_ids_to_tokens(best) if tokenizer is not None else map(str, best)))
    shown = (
        answer
        if isinstance(answer, str)
        else (tokenizer.convert_ids_to_tokens(answer) if tokenizer is not None else str(answer))
    )
    lens = LogitLens(
        text,
        shown,
        answer_id,
        tuple(str(s) for s in rows),
        tuple(cols),
        tuple(tokens),
        tuple(ranks),
        tuple(probs),
        tuple(top),
    )
    record_lens(lens)
    return lens


def _emergence_check(lens: LogitLens, layer: Any, position: Any, stays: bool) -> tuple[bool, int, int, list[int], str]:
    """(holds, row, column, ranks down the column, why not) for one lens."""
    i, j = lens.row(layer), lens.column(position)
    col = [lens.ranks[k][j] for k in range(len(lens.sites))]
    earlier = [lens.sites[k] for k in range(i) if col[k] == 0]
    later = [lens.sites[k] for k in range(i + 1, len(col)) if col[k] != 0] if stays else []
    ok = not earlier and col[i] == 0 and not later
    why = (
        ""
        if ok
        else f"already top-1 at {', '.join(earlier)}"
        if earlier
        else f"rank {col[i]} at {lens.sites[i]}, not top-1"
        if col[i]
        else f"top-1 at {lens.sites[i]} but not at {', '.join(later)}"
    )
    return ok, i, j, col, why


def assert_emerges_at(
    lens: LogitLens | Sequence[LogitLens],
    *,
    layer: Any,
    position: Any = "last",
    stays: bool = True,
    min_rate: float = 1.0,
    on: str = "rate",
) -> None:
    """The answer becomes top-1 at `layer` (an int L for resid_post.L, or 'embed') at `position`: not top-1 at any
    earlier row, top-1 at `layer`, and (with `stays`, the default) top-1 at every later layer too.

    Given a list of lenses (prompt variants), the claim must hold in at least `min_rate` of them, stated on the raw
    rate or (`on='lower_bound'`) its Wilson 95% lower bound. Fails with the measured ranks per layer.
    """
    __tracebackhide__ = True
    from .assertions import _fail
    from .stats import wilson_interval

    lenses = list(lens) if isinstance(lens, (list, tuple)) else [lens]
    if not lenses or not all(isinstance(x, LogitLens) for x in lenses):
        got = (
            type(lens).__name__
            if not isinstance(lens, (list, tuple))
            else f"a list of {len(lenses)} ({', '.join(sorted({type(x).__name__ for x in lenses})) or 'nothing'})"
        )
        raise ArgumentError(
            f"assert_emerges_at expects a LogitLens or a non-empty list of them (from logit_lens(...)), got {got}"
        )
    if on not in ("rate", "lower_bound"):
        raise ArgumentError(f"on={on!r}: expected 'rate' or 'lower_bound' (Wilson 95%)")
    if isinstance(min_rate, bool) or not isinstance(min_rate, (int, float)) or not 0 <= min_rate <= 1:
        raise ArgumentError(f"min_rate={min_rate!r}: expected a rate between 0 and 1")
    checks = [_emergence_check(x, layer, position, stays) for x in lenses]
    if len(lenses) > 1:
        passed = sum(c[0] for c in checks)
        rate, lower = passed / len(checks), wilson_interval(passed, len(checks))[0]
        value = rate if on == "rate" else lower
        site = lenses[0].sites[checks[0][1]]
        record_check(
            f"logit lens: answer top-1 from {site} in a share of {len(lenses)} prompts"
            + (" (Wilson lower bound)" if on == "lower_bound" else ""),
            value,
            ">=",
            min_rate,
            site=site,
            detail=f"{passed}/{len(checks)}",
        )
        if value >= min_rate:
            return
        worst = "".join(
            f"\n    {x.prompt!r} -> {x.answer!r}: {c[4]}; ranks {c[3]}" for x, c in zip(lenses, checks) if not c[0]
        )
        _fail(
            f"claim: the answer becomes top-1 at {site}"
            + (" and stays top-1" if stays else "")
            + f" in at least {min_rate:.0%} of "
            f"{len(lenses)} prompts",
            [
                ("pass rate", f"{rate:.3f} ({passed} / {len(checks)})"),
                ("wilson", f"{lower:.3f} (95% lower bound)"),
                ("rows", ", ".join(lenses[0].sites) + "  (ranks below in this order; 0 = top-1)"),
                ("failing", worst),
                (
                    "expected",
                    f"{'pass rate' if on == 'rate' else 'Wilson lower bound'} >= {min_rate:g}, measured {value:.3f}",
                ),
            ],
            "look at the failing prompts' ranks: a template the finding does not cover, or a neighbouring layer",
        )
        return
    lens = lenses[0]
    ok, i, j, col, why = checks[0]
    first = next((lens.sites[k] for k in range(len(col)) if col[k] == 0), None)
    record_check(
        f"logit lens: {lens.answer!r} top-1 from {lens.sites[i]} at position {lens.positions[j]}",
        1.0 if ok else 0.0,
        ">=",
        1.0,
        site=lens.sites[i],
        detail=f"ranks {col}",
        passed=ok,
    )
    if ok:
        return
    p = lens.positions[j]
    _fail(
        f"claim: {lens.answer!r} becomes top-1 at {lens.sites[i]} (position {p} {lens.tokens[p]!r})"
        + (" and stays top-1" if stays else ""),
        [
            ("ranks", ", ".join(f"{s}: {r}" for s, r in zip(lens.sites, col)) + "  (0 = top-1)"),
            ("probs", ", ".join(f"{s}: {lens.probs[k][j]:.3g}" for k, s in enumerate(lens.sites))),
            ("top-1", ", ".join(f"{s}: {lens.top[k][j]!r}" for k, s in enumerate(lens.sites))),
            ("prompt", repr(lens.prompt)),
            ("tokens", _show(lens.tokens)),
            ("measured", f"{why}; first top-1 at {first or 'no layer'}"),
            (
                "expected",
                f"not top-1 before {lens.sites[i]}, top-1 at {lens.sites[i]}" + (" and after" if stays else ""),
            ),
        ],
        "read lens.to_text() for every position, or claim the layer where it emerges: "
        + (first or "it never becomes top-1"),
    )
