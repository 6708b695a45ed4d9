"""The report's probe section: accuracies per probed site beside a 2-D PCA of each site's activations, coloured by label.

The seed's tip ("combine tracing with dimensionality reduction to visualize how representations evolve
across layers"): a probe's number says whether a property is linearly decodable; the PCA shows what the
probe saw. Records come from `findings.record_probe` (called by `probing.fit_probe`). Standard library
only; figures need matplotlib, as the rest of the report.
"""

from __future__ import annotations

import html
import io
import math
import textwrap
from typing import Any

from .records import Finding, ProbeRecord

MAX_PANELS = 12
MAX_LEGEND = 12  # classes named in a legend; more are only coloured


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def probe_figures(rec: Finding, slug: str, plt: Any) -> dict[str, bytes]:
    """One figure: a PCA scatter per probed site (up to 12), points coloured by label, accuracy in the title."""
    probes = [p for p in rec.probes if p.pca.points][:MAX_PANELS]
    if not probes:
        return {}
    cols = min(4, len(probes))
    rows = math.ceil(len(probes) / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(3.4 * cols + (1.6 if _legend(probes) else 0.2), 3.1 * rows + 0.4),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    classes = sorted({label for p in probes for label in p.pca.labels})
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    color = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    for ax, p in zip(axes.flat, probes):
        pts, labels = p.pca.points, p.pca.labels
        xs, ys = [pt[0] for pt in pts], [pt[1] for pt in pts]
        ax.scatter(
            xs,
            ys,
            c=[color.get(label, "#999999") for label in labels] if labels else "#4477aa",
            s=9,
            alpha=0.8,
            linewidths=0,
        )
        ev = p.pca.explained or [0.0, 0.0]
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% var)", fontsize=8)
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}% var)" if len(ev) > 1 else "PC2", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(
            f"{p.site}: probe {_f(p.accuracy, 2)} [{_f(p.ci[0], 2)}, {_f(p.ci[1], 2)}]\n"
            f"majority {_f(p.majority, 2)}, control {_f(p.control, 2)}",
            fontsize=8,
        )
    for ax in list(axes.flat)[len(probes) :]:
        ax.set_axis_off()
    if _legend(probes):
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=color[c], label=c) for c in classes]
        fig.legend(handles=handles, loc="outside right upper", fontsize=7, title="label", title_fontsize=8)
    title = (
        f"2-D PCA of the probed activations per site, coloured by label ({len(classes)} classes); {probes[0].position}"
    )
    fig.suptitle(textwrap.fill(title, 30 * cols + 20, max_lines=3, placeholder=" ..."), fontsize=9)
    buf = io.BytesIO()  # as report._png (not imported: report imports this module)
    fig.savefig(buf, format="png")
    plt.close(fig)
    return {f"figures/{slug}-probes.png": buf.getvalue()}


def _legend(probes: list[ProbeRecord]) -> bool:
    return 0 < len({label for p in probes for label in p.pca.labels}) <= MAX_LEGEND


def probe_table(rec: Finding) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td style='text-align:left'>{e(p.site)}</td><td>{_f(p.accuracy)}</td><td>[{_f(p.ci[0])}, "
        f"{_f(p.ci[1])}]</td><td>{_f(p.majority)}</td><td>{_f(p.control)}</td><td>{p.n_test}</td></tr>"
        for p in rec.probes
    )
    return (
        "<table class='probes'><caption>linear probes: held-out accuracy</caption><tr><th>site</th><th>accuracy</th>"
        f"<th>95% CI</th><th>majority</th><th>control</th><th>held out</th></tr>{rows}</table>"
    )


def probe_html(rec: Finding, figures: list[str]) -> list[str]:
    """The probe accuracies, with the PCA figure beside them."""
    if not rec.probes:
        return []
    fig = next((f for f in figures if f.endswith("-probes.png")), None)
    img = (
        f"<img src='{html.escape(fig)}' alt='PCA of the probed activations' style='width:100%;max-width:900px'>"
        if fig
        else ""
    )
    return [
        f"<div class='probe-row' style='display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap'>"
        f"<div style='flex:0 0 auto'>{probe_table(rec)}</div><div style='flex:1 1 420px;min-width:0'>{img}</div></div>"
    ]


def probe_md(rec: Finding) -> list[str]:
    if not rec.probes:
        return []
    lines = ["", "| site | accuracy | 95% CI | majority | control |", "|---|---|---|---|---|"]
    lines += [
        f"| {p.site} | {_f(p.accuracy)} | [{_f(p.ci[0])}, {_f(p.ci[1])}] | {_f(p.majority)} | {_f(p.control)} |"
        for p in rec.probes
    ]
    return lines
