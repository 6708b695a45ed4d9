"""Record the finding specs in examples/findings/ (setup + numbers) through the real API, for replay and the version matrix.

    .venv/bin/python scripts/record_findings.py

Each spec is written by `FindingSpec.from_patch`, which runs the patch through nnsight and keeps
its numbers; `examples/test_capitals_replay.py` checks them and `python -m pytest_nnsight.replay
--check examples/findings/*.json` replays them with plain torch hooks.
"""

from pathlib import Path

from pytest_nnsight import kl_div, logit_diff, logprob, prob
from pytest_nnsight.models import ModelCache
from pytest_nnsight.replay import FindingSpec
from pytest_nnsight.settings import Settings

OUT = Path(__file__).resolve().parent.parent / "examples" / "findings"
TEST = "examples/test_capitals_replay.py::test_recorded_finding_holds[{}]"
CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
FINDINGS = [  # name, site, position, metric, direction
    ("block0_last", "transformer.h.0", "last", logit_diff("Paris", "Berlin"), "clean->corrupt"),
    ("embed_subject", "embed", "France", logit_diff("Paris", "Berlin"), "clean->corrupt"),
    ("head_0_1_last_prob", "head_out.0.1", "last", prob("Paris"), "clean->corrupt"),
    ("attn1_last_kl", "attn_out.1", "last", kl_div(), "clean->corrupt"),
    ("block0_subject_denoise", "transformer.h.0", "France", logprob("Paris"), "corrupt->clean"),
]


def main() -> None:
    model = ModelCache(Settings(device="cpu", offline=True)).get("bundled:capitals")
    for name, site, position, metric, direction in FINDINGS:
        spec = FindingSpec.from_patch(
            model,
            CLEAN,
            CORRUPT,
            site=site,
            position=position,
            metric=metric,
            direction=direction,
            name=name,
            test=TEST.format(name),
        )
        spec.save(OUT / f"{name}.json")
        print(f"{name}: {spec.recorded}")


if __name__ == "__main__":
    main()
