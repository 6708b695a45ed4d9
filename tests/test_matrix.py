"""The version matrix driver (CI/matrix.py) on fake results, its config validation, its collection plugin, and the compatibility header."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_nnsight import compatibility

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "CI"


def _load_matrix():
    spec = importlib.util.spec_from_file_location("ci_matrix", CI / "matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_matrix"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


matrix = _load_matrix()

V_NEW = {"nnsight": "0.8.1", "transformers": "5.24.0", "torch": "2.13.0+cpu", "python": "3.11.7"}
V_OLD = {"nnsight": "0.8.1", "transformers": "4.57.6", "torch": "2.13.0+cpu", "python": "3.11.7"}


def _test(nodeid, outcome="passed", **kw):
    return {
        "nodeid": nodeid,
        "outcome": outcome,
        "when": "call",
        "duration": 0.5,
        "message": "",
        "snapshot": [],
        "drift": [],
        **kw,
    }


def _fake_results():
    replay_ok = {
        "name": "block0_last",
        "test": "ex.py::test_spec[block0_last]",
        "quantity": "normalized",
        "status": "stable",
        "diagnosis": "agree",
        "recorded": {"normalized": 0.9997},
        "nnsight": {"normalized": 0.9997},
        "replay": {"normalized": 0.9997},
    }
    replay_moved = {
        **replay_ok,
        "status": "tracing-changed",
        "diagnosis": "nnsight's normalized moved (0.9997 -> 0.1) but plain torch ...",
        "nnsight": {"normalized": 0.1},
    }
    new = {
        "name": "pinned",
        "versions": V_NEW,
        "build": {"ok": True, "reused": False, "seconds": 171.0},
        "test_seconds": 40.0,
        "error": "",
        "tests": [
            _test("ex.py::test_map"),
            _test("ex.py::test_spec[block0_last]"),
            _test("ex.py::test_gpt2", "skipped"),
        ],
        "replay": [replay_ok],
    }
    old = {
        "name": "tf4",
        "versions": V_OLD,
        "build": {"ok": True, "reused": True, "seconds": 0.0},
        "test_seconds": 45.0,
        "error": "",
        "tests": [
            _test(
                "ex.py::test_map",
                "failed",
                exception="AssertionError",
                message="AssertionError: snapshot",
                drift=[
                    "this finding drifted after transformers 5.24.0 -> 4.57.6 (--snapshot-update accepts it)",
                    "3 / 18 cells moved (16.7%)",
                ],
            ),
            _test(
                "ex.py::test_spec[block0_last]",
                snapshot=["re-verified under a new environment: transformers 5.24.0 -> 4.57.6 (within atol 0.001)"],
            ),
            _test(
                "ex.py::test_gpt2",
                "failed",
                exception="TypeError",
                message="TypeError: 'tuple' object does not support item assignment",
            ),
        ],
        "replay": [replay_moved],
    }
    return [new, old]


def test_classify_reads_the_snapshot_notes_and_the_failure():
    assert matrix.classify(_test("a")) == "pass"
    assert (
        matrix.classify(
            _test("a", snapshot=["re-verified under a new environment: nnsight 0.7.0 -> 0.8.1 (within ...)"])
        )
        == "re-verified"
    )
    assert (
        matrix.classify(
            _test("a", "failed", exception="AssertionError", drift=["this finding drifted after torch 2.12 -> 2.13"])
        )
        == "drifted"
    )
    assert matrix.classify(_test("a", "failed", exception="AssertionError")) == "failed"
    assert matrix.classify(_test("a", "failed", exception="OutOfOrderError")) == "errored"
    assert matrix.classify(_test("a", "error")) == "errored"
    assert matrix.classify(_test("a", "skipped")) == "skipped"
    assert matrix.classify(_test("a", "xfailed")) == "xfail"


def test_report_on_fake_results(tmp_path):
    summary = matrix.summarize(_fake_results())
    assert not summary["ok"]
    rows = {f["nodeid"]: f["envs"] for f in summary["findings"]}
    assert (
        rows["ex.py::test_map"]["pinned"]["outcome"] == "pass"
        and rows["ex.py::test_map"]["tf4"]["outcome"] == "drifted"
    )
    assert rows["ex.py::test_spec[block0_last]"]["tf4"]["outcome"] == "re-verified"
    assert rows["ex.py::test_gpt2"]["tf4"]["outcome"] == "errored"
    assert sorted(summary["problems"]) == sorted(
        [
            "tf4: ex.py::test_map drifted",
            "tf4: ex.py::test_gpt2 errored",
            "tf4: replay block0_last: nnsight's normalized moved (0.9997 -> 0.1) but plain torch ...",
        ]
    )
    matrix.write_reports(summary, tmp_path)
    md = (tmp_path / "drift.md").read_text()
    assert "| pinned | 0.8.1 | 5.24.0 | 2.13.0+cpu | 3.11.7 | 171 s | 40 s |" in md
    assert "| tf4 | 0.8.1 | 4.57.6 | 2.13.0+cpu | 3.11.7 | reused | 45 s |" in md
    assert "| `ex.py::test_map` | pass | drifted |" in md
    assert "| `ex.py::test_spec[block0_last]` | pass; replay: stable | re-verified; replay: tracing-changed |" in md
    assert "| block0_last | tf4 | 0.9997 | 0.1 | 0.9997 | nnsight's normalized moved" in md
    assert "  - 3 / 18 cells moved (16.7%)" in md
    assert json.loads((tmp_path / "drift.json").read_text())["problems"] == summary["problems"]
    assert not list(tmp_path.glob("*.tmp"))


H1 = (
    "transformer.h.*: output changed from tuple(Tensor[b,s,64]) to Tensor[b,s,64]; code that reads .output[0] now selects batch row 0 "
    "instead of the hidden states, and writes to .output[0] change only batch row 0 (H1/H2)"
)


def test_report_keeps_every_explanation_line_whole(tmp_path):
    """A structure failure of 9 lines with a 190-character H1 line: drift.json keeps the message whole, drift.md every line
    (a line over the fold width continues on the next line, never cut)."""
    lines = ["AssertionError: the structure of bundled:capitals changed after transformers 5.24.0 -> 4.57.6:", H1]
    lines += [
        f"transformer.h.{i}.attn: call signature changed: 4 -> 6 args; kwargs +cache_position -position_ids"
        for i in range(6)
    ]
    lines += ["run pytest --snapshot-update to accept the change"]
    long_line = "nnsight: " + " ".join(["word"] * 80)  # 400+ characters
    message = "\n".join(lines[:2] + [long_line] + lines[2:])
    env = {
        "name": "tf4",
        "versions": V_OLD,
        "build": {"ok": True},
        "test_seconds": 1.0,
        "error": "",
        "tests": [_test("ex.py::test_structure", "failed", exception="AssertionError", message=message)],
        "structure": {
            "bundled:capitals": {
                "status": "changed",
                "changes": ["transformers 5.24.0 -> 4.57.6"],
                "lines": [H1, long_line],
            }
        },
    }
    summary = matrix.summarize([env])
    matrix.write_reports(summary, tmp_path)
    stored = json.loads((tmp_path / "drift.json").read_text())
    assert stored["findings"][0]["envs"]["tf4"]["message"] == message
    assert stored["envs"][0]["structure"]["bundled:capitals"]["lines"] == [H1, long_line]
    md = (tmp_path / "drift.md").read_text()
    assert f"  - {H1}" in md  # whole, in the details and in the structure lock section
    assert md.count(H1) == 2
    for line in lines[2:]:
        assert f"  - {line}" in md
    folded = md[md.index("  - nnsight: word") :].split("\n")
    rebuilt = folded[0][4:] + "".join(
        " " + row.strip() for row in folded[1:] if row.startswith("    ") and not row.startswith("  - ")
    )
    assert rebuilt.startswith(long_line) and all(len(row) <= matrix.FOLD + 4 for row in folded[:3])
    assert (
        "## Structure lock" in md
        and "- **tf4**: the structure of `bundled:capitals` changed after transformers 5.24.0 -> 4.57.6:" in md
    )


def test_compatibility_table_from_fake_results():
    summary = matrix.summarize(_fake_results())
    previous = {
        "combinations": [
            {"nnsight": "0.7.0", "transformers": "5.24.0", "torch": "2.13.0", "ok": True, "passed": 1, "total": 1},
            {"nnsight": "0.8.1", "transformers": "4.57.6", "torch": "2.13.0", "ok": True, "passed": 9, "total": 9},
        ]
    }
    table = matrix.compatibility_table(summary, previous)
    rows = {(r["nnsight"], r["transformers"], r["torch"]): r for r in table["combinations"]}
    assert set(rows) == {("0.7.0", "5.24.0", "2.13.0"), ("0.8.1", "4.57.6", "2.13.0"), ("0.8.1", "5.24.0", "2.13.0")}
    new, old = rows[("0.8.1", "5.24.0", "2.13.0")], rows[("0.8.1", "4.57.6", "2.13.0")]
    assert (new["passed"], new["total"], new["ok"]) == (2, 2, True)  # the skipped test is not counted
    assert (old["passed"], old["total"], old["ok"]) == (1, 3, False)  # replaced, not kept from `previous`
    assert old["findings"]["ex.py::test_gpt2"] == "errored"


BAD_CONFIGS = [
    ("nothing.toml", 'tests = ["examples"]\n', "no environments: add at least one [[env]]"),
    (
        "unknown.toml",
        '[[env]]\nname = "a"\nrequirements = ["nnsight==0.8.1"]\nreqs = ["x"]\n',
        "env #1: unknown key(s) reqs: accepted keys are",
    ),
    ("noreqs.toml", '[[env]]\nname = "a"\n', "env 'a': missing requirements"),
    (
        "torch.toml",
        '[[env]]\nname = "a"\nrequirements = ["torch>=2"]\n',
        "'torch>=2' in the requirements: torch is pinned once",
    ),
    (
        "unpinned.toml",
        'torch = "torch"\n[[env]]\nname = "a"\nrequirements = ["nnsight"]\n',
        "torch = 'torch': expected an exact pin",
    ),
    (
        "dup.toml",
        '[[env]]\nname = "a"\nrequirements = ["x"]\n[[env]]\nname = "a"\nrequirements = ["y"]\n',
        "name 'a' is used twice",
    ),
    ("badname.toml", '[[env]]\nname = "a b"\nrequirements = ["x"]\n', "name = 'a b': expected letters, digits"),
    ("broken.toml", '[[env]\nname = "a"\n', "not valid TOML"),
    (
        "strs.toml",
        '[[env]]\nname = "a"\nrequirements = [1, 2]\n',
        "requirements = [1, 2]: expected a list of non-empty strings",
    ),
]


@pytest.mark.parametrize("name, text, message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_configs_get_one_clear_message(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    assert matrix.main(["--config", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("matrix config error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_unknown_env_snapshot_update_and_missing_file(tmp_path, capsys):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[[env]]\nname = "pinned"\nrequirements = ["nnsight==0.8.1"]\n')
    assert matrix.main(["--config", str(cfg), "--out", str(tmp_path / "o"), "--only", "newest"]) == 2
    assert "--only newest: no such environment" in capsys.readouterr().err
    assert matrix.main(["--config", str(cfg), "--out", str(tmp_path / "o"), "--", "examples", "--snapshot-update"]) == 2
    assert "never rewrites them" in capsys.readouterr().err
    # the script itself, as CI calls it (standard library only, so it starts fast)
    out = subprocess.run(
        [sys.executable, str(CI / "matrix.py"), "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        out.returncode == 2
        and "config file" in out.stderr
        and "nope.toml" in out.stderr
        and "does not exist" in out.stderr
    )


def test_the_shipped_config_is_valid():
    cfg = matrix.load_config(str(CI / "matrix.toml"))
    names = [e.name for e in cfg.envs]
    assert "pinned" in names and len(names) >= 2 and cfg.torch == "torch==2.13.0"
    pins = {r.split("==")[1] for e in cfg.envs for r in e.requirements if r.startswith("nnsight==")}
    assert {"0.5.15", "0.7.0", "0.8.1"} <= pins and any(p.startswith("0.6.") for p in pins), pins
    floating = [e for e in cfg.envs if e.floating]
    assert len(floating) == 1 and floating[0].requirements == ["nnsight", "transformers"], (
        "the newest releases, unpinned"
    )


def test_floating_env_is_rebuilt_every_run(tmp_path, monkeypatch):
    """A floating environment is never reused from the cache; a pinned one is while its requirements are unchanged."""
    cfg = matrix.parse_config(
        {
            "env": [
                {"name": "pinned", "requirements": ["nnsight==0.8.1"]},
                {"name": "floating", "requirements": ["nnsight"], "floating": True},
            ]
        }
    )
    calls = []

    def fake_run(cmd, log, **kw):
        calls.append([str(c) for c in cmd])
        if "venv" in calls[-1]:
            (tmp_path / "floating").mkdir()
        return 0

    monkeypatch.setattr(matrix, "_run", fake_run)
    for env in cfg.envs:  # a venv that looks built, with the current key
        (tmp_path / env.name / "bin").mkdir(parents=True)
        (tmp_path / env.name / "bin" / "python").write_text("")
        (tmp_path / env.name / ".matrix-env.json").write_text(json.dumps({"key": matrix.env_key(env, cfg)}))
    assert matrix.build_env(cfg.envs[0], cfg, tmp_path, tmp_path / "log.txt")["reused"] is True and not calls
    built = matrix.build_env(cfg.envs[1], cfg, tmp_path, tmp_path / "log.txt")
    assert built["ok"] and built["reused"] is False
    assert calls[-1][-5:-1] == ["install", "-q", "--no-deps", "-e"]  # the plugin, without dependency resolution
    assert any("nnsight" in c for c in calls[2]) and not any("pytest-nnsight" in c for c in calls[2])


def test_failed_build_shows_pips_reason(tmp_path, monkeypatch):
    cfg = matrix.parse_config({"env": [{"name": "next", "requirements": ["nnsight==0.9.0", "pytest-nnsight"]}]})
    pip_out = (
        "WARNING: Location 'file:///opt/pypi/simple/x/' is ignored\n"
        "INFO: pip is looking at multiple versions of pytest-nnsight to determine which version is compatible.\n"
        "The conflict is caused by:\n    The user requested nnsight==0.9.0\n    pytest-nnsight 0.1.0 depends on nnsight<0.9 and >=0.8\n"
        "To fix this you could try to:\n1. loosen the range of package versions you've specified\n"
        "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-dependency-conflicts\n"
    )

    def fake_run(cmd, log, **kw):
        if "nnsight==0.9.0" in [str(c) for c in cmd]:
            with open(log, "a") as handle:
                handle.write(pip_out)
            return 1
        return 0

    monkeypatch.setattr(matrix, "_run", fake_run)
    built = matrix.build_env(cfg.envs[0], cfg, tmp_path, tmp_path / "log.txt")
    assert not built["ok"]
    assert (
        built["reason"][0] == "The conflict is caused by:"
        and "    pytest-nnsight 0.1.0 depends on nnsight<0.9 and >=0.8" in built["reason"]
    )
    assert built["reason"][-1].startswith("ERROR: ResolutionImpossible")
    assert "nnsight==0.9.0" in built["error"] and "ResolutionImpossible" in built["error"]


def test_collect_plugin_records_outcomes(pytester, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(CI))
    out = tmp_path / "results.json"
    monkeypatch.setenv("PYTEST_NNSIGHT_MATRIX_RESULTS", str(out))
    pytester.makepyfile(
        test_x="""
        import pytest
        def test_ok(): pass
        def test_claim(): assert 1 + 1 == 3
        def test_crash(): raise TypeError("'tuple' object does not support item assignment")
        def test_drift():
            raise AssertionError("snapshot\\nthis finding drifted after transformers 5.24.0 -> 4.57.6 (--snapshot-update accepts it)\\n3 / 18 cells moved")
        @pytest.mark.skip(reason="no weights")
        def test_skip(): pass
        @pytest.mark.xfail(reason="known gap")
        def test_known(): assert False
    """
    )
    pytester.runpytest_inprocess("-p", "matrix_collect")
    records = {r["nodeid"].split("::")[1]: r for r in json.loads(out.read_text())["tests"]}
    assert {k: matrix.classify(r) for k, r in records.items()} == {
        "test_ok": "pass",
        "test_claim": "failed",
        "test_crash": "errored",
        "test_drift": "drifted",
        "test_skip": "skipped",
        "test_known": "xfail",
    }
    assert records["test_drift"]["drift"][:2] == [
        "this finding drifted after transformers 5.24.0 -> 4.57.6 (--snapshot-update accepts it)",
        "3 / 18 cells moved",
    ]


def _table(tmp_path, combos):
    path = tmp_path / "compat.json"
    path.write_text(
        json.dumps(
            {
                "format": 1,
                "combinations": [
                    {
                        "nnsight": n,
                        "transformers": t,
                        "torch": to,
                        "env": "e",
                        "checked": "2026-11-27",
                        "passed": 7,
                        "total": 8,
                        "ok": False,
                    }
                    for n, t, to in combos
                ],
            }
        )
    )
    return path


def test_header_says_when_the_installed_combination_was_checked(pytester, monkeypatch, tmp_path):
    monkeypatch.setattr(
        compatibility, "TABLE", _table(tmp_path, [("0.7.0", "5.24.0", "2.13.0"), compatibility.installed()])
    )
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess()
    n, t, to = compatibility.installed()
    result.stdout.fnmatch_lines(
        [
            f"pytest-nnsight compatibility: nnsight {n}, transformers {t}, torch {to} checked by the version matrix on 2026-11-27 "
            "(env e): 7/8 example findings pass (NOT all pass)"
        ]
    )


def test_header_says_when_the_installed_combination_was_not_checked(pytester, monkeypatch, tmp_path):
    monkeypatch.setattr(compatibility, "TABLE", _table(tmp_path, [("0.7.0", "5.24.0", "2.13.0")]))
    monkeypatch.setattr(compatibility, "installed", lambda: ("0.6.3", "4.57.6", "2.14.0"))
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess()
    result.stdout.fnmatch_lines(
        [
            "pytest-nnsight compatibility: nnsight 0.6.3, transformers 4.57.6, torch 2.14.0 has NOT been checked by the "
            "version matrix (checked nnsight/transformers/torch: 0.7.0/5.24.0/2.13.0); run CI/matrix.py*"
        ]
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    "fake, newer",
    [
        (("0.9.0", "5.24.0", "2.13.0"), "nnsight 0.9.0"),
        (("0.8.1", "5.30.1", "2.13.0"), "transformers 5.30.1"),
        (("0.10.0", "6.0.0", "2.13.0"), "nnsight 0.10.0 and transformers 6.0.0"),
    ],
)
def test_header_warns_outside_the_checked_range(pytester, monkeypatch, tmp_path, fake, newer):
    """A version newer than the table's newest (faked: nothing installed) runs, with a one-line warning in the header."""
    monkeypatch.setattr(
        compatibility, "TABLE", _table(tmp_path, [("0.7.0", "5.24.0", "2.13.0"), ("0.8.1", "4.57.6", "2.13.0")])
    )
    monkeypatch.setattr(compatibility, "installed", lambda: fake)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess()
    result.stdout.fnmatch_lines(
        [
            f"pytest-nnsight WARNING: {newer} is outside the checked range (newest checked: nnsight 0.8.1, "
            "transformers 5.24.0): run the version matrix (CI/matrix.py) before trusting this run"
        ]
    )
    assert "has NOT been checked" not in result.stdout.str()
    result.assert_outcomes(passed=1)


def test_header_survives_a_broken_table(pytester, monkeypatch, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setattr(compatibility, "TABLE", tmp_path / "bad.json")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess()
    result.stdout.fnmatch_lines(["pytest-nnsight compatibility: the table *bad.json' is unreadable (JSONDecodeError)*"])
    result.assert_outcomes(passed=1)


def test_shipped_table_covers_the_installed_combination():
    """The package ships the matrix's latest table, written by CI/matrix.py --write-compat; this venv's combination is in it."""
    rows = compatibility.load_table()
    assert rows, (
        "pytest_nnsight/compatibility.json is missing or empty: run CI/matrix.py --write-compat pytest_nnsight/compatibility.json"
    )
    assert compatibility.lookup(rows, compatibility.installed()) is not None, (compatibility.installed(), rows)
