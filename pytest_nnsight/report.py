"""The findings report folder: findings.json, findings.md, index.html and one PNG per figure.

Written once per run by the controller (`--nnsight-report DIR`), from the records that
`pytest_nnsight.findings` collected. Figures need matplotlib (the `report` extra, Agg backend);
without it the JSON, Markdown and HTML (with HTML-table heatmaps) are still written. Every file
is written to a temp file beside it and moved into place with os.replace.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .environment import library_versions, package_version
from .files import atomic_write
from .records import Drift, Finding, MapRecord, SnapshotRecord, fmt, percent
from .report_circuits import circuit_figures, circuit_html, circuit_md
from .report_probes import probe_figures, probe_html, probe_md
from .report_sections import html_sections, lens_figures, md_sections
from .run_records import RunRecords, summary_line

FORMAT = 1
INSTALL_HINT = "pip install pytest-nnsight[report]"


@dataclass
class ReportResult:
    """What writing the report did: the files, their sizes, the time it took, and why figures are missing if they are."""

    directory: Path
    files: dict[str, int] = field(default_factory=dict)  # path relative to directory -> bytes
    seconds: float = 0.0
    figures_note: str = ""

    @property
    def index(self) -> Path:
        return self.directory / "index.html"


def check_writable(directory: str | os.PathLike) -> None:
    """Raise OSError when `directory` cannot be created or written (checked at the start of the run)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".nnsight-report-check.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


def environment(settings: Any = None) -> dict[str, str]:
    """What produced the findings: library versions, platform, device and dtype settings, the GPU when torch sees one."""
    env = dict(library_versions())
    env.update(
        pytest=package_version("pytest"),
        syrupy=package_version("syrupy"),
        hypothesis=package_version("hypothesis"),
        platform=platform.platform(),
        machine=platform.machine(),
    )
    if settings is not None:
        env.update(device_setting=settings.device, dtype_setting=settings.dtype)
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        except Exception:
            env["cuda"] = "unknown"
    return env


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:100] or "finding"
    slug, k = base, 2
    while slug in used:
        slug, k = f"{base}-{k}", k + 1
    used.add(slug)
    return slug


def _variant_values(rec: Finding) -> tuple[list[float], float | None, str]:
    """The effects across variants to plot: a population's, else those of repeated interventions (hypothesis examples)."""
    if rec.populations:
        p = rec.populations[0]
        return (
            [v for v in p.effects if v is not None],
            p.threshold,
            f"{p.site} @ {p.position}: {p.passed}/{p.n} variants pass",
        )
    effects = rec.variant_effects()
    if effects:
        thresholds = {c.threshold for c in rec.checks if c.what.startswith("normalized effect")}
        e = rec.effects[0]
        return (
            effects,
            thresholds.pop() if len(thresholds) == 1 else None,
            f"{e.kind} at {e.site}: {len(effects)} variants in this test",
        )
    return [], None, ""


def _figures(rec: Finding, slug: str, plt: Any) -> dict[str, bytes]:
    """PNG bytes per figure of one finding: one heatmap per effect map, one histogram of the effect across variants."""
    out: dict[str, bytes] = {}
    for k, m in enumerate(rec.maps[:8]):
        values = [[math.nan if v is None else v for v in row] for row in m.values]
        n_rows, n_cols = len(values), len(values[0]) if values else 0
        if not n_rows or not n_cols:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * n_cols + 2.5), max(2.2, 0.5 * n_rows + 1.6)), dpi=100)
        finite = [v for row in values for v in row if math.isfinite(v)]
        lim = max([1.0] + [abs(v) for v in finite])
        im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(n_cols), [f"{p}:{t}" for p, t in zip(m.positions, m.tokens)], rotation=45, ha="right")
        ax.set_yticks(range(n_rows), m.sites)
        ax.set_xlabel("position: token")
        ax.set_ylabel("site (layer)")
        for i in range(n_rows):
            for j in range(n_cols):
                _cell_text(ax, i, j, values[i][j], lim, 8)
        for i, j in m.claimed:
            ax.add_patch(
                plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5, linestyle="--")
            )
        for i, j in m.failing:
            ax.add_patch(plt.Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="#ff00ff", linewidth=3))
            ax.text(j + 0.4, i - 0.3, "x", color="#ff00ff", fontsize=11, fontweight="bold", ha="right", va="top")
        fig.colorbar(im, ax=ax, label=f"normalized {m.kind} effect")
        marks = (
            "; magenta x: failing cells, dashed: claimed cells"
            if m.failing
            else ("; dashed: claimed cells" if m.claimed else "")
        )
        ax.set_title(f"{m.corrupt_prompt!r} <- {m.clean_prompt!r}"[:90] + f"\n{m.metric}{marks}"[:100], fontsize=9)
        fig.tight_layout()
        out[f"figures/{slug}-map{k}.png"] = _png(fig, plt)
    for n, snap in enumerate(rec.snapshots[:8]):
        if snap.drift is not None and (snap.drift.map or snap.drift.population):
            out[f"figures/{slug}-drift{n}.png"] = _drift_figure(snap.drift, snap, plt)
    out.update(probe_figures(rec, slug, plt))
    values, threshold, title = _variant_values(rec)
    if values:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4477aa", edgecolor="white")
        if threshold is not None:
            ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
            ax.legend(fontsize=8)
        ax.set_xlabel("normalized effect")
        ax.set_ylabel("variants")
        odd = [x for x in rec.suspicious if "variants" in x or "effect" in x]
        if odd:  # an implausible value is remarked on the figure itself, not only in the text
            ax.set_title(title[:100] + "\nSUSPICIOUS: " + odd[0][:90], fontsize=9, color="#a60")
        else:
            ax.set_title(title[:100], fontsize=9)
        fig.tight_layout()
        out[f"figures/{slug}-variants.png"] = _png(fig, plt)
    out.update(lens_figures(rec, slug, plt, _png))
    out.update(circuit_figures(rec, slug, plt, _png))
    return out


def _cell_text(ax: Any, i: int, j: int, v: float, lim: float, fontsize: int) -> None:
    """A heatmap cell's value in two decimals ('nan' when not finite), white on the dark end of the colour scale."""
    ax.text(
        j,
        i,
        "nan" if not math.isfinite(v) else f"{v:.2f}",
        ha="center",
        va="center",
        fontsize=fontsize,
        color="white" if math.isfinite(v) and abs(v) > 0.6 * lim else "black",
    )


def _diff_grid(old: list[list[Any]], new: list[list[Any]]) -> list[list[float | None]] | None:
    if len(old) != len(new) or any(len(a) != len(b) for a, b in zip(old, new)):
        return None
    return [[None if a is None or b is None else b - a for a, b in zip(ra, rb)] for ra, rb in zip(old, new)]


def _drift_figure(drift: Drift, snap: SnapshotRecord, plt: Any) -> bytes:
    """The recorded finding, the new one and their difference side by side on one colour scale, moved cells marked."""
    head = f"{snap.name}: {snap.status}\n{drift.environment_line()}\n{drift.headline()}"
    if drift.population is not None:
        p = drift.population
        old, new = [v for v in p.old if v is not None], [v for v in p.new if v is not None]
        fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
        both = old + new
        lo, hi = (min(both), max(both)) if both else (0.0, 1.0)
        nb = max(6, min(24, len(both) // 3))
        bins = [lo + (hi - lo) * i / nb for i in range(nb + 1)] if hi > lo else 10
        ax.hist(old, bins=bins, color="#888888", alpha=0.55, label=f"recorded ({len(old)} variants)", edgecolor="white")
        ax.hist(new, bins=bins, color="#4477aa", alpha=0.55, label=f"this run ({len(new)} variants)", edgecolor="white")
        if p.threshold is not None:
            ax.axvline(p.threshold, color="red", linestyle="--", label=f"threshold {p.threshold:g}")
        ax.set_xlabel("normalized effect")
        ax.set_ylabel("variants")
        ax.legend(fontsize=8)
        ax.set_title(head, fontsize=8, loc="left")
        fig.tight_layout()
        return _png(fig, plt)
    m = drift.map
    assert m is not None  # _figures draws a drift only with a map or a population
    old = [[math.nan if v is None else v for v in row] for row in m.old]
    new = [[math.nan if v is None else v for v in row] for row in m.new]
    diff = _diff_grid(m.old, m.new)
    panels = [("recorded", old, m.old_sites or m.sites, m.old_tokens or m.tokens), ("this run", new, m.sites, m.tokens)]
    if diff is not None:
        panels.append(
            (
                "difference (this run - recorded)",
                [[math.nan if v is None else v for v in row] for row in diff],
                m.sites,
                m.tokens,
            )
        )
    finite = [abs(v) for _, grid, _, _ in panels for row in grid for v in row if math.isfinite(v)]
    lim = max([1e-9] + finite)
    n_cols = max(len(grid[0]) if grid else 0 for _, grid, _, _ in panels)
    n_rows = max(len(grid) for _, grid, _, _ in panels)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(min(24.0, len(panels) * max(3.0, 0.5 * n_cols + 1.3) + 1.4), max(3.6, 0.45 * n_rows + 2.8)),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    moved, changed = {tuple(c) for c in m.moved}, {tuple(c) for c in m.changed}
    im = None
    for ax, (title, grid, sites, tokens) in zip(axes[0], panels):
        if not grid or not grid[0]:
            ax.set_axis_off()
            continue
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(
            range(len(grid[0])),
            [f"{j}:{t}" for j, t in enumerate(tokens[: len(grid[0])])],
            rotation=45,
            ha="right",
            fontsize=8,
        )
        ax.set_yticks(range(len(grid)), sites[: len(grid)], fontsize=8)
        ax.set_title(title, fontsize=9)
        if len(grid) * len(grid[0]) <= 160:
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    _cell_text(ax, i, j, v, lim, 7)
        for i, j in changed - moved:
            ax.add_patch(
                plt.Rectangle(
                    (j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="#777777", linewidth=1, linestyle=":"
                )
            )
        for i, j in moved:
            ax.add_patch(plt.Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="#ff00ff", linewidth=2.5))
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="normalized effect, one scale for all three", shrink=0.9)
    legend = "magenta: moved beyond tolerance" + ("; dotted: changed within tolerance" if changed - moved else "")
    fig.suptitle(f"{head}\n{legend}", fontsize=9, x=0.01, ha="left")
    return _png(fig, plt)


def _html_drift(drift: Drift, figure: str | None) -> str:
    """The environment change above the recorded / new / difference view (a figure, or HTML tables without matplotlib)."""
    e = html.escape
    parts = [f"<div class='drift'><p class='env'><b>{e(drift.environment_line())}</b></p><p>{e(drift.headline())}</p>"]
    if figure:
        parts.append(f"<img src='{e(figure)}' alt='recorded, new and difference'>")
    elif drift.map is not None:
        m = drift.map
        diff = _diff_grid(m.old, m.new)
        grids = [("recorded", m.old), ("this run", m.new)] + ([("difference", diff)] if diff is not None else [])
        lim = max([1e-9] + [abs(v) for _, g in grids for row in g for v in row if v is not None])
        for title, grid in grids:
            view = MapRecord(m.sites, m.positions, m.tokens, grid, metric=title, failing=sorted(m.moved))
            parts.append(f"<div class='side'>{_html_map(view, lim, caption=title)}</div>")
    elif drift.population is not None:
        p = drift.population
        parts.append(
            f"<p>recorded: {len(p.old)} variants; this run: {len(p.new)} variants; {p.moved} effects moved</p>"
        )
    return "".join(parts) + "</div>"


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> tuple[Any, str]:
    """matplotlib's pyplot on the Agg backend, or (None, why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None, f"figures skipped: matplotlib is not installed ({INSTALL_HINT} to get them)"
    return plt, ""


def _md(records: Sequence[Finding], env: dict[str, str], figures: dict[int, list[str]]) -> str:
    lines = [
        "# pytest-nnsight findings",
        "",
        _counts(records),
        "",
        "| outcome | claim | measured | threshold | variants | snapshot |",
        "|---|---|---|---|---|---|",
    ]
    for rec in records:
        c = rec.primary_check()
        p = rec.populations[0] if rec.populations else None
        snap = ", ".join(s.status for s in rec.snapshots)
        measured = fmt(c.measured) if c else (fmt(rec.effects[-1].normalized) if rec.effects else "")
        cells = [
            rec.outcome,
            rec.claim,
            measured,
            f"{c.op} {fmt(c.threshold)}" if c else "",
            f"{p.passed}/{p.n} ({percent(p.rate)})" if p else "",
            snap,
        ]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    for k, rec in enumerate(records):
        lines += ["", f"## {rec.claim}", "", f"`{rec.nodeid}`: **{rec.outcome}**", ""]
        if rec.message:
            lines += ["```", rec.message, "```", ""]
        for x in rec.suspicious:
            lines.append(f"- **suspicious**: {x}")
        if rec.used_by:
            lines.append(
                f"- used by: {', '.join(f'`{u}`' for u in rec.used_by[:20])}"
                + (" ..." if len(rec.used_by) > 20 else "")
            )
        for c in rec.checks:
            lines.append(f"- {'pass' if c.passed else 'FAIL'}: {c.what}: {fmt(c.measured)} {c.op} {fmt(c.threshold)}")
        for p in rec.populations:
            lines.append(
                f"- variants: {p.passed}/{p.n} >= {fmt(p.threshold)} (rate {_rate3(p.rate)}, Wilson 95% lower "
                f"{fmt(p.lower_bound)}), mean {fmt(p.mean)} ± {fmt(p.std)}"
            )
        for s in rec.snapshots:
            lines.append(f"- snapshot {s.name}: {s.status}" + (f" ({s.detail})" if s.detail else ""))
            if s.drift is not None:
                lines.append(f"  - {s.drift.environment_line()}; {s.drift.headline()}")
        for m in rec.maps[:8]:
            lines += ["", f"{m.metric}: {m.corrupt_prompt!r} <- {m.clean_prompt!r}", "", _md_map(m)]
        lines += md_sections(rec)
        lines += circuit_md(rec)
        lines += probe_md(rec)
        lines += [f"\n![figure]({f})" for f in figures.get(k, [])]
    lines += ["", "## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def _rate3(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.3f}"


def _md_map(m: MapRecord) -> str:
    failing = {tuple(c) for c in m.failing}
    head = "| site | " + " | ".join(f"{p}:{t}" for p, t in zip(m.positions, m.tokens)) + " |"
    rows = [head, "|---" * (len(m.tokens) + 1) + "|"]
    for i, (site, row) in enumerate(zip(m.sites, m.values)):
        rows.append(
            f"| {site} | " + " | ".join(fmt(v) + (" !" if (i, j) in failing else "") for j, v in enumerate(row)) + " |"
        )
    return "\n".join(rows)


def _counts(records: Sequence[Finding]) -> str:
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.outcome] = counts.get(rec.outcome, 0) + 1
    return f"{len(records)} findings: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def _color(v: float | None, lim: float) -> str:
    if v is None:
        return "#dddddd"
    x = max(-1.0, min(1.0, v / lim))
    r, g, b = (255, int(255 * (1 - x)), int(255 * (1 - x))) if x >= 0 else (int(255 * (1 + x)), int(255 * (1 + x)), 255)
    return f"#{r:02x}{g:02x}{b:02x}"


def _html_map(m: MapRecord, lim: float | None = None, caption: str | None = None) -> str:
    e = html.escape
    failing, claimed = {tuple(c) for c in m.failing}, {tuple(c) for c in m.claimed}
    if lim is None:
        lim = max([1.0] + [abs(v) for row in m.values for v in row if v is not None])
    head = "".join(f"<th>{e(str(p))}:{e(t)}</th>" for p, t in zip(m.positions, m.tokens))
    rows = []
    for i, (site, row) in enumerate(zip(m.sites, m.values)):
        tds = "".join(
            f'<td style="background:{_color(v, lim)}" class="{"fail" if (i, j) in failing else ""} {"claim" if (i, j) in claimed else ""}">'
            f"{fmt(v)}{' ✗' if (i, j) in failing else ''}</td>"
            for j, v in enumerate(row)
        )
        rows.append(f"<tr><th>{e(site)}</th>{tds}</tr>")
    caption = (
        e(caption)
        if caption is not None
        else f"{e(m.metric)}: {e(repr(m.corrupt_prompt))} &larr; {e(repr(m.clean_prompt))}"
    )
    return f'<table class="map"><caption>{caption}</caption><tr><th>site \\ position:token</th>{head}</tr>{"".join(rows)}</table>'


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-top:1px solid #ccc;padding-top:1em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right}
th{background:#f4f4f4}.map td.fail{outline:3px solid #d00;outline-offset:-3px;font-weight:bold}.map td.claim{font-style:italic}
.drift{border-left:4px solid #c0c;padding-left:.8em;margin:.5em 0}.drift .env{color:#606}.side{display:inline-block;vertical-align:top;margin-right:1em}
.passed{color:#070}.failed{color:#c00}.skipped,.xfailed{color:#777}.note{color:#a60}img{max-width:100%;display:block;margin:.5em 0}
caption{text-align:left;font-size:13px;color:#555}code{font-size:12px}pre.message{background:#fff4f4;border-left:4px solid #d00;padding:.5em;white-space:pre-wrap}.suspicious{color:#a60}
b.suspicious{background:#fe9;color:#640;padding:0 .3em}
"""


def _html(records: Sequence[Finding], env: dict[str, str], figures: dict[int, list[str]], note: str) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>pytest-nnsight findings</title><style>{CSS}</style></head><body>",
        "<h1>pytest-nnsight findings</h1>",
        f"<p>{e(_counts(records))}</p>",
    ]
    if note:
        parts.append(f"<p class='note'>{e(note)}</p>")
    parts.append(
        "<ul>"
        + "".join(
            f"<li class='{e(r.outcome)}'><a href='#f{k}'>{e(r.outcome)}</a>: {e(summary_line(r, outcome=False))}"
            + (" <b class='suspicious'>suspicious</b>" if r.suspicious else "")
            + "</li>"
            for k, r in enumerate(records)
        )
        + "</ul>"
    )
    for k, rec in enumerate(records):
        parts.append(
            f"<h2 id='f{k}'>{e(rec.claim)}</h2><p><code>{e(rec.nodeid)}</code>: "
            f"<b class='{e(rec.outcome)}'>{e(rec.outcome)}</b></p>"
        )
        if rec.message:
            parts.append(f"<pre class='message'>{e(rec.message)}</pre>")
        if rec.suspicious:
            parts.append(
                "<p class='suspicious'><b>suspicious values</b></p><ul class='suspicious'>"
                + "".join(f"<li>{e(x)}</li>" for x in rec.suspicious)
                + "</ul>"
            )
        if rec.used_by:
            parts.append(
                f"<p>used by: {e(', '.join(rec.used_by[:20]))}" + (" ..." if len(rec.used_by) > 20 else "") + "</p>"
            )
        if rec.checks:
            parts.append(
                "<table><tr><th>check</th><th>measured</th><th>threshold</th><th>result</th></tr>"
                + "".join(
                    f"<tr><td style='text-align:left'>{e(c.what)}</td><td>{fmt(c.measured)}</td><td>{e(c.op)} {fmt(c.threshold)}</td>"
                    f"<td class='{'passed' if c.passed else 'failed'}'>{'pass' if c.passed else 'FAIL'}</td></tr>"
                    for c in rec.checks[:50]
                )
                + "</table>"
            )
        for p in rec.populations:
            parts.append(
                f"<p>variants: {p.passed}/{p.n} &ge; {fmt(p.threshold)} (rate {_rate3(p.rate)}, Wilson 95% lower "
                f"{fmt(p.lower_bound)}), mean {fmt(p.mean)} &plusmn; {fmt(p.std)} at {e(p.site)} @ {e(p.position)}</p>"
            )
        # placed beside their text
        drift_figures = [f for f in figures.get(k, []) if re.search(r"-(drift\d+|probes)\.png$", f)]
        for n, s in enumerate(rec.snapshots):
            parts.append(f"<p>snapshot <code>{e(s.name)}</code>: <b>{e(s.status)}</b> {e(s.detail)}</p>")
            if s.drift is not None:
                parts.append(
                    _html_drift(s.drift, next((f for f in drift_figures if f.endswith(f"-drift{n}.png")), None))
                )
        if not figures.get(k):  # without matplotlib the map is an HTML table; with it, the figure below
            parts += [_html_map(m) for m in rec.maps[:8]]
        parts += html_sections(rec, figures=bool(figures.get(k)))
        parts += circuit_html(rec)
        parts += probe_html(rec, figures.get(k, []))
        parts += [f"<img src='{e(f)}' alt='{e(Path(f).stem)}'>" for f in figures.get(k, []) if f not in drift_figures]
    parts.append(
        "<h2>Environment</h2><table>"
        + "".join(f"<tr><th>{e(k)}</th><td style='text-align:left'>{e(str(v))}</td></tr>" for k, v in env.items())
        + "</table></body></html>"
    )
    return "\n".join(parts)


def _json_record(record: Finding) -> dict[str, Any]:
    """A record for findings.json, without the received snapshot texts (kept for --nnsight-review; the snapshot files hold them)."""
    data = record.to_dict()
    for snap in data["snapshots"]:
        snap["received"] = None
    return data


def write_report(
    directory: str | os.PathLike, records: Sequence[Finding], env: dict[str, str], *, figures: bool = True
) -> ReportResult:
    """Write findings.json, findings.md, index.html and figures/*.png into `directory`; OSError when it cannot."""
    t0 = time.perf_counter()
    d = Path(directory)
    result = ReportResult(d)
    plt, result.figures_note = _pyplot() if figures else (None, "figures off")
    used: set[str] = set()
    fig_files: dict[int, list[str]] = {}
    written: list[str] = []
    for k, rec in enumerate(records):
        slug = _slug(rec.nodeid.split("::", 1)[-1], used)
        if plt is None:
            continue
        for name, png in _figures(rec, slug, plt).items():
            result.files[name] = atomic_write(d / name, png)
            fig_files.setdefault(k, []).append(name)
            written.append(name)
    for k, rec in enumerate(records):
        rec.figures = fig_files.get(k, [])
    data = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": env,
        "summary": _counts(records),
        "findings": [_json_record(r) for r in records],
    }
    result.files["findings.json"] = atomic_write(d / "findings.json", json.dumps(data, indent=1, allow_nan=False))
    result.files["findings.md"] = atomic_write(d / "findings.md", _md(records, env, fig_files))
    result.files["index.html"] = atomic_write(d / "index.html", _html(records, env, fig_files, result.figures_note))
    figdir = d / "figures"
    if figdir.is_dir():  # figures of an earlier run that this run did not draw
        for old in figdir.glob("*.png"):
            if f"figures/{old.name}" not in written and re.search(
                r"-(map\d+|lens\d+|circuit\d+|drift\d+|probes|variants)\.png$", old.name
            ):
                old.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - t0
    return result


# --- the run: what the plugin's hooks call -------------------------------------------------------------------


@dataclass(eq=False)  # registered as a plugin: pluggy keys plugins by hash, so identity, not field equality
class ReportState:
    """One run's findings records and report outcome, on config.stash."""

    records: RunRecords
    directory: Path | None = None
    result: ReportResult | None = None
    error: str = ""

    def pytest_runtest_logreport(self, report: Any) -> None:
        """Keep the finding record a report carries (under xdist: the controller receives the workers' reports)."""
        self.records.add(report)


def report_directory(config: Any, settings: Any) -> Path | None:
    """The report directory: a command-line or environment path from where pytest was invoked, an ini path from the rootdir."""
    if not settings.report:
        return None
    base = config.rootpath if settings.source_of("report").startswith("ini") else config.invocation_params.dir
    return (Path(base) / os.path.expanduser(settings.report)).absolute()


def configure(config: Any, settings: Any) -> ReportState:
    """Start the run's records; check now that the report directory can be written (the controller's, under xdist)."""
    state = ReportState(RunRecords(band=settings.suspicious_effect), report_directory(config, settings))
    if state.directory is not None and not hasattr(config, "workerinput"):
        try:
            check_writable(state.directory)
        except OSError as exc:
            from .errors import SettingsError

            raise SettingsError(
                f"cannot write the findings report to {str(state.directory)!r} (nnsight_report from "
                f"{settings.source_of('report')}): {exc.strerror or exc}; pass a writable directory to --nnsight-report"
            ) from None
    return state


def session_finish(config: Any, state: ReportState, settings: Any) -> None:
    """Write the report once, in the controller, from every worker's records."""
    if state.directory is None or hasattr(config, "workerinput"):
        return
    try:
        state.result = write_report(state.directory, state.records.records, environment(settings))
    except Exception as exc:  # the run's outcome stands; the terminal says why there is no report
        state.error = f"could not write the findings report to {str(state.directory)!r}: {type(exc).__name__}: {exc}"


def terminal_lines(state: ReportState) -> list[str]:
    """Where the report went (and the figures hint), or why it could not be written."""
    if state.error:
        return [state.error]
    r = state.result
    if r is None:
        return []
    lines = [
        f"findings report: {r.index} ({len(state.records.records)} findings, {len(r.files)} files, "
        f"{sum(r.files.values()) / 1024:.0f} KiB, {r.seconds:.2f} s)"
    ]
    if r.figures_note:
        lines.append(r.figures_note)
    return lines
