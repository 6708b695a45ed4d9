"""The activation cache: reuse across runs and tests, keys, corruption, clearing, unwritable dirs (xdist: test_faults). Run with pytester."""

import json
import os
from pathlib import Path

import hypothesis  # noqa: F401  (imported once here: pytester restores sys.modules, and re-importing it costs ~3 s per inline run)
import pytest
import torch

from pytest_nnsight.activation_cache import DIR_NAME, ActivationCache, sha256_of
from pytest_nnsight.errors import ActivationCacheError, PositionError, SiteNotCachedError
from pytest_nnsight.fingerprint import weights_fingerprint
from pytest_nnsight.sites import tokens_of

SUITE = {
    "test_acts": """
        import os

        COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "China", "Peru", "Chile", "Cuba", "Greece"]
        PROMPTS = [f"The capital of {c} is" for c in COUNTRIES] + [f"Everyone knows that the capital of {c} is" for c in COUNTRIES]

        def test_first(activation_cache, nnsight_model):
            model = nnsight_model("bundled:capitals")
            dtype = os.environ.get("AC_DTYPE") or None
            acts = activation_cache.get(model, PROMPTS, sites="blocks", positions="last", dtype=dtype, batch_size=8)
            print(f"\\nFIRST source={acts.source} forwards={activation_cache.forwards} sum={float(acts['resid_post.1'].double().sum()):.6f}")
            assert acts["resid_post.0"].shape == (20, 1, 64)
            assert acts["resid_post.0"].dtype == getattr(__import__("torch"), dtype or "float32")

        def test_second_in_same_session(activation_cache, nnsight_model):
            model = nnsight_model("bundled:capitals")
            before = activation_cache.forwards
            acts = activation_cache.get(model, PROMPTS, sites="blocks", positions="last", dtype=os.environ.get("AC_DTYPE") or None, batch_size=8)
            print(f"\\nSECOND source={acts.source} new_forwards={activation_cache.forwards - before}")
            assert acts.source in ("loaded", "memory")
            assert activation_cache.forwards == before or acts.source == "memory"
    """
}


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(**SUITE)
    return pytester


def entries(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("ac-*.json"))]


def assert_valid(directory: Path) -> None:
    for manifest in entries(directory):
        data = directory / manifest["data"]
        assert sha256_of(data) == manifest["sha256"]
        assert sorted(p.name for p in directory.glob(f"ac-{manifest['key']}.*.safetensors")) == [manifest["data"]]
    assert not list(directory.glob("*.tmp"))


def default_dir(pytester) -> Path:
    return pytester.path / ".pytest_cache" / "d" / DIR_NAME


def test_second_run_loads_and_runs_no_forward_and_a_key_change_recomputes(suite, monkeypatch):
    first = suite.runpytest("-s", "-p", "no:randomly")
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["*FIRST source=computed forwards=3 sum=*", "*SECOND source=loaded new_forwards=0*"])
    total = [line for line in first.outlines if "FIRST" in line][0].split("sum=")[1]
    second = suite.runpytest("-s", "-p", "no:randomly")
    second.assert_outcomes(passed=2)
    second.stdout.fnmatch_lines(
        [
            f"*FIRST source=loaded forwards=0 sum={total}*",  # the same values, no forward pass
            "activation cache */nnsight-activations: 0 computed (0 forward passes), 2 loaded",
        ]
    )
    monkeypatch.setenv("AC_DTYPE", "float16")  # another storage dtype: another key
    suite.runpytest("-s", "-k", "first").stdout.fnmatch_lines(["*FIRST source=computed forwards=3*"])
    monkeypatch.delenv("AC_DTYPE")
    suite.runpytest("-s", "-k", "first").stdout.fnmatch_lines([f"*FIRST source=loaded forwards=0 sum={total}*"])
    assert len(entries(default_dir(suite))) == 2
    assert_valid(default_dir(suite))


def test_corrupt_entry_warns_and_recomputes(suite):
    suite.runpytest("-k", "first").assert_outcomes(passed=1)
    (manifest,) = entries(default_dir(suite))
    data = default_dir(suite) / manifest["data"]
    raw = bytearray(data.read_bytes())
    raw[-7] ^= 0xFF
    data.write_bytes(bytes(raw))
    flipped = suite.runpytest("-s", "-k", "first")
    flipped.assert_outcomes(passed=1)
    flipped.stdout.fnmatch_lines(
        [
            "*FIRST source=computed forwards=3*",
            "*ActivationCacheWarning: corrupt activation cache entry *ac-*.json (the sha256 of ac-*.safetensors does not match its manifest); recomputing it*",
        ]
    )
    assert_valid(default_dir(suite))
    path = default_dir(suite) / f"ac-{manifest['key']}.json"
    path.write_text(path.read_text()[:40])
    truncated = suite.runpytest("-s", "-k", "first")
    truncated.stdout.fnmatch_lines(
        [
            "*FIRST source=computed forwards=3*",
            "*corrupt activation cache entry*its manifest cannot be read (JSONDecodeError*",
        ]
    )
    assert_valid(default_dir(suite))


def test_clear_options(suite):
    suite.runpytest("-k", "first").assert_outcomes(passed=1)
    suite.runpytest("-s", "-k", "first", "--nnsight-cache-clear").stdout.fnmatch_lines(["*FIRST source=computed*"])
    suite.runpytest("-s", "-k", "first", "--cache-clear").stdout.fnmatch_lines(["*FIRST source=computed*"])
    (suite.path / "acts").mkdir()
    (suite.path / "acts" / "notes.txt").write_text("not ours")
    suite.runpytest("-s", "-k", "first", "--nnsight-cache-dir", "acts").stdout.fnmatch_lines(
        ["*FIRST source=computed*"]
    )
    assert len(entries(suite.path / "acts")) == 1
    suite.runpytest("-s", "-k", "first", "--nnsight-cache-dir", "acts", "--cache-clear").stdout.fnmatch_lines(
        ["*FIRST source=computed*"]
    )
    assert (suite.path / "acts" / "notes.txt").exists()  # clearing removes only cache entries


def test_unwritable_dir_is_a_clear_error_unless_caching_is_off(suite):
    (suite.path / "afile").write_text("a file, not a directory")
    result = suite.runpytest("--nnsight-cache-dir", "afile/acts")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*activation cache directory '*afile/acts' (from command line option --nnsight-cache-dir) is not writable*--nnsight-no-cache*"
        ]
    )
    off = suite.runpytest("-s", "-p", "no:randomly", "--nnsight-cache-dir", "afile/acts", "--nnsight-no-cache")
    off.assert_outcomes(passed=2)
    off.stdout.fnmatch_lines(["*FIRST source=memory forwards=3*", "*SECOND source=memory*"])


# xdist: two workers writing entries into the default cache directory (eight askers of four keys, one valid entry
# each, and a later run loading every one) is tests/robustness/test_faults.py::test_two_xdist_workers_lose_nothing.


def test_help_lists_the_cache_options(pytester):
    pytester.runpytest("--help").stdout.fnmatch_lines(
        [
            "*--nnsight-cache-dir=DIR*",
            "*--nnsight-cache-clear*",
            "*--nnsight-no-cache*",
            "*nnsight_cache_dir (string):*",
        ]
    )


# -- the cache object without pytest ---------------------------------------------------------------


def test_positions_words_slots_and_whole_sequences(capitals, nnsight_models, tmp_path):
    cache = ActivationCache(tmp_path, models=nnsight_models)
    prompts = ["The capital of France is", "Everyone knows that the capital of Spain is"]
    acts = cache.get(capitals, prompts, sites=["transformer.drop", "transformer.h.0"], positions="all")
    n0, n1 = (len(tokens_of(capitals, p)) for p in prompts)
    assert acts["transformer.drop"].shape == (2, n1, 64)
    assert acts.positions[0] == tuple(range(n0)) and acts.tokens[0][-1] == "is"
    assert float(acts["transformer.drop"][0, n0:].abs().sum()) == 0.0  # zero padding after a shorter prompt
    last = cache.get(capitals, prompts, sites=["transformer.h.0"], positions="last")
    with torch.inference_mode():
        with capitals.trace(prompts[0]):
            alone = capitals.transformer.h[0].output.detach().clone().save()
    assert torch.allclose(last["transformer.h.0"][0, 0], alone[0, -1], atol=1e-5)  # left padding accounted for
    assert torch.allclose(acts["transformer.h.0"][0, n0 - 1], last["transformer.h.0"][0, 0], atol=1e-6)
    batches = list(acts.iter_batches("transformer.h.0", batch_size=1))
    assert [tuple(b.shape) for b in batches] == [(1, n1, 64), (1, n1, 64)]
    with pytest.raises(PositionError, match="names 1 token\\(s\\) in 'The capital of France is' but 2 in"):
        # one index in the short prompt, two in the long one
        cache.get(capitals, prompts, sites="blocks", positions=[0, -n0])
    with pytest.raises(SiteNotCachedError, match="it holds transformer.h.0"):
        last["resid_post.1"]


def test_fingerprint_is_cached_and_tracks_weights(capitals, nnsight_models, tiny):
    fp = weights_fingerprint(capitals, nnsight_models)
    assert nnsight_models.info(capitals).info["weights_fingerprint"] == fp
    module, tok = tiny
    before = weights_fingerprint(module)
    weight = module.transformer.h[0].mlp.c_fc.weight
    original = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] += 1e-3
    try:
        assert weights_fingerprint(module) != before
    finally:
        with torch.no_grad():
            weight[0, 0] = original  # the session's tiny model, restored bit for bit
    assert weights_fingerprint(module) == before


def test_fingerprint_ignores_non_persistent_buffers_only():
    """transformers 4.57's GPT-2 carries a causal-mask buffer 5.x dropped: not a weight, so not a weights change."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    before = weights_fingerprint(net)
    net[0].register_buffer("mask", torch.ones(3, 3), persistent=False)
    assert weights_fingerprint(net) == before
    with torch.no_grad():
        net[1].running_mean += 0.5  # a persistent buffer: saved in the checkpoint, so it counts
    assert weights_fingerprint(net) != before


def test_unwritable_directory_error_names_it(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(
        ActivationCacheError, match="activation cache directory '.*f/sub' \\(from default\\) is not writable"
    ):
        ActivationCache(tmp_path / "f" / "sub")
    assert os.path.isdir(ActivationCache(tmp_path / "ok").directory)
