"""Patching results and corruptions: the normalised standard error (delta method for a ratio of means), the
warning on cancelling gaps, the order of ``top``, per-example ``GaussianNoise`` positions."""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import GaussianNoise, PatchResult


def _result(values, clean, corrupted, direction="denoising"):
    values = torch.as_tensor(values, dtype=torch.float64)
    axes = tuple(f"a{i}" for i in range(values.dim() - 1))
    coords = {a: list(range(n)) for a, n in zip(axes, values.shape[1:])}
    cor = None if corrupted is None else torch.as_tensor(corrupted, dtype=torch.float64)
    return PatchResult(
        values, torch.as_tensor(clean, dtype=torch.float64), cor, axes, coords, direction=direction
    )


def _bootstrap_std(r, resamples=4000, seed=0):
    """Standard deviation over resamples of the ratio of means mean(v - c) / mean(clean - c)."""
    n = r.values.shape[0]
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    v, cl, co = r.values[idx].mean(1), r.clean[idx].mean(1), r.corrupted[idx].mean(1)
    return ((v - co[:, None]) / (cl - co)[:, None]).std(0)


def _correlated_case(n=40, seed=1):
    """Gaps of varied size, all positive; cell 0 restores every example's clean metric, the others restore a
    fraction of each gap plus noise (their effect is correlated with the gap)."""
    g = torch.Generator().manual_seed(seed)
    corrupted = torch.randn(n, generator=g, dtype=torch.float64)
    gap = 0.2 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    clean = corrupted + gap
    cols = [clean]
    for frac, noise in ((0.8, 0.05), (0.3, 0.2), (0.5, 0.5)):
        cols.append(corrupted + frac * gap + noise * torch.randn(n, generator=g, dtype=torch.float64))
    return _result(torch.stack(cols, 1), clean, corrupted)


def test_normalised_se_of_a_full_restoration_cell_is_zero():
    """A cell whose patched metric is every example's clean metric has normalised mean exactly 1 in every bootstrap
    resample: its standard error is 0, as the bootstrap's spread and the interval are."""
    r = _correlated_case()
    assert float(r.mean()[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(r.se()[0]) == pytest.approx(0.0, abs=1e-12)
    lo, hi = r.ci()
    assert float(hi[0] - lo[0]) == pytest.approx(0.0, abs=1e-12)


def test_normalised_se_matches_the_bootstrap_of_the_ratio_of_means():
    """The delta-method standard error agrees with the bootstrap standard deviation of the normalised mean within
    20% on every cell, where the gap is re-estimated in each resample; the unnormalised se is the plain one."""
    r = _correlated_case()
    se, boot = r.se(), _bootstrap_std(r)
    for j in range(1, 4):
        assert float(se[j]) == pytest.approx(float(boot[j]), rel=0.2), (j, se, boot)
    # by formula: std(a - R b) / (sqrt(n) |mean b|)
    a, b = r.values - r.corrupted[:, None], (r.clean - r.corrupted)[:, None]
    R = a.mean(0) / b.mean()
    torch.testing.assert_close(se, (a - R * b).std(0) / (np.sqrt(len(b)) * b.mean().abs()))
    torch.testing.assert_close(r.se(normalized=False), r.values.std(0) / np.sqrt(r.values.shape[0]))
    rows = r.to_records()
    assert [row["se"] for row in rows] == pytest.approx(se.tolist(), abs=1e-15)


def test_normalised_se_of_a_single_example_is_nan():
    r = _result([[0.5, 1.0]], [1.0], [0.0])
    assert torch.isnan(r.se()).all() and torch.isnan(r.se(normalized=False)).all()


def _count(caught, text):
    return sum(issubclass(w.category, RuntimeWarning) and text in str(w.message) for w in caught)


def test_cancelling_gaps_warn_once():
    """Gaps of both signs whose mean is under 5% of the mean |gap|: one RuntimeWarning for the result, however
    many means are read; gaps of one sign do not warn."""
    clean = torch.tensor([1.0, -1.0, 1.0, -0.97])
    corrupted = torch.zeros(4)
    values = torch.stack([clean, 0.5 * clean], 1)
    r = _result(values, clean, corrupted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = r.normalized
        r.mean(), r.se(), r.top(2, normalized=True), r.to_records()
    assert _count(caught, "gaps cancel") == 1, [str(w.message) for w in caught]
    assert float(n.mean(0)[0]) == pytest.approx(1.0)  # still divided by the mean gap
    ok = _result(values.abs(), clean.abs(), corrupted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok.normalized, ok.se(), ok.ci()
    assert _count(caught, "cancel") == 0


def test_a_zero_mean_gap_still_gives_nan():
    clean = torch.tensor([1.0, -1.0])
    r = _result(torch.stack([clean, clean], 1), clean, torch.zeros(2))
    with pytest.warns(RuntimeWarning, match="undefined and returned as NaN"):
        n = r.normalized
    assert torch.isnan(n).all()


def test_top_keeps_ties_in_grid_order_and_ranks_nan_last():
    """Equal |mean| come in grid order (row-major); NaN cells after every number, in grid order."""
    means = torch.full((6, 8), 0.5, dtype=torch.float64)
    means[::2] *= -1  # the same |mean| with both signs
    means[1, 3] = 2.0
    means[4, 0] = float("nan")
    means[0, 5] = float("nan")
    values = torch.stack([means, means]) + torch.tensor([0.1, -0.1], dtype=torch.float64).view(2, 1, 1)
    r = _result(values, [1.0, 1.0], [0.0, 0.0])  # target = corrupted = 0: effect = values
    top = r.top(48)
    cells = [(c["a0"], c["a1"]) for c, _ in top]
    assert cells[0] == (1, 3) and top[0][1] == pytest.approx(2.0)
    ties = [(i, j) for i in range(6) for j in range(8) if (i, j) not in ((1, 3), (4, 0), (0, 5))]
    assert cells[1:46] == ties
    assert cells[46:] == [(0, 5), (4, 0)] and all(np.isnan(v) for _, v in top[46:])


def test_top_normalized_is_the_normalised_effect():
    """Denoising: mean(normalized); noising: mean(normalized) - 1 (0 for a cell that changes nothing)."""
    clean, corrupted = torch.tensor([2.0, 4.0]), torch.tensor([0.0, 0.0])  # mean gap 3
    values = torch.stack([clean, torch.tensor([1.0, 2.0])], 1)  # cell 0 = clean metric, cell 1 half of it
    den = dict((c["a0"], v) for c, v in _result(values, clean, corrupted).top(2, normalized=True))
    assert den == pytest.approx({0: 1.0, 1: 0.5})
    noi = dict((c["a0"], v) for c, v in _result(values, clean, corrupted, "noising").top(2, normalized=True))
    assert noi == pytest.approx({0: 0.0, 1: -0.5})


def test_ablation_means_need_normalized_false():
    r = _result([[0.5], [1.5]], [1.0, 2.0], None, "noising")
    for call in (r.mean, r.se, r.ci):
        with pytest.raises(ValueError, match="normalized=False"):
            call()
    assert r.mean(normalized=False).tolist() == [1.0]
    assert r.effect[:, 0].tolist() == [-0.5, -0.5]


@pytest.fixture(scope="module")
def tiny():
    net = Transformer(
        TransformerConfig(
            n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=11, n_ctx=8, dtype=torch.float64, seed=3
        )
    )
    net.eval()
    clean = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    return net, clean


def _noised_metric(net, clean, rows, seed, answer, wrong):
    """The corrupted run's logit difference computed independently: seeded noise of 3 x std(W_E) at each example's
    own positions, added at hook_embed."""
    B, T = clean.shape
    std = 3.0 * float(net.embed.W_E.detach().double().std())
    noise = torch.randn(
        B, T, net.cfg.d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    mask = torch.zeros(B, T, 1, dtype=torch.float64)
    for b, row in enumerate(rows):
        for p in row:
            mask[b, p] = 1.0
    noise = noise * std * mask
    with torch.no_grad(), net.hooks([("hook_embed", lambda x, hook: x + noise.to(x.dtype))]):
        logits = net(clean)[:, -1]
    rng = torch.arange(B)
    return logits[rng, answer] - logits[rng, wrong]


@pytest.mark.parametrize("kind", ["ragged list", "tensor", "array"])
def test_gaussian_noise_per_example_positions_match_an_independent_noised_run(tiny, kind):
    net, clean = tiny
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    if kind == "ragged list":
        rows = [[1, 2], [3], [0, 4, -1]]
        positions = rows
    else:
        rows = [[1, 2], [2, 3], [0, 5]]
        positions = torch.tensor(rows) if kind == "tensor" else np.array(rows)
    corruption = GaussianNoise(positions=positions, seed=5)
    r = pp.activation_patching(
        net, "resid_pre", clean, corruption=corruption, metric=pp.LogitDiff(answer, wrong), quiet=True
    )
    ref = _noised_metric(net, clean, [[p % 6 for p in row] for row in rows], 5, answer, wrong)
    torch.testing.assert_close(r.corrupted.double(), ref, rtol=1e-10, atol=1e-10)
    noise = corruption.noise(net, 3, 6, 8, torch.float64)
    for b, row in enumerate(rows):
        assert sorted((noise[b].abs().sum(-1) > 0).nonzero().flatten().tolist()) == sorted(p % 6 for p in row)


def test_gaussian_noise_positions_of_another_shape_are_refused(tiny):
    net, _ = tiny
    with pytest.raises(ValueError, match=r"GaussianNoise\.positions gives positions for 2 examples"):
        GaussianNoise(positions=torch.tensor([[1, 2], [2, 3]])).noise(net, 3, 6, 8, torch.float64)
    with pytest.raises(ValueError, match=r"GaussianNoise\.positions has shape \(1, 2, 2\)"):
        GaussianNoise(positions=torch.zeros(1, 2, 2, dtype=torch.long)).noise(net, 1, 6, 8, torch.float64)
    with pytest.raises(ValueError, match=r"GaussianNoise\.positions\[1\] contains \[7\]"):
        GaussianNoise(positions=[[1], [7]]).noise(net, 2, 6, 8, torch.float64)
    with pytest.raises(TypeError, match=r"GaussianNoise\.positions\[0\]=1 is not a sequence"):
        GaussianNoise(positions=[1, [2]]).noise(net, 2, 6, 8, torch.float64)


def test_grid_positions_of_two_dimensions_are_refused(tiny):
    net, clean = tiny
    md = pp.LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    with pytest.raises(ValueError, match=r"positions has shape \(2, 1\)"):
        pp.activation_patching(
            net,
            "resid_pre",
            clean,
            (clean + 1) % 11,
            metric=md,
            positions=torch.tensor([[0], [1]]),
            quiet=True,
        )
