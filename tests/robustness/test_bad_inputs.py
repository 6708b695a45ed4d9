"""Bad inputs across the public API: each raises one of our errors, names the bad value and what is accepted,
shows no nnsight internals, and leaves the user's files alone."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pytest_nnsight import (
    ablate,
    assert_population,
    assert_restores,
    attribution_patch,
    logit_diff,
    patch,
    patch_layer,
    population,
    prob,
    rank,
    steer,
    sweep,
)
from pytest_nnsight.circuits import Circuit, discover, edge_attribution, faithfulness, path_patch, path_sweep
from pytest_nnsight.errors import (
    ArgumentError,
    ArgumentTypeError,
    BrokenExperimentError,
    CircuitError,
    InterventionError,
    MetricError,
    ModelSpecError,
    ModelUnavailableError,
    ModelUsageError,
    NonFiniteMetricError,
    PositionError,
    ProbeError,
    SettingsError,
    SiteError,
    SnapshotFileError,
    SnapshotValueError,
)
from pytest_nnsight.generation import Ablate, contains, generate, generation_population
from pytest_nnsight.lens import assert_emerges_at, logit_lens
from pytest_nnsight.models import ModelCache
from pytest_nnsight.settings import Settings
from pytest_nnsight.sites import block, head
from pytest_nnsight.stats import wilson_interval
from pytest_nnsight.strategies import counterfactual_pairs
from pytest_nnsight.wordlists import CAPITALS

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
LD = logit_diff("Paris", "Berlin")
LONG = " ".join(["The capital of France is"] * 8)  # 40 tokens, the bundled model's context is 32


def _patch(m, **kw):
    args = dict(site="transformer.h.0", position="last", metric=LD)
    args.update(kw)
    clean, corrupt = args.pop("clean", CLEAN), args.pop("corrupt", CORRUPT)
    return patch(m, clean, corrupt, **args)


def _population(m, **kw):
    args = dict(site="transformer.h.0", position="last", threshold=0.5, n=2)
    args.update(kw)
    return population(m, counterfactual_pairs(m, ["The capital of {country} is"], {"country": CAPITALS}), **args)


def _steer(m, vector, **kw):
    return steer(m, CLEAN, site="transformer.h.0", position="last", vector=vector, metric=LD, **kw)


def _nan_metric(out):
    return out.logits[:, -1, 0] * float("nan")


# id: (call(model), error type, fragments the message must match: the bad value, then what is accepted)
CASES = {
    # sites
    "site layer index past the end": (
        lambda m: _patch(m, site="transformer.h.9"),
        SiteError,
        r"index 9",
        r"valid 0\.\.1",
    ),
    "site unknown path": (
        lambda m: _patch(m, site="transformer.hh.0"),
        SiteError,
        r"'transformer\.hh\.0'",
        r"close matches: .*transformer\.h\.0",
    ),
    "site of a wrong type": (lambda m: _patch(m, site=3.5), SiteError, r"3\.5", r"expected e\.g\. 'transformer\.h\.0'"),
    "site vocabulary layer out of range": (
        lambda m: _patch(m, site="resid_post.7"),
        SiteError,
        r"layer 7",
        r"valid 0\.\.1",
    ),
    "site naming the whole model": (
        lambda m: _patch(m, site=""),
        SiteError,
        r"site ''",
        r"a module inside it, e\.g\. a path under transformer, lm_head",
    ),
    "site unknown part": (lambda m: _patch(m, site="transformer.h.0:middle"), SiteError, r"'middle'", r"output, input"),
    "site head out of range": (lambda m: _patch(m, site="head_out.0.9"), SiteError, r"head 9", r"valid 0\.\.3"),
    "site layer as a string": (lambda m: block(m, "1"), SiteError, r"'1' is not an int", r"expected 0\.\.1"),
    "site layer as a bool": (lambda m: block(m, True), SiteError, r"True is not an int", r"expected 0\.\.1"),
    "head index negative past range": (
        lambda m: head(m, 0, -5),
        SiteError,
        r"head -5",
        r"valid 0\.\.3 \(or -4\.\.-1\)",
    ),
    "site group that does not exist": (
        lambda m: sweep(m, CLEAN, CORRUPT, metric=LD, sites="heads"),
        SiteError,
        r"'heads'",
        r"blocks, attn, mlp",
    ),
    "sweep with no sites": (
        lambda m: sweep(m, CLEAN, CORRUPT, metric=LD, sites=[]),
        SiteError,
        r"empty list of sites",
        r"'blocks', 'attn' or 'mlp'",
    ),
    "patch_layer layer out of range": (
        lambda m: patch_layer(m, corrupt=CORRUPT, clean=CLEAN, layer=5, position=4),
        SiteError,
        r"layer 5",
        r"valid 0\.\.1",
    ),
    # positions
    "position past the end": (lambda m: _patch(m, position=99), PositionError, r"position 99", r"valid 0\.\.5"),
    "position negative past the start": (
        lambda m: _patch(m, position=-99),
        PositionError,
        r"position -99",
        r"-6\.\.-1",
    ),
    "position word absent": (
        lambda m: _patch(m, position="Tokyo"),
        PositionError,
        r"'Tokyo'",
        r"tokenized as \[0:<bos>",
    ),
    "position slot on a plain prompt": (
        lambda m: _patch(m, position="{country}"),
        PositionError,
        r"'\{country\}'",
        r"plain prompt strings carry no slots",
    ),
    "position empty slice": (
        lambda m: _patch(m, position=slice(10, 20)),
        PositionError,
        r"slice\(10, 20, None\)",
        r"selects no token",
    ),
    "position a float": (lambda m: _patch(m, position=2.5), PositionError, r"2\.5", r"not an int, 'last', a slice"),
    "position a bool": (lambda m: _patch(m, position=True), PositionError, r"True", r"expected an int, 'last'"),
    "position an empty list": (lambda m: _patch(m, position=[]), PositionError, r"\[\]", r"a list of ints"),
    "position a mixed list": (lambda m: _patch(m, position=[0, "x"]), PositionError, r"\[0, 'x'\]", r"a list of ints"),
    "patch_layer position out of range": (
        lambda m: patch_layer(m, corrupt=CORRUPT, clean=CLEAN, layer=0, position=40),
        PositionError,
        r"position 40",
        r"valid 0\.\.5",
    ),
    # prompts
    "clean and corrupt of different lengths": (
        lambda m: _patch(m, corrupt="The capital of France is Paris"),
        PositionError,
        r"\(6 vs 7\)",
        r"corrupt: \[0:<bos>",
    ),
    "empty prompt": (lambda m: _patch(m, clean=""), PositionError, r"''", r"expected text"),
    "whitespace prompt": (lambda m: _patch(m, clean="   "), PositionError, r"'   '", r"expected text"),
    "prompt None": (lambda m: _patch(m, clean=None), PositionError, r"None", r"expected a str"),
    "prompt a list": (lambda m: _patch(m, clean=[CLEAN]), PositionError, r"\['The capital", r"expected a str"),
    "prompt longer than the context": (
        lambda m: _patch(m, clean=LONG, corrupt=LONG),
        PositionError,
        r"41 tokens",
        r"context of 32",
    ),
    "steer prompt longer than the context": (
        lambda m: steer(m, LONG, site="transformer.h.0", position="last", vector=torch.zeros(64), metric=LD),
        PositionError,
        r"41 tokens",
        r"context of 32",
    ),
    # metrics
    "answer of two tokens": (
        lambda m: _patch(m, metric=logit_diff("Paris Berlin", "Rome")),
        MetricError,
        r"'Paris Berlin' is 2 tokens",
        r"single-token answers",
    ),
    "answer not in the vocabulary": (
        lambda m: _patch(m, metric=logit_diff("Atlantis", "Paris")),
        MetricError,
        r"'Atlantis'",
        r"not in the vocabulary",
    ),
    "answer empty": (lambda m: _patch(m, metric=prob("")), MetricError, r"''", r"token string or id"),
    "answer None": (lambda m: _patch(m, metric=rank(None)), MetricError, r"None", r"token string or id"),
    "answer id past the vocabulary": (
        lambda m: _patch(m, metric=logit_diff(10**6, 3)),
        MetricError,
        r"1000000",
        r"vocabulary has 135 ids",
    ),
    "metric a string": (lambda m: _patch(m, metric="Paris"), MetricError, r"'Paris'", r"expected logit_diff\(\.\.\.\)"),
    "metric one number for a batch": (
        lambda m: _patch(m, metric=lambda out: out.logits[:, -1, 3].sum()),
        MetricError,
        r"one number for a batch of 2",
        r"shape \[2\]",
    ),
    "metric wrong number of values": (
        lambda m: _patch(m, metric=lambda out: out.logits[0, -1, :3]),
        MetricError,
        r"3 values for 2 rows",
        r"shape \[2\]",
    ),
    "metric raising inside the trace": (
        lambda m: _patch(m, metric=lambda out: out["no such key"]),
        MetricError,
        r"KeyError",
        r"function of the model output",
    ),
    "metric NaN, then a claim on it": (
        lambda m: assert_restores(_patch(m, metric=_nan_metric), 0.5),
        NonFiniteMetricError,
        r"nan",
        r"not finite",
    ),
    # arguments
    "patch direction": (
        lambda m: _patch(m, direction="both"),
        ArgumentError,
        r"'both'",
        r"'clean->corrupt' or 'corrupt->clean'",
    ),
    "sweep direction": (
        lambda m: sweep(m, CLEAN, CORRUPT, metric=LD, direction="sideways"),
        ArgumentError,
        r"'sideways'",
        r"'clean->corrupt' or 'corrupt->clean'",
    ),
    "sweep batch size zero": (
        lambda m: sweep(m, CLEAN, CORRUPT, metric=LD, batch_size=0),
        ArgumentError,
        r"batch_size 0",
        r"positive int",
    ),
    "sweep batch size a float": (
        lambda m: sweep(m, CLEAN, CORRUPT, metric=LD, batch_size=2.0),
        ArgumentError,
        r"batch_size 2\.0",
        r"positive int",
    ),
    "sweep memory budget zero": (
        lambda m: sweep(m, CLEAN, CORRUPT, metric=LD, memory_budget=0),
        ArgumentError,
        r"memory_budget 0",
        r"positive number of bytes",
    ),
    "sweep reuse": (
        lambda m: sweep(m, CLEAN, CORRUPT, metric=LD, reuse="all"),
        ArgumentError,
        r"'all'",
        r"'prefix' or 'none'",
    ),
    "population reuse": (lambda m: _population(m, reuse="cache"), ArgumentError, r"'cache'", r"'prefix' or 'none'"),
    "population batch size a bool": (
        lambda m: _population(m, batch_size=True),
        ArgumentError,
        r"batch_size True",
        r"positive int",
    ),
    "population direction": (
        lambda m: _population(m, direction="both"),
        ArgumentError,
        r"'both'",
        r"'clean->corrupt' or 'corrupt->clean'",
    ),
    "population NaN threshold": (
        lambda m: _population(m, threshold=float("nan")),
        ArgumentError,
        r"threshold=nan",
        r"finite number",
    ),
    "sweep of identical prompts": (
        lambda m: sweep(m, CLEAN, CLEAN, metric=LD),
        BrokenExperimentError,
        r"gap 0",
        r"pick one that flips the answer",
    ),
    "ablate method": (
        lambda m: ablate(m, CLEAN, site="transformer.h.0", position="last", metric=LD, method="gaussian"),
        ArgumentError,
        r"'gaussian'",
        r"'zero', 'mean' or 'resample'",
    ),
    "mean ablation without references": (
        lambda m: ablate(m, CLEAN, site="transformer.h.0", position="last", metric=LD, method="mean"),
        ArgumentError,
        r"mean ablation",
        r"needs reference_prompts",
    ),
    "attribution direction": (
        lambda m: attribution_patch(m, CLEAN, CORRUPT, metric=LD, direction="up"),
        ArgumentError,
        r"'up'",
        r"'clean->corrupt' or 'corrupt->clean'",
    ),
    # NaN / inf / devices
    "steer with a NaN vector": (
        lambda m: _steer(m, torch.full((64,), float("nan"))),
        InterventionError,
        r"NaN",
        r"finite",
    ),
    "steer with an inf vector": (
        lambda m: _steer(m, torch.full((64,), float("inf"))),
        InterventionError,
        r"inf",
        r"finite",
    ),
    "steer with a NaN alpha": (
        lambda m: _steer(m, torch.ones(64), alpha=float("nan")),
        ArgumentError,
        r"alpha=nan",
        r"finite number",
    ),
    "steer with a string alpha": (
        lambda m: _steer(m, torch.ones(64), alpha="2"),
        ArgumentTypeError,
        r"alpha='2'",
        r"finite number",
    ),
    "steer vector of the wrong width": (
        lambda m: _steer(m, torch.ones(32)),
        InterventionError,
        r"\(32,\)",
        r"shape \(64,\)",
    ),
    "steer vector a list": (lambda m: _steer(m, [1.0] * 64), InterventionError, r"list", r"a tensor of shape \(64,\)"),
    "steer vector on the meta device": (
        lambda m: _steer(m, torch.ones(64, device="meta")),
        InterventionError,
        r"on meta",
        r"\.to\('cpu'\)",
    ),
    "model on a device that is absent": (
        lambda m: ModelCache(Settings()).get("bundled:capitals", device="cuda:7"),
        SettingsError,
        r"'cuda:7'",
        r"cpu or auto|cuda:0",
    ),
    "model on a device that does not exist": (
        lambda m: ModelCache(Settings()).get("bundled:capitals", device="gpu"),
        SettingsError,
        r"'gpu'",
        r"auto, cpu, cuda or cuda:N",
    ),
    "model dtype unknown": (
        lambda m: ModelCache(Settings()).get("bundled:capitals", dtype="float8"),
        SettingsError,
        r"'float8'",
        r"float32, float16",
    ),
    # models
    "model id of a wrong type": (lambda m: ModelCache(Settings()).get(42), ModelSpecError, r"int 42", r"a hub id"),
    "model id empty": (lambda m: ModelCache(Settings()).get(""), ModelSpecError, r"''", r"a hub id"),
    "bundled model that does not exist": (
        lambda m: ModelCache(Settings()).get("bundled:nope"),
        ModelSpecError,
        r"'bundled:nope'",
        r"bundled:capitals",
    ),
    "model directory missing": (
        lambda m: ModelCache(Settings(offline=True)).get("/nonexistent/ckpt"),
        ModelUnavailableError,
        r"/nonexistent/ckpt",
        r"save_pretrained",
    ),
    # generation and the logit lens
    "generate zero new tokens": (
        lambda m: generate(m, CLEAN, max_new_tokens=0),
        ArgumentError,
        r"max_new_tokens=0",
        r"an int >= 1",
    ),
    "generate beyond the context": (
        lambda m: generate(m, CLEAN, max_new_tokens=30),
        ArgumentError,
        r"max_new_tokens=30 .* \(6 tokens\)",
        r"context of 32 positions: expected max_new_tokens <= 26",
    ),
    "generate a float count": (
        lambda m: generate(m, CLEAN, max_new_tokens=2.0),
        ArgumentTypeError,
        r"max_new_tokens=2\.0",
        r"an int >= 1",
    ),
    "generate sampling without a seed": (
        lambda m: generate(m, CLEAN, max_new_tokens=2, do_sample=True),
        ArgumentError,
        r"seed=None",
        r"an int seed",
    ),
    "generate an unknown intervention": (
        lambda m: generate(m, CLEAN, max_new_tokens=2, intervention=("zero", "embed")),
        ArgumentTypeError,
        r"'zero'",
        r"Ablate\(\.\.\.\), Steer",
    ),
    "generate with a bad ablation site": (
        lambda m: generate(m, CLEAN, max_new_tokens=2, intervention=Ablate("resid_post.5")),
        SiteError,
        r"layer 5",
        r"valid 0\.\.1",
    ),
    "generation claim with an unknown argument": (
        lambda m: generation_population(m, [CLEAN], metric=contains("Paris"), max_new_tokens=1, top_p=0.9),
        ArgumentTypeError,
        r"top_p",
        r"decoding arguments are batch_size",
    ),
    "lens answer not in the vocabulary": (
        lambda m: logit_lens(m, CLEAN, answer="Atlantis"),
        MetricError,
        r"'Atlantis'",
        r"not in the vocabulary",
    ),
    "lens answer of two tokens": (
        lambda m: logit_lens(m, CLEAN, answer="Paris Rome"),
        MetricError,
        r"'Paris Rome' is 2 tokens",
        r"single-token",
    ),
    "lens emergence at a layer the model lacks": (
        lambda m: assert_emerges_at(logit_lens(m, CLEAN, answer="Paris"), layer=4),
        ArgumentError,
        r"layer 4 is out of range",
        r"valid 0\.\.1",
    ),
    # circuits
    "path patch an edge backwards": (
        lambda m: path_patch(m, CLEAN, CORRUPT, sender="head_out.1.0", receiver="k_in.0.0", metric=LD),
        CircuitError,
        r"no edge head_out.1.0 -> k_in.0.0",
        r"from an earlier component to a later one",
    ),
    "path patch a head the model lacks": (
        lambda m: path_patch(m, CLEAN, CORRUPT, sender="head_out.0.9", receiver="logits", metric=LD),
        CircuitError,
        r"'head_out.0.9'",
        r"valid 0\.\.3",
    ),
    "path patch into an output": (
        lambda m: path_patch(m, CLEAN, CORRUPT, sender="embed", receiver="mlp_out.1", metric=LD),
        CircuitError,
        r"'mlp_out.1' is a sender",
        r"receivers are q_in.L.H",
    ),
    "path sweep of no senders": (
        lambda m: path_sweep(m, CLEAN, CORRUPT, senders=[], metric=LD),
        CircuitError,
        r"senders=\[\]",
        r"a non-empty list of names",
    ),
    "path patch positions that do not line up": (
        lambda m: path_patch(
            m, CLEAN, "The capital city of Germany is called", sender="embed", receiver="logits", metric=LD
        ),
        PositionError,
        r"different lengths",
    ),
    "faithfulness of an empty circuit": (
        lambda m: faithfulness(m, Circuit(nodes=("embed",)), [(CLEAN, CORRUPT)], metric=LD),
        CircuitError,
        r"holds no head or MLP",
        r"head_out.L.H",
    ),
    "faithfulness of the whole model": (
        lambda m: faithfulness(
            m, ["attn_out.0", "attn_out.1", "mlp_out.0", "mlp_out.1"], [(CLEAN, CORRUPT)], metric=LD
        ),
        CircuitError,
        r"every head and MLP",
        r"leave out",
    ),
    "faithfulness of an unknown node": (
        lambda m: faithfulness(m, ["neuron.3"], [(CLEAN, CORRUPT)], metric=LD),
        CircuitError,
        r"'neuron.3'",
        r"nodes are embed, head_out.L.H, mlp_out.L",
    ),
    "discover with both cuts": (
        lambda m: discover(m, [(CLEAN, CORRUPT)], metric=LD, top_k=3, threshold=0.1),
        ArgumentError,
        r"top_k=3, threshold=0.1",
        r"exactly one",
    ),
    "edge attribution of a reference metric": (
        lambda m: edge_attribution(m, CLEAN, CORRUPT, metric=__import__("pytest_nnsight").kl_div()),
        MetricError,
        r"kl_div\(\)",
        r"logit_diff, logprob or prob",
    ),
    "edge attribution of a non-differentiable metric": (
        lambda m: edge_attribution(m, CLEAN, CORRUPT, metric=rank("Paris")),
        MetricError,
        r"rank\('Paris'\) is not differentiable",
        r"path_sweep",
    ),
    # other entry points
    "wilson interval k > n": (lambda m: wilson_interval(3, 2), ArgumentError, r"k=3, n=2", r"0 <= k <= n"),
    "population assertion on an unknown statistic": (
        lambda m: assert_population(None, 0.9, on="mean"),
        ArgumentError,
        r"on='mean'",
        r"'lower_bound'",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_gives_one_clear_error(capitals, clean_error, case):
    call, kind, *fragments = CASES[case]
    with pytest.raises(Exception) as info:
        call(capitals)
    clean_error(info.value, kind, *fragments)


@pytest.mark.filterwarnings("ignore::pytest_nnsight.errors.EagerAttentionWarning")
def test_a_pattern_of_a_model_without_tokenizer_is_a_usage_error(clean_error):
    from pytest_nnsight import attention_pattern
    from pytest_nnsight.models import wrap
    from pytest_nnsight.testing import tiny_gpt2

    module, _ = tiny_gpt2()  # its own copy: reading a pattern switches the model to eager attention
    with pytest.raises(Exception) as info:
        attention_pattern(wrap(module), "The capital", layer=0)
    clean_error(info.value, ModelUsageError, r"no tokenizer", r"tokenizer=")


@pytest.mark.parametrize(
    "text, fragments",
    [
        ('{"format": "pytest-nnsight finding", "version": 1, "environment": {', (r"line 1 column", r"not valid JSON")),
        (
            '{"format": "pytest-nnsight finding", "version": 99, "environment": {}, "finding": 1}',
            (r"version 99", r"reads version 1"),
        ),
        (
            '{"format": "pytest-nnsight finding", "version": "1", "environment": {}, "finding": 1}',
            (r"'1'", r"expected an integer"),
        ),
        (
            '{"format": "pytest-nnsight finding", "version": 1, "environment": [], "finding": 1}',
            (r"'environment'", r"malformed"),
        ),
        (
            '{"format": "syrupy", "version": 1}',
            (r"not a pytest-nnsight finding", r"\"format\": \"pytest-nnsight finding\""),
        ),
        ("", (r"line 1 column 1", r"not valid JSON")),
    ],
    ids=["truncated", "newer version", "version a string", "environment a list", "foreign format", "empty file"],
)
def test_malformed_snapshot_text_names_the_file_and_what_is_expected(clean_error, text, fragments):
    from pytest_nnsight.snapshots.encode import loads

    with pytest.raises(Exception) as info:
        loads(text, "__snapshots__/test_x/test_y.json")
    clean_error(info.value, SnapshotFileError, r"__snapshots__/test_x/test_y\.json", *fragments)


def test_unsnapshottable_value_and_bad_tolerance(clean_error):
    from pytest_nnsight.snapshots.compare import Tolerance
    from pytest_nnsight.snapshots.encode import to_value

    with pytest.raises(Exception) as info:
        to_value({"a": object()})
    clean_error(info.value, SnapshotValueError, r"finding\['a'\]", r"convert it first")
    for bad in (-1.0, math.nan, "0.1"):
        with pytest.raises(Exception) as info:
            Tolerance(bad, 0.0)
        clean_error(
            info.value, ArgumentError, rf"atol={bad!r}".replace("(", r"\(").replace(".", r"\."), r"finite number >= 0"
        )


def test_probe_labels_of_the_wrong_length(clean_error):
    from pytest_nnsight.probing import fit_probe

    with pytest.raises(Exception) as info:
        fit_probe(torch.zeros(8, 4), ["a", "b"] * 3)
    clean_error(info.value, ProbeError, r"6 entries", r"one label per prompt")


def test_unwritable_cache_directory_names_it_and_both_ways_out(clean_error, user_files):
    """A cache dir whose parent is a regular file cannot be created, even as root (chmod does not stop root)."""
    from pytest_nnsight.activation_cache import ActivationCache
    from pytest_nnsight.errors import ActivationCacheError

    blocker = user_files.path / "notes.txt"
    blocker.write_text("the user's file\n")
    user_files.snapshot()
    with pytest.raises(Exception) as info:
        ActivationCache(blocker / "cache", source="command line option --nnsight-cache-dir")
    clean_error(info.value, ActivationCacheError, r"notes\.txt/cache", r"--nnsight-no-cache", r"--nnsight-cache-dir")
    user_files.unchanged()


def test_activation_cache_bad_arguments(capitals, clean_error, tmp_path):
    from pytest_nnsight.activation_cache import ActivationCache
    from pytest_nnsight.errors import SiteNotCachedError

    cache = ActivationCache(tmp_path / "c")
    for kwargs, kind, fragments in (
        (dict(prompts=CLEAN), PositionError, (r"got str 'The capital", r"non-empty list of prompts")),
        (dict(prompts=[]), PositionError, (r"got list", r"non-empty list")),
        (dict(prompts=[CLEAN], batch_size=0), ArgumentError, (r"batch_size 0", r"positive int")),
        # a bool is not a count
        (
            dict(prompts=[CLEAN], batch_size=True),
            ArgumentError,
            (r"batch_size True", r"positive int"),
        ),
        (dict(prompts=[CLEAN], dtype="int8"), ArgumentError, (r"'int8'", r"float32, float16")),
        (dict(prompts=[CLEAN], sites="transformer.h.4"), SiteError, (r"index 4", r"valid 0\.\.1")),
    ):
        with pytest.raises(Exception) as info:
            cache.get(capitals, **kwargs)
        clean_error(info.value, kind, *fragments)
    assert list((tmp_path / "c").iterdir()) == [], "a rejected request left files in the cache"
    acts = cache.get(capitals, [CLEAN], sites="blocks", positions="last")
    with pytest.raises(Exception) as info:
        acts["transformer.h.0.mlp"]
    clean_error(info.value, SiteNotCachedError, r"'transformer\.h\.0\.mlp'", r"it holds resid_post.0, resid_post.1")


def test_missing_matplotlib_is_not_needed_by_the_core_api(capitals, monkeypatch):
    """matplotlib is an optional extra ('report'): with it absent, patching and snapshots still work."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    effect = _patch(capitals)
    from pytest_nnsight.snapshots.encode import dumps, record

    assert json.loads(dumps(record(effect, {})))["finding"]["@type"] == "Effect"


def test_a_model_emitting_inf_fails_claims_with_a_non_finite_error(capitals, clean_error):
    """A model whose logits overflow (patched here to emit inf) never passes a claim: the error says the output is not finite."""
    from pytest_nnsight import assert_peaks_at

    handle = capitals._module.lm_head.register_forward_hook(lambda mod, args, out: out * float("inf"))
    try:
        effect = _patch(capitals)
        effects = sweep(capitals, CLEAN, CORRUPT, metric=LD, check_batching=False)
    finally:
        handle.remove()
    assert math.isnan(effect.normalized)
    with pytest.raises(Exception) as info:
        assert_restores(effect, 0.5)
    clean_error(info.value, NonFiniteMetricError, r"is nan", r"not finite")
    from pytest_nnsight import FindingFailed

    with pytest.raises(FindingFailed, match=r"12 of 12 cells: resid_post.0 @ 0 '<bos>': nan \(want finite\)"):
        # a claim, not a misuse: an assertion failure listing the NaN cells
        assert_peaks_at(effects, [("resid_post.1", -1)])


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            '{"format": "pytest-nnsight structure", "version": 1, "environment": {}, "structure": ',
            (r"line 1 column", r"not valid JSON"),
        ),
        (
            '{"format": "pytest-nnsight structure", "version": 7, "environment": {}, "structure": {}}',
            (r"version 7", r"reads 1"),
        ),
        (
            '{"format": "pytest-nnsight structure", "version": 1, "environment": {}, "structure": []}',
            (r"'structure'", r"malformed"),
        ),
    ],
    ids=["truncated", "newer version", "structure a list"],
)
def test_malformed_structure_snapshot(clean_error, text, fragments):
    from pytest_nnsight.snapshots.structure_ext import loads

    with pytest.raises(Exception) as info:
        loads(text, "__snapshots__/test_s/test_t.json")
    clean_error(info.value, SnapshotFileError, r"__snapshots__/test_s/test_t\.json", *fragments)


def _spec_text(**changes) -> str:
    from pathlib import Path

    here = Path(__file__).resolve().parents[2] / "examples" / "findings" / "block0_last.json"
    data = json.loads(here.read_text())
    for key, value in changes.items():
        if value is KeyError:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    "changes, fragments",
    [
        (dict(format="1"), (r"format '1'", r"an integer")),
        (dict(sites=["transformer.h.0"]), (r"'transformer\.h\.0'", r"path, part")),
        (dict(recorded={"normalized": "lots"}), (r"'lots'", r"a number")),
        (dict(metric="accuracy"), (r"'accuracy'", r"logit_diff, prob")),
        (dict(clean=KeyError), (r"missing key\(s\) clean", r"")),
        (dict(colour="red"), (r"unknown key\(s\) colour", r"accepted keys")),
        (dict(positions="last"), (r"positions 'last'", r"a list of ints")),
    ],
    ids=[
        "format a string",
        "site a string",
        "recorded not a number",
        "unknown metric",
        "missing key",
        "unknown key",
        "positions a string",
    ],
)
def test_hand_edited_replay_spec(clean_error, changes, fragments):
    from pytest_nnsight.replay import FindingSpec, ReplayError

    with pytest.raises(Exception) as info:
        FindingSpec.from_json(_spec_text(**changes), "findings/x.json")
    clean_error(info.value, ReplayError, r"findings/x\.json", *fragments)


def test_replay_spec_that_does_not_exist(clean_error, tmp_path):
    from pytest_nnsight.replay import FindingSpec, ReplayError

    with pytest.raises(Exception) as info:
        FindingSpec.load(tmp_path / "nope.json")
    clean_error(info.value, ReplayError, r"nope\.json", r"(?i)no such file", r"expected a JSON file")
