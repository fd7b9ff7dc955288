"""step_size="auto" with the default call on a linear regression at its least-squares minimum, whose LLC is known
exactly: the loss is quadratic, so under ``exp(-nbeta L_n)`` (no localization) ``nbeta (E[L_n] - L_n(w*)) = d / 2``
whatever the curvature. Scaling the loss by 100 or nbeta by 10 multiplies the curvature the sampler sees: the
chosen step scales inversely (within the grid's factor 2) and the estimate stays on d / 2."""

import math
import warnings

import pytest
import torch
from torch import nn

from pypattern.sampling import StepBiasWarning, estimate_llc, resolve_step_size

N, DIN, DOUT = 512, 5, 3
D = (DIN + 1) * DOUT  # weights and biases: lambda = d / 2 = 9


def _regression(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIN, generator=g, dtype=torch.float64)
    y = x @ torch.randn(DOUT, DIN, generator=g, dtype=torch.float64).T
    y = y + 0.5 * torch.randn(N, DOUT, generator=g, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, y).solution  # the least-squares minimum, (DIN + 1, DOUT)
    model = nn.Linear(DIN, DOUT).to(dtype)
    with torch.no_grad():
        model.weight.copy_(sol[:DIN].T)
        model.bias.copy_(sol[DIN])
    ds = torch.utils.data.TensorDataset(x.to(dtype), y.to(dtype))
    return model, torch.utils.data.DataLoader(ds, batch_size=N)


def _mse_times_100(model, batch):
    return 100 * torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def _default_call(model, loader, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default run (4 x 200 draws) is short: R-hat warnings
        return estimate_llc(model, loader, seed=0, quiet=True, **kw)


def test_report_names_the_default_nbeta_the_trials_ran_at():
    model, loader = _regression()
    # short trials (16 steps, no longer ones): what is checked is the report's settings, not the chosen step
    _, rep = resolve_step_size(
        model,
        loader,
        seed=0,
        calibration_chains=4,
        calibration_steps=16,
        max_trial_factor=1,
        run_trial_factor=1,
    )
    # no nbeta given: the trials ran at m / ln m, and the report says so instead of None
    assert rep.settings["nbeta"] == pytest.approx(N / math.log(N))


def test_chosen_step_scales_with_the_loss_and_nbeta_and_the_estimate_stays_on_d_over_2():
    model, loader = _regression()
    base = _default_call(model, loader)
    loss100 = _default_call(model, loader, loss_fn=_mse_times_100)
    nb10 = _default_call(model, loader, nbeta=10 * N / math.log(N))
    steps = {
        k: r.sample.config["step_size"] for k, r in (("base", base), ("loss100", loss100), ("nb10", nb10))
    }
    # curvature x100 and x10: the step shrinks as much, up to the grid's ratio 2 either way
    assert steps["base"] / 200 <= steps["loss100"] <= steps["base"] / 50, steps
    assert steps["base"] / 20 <= steps["nb10"] <= steps["base"] / 5, steps
    for name, r in (("base", base), ("loss100", loss100), ("nb10", nb10)):
        auto = r.sample.config["auto_step"]
        assert auto["chosen"] == steps[name] and "largest healthy step" in auto["reason"]
        assert auto["settings"]["nbeta"] == pytest.approx(r.sample.config["nbeta"])
        # the exact LLC d / 2, within three standard errors plus the step's own reported bias
        assert abs(r.llc_mean - D / 2) <= 3 * r.llc_se + abs(auto["bias"]), (name, r.llc_mean, r.llc_se)


def test_float32_and_float64_models_choose_the_same_step():
    a = _default_call(*_regression(torch.float32))
    b = _default_call(*_regression(torch.float64))
    assert a.sample.config["step_size"] == b.sample.config["step_size"]
    assert a.llc_mean == pytest.approx(b.llc_mean, rel=1e-3)


def _w1w2_target(nbeta, gamma):
    # K = w1^2 w2^2: given w2, w1 is Gaussian with precision 2 nbeta w2^2 + gamma (see
    # tests/test_llc_trust_known_coefficients.py): E[nbeta K] by a one-dimensional integral over w2
    w2 = torch.linspace(0, 12 / math.sqrt(gamma), 200_001, dtype=torch.float64)
    prec = 2 * nbeta * w2**2 + gamma
    dens = torch.exp(-0.5 * gamma * w2**2) / torch.sqrt(prec)
    return float(torch.trapezoid(dens * nbeta * w2**2 / prec, w2) / torch.trapezoid(dens, w2))


def _w1w2(seed, nbeta):
    from pypattern import truth

    model = truth.NormalCrossing([1, 1], dtype=torch.float64)
    loader = torch.utils.data.DataLoader(
        truth.make_normal_crossing_data(2, dtype=torch.float64), batch_size=2
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = estimate_llc(model, loader, nbeta=nbeta, localization=1.0, seed=seed, quiet=True)
    return r, [w for w in caught if issubclass(w.category, StepBiasWarning)]


def test_a_coupled_pair_too_noisy_to_resolve_rtol_warns():
    target = _w1w2_target(100.0, 1.0)  # 0.354
    # seed 2: the pair 0.025 / 0.0125 changes by 0.017 with a standard error of 0.15 (24% of the estimate, beyond
    # rtol = 10%): accepted by the rule, and the run at 0.0125 is more than rtol above the exact value
    r, bias = _w1w2(2, 100.0)
    auto = r.sample.config["auto_step"]
    assert r.llc_mean > 1.1 * target, (r.llc_mean, target)
    assert len(bias) == 1 and "cannot resolve a bias of 10%" in str(bias[0].message)
    assert "cannot resolve" in auto["reason"]
    # seeds whose pair resolves rtol: no such warning, and the estimate is on the exact value
    for seed in (0, 1):
        r, bias = _w1w2(seed, 100.0)
        assert not bias and "cannot resolve" not in r.sample.config["auto_step"]["reason"]
        assert abs(r.llc_mean - target) <= 3 * r.llc_se, (seed, r.llc_mean, r.llc_se, target)
