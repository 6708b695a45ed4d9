"""Replay: a finding's spec recomputed with plain torch hooks must equal pytest-nnsight's patch, and say what moved when not."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytest_nnsight import kl_div, logit_diff, logprob, prob, rank, trace
from pytest_nnsight.replay import FindingSpec, ReplayError, compute_with_nnsight, diagnose, load_plain, main, replay

ROOT = Path(__file__).resolve().parent.parent
CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
CASES = [
    ("transformer.h.0", "last", logit_diff("Paris", "Berlin"), "clean->corrupt"),
    ("embed", "France", logit_diff("Paris", "Berlin"), "clean->corrupt"),
    ("transformer.h.1:input", "last", prob("Paris"), "clean->corrupt"),
    ("head_out.0.1", "last", logprob("Paris"), "clean->corrupt"),
    ("attn_out.1", "last", kl_div(), "clean->corrupt"),
    ("mlp_out.0", [4, 5], logit_diff("Paris", "Berlin"), "corrupt->clean"),
    ("resid_post.1", "France", rank("Paris"), "corrupt->clean"),
]


@pytest.mark.parametrize("site, position, metric, direction", CASES, ids=[f"{c[0]}@{c[1]}:{c[2]}" for c in CASES])
def test_replay_equals_nnsight_patch(capitals, site, position, metric, direction):
    spec = FindingSpec.from_patch(
        capitals, CLEAN, CORRUPT, site=site, position=position, metric=metric, direction=direction
    )
    replayed = replay(spec)
    for q, recorded in spec.recorded.items():
        assert abs(replayed.values[q] - recorded) <= 1e-5, (
            f"{q} at {site} @ {position} ({metric}, {direction}) on {CLEAN!r} <- {CORRUPT!r}: replay {replayed.values[q]!r} vs nnsight {recorded!r}"
        )
    assert replayed.tokens == spec.tokens


def test_spec_round_trips_through_json(capitals, tmp_path):
    spec = FindingSpec.from_patch(
        capitals, CLEAN, CORRUPT, site="head_out.1.0", position="last", metric=logit_diff("Paris", "Berlin"), name="h"
    )
    spec.save(tmp_path / "h.json")
    assert FindingSpec.load(tmp_path / "h.json") == spec
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["sites"][0] == {
        "path": "transformer.h.1.attn.c_proj",
        "part": "input",
        "head": 0,
        "n_heads": 4,
        "item": 0,
        "label": "head_out.1.0",
    }
    assert data["metric_ids"] == [
        capitals.tokenizer.convert_tokens_to_ids("Paris"),
        capitals.tokenizer.convert_tokens_to_ids("Berlin"),
    ]


def test_bad_specs_get_one_clear_message(capitals, tmp_path):
    with pytest.raises(ReplayError, match="cannot be replayed: expected a built-in metric"):
        FindingSpec.from_patch(
            capitals, CLEAN, CORRUPT, site="embed", position="last", metric=lambda out: out.logits[:, -1, 0]
        )
    with pytest.raises(ReplayError, match="missing key.*positions"):
        FindingSpec.from_json(
            json.dumps(
                {"name": "x", "model": "bundled:capitals", "clean": "a", "corrupt": "b", "sites": [], "metric": "prob"}
            ),
            "x.json",
        )
    with pytest.raises(ReplayError, match="metric 'accuracy': expected one of logit_diff, prob"):
        FindingSpec.from_json(
            json.dumps(
                {
                    "name": "x",
                    "model": "m",
                    "clean": "a",
                    "corrupt": "b",
                    "sites": [],
                    "positions": [],
                    "metric": "accuracy",
                }
            )
        )
    spec = FindingSpec.load(ROOT / "examples" / "findings" / "block0_last.json")
    changed = FindingSpec.from_json(spec.to_json().replace('"France"', '"Spain"'))
    with pytest.raises(ReplayError, match="the tokenizer changed"):
        replay(changed)


def test_a_tracing_change_is_reported_as_such(capitals, monkeypatch):
    """nnsight's number moves while plain torch still gives the recorded one: the verdict blames the tracing."""
    spec = FindingSpec.load(ROOT / "examples" / "findings" / "block0_last.json")
    original = trace._apply

    def shifted(value, edit, *args, **kwargs):  # a tracing change: the patch lands one position early
        original(
            value,
            trace.Edit(edit.site, edit.rows, tuple(p - 1 for p in edit.positions), edit.values, edit.op),
            *args,
            **kwargs,
        )

    monkeypatch.setattr(trace, "_apply", shifted)
    now = compute_with_nnsight(spec, capitals)
    status, why = diagnose(spec.recorded, now, replay(spec).values, atol=spec.tolerance)
    assert abs(now["normalized"] - spec.recorded["normalized"]) > 0.5, now
    assert status == "tracing-changed", why
    assert f"{spec.recorded['normalized']:.6g} -> {now['normalized']:.6g}" in why and "nnsight's tracing" in why


def test_a_model_change_is_reported_as_such(nnsight_model):
    """Perturbed weights move nnsight and the replay together: the verdict blames the model's numbers."""
    spec = FindingSpec.load(ROOT / "examples" / "findings" / "block0_last.json")
    plain, tok = load_plain(spec.model)
    import copy

    module = copy.deepcopy(plain)
    with torch.no_grad():
        module.transformer.h[1].mlp.c_proj.bias.add_(
            0.5 * torch.randn(module.transformer.h[1].mlp.c_proj.bias.shape, generator=torch.Generator().manual_seed(0))
        )
    replayed = replay(spec, model=module, tokenizer=tok)
    now = compute_with_nnsight(spec, nnsight_model(copy.deepcopy(module), copy.deepcopy(tok)))
    status, why = diagnose(spec.recorded, now, replayed.values, atol=spec.tolerance)
    assert status == "model-changed", (why, now, replayed.values)
    assert "plain torch moved with it" in why


def test_diagnose_verdicts_on_made_up_numbers():
    rec = {"source": 2.0, "target": 0.0, "intervened": 1.0, "normalized": 0.5}
    moved = {"source": 2.0, "target": 0.0, "intervened": 1.6, "normalized": 0.8}
    other = {"source": 2.0, "target": 0.0, "intervened": 0.2, "normalized": 0.1}
    assert diagnose(rec, dict(rec), dict(rec))[0] == "stable"
    assert diagnose(rec, moved, dict(rec))[0] == "tracing-changed"
    assert diagnose(rec, moved, dict(moved))[0] == "model-changed"
    assert diagnose(rec, dict(rec), moved)[0] == "replay-differs"
    assert diagnose(rec, moved, other)[0] == "both-changed"
    assert diagnose(rec, None, moved)[0] == "model-changed"
    assert diagnose(rec, None, {**rec, "normalized": 0.5 + 5e-6})[0] == "stable"


def test_replay_imports_no_nnsight_and_matches_the_recorded_spec():
    code = (
        "import sys, json\nfrom pytest_nnsight.replay import FindingSpec, replay\n"
        "spec = FindingSpec.load('examples/findings/block0_last.json')\nr = replay(spec)\n"
        "print(json.dumps({'nnsight_loaded': 'nnsight' in sys.modules, 'diff': r.max_diff(spec.recorded)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["nnsight_loaded"] is False
    assert result["diff"] <= 1e-5, result


def test_cli_checks_every_example_spec(tmp_path, capsys):
    specs = sorted(str(p) for p in (ROOT / "examples" / "findings").glob("*.json"))
    assert len(specs) >= 3
    rc = main(["--check", "--json", str(tmp_path / "r.json"), *specs, str(tmp_path / "missing.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["findings"]
    assert rc == 1  # the missing file is an error; the rest are stable
    assert [r.get("status") for r in rows[:-1]] == ["stable"] * len(specs), rows
    assert "FileNotFoundError" in rows[-1]["error"]
    for r in rows[:-1]:
        assert all(math.isclose(r["nnsight"][q], r["replay"][q], abs_tol=1e-5) for q in r["replay"]), r


def test_a_module_served_as_an_object_cannot_be_replayed(nnsight_model, tiny):
    module, tok = tiny
    model = nnsight_model(module, tok)
    with pytest.raises(ReplayError, match="has no id transformers can load"):
        FindingSpec.from_patch(model, "a b c", "a b d", site="transformer.h.0", position="last", metric=prob(0))
