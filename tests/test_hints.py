"""Compatibility hints: each nnsight error that an API change causes is reproduced for real (nnsight 0.8)."""

import pytest
import torch

from pytest_nnsight.hints import hint_for
from pytest_nnsight.models import wrap
from pytest_nnsight.testing import tiny_gpt2

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model():
    m, tok = tiny_gpt2()
    m.transformer.unused = torch.nn.Linear(32, 32)  # a module the forward never calls
    return wrap(m, tok)


def caught(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("expected the nnsight code to fail")


def unbound_hint(fn):
    """The hint for the NameError that `fn` must raise (a name the trace did not let out)."""
    exc = caught(fn)
    assert isinstance(exc, NameError), exc
    return hint_for(exc, exc.__traceback__)


def test_out_of_order_access_gets_the_execution_order_hint(model):
    def run():
        with model.trace(PROMPT):
            model.transformer.h[1].output.save()
            model.transformer.h[0].output.save()

    exc = caught(run)
    line = hint_for(exc)
    assert line is not None, f"no hint for {type(exc).__name__}: {exc}"
    assert "transformer.h.0.output was read out of execution order" in line
    assert "installed nnsight 0.8" in line and "transformers " in line


def test_module_that_never_ran_gets_the_same_hint(model):
    def run():
        with model.trace(PROMPT):
            model.transformer.unused.output.save()

    line = hint_for(caught(run))
    assert line is not None and "transformer.unused.output" in line and "never ran" in line


def test_value_on_a_saved_result_is_the_0_4_idiom(model):
    def run():
        with model.trace(PROMPT):
            hidden = model.transformer.h[0].output.save()
        return hidden.value

    exc = caught(run)
    assert isinstance(exc, AttributeError)
    assert "`.value` on a saved result" in hint_for(exc)


def test_saving_in_a_comprehension_does_not_escape_the_trace(model):
    def run():
        with model.trace(PROMPT):
            outs = [model.transformer.h[i].output.save() for i in range(2)]
        return len(outs)

    assert "'outs' was saved inside a comprehension" in unbound_hint(run)


def test_saving_in_an_inner_function_does_not_escape_the_trace(model):
    def run():
        with model.trace(PROMPT):

            def grab():
                inner = model.transformer.h[0].output.save()
                return inner

            grab()
        return inner  # noqa: F821 - the point: it is not bound here

    assert "'inner' was saved inside an inner function" in unbound_hint(run)


def test_unsaved_value_does_not_survive_the_trace(model):
    def run():
        with model.trace(PROMPT):
            hidden = model.transformer.h[0].output
        return hidden.shape

    exc = caught(run)
    assert "'hidden' was assigned in the trace without .save()" in hint_for(exc, exc.__traceback__)


def test_h13_bad_layer_index_is_an_attribute_error_on_0_8(model):
    def run():
        with model.trace(PROMPT):
            model.transformer.h[5].output.save()

    exc = caught(run)
    assert isinstance(exc, AttributeError), f"nnsight 0.8 raised {type(exc).__name__}: {exc}"
    assert "AttributeError (IndexError before 0.8, H13)" in hint_for(exc)


def test_h9_result_after_a_generate_loop_never_assigned(model):
    """H9: on nnsight 0.8 the statements after `for ... in tracer.iter[:]` do not run, so the result stays unbound."""
    import warnings

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 0.8's "was never reached" UserWarning
            with model.generate(PROMPT, max_new_tokens=2, do_sample=False) as tracer:
                for _ in tracer.iter[:]:
                    model.lm_head.output.save()
                result = tracer.result.save()
        return result

    assert "'result' is assigned in the trace but that line never ran" in unbound_hint(run)


def test_unrelated_errors_get_no_hint():
    for exc in (
        AssertionError("assert 1 == 2"),
        ValueError("bad"),
        AttributeError("'int' object has no attribute 'foo'"),
    ):
        assert hint_for(exc) is None
    try:
        undefined_name  # noqa: F821
    except NameError as exc:
        assert hint_for(exc, exc.__traceback__) is None


PYTESTER_SOURCE = """
import pytest
from pytest_nnsight.models import wrap
from pytest_nnsight.testing import tiny_gpt2

@pytest.fixture(scope="module")
def model():
    return wrap(*tiny_gpt2())

def test_reads_blocks_backwards(model):
    with model.trace("The capital of France is"):
        late = model.transformer.h[1].output.save()
        early = model.transformer.h[0].output.save()
    assert early.shape == late.shape

def test_unrelated_failure(model):
    assert 1 == 2, "plain failure"
"""


def test_hint_appears_in_the_failure_report_and_only_there(pytester):
    pytester.makepyfile(test_upgrade=PYTESTER_SOURCE)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*- pytest-nnsight hint -*",
            "pytest-nnsight hint: transformer.h.0.output was read out of execution order inside one trace*installed nnsight *, transformers *",
        ]
    )
    assert out.count("pytest-nnsight hint:") == 1, out  # the plain assertion failure gets none
