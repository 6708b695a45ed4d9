"""Generation findings on the bundled induction model: it copies a repeated sequence, and its layer-1 heads do the copying.

Measured on the shipped weights (50 random sequences of 6-10 distinct symbols, the prompt ending with the first symbol
again, greedy, 5 new tokens, token accuracy against the symbols that followed it):
- baseline: accuracy 1.0 on 50 / 50;
- zero-ablating all 4 layer-1 heads (`head_out.1.0` .. `head_out.1.3`) in every forward: accuracy 0.0 on 50 / 50
  (mean ablation over 20 of the prompts: mean 0.008);
- the 4 layer-1 heads are redundant induction heads: ablating any one or any two of them keeps mean accuracy >= 0.968,
  any three gives 0.32-0.41; so "the induction head" here is all four together, not one of them;
- in layer 0, ablating head 0 (the previous-token head of the manifest) gives 0.22 and head 2 gives 0.20, heads 1 and 3
  0.84 and 0.94.
The claims below state these with margins, as pass rates over variants.
"""

import random

import pytest

from pytest_nnsight.generation import Ablate, assert_generation, generate, generation_population, token_accuracy

N_NEW = 5
INDUCTION_HEADS = [Ablate(f"head_out.1.{h}") for h in range(4)]


def variants(n=40, seed=0):
    """Random sequences of 6-10 distinct symbols, repeated from the first one; expected: the symbols that followed it."""
    rng = random.Random(seed)
    prompts, expected = [], []
    for _ in range(n):
        seq = rng.sample([f"t{i}" for i in range(64)], rng.randint(6, 10))
        prompts.append(" ".join(seq + seq[:1]))
        expected.append(" ".join(seq[1 : 1 + N_NEW]))
    return prompts, expected


PROMPTS, EXPECTED = variants()


@pytest.fixture(scope="module")
def induction(nnsight_models):
    return nnsight_models.get("bundled:induction")


@pytest.fixture(scope="module")
def ablated(induction):
    return generation_population(
        induction, PROMPTS, metric=token_accuracy(EXPECTED), max_new_tokens=N_NEW, intervention=INDUCTION_HEADS
    )


@pytest.mark.finding("greedy generation copies a repeated sequence: token accuracy >= 0.8 in >= 95% of 40 variants")
def test_greedy_generation_copies_the_repeated_sequence(ablated):
    assert_generation(ablated, at_least=0.8, min_rate=0.95)


@pytest.mark.finding(
    "zero-ablating the 4 layer-1 heads at every step breaks the copy: token accuracy <= 0.2 in >= 95% of 40 variants"
)
def test_ablating_the_layer1_heads_breaks_the_copy(ablated):
    assert_generation(ablated, run="intervened", at_most=0.2, min_rate=0.95)


@pytest.mark.finding(
    "no single layer-1 head is needed: ablating any one keeps token accuracy >= 0.8 in >= 90% of variants"
)
@pytest.mark.parametrize("head", range(4))
def test_one_layer1_head_alone_is_not_needed(induction, head):
    result = generation_population(
        induction,
        PROMPTS[:20],
        metric=token_accuracy(EXPECTED[:20]),
        max_new_tokens=N_NEW,
        intervention=Ablate(f"head_out.1.{head}"),
    )
    assert_generation(result, run="intervened", at_least=0.8, min_rate=0.9)


@pytest.mark.finding(
    "the generated text of 3 repeated sequences, baseline and with the layer-1 heads ablated, is unchanged"
)
def test_generated_text_snapshot(induction, finding_snapshot):
    baseline = generate(induction, PROMPTS[:3], max_new_tokens=N_NEW)
    ablated = generate(induction, PROMPTS[:3], max_new_tokens=N_NEW, intervention=INDUCTION_HEADS)
    assert {"baseline": baseline, "ablated": ablated} == finding_snapshot(model=induction)
