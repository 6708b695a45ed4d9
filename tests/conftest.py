"""Shared fixtures of the project's own tests.

torch, transformers and nnsight are imported here, before any pytester inline run: pytester
restores sys.modules after each inline run, and torch cannot be imported a second time in one
process (nor can submodules it loads lazily on first use, hence the warm-up trace below).
Tests that check the plugin imports none of them run pytest in a subprocess.
"""

import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from pytest_nnsight.metrics import logit_diff
from pytest_nnsight.models import import_nnsight
from pytest_nnsight.testing import tiny_gpt2


def _warm_up() -> None:
    from pytest_nnsight.models import ModelCache
    from pytest_nnsight.settings import Settings

    model = ModelCache(Settings(device="cpu")).get("bundled:capitals")
    with torch.inference_mode():
        with model.trace(["The capital of France is", "Everyone knows that the capital of Spain is"]):
            model.lm_head.output.save()


import_nnsight()


def _import_the_package() -> None:
    """Import every module of the package now: a module first imported inside a pytester inline run is dropped
    from sys.modules after it, and the next inline run re-imports it, so two copies of a class (prompts.Prompt)
    meet and isinstance fails."""
    import importlib
    import pkgutil

    import pytest_nnsight

    for info in pkgutil.walk_packages(pytest_nnsight.__path__, "pytest_nnsight."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


_import_the_package()
_warm_up()


@pytest.fixture(autouse=True)
def _inner_runs_are_not_xdist_workers(monkeypatch):
    """Under `pytest -n` (make test), a worker's PYTEST_XDIST_* variables would reach the pytest runs a test starts,
    inline or in a subprocess, whose plugins (syrupy, the report, device assignment) would then act as a worker's."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_TESTRUNUID", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny():
    """A seeded random 2-layer GPT-2 (d_model 32) and its word tokenizer."""
    return tiny_gpt2()


@pytest.fixture(scope="module")
def tiny_ioi(nnsight_models):
    """A seeded random 2-layer GPT-2 (seed 3, 4 heads, d_model 32) served like a user's module (`nnsight_model(module,
    tokenizer)`, so the run's --nnsight-check-batching reaches it), whose word tokenizer knows the IOI prompts' words:
    the model of the path-patching and circuit tests (one per module)."""
    hf, tok = tiny_gpt2(seed=3)
    return nnsight_models.get(hf, tok, device="cpu")


@pytest.fixture(scope="module")
def mary_john():
    """logit_diff("Mary", "John"), the metric of the IOI prompts in the path-patching and circuit tests."""
    return logit_diff("Mary", "John")


@pytest.fixture(scope="session")
def capitals(nnsight_models):
    """The bundled trained capitals model on CPU, from the session's model cache (loaded once)."""
    return nnsight_models.get("bundled:capitals", device="cpu")


@pytest.fixture
def attach_settings():
    """attach_settings(model, Settings(...)): run `model` under these settings (as if the fixtures had served it with
    them) for this test; the settings it had come back at teardown (session models are shared between tests)."""
    from pytest_nnsight import settings as _settings

    previous: list = []

    def attach(model, settings):
        previous.append((model, _settings.settings_of(model)))
        return _settings.attach(model, settings)

    yield attach
    for model, settings in reversed(previous):
        _settings.attach(model, settings)
