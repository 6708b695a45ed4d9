"""Guarding the bundled model's structure against upgrades: what each module returns, padding, attention.

Under transformers 4.57 GPT-2 blocks return a tuple, under 5.x a tensor; a finding that reads
`.output[0]` silently changes meaning. This snapshot fails with an explanation when that happens.
"""


def test_capitals_structure(nnsight_model, structure_snapshot):
    structure_snapshot(nnsight_model("bundled:capitals"))
