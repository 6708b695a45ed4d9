"""The model fixtures: a session cache and the per-test ways to ask it for a model."""

from __future__ import annotations

from typing import Any, Callable, NoReturn

import pytest

from .errors import ModelUnavailableError
from .models import ModelCache
from .settings import Settings

SETTINGS_KEY = pytest.StashKey[Settings]()
CACHE_KEY = pytest.StashKey[ModelCache]()
ACTIVATION_CACHE_KEY = pytest.StashKey[Any]()
LOCK_KEY = pytest.StashKey[Any]()  # the run's structure lock (structure_lock.StructureLock), None when off


def model_cache(config: pytest.Config) -> ModelCache:
    """The run's model cache (one per process, so one per xdist worker)."""
    cache = config.stash.get(CACHE_KEY, None)
    if cache is None:
        cache = config.stash[CACHE_KEY] = ModelCache(config.stash.get(SETTINGS_KEY, Settings()))
        lock = config.stash.get(LOCK_KEY, None)
        if lock is not None:
            from functools import partial

            from .structure_lock import on_serve

            cache.on_serve = partial(on_serve, lock=lock, rootpath=config.rootpath)
    return cache


def unavailable(config: pytest.Config, exc: ModelUnavailableError) -> NoReturn:
    """Skip the test whose model cannot be had, or fail it under --nnsight-require-models."""
    __tracebackhide__ = True
    s = config.stash.get(SETTINGS_KEY, Settings())
    if s.require_models:
        pytest.fail(
            f"{exc} (failing, not skipping: require_models is on from {s.source_of('require_models')})", pytrace=False
        )
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def nnsight_models(pytestconfig: pytest.Config) -> ModelCache:
    """Session cache of nnsight-wrapped models; each (model, revision, device, dtype) loads once.

    Example::

        def test_loaded_once(nnsight_models):
            model = nnsight_models.get("bundled:capitals")
            assert nnsight_models.load_count("bundled:capitals") == 1
    """
    return model_cache(pytestconfig)


@pytest.fixture
def nnsight_model(nnsight_models: ModelCache, request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Factory: ``nnsight_model(id_or_module, tokenizer=None, *, revision=None, device=None, dtype=None)``.

    Returns the nnsight wrapper (TransformersModel/LanguageModel for causal LMs, NNsight otherwise),
    on the session's device and dtype, in eval mode, loaded once per session. A model whose
    weights cannot be had skips the test (fails under --nnsight-require-models).

    Example::

        def test_shapes(nnsight_model):
            model = nnsight_model("bundled:capitals")
            with model.trace("The capital of France is"):
                hidden = model.transformer.h[0].output.save()
            assert hidden.shape[-1] == 64
    """

    def load(
        model: Any,
        tokenizer: Any = None,
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> Any:
        __tracebackhide__ = True
        from .structure_lock import StructureChangedError

        try:
            return nnsight_models.get(model, tokenizer, revision=revision, device=device, dtype=dtype)
        except ModelUnavailableError as exc:
            unavailable(request.config, exc)
        except StructureChangedError as exc:  # the structure lock: the served model changed since it was recorded
            changed = str(exc)
        pytest.fail(changed, pytrace=False)  # outside the except: no "during handling of the above exception"

    return load


@pytest.fixture
def model(request: pytest.FixtureRequest, nnsight_model: Callable[..., Any]) -> Any:
    """The model a test is parametrized over with ``@pytest.mark.nnsight_models(...)``.

    Example::

        @pytest.mark.nnsight_models("bundled:capitals", "gpt2")
        def test_last_layer_shape(model):
            with model.trace("The capital of France is"):
                logits = model.lm_head.output.save()
            assert logits.ndim == 3
    """
    __tracebackhide__ = True
    model_id = getattr(request, "param", None)
    if model_id is None:
        pytest.fail(
            f"{request.node.nodeid} uses the `model` fixture without @pytest.mark.nnsight_models(...): "
            "name the models there, or ask for one with the nnsight_model fixture",
            pytrace=False,
        )
    return nnsight_model(model_id)


@pytest.fixture(scope="session")
def activation_cache(pytestconfig: pytest.Config, nnsight_models: ModelCache) -> Any:
    """On-disk activation cache: run a model on prompts once, reuse the stored sites/positions in later tests and runs.

    Stored under pytest's cache dir (``--cache-clear`` clears it) or ``--nnsight-cache-dir``;
    ``--nnsight-cache-clear`` empties it, ``--nnsight-no-cache`` computes in memory every time.
    ``activation_cache.forwards`` counts the forward passes it ran.

    Example::

        def test_block0_last(activation_cache, nnsight_model):
            model = nnsight_model("bundled:capitals")
            acts = activation_cache.get(model, ["The capital of France is"], sites="blocks", positions="last")
            assert acts["resid_post.0"].shape == (1, 1, 64)
    """
    from .activation_cache import ActivationCache, directory_for

    settings = pytestconfig.stash.get(SETTINGS_KEY, Settings())
    directory, source = directory_for(pytestconfig, settings)
    cache = pytestconfig.stash[ACTIVATION_CACHE_KEY] = ActivationCache(directory, models=nnsight_models, source=source)
    return cache


@pytest.fixture
def finding_snapshot(snapshot: Any, request: pytest.FixtureRequest) -> Any:
    """syrupy's ``snapshot.use_extension(FindingSnapshotExtension)``: findings stored as JSON, compared with tolerance.

    Records the environment (library versions, device, dtype, model, weights fingerprint) and
    reports a finding re-verified under a new one. ``finding_snapshot(atol=, rtol=, tolerance=,
    model=, across_weights=)`` sets options for one assertion; ``.with_tolerance(...)`` for all.

    Example::

        def test_capitals_map(nnsight_model, finding_snapshot):
            model = nnsight_model("bundled:capitals")
            effects = sweep(model, "The capital of France is", "The capital of Germany is", metric=logit_diff("Paris", "Berlin"))
            assert effects == finding_snapshot(model=model, atol=1e-3)
    """
    from .snapshots.extension import FindingSnapshotAssertion

    return FindingSnapshotAssertion.from_snapshot(
        snapshot, cache=model_cache(request.config), settings=request.config.stash.get(SETTINGS_KEY, Settings())
    )
