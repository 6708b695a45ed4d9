"""An unreachable hub costs one failed attempt per session, not one per model; skip reasons name --nnsight-offline."""

import pytest
import transformers

from pytest_nnsight.errors import ModelUnavailableError
from pytest_nnsight.models import ModelCache
from pytest_nnsight.settings import Settings


def test_an_unreachable_hub_switches_the_session_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def config(source, revision=None, local_files_only=False, **kwargs):
        calls.append((source, local_files_only))
        if local_files_only:
            raise OSError(f"{source} is not in the local cache.")
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files."
        )

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    cache = ModelCache(Settings(device="cpu"))
    with pytest.raises(ModelUnavailableError) as first:
        cache.get("org/model-a")
    assert "--nnsight-offline" in str(first.value) and ".." not in str(first.value)
    with pytest.raises(ModelUnavailableError) as second:
        cache.get("org/model-b")
    assert calls == [("org/model-a", True), ("org/model-a", False), ("org/model-b", True)]  # no second network attempt
    assert "unreachable earlier in this session" in str(second.value) and ".." not in str(second.value)
    assert cache.hub_unreachable is not None


def test_a_missing_model_on_a_reachable_hub_does_not_switch_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def config(source, revision=None, local_files_only=False, **kwargs):
        raise OSError(
            f"{source} is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'."
        )

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    cache = ModelCache(Settings(device="cpu"))
    with pytest.raises(ModelUnavailableError) as exc:
        cache.get("org/nope")
    assert cache.hub_unreachable is None
    assert "'https://huggingface.co/models'. " in str(exc.value) or "models'." in str(exc.value)
    assert ".." not in str(exc.value)
