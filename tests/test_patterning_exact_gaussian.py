"""Susceptibilities and patterning as one pipeline, against a model whose localized tempered posterior is Gaussian.

Linear regression ``y = x . w`` with the squared error, trained on ``N`` points that are also the probe. With
per-sample data weights ``v`` (mean 1) the re-weighted loss is ``L_v = (1/N) sum_z v_z l_z`` and the localized
tempered posterior ``exp(-nβ L_v(w) - γ/2 |w - w*|²)`` is Gaussian: precision ``P_v = 2 nβ A_v + γ I`` and mean
``P_v⁻¹ (-nβ a_v + γ w*)`` (``L_v = wᵀ A_v w + a_vᵀ w + c_v``). A component run holds the other coordinates at
``w*``: the Gaussian conditioned on them. ``E_v[phi]`` is then a closed form in ``v``, and its derivative with
respect to ``v`` (finite differences here, no covariance formula) is the exact linear response that ``chi``
estimates: ``d E[phi] = chi @ (v - 1) / N``.
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pypattern.patterning import invert, reweight
from pypattern.susceptibility import bif, susceptibilities

D, N, NBETA, GAMMA, EPS = 3, 12, 8.0, 20.0, 3e-3
SELS = {"first two": np.array([True, True, False]), "all": np.ones(D, dtype=bool)}


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w_true = torch.randn(D, generator=g, dtype=torch.float64)
    y = (x @ w_true + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)).unsqueeze(1)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():  # w* away from the least-squares optimum: the posterior mean moves too
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + 0.3)
    return model, x, y


class Exact:
    """Closed-form posterior of the problem under data weights ``v``, restricted to the coordinates ``sel``."""

    def __init__(self, model, x, y, nbeta=NBETA):
        self.nbeta = nbeta
        self.x, self.y = x.numpy(), y.numpy()[:, 0]
        self.w_star = model.weight.detach().numpy()[0].copy()
        self.A0 = self.x.T @ self.x / N
        self.a0 = -2 * self.x.T @ self.y / N
        self.c0 = self.y @ self.y / N

    def posterior(self, v, sel):
        A = (self.x.T * v) @ self.x / N
        a = -2 * (self.x.T * v) @ self.y / N
        P = 2 * self.nbeta * A + GAMMA * np.eye(D)
        b = -self.nbeta * a + GAMMA * self.w_star
        Pss = P[np.ix_(sel, sel)]
        m = self.w_star.copy()
        m[sel] = np.linalg.solve(Pss, b[sel] - P[np.ix_(sel, ~sel)] @ self.w_star[~sel])
        S = np.zeros((D, D))
        S[np.ix_(sel, sel)] = np.linalg.inv(Pss)
        return m, S, P

    def mean_phi(self, v, sel):
        """E_v[phi] with phi the (unweighted) training loss."""
        m, S, _ = self.posterior(v, sel)
        return np.trace(self.A0 @ S) + m @ self.A0 @ m + self.a0 @ m + self.c0

    def response(self, sel, d=1e-6):
        """N dE[phi]/dv_z, centred over z (a uniform change of v is no re-weighting): the physics chi row."""
        out = np.empty(N)
        for z in range(N):
            e = np.zeros(N)
            e[z] = d
            out[z] = (self.mean_phi(1 + e, sel) - self.mean_phi(1 - e, sel)) / (2 * d) * N
        return out - out.mean()

    def map_phi(self, v):
        """phi at the minimiser of nβ L_v + γ/2 |w - w*|² (all coordinates)."""
        m, _, _ = self.posterior(v, np.ones(D, dtype=bool))
        return m @ self.A0 @ m + self.a0 @ m + self.c0


SAMPLER = dict(
    num_chains=8,
    num_draws=800,
    num_steps_bw_draws=3,
    num_burnin_steps=150,
    step_size=EPS,
    nbeta=NBETA,
    localization=GAMMA,
    seed=3,
    quiet=True,
)


@pytest.fixture(scope="module")
def run():
    model, x, y = _problem()
    comps = {"first two": {"weight": torch.tensor([[True, True, False]])}, "all": ["weight"]}
    res = susceptibilities(model, [(x, y)], (x, y), comps, **SAMPLER)
    return model, x, y, res, Exact(model, x, y)


def _discretisation_bias(ex):
    """SGLD at step ε samples the covariance (P - ε P²/4)⁻¹: covariances, hence chi, are larger than the
    posterior's by at most about ε λ_max(P) / 4."""
    _, _, P = ex.posterior(np.ones(N), np.ones(D, dtype=bool))
    lam = float(np.linalg.eigvalsh(P).max())
    return EPS * lam / 4 / (1 - EPS * lam / 4)


def test_chi_is_the_exact_linear_response_of_the_posterior_mean_to_data_weights(run):
    _, _, _, res, ex = run
    bias = _discretisation_bias(ex)
    assert bias < 0.05
    for k, name in enumerate(res.components):
        exact = ex.response(SELS[name])
        err = np.abs(res.chi[k] - exact)
        # within its standard error plus the step's known bias, entry by entry
        assert np.all(err < 4 * res.chi_se[k] + bias * np.abs(exact) + 1e-3 * np.abs(exact).max()), (
            name,
            res.chi[k],
            exact,
            res.chi_se[k],
        )
        assert np.linalg.norm(res.chi[k] - exact) / np.linalg.norm(exact) < 0.1
        # the standard error is not vacuous: a few percent of chi's scale
        assert np.median(res.chi_se[k]) < 0.1 * np.abs(exact).max()


@pytest.mark.parametrize("nbeta", [2 * NBETA, None])
def test_chi_scales_with_nbeta_as_the_response_does(nbeta):
    """Another nβ changes the exact response and the estimate alike: chi's nβ is the one the sampler ran at, also
    when it is the sampler's default (nbeta=None), and the result reports it."""
    model, x, y = _problem()
    kw = dict(SAMPLER, nbeta=nbeta, num_draws=400, seed=5)
    if nbeta is None:
        del kw["nbeta"]
    res = susceptibilities(model, [(x, y)], (x, y), ["weight"], **kw)
    if nbeta is not None:
        assert res.nbeta == nbeta
    else:
        assert res.nbeta > 0 and res.nbeta != NBETA
    exact = Exact(model, x, y, nbeta=res.nbeta).response(SELS["all"])
    assert np.linalg.norm(res.chi[0] - exact) / np.linalg.norm(exact) < 0.12


def test_principal_directions_are_the_eigenvectors_of_the_covariance_of_chis_columns(run):
    _, _, _, res, _ = run
    rng = np.random.default_rng(0)
    for chi in (res.chi, rng.normal(size=(5, 40)) * np.array([[3.0], [1.0], [0.3], [2.0], [0.1]])):
        r = dataclasses.replace(
            res, chi=chi, components=[f"c{i}" for i in range(len(chi))], probe_counted=None
        )
        for whiten in (False, True):
            p = r.pca(whiten=whiten)
            c = np.cov(chi)  # components x components, ddof 1 over probe points
            if whiten:
                c = np.corrcoef(chi)
            vals, vecs = np.linalg.eigh(c)
            order = np.argsort(vals)[::-1]
            vals, vecs = vals[order], vecs[:, order]
            np.testing.assert_allclose(p.explained_variance, vals, rtol=1e-9, atol=1e-12 * vals[0])
            np.testing.assert_allclose(p.explained_variance_ratio, vals / vals.sum(), rtol=1e-9, atol=1e-12)
            for i in range(len(vals)):
                if vals[i] < 1e-9 * vals[0]:
                    continue
                v = vecs[:, i] * np.sign(vecs[np.abs(vecs[:, i]).argmax(), i])  # documented sign rule
                top2 = np.sort(np.abs(v))[-2:] if len(v) > 1 else np.array([0.0, 1.0])
                if (
                    top2[1] - top2[0] < 1e-9
                ):  # the largest entry is tied (a 2 x 2 correlation): sign undefined
                    v = v * np.sign(v @ p.directions[i])
                np.testing.assert_allclose(p.directions[i], v, atol=1e-8)
                np.testing.assert_allclose(np.linalg.norm(p.directions[i]), 1.0, rtol=1e-12)
            # scores: the centred (scaled) columns on the directions
            xc = (chi.T - chi.T.mean(0)) / (p.scale if whiten else 1.0)
            np.testing.assert_allclose(p.scores, xc @ p.directions.T, atol=1e-10)


def test_bif_is_minus_the_covariance_and_agrees_with_chi_of_a_probe_loss():
    """chi of the observable phi = l_j (all weights moving) is nβ (BIF[j, z] - mean_z' BIF[j, z']): the same
    draws read by the two estimators, so the two agree to rounding."""
    model, x, y = _problem()
    kw = dict(SAMPLER, num_draws=200, num_chains=2, warn_nonstationary=False)
    b = bif(model, [(x, y)], (x, y), **kw)
    assert np.allclose(b.bif, b.bif.T)
    assert np.all(np.linalg.eigvalsh(-b.bif) > -1e-12)  # minus a covariance matrix: negative semi-definite
    np.testing.assert_allclose(np.diag(b.corr), 1.0)
    d = np.sqrt(np.diag(-b.bif))
    np.testing.assert_allclose(b.corr, -b.bif / np.outer(d, d), atol=1e-10)
    j = 4

    def lj(m):
        return ((m(x[j : j + 1]) - y[j : j + 1]) ** 2).sum()

    res = susceptibilities(model, [(x, y)], (x, y), ["weight"], observable=lj, **kw)
    expected = NBETA * (b.bif[j] - b.bif[j].mean())
    np.testing.assert_allclose(res.chi[0], expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["pinv", "ridge", "constrained"])
def test_inverted_weights_move_the_exact_posterior_mean_by_the_target(run, method):
    _, _, _, res, ex = run
    target = np.array([-0.004, 0.003])  # small against the loss (about 0.3): the linear regime
    plan = invert(res.chi, target, method=method, alpha=1e-6 if method == "ridge" else 0.0)
    np.testing.assert_allclose(plan.predicted, res.chi @ plan.h, rtol=1e-12)
    np.testing.assert_allclose(plan.weights, 1 + N * plan.h, rtol=1e-12)
    np.testing.assert_allclose(plan.weights.mean(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(plan.predicted, target, rtol=1e-3 if method == "ridge" else 1e-9)
    if method == "constrained":
        assert plan.weights.min() >= 0
    bias = _discretisation_bias(ex)
    for k, name in enumerate(res.components):
        moved = ex.mean_phi(plan.weights, SELS[name]) - ex.mean_phi(np.ones(N), SELS[name])
        # the weights move the exact posterior mean by the target, up to chi's error and the linearisation
        assert np.sign(moved) == np.sign(target[k])
        assert abs(moved - target[k]) < 0.15 * abs(target[k]) + bias * np.abs(target).max(), (
            name,
            moved,
            target,
        )


def test_an_unreachable_target_is_the_least_squares_best_over_reweightings(run):
    _, _, _, res, _ = run
    # two observables, rank-1 chi: only the response along chi's one row direction is reachable
    chi = np.vstack([res.chi[1], 2 * res.chi[1]])
    target = np.array([0.01, 0.0])
    plan = invert(chi, target, method="pinv")
    cc = chi - chi.mean(1, keepdims=True)
    best, *_ = np.linalg.lstsq(cc, target, rcond=None)
    np.testing.assert_allclose(plan.predicted, cc @ best, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(plan.predicted, [0.002, 0.004], rtol=1e-9)  # projection onto (1, 2)
    assert plan.residual == pytest.approx(np.linalg.norm([0.008, -0.004]) / 0.01, rel=1e-9)


def test_reweighted_training_moves_the_observable_as_predicted(run):
    """Train (gradient descent from w*) on the re-weighted localized loss nβ mean(v_z l_z) + γ/2 |w - w*|², with
    the loss weights from reweight(): phi at the trained weights moves with the sign and roughly the size of the
    linear prediction, and more than the same training on the original weights."""
    model, x, y, res, ex = run
    target = np.array([-0.004])
    plan = invert(res.chi[1:], target, method="constrained")
    v = reweight(x, plan, mode="loss").to(torch.float64)
    np.testing.assert_allclose(v.numpy(), plan.weights, rtol=1e-6)

    def train(weights):
        w = model.weight.detach().clone().requires_grad_(True)
        w_star = model.weight.detach().clone()
        opt = torch.optim.SGD([w], lr=5e-3)
        for _ in range(3000):
            opt.zero_grad()
            per = ((x @ w.T - y) ** 2)[:, 0]
            loss = NBETA * (weights * per).mean() + GAMMA / 2 * ((w - w_star) ** 2).sum()
            loss.backward()
            opt.step()
        return float(((x @ w.detach().T - y) ** 2).mean())

    base, moved = train(torch.ones(N, dtype=torch.float64)), train(v)
    # training reaches the closed-form minimiser
    assert base == pytest.approx(ex.map_phi(np.ones(N)), rel=1e-6)
    assert moved == pytest.approx(ex.map_phi(plan.weights), rel=1e-6)
    change = moved - base
    assert np.sign(change) == np.sign(target[0])
    assert 0.5 < change / target[0] < 2.0


@pytest.mark.parametrize(
    "target, match",
    [
        (np.zeros(3), r"target must have one entry per observable \(2\)"),
        (np.array([np.nan, 0.0]), "target holds NaN"),
        (np.array([np.inf, 0.0]), "target holds NaN or Inf"),
        (np.zeros((2, 2)), "target has shape"),
        (np.zeros(N), "transposed"),
    ],
)
def test_bad_targets_are_refused_by_name(run, target, match):
    _, _, _, res, _ = run
    with pytest.raises(ValueError, match=match):
        invert(res.chi, target)


@pytest.mark.parametrize("method", ["pinv", "ridge", "constrained"])
def test_weights_for_a_probe_drawn_from_the_training_data_move_the_posterior_as_predicted(method):
    """chi over a probe of 6 of the 12 training points: the weights re-weight those 6 inside the 12 (the others at
    weight 1), a perturbation (w - 1) / 12 per point. With num_data=12 the exact posterior mean moves by the
    target; without it (the columns read as the whole data) the prediction is twice the response."""
    model, x, y = _problem()
    ex = Exact(model, x, y)
    sel = SELS["all"]
    per_point = ex.response(sel)  # chi_z of every training point (mixing towards z)
    chi = (per_point[:6] - per_point[:6].mean())[
        None
    ]  # the physics chi over the probe (Lbar: the probe mean)
    target = np.array([-0.002])
    alpha = 1e-9 if method == "ridge" else 0.0
    plan = invert(chi, target, method=method, alpha=alpha, num_data=N)
    np.testing.assert_allclose(plan.predicted, target, rtol=1e-4)
    np.testing.assert_allclose(plan.h, (plan.weights - 1) / N, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(plan.predicted, chi @ plan.h, rtol=1e-12)
    np.testing.assert_allclose(plan.weights.mean(), 1.0, rtol=1e-12)
    v = np.ones(N)
    v[:6] = plan.weights
    moved = ex.mean_phi(v, sel) - ex.mean_phi(np.ones(N), sel)
    assert moved == pytest.approx(target[0], rel=0.05)
    # the columns read as the whole data: predicted the target, moved half of it
    whole = invert(chi, target, method=method, alpha=alpha)
    v[:6] = whole.weights
    assert ex.mean_phi(v, sel) - ex.mean_phi(np.ones(N), sel) == pytest.approx(target[0] / 2, rel=0.05)
    np.testing.assert_allclose(whole.weights - 1, (plan.weights - 1) / 2, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_data=3), r"num_data=3 is not valid.*int >= 6"),
        (dict(num_data=12.0), r"num_data=12.0 is not valid"),
        (dict(num_data=True), r"num_data=True is not valid"),
        (dict(num_data=12, fractions=np.ones(6), method="constrained"), "num_data and fractions"),
    ],
)
def test_num_data_is_checked_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        invert(np.arange(6.0)[None], np.array([1.0]), **kw)


def test_training_on_the_weighted_sampler_moves_the_observable_as_predicted(run):
    """The same with minibatch SGD on reweight()'s weighted-sampling loader (batches drawn with probability
    proportional to the weights; iterates averaged): phi moves by the target, within the noise and the
    linearisation, against the same training (the same draws' generator) on uniform weights."""
    model, x, y, res, ex = run
    target = np.array([-0.004])
    plan = invert(res.chi[1:], target, method="constrained")
    data = torch.utils.data.TensorDataset(x, y)

    def train(weights, steps=3000):
        loader = reweight(
            data, weights, batch_size=6, num_samples=6 * steps, generator=torch.Generator().manual_seed(0)
        )
        w = model.weight.detach().clone().requires_grad_(True)
        w_star = model.weight.detach().clone()
        opt = torch.optim.SGD([w], lr=2e-3)
        avg = torch.zeros_like(w)
        for t, (xb, yb) in enumerate(loader):
            opt.zero_grad()
            loss = NBETA * ((xb @ w.T - yb) ** 2).mean() + GAMMA / 2 * ((w - w_star) ** 2).sum()
            loss.backward()
            opt.step()
            if t >= steps // 2:
                avg += w.detach()
        avg /= steps - steps // 2
        return float(((x @ avg.T - y) ** 2).mean())

    change = train(plan) - train(np.ones(N))
    assert np.sign(change) == np.sign(target[0])
    assert 0.6 < change / target[0] < 1.6


def test_principal_directions_of_a_chi_without_counted_columns_are_refused(run):
    _, _, _, res, _ = run
    r = dataclasses.replace(res, probe_counted=np.zeros(res.chi.shape[1], dtype=bool))
    with pytest.raises(ValueError, match="probe_counted is False at every probe column"):
        r.pca()
    # one counted column: its direction is an arbitrary unit vector of variance 0, and no warning
    one = np.zeros(res.chi.shape[1], dtype=bool)
    one[3] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = dataclasses.replace(res, probe_counted=one).pca()
    np.testing.assert_allclose(p.explained_variance, 0.0, atol=1e-30)
    np.testing.assert_allclose(np.linalg.norm(p.directions, axis=1), 1.0)
    assert np.isnan(p.scores[~one]).all() and np.allclose(p.scores[one], 0.0)


def test_the_demo_report_writes_numpy_values_as_json_values():
    from pypattern.experiments.patterning_demo import _jsonable

    got = _jsonable(
        {
            "hit": np.bool_(True),
            "flags": np.array([True, False]),
            3: (np.float32(1.5), np.int8(3)),
            "x": np.inf,
        }
    )
    assert got == {"hit": True, "flags": [True, False], "3": [1.5, 3], "x": None}
    assert type(got["hit"]) is bool and type(got["3"][1]) is int
