"""The samplers against their update rules written out by hand, the convergence diagnostics against naive
implementations of their formulas, the automatic step against an exact finite-nbeta target, and the refusal of
bad settings by name."""

import math
import warnings

import numpy as np
import pytest
import torch

from pypattern import truth
from pypattern.ops.sgld import philox_normals
from pypattern.sampling import SGLD, SGNHT, RMSpropSGLD, estimate_llc, resolve_step_size
from pypattern.sampling.calibrate import calibrate_step_size
from pypattern.sampling.diagnostics import check_mixing, check_stationarity, ess, r_hat

# ------------------------------------------------------------------------------------------------ the samplers

SEED = 7
HYPER = dict(step_size=1e-2, nbeta=3.0, localization=2.0, weight_decay=0.1, noise_scale=0.7)


def _named(dtype):
    """Parameters of mixed shapes, one frozen (no grad): a, f (frozen), b, c."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=g, dtype=dtype).requires_grad_()
    f = torch.randn(4, generator=g, dtype=dtype)
    b = torch.randn(5, generator=g, dtype=dtype).requires_grad_()
    c = torch.randn(2, 1, 3, generator=g, dtype=dtype).requires_grad_()
    return [("a", a), ("f", f), ("b", b), ("c", c)]


def _loss(a, f, b, c):
    return 0.3 * a.sin().sum() + 0.1 * (b**4).sum() + c.cos().sum() + (f * f).sum() * (a**2).sum()


def _grads(ws):
    ws = [w.detach().clone().requires_grad_(i != 1) for i, w in enumerate(ws)]
    _loss(*ws).backward()
    return [w.grad for w in ws]


def _mask(dtype):
    m = torch.ones(5, dtype=dtype)
    m[[1, 3]] = 0
    return m


def _by_hand(kind, dtype, steps, *, A=0.03, alpha=0.9, e=0.05):
    """The update rules of SCIENCE.md / devinterp written out, one tensor at a time, with the noise of the
    optimizer's key (seed, tensor index among the moving ones, step); b is masked."""
    eps, nbeta, gamma, wd, sig = (HYPER[k] for k in HYPER)
    w = [t.detach().clone() for _, t in _named(dtype)]
    w0 = [t.clone() for t in w]
    moving = [0, 2, 3]  # f is frozen: not a moving tensor, so tensor indices 0, 1, 2 are a, b, c
    mask = {0: None, 2: _mask(dtype), 3: None}
    # SGNHT: initial momentum sqrt(eps) * sigma * the noise at step 2**64 - 1, thermostat A
    p = {
        i: math.sqrt(eps)
        * sig
        * philox_normals(w[i].numel(), seed=SEED, tensor_index=j, step=2**64 - 1)
        .to(dtype)
        .reshape(w[i].shape)
        for j, i in enumerate(moving)
    }
    xi = A
    V = {i: torch.zeros_like(w[i]) for i in moving}
    for s in range(steps):
        g = _grads(w)
        kinetic, count = 0.0, 0
        for j, i in enumerate(moving):
            z = philox_normals(w[i].numel(), seed=SEED, tensor_index=j, step=s).to(dtype).reshape(w[i].shape)
            m = torch.ones_like(w[i]) if mask[i] is None else mask[i]
            D = nbeta * g[i] + gamma * (w[i] - w0[i]) + wd * w[i]
            if kind == "sgld":
                w[i] = w[i] + m * (-eps / 2 * D + math.sqrt(eps) * sig * z)
            elif kind == "sgnht":
                p[i] = p[i] + m * (-xi * p[i] - eps * D + math.sqrt(2 * A * eps) * sig * z)
                w[i] = w[i] + m * p[i]
                kinetic += float((p[i].double() ** 2)[m != 0].sum())
                count += int((m != 0).sum())
            else:
                V_new = alpha * V[i] + (1 - alpha) * g[i] ** 2
                V[i] = torch.where(m != 0, V_new, V[i])
                G = 1 / (V[i].sqrt() + e)
                w[i] = w[i] + m * (-eps / 2 * G * D + (eps * G).sqrt() * sig * z)
        if kind == "sgnht":
            xi = xi + kinetic / count - eps * sig**2
    return w, p, xi, V


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["sgld", "sgnht", "rmsprop_sgld"])
def test_each_sampler_step_equals_its_update_rule_written_out(kind, dtype):
    named = _named(dtype)
    own = {"sgld": {}, "sgnht": {"diffusion_factor": 0.03}, "rmsprop_sgld": {"alpha": 0.9, "eps": 0.05}}[kind]
    cls = {"sgld": SGLD, "sgnht": SGNHT, "rmsprop_sgld": RMSpropSGLD}[kind]
    opt = cls(named, seed=SEED, masks={"b": _mask(dtype)}, **HYPER, **own)
    steps = 5
    for _ in range(steps):
        opt.zero_grad()
        _loss(*[t for _, t in named]).backward()
        opt.step()
    w, p, xi, V = _by_hand(kind, dtype, steps)
    # the noise is drawn in float32 and the backends' log/sqrt/cos round differently (about 1e-6 relative)
    tol = 2e-6 if dtype == torch.float32 else 2e-7
    start = _named(dtype)
    for (name, got), want, (_, w_start) in zip(named, w, start):
        assert got.dtype == dtype
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=tol, msg=name)
        moved = (got.detach() - w_start).abs()
        if name == "f":
            assert torch.equal(got.detach(), w_start)  # frozen: exactly as it was
        elif name == "b":
            assert torch.equal(got.detach()[[1, 3]], w_start[[1, 3]]) and bool((moved[[0, 2, 4]] > 0).all())
        else:
            assert bool((moved > 0).all())
    moving = {"a": 0, "b": 2, "c": 3}
    if kind == "sgnht":
        assert opt.param_groups[0]["thermostat"].item() == pytest.approx(xi, rel=1e-5)
        for name, t in named:
            if name in moving:
                torch.testing.assert_close(opt.state[t]["momentum"], p[moving[name]], rtol=0, atol=tol)
    if kind == "rmsprop_sgld":
        for name, t in named:
            if name in moving:
                torch.testing.assert_close(opt.state[t]["square_avg"], V[moving[name]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [SGNHT, RMSpropSGLD])
def test_fused_samplers_refuse_nbeta_zero_as_sgld_does_and_check_settings_changed_later(cls):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="nbeta"):
        SGLD([p], step_size=1e-3, nbeta=0.0)
    for kw, name in (
        (dict(nbeta=0.0), "nbeta"),
        (dict(temperature=0.0), "nbeta"),
        (dict(step_size=-1e-3), "step_size"),
        (dict(lr=float("nan")), "step_size"),
        (dict(noise_scale=float("inf")), "noise_scale"),
        (dict(localization=-1.0), "localization"),
    ):
        with pytest.raises(ValueError, match=name):
            cls([p], **{"step_size": 1e-3, **kw})
    with pytest.raises(ValueError, match="nbeta"):
        cls([{"params": [p], "nbeta": 0.0}], step_size=1e-3)
    # set after construction (by hand, or a scheduler): refused at the next step, naming it, nothing moved
    for key, bad in (("nbeta", 0.0), ("nbeta", float("nan")), ("localization", -1.0), ("step_size", -1.0)):
        opt = cls([p], step_size=1e-3, nbeta=2.0)
        opt.param_groups[0][key] = bad
        p.grad = torch.ones(3)
        with pytest.raises(ValueError, match=key):
            opt.step()
        assert torch.equal(p.detach(), torch.zeros(3))
    # a valid change is taken
    opt = cls([p], step_size=1e-3, nbeta=2.0, noise_scale=0.0)
    opt.param_groups[0]["nbeta"] = 4.0
    opt.step()
    assert not torch.equal(p.detach(), torch.zeros(3))


# ----------------------------------------------------------------------------------------------- diagnostics


def _naive_ess(x):
    """Geyer's initial positive and monotone sequence on the multi-chain autocorrelation (Vehtari et al. 2021, eq.
    10 with BDA3's var_plus), autocovariances by direct sums; ``(ess, capped)``: Stan and ArviZ keep ``tau`` at
    least ``1 / log10(N)`` (antithetic chains), and say whether that cap applied."""
    x = np.atleast_2d(np.asarray(x, float))
    m, n = x.shape
    xc = x - x.mean(1, keepdims=True)
    acov = np.array([[np.dot(xc[c, : n - k], xc[c, k:]) / n for k in range(n)] for c in range(m)])
    W = (acov[:, 0] * n / (n - 1)).mean()
    var_plus = W * (n - 1) / n + (x.mean(1).var(ddof=1) if m > 1 else 0.0)
    rho = 1 - (W - acov.mean(0)) / var_plus
    rho[0] = 1.0
    pairs = []
    for k in range(n // 2):
        s = rho[2 * k] + rho[2 * k + 1]
        if s <= 0:
            break
        pairs.append(min(s, pairs[-1]) if pairs else s)
    tau = -1 + 2 * sum(pairs)
    cap = 1 / math.log10(m * n)
    return m * n / max(tau, cap), tau < cap


def _naive_split_r_hat(x):
    """Split R-hat (Vehtari et al. 2021, eqs. 1-4 without rank normalisation): 2m half chains of n draws."""
    x = np.atleast_2d(np.asarray(x, float))
    n = x.shape[1] // 2
    halves = [h for row in x for h in (row[:n], row[x.shape[1] - n :])]
    M = len(halves)
    means = np.array([h.mean() for h in halves])
    W = np.mean([((h - h.mean()) ** 2).sum() / (n - 1) for h in halves])
    B = n / (M - 1) * ((means - means.mean()) ** 2).sum()
    return math.sqrt(((n - 1) / n * W + B / n) / W)


def _ar1(rho, m, n, seed):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((m, n))
    x = np.empty((m, n))
    x[:, 0] = e[:, 0] / math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    return x


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, -0.5])
def test_ess_and_split_r_hat_equal_the_formulas_on_ar1_chains_of_known_ess(rho):
    for m, n, seed in ((4, 2000, 0), (1, 3001, 1), (3, 501, 2), (4, 2000, 5)):
        x = _ar1(rho, m, n, seed)
        want, _ = _naive_ess(x)  # capped or not: the cap 1 / log10(N) is Stan's
        assert ess(x) == pytest.approx(want, rel=1e-9)
        assert r_hat(x) == pytest.approx(_naive_split_r_hat(x), rel=1e-12)
        if m * n >= 8000:  # the AR(1) ESS N (1 - rho) / (1 + rho), within the estimator's sampling error
            assert ess(x) == pytest.approx(m * n * (1 - rho) / (1 + rho), rel=0.2)
            assert abs(r_hat(x) - 1) < 0.02
    # one chain given as a 1-d trace is that chain
    x = _ar1(rho, 1, 400, 3)
    assert ess(x[0]) == ess(x) and r_hat(x[0]) == r_hat(x)


def test_a_trace_that_never_moved_gets_the_same_ess_and_r_hat_whatever_its_value():
    # the mean of many 0.1s is not 0.1: its rounding was read as variation (ESS 4 of 400 and R-hat 0.99 for 0.1,
    # ESS 400 and R-hat 1 for 7.0)
    for value in (0.1, 1 / 3, 7.0, 1e10 + 0.1, np.float32(0.1)):
        x = np.full((4, 100), value)
        assert ess(x) == 400.0 and r_hat(x) == 1.0, value
        assert check_stationarity(x)
    # halves that never moved but differ: the chains disagree without any variance within them
    x = np.full((4, 100), 0.1)
    x[1] += 1e-3
    assert r_hat(x) == math.inf
    assert ess(x) < 10


def test_non_finite_traces_give_nan_without_numpy_warnings_and_are_named():
    x = _ar1(0.5, 4, 100, 0)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2, 5] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert math.isnan(ess(y)) and math.isnan(r_hat(y))
        with pytest.warns(UserWarning, match="non-finite"):
            assert check_stationarity(y) is False
    assert math.isnan(ess(x[:, :3])) and math.isnan(r_hat(x[:, :3]))  # fewer than 4 draws per chain


def test_check_mixing_refuses_a_min_ess_that_is_not_a_number_and_judges_by_ess():
    x = _ar1(0.9, 4, 400, 0)  # ESS about 84 of 1600
    e = ess(x)
    assert check_mixing(x, min_ess=e - 1, warn=False) and not check_mixing(x, min_ess=e + 1, warn=False)
    for bad in (float("nan"), -1.0, "100", True):
        with pytest.raises(ValueError, match="min_ess"):
            check_mixing(x, min_ess=bad)


# ------------------------------------------------------------------------------------------ automatic step


def _regular():
    torch.manual_seed(0)
    model = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    ds = truth.make_regression_data(model, 3, dtype=torch.float64)
    return model, ds, torch.utils.data.DataLoader(ds, batch_size=len(ds))


def _exact_regular_target(model, ds, nbeta, gamma):
    """nbeta E[L - L(w*)] under exp(-nbeta L - gamma/2 |w - w*|^2) for the quadratic loss: sum over the Hessian's
    eigenvalues h of nbeta h / (2 (nbeta h + gamma)) (d/2 as nbeta grows)."""
    x, y = ds.tensors
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def loss(v):
        out, i = {}, 0
        for n, p in params.items():
            out[n] = v[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, out, (x,)), y)

    h = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))
    return float((nbeta * h / (2 * (nbeta * h + gamma))).sum())


def test_auto_step_on_a_regular_model_is_within_its_stated_error_across_seeds():
    model, ds, loader = _regular()
    nbeta, gamma = 1000.0, 1.0
    target = _exact_regular_target(model, ds, nbeta, gamma)
    assert 2.99 < target < 3.0  # d/2 = 3 less the localization's share
    for seed in (0, 2, 3):
        with warnings.catch_warnings():
            # a chosen step whose estimated bias exceeds llc_se says so: the bias is part of the error checked below
            warnings.filterwarnings("ignore", message="step_size='auto' chose", category=UserWarning)
            r = estimate_llc(
                model,
                loader,
                nbeta=nbeta,
                localization=gamma,
                num_chains=4,
                num_draws=300,
                num_steps_bw_draws=3,
                num_burnin_steps=200,
                seed=seed,
                quiet=True,
            )
        rep = r.sample.config["auto_step"]
        # the stated error: the standard error plus the chosen step's estimated discretisation bias
        assert abs(r.llc_mean - target) <= 3 * r.llc_se + abs(rep["bias"]), (seed, r.llc_mean, r.llc_se, rep)
        assert r.r_hat < 1.1


def test_auto_step_settings_are_refused_by_name_before_any_trial():
    model, _, loader = _regular()
    for kw, name in (
        (dict(rtol=-0.1), "rtol"),
        (dict(rtol=float("nan")), "rtol"),
        (dict(atol_rel=float("nan")), "atol_rel"),
        (dict(atol_rel=-1.0), "atol_rel"),
        (dict(max_trial_factor=0), "max_trial_factor"),
        (dict(pair_factor=0), "pair_factor"),
        (dict(run_trial_factor=0), "run_trial_factor"),
        (dict(calibration_chains=2.5), "calibration_chains"),
        (dict(calibration_steps=20.5), "calibration_steps"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be"):
            resolve_step_size(model, loader, nbeta=1000.0, localization=1.0, **kw)
    with pytest.raises(ValueError, match="rtol must be"):
        estimate_llc(model, loader, nbeta=1000.0, auto_step_options={"rtol": -0.1}, quiet=True)


def test_calibrate_step_size_refuses_a_step_size_given_twice():
    # two runs of one step agree by construction and passed for a plateau
    model, _, loader = _regular()
    with pytest.raises(ValueError, match="more than once"):
        calibrate_step_size(
            model, loader, (1e-4, 1e-4), nbeta=1000.0, localization=1.0, num_draws=20, num_chains=2
        )
