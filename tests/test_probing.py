"""Linear probes: known answers on synthetic data, Wilson intervals against hand-computed values, bad input."""

import json
import math

import pytest
import torch

from pytest_nnsight.activation_cache import ActivationCache
from pytest_nnsight.errors import ProbeError, SiteNotCachedError
from pytest_nnsight.probing import (
    ProbeSweep,
    assert_probe,
    fit_probe,
    probe,
    probe_sites,
    stratified_split,
    wilson_interval,
)


def wilson_by_hand(k, n, z=1.959963984540054):
    p = k / n
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return center - half, center + half


@pytest.mark.parametrize(
    "k, n, expected",
    [
        (8, 10, (0.4902, 0.9433)),  # textbook values (Wilson 1927; e.g. Newcombe 1998, table I)
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (81, 263, (0.2553, 0.3662)),  # Newcombe 1998 example
        (1, 29, (0.0061, 0.1718)),
    ],
)
def test_wilson_interval_matches_hand_computed_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == expected
    hand = wilson_by_hand(k, n)
    assert lo == pytest.approx(max(0.0, hand[0]), abs=1e-12) and hi == pytest.approx(min(1.0, hand[1]), abs=1e-12)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"k=11, n=10\): expected 0 <= k <= n"):
        wilson_interval(11, 10)


def test_stratified_split_keeps_class_shares_and_is_seeded():
    labels = [0] * 40 + [1] * 20 + [2] * 4 + [3]
    train, test = stratified_split(labels, 0.25, seed=3)
    assert sorted(train + test) == list(range(len(labels)))
    assert [sum(labels[i] == c for i in test) for c in range(4)] == [10, 5, 1, 0]  # the singleton stays in train
    assert stratified_split(labels, 0.25, seed=3) == (train, test)
    assert stratified_split(labels, 0.25, seed=4) != (train, test)


def separable(n_per_class=60, d=16, classes=3, margin=4.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.eye(classes, d) * margin
    labels = [c for c in range(classes) for _ in range(n_per_class)]
    x = centers[labels] + torch.randn(len(labels), d, generator=gen)
    return x, labels


def test_probe_separates_separable_classes_and_beats_baselines():
    x, labels = separable()
    r = fit_probe(x, labels)
    assert r.accuracy == 1.0 and r.correct == r.n_test == 45 and r.n_train == 135
    assert r.ci == pytest.approx(wilson_interval(45, 45))
    assert r.majority == pytest.approx(1 / 3)
    assert r.control < 0.6  # shuffled labels do not generalise
    assert_probe(r, 0.9, over_baseline=0.3, lower_bound=True)


def test_probe_is_at_chance_on_noise():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=gen)
    labels = [i % 2 for i in range(400)]
    r = fit_probe(x, labels)
    lo, hi = r.ci
    assert lo <= 0.5 + 0.02 and 0.35 <= r.accuracy <= 0.65
    with pytest.raises(AssertionError) as info:
        assert_probe(r, 0.9, over_baseline=0.1)
    text = str(info.value)
    assert text.startswith(
        "claim: features linearly encodes the labels: held-out accuracy >= 0.9 and beats the baselines by 0.1\n"
    )
    for line in (
        "site:",
        "\nsplit:",
        "stratified by label, seed 0: 300 train / 100 test",
        "measured:",
        "baselines:",
        "expected:",
        "try: ",
    ):
        assert line in text


def test_probe_finds_a_label_carried_by_one_dimension():
    """Non-separable in all but one direction: the label is the sign of feature 3 plus 10% label noise."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(600, 10, generator=gen)
    flip = torch.rand(600, generator=gen) < 0.1
    labels = ((x[:, 3] > 0) ^ flip).tolist()
    r = fit_probe(x, labels)
    assert 0.8 <= r.accuracy <= 0.97  # ~90% is the best any classifier can do
    assert r.classes == ("False", "True")


def test_probe_is_deterministic():
    x, labels = separable(n_per_class=20, margin=1.0)
    assert fit_probe(x, labels) == fit_probe(x, labels)


def test_bad_labels_are_clear_errors():
    x, labels = separable(n_per_class=10)
    with pytest.raises(ProbeError, match="labels has 29 entries but features holds 30 examples"):
        fit_probe(x, labels[:-1])
    with pytest.raises(ProbeError, match="a single class \\('a' x 30\\)"):
        fit_probe(x, ["a"] * 30)
    with pytest.raises(ProbeError, match="every class has a single example"):
        fit_probe(x[:3], [0, 1, 2])
    with pytest.raises(ProbeError, match="expected a 2-D tensor"):
        fit_probe(x[0], [0] * 16)
    with pytest.raises(ProbeError, match="test_fraction 1.5"):
        fit_probe(x, labels, test_fraction=1.5)


def test_probe_on_cached_activations_and_its_errors(capitals, nnsight_models, tmp_path):
    prompts = [f"The capital of {c} is" for c in ("France", "Germany", "Italy", "Spain")] * 3
    labels = [0, 1, 0, 1] * 3
    acts = ActivationCache(tmp_path, models=nnsight_models).get(capitals, prompts, sites="blocks", positions="last")
    sweep = probe_sites(acts, labels)
    assert isinstance(sweep, ProbeSweep) and sweep.sites == ("resid_post.0", "resid_post.1")
    assert sweep.to_map().shape == (2, 1) and sweep.to_map().kind == "probe"
    assert "resid_post.0" in sweep.to_text()
    with pytest.raises(
        SiteNotCachedError, match="site 'embed' was not cached in this entry: it holds resid_post.0, resid_post.1"
    ):
        probe(acts, "embed", labels)
    with pytest.raises(ProbeError, match="labels has 11 entries but the cached activations hold 12 prompts"):
        probe(acts, "resid_post.0", labels[:-1])
    with pytest.raises(ProbeError, match="a single class"):
        probe(acts, "resid_post.0", [1] * 12)
    with pytest.raises(ProbeError, match="position index 1 is out of range"):
        probe(acts, "resid_post.0", labels, index=1)


def test_pca_2d_projects_on_the_top_two_principal_directions():
    from pytest_nnsight.probing import pca_2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) * torch.tensor(
        [5.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64
    )
    x = x @ torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]  # rotate: no axis is a component
    out = pca_2d(x)
    xc = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc)  # ascending
    ref = xc @ evecs[:, [-1, -2]]
    got = torch.tensor(out["points"], dtype=torch.float64)
    for k in range(2):  # components are defined up to sign
        sign = 1.0 if float(got[:, k] @ ref[:, k]) >= 0 else -1.0
        assert torch.allclose(got[:, k], sign * ref[:, k], atol=1e-5)
    assert out["explained"] == pytest.approx([float(evals[-1] / evals.sum()), float(evals[-2] / evals.sum())], rel=1e-9)
    perm = torch.randperm(300, generator=g)
    shuffled = torch.tensor(pca_2d(x[perm])["points"], dtype=torch.float64)
    assert torch.allclose(shuffled, got[perm], atol=1e-5)  # signs are fixed by the data, not by the row order


PROBE_FINDING = """
import pytest, torch
from pytest_nnsight.probing import assert_probe, fit_probe

@pytest.mark.finding("the label is linearly decodable")
def test_probe():
    g = torch.Generator().manual_seed(0)
    labels = ["a", "b", "c"] * 40
    centers = {"a": torch.tensor([3.0, 0, 0, 0]), "b": torch.tensor([0, 3.0, 0, 0]), "c": torch.tensor([0, 0, 3.0, 0])}
    x = torch.stack([centers[l] for l in labels]) + torch.randn(120, 4, generator=g)
    result = fit_probe(x, labels, site="resid_post.0", position="last")
    assert_probe(result, 0.8)
"""


def test_probe_findings_get_a_pca_figure_beside_the_accuracies_in_the_report(pytester):
    pytester.makepyfile(test_p=PROBE_FINDING)
    pytester.runpytest_inprocess("--nnsight-report", "out").assert_outcomes(passed=1)
    (rec,) = json.loads((pytester.path / "out" / "findings.json").read_text())["findings"]
    (p,) = rec["probes"]  # fitted, then asserted: recorded once
    assert p["site"] == "resid_post.0" and p["accuracy"] >= 0.8 and len(p["pca"]["points"]) == 120
    assert p["pca"]["labels"][:3] == ["a", "b", "c"] and sum(p["pca"]["explained"]) <= 1.0
    assert (
        rec["checks"][0]["what"].startswith("held-out accuracy of the probe at resid_post.0")
        and rec["checks"][0]["passed"]
    )
    html = (pytester.path / "out" / "index.html").read_text()
    row = html[html.index("<div class='probe-row'") :]
    assert row.index("linear probes: held-out accuracy") < row.index("figures/test_probe-probes.png")
    plt = pytest.importorskip("matplotlib.pyplot")
    pixels = plt.imread(str(pytester.path / "out" / "figures" / "test_probe-probes.png"))[..., :3]
    for hex_ in ("1f77b4", "ff7f0e", "2ca02c"):  # tab10's first three: the labels a, b, c
        rgb = torch.tensor([int(hex_[i : i + 2], 16) / 255 for i in (0, 2, 4)])
        near = (torch.from_numpy(pixels.copy()) - (0.8 * rgb + 0.2)).abs().max(-1).values < 0.08  # alpha 0.8 on white
        assert int(near.sum()) > 40, f"label colour #{hex_} is missing from the PCA figure"
