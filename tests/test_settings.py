"""Settings resolve as command line > environment > ini > default, and bad values name their source."""

import pytest

from pytest_nnsight.errors import SettingsError
from pytest_nnsight.settings import OPTIONS, Settings, resolve


def test_defaults_when_nothing_is_set():
    s = resolve({}, env={}, ini={})
    assert (s.device, s.dtype, s.offline, s.require_models) == ("auto", "auto", False, False)
    assert s.source_of("device") == "default"


@pytest.mark.parametrize(
    "cli, env, ini, expected, source",
    [
        ("cuda:1", "cpu", "cuda", "cuda:1", "command line option --nnsight-device"),
        (None, "cpu", "cuda", "cpu", "environment variable PYTEST_NNSIGHT_DEVICE"),
        (None, None, "CUDA:0", "cuda:0", "ini key nnsight_device in the config file"),
        (None, None, "", "auto", "default"),
    ],
)
def test_precedence(cli, env, ini, expected, source):
    s = resolve({"device": cli}, env={"PYTEST_NNSIGHT_DEVICE": env} if env else {}, ini={"device": ini})
    assert s.device == expected
    assert s.source_of("device") == source


@pytest.mark.parametrize(
    "noun, value, accepted",
    [
        ("device", "gpu", "auto, cpu, cuda or cuda:N"),
        ("device", "cuda:x", "auto, cpu, cuda or cuda:N"),
        ("dtype", "fp16", "auto, float32, float16 or bfloat16"),
        ("offline", "maybe", "true or false"),
        ("check_batching_cells", "0", "positive integer"),
    ],
)
def test_bad_value_names_value_source_and_accepted(noun, value, accepted):
    with pytest.raises(SettingsError) as info:
        resolve({}, env={}, ini={noun: value})
    msg = str(info.value)
    assert repr(value) in msg and f"nnsight_{noun}" in msg and "config file" in msg and accepted in msg


def test_bad_env_value_names_the_variable():
    with pytest.raises(SettingsError, match="PYTEST_NNSIGHT_DTYPE"):
        resolve({}, env={"PYTEST_NNSIGHT_DTYPE": "half"}, ini={})


def test_flags_and_booleans():
    assert resolve({"offline": True}, env={}, ini={}).offline is True
    assert resolve({}, env={"PYTEST_NNSIGHT_OFFLINE": "yes"}, ini={"offline": "false"}).offline is True
    assert resolve({}, env={}, ini={"offline": "off"}).offline is False


def test_every_option_has_consistent_names():
    for opt in OPTIONS:
        assert opt.flag == "--nnsight-" + opt.noun.replace("_", "-")
        assert opt.ini == "nnsight_" + opt.noun and opt.env == "PYTEST_NNSIGHT_" + opt.noun.upper()
        assert hasattr(Settings(), opt.noun)


def test_a_model_carries_its_run_settings():
    from pytest_nnsight.settings import DEFAULTS, attach, settings_of

    class Wrapper:  # stands in for an nnsight wrapper
        pass

    served, own = Wrapper(), Wrapper()
    assert attach(served, Settings(check_batching=True, remote="local")) is served
    assert settings_of(served).check_batching and settings_of(served).remote == "local"
    # wrapped by the user
    assert settings_of(own) is DEFAULTS and not DEFAULTS.check_batching and DEFAULTS.remote == "off"
    key = id(served)
    del served  # the registry holds no model alive
    import gc

    gc.collect()
    from pytest_nnsight import settings as module

    assert key not in module._SERVED


def test_the_fixtures_serve_models_with_the_session_settings(pytester):
    pytester.makepyfile(
        """
        from pytest_nnsight.settings import settings_of

        def test_served(nnsight_model, nnsight_models):
            model = nnsight_model("bundled:capitals", device="cpu")
            s = settings_of(model)
            assert s.check_batching and s.check_batching_cells == 7 and s is nnsight_models.settings
        """
    )
    pytester.runpytest_inprocess("--nnsight-check-batching", "--nnsight-check-batching-cells", "7").assert_outcomes(
        passed=1
    )


UNSERVED = """
import pytest
from pytest_nnsight import logit_diff, sweep
from pytest_nnsight.models import wrap
from pytest_nnsight.testing import tiny_gpt2

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"

@pytest.fixture(scope="module")
def own_model():
    return wrap(*tiny_gpt2())  # wrapped by the user, not served by the fixtures

def test_own(own_model):
    sweep(own_model, CLEAN, CORRUPT, metric=logit_diff("Paris", "Berlin"), sites="resid_post", positions=[-1])

def test_served(nnsight_model):
    model = nnsight_model(*tiny_gpt2())
    sweep(model, CLEAN, CORRUPT, metric=logit_diff("Paris", "Berlin"), sites="resid_post", positions=[-1])
"""


def test_a_requested_option_that_missed_a_self_wrapped_model_is_said(pytester):
    """--nnsight-check-batching travels with served models; a test whose model the fixtures did not serve is named."""
    pytester.makepyfile(test_unserved=UNSERVED)
    result = pytester.runpytest_inprocess("--nnsight-check-batching")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*pytest-nnsight settings not applied*",
            "--nnsight-check-batching did not reach 1 test that ran verbs on a model the fixtures did not serve*",
            "  test_unserved.py::test_own: * of GPT2LMHeadModel",
            "serve the model through nnsight_model(module, tokenizer)*",
        ]
    )
    assert "test_unserved.py::test_served:" not in result.stdout.str()
    quiet = pytester.runpytest_inprocess()  # nothing asked: the defaults are what every model ran with
    quiet.assert_outcomes(passed=2)
    assert "settings not applied" not in quiet.stdout.str()
