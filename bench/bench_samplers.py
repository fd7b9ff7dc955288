"""The fused SGNHT and RMSprop-SGLD steps against plain torch doing the same update, and against the bound of
their memory traffic (as bench/bench_sgld.py does for SGLD).

Work: one step over float32 parameters split into 50 tensors (like a model's weights and biases), noise on.
Traffic per element: read w, g, w0 and the state (momentum or V), write w and the state = 24 bytes; the bound is
``Tensor.copy_`` moving the same bytes (12 read + 12 written per element) in the same run.

Run: ``pytest bench/bench_samplers.py --benchmark-only`` (threads: bench/conftest.py, default 1).
"""

import math

import pytest
import torch

import pypattern
from pypattern.ops.rmsprop_sgld import rmsprop_sgld_step_
from pypattern.ops.sgnht import sgnht_step_

EPS, NBETA, LOC, A_D, ALPHA, RMS_EPS = 1e-4, 46.2, 100.0, 0.01, 0.99, 0.1
SIZES = {"1e6": 1_000_000, "1e7": 10_000_000}
BYTES = 24


def _tensors(n):
    """25 weight matrices and 25 bias vectors with n elements in all; (params, grads, anchors, states)."""
    bias = 1000
    w = (n - 25 * bias) // 25
    shapes = [(w,)] * 24 + [(n - 25 * bias - 24 * w,)] + [(bias,)] * 25
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    anchors = [p.clone() for p in params]
    states = [torch.randn(s, generator=gen).abs_().mul_(0.01) for s in shapes]
    return params, grads, anchors, states


def torch_sgnht_step(params, grads, anchors, momenta, xi, noise_scale=1.0):
    """SGNHT in plain torch: a per-tensor loop of in-place ops and torch.randn noise, then the thermostat."""
    s = math.sqrt(2 * A_D * EPS) * noise_scale
    kinetic, count = 0.0, 0
    for w, g, a, p in zip(params, grads, anchors, momenta):
        drift = g * (EPS * NBETA)
        drift.add_(w - a, alpha=EPS * LOC)
        p.mul_(1.0 - xi[0]).sub_(drift).add_(torch.randn_like(w), alpha=s)
        w.add_(p)
        kinetic += float(torch.dot(p, p))
        count += p.numel()
    xi[0] += kinetic / count - EPS * noise_scale**2


def torch_rmsprop_step(params, grads, anchors, square_avgs, noise_scale=1.0):
    """RMSprop-SGLD in plain torch: a per-tensor loop of in-place ops and torch.randn noise."""
    for w, g, a, v in zip(params, grads, anchors, square_avgs):
        v.mul_(ALPHA).addcmul_(g, g, value=1 - ALPHA)
        precond = v.sqrt().add_(RMS_EPS).reciprocal_()
        drift = g * NBETA
        drift.add_(w - a, alpha=LOC)
        w.addcmul_(precond, drift, value=-0.5 * EPS)
        w.addcmul_(precond.sqrt_(), torch.randn_like(w), value=math.sqrt(EPS) * noise_scale)


def _setup(benchmark, n, role, label, group):
    benchmark.group = f"{group} step, {n:.0e} float32 in 50 tensors"
    benchmark.extra_info.update(
        role=role, label=label, bytes=BYTES * n, elements=n, threads=torch.get_num_threads()
    )


FUSED = [b for b, v in pypattern.backends("sgnht_step_").items() if v["available"] and b in ("cpp", "cuda")]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", FUSED)
def test_sgnht_fused(benchmark, size, backend):
    n = SIZES[size]
    _setup(benchmark, n, "ours", f"pypattern[{backend}]", "sgnht")
    params, grads, anchors, momenta = _tensors(n)
    th = torch.tensor([A_D], dtype=torch.float64)
    counter = iter(range(10**9))
    benchmark.pedantic(
        lambda: sgnht_step_(
            params,
            grads,
            anchors,
            momenta,
            th,
            step_size=EPS,
            nbeta=NBETA,
            localization=LOC,
            diffusion_factor=A_D,
            seed=0,
            step=next(counter),
            backend=backend,
            validate=False,
        ),
        rounds=20 if n < 5e6 else 8,
        warmup_rounds=2,
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_sgnht_torch(benchmark, size):
    n = SIZES[size]
    _setup(benchmark, n, "reference", "torch loop", "sgnht")
    params, grads, anchors, momenta = _tensors(n)
    xi = [A_D]
    benchmark.pedantic(
        lambda: torch_sgnht_step(params, grads, anchors, momenta, xi),
        rounds=10 if n < 5e6 else 4,
        warmup_rounds=1,
    )


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", FUSED)
def test_rmsprop_sgld_fused(benchmark, size, backend):
    n = SIZES[size]
    _setup(benchmark, n, "ours", f"pypattern[{backend}]", "rmsprop_sgld")
    params, grads, anchors, square_avgs = _tensors(n)
    counter = iter(range(10**9))
    benchmark.pedantic(
        lambda: rmsprop_sgld_step_(
            params,
            grads,
            anchors,
            square_avgs,
            step_size=EPS,
            nbeta=NBETA,
            localization=LOC,
            alpha=ALPHA,
            eps=RMS_EPS,
            seed=0,
            step=next(counter),
            backend=backend,
            validate=False,
        ),
        rounds=20 if n < 5e6 else 8,
        warmup_rounds=2,
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_rmsprop_sgld_torch(benchmark, size):
    n = SIZES[size]
    _setup(benchmark, n, "reference", "torch loop", "rmsprop_sgld")
    params, grads, anchors, square_avgs = _tensors(n)
    benchmark.pedantic(
        lambda: torch_rmsprop_step(params, grads, anchors, square_avgs),
        rounds=10 if n < 5e6 else 4,
        warmup_rounds=1,
    )


@pytest.mark.parametrize("group", ["sgnht", "rmsprop_sgld"])
@pytest.mark.parametrize("size", list(SIZES))
def test_copy_bound(benchmark, size, group):
    n = SIZES[size]
    _setup(benchmark, n, "bound", "copy of the same bytes", group)
    src, dst = torch.randn(3 * n), torch.empty(3 * n)
    benchmark.pedantic(lambda: dst.copy_(src), rounds=20 if n < 5e6 else 8, warmup_rounds=2)


def test_torch_steps_are_the_same_update():
    """The plain-torch steps compute the ops' update: checked with the noise off on both sides."""
    params, grads, anchors, states = _tensors(100_000)
    kw = dict(step_size=EPS, nbeta=NBETA, localization=LOC, noise_scale=0.0, seed=0, step=0)
    ref_p, ref_s = [p.clone() for p in params], [s.clone() for s in states]
    out_p, out_s = [p.clone() for p in params], [s.clone() for s in states]
    th, xi = torch.tensor([A_D], dtype=torch.float64), [A_D]
    sgnht_step_(out_p, grads, anchors, out_s, th, diffusion_factor=A_D, **kw)
    torch_sgnht_step(ref_p, grads, anchors, ref_s, xi, noise_scale=0.0)
    assert abs(float(th) - xi[0]) < 1e-9
    ref_p2, ref_s2 = [p.clone() for p in params], [s.clone() for s in states]
    out_p2, out_s2 = [p.clone() for p in params], [s.clone() for s in states]
    rmsprop_sgld_step_(out_p2, grads, anchors, out_s2, alpha=ALPHA, eps=RMS_EPS, **kw)
    torch_rmsprop_step(ref_p2, grads, anchors, ref_s2, noise_scale=0.0)
    for a, b in zip(out_p + out_s + out_p2 + out_s2, ref_p + ref_s + ref_p2 + ref_s2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
