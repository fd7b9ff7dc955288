"""Susceptibilities, the BIF and the per-sample gradient Gram as users call them, against independent answers.

Susceptibilities and BIF: linear regression ``y = x . w`` with full-batch SGLD. The energy ``nβ L(w) + γ/2 |w -
w*|²`` is quadratic, ``½ (w - μ)ᵀ P (w - μ)``, and SGLD with step ``ε`` on it has an exactly Gaussian stationary
law ``N(μ, (P - ε P²/4)⁻¹)`` (the linear recursion ``w ← w - ε/2 P (w - μ) + √ε ξ``; ``ε → 0`` gives the
continuous posterior ``N(μ, P⁻¹)``). Observables and losses are quadratic in ``w``, so by Isserlis
``Cov(wᵀAw + aᵀw, wᵀBw + bᵀw) = 2 tr(AΣBΣ) + (2Aμ + a)ᵀ Σ (2Bμ + b)``, and SCIENCE.md's definitions give
``χ_z = -nβ Cov(φ, l_z - L̄)`` (physics), ``-Cov(φ, l_z - L̄)`` (devinterp, no nβ) and ``BIF_ij = -Cov(l_i,
l_j)``. Checked: the fused path (the probe is the loader's only batch), a user observable with a user per-sample
loss and nβ given under devinterp's name, the default nβ = n / ln n, the nβ scaling, per-token and per-sample
columns of a padded probe, and the standard errors.

Gram: ``per_sample_grad_gram`` equals a naive loop of one ``autograd.grad`` per sample (float64) on an MLP,
pypattern's Transformer and converted GPT-2 and Llama models: per-token and per-sequence losses, padding masks,
non-contiguous inputs, batch sizes 1 and 0, parameter subsets (frozen weights, ``modules=``); empty selections are
refused naming the argument."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypattern as pp
from pypattern.gram import gram_parameters, per_sample_grad_gram, per_sample_grad_gram_reference
from pypattern.losses import sample_losses, token_losses
from pypattern.susceptibility import bif, susceptibilities

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.StepBiasWarning"),
]

D, N, GAMMA, EPS = 3, 24, 30.0, 4e-3
RUN = dict(num_chains=8, num_draws=1000, num_steps_bw_draws=2, num_burnin_steps=150, seed=3, quiet=True)


# ----- susceptibilities and BIF against the Gaussian posterior --------------------------------------------------
def _problem(seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w_true = torch.randn(D, generator=g, dtype=torch.float64)
    y = (x @ w_true + 0.5 * torch.randn(N, generator=g, dtype=torch.float64))[:, None]
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():  # w* off the least-squares optimum: the posterior mean moves too
        shift = 0.2 * torch.randn(1, D, generator=g, dtype=torch.float64)
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + shift)
    return model, x, y


def _cov_quad(A, a, B, b, m, S) -> float:
    return 2 * np.trace(A @ S @ B @ S) + (2 * A @ m + a) @ S @ (2 * B @ m + b)


def _chain_law(x, y, w_star, nbeta, eps, c=1.0):
    """Mean and covariance of full-batch SGLD's stationary law for L(w) = c mean_i (y_i - x_i w)²."""
    P = 2 * c * nbeta * x.T @ x / len(x) + GAMMA * np.eye(x.shape[1])
    m = np.linalg.solve(P, 2 * c * nbeta * x.T @ y[:, 0] / len(x) + GAMMA * w_star)
    return m, np.linalg.inv(P - eps * P @ P / 4)


def _losses(x, y, c=1.0):
    """Each sample's loss c (y_i - x_i w)² as (A, a) of wᵀAw + aᵀw (+ const)."""
    return [(c * np.outer(xi, xi), -2 * c * yi * xi) for xi, yi in zip(x, y[:, 0])]


def _minus_cov(phi, terms, m, S) -> np.ndarray:
    """-Cov(phi, l_z - mean_z l_z) for every probe term."""
    A_bar = sum(t[0] for t in terms) / len(terms)
    a_bar = sum(t[1] for t in terms) / len(terms)
    return np.array([-_cov_quad(*phi, A - A_bar, a - a_bar, m, S) for A, a in terms])


def _np(model, x, y):
    return model.weight.detach().numpy()[0], x.numpy(), y.numpy()


def _within_se(chi, se, exact, rel=0.15):
    assert np.linalg.norm(chi - exact) / np.linalg.norm(exact) < rel, (chi, exact)
    assert np.all(np.abs(chi - exact) < 4 * se + 0.02 * np.abs(exact).max()), (chi, exact, se)


def test_fused_probe_with_the_default_nbeta_matches_the_gaussian_answer():
    """The probe is the loader's only batch and phi its loss (the sampler's own forward is read); nβ is the
    default n / ln n; chi matches the discrete chain's exact answer within its standard error, and the
    continuous posterior's within the O(ε P / 4) discretisation bias."""
    model, x, y = _problem()
    res = susceptibilities(
        model, [(x, y)], (x, y), {"all": ["weight"]}, step_size=EPS, localization=GAMMA, **RUN
    )
    nbeta = N / np.log(N)
    assert res.nbeta == pytest.approx(nbeta, rel=1e-12)
    w_star, xn, yn = _np(model, x, y)
    phi = (xn.T @ xn / N, -2 * xn.T @ yn[:, 0] / N)  # the full-batch loss
    m, S = _chain_law(xn, yn, w_star, nbeta, EPS)
    exact = nbeta * _minus_cov(phi, _losses(xn, yn), m, S)
    _within_se(res.chi[0], res.chi_se[0], exact)
    m0, S0 = _chain_law(xn, yn, w_star, nbeta, 0.0)
    continuous = nbeta * _minus_cov(phi, _losses(xn, yn), m0, S0)
    assert np.linalg.norm(res.chi[0] - continuous) / np.linalg.norm(continuous) < 0.15
    # sign: up-weighting a sample whose loss rises with phi lowers E[phi] (chi = dE_h[phi]/dh < 0) and vice versa
    assert np.all(
        np.sign(res.chi[0][np.abs(exact) > 0.1 * np.abs(exact).max()])
        == np.sign(exact)[np.abs(exact) > 0.1 * np.abs(exact).max()]
    )


def test_user_observable_and_loss_with_devinterp_names_match_the_gaussian_answer():
    """phi(w) = vᵀw + |w|²/2, per-sample loss (y - xw)²/2 of the user's own (its mean drives the chains), nβ, step
    and localization given as devinterp's optimizer_kwargs; a separate probe of 7 samples."""
    model, x, y = _problem(seed=6)
    v = np.array([1.0, -2.0, 0.5])

    def observable(m):
        return m.weight[0] @ torch.tensor(v) + 0.5 * (m.weight[0] ** 2).sum()

    def half_squared_error(m, batch):
        return 0.5 * (batch[1][:, 0] - m(batch[0])[:, 0]) ** 2

    res = susceptibilities(
        model,
        [(x, y)],
        (x[:7], y[:7]),
        ["weight"],
        observable=observable,
        per_sample_loss_fn=half_squared_error,
        optimizer_kwargs={"lr": EPS, "nbeta": 15.0, "localization": GAMMA},
        **RUN,
    )
    assert res.nbeta == 15.0
    w_star, xn, yn = _np(model, x, y)
    m, S = _chain_law(xn, yn, w_star, 15.0, EPS, c=0.5)
    exact = 15.0 * _minus_cov((0.5 * np.eye(D), v), _losses(xn[:7], yn[:7], 0.5), m, S)
    _within_se(res.chi[0], res.chi_se[0], exact)


def test_chi_scales_with_nbeta_as_defined_in_both_conventions():
    """chi = -nβ Cov at nβ = 3 and 12 (the posterior narrows as nβ grows, so the ratio is not 4); the devinterp
    convention has no nβ factor: with the component the whole model its chi is -Cov itself."""
    model, x, y = _problem(seed=7)
    w_star, xn, yn = _np(model, x, y)
    phi = (xn.T @ xn / N, -2 * xn.T @ yn[:, 0] / N)
    probe = (x[:6], y[:6])
    exact = {}
    for nbeta in (3.0, 12.0):
        m, S = _chain_law(xn, yn, w_star, nbeta, EPS)
        exact[nbeta] = _minus_cov(phi, _losses(xn[:6], yn[:6]), m, S)
        res = susceptibilities(
            model, [(x, y)], probe, ["weight"], step_size=EPS, localization=GAMMA, nbeta=nbeta, **RUN
        )
        _within_se(res.chi[0], res.chi_se[0], nbeta * exact[nbeta])
    ratio = 12.0 * exact[12.0] / (3.0 * exact[3.0])
    assert np.all(np.abs(ratio - 4.0) > 0.2)  # not a plain prefactor: the test tells the two apart
    dev = susceptibilities(
        model,
        [(x, y)],
        probe,
        ["weight"],
        step_size=EPS,
        localization=GAMMA,
        nbeta=12.0,
        convention="devinterp",
        **RUN,
    )
    assert np.linalg.norm(dev.chi[0] - exact[12.0]) / np.linalg.norm(exact[12.0]) < 0.1


def test_bif_of_the_loaders_only_batch_matches_minus_the_posterior_covariance():
    model, x, y = _problem(seed=8)
    w_star, xn, yn = _np(model, x[:8], y[:8])
    res = bif(model, [(x[:8], y[:8])], (x[:8], y[:8]), step_size=EPS, localization=GAMMA, nbeta=6.0, **RUN)
    m, S = _chain_law(xn, yn, w_star, 6.0, EPS)
    terms = _losses(xn, yn)
    exact = -np.array([[_cov_quad(A, a, B, b, m, S) for B, b in terms] for A, a in terms])
    assert np.linalg.norm(res.bif - exact) / np.linalg.norm(exact) < 0.08
    d = np.sqrt(-np.diag(exact))  # the losses' standard deviations
    np.testing.assert_allclose(res.corr, -exact / np.outer(d, d), atol=0.08)


class _TokenRegression(nn.Module):
    """Weights ``w (3,)``; token ``t`` followed by ``u`` has the loss ``(f_t . w - c_u)²``, quadratic in ``w``."""

    V = 6

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("f", torch.randn(self.V, D, generator=g, dtype=torch.float64))
        self.register_buffer("c", torch.randn(self.V, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(0.3 * torch.randn(D, generator=g, dtype=torch.float64))


def _token_losses(m, batch):
    """Per-token losses ``(B, T - 1)`` of a padded batch, NaN where a token does not count."""
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    losses = (m.f[ids[:, :-1]] @ m.w - m.c[ids[:, 1:]]) ** 2
    return torch.where(am[:, 1:] & am[:, :-1], losses, torch.full_like(losses, float("nan")))


def test_per_token_and_per_sample_columns_of_a_padded_probe_match_the_gaussian_answer():
    """A padded batch (the loader's only batch and the probe): each counted token's chi is -nβ Cov(L, l_bt - L̄)
    with L̄ and the training loss over the counted tokens only (the padded ones, NaN in the user's losses, get
    chi 0); with ``per_token=False`` each sample's column is that of the mean of its counted tokens' losses."""
    model = _TokenRegression()
    g = torch.Generator().manual_seed(1)
    B, T = 6, 5
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 3:] = 0
    am[4, 2:] = 0
    batch = {"input_ids": torch.randint(0, model.V, (B, T), generator=g) * am, "attention_mask": am}
    kw = dict(per_sample_loss_fn=_token_losses, step_size=EPS, localization=GAMMA, nbeta=8.0, **RUN)
    tokens = susceptibilities(model, [batch], batch, ["w"], **kw)
    samples = susceptibilities(model, [batch], batch, ["w"], per_token=False, **kw)

    counted = (am[:, 1:] & am[:, :-1]).bool().numpy()
    f, c, ids = model.f.numpy(), model.c.numpy(), batch["input_ids"].numpy()
    terms = [
        [(np.outer(f[ids[b, t]], f[ids[b, t]]), -2 * c[ids[b, t + 1]] * f[ids[b, t]]) for t in range(T - 1)]
        for b in range(B)
    ]
    kept = [terms[b][t] for b in range(B) for t in range(T - 1) if counted[b, t]]
    A_L, a_L = sum(k[0] for k in kept) / len(kept), sum(k[1] for k in kept) / len(kept)  # the training loss
    P = 2 * 8.0 * A_L + GAMMA * np.eye(D)
    m = np.linalg.solve(P, -8.0 * a_L + GAMMA * model.w.detach().numpy())
    S = np.linalg.inv(P - EPS * P @ P / 4)
    exact = 8.0 * _minus_cov((A_L, a_L), kept, m, S)
    got = tokens.chi[0].reshape(B, T - 1)
    assert np.all(got[~counted] == 0.0)
    _within_se(got[counted], tokens.chi_se[0].reshape(B, T - 1)[counted], exact)
    per_sample = [
        (
            sum(terms[b][t][0] for t in range(T - 1) if counted[b, t]) / counted[b].sum(),
            sum(terms[b][t][1] for t in range(T - 1) if counted[b, t]) / counted[b].sum(),
        )
        for b in range(B)
    ]
    exact = 8.0 * _minus_cov((A_L, a_L), per_sample, m, S)
    _within_se(samples.chi[0], samples.chi_se[0], exact, rel=0.25)


# ----- per-sample gradient Gram against a naive loop ---------------------------------------------------------------
def _naive(model, loss_fn, *inputs, names=None) -> torch.Tensor:
    """One autograd.grad per sample of the batch's forward, over the trainable parameters (or ``names``)."""
    named = dict(model.named_parameters())
    ps = [named[n] for n in names] if names is not None else [p for p in named.values() if p.requires_grad]
    losses = loss_fn(model, *inputs)
    losses = losses.reshape(losses.shape[0], -1).sum(1)
    rows = []
    for i in range(len(losses)):
        gs = torch.autograd.grad(losses[i], ps, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, ps)]))
    r = torch.stack(rows).double()
    return r @ r.T


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _hf(arch):
    transformers = pytest.importorskip("transformers")
    T = transformers
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=29, n_embd=16, n_layer=2, n_head=4, n_positions=16)
        cfg.bos_token_id = cfg.eos_token_id = 0
        hf = T.GPT2LMHeadModel(cfg)
    else:
        hf = T.LlamaForCausalLM(
            T.LlamaConfig(
                vocab_size=29,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=24,
                max_position_embeddings=16,
            )
        )
    return pp.from_hf(hf.eval()).double()


def _per_token(m, t):
    return m(t, return_type="per_token_loss")


def _per_sequence(m, t):
    return m(t, return_type="per_token_loss").mean(-1)


def _masked(m, t, mask):
    return m(t, return_type="per_token_loss") * mask


def test_gram_of_an_mlp_equals_the_naive_loop():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64).T  # non-contiguous (6, 5)
    y = torch.randint(0, 3, (6,))

    def ce(m, x, y):
        return F.cross_entropy(m(x), y, reduction="none")

    assert not x.is_contiguous()
    assert _rel(per_sample_grad_gram(net, ce, x, y), _naive(net, ce, x.contiguous(), y)) < 1e-12
    assert _rel(per_sample_grad_gram(net, ce, x[:1], y[:1]), _naive(net, ce, x[:1], y[:1])) < 1e-12
    sub = gram_parameters(net, modules=["2"])
    assert set(sub) == {"2.weight", "2.bias"}
    assert (
        _rel(per_sample_grad_gram(net, ce, x, y, modules=["2"]), _naive(net, ce, x, y, names=list(sub)))
        < 1e-12
    )


@pytest.mark.parametrize("arch", ["native", "gpt2", "llama"])
def test_gram_of_transformers_equals_the_naive_loop(arch):
    if arch == "native":
        model = pp.Transformer(
            n_layers=2,
            d_model=12,
            n_heads=3,
            d_head=4,
            d_mlp=20,
            d_vocab=29,
            n_ctx=8,
            dtype=torch.float64,
            seed=0,
        )
    else:
        model = _hf(arch)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 29, (5, 8), generator=g)
    mask = torch.ones(5, 7, dtype=torch.float64)
    mask[1, 4:] = 0  # right padding: those positions' losses left out
    mask[3, 2:] = 0
    for lf, args in ((_per_token, ()), (_per_sequence, ()), (_masked, (mask,))):
        naive = _naive(model, lf, tokens, *args)
        assert _rel(per_sample_grad_gram(model, lf, tokens, *args), naive) < 1e-12, lf.__name__
    strided = torch.randint(0, 29, (8, 5), generator=g).T  # non-contiguous (5, 8)
    assert _rel(per_sample_grad_gram(model, _per_token, strided), _naive(model, _per_token, strided)) < 1e-12
    one = tokens[2:3]
    assert _rel(per_sample_grad_gram(model, _per_token, one), _naive(model, _per_token, one)) < 1e-12
    if arch != "llama":  # grouped-query attention's forward (expand_kv) runs on non-empty batches only
        for fn in (per_sample_grad_gram, per_sample_grad_gram_reference):  # no sample: the empty Gram
            empty = fn(model, _per_token, tokens[:0])
            assert empty.shape == (0, 0) and empty.dtype == torch.float64
        parts = per_sample_grad_gram(model, _per_token, tokens[:0], per_module=True, centered=True)
        assert parts and all(g.shape == (0, 0) for g in parts.values())
    if arch == "native":
        return
    # a padded Hugging Face batch (input_ids + attention_mask) through the library's padding-aware losses
    am = torch.ones(5, 8, dtype=torch.long)
    am[1, 5:] = 0
    am[3, 3:] = 0
    batch = {"input_ids": tokens * am, "attention_mask": am}

    def per_sample(m, b):
        return sample_losses(m, b)

    def per_token(m, b):
        return token_losses(m, b, fill=0.0)[0]

    for lf in (per_sample, per_token):
        assert _rel(per_sample_grad_gram(model, lf, batch), _naive(model, lf, batch)) < 1e-12


@pytest.mark.parametrize("arch", ["native", "gpt2"])
def test_gram_over_parameter_subsets_equals_the_naive_loop(arch):
    """Frozen weights are left out; ``modules=`` on pypattern's Transformer (and a converted model) restricts its
    default sites to those modules (a GPT-2's embedding, tied to the unembedding, with both uses)."""
    if arch == "native":
        model = pp.Transformer(
            n_layers=2,
            d_model=12,
            n_heads=3,
            d_head=4,
            d_mlp=20,
            d_vocab=29,
            n_ctx=8,
            dtype=torch.float64,
            seed=0,
        )
    else:
        model = _hf(arch)
    tokens = torch.randint(0, 29, (4, 7), generator=torch.Generator().manual_seed(3))
    names = [n for n, _ in model.named_parameters()]
    for modules, prefixes in (
        (["blocks.0.attn"], ("blocks.0.attn.",)),
        (["blocks.1.mlp", "ln_final"], ("blocks.1.mlp.", "ln_final.")),
        (["blocks.1", "blocks.1.attn"], ("blocks.1.",)),
        (["embed"], ("embed.",)),
    ):
        want = [n for n in names if n.startswith(prefixes)]
        assert sorted(gram_parameters(model, modules=modules)) == sorted(want), modules
        naive = _naive(model, _per_token, tokens, names=want)
        assert _rel(per_sample_grad_gram(model, _per_token, tokens, modules=modules), naive) < 1e-12, modules
        ref = per_sample_grad_gram_reference(model, _per_token, tokens, modules=modules)
        assert _rel(ref, naive) < 1e-12, modules
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("blocks.0."))
    assert _rel(per_sample_grad_gram(model, _per_token, tokens), _naive(model, _per_token, tokens)) < 1e-12
    with pytest.raises(ValueError, match=r"no site covers a parameter that requires grad.*unfreeze"):
        per_sample_grad_gram(model, _per_token, tokens, modules=["blocks.0"])


def test_empty_gram_selections_are_refused_naming_the_argument():
    model = pp.Transformer(
        n_layers=1, d_model=8, n_heads=2, d_mlp=8, d_vocab=7, n_ctx=5, dtype=torch.float64, seed=0
    )
    net = nn.Sequential(nn.Linear(3, 2)).double()
    tokens = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 3, dtype=torch.float64)
    for m, lf, inp in ((model, _per_token, tokens), (net, lambda m, x: m(x).sum(1), x)):
        for fn in (per_sample_grad_gram, per_sample_grad_gram_reference):
            for empty in ([], ()):
                with pytest.raises(ValueError, match=r"modules=(\[\]|\(\)) names no module"):
                    fn(m, lf, inp, modules=empty)
            with pytest.raises(ValueError, match=r"sites=\[\] holds no GramSite"):
                fn(m, lf, inp, sites=[])
    with pytest.raises(
        ValueError, match=r"modules: 'blocks.0.hook_resid_pre' \(a HookPoint\) holds no parameter"
    ):
        per_sample_grad_gram(model, _per_token, tokens, modules=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match=r"modules: 'blocks.9' is not a submodule name"):
        per_sample_grad_gram(model, _per_token, tokens, modules=["blocks.9"])
