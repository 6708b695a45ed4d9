"""Report sections for logit lenses and generated text: a heatmap per lens, baseline and intervened text side by side.

`report.py` calls these for every finding record that holds `lenses` (from `logit_lens`) or `generations` (from
`generate` and `generation_population`). Standard library only; matplotlib is handed in when figures are drawn.
"""

from __future__ import annotations

import html
import math
from typing import Any

from .records import Finding

MAX_LENSES = 8
MAX_ROWS = 50  # prompts shown per generation table
TEXT_COLUMNS = ("expected", "baseline", "intervened")


def lens_figures(rec: Finding, slug: str, plt: Any, png: Any) -> dict[str, bytes]:
    """One heatmap per lens: colour = the answer's probability, text = its rank (0 = top-1), rows = sites, columns = tokens.

    `png(fig, plt)` turns a figure into PNG bytes (report.py's, so every figure is written the same way)."""
    out: dict[str, bytes] = {}
    for k, lens in enumerate(rec.lenses[:MAX_LENSES]):
        probs = [[math.nan if v is None else v for v in row] for row in lens.probs]
        n_rows, n_cols = len(probs), len(probs[0]) if probs else 0
        if not n_rows or not n_cols:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * n_cols + 2.5), max(2.2, 0.5 * n_rows + 1.6)), dpi=100)
        im = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(n_cols), [f"{p}:{t}" for p, t in zip(lens.positions, lens.tokens)], rotation=45, ha="right")
        ax.set_yticks(range(n_rows), lens.sites)
        for i in range(n_rows):
            for j in range(n_cols):
                rank = lens.ranks[i][j]
                ax.text(
                    j,
                    i,
                    str(rank),
                    ha="center",
                    va="center",
                    fontsize=8,
                    fontweight="bold" if rank == 0 else "normal",
                    color="black" if math.isfinite(probs[i][j]) and probs[i][j] > 0.6 else "white",
                )
        fig.colorbar(im, ax=ax, label=f"p({lens.answer})")
        ax.set_xlabel("position: token")
        ax.set_ylabel("residual stream decoded")
        ax.set_title(
            f"logit lens of {lens.answer!r} in {lens.prompt!r}"[:90] + "\nnumbers: rank (0 = top-1)", fontsize=9
        )
        fig.tight_layout()
        out[f"figures/{slug}-lens{k}.png"] = png(fig, plt)
    return out


def html_sections(rec: Finding, figures: bool) -> list[str]:
    """HTML for the record's lenses (a rank table when there is no figure) and generations (a side-by-side table)."""
    e = html.escape
    parts = []
    if not figures:
        for lens in rec.lenses[:MAX_LENSES]:
            head = "".join(f"<th>{e(str(p))}:{e(t)}</th>" for p, t in zip(lens.positions, lens.tokens))
            rows = "".join(
                f"<tr><th>{e(s)}</th>"
                + "".join(f"<td{' class=claim' if r == 0 else ''}>{r}</td>" for r in ranks)
                + "</tr>"
                for s, ranks in zip(lens.sites, lens.ranks)
            )
            parts.append(
                f"<table class='map'><caption>logit lens: rank of {e(repr(lens.answer))} in {e(repr(lens.prompt))} "
                f"(0 = top-1)</caption><tr><th>site \\ position:token</th>{head}</tr>{rows}</table>"
            )
    for g in rec.generations:
        cols = [c for c in TEXT_COLUMNS if any(c in r for r in g.rows)]
        scores = [k for k in (g.rows[0] if g.rows else {}) if k not in ("prompt", *TEXT_COLUMNS)]
        head = "".join(f"<th>{e(c)}</th>" for c in ["prompt", *cols, *scores])
        body = "".join(
            "<tr>"
            + "".join(
                f"<td style='text-align:left'><code>{e(str(r.get(c, '')))}</code></td>" for c in ["prompt", *cols]
            )
            + "".join(f"<td>{'n/a' if r.get(s) is None else f'{r[s]:.3g}'}</td>" for s in scores)
            + "</tr>"
            for r in g.rows[:MAX_ROWS]
        )
        more = f" (first {MAX_ROWS} of {len(g.rows)})" if len(g.rows) > MAX_ROWS else ""
        caption = f"generated text, {g.config}; intervention: {g.intervention or 'none'}{more}"
        parts.append(f"<table class='generation'><caption>{e(caption)}</caption><tr>{head}</tr>{body}</table>")
    return parts


def md_sections(rec: Finding) -> list[str]:
    """Markdown for the record's lenses (rank tables) and generations (side-by-side tables)."""
    lines: list[str] = []
    for lens in rec.lenses[:MAX_LENSES]:
        lines += [
            "",
            f"logit lens: rank of {lens.answer!r} in {lens.prompt!r} (0 = top-1)",
            "",
            "| site | " + " | ".join(f"{p}:{t}" for p, t in zip(lens.positions, lens.tokens)) + " |",
            "|---" * (len(lens.positions) + 1) + "|",
        ]
        lines += [f"| {s} | " + " | ".join(str(r) for r in ranks) + " |" for s, ranks in zip(lens.sites, lens.ranks)]
    for g in rec.generations:
        cols = [c for c in TEXT_COLUMNS if any(c in r for r in g.rows)]
        scores = [k for k in (g.rows[0] if g.rows else {}) if k not in ("prompt", *TEXT_COLUMNS)]
        lines += [
            "",
            f"generated text, {g.config}; intervention: {g.intervention or 'none'}",
            "",
            "| " + " | ".join(["prompt", *cols, *scores]) + " |",
            "|---" * (1 + len(cols) + len(scores)) + "|",
        ]
        for r in g.rows[:MAX_ROWS]:
            cells = [str(r.get(c, "")).replace("|", "\\|") for c in ["prompt", *cols]]
            cells += ["n/a" if r.get(s) is None else f"{r[s]:.3g}" for s in scores]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
