"""Generation with interventions at every step, checked against transformers' own generate (KV cache) with plain hooks;
batched against one prompt at a time; text metrics, claims, snapshots and bad input."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pytest_nnsight.errors import ArgumentError, ArgumentTypeError, InterventionError, MetricError
from pytest_nnsight.generation import (
    Ablate,
    Decoding,
    Generation,
    GenerationPopulation,
    Patch,
    Steer,
    assert_generation,
    contains,
    exact_continuation,
    generate,
    generation_population,
    text_metric,
    token_accuracy,
)

SEQ = "t3 t9 t20 t41 t7 t12 t30 t5"
PROMPTS = [SEQ + " t3", "t1 t2 t3 t4 t1", "t50 t8 t16 t33 t2 t61 t50", "t11 t12 t13 t14 t15 t16 t17 t18 t19 t20 t11"]


@pytest.fixture(scope="module")
def induction(nnsight_models):
    return nnsight_models.get("bundled:induction", device="cpu")


def hf_generate(model, prompt, n, hooks=()):
    """transformers' greedy generate (KV cache on), with optional plain torch forward(-pre) hooks; the new token ids."""
    hf = model._module
    handles = [getattr(hf.get_submodule(path), kind)(fn, **kw) for path, kind, fn, kw in hooks]
    try:
        ids = model.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = hf.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    return out[0, ids["input_ids"].shape[1] :].tolist()


def zero_heads(layer, heads, d_head=16):
    """A pre-hook on layer's c_proj zeroing the given heads' slices of its input at every position."""

    def pre(module, args):
        x = args[0].clone()
        for h in heads:
            x[..., h * d_head : (h + 1) * d_head] = 0
        return (x,) + args[1:]

    return (f"transformer.h.{layer}.attn.c_proj", "register_forward_pre_hook", pre, {})


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_equals_transformers_generate_with_kv_cache(induction, prompt):
    gen = generate(induction, prompt, max_new_tokens=6)
    assert list(gen.token_ids[0]) == hf_generate(induction, prompt, 6)


def test_greedy_equals_transformers_generate_on_capitals(capitals):
    prompts = ["The capital of France is", "Q : what is the capital of Spain ? A :"]
    for p in prompts:
        gen = generate(capitals, p, max_new_tokens=8)
        assert list(gen.token_ids[0]) == hf_generate(capitals, p, 8)


@pytest.mark.parametrize("use_cache", [False, True])
def test_ablation_at_every_step_equals_a_hook_during_cached_generation(induction, use_cache):
    heads = [0, 1, 2, 3]
    gen = generate(
        induction,
        PROMPTS[0],
        max_new_tokens=6,
        intervention=[Ablate(f"head_out.1.{h}") for h in heads],
        use_cache=use_cache,
    )
    assert list(gen.token_ids[0]) == hf_generate(induction, PROMPTS[0], 6, [zero_heads(1, heads)])
    assert gen.intervention.startswith("zero ablation of head_out.1.0 at 'all'")


def test_steering_at_every_step_equals_a_hook(induction):
    vec = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4

    def post(module, args, out):
        return out + vec

    gen = generate(induction, PROMPTS[1], max_new_tokens=4, intervention=Steer("mlp_out.0", vec))
    assert list(gen.token_ids[0]) == hf_generate(
        induction, PROMPTS[1], 4, [("transformer.h.0.mlp", "register_forward_hook", post, {})]
    )
    # the steer changes the text (else the test shows nothing)
    assert gen.texts != generate(induction, PROMPTS[1], max_new_tokens=4).texts


def test_prompt_positions_resolve_in_each_prompt_and_match_a_hook(induction):
    """positions='last' names each prompt's own last token: a hook zeroing that embedding in the prompt's forward agrees."""
    prompt = PROMPTS[1]
    last = len(induction.tokenizer(prompt)["input_ids"]) - 1

    def post(module, args, out):
        if out.shape[1] > last:  # the prompt forward (then the cache holds the edited position)
            out = out.clone()
            out[:, last] = 0
        return out

    gen = generate(induction, [prompt, PROMPTS[0]], max_new_tokens=3, intervention=Ablate("embed", positions="last"))
    assert list(gen.token_ids[0]) == hf_generate(
        induction, prompt, 3, [("transformer.drop", "register_forward_hook", post, {})]
    )
    assert gen.token_ids[0] != generate(induction, prompt, max_new_tokens=3).token_ids[0]


def test_patch_writes_the_source_activation_at_the_same_prompt_positions(induction):
    source, target = "t1 t2 t3 t4 t1", "t1 t9 t3 t4 t1"
    with torch.inference_mode():
        donor = induction._module.transformer.wte.weight[induction.tokenizer.convert_tokens_to_ids("t2")].clone()

    def post(module, args, out):  # the embedding output at position 2 ('t2' vs 't9'), prompt forward only
        if out.shape[1] > 2:
            out = out.clone()
            out[:, 2] = donor + induction._module.transformer.wpe.weight[2]
        return out

    gen = generate(induction, target, max_new_tokens=3, intervention=Patch("embed", source, 2))
    assert list(gen.token_ids[0]) == hf_generate(
        induction, target, 3, [("transformer.drop", "register_forward_hook", post, {})]
    )
    assert gen.texts[0].split()[0] == "t2"  # recall of what followed t1 now reads the patched t2
    assert generate(induction, target, max_new_tokens=1).texts[0] == "t9"  # and without the patch, t9


@pytest.mark.parametrize(
    "intervention",
    [
        None,
        [Ablate(f"head_out.1.{h}") for h in range(4)],
        Ablate("resid_post.0", positions="generated"),
        Ablate("embed", positions=[1, 2]),
        Steer("resid_post.0", torch.linspace(-2, 2, 64), positions="last"),
    ],
    ids=["none", "heads", "generated", "prompt-ints", "prompt-last"],
)
def test_batched_generation_equals_one_prompt_at_a_time(induction, intervention):
    batched = generate(induction, PROMPTS, max_new_tokens=5, intervention=intervention)
    single = [generate(induction, p, max_new_tokens=5, intervention=intervention) for p in PROMPTS]
    assert batched.token_ids == tuple(s.token_ids[0] for s in single)
    assert (
        generate(induction, PROMPTS, max_new_tokens=5, intervention=intervention, batch_size=3).token_ids
        == batched.token_ids
    )


SYMBOLS = [f"t{i}" for i in range(64)]


@settings(max_examples=8, deadline=None)
@given(
    rows=st.lists(st.lists(st.sampled_from(SYMBOLS), min_size=2, max_size=12, unique=True), min_size=1, max_size=5),
    which=st.sampled_from(["none", "ablate", "steer", "mean"]),
    where=st.sampled_from(["all", "prompt", "generated"]),
    sample=st.booleans(),
    cache=st.booleans(),
)
def test_property_batched_equals_single_over_prompt_sets_and_interventions(
    induction, rows, which, where, sample, cache
):
    """Left padding, explicit position ids and per-prompt seeding: any batch gives each prompt its single-prompt text."""
    prompts = [" ".join(r + r[:1]) for r in rows]
    vec = torch.linspace(-3, 3, 64)
    intervention = {
        "none": None,
        "ablate": Ablate("head_out.1.2", positions=where),
        "steer": Steer("resid_post.0", vec, positions=where),
        "mean": Ablate("attn_out.1", positions=where, method="mean", reference_prompts=["t1 t2 t3 t1"]),
    }[which]
    kw = dict(
        max_new_tokens=3, intervention=intervention, do_sample=sample, seed=5 if sample else None, temperature=1.5
    )
    batched = generate(induction, prompts, use_cache=cache, **kw)  # the KV cache path too: the single runs use none
    assert batched.token_ids == tuple(generate(induction, p, **kw).token_ids[0] for p in prompts)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(induction):
    kw = dict(max_new_tokens=6, do_sample=True, temperature=2.0, seed=7)
    a = generate(induction, PROMPTS, **kw)
    assert a == generate(induction, PROMPTS, **kw)
    assert a.token_ids[2] == generate(induction, PROMPTS[2], **kw).token_ids[0]
    others = {generate(induction, PROMPTS, **dict(kw, seed=s)).token_ids for s in range(4)}
    assert len(others) > 1  # the seed matters
    assert a.config == Decoding(6, True, 2.0, None, 7, 0, True)
    top1 = generate(induction, PROMPTS, max_new_tokens=6, do_sample=True, top_k=1, seed=3)
    assert top1.token_ids == generate(induction, PROMPTS, max_new_tokens=6).token_ids  # top_k=1 sampling is greedy


def test_eos_ends_a_row_as_in_transformers_and_batched_rows_stop_apart(nnsight_models):
    """The bundled models never emit EOS here, so a tiny random model gets as EOS a word it generates."""
    from pytest_nnsight.testing import tiny_gpt2

    # generates "store store France ..." after the first prompt, "is is ..." after the second
    module, tok = tiny_gpt2(seed=5)
    model = nnsight_models.get(module, tok, device="cpu")
    prompts = ["When Mary and John went to the store", "The capital of France is"]
    free = generate(model, prompts, max_new_tokens=8, stop_at_eos=False)
    row = free.token_ids[0]
    k = next(i for i in range(1, len(row)) if row[i] not in row[:i])  # a token first generated at step k >= 1
    eos = row[k]
    old = model.tokenizer.eos_token
    model.tokenizer.eos_token = model.tokenizer.convert_ids_to_tokens(eos)
    try:
        stopped = generate(model, prompts, max_new_tokens=8)
        held = generate(model, prompts, max_new_tokens=8, min_new_tokens=k + 2)
        assert generate(model, prompts, max_new_tokens=8, use_cache=True).token_ids == stopped.token_ids
        for r, p in enumerate(prompts):
            ids = model.tokenizer(p, return_tensors="pt")
            with torch.inference_mode():
                ref = module.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)[
                    0, ids["input_ids"].shape[1] :
                ]
                ref_held = module.generate(
                    **ids, max_new_tokens=8, min_new_tokens=k + 2, do_sample=False, eos_token_id=eos, pad_token_id=0
                )[0, ids["input_ids"].shape[1] :]
            assert list(stopped.token_ids[r]) == ref.tolist()
            assert list(held.token_ids[r]) == ref_held.tolist()
            assert stopped.token_ids[r] == generate(model, p, max_new_tokens=8).token_ids[0]
        assert stopped.token_ids[0] == row[: k + 1] and stopped.tokens[0][-1] == model.tokenizer.eos_token
        assert len(stopped.token_ids[1]) == 8  # the other row of the batch goes on
        assert eos not in held.token_ids[0][: k + 2]
        assert stopped.config.stop_at_eos and not free.config.stop_at_eos
    finally:
        model.tokenizer.eos_token = old


def gen_of(prompts, texts, tok):
    ids = tuple(tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return Generation(
        tuple(prompts), tuple(texts), tuple(tuple(tok.convert_ids_to_tokens(list(i))) for i in ids), ids, Decoding(3)
    )


def test_text_metrics_score_each_continuation(induction):
    g = gen_of(["a", "b", "c"], ["t1 t2 t3", "t1 t5 t3", "t9"], induction.tokenizer)
    assert token_accuracy("t1 t2 t3")(induction, g) == (1.0, 2 / 3, 0.0)
    assert exact_continuation("t1 t2")(induction, g) == (1.0, 0.0, 0.0)
    assert exact_continuation(["t1 t2 t3", "t1 t5", "t9"])(induction, g) == (1.0, 1.0, 1.0)
    assert contains("t3")(induction, g) == (1.0, 1.0, 0.0)
    assert token_accuracy(lambda p: {"a": "t1", "b": "t2", "c": "t9 t1"}[p])(induction, g) == (1.0, 0.0, 0.5)
    assert text_metric(lambda p, t: len(t.split()), "words")(induction, g) == (3.0, 3.0, 1.0)


def test_generation_claims_pass_and_fail_with_the_worst_variants(induction):
    expected = [" ".join(p.split()[1:-1][:3]) for p in PROMPTS]  # the tokens after the repeated first one
    heads = [Ablate(f"head_out.1.{h}") for h in range(4)]
    result = generation_population(
        induction, PROMPTS, metric=token_accuracy(expected), max_new_tokens=3, intervention=heads
    )
    assert isinstance(result, GenerationPopulation) and result.n == 4
    assert result.baseline_scores == token_accuracy(expected)(induction, result.baseline)
    assert_generation(result, at_least=1.0)
    assert_generation(result, run="intervened", at_most=0.5, min_rate=0.75)
    with pytest.raises(AssertionError) as info:
        assert_generation(result, run="intervened", at_least=0.9)
    text = str(info.value)
    assert "claim: intervened token_accuracy(per prompt) >= 0.9 in at least 100% of 4 prompt variants" in text
    assert (
        "pass rate:" in text
        and "zero ablation of head_out.1.0" in text
        and "(expected 't9 t20 t41') (baseline 't9 t20 t41')" in text
    )
    assert result.expected == tuple(expected)


def test_generated_text_snapshots_exactly_with_its_decoding(induction):
    from pytest_nnsight.snapshots.compare import Tolerance, compare_findings
    from pytest_nnsight.snapshots.encode import to_value

    gen = generate(induction, PROMPTS[:2], max_new_tokens=4)
    old = to_value(gen)
    assert old["config"] == {
        "@type": "Decoding",
        "max_new_tokens": 4,
        "do_sample": False,
        "temperature": 1.0,
        "top_k": None,
        "seed": None,
        "min_new_tokens": 0,
        "stop_at_eos": True,
        "use_cache": False,
    }
    assert compare_findings(old, to_value(gen), Tolerance(1e-4, 1e-4)).ok
    changed = to_value(dataclasses.replace(gen, texts=(gen.texts[0], gen.texts[1] + " t1")))
    assert not compare_findings(old, changed, Tolerance(1e9, 1e9)).ok  # text is exact, whatever the numeric tolerance


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_new_tokens=0), ArgumentError, r"max_new_tokens=0: expected an int >= 1"),
        (dict(max_new_tokens=-2), ArgumentError, r"max_new_tokens=-2: expected an int >= 1"),
        (dict(max_new_tokens="3"), ArgumentTypeError, r"max_new_tokens='3' \(str\): expected an int >= 1"),
        (
            dict(max_new_tokens=40),
            ArgumentError,
            r"max_new_tokens=40 with prompt .* \(6 tokens\) goes beyond the model's context of 32 positions: expected max_new_tokens <= 26",
        ),
        (dict(max_new_tokens=3, min_new_tokens=4), ArgumentError, r"min_new_tokens=4 is larger than max_new_tokens=3"),
        (dict(max_new_tokens=3, do_sample=True), ArgumentError, r"seed=None: sampled generation needs an int seed"),
        (
            dict(max_new_tokens=3, do_sample=True, seed=0, temperature=0),
            ArgumentError,
            r"temperature=0: expected a finite number > 0",
        ),
        (dict(max_new_tokens=3, batch_size=0), ArgumentError, r"batch_size=0: expected an int >= 1"),
        (dict(max_new_tokens=3, use_cache="yes"), ArgumentTypeError, r"use_cache='yes': expected True or False"),
        (
            dict(max_new_tokens=3, intervention="head_out.1.0"),
            ArgumentTypeError,
            r"expected Ablate\(...\), Steer\(...\), Patch\(...\)",
        ),
        (
            dict(max_new_tokens=3, intervention=Ablate("head_out.1.9")),
            Exception,
            r"head 9 is out of range: layer 1 has 4 heads",
        ),
        (
            dict(max_new_tokens=3, intervention=Ablate("embed", method="resample")),
            ArgumentError,
            r"ablation method 'resample': expected 'zero' or 'mean'",
        ),
        (
            dict(max_new_tokens=3, intervention=Steer("embed", torch.ones(3))),
            InterventionError,
            r"shape \(3,\) does not fit embed: expected a tensor of shape \(64,\)",
        ),
        (
            dict(max_new_tokens=3, intervention=Patch("embed", "t1 t2 t3 t4 t5 t6 t7", 7)),
            ArgumentError,
            r"position 7 is beyond the shortest prompt \(6 tokens\)",
        ),
    ],
)
def test_bad_input_is_one_clear_error(induction, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(induction, "t1 t2 t3 t4 t1", **kwargs)


def test_a_model_without_an_lm_head_is_refused(nnsight_models):
    from pytest_nnsight.errors import ModelUsageError
    from pytest_nnsight.testing import tiny_model

    bert = nnsight_models.get(*tiny_model("bert"), device="cpu")
    with pytest.raises(
        ModelUsageError,
        match=r"generate needs a causal language model with an LM head; .* is a bert model without an LM head",
    ):
        generate(bert, "the capital of france is", max_new_tokens=2)


def test_remote_generation_is_refused_with_the_reason(induction, monkeypatch):
    from pytest_nnsight import remote
    from pytest_nnsight.errors import ModelUsageError

    monkeypatch.setattr(remote, "trace_kwargs", lambda model=None, settings=None: {"remote": True})
    with pytest.raises(
        ModelUsageError, match=r"generate runs the model in this process.*run generation findings locally"
    ):
        generate(induction, "t1 t2 t3 t1", max_new_tokens=2)


def test_bad_claims_and_metrics_are_named(induction):
    with pytest.raises(ArgumentError, match=r"prompts=\[\]"):
        generate(induction, [], max_new_tokens=2)
    g = gen_of(["a"], ["t1"], induction.tokenizer)
    with pytest.raises(MetricError, match=r"words the tokenizer does not know \('Paris'\)"):
        token_accuracy("t1 Paris")(induction, g)
    with pytest.raises(MetricError, match=r"2 given for 1 prompts"):
        token_accuracy(["t1", "t2"])(induction, g)
    result = GenerationPopulation("m", g, (1.0,))
    with pytest.raises(ArgumentError, match="exactly one of at_least= or at_most="):
        assert_generation(result)
    with pytest.raises(ArgumentError, match="has no intervened generation"):
        assert_generation(result, run="intervened", at_least=1)


REPORTED = """
import json, pathlib
import pytest
from pytest_nnsight.generation import Ablate, assert_generation, generation_population, token_accuracy
from pytest_nnsight.lens import logit_lens

OUT = pathlib.Path(__file__).with_name("measured.json")

@pytest.mark.finding("the lens and the copy")
def test_lens_and_copy(nnsight_models):
    caps = nnsight_models.get("bundled:capitals")
    ind = nnsight_models.get("bundled:induction")
    lens = logit_lens(caps, "The capital of France is", answer="Paris")
    result = generation_population(ind, ["t1 t2 t3 t4 t1", "t7 t8 t9 t7"], metric=token_accuracy(["t2 t3", "t8 t9"]),
                                   max_new_tokens=2, intervention=[Ablate(f"head_out.1.{h}") for h in range(4)])
    OUT.write_text(json.dumps({"ranks": [list(r) for r in lens.ranks], "baseline": list(result.baseline.texts),
                               "intervened": list(result.intervened.texts)}))
    assert_generation(result, at_least=1.0)
"""


def test_report_shows_the_lens_heatmap_and_the_texts_side_by_side(pytester):
    import json

    pytester.makepyfile(test_reported=REPORTED)
    result = pytester.runpytest_inprocess("--nnsight-report", "out", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    measured = json.loads((pytester.path / "measured.json").read_text())
    (rec,) = json.loads((pytester.path / "out" / "findings.json").read_text())["findings"]
    (lens,) = rec["lenses"]
    assert lens["ranks"] == measured["ranks"] and lens["sites"] == ["embed", "resid_post.0", "resid_post.1"]
    (gen,) = rec["generations"]
    assert [r["baseline"] for r in gen["rows"]] == measured["baseline"]
    assert [r["intervened"] for r in gen["rows"]] == measured["intervened"]
    assert gen["config"] == "greedy, max_new_tokens 2" and gen["intervention"].startswith(
        "zero ablation of head_out.1.0"
    )
    html = (pytester.path / "out" / "index.html").read_text()
    assert "<th>prompt</th><th>expected</th><th>baseline</th><th>intervened</th>" in html
    for text in measured["baseline"] + measured["intervened"]:
        assert f"<code>{text}</code>" in html
    lens_png = [f for f in rec["figures"] if f.endswith("-lens0.png")]
    assert lens_png and (pytester.path / "out" / lens_png[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (pytester.path / "out" / "findings.md").read_text()
    assert "| prompt | expected | baseline | intervened |" in md and "| resid_post.1 | " in md
