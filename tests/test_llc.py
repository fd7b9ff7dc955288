"""Ground truths for the LLC estimator, with the hyperparameters stated in each test.

* Regular model (a linear map, d parameters): lambda = d / 2, within 15%.
* Normal crossing K(w) = w1^(2 k1) w2^(2 k2): the estimator's exact target at finite nbeta is
  E[nbeta K] under exp(-nbeta K - localization/2 |w|^2), computed by quadrature
  (:func:`pypattern.truth.localized_normal_crossing_expectation`); the sampler must reproduce it within 15%.
  That target tends to lambda = 1 / (2 max k) slowly in nbeta (tests/test_truth.py checks it), and SGLD needs
  about 1 / (localization * step_size) steps to cross the flat valleys. Where both are affordable (w1^2 w2^4 at
  nbeta = 1e4) the estimate is also compared with lambda itself, within 15%; for [1,1] and [2,3] that would take
  nbeta ~ 1e6 and millions of steps: see the docstrings below.
* Deep linear networks vs Aoyagi's formula.
"""

import math

import numpy as np
import pytest
import torch

from pypattern import truth
from pypattern.sampling import estimate_llc


def _loader(ds):
    return torch.utils.data.DataLoader(ds, batch_size=len(ds))


def test_regular_model_is_d_over_2():
    # y = W x with W 2x3 (d = 6) at a generic W*: K(W) = |W - W*|^2 / 2 (orthonormal design, MSE over 2 outputs)
    # nbeta = 1000, localization = 1, step_size = 1e-4 (step * curvature = 0.1: +2.5% bias), 8 chains x 400 draws
    # 5 steps apart, 100 burn-in steps
    torch.manual_seed(0)
    model = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    ds = truth.make_regression_data(model, 3, dtype=torch.float64)
    r = estimate_llc(
        model,
        _loader(ds),
        step_size=1e-4,
        nbeta=1000.0,
        localization=1.0,
        num_chains=8,
        num_draws=400,
        num_steps_bw_draws=5,
        num_burnin_steps=100,
        seed=0,
        quiet=True,
    )
    lam = truth.regular_learning_coefficient(6)
    assert r.sample.batched
    assert abs(r.llc_mean - lam) / lam < 0.15, r
    assert r.r_hat < 1.1


@pytest.mark.parametrize("powers", [[1, 1], [1, 2], [2, 3]])
def test_normal_crossing_matches_exact_target(powers):
    """nbeta = 30, localization = 1, step_size = 1e-3, 32 chains x 2000 draws after 1000 burn-in steps, float64.

    Exact targets at these hyperparameters: [1,1] 0.325, [1,2] 0.191, [2,3] 0.102 (lambda: 0.5, 0.25, 0.167).
    With localization 1 the target reaches [1,1] 0.41, [1,2] 0.236, [2,3] 0.133 only at nbeta = 1e4, and
    0.44, 0.246, 0.146 at nbeta = 1e6.
    """
    nbeta, gamma = 30.0, 1.0
    model = truth.NormalCrossing(powers, dtype=torch.float64)
    ds = truth.make_normal_crossing_data(2, dtype=torch.float64)
    r = estimate_llc(
        model,
        _loader(ds),
        step_size=1e-3,
        nbeta=nbeta,
        localization=gamma,
        num_chains=32,
        num_draws=2000,
        num_burnin_steps=1000,
        seed=1,
        quiet=True,
    )
    target = truth.localized_normal_crossing_expectation(powers, nbeta, gamma, grid=601)
    assert r.init_loss == 0.0
    assert abs(r.llc_mean - target) / target < 0.15, (r, target)
    # the per-chain spread is consistent with the deviation (no hidden bias far beyond the noise)
    assert abs(r.llc_mean - target) < 3 * r.llc_std / np.sqrt(32) + 0.02 * target


def test_normal_crossing_within_15pct_of_lambda_where_reachable():
    """K = w1^2 w2^4 (lambda = 1/4) against lambda itself: at nbeta = 1e4 (localization 1) the exact target is
    0.236, 5.6% below lambda, and SGLD mixes in a few thousand steps (step_size 2e-4, 32 chains x 2000 draws, every
    2nd step after 2000 burn-in steps). Measured for seeds 1, 2, 3: 0.2405, 0.2568, 0.2504.

    The other two normal crossings of the issue cannot be shown this way: [1,1] and [2,3] reach within 15% of
    lambda only near nbeta = 1e6 (targets 0.44 and 0.146), where [2,3] diverges at step sizes >= 3e-4 and
    undershoots its target by 9% at 1e-4 in 6000 steps, and [1,1] needs step sizes ~1e-6 (millions of steps).
    """
    powers, nbeta = [1, 2], 1e4
    model = truth.NormalCrossing(powers, dtype=torch.float64)
    ds = truth.make_normal_crossing_data(2, dtype=torch.float64)
    r = estimate_llc(
        model,
        _loader(ds),
        step_size=2e-4,
        nbeta=nbeta,
        localization=1.0,
        num_chains=32,
        num_draws=2000,
        num_steps_bw_draws=2,
        num_burnin_steps=2000,
        seed=1,
        quiet=True,
    )
    lam = truth.normal_crossing_learning_coefficient(powers)
    target = truth.localized_normal_crossing_expectation(powers, nbeta, 1.0, grid=1201)
    assert lam == 0.25 and abs(target - lam) / lam < 0.06
    assert abs(r.llc_mean - lam) / lam < 0.15, (r.llc_mean, lam)
    assert abs(r.llc_mean - target) / target < 0.15, (r.llc_mean, target)


@pytest.mark.parametrize("widths, rank", [((4, 3, 8), 0), ((5, 4, 5), 0), ((3, 3, 3, 2), 1)])
def test_deep_linear_network_matches_aoyagi(widths, rank):
    # K(w) = |W_L...W_1 - W*|_F^2 / H_L exactly (orthonormal design, noise-free teacher of the given rank, student
    # initialised at a factorisation of it); nbeta = 100, localization = 1, step_size = 1e-3, 16 chains x 1000
    # draws 2 steps apart after 1000 burn-in steps, float64
    model = truth.DeepLinearNetwork(widths, dtype=torch.float64).set_teacher(rank, seed=2, scale=0.5)
    ds = truth.make_regression_data(model, widths[0], dtype=torch.float64)
    r = estimate_llc(
        model,
        _loader(ds),
        step_size=1e-3,
        nbeta=100.0,
        localization=1.0,
        num_chains=16,
        num_draws=1000,
        num_steps_bw_draws=2,
        num_burnin_steps=1000,
        seed=3,
        quiet=True,
    )
    lam = truth.dln_learning_coefficient(widths, rank)
    assert r.init_loss < 1e-20
    assert abs(r.llc_mean - lam) / lam < 0.15, (r, lam)


def test_demo_writes_plot_and_summary(tmp_path, capsys):
    from pypattern.experiments.llc_demo import run_llc_demo

    out = run_llc_demo(
        tmp_path,
        sizes=(8, 32, 4),
        n=512,
        train_steps=150,
        num_draws=40,
        num_burnin_steps=40,
        batch_size=64,
        quiet=True,
    )
    assert out["llc_mean"] > 0 and np.isfinite(out["llc_std"])
    assert out["train_accuracy"] > 0.6  # 4 classes: chance is about 0.25
    png = open(out["plot"], "rb").read(8)
    assert png.startswith(b"\x89PNG")
    assert "LLC =" in capsys.readouterr().out
    from pypattern.sampling import LLCResult

    assert LLCResult.load(out["result"]).llc_mean == out["llc_mean"]


def _noisy_regression(n=256, batch_size=16):
    """Least-squares fit of a linear model to noisy targets: the loss at w* differs between batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ torch.randn(3, 2, generator=g, dtype=torch.float64) + torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )
    model = torch.nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    ds = torch.utils.data.TensorDataset(x, y)
    return model, torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True), x, y


def test_init_loss_over_the_epoch_and_standard_error_of_the_estimate():
    # L_n(w*) is shared by every chain, so its error is not in the spread over chains. The default reads the
    # whole epoch (exact L_n(w*), init_loss_se 0); from 4 of 16 batches the spread of llc_mean over seeds is
    # several times llc_std / sqrt(chains), and llc_se (which adds nbeta * init_loss_se) predicts it.
    model, loader, x, y = _noisy_regression()
    kw = dict(step_size=1e-3, nbeta=20.0, localization=10.0, num_chains=4, num_draws=100, num_burnin_steps=50)
    kw |= dict(quiet=True, warn_nonstationary=False)
    full = float(((x @ model.weight.detach().T - y) ** 2).mean())
    for k in (4, None):
        runs = [estimate_llc(model, loader, seed=s, num_init_loss_batches=k, **kw) for s in range(12)]
        spread = np.std([r.llc_mean for r in runs], ddof=1)
        se = np.mean([r.llc_se for r in runs])
        chain_se = np.mean([r.llc_std / 2 for r in runs])
        assert 0.5 < spread / se < 2.0, (k, spread, se)
        if k is None:
            for r in runs:
                assert len(r.sample.init_losses) == 16 and r.init_loss_se == 0.0
                assert r.init_loss == pytest.approx(full, rel=1e-12)
                assert r.llc_se == pytest.approx(r.llc_std / 2, rel=1e-12)
        else:
            assert spread > 3 * chain_se, (spread, chain_se)
            for r in runs:
                v = r.sample.init_losses
                expect = v.std(ddof=1) / 2 * np.sqrt(12 / 15)  # 4 of 16 batches, without replacement
                assert len(v) == 4 and r.init_loss_se == pytest.approx(expect, rel=1e-12)
                assert r.llc_se == pytest.approx(np.hypot(r.llc_std / 2, 20.0 * expect), rel=1e-12)


def test_init_loss_batches_default_is_bounded_by_the_run():
    # an epoch longer than half the run's chain-steps is not read whole: the default stops there
    from pypattern.sampling.runner import init_loss_standard_error

    model, loader, _, _ = _noisy_regression(n=1200, batch_size=2)  # 600 batches
    kw = dict(step_size=1e-3, nbeta=20.0, localization=10.0, num_chains=2, seed=0, quiet=True)
    r = estimate_llc(model, loader, num_draws=20, num_burnin_steps=10, warn_nonstationary=False, **kw)
    steps = 2 * (10 + 20) // 2  # chains x steps per chain (10 burn-in + 20 draws) / 2
    assert len(r.sample.init_losses) == steps and r.init_loss_se > 0
    assert r.init_loss_se == pytest.approx(init_loss_standard_error(r.sample.init_losses, 600), rel=1e-12)
    assert init_loss_standard_error([1.0, 2.0], None) == pytest.approx(
        np.std([1.0, 2.0], ddof=1) / np.sqrt(2)
    )
    assert np.isnan(init_loss_standard_error([1.0], 5)) and init_loss_standard_error([1.0], 1) == 0.0
    # a given L_n(w*) is taken as exact
    r = estimate_llc(model, loader, num_draws=5, init_loss=0.5, warn_nonstationary=False, **kw)
    assert r.init_loss_se == 0.0 and r.llc_se == pytest.approx(r.llc_std / np.sqrt(2))


def test_an_estimate_above_half_the_moving_parameters_warns():
    """A stable but too-large step on a 4-parameter regular model overshoots d/2 = 2 (its continuous-time value is
    1.91): the result says so; a small step does not."""
    import warnings

    torch.manual_seed(0)
    n, d = 256, 4
    X = torch.randn(n, d)
    Y = X @ torch.randn(d, 1) + 0.3 * torch.randn(n, 1)
    m = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=n)
    kw = dict(num_chains=4, num_draws=200, num_burnin_steps=50, nbeta=10.0, localization=1.0, quiet=True)
    with pytest.warns(UserWarning, match=r"exceeds d/2 = 2, half the number of moving parameters"):
        r = estimate_llc(m, loader, step_size=0.1, **kw)
    assert r.llc_mean - 3 * r.llc_se > 2
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        r = estimate_llc(m, loader, step_size=1e-3, **kw)
    assert r.llc_mean < 2 and not any("exceeds d/2" in str(w.message) for w in got)


def test_refined_llc_records_the_settings_each_data_set_used():
    """The default nbeta is each data set's own batch size's (m / ln m): config["by_data"] records each."""
    import pypattern as pp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(24, 3)
    y = x.sum(1, keepdim=True)
    train = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    other = [(x[16:20], y[16:20]), (x[20:], y[20:])]
    kw = dict(
        num_chains=2, num_draws=3, step_size=1e-4, localization=100.0, quiet=True, warn_nonstationary=False
    )
    r = pp.refined_llc(model, train, components={"first": ["0.weight", "0.bias"]}, data=other, **kw)
    assert r.config["by_data"] == {
        "train": {"step_size": 1e-4, "nbeta": pytest.approx(8 / math.log(8)), "num_burnin_steps": 0},
        "data": {"step_size": 1e-4, "nbeta": pytest.approx(4 / math.log(4)), "num_burnin_steps": 0},
    }
    assert r.config["nbeta"] == pytest.approx(8 / math.log(8))
