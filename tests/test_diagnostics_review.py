"""Diagnostics of runs whose estimate is off without R-hat or ESS showing it: a given step too small to relax from
w* (minibatch noise makes the trace look stationary), a calibrated step whose trials were short for the flattest
directions, a w* that is not a minimum under step_size="auto", and a joint calibration blocked by one run."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pypattern as pp
from pypattern import truth
from pypattern.sampling import AutoStepError, resolve_step_size
from pypattern.sampling.diagnostics import NonStationaryWarning


def _regression(d=10, n=512, seed=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).unsqueeze(1)
    what = torch.linalg.lstsq(x, y).solution[:, 0]
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(what.float()[None])
    return model, x.float(), y.float()


def _run(model, loader, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pp.estimate_llc(model, loader, quiet=True, seed=0, **kw)
    return res, [str(w.message) for w in caught if issubclass(w.category, NonStationaryWarning)]


@pytest.mark.parametrize("step", [1e-5, 1e-6])
def test_given_step_too_small_with_minibatches_warns(step):
    # exact target 4.84; at these steps the estimate is 0.16 and 0.017 with R-hat ~1.0 and ESS ~1000
    model, x, y = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    res, msgs = _run(model, loader, step_size=step, localization=1.0)
    assert res.r_hat < 1.1 and res.ess > 100 and res.llc_mean < 0.5
    too_small = [m for m in msgs if "too small for this run" in m]
    assert len(too_small) == 1, msgs
    m = too_small[0]
    assert (
        f"step_size={step:g}" in m
        and "a typical direction" in m
        and "fall short of their stationary value" in m
    )
    assert "larger step_size" in m and "step_size='auto'" in m and "num_draws" in m
    # the model is left at w*
    assert torch.allclose(
        model.weight.detach().double(),
        torch.linalg.lstsq(x.double(), y.double()).solution.T.float().double(),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("step", "localization", "batch_size"), [(1e-2, 1.0, 64), (1e-2, 100.0, 64), (3e-3, 100.0, 512)]
)
def test_given_step_that_relaxes_does_not_warn(step, localization, batch_size):
    model, x, y = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    res, msgs = _run(model, loader, step_size=step, localization=localization)
    assert msgs == [], msgs
    assert res.llc_mean > 1.0


def test_given_step_check_off_with_warn_nonstationary_false():
    model, x, y = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    _, msgs = _run(model, loader, step_size=1e-6, localization=1.0, warn_nonstationary=False)
    assert msgs == []


def test_auto_step_whose_trials_did_not_relax_the_flattest_directions_warns():
    # deep linear network (2,3,3,2), rank 1 (lambda 2), nbeta 1000, localization 1: the calibrated step's trials
    # cover 0.08 relaxation times of the flattest direction, and the estimate is low (1.7-1.8 against ~2.3 after the
    # default burn-in of 8000 steps)
    widths = (2, 3, 3, 2)
    model = truth.DeepLinearNetwork(widths, dtype=torch.float64).set_teacher(1, seed=2, scale=1.0)
    ds = truth.make_regression_data(model, widths[0], dtype=torch.float64)
    loader = DataLoader(ds, batch_size=len(ds))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pp.estimate_llc(
            model, loader, nbeta=1000.0, localization=1.0, num_chains=4, num_draws=200, quiet=True, seed=2,
            auto_step_options={"max_burnin_factor": 2},
        )  # fmt: skip
    auto = res.sample.config["auto_step"]
    assert "may not have relaxed" in auto["reason"]
    # the run's burn-in for 3 relaxation times of the flattest direction (eps * localization / 2 per step) is
    # capped at max_burnin_factor (2 here; the default 40 takes 8000 steps, the run's cost, with the same trials:
    # tests/test_llc_auto_burnin.py checks it) times the draws' steps: warned, naming both
    need = math.ceil(2 * 3 / (auto["chosen"] * 1.0))
    assert auto["burnin"]["needed"] == need and auto["burnin"]["capped"]
    assert res.sample.config["num_burnin_steps"] == auto["burnin"]["cap"] == 2 * 200
    flat = [str(w.message) for w in caught if "its flattest direction needs to relax" in str(w.message)]
    assert len(flat) == 1
    assert f"burn-in of 400 steps is shorter than the {need}" in flat[0] and "chose 9.77e-05" in flat[0]
    assert "num_burnin_steps" in flat[0] and "larger localization" in flat[0]


def test_auto_step_that_relaxed_does_not_warn_about_flat_directions():
    model, x, y = _regression(d=5, n=256, seed=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pp.estimate_llc(model, loader, localization=100.0, quiet=True, seed=0)
    assert "may not have relaxed" not in res.sample.config["auto_step"]["reason"]
    assert not [w for w in caught if "flattest directions" in str(w.message)]


def test_auto_step_at_a_point_that_is_not_a_minimum_says_so():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = (
        x @ torch.randn(3, generator=g, dtype=torch.float64)
        + 0.5 * torch.randn(64, generator=g, dtype=torch.float64)
    )[:, None]
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + 0.3)  # off the least-squares minimum
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    with pytest.raises(AutoStepError) as err:
        pp.susceptibilities(
            model,
            loader,
            (x[:8], y[:8]),
            {"all": ["weight"]},
            num_chains=4,
            num_draws=200,
            localization=20.0,
            seed=1,
            quiet=True,
        )
    msg = str(err.value)
    assert "negative LLC" in msg and "w* is not a local minimum" in msg and "Train the model further" in msg
    assert "give a step_size" in msg


def test_auto_step_failure_at_a_minimum_does_not_blame_w_star():
    # a calibration that fails for another reason (one run mixes too slowly) does not claim w* is off a minimum
    model = truth.DeepLinearNetwork((3, 4, 5), dtype=torch.float64).set_teacher(3, seed=2, scale=1.0)
    loader = DataLoader(truth.make_regression_data(model, 3, dtype=torch.float64), batch_size=10_000)
    with pytest.raises(AutoStepError) as err:
        resolve_step_size(
            model,
            loader,
            nbeta=1000.0,
            localization=1.0,
            seed=0,
            max_trial_factor=2,
            min_step_size=1e-5,
            max_step_size=1e-3,
            runs=[(["layers.0.weight"], None), (["layers.1.weight"], None)],
        )
    msg = str(err.value)
    assert "not a local minimum" not in msg
    # the joint trials are judged by their worst run: the message names it and says to calibrate it on its own
    assert "run 1 (moving ['layers.1.weight'])" in msg and "blocks the calibration" in msg
    assert "Calibrate that run on its own" in msg
    assert err.value.report.chosen is None


def test_auto_step_on_a_regular_model_does_not_warn_about_flat_directions():
    # d = 10 regression at nbeta 1000, localization 1: the flattest direction's bound (eps * 1 * steps / 2) is
    # far below 1, but every direction is stiff against the localization (the estimate is about d / 2)
    model, x, y = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pp.estimate_llc(model, loader, nbeta=1000.0, localization=1.0, quiet=True, seed=0)
    assert "may not have relaxed" in res.sample.config["auto_step"]["reason"]
    assert res.llc_mean > 4.5
    # neither the calibration's warning ("flattest directions") nor a capped burn-in's ("flattest direction needs")
    assert not [w for w in caught if "flattest direction" in str(w.message)]


def test_a_given_step_relaxing_a_few_times_only_warns_and_a_relaxed_run_does_not():
    """Minibatch SGLD whose chains relax only a few times over the run: the estimate is 30-60% short of a long
    run's while R-hat and the effective sample size look healthy; the run says so. A run covering many
    relaxation times does not."""
    torch.manual_seed(0)
    m, ds = truth.make_teacher_task((8, 32, 4), n=512, seed=0)
    truth.train(m, ds, steps=150, batch_size=64, lr=3e-3)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    kw = dict(localization=100.0, num_chains=4, quiet=True, seed=0)
    with pytest.warns(NonStationaryWarning, match="too small for this run") as rec:
        short = pp.estimate_llc(m, loader, step_size=4e-4, num_draws=200, **kw)
    assert any("fall short of their stationary value" in str(w.message) for w in rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonStationaryWarning)
        long = pp.estimate_llc(m, loader, step_size=1.5625e-3, num_draws=400, num_burnin_steps=400, **kw)
    assert short.llc_mean < 0.85 * long.llc_mean
