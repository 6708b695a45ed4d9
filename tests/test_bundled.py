"""The bundled models load offline, match their recorded weights and answer as their manifests say."""

import pytest
import torch

from pytest_nnsight import bundled


@pytest.fixture(scope="module")
def capitals():
    from pytest_nnsight.models import ModelCache
    from pytest_nnsight.settings import Settings

    return ModelCache(Settings(device="cpu", offline=True)).get("bundled:capitals")


def test_bundled_names():
    assert {"capitals", "induction"} <= set(bundled.names())


@pytest.mark.parametrize("name", ["capitals", "induction"])
def test_manifest_records_training_and_weights(name):
    m = bundled.manifest(f"bundled:{name}")
    assert m["training"]["command"].startswith(f"python scripts/train_bundled.py {name}")
    assert "seeds" in m["training"]
    assert m["weights_sha256"] == bundled.sha256_of(bundled.path_of(f"bundled:{name}") / "model.safetensors")


def test_capitals_answers_its_training_prompts_with_recorded_accuracy(capitals):
    task = bundled.manifest("bundled:capitals")["task"]
    prompts, answers = [], []
    for template in task["templates"]:
        for country, capital in task["capitals"].items():
            prompts.append(template.format(country=country))
            answers.append(capital)
    with torch.inference_mode():
        with capitals.trace(prompts):  # one left-padded batch: nnsight 0.8 supplies position ids
            top = capitals.lm_head.output[:, -1, :].argmax(-1).save()
    predicted = capitals.tokenizer.convert_ids_to_tokens(top.tolist())
    correct = sum(p == a for p, a in zip(predicted, answers))
    recorded = bundled.manifest("bundled:capitals")["accuracy"]["train"]
    assert (correct, len(prompts)) == (recorded["correct"], recorded["total"])
    assert correct == len(prompts) == 48 * 8


def test_every_entity_is_one_token(capitals):
    task = bundled.manifest("bundled:capitals")["task"]
    tok = capitals.tokenizer
    for word in list(task["capitals"]) + list(task["capitals"].values()):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_training_reruns_bit_identically(tmp_path, monkeypatch):
    """Two short runs of the training script give the same weights (the full run's sha is in the manifest): one in a
    fresh interpreter, one in this process (another hash seed, torch already used; the torch state it sets is restored)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "train_bundled.py"
    args = ["capitals", "--steps", "5", "--out"]
    subprocess.run([sys.executable, str(script), *args, str(tmp_path / "a")], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("train_bundled_rerun", script)
    trainer = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, trainer)  # its dataclasses look their module up there
    spec.loader.exec_module(trainer)
    state = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_rng_state(),
    )
    try:
        trainer.main([*args, str(tmp_path / "b")])
    finally:
        torch.set_num_threads(state[0])
        torch.use_deterministic_algorithms(state[1], warn_only=state[2])
        torch.set_rng_state(state[3])
    shas = [bundled.sha256_of(tmp_path / run / "model.safetensors") for run in ("a", "b")]
    assert shas[0] == shas[1]
    assert shas[0] != bundled.manifest("bundled:capitals")["weights_sha256"]  # 5 steps is not the shipped model
