"""Runs that sample nothing are refused, auto_step_options reaches every calibration, the drift check on the
distance from w*, and the default loss's float64 sums."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pypattern as pp
import pypattern.susceptibility as sus
from pypattern import truth
from pypattern.losses import batch_loss
from pypattern.sampling import llc_from_sample
from pypattern.sampling.auto import AutoStepReport
from pypattern.sampling.runner import default_loss_fn


def _loader(ds, batch_size=None):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size or len(ds))


def _regression():
    model = truth.DeepLinearNetwork((6, 3))
    model.set_teacher(
        3, seed=1
    )  # a full-rank linear map: a regular model, stationary even without localization
    return model, _loader(truth.make_regression_data(model, 6))


# ---------------------------------------------------------------------------------------------------------------
# nothing ran
# ---------------------------------------------------------------------------------------------------------------
def test_empty_chains_is_refused_before_any_work():
    model, loader = _regression()
    for fn in (pp.sample, pp.estimate_llc):
        with pytest.raises(ValueError, match="chains is empty"):
            fn(model, loader, chains=[], step_size=1e-3, num_draws=4, quiet=True)
    # with the step calibrated too: refused before the calibration's trials (which would take seconds)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pypattern.sampling.runner.resolve_step_size", lambda *a, **k: calls.append(1))
        with pytest.raises(ValueError, match="chains is empty"):
            pp.sample(model, loader, chains=(), num_draws=4, quiet=True)
    assert not calls
    with pytest.raises(TypeError, match="chains"):
        pp.sample(model, loader, chains=[0.5], step_size=1e-3, num_draws=4, quiet=True)


def test_an_llc_of_a_run_none_of_whose_chains_ran_is_refused():
    model, loader = _regression()
    kw = dict(step_size=1e-3, num_chains=2, num_draws=8, quiet=True, warn_nonstationary=False)
    runs = [("layers.0.weight", None), ("layers.0.weight", {"layers.0.weight": torch.eye(3, 6) > 0})]
    out = pp.sample(model, loader, runs=runs, chains=[0, 1], **kw)  # run 1's chains (2 and 3) left out
    assert np.isfinite(out[0].loss_trace).all() and np.isnan(out[1].loss_trace).all()
    assert np.isfinite(llc_from_sample(out[0]).llc_mean)
    with pytest.raises(ValueError, match="none of its 2 chains ran"):
        llc_from_sample(out[1])
    with pytest.raises(ValueError, match="none of its 2 chains ran"):
        pp.estimate_llc(model, loader, runs=runs, chains=[0, 1], **kw)


# ---------------------------------------------------------------------------------------------------------------
# auto_step_options in susceptibilities and bif
# ---------------------------------------------------------------------------------------------------------------
def _fake_calibration(seen):
    def resolve(model, loader, **kwargs):
        seen.append(kwargs)
        trial = dict(step_size=[1e-4], num_steps=[60], llc=[1.0], se=[0.1], r_hat=[1.0], verdict=["ok"])
        return 1e-4, AutoStepReport(**trial, chosen=1e-4, reason="a fixed step")

    return resolve


@pytest.mark.parametrize("fn", ["susceptibilities", "bif"])
def test_auto_step_options_reach_the_calibration(fn, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    loader = _loader(torch.utils.data.TensorDataset(x, y), 8)
    args = (model, loader, (x[:4], y[:4])) + ((["0.weight"],) if fn == "susceptibilities" else ())
    seen: list = []
    monkeypatch.setattr(sus, "resolve_step_size", _fake_calibration(seen))
    kw = dict(num_chains=2, num_draws=4, quiet=True, warn_nonstationary=False, localization=10.0)
    res = getattr(pp, fn)(*args, auto_step_options={"calibration_steps": 60, "max_step_size": 1e-3}, **kw)
    assert seen[-1]["calibration_steps"] == 60 and seen[-1]["max_step_size"] == 1e-3
    assert res.settings["step_size"] == 1e-4 and res.settings["auto_step"]["chosen"] == 1e-4
    assert "auto_step_options" not in res.settings
    # checked as sample() checks them: a given step, an unknown setting, not a mapping
    with pytest.raises(ValueError, match="auto_step_options=.* a step size is given"):
        getattr(pp, fn)(*args, auto_step_options={"calibration_steps": 60}, step_size=1e-3, **kw)
    with pytest.raises(ValueError, match=r"auto_step_options: unknown setting\(s\) \['bogus'\]"):
        getattr(pp, fn)(*args, auto_step_options={"bogus": 1}, **kw)
    with pytest.raises(TypeError, match="auto_step_options must be a dict"):
        getattr(pp, fn)(*args, auto_step_options=3, **kw)
    assert len(seen) == 1  # none of the refused calls calibrated


# ---------------------------------------------------------------------------------------------------------------
# drift away from w*
# ---------------------------------------------------------------------------------------------------------------
def test_drift_statistic_against_brownian_and_stationary_traces():
    from pypattern.sampling.diagnostics import DriftWarning, check_drift, drift_statistic

    rng = np.random.default_rng(0)
    C, N, d = 4, 200, 6
    # chains diffusing freely in d dimensions after a burn-in as long as the draws: |w|^2 grows linearly
    walk = np.cumsum(rng.standard_normal((C, 2 * N, d)), axis=1)[:, N:]
    brown = (walk**2).sum(-1)
    ratio, z = drift_statistic(brown)
    t1, t4 = np.arange(N, N + N // 4).mean(), np.arange(2 * N - N // 4, 2 * N).mean()
    assert ratio == pytest.approx((t4 + 1) / (t1 + 1), rel=0.35)  # E|w_t|^2 = d t
    with pytest.warns(DriftWarning, match="localization=0 nothing holds them near w"):
        assert not check_drift(brown, localization=0.0, step_size=1e-3)
    # stationary chains (AR(1) in d dimensions, correlation time 10 draws): no warning, over 50 seeds
    fired = 0
    for seed in range(50):
        g = np.random.default_rng(seed)
        x = np.zeros((C, N, d))
        x[:, 0] = g.standard_normal((C, d))
        for t in range(1, N):
            x[:, t] = 0.9 * x[:, t - 1] + np.sqrt(1 - 0.81) * g.standard_normal((C, d))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fired += not check_drift((x**2).sum(-1), localization=0.0, step_size=1e-3)
    assert fired == 0
    assert drift_statistic(np.zeros((4, 40))) is None  # chains that never moved: nothing to judge
    assert drift_statistic(np.full((4, 40), np.nan)) is None


def _drift_warnings(model, loader, **kw):
    from pypattern.sampling.diagnostics import DriftWarning

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pp.estimate_llc(model, loader, quiet=True, **kw)
    return [x for x in w if issubclass(x.category, DriftWarning)]


def test_unlocalized_normal_crossing_at_the_calibrated_step_warns_of_drift():
    model = truth.NormalCrossing([1, 2])
    loader = _loader(truth.make_normal_crossing_data(2))
    # seed 3: its step 3.1e-3 (the chains' |w|^2 grew 2.4-fold, z = 16); the drift of this model is heavy-tailed
    # (excursions along its arms), and of six seeds the check fired on three at 16 chains x 400 draws
    w = _drift_warnings(model, loader, localization=0.0, num_chains=16, num_draws=400, seed=3)
    assert w and "localization=0" in str(w[0].message) and "localization=100" in str(w[0].message)


def test_unlocalized_deep_linear_network_warns_and_a_regular_model_does_not():
    # a given step, with as much burn-in as the draws take (the calibrated runs' share; checked then too)
    kw = dict(localization=0.0, nbeta=100.0, num_draws=200, num_burnin_steps=200, step_size=7.8e-4)
    dln = truth.DeepLinearNetwork((4, 3, 8)).set_teacher(0, seed=2, scale=0.5)
    w = _drift_warnings(dln, _loader(truth.make_regression_data(dln, 4)), seed=0, **kw)
    assert w and "grew" in str(w[0].message)
    # a regular model's posterior is confined without localization: its chains are stationary
    model, loader = _regression()
    assert not any(_drift_warnings(model, loader, seed=s, **{**kw, "step_size": 1.6e-3}) for s in range(5))
    # without burn-in the draws' distance rises as the chains relax from w*: not checked
    assert not _drift_warnings(
        dln, _loader(truth.make_regression_data(dln, 4)), seed=0, **{**kw, "num_burnin_steps": 0}
    )


# ---------------------------------------------------------------------------------------------------------------
# the default loss sums in float64
# ---------------------------------------------------------------------------------------------------------------
def test_default_loss_sums_in_float64_so_large_nbeta_keeps_its_digits():
    model, ds = truth.make_teacher_task(sizes=(16, 64, 10), n=2048, seed=0)
    truth.train(model, ds, steps=200)
    m64 = copy.deepcopy(model).double()
    errors_new, errors_old = [], []
    with torch.no_grad():
        for x, y in _loader(ds, 128):
            exact = float(F.cross_entropy(m64(x.double()), y))
            new = default_loss_fn(model, (x, y))
            assert new.dtype == torch.float64
            # the float64 mean of the float32 per-sample losses (an independent computation)
            per_sample = F.cross_entropy(model(x), y, reduction="none").double()
            assert float(new) == pytest.approx(float(per_sample.mean()), rel=1e-15)
            errors_new.append(float(new) - exact)
            errors_old.append(float(batch_loss(model, (x, y))) - exact)
    # L(w*) over an epoch of 16 batches: its error times nbeta = 1e7 shifts every draw's LLC
    assert abs(1e7 * np.mean(errors_new)) < 0.05
    assert np.sqrt(np.mean(np.square(errors_new))) < 0.5 * np.sqrt(np.mean(np.square(errors_old)))
    # the gradient is the float32 mean's
    x, y = ds.tensors[0][:128], ds.tensors[1][:128]
    g_new = torch.autograd.grad(default_loss_fn(model, (x, y)), list(model.parameters()))
    g_old = torch.autograd.grad(batch_loss(model, (x, y)), list(model.parameters()))
    for a, b in zip(g_new, g_old):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_step_susceptibilities_calibrated_is_not_checked_as_a_given_one():
    """bif and susceptibilities calibrate one step for all their runs and run sample() at it: those runs are at a
    calibrated step, so the given-step checks (StepBiasWarning, the shortfall) do not judge it, as estimate_llc's
    own automatic step is not judged; inside step_calibrated_by_caller a plain sample() call at a number is taken
    as calibrated the same way."""
    import warnings

    import pypattern as pp
    from pypattern import truth
    from pypattern.sampling.diagnostics import StepBiasWarning
    from pypattern.sampling.runner import _STEP_CALIBRATED_BY_CALLER, step_calibrated_by_caller

    torch.manual_seed(0)
    mlp, data = truth.make_teacher_task((8, 32, 4), n=512, seed=0)
    truth.train(mlp, data, steps=150, batch_size=64, lr=3e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    x, y = data.tensors
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pp.bif(mlp, loader, (x[:8], y[:8]), num_chains=2, num_draws=40, localization=100.0, quiet=True)
    assert not [m for m in w if issubclass(m.category, StepBiasWarning)], [str(m.message) for m in w]
    assert not _STEP_CALIBRATED_BY_CALLER.get()
    with step_calibrated_by_caller():
        assert _STEP_CALIBRATED_BY_CALLER.get()
    assert not _STEP_CALIBRATED_BY_CALLER.get()
