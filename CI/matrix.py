#!/usr/bin/env python3
"""The version matrix: run findings under several nnsight/transformers/torch environments and write a drift report.

    python CI/matrix.py --config CI/matrix.toml --out matrix-report [--only NAME ...] [--write-compat PATH] [-- PYTEST ARGS]

Each environment of the config is a plain venv under the cache dir (default `.matrix/`, reused while
its requirements are unchanged). torch is installed first and pinned, so pip never resolves a
CUDA build; `no_deps` packages (nnsight 0.4.11's torchvision) go in without dependencies; the
checkout goes in last, editable and without dependencies, so the environment's pins stand. The
tests (default: `examples`) run with snapshots read-only; the finding specs (`specs`, JSON files
written by `pytest_nnsight.replay`) are replayed with plain torch hooks and with nnsight. The
report (`drift.md`, `drift.json`) gives each finding's outcome per environment: pass,
re-verified, drifted, failed, errored or skipped, the numbers, and what the replay says moved.
Exit status: 0 when nothing drifted, failed or errored; 1 otherwise; 2 for a bad config.

Standard library only: it runs from any Python 3.10+.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
RESULTS_ENV = "PYTEST_NNSIGHT_MATRIX_RESULTS"
ENV_KEYS = {"name", "requirements", "no_deps", "pip_args", "python", "description", "floating"}
TOP_KEYS = {"tests", "specs", "torch", "cache_dir", "python", "env", "pytest_args"}
BAD_OUTCOMES = ("drifted", "failed", "errored")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class MatrixConfigError(ValueError):
    """A config the matrix cannot run: the message names the bad key or value and what is accepted."""


@dataclass
class EnvSpec:
    """One environment of the matrix: pip requirements on top of the pinned torch."""

    name: str
    requirements: list[str]
    no_deps: list[str] = field(default_factory=list)
    pip_args: list[str] = field(default_factory=list)
    python: str = ""
    description: str = ""
    floating: bool = False  # unpinned newest releases: rebuilt on every run, never reused from the cache


@dataclass
class MatrixConfig:
    """The whole matrix: the environments, the test selection and the finding specs to replay."""

    envs: list[EnvSpec]
    tests: list[str] = field(default_factory=lambda: ["examples"])
    specs: list[str] = field(default_factory=list)
    torch: str = "torch==2.13.0"
    cache_dir: str = ".matrix"
    python: str = ""
    pytest_args: list[str] = field(default_factory=list)


# -- config ----------------------------------------------------------------------------------------


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise MatrixConfigError(f"{where} = {value!r}: expected a list of non-empty strings")
    return list(value)


def _known_keys(table: dict[str, Any], accepted: set[str], where: str) -> None:
    unknown = sorted(set(table) - accepted)
    if unknown:
        raise MatrixConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}: accepted keys are {', '.join(sorted(accepted))}"
        )


def parse_config(data: Any, source: str = "config") -> MatrixConfig:
    """A MatrixConfig from parsed TOML/JSON; MatrixConfigError naming the key and what is accepted."""
    if not isinstance(data, dict):
        raise MatrixConfigError(f"{source}: expected a table of settings, got {type(data).__name__}")
    _known_keys(data, TOP_KEYS, source)
    envs_raw = data.get("env")
    if not isinstance(envs_raw, list) or not envs_raw:
        raise MatrixConfigError(f"{source}: no environments: add at least one [[env]] table with name and requirements")
    torch_req = data.get("torch", "torch==2.13.0")
    if not isinstance(torch_req, str) or not re.match(r"^torch\s*==\s*[0-9][\w.+]*$", torch_req):
        raise MatrixConfigError(
            f"{source}: torch = {torch_req!r}: expected an exact pin like 'torch==2.13.0' (an unpinned torch pulls a multi-GB CUDA build)"
        )
    envs: list[EnvSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(envs_raw):
        where = f"{source}: env #{i + 1}"
        if not isinstance(raw, dict):
            raise MatrixConfigError(f"{where}: expected a table with name and requirements, got {raw!r}")
        _known_keys(raw, ENV_KEYS, where)
        name = raw.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise MatrixConfigError(
                f"{where}: name = {name!r}: expected letters, digits, '.', '_' or '-' (it names the venv folder)"
            )
        if name in seen:
            raise MatrixConfigError(f"{where}: name {name!r} is used twice: environment names must be unique")
        seen.add(name)
        where = f"{source}: env {name!r}"
        if "requirements" not in raw:
            raise MatrixConfigError(
                f'{where}: missing requirements: e.g. requirements = ["nnsight==0.8.1", "transformers==5.24.0"]'
            )
        reqs = _strings(raw["requirements"], f"{where} requirements")
        no_deps = _strings(raw.get("no_deps", []), f"{where} no_deps") if raw.get("no_deps") else []
        for r in reqs + no_deps:
            if re.match(r"^torch(\s|$|[=<>!~\[])", r.strip()):
                raise MatrixConfigError(
                    f"{where}: {r!r} in the requirements: torch is pinned once for all environments by the top-level torch key"
                )
        floating = raw.get("floating", False)
        if not isinstance(floating, bool):
            raise MatrixConfigError(
                f"{where}: floating = {floating!r}: expected true or false (true: rebuilt on every run with the newest releases)"
            )
        envs.append(
            EnvSpec(
                name,
                reqs,
                no_deps,
                _strings(raw.get("pip_args", []), f"{where} pip_args") if raw.get("pip_args") else [],
                str(raw.get("python", "") or ""),
                str(raw.get("description", "") or ""),
                floating,
            )
        )
    tests = _strings(data.get("tests", ["examples"]), f"{source}: tests")
    specs = _strings(data.get("specs", []), f"{source}: specs") if data.get("specs") else []
    return MatrixConfig(
        envs,
        tests,
        specs,
        torch_req.replace(" ", ""),
        str(data.get("cache_dir", ".matrix")),
        str(data.get("python", "") or ""),
        _strings(data.get("pytest_args", []), f"{source}: pytest_args") if data.get("pytest_args") else [],
    )


def load_config(path: str) -> MatrixConfig:
    """Read a .toml (Python 3.11+) or .json config file."""
    p = Path(path)
    if not p.is_file():
        raise MatrixConfigError(
            f"config file {path!r} does not exist: pass --config with a .toml or .json file (see CI/matrix.toml)"
        )
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        elif p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise MatrixConfigError(
                    f"{path}: reading TOML needs Python 3.11+ (tomllib); use a .json config with the same keys"
                ) from None
            data = tomllib.loads(text)
        else:
            raise MatrixConfigError(f"config file {path!r}: expected a .toml or .json file")
    except (ValueError, TypeError) as exc:
        if isinstance(exc, MatrixConfigError):
            raise
        raise MatrixConfigError(f"{path}: not valid {p.suffix[1:].upper()}: {exc}") from None
    return parse_config(data, path)


# -- environments ----------------------------------------------------------------------------------


def env_key(env: EnvSpec, cfg: MatrixConfig) -> str:
    """A hash of everything that decides an environment's contents: unchanged key, reused venv."""
    blob = json.dumps(
        [cfg.torch, env.requirements, env.no_deps, env.pip_args, env.python or cfg.python or sys.executable],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pip_reason(output: str, limit: int = 25) -> list[str]:
    """Why a pip step failed, from its output: the lines from pip's first ERROR on (ResolutionImpossible and the
    conflicting requirements), whole; without an ERROR line, the last lines."""
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip() and not ln.startswith("$ ")]
    first = next((i for i, ln in enumerate(lines) if ln.startswith("ERROR") or "ResolutionImpossible" in ln), None)
    if first is not None:
        # the conflict explanation pip prints just before its ERROR line ("The conflict is caused by: ...")
        cause = next(
            (i for i in range(first - 1, max(first - 15, -1), -1) if "conflict is caused by" in lines[i]), None
        )
        start = cause if cause is not None else first
        picked = lines[start : start + limit]
    else:
        picked = lines[-min(limit, 8) :]
    return picked


def _run(cmd: Sequence[str], log: Path, **kw: Any) -> int:
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(map(str, cmd))}\n")
        handle.flush()
        return subprocess.call(list(map(str, cmd)), stdout=handle, stderr=subprocess.STDOUT, **kw)


def project_dependencies() -> list[str]:
    """The checkout's own runtime dependencies (pyproject.toml), so the editable install can skip resolution."""
    try:
        import tomllib

        deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    except Exception:  # Python 3.10 or an unusual pyproject: the common set
        deps = ["pytest>=7.4", "hypothesis>=6.100", "syrupy>=7,<8", "safetensors>=0.4", "tokenizers>=0.20"]
    return [str(d) for d in deps]


def build_env(env: EnvSpec, cfg: MatrixConfig, cache: Path, log: Path, rebuild: bool = False) -> dict[str, Any]:
    """Create (or reuse) the venv of `env`; returns {python, reused, seconds, ok, error}."""
    venv = cache / env.name
    marker = venv / ".matrix-env.json"
    key = env_key(env, cfg)
    py = venv / "bin" / "python"
    if not rebuild and not env.floating and marker.is_file() and py.exists():
        try:
            if json.loads(marker.read_text()).get("key") == key:
                return {"python": str(py), "reused": True, "seconds": 0.0, "ok": True, "error": ""}
        except ValueError:
            pass
    start = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    base = env.python or cfg.python or sys.executable
    names = {re.split(r"[\s=<>!~\[;]", r.strip(), maxsplit=1)[0].lower() for r in env.requirements + env.no_deps}
    extra = [
        d
        for d in project_dependencies()
        if re.split(r"[\s=<>!~\[;]", d, maxsplit=1)[0].lower() not in names | {"torch"}
    ]
    steps = [
        [base, "-m", "venv", venv],
        [py, "-m", "pip", "install", "-q", *env.pip_args, cfg.torch],
        [py, "-m", "pip", "install", "-q", *env.pip_args, cfg.torch, *env.requirements, *extra],
    ]
    if env.no_deps:
        steps.append([py, "-m", "pip", "install", "-q", "--no-deps", *env.pip_args, *env.no_deps])
    # the plugin without dependency resolution: a release outside its declared range is still tried
    steps.append([py, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT])
    for cmd in steps:
        offset = log.stat().st_size if log.exists() else 0
        rc = _run(cmd, log)
        if rc != 0:
            with open(log, encoding="utf-8", errors="replace") as handle:
                handle.seek(offset)
                reason = pip_reason(handle.read())
            shown = " ".join(str(c) for c in cmd[1:] if str(c) not in ("-m", "-q"))
            return {
                "python": str(py),
                "reused": False,
                "seconds": round(time.perf_counter() - start, 1),
                "ok": False,
                "reason": reason,
                "error": f"environment build failed: `{shown}` exited {rc}"
                + (":\n" + "\n".join(reason) if reason else f"; see {log}"),
            }
    marker.write_text(json.dumps({"key": key, "env": asdict(env), "torch": cfg.torch}, indent=1))
    return {
        "python": str(py),
        "reused": False,
        "seconds": round(time.perf_counter() - start, 1),
        "ok": True,
        "error": "",
    }


VERSIONS_SNIPPET = (
    "import json, platform\nfrom importlib import metadata\nout = {'python': platform.python_version()}\n"
    "for n in ('nnsight', 'transformers', 'torch', 'tokenizers', 'pytest', 'syrupy'):\n"
    "    try: out[n] = metadata.version(n)\n    except metadata.PackageNotFoundError: out[n] = 'not installed'\nprint(json.dumps(out))\n"
)


def env_versions(python: str) -> dict[str, str]:
    """Installed versions in an environment, read with importlib.metadata (no import of torch or nnsight)."""
    out = subprocess.run([python, "-c", VERSIONS_SNIPPET], capture_output=True, text=True, check=False)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (out.stderr or out.stdout)[-500:]}


def run_env(
    env: EnvSpec, cfg: MatrixConfig, out: Path, cache: Path, pytest_args: Sequence[str], rebuild: bool = False
) -> dict[str, Any]:
    """Build `env`, run the tests and the replay there; the environment's raw results."""
    edir = out / env.name
    edir.mkdir(parents=True, exist_ok=True)
    log = edir / "log.txt"
    log.write_text("")
    result: dict[str, Any] = {
        "name": env.name,
        "description": env.description,
        "requirements": env.requirements,
        "no_deps": env.no_deps,
        "floating": env.floating,
    }
    built = build_env(env, cfg, cache, log, rebuild=rebuild)
    result["build"] = built
    if not built["ok"]:
        result.update(versions={}, tests=[], replay=[], error=built["error"], test_seconds=0.0)
        return result
    py = built["python"]
    result["versions"] = env_versions(py)
    envvars = dict(os.environ)
    results_file = edir / "tests.json"
    if results_file.exists():
        results_file.unlink()
    envvars[RESULTS_ENV] = str(results_file)
    envvars["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + ([envvars["PYTHONPATH"]] if envvars.get("PYTHONPATH") else [])
    )
    selection = list(pytest_args) or [*cfg.tests, *cfg.pytest_args]
    # the structure lock reports a changed model without failing its tests (warn: read-only), so each finding still
    # says whether it holds; the report shows the lock's explanation per environment
    cmd = [
        py,
        "-m",
        "pytest",
        "-p",
        "matrix_collect",
        "-o",
        f"cache_dir={edir / 'pytest-cache'}",
        "-q",
        "-rN",
        "--nnsight-structure-lock",
        "warn",
        *selection,
    ]
    if any(a.startswith("--snapshot-update") for a in selection):
        raise MatrixConfigError(
            "--snapshot-update in the test selection: the matrix reads snapshots, it never rewrites them"
        )
    start = time.perf_counter()
    rc = _run(cmd, log, cwd=ROOT, env=envvars)
    result["test_seconds"] = round(time.perf_counter() - start, 1)
    result["pytest_exit"] = rc
    try:
        collected = json.loads(results_file.read_text())
        result["tests"] = collected["tests"]
        result["structure"] = collected.get("structure", {})
        result["error"] = ""
    except (OSError, ValueError, KeyError):
        result["tests"] = []
        result["structure"] = {}
        result["error"] = f"pytest exited {rc} without writing results (see {log})"
    specs = sorted({p for pattern in cfg.specs for p in glob.glob(str(ROOT / pattern))})
    result["replay"] = []
    if specs:
        rfile = edir / "replay.json"
        rc = _run([py, "-m", "pytest_nnsight.replay", "--check", "--json", rfile, *specs], log, cwd=ROOT, env=envvars)
        try:
            result["replay"] = json.loads(rfile.read_text())["findings"]
        except (OSError, ValueError, KeyError):
            result["replay"] = [
                {"name": Path(s).stem, "error": f"replay exited {rc} without results (see {log})"} for s in specs
            ]
    return result


# -- classification and reports ---------------------------------------------------------------------


def classify(test: dict[str, Any]) -> str:
    """pass / re-verified / drifted / failed / errored / skipped for one test record of matrix_collect."""
    outcome = test.get("outcome")
    if outcome == "passed":
        notes = " ".join(test.get("snapshot", []))
        return "re-verified" if ("re-verified" in notes or "environment refreshed" in notes) else "pass"
    if outcome == "skipped":
        return "skipped"
    if outcome == "xfailed":
        return "xfail"
    if outcome == "failed":
        if test.get("drift"):
            return "drifted"
        exc = test.get("exception", "")
        return (
            "failed"
            if exc in ("AssertionError", "") or "Assertion" in exc or exc.endswith("MetricError")
            else "errored"
        )
    return "errored"


def replay_verdict(rep: dict[str, Any]) -> str:
    """One phrase for a replayed finding: what moved, by the replay's three-way comparison."""
    if rep.get("error"):
        return "replay error: " + str(rep["error"])
    return str(rep.get("diagnosis", ""))


def short_versions(v: dict[str, str]) -> str:
    return f"nnsight {v.get('nnsight', '?')}, transformers {v.get('transformers', '?')}, torch {v.get('torch', '?')}"


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The drift report's data: per finding, per environment, the outcome, numbers and replay verdict."""
    findings: dict[str, dict[str, Any]] = {}
    for env in results:
        for t in env.get("tests", []):
            row = findings.setdefault(t["nodeid"], {"nodeid": t["nodeid"], "envs": {}})
            row["envs"][env["name"]] = {
                "outcome": classify(t),
                "message": t.get("message", ""),
                "drift": t.get("drift", []),
                "snapshot": t.get("snapshot", []),
                "seconds": t.get("duration", 0.0),
            }
        for r in env.get("replay", []):
            key = r.get("test") or f"replay:{r.get('name')}"
            row = findings.setdefault(key, {"nodeid": key, "envs": {}})
            cell = row["envs"].setdefault(
                env["name"], {"outcome": "not run", "message": "", "drift": [], "snapshot": [], "seconds": 0.0}
            )
            cell.setdefault("replay", []).append(r)
    bad: list[str] = []
    for env in results:
        if env.get("error"):
            bad.append(f"{env['name']}: {env['error'].splitlines()[0]}")  # the whole reason is under Environments
        for t in env.get("tests", []):
            if classify(t) in BAD_OUTCOMES:
                bad.append(f"{env['name']}: {t['nodeid']} {classify(t)}")
        for r in env.get("replay", []):
            if r.get("error") or r.get("status") not in (None, "stable"):
                bad.append(f"{env['name']}: replay {r.get('name')}: {replay_verdict(r)}")
    envs = [
        {
            "name": e["name"],
            "description": e.get("description", ""),
            "versions": e.get("versions", {}),
            "requirements": e.get("requirements", []),
            "no_deps": e.get("no_deps", []),
            "build": e.get("build", {}),
            "test_seconds": e.get("test_seconds", 0.0),
            "error": e.get("error", ""),
            "floating": e.get("floating", False),
            "structure": e.get("structure", {}),
        }
        for e in results
    ]
    return {
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "envs": envs,
        "findings": sorted(findings.values(), key=lambda r: r["nodeid"]),
        "problems": bad,
        "ok": not bad,
    }


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    text = c["outcome"]
    for r in c.get("replay", []):
        text += f"; replay: {r.get('status', 'error') if not r.get('error') else 'error'}"
    return text


def _num(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, (int, float)) else str(x)


def render_markdown(summary: dict[str, Any]) -> str:
    """The drift report as markdown: environments, the outcome table, then the numbers behind each non-pass."""
    envs = [e["name"] for e in summary["envs"]]
    out = [
        "# pytest-nnsight version matrix: drift report",
        "",
        f"Generated {summary['generated']} by `CI/matrix.py`. "
        + (
            "Nothing drifted, failed or errored."
            if summary["ok"]
            else f"**{len(summary['problems'])} problem(s)**: see the end."
        ),
        "",
        "## Environments",
        "",
        "| env | nnsight | transformers | torch | python | venv build | tests |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary["envs"]:
        v, b = e["versions"], e["build"]
        build = "failed" if not b.get("ok", True) else ("reused" if b.get("reused") else f"{b.get('seconds', 0):.0f} s")
        name = e["name"] + (" (floating: newest releases)" if e.get("floating") else "")
        out.append(
            f"| {name} | {v.get('nnsight', '?')} | {v.get('transformers', '?')} | {v.get('torch', '?')} | {v.get('python', '?')} | {build} | {e['test_seconds']:.0f} s |"
        )
    for e in summary["envs"]:
        if not e["build"].get("ok", True):  # why pip could not build it, in pip's words
            out += (
                ["", f"**{e['name']}** could not be built ({', '.join(e['requirements'])}):", "", "```"]
                + e["error"].splitlines()
                + ["```"]
            )
    locks = [
        (e["name"], label, v)
        for e in summary["envs"]
        for label, v in (e.get("structure") or {}).items()
        if v.get("lines")
    ]
    if locks:
        out += [
            "",
            "## Structure lock",
            "",
            "What changed in each served model against the repository's structure lock "
            "(`__snapshots__/.nnsight-structure.lock`), most consequential first; in your own runs every test using the model fails with these lines.",
            "",
        ]
        for name, label, v in locks:
            after = f" after {', '.join(v.get('changes') or [])}" if v.get("changes") else ""
            out.append(f"- **{name}**: the structure of `{label}` changed{after}:")
            out += [f"  - {ln}" for ln in _fold_all(v["lines"])]
    out += ["", "## Findings", "", "| finding | " + " | ".join(envs) + " |", "|---|" + "---|" * len(envs)]
    for f in summary["findings"]:
        out.append(f"| `{f['nodeid']}` | " + " | ".join(_cell(f["envs"].get(n)) for n in envs) + " |")
    replays = [
        (f["nodeid"], n, r)
        for f in summary["findings"]
        for n in envs
        for r in (f["envs"].get(n) or {}).get("replay", [])
    ]
    if replays:
        out += [
            "",
            "## Replay (plain torch hooks, no nnsight) against the recorded numbers",
            "",
            "| finding | env | recorded | nnsight now | replay | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for nodeid, n, r in replays:
            rec, nn, rp = r.get("recorded", {}), r.get("nnsight", {}), r.get("replay", {})
            q = r.get("quantity", "normalized")
            out.append(
                f"| {r.get('name', nodeid)} | {n} | {_num(rec.get(q, '-'))} | {_num(nn.get(q, '-')) if isinstance(nn, dict) else nn} | "
                f"{_num(rp.get(q, '-')) if isinstance(rp, dict) else rp} | {replay_verdict(r)} |"
            )
    details = [
        (f["nodeid"], n, c)
        for f in summary["findings"]
        for n, c in f["envs"].items()
        if c["outcome"] not in ("pass", "skipped", "xfail", "not run")
    ]
    if details:
        out += ["", "## Details", ""]
        for nodeid, n, c in details:
            out.append(f"- **{n}** `{nodeid}`: {c['outcome']}")
            lines = c["drift"] or c["snapshot"] or [ln for ln in c["message"].splitlines() if ln.strip()]
            # an error's traceback is cut between lines
            shown = lines if c["outcome"] != "errored" else lines[:ERROR_LINES]
            out += [f"  - {line}" for line in _fold_all(shown)]
            if len(shown) < len(lines):
                out.append(f"  - ({len(lines) - len(shown)} more line(s) in drift.json)")
    if summary["problems"]:
        out += ["", "## Problems", ""] + [f"- {p}" for p in summary["problems"]]
    return "\n".join(out) + "\n"


ERROR_LINES = 20  # lines of an errored test's message in drift.md (drift.json keeps all); explanations are never cut
FOLD = 280  # drift.md folds a longer line onto continuation lines; no line is cut


def fold(line: str, width: int = FOLD) -> str:
    """A long line folded at spaces onto indented continuation lines of a markdown list item; never cut, never dropped."""
    if len(line) <= width:
        return line
    words, rows, row = line.split(" "), [], ""
    for w in words:
        if row and len(row) + 1 + len(w) > width:
            rows.append(row)
            row = w
        else:
            row = f"{row} {w}" if row else w
    rows.append(row)
    return "\n    ".join(rows)


def _fold_all(lines: list[str]) -> list[str]:
    return [fold(ln) for ln in lines]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _norm_version(v: str) -> str:
    return v.split("+", 1)[0]


def compatibility_table(summary: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compatibility record: per (nnsight, transformers, torch) combination, which findings passed; merged into `previous`."""
    rows = {(r["nnsight"], r["transformers"], r["torch"]): r for r in (previous or {}).get("combinations", [])}
    for e in summary["envs"]:
        v = e["versions"]
        if not v or "nnsight" not in v or e.get("error"):
            continue
        outcomes = {
            f["nodeid"]: f["envs"][e["name"]]["outcome"]
            for f in summary["findings"]
            if e["name"] in f["envs"] and not f["nodeid"].startswith("replay:")
        }
        ran = {k: o for k, o in outcomes.items() if o not in ("skipped", "xfail")}
        key = (_norm_version(v["nnsight"]), _norm_version(v["transformers"]), _norm_version(v["torch"]))
        rows[key] = {
            "nnsight": key[0],
            "transformers": key[1],
            "torch": key[2],
            "python": v.get("python", ""),
            "env": e["name"],
            "checked": summary["generated"][:10],
            "passed": sum(o in ("pass", "re-verified") for o in ran.values()),
            "total": len(ran),
            "ok": all(o in ("pass", "re-verified") for o in ran.values()) and bool(ran),
            "findings": outcomes,
        }
    return {
        "format": 1,
        "note": "written by CI/matrix.py --write-compat; read by the plugin's report header",
        "combinations": sorted(rows.values(), key=lambda r: (r["nnsight"], r["transformers"], r["torch"])),
    }


def write_reports(summary: dict[str, Any], out: Path) -> None:
    _atomic_write(out / "drift.json", json.dumps(summary, indent=1) + "\n")
    _atomic_write(out / "drift.md", render_markdown(summary))


# -- command line ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="CI/matrix.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default=str(HERE / "matrix.toml"), help="matrix config (.toml or .json; default CI/matrix.toml)"
    )
    p.add_argument("--out", required=True, help="directory for drift.md, drift.json and per-environment logs")
    p.add_argument("--only", action="append", default=[], metavar="ENV", help="run only this environment (repeatable)")
    p.add_argument("--cache-dir", default=None, help="where the venvs live (default: the config's cache_dir, .matrix/)")
    p.add_argument(
        "--rebuild", action="store_true", help="recreate the venvs even when their requirements are unchanged"
    )
    p.add_argument(
        "--build-only", action="store_true", help="build (or reuse) the environments and stop: no tests, no report"
    )
    p.add_argument(
        "--write-compat",
        default=None,
        metavar="PATH",
        help="also merge the results into this compatibility table "
        "(the package ships pytest_nnsight/compatibility.json)",
    )
    return p.parse_args(argv), extra


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config)
        names = [e.name for e in cfg.envs]
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise MatrixConfigError(
                f"--only {', '.join(unknown)}: no such environment in {args.config}; environments are {', '.join(names)}"
            )
        if any(a.startswith("--snapshot-update") for a in extra):
            raise MatrixConfigError("--snapshot-update after --: the matrix reads snapshots, it never rewrites them")
    except MatrixConfigError as exc:
        print(f"matrix config error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    cache = Path(args.cache_dir or cfg.cache_dir)
    cache = (cache if cache.is_absolute() else ROOT / cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    if args.build_only:
        failed = 0
        for env in cfg.envs:
            if args.only and env.name not in args.only:
                continue
            (out / env.name).mkdir(parents=True, exist_ok=True)
            built = build_env(env, cfg, cache, out / env.name / "log.txt", rebuild=args.rebuild)
            failed += not built["ok"]
            print(
                f"[matrix] {env.name}: "
                + (
                    "reused"
                    if built.get("reused")
                    else f"built in {built['seconds']} s"
                    if built["ok"]
                    else built["error"]
                ),
                flush=True,
            )
        return 1 if failed else 0
    for env in cfg.envs:
        if args.only and env.name not in args.only:
            continue
        print(f"[matrix] {env.name}: building / running ...", flush=True)
        r = run_env(env, cfg, out, cache, extra, rebuild=args.rebuild)
        counts: dict[str, int] = {}
        for t in r["tests"]:
            counts[classify(t)] = counts.get(classify(t), 0) + 1
        print(
            f"[matrix] {env.name}: {short_versions(r.get('versions', {}))}; build {r['build'].get('seconds')} s"
            f"{' (reused)' if r['build'].get('reused') else ''}; tests {r.get('test_seconds')} s; {counts or r.get('error')}",
            flush=True,
        )
        results.append(r)
    summary = summarize(results)
    write_reports(summary, out)
    if args.write_compat:
        path = Path(args.write_compat)
        previous = json.loads(path.read_text()) if path.is_file() else None
        _atomic_write(path, json.dumps(compatibility_table(summary, previous), indent=1) + "\n")
    print(
        f"[matrix] report: {out / 'drift.md'}" + ("" if summary["ok"] else f"; {len(summary['problems'])} problem(s)")
    )
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
