"""Nothing a test saved through a served model outlives the test: memory stays flat over many tests."""

import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc (Linux only)")

CONFTEST = """
import gc, json, os, weakref, pytest

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

SAMPLES, SAVED, ALIVE = [], [], []

@pytest.fixture
def track():
    \"\"\"Record weak references to what a test saved, to check nothing keeps them alive afterwards.\"\"\"
    return lambda *values: SAVED.extend(weakref.ref(v) for v in values)

@pytest.fixture(autouse=True)
def every_twentieth_test_samples(request):
    yield
    if request.node.callspec.params["i"] % 20 == 19:
        gc.collect()  # costs ~0.3 s with torch loaded, so sample, not every test
        SAMPLES.append(rss_mb())
        ALIVE.append(sum(ref() is not None for ref in SAVED))

def pytest_sessionfinish(session):
    with open("rss.json", "w") as f:
        json.dump({"rss": SAMPLES, "alive": ALIVE, "saved": len(SAVED)}, f)
"""

TESTS = """
import pytest, torch

@pytest.mark.parametrize("i", range(200))
def test_finding(nnsight_model, track, i):
    model = nnsight_model("bundled:capitals")
    # grad mode on, as a user would write it: each saved value drags its autograd graph along
    with model.trace(["The capital of France is", "Everyone knows that the capital of Spain is"]):
        hidden = model.transformer.h[0].output.save()
        logits = model.lm_head.output.save()
    assert logits.shape[0] == 2 and hidden.requires_grad
    track(hidden, logits)
"""


def test_rss_flat_over_200_tests_on_one_cached_model(pytester):
    import json

    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--nnsight-device", "cpu")
    result.assert_outcomes(passed=200)
    data = json.loads((pytester.path / "rss.json").read_text())
    assert data["saved"] == 400
    assert data["alive"] == [0] * 10, f"saved tensors outlived their tests: {data['alive']}"
    rss = data["rss"]
    growth = max(rss[1:]) - rss[0]
    # bound: 10 MB over the 180 tests after warm-up
    assert growth < 10, f"RSS grew {growth:.1f} MB after warm-up (from {rss[0]:.1f} MB): {rss}"
