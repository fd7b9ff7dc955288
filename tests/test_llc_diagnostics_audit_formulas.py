"""Split R-hat and the ESS on synthetic traces of known properties against the published formulas (Gelman et al.
BDA3 / Vehtari et al. 2021, as Stan computes them on unsplit chains), on extreme scales, tensors and complex values;
the stationarity and mixing warnings at their thresholds; refined LLCs of a sum of independent regular submodels of
unequal sizes (each d_i / 2); the run named in the warnings of refined_llc and OnlineLLC; an OnlineLLC curve whose
components change between estimates."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pypattern.sampling import OnlineLLC, refined_llc
from pypattern.sampling.diagnostics import (
    NonStationaryWarning,
    check_mixing,
    check_stationarity,
    ess,
    r_hat,
)


def _ar1(rho, m, n, seed):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((m, n))
    x = np.empty((m, n))
    x[:, 0] = e[:, 0] / math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    return x


def _split_r_hat(x):
    """Split R-hat written out (BDA3 eq. 11.4 on the halves: the first and last floor(n / 2) draws of each chain)."""
    m, n = x.shape
    h = n // 2
    halves = [list(c[:h]) for c in x] + [list(c[n - h :]) for c in x]
    means = [sum(c) / h for c in halves]
    grand = sum(means) / len(means)
    b = h / (len(halves) - 1) * sum((mu - grand) ** 2 for mu in means)
    w = sum(sum((v - mu) ** 2 for v in c) / (h - 1) for c, mu in zip(halves, means)) / len(halves)
    return math.sqrt(((h - 1) / h * w + b / h) / w)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.random.default_rng(0).standard_normal((4, 300)),
        lambda: _ar1(0.8, 3, 200, 1),
        lambda: _ar1(-0.4, 2, 101, 2),
        lambda: np.random.default_rng(3).standard_normal((4, 200)) + np.arange(4)[:, None],
        lambda: np.random.default_rng(4).standard_normal((1, 9)),
    ],
)
def test_split_r_hat_equals_the_formula(make):
    x = make()
    assert r_hat(x) == pytest.approx(_split_r_hat(x), rel=1e-10)


def _z(x):
    """Normal scores of the pooled ranks (average ranks for ties; Blom's offsets), Vehtari et al. (2021) eq. 14."""
    from scipy.stats import norm, rankdata

    return norm.ppf((rankdata(x.ravel()) - 3 / 8) / (x.size + 1 / 4)).reshape(x.shape)


def _split(x):
    h = x.shape[1] // 2
    return np.vstack([x[:, :h], x[:, x.shape[1] - h :]])


def _stan_ess(x):
    """Stan's compute_effective_sample_size on the chains ``x`` (already split), written out with direct sums:
    Geyer's initial positive sequence over lags t + 2 < n - 1, the even lag of the pair that ended it, the
    monotone sequence, tau >= 1 / log10(N)."""
    m, n = x.shape
    d = x - x.mean(axis=1, keepdims=True)
    acov = np.array([[np.dot(d[c, : n - k], d[c, k:]) / n for k in range(n)] for c in range(m)])
    w = acov[:, 0].mean() * n / (n - 1)
    var_plus = w * (n - 1) / n + (np.var(x.mean(axis=1), ddof=1) if m > 1 else 0.0)
    rho = np.zeros(n)
    rho[0] = even = 1.0
    rho[1] = odd = 1 - (w - acov[:, 1].mean()) / var_plus
    t = 1
    while t < n - 3 and even + odd > 0:
        even = 1 - (w - acov[:, t + 1].mean()) / var_plus
        odd = 1 - (w - acov[:, t + 2].mean()) / var_plus
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    last = t - 2
    if even > 0:
        rho[last + 1] = even
    t = 1
    while t <= last - 2:
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2
        t += 2
    tau = -1 + 2 * rho[: last + 1].sum() + rho[last + 1 : last + 2].sum()
    return m * n / max(tau, 1 / math.log10(m * n))


def _traces():
    rng = np.random.default_rng(11)
    return [
        rng.standard_normal((4, 200)),
        _ar1(0.7, 3, 151, 3),
        _ar1(-0.6, 2, 80, 4),
        rng.standard_cauchy((4, 120)) + np.arange(4)[:, None],  # heavy tails
        np.round(rng.standard_normal((3, 41)) * 2) / 2,  # ties
        rng.standard_normal((4, 300)) * np.array([[1.0], [1.0], [1.0], [3.0]]),  # one chain wider
        rng.standard_normal((2, 9)),
    ]


def test_rank_normalised_r_hat_and_bulk_and_tail_ess_equal_the_published_formulas():
    for x in _traces():
        h = _split(x)
        bulk_r = _rhat_plain(_z(h))
        tail_r = _rhat_plain(_z(np.abs(h - np.median(h))))
        assert r_hat(x, method="rank") == pytest.approx(max(bulk_r, tail_r), rel=1e-10)
        assert ess(x, method="bulk") == pytest.approx(_stan_ess(_z(h)), rel=1e-9)
        tails = [_stan_ess(_split((x <= np.quantile(x, q)).astype(float))) for q in (0.05, 0.95)]
        assert ess(x, method="tail") == pytest.approx(min(tails), rel=1e-9)
        assert r_hat(x) == pytest.approx(_split_r_hat(x), rel=1e-10)  # the default is unchanged
    # a chain three times as wide as the others: the folded draws see it, the split R-hat of the values does not
    x = _traces()[5]
    assert r_hat(x) < 1.01 and r_hat(x, method="rank") > 1.1
    # iid draws: R-hat 1, bulk ESS about N; AR(1): about N (1 - rho) / (1 + rho)
    iid = np.random.default_rng(5).standard_normal((4, 2000))
    assert abs(r_hat(iid, method="rank") - 1) < 0.01 and ess(iid, method="bulk") == pytest.approx(
        8000, rel=0.1
    )
    ar = _ar1(0.5, 4, 4000, 6)
    assert ess(ar, method="bulk") == pytest.approx(ar.size / 3, rel=0.15)
    for fn, bad in ((r_hat, "bulk"), (ess, "rank"), (ess, None)):
        with pytest.raises(ValueError, match=r"method=.* is not valid; give one of"):
            fn(iid, method=bad)
    for n in (1, 2, 3):
        assert math.isnan(r_hat(iid[:, :n], method="rank")) and math.isnan(ess(iid[:, :n], method="tail"))


def _rhat_plain(h):
    """BDA3's R-hat of the chains ``h`` as they are."""
    n = h.shape[1]
    w = h.var(axis=1, ddof=1).mean()
    b = n * h.mean(axis=1).var(ddof=1)
    return math.sqrt(((n - 1) / n * w + b / n) / w)


def test_known_traces_iid_ar1_shifted_constant_and_nan():
    iid = np.random.default_rng(0).standard_normal((4, 2000))
    assert abs(r_hat(iid) - 1) < 0.01 and ess(iid) == pytest.approx(iid.size, rel=0.1)
    for rho in (0.5, 0.9):
        x = _ar1(rho, 4, 4000, 1)
        assert abs(r_hat(x) - 1) < 0.02
        assert ess(x) == pytest.approx(x.size * (1 - rho) / (1 + rho), rel=0.15)
    shifted = iid + 3 * np.arange(4)[:, None]
    assert r_hat(shifted) > 2 and ess(shifted) < 20
    const = np.full((3, 10), 0.1)
    assert r_hat(const) == 1.0 and ess(const) == 30.0
    two_levels = np.array([[0.0] * 10, [1.0] * 10])
    assert r_hat(two_levels) == math.inf
    nan = iid.copy()
    nan[2, 7] = np.nan
    assert math.isnan(r_hat(nan)) and math.isnan(ess(nan))


@pytest.mark.parametrize("scale", [1e200, 1e-200, 2.0**-600])
def test_r_hat_and_ess_do_not_depend_on_the_scale(scale):
    # the sums of squares overflowed (1e200: NaN) or underflowed (1e-200: R-hat 1 or inf from a zero variance)
    x = _ar1(0.6, 3, 120, 5) + np.array([[0.0], [0.4], [0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert r_hat(x * scale) == pytest.approx(r_hat(x), rel=1e-12)
        assert ess(x * scale) == pytest.approx(ess(x), rel=1e-9)


def test_tensors_of_any_dtype_and_with_grad_are_read_and_complex_values_refused():
    x = _ar1(0.3, 2, 60, 6)
    t = torch.tensor(x, requires_grad=True)  # was torch's "Can't call numpy() on Tensor that requires grad"
    assert r_hat(t) == r_hat(x) and ess(t) == ess(x)
    assert check_stationarity(t) and check_mixing(t, min_ess=1)
    assert r_hat([t[0], t[1]]) == r_hat(x)
    b = torch.tensor(x).bfloat16()  # was refused as "not an array of numbers"
    assert r_hat(b) == r_hat(b.double().numpy())
    for bad in (x * 1j, torch.tensor(x) * 1j):  # was read as the real part, with numpy's ComplexWarning
        for fn in (r_hat, ess, check_stationarity, check_mixing):
            with pytest.raises(ValueError, match="trace must hold real numbers, got complex values"):
                fn(bad)


def test_stationarity_warns_exactly_above_its_threshold_and_names_what_to_change():
    x = np.random.default_rng(2).standard_normal((2, 40)) + np.array([[0.0], [0.8]])
    rh = r_hat(x)
    assert rh > 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_stationarity(x, threshold=rh) is True  # at the threshold: accepted
        assert check_stationarity(x, threshold=rh * (1 + 1e-9)) is True
    with pytest.warns(NonStationaryWarning, match=r"split R-hat = .* > 1\.1\. Use more burn-in steps") as w:
        assert check_stationarity(x) is False
    assert f"{rh:.3f}" in str(w[0].message) and "num_burnin_steps" in str(w[0].message)


def test_mixing_warns_exactly_below_its_default_threshold():
    # the default least ESS: 100, or a quarter of the draws under 400 draws in all
    for m, n in ((2, 100), (4, 100), (4, 1000)):
        x = _ar1(0.95, m, n, 7)
        e, least = ess(x), min(100, m * n / 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = check_mixing(x)
        assert ok is (e >= least)
        assert len(caught) == (0 if ok else 1)
        if not ok:
            msg = str(caught[0].message)
            assert f"effective sample size of {e:.0f} of its {m * n} draws (below {least:.4g})" in msg
            assert "num_draws" in msg and "num_burnin_steps" in msg
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_mixing(x, min_ess=e) is True


class _TwoRegressions(nn.Module):
    """Two independent linear regressions, 2 and 4 weights: y1 = a . x[:2], y2 = b . x[2:]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1, bias=False, dtype=torch.float64)
        self.b = nn.Linear(4, 1, bias=False, dtype=torch.float64)

    def forward(self, x):
        return torch.cat([self.a(x[:, :2]), self.b(x[:, 2:])], 1)


def _two_regressions():
    torch.manual_seed(0)
    model = _TwoRegressions()
    x = torch.randn(512, 6, dtype=torch.float64)
    y = model(x).detach() + 0.1 * torch.randn(512, 2, dtype=torch.float64)
    with torch.no_grad():  # w* = the least-squares minimum of each regression
        model.a.weight.copy_(torch.linalg.lstsq(x[:, :2], y[:, :1]).solution.T)
        model.b.weight.copy_(torch.linalg.lstsq(x[:, 2:], y[:, 1:]).solution.T)
    return model, [(x, y)]


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(1).mean() / 2


def test_refined_llc_of_independent_regular_blocks_of_unequal_sizes_is_each_count_over_2():
    model, loader = _two_regressions()
    res = refined_llc(
        model,
        loader,
        loss_fn=_loss,
        components={"a": ["a.weight"], "b": "b"},
        step_size=1e-3,
        nbeta=100.0,
        localization=1.0,
        num_chains=4,
        num_draws=200,
        num_steps_bw_draws=5,
        num_burnin_steps=200,
        seed=0,
        quiet=True,
    )
    assert list(res.num_params) == [6, 2, 4]
    for name, lam in (("full", 3.0), ("a", 1.0), ("b", 2.0)):
        i = res.component.index(name)
        assert abs(res.llc_mean[i] - lam) < max(4 * res.llc_se[i], 0.15 * lam), (name, res.llc_mean[i])
        # the whole epoch at w*: the standard error is the spread over chains alone
        pc = res.llc_per_chain[i]
        assert res.llc_mean[i] == pytest.approx(pc.mean(), rel=1e-12)
        assert res.llc_std[i] == pytest.approx(pc.std(ddof=1), rel=1e-12)
        assert res.llc_se[i] == pytest.approx(pc.std(ddof=1) / 2, rel=1e-12)
        assert res.r_hat[i] < 1.1


_SHORT = dict(
    loss_fn=_loss, step_size=1e-6, nbeta=100.0, localization=1.0, num_chains=2, num_draws=20, seed=0
)


def _stationarity_messages(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, NonStationaryWarning)]


def test_refined_llc_warnings_name_the_component_and_the_data_set():
    # the warnings of the runs sampled together were the same text, whichever component they concerned
    model, loader = _two_regressions()
    x, y = loader[0]
    msgs = _stationarity_messages(
        lambda: refined_llc(
            model,
            loader,
            components={"a": ["a.weight"], "b": "b"},
            data=[(x[:64], y[:64])],
            quiet=True,
            **_SHORT,
        )
    )
    names = ["the unrestricted run", "component 'a'", "component 'b'"]
    want = [f"refined_llc(), {n}" for n in names] + [f"refined_llc(), {n} on data" for n in names]
    assert len(msgs) == len(want)
    for msg, name in zip(msgs, want, strict=True):
        assert msg.startswith(name + ": the loss trace is not stationary"), msg


def test_online_llc_warnings_name_the_training_step():
    model, loader = _two_regressions()
    for components, inner in ((None, ""), ({"a": ["a.weight"]}, ", refined_llc(), the unrestricted run")):
        cb = OnlineLLC(loader, every=2, components=components, warn_nonstationary=True, **_SHORT)
        msgs = _stationarity_messages(lambda cb=cb: (cb(model, 0), cb(model, 1), cb(model, 2)))
        firsts = [m for m in msgs if "component" not in m]
        assert len(firsts) == 2, msgs
        for msg, step in zip(firsts, (0, 2), strict=True):
            assert msg.startswith(f"OnlineLLC at step {step}{inner}: the loss trace is not stationary"), msg


def test_online_llc_curve_of_a_component_left_out_later_is_nan_there():
    # "heads" leaves out a component whose weights are all frozen: the curve was a KeyError in cb.result
    import pypattern as pp

    cfg = pp.TransformerConfig(
        n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=7, n_ctx=6, seed=0
    )
    model = pp.Transformer(cfg)
    data = [torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    kw = dict(num_chains=2, num_draws=4, step_size=1e-5, nbeta=5.0, localization=10.0, seed=0, quiet=True)
    cb = OnlineLLC(data, every=1, components="heads", **kw)
    first = cb(model, 0)
    model.embed.W_E.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = cb(model, 1)
    assert "embed" in first["refined"] and "embed" not in second["refined"]
    res = cb.result
    assert list(res.refined) == list(first["refined"])
    assert res.refined["embed"][0] == first["refined"]["embed"] and math.isnan(res.refined["embed"][1])
    for k, v in second["refined"].items():
        assert res.refined[k][1] == v
    assert list(res.to_pandas().columns[-len(res.refined) :]) == [f"llc[{k}]" for k in res.refined]
