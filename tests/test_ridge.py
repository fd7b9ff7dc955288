"""Efficient leave-one-out ridge (pypattern.ridge) against explicit refits and independent numpy solves."""

import math

import numpy as np
import pytest
import torch

from pypattern.ridge import RidgeLOO, ridge_cv, ridge_similarity_cv


def _data(n, p, t, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, p)) * r.uniform(0.2, 3.0, p) + r.standard_normal(p)
    w = r.standard_normal((p, t)) / math.sqrt(p)
    y = x @ w + 0.5 * r.standard_normal((n, t)) + r.standard_normal(t)
    return x, y


def _fit_numpy(x, y, alpha):
    """Ridge with an unpenalised intercept by the normal equations on centred data."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - my))
    return w, my - mx @ w


def _explicit_loo(x, y, alpha):
    """(n, t) leave-one-out residuals by n refits."""
    out = np.empty_like(y)
    for i in range(x.shape[0]):
        keep = np.arange(x.shape[0]) != i
        w, b = _fit_numpy(x[keep], y[keep], alpha)
        out[i] = y[i] - (x[i] @ w + b)
    return out


@pytest.mark.parametrize("n,p", [(30, 8), (25, 40)])  # primal (n > p) and Gram (n <= p) modes
def test_loo_matches_explicit_refits(n, p):
    x, y = _data(n, p, 3, 0)
    alphas = (0.1, 1.0, 10.0)
    res = ridge_cv(x, y, alphas, alpha_per_target=True)
    for i, a in enumerate(alphas):
        loo = _explicit_loo(x, y, a)
        np.testing.assert_allclose(res.loo_mse[i].numpy(), (loo**2).mean(0), rtol=1e-9)
    pooled = ridge_cv(x, y, alphas)
    expect = [(_explicit_loo(x, y, a) ** 2).mean() for a in alphas]
    np.testing.assert_allclose(pooled.loo_mse.numpy(), expect, rtol=1e-9)
    assert pooled.alpha == alphas[int(np.argmin(expect))]
    w, b = _fit_numpy(x, y, pooled.alpha)
    np.testing.assert_allclose(pooled.coef.numpy(), w, atol=1e-10)
    np.testing.assert_allclose(pooled.intercept.numpy(), b, atol=1e-10)
    # per target: each column with its own best penalty
    for j in range(3):
        a = float(res.alpha[j])
        assert a == alphas[int(res.loo_mse[:, j].argmin())]
        wj, bj = _fit_numpy(x, y[:, j : j + 1], a)
        np.testing.assert_allclose(res.coef[:, j].numpy(), wj[:, 0], atol=1e-10)
        np.testing.assert_allclose(float(res.intercept[j]), bj[0], atol=1e-10)
    np.testing.assert_allclose(pooled.predict(x[:5]).numpy(), x[:5] @ w + b, atol=1e-10)


def test_one_decomposition_serves_many_targets():
    x, y = _data(40, 10, 6, 1)
    solver = RidgeLOO(torch.from_numpy(x))
    a = solver.fit(y[:, :2])
    b = ridge_cv(x, y[:, :2])
    np.testing.assert_allclose(a.coef.numpy(), b.coef.numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="alphas"):
        solver.fit(y, alphas=(0.0, 1.0))
    with pytest.raises(ValueError, match="samples"):
        solver.fit(y[:10])


def test_rank_deficient_features():
    x, y = _data(30, 5, 2, 2)
    x = np.concatenate([x, x[:, :2] * 2.0], 1)  # 7 columns of rank 5
    res = ridge_cv(x, y, (0.5,))
    np.testing.assert_allclose(res.loo_mse.numpy(), [(_explicit_loo(x, y, 0.5) ** 2).mean()], rtol=1e-8)


def test_ridge_similarity_cv_against_numpy():
    x, y = _data(60, 6, 4, 3)
    y2 = np.random.default_rng(9).standard_normal((60, 3))
    got = ridge_similarity_cv(x, [y, y2], seed=5)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(5)).numpy()
    tr, te = perm[:54], perm[54:]
    for target, value in zip((y, y2), got):
        mse = [(_explicit_loo(x[tr], target[tr], a) ** 2).mean() for a in (0.1, 1.0, 10.0)]
        w, b = _fit_numpy(x[tr], target[tr], (0.1, 1.0, 10.0)[int(np.argmin(mse))])
        pred = x[te] @ w + b
        yt = target[te]
        r2 = np.mean(1 - ((yt - pred) ** 2).sum(0) / ((yt - yt.mean(0)) ** 2).sum(0))
        assert value == pytest.approx(math.sqrt(max(r2, 0.0)), abs=1e-10)
    assert got[0] > 0.8 and got[1] < 0.5
    assert ridge_similarity_cv(x, y, seed=5) == pytest.approx(got[0], abs=1e-12)
    assert ridge_similarity_cv(x, y, seed=5, sqrt=False) == pytest.approx(got[0] ** 2, abs=1e-10)
    with pytest.raises(ValueError, match="train_fraction"):
        ridge_similarity_cv(x, y, train_fraction=1.0)
    with pytest.raises(ValueError, match="same inputs"):
        ridge_similarity_cv(x, [y[:50]])


@pytest.mark.parametrize("n,p", [(10, 12), (10, 9), (36, 416)])
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e6])
def test_loo_is_exact_when_the_penalty_is_small_against_the_features(n, p, scale):
    """Against explicit leave-one-out refits (each fit by a direct solve, intercept refitted): the fast LOO keeps
    its digits when the features' scale makes every penalty tiny (there the naive residual and 1 - leverage are
    differences of nearly equal numbers)."""
    from pypattern.ridge import RidgeLOO

    g = torch.Generator().manual_seed(n * p)
    x = torch.randn(n, p, generator=g, dtype=torch.float64) * scale
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    alphas = [0.1, 1.0, 10.0]
    res = RidgeLOO(x).fit(y, alphas)
    for k, a in enumerate(alphas):
        errs = []
        for i in range(n):
            keep = torch.arange(n) != i
            xm, ym = x[keep].mean(0), y[keep].mean(0)
            xc, yc = x[keep] - xm, y[keep] - ym
            dual = torch.linalg.solve(xc @ xc.T + a * torch.eye(n - 1, dtype=torch.float64), yc)
            pred = (x[i] - xm) @ (xc.T @ dual) + ym
            errs.append(((y[i] - pred) ** 2).mean())
        want = torch.stack(errs).mean()
        assert abs(float(res.loo_mse[k]) - float(want)) <= 1e-6 * float(want), (a, res.loo_mse[k], want)


def test_split_measures_need_five_inputs_and_say_so():
    from pypattern.interpretive import similarity

    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for measure in ("ridge", "cka", "procrustes"):
        with pytest.raises(ValueError, match="have 4 inputs; a train/test split needs at least 5"):
            similarity(measure, x, [y], seed=0)
