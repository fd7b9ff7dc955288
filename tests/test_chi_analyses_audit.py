"""Susceptibility and BIF results against computations written here.

* ``chi`` (pooled over every chain's draws), ``chi_chains`` and the jackknife ``chi_se`` of both conventions,
  recomputed from the draws themselves (recorded by a wrapper of the sampler, the losses computed here);
  ``chi_se`` NaN with one chain;
* ``pca`` against ``numpy.linalg.eigh`` of the covariance (``ddof=1``) of the counted probe points, and of their
  correlation matrix with ``whiten=True``; the sign convention, the scores, the explained-variance shares; a
  non-finite ``chi`` refused by name;
* the BIF: exactly symmetric, its diagonal minus the variance of each probe loss over the draws, the correlation
  within [-1, 1] with 1 on its diagonal; per-token BIF of a padded probe 0 (and its correlation NaN) at the entries
  that do not count;
* the linear-response identity of SCIENCE.md for a component (SGLD moving only some weights): on linear regression
  the restricted posterior is Gaussian, ``-nβ Cov_C(φ, l_z - L̄)`` equals the derivative of ``E_C[φ]`` under the
  re-weighting by finite differences, and the estimator matches the closed form within its standard error;
* the results' save / load round trip, and the table's column of counted entries.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
import pypattern.susceptibility as S
from pypattern.models.transformer import Transformer, TransformerConfig

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.StepBiasWarning"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning"),
]

NBETA = 8.0


def _regression(seed=0, n=16, d=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (
        x @ torch.randn(d, generator=g, dtype=torch.float64)
        + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    )[:, None]
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():  # off the least-squares optimum: the posterior mean moves
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + 0.2)
    xp = torch.randn(5, d, generator=g, dtype=torch.float64)
    return model, x, y, (xp, xp.sum(1, keepdim=True))


def _recording(records, mine):
    """The sampler the estimators call, also recording ``(chain, mine(model))`` at every draw of every run."""
    orig = S.sample

    def wrapped(model, loader, **kw):
        run = {"chain": [], "values": []}
        records.append(run)
        kw["observables"] = {**dict(kw["observables"]), "_mine": lambda m, b: mine(m).reshape(-1)}

        def keep(chain, observables):
            run["chain"].append(chain)
            run["values"].append(observables["_mine"].detach().numpy().copy())

        kw["callbacks"] = [*kw["callbacks"], keep]
        return orig(model, loader, **kw)

    return wrapped


def _chi_by_hand(phi, losses, convention, full_means=None):
    """chi from draws: ``phi (draws,)``, ``losses (draws, n)``; the devinterp formula with ``full_means``
    ``(E_full[l_1..l_n], E_full[Lbar])``."""
    lbar = losses.mean(1)
    if convention == "physics":
        return np.array([-NBETA * np.cov(phi, losses[:, j] - lbar)[0, 1] for j in range(losses.shape[1])])
    return np.array(
        [
            (phi * lbar).mean() - (phi * losses[:, j]).mean() - phi.mean() * (full_means[-1] - full_means[j])
            for j in range(losses.shape[1])
        ]
    )


def _full_means(losses):
    return np.concatenate([losses.mean(0), [losses.mean(1).mean()]])


@pytest.mark.parametrize("convention", ["physics", "devinterp"])
def test_chi_chains_and_jackknife_standard_error_equal_those_of_the_recorded_draws(monkeypatch, convention):
    model, x, y, probe = _regression()
    xp, yp = probe
    C = 3

    def mine(m):  # the probe's squared errors, then phi: the training data's mean squared error
        with torch.no_grad():
            return torch.cat([((m(xp) - yp) ** 2)[:, 0], ((m(x) - y) ** 2).mean().reshape(1)])

    records = []
    monkeypatch.setattr(S, "sample", _recording(records, mine))
    first = {"weight": torch.tensor([[True, False, False]])}
    res = pp.susceptibilities(
        model, [(x, y)], probe, {"first": first, "all": ["weight"]}, convention=convention, num_chains=C,
        num_draws=20, num_burnin_steps=5, step_size=1e-2, nbeta=NBETA, localization=5.0, seed=1, quiet=True,
        batched=False, group_size=1,
    )  # fmt: skip
    phi0 = float(mine(model)[-1])
    runs = [(np.array(r["chain"]), np.array(r["values"])) for r in records]
    full = full_loo = None
    if convention == "devinterp":  # the unrestricted run comes first: its means are the baseline
        (fch, fv), runs = runs[0], runs[1:]
        full = _full_means(fv[:, :-1])
        full_loo = [_full_means(fv[fch != c, :-1]) for c in range(C)]
    assert len(runs) == 2
    for k, (chain, v) in enumerate(runs):
        assert v.shape == (C * 20, 6) and sorted(set(chain)) == list(range(C))
        losses, phi = v[:, :-1], v[:, -1] - phi0

        def chi(sel, fm, phi=phi, losses=losses):
            return _chi_by_hand(phi[sel], losses[sel], convention, fm)

        pooled = chi(np.ones(len(chain), bool), full)
        per_chain = np.stack([chi(chain == c, full) for c in range(C)])
        loo = np.stack([chi(chain != c, None if full_loo is None else full_loo[c]) for c in range(C)])
        se = np.sqrt((C - 1) / C * ((loo - loo.mean(0)) ** 2).sum(0))
        scale = np.abs(pooled).max()
        np.testing.assert_allclose(res.chi[k], pooled, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(res.chi_chains[k], per_chain, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(res.chi_se[k], se, rtol=0, atol=1e-10 * scale)
        if convention == "physics":  # pooled over the draws, which is not the mean of the chains' estimates
            assert np.abs(per_chain.mean(0) - pooled).max() > 1e-3 * scale


def test_one_chain_gives_chi_its_chain_and_a_nan_standard_error():
    model, x, y, probe = _regression()
    res = pp.susceptibilities(
        model, [(x, y)], probe, {"all": ["weight"]}, num_chains=1, num_draws=15, step_size=1e-2, nbeta=NBETA,
        localization=5.0, seed=2, quiet=True,
    )  # fmt: skip
    assert res.chi_chains.shape == (1, 1, 5) and np.abs(res.chi).max() > 0
    np.testing.assert_array_equal(res.chi, res.chi_chains[:, 0])
    assert np.isnan(res.chi_se).all()


# ------------------------------------------------------------------------------------------------ principal directions
def _result(chi, counted=None):
    k, n = chi.shape
    return S.SusceptibilityResult(
        chi=chi, chi_se=np.zeros_like(chi), chi_chains=chi[:, None], components=[f"c{i}" for i in range(k)],
        probe_sample=np.arange(n), probe_position=-np.ones(n, np.int64), probe_token=-np.ones(n, np.int64),
        phi_mean=np.zeros(k), loss_mean=np.zeros((k, n)), convention="physics", nbeta=1.0, num_chains=1,
        num_draws=2, settings={}, probe_counted=counted,
    )  # fmt: skip


def _eig(matrix):
    """Eigenvalues (decreasing) and unit eigenvectors (rows), each with its largest-magnitude entry positive."""
    w, v = np.linalg.eigh(matrix)
    w, v = w[::-1], v[:, ::-1].T
    top = v[np.arange(len(v)), np.abs(v).argmax(1)]
    return w, v * np.sign(top)[:, None]


@pytest.mark.parametrize("seed", range(4))
def test_pca_is_the_eigendecomposition_of_the_covariance_or_correlation_of_the_counted_points(seed):
    rng = np.random.default_rng(seed)
    k, n = 4, 11
    chi = rng.normal(size=(k, n)) * rng.uniform(0.2, 5, size=(k, 1)) + rng.normal(size=(k, 1))
    counted = np.ones(n, bool)
    counted[rng.choice(n, size=2, replace=False)] = False
    chi[:, ~counted] = 0.0  # as the estimator reports them: far from the others, they must not count
    res = _result(chi, counted)
    pts = chi.T[counted]  # (counted probe points, components)
    for whiten, matrix in ((False, np.cov(pts.T, ddof=1)), (True, np.corrcoef(pts.T))):
        w, v = _eig(matrix)
        p = res.pca(whiten=whiten)
        np.testing.assert_allclose(p.explained_variance, w, rtol=1e-10)
        np.testing.assert_allclose(p.directions, v, atol=1e-9)
        assert np.all(p.directions[np.arange(k), np.abs(p.directions).argmax(1)] > 0)
        np.testing.assert_allclose(p.explained_variance_ratio, w / w.sum(), rtol=1e-10)
        scale = pts.std(0, ddof=1) if whiten else np.ones(k)
        np.testing.assert_allclose(p.scale, scale, rtol=1e-12)
        np.testing.assert_allclose(p.scores[counted], (pts - pts.mean(0)) / scale @ v.T, atol=1e-9)
        assert np.isnan(p.scores[~counted]).all()
        two = res.pca(2, whiten=whiten)
        np.testing.assert_allclose(two.explained_variance_ratio, w[:2] / w.sum(), rtol=1e-10)
        assert two.explained_variance_ratio.sum() <= 1.0 and two.scores.shape == (n, 2)


def test_whitening_leaves_a_component_of_constant_chi_unscaled_with_zero_variance():
    rng = np.random.default_rng(5)
    chi = np.vstack([rng.normal(size=(2, 9)), np.full((1, 9), 3.0)])
    p = _result(chi).pca(whiten=True)
    w, v = _eig(np.corrcoef(chi[:2]))
    np.testing.assert_allclose(p.scale, [*chi[:2].std(1, ddof=1), 1.0], rtol=1e-12)
    np.testing.assert_allclose(p.explained_variance, [*w, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(p.directions[:2, :2]), np.abs(v), atol=1e-10)
    np.testing.assert_allclose(p.directions[:2, 2], 0.0, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pca_refuses_a_non_finite_chi_at_a_counted_point_only(bad):
    chi = np.random.default_rng(0).normal(size=(2, 6))
    chi[1, 4] = bad
    with pytest.raises(ValueError, match="chi holds NaN or Inf"):
        _result(chi).pca()
    counted = np.ones(6, bool)
    counted[4] = False
    assert _result(chi, counted).pca().directions.shape == (2, 2)


# ------------------------------------------------------------------------------------------------ BIF
@pytest.mark.parametrize("seed", range(3))
def test_bif_is_symmetric_with_minus_the_loss_variances_on_its_diagonal_and_corr_within_bounds(
    monkeypatch, seed
):
    """Probe points repeated and mirrored (their losses equal on every draw): the correlation is 1 there, within
    [-1, 1] everywhere, exactly symmetric, as is the BIF."""
    model, x, y, (xp, yp) = _regression(seed)
    xp = torch.cat([xp, xp[:2], -xp[:1]]) * 10.0 ** (seed - 1)
    yp = torch.cat([yp, yp[:2], -yp[:1]]) * 10.0 ** (seed - 1)

    def mine(m):
        with torch.no_grad():
            return ((m(xp) - yp) ** 2)[:, 0]

    records = []
    monkeypatch.setattr(S, "sample", _recording(records, mine))
    res = pp.bif(
        model, [(x, y)], (xp, yp), num_chains=2, num_draws=60, step_size=1e-2, nbeta=NBETA, localization=5.0,
        seed=seed, quiet=True,
    )  # fmt: skip
    draws = np.array(records[0]["values"])
    assert draws.shape == (120, 8)
    want = -np.cov(draws.T, ddof=1)
    np.testing.assert_allclose(res.bif, want, rtol=0, atol=1e-10 * np.abs(want).max())
    np.testing.assert_array_equal(res.bif, res.bif.T)
    np.testing.assert_allclose(np.diag(res.bif), -draws.var(0, ddof=1), rtol=1e-10)
    assert np.all(np.diag(res.bif) < 0)
    np.testing.assert_array_equal(res.corr, res.corr.T)
    np.testing.assert_array_equal(np.diag(res.corr), 1.0)
    assert np.all(np.abs(res.corr) <= 1.0)
    np.testing.assert_allclose(res.corr, np.corrcoef(draws.T), rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.corr[[0, 1, 0], [5, 6, 7]], 1.0, rtol=0, atol=1e-12)  # the same losses
    d = np.sqrt(-np.diag(res.bif))
    np.testing.assert_allclose(res.corr, -res.bif / np.outer(d, d), rtol=0, atol=1e-12)


def _padded_lm():
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
    return model, loader, probe, counted


def test_per_token_bif_of_a_padded_probe_is_zero_and_its_corr_nan_at_the_entries_that_do_not_count():
    model, loader, probe, counted = _padded_lm()
    kw = dict(num_chains=2, num_draws=30, num_burnin_steps=2, step_size=1e-3, localization=100.0, nbeta=10.0)
    res = pp.bif(model, loader, probe, seed=1, quiet=True, **kw)
    np.testing.assert_array_equal(res.probe_counted, counted)
    assert np.all(res.bif[~counted] == 0) and np.all(res.bif[:, ~counted] == 0)
    assert np.isnan(res.corr[~counted]).all() and np.isnan(res.corr[:, ~counted]).all()
    inner = np.ix_(counted, counted)
    assert np.all(np.diag(res.bif)[counted] < 0) and np.isfinite(res.corr[inner]).all()
    np.testing.assert_array_equal(np.diag(res.corr)[counted], 1.0)
    assert np.all(np.abs(res.corr[inner]) <= 1.0)
    per_sample = pp.bif(model, loader, probe, per_token=False, seed=1, quiet=True, **kw)
    assert per_sample.bif.shape == (3, 3) and per_sample.probe_counted is None
    np.testing.assert_array_equal(per_sample.bif, per_sample.bif.T)


# ------------------------------------------------------------------------------------------------ linear response
GAMMA, EPS = 20.0, 5e-3


def _quadratic(x, y):
    """Each sample's loss (y_i - x_i w)^2 as (A, a) of wᵀAw + aᵀw + const."""
    return [(np.outer(xi, xi), -2 * yi * xi) for xi, yi in zip(x, y[:, 0])]


def _restricted_law(A_train, a_train, w_star, sel, eps):
    """Mean and covariance of w[sel] (the rest at w*) under SGLD on nβ (wᵀAw + aᵀw) + γ/2 |w - w*|² with step
    ``eps`` (exact for the discrete chain: covariance (P - eps P² / 4)⁻¹; eps = 0 is the posterior)."""
    rest = ~sel
    P = 2 * NBETA * A_train[np.ix_(sel, sel)] + GAMMA * np.eye(int(sel.sum()))
    h = -NBETA * (a_train[sel] + 2 * A_train[np.ix_(sel, rest)] @ w_star[rest]) + GAMMA * w_star[sel]
    return np.linalg.solve(P, h), np.linalg.inv(P - eps * P @ P / 4)


def _restrict(A, a, sel, w_star):
    rest = ~sel
    return A[np.ix_(sel, sel)], a[sel] + 2 * A[np.ix_(sel, rest)] @ w_star[rest]


def _cov(f, g, m, Sig):
    (A, a), (B, b) = f, g
    return 2 * np.trace(A @ Sig @ B @ Sig) + (2 * A @ m + a) @ Sig @ (2 * B @ m + b)


def _mean(f, m, Sig):
    A, a = f
    return np.trace(A @ Sig) + m @ A @ m + a @ m


def test_linear_response_of_a_component_is_minus_nbeta_times_the_covariance_and_is_estimated():
    model, x, y, (xp, yp) = _regression(3, n=24)
    w_star, xn, yn = model.weight.detach().numpy()[0], x.numpy(), y.numpy()
    sel = np.array([True, True, False])  # the component: the first two weights
    train = _quadratic(xn, yn)
    A_L, a_L = sum(t[0] for t in train) / len(train), sum(t[1] for t in train) / len(train)
    probe = _quadratic(xp.numpy(), yp.numpy())
    A_bar, a_bar = sum(t[0] for t in probe) / len(probe), sum(t[1] for t in probe) / len(probe)
    phi = _restrict(A_L, a_L, sel, w_star)  # phi: the training loss, a function of w[sel]

    def mean_phi(h, z):  # E_h[phi] with the training loss L + h (l_z - Lbar)
        A, a = probe[z]
        m, Sig = _restricted_law(A_L + h * (A - A_bar), a_L + h * (a - a_bar), w_star, sel, 0.0)
        return _mean(phi, m, Sig)

    m0, S0 = _restricted_law(A_L, a_L, w_star, sel, 0.0)
    identity = np.array(
        [-NBETA * _cov(phi, _restrict(A - A_bar, a - a_bar, sel, w_star), m0, S0) for A, a in probe]
    )
    derivative = np.array([(mean_phi(1e-5, z) - mean_phi(-1e-5, z)) / 2e-5 for z in range(len(probe))])
    np.testing.assert_allclose(identity, derivative, rtol=1e-6, atol=1e-9 * np.abs(identity).max())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pp.susceptibilities(
            model, [(x, y)], (xp, yp), {"c": {"weight": torch.tensor([sel])}}, num_chains=6, num_draws=400,
            num_steps_bw_draws=2, num_burnin_steps=100, step_size=EPS, nbeta=NBETA, localization=GAMMA, seed=4,
            quiet=True,
        )  # fmt: skip
    m, Sig = _restricted_law(A_L, a_L, w_star, sel, EPS)  # the chain's own law
    exact = np.array(
        [-NBETA * _cov(phi, _restrict(A - A_bar, a - a_bar, sel, w_star), m, Sig) for A, a in probe]
    )
    assert np.linalg.norm(res.chi[0] - exact) / np.linalg.norm(exact) < 0.2, (res.chi[0], exact)
    assert np.all(np.abs(res.chi[0] - exact) < 4 * res.chi_se[0] + 0.02 * np.abs(exact).max())
    assert np.all(res.chi_se[0] < 0.2 * np.abs(exact).max())  # a standard error that says something


# ------------------------------------------------------------------------------------------------ files and tables
def _same(a, b):
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and value.shape == other.shape, name
            np.testing.assert_array_equal(value, other, err_msg=name)
        else:
            assert value == other, name


def test_results_with_padding_and_one_chain_round_trip_through_their_files(tmp_path):
    model, loader, probe, counted = _padded_lm()
    kw = dict(num_draws=10, step_size=1e-3, localization=100.0, nbeta=10.0, seed=1, quiet=True)
    chi = pp.susceptibilities(model, loader, probe, ["blocks.0.mlp", "embed"], num_chains=1, **kw)
    assert np.isnan(chi.chi_se).all() and chi.probe_counted is not None
    b = pp.bif(model, loader, probe, num_chains=2, **kw)
    assert np.isnan(b.corr).any()
    p = chi.pca()
    assert np.isnan(p.scores).any()
    for i, r in enumerate([chi, b, p]):
        r.save(tmp_path / f"r{i}.npz")
        _same(r, type(r).load(tmp_path / f"r{i}.npz"))


def test_the_table_marks_the_probe_columns_that_do_not_count():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    counted = np.array([True, False, True, True, False])
    chi = np.where(counted, rng.normal(size=(2, 5)), 0.0)
    for given in (counted, None):
        df = _result(chi, given).to_pandas()
        assert isinstance(df, pd.DataFrame) and len(df) == 10
        want = np.tile(np.ones(5, bool) if given is None else counted, 2)
        np.testing.assert_array_equal(df["counted"].to_numpy(), want)
        np.testing.assert_array_equal(df["chi"].to_numpy(), chi.reshape(-1))
        np.testing.assert_array_equal(df["component"].to_numpy(), np.repeat(["c0", "c1"], 5))
