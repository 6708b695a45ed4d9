"""Reports you can trust: implausible values flagged, failure messages kept, fixture measurements recorded, outcome once."""

import json

EFFECT = """
import math, pytest
from pytest_nnsight.assertions import assert_restores
from pytest_nnsight.findings import recorded
from pytest_nnsight.results import Effect

def effect(patched, clean=5.0, corrupt=-3.0):  # what patch() returns, numbers given: recorded as the verbs record theirs
    return recorded(Effect("patch", "resid_post.0", (2,), ("is",), "logit_diff", "a b is", "a c is", clean, corrupt, patched,
                           (patched - corrupt) / (clean - corrupt)))
"""


def _report(pytester, source, *args):
    pytester.makepyfile(test_inner=EFFECT + source)
    result = pytester.runpytest("-p", "no:randomly", "--nnsight-report", "out", *args)
    data = json.loads((pytester.path / "out" / "findings.json").read_text())
    return (
        result,
        {r["nodeid"].split("::")[-1]: r for r in data["findings"]},
        (pytester.path / "out" / "index.html").read_text(),
        (pytester.path / "out" / "findings.md").read_text(),
    )


def test_an_implausible_effect_and_a_nan_are_flagged_everywhere(pytester):
    source = """
@pytest.mark.finding("restores five times the behaviour")
def test_five_times():
    assert_restores(effect(37.0), 0.5)   # normalized (37 + 3) / 8 = 5: passes, but no patch restores 500%

@pytest.mark.finding("a NaN effect")
def test_nan():
    e = effect(float("nan"))
    assert math.isnan(e.normalized)

@pytest.mark.finding("a plausible effect")
def test_plausible():
    assert_restores(effect(4.0), 0.5)
"""
    result, records, html, md = _report(pytester, source)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*pytest-nnsight suspicious values*",
            "PASSED restores five times the behaviour*",
            "  normalized effect 5 of the patch at resid_post.0 (|effect| > 1.5)",
            "PASSED a NaN effect*",
            "  NaN effect of the patch at resid_post.0",
        ]
    )
    assert records["test_five_times"]["suspicious"] == [
        "normalized effect 5 of the patch at resid_post.0 (|effect| > 1.5)"
    ]
    assert records["test_nan"]["suspicious"] == ["NaN effect of the patch at resid_post.0"]
    assert records["test_plausible"]["suspicious"] == []
    assert html.count("<b class='suspicious'>suspicious</b>") == 2 and "normalized effect 5 of the patch" in html
    assert "- **suspicious**: normalized effect 5 of the patch at resid_post.0" in md
    # the band is configurable: an ini key (or --nnsight-suspicious-effect / PYTEST_NNSIGHT_SUSPICIOUS_EFFECT)
    pytester.makeini("[pytest]\nnnsight_suspicious_effect = 10\n")
    result = pytester.runpytest("-p", "no:randomly", "--nnsight-report", "out")
    records = {
        r["nodeid"].split("::")[-1]: r
        for r in json.loads((pytester.path / "out" / "findings.json").read_text())["findings"]
    }
    assert records["test_five_times"]["suspicious"] == [] and records["test_nan"]["suspicious"]


def test_a_failed_finding_keeps_the_first_lines_of_its_message_and_its_outcome_once(pytester):
    source = """
@pytest.mark.finding("block 0 restores at least 90%")
def test_fails():
    assert_restores(effect(1.0), 0.9)   # normalized 0.5
"""
    result, records, html, md = _report(pytester, source)
    result.assert_outcomes(failed=1)
    message = records["test_fails"]["message"]
    assert "0.5" in message and "0.9" in message and len(message.splitlines()) <= 9
    assert "<pre class='message'>" in html and "0.9" in html.split("<pre class='message'>")[1].split("</pre>")[0]
    assert "```\n" + message + "\n```" in md
    item = html.split("<ul>")[1].split("</ul>")[0]
    # the outcome written once (it was 'failed: FAILED block 0 ...')
    assert item.count(">failed</a>") == 1 and "FAILED" not in item
    assert message.startswith("FindingFailed: claim: patching resid_post.0 restores at least 0.9")


def test_measurements_made_in_a_module_fixture_are_a_finding_naming_the_tests_using_it(pytester):
    source = """
@pytest.fixture(scope="module")
def measured():
    return effect(4.5)

def test_first(measured):
    assert measured.normalized > 0.5

def test_second(measured):
    assert measured.normalized < 1.5

def test_other():
    assert True
"""
    result, records, html, md = _report(pytester, source)
    result.assert_outcomes(passed=3)
    fixture = records["<fixture measured>"]
    assert fixture["outcome"] == "fixture" and fixture["scope"] == "module"
    assert [u.split("::")[-1] for u in fixture["used_by"]] == ["test_first", "test_second"]
    assert fixture["effects"][0]["normalized"] == (4.5 + 3) / 8
    assert (
        "measured in fixture &#x27;measured&#x27; (module-scoped)" in html
        and "used by: test_inner.py::test_first" in html
    )
