"""Similarity measures against independent numpy computations on configurations the other checks leave out: RBF CKA
with narrow bandwidths and equidistant samples, SVCCA that keeps every direction under a ridge with fewer samples
than features, and the interpretive-equivalence settings that a run could only fail on after training its pool."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pypattern.cca import cca, svcca
from pypattern.equivalence import MinibatchCKA, linear_cka, rbf_cka


def _sq_dists(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)


def _naive_u_center(k: np.ndarray) -> np.ndarray:
    """U-centring by its definition (Song et al. 2012), written out entry by entry."""
    n = k.shape[0]
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    r = k.sum(1)
    s = k.sum()
    u = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + s / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def _naive_rbf_cka_log(x: np.ndarray, y: np.ndarray, threshold: float) -> float:
    """Debiased RBF CKA with the Gram matrices formed as exp(-(d - d_min) / bw) times exp(-d_min / bw): the common
    factor (which underflows for narrow bandwidths) cancels in the ratio, so it is left out."""
    us = []
    for z in (x, y):
        d = _sq_dists(z - z.mean(0))
        bw = 2.0 * threshold**2 * np.median(d)
        off = d[~np.eye(len(d), dtype=bool)]
        k = np.exp(-(d - off.min()) / bw)  # off-diagonal entries scaled by exp(d_min / bw)
        np.fill_diagonal(k, 0.0)  # the diagonal does not enter the U-centred Gram
        us.append(_naive_u_center(k))
    u, v = us
    return float((u * v).sum() / math.sqrt((u * u).sum() * (v * v).sum()))


@pytest.mark.parametrize("threshold", [0.045, 0.035, 0.03])
def test_rbf_cka_with_a_narrow_bandwidth_is_the_ratio_not_an_overflow(threshold):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 30))
    y = x + 0.5 * rng.normal(size=(20, 30))
    got = rbf_cka(x, y, threshold=threshold)
    want = _naive_rbf_cka_log(x, y, threshold)
    assert math.isfinite(got) and -1.0 <= got <= 1.0
    assert got == pytest.approx(want, rel=1e-9)
    # the same value for data of another scale (the bandwidth follows it)
    assert rbf_cka(1e3 * x, y, threshold=threshold) == pytest.approx(want, rel=1e-9)


def test_rbf_cka_refuses_a_bandwidth_below_float64_precision_naming_threshold():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 30)), rng.normal(size=(20, 30))
    with pytest.raises(ValueError, match="threshold=0.01"):
        rbf_cka(x, y, threshold=0.01)
    # the biased estimator reads the identity Gram as such: both kernels the identity give 1
    assert rbf_cka(x, y, threshold=0.01, debiased=False) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [6, 10, 17])
def test_rbf_cka_of_equidistant_samples_is_undefined_as_linear_cka_is(n):
    """One-hot codes of distinct inputs are all at one distance: the RBF Gram's off-diagonal entries are one
    constant, its U-centred Gram is zero, every unbiased HSIC with it is 0, and CKA is 0 / 0."""
    rng = np.random.default_rng(n)
    onehot = np.eye(n)[rng.permutation(n)]
    y = rng.normal(size=(n, 3))
    k = np.exp(-_sq_dists(onehot) / (2 * np.median(_sq_dists(onehot))))
    assert np.abs(_naive_u_center(k)).max() < 1e-14  # zero up to rounding
    assert math.isnan(linear_cka(onehot, y))
    assert math.isnan(rbf_cka(onehot, y))
    assert math.isnan(rbf_cka(y, onehot))
    # biased, the doubly centred Gram is not zero: a number, as the loop over its definition gives
    h = np.eye(n) - 1.0 / n
    ky = np.exp(-_sq_dists(y) / (2 * np.median(_sq_dists(y))))
    kc, lc = h @ k @ h, h @ ky @ h
    want = (kc * lc).sum() / math.sqrt((kc * kc).sum() * (lc * lc).sum())
    assert rbf_cka(onehot, y, debiased=False) == pytest.approx(want, rel=1e-10)


def test_cka_ratio_of_tiny_or_huge_hsic_terms_stays_in_range():
    """The ratio HSIC / sqrt(HSIC_x HSIC_y) is formed without the product HSIC_x HSIC_y, which leaves float64's
    range when both are small."""
    from pypattern.equivalence import _cka_from_hsic

    xy, xx, yy = (torch.tensor(v, dtype=torch.float64) for v in (0.5e-200, 1e-200, 1e-200))
    assert float(_cka_from_hsic(xy, xx, yy)) == pytest.approx(0.5, rel=1e-12)
    xy, xx, yy = (torch.tensor(v, dtype=torch.float64) for v in (0.25e200, 1e200, 1e200))
    assert float(_cka_from_hsic(xy, xx, yy)) == pytest.approx(0.25, rel=1e-12)
    # one batch: the minibatch estimate is linear_cka's
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5))
    y = x @ rng.normal(size=(5, 4)) + rng.normal(size=(12, 4))
    acc = MinibatchCKA(1, 1).update([x], [y])
    assert float(acc.compute()[0, 0]) == pytest.approx(linear_cka(x, y), rel=1e-12)


def _naive_svcca_ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """SVCCA with threshold 1 and a ridge, written out: every direction of nonzero variance kept (numpy's SVD,
    singular values above 1e-10 of the largest), then regularised CCA of the reduced representations with the
    penalty ``ridge`` times the mean eigenvalue of each reduced scatter matrix."""

    def reduce(z):
        u, s, _ = np.linalg.svd(z - z.mean(0), full_matrices=False)
        keep = s > 1e-10 * s[0]
        return u[:, keep] * s[keep]

    def inv_sqrt(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(w**-0.5) @ v.T

    a, b = reduce(x), reduce(y)
    sa, sb = a.T @ a, b.T @ b
    wa = inv_sqrt(sa + ridge * np.trace(sa) / len(sa) * np.eye(len(sa)))
    wb = inv_sqrt(sb + ridge * np.trace(sb) / len(sb) * np.eye(len(sb)))
    return np.linalg.svd(wa @ a.T @ b @ wb, compute_uv=False)


@pytest.mark.parametrize("n,p,q", [(12, 40, 30), (15, 20, 50), (9, 9, 9)])
def test_svcca_with_threshold_one_and_a_ridge_keeps_no_direction_of_rounding_noise(n, p, q):
    """With fewer samples than features the centred data has n - 1 directions of variance; threshold=1 keeps those
    (the cumulative variance fraction rounds to just below 1 at the last of them), not a further direction of
    rounding noise whose canonical correlation, 0, would pull the mean down."""
    rng = np.random.default_rng(n + p + q)
    x = rng.normal(size=(n, p))
    y = x[:, :3] @ rng.normal(size=(3, q)) + rng.normal(size=(n, q))
    want = _naive_svcca_ridge(x, y, 0.1)
    got = svcca(x, y, threshold=1.0, ridge=0.1, reduce="none")
    assert len(got) == len(want) == min(n - 1, p, q)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    assert svcca(x, y, threshold=1.0, ridge=0.1) == pytest.approx(want.mean(), rel=1e-9)
    # no ridge with fewer samples than features is refused (canonical correlations all 1), as cca refuses it
    with pytest.raises(ValueError, match="samples - 1"):
        svcca(x, y, threshold=1.0)
    assert len(cca(x, y, ridge=0.1)) == min(n - 1, p, q)


def _guard_pool(monkeypatch):
    from pypattern.experiments import interpretive

    monkeypatch.setattr(interpretive, "train_pools", lambda *a, **k: pytest.fail("the pool was trained"))
    return interpretive


def test_interpretive_settings_with_one_member_are_refused_before_the_pool_is_trained(tmp_path, monkeypatch):
    """One member per routine gives every algorithm one implementation; the grid's diagonal draws three."""
    from pypattern.interpretive import win_test

    interpretive = _guard_pool(monkeypatch)
    s = dataclasses.replace(interpretive.quick_interpretive_settings(), members=(("L1d48h4", 0),))
    with pytest.raises(ValueError, match=r"members=.*1 implementation\(s\).*3 distinct"):
        interpretive.run_interpretive(tmp_path, s, log=None)
    # what the run would meet after training: the same-algorithm control cannot draw
    one = [torch.randn(20, 4, dtype=torch.float64)]
    with pytest.raises(ValueError, match="draws 3 distinct"):
        win_test(one, None, measure="cka", num_trials=1, num_repeats=1)
    for ok in (interpretive.quick_interpretive_settings(), interpretive.reduced_interpretive_settings()):
        assert interpretive.check_settings(ok) is ok


@pytest.mark.parametrize("num_inputs,train_fraction", [(4, 0.9), (5, 0.9), (8, 0.3)])
def test_interpretive_settings_with_too_few_inputs_are_refused_before_the_pool_is_trained(
    num_inputs, train_fraction, tmp_path, monkeypatch
):
    """The similarities are computed on a split of the inputs: CKA on the fitted fraction needs 4 of them."""
    from pypattern.interpretive import similarity
    from pypattern.ridge import _fit_size

    interpretive = _guard_pool(monkeypatch)
    s = dataclasses.replace(
        interpretive.quick_interpretive_settings(), num_inputs=num_inputs, train_fraction=train_fraction
    )
    with pytest.raises(ValueError, match=f"num_inputs={num_inputs} is not valid"):
        interpretive.run_interpretive(tmp_path, s, log=None)
    # what the run would meet after training
    x = torch.randn(num_inputs, 6, dtype=torch.float64)
    if num_inputs >= 5:
        assert _fit_size(num_inputs, train_fraction) < 4
    with pytest.raises(ValueError):
        similarity("cka", x, [x + 1], seed=0, train_fraction=train_fraction)
    # enough inputs for every measure: accepted
    ok = dataclasses.replace(s, num_inputs=12, train_fraction=0.5)
    assert interpretive.check_settings(ok) is ok


@pytest.mark.parametrize("measure", ["cka", "procrustes", "ridge"])
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(multioutput="bogus"), "multioutput='bogus'"),
        (dict(alphas=[-1.0]), "alphas"),
        (dict(alphas=[]), "alphas"),
    ],
)
def test_similarity_refuses_invalid_ridge_options_for_every_measure(measure, kw, match):
    """A win test or grid passes its options to every measure: an invalid one is refused, not ignored by CKA and
    Procrustes (which do not read them); valid ones leave CKA and Procrustes as they are."""
    from pypattern.interpretive import similarity, win_test
    from pypattern.ridge import train_test_split

    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 4, dtype=torch.float64, generator=g)
    y = x + torch.randn(20, 4, dtype=torch.float64, generator=g)
    with pytest.raises(ValueError, match=match):
        similarity(measure, x, [y], seed=0, **kw)
    impls = [x + 0.1 * torch.randn(20, 4, dtype=torch.float64, generator=g) for _ in range(3)]
    with pytest.raises(ValueError, match=match):
        win_test(impls, None, measure=measure, num_trials=1, num_repeats=1, **kw)
    if measure != "ridge":
        tr, _ = train_test_split(20, 0.9, 0)
        want = linear_cka(x[tr], y[tr]) if measure == "cka" else None
        got = similarity(measure, x, [y], seed=0, alphas=[5.0], multioutput="variance_weighted")[0]
        assert got == similarity(measure, x, [y], seed=0)[0]
        if want is not None:
            assert got == pytest.approx(want, rel=1e-12)
