"""The compatibility layer (pytest_nnsight.compat): each nnsight version difference, simulated where the installed
nnsight does not show it, and checked against the plain behaviour it must reproduce."""

import threading
import types

import pytest
import torch

from pytest_nnsight import compat, logit_diff, patch
from pytest_nnsight.metrics import Metric, logits_of
from pytest_nnsight.models import wrap
from pytest_nnsight.sites import resolve_site
from pytest_nnsight.structure import model_structure
from pytest_nnsight.testing import tiny_gpt2
from pytest_nnsight.trace import Edit, run

SHORT, LONG = "The capital of France is", "Everyone knows that the capital of the country called Spain is"


def test_parse_version():
    assert compat.parse_version("0.8.1") == (0, 8, 1)
    assert compat.parse_version("2.13.0+cpu") == (2, 13, 0)
    assert compat.parse_version("0.9.0rc1") == (0, 9, 0)
    assert compat.parse_version("5.0.0.dev0") == (5, 0, 0)
    assert compat.parse_version("not installed") == ()
    assert compat.parse_version("0.10.0") > compat.parse_version("0.9.3")


def _last_logits(model, inputs):
    with torch.inference_mode():
        with model.trace(inputs):
            out = logits_of(model.output)[:, -1, :].detach().clone().save()
    return out


def test_left_padded_batch_gets_position_ids_where_nnsight_does_not_add_them(capitals, monkeypatch):
    """nnsight <= 0.7 (simulated): the batch is tokenized here with position ids, and each padded row's last logits equal
    the prompt run alone; without them (a raw left-padded forward) they do not (H4/H5)."""
    monkeypatch.setattr(compat, "injects_position_ids", lambda: False)
    alone = torch.cat([_last_logits(capitals, SHORT), _last_logits(capitals, LONG)])
    inputs = compat.trace_inputs(capitals, [SHORT, LONG])
    assert isinstance(inputs, dict) and set(inputs) == {"input_ids", "attention_mask", "position_ids"}
    mask = inputs["attention_mask"]
    assert not bool(mask[0].all()) and bool(mask[1].all())  # the short row is left-padded
    pad = int((mask[0] == 0).sum())
    assert inputs["position_ids"][0, pad:].tolist() == list(range(mask.shape[1] - pad))
    assert inputs["position_ids"][1].tolist() == list(range(mask.shape[1]))
    batched = _last_logits(capitals, inputs)
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    # the control: the same padded batch without position ids, as nnsight <= 0.7 ran it, moves the padded row
    hf = capitals._model if hasattr(capitals, "_model") else capitals._module
    with torch.inference_mode():
        raw = hf(input_ids=inputs["input_ids"], attention_mask=mask).logits[:, -1, :]
    assert (raw[0] - alone[0]).abs().max() > 1e-2
    torch.testing.assert_close(raw[1], alone[1], atol=1e-4, rtol=1e-4)


def test_trace_inputs_leaves_everything_else_alone(capitals, monkeypatch):
    monkeypatch.setattr(compat, "injects_position_ids", lambda: False)
    assert compat.trace_inputs(capitals, SHORT) == SHORT
    assert compat.trace_inputs(capitals, [SHORT, SHORT]) == [SHORT, SHORT]  # equal lengths: no padding
    monkeypatch.setattr(compat, "injects_position_ids", lambda: True)
    assert compat.trace_inputs(capitals, [SHORT, LONG]) == [SHORT, LONG]  # nnsight 0.8 adds them itself


def test_shared_padded_trace_gives_the_unbatched_effect_on_old_nnsight(capitals, monkeypatch):
    """patch() runs clean and corrupt in one padded trace; with simulated nnsight <= 0.7 its numbers equal 0.8's."""
    kw = dict(site="transformer.h.0", position="last", metric=logit_diff("Paris", "Madrid"))
    clean, corrupt = "The capital of France is", "Everyone knows that the capital of Spain is"
    reference = patch(capitals, clean, "The capital of Spain is", **kw)
    monkeypatch.setattr(compat, "injects_position_ids", lambda: False)
    old = patch(capitals, clean, "The capital of Spain is", **kw)
    assert old.normalized == pytest.approx(reference.normalized, abs=1e-5)
    m = Metric("last", lambda out, ref: logits_of(out)[:, -1, 0])
    both, _ = run(capitals, [clean, corrupt], m)
    single, _ = run(capitals, clean, m)
    assert float(both[0]) == pytest.approx(float(single[0]), abs=1e-4)


def test_edit_runs_in_inference_mode_where_the_trace_body_runs_in_a_worker_thread():
    """nnsight <= 0.7 runs the trace body in a thread where an outer inference_mode is off: an in-place write to an
    inference tensor raises there unless edit_mode re-enters the mode."""
    with torch.inference_mode():
        value = torch.zeros(1, 3, 4)
    errors = []

    def body(use_mode):
        try:
            if use_mode:
                with compat.edit_mode(value):
                    value[0, 1, :] = 1.0
            else:
                value[0, 2, :] = 1.0
        except RuntimeError as exc:
            errors.append(str(exc))

    for use_mode in (False, True):
        t = threading.Thread(target=body, args=(use_mode,))
        t.start()
        t.join()
    assert len(errors) == 1 and "Inplace update to inference tensor outside InferenceMode" in errors[0]
    assert value[0, 1].tolist() == [1.0] * 4
    plain = torch.zeros(2)
    with compat.edit_mode(plain):  # a normal tensor: no mode entered
        assert not torch.is_inference_mode_enabled()


def test_plugin_edit_through_run_matches_a_hand_written_patch(capitals):
    s = resolve_site(capitals, "transformer.h.0")
    m = Metric("last", lambda out, ref: logits_of(out)[:, -1, :5].sum(-1))
    edited, _ = run(capitals, SHORT, m, edits=[Edit(s, (0,), (2,), torch.zeros(1, 64))])
    with torch.inference_mode():
        with capitals.trace(SHORT):
            h = capitals.transformer.h[0].output
            h = h[0] if isinstance(h, tuple) else h
            h[:, 2, :] = 0
            ref = logits_of(capitals.output)[:, -1, :5].sum(-1).save()
    assert float(edited[0]) == pytest.approx(float(ref[0]), abs=1e-5)


def test_wrapper_class_and_config_on_a_preloaded_module():
    new = types.SimpleNamespace(TransformersModel=type("TransformersModel", (), {}), LanguageModel=object)
    assert compat.language_model_class(new).__name__ == "TransformersModel"

    class LanguageModel:  # nnsight <= 0.7: no TransformersModel, and .config None on a pre-loaded module
        def __init__(self, module, **kw):
            object.__setattr__(self, "_module", module)
            object.__setattr__(self, "config", None)
            object.__setattr__(self, "kw", kw)

        def __setattr__(self, name, value):  # like 0.6.3's Envoy: an attribute set goes to the module
            setattr(self._module, name, value)

    old = types.SimpleNamespace(LanguageModel=LanguageModel)
    module, tok = tiny_gpt2()
    wrapped = compat.wrap_language_model(old, module, tokenizer=tok)
    assert isinstance(wrapped, LanguageModel) and wrapped.kw == {"tokenizer": tok}
    assert wrapped.config is module.config and wrapped.config.n_layer == 2
    assert compat.is_language_model(wrapped)


def test_nnsight_own_modules_are_left_out_of_the_structure_record():
    """nnsight <= 0.7 attaches `generator` / `generator.streamer` to the wrapped model (simulated here)."""
    module, tok = tiny_gpt2()
    before = model_structure(wrap(module, tok)).record
    generator = type("Generator", (torch.nn.Module,), {"__module__": "nnsight.modeling.language"})()
    generator.add_module(
        "streamer", type("Streamer", (torch.nn.Module,), {"__module__": "nnsight.modeling.language"})()
    )
    module.add_module("generator", generator)
    after = model_structure(wrap(module, tok)).record
    assert "generator" not in after["modules"] and "generator.streamer" not in after["modules"]
    assert after == before


def test_not_reached_and_cause_line_across_lines():
    OutOfOrderError = type("OutOfOrderError", (Exception,), {})
    assert compat.is_not_reached(
        OutOfOrderError("'model.transformer.h.0.output.i0' was requested but the model already ran past it")
    )
    assert compat.is_not_reached(ValueError("Execution complete but `model.unused.output.i0` was not provided"))
    assert not compat.is_not_reached(ValueError("shape mismatch"))
    wrapped = ValueError(
        "Traceback (most recent call last):\n  File x, line 3\n    foo\n\nIndexError: index 5 is out of range"
    )
    assert compat.cause_line(wrapped) == "IndexError: index 5 is out of range"
    assert compat.cause_line(IndexError("index 5 is out of range")) == "index 5 is out of range"


def test_keyword_only_inputs_move_to_the_first_position_on_nnsight_0_5(monkeypatch):
    """nnsight 0.5 opens no invoke for keyword-only inputs (the body never sees a forward); 0.6+ take them as given."""
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    monkeypatch.setattr(compat, "installed", lambda name: (0, 5, 15))
    assert compat.trace_args(None, (), kwargs)[0] is ids and compat.trace_kwargs_of(None, (), kwargs) == {
        "attention_mask": mask
    }
    assert compat.trace_args(None, (ids,), {"attention_mask": mask}) == (ids,)  # already positional
    monkeypatch.setattr(compat, "installed", lambda name: (0, 6, 3))
    assert compat.trace_args(None, (), kwargs) == () and compat.trace_kwargs_of(None, (), kwargs) == kwargs
