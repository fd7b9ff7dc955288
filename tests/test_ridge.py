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


@pytest.mark.parametrize("n,p", [(20, 5), (12, 30)])  # primal and Gram modes
@pytest.mark.parametrize("k", [600, -600])
def test_data_whose_squares_leave_float64_is_fit_in_its_own_units(n, p, k):
    """x of scale 2^600 (about 4e180) or 2^-600: ridge with penalty a on x is ridge with a / 4^j on x * 2^j, so the
    fit equals that of x at half the exponent with the penalties moved accordingly (an exact change of units),
    coefficients in x's own units; and the ridge similarity does not change with the scale of its targets."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x[:, :3] @ torch.randn(3, 2, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )
    alphas = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    h = k // 2
    big = ridge_cv(x * 2.0**k, y, alphas)
    ref = ridge_cv(x * 2.0**h, y, alphas * 2.0 ** (-k))
    assert big.alpha == 0.1 and torch.equal(big.alphas, alphas)
    assert ref.alpha == pytest.approx(0.1 * 2.0 ** (-k), rel=1e-15)
    torch.testing.assert_close(big.coef * 2.0 ** (k - h), ref.coef, rtol=1e-9, atol=0)
    torch.testing.assert_close(big.intercept, ref.intercept, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(big.loo_mse, ref.loo_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(
        big.predict(x[:3] * 2.0**k), ref.predict(x[:3] * 2.0**h), rtol=1e-9, atol=1e-12
    )
    per = ridge_cv(x * 2.0**k, y, alphas, alpha_per_target=True)
    assert torch.isfinite(per.coef).all() and torch.isfinite(per.loo_mse).all()
    # targets of scale 2^700: R^2 per column does not change with them
    got = ridge_similarity_cv(x * 2.0**k, [y, y * 2.0**700], seed=1)
    want = ridge_similarity_cv(x * 2.0**h, y, alphas=alphas * 2.0 ** (-k), seed=1)
    assert got == pytest.approx([want, want], abs=1e-9)


def test_ridge_similarity_of_large_scale_features_equals_a_change_of_units():
    """On n > p data of scale 2^600 with the default penalties (negligible against the scatter there), the ridge
    similarity is a real number, that of the data at 2^300 with the penalties divided by 2^600."""
    r = np.random.default_rng(3)
    x = r.standard_normal((80, 6))
    y = x[:, :3] @ r.standard_normal((3, 4)) + 0.2 * r.standard_normal((80, 4))
    got = ridge_similarity_cv(x * 2.0**600, y, seed=0)
    want = ridge_similarity_cv(x * 2.0**300, y, alphas=[a * 2.0**-600 for a in (0.1, 1.0, 10.0)], seed=0)
    assert 0.9 < got == pytest.approx(want, abs=1e-12)


def test_penalties_beyond_float64_against_the_data_are_refused_by_name():
    """x of scale 1e300 with penalties of order 1: their ratio to x's scatter (1e600) has no float64 value; the fit
    is refused naming alphas and x instead of failing in the eigendecomposition. Results beyond float64 (mean
    squared residuals of targets of scale 1e200) are refused naming x and y."""
    x, y = _data(20, 5, 3, 4)
    for fn in (lambda: ridge_cv(x * 1e300, y), lambda: ridge_similarity_cv(x * 1e300, y)):
        with pytest.raises(
            ValueError, match=r"alphas holds the penalty 0.1, too small against the scale of x"
        ):
            fn()
    with pytest.raises(ValueError, match=r"alphas holds the penalty 0.1, too large against the scale of x"):
        ridge_cv(x * 1e-300, y)
    with pytest.raises(
        ValueError, match=r"mean squared LOO residuals are beyond float64's range .*rescale x or y"
    ):
        ridge_cv(x, y * 1e200)


def test_boolean_arguments_refuse_other_types():
    """fit_intercept="no" would read as True; every boolean argument takes True or False (numpy bools too)."""
    x, y = _data(12, 3, 2, 5)
    for bad in ("no", None, 0, 1.0):
        for fn, name in (
            (lambda bad: ridge_cv(x, y, fit_intercept=bad), "fit_intercept"),
            (lambda bad: ridge_cv(x, y, alpha_per_target=bad), "alpha_per_target"),
            (lambda bad: RidgeLOO(x, fit_intercept=bad), "fit_intercept"),
            (lambda bad: RidgeLOO(x).fit(y, alpha_per_target=bad), "alpha_per_target"),
            (lambda bad: ridge_similarity_cv(x, y, sqrt=bad), "sqrt"),
        ):
            with pytest.raises(TypeError, match=f"{name}={bad!r} is not valid; give True or False"):
                fn(bad)
    a, b = ridge_cv(x, y, fit_intercept=np.bool_(False)), ridge_cv(x, y, fit_intercept=False)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.intercept, torch.zeros(2, dtype=torch.float64))
