"""Ground truths against independent integrals, and step_size="auto" with its default settings on the model
y = w1 w2 x (lambda = 1/2 at the origin) against the exact value its estimator targets."""

import math
import warnings

import pytest
import torch

from pypattern import truth
from pypattern.sampling import estimate_llc


def _trapezoid(f, x):
    return float(torch.trapezoid(f, x))


def _w1w2_expectation_by_conditioning(nbeta, gamma):
    # K = w1^2 w2^2: given w2, w1 is Gaussian with precision 2 nbeta w2^2 + gamma, so
    # E[nbeta K | w2] = nbeta w2^2 / (2 nbeta w2^2 + gamma) and the marginal of w2 is
    # exp(-gamma w2^2 / 2) / sqrt(2 nbeta w2^2 + gamma): a one-dimensional integral
    w2 = torch.linspace(0, 12 / math.sqrt(gamma), 400_001, dtype=torch.float64)
    prec = 2 * nbeta * w2**2 + gamma
    dens = torch.exp(-0.5 * gamma * w2**2) / torch.sqrt(prec)
    return _trapezoid(dens * nbeta * w2**2 / prec, w2) / _trapezoid(dens, w2)


@pytest.mark.parametrize("nbeta, gamma", [(10.0, 1.0), (100.0, 1.0), (1000.0, 4.0)])
def test_w1w2_quadrature_equals_the_conditional_gaussian_integral(nbeta, gamma):
    got = truth.localized_normal_crossing_expectation([1, 1], nbeta, gamma, grid=1201)
    want = _w1w2_expectation_by_conditioning(nbeta, gamma)
    assert got == pytest.approx(want, rel=2e-3)


def test_w1w2_expectation_approaches_one_half_with_its_log_correction():
    # multiplicity 2: E[nbeta K] = 1/2 - O(1 / ln nbeta), increasing towards lambda = 1/2
    lam, mult = truth.normal_crossing_learning_coefficient([1, 1], multiplicity=True)
    assert (lam, mult) == (0.5, 2)
    vals = [_w1w2_expectation_by_conditioning(nb, 1.0) for nb in (1e2, 1e4, 1e6, 1e8)]
    assert all(a < b < lam for a, b in zip(vals, vals[1:]))
    # (1/2 - E) ln(nbeta) stays bounded (a 1 / ln correction, not a power law)
    gaps = [(lam - v) * math.log(nb) for v, nb in zip(vals, (1e2, 1e4, 1e6, 1e8))]
    assert max(gaps) / min(gaps) < 1.5


def test_one_parameter_quartic_has_lambda_one_quarter_by_quadrature():
    # K = w^4: E[nbeta K] under exp(-nbeta w^4) is exactly 1/4 (Gamma integrals); the localization lowers it
    lam = truth.normal_crossing_learning_coefficient([2])
    w = torch.linspace(0, 6, 600_001, dtype=torch.float64)
    for nbeta, gamma in ((1e6, 1.0), (1e3, 0.0)):
        logp = -nbeta * w**4 - 0.5 * gamma * w**2
        p = torch.exp(logp - logp.max())
        e = _trapezoid(p * nbeta * w**4, w) / _trapezoid(p, w)
        assert e == pytest.approx(lam, rel=2e-3 if gamma else 1e-6)


def test_dln_single_hidden_unit_equals_the_normal_crossing_of_its_factorisation():
    # (1, 1, 1) rank 0: y = b a x, K = a^2 b^2 -> the normal crossing (1, 1): 1/2, multiplicity 2
    assert truth.dln_learning_coefficient((1, 1, 1), 0, multiplicity=True) == (0.5, 2)
    assert truth.rrr_learning_coefficient(1, 1, 1, 0) == 0.5


def _w1w2_auto(seed, nbeta):
    model = truth.NormalCrossing([1, 1], dtype=torch.float64)
    ds = truth.make_normal_crossing_data(2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_llc(model, loader, nbeta=nbeta, localization=1.0, seed=seed, quiet=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_step_with_default_settings_on_w1w2_is_within_three_standard_errors(seed):
    # no step, chains, draws or burn-in given: the calibrated step and the default run (4 chains x 200 draws)
    nbeta = 10.0
    r = _w1w2_auto(seed, nbeta)
    target = _w1w2_expectation_by_conditioning(nbeta, 1.0)
    assert isinstance(r.sample.config["step_size"], float)
    assert abs(r.llc_mean - target) <= 3 * r.llc_se, (r.llc_mean, r.llc_se, target)


def test_a_well_run_given_step_is_silent_and_within_three_standard_errors():
    # a small step with a burn-in of several relaxation times of the flattest direction (2 / (eps * gamma) = 2000
    # steps): no stationarity, step-bias or ESS warning, and the estimate within 3 standard errors of the target
    model = truth.NormalCrossing([1, 1], dtype=torch.float64)
    ds = truth.make_normal_crossing_data(2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = estimate_llc(
            model,
            loader,
            step_size=1e-3,
            nbeta=100.0,
            localization=1.0,
            num_chains=8,
            num_burnin_steps=4000,
            num_draws=400,
            num_steps_bw_draws=10,
            seed=0,
            quiet=True,
        )
    assert [str(w.message) for w in caught] == []
    target = _w1w2_expectation_by_conditioning(100.0, 1.0)
    assert abs(r.llc_mean - target) <= 3 * r.llc_se, (r.llc_mean, r.llc_se, target)


def test_chains_that_have_not_moved_are_not_called_stationary():
    # a step so small that the chains stay at w* within the run: the estimate is near 0 (the target is 0.35) and
    # split R-hat says the loss trace is still moving
    from pypattern.sampling.diagnostics import NonStationaryWarning

    model = truth.NormalCrossing([1, 1], dtype=torch.float64)
    ds = truth.make_normal_crossing_data(2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    for seed in (1, 2):
        with pytest.warns(NonStationaryWarning):
            r = estimate_llc(
                model, loader, step_size=1e-5, nbeta=100.0, localization=1.0, seed=seed, quiet=True
            )
        assert r.llc_mean < 0.01


def test_a_step_size_sweep_reports_each_steps_bias_check_in_its_table_not_as_warnings():
    # the sweep's runs are trials of steps the user has not chosen: their step-bias checks belong in the table's
    # reasons; a warning, once, only for the step the sweep recommends
    from pypattern.sampling import calibrate_step_size
    from pypattern.sampling.diagnostics import StepBiasWarning

    model = truth.NormalCrossing([1, 1], dtype=torch.float64)
    ds = truth.make_normal_crossing_data(2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    sizes = (1e-5, 1e-4, 1e-3, 1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = calibrate_step_size(model, loader, sizes, nbeta=100.0, localization=1.0, seed=0)
    # what each step's own run says of its bias (the same runs, one at a time, seed 0)
    flagged = []
    for eps in sizes:
        with warnings.catch_warnings(record=True) as own:
            warnings.simplefilter("always")
            estimate_llc(model, loader, step_size=eps, nbeta=100.0, localization=1.0, seed=0, quiet=True)
        flagged.append(any(issubclass(w.category, StepBiasWarning) for w in own))
    # 1e-2 warns of its bias; the steps whose chains have not relaxed (1e-5) are not judged
    assert flagged[-1] and not flagged[0], flagged
    for eps, reason, f in zip(c.step_sizes, c.reasons, flagged):
        assert ("discretisation bias" in reason) == f, (eps, reason)
    bias_warnings = [str(w.message) for w in caught if issubclass(w.category, StepBiasWarning)]
    rec_flagged = c.recommended is not None and flagged[list(sizes).index(c.recommended)]
    assert len(bias_warnings) == int(rec_flagged)
    assert all(f"{c.recommended:g}" in m for m in bias_warnings)
