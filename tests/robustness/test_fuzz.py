"""Fuzzing the main entry points: any position, site or metric argument either works or raises one of our errors."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings, strategies as st

from pytest_nnsight import logit_diff, patch, prob, rank, sweep
from pytest_nnsight.errors import NnsightTestError

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
WORDS = [
    "The",
    "capital",
    "of",
    "France",
    "Germany",
    "is",
    "Paris",
    "Berlin",
    "<bos>",
    "",
    " ",
    "Atlantis",
    "is is",
    "{country}",
    "last",
]

POSITIONS = st.one_of(
    st.integers(-12, 12),
    st.integers(),
    st.sampled_from(WORDS),
    st.text(max_size=8),
    st.builds(slice, st.none() | st.integers(-8, 8), st.none() | st.integers(-8, 8), st.none() | st.integers(1, 3)),
    st.lists(st.integers(-8, 8), max_size=4),
    st.lists(st.one_of(st.integers(-8, 8), st.text(max_size=3)), max_size=3),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
)
SITES = st.one_of(
    st.builds(lambda i: f"transformer.h.{i}", st.integers(-3, 5)),
    st.builds(
        lambda kind, i: f"{kind}.{i}",
        st.sampled_from(["resid_pre", "resid_post", "attn_out", "mlp_out", "bogus"]),
        st.integers(-3, 3),
    ),
    st.builds(lambda i, h: f"head_out.{i}.{h}", st.integers(-3, 3), st.integers(-5, 6)),
    st.sampled_from(
        [
            "embed",
            "final_norm",
            "logits",
            "transformer.h.0:input",
            "transformer.h.0:inside",
            "lm_head",
            "",
            ".",
            "transformer..h",
        ]
    ),
    st.text(max_size=12),
    st.integers(),
    st.none(),
)
ANSWERS = st.one_of(st.sampled_from(WORDS), st.integers(-3, 200), st.text(max_size=6), st.none(), st.floats())
METRICS = st.one_of(
    st.builds(logit_diff, ANSWERS, ANSWERS),
    st.builds(prob, ANSWERS),
    st.builds(rank, ANSWERS),
    st.sampled_from([None, "Paris", 3, lambda out: out.logits[:, -1, 5], lambda out: out.logits[:, -1].sum()]),
)

OUTCOMES: list[
    str
] = []  # what each sweep example gave (ok or the error type), to inspect how much of the space is valid
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _works_or_ours(call) -> str:
    __tracebackhide__ = True
    try:
        call()
    except NnsightTestError as exc:
        assert str(exc), "an error without a message"
        return type(exc).__name__
    return "ok"


@FUZZ
@given(position=POSITIONS)
def test_patch_positions(capitals, position):
    outcome = _works_or_ours(
        lambda: patch(
            capitals, CLEAN, CORRUPT, site="transformer.h.0", position=position, metric=logit_diff("Paris", "Berlin")
        )
    )
    if isinstance(position, int) and not isinstance(position, bool) and -6 <= position < 6:
        assert outcome == "ok", f"position {position} is valid for a 6-token prompt but gave {outcome}"


@FUZZ
@given(site=SITES)
def test_patch_sites(capitals, site):
    outcome = _works_or_ours(
        lambda: patch(capitals, CLEAN, CORRUPT, site=site, position="last", metric=logit_diff("Paris", "Berlin"))
    )
    if site in ("transformer.h.0", "transformer.h.1", "resid_post.0", "embed", "transformer.h.0:input"):
        assert outcome == "ok", f"site {site!r} exists but gave {outcome}"


@FUZZ
@given(metric=METRICS)
def test_patch_metrics(capitals, metric):
    outcome = _works_or_ours(
        lambda: patch(capitals, CLEAN, CORRUPT, site="transformer.h.1", position="last", metric=metric)
    )
    if getattr(metric, "name", None) == "logit_diff('Paris', 'Berlin')":
        assert outcome == "ok"


@settings(FUZZ, max_examples=20)
@given(
    sites=st.one_of(
        st.sampled_from(["blocks", "attn", "mlp", "resid_pre", "head_out"]),
        st.just("blocks"),
        st.just(["embed", "attn_out.1"]),
        st.lists(
            st.sampled_from(["embed", "transformer.h.1", "attn_out.0", "head_out.1.3", "transformer.h.2", 7]),
            max_size=3,
        ),
        SITES,
    ),
    positions=st.one_of(
        st.none(), st.none(), st.integers(-6, 5), st.sampled_from(["last", "France", "Paris"]), POSITIONS
    ),
    batch_size=st.sampled_from([1, 2, 3, 7, 32, 32, 32, 0, -1, 1.0, None, True]),
    direction=st.sampled_from(["clean->corrupt"] * 4 + ["corrupt->clean"] * 2 + ["both", None]),
)
def test_sweep_arguments(capitals, sites, positions, batch_size, direction):
    def call():
        effects = sweep(
            capitals,
            CLEAN,
            CORRUPT,
            metric=logit_diff("Paris", "Berlin"),
            sites=sites,
            positions=positions,
            batch_size=batch_size,
            direction=direction,
            check_batching=False,
        )
        assert all(math.isfinite(v) for row in effects.values for v in row), effects.to_text()

    OUTCOMES.append(_works_or_ours(call))
