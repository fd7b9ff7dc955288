"""Susceptibilities and the BIF on a float64 linear-Gaussian model and a small transformer, against computations
written here:

* a result's ``settings`` record what the chains ran at (per-chain seeds, hyperparameters given through
  devinterp's ``optimizer_kwargs``), so that rerunning with ``**result.settings`` gives the same numbers;
* ``components="heads"`` / ``"blocks"`` are the listed components (pypattern's Transformer and an unconverted
  Hugging Face model), as in ``refined_llc``;
* components given as ``pypattern.sample``'s ``restrict_to`` reads them (glob, regex, module names in a list)
  give the chi of the parameters they match;
* a seed that is neither an int nor one per chain is refused naming it, as ``pypattern.sample`` refuses it;
* chi of a pattern component with per-chain seeds and batched chains, and the BIF of a one-sample probe, against
  the closed forms of the exact Gaussian law of the discrete chain.
"""

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.StepBiasWarning"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning"),
]

D, N = 4, 32


def _linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        N, generator=g, dtype=torch.float64
    )
    y = y[:, None]
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():  # w* near, but not at, the least-squares optimum
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + 0.3)
    return model, x, y


@pytest.mark.parametrize(
    "given",
    [
        dict(seed=[4, 5, 6], step_size=1e-3, nbeta=10.0, localization=20.0),
        dict(seed=2, optimizer_kwargs=dict(lr=1e-3, localization=20.0, nbeta=10.0)),
    ],
)
def test_rerunning_with_a_results_settings_gives_the_same_numbers(given):
    model, x, y = _linear()
    loader, probe = [(x, y)], (x[:6], y[:6])
    run = dict(num_chains=3, num_draws=10, num_burnin_steps=5, quiet=True, **given)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chi = pp.susceptibilities(model, loader, probe, ["weight"], **run)
        again = pp.susceptibilities(model, loader, probe, ["weight"], **chi.settings)
        influence = pp.bif(model, loader, probe, **run)
        influence_again = pp.bif(model, loader, probe, **influence.settings)
    assert np.abs(chi.chi).max() > 0 and np.abs(influence.bif).max() > 0
    np.testing.assert_array_equal(again.chi, chi.chi)
    np.testing.assert_array_equal(influence_again.bif, influence.bif)
    for res in (chi, influence):
        seed = given["seed"]
        assert res.settings["seed"] == seed
        assert (res.settings["step_size"], res.settings["nbeta"], res.settings["localization"]) == (
            1e-3,
            10.0,
            20.0,
        )


def _tiny_lm():
    from pypattern.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8)
    return Transformer(cfg).double()


@pytest.mark.parametrize("which", ["heads", "blocks"])
def test_components_heads_and_blocks_are_the_listed_components(which):
    from pypattern.models.hf_masks import hf_components
    from pypattern.models.transformer import list_components

    tr = pytest.importorskip("transformers")
    toks = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(1))
    run = dict(
        num_chains=2, num_draws=4, num_burnin_steps=1, step_size=1e-4, localization=100.0, seed=0, quiet=True
    )
    lm = _tiny_lm()
    cfg = tr.LlamaConfig(
        vocab_size=11, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tr.AutoModelForCausalLM.from_config(cfg).double().eval()
    for model, listed in ((lm, list_components), (hf, hf_components)):
        names = listed(model, heads=which == "heads")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = pp.susceptibilities(model, [toks], toks[:2], which, **run)
            want = pp.susceptibilities(model, [toks], toks[:2], names, **run)
        assert got.components == names and len(names) > 3
        assert any(".head." in n for n in names) == (which == "heads")
        np.testing.assert_array_equal(got.chi, want.chi)
    with pytest.raises(ValueError, match=f"components='{which}' needs pypattern's Transformer"):
        pp.susceptibilities(
            nn.Linear(2, 1),
            [(torch.randn(4, 2), torch.randn(4, 1))],
            (torch.randn(4, 2), torch.randn(4, 1)),
            which,
            **run,
        )


def test_components_by_glob_regex_and_module_names_move_the_parameters_they_match():
    """A component given as ``pypattern.sample``'s ``restrict_to`` reads it (a glob, a regex, module names in a
    list) is the component of the parameter names it matches: the same draws, so the same chi."""
    lm = _tiny_lm()
    names = [n for n, _ in lm.named_parameters()]
    toks = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(1))
    run = dict(
        num_chains=2, num_draws=4, num_burnin_steps=1, step_size=1e-4, localization=100.0, seed=0, quiet=True
    )
    w_q = [n for n in names if n.endswith("attn.W_Q")]
    mods = [n for n in names if n.startswith(("blocks.0.attn.", "blocks.1.mlp."))]
    comps = {
        "glob": "blocks.*.attn.W_Q",
        "regex": re.compile(r"blocks\.\d\.attn\.W_Q"),
        "glob in a list": ["blocks.*.attn.W_Q"],
        "modules": ["blocks.0.attn", "blocks.1.mlp"],
        "W_Q by name": w_q,
        "modules by name": mods,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pp.susceptibilities(lm, [toks], toks[:2], comps, **run)
    chi = dict(zip(res.components, res.chi))
    assert len(w_q) == 2 and np.abs(chi["W_Q by name"]).max() > 0
    for k in ("glob", "regex", "glob in a list"):
        np.testing.assert_array_equal(chi[k], chi["W_Q by name"])
    np.testing.assert_array_equal(chi["modules"], chi["modules by name"])
    assert np.abs(chi["modules"] - chi["W_Q by name"]).max() > 0
    for bad in ("blocks.*.nothing", ["blocks.0.nothing"], [re.compile("zz")]):
        with pytest.raises(ValueError, match="components: .*match"):
            pp.susceptibilities(lm, [toks], toks[:2], {"x": bad}, **run)


@pytest.mark.parametrize("seed", [3.0, torch.tensor(3), [], "3", [1.5, 2.5]])
def test_a_seed_that_is_no_int_nor_one_per_chain_is_refused_naming_it(seed):
    model, x, y = _linear()
    run = dict(num_chains=2, num_draws=3, num_burnin_steps=0, step_size=1e-3, quiet=True)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\), or a list"):
        pp.susceptibilities(model, [(x, y)], (x[:4], y[:4]), ["weight"], seed=seed, **run)
    with pytest.raises(ValueError, match=r"^seed "):  # as pypattern.sample refuses it
        pp.sample(model, [(x, y)], seed=seed, **run)


@pytest.mark.parametrize("as_array", [np.array(5), np.int64(5), np.array([5, 6])])
def test_numpy_seeds_are_read_as_pypattern_sample_reads_them(as_array):
    """A 0-d or 1-D integer array (or numpy integer) is the seed(s) it holds, for susceptibilities as for sample:
    the same values as the Python ints."""
    model, x, y = _linear()
    run = dict(num_chains=2, num_draws=3, num_burnin_steps=0, step_size=1e-3, quiet=True)
    plain = as_array.tolist() if isinstance(as_array, np.ndarray) else int(as_array)
    a = pp.susceptibilities(model, [(x, y)], (x[:4], y[:4]), ["weight"], seed=as_array, **run)
    b = pp.susceptibilities(model, [(x, y)], (x[:4], y[:4]), ["weight"], seed=plain, **run)
    np.testing.assert_array_equal(a.chi, b.chi)
    assert np.abs(a.chi).max() > 0


NBETA, GAMMA, EPS = 10.0, 20.0, 5e-3


def _law(xn, yn, w_star, sel, eps=EPS):
    """Mean and covariance (0 outside ``sel``) of the stationary law of SGLD with step ``eps`` moving the
    coordinates ``sel`` of ``w`` on the energy ``nβ L(w) + γ/2 |w - w*|²`` (quadratic: exactly Gaussian)."""
    d = len(w_star)
    P = 2 * NBETA * xn.T @ xn / N + GAMMA * np.eye(d)
    h = 2 * NBETA * xn.T @ yn / N + GAMMA * w_star
    Pss = P[np.ix_(sel, sel)]
    m = w_star.copy()
    m[sel] = np.linalg.solve(Pss, h[sel] - P[np.ix_(sel, ~sel)] @ w_star[~sel])
    S = np.zeros((d, d))
    S[np.ix_(sel, sel)] = np.linalg.inv(Pss - eps * Pss @ Pss / 4)
    return m, S


def _cov(A, a, B, b, m, S):
    """Cov(wᵀAw + aᵀw, wᵀBw + bᵀw) for w ~ N(m, S) (Isserlis)."""
    return 2 * np.trace(A @ S @ B @ S) + (2 * A @ m + a) @ S @ (2 * B @ m + b)


def test_chi_of_a_pattern_component_and_the_bif_of_a_one_sample_probe_are_their_closed_forms():
    """float64, per-chain seeds, batched chains: chi of the component ``["weight"]`` given as a glob equals
    ``-nβ Cov(phi, l_z - Lbar)`` of the exact Gaussian law within its standard error, and the BIF of a probe of
    one sample is minus its loss variance ``-(2 s² + 4 μ² s)`` (``s = xᵀΣx``, ``μ`` the residual's mean)."""
    model, x, y = _linear(1)
    xn, yn = x.numpy(), y.numpy()[:, 0]
    w_star = model.weight.detach().numpy()[0].copy()
    sel = np.ones(D, bool)
    m, S = _law(xn, yn, w_star, sel)
    phi = (xn.T @ xn / N, -2 * xn.T @ yn / N)
    probe = np.arange(6)
    terms = [(np.outer(xn[i], xn[i]), -2 * yn[i] * xn[i]) for i in probe]
    A_bar, a_bar = sum(t[0] for t in terms) / len(probe), sum(t[1] for t in terms) / len(probe)
    exact = np.array([-NBETA * _cov(*phi, A - A_bar, a - a_bar, m, S) for A, a in terms])
    run = dict(
        num_chains=8, num_draws=400, num_steps_bw_draws=2, num_burnin_steps=100, step_size=EPS, nbeta=NBETA,
        localization=GAMMA, seed=list(range(10, 18)), batched=True, quiet=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the step-bias advice: the exact answer is the discrete chain's
        res = pp.susceptibilities(model, [(x, y)], (x[:6], y[:6]), {"w": "wei*"}, **run)
        one = pp.bif(model, [(x, y)], (x[:1], y[:1]), **run)
    assert np.linalg.norm(res.chi[0] - exact) / np.linalg.norm(exact) < 0.3
    assert np.all(np.abs(res.chi[0] - exact) < 5 * res.chi_se[0] + 1e-3 * np.abs(exact).max())
    s, mu = xn[0] @ S @ xn[0], yn[0] - xn[0] @ m
    var = 2 * s**2 + 4 * mu**2 * s
    assert one.bif.shape == (1, 1) and np.array_equal(one.corr, [[1.0]])
    assert abs(-one.bif[0, 0] - var) / var < 0.25


def test_an_intervention_over_some_rows_applied_to_the_whole_data_says_how_to_expand_it():
    """``invert(..., num_data=M)`` over N < M probe rows gives N weights; ``reweight`` of the M-row data with the
    Intervention is refused with the expansion to write, and the expanded weights re-weight exactly those rows."""
    chi = np.array([[1.0, -1.0, 0.5]])
    plan = pp.invert(chi, np.array([0.01]), num_data=10, method="constrained")
    data = torch.randn(10, 2)
    with pytest.raises(ValueError, match=r"num_data=10.*w\[rows\] = plan.weights"):
        pp.reweight(data, plan)
    rows = np.array([2, 5, 7])
    w = np.ones(10)
    w[rows] = plan.weights
    got = pp.reweight(data, w, mode="loss").numpy()
    np.testing.assert_allclose(got, w / w.mean(), rtol=1e-6)
    # the response of the expanded weights is the predicted one: chi (w - 1)[rows] / M
    np.testing.assert_allclose(chi @ (w[rows] - 1) / 10, plan.predicted, rtol=1e-12)
