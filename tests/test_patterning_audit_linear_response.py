"""invert against an exactly known linear response, with no sampling: the localized tempered posterior of a linear
regression is Gaussian, so the posterior means of observables are closed forms in the data weights and their
derivatives (central finite differences) are the exact susceptibilities. The weights invert returns must move those
means by its prediction to first order: for a probe drawn from the training data (num_data), with columns that are
no data points (counted), for more observables than probe points, and for bounded weights."""

import numpy as np
import pytest

from pypattern.patterning import invert

D, M, NBETA, GAMMA = 3, 10, 6.0, 4.0


class Gaussian:
    """``p_v(w) ~ exp(-nbeta L_v(w) - gamma/2 |w - w*|^2)`` with ``L_v = (1/M) sum_z v_z (x_z . w - y_z)^2``;
    observables: the posterior means of ``w_0``, ``w_1 + w_2`` and of the unweighted training loss."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(M, D))
        self.y = self.x @ rng.normal(size=D) + 0.5 * rng.normal(size=M)
        self.w_star = np.linalg.lstsq(self.x, self.y, rcond=None)[0] + 0.4

    def mu(self, v):
        a = (self.x.T * v) @ self.x / M
        b = (self.x.T * v) @ self.y / M
        prec = 2 * NBETA * a + GAMMA * np.eye(D)
        cov = np.linalg.inv(prec)
        mean = cov @ (2 * NBETA * b + GAMMA * self.w_star)
        r = self.x @ mean - self.y
        loss = (r @ r + np.einsum("zi,ij,zj->", self.x, cov, self.x)) / M
        return np.array([mean[0], mean[1] + mean[2], loss])

    def chi(self, step=1e-5):
        """``chi[k, z] = M d mu_k / d v_z`` at ``v = 1``: ``d mu = chi (v - 1) / M``."""
        out = np.empty((3, M))
        for z in range(M):
            e = np.zeros(M)
            e[z] = step
            out[:, z] = (self.mu(1 + e) - self.mu(1 - e)) / (2 * step) * M
        return out

    def moved(self, v, eps):
        """``(mu(1 + eps (v - 1)) - mu(1)) / eps``, symmetrised: the first-order response, error O(eps^2)."""
        return (self.mu(1 + eps * (v - 1)) - self.mu(1 - eps * (v - 1))) / (2 * eps)


@pytest.fixture(scope="module")
def model():
    g = Gaussian()
    return g, g.chi()


def test_the_response_is_linear_in_the_weights(model):
    g, chi = model
    v = 1 + np.random.default_rng(1).normal(size=M)
    np.testing.assert_allclose(g.moved(v, 1e-4), chi @ (v - 1) / M, rtol=1e-6)


@pytest.mark.parametrize("method", ["pinv", "ridge", "constrained"])
def test_weights_of_probe_rows_inside_the_training_data_move_mu_as_predicted(model, method):
    g, chi = model
    rows = np.array([0, 3, 4, 8])  # a probe of 4 of the M training points, 3 observables
    target = chi[:, rows] @ np.array([0.3, -0.2, 0.1, -0.2]) / M
    kw = {"alpha": 1e-12} if method == "ridge" else {}
    plan = invert(chi[:, rows], target, method=method, num_data=M, **kw)
    w = np.ones(M)
    w[rows] = plan.weights
    np.testing.assert_allclose(g.moved(w, 1e-4), plan.predicted, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(plan.predicted, target, rtol=1e-6)
    if method == "constrained":
        assert plan.weights.min() >= 0
    # without num_data the same weights are read as if the 4 rows were the whole data: the prediction is M / 4
    # times what they do inside the M points
    whole = invert(chi[:, rows], target, method=method, **kw)
    w = np.ones(M)
    w[rows] = whole.weights
    np.testing.assert_allclose(g.moved(w, 1e-4), whole.predicted * rows.size / M, rtol=1e-6, atol=1e-9)


def test_more_observables_than_probe_points_give_the_least_squares_response(model):
    g, chi = model
    rows = np.array([2, 7])  # 3 observables, 2 points: one sum-zero direction of re-weighting
    target = np.array([0.01, -0.02, 0.005])
    plan = invert(chi[:, rows], target, num_data=M)
    # independent: the one direction d = (1, -1) / sqrt 2 of sum-zero weights; best step along it
    col = chi[:, rows] @ np.array([1.0, -1.0]) / M
    step = (col @ target) / (col @ col)
    np.testing.assert_allclose(plan.weights, 1 + step * np.array([1.0, -1.0]), rtol=1e-9)
    np.testing.assert_allclose(plan.predicted, step * col, rtol=1e-9)
    np.testing.assert_allclose(
        plan.residual, np.linalg.norm(step * col - target) / np.linalg.norm(target), rtol=1e-9
    )
    w = np.ones(M)
    w[rows] = plan.weights
    np.testing.assert_allclose(g.moved(w, 1e-4), plan.predicted, rtol=1e-6, atol=1e-9)


def test_columns_that_are_no_data_points_keep_weight_one_and_leave_the_response_unchanged(model):
    g, chi = model
    rows = np.array([1, 5, 6, 9])
    padded = np.zeros((3, 7))
    counted = np.array([True, False, True, True, False, True, False])
    padded[:, counted] = chi[:, rows]
    target = np.array([0.004, -0.003, 0.002])
    for kw in ({}, {"method": "constrained", "max_weight": 1.5}):
        plan = invert(padded, target, counted=counted, num_data=M, **kw)
        ref = invert(chi[:, rows], target, num_data=M, **kw)
        np.testing.assert_allclose(plan.weights[counted], ref.weights, rtol=1e-12, atol=1e-12)
        assert (plan.weights[~counted] == 1).all()
        np.testing.assert_allclose(plan.predicted, ref.predicted, rtol=1e-12, atol=1e-15)
        w = np.ones(M)
        w[rows] = plan.weights[counted]
        np.testing.assert_allclose(g.moved(w, 1e-4), plan.predicted, rtol=1e-6, atol=1e-9)


def test_bounded_weights_at_their_bounds_move_mu_as_predicted(model):
    g, chi = model
    target = 5 * chi @ np.linspace(-1, 1, M) / M  # beyond what weights in [0.5, 1.5] reach
    plan = invert(chi, target, method="constrained", min_weight=0.5, max_weight=1.5)
    assert plan.weights.min() >= 0.5 - 1e-12 and plan.weights.max() <= 1.5 + 1e-12
    assert np.isclose(plan.weights, 0.5).any() or np.isclose(plan.weights, 1.5).any()
    np.testing.assert_allclose(plan.weights.mean(), 1.0, rtol=1e-12)
    assert 0 < plan.residual < 1
    np.testing.assert_allclose(g.moved(plan.weights, 1e-4), plan.predicted, rtol=1e-6, atol=1e-9)
    # no re-weighting within the bounds comes closer to the target (random feasible ones, exact response)
    rng = np.random.default_rng(2)
    best = np.linalg.norm(plan.predicted - target)
    for _ in range(200):
        v = np.clip(plan.weights + 0.1 * rng.normal(size=M), 0.5, 1.5)
        v += (M - v.sum()) / M
        if v.min() >= 0.5 and v.max() <= 1.5:
            assert np.linalg.norm(chi @ (v - 1) / M - target) >= best * (1 - 1e-12)


def test_ridge_penalises_the_weights_the_same_with_and_without_num_data(model):
    _, chi = model
    rows = np.array([0, 2, 5, 6, 9])
    c = chi[:, rows]
    target = np.array([0.01, -0.004, 0.003])
    cc = c - c.mean(1, keepdims=True)
    n = rows.size
    for num_data, alpha in ((None, 0.3), (M, 0.3), (4 * M, 2.0)):
        m = n if num_data is None else num_data
        plan = invert(c, target, method="ridge", alpha=alpha, num_data=num_data)
        # independent: min |cc (w - 1) / m - target|^2 + alpha |w - 1|^2 / n^2 by stacked least squares
        stacked = np.vstack([cc / m, np.sqrt(alpha) / n * np.eye(n)])
        d = np.linalg.lstsq(stacked, np.concatenate([target, np.zeros(n)]), rcond=None)[0]
        np.testing.assert_allclose(plan.weights, 1 + d, rtol=1e-10, atol=1e-12)
        h = cc.T @ np.linalg.solve(cc @ cc.T + alpha * (m / n) ** 2 * np.eye(3), target)
        np.testing.assert_allclose(plan.h, h, rtol=1e-10, atol=1e-14)
