"""Susceptibilities of masked components, their standard errors, principal directions and scaling invariances
against the closed forms of a Gaussian posterior.

Linear regression ``y = x . w`` with the squared error, full batch: SGLD with step ``ε`` restricted to the
coordinates ``sel`` of ``w`` (the others held at ``w*``) has an exactly Gaussian stationary law, the conditional
Gaussian of ``U = nβ L(w) + γ/2 |w - w*|² = ½ wᵀPw - hᵀw``: mean ``P_ss⁻¹ (h_s - P_sr w*_r)`` and covariance
``(P_ss - ε P_ss² / 4)⁻¹``. Observables and per-sample losses are quadratic in ``w``, so means and covariances have
closed forms (Isserlis): ``E[wᵀAw + aᵀw] = tr(AΣ) + mᵀAm + aᵀm`` and
``Cov(wᵀAw + aᵀw, wᵀBw + bᵀw) = 2 tr(AΣBΣ) + (2Am + a)ᵀ Σ (2Bm + b)``, all computed here in float64 with numpy.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern.models.transformer import Transformer, TransformerConfig

D, N, NBETA, GAMMA, EPS, NPROBE = 4, 48, 10.0, 20.0, 5e-3, 10
SELS = {"a": [1, 1, 0, 0], "b": [0, 0, 1, 1], "c": [1, 0, 1, 0], "d": [0, 1, 0, 1], "all": [1, 1, 1, 1]}
RUN = dict(
    num_draws=300,
    num_steps_bw_draws=2,
    num_burnin_steps=200,
    step_size=EPS,
    nbeta=NBETA,
    localization=GAMMA,
    quiet=True,
    warn_nonstationary=False,
)


def _problem(seed=3):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 0.7, 1.3, 0.5], dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    w = torch.randn(D, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(N, generator=g, dtype=torch.float64))[:, None]
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():  # w* off the least-squares optimum: the restricted and full means differ
        shift = 0.25 * torch.randn(1, D, generator=g, dtype=torch.float64)
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + shift)
    return model, x, y


def _components(names):
    return {k: {"weight": torch.tensor([SELS[k]], dtype=torch.bool)} for k in names}


def _law(xn, yn, w_star, sel, eps=EPS):
    """Mean (all coordinates) and covariance (0 outside ``sel``) of SGLD's stationary law moving ``sel`` only."""
    sel = np.asarray(sel, bool)
    P = 2 * NBETA * xn.T @ xn / N + GAMMA * np.eye(D)
    h = 2 * NBETA * xn.T @ yn / N + GAMMA * w_star
    Pss = P[np.ix_(sel, sel)]
    m = w_star.copy()
    m[sel] = np.linalg.solve(Pss, h[sel] - P[np.ix_(sel, ~sel)] @ w_star[~sel])
    S = np.zeros((D, D))
    S[np.ix_(sel, sel)] = np.linalg.inv(Pss - eps * Pss @ Pss / 4)
    return m, S


def _cov(A, a, B, b, m, S):
    return 2 * np.trace(A @ S @ B @ S) + (2 * A @ m + a) @ S @ (2 * B @ m + b)


def _mean(A, a, m, S):
    return np.trace(A @ S) + m @ A @ m + a @ m


def _terms(model, x, y):
    """``w*``, phi (the full-batch loss) and ``l_t - Lbar`` for each probe sample, as ``(A, a)`` forms."""
    xn, yn = x.numpy(), y.numpy()[:, 0]
    w_star = model.weight.detach().numpy()[0]
    phi = (xn.T @ xn / N, -2 * xn.T @ yn / N)
    losses = [(np.outer(xi, xi), -2 * yi * xi) for xi, yi in zip(xn[:NPROBE], yn[:NPROBE])]
    A_bar = sum(t[0] for t in losses) / NPROBE
    a_bar = sum(t[1] for t in losses) / NPROBE
    return xn, yn, w_star, phi, [(A - A_bar, a - a_bar) for A, a in losses]


def _exact_physics(model, x, y, names):
    xn, yn, w_star, phi, diffs = _terms(model, x, y)
    out = []
    for k in names:
        m, S = _law(xn, yn, w_star, SELS[k])
        out.append([-NBETA * _cov(*phi, B, b, m, S) for B, b in diffs])
    return np.array(out)


def _run(model, x, y, names, seed, num_chains=16, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the step-bias advice: the exact answer is the discrete chain's
        return pp.susceptibilities(
            model,
            [(x, y)],
            (x[:NPROBE], y[:NPROBE]),
            _components(names),
            num_chains=num_chains,
            seed=seed,
            **{**RUN, **kw},
        )


@pytest.fixture(scope="module")
def gaussian():
    model, x, y = _problem()
    names = list(SELS)
    runs = [_run(model, x, y, names, seed) for seed in (0, 1)]
    return model, x, y, names, runs


def test_physics_chi_of_masked_components_is_the_conditional_gaussians_within_its_standard_error(gaussian):
    """Over two seeds and five components (masks over coordinates of one tensor), the z-scores of the estimate
    against the closed form are O(1): their mean square near 1, none beyond 5."""
    model, x, y, names, runs = gaussian
    exact = _exact_physics(model, x, y, names)
    z = np.stack([(r.chi - exact) / r.chi_se for r in runs])
    assert np.all(np.isfinite(z))
    assert 0.2 < np.mean(z**2) < 3.0, np.mean(z**2, axis=(0, 2))
    assert np.abs(z).max() < 5.0, np.round(z, 1)
    for r in runs:
        assert np.linalg.norm(r.chi - exact) / np.linalg.norm(exact) < 0.25
        # the standard error says something: a fraction of the row's scale
        assert np.all(r.chi_se.max(1) < 0.3 * np.abs(exact).max(1))
    # the components' rows differ from each other: a mix-up of rows would fail the comparison
    assert np.linalg.norm(exact[0] - exact[1]) > 0.5 * np.linalg.norm(exact[0])


def test_a_uniform_reweighting_of_the_probe_has_no_response(gaussian):
    """The physics chi of each component sums to 0 over the probe columns (``Lbar`` is their mean)."""
    _, _, _, _, runs = gaussian
    for r in runs:
        np.testing.assert_allclose(r.chi.sum(1), 0.0, atol=1e-10 * np.abs(r.chi).sum())


def test_principal_directions_converge_to_those_of_the_exact_chi(gaussian):
    """PCA of the estimated chi (components x probe samples) against the SVD of the centred exact matrix: the
    leading directions agree up to sign, and the shares of explained variance agree."""
    model, x, y, names, runs = gaussian
    exact = _exact_physics(model, x, y, names)
    xc = exact.T - exact.T.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ratio = s**2 / (s**2).sum()
    assert ratio[0] > 2 * ratio[1] > 4 * ratio[2]  # separated: the directions are well defined
    for r in runs:
        p = r.pca()
        assert abs(p.directions[0] @ vt[0]) > 0.98
        assert abs(p.directions[1] @ vt[1]) > 0.9
        np.testing.assert_allclose(p.explained_variance_ratio[:2], ratio[:2], atol=0.04)
        np.testing.assert_allclose(p.explained_variance[:2], s[:2] ** 2 / (NPROBE - 1), rtol=0.5)
        # the scores are the centred columns on the directions
        np.testing.assert_allclose(p.scores, (r.chi.T - r.chi.T.mean(0)) @ p.directions.T, atol=1e-10)


def test_devinterp_chi_of_a_masked_component_is_its_closed_form():
    """devinterp's ``E_C[phi' Lbar] - E_C[phi' l_t] - E_C[phi'] (E_full[Lbar] - E_full[l_t])`` with
    ``phi' = phi - phi(w*)`` equals ``Cov_C(phi, Lbar - l_t) + E_C[phi'] (E_C[Lbar - l_t] - E_full[Lbar - l_t])``;
    on a masked component the restricted and full means differ, so the second term is not 0 (here, with ``w*``
    further off the optimum, it is larger than the first)."""
    model, x, y = _problem()
    with torch.no_grad():
        model.weight.add_(torch.tensor([[0.25, -0.25, 0.25, -0.25]], dtype=torch.float64))
    xn, yn, w_star, phi, diffs = _terms(model, x, y)
    mc, Sc = _law(xn, yn, w_star, SELS["a"])
    mf, Sf = _law(xn, yn, w_star, SELS["all"])
    phi_shift = _mean(*phi, mc, Sc) - _mean(*phi, w_star, np.zeros((D, D)))  # E_C[phi] - phi(w*)
    cov_term = np.array([_cov(*phi, B, b, mc, Sc) for B, b in diffs])
    mean_term = np.array([_mean(B, b, mc, Sc) - _mean(B, b, mf, Sf) for B, b in diffs])
    exact = -(
        cov_term + phi_shift * mean_term
    )  # diffs are l_t - Lbar: the formula's Lbar - l_t is minus them
    assert np.linalg.norm(phi_shift * mean_term) > np.linalg.norm(cov_term)  # the shift term matters
    res = _run(model, x, y, ["a"], seed=2, convention="devinterp", num_draws=400)
    z = (res.chi[0] - exact) / res.chi_se[0]
    assert np.abs(z).max() < 5.0 and np.mean(z**2) < 3.0, (res.chi[0], exact, res.chi_se[0])
    assert np.linalg.norm(res.chi[0] - exact) / np.linalg.norm(exact) < 0.3
    # the estimate carries the shift term: the covariance alone is far from it
    assert np.linalg.norm(res.chi[0] - exact) < 0.3 * np.linalg.norm(res.chi[0] + cov_term)


def test_scaling_the_loss_and_dividing_nbeta_leaves_the_draws_and_scales_chi_and_bif():
    """``L -> c L`` with ``nβ -> nβ / c`` (c a power of two: every draw the same, bit for bit) leaves the
    posterior alone: chi = -nβ Cov(phi, l - Lbar) with phi = c L scales by c, chi of an observable of its own
    does not change, the BIF scales by c², and the devinterp chi (no nβ) by c²."""
    model, x, y = _problem()
    c = 4.0
    kw = dict(num_chains=2, num_draws=40, num_burnin_steps=10, step_size=EPS, localization=GAMMA, quiet=True)
    kw["warn_nonstationary"] = False
    probe = (x[:NPROBE], y[:NPROBE])
    w0 = model.weight.detach().clone()

    def own_phi(m):
        return (m.weight - w0).pow(2).sum() + m.weight[0, 0]

    def scaled(k):
        return dict(
            loss_fn=lambda m, b: k * ((m(b[0]) - b[1]) ** 2).mean(),
            per_sample_loss_fn=lambda m, b: k * ((m(b[0]) - b[1]) ** 2).mean(1),
        )

    out = {}
    for k, nbeta in ((1.0, NBETA), (c, NBETA / c)):
        f = scaled(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[k] = (
                pp.susceptibilities(model, [(x, y)], probe, ["weight"], nbeta=nbeta, seed=5, **f, **kw),
                pp.susceptibilities(
                    model, [(x, y)], probe, ["weight"], observable=own_phi, nbeta=nbeta, seed=5, **f, **kw
                ),
                pp.susceptibilities(
                    model, [(x, y)], probe, ["weight"], convention="devinterp", nbeta=nbeta, seed=5, **f, **kw
                ),
                pp.bif(model, [(x, y)], probe, nbeta=nbeta, seed=5, **f, **kw),
            )
    (chi1, own1, dev1, bif1), (chic, ownc, devc, bifc) = out[1.0], out[c]
    assert np.abs(chi1.chi).max() > 0
    np.testing.assert_allclose(chic.chi, c * chi1.chi, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(chic.chi_se, c * chi1.chi_se, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ownc.chi, own1.chi, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(devc.chi, c**2 * dev1.chi, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bifc.bif, c**2 * bif1.bif, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bifc.corr, bif1.corr, rtol=1e-9, atol=1e-12)
    assert chic.nbeta == NBETA / c and chi1.nbeta == NBETA


def test_physics_chi_does_not_change_when_the_observable_is_shifted_by_a_constant():
    """A covariance does not see a constant: ``phi + 1000`` gives the chi of ``phi`` (the documented physics
    invariance), while ``phi_mean`` moves by the constant."""
    model, x, y = _problem()
    kw = dict(num_chains=2, num_draws=40, num_burnin_steps=10, step_size=EPS, localization=GAMMA, nbeta=NBETA)
    kw.update(quiet=True, warn_nonstationary=False, seed=3)
    probe = (x[:NPROBE], y[:NPROBE])

    def phi(m):
        return ((m(x) - y) ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pp.susceptibilities(model, [(x, y)], probe, ["weight"], observable=phi, **kw)
        b = pp.susceptibilities(
            model, [(x, y)], probe, ["weight"], observable=lambda m: phi(m) + 1000.0, **kw
        )
    np.testing.assert_allclose(b.chi, a.chi, rtol=1e-8, atol=1e-10 * np.abs(a.chi).max())
    np.testing.assert_allclose(b.phi_mean, a.phi_mean + 1000.0, rtol=1e-12)


def test_per_token_chi_of_a_padded_probe_sums_to_zero_over_its_counted_tokens():
    """Per-token columns: the padded ones are 0 and marked, and the counted ones sum to 0 per component (a
    uniform re-weighting of the counted tokens moves nothing); per-sample columns are not padded."""
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, d_vocab=7, n_ctx=8, seed=0)
    model = Transformer(cfg).double()
    g = torch.Generator().manual_seed(1)
    am = torch.ones(3, 6, dtype=torch.long)
    am[1, 4:] = 0
    am[2, 3:] = 0
    probe = {"input_ids": torch.randint(0, 7, (3, 6), generator=g) * am, "attention_mask": am}
    loader = [
        {"input_ids": torch.randint(0, 7, (4, 6), generator=g), "attention_mask": torch.ones(4, 6).long()}
    ]
    counted = (am[:, 1:] & am[:, :-1]).bool().reshape(-1).numpy()
    kw = dict(num_chains=2, num_draws=30, num_burnin_steps=2, step_size=1e-3, localization=100.0, nbeta=10.0)
    kw.update(seed=1, quiet=True, warn_nonstationary=False)
    res = pp.susceptibilities(model, loader, probe, ["blocks.0.mlp", "blocks.0.attn.head.1"], **kw)
    np.testing.assert_array_equal(res.probe_counted, counted)
    assert np.all(res.chi[:, ~counted] == 0) and np.all(np.abs(res.chi[:, counted]) > 0)
    np.testing.assert_allclose(res.chi[:, counted].sum(1), 0.0, atol=1e-10 * np.abs(res.chi).sum())
    samples = pp.susceptibilities(model, loader, probe, ["blocks.0.mlp"], per_token=False, **kw)
    assert samples.chi.shape == (1, 3) and samples.probe_counted is None
    np.testing.assert_allclose(samples.chi.sum(1), 0.0, atol=1e-10 * np.abs(samples.chi).sum())
