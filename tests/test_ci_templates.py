"""Lint of the CI templates under CI/ (no runner is available here): valid YAML, the keys GitHub and GitLab
require, pytest commands that use only options the plugin registers, torch from the CPU index before the
package on CPU jobs, the GPU job's options, the files the upgrade guard needs, and CI/ kept apart from .ci/run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

yaml = pytest.importorskip("yaml", reason="the CI template lint needs PyYAML: pip install -e '.[test]'")

from pytest_nnsight.settings import OPTIONS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GITHUB = {name: ROOT / "CI" / "github" / name for name in ("cpu-tests.yml", "gpu-tests.yml", "upgrade-guard.yml")}
GITLAB = ROOT / "CI" / "gitlab" / ".gitlab-ci.yml"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
FLAGS = {o.flag: o for o in OPTIONS}
GITLAB_RESERVED = {
    "stages",
    "variables",
    "default",
    "include",
    "workflow",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
}


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path}: top level is {type(doc).__name__}, expected a mapping"
    return doc


def on_key(doc: dict[str, Any]) -> Any:
    """The workflow's `on:` (YAML 1.1, which PyYAML speaks, reads a bare `on` key as True)."""
    return doc.get("on", doc.get(True))


def github_commands(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(job id, one shell command, its env) for every `run:` line of every job, in order."""
    for job_id, job in doc["jobs"].items():
        env = {**(doc.get("env") or {}), **(job.get("env") or {})}
        for step in job.get("steps", []):
            for line in _shell_lines(step.get("run", "")):
                yield job_id, line, {**env, **(step.get("env") or {})}


def gitlab_commands(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(job name, one shell command, its variables) for every `script:` entry of every job, in order."""
    for name, job in gitlab_jobs(doc).items():
        env = {**(doc.get("variables") or {}), **(job.get("variables") or {})}
        for entry in job.get("before_script", []) + job["script"]:
            for line in _shell_lines(entry):
                yield name, line, env


def gitlab_jobs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: v for k, v in doc.items() if k not in GITLAB_RESERVED and not str(k).startswith(".") and isinstance(v, dict)
    }


def _shell_lines(script: str) -> list[str]:
    """Commands of a script: continuation lines joined, comments dropped, `a && b`, `a || b`, `a; b` split (outside quotes)."""
    joined = re.sub(r"\\\n\s*", " ", script)
    out = []
    for line in joined.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        lex = shlex.shlex(_substitute_commands(line), posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        current: list[str] = []
        for tok in lex:
            if tok in (";", "&&", "||"):
                out += [shlex.join(current)] if current else []
                current = []
            else:
                current.append(tok)
        if current:
            out.append(shlex.join(current))
    return out


def pytest_args(command: str) -> list[str] | None:
    """The arguments after `pytest` / `python -m pytest` in a command, or None when it does not run pytest."""
    tokens = shlex.split(_substitute_commands(command))
    for i, tok in enumerate(tokens):
        if tok == "pytest" or tok.endswith("/pytest"):
            return tokens[i + 1 :]
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "pytest":
            return tokens[i + 2 :]
    return None


def _substitute_commands(command: str) -> str:
    """Replace each `$(...)` (nested parentheses included) by a plausible value, 2, so the line tokenizes."""
    out, i = [], 0
    while i < len(command):
        if command.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(command) and depth:
                depth += {"(": 1, ")": -1}.get(command[j], 0)
                j += 1
            out.append("2")
            i = j
        else:
            out.append(command[i])
            i += 1
    return "".join(out)


def nnsight_flag_problems(args: list[str]) -> list[str]:
    """Every --nnsight-* argument that the plugin does not register, or that lacks its value."""
    problems = []
    for i, arg in enumerate(args):
        if not arg.startswith("--nnsight-"):
            continue
        flag, _, inline = arg.partition("=")
        opt = FLAGS.get(flag)
        if opt is None:
            problems.append(f"{flag}: not an option of pytest-nnsight (registered: {', '.join(sorted(FLAGS))})")
        elif opt.metavar is not None and not inline and (i + 1 >= len(args) or args[i + 1].startswith("-")):
            problems.append(f"{flag} takes a value ({opt.metavar}) but none follows")
        elif opt.metavar is not None:
            value = inline or args[i + 1]
            if not value.startswith("$"):
                try:
                    opt.parse(value)
                except ValueError as exc:
                    problems.append(f"{flag} {value!r}: {exc}")
    return problems


def all_pytest_calls() -> list[tuple[str, str, list[str]]]:
    calls = []
    for path in GITHUB.values():
        calls += [
            (f"{path.name}:{job}", cmd, a)
            for job, cmd, _ in github_commands(load(path))
            if (a := pytest_args(cmd)) is not None
        ]
    calls += [
        (f".gitlab-ci.yml:{job}", cmd, a)
        for job, cmd, _ in gitlab_commands(load(GITLAB))
        if (a := pytest_args(cmd)) is not None
    ]
    return calls


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: str(env.get(m.group(1), m.group(0))), text)


# -- the files -------------------------------------------------------------------------------------


def test_every_template_exists_and_is_valid_yaml():
    for path in [*GITHUB.values(), GITLAB]:
        assert path.is_file(), f"missing CI template {path.relative_to(ROOT)}"
        load(path)


@pytest.mark.parametrize("name", sorted(GITHUB))
def test_github_workflow_has_the_required_keys(name):
    doc = load(GITHUB[name])
    assert on_key(doc), f"{name}: no `on:` trigger"
    assert isinstance(doc.get("jobs"), dict) and doc["jobs"], f"{name}: no jobs"
    for job_id, job in doc["jobs"].items():
        assert job.get("runs-on"), f"{name}: job {job_id} has no runs-on"
        assert isinstance(job.get("steps"), list) and job["steps"], f"{name}: job {job_id} has no steps"
        for i, step in enumerate(job["steps"]):
            assert ("uses" in step) != ("run" in step), (
                f"{name}: job {job_id} step {i} needs exactly one of uses/run: {step}"
            )
            if "uses" in step:
                assert re.match(r"^[\w.-]+/[\w./-]+@v\d+$", step["uses"]), (
                    f"{name}: {step['uses']!r} is not pinned to a major version"
                )
        # the runner context does not exist at job level: GitHub rejects the workflow
        assert "runner." not in str(job.get("env", {})), (
            f"{name}: job {job_id} env uses the runner context: {job['env']}"
        )


def test_gitlab_ci_has_stages_and_scripts():
    doc = load(GITLAB)
    stages = doc.get("stages")
    assert isinstance(stages, list) and stages, ".gitlab-ci.yml: no stages"
    jobs = gitlab_jobs(doc)
    assert {"cpu-tests", "gpu-tests"} <= set(jobs), f".gitlab-ci.yml jobs: {sorted(jobs)}"
    for name, job in jobs.items():
        assert isinstance(job.get("script"), list) and job["script"], f".gitlab-ci.yml: job {name} has no script"
        assert job.get("stage") in stages, (
            f".gitlab-ci.yml: job {name} stage {job.get('stage')!r} is not one of {stages}"
        )
        assert job.get("artifacts", {}).get("when") == "always", (
            f".gitlab-ci.yml: job {name} must keep its report when tests fail"
        )


# -- the pytest commands -------------------------------------------------------------------------


def test_pytest_commands_use_only_registered_nnsight_options():
    calls = all_pytest_calls()
    assert len(calls) == 4, (
        f"expected the pytest runs of cpu-tests, gpu-tests (GitHub and GitLab), found {[c[0] for c in calls]}"
    )
    problems = [f"{where}: {p}\n  {cmd}" for where, cmd, args in calls for p in nnsight_flag_problems(args)]
    assert not problems, "\n".join(problems)
    assert "--nnsight-report" in FLAGS, (
        "the templates upload --nnsight-report's directory, but the plugin has no such option"
    )


def test_pytest_commands_parse_with_the_real_option_parser(pytester):
    """Every pytest argument (xdist's -n, --junitxml, the nnsight options) is accepted by pytest's parser as installed here."""
    for where, cmd, args in all_pytest_calls():
        try:
            config = pytester.parseconfig(*args)
        except pytest.UsageError as exc:
            pytest.fail(f"{where}: pytest rejects the arguments: {exc}\n  {cmd}")
        assert config.getoption("nnsight_device") in ("cpu", "cuda"), f"{where}: {cmd}"


def test_the_lint_catches_a_misspelt_option_and_a_missing_value():
    args = pytest_args(
        'python -m pytest -rA --nnsight-devcie cuda --nnsight-report --nnsight-dtype float8 -n "$(nproc)"'
    )
    problems = nnsight_flag_problems(args)
    assert len(problems) == 3, problems
    assert "--nnsight-devcie: not an option" in problems[0]
    assert "--nnsight-report takes a value (DIR)" in problems[1]
    assert "--nnsight-dtype 'float8'" in problems[2]


def test_cpu_jobs_install_the_cpu_torch_before_the_package():
    jobs = [(f"cpu-tests.yml:{j}", c, e) for j, c, e in github_commands(load(GITHUB["cpu-tests.yml"]))]
    jobs += [(f".gitlab-ci.yml:{j}", c, e) for j, c, e in gitlab_commands(load(GITLAB)) if j == "cpu-tests"]
    for job in sorted({w for w, _, _ in jobs}):
        installs = [expand(c, e) for w, c, e in jobs if w == job and re.search(r"\bpip install\b", c)]
        assert installs, f"{job}: no pip install"
        first = shlex.split(installs[0])
        index = first[first.index("--index-url") + 1] if "--index-url" in first else None
        assert "torch==2.13.0" in first and index == CPU_INDEX, (
            f"{job}: the first install must be torch==2.13.0 from {CPU_INDEX}: {installs[0]}"
        )
        later = [c for c in installs[1:] if any(re.match(r"^torch([=<>!~\[]|$)", t) for t in shlex.split(c))]
        assert not later, f"{job}: a later install names torch again, without the CPU index: {later}"
        pytest_run = [expand(c, e) for w, c, e in jobs if w == job and pytest_args(c) is not None]
        assert pytest_run and "--nnsight-device cpu" in pytest_run[0], f"{job}: {pytest_run}"
    gh = load(GITHUB["cpu-tests.yml"])
    setup = [s for s in gh["jobs"]["cpu-tests"]["steps"] if s.get("uses", "").startswith("actions/setup-python")]
    assert setup and setup[0]["with"].get("cache") == "pip", "cpu-tests.yml: setup-python must cache pip"


def test_gpu_jobs_run_on_gpu_runners_and_fail_on_missing_weights():
    gh = load(GITHUB["gpu-tests.yml"])
    job = gh["jobs"]["gpu-tests"]
    assert {"self-hosted", "gpu"} <= set(job["runs-on"]), job["runs-on"]
    assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    gl = load(GITLAB)["gpu-tests"]
    assert "gpu" in gl["tags"], gl.get("tags")
    runs = [a for where, _, a in all_pytest_calls() if "gpu-tests" in where]
    assert len(runs) == 2
    for args in runs:
        line = " ".join(args)
        assert "--nnsight-device cuda" in line and "--nnsight-require-models" in line, line
        report = args[args.index("--nnsight-report") + 1]
        junit = args[args.index("--junitxml") + 1]
        assert junit.startswith(report), f"--junitxml {junit} is outside the uploaded report dir {report}"
    steps = job["steps"]
    restore = next(s for s in steps if s.get("uses", "").startswith("actions/cache/restore"))
    save = next(s for s in steps if s.get("uses", "").startswith("actions/cache/save"))
    assert restore["with"]["path"] == save["with"]["path"] == "${{ env.HF_HOME }}"
    assert restore["with"]["key"] == save["with"]["key"] and "always()" in save["if"]
    assert any("HF_HOME=" in s.get("run", "") for s in steps[: steps.index(restore)]), (
        "HF_HOME must be set before the cache is restored"
    )
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"].rstrip("/") == report.rstrip("/")
    assert ".cache/huggingface" in gl["cache"]["paths"] and gl["variables"].get("GPU_IMAGE")


# -- the upgrade guard ---------------------------------------------------------------------------------


def test_upgrade_guard_is_scheduled_and_fails_on_drift():
    doc = load(GITHUB["upgrade-guard.yml"])
    crons = [s["cron"] for s in on_key(doc)["schedule"]]
    assert crons and all(len(c.split()) == 5 for c in crons), crons
    (job,) = doc["jobs"].values()
    runs = [s for s in job["steps"] if "CI/matrix.py" in s.get("run", "")]
    assert len(runs) == 1, "upgrade-guard.yml must run CI/matrix.py once"
    argv = shlex.split(runs[0]["run"])
    assert argv[:2] == ["python", "CI/matrix.py"] and argv[argv.index("--config") + 1] == "CI/matrix.toml", argv
    out = argv[argv.index("--out") + 1]
    assert not runs[0].get("continue-on-error"), "a drift must fail the job"
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"].rstrip("/") == out


def test_upgrade_guard_files_exist_and_take_its_arguments():
    script, config = ROOT / "CI" / "matrix.py", ROOT / "CI" / "matrix.toml"
    missing = [str(p.relative_to(ROOT)) for p in (script, config) if not p.is_file()]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not in this checkout yet (the version-matrix work): upgrade-guard.yml calls them"
        )
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--out" in out.stdout, out.stdout


# -- keeping CI/ and .ci/run apart, and the docs ---------------------------------------------------------


def test_templates_do_not_call_this_repositorys_own_check():
    for path in [*GITHUB.values(), GITLAB]:
        text = path.read_text()
        assert ".ci/run" not in text and "make test" not in text, f"{path.name} calls this repository's own check"
    own = (ROOT / ".ci" / "run").read_text()
    assert "CI/github" not in own and "CI/gitlab" not in own, ".ci/run must not run the user templates"


def test_readmes_explain_how_to_adopt_the_templates():
    guide = (ROOT / "CI" / "README.md").read_text()
    for needle in (
        "cpu-tests.yml",
        "gpu-tests.yml",
        "upgrade-guard.yml",
        ".gitlab-ci.yml",
        ".github/workflows/",
        "HF_TOKEN",
        "NDIF_API_KEY",
        "self-hosted",
        "matrix.toml",
    ):
        assert needle in guide, f"CI/README.md does not mention {needle}"
    page = (ROOT / "docs" / "ci.md").read_text()
    section = page.split("## Running findings in CI", 1)
    assert len(section) == 2, "docs/ci.md has no '## Running findings in CI' section"
    assert "CI/README.md" in section[1].split("\n## ", 1)[0]
