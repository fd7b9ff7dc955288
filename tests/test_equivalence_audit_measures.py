"""CKA (linear biased and debiased, RBF), Procrustes, CCA, SVCCA and PWCCA against naive numpy implementations
written from the definitions, on the inputs that break measures: fewer samples than features, one to three
samples, constant columns, non-contiguous memory, 16-bit dtypes, identical inputs, a mismatched number of samples,
NaN and inf."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pypattern.equivalence import (
    cca,
    linear_cka,
    procrustes,
    pwcca,
    rbf_cka,
    ridge_similarity,
    ridge_similarity_cv,
    svcca,
)

# ------------------------------------------------------------------------------------------------ naive measures


def _np(x):
    return np.asarray(torch.as_tensor(x).double().reshape(x.shape[0], -1), float)


def naive_hsic(k, l, debiased):  # noqa: E741
    n = k.shape[0]
    if not debiased:
        h = np.eye(n) - np.ones((n, n)) / n
        return np.trace(k @ h @ l @ h) / (n - 1) ** 2
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    ) / (n * (n - 3))


def naive_cka_of_grams(k, l, debiased):  # noqa: E741
    return naive_hsic(k, l, debiased) / math.sqrt(naive_hsic(k, k, debiased) * naive_hsic(l, l, debiased))


def naive_linear_cka(x, y, debiased=True):
    x, y = _np(x), _np(y)
    return naive_cka_of_grams(x @ x.T, y @ y.T, debiased)


def naive_rbf_gram(x, threshold=1.0):
    x = _np(x)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d / (2 * threshold**2 * np.median(d)))


def naive_rbf_cka(x, y, threshold=1.0, debiased=True):
    return naive_cka_of_grams(naive_rbf_gram(x, threshold), naive_rbf_gram(y, threshold), debiased)


def naive_procrustes(x, y, angular=False):
    x, y = _np(x), _np(y)
    x, y = x - x.mean(0), y - y.mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    nuc = np.linalg.svd(x.T @ y, compute_uv=False).sum()
    return math.acos(min(nuc, 1.0)) if angular else math.sqrt(max(2 - 2 * nuc, 0.0))


def _inv_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v / np.sqrt(w)) @ v.T


def naive_cca(x, y, ridge=0.0):
    x, y = _np(x), _np(y)
    x, y = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    sxx = sxx + ridge * np.trace(sxx) / sxx.shape[0] * np.eye(sxx.shape[0])
    syy = syy + ridge * np.trace(syy) / syy.shape[0] * np.eye(syy.shape[0])
    rho = np.linalg.svd(_inv_sqrt(sxx) @ sxy @ _inv_sqrt(syy), compute_uv=False)
    return rho[
        : min(np.linalg.matrix_rank(x), np.linalg.matrix_rank(y))
    ]  # one per shared direction of variance


def naive_svcca(x, y, threshold=0.99):
    def reduce(z):
        z = _np(z)
        z = z - z.mean(0)
        u, s, _ = np.linalg.svd(z, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.searchsorted(frac, threshold)) + 1
        return u[:, :k] * s[:k]

    return float(naive_cca(reduce(x), reduce(y)).mean())


def naive_pwcca(x, y):
    """Morcos et al.: canonical variates ``h_i = Xc Sxx^-1/2 u_i`` (unit norm), weights ``sum_j |<h_i, x_j>|``."""
    x, y = _np(x), _np(y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    a = _inv_sqrt(xc.T @ xc)
    u, rho, _ = np.linalg.svd(a @ (xc.T @ yc) @ _inv_sqrt(yc.T @ yc), full_matrices=False)
    r = min(x.shape[1], y.shape[1])
    h = xc @ a @ u[:, :r]
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ xc).sum(1)
    return float((alpha * rho[:r]).sum() / alpha.sum())


# ------------------------------------------------------------------------------------------------ data


def _pair(n, p, q, seed, noise=0.5):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, p))
    y = x @ g.standard_normal((p, q)) + noise * g.standard_normal((n, q))
    return torch.from_numpy(x), torch.from_numpy(y)


MEASURES = {
    "linear_cka": (lambda x, y: linear_cka(x, y), lambda x, y: naive_linear_cka(x, y)),
    "linear_cka_biased": (
        lambda x, y: linear_cka(x, y, debiased=False),
        lambda x, y: naive_linear_cka(x, y, False),
    ),
    "rbf_cka": (lambda x, y: rbf_cka(x, y), lambda x, y: naive_rbf_cka(x, y)),
    "rbf_cka_biased": (
        lambda x, y: rbf_cka(x, y, debiased=False, threshold=0.5),
        lambda x, y: naive_rbf_cka(x, y, 0.5, False),
    ),
    "procrustes": (lambda x, y: procrustes(x, y), naive_procrustes),
    "procrustes_angular": (
        lambda x, y: procrustes(x, y, angular=True),
        lambda x, y: naive_procrustes(x, y, True),
    ),
    "cca": (lambda x, y: float(cca(x, y).mean()), lambda x, y: float(naive_cca(x, y).mean())),
    "cca_ridge": (
        lambda x, y: float(cca(x, y, ridge=0.3).mean()),
        lambda x, y: float(naive_cca(x, y, 0.3).mean()),
    ),
    "svcca": (lambda x, y: svcca(x, y), naive_svcca),
    "pwcca": (lambda x, y: pwcca(x, y), naive_pwcca),
}
# the CCA family needs fewer features than samples - 1 (unless regularised)
WIDE_OK = {
    "linear_cka",
    "linear_cka_biased",
    "rbf_cka",
    "rbf_cka_biased",
    "procrustes",
    "procrustes_angular",
    "cca_ridge",
}


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_measures_are_the_naive_ones_and_read_any_memory_layout_and_dtype(name):
    fn, naive = MEASURES[name]
    x, y = _pair(50, 6, 4, 0)
    want = naive(x, y)
    assert fn(x, y) == pytest.approx(want, abs=1e-9)
    # non-contiguous views: a transposed copy, a column slice with a step, numpy with negative strides
    xt = x.T.contiguous().T
    extra = torch.from_numpy(np.random.default_rng(9).standard_normal(y.shape))
    wide = torch.cat([y, extra], 1)[:, ::2]  # every other column of y and of other data
    ys = torch.stack([y[:, j] for j in range(y.shape[1])], 1)
    assert not xt.is_contiguous()
    assert fn(xt, ys) == pytest.approx(want, abs=1e-9)
    assert fn(x.numpy()[::-1].copy()[::-1], y.numpy()[:, ::-1][:, ::-1]) == pytest.approx(want, abs=1e-9)
    assert not wide.is_contiguous()
    assert fn(x, wide) == pytest.approx(naive(x, wide.contiguous()), abs=1e-9)
    # 16- and 32-bit inputs: the measure of the rounded values, computed in float64
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xl, yl = x.to(dtype), y.to(dtype)
        assert fn(xl, yl) == pytest.approx(naive(xl.double(), yl.double()), abs=1e-7), dtype


@pytest.mark.parametrize("name", sorted(WIDE_OK))
def test_fewer_samples_than_features_match_the_naive_measures(name):
    fn, naive = MEASURES[name]
    x, y = _pair(12, 40, 30, 1)
    assert fn(x, y) == pytest.approx(naive(x, y), abs=1e-8)


@pytest.mark.parametrize("name", sorted(set(MEASURES) - WIDE_OK))
def test_unregularised_cca_refuses_as_many_directions_as_samples_minus_one(name):
    fn, _ = MEASURES[name]
    x, y = _pair(12, 40, 3, 1)
    with pytest.raises(ValueError, match="x has 11 directions of nonzero variance .* 12 samples"):
        fn(x, y)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_identical_inputs_are_maximally_similar(name):
    fn, _ = MEASURES[name]
    x, _ = _pair(40, 5, 1, 2)
    # regularised CCA shrinks the correlations of identical inputs too (as the naive one does)
    want = 0.0 if name.startswith("procrustes") else MEASURES[name][1](x, x) if name == "cca_ridge" else 1.0
    assert fn(x, x.clone()) == pytest.approx(want, abs=1e-9)
    # and a rotated, translated, scaled copy for the measures invariant to those
    q = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    assert fn(x, 3.0 * x @ q + 2.0) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_a_constant_column_is_as_if_absent(name):
    """A column constant over the samples carries no information: every measure is as without it (for the ridge
    CCA too, whose penalty is the mean eigenvalue over the columns, zeros included: compared with the naive one)."""
    fn, naive = MEASURES[name]
    x, y = _pair(40, 5, 4, 3)
    xk = torch.cat([x, torch.full((40, 1), 7.25, dtype=x.dtype)], 1)
    yk = torch.cat([torch.full((40, 1), -3.5, dtype=y.dtype), y], 1)
    if name == "cca_ridge":
        # the constant column is a zero eigenvalue: the naive inverse square root is of the regularised scatter
        assert fn(xk, yk) == pytest.approx(naive(xk, yk), abs=1e-9)
    else:
        assert fn(xk, yk) == pytest.approx(fn(x, y), abs=1e-9)
        assert fn(xk, yk) == pytest.approx(naive(x, y), abs=1e-9)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_non_finite_and_mismatched_inputs_are_refused_naming_the_argument(name):
    fn, _ = MEASURES[name]
    x, y = _pair(30, 4, 3, 4)
    for bad in (math.nan, math.inf, -math.inf):
        xb = x.clone()
        xb[3, 1] = bad
        with pytest.raises(ValueError, match=r"^x contains 1 non-finite"):
            fn(xb, y)
        with pytest.raises(ValueError, match=r"^y contains 1 non-finite"):
            fn(y, xb)
    with pytest.raises(ValueError, match="x has 30 rows, y has 29"):
        fn(x, y[:29])


def test_one_two_and_three_samples_are_refused_or_the_defined_value():
    """One sample has no spread: every measure refuses it naming x. Two samples: centred, every representation is
    one line through two points, so biased CKA is 1 and Procrustes 0 whatever the data (the naive values); the
    debiased HSIC needs 4 samples and CCA 3 (and then fewer directions than samples - 1)."""
    x, y = _pair(4, 3, 2, 5)
    for fn, _ in MEASURES.values():
        with pytest.raises(ValueError, match=r"x has 1 samples"):
            fn(x[:1], y[:1])
    for name in ("linear_cka_biased", "rbf_cka_biased", "procrustes", "procrustes_angular"):
        fn, naive = MEASURES[name]
        assert fn(x[:2], y[:2]) == pytest.approx(naive(x[:2], y[:2]), abs=1e-9)
        assert fn(x[:2], y[:2]) == pytest.approx(0.0 if name.startswith("procrustes") else 1.0, abs=1e-9)
    for name in ("linear_cka", "rbf_cka"):
        with pytest.raises(ValueError, match="x has 3 samples; this measure needs at least 4"):
            MEASURES[name][0](x[:3], y[:3])
        assert MEASURES[name][0](x, y) == pytest.approx(MEASURES[name][1](x, y), abs=1e-9)
    for name in ("cca", "svcca", "pwcca", "cca_ridge"):
        with pytest.raises(ValueError, match="x has 2 samples; CCA needs at least 3"):
            MEASURES[name][0](x[:2], y[:2])
    for fn in (ridge_similarity, ridge_similarity_cv):
        with pytest.raises(ValueError, match="x has 2 samples|have 2 inputs"):
            fn(x[:2], y[:2])


def test_rbf_cka_constant_and_degenerate_bandwidth():
    x, y = _pair(20, 3, 2, 6)
    assert math.isnan(rbf_cka(x, torch.ones(20, 2, dtype=torch.float64)))
    dup = torch.cat([torch.zeros(15, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="^y: the median squared distance"):
        rbf_cka(x, dup)
    for bad in (0, -1.0, math.inf, True, "1"):
        with pytest.raises(ValueError, match="threshold="):
            rbf_cka(x, y, threshold=bad)
