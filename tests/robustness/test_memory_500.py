"""500 finding tests on one cached model: memory stays flat after warm-up, and nothing a test saved outlives it
(results of patch and sweep, and the block output and logits a test saved in grad mode, each with its autograd graph).

Bounds (also in the README): RSS grows less than 20 MB from the sample after the first 50 tests to the
end (measured here: see the report in the test's failure text); on CUDA, allocated memory grows less
than 1 MB after warm-up (the model and its buffers are allocated once).
"""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc (Linux only)")

N, EVERY = 500, 50
RSS_BOUND_MB = 20.0
CUDA_BOUND_MB = 1.0

CONFTEST = """
import gc, json, os, weakref, pytest

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def cuda_mb():
    import torch
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0

SAMPLES, CUDA, SAVED, ALIVE = [], [], [], []

@pytest.fixture
def track():
    return lambda *values: SAVED.extend(weakref.ref(v) for v in values)

@pytest.fixture(autouse=True)
def sample(request):
    yield
    if request.node.callspec.params["i"] % EVERY == EVERY - 1:
        gc.collect()
        SAMPLES.append(rss_mb())
        CUDA.append(cuda_mb())
        ALIVE.append(sum(ref() is not None for ref in SAVED))

def pytest_sessionfinish(session):
    with open("memory.json", "w") as f:
        json.dump({"rss": SAMPLES, "cuda": CUDA, "alive": ALIVE, "saved": len(SAVED)}, f)
""".replace("EVERY", str(EVERY))

TESTS = """
import pytest, torch
from pytest_nnsight import assert_restores, assert_peaks_at, logit_diff, patch, sweep

COUNTRIES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid")]

@pytest.mark.parametrize("i", range(N))
def test_finding(nnsight_model, track, i):
    model = nnsight_model("bundled:capitals")
    (c1, a1), (c2, a2) = COUNTRIES[i % 4], COUNTRIES[(i + 1) % 4]
    clean, corrupt = f"The capital of {c1} is", f"The capital of {c2} is"
    if i % 2:
        effects = sweep(model, clean, corrupt, logit_diff(a1, a2), sites="blocks")
        assert_peaks_at(effects, [("resid_post.1", -1)], at_least=0.5, elsewhere_at_most=1.5)
        track(effects)
    else:
        effect = patch(model, clean, corrupt, site="transformer.h.0", position="last", metric=logit_diff(a1, a2))
        assert_restores(effect, 0.5)
        track(effect)
    with model.trace(clean):  # grad mode on, as a user would write it: each saved value drags its autograd graph along
        hidden = model.transformer.h[0].output.save()
        logits = model.lm_head.output.save()
    assert logits.shape[0] == 1 and hidden.requires_grad
    track(hidden, logits)
""".replace("N)", f"{N})")


def _run(pytester, device: str) -> dict:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--nnsight-device", device)
    result.assert_outcomes(passed=N)
    data = json.loads((pytester.path / "memory.json").read_text())
    assert data["saved"] == 3 * N
    assert data["alive"] == [0] * (N // EVERY), f"saved tensors or results outlived their tests: {data['alive']}"
    return data


def test_rss_flat_over_500_finding_tests(pytester):
    rss = _run(pytester, "cpu")["rss"]
    drift = max(rss[1:]) - rss[0]
    print(
        f"RSS after {EVERY} tests {rss[0]:.1f} MB, drift over the next {N - EVERY}: {drift:+.1f} MB; samples {[round(r, 1) for r in rss]}"
    )
    assert drift < RSS_BOUND_MB, (
        f"RSS grew {drift:.1f} MB over {N - EVERY} tests after warm-up (bound {RSS_BOUND_MB} MB): {rss}"
    )


@pytest.mark.gpu
def test_cuda_memory_flat_over_500_finding_tests(pytester):
    cuda = _run(pytester, "cuda")["cuda"]
    drift = max(cuda[1:]) - cuda[0]
    assert drift < CUDA_BOUND_MB, (
        f"CUDA allocated memory grew {drift:.2f} MB after warm-up (bound {CUDA_BOUND_MB} MB): {cuda}"
    )
