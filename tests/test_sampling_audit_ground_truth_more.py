"""Sampling against independent computations on configurations other tests leave out: the SGLD update written
out step by step (frozen parameters, a buffer, restrict_to, float64, burn-in and thinning, weight decay) on each
CPU backend and both chain loops; the exact stationary LLC of a quadratic loss under Euler-discretised SGLD with
restricted and frozen parameters; BatchNorm in train mode; the default nbeta of a data set smaller than its batch
size; devinterp 2.x's param_masks naming only frozen parameters."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern
from pypattern.ops.sgld import philox_normals
from pypattern.sampling import chain_seed, default_nbeta, estimate_llc, sample


class _FrozenMiddle(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.a = nn.Linear(3, 4, dtype=dtype)
        self.frozen = nn.Linear(4, 4, dtype=dtype)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(4, 1, dtype=dtype)
        self.register_buffer("scale", torch.tensor(1.5, dtype=dtype))

    def forward(self, x):
        return self.b(torch.tanh(self.frozen(torch.tanh(self.a(x))))) * self.scale


def _naive_sgld_losses(model, x, y, *, key, eps, nbeta, gamma, wd, burnin, every, draws, moving):
    """The draws' losses of one chain from the documented update, one tensor at a time: noise of moving tensor
    ``i`` (in parameter order) at step ``t`` is philox_normals(seed=key, tensor_index=i, step=t)."""
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = {n: t.clone() for n, t in w0.items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad and moving(n)]
    out = []
    for t in range(burnin + every * draws):
        ws = {n: w[n].detach().requires_grad_(n in names) for n in w}
        loss = nn.functional.mse_loss(torch.func.functional_call(model, ws, (x,)), y)
        if t >= burnin and (t - burnin) % every == 0:
            out.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, [ws[n] for n in names])
        for i, (n, g) in enumerate(zip(names, grads, strict=True)):
            xi = philox_normals(w[n].numel(), seed=key, tensor_index=i, step=t).to(w[n].dtype).view_as(w[n])
            drift = nbeta * g + gamma * (w[n] - w0[n]) + wd * w[n]
            w[n] = (w[n] - eps / 2 * drift + math.sqrt(eps) * xi).detach()
    return np.array(out)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sgld_draws_equal_the_update_written_out_with_frozen_buffer_and_restrict(backend, dtype):
    if not pypattern.backends()[backend]["available"]:
        pytest.skip(f"{backend} not available")
    torch.manual_seed(0)
    model = _FrozenMiddle(dtype)
    x, y = torch.randn(16, 3, dtype=dtype), torch.randn(16, 1, dtype=dtype)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    hyper = dict(step_size=1e-3, nbeta=20.0, localization=5.0, weight_decay=0.3)
    layout = dict(num_burnin_steps=3, num_steps_bw_draws=2, num_draws=4)
    tol = (
        1e-12
        if (dtype == torch.float64 and backend == "reference")
        else (1e-7 if dtype == torch.float64 else 5e-6)
    )
    for restrict, moving in ((None, lambda n: True), ("b.*", lambda n: n.startswith("b."))):
        want = [
            _naive_sgld_losses(
                model, x, y, key=chain_seed(7, c), eps=1e-3, nbeta=20.0, gamma=5.0, wd=0.3,
                burnin=3, every=2, draws=4, moving=moving,
            )
            for c in range(2)
        ]  # fmt: skip
        for batched in (False, True):
            r = sample(
                model, loader, num_chains=2, seed=7, batched=batched, backend=backend, restrict_to=restrict,
                quiet=True, warn_nonstationary=False, **hyper, **layout,
            )  # fmt: skip
            assert r.batched is batched
            np.testing.assert_allclose(r.loss_trace, np.stack(want), rtol=0, atol=tol)
    assert model.scale.item() == 1.5 and not model.frozen.weight.requires_grad


def _exact_llc(h, nbeta, gamma, eps):
    """E[nbeta (L(w) - L(w*))] for L quadratic with Hessian ``h`` under the Euler chain
    w <- w - (eps/2) C (w - w*) + sqrt(eps) xi, C = nbeta h + gamma: stationary covariance (C (I - eps C / 4))^-1."""
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    c = nbeta * h + gamma * eye
    cov = torch.linalg.inv(c @ (eye - eps * c / 4))
    return float(0.5 * nbeta * torch.trace(h @ cov))


def test_quadratic_llc_with_restricted_and_frozen_parameters_equals_the_discrete_chains_exact_value():
    torch.manual_seed(0)
    n = 64
    x = torch.randn(n, 5, dtype=torch.float64)
    y = x @ torch.randn(5, 1, dtype=torch.float64) + 0.3 * torch.randn(n, 1, dtype=torch.float64)

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
            self.b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
            self.c = nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, x):
            return x @ torch.cat([self.a, self.b, self.c])[:, None]

    m = Split()
    w = torch.linalg.lstsq(x, y).solution[:, 0]  # w* at the minimum: L is exactly quadratic around it
    with torch.no_grad():
        m.a.copy_(w[:2]), m.b.copy_(w[2:4]), m.c.copy_(w[4:])
    m.c.requires_grad_(False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=n)
    h = 2 * x.T @ x / n
    nbeta, eps, gamma = 30.0, 2e-3, 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = estimate_llc(
            m, loader, step_size=eps, nbeta=nbeta, localization=gamma, num_chains=16, num_draws=300,
            num_burnin_steps=200, seed=1, quiet=True, restrict_to="b",
        )  # fmt: skip
    want = _exact_llc(h[2:4, 2:4], nbeta, gamma, eps)  # only b moves: c is frozen, a left out
    assert abs(r.llc_mean - want) <= 3.5 * r.llc_se, (r.llc_mean, r.llc_se, want)
    assert r.llc_se < 0.1 * want


def test_batchnorm_in_train_mode_keeps_its_buffers_and_chains_do_not_depend_on_each_other():
    torch.manual_seed(0)
    x, y = torch.randn(24, 3), torch.randn(24, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        m[1].running_mean.fill_(0.3), m[1].running_var.fill_(2.0)
    m.train()
    before = {k: b.clone() for k, b in m.named_buffers()}
    kw = dict(step_size=1e-3, nbeta=5.0, localization=10.0, num_chains=3, num_draws=4, quiet=True, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = sample(m, loader, **kw)  # in-place running statistics do not run under vmap: sequential
        seq = sample(m, loader, batched=False, **kw)
        alone = sample(m, loader, batched=False, chains=[2], **kw)
    assert not auto.batched and m.training
    assert all(torch.equal(before[k], b) for k, b in m.named_buffers())
    np.testing.assert_array_equal(auto.loss_trace, seq.loss_trace)
    np.testing.assert_array_equal(alone.loss_trace[2], seq.loss_trace[2])


def test_default_nbeta_of_a_data_set_smaller_than_the_batch_size_is_the_samplers():
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = sample(nn.Linear(3, 1), loader, step_size=1e-3, num_chains=2, num_draws=3, quiet=True)
    assert r.config["nbeta"] == pytest.approx(10 / math.log(10))  # every batch holds the 10 samples
    assert default_nbeta(loader) == pytest.approx(r.config["nbeta"], rel=1e-15)
    assert pypattern.devinterp.default_nbeta(loader) == pytest.approx(10 / math.log(10))
    # drop_last and a data set at least as large keep the batch size
    big = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 3)), batch_size=32)
    assert default_nbeta(big) == pytest.approx(32 / math.log(32))


def test_devinterp_param_masks_naming_only_frozen_parameters_is_an_error_naming_param_masks():
    from pypattern.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=8, n_ctx=8, d_mlp=32, seed=0)
    m = Transformer(cfg)
    m.blocks[0].attn.W_Q.requires_grad_(False)
    ids = torch.randint(0, 8, (10, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"param_masks names only frozen parameters.*blocks\.0\.attn\.W_Q"):
        pypattern.devinterp.llc(
            m, ids, lr=1e-4, n_beta=10.0, localization=100.0, num_chains=2, num_draws=3, batch_size=4,
            num_init_loss_batches=2, param_masks={"blocks.0.attn.W_Q": None},
        )  # fmt: skip
