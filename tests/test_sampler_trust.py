"""A given step's checks against known learning coefficients: a step too large for its discretisation bias warns
(StepBiasWarning) and a well-chosen one does not; the too-small check measures curvature where the chains are (a
singular w* is flat); the calibration's settings pass through estimate_llc (auto_step_options)."""

import math
import re
import warnings

import pytest
import torch

import pypattern as pp
from pypattern import truth
from pypattern.sampling import AutoStepError
from pypattern.sampling.diagnostics import NonStationaryWarning, StepBiasWarning, step_bias


def _loader(ds):
    return torch.utils.data.DataLoader(ds, batch_size=len(ds))


def _regular():
    # y = W x, W 2x3 (d = 6, lambda = 3) at a generic W*: every direction has loss curvature 1 (tests/test_llc.py)
    torch.manual_seed(0)
    model = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    return model, _loader(truth.make_regression_data(model, 3, dtype=torch.float64))


def _dln():
    # deep linear network (4, 3, 8) at rank 0: w* = 0, where the loss is flat; lambda = 6 (Aoyagi)
    model = truth.DeepLinearNetwork((4, 3, 8), dtype=torch.float64).set_teacher(0, seed=2, scale=0.5)
    return model, _loader(truth.make_regression_data(model, 4, dtype=torch.float64))


def _run(model, loader, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pp.estimate_llc(model, loader, quiet=True, seed=3, **kw)
    return res, caught


def _bias_in(messages) -> float:
    (m,) = messages
    return float(re.search(r"by about ([+-]?\d+)%", m).group(1)) / 100


def test_step_bias_inverts_the_euler_variance_of_a_quadratic():
    # one direction of curvature c = nbeta h + gamma: the Euler chain's stationary variance is 1 / (c (1 - eps c / 4)),
    # so the estimate nbeta h / 2 * variance is llc_0 / (1 - x) with llc_0 = nbeta h / (2 c), x = eps c / 4
    for nbeta, h, gamma, eps in [(100.0, 1.0, 0.0, 1e-3), (1000.0, 1.0, 1.0, 1e-3), (30.0, 2.0, 10.0, 1e-2)]:
        c = nbeta * h + gamma
        x = eps * c / 4
        # the variance of w_{t+1} = (1 - eps c / 2) w_t + sqrt(eps) xi, at its fixed point
        a = 1 - eps * c / 2
        var = eps / (1 - a * a)
        measured = nbeta * h / 2 * var
        assert step_bias(eps, nbeta, h, measured) == pytest.approx(x / (1 - x), rel=1e-9)
        if gamma == 0:
            assert measured == pytest.approx(0.5 / (1 - x), rel=1e-9)
    assert math.isinf(step_bias(1.0, 1000.0, 1.0, 0.5))  # beyond any stable step
    assert math.isnan(step_bias(1e-3, 100.0, 1.0, -0.1)) and math.isnan(step_bias(1e-3, 100.0, 0.0, 1.0))


def test_a_step_too_large_for_a_regular_model_warns_with_its_bias():
    # nbeta = 1000: eps c / 4 = 0.25 at 1e-3, so the estimate is lambda / (1 - 0.25), +33%
    model, loader = _regular()
    kw = dict(nbeta=1000.0, localization=1.0, num_chains=4, num_draws=200, num_burnin_steps=200)
    res, caught = _run(model, loader, step_size=1e-3, **kw)
    assert res.llc_mean > 1.25 * 3.0
    msgs = [str(w.message) for w in caught if w.category is StepBiasWarning]
    assert len(msgs) == 1 and "step_size=0.001 is too large" in msgs[0]
    assert "step_size='auto'" in msgs[0] and "smaller step_size" in msgs[0]
    # the advice fits devinterp-style calls too, which take the step as lr and have no automatic step
    assert "lr in devinterp-style calls" in msgs[0] and "leave the step out)" not in msgs[0]
    # its estimate is the bias measured against the truth
    assert _bias_in(msgs) == pytest.approx(res.llc_mean / 3.0 - 1, abs=0.05)
    # a tenth of the step: 2.5% bias, silent, and the estimate is right
    res, caught = _run(model, loader, step_size=1e-4, **kw)
    assert abs(res.llc_mean - 3.0) / 3.0 < 0.1
    assert not [w for w in caught if w.category is StepBiasWarning]


def test_a_step_too_large_for_a_singular_model_warns_and_a_good_one_is_silent():
    # at w* = 0 the curvature is zero: the bias is read where the chains are. Measured: 0.01 gives +27%, the
    # warning says about +20%; 1e-3 gives the truth within 3%
    model, loader = _dln()
    kw = dict(
        nbeta=100.0, localization=1.0, num_chains=8, num_draws=500, num_steps_bw_draws=2, num_burnin_steps=500
    )
    res, caught = _run(model, loader, step_size=1e-2, **kw)
    assert res.llc_mean > 1.15 * 6.0
    msgs = [str(w.message) for w in caught if w.category is StepBiasWarning]
    assert len(msgs) == 1 and 0.1 < _bias_in(msgs) < 2 * (res.llc_mean / 6.0 - 1)
    # 1e-3 over 2,000 steps: no bias warning, and no shortfall warning either (the chains relax at the curvature
    # where they go, not at w*'s, which is zero)
    model, loader = _dln()
    res, caught = _run(model, loader, step_size=1e-3, **dict(kw, num_draws=1000, num_burnin_steps=1000))
    assert abs(res.llc_mean - 6.0) / 6.0 < 0.1
    assert not [w for w in caught if issubclass(w.category, (StepBiasWarning, NonStationaryWarning))], [
        str(w.message) for w in caught
    ]


def test_the_bias_check_is_off_with_warn_nonstationary_false():
    model, loader = _regular()
    _, caught = _run(
        model, loader, step_size=1e-3, nbeta=1000.0, localization=1.0, num_draws=100, warn_nonstationary=False
    )
    assert not [w for w in caught if w.category is StepBiasWarning]


def test_auto_step_options_reach_the_calibration():
    model, loader = _regular()
    res = pp.estimate_llc(
        model,
        loader,
        nbeta=1000.0,
        localization=1.0,
        num_chains=4,
        num_draws=100,
        quiet=True,
        warn_nonstationary=False,
        # max_burnin_factor 1: the run's burn-in is the draws' 100 steps, not the 40 x 100 its chosen step's
        # flattest direction would take (the run's cost; the trials do not depend on it)
        auto_step_options={"calibration_steps": 64, "max_step_size": 0.004, "max_burnin_factor": 1},
    )
    settings = res.sample.config["auto_step"]["settings"]
    assert settings["calibration_steps"] == 64 and settings["max_step_size"] == 0.004
    assert settings["max_burnin_factor"] == 1 and res.sample.config["num_burnin_steps"] == 100
    trials = res.sample.config["auto_step"]["trials"]
    assert trials[0]["step_size"] == 0.004 and min(t["num_steps"] for t in trials) >= 32
    with pytest.raises(ValueError, match=r"auto_step_options: unknown setting\(s\) \['calibration_step'\]"):
        pp.estimate_llc(model, loader, quiet=True, auto_step_options={"calibration_step": 400})
    with pytest.raises(ValueError, match="a step size is given"):
        pp.estimate_llc(
            model, loader, step_size=1e-4, quiet=True, auto_step_options={"calibration_steps": 400}
        )
    with pytest.raises(TypeError, match="auto_step_options must be a dict"):
        pp.estimate_llc(model, loader, quiet=True, auto_step_options=400)


def test_auto_step_error_says_which_argument_to_change():
    # a grid of steps too small to relax in any trial: the refusal names auto_step_options and the value to try
    model, loader = _regular()
    with pytest.raises(AutoStepError) as e:
        pp.estimate_llc(
            model,
            loader,
            nbeta=1000.0,
            localization=1.0,
            num_chains=4,
            num_draws=50,
            quiet=True,
            auto_step_options={"calibration_steps": 32, "max_step_size": 2e-7, "min_step_size": 1e-7},
        )
    assert "auto_step_options={'calibration_steps': 64}" in str(e.value)


def _regression():
    # tests/test_diagnostics_review.py's regression (d = 10 at its least-squares minimum; exact target 4.84 at
    # localization 1 and the default nbeta of batch 64)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(512, 10, generator=g, dtype=torch.float64)
    w = torch.randn(10, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(512, generator=g, dtype=torch.float64)).unsqueeze(1)
    model = torch.nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution[:, 0].float()[None])
    ds = torch.utils.data.TensorDataset(x.float(), y.float())
    return model, torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)


def test_rmsprop_sgld_with_a_tiny_step_warns_of_its_shortfall():
    # 1e-6: the estimate is 0.1 of 4.84 with R-hat 1.0 and ESS ~1000 (minibatch noise); even at the largest
    # preconditioner (1 / eps = 10) its chains relax 0.03 times: warned. 1e-2 relaxes: no shortfall warning
    model, loader = _regression()
    res, caught = _run(model, loader, step_size=1e-6, localization=1.0, sampler="rmsprop_sgld")
    assert res.llc_mean < 0.1 * 4.84 and res.r_hat < 1.1
    assert [w for w in caught if "step_size=1e-06 is too small" in str(w.message)]
    res, caught = _run(model, loader, step_size=1e-2, localization=1.0, sampler="rmsprop_sgld")
    assert res.llc_mean > 4.84 * 0.9
    assert not [w for w in caught if "too small" in str(w.message)]
