"""The plugin as pytest users meet it: options, ini keys, markers, header, fixtures, skips. Run with pytester."""

import sys

import pytest


def test_help_lists_options_and_ini_keys(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "pytest-nnsight*",
            "*--nnsight-device=DEVICE*",
            "*--nnsight-dtype=DTYPE*",
            "*--nnsight-offline*",
            "*--nnsight-require-models*",
            "*nnsight_device (string):*",
            "*nnsight_offline (string):*",
        ]
    )


def test_help_does_not_import_torch_or_nnsight(pytester):
    pytester.makeconftest(
        """
        import sys
        def pytest_unconfigure(config):
            heavy = [m for m in ("nnsight", "torch", "transformers") if m in sys.modules]
            print("HEAVY-MODULES:", heavy)
        """
    )
    result = pytester.runpytest_subprocess("--help", "-s")
    result.stdout.fnmatch_lines(["HEAVY-MODULES: []"])


def test_run_without_models_does_not_import_nnsight(pytester):
    pytester.makepyfile(
        """
        import sys
        def test_plain():
            assert "nnsight" not in sys.modules and "torch" not in sys.modules
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_fixtures_are_documented(pytester):
    result = pytester.runpytest("--fixtures")
    result.stdout.fnmatch_lines(
        [
            "*nnsight_models*session*",
            "*Session cache of nnsight-wrapped models*",
            "*nnsight_model*",
            "*Factory*",
            "*model*",
            "*@pytest.mark.nnsight_models*",
        ]
    )


def test_markers_are_registered(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*nnsight_models(*model_ids)*", "*gpu: the test needs a CUDA device*"])


def test_report_header_shows_versions_device_and_dtype(pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--nnsight-dtype", "float32")
    result.stdout.fnmatch_lines(
        [
            "pytest-nnsight: nnsight *, torch *, transformers *; device auto (CUDA when available, else CPU), dtype float32"
        ]
    )


@pytest.mark.parametrize(
    "args, env, ini, expected",
    [
        (
            ["--nnsight-device", "gpu"],
            {},
            "",
            "*invalid nnsight_device 'gpu' from command line option --nnsight-device: expected auto, cpu, cuda or cuda:N*",
        ),
        (
            [],
            {"PYTEST_NNSIGHT_DTYPE": "half"},
            "",
            "*invalid nnsight_dtype 'half' from environment variable PYTEST_NNSIGHT_DTYPE*",
        ),
        (
            [],
            {},
            "nnsight_device = tpu",
            "*invalid nnsight_device 'tpu' from ini key nnsight_device in the config file*",
        ),
    ],
)
def test_invalid_setting_is_a_usage_error(pytester, monkeypatch, args, env, ini, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_cuda_without_cuda_is_a_usage_error_at_start(pytester):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pytester.makepyfile("\n".join(f"def test_{i}(): pass" for i in range(50)))
    result = pytester.runpytest("--nnsight-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*device 'cuda' asked for, but torch * sees no CUDA device*"])
    result.stdout.no_fnmatch_line("*passed*")


def test_gpu_marker_skips_with_reason(pytester):
    import torch

    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.gpu
        def test_needs_gpu():
            pass
        """
    )
    if torch.cuda.is_available():
        result = pytester.runpytest("-rs", "--nnsight-device", "cpu")
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["*needs a CUDA device, but the device is cpu*"])
    else:
        result = pytester.runpytest("-rs")
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["*needs a CUDA device; torch * sees none here*"])


def test_ten_tests_load_the_model_once_and_verbose_leaves_nnsight_debug_off(pytester):
    # one fresh interpreter for both checks: nnsight 0.8 reads -v from sys.argv at import (hazard H14), which only a
    # subprocess gives a real argv (the last test is the control); ten tests share the session's cached model, loaded once
    body = "\n".join(
        f"""
def test_{i}(nnsight_model, nnsight_models):
    model = nnsight_model("bundled:capitals")
    import nnsight  # first imported by the plugin, as a user's test meets it
    assert nnsight.CONFIG.APP.DEBUG is False
    with torch.inference_mode():
        with model.trace("The capital of France is"):
            logits = model.lm_head.output.save()
    assert logits.shape[:2] == (1, 6)
    assert nnsight_models.load_count("bundled:capitals") == 1
"""
        for i in range(10)
    )
    control = """
def test_zz_nnsight_alone_would_turn_debug_on_from_this_argv():
    # the control (H14 is real here): what nnsight 0.8 does at import, without the plugin's reset (import_nnsight)
    import sys, nnsight
    assert "-v" in sys.argv
    nnsight.CONFIG._from_cli()
    try:
        assert nnsight.CONFIG.APP.DEBUG is True
    finally:
        nnsight.CONFIG.APP.DEBUG = False
"""
    pytester.makepyfile("import torch\n" + body + control)
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines(["*pytest-nnsight models*", "bundled:capitals: cpu float32, loaded 1x in *"])


def test_marker_parametrizes_model_with_readable_ids(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.nnsight_models("bundled:capitals", "not-cached-org/not-a-model")
        def test_shape(model):
            assert model.tokenizer is not None
        """
    )
    result = pytester.runpytest("-v", "-rs", "--nnsight-offline")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*test_shape?bundled:capitals? PASSED*",
            "*test_shape?not-cached-org/not-a-model? SKIPPED*",
            "*model 'not-cached-org/not-a-model' is not available: offline mode and not in the local cache*--nnsight-require-models*",
        ]
    )


def test_require_models_turns_skip_into_failure(pytester):
    pytester.makepyfile(
        """
        def test_hub(nnsight_model):
            nnsight_model("not-cached-org/not-a-model")
        """
    )
    result = pytester.runpytest("--nnsight-offline", "--nnsight-require-models")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*model 'not-cached-org/not-a-model' is not available*failing, not skipping*"])


def test_model_fixture_without_marker_fails_clearly(pytester):
    pytester.makepyfile("def test_m(model): pass")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*uses the `model` fixture without @pytest.mark.nnsight_models(...)*"])


def test_marker_on_test_without_model_argument_is_a_usage_error(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.nnsight_models("bundled:capitals")
        def test_m():
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*parametrizes the `model` fixture, but the test does not take a `model` argument*"])


def test_no_nnsight_deprecation_warning_reaches_the_user(pytester):
    pytester.makepyfile(
        """
        def test_wrap(nnsight_model):
            model = nnsight_model("bundled:capitals")
            with model.trace("The capital of France is"):
                out = model.lm_head.output.save()
        """
    )
    result = pytester.runpytest("-W", "error::FutureWarning", "-W", "error::DeprecationWarning:nnsight")
    result.assert_outcomes(passed=1)


def test_plugin_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    eps = entry_points(group="pytest11")
    assert any(ep.value == "pytest_nnsight.plugin" for ep in eps)
    assert sys.modules.get("pytest_nnsight.plugin") is not None
