"""Batching never changes an answer: batched results equal single runs on decoders and encoders, both padding sides.

The property test walks verbs x {bundled:capitals, a tiny BERT with an uncased WordPiece tokenizer} x {left, right
padding} x {equal, mixed lengths}; the reference is always the same computation run one prompt (or pair) at a time.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pytest_nnsight import findings
from pytest_nnsight.activation_cache import ActivationCache
from pytest_nnsight.batching import encode, mixed_lengths_ok
from pytest_nnsight.embeddings import cls_pool, cosine_to, distance_to, mean_pool, pooled_embedding
from pytest_nnsight.errors import BatchingMismatchError, PositionError
from pytest_nnsight.interventions import Prompt, _mean_activation, ablate, patch, steer
from pytest_nnsight.metrics import logit_diff, logits_of
from pytest_nnsight.models import ModelCache
from pytest_nnsight.populations import population
from pytest_nnsight.settings import Settings
from pytest_nnsight.sites import resolve_site
from pytest_nnsight.strategies import CounterfactualPair, Slots
from pytest_nnsight.sweeps import sweep
from pytest_nnsight.testing import tiny_bert

TOL = 1e-5

DECODER_TEMPLATES = (
    "The capital of {country} is",
    "Everyone knows that the capital of {country} is",
    "Q : what is the capital of {country} ? A :",
)
ENCODER_TEMPLATES = (
    "The capital of {country} is",
    "When Mary went to the store the capital of {country} is",
    "John gave a drink in {country}",
)
COUNTRIES = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"))


def pair(template, a, b):
    (ca, aa), (cb, ab) = a, b
    clean = Prompt(template.replace("{country}", ca), Slots(country=ca))
    corrupt = Prompt(template.replace("{country}", cb), Slots(country=cb))
    return CounterfactualPair(clean, corrupt, aa, ab, template)


@pytest.fixture(scope="module")
def served():
    """Each (kind, padding side) served once: the bundled decoder with its tokenizer set to that side, a tiny BERT with one."""
    cache = ModelCache(Settings(device="cpu"))
    decoder = cache.get("bundled:capitals")
    out = {}
    for side in ("left", "right"):
        tok = __import__("copy").deepcopy(decoder.tokenizer)
        tok.padding_side = side
        out["decoder", side] = cache.get(decoder._module, tok)
        out["encoder", side] = cache.get(*tiny_bert(padding_side=side))
    return out


def metric_for(kind):
    if kind == "decoder":
        return lambda p: logit_diff(p.answer, p.distractor)
    return lambda p: cosine_to(p.clean.text)


def site_for(kind):
    return "transformer.h.0" if kind == "decoder" else "resid_post.0"


def close(a, b):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL


@pytest.mark.parametrize("mixed", [False, True], ids=["equal-lengths", "mixed-lengths"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@settings(max_examples=2)
@given(order=st.permutations(range(3)))
def test_batched_equals_single_for_every_verb(served, kind, side, mixed, order):
    """Every (model kind, padding side, lengths) cell is run; hypothesis draws which templates and in what order."""
    model = served[kind, side]
    templates = DECODER_TEMPLATES if kind == "decoder" else ENCODER_TEMPLATES
    pairs = [
        pair(templates[order[k]] if mixed else templates[order[0]], COUNTRIES[k], COUNTRIES[(k + 1) % 4])
        for k in range(3)
    ]
    metric, site = metric_for(kind), site_for(kind)

    # population: one batch vs each pair alone; patch on each pair gives the same numbers again
    batched = population(model, pairs, site=site, position="{country}", metric=metric, threshold=0.5, batch_size=64)
    for i, p in enumerate(pairs):
        alone = population(model, [p], site=site, position="{country}", metric=metric, threshold=0.5)
        for field in ("effects", "clean", "corrupt", "patched"):
            assert close(getattr(batched, field)[i], getattr(alone, field)[0]), (
                field,
                i,
                getattr(batched, field)[i],
                getattr(alone, field)[0],
            )
        effect = patch(model, p.clean, p.corrupt, site=site, position="{country}", metric=metric(p))
        assert (
            close(effect.intervened, batched.patched[i])
            and close(effect.clean, batched.clean[i])
            and close(effect.corrupt, batched.corrupt[i])
        )
        # steer: its unsteered run of the corrupt prompt is that prompt alone
        width = 64 if kind == "decoder" else 32
        steered = steer(model, p.corrupt, site=site, position="{country}", vector=torch.zeros(width), metric=metric(p))
        assert close(steered.target, batched.corrupt[i])

    # sweep: all cells in one batch vs one cell per trace
    p = pairs[0]
    wide = sweep(model, p.clean, p.corrupt, metric=metric(p), sites=[site], batch_size=32)
    narrow = sweep(model, p.clean, p.corrupt, metric=metric(p), sites=[site], batch_size=1)
    assert all(close(a, b) for ra, rb in zip(wide.raw, narrow.raw) for a, b in zip(ra, rb))
    for j in (
        0,
        len(wide.positions) // 2,
        len(wide.positions) - 1,
    ):  # a cell equals the plain patch() path at that cell
        cell = patch(model, p.clean, p.corrupt, site=site, position=wide.positions[j], metric=metric(p))
        assert close(wide.raw[0][j], cell.intervened), (j, wide.raw[0][j], cell.intervened)

    # ablate (mean over reference prompts of several lengths) and the activation cache
    prompts = [q.clean for q in pairs] + [q.corrupt for q in pairs]
    s = resolve_site(model, site)
    together = _mean_activation(model, s, prompts, "{country}", [1])
    apart = torch.stack([_mean_activation(model, s, [q], "{country}", [1]) for q in prompts]).mean(0)
    assert torch.allclose(together, apart, atol=TOL, rtol=0)
    ablate(
        model, p.corrupt, site=site, position="{country}", metric=metric(p), method="mean", reference_prompts=prompts
    )
    cache = ActivationCache(None)
    one = cache.get(model, prompts, sites=[site], positions="{country}", batch_size=32)
    each = cache.get(model, prompts, sites=[site], positions="{country}", batch_size=1)
    assert torch.allclose(one[site], each[site], atol=TOL, rtol=0)
    whole = cache.get(model, prompts, sites=[site], positions="all", batch_size=32)
    whole_each = cache.get(model, prompts, sites=[site], positions="all", batch_size=1)
    assert torch.allclose(whole[site], whole_each[site], atol=TOL, rtol=0)


# -- item 1: metrics keyed by identity, not by display name ------------------------------------------


def test_population_keeps_per_pair_metric_closures_apart(capitals):
    """Closures sharing one __name__ measured the first pair's metric on every row (effect 5.65, 7/10 on the issue's case)."""
    pairs = [pair(DECODER_TEMPLATES[k % 3], COUNTRIES[k % 4], COUNTRIES[(k + 1) % 4]) for k in range(4)]

    def per_pair(p):
        a, b = capitals.tokenizer.convert_tokens_to_ids([p.answer, p.distractor])
        return lambda out: logits_of(out)[:, -1, a] - logits_of(out)[:, -1, b]  # every closure is named '<lambda>'

    batched = population(
        capitals, pairs, site="transformer.h.1", position="last", metric=per_pair, threshold=0.9, same_length=False
    )
    for i, p in enumerate(pairs):
        alone = population(capitals, [p], site="transformer.h.1", position="last", metric=per_pair, threshold=0.9)
        assert batched.effects[i] == pytest.approx(alone.effects[0], abs=TOL)
        assert batched.clean[i] == pytest.approx(alone.clean[0], abs=TOL)
    assert batched.passed == 4


# -- item 3: padding-blind custom metrics, masks, equal-length batching ----------------------------


def test_a_padding_blind_custom_metric_gives_single_run_numbers_on_mixed_lengths(capitals):
    """A metric averaging over every position saw pad positions in a mixed-length batch: the plugin now batches it by length."""
    pairs = [pair(DECODER_TEMPLATES[k], COUNTRIES[k], COUNTRIES[k + 1]) for k in range(3)]
    a = capitals.tokenizer.convert_tokens_to_ids("Paris")

    def mean_logit(p):
        return lambda out: logits_of(out)[:, :, a].mean(1)

    batched = population(
        capitals, pairs, site="transformer.h.0", position="{country}", metric=mean_logit, threshold=0.0
    )
    for i, p in enumerate(pairs):
        alone = population(
            capitals, [p], site="transformer.h.0", position="{country}", metric=mean_logit, threshold=0.0
        )
        assert batched.corrupt[i] == pytest.approx(alone.corrupt[0], abs=TOL)
        assert batched.patched[i] == pytest.approx(alone.patched[0], abs=TOL)


def test_a_custom_metric_taking_the_mask_sees_only_real_tokens(capitals):
    seen = []

    def real_tokens(out, mask):
        seen.append(mask.clone())
        return mask.sum(-1).float()

    pairs = [pair(DECODER_TEMPLATES[k], COUNTRIES[k], COUNTRIES[k + 1]) for k in range(3)]
    result = population(
        capitals, pairs, site="transformer.h.0", position="{country}", metric=lambda p: real_tokens, threshold=0.0
    )
    lengths = [len(capitals.tokenizer(p.clean.text)["input_ids"]) for p in pairs]
    assert list(result.clean) == lengths  # the mask counts each prompt's own tokens, never the padding
    assert any(m.shape[0] > 2 and not bool(m.all()) for m in seen)  # mixed lengths did share a padded trace


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_mixed_length_population_equals_single_runs(served, side):
    """The issue's encoder case: padding moved effects by up to 4.5e-3 (left) when prompts of different lengths shared a trace."""
    model = served["encoder", side]
    assert not mixed_lengths_ok(model)
    pairs = [pair(ENCODER_TEMPLATES[k], COUNTRIES[k], COUNTRIES[k + 1]) for k in range(3)]
    batched = population(
        model, pairs, site="resid_post.0", position="{country}", metric=lambda p: cosine_to(p.clean.text), threshold=0.5
    )
    for i, p in enumerate(pairs):
        alone = population(
            model,
            [p],
            site="resid_post.0",
            position="{country}",
            metric=lambda q: cosine_to(q.clean.text),
            threshold=0.5,
        )
        assert batched.effects[i] == pytest.approx(alone.effects[0], abs=TOL)


def test_encode_records_real_token_offsets_for_both_padding_sides(served):
    texts = ["The capital of France is", "The capital is"]
    for side, expect in (("left", (0, 2)), ("right", (0, 0))):
        batch = encode(served["encoder", side], texts)
        assert batch.offsets == expect and batch.lengths == (7, 5)
        assert batch.mask.sum(-1).tolist() == [7, 5]


# -- item 2: encoders served by the fixture take prompts, encodings and pooled metrics ---------------


def test_pooled_metrics_match_hand_computed_values(served):
    model = served["encoder", "right"]
    text = "The capital of France is Paris"
    tok = model.tokenizer
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        hidden = model._module(**enc).last_hidden_state[0]
    mean, cls = hidden.mean(0), hidden[0]
    effect = patch(
        model, text, "The capital of Germany is Paris", site="resid_post.0", position="France", metric=cosine_to(mean)
    )
    assert effect.clean == pytest.approx(1.0, abs=1e-6)
    e2 = patch(
        model,
        text,
        "The capital of Germany is Paris",
        site="resid_post.0",
        position="France",
        metric=distance_to(cls, pooling="cls"),
    )
    assert e2.clean == pytest.approx(0.0, abs=1e-5)
    e3 = patch(
        model,
        text,
        "The capital of Germany is Paris",
        site="resid_post.0",
        position="France",
        metric=pooled_embedding(3),
    )
    assert e3.clean == pytest.approx(float(mean[3]), abs=1e-5)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    out = torch.arange(18.0).reshape(2, 3, 3)
    assert mean_pool(out, mask).tolist() == [[4.5, 5.5, 6.5], [10.5, 11.5, 12.5]]
    assert cls_pool(out, mask).tolist() == [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]


def test_a_batch_encoding_is_a_prompt(served):
    model = served["encoder", "left"]
    text, other = "The capital of France is", "The capital of Germany is"
    by_text = patch(model, text, other, site="resid_post.0", position=4, metric=cosine_to(text))
    by_ids = patch(
        model,
        model.tokenizer(text, return_tensors="pt"),
        dict(model.tokenizer(other)),
        site="resid_post.0",
        position=4,
        metric=cosine_to(text),
    )
    assert (by_ids.clean, by_ids.corrupt, by_ids.intervened) == pytest.approx(
        (by_text.clean, by_text.corrupt, by_text.intervened), abs=1e-6
    )
    # its record travels from an xdist worker to the controller: execnet sends plain str only (a TokenPrompt there was an INTERNALERROR)
    execnet = pytest.importorskip("execnet")
    record = findings.current().finding.to_dict()  # this test's record, as the report hook will send it
    assert record["effects"] and all(type(e["prompt"]) is str for e in record["effects"]), record["effects"]
    execnet.dumps(record)


def test_fixture_served_encoder_takes_text_in_every_verb(pytester):
    pytester.makepyfile(
        """
        import torch
        from pytest_nnsight import patch
        from pytest_nnsight.embeddings import cosine_to
        from pytest_nnsight.testing import tiny_bert

        def test_encoder(nnsight_model, activation_cache):
            model = nnsight_model(*tiny_bert())
            effect = patch(model, "The capital of France is", "The capital of Germany is", site="resid_post.1",
                           position="France", metric=cosine_to("The capital of France is"))
            assert effect.clean > 0.99
            acts = activation_cache.get(model, ["The capital of France is", "Mary went to the store"], sites="resid_post.0", positions=0)
            assert acts["resid_post.0"].shape == (2, 1, 32)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*pytest-nnsight models*",
            "BertModel: cpu float32, loaded 1x in * s; batches only prompts of equal token length*",
        ]
    )


# -- item 6: uncased tokenizers ------------------------------------------------------------------------


def test_a_cased_position_word_matches_an_uncased_tokenizer(served):
    model = served["encoder", "right"]
    effect = patch(
        model,
        "The capital of France is",
        "The capital of Germany is",
        site="resid_post.0",
        position="France",
        metric=cosine_to("The capital of France is"),
    )
    assert effect.positions == (4,) and effect.position_tokens == ("germany",)
    with pytest.raises(PositionError, match="word 'Berlin' does not occur as whole tokens"):
        patch(
            model,
            "The capital of France is",
            "The capital of Germany is",
            site="resid_post.0",
            position="Berlin",
            metric=cosine_to("x"),
        )


# -- --nnsight-check-batching covers populations and the cache ------------------------------------


def test_check_batching_reruns_population_pairs(capitals, monkeypatch):
    pairs = [pair(DECODER_TEMPLATES[k], COUNTRIES[k], COUNTRIES[k + 1]) for k in range(3)]
    # the real path agrees
    population(capitals, pairs, site="transformer.h.0", position="{country}", threshold=0.5, check_batching=True)
    import pytest_nnsight.populations as pops

    real = pops._measure

    def skewed(req):
        src, tgt, patched = real(req)
        # single runs that disagree with the batch
        return (
            src,
            tgt,
            [v + (1e-3 if len(req.targets) == 1 else 0.0) for v in patched],
        )

    monkeypatch.setattr(pops, "_measure", skewed)
    with pytest.raises(BatchingMismatchError, match="batched population disagrees with single-pair runs"):
        population(capitals, pairs, site="transformer.h.0", position="{country}", threshold=0.5, check_batching=True)


def test_check_batching_reruns_cached_prompts(capitals, monkeypatch):
    prompts = [pair(t, COUNTRIES[0], COUNTRIES[1]).clean for t in DECODER_TEMPLATES]
    # agrees
    ActivationCache(None).get(capitals, prompts, sites=["resid_post.0"], positions="last", check_batching=True)
    import pytest_nnsight.trace as trace

    real = trace.run

    def skewed(model, inputs, metric, **kwargs):
        values, saved = real(model, inputs, metric, **kwargs)
        if isinstance(inputs, str):  # the single-prompt reference drifts
            saved = {s: v + 1e-3 for s, v in saved.items()}
        return values, saved

    monkeypatch.setattr(trace, "run", skewed)
    with pytest.raises(BatchingMismatchError, match="batched activation cache entry disagrees with single-prompt runs"):
        ActivationCache(None).get(capitals, prompts, sites=["resid_post.0"], positions="last", check_batching=True)


# -- item 1, audited: nothing keys a metric or a site by its display name --------------------------


def test_circuit_discovery_keeps_same_named_per_pair_metrics_apart():
    from pytest_nnsight.discovery import _row_metric as discovery_row_metric
    from pytest_nnsight.metrics import Metric
    from pytest_nnsight.populations import _row_metric as population_row_metric

    out = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    first, second = Metric("same", lambda o, ref: o[:, 0]), Metric("same", lambda o, ref: o[:, 1])
    for row_metric in (discovery_row_metric, population_row_metric):
        assert row_metric([first, second, first])(out, None, None).tolist() == [1.0, 20.0, 3.0]


def test_two_sites_sharing_one_label_are_refused_wherever_rows_are_keyed_by_label(capitals):
    from pytest_nnsight.attribution import attribution_patch
    from pytest_nnsight.errors import SiteError
    from pytest_nnsight.sites import Site

    twins = [Site("transformer.h.0", label="mine"), Site("transformer.h.1", label="mine")]
    clean, corrupt = "The capital of France is", "The capital of Germany is"
    with pytest.raises(SiteError, match="two different sites are both labelled 'mine'"):
        sweep(capitals, clean, corrupt, metric=logit_diff("Paris", "Berlin"), sites=twins)
    with pytest.raises(SiteError, match="both labelled 'mine'"):
        attribution_patch(capitals, clean, corrupt, metric=logit_diff("Paris", "Berlin"), sites=twins)
    with pytest.raises(SiteError, match="both labelled 'mine'"):
        ActivationCache(None).get(capitals, [clean], sites=twins, positions="last")
    # one site twice is fine
    same = sweep(capitals, clean, corrupt, metric=logit_diff("Paris", "Berlin"), sites=["resid_post.0", "resid_post.0"])
    assert same.values[0] == same.values[1]


def test_a_probe_on_an_encoder_reads_the_country_token_of_text_prompts(served):
    from pytest_nnsight.probing import probe

    model = served["encoder", "left"]
    prompts, labels = [], []
    for template in ENCODER_TEMPLATES:
        for country, _ in COUNTRIES:
            prompts.append(Prompt(template.replace("{country}", country), Slots(country=country)))
            labels.append(country)
    acts = ActivationCache(None).get(model, prompts * 2, sites=["embed"], positions="{country}", batch_size=5)
    result = probe(acts, "embed", labels * 2)
    # the embedding of the country token names the country: the positions were the right ones
    assert result.accuracy == 1.0


def test_any_module_served_with_a_tokenizer_takes_text(nnsight_models):
    from pytest_nnsight.testing import word_tokenizer

    class Bag(torch.nn.Module):  # a plain module: forward(ids), no attention mask, no config
        def __init__(self, vocab):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 8)
            self.out = torch.nn.Linear(8, 1)

        def forward(self, ids):
            return self.out(self.emb(ids)).squeeze(-1)  # [batch, T]

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = nnsight_models.get(Bag(len(tok)), tok, device="cpu")
    effect = patch(
        model,
        "The capital of France is",
        "The capital of Germany is",
        site="emb",
        position="France",
        metric=lambda out: out[:, 4],
    )
    assert effect.normalized == pytest.approx(1.0, abs=1e-6)


def test_attribution_patching_takes_an_encoder_and_text(served):
    from pytest_nnsight.attribution import attribution_patch

    model = served["encoder", "right"]
    approx = attribution_patch(
        model,
        "The capital of France is",
        "The capital of Germany is",
        metric=cosine_to("The capital of France is"),
        sites=["embed", "resid_post.0"],
    )
    assert approx.shape == (2, 7) and approx.tokens[4] == "france"  # columns named by the clean prompt
    exact = sweep(
        model,
        "The capital of France is",
        "The capital of Germany is",
        metric=cosine_to("The capital of France is"),
        sites=["embed"],
    )
    assert all(abs(v) < 1e-6 for j, v in enumerate(exact.values[0]) if j != 4)  # only the country cell moves anything
    # the gradient approximation agrees where it is exact
    assert all(abs(v) < 1e-4 for j, v in enumerate(approx.values[0]) if j != 4)


def test_only_a_required_second_parameter_receives_the_mask():
    from pytest_nnsight.metrics import as_metric

    assert as_metric(None, lambda out, mask: out).takes_mask
    assert (
        not as_metric(None, lambda out, k=3: out).takes_mask and not as_metric(None, lambda out, k=3: out).padding_safe
    )
    assert not as_metric(None, lambda *outs: outs[0]).takes_mask
