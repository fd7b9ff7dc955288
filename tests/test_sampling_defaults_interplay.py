"""The calibrated step's burn-in (num_burnin_steps="auto") together with the sampler's other options (runs=,
chains=, thinning, weight decay alone, other samplers, a checkpoint stopped in the burn-in, a run again at half the
step), its capped-burn-in warning in every estimator, and seeds given as numpy integers or integer arrays in every
entry point (the same run as Python ints; a bad seed refused alike); the expected burn-ins recomputed from the
calibration's chosen step."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import pypattern as pp
from pypattern import distributed
from pypattern.sampling import runner
from pypattern.sampling.diagnostics import NonStationaryWarning, SamplingDivergedError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.StepBiasWarning"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning"),
    pytest.mark.filterwarnings("ignore:.*discretisation bias:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*ran away:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:calibrate_step_size. no step size of the sweep is healthy:UserWarning"
    ),
]

D, N = 4, 32
NBETA, GAMMA = 10.0, 1.0
OPTIONS = {"calibration_steps": 100}
# the scan from 0.025 (0.1 diverges and 0.05 changes when halved on this regression): the same chosen steps and
# burn-ins as OPTIONS for these runs (batched SGLD), with 5 trials instead of 8
SHORT_SCAN = {**OPTIONS, "max_step_size": 0.025}
RUN = dict(num_chains=2, num_draws=30, nbeta=NBETA, seed=3, quiet=True)


def _linear():
    """A float64 linear regression at its least-squares optimum."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        N, generator=g, dtype=torch.float64
    )
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.round(torch.linalg.lstsq(x, y[:, None]).solution.T, decimals=10))
    return model, x, y[:, None]


def _rule(eps: float, gamma: float, draw_steps: int, factor: float = 40.0) -> int:
    """3 relaxation times of the flattest direction at eps * gamma / 2 per step, at least the draws' steps, at most
    ``factor`` times them, and at least the calibration's trial burn-in (half of calibration_steps = 100 here,
    since every trial of these runs is at least calibration_steps long)."""
    needed = math.ceil(2 * 3 / (eps * gamma))
    return max(draw_steps, min(needed, int(factor * draw_steps)), OPTIONS["calibration_steps"] // 2)


def _capped_warnings(record) -> list[str]:
    return [
        str(w.message)
        for w in record
        if issubclass(w.category, NonStationaryWarning)
        and "flattest direction needs to relax" in str(w.message)
    ]


def test_the_rule_with_runs_chains_thinning_weight_decay_and_other_samplers():
    model, x, y = _linear()
    loader = [(x, y)]
    half = {"weight": torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)}
    kw = dict(RUN, localization=GAMMA, auto_step_options=SHORT_SCAN)
    full = pp.estimate_llc(model, loader, **kw)
    eps = full.sample.config["auto_step"]["chosen"]
    assert full.sample.config["num_burnin_steps"] == _rule(eps, GAMMA, 30) > 30
    # runs=: one calibration, every run the same burn-in, each run's record saying so
    both = pp.estimate_llc(model, loader, runs=[(None, None), (None, half)], **kw)
    for r in both:
        assert (
            r.sample.config["num_burnin_steps"] == r.sample.config["auto_step"]["burnin"]["num_burnin_steps"]
        )
        assert r.sample.config["num_burnin_steps"] == full.sample.config["num_burnin_steps"]
    np.testing.assert_array_equal(both[0].sample.loss_trace, full.sample.loss_trace)
    # chains=: a subset burns in as the whole run, so its chain equals the whole run's
    one = pp.estimate_llc(model, loader, chains=[1], **kw)
    assert one.sample.config["num_burnin_steps"] == full.sample.config["num_burnin_steps"]
    np.testing.assert_array_equal(one.sample.loss_trace[-1], full.sample.loss_trace[1])
    # thinning: the draws take num_draws * num_steps_bw_draws steps
    thin = pp.estimate_llc(model, loader, num_steps_bw_draws=3, **kw)
    auto = thin.sample.config["auto_step"]
    assert thin.sample.config["num_burnin_steps"] == _rule(auto["chosen"], GAMMA, 90)
    # weight decay alone pulls the flattest direction back as localization does
    wd = pp.estimate_llc(model, loader, **dict(kw, localization=0.0, weight_decay=0.5))
    auto = wd.sample.config["auto_step"]
    assert wd.sample.config["num_burnin_steps"] == _rule(auto["chosen"], 0.5, 30) > 30
    # another sampler: no relaxation rule, the draws' steps (at least the trial burn-in), and the record says why
    other = pp.estimate_llc(model, loader, sampler="sgnht", **dict(kw, auto_step_options=OPTIONS))
    rec = other.sample.config["auto_step"]["burnin"]
    assert other.sample.config["num_burnin_steps"] == rec["num_burnin_steps"] == max(30, 50)
    assert rec["needed"] is None and "a sampler other than SGLD" in rec["reason"]


class _Once:
    """A callback whose first call at draw 2 raises SamplingDivergedError (a run that ran away), resettable."""

    def __init__(self):
        self.fired = False

    def reset(self):
        pass

    def __call__(self, draw, chain):
        if not self.fired and draw == 2:
            self.fired = True
            raise SamplingDivergedError("ran away", chain=chain, draw=draw, step=0, step_size=0.0)


def test_a_run_again_at_half_the_calibrated_step_burns_in_for_that_step():
    model, x, y = _linear()
    loader = [(x, y)]
    kw = dict(RUN, localization=GAMMA, auto_step_options=SHORT_SCAN)
    res = pp.estimate_llc(model, loader, callbacks=[_Once()], **kw)
    auto = res.sample.config["auto_step"]
    first = auto["reruns"][0]["step_size"]
    assert auto["chosen"] == res.sample.config["step_size"] == first / 2
    want = _rule(first / 2, GAMMA, 30)
    assert want > _rule(first, GAMMA, 30)  # the halved step relaxes half as fast per step
    assert res.sample.config["num_burnin_steps"] == auto["burnin"]["num_burnin_steps"] == want
    given = pp.estimate_llc(
        model, loader, **RUN, localization=GAMMA, step_size=first / 2, num_burnin_steps=want
    )
    np.testing.assert_array_equal(res.sample.loss_trace, given.sample.loss_trace)
    for res in (
        pp.susceptibilities(model, loader, (x[:4], y[:4]), ["weight"], callbacks=[_Once()], **kw),
        pp.bif(model, loader, (x[:3], y[:3]), callbacks=[_Once()], **kw),
    ):
        auto = res.settings["auto_step"]
        first = auto["reruns"][0]["step_size"]
        assert res.settings["step_size"] == first / 2
        assert (
            res.settings["num_burnin_steps"]
            == auto["burnin"]["num_burnin_steps"]
            == _rule(first / 2, GAMMA, 30)
        )


def test_a_capped_burn_in_warns_in_every_estimator_alike():
    model, x, y = _linear()
    loader = [(x, y)]
    kw = dict(RUN, localization=GAMMA, auto_step_options=dict(SHORT_SCAN, max_burnin_factor=2))
    calls = {
        "estimate_llc": lambda **k: pp.estimate_llc(model, loader, **kw, **k),
        "susceptibilities": lambda **k: pp.susceptibilities(
            model, loader, (x[:4], y[:4]), ["weight"], **kw, **k
        ),
        "bif": lambda **k: pp.bif(model, loader, (x[:3], y[:3]), **kw, **k),
    }
    for name, call in calls.items():
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            res = call()
        config = res.sample.config if name == "estimate_llc" else res.settings
        eps = config["auto_step"]["chosen"]
        needed = math.ceil(2 * 3 / (eps * GAMMA))
        assert config["num_burnin_steps"] == 60 < needed and config["auto_step"]["burnin"]["capped"]
        (message,) = _capped_warnings(record)
        assert f"the run's burn-in of 60 steps is shorter than the {needed} its flattest direction" in message
        assert "max_burnin_factor" in message
        if name != "estimate_llc":
            assert message.startswith(f"{name}(): step_size='auto' chose")
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                call(warn_nonstationary=False)
            assert _capped_warnings(record) == []
    with warnings.catch_warnings(record=True) as record:  # not capped: no such warning
        warnings.simplefilter("always")
        pp.bif(model, loader, (x[:3], y[:3]), **dict(kw, auto_step_options=SHORT_SCAN))
    assert _capped_warnings(record) == []


#: the run's loss calls (not the calibration's) and the call to stop at (state a checkpoint's fingerprint ignores)
_STOP = {"on": False, "n": 0, "at": None}


def _stoppable_loss(m, batch):
    """The mean squared error; raises KeyboardInterrupt at the run's ``_STOP["at"]``-th call."""
    if _STOP["on"]:
        _STOP["n"] += 1
        if _STOP["n"] == _STOP["at"]:
            raise KeyboardInterrupt
    return ((m(batch[0]) - batch[1]) ** 2).mean()


def test_a_capped_run_stopped_in_its_burn_in_or_draws_resumes_to_the_whole_run(tmp_path, monkeypatch):
    model, x, y = _linear()
    real = runner._sample_auto

    def the_run(*a, **k):  # the run at the calibrated step (not the calibration's trials)
        _STOP["on"], _STOP["n"] = True, 0
        try:
            return real(*a, **k)
        finally:
            _STOP["on"] = False

    monkeypatch.setattr(runner, "_sample_auto", the_run)
    kw = dict(
        RUN,
        localization=GAMMA,
        loss_fn=_stoppable_loss,
        batched=False,
        # unbatched, the scan from 0.0125 chooses the step of OPTIONS' (3.125e-3) with 5 trials instead of 8
        auto_step_options=dict(OPTIONS, max_step_size=0.0125, max_burnin_factor=2),
    )
    whole = pp.estimate_llc(model, [(x, y)], **kw)
    assert whole.sample.config["auto_step"]["burnin"]["capped"]
    for at in (20, 150):  # in the first chain's burn-in (60 steps), in the second chain's draws
        path = str(tmp_path / f"run{at}.npz")
        _STOP["at"] = at
        try:
            with pytest.raises(KeyboardInterrupt):
                pp.estimate_llc(model, [(x, y)], checkpoint=path, checkpoint_every=5, **kw)
        finally:
            _STOP["at"] = None
        res = pp.estimate_llc(model, [(x, y)], checkpoint=path, checkpoint_every=5, **kw)
        np.testing.assert_array_equal(res.sample.loss_trace, whole.sample.loss_trace)
        assert res.sample.config["auto_step"]["burnin"] == whole.sample.config["auto_step"]["burnin"]


def test_online_llc_keeps_its_calibrated_step_and_burn_in_with_calibration_settings(tmp_path):
    model, x, y = _linear()
    loader = [(x, y)]
    kw = dict(RUN, localization=GAMMA, seed=[3, 4], auto_step_options=SHORT_SCAN)
    first = pp.estimate_llc(model, loader, **kw)
    eps, burnin = first.sample.config["step_size"], first.sample.config["num_burnin_steps"]
    assert burnin == _rule(eps, GAMMA, 30)
    path = str(tmp_path / "curve.npz")
    online = pp.OnlineLLC(loader, every=1, checkpoint=path, **kw)
    online(model, 0)
    online(model, 1)  # the calibration's settings no longer apply: the step is the calibrated one
    assert online.result.llc_mean[0] == first.llc_mean
    again = pp.estimate_llc(
        model, loader, **dict(RUN, localization=GAMMA, seed=[3, 4]), step_size=eps, num_burnin_steps=burnin
    )
    assert online.result.llc_mean[1] == again.llc_mean
    # num_burnin_steps="auto" (estimate_llc's default) is the same curve; seeds as an integer array too
    for seed in (np.array([3, 4]), (3, 4)):
        cont = pp.OnlineLLC(loader, every=1, checkpoint=path, **dict(kw, seed=seed, num_burnin_steps="auto"))
        cont(model, 2)
        assert list(cont.result.step) == [0, 1, 2] and cont.result.llc_mean[2] == again.llc_mean
    with pytest.raises(ValueError, match=r"num_burnin_steps='long' is not valid"):
        pp.OnlineLLC(loader, every=1, num_burnin_steps="long")


def _entry_points(model, x, y):
    loader = [(x, y)]
    given = dict(num_chains=2, num_draws=8, step_size=1e-3, nbeta=NBETA, localization=GAMMA, quiet=True)
    masks = {"a": {"weight": torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)}}

    def online(seed):
        cb = pp.OnlineLLC(loader, every=1, seed=seed, **given)
        cb(model, 0)
        return cb.result.llc_mean

    def chi(seed):
        res = pp.susceptibilities(model, loader, (x[:4], y[:4]), ["weight"], seed=seed, **given)
        rerun = pp.susceptibilities(model, loader, (x[:4], y[:4]), ["weight"], **res.settings)
        np.testing.assert_array_equal(rerun.chi, res.chi)  # the settings hold the seed
        return res.chi

    return {
        "sample": lambda s: pp.sample(model, loader, seed=s, **given).loss_trace,
        "estimate_llc": lambda s: pp.estimate_llc(model, loader, seed=s, **given).sample.loss_trace,
        "refined_llc": lambda s: pp.refined_llc(model, loader, components=masks, seed=s, **given).llc_mean,
        "susceptibilities": chi,
        "bif": lambda s: pp.bif(model, loader, (x[:3], y[:3]), seed=s, **given).bif,
        "OnlineLLC": online,
        "calibrate_step_size": lambda s: (
            pp.calibrate_step_size(
                model,
                loader,
                step_sizes=[1e-3],
                seed=s,
                **{k: v for k, v in given.items() if k != "step_size"},
            ).llc_mean
        ),
        "distributed.estimate_llc": lambda s: (
            distributed.estimate_llc(model, loader, seed=s, **given).sample.loss_trace
        ),
    }


def test_seeds_as_numpy_integers_and_arrays_in_every_entry_point(tmp_path):
    model, x, y = _linear()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        for name, call in _entry_points(model, x, y).items():
            per_chain, one = call([3, 4]), call(3)
            for seed in (np.array([3, 4]), np.array([3, 4], dtype=np.uint32), (3, 4)):
                np.testing.assert_array_equal(call(seed), per_chain, err_msg=f"{name}, seed={seed!r}")
            for seed in (np.int64(3), np.array(3)):
                np.testing.assert_array_equal(call(seed), one, err_msg=f"{name}, seed={seed!r}")
            for bad in (3.0, -1, True, "3", np.array([1.5, 2.0]), torch.tensor([3, 4]), 2**63, [True, False]):
                with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 2\*\*63\), or a list"):
                    call(bad)
            with pytest.raises(ValueError, match=r"^seed has 3 entries but num_chains=2: give one per chain"):
                call(np.array([1, 2, 3]))
    finally:
        dist.destroy_process_group()
