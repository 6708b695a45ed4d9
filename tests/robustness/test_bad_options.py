"""Bad option values, ini keys and environment variables stop the run with one usage error naming the value,
where it came from and what is accepted; a failing finding's output never shows nnsight's internals."""

from __future__ import annotations

import pytest

PASSING = "def test_nothing():\n    pass\n"

# id: (command line args, ini text, env, fragments expected on stderr)
OPTION_CASES = {
    "device unknown": (
        ["--nnsight-device", "gpu"],
        "",
        {},
        [r"'gpu'", r"command line option --nnsight-device", r"auto, cpu, cuda or cuda:N"],
    ),
    "device cuda index": (["--nnsight-device", "cuda:x"], "", {}, [r"'cuda:x'", r"auto, cpu, cuda or cuda:N"]),
    "dtype unknown": (["--nnsight-dtype", "float8"], "", {}, [r"'float8'", r"float32, float16 or bfloat16"]),
    "batching cells zero": (["--nnsight-check-batching-cells", "0"], "", {}, [r"'0'", r"positive integer"]),
    "batching cells a word": (["--nnsight-check-batching-cells", "many"], "", {}, [r"'many'", r"positive integer"]),
    "snapshot atol negative": (["--nnsight-snapshot-atol=-1"], "", {}, [r"'-1'", r"number >= 0"]),
    "snapshot rtol NaN": (["--nnsight-snapshot-rtol", "nan"], "", {}, [r"'nan'", r"finite number >= 0"]),
    "snapshot atol infinite": (["--nnsight-snapshot-atol", "inf"], "", {}, [r"'inf'", r"finite number >= 0"]),
    "hypothesis profile unknown": (
        ["--nnsight-hypothesis-profile", "nosuch"],
        "",
        {},
        [r"'nosuch'", r"nnsight-dev or nnsight-ci"],
    ),
    "hypothesis profile malformed": (["--nnsight-hypothesis-profile", "a b"], "", {}, [r"'a b'", r"profile name"]),
    "env bool not a bool": (
        [],
        "",
        {"PYTEST_NNSIGHT_OFFLINE": "maybe"},
        [r"'maybe'", r"environment variable PYTEST_NNSIGHT_OFFLINE", r"true or false"],
    ),
    "env cache dir blank": ([], "", {"PYTEST_NNSIGHT_CACHE_DIR": "  "}, [r"'  '", r"directory path"]),
    "ini dtype": ([], "[pytest]\nnnsight_dtype = half\n", {}, [r"'half'", r"ini key nnsight_dtype", r"float32"]),
    "ini bool": ([], "[pytest]\nnnsight_require_models = sometimes\n", {}, [r"'sometimes'", r"true or false"]),
    "ini deterministic": (
        [],
        "[pytest]\nnnsight_deterministic = strict\n",
        {},
        [r"'strict'", r"nnsight_deterministic", r"true or false"],
    ),
}


@pytest.mark.parametrize("case", list(OPTION_CASES), ids=list(OPTION_CASES))
def test_bad_option_is_a_usage_error_naming_it(pytester, monkeypatch, case):
    args, ini, env, fragments = OPTION_CASES[case]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if ini:
        pytester.makeini(ini)
    pytester.makepyfile(PASSING)
    result = pytester.runpytest_inprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, (
        f"{case}: exit {result.ret}\n{result.stdout.str()}\n{result.stderr.str()}"
    )
    err = result.stderr.str()
    import re

    for fragment in fragments:
        assert re.search(fragment, err), f"{case}: {fragment!r} not in stderr:\n{err}"
    assert "Traceback" not in err and "/nnsight/" not in err + result.stdout.str()


def test_cuda_asked_for_where_there_is_none_stops_the_run(pytester):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to refuse")
    pytester.makepyfile(PASSING)
    result = pytester.runpytest_inprocess("--nnsight-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*device 'cuda' asked for, but torch * sees no CUDA device: use cpu or auto*"])


def test_empty_models_marker_is_a_usage_error(pytester):
    pytester.makepyfile("import pytest\n\n@pytest.mark.nnsight_models()\ndef test_x(model):\n    pass\n")
    result = pytester.runpytest_inprocess()
    assert result.ret in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERRUPTED)
    assert "needs at least one model id" in result.stdout.str() + result.stderr.str()


def test_cache_dir_under_a_regular_file_fails_the_test_naming_it(pytester):
    """Root ignores chmod, so the unwritable directory is one whose parent is a regular file."""
    pytester.makefile(".txt", blocker="the user's file\n")
    pytester.makepyfile(
        "def test_cached(activation_cache, nnsight_model):\n"
        "    activation_cache.get(nnsight_model('bundled:capitals'), ['The capital of France is'])\n"
    )
    before = (pytester.path / "blocker.txt").read_bytes()
    result = pytester.runpytest_inprocess("--nnsight-cache-dir", "blocker.txt/cache", "--nnsight-device", "cpu")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "blocker.txt/cache" in out and "--nnsight-no-cache" in out and "--nnsight-cache-dir" in out, out
    assert "/nnsight/" not in out
    assert (pytester.path / "blocker.txt").read_bytes() == before


def test_a_failing_finding_shows_no_nnsight_frames(pytester):
    pytester.makepyfile(
        "from pytest_nnsight import patch\n\n"
        "def test_bad_metric(nnsight_model):\n"
        "    model = nnsight_model('bundled:capitals')\n"
        "    patch(model, 'The capital of France is', 'The capital of Germany is', site='transformer.h.0', position='last',\n"
        "          metric=lambda out: out['logits_typo'])\n"
    )
    result = pytester.runpytest_inprocess("--nnsight-device", "cpu")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "MetricError: metric <lambda> raised KeyError" in out, out
    # nnsight's frames, not pytest_nnsight's
    assert "site-packages/nnsight/" not in out and "/nnsight/intervention" not in out, out


def test_report_dir_under_a_regular_file_is_a_usage_error(pytester):
    pytester.makefile(".txt", blocker="the user's file\n")
    pytester.makepyfile(PASSING)
    before = (pytester.path / "blocker.txt").read_bytes()
    result = pytester.runpytest_inprocess("--nnsight-report", "blocker.txt/report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines(["*cannot write the findings report to *blocker.txt/report*--nnsight-report*"])
    assert (pytester.path / "blocker.txt").read_bytes() == before


FINDING = (
    "from pytest_nnsight import logit_diff, sweep, assert_peaks_at\n\n"
    "def test_map(nnsight_model):\n"
    "    model = nnsight_model('bundled:capitals')\n"
    "    effects = sweep(model, 'The capital of France is', 'The capital of Germany is', metric=logit_diff('Paris', 'Berlin'))\n"
    "    assert_peaks_at(effects, [('resid_post.1', -1)], at_least=0.5, elsewhere_at_most=1.5)\n"
)


def test_report_without_matplotlib_still_writes_its_text_files(pytester, monkeypatch):
    """matplotlib is the optional 'report' extra: absent (sys.modules entry None), the report has no figures and says why."""
    import json
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    pytester.makepyfile(FINDING)
    result = pytester.runpytest_inprocess("--nnsight-device", "cpu", "--nnsight-report", "report")
    result.assert_outcomes(passed=1)
    report = pytester.path / "report"
    assert sorted(p.name for p in report.iterdir() if p.is_file()) == ["findings.json", "findings.md", "index.html"]
    assert json.loads((report / "findings.json").read_text())["findings"], "the report holds no finding"
    assert not list(report.rglob("*.png"))
    assert "pip install pytest-nnsight[report]" in result.stdout.str()
