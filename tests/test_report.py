"""Findings summary, report folder, JUnit XML properties: checked against the numbers each inner test measured itself."""

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_nnsight import findings
from pytest_nnsight.records import Check, EffectRecord, Finding, MapRecord

# Inner tests dump what they measured, computed from the raw numbers, to measured.json beside them:
# the report must carry the same numbers, read back from findings.json / the JUnit XML.
DUMP = """
import json, pathlib
OUT = pathlib.Path(__file__).with_name("measured.json")

def dump(key, value):
    d = json.loads(OUT.read_text()) if OUT.exists() else {}
    d[key] = value
    OUT.write_text(json.dumps(d))
"""

CAPITALS_FINDINGS = (
    DUMP
    + """
import pytest
from pytest_nnsight import assert_peaks_at, assert_restores, bundled, logit_diff, patch, sweep
from pytest_nnsight.sites import blocks, embed
from pytest_nnsight.populations import assert_population, population
from pytest_nnsight.strategies import counterfactual_pairs
from pytest_nnsight.wordlists import CAPITAL_TEMPLATES, CAPITALS

PAIRS = counterfactual_pairs(bundled.tokenizer("bundled:capitals"), CAPITAL_TEMPLATES, {"country": CAPITALS})
CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"

@pytest.mark.finding("block 0 moves the country to the last position")
def test_patch(nnsight_model):
    m = nnsight_model("bundled:capitals")
    e = patch(m, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=logit_diff("Paris", "Berlin"))
    dump("patch", (float(e.intervened) - e.target) / (e.source - e.target))
    assert_restores(e, 0.9)

def test_map_claimed_too_narrowly(nnsight_model):
    m = nnsight_model("bundled:capitals")
    effects = sweep(m, CLEAN, CORRUPT, logit_diff("Paris", "Berlin"), sites=[embed(m), *blocks(m)])
    claimed = {(1, 5)}
    dump("map", [list(r) for r in effects.values])
    dump("failing", sorted([i, j] for i, r in enumerate(effects.values) for j, v in enumerate(r) if (i, j) not in claimed and abs(v) > 0.05))
    assert_peaks_at(effects, [("resid_post.0", 5)], at_least=0.9, elsewhere_at_most=0.05)

@pytest.mark.finding("the patch generalizes over 16 variants")
def test_population(nnsight_model):
    r = population(nnsight_model("bundled:capitals"), PAIRS, "transformer.h.0", "last", n=16, threshold=0.7)
    dump("population", {"passed": sum(e >= 0.7 for e in r.effects), "effects": list(r.effects)})
    assert_population(r, min_rate=0.5, on="rate")
"""
)


def _effect_test(claim: str, value_expr: str, threshold: float) -> str:
    """An inner test whose Effect is built from numbers (no model): fast, and the measured value is known to the test."""
    return (
        DUMP
        + f"""
import random, pytest
from pytest_nnsight.assertions import assert_restores
from pytest_nnsight.results import Effect

@pytest.mark.finding({claim!r})
def test_claim():
    clean, corrupt, patched = 5.0, -3.0, {value_expr}
    e = Effect("patch", "resid_post.0", (2,), ("is",), "logit_diff", "a b is", "a c is", clean, corrupt, patched, (patched - corrupt) / (clean - corrupt))
    dump("normalized", (patched - corrupt) / (clean - corrupt))
    assert_restores(e, {threshold})

def test_unmarked_plain():
    assert True
"""
    )


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_report_files_carry_the_numbers_of_the_run(pytester):
    pytester.makepyfile(test_capitals_findings=CAPITALS_FINDINGS)
    result = pytester.runpytest_inprocess("--nnsight-report", "out")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["findings report: *out*index.html (3 findings, * files, * KiB, * s)"])
    measured = _load(pytester.path / "measured.json")
    report = _load(pytester.path / "out" / "findings.json")
    by_test = {r["nodeid"].split("::")[1]: r for r in report["findings"]}
    assert set(by_test) == {"test_patch", "test_map_claimed_too_narrowly", "test_population"}

    patch_rec = by_test["test_patch"]
    assert patch_rec["claim"] == "block 0 moves the country to the last position" and patch_rec["outcome"] == "passed"
    (check,) = patch_rec["checks"]
    assert check["measured"] == pytest.approx(measured["patch"], abs=1e-9), check
    assert (check["threshold"], check["op"], check["passed"]) == (0.9, ">=", True)

    map_rec = by_test["test_map_claimed_too_narrowly"]
    # no marker: the test name
    assert map_rec["claim"] == "test_map_claimed_too_narrowly" and map_rec["outcome"] == "failed"
    (m,) = map_rec["maps"]
    assert m["sites"] == ["embed", "resid_post.0", "resid_post.1"] and m["tokens"][-2:] == ["France", "is"]
    assert m["values"] == [[pytest.approx(v, abs=1e-9) for v in row] for row in measured["map"]]
    assert m["failing"] == measured["failing"] and m["failing"], m["failing"]

    (pop,) = by_test["test_population"]["populations"]
    assert pop["n"] == 16 and pop["passed"] == measured["population"]["passed"] and pop["min_rate"] == 0.5
    assert pop["effects"] == [pytest.approx(v, abs=1e-9) for v in measured["population"]["effects"]]
    assert report["environment"]["torch"] == torch_version() and report["environment"]["nnsight"]
    for record in report[
        "findings"
    ]:  # findings.json holds records.Finding's fields, every key, and reads back into one
        assert Finding.from_dict(record).to_dict() == record

    md = (pytester.path / "out" / "findings.md").read_text()
    assert "block 0 moves the country to the last position" in md and f"{measured['patch']:.4g}" in md
    html = (pytester.path / "out" / "index.html").read_text()
    assert "<h2 id='f0'>block 0 moves the country to the last position</h2>" in html and "Environment" in html
    figures = [f for r in report["findings"] for f in r["figures"]]
    assert any(f.endswith("-map0.png") for f in figures) and any(f.endswith("-variants.png") for f in figures), figures
    for f in figures:
        assert (pytester.path / "out" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"src='{f}'" in html


def torch_version() -> str:
    import torch

    return torch.__version__


def test_summary_is_quiet_by_default_and_shown_with_v_or_the_option(pytester):
    pytester.makepyfile(
        test_one=_effect_test("the patch restores the answer", "random.Random(7).uniform(4.0, 5.0)", 0.5)
    )
    quiet = pytester.runpytest_inprocess()
    quiet.assert_outcomes(passed=2)
    assert "pytest-nnsight findings" not in quiet.stdout.str()
    measured = _load(pytester.path / "measured.json")["normalized"]
    for args in (["-v"], ["-q", "--nnsight-summary"]):
        shown = pytester.runpytest_inprocess(*args)
        shown.stdout.fnmatch_lines(
            [
                "*pytest-nnsight findings*",
                f"PASSED the patch restores the answer | normalized effect of the patch at resid_post.0: {measured:.4g} >= 0.5*test_one.py::test_claim*",
            ]
        )
        # it measured nothing
        assert "test_unmarked_plain" not in shown.stdout.str().split("pytest-nnsight findings")[1]


def test_junit_xml_properties_carry_the_key_numbers(pytester):
    pytester.makepyfile(test_one=_effect_test("restores at least half", "random.Random(3).uniform(-3.0, 5.0)", -10.0))
    pytester.runpytest_inprocess("--junitxml=junit.xml").assert_outcomes(passed=2)
    measured = _load(pytester.path / "measured.json")["normalized"]
    case = next(c for c in ET.parse(pytester.path / "junit.xml").iter("testcase") if c.get("name") == "test_claim")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["nnsight_claim"] == "restores at least half"
    assert (
        float(props["nnsight_measured"]) == pytest.approx(measured, abs=1e-12)
        and props["nnsight_threshold"] == ">= -10.0"
    )
    plain = next(
        c for c in ET.parse(pytester.path / "junit.xml").iter("testcase") if c.get("name") == "test_unmarked_plain"
    )
    assert not list(plain.iter("property"))


SNAPSHOT_TEST = """
import pytest
from pytest_nnsight.results import EffectMap

def test_map(finding_snapshot):
    m = EffectMap(((0.0, 1.0), (0.5, 0.25)), ("resid_post.0", "resid_post.1"), ("a", "b"), "m", "x a", "x b", 1.0, 0.0)
    assert m == finding_snapshot(atol=1e-6, rtol=0)
"""


def _snapshot_status(pytester, *args: str) -> str:
    """The status as the JUnit XML property gives it (cheaper than a report with figures)."""
    pytester.runpytest_inprocess("--junitxml=junit.xml", *args)
    props = {p.get("name"): p.get("value") for p in ET.parse(pytester.path / "junit.xml").iter("property")}
    return props["nnsight_snapshot_status"]


def test_snapshot_status_new_written_matched_reverified_drifted(pytester):
    pytester.makepyfile(test_snap=SNAPSHOT_TEST)
    assert _snapshot_status(pytester) == "new"
    assert _snapshot_status(pytester, "--snapshot-update") == "written"
    assert _snapshot_status(pytester) == "matched"
    (path,) = (pytester.path / "__snapshots__").rglob("*.json")
    stored = json.loads(path.read_text())
    stored["environment"]["nnsight"] = "0.0.1"
    path.write_text(json.dumps(stored))
    assert _snapshot_status(pytester) == "re-verified"
    stored["finding"]["values"][0][1] = 0.75
    path.write_text(json.dumps(stored))
    assert _snapshot_status(pytester) == "drifted"
    pytester.runpytest_inprocess("--nnsight-report", "out", "-q").stdout.fnmatch_lines(["findings report: *"])
    (rec,) = _load(pytester.path / "out" / "findings.json")["findings"]
    assert rec["snapshots"][0]["status"] == "drifted" and rec["outcome"] == "failed"
    assert (
        "nnsight 0.0.1 ->" in rec["snapshots"][0]["detail"] and "1 / 6 values moved" in rec["snapshots"][0]["detail"]
    ), rec


def test_without_matplotlib_the_text_report_is_written_and_says_how_to_get_figures(pytester):
    pytester.makeconftest("import sys\nsys.modules['matplotlib'] = None  # import matplotlib now raises ImportError\n")
    pytester.makepyfile(test_one=_effect_test("restores", "4.5", 0.5))
    result = pytester.runpytest_inprocess("--nnsight-report", "out")
    result.assert_outcomes(passed=2)
    assert (
        "figures skipped: matplotlib is not installed (pip install pytest-nnsight[report] to get them)"
        in result.stdout.lines
    )
    out = pytester.path / "out"
    assert not (out / "figures").exists()
    assert _load(out / "findings.json")["findings"][0]["checks"][0]["measured"] == pytest.approx((4.5 + 3) / 8)
    assert "pip install pytest-nnsight[report]" in (out / "index.html").read_text()


def test_an_unwritable_report_directory_is_a_usage_error_naming_it(pytester):
    pytester.makepyfile(test_one="def test_a():\n    pass\n")
    (pytester.path / "blocker").write_text("a file, not a directory")
    result = pytester.runpytest_inprocess("--nnsight-report", "blocker/report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cannot write the findings report to '*blocker/report'*--nnsight-report*"])


def test_recorders_do_nothing_outside_a_test_and_never_raise_inside_one(pytester):
    assert findings.current() is None or findings.current().finding.nodeid.endswith(
        "test_recorders_do_nothing_outside_a_test_and_never_raise_inside_one"
    )
    pytester.makepyfile(
        test_one="""
import pytest
from pytest_nnsight import findings

@pytest.mark.finding("broken inputs are ignored")
def test_broken_inputs():
    findings.record_map(object())          # not an EffectMap
    findings.record_population(None)
    findings.record_check("x", "not a number", ">=", 1.0)
    check = findings.current().finding.checks[0]
    assert check.measured is None and not check.passed
"""
    )
    pytester.runpytest_inprocess().assert_outcomes(passed=1)


def test_one_report_under_xdist(pytester):
    pytest.importorskip("xdist")
    for k in range(4):
        pytester.makepyfile(
            **{
                f"test_x{k}": _effect_test(f"claim {k}", f"random.Random({k}).uniform(-3.0, 5.0)", -10.0).replace(
                    '"measured.json"', f'"measured{k}.json"'
                )
            }
        )
    result = pytester.runpytest_subprocess("-n", "2", "--nnsight-report", "out", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    records = _load(pytester.path / "out" / "findings.json")["findings"]
    by_claim = {r["claim"]: r for r in records}
    assert sorted(by_claim) == [f"claim {k}" for k in range(4)], records
    for k in range(4):
        want = _load(pytester.path / f"measured{k}.json")["normalized"]
        assert by_claim[f"claim {k}"]["checks"][0]["measured"] == pytest.approx(want, abs=1e-12)
    assert len(list((pytester.path / "out").glob("findings*.json"))) == 1


needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs headless Chromium (Debian: apt-get install -y chromium; .ci/run installs it)",
)


def chromium_screenshot(page: Path, tmp_path: Path, name: str, width: int, height: int):
    """`page` rendered by headless Chromium in a width x height window: the screenshot's path and RGB pixels."""
    shot = tmp_path / name
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        f"--window-size={width},{height}",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"no screenshot; chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    plt = pytest.importorskip("matplotlib.pyplot")
    pixels = plt.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (height, width)
    return shot, pixels


@needs_chromium
def test_html_report_renders_in_headless_chromium(pytester, tmp_path):
    pytester.makepyfile(
        test_map=DUMP
        + """
import pytest
from pytest_nnsight import assert_peaks_at
from pytest_nnsight.results import EffectMap

@pytest.mark.finding("the effect peaks at block 1, last token")
def test_peak():
    m = EffectMap(((0.0, 0.1, 0.6), (0.0, 0.0, 0.97)), ("resid_post.0", "resid_post.1"), ("<bos>", "France", "is"), "logit_diff", "x France is", "x Spain is", 3.0, -3.0)
    assert_peaks_at(m, [("resid_post.1", 2)], at_least=0.9, elsewhere_at_most=0.2)
"""
    )
    pytester.runpytest_inprocess("--nnsight-report", "out").assert_outcomes(failed=1)
    shot, pixels = chromium_screenshot(pytester.path / "out" / "index.html", tmp_path, "report.png", 1200, 1600)
    gray = pixels.mean(axis=2)
    dark = float((gray < 0.5).mean())
    assert float(gray.std()) > 0.05 and 0.001 < dark < 0.5, (
        f"a blank page? std {gray.std():.4f}, dark share {dark:.4f} ({shot})"
    )
    red = (pixels[..., 0] > 0.35) & (pixels[..., 1] < 0.25) & (pixels[..., 2] < 0.3)
    assert red.sum() > 100, f"the heatmap (red cells) did not render: {int(red.sum())} red pixels in {shot}"


POPULATION_SNAPSHOT_TEST = """
from pytest_nnsight.populations import PopulationResult

def test_population(finding_snapshot):
    effects = tuple(0.5 + 0.04 * k for k in range(12))
    result = PopulationResult(12, effects, 12, 1.0, 0.75, 0.72, 0.14, 0.4, "resid_post.0", "last", "logit_diff", ())
    assert result == finding_snapshot(atol=1e-6, rtol=0)
"""


def _record_then_change(pytester, source: str, change) -> Path:
    """Record the inner test's snapshot, then edit the file as an upgrade would have: `change(stored)`."""
    pytester.makepyfile(test_snap=source)
    pytester.runpytest_inprocess("--snapshot-update").assert_outcomes(passed=1)
    (path,) = (pytester.path / "__snapshots__").rglob("*.json")
    stored = json.loads(path.read_text())
    change(stored)
    path.write_text(json.dumps(stored))
    return path


def _drift_map_change(stored):
    stored["environment"]["nnsight"] = "0.0.1"
    stored["finding"]["values"][0][1] = 0.75  # this run measures 1.0 there


def test_a_drifted_map_is_shown_recorded_new_and_difference_with_the_environment_change(pytester):
    path = _record_then_change(pytester, SNAPSHOT_TEST, _drift_map_change)
    before = path.read_bytes()
    pytester.runpytest_inprocess("--nnsight-report", "out").assert_outcomes(failed=1)
    assert path.read_bytes() == before  # a report never accepts anything
    (rec,) = _load(pytester.path / "out" / "findings.json")["findings"]
    snap = rec["snapshots"][0]
    drift = snap["drift"]
    assert snap["received"] is None and drift["changes"][0].startswith("nnsight 0.0.1 -> ")
    assert drift["map"]["old"] == [[0.0, 0.75], [0.5, 0.25]] and drift["map"]["new"] == [[0.0, 1.0], [0.5, 0.25]]
    assert drift["map"]["moved"] == [[0, 1]] and (drift["moved"], drift["cells"]) == (1, 6)  # 4 values + clean, corrupt
    html = (pytester.path / "out" / "index.html").read_text()
    env_at, fig_at = html.index("environment: nnsight 0.0.1 -&gt; "), html.index("-drift0.png'")
    assert env_at < fig_at and "1 / 6 cells moved beyond tolerance" in html[env_at:fig_at]
    png = pytester.path / "out" / "figures" / "test_map-drift0.png"
    plt = pytest.importorskip("matplotlib.pyplot")
    pixels = plt.imread(str(png))
    magenta = (pixels[..., 0] > 0.85) & (pixels[..., 1] < 0.25) & (pixels[..., 2] > 0.85)
    # one outline per panel: recorded, new, difference
    assert magenta.sum() > 150, f"the moved cell is not marked in {png}"
    assert "environment: nnsight 0.0.1" in (pytester.path / "out" / "findings.md").read_text()


def test_a_reverified_map_with_changed_cells_shows_them_and_a_matched_one_shows_nothing(pytester):
    def within(stored):
        stored["environment"]["transformers"] = "4.0.0"
        stored["finding"]["values"][1][1] = 0.2500004  # within atol=1e-6 of this run's 0.25

    _record_then_change(pytester, SNAPSHOT_TEST, within)
    pytester.runpytest_inprocess("--nnsight-report", "out").assert_outcomes(passed=1)
    (rec,) = _load(pytester.path / "out" / "findings.json")["findings"]
    snap = rec["snapshots"][0]
    assert (
        snap["status"] == "re-verified" and snap["drift"]["moved"] == 0 and snap["drift"]["map"]["changed"] == [[1, 1]]
    )
    assert snap["drift"]["changes"][0].startswith("transformers 4.0.0 -> ")
    pytester.runpytest_inprocess("--snapshot-update").assert_outcomes(passed=1)
    pytester.runpytest_inprocess("--nnsight-report", "out").assert_outcomes(passed=1)
    (rec,) = _load(pytester.path / "out" / "findings.json")["findings"]
    assert rec["snapshots"][0]["status"] == "matched" and rec["snapshots"][0]["drift"] is None
    assert not list((pytester.path / "out" / "figures").glob("*-drift*.png"))  # the stale drift figure is gone


def test_a_drifted_population_overlays_both_histograms(pytester):
    def shift(stored):
        stored["environment"]["torch"] = "1.0.0"
        stored["finding"]["effects"] = [v - 0.3 for v in stored["finding"]["effects"]]

    _record_then_change(pytester, POPULATION_SNAPSHOT_TEST, shift)
    pytester.runpytest_inprocess("--nnsight-report", "out").assert_outcomes(failed=1)
    (rec,) = _load(pytester.path / "out" / "findings.json")["findings"]
    pop = rec["snapshots"][0]["drift"]["population"]
    assert pop["new"] == pytest.approx([0.5 + 0.04 * k for k in range(12)]) and pop["old"] == pytest.approx(
        [0.2 + 0.04 * k for k in range(12)]
    )
    assert pop["threshold"] == 0.4 and pop["moved"] == 12
    plt = pytest.importorskip("matplotlib.pyplot")
    pixels = plt.imread(str(pytester.path / "out" / "figures" / "test_population-drift0.png"))[..., :3]
    gray = (
        (abs(pixels[..., 0] - pixels[..., 1]) < 0.03)
        & (abs(pixels[..., 1] - pixels[..., 2]) < 0.03)
        & (pixels[..., 0] > 0.6)
        & (pixels[..., 0] < 0.8)
    )
    blue = (pixels[..., 2] > pixels[..., 0] + 0.15) & (pixels[..., 2] > 0.6)
    assert gray.sum() > 500 and blue.sum() > 500, "both histograms (recorded: gray, this run: blue) are drawn"


def test_without_matplotlib_a_drift_is_three_html_tables(pytester):
    _record_then_change(pytester, SNAPSHOT_TEST, _drift_map_change)
    pytester.makeconftest("import sys\nsys.modules['matplotlib'] = None  # import matplotlib now raises ImportError\n")
    pytester.runpytest_inprocess("--nnsight-report", "out").assert_outcomes(failed=1)
    html = (pytester.path / "out" / "index.html").read_text()
    drift = html[html.index("<div class='drift'>") :]
    assert [c for c in ("<caption>recorded", "<caption>this run", "<caption>difference") if c in drift] == [
        "<caption>recorded",
        "<caption>this run",
        "<caption>difference",
    ]
    assert drift.count('class="fail') == 3  # the moved cell, marked in each table


@needs_chromium
def test_drift_view_renders_in_headless_chromium(pytester, tmp_path):
    _record_then_change(pytester, SNAPSHOT_TEST, _drift_map_change)
    pytester.runpytest_inprocess("--nnsight-report", "out").assert_outcomes(failed=1)
    shot, pixels = chromium_screenshot(pytester.path / "out" / "index.html", tmp_path, "drift.png", 1200, 900)
    magenta = (pixels[..., 0] > 0.85) & (pixels[..., 1] < 0.25) & (pixels[..., 2] > 0.85)
    rows = magenta.any(axis=1).nonzero()[0]
    assert magenta.sum() > 100, f"the moved cell's mark did not render: {int(magenta.sum())} magenta pixels in {shot}"
    dark_red = (pixels[..., 0] > 0.35) & (pixels[..., 1] < 0.15) & (pixels[..., 2] < 0.2)
    assert dark_red.sum() > 100, f"the heatmaps did not render in {shot}"
    assert rows.min() > 60, f"the drift view is not below the environment line ({shot})"


def test_a_record_comes_back_from_the_wire_as_the_same_dataclasses(capitals):
    """A test's record travels as plain data (execnet, under xdist) and is rebuilt into the same nested dataclasses."""
    execnet = pytest.importorskip("execnet")
    from pytest_nnsight import assert_restores, logit_diff, patch, sweep

    clean, corrupt = "The capital of France is", "The capital of Germany is"
    sweep(capitals, clean, corrupt, metric=logit_diff("Paris", "Berlin"), sites="resid_post", positions=[-1])
    assert_restores(
        patch(capitals, clean, corrupt, site="resid_post.0", position=-1, metric=logit_diff("Paris", "Berlin")),
        at_least=0.5,
    )
    finding = findings.current().finding
    back = Finding.from_dict(execnet.loads(execnet.dumps(finding.to_dict())))
    assert back == finding and finding.maps and finding.effects and finding.checks
    assert (type(back.maps[0]), type(back.effects[0]), type(back.checks[0])) == (MapRecord, EffectRecord, Check)
    finding.maps.clear(), finding.effects.clear(), finding.checks.clear()  # not a finding of this suite's own report
