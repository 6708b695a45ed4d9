"""Report sections for circuits: a drawing (nodes by layer, edge width by score, claimed edges marked) and an edge table.

`report.py` calls these for every finding record that holds `circuits` (from `discover` and `assert_edges`).
Standard library only; matplotlib is handed in when figures are drawn. No graphviz: nodes sit on a grid, one row per
stage of the forward pass (embeddings, each layer's heads, its MLP, the logits), heads side by side.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

from .records import Finding

MAX_CIRCUITS = 4
MAX_EDGES = 60  # drawn per circuit, largest |score| first
_NODE = re.compile(r"^head_out\.(\d+)\.(\d+)$|^(mlp_out|attn_out)\.(\d+)$")


def _node_of(receiver: str) -> str:
    kind, _, rest = receiver.partition(".")
    return {"q_in": "head_out", "k_in": "head_out", "v_in": "head_out", "mlp_in": "mlp_out"}.get(kind, kind) + (
        f".{rest}" if rest else ""
    )


def layout(nodes: list[str]) -> dict[str, tuple[float, float]]:
    """(x, y) per node: y = stage (embed 0, layer L's heads 2L+1, its MLP 2L+2, logits last), x = head index (MLPs near the centre)."""
    layers, heads = 0, 1
    for n in nodes:
        m = _NODE.match(n)
        if m and m.group(1) is not None:
            layers, heads = max(layers, int(m.group(1)) + 1), max(heads, int(m.group(2)) + 1)
        elif m:
            layers = max(layers, int(m.group(4)) + 1)
    centre = (heads - 1) / 2
    out = {}
    for n in nodes:
        m = _NODE.match(n)
        if n == "embed":
            out[n] = (centre, 0.0)
        elif n == "logits":
            out[n] = (centre, 2.0 * layers + 1)
        elif m and m.group(1) is not None:
            out[n] = (float(m.group(2)), 2.0 * int(m.group(1)) + 1)
        elif m:  # MLPs alternate left and right of the centre, so an edge from one MLP up to the logits misses the next
            layer = int(m.group(4))
            x = centre + (0.35 if layer % 2 else -0.35) if m.group(3) == "mlp_out" else centre + 0.5
            out[n] = (x, 2.0 * layer + 2 - (m.group(3) == "attn_out"))
    return out


def circuit_figures(rec: Finding, slug: str, plt: Any, png: Any) -> dict[str, bytes]:
    """One drawing per circuit: blue edges raise the metric, red ones lower it, width by |score|; claimed edges dashed
    black on top, claimed-but-missing ones dotted magenta."""
    out: dict[str, bytes] = {}
    for k, c in enumerate(rec.circuits[:MAX_CIRCUITS]):
        edges = c.edges[:MAX_EDGES]
        nodes = list(
            dict.fromkeys(
                c.nodes
                + [e for s, r, _ in edges for e in (s, _node_of(r))]
                + [e for s, r in c.claimed + c.missing for e in (s, _node_of(r))]
            )
        )
        pos = layout(nodes)
        if not pos:
            continue
        xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
        fig, ax = plt.subplots(
            figsize=(max(4.5, 1.3 * (max(xs) - min(xs)) + 3), max(3.5, 0.9 * (max(ys) - min(ys)) + 2)), dpi=100
        )
        top = max([abs(v) for _, _, v in edges if v is not None] + [1e-12])
        claimed = {tuple(e) for e in c.claimed}
        for s, r, v in sorted(edges, key=lambda e: abs(e[2] or 0)):
            if s not in pos or _node_of(r) not in pos:
                continue
            (x0, y0), (x1, y1) = pos[s], pos[_node_of(r)]
            width = 0.6 + 5.5 * (abs(v) / top if v is not None else 0.3)
            _arrow(
                ax,
                (x0, y0),
                (x1, y1),
                arrowstyle="-|>",
                lw=width,
                color="#2166ac" if (v or 0) >= 0 else "#b2182b",
                alpha=0.75,
            )
            kind = r.split("_")[0] if r[:2] in ("q_", "k_", "v_") else ""
            if kind:
                ax.text(
                    x0 + 0.62 * (x1 - x0),
                    y0 + 0.62 * (y1 - y0),
                    kind,
                    fontsize=8,
                    color="#444",
                    ha="center",
                    va="center",
                )
            if (s, r) in claimed:
                _arrow(ax, (x0, y0), (x1, y1), arrowstyle="-", lw=1.4, color="black", linestyle="--")
        for s, r in c.missing:
            if s in pos and _node_of(r) in pos:
                (x0, y0), (x1, y1) = pos[s], pos[_node_of(r)]
                _arrow(ax, (x0, y0), (x1, y1), arrowstyle="-|>", lw=2, color="#ff00ff", linestyle=":")
        for n, (x, y) in pos.items():
            ax.scatter(
                [x], [y], s=900, color="#fff7bc" if n.startswith("mlp") else "#e0ecf4", edgecolors="#333", zorder=3
            )
            ax.text(
                x,
                y,
                n.replace("head_out.", "").replace("mlp_out.", "mlp ").replace("attn_out.", "attn "),
                ha="center",
                va="center",
                fontsize=8,
                zorder=4,
            )
        ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
        ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
        ax.set_yticks(
            sorted(set(ys)),
            ["logits" if y == pos.get("logits", (0, -1))[1] else _stage(y) for y in sorted(set(ys))],
            fontsize=8,
        )
        ax.set_xticks([])
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
        marks = "; dashed: claimed" if c.claimed else ""
        marks += "; magenta dotted: claimed but missing" if c.missing else ""
        ax.set_title(
            f"circuit: {len(c.edges)} edges ({c.method or 'given'}), {c.metric}"[:90]
            + f"\nwidth: |score|; blue raises the metric, red lowers it{marks}"[:110],
            fontsize=9,
        )
        fig.tight_layout()
        out[f"figures/{slug}-circuit{k}.png"] = png(fig, plt)
    return out


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], **style: Any) -> None:
    """An edge from `start` to `end`, slightly curved, stopping short of the node circles; `style`: matplotlib arrowprops."""
    ax.annotate(
        "", xy=end, xytext=start, arrowprops=dict(shrinkA=14, shrinkB=14, connectionstyle="arc3,rad=0.12", **style)
    )


def _stage(y: float) -> str:
    if y == 0:
        return "embed"
    layer, rest = divmod(int(y) - 1, 2)
    return f"layer {layer} heads" if rest == 0 else f"layer {layer} mlp"


def _fmt(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:+.4f}"


def circuit_html(rec: Finding) -> list[str]:
    """An edge table per circuit (rank, edge, score, claimed), under the drawing or in its place."""
    e = html.escape
    parts = []
    for c in rec.circuits[:MAX_CIRCUITS]:
        claimed = {tuple(x) for x in c.claimed}
        rows = "".join(
            f"<tr><td>{k + 1}</td><td style='text-align:left'>{e(s)} &rarr; {e(r)}</td><td>{_fmt(v)}</td>"
            f"<td>{'claimed' if (s, r) in claimed else ''}</td></tr>"
            for k, (s, r, v) in enumerate(c.edges[:MAX_EDGES])
        )
        missing = "".join(
            f"<tr><td></td><td style='text-align:left'>{e(s)} &rarr; {e(r)}</td><td></td><td class='failed'>claimed, missing"
            f"</td></tr>"
            for s, r in c.missing
        )
        caption = f"circuit ({c.method or 'given'}, {c.metric}): {len(c.edges)} edges over nodes {', '.join(c.nodes)}"
        parts.append(
            f"<table class='circuit'><caption>{e(caption)}</caption><tr><th>rank</th><th>edge</th><th>score</th><th></th></tr>"
            f"{rows}{missing}</table>"
        )
    return parts


def circuit_md(rec: Finding) -> list[str]:
    lines: list[str] = []
    for c in rec.circuits[:MAX_CIRCUITS]:
        claimed = {tuple(x) for x in c.claimed}
        lines += [
            "",
            f"circuit ({c.method or 'given'}, {c.metric}): {len(c.edges)} edges",
            "",
            "| rank | edge | score | |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k + 1} | {s} -> {r} | {_fmt(v)} | {'claimed' if (s, r) in claimed else ''} |"
            for k, (s, r, v) in enumerate(c.edges[:MAX_EDGES])
        ]
        lines += [f"| | {s} -> {r} | | claimed, missing |" for s, r in c.missing]
    return lines
