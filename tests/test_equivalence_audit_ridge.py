"""The ridge similarities against a naive numpy implementation (explicit leave-one-out refits), and the invariances
each has by its definition: which changes of basis and scale of either representation leave it unchanged, and
which do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pypattern.equivalence import ridge_similarity, ridge_similarity_cv
from pypattern.ridge import train_test_split


def _naive_ridge(xtr, ytr, alpha):
    """Ridge with an unpenalised intercept: ``(coef, intercept)`` from the normal equations."""
    mx, my = xtr.mean(0), ytr.mean(0)
    xc, yc = xtr - mx, ytr - my
    coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(xc.shape[1]), xc.T @ yc)
    return coef, my - mx @ coef


def _naive_loo_alpha(xtr, ytr, alphas):
    """The penalty with the smallest mean squared leave-one-out residual, each left-out row refit from scratch."""
    scores = []
    for a in alphas:
        res = []
        for i in range(xtr.shape[0]):
            keep = np.arange(xtr.shape[0]) != i
            coef, b = _naive_ridge(xtr[keep], ytr[keep], a)
            res.append(ytr[i] - (xtr[i] @ coef + b))
        scores.append(np.mean(np.square(res)))
    return alphas[int(np.argmin(scores))]


def naive_ridge_similarity_cv(x, y, seed=0, alphas=(0.1, 1.0, 10.0), multioutput="uniform_average"):
    x, y = np.asarray(x, float), np.asarray(y, float)
    tr, te = (t.numpy() for t in train_test_split(x.shape[0], None, seed))
    a = _naive_loo_alpha(x[tr], y[tr], alphas)
    coef, b = _naive_ridge(x[tr], y[tr], a)
    pred = x[te] @ coef + b
    sse = ((y[te] - pred) ** 2).sum(0)
    sst = ((y[te] - y[te].mean(0)) ** 2).sum(0)
    if multioutput == "uniform_average":
        r2 = float(np.mean(1 - sse / sst))
    else:
        r2 = float(1 - sse.sum() / sst.sum())
    return math.sqrt(max(r2, 0.0))


def naive_ridge_similarity(x, y, alpha=0.01, train_fraction=0.5, seed=0):
    """Pooled held-out R^2, the penalty ``alpha`` times the mean eigenvalue of the centred training scatter."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    k = min(max(int(round(train_fraction * n)), 2), n - 2)
    tr, te = perm[:k], perm[k:]
    xc = x[tr] - x[tr].mean(0)
    lam = alpha * np.trace(xc.T @ xc) / x.shape[1]
    coef, b = _naive_ridge(x[tr], y[tr], lam)
    pred = x[te] @ coef + b
    r2 = 1 - ((y[te] - pred) ** 2).sum() / ((y[te] - y[te].mean(0)) ** 2).sum()
    return math.sqrt(max(r2, 0.0))


def _data(n, p, q, seed, noise=0.7):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, p))
    y = x @ g.standard_normal((p, q)) + noise * g.standard_normal((n, q))
    y *= np.linspace(
        0.2, 5.0, q
    )  # columns of different scales: the uniform average differs from the pooled R^2
    return x, y


def _rot(d, seed):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


@pytest.mark.parametrize("n,p,q", [(48, 5, 4), (40, 60, 3)])
def test_ridge_similarity_cv_is_the_naive_fit(n, p, q):
    x, y = _data(n, p, q, 0)
    for seed in (0, 5):
        want = naive_ridge_similarity_cv(x, y, seed)
        assert ridge_similarity_cv(x, y, seed=seed) == pytest.approx(want, abs=1e-10)
        pooled = naive_ridge_similarity_cv(x, y, seed, multioutput="variance_weighted")
        got = ridge_similarity_cv(x, y, seed=seed, multioutput="variance_weighted")
        assert got == pytest.approx(pooled, abs=1e-10)


@pytest.mark.parametrize("n,p,q", [(48, 5, 4), (40, 60, 3)])
def test_ridge_similarity_cv_invariances(n, p, q):
    """Ridge's penalty ``||B||^2`` does not change under an orthogonal map of the predictors, nor does the fit under
    a translation of either side (the intercept is not penalised), nor a column's R^2 under scaling all targets by
    one factor. The uniform average of the columns' R^2 (the authors' definition) is not invariant to a rotation of
    the target; the pooled R^2 (``multioutput='variance_weighted'``) is. The penalties are absolute: scaling the
    predictors changes the fit."""
    x, y = _data(n, p, q, 1)
    base = ridge_similarity_cv(x, y)
    assert base == pytest.approx(naive_ridge_similarity_cv(x, y), abs=1e-10)
    assert ridge_similarity_cv(x @ _rot(p, 2), y) == pytest.approx(base, abs=1e-10)
    assert ridge_similarity_cv(x + 3.0, y - 7.0) == pytest.approx(base, abs=1e-10)
    assert ridge_similarity_cv(x, 1e3 * y) == pytest.approx(base, abs=1e-10)
    # a rotation of the target: the uniform average changes (as the naive computation says), the pooled one does not
    yr = y @ _rot(q, 3)
    rotated = ridge_similarity_cv(x, yr)
    assert rotated == pytest.approx(naive_ridge_similarity_cv(x, yr), abs=1e-10)
    assert abs(rotated - base) > 1e-4
    pooled = ridge_similarity_cv(x, y, multioutput="variance_weighted")
    assert ridge_similarity_cv(x, yr, multioutput="variance_weighted") == pytest.approx(pooled, abs=1e-10)
    assert ridge_similarity_cv(x @ _rot(p, 4), yr, multioutput="variance_weighted") == pytest.approx(
        pooled, abs=1e-10
    )
    # absolute penalties: x scaled by s is x with the penalties divided by s^2
    small = ridge_similarity_cv(0.05 * x, y)
    assert small == pytest.approx(naive_ridge_similarity_cv(0.05 * x, y), abs=1e-10)
    assert small == pytest.approx(naive_ridge_similarity_cv(x, y, alphas=(40.0, 400.0, 4000.0)), abs=1e-10)


def test_ridge_similarity_cv_refuses_an_unknown_multioutput():
    x, y = _data(30, 3, 2, 0)
    with pytest.raises(ValueError, match="multioutput='raw'"):
        ridge_similarity_cv(x, y, multioutput="raw")


@pytest.mark.parametrize("n,p,q", [(60, 6, 4), (30, 50, 3)])
def test_ridge_similarity_is_the_naive_fit_and_invariant_to_rotation_and_scale_of_either_side(n, p, q):
    """The pooled R^2 with a penalty relative to the predictors' mean eigenvalue: invariant to rotations,
    translations and isotropic scaling of either representation."""
    x, y = _data(n, p, q, 7, noise=0.3)
    base = ridge_similarity(x, y)
    assert base == pytest.approx(naive_ridge_similarity(x, y), abs=1e-10)
    for xx, yy in (
        (x @ _rot(p, 8), y),
        (x, y @ _rot(q, 9)),
        (x @ _rot(p, 10), y @ _rot(q, 11)),
        (1e-3 * x + 5, 1e4 * y - 2),
    ):
        assert ridge_similarity(xx, yy) == pytest.approx(base, abs=1e-10)


def test_ridge_similarities_of_identical_representations():
    """Identical representations with more samples than features: near 1 (the penalty shrinks the fit a little);
    with fewer samples than features the held-out rows lie outside the span of the fitted ones and the similarity is
    as the naive fit says (not 1)."""
    x, _ = _data(80, 4, 1, 3)
    assert ridge_similarity_cv(x, x) == pytest.approx(naive_ridge_similarity_cv(x, x), abs=1e-10)
    assert ridge_similarity_cv(x, x) > 0.999
    assert ridge_similarity(x, x) > 0.999
    wide, _ = _data(20, 40, 1, 4)
    assert ridge_similarity_cv(wide, wide) == pytest.approx(naive_ridge_similarity_cv(wide, wide), abs=1e-10)
    assert ridge_similarity(wide, wide) == pytest.approx(naive_ridge_similarity(wide, wide), abs=1e-10)


def test_the_protocols_ridge_similarity_takes_the_pooled_r2():
    """interpretive.similarity passes ``multioutput`` on: with the pooled R^2 a rotated copy of the target is as
    similar as the target itself, with the authors' uniform average it is not."""
    from pypattern.interpretive import similarity

    x, y = _data(60, 5, 4, 12)
    yr = y @ _rot(4, 13)
    pooled = similarity("ridge", x, [y, yr], seed=3, multioutput="variance_weighted")
    assert pooled[0] == pytest.approx(pooled[1], abs=1e-10)
    assert pooled[0] == pytest.approx(
        naive_ridge_similarity_cv(x, y, 3, multioutput="variance_weighted"), abs=1e-10
    )
    uniform = similarity("ridge", x, [y, yr], seed=3)
    assert uniform == pytest.approx(
        [naive_ridge_similarity_cv(x, y, 3), naive_ridge_similarity_cv(x, yr, 3)], abs=1e-10
    )
    assert abs(uniform[0] - uniform[1]) > 1e-4
