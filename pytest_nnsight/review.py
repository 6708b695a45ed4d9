"""`--nnsight-review`: walk the drifted and new findings snapshots of a run and write only the accepted ones.

Like `cargo insta review` or inline-snapshot's review: at the end of the run (the controller's, under
xdist) each finding snapshot that drifted or has no recording yet is shown in the terminal: the claim,
the environment change, the numbers that moved, the path to the side-by-side figure. The answer is
read from the terminal: `y` writes the received finding (values and environment, atomically, as
`--snapshot-update` would), `n` leaves the file as it is, `q` stops the review. Without a terminal
(CI, a pipe) the same summary is printed and nothing is written. Imports only the standard library
(figures are drawn by the report, which needs matplotlib).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .files import atomic_write
from .records import Finding, SnapshotRecord
from .run_records import summary_line

STATUSES = ("drifted", "new")
SHOW_CELLS = 5


@dataclass
class Candidate:
    """One snapshot the review can accept: where it goes, what would be written, and what the report says of it."""

    record: Finding
    snapshot: SnapshotRecord
    figure: Path | None

    @property
    def path(self) -> Path:
        return Path(self.snapshot.path)


def candidates(records: Sequence[Finding], figures_dir: Path | None) -> list[Candidate]:
    """Drifted and new finding snapshots of the run that carry the text to write, in report order."""
    out = []
    for rec in records:
        for n, snap in enumerate(rec.snapshots):
            if snap.status in STATUSES and isinstance(snap.received, str) and snap.path:
                name = next((f for f in rec.figures if f.endswith(f"-drift{n}.png")), None)
                out.append(Candidate(rec, snap, figures_dir / name if figures_dir is not None and name else None))
    return out


def describe(c: Candidate, k: int, total: int, root: Path | None = None) -> list[str]:
    """The lines shown for one candidate: claim, environment change, numbers, figure."""
    snap, rec = c.snapshot, c.record
    path = c.path
    if root is not None:
        try:
            path = path.relative_to(root)
        except ValueError:
            pass
    lines = [f"[{k}/{total}] {snap.status}: {rec.claim}", f"  test:        {rec.nodeid}", f"  snapshot:    {path}"]
    drift = snap.drift
    if snap.status == "new":
        lines.append("  no finding recorded yet; accepting records this run's values and environment")
        lines.append("  this run:    " + _measured(rec))
    elif drift is not None:
        lines.append("  " + drift.environment_line())
        lines.append("  " + drift.headline())
        m = drift.map
        if m is not None:
            for i, j in m.moved[:SHOW_CELLS]:
                old, new = m.old[i][j], m.new[i][j]
                token = m.tokens[j] if j < len(m.tokens) else j
                lines.append(f"    {m.sites[i]} / {j} {token!r}: {_g(old)} -> {_g(new)}")
            if len(m.moved) > SHOW_CELLS:
                lines.append(f"    ... {len(m.moved) - SHOW_CELLS} more moved cells")
        p = drift.population
        if p is not None:
            lines.append(f"    mean effect over variants: {_g(_mean(p.old))} recorded -> {_g(_mean(p.new))} now")
        lines += [f"    {s}" for s in drift.structural[:3]]
    else:
        lines.append(f"  {snap.detail}")
    if c.figure is not None:
        lines.append(f"  figure:      {c.figure} (recorded, this run, difference)")
    return lines


def _measured(rec: Finding) -> str:
    """What the test measured, without the snapshot status: the map's size and peak, its checks, its variants."""
    parts = [p for p in summary_line(rec).rsplit("  [", 1)[0].split(" | ")[1:] if not p.startswith("snapshot ")]
    for m in rec.maps[-1:]:
        cells = [(v, i, j) for i, row in enumerate(m.values) for j, v in enumerate(row) if v is not None]
        if cells:
            v, i, j = max(cells)
            parts.insert(0, f"{len(m.sites)} x {len(m.tokens)} map, peak {_g(v)} at {m.sites[i]} / {j} {m.tokens[j]!r}")
    return "; ".join(parts) or "no numbers recorded besides the snapshot"


def _g(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _mean(values: Sequence[Any]) -> float | None:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


def review(
    found: Sequence[Candidate], write: Callable[[str], None], ask: Callable[[str], str] | None, root: Path | None = None
) -> tuple[list[Candidate], list[Candidate]]:
    """Show each candidate; with `ask` (a terminal), write the accepted ones. Returns (accepted, rejected or unreviewed)."""
    accepted: list[Candidate] = []
    rest: list[Candidate] = []
    stop = False
    for k, c in enumerate(found, 1):
        if stop:
            rest.append(c)
            continue
        for line in describe(c, k, len(found), root):
            write(line)
        if ask is None:
            rest.append(c)
            continue
        answer = ""
        while answer not in ("y", "n", "q"):
            answer = (ask("  accept? [y]es, [n]o, [q]uit: ") or "q").strip().lower()[:1]
        if answer == "y":
            atomic_write(c.path, c.snapshot.received or "")
            accepted.append(c)
            write(f"  accepted: wrote {c.path}")
        else:
            rest.append(c)
            stop = answer == "q"
            kept = "kept the recorded finding" if c.snapshot.status != "new" else "not recorded"
            write(f"  {kept}" if answer == "n" else "  review stopped; the rest is unchanged")
    return accepted, rest


def _terminal_input(config: Any) -> Callable[[str], str] | None:
    """A prompt-and-read function on the real terminal, or None when stdin is not one (CI, a pipe, pytester)."""
    try:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, AttributeError):  # closed or replaced stdin
        interactive = False
    if not interactive:
        return None

    def ask(prompt: str) -> str:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        line = sys.stdin.readline()
        return line if line else "q"  # end of input: stop

    return ask


def run(config: Any, terminalreporter: Any, records: Sequence[Finding], figures_dir: Path | None) -> None:
    """The review at the end of the run: interactive in a terminal, a summary that changes nothing otherwise."""
    found = candidates(records, figures_dir)
    terminalreporter.section("pytest-nnsight review")
    if not found:
        terminalreporter.write_line("no drifted or new findings snapshots to review")
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)
    try:
        ask = _terminal_input(config)
        if ask is None:
            terminalreporter.write_line(
                "not a terminal: showing the findings to review and writing nothing "
                "(run pytest --nnsight-review in a terminal to accept them one by one)"
            )
        accepted, rest = review(found, terminalreporter.write_line, ask, Path(config.rootpath))
    finally:
        if capman is not None:
            capman.resume_global_capture()
    if ask is not None:
        terminalreporter.write_line(
            f"review: {len(accepted)} accepted (written), {len(rest)} kept as recorded; "
            "rerun the tests to check the accepted findings",
            bold=True,
        )
