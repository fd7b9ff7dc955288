"""ESS and split R-hat against independent implementations written from their definitions, and their handling
of short, empty, ragged and antithetic traces."""

import math
import warnings

import numpy as np
import pytest

from pypattern.sampling.diagnostics import check_mixing, check_stationarity, ess, r_hat


def _ar1(rho, m, n, seed):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((m, n))
    x = np.empty((m, n))
    x[:, 0] = e[:, 0] / math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    return x


def _stan_ess(x):
    """Stan's ``compute_effective_sample_size`` written out (Vehtari et al. 2021, eq. 10 with BDA3's var_plus;
    Geyer's initial positive then monotone sequence, autocovariances by direct sums, ``tau >= 1 / log10(N)``),
    without Stan's extra tail term; ``(ess, tau_before_cap)``."""
    x = np.atleast_2d(np.asarray(x, float))
    m, n = x.shape
    acov = np.zeros((m, n))
    for c in range(m):
        d = x[c] - x[c].mean()
        for k in range(n):
            acov[c, k] = sum(d[i] * d[i + k] for i in range(n - k)) / n
    w = np.mean([acov[c, 0] * n / (n - 1) for c in range(m)])
    var_plus = w * (n - 1) / n
    if m > 1:
        var_plus += np.var(x.mean(axis=1), ddof=1)
    rho = [1.0 - (w - acov[:, k].mean()) / var_plus for k in range(n)]
    rho[0] = 1.0
    total, last = 0.0, math.inf
    for k in range(0, n - 1, 2):
        p = rho[k] + rho[k + 1]
        if p < 0:
            break
        last = min(p, last)
        total += last
    tau = -1.0 + 2.0 * total
    return m * n / max(tau, 1.0 / math.log10(m * n)), tau


def test_the_ess_of_antithetic_chains_is_capped_at_n_log10_n_as_stan_has_it():
    # the cap was 1 / log10(N + 10): an ESS above Stan's and ArviZ's N log10(N)
    for m, n, seed in ((4, 250, 0), (1, 400, 1), (2, 40, 2)):
        x = _ar1(-0.9, m, n, seed)
        want, tau = _stan_ess(x)
        assert tau < 1.0 / math.log10(m * n)  # the cap applies
        assert ess(x) == pytest.approx(m * n * math.log10(m * n), rel=1e-12)
        assert ess(x) == pytest.approx(want, rel=1e-12)
    # a four-draw trend: the cap of N = 4, not more effective draws than draws
    assert ess([[1.0, 2.0, 3.0, 4.0]]) == pytest.approx(_stan_ess([[1.0, 2.0, 3.0, 4.0]])[0], rel=1e-12)
    assert ess([[1.0, 2.0, 3.0, 4.0]]) < 4


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8])
def test_ess_equals_stans_estimator_and_the_ar1_value(rho):
    for m, n, seed in ((4, 300, 0), (1, 301, 1), (3, 7, 2), (2, 4, 3), (5, 5, 4)):
        x = _ar1(rho, m, n, seed)
        assert ess(x) == pytest.approx(_stan_ess(x)[0], rel=1e-9), (m, n)
    x = _ar1(rho, 4, 5000, 7)  # N (1 - rho) / (1 + rho) within the estimator's sampling error
    assert ess(x) == pytest.approx(x.size * (1 - rho) / (1 + rho), rel=0.15)


def test_traces_of_one_to_three_draws_or_no_chain_give_nan_without_numpy_warnings():
    x = _ar1(0.5, 3, 4, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (1, 2, 3):
            assert math.isnan(ess(x[:, :n])) and math.isnan(r_hat(x[:, :n]))
            assert check_mixing(x[:, :n]) is False and check_stationarity(x[:, :n]) is False
        assert math.isfinite(ess(x)) and math.isfinite(r_hat(x))
        # no chain at all: nothing to judge (was numpy's "Mean of empty slice" and a NaN from it)
        empty = np.zeros((0, 10))
        assert math.isnan(ess(empty)) and math.isnan(r_hat(empty))
        assert check_mixing(empty) is False and check_stationarity(empty) is False


def test_split_r_hat_of_four_and_five_draws_uses_the_outer_halves():
    x = _ar1(0.2, 3, 5, 1)
    for y in (x[:, :4], x):
        n = y.shape[1] // 2
        halves = np.concatenate([y[:, :n], y[:, -n:]])
        w = halves.var(axis=1, ddof=1).mean()
        b = n * halves.mean(axis=1).var(ddof=1)
        assert r_hat(y) == pytest.approx(math.sqrt(((n - 1) / n * w + b / n) / w), rel=1e-12)


@pytest.mark.parametrize("fn", [ess, r_hat, check_mixing, check_stationarity])
def test_chains_of_unequal_lengths_are_refused_by_name(fn):
    # was numpy's "setting an array element with a sequence ... inhomogeneous shape"
    with pytest.raises(ValueError, match=r"trace holds chains of unequal lengths \(3, 5 draws\)"):
        fn([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="trace must be an array of numbers"):
        fn([["a", "b", "c", "d"]])
