"""Loading, wrapping and caching models, and the clear errors for everything that cannot be served."""

import shutil

import pytest
import torch

from pytest_nnsight import bundled
from pytest_nnsight.errors import ModelLoadError, ModelSpecError, ModelUnavailableError, ModelUsageError, SettingsError
from pytest_nnsight.models import ModelCache
from pytest_nnsight.settings import Settings
from pytest_nnsight.testing import tiny_gpt2, word_tokenizer


@pytest.fixture
def cache():
    return ModelCache(Settings(device="cpu", offline=True))


def test_module_with_tokenizer_is_wrapped_as_language_model(cache, tiny):
    import nnsight

    module, tok = tiny
    model = cache.get(module, tok)
    expected = getattr(nnsight, "TransformersModel", None) or nnsight.LanguageModel
    assert isinstance(model, expected)
    assert not model._module.training
    with torch.inference_mode():
        with model.trace("The capital of France is"):
            hidden = model.transformer.h[1].output.save()
    assert hidden.shape == (1, 6, 32)


def test_tokenizer_is_pinned_and_the_callers_object_untouched(cache):
    module, _ = tiny_gpt2(seed=1)
    tok = word_tokenizer(token_type_ids=True)
    tok.padding_side = "right"
    model = cache.get(module, tok)
    assert tok.padding_side == "right" and "token_type_ids" in tok.model_input_names
    assert model.tokenizer.padding_side == "left"
    assert "token_type_ids" not in model.tokenizer("The capital of France is")


def test_dropping_token_type_ids_keeps_gpt2_logits_right(cache):
    # H7: token_type_ids reach GPT-2 as a second embedding lookup and change its logits
    module, _ = tiny_gpt2(seed=2)
    tok = word_tokenizer(token_type_ids=True)
    ids = tok("The capital of France is", return_tensors="pt")
    assert "token_type_ids" in ids
    with torch.inference_mode():
        reference = module(input_ids=ids["input_ids"]).logits
        polluted = module(**ids).logits
    model = cache.get(module, tok)
    with torch.inference_mode():
        with model.trace("The capital of France is"):
            logits = model.lm_head.output.save()
    assert not torch.allclose(polluted, reference)
    torch.testing.assert_close(logits, reference)


def test_each_key_loads_once_and_dtypes_do_not_share_a_module(cache):
    module, tok = tiny_gpt2(seed=3)
    a = cache.get(module, tok)
    assert cache.get(module, tok) is a
    b = cache.get(module, tok, dtype="bfloat16")
    assert b is not a
    assert next(a._module.parameters()).dtype == torch.float32
    assert next(b._module.parameters()).dtype == torch.bfloat16
    assert cache.load_count(module, dtype="bfloat16") == 1 and cache.load_count(module) == 1
    assert cache.info(b).info["dtype"] == "bfloat16"


def test_bundled_model_loads_offline_with_manifest(cache):
    model = cache.get("bundled:capitals")
    entry = cache.info(model)
    assert entry.info["kind"] == "bundled"
    assert entry.info["manifest"]["weights_sha256"] == bundled.sha256_of(
        bundled.path_of("bundled:capitals") / "model.safetensors"
    )


def test_module_without_tokenizer_refuses_a_prompt_clearly(cache):
    module, _ = tiny_gpt2(seed=4)
    model = cache.get(module)
    with torch.inference_mode():
        with model.trace(torch.tensor([[1, 3, 4]])):
            out = model.lm_head.output.save()
    assert out.shape == (1, 3, module.config.vocab_size)
    with pytest.raises(
        ModelUsageError,
        match=r"GPT2LMHeadModel was served without a text interface, so it cannot take the prompt 'The capital'.*tokenizer=",
    ):
        with model.trace("The capital"):
            model.lm_head.output.save()


@pytest.mark.parametrize(
    "bad, message",
    [
        ("bundled:nope", r"unknown bundled model 'bundled:nope': the bundled models are bundled:capitals"),
        ("", r"empty model id ''"),
        ("gpt 2!", r"model id 'gpt 2!' is not a hub id, an existing path nor a bundled name: expected a hub id"),
        (42, r"cannot serve a model from int 42: expected a hub id"),
    ],
)
def test_bad_model_ids(cache, bad, message):
    with pytest.raises(ModelSpecError, match=message):
        cache.get(bad)


@pytest.mark.parametrize(
    "device, dtype, message",
    [
        ("tpu", None, r"invalid device 'tpu': expected auto, cpu, cuda or cuda:N"),
        (None, "int8", r"invalid dtype 'int8': expected auto, float32"),
    ],
)
def test_bad_device_or_dtype(cache, device, dtype, message):
    with pytest.raises(SettingsError, match=message):
        cache.get("bundled:capitals", device=device, dtype=dtype)


def test_directory_without_config(cache, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSpecError, match=r"has no config.json \(it holds weights.bin\)"):
        cache.get(str(tmp_path))


def test_missing_path_is_unavailable(cache, tmp_path):
    with pytest.raises(ModelUnavailableError, match="no such file or directory"):
        cache.get(str(tmp_path / "nothing-here"))


def test_uncached_hub_id_offline_is_unavailable(cache):
    with pytest.raises(ModelUnavailableError, match=r"'not-cached-org/x' is not available: offline mode"):
        cache.get("not-cached-org/x")


def test_corrupt_checkpoint_names_the_file(cache, tmp_path):
    module, tok = tiny_gpt2(seed=5)
    module.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"checkpoint file '.*model.safetensors' is corrupt or truncated"):
        cache.get(str(tmp_path))


def test_local_checkpoint_loads_with_its_tokenizer(cache, tmp_path):
    module, tok = tiny_gpt2(seed=6)
    module.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = cache.get(str(tmp_path))
    assert cache.info(model).info["kind"] == "path"
    with torch.inference_mode():
        with model.trace("The capital of France is"):
            logits = model.lm_head.output.save()
        reference = module(input_ids=tok("The capital of France is", return_tensors="pt")["input_ids"]).logits
    torch.testing.assert_close(logits, reference)


def test_bundled_weights_checked_against_recorded_sha(cache, tmp_path, monkeypatch):
    copy = tmp_path / "capitals"
    shutil.copytree(bundled.path_of("bundled:capitals"), copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(bundled, "ROOT", tmp_path)
    bundled.manifest.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match=r"model.safetensors' does not match its recorded sha256"):
            cache.get("bundled:capitals")
    finally:
        bundled.manifest.cache_clear()


@pytest.mark.filterwarnings("error:.*has a submodule named 'output'")
def test_encoder_without_lm_head_is_wrapped_as_nnsight(cache):
    import nnsight
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    model = cache.get(bert)
    assert type(model) is nnsight.NNsight
    with torch.inference_mode():
        with model.trace(input_ids=torch.tensor([[1, 2, 3]])):
            out = model.encoder.layer[1].output.save()
    hidden = out[0] if isinstance(out, tuple) else out
    assert hidden.shape == (1, 3, 32)
