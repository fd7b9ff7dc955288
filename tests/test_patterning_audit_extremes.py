"""invert at the edges of float64: weights out of its range are refused by name, targets far beyond the reach of
any re-weighting give the linear program's answer (the re-weighting that moves the observables furthest towards
them), and loaded interventions hold finite numbers. Checked against independent float64 computations."""

import warnings

import numpy as np
import pytest
from scipy.optimize import linprog

from pypattern.io import _write_result
from pypattern.patterning import Intervention, invert


def _min_norm_weights(chi, target):
    """The minimum-norm re-weighting of one observable, in closed form: ``w - 1 = N t chi_c / |chi_c|^2`` with
    ``chi_c`` the centred row (written so that no intermediate leaves float64)."""
    row = np.asarray(chi, dtype=np.float64)[0]
    centred = row - row.mean()
    return 1.0 + (row.size * centred / (centred @ centred)) * target


def test_pinv_weights_near_the_largest_float64_are_the_closed_form():
    chi = np.array([[1.0, -1.0, 0.5]])
    plan = invert(chi, [1e308])
    want = _min_norm_weights(chi, 1e308)
    assert np.isfinite(want).all() and np.abs(want).max() > 1e308
    np.testing.assert_allclose(plan.weights, want, rtol=1e-12)
    assert plan.residual < 1e-12


@pytest.mark.parametrize(
    ("chi", "target", "kw"),
    [
        (np.array([[1.0, -1.0, 0.5]]) * 1e-300, [1e10], {}),  # weights near 1e310
        (np.array([[1.0, -1.0, 0.5]]) * 1e-320, [1.0], {}),  # subnormal chi
        (np.array([[1.0, -1.0, 0.5]]), [1e308], {"num_data": 10**6}),  # weights 1e6 times the closed form's
        (np.array([[1.0, -1.0, 0.5], [0.5, 2.0, -1.0]]) * 1e-300, [1e10, -1e10], {}),
    ],
)
def test_weights_beyond_float64_are_refused_naming_target_not_returned_as_nan(chi, target, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a subnormal chi's exact zeros warn about counted)
        with pytest.raises(ValueError, match="target") as info:
            invert(chi, target, **kw)
    assert "float64" in str(info.value) and "constrained" in str(info.value)
    # a bounded re-weighting of the same chi is a real answer: every column's weight on the side that moves the
    # first observable towards its target
    plan = invert(chi, target, method="constrained")
    assert np.isfinite(plan.weights).all() and plan.weights.min() >= 0
    np.testing.assert_allclose(plan.weights.sum(), chi.shape[1], rtol=1e-12)


def _lp_vertex(chi, target, min_weight, max_weight):
    """The re-weighting that moves ``chi (w - 1) / N`` furthest along ``target`` (the limit of the constrained
    least squares as the target grows beyond reach), by scipy's linear programming."""
    k, n = chi.shape
    unit = np.asarray(target, dtype=np.float64) / np.abs(target).max()
    res = linprog(
        -(unit @ (chi / np.abs(chi).max())),
        A_eq=np.ones((1, n)),
        b_eq=[n],
        bounds=[(min_weight, max_weight)] * n,
        method="highs",
    )
    assert res.status == 0
    return res.x


@pytest.mark.parametrize(
    ("chi", "target", "bounds"),
    [
        (np.array([[1.0, -1.0, 0.5]]), [1e308], (0.0, None)),  # |target|^2 overflows
        (np.array([[1.0, -1.0, 0.5]]), [-1e308], (0.0, None)),
        (np.array([[1.0, -1.0, 0.5]]) * 1e-300, [1e10], (0.0, None)),  # target / chi overflows
        (np.array([[1.0, -1.0, 0.5, 0.2]]) * 1e-300, [1e10], (0.25, 2.0)),
        (np.array([[1.0, -1.0, 0.5, 0.2], [0.3, 0.1, -2.0, 0.4]]) * 1e-200, [1e150, 3e149], (0.0, 1.5)),
        (np.array([[1.0, -1.0, 0.5, 0.2], [0.3, 0.1, -2.0, 0.4]]), [-1e300, 3e300], (0.0, None)),
    ],
)
def test_constrained_target_far_beyond_reach_moves_furthest_towards_it(chi, target, bounds):
    lo, hi = bounds
    want = _lp_vertex(chi, target, lo, hi)
    plan = invert(chi, target, method="constrained", min_weight=lo, max_weight=hi)
    np.testing.assert_allclose(plan.weights, want, atol=1e-9)
    assert np.isfinite(plan.predicted).all() and np.isfinite(plan.residual)
    # the same answer as a target 1e6 times the furthest response (far beyond reach, with no overflow anywhere)
    unit = np.asarray(target) / np.abs(target).max()
    reach = np.abs(chi).max() * 1e6
    np.testing.assert_allclose(
        invert(chi, unit * reach, method="constrained", min_weight=lo, max_weight=hi).weights, want, atol=1e-9
    )


def test_a_loaded_intervention_with_non_finite_numbers_is_refused_by_field(tmp_path):
    plan = invert(np.array([[1.0, -1.0, 0.5], [0.2, 0.3, -1.0]]), [0.1, -0.2])
    path = tmp_path / "plan.npz"
    plan.save(path)
    back = Intervention.load(path)
    for f in ("h", "weights", "predicted", "target"):
        np.testing.assert_array_equal(getattr(back, f), getattr(plan, f))
    assert back.residual == plan.residual and back.method == plan.method
    for field in ("h", "weights", "predicted", "target"):
        values = {f: getattr(plan, f).copy() for f in ("h", "weights", "predicted", "target")}
        values[field][1] = np.nan
        bad = Intervention(**values, residual=plan.residual, method=plan.method)
        with pytest.raises(ValueError, match=field):  # save refuses what load would refuse
            bad.save(path)
        _write_result(bad, path)  # a file written without that check
        with pytest.raises(Exception, match=field):
            Intervention.load(path)
    bad = Intervention(
        h=plan.h,
        weights=plan.weights,
        predicted=plan.predicted,
        target=plan.target,
        residual=-1.0,
        method="pinv",
    )
    with pytest.raises(ValueError, match="residual"):
        bad.save(path)
    _write_result(bad, path)
    with pytest.raises(Exception, match="residual"):
        Intervention.load(path)
