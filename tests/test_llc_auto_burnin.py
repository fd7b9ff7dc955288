"""The burn-in of a run at a calibrated step (step_size="auto", no num_burnin_steps given): as long as the chosen
step needs for the flattest direction to relax from w* (pypattern.sampling.auto.burnin_for_run), capped by
max_burnin_factor times the draws' steps, recorded in config["auto_step"]["burnin"]."""

import math
import warnings

import pytest
import torch

from pypattern import truth
from pypattern.sampling import estimate_llc
from pypattern.sampling.diagnostics import NonStationaryWarning


def _dln():
    # the deep linear network (3, 3, 3, 2), teacher rank 1: Aoyagi's learning coefficient 3
    model = truth.DeepLinearNetwork((3, 3, 3, 2), dtype=torch.float64).set_teacher(1, seed=2, scale=0.5)
    ds = truth.make_regression_data(model, 3, dtype=torch.float64)
    return model, torch.utils.data.DataLoader(ds, batch_size=len(ds))


def _needed(auto):
    # relaxation_times relaxation times of the flattest direction, which relaxes by eps * gamma / 2 per step
    eps = auto["chosen"]
    gamma = auto["settings"]["localization"]
    return math.ceil(2 * auto["settings"]["relaxation_times"] / (eps * gamma))


def test_default_call_burns_in_for_the_flattest_direction_and_reaches_the_aoyagi_value():
    # the default run (4 chains x 200 draws) at the chosen 7.8e-4 covered 0.3 units of Langevin time in 400 steps
    # and came out 2.28 +- 0.28 (-2.5 standard errors) with an unrelaxed warning; the flattest direction relaxes at
    # localization / 2 per unit of Langevin time
    model, loader = _dln()
    lam = truth.dln_learning_coefficient((3, 3, 3, 2), 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = estimate_llc(model, loader, nbeta=100.0, localization=1.0, seed=0, quiet=True)
    auto = r.sample.config["auto_step"]
    need = _needed(auto)
    assert need > 200 * 1  # longer than the default burn-in (the draws' steps)
    assert r.sample.config["num_burnin_steps"] == need
    b = auto["burnin"]
    assert b["num_burnin_steps"] == need and b["needed"] == need and not b["capped"]
    assert b["relaxation_times"] == pytest.approx(auto["chosen"] * 1.0 * need / 2)
    assert str(need) in b["reason"]
    # the run relaxed: no warning that the calibration's trials were short for the flattest directions
    assert not [w for w in caught if "flattest" in str(w.message)], [str(w.message) for w in caught]
    assert abs(r.llc_mean - lam) <= 2 * r.llc_se, (r.llc_mean, r.llc_se, lam)


@pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning")
def test_given_burnin_is_kept_and_the_cap_applies_with_a_warning():
    model, loader = _dln()
    options = {"calibration_steps": 100}
    r = estimate_llc(
        model,
        loader,
        nbeta=100.0,
        localization=1.0,
        seed=2,
        num_draws=50,
        num_burnin_steps=30,
        quiet=True,
        warn_nonstationary=False,
        auto_step_options=options,
    )
    assert r.sample.config["num_burnin_steps"] == 30
    assert r.sample.config["auto_step"]["burnin"] == {}  # not chosen: the caller's
    with pytest.warns(NonStationaryWarning, match="shorter than the"):
        c = estimate_llc(
            model,
            loader,
            nbeta=100.0,
            localization=1.0,
            seed=2,
            num_draws=50,
            quiet=True,
            auto_step_options=dict(options, max_burnin_factor=3),
        )
    auto = c.sample.config["auto_step"]
    assert _needed(auto) > 150
    assert c.sample.config["num_burnin_steps"] == 150  # 3 x the draws' 50 steps
    b = auto["burnin"]
    assert b["capped"] and b["cap"] == 150 and b["needed"] == _needed(auto)
    assert "capped at 150" in b["reason"]


def test_burnin_for_run_rule():
    from pypattern.sampling.auto import burnin_for_run

    report = {"chosen": 1e-3, "settings": {"gamma": 2.0, "relaxation_times": 3.0, "max_burnin_factor": 40.0}}
    b = burnin_for_run(report, 200, 2)
    assert b["needed"] == 3000 and b["num_burnin_steps"] == 3000 and not b["capped"]  # 2 * 3 / (1e-3 * 2)
    # no shorter than the draws' steps (the default burn-in of a calibrated step)
    b = burnin_for_run(dict(report, chosen=0.1), 200, 2)
    assert b["needed"] == 30 and b["num_burnin_steps"] == 400
    # capped at max_burnin_factor x the draws' steps
    b = burnin_for_run(dict(report, chosen=1e-5), 200, 1)
    assert b["needed"] == 300000 and b["num_burnin_steps"] == 8000 and b["capped"]
    assert b["relaxation_times"] == pytest.approx(1e-5 * 2.0 * 8000 / 2)
    # without localization and weight decay nothing bounds the relaxation: the draws' steps
    b = burnin_for_run(dict(report, settings={"gamma": 0.0, "relaxation_times": 3.0}), 200, 1)
    assert b["num_burnin_steps"] == 200 and b["needed"] is None and "without localization" in b["reason"]
    # no relaxation rules (another sampler): the draws' steps
    b = burnin_for_run(dict(report, settings={"relaxation_times": 3.0}), 200, 1)
    assert b["num_burnin_steps"] == 200 and b["needed"] is None


@pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning")
def test_resumed_run_chooses_the_same_burnin(tmp_path):
    model, loader = _dln()
    kw = dict(nbeta=100.0, localization=1.0, seed=1, num_draws=20, quiet=True, warn_nonstationary=False)
    kw["auto_step_options"] = {"calibration_steps": 100, "max_burnin_factor": 20}
    path = tmp_path / "run.npz"
    a = estimate_llc(model, loader, checkpoint=path, **kw)
    b = estimate_llc(model, loader, checkpoint=path, **kw)  # resumed: the calibration read back
    assert a.sample.config["num_burnin_steps"] == b.sample.config["num_burnin_steps"] > 20
    assert b.sample.config["auto_step"]["burnin"] == a.sample.config["auto_step"]["burnin"]
    assert b.llc_mean == a.llc_mean


def test_sample_takes_the_rule_by_name_and_a_given_step_keeps_its_default():
    """``pypattern.sample(num_burnin_steps="auto")`` chooses the burn-in as estimate_llc does (the same draws as a
    run given that burn-in at the chosen step); with a given step "auto" is the default burn-in (0, devinterp's);
    another string is refused by name."""
    import numpy as np

    from pypattern.sampling import sample

    model, loader = _dln()
    kw = dict(nbeta=100.0, localization=1.0, seed=0, quiet=True, auto_step_options={"calibration_steps": 100})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 5 draws: the rule (1920 steps at the chosen 3.1e-3) is capped at 40 x 5 = 200 steps
        ruled = sample(model, loader, num_chains=2, num_draws=5, num_burnin_steps="auto", **kw)
        auto = ruled.config["auto_step"]
        chosen = min(max(5, _needed(auto)), 40 * 5)  # capped at max_burnin_factor (40) times the draws' steps
        assert auto["burnin"]["capped"]  # the branch the cap takes
        assert ruled.config["num_burnin_steps"] == auto["burnin"]["num_burnin_steps"] == chosen
        given = sample(
            model, loader, num_chains=2, num_draws=5, num_burnin_steps=chosen,
            step_size=auto["chosen"], nbeta=100.0, localization=1.0, seed=0, quiet=True,
        )  # fmt: skip
    np.testing.assert_array_equal(ruled.loss_trace, given.loss_trace)
    fixed = sample(
        model,
        loader,
        num_chains=1,
        num_draws=3,
        num_burnin_steps="auto",
        step_size=1e-4,
        nbeta=100.0,
        quiet=True,
    )
    assert fixed.config["num_burnin_steps"] == 0
    with pytest.raises(ValueError, match=r"num_burnin_steps='long' is not valid; give an int >= 0, None"):
        sample(model, loader, num_burnin_steps="long", step_size=1e-4, quiet=True)


def test_warn_nonstationary_false_silences_the_capped_burn_in_warning_as_the_samplers():
    """``warn_nonstationary=False`` silences the sampler's non-stationarity warnings, and estimate_llc's and
    refined_llc's of a capped burn-in (NonStationaryWarning) with them; the estimate is the same."""
    from pypattern.sampling import refined_llc

    model, loader = _dln()
    kw = dict(
        nbeta=100.0, localization=1.0, seed=0, quiet=True, num_chains=2, num_draws=10,
        auto_step_options={"calibration_steps": 100, "max_burnin_factor": 2},
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        a = estimate_llc(model, loader, **kw)
    assert a.sample.config["auto_step"]["burnin"]["capped"]
    assert [w for w in loud if "flattest direction needs to relax" in str(w.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonStationaryWarning)
        b = estimate_llc(model, loader, warn_nonstationary=False, **kw)
        refined_llc(model, loader, components={"first": ["layers.0.weight"]}, warn_nonstationary=False, **kw)
    assert b.llc_mean == a.llc_mean
