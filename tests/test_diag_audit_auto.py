"""step_size='auto' and calibrate_step_size: settings refused by name before any trial; the caller's random
states and the model's weights left as they were."""

import random
import warnings

import numpy as np
import pytest
import torch

from pypattern import truth
from pypattern.sampling import estimate_llc
from pypattern.sampling.auto import resolve_step_size, step_size_grid
from pypattern.sampling.calibrate import calibrate_step_size


def _regular():
    torch.manual_seed(0)
    model = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    ds = truth.make_regression_data(model, 3, dtype=torch.float64)
    return model, torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("max_r_hat", "1.1"),
        ("max_r_hat", True),
        ("z", "2"),
        ("z", float("inf")),
        ("z", True),
        ("relaxation_times", "3"),
        ("relaxation_times", float("inf")),
        ("relaxation_target", float("nan")),
        ("max_step_size", "0.1"),
        ("max_step_size", float("inf")),
        ("min_step_size", float("nan")),
        ("resolve", "no"),
        ("coupled", "no"),
        ("num_steps_bw_draws", 0),
        ("run_draw_steps", -5),
    ],
)
def test_calibration_settings_are_refused_by_name_before_any_trial(name, bad, monkeypatch):
    # were TypeError "'>' not supported between 'str' and 'int'", OverflowError "cannot convert float infinity to
    # integer", or an AutoStepError after every trial (z=inf, resolve='no', num_steps_bw_draws=0, ...)
    import pypattern.sampling.runner as runner

    def no_trial(*a, **k):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(runner, "sample", no_trial)
    model, loader = _regular()
    with pytest.raises(ValueError, match=f"^{name} must be"):
        resolve_step_size(model, loader, nbeta=100.0, localization=1.0, **{name: bad})


def test_auto_step_options_are_refused_by_name_through_estimate_llc():
    model, loader = _regular()
    for name, bad in (("z", float("inf")), ("max_step_size", float("inf")), ("coupled", "no")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            estimate_llc(model, loader, nbeta=100.0, auto_step_options={name: bad}, quiet=True)


def test_the_grid_is_halvings_of_the_largest_step_down_to_the_smallest():
    grid = step_size_grid(0.1, 1e-3)
    assert grid == [0.1 * 2.0**-k for k in range(7)] and grid[-1] >= 1e-3 > grid[-1] / 2
    with pytest.raises(ValueError, match="min_step_size <= max_step_size"):
        step_size_grid(1e-3, 0.1)


def _random_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_calibrations_leave_the_random_states_and_the_weights_as_they_were():
    model, loader = _regular()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for run in (
        lambda: calibrate_step_size(
            model, loader, (1e-4, 1e-3), nbeta=100.0, localization=1.0, num_draws=20, num_chains=2
        ),
        lambda: resolve_step_size(
            model,
            loader,
            nbeta=100.0,
            localization=1.0,
            calibration_steps=50,
            calibration_chains=2,
            max_trial_factor=2,
        ),
    ):
        torch.manual_seed(11), np.random.seed(12), random.seed(13)
        before = _random_states()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                run()
            except ValueError:  # AutoStepError: no step passed these short trials; the states still count
                pass
        after = _random_states()
        assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])
        assert before[2] == after[2]
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k]), k
