"""Device assignment under pytest-xdist, tested without GPUs by faking torch's CUDA view, and NDIF remote mode
(--nnsight-remote), tested without network: the option reaches every trace, and 'local' runs nnsight's
in-process simulation of the remote path with the same numbers as a local run."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from pytest_nnsight import remote as remote_module
from pytest_nnsight.devices import assign_device, describe, header, physical_device, worker_assignment, worker_index
from pytest_nnsight.errors import SettingsError
from pytest_nnsight.interventions import patch
from pytest_nnsight.metrics import logit_diff
from pytest_nnsight.models import ModelCache, resolve_device
from pytest_nnsight.remote import check_remote, trace_kwargs
from pytest_nnsight.settings import Settings, resolve
from pytest_nnsight.sweeps import sweep

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"


def fake_cuda(monkeypatch, physical: int) -> None:
    """torch sees `physical` GPUs, narrowed by CUDA_VISIBLE_DEVICES as the driver would."""

    def count() -> int:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return physical if visible is None else len([v for v in visible.split(",") if v.strip() and int(v) < physical])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: physical > 0)
    monkeypatch.setattr(torch.cuda, "device_count", count)


# -- the pure assignment ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested, gpus, workers, expected",
    [
        ("cuda", 1, 8, ["cuda:0"] * 8),
        ("cuda", 4, 3, ["cuda:0", "cuda:1", "cuda:2"]),
        ("cuda", 4, 6, ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]),
        ("auto", 2, 3, ["cuda:0", "cuda:1", "cuda:0"]),
        ("auto", 0, 3, ["cpu"] * 3),
        ("cuda:1", 4, 3, ["cuda:1"] * 3),
        ("cpu", 4, 2, ["cpu", "cpu"]),
    ],
)
def test_workers_are_spread_round_robin(requested, gpus, workers, expected):
    assert worker_assignment(requested, cuda_available=gpus > 0, device_count=gpus, workers=workers) == expected


def test_without_xdist_cuda_stays_torchs_current_device():
    assert assign_device("cuda", cuda_available=True, device_count=4, worker=None) == "cuda"
    assert assign_device("auto", cuda_available=True, device_count=4, worker=None) == "cuda"
    assert assign_device("cuda", cuda_available=True, device_count=4, worker="master") == "cuda"  # not an xdist id
    assert [worker_index(w) for w in ("gw0", "gw12", "", None, "gwx")] == [0, 12, None, None, None]


@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpus_is_a_clear_error(requested):
    with pytest.raises(
        SettingsError, match=f"device '{requested}' asked for, but torch 9.9 sees no CUDA device: use cpu or auto"
    ):
        assign_device(requested, cuda_available=False, device_count=0, worker="gw1", torch_version="9.9")


def test_an_index_beyond_the_visible_gpus_names_the_range():
    with pytest.raises(
        SettingsError, match=r"device 'cuda:4' asked for, but only 4 CUDA device\(s\) are visible: use cuda:0 .. cuda:3"
    ):
        assign_device("cuda:4", cuda_available=True, device_count=4, worker="gw0")


def test_cuda_visible_devices_maps_to_the_physical_gpu():
    env = {"CUDA_VISIBLE_DEVICES": "2, 5"}
    assert [physical_device(f"cuda:{i}", env) for i in (0, 1)] == ["2", "5"]
    assert (
        physical_device("cuda", env) == "2"
        and physical_device("cuda:0", {}) is None
        and physical_device("cpu", env) is None
    )
    assert describe("cuda:1", env) == "cuda:1 (GPU 5 of CUDA_VISIBLE_DEVICES=2, 5)"


# -- through torch (faked) and the model cache ------------------------------------------------------------


def test_resolve_device_pins_this_worker(monkeypatch):
    fake_cuda(monkeypatch, 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw5")
    assert resolve_device("cuda") == "cuda:5"
    assert ModelCache(Settings(device="auto")).key("bundled:capitals").device == "cuda:5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")  # two of the eight visible: gw5 -> logical 1 -> GPU 7
    assert resolve_device("cuda") == "cuda:1"
    assert describe(resolve_device("cuda")) == "cuda:1 (GPU 7 of CUDA_VISIBLE_DEVICES=6,7)"
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(SettingsError, match="'cuda:2' asked for, but only 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert resolve_device("cuda") == "cuda"


def test_zero_gpus_with_cuda_requested_is_a_usage_error(monkeypatch, pytester):
    fake_cuda(monkeypatch, 0)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess("--nnsight-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*device 'cuda' asked for, but torch * sees no CUDA device: use cpu or auto*"])


def test_header_shows_each_workers_device():
    assert (
        header("cuda", workers=3, cuda=(True, 2))
        == "cuda -> xdist workers round-robin over 2 visible GPUs: gw0 cuda:0, gw1 cuda:1, gw2 cuda:0"
    )
    assert header("cuda", worker="gw3", cuda=(True, 2)).startswith(
        "cuda -> cuda:1 for xdist worker gw3, 2 visible GPUs"
    )
    assert header("cuda:1", workers=3, cuda=(True, 2)).startswith("cuda:1 -> cuda:1, 2 visible GPUs")
    assert header("auto", cuda=(False, 0)) == "auto (CUDA when available, else CPU)"
    assert header("cpu", workers=4) == "cpu"


def test_report_header_in_a_run_with_fake_gpus(monkeypatch, pytester):
    fake_cuda(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess("--nnsight-device", "cuda", "--co")
    result.stdout.fnmatch_lines(["pytest-nnsight: *; device cuda -> cuda, 2 visible GPUs, dtype auto*"])


XDIST_CONFTEST = """
import json, os, torch
torch.cuda.is_available = lambda: True   # two fake GPUs in the controller and in each worker
torch.cuda.device_count = lambda: 2
"""

XDIST_TEST = """
import json, os
import pytest
import torch

NET = torch.nn.Linear(2, 2)  # each worker imports this file: its own module, served by its own cache

@pytest.mark.parametrize("i", range(4))
def test_worker(i, nnsight_models, worker_id):
    expected = "cuda:%d" % (int(worker_id[2:]) % 2)
    assert nnsight_models.key("bundled:capitals").device == expected
    nnsight_models.get(NET, device="cpu")   # a real load (NNsight wrapper), on the CPU
    with open("worker-%s-%d.json" % (worker_id, i), "w") as f:
        json.dump({"pid": os.getpid(), "cache": id(nnsight_models), "loads": nnsight_models.load_count(NET, device="cpu")}, f)
"""


def test_xdist_workers_get_their_own_gpu_and_model_cache(pytester):
    pytest.importorskip("xdist")
    pytester.makeconftest(XDIST_CONFTEST)
    pytester.makepyfile(test_w=XDIST_TEST)
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist", "loadgroup", "--nnsight-device", "cuda", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        ["*device cuda -> xdist workers round-robin over 2 visible GPUs: gw0 cuda:0, gw1 cuda:1*"]
    )
    import json

    records = [json.loads(p.read_text()) for p in sorted(pytester.path.glob("worker-*.json"))]
    by_worker: dict[str, set] = {}
    for p, r in zip(sorted(pytester.path.glob("worker-*.json")), records):
        by_worker.setdefault(p.name.split("-")[1], set()).add((r["pid"], r["cache"]))
    assert all(r["loads"] == 1 for r in records), records  # loaded once per worker, however many tests it ran
    pids = {pid for entries in by_worker.values() for pid, _ in entries}
    assert all(len(entries) == 1 for entries in by_worker.values()), by_worker  # one cache per worker process
    assert len(pids) == len(by_worker), by_worker


# -- NDIF remote execution -----------------------------------------------------------------------------------


def test_remote_setting_values():
    assert [resolve({"remote": v}, env={}).remote for v in ("ndif", "on", "true", "local", "off", "0")] == [
        "ndif",
        "ndif",
        "ndif",
        "local",
        "off",
        "off",
    ]
    assert resolve({}, env={"PYTEST_NNSIGHT_REMOTE": "local"}).remote == "local"
    with pytest.raises(
        SettingsError,
        match="invalid nnsight_remote 'cloud' from command line option --nnsight-remote: expected off, ndif",
    ):
        resolve({"remote": "cloud"}, env={})
    assert trace_kwargs(settings=Settings(remote="ndif")) == {"remote": True}
    assert trace_kwargs(object(), settings=Settings(remote="ndif")) == {}  # not served for NDIF: local
    assert trace_kwargs(object(), settings=Settings(remote="local")) == {"remote": "local"}
    assert trace_kwargs(settings=Settings()) == {}


def test_ndif_without_an_api_key_is_a_usage_error(monkeypatch, pytester):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess("--nnsight-remote", "ndif")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*nnsight_remote 'ndif' from command line option --nnsight-remote needs an NDIF API key in the environment variable NDIF_API_KEY*"
        ]
    )
    check_remote(Settings(remote="local"), env={})  # the simulation needs no key


def test_the_api_key_is_never_printed(monkeypatch, pytester):
    monkeypatch.setenv("NDIF_API_KEY", "sk-test-4f9a2b")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess("--nnsight-remote", "ndif", "-v", "-rA")
    result.assert_outcomes(passed=1)
    assert "sk-test-4f9a2b" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["pytest-nnsight: *remote ndif*"])


def test_remote_reaches_every_trace_of_patch_and_sweep(capitals, monkeypatch, attach_settings):
    """With remote on, every trace the interventions open gets remote=True (captured; run locally without it)."""
    calls: list[dict] = []
    original = type(capitals).trace

    def capturing(self, *args, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("remote", None)  # no network here: run the trace locally
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(capitals), "trace", capturing)
    metric = logit_diff("Paris", "Berlin")
    local = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=metric)
    assert calls and all("remote" not in c for c in calls), calls
    attach_settings(capitals, Settings(device="cpu", remote="ndif"))
    calls.clear()
    patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=metric)
    assert calls and all("remote" not in c for c in calls), "a model not served for NDIF runs locally under ndif"
    monkeypatch.setitem(remote_module.NDIF_MODELS, id(capitals), capitals)  # as if served by load_for_ndif
    calls.clear()
    remote = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=metric)
    by_patch = len(calls)  # baselines are not shared with the local runs above: a remote run recomputes them remotely
    sweep(capitals, CLEAN, CORRUPT, metric=metric, sites=["transformer.h.0"], positions=[4, 5])
    assert by_patch >= 2 and len(calls) > by_patch, calls  # the sweep traced too (no local prefix reuse for remote)
    assert all(c.get("remote") is True for c in calls), calls
    assert remote == local


def test_remote_local_simulation_gives_the_same_results(capitals, attach_settings):
    """nnsight's remote='local' serializes each trace and rebuilds it with local modules hidden, as NDIF would."""
    metric = logit_diff("Paris", "Berlin")
    local_effect = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=metric)
    local_map = sweep(capitals, CLEAN, CORRUPT, metric=metric, sites=["transformer.h.0", "transformer.h.1"])
    attach_settings(capitals, Settings(device="cpu", remote="local"))
    remote_effect = patch(capitals, CLEAN, CORRUPT, site="transformer.h.0", position="last", metric=metric)
    remote_map = sweep(capitals, CLEAN, CORRUPT, metric=metric, sites=["transformer.h.0", "transformer.h.1"])
    assert remote_effect == local_effect, (remote_effect, local_effect)
    assert remote_map.shape == local_map.shape == (2, 6)
    assert (remote_map.sites, remote_map.tokens) == (local_map.sites, local_map.tokens)
    # the local sweep replays cells from their own block (prefix reuse), the remote one patches inside one trace:
    # the same numbers to float32 rounding, the product's batched-vs-plain contract (1e-5)
    assert np.allclose(remote_map.values, local_map.values, atol=1e-5, rtol=0), (remote_map.values, local_map.values)


def test_ndif_serves_hub_ids_without_downloading_weights(monkeypatch, capitals):
    """Under ndif a hub id goes to nnsight's repo-id constructor (meta weights, NDIF runs them); local models load as before."""
    import pytest_nnsight.models as models

    built: list[tuple] = []

    class FakeWrapper:
        def __init__(self, repo_id, **kwargs):
            built.append((repo_id, kwargs))
            # as a hub tokenizer arrives: right padding, token_type_ids
            self.tokenizer = copy.deepcopy(capitals.tokenizer)
            self.tokenizer.padding_side = "right"
            self.tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def no_download(*args, **kwargs):
        raise AssertionError(f"weights were loaded locally: {args}")

    nnsight = models.import_nnsight()
    monkeypatch.setattr(nnsight, "TransformersModel", FakeWrapper)
    monkeypatch.setattr(models, "_load_pretrained", no_download)
    cache = ModelCache(Settings(device="cpu", remote="ndif"))
    wrapper = cache.get("meta-llama/Llama-3.1-70B", revision="abc123")
    assert isinstance(wrapper, FakeWrapper) and built == [("meta-llama/Llama-3.1-70B", {"revision": "abc123"})]
    assert cache.info(wrapper).info["kind"] == "ndif" and id(wrapper) in remote_module.NDIF_MODELS
    assert wrapper.tokenizer.padding_side == "left" and wrapper.tokenizer.model_input_names == [
        "input_ids",
        "attention_mask",
    ]
    assert trace_kwargs(wrapper, settings=Settings(remote="ndif")) == {"remote": True}
    remote_module.NDIF_MODELS.pop(id(wrapper))
    monkeypatch.undo()
    # bundled: loaded here, runs locally
    local = ModelCache(Settings(device="cpu", remote="ndif")).get("bundled:capitals")
    assert trace_kwargs(local, settings=Settings(remote="ndif")) == {}
