"""Numerical stability on inputs held at scale, against float64 references: float32 observables with a large mean
streamed into the covariance accumulator (in small chunks, merged across accumulators), and centred per-sample
gradient Grams of float32 models whose gradients share a large common part."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _backend_cases import backend_devices, to
from torch import nn

from pypattern.gram import per_sample_grad_gram, per_sample_grad_gram_reference
from pypattern.ops.covariance import CrossCovariance


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().cpu().double(), y.detach().cpu().double()
    return float((x - y).abs().max() / y.abs().max())


def _two_pass(a: torch.Tensor, b: torch.Tensor):
    """Float64 two-pass covariance, variances and means of the given (float32) values."""
    a64, b64 = a.double(), b.double()
    ac, bc = a64 - a64.mean(0), b64 - b64.mean(0)
    m = a.shape[0]
    return ac.T @ bc / (m - 1), (ac * ac).sum(0) / (m - 1), (bc * bc).sum(0) / (m - 1), b64.mean(0)


@pytest.mark.parametrize("backend, device", backend_devices("covariance_update_"))
def test_float32_observables_with_large_mean_streamed_and_merged(backend, device):
    # per-token-loss-like observables: mean 1e4, spread 1e-2 (float32 keeps about 2 of their digits of spread),
    # drifting by 100 spreads over the draws; fed as three accumulators (one draw at a time through the buffer,
    # ragged chunks, non-contiguous views) merged at the end
    k, n, m = 3, 7, 6000
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(m, k, dtype=torch.float64, generator=gen)
    drift = torch.linspace(0.0, 1.0, m, dtype=torch.float64)[:, None]
    a = (1e4 + 1e-2 * z + drift).float()
    noise = torch.randn(m, n, dtype=torch.float64, generator=gen)
    mix = torch.randn(k, n, dtype=torch.float64, generator=gen)
    b = (-2e4 + 1e-2 * (z @ mix + noise) - 2 * drift).float()
    wide = torch.zeros(m, 2 * k, dtype=torch.float32)
    wide[:, ::2] = a
    b_cols = torch.empty(n, m, dtype=torch.float32).T
    b_cols.copy_(b)
    a_dev, b_dev, wide, b_cols = to(device, a, b, wide, b_cols)
    parts = [CrossCovariance(k, n, backend=backend, device=device) for _ in range(3)]
    cut1, cut2 = 300, 3100
    per_draw = 300 if backend == "triton" else cut1  # the interpreter runs each buffered flush slowly
    for i in range(per_draw):
        parts[0].update(a_dev[i], b_dev[i])
    parts[0].update(a_dev[per_draw:cut1], b_dev[per_draw:cut1])
    for r0, r1 in ((cut1, cut1 + 1), (cut1 + 1, 2000), (2000, cut2)):
        parts[1].update(wide[r0:r1, ::2], b_cols[r0:r1])
    parts[2].update(a_dev[cut2:], b_dev[cut2:])
    acc = parts[2].merge(parts[0]).merge(parts[1])
    cov, var_a, var_b, mean_b = _two_pass(a, b)
    assert acc.count == m
    assert _rel(acc.cov(), cov) < 1e-9
    assert _rel(acc.var_a(), var_a) < 1e-9
    assert _rel(acc.var_b(), var_b) < 1e-9
    np.testing.assert_allclose(acc.mean_b.cpu().numpy(), mean_b.numpy(), rtol=1e-14)
    corr = cov / torch.sqrt(torch.outer(var_a, var_b))
    assert float((acc.corr().cpu() - corr).abs().max()) < 1e-9


def _squared_loss(model, x):
    return 0.5 * (model(x) ** 2).sum(-1)


class _Net(nn.Module):
    """Linear -> LayerNorm -> Linear, float32: every kind of dense site."""

    def __init__(self, d_in: int = 24, hidden: int = 16, d_out: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


@pytest.mark.parametrize("method", ["pairwise", "outer"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_centred_gram_of_float32_gradients_with_a_common_part(method, layout):
    # inputs 1e-2 apart around a common point: the per-sample gradients share a part about 60 times their spread
    # (|g|^2 / |g - mean|^2 ~ 4e3), so float32 products lose that ratio's digits when the Gram is centred
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    x = 1.0 + 1e-2 * torch.randn(32, 48)
    if layout == "transposed":
        x = x.T.contiguous().T
        assert not x.is_contiguous()
    got = per_sample_grad_gram(lin, _squared_loss, x, centered=True, method=method, check=False)
    # the same float32 per-sample gradients (dl/dy = y from the float32 forward), their centred Gram in float64
    with torch.no_grad():
        y = lin(x).double()
    g = torch.cat([torch.einsum("bo,bi->boi", y, x.double()).reshape(32, -1), y], 1)
    gc = g - g.mean(0)
    ratio = float((g * g).sum(1).max() / (gc * gc).sum(1).max())
    assert ratio > 1e3
    assert _rel(got, gc @ gc.T) < 1e-10


def test_centred_gram_common_part_every_site_kind_against_vmap():
    # a model with norm and linear sites, per-site: against vmap(grad) per-sample gradients of the float32 model
    # (their own float32 rounding bounds the agreement: about 3e-7 here, where float32 products gave 1e-3)
    torch.manual_seed(1)
    net = _Net()
    x = 0.5 + 3e-3 * torch.randn(20, 24)
    got = per_sample_grad_gram(net, _squared_loss, x, centered=True, check=False)
    ref = per_sample_grad_gram_reference(net, _squared_loss, x, centered=True)
    unc = per_sample_grad_gram_reference(net, _squared_loss, x)
    assert float(unc.diagonal().max() / ref.diagonal().max()) > 1e3
    assert _rel(got, ref) < 1e-5
    # the float32 products the uncentred Gram keeps are still taken where centring cancels little
    spread = 0.5 * torch.randn(20, 24)
    got = per_sample_grad_gram(net, _squared_loss, spread, centered=True, check=False)
    ref = per_sample_grad_gram_reference(net, _squared_loss, spread, centered=True)
    assert _rel(got, ref) < 1e-5


def test_centred_gram_of_identical_samples_is_zero():
    # every sample the same: the centred Gram is exactly the Gram of zeros, not the rounding of the common part
    lin = nn.Linear(16, 8)
    x = torch.randn(1, 16).expand(6, 16).contiguous()
    got = per_sample_grad_gram(lin, _squared_loss, x, centered=True, check=False)
    unc = per_sample_grad_gram(lin, _squared_loss, x, check=False)
    assert float(got.abs().max()) <= 1e-12 * float(unc.abs().max())
    empty = per_sample_grad_gram(lin, _squared_loss, x[:0], centered=True, check=False)
    assert empty.shape == (0, 0)
