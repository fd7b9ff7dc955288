"""The burn-in of the estimators that calibrate a step (step_size="auto") when none is given: estimate_llc's rule
(pypattern.sampling.auto.burnin_for_run on the run's own calibration, at least the burn-in the calibration judged
the step with) in susceptibilities, bif, refined_llc and distributed.estimate_llc, recomputed here from the recorded
chosen step and localization; a given burn-in is kept; chi of a quadratic model at the default burn-in is its
closed form (the exact Gaussian law of the discrete chain)."""

import math
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypattern as pp
from pypattern import distributed

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.StepBiasWarning"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning"),
    pytest.mark.filterwarnings("ignore:.*discretisation bias:UserWarning"),
]

D, N = 4, 32
NBETA, GAMMA = 10.0, 1.0  # a weak localization: the flattest direction relaxes slowly
OPTIONS = {"calibration_steps": 100}
# the scan from 0.025 (0.1 diverges and 0.05 changes when halved on this regression): the same chosen step 6.25e-3
# and burn-in (960) as OPTIONS for bif, refined_llc and estimate_llc, with 5-6 trials instead of 20-21
SHORT_SCAN = {**OPTIONS, "max_step_size": 0.025}


def _linear(seed=1):
    """A float64 linear regression at its least-squares optimum (a minimum of the loss: the calibration's LLC
    trials stay positive however weak the localization)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        N, generator=g, dtype=torch.float64
    )
    y = y[:, None]
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():  # (rounded: the last bit of lstsq's solution differs between processes)
        model.weight.copy_(torch.round(torch.linalg.lstsq(x, y).solution.T, decimals=10))
    return model, x, y


def _expected_burnin(auto: dict, num_draws: int, every: int = 1) -> int:
    """The burn-in recomputed from a calibration's record: 3 relaxation times of the flattest direction at
    ``eps * localization / 2`` per step, at least the draws' steps, at most 40 times them, and no shorter than half
    the shortest trial at the chosen step (at most half of ``calibration_steps``)."""
    eps, gamma = (
        auto["chosen"],
        auto["settings"]["localization"] + (auto["settings"].get("weight_decay") or 0.0),
    )
    draws = num_draws * every
    steps = max(draws, min(math.ceil(2 * 3 / (eps * gamma)), 40 * draws))
    trials = [t["num_steps"] for t in auto["trials"] if t["step_size"] == eps]
    trial = min([*trials, auto["settings"]["calibration_steps"]]) // 2
    return max(steps, trial)


def _law(xn, yn, w_star, eps):
    """Mean and covariance of the stationary law of SGLD with step ``eps`` on the energy
    ``nβ L(w) + γ/2 |w - w*|²`` (quadratic: exactly Gaussian)."""
    d = len(w_star)
    P = 2 * NBETA * xn.T @ xn / N + GAMMA * np.eye(d)
    h = 2 * NBETA * xn.T @ yn / N + GAMMA * w_star
    return np.linalg.solve(P, h), np.linalg.inv(P - eps * P @ P / 4)


def _cov(A, a, B, b, m, S):
    """Cov(wᵀAw + aᵀw, wᵀBw + bᵀw) for w ~ N(m, S) (Isserlis)."""
    return 2 * np.trace(A @ S @ B @ S) + (2 * A @ m + a) @ S @ (2 * B @ m + b)


def test_susceptibilities_burn_in_by_the_relaxation_rule_and_chi_is_its_closed_form():
    model, x, y = _linear()
    run = dict(num_chains=8, num_draws=200, nbeta=NBETA, localization=GAMMA, seed=3, batched=True, quiet=True)
    res = pp.susceptibilities(model, [(x, y)], (x[:6], y[:6]), ["weight"], auto_step_options=OPTIONS, **run)
    auto = res.settings["auto_step"]
    want = _expected_burnin(auto, 200)
    assert want > 200  # longer than the draws' steps (the burn-in the rule replaces)
    assert res.settings["num_burnin_steps"] == want
    assert auto["burnin"]["num_burnin_steps"] == want and not auto["burnin"]["capped"]
    # chi = -nβ Cov(phi, l_z - Lbar) under the exact law at the chosen step
    xn, yn = x.numpy(), y.numpy()[:, 0]
    m, S = _law(xn, yn, model.weight.detach().numpy()[0].copy(), auto["chosen"])
    phi = (xn.T @ xn / N, -2 * xn.T @ yn / N)
    terms = [(np.outer(xn[i], xn[i]), -2 * yn[i] * xn[i]) for i in range(6)]
    A_bar, a_bar = sum(t[0] for t in terms) / 6, sum(t[1] for t in terms) / 6
    exact = np.array([-NBETA * _cov(*phi, A - A_bar, a - a_bar, m, S) for A, a in terms])
    assert np.all(np.abs(res.chi[0] - exact) < 4 * res.chi_se[0]), (res.chi[0], exact, res.chi_se[0])
    # the settings (the calibration's record among them) run the same chains again: the burn-in and the step
    # given, nothing calibrated
    again = pp.susceptibilities(model, [(x, y)], (x[:6], y[:6]), ["weight"], **res.settings)
    assert again.settings["num_burnin_steps"] == want and "auto_step" not in again.settings
    np.testing.assert_array_equal(again.chi, res.chi)


def test_bif_burns_in_by_the_rule_and_a_given_burn_in_is_kept():
    model, x, y = _linear()
    run = dict(num_chains=4, num_draws=50, nbeta=NBETA, localization=GAMMA, seed=0, quiet=True)
    res = pp.bif(model, [(x, y)], (x[:3], y[:3]), auto_step_options=SHORT_SCAN, **run)
    auto = res.settings["auto_step"]
    assert (
        res.settings["num_burnin_steps"] == auto["burnin"]["num_burnin_steps"] == _expected_burnin(auto, 50)
    )
    assert res.settings["num_burnin_steps"] > 50
    ruled = pp.bif(
        model, [(x, y)], (x[:3], y[:3]), num_burnin_steps="auto", auto_step_options=SHORT_SCAN, **run
    )
    np.testing.assert_array_equal(ruled.bif, res.bif)  # "auto" is the default rule
    kept = pp.bif(model, [(x, y)], (x[:3], y[:3]), num_burnin_steps=7, auto_step_options=SHORT_SCAN, **run)
    assert kept.settings["num_burnin_steps"] == 7 and kept.settings["auto_step"]["burnin"] == {}
    with pytest.raises(ValueError, match=r"num_burnin_steps='long' is not valid"):
        pp.bif(model, [(x, y)], (x[:3], y[:3]), num_burnin_steps="long", **run)


def test_susceptibilities_given_burn_in_is_kept_and_a_resumed_call_chooses_the_same(tmp_path):
    model, x, y = _linear()
    run = dict(num_chains=2, num_draws=30, nbeta=NBETA, localization=GAMMA, seed=1, quiet=True)
    run["auto_step_options"] = OPTIONS
    kept = pp.susceptibilities(model, [(x, y)], (x[:4], y[:4]), ["weight"], num_burnin_steps=5, **run)
    assert kept.settings["num_burnin_steps"] == 5 and kept.settings["auto_step"]["burnin"] == {}
    given_step = pp.susceptibilities(
        model, [(x, y)], (x[:4], y[:4]), ["weight"], step_size=1e-3, **{**run, "auto_step_options": None}
    )
    assert given_step.settings["num_burnin_steps"] == 0  # a given step: devinterp's default, as in sample
    named = pp.susceptibilities(
        model, [(x, y)], (x[:4], y[:4]), ["weight"], step_size=1e-3, num_burnin_steps="auto",
        **{**run, "auto_step_options": None},
    )  # fmt: skip
    assert named.settings["num_burnin_steps"] == 0
    np.testing.assert_array_equal(named.chi, given_step.chi)
    folder = str(tmp_path / "chi")
    first = pp.susceptibilities(model, [(x, y)], (x[:4], y[:4]), ["weight"], checkpoint=folder, **run)
    # resumed: the calibration read back from the folder, the same burn-in chosen, the row read back
    resumed = pp.susceptibilities(model, [(x, y)], (x[:4], y[:4]), ["weight"], checkpoint=folder, **run)
    want = _expected_burnin(first.settings["auto_step"], 30)
    assert first.settings["num_burnin_steps"] == resumed.settings["num_burnin_steps"] == want > 30
    np.testing.assert_array_equal(resumed.chi, first.chi)


def test_refined_llc_burns_in_by_the_rule_for_each_data_set():
    model, x, y = _linear()
    kw = dict(num_chains=2, num_draws=30, nbeta=NBETA, localization=GAMMA, seed=0, quiet=True)
    kw["auto_step_options"] = SHORT_SCAN
    data = [(x[:16], y[:16])]
    res = pp.refined_llc(model, [(x, y)], components=["weight"], data=data, include_full=False, **kw)
    for label in ("train", "data"):
        used = res.config["by_data"][label]
        want = _expected_burnin(used["auto_step"], 30)
        assert used["num_burnin_steps"] == used["auto_step"]["burnin"]["num_burnin_steps"] == want > 30
    kept = pp.refined_llc(
        model, [(x, y)], components=["weight"], include_full=False, num_burnin_steps=4, **kw
    )
    assert kept.config["by_data"]["train"]["num_burnin_steps"] == 4
    assert kept.config["by_data"]["train"]["auto_step"]["burnin"] == {}


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        model, x, y = _linear()
        kw = dict(num_chains=2, num_draws=30, nbeta=NBETA, localization=GAMMA, seed=0, quiet=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ruled = distributed.estimate_llc(model, [(x, y)], auto_step_options=SHORT_SCAN, **kw)
            kept = distributed.estimate_llc(
                model, [(x, y)], num_burnin_steps=6, auto_step_options=SHORT_SCAN, **kw
            )
        out = dict(
            auto=ruled.sample.config["auto_step"],
            burnin=ruled.sample.config["num_burnin_steps"],
            kept=kept.sample.config["num_burnin_steps"],
            kept_rule=kept.sample.config["auto_step"]["burnin"],
            trace=ruled.loss_trace,
        )
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_estimate_llc_burns_in_by_the_rule_on_every_rank():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(2, folder), nprocs=2, join=True)
        outs = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    model, x, y = _linear()
    kw = dict(num_chains=2, num_draws=30, nbeta=NBETA, localization=GAMMA, seed=0, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = pp.estimate_llc(model, [(x, y)], auto_step_options=SHORT_SCAN, **kw)
    for out in outs:
        want = _expected_burnin(out["auto"], 30)
        assert out["burnin"] == out["auto"]["burnin"]["num_burnin_steps"] == want > 30
        assert out["burnin"] == one.sample.config["num_burnin_steps"]  # as one process chooses
        np.testing.assert_allclose(out["trace"], one.loss_trace, rtol=1e-10)
        assert out["kept"] == 6 and out["kept_rule"] == {}
