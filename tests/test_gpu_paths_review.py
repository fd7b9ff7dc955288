"""GPU paths of the kernels that a CPU run does not show by itself.

- The sampler noise near u = 1: the Box-Muller radius ``r = sqrt(-2 log u)`` is small there, and an absolute
  error in ``log u`` (nvcc's ``--use_fast_math`` turns ``logf`` into ``lg2.approx``) is a large relative error of
  ``r``. Every backend's radii equal the reference's to float precision, the smallest ones included (the sums of
  squares of each pair of normals do not depend on the sin/cos approximations).
- The Chan weight of the co-moment update reaches the Triton kernel as float64 (a Python float argument becomes
  float32 on a GPU, never in the interpreter): means that drift between chunks keep the float64 accuracy.
- The CUDA registrations refuse a mask of another shape or device, and tensors on another GPU than the first
  parameter's, by name (the optimizers' steps after the first skip the Python checks).

The cases for the ``cuda`` backend and for two GPUs run where those exist; the others run everywhere (the Triton
kernels in the interpreter where there is no GPU).
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch
from _backend_cases import backend_devices
from _triton_aot import assert_compiles_for_gpus

import pypattern
from pypattern.ops import (
    CrossCovariance,
    philox_normals,
    rmsprop_sgld_step_,
    sgld_step_,
    sgnht_step_,
)

TESTS = os.path.dirname(os.path.abspath(__file__))
SEED, STEP = 2**63 + 11, 2**40 + 1
NUMEL = 2**18  # 2**17 radii: about 160 of them below 0.05 (u within 1.25e-3 of 1)


def _noise(op: str, backend: str, device: str) -> torch.Tensor:
    """The noise of one step of ``op`` on one tensor of NUMEL zeros, with every drift 0 so that the step moves the
    tensor (or its momentum) by the noise itself."""
    z = lambda: torch.zeros(NUMEL, device=device)  # noqa: E731
    w, g, a = z(), z(), z()
    common = dict(step_size=1.0, nbeta=0.0, localization=0.0, seed=SEED, step=STEP, backend=backend)
    if op == "sgld_step_":
        sgld_step_([w], [g], [a], **common)
        return w.cpu()
    if op == "sgnht_step_":
        p, xi = z(), torch.zeros(1, dtype=torch.float64, device=device)
        # noise_std = sqrt(2 * 0.5 * 1) * 1 = 1, thermostat 0: the new momentum is the noise
        sgnht_step_([w], [g], [a], [p], xi, diffusion_factor=0.5, **common)
        return p.cpu()
    v = z()  # V stays 0, preconditioner 1 / (0 + 1): the step is sqrt(1) * 1 * noise
    rmsprop_sgld_step_([w], [g], [a], [v], eps=1.0, **common)
    return w.cpu()


def _radii(normals: torch.Tensor) -> torch.Tensor:
    """The Box-Muller radius of each pair of normals (2k, 2k + 1), in float64."""
    pairs = normals.double().view(-1, 2)
    return pairs.norm(dim=1)


@pytest.mark.parametrize(
    "op, backend, device",
    [
        pytest.param(op, *case.values, id=f"{op}-{case.id}", marks=case.marks)
        for op in ("sgld_step_", "sgnht_step_", "rmsprop_sgld_step_")
        for case in backend_devices(op, reference=False)
    ],
)
def test_noise_radii_equal_the_reference_near_u_equal_1(op, backend, device):
    ref = philox_normals(NUMEL, seed=SEED, tensor_index=0, step=STEP)
    got = _noise(op, backend, device)
    r_ref, r_got = _radii(ref), _radii(got)
    small = r_ref < 0.05
    assert int(small.sum()) > 50  # the case is present
    rel = ((r_got - r_ref).abs() / r_ref).max().item()
    rel_small = ((r_got - r_ref).abs() / r_ref)[small].max().item()
    # float precision: a few float32 ulps of r, the smallest radii included
    assert rel < 1e-5 and rel_small < 1e-5, (rel, rel_small)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=5e-6)


def _two_pass(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)).T @ (y - y.mean(0)) / (len(x) - 1)


@pytest.mark.parametrize("backend, device", backend_devices("covariance_update_"))
def test_covariance_of_chunks_with_drifting_means_keeps_float64_accuracy(backend, device):
    """Chunks whose means move by 50 to 100 standard deviations, with Chan weights count * m / (count + m) that are
    not float32 numbers (2.1, 110 / 21, ...): the co-moments carry the weights times the squared mean shifts, so a
    float32 weight is off by about 2e-8 of the result; float64 keeps 1e-15."""
    g = torch.Generator().manual_seed(7)
    k, n = 3, 4
    chunks, xs, ys = [(7, 0.0), (3, 50.0), (11, -30.0), (5, 100.0), (1, 20.0)], [], []
    # buffer_draws=1: every chunk is its own update (smaller ones would be buffered and folded in as one)
    acc = CrossCovariance(k, n, track_auto="full", backend=backend, device=device, buffer_draws=1)
    for m, shift in chunks:
        x = torch.randn(m, k, generator=g, dtype=torch.float64) + shift
        y = torch.randn(m, n, generator=g, dtype=torch.float64) - 0.5 * shift
        y[:, :k] += 0.3 * x
        xs.append(x), ys.append(y)
        acc.update(x.to(device), y.to(device))
    x, y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
    for got, want in (
        (acc.cov(), _two_pass(x, y)),
        (acc.cov_aa(), _two_pass(x, x)),
        (acc.cov_bb(), _two_pass(y, y)),
    ):
        got = got.cpu().numpy()
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-12


_CHAN_WEIGHT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, TESTS_DIR)
    import torch
    from _triton_binder import compile_like_launcher, recording
    import pypattern.ops.covariance.triton as ct

    a, b = torch.randn(7, 40, dtype=torch.float64), torch.randn(7, 33, dtype=torch.float32)
    z = lambda s: torch.zeros(s, dtype=torch.float64)
    with recording(ct, "_comoment_kernel") as rec:
        ct.comoment_update_triton_(torch.zeros(40, 33, dtype=torch.float64), a, b, z(40), z(40), z(33), z(33),
                                   z(40), z(33), 2.1)
    ((grid, args, kwargs),) = rec.calls
    kernel = compile_like_launcher(rec.fn, args, kwargs, arch=80)
    names = [p.name for p in rec.fn.params]
    i = names.index("w")
    line = [s for s in kernel.asm["ptx"].splitlines() if f"_comoment_kernel_param_{i}," in s]
    assert line and ".f64" in line[0], line
    print("ok")
    """
).replace("TESTS_DIR", repr(TESTS))


def test_comoment_chan_weight_reaches_the_gpu_kernel_as_float64():
    """Compiled as Triton's CUDA launcher specialises the launch (no GPU needed): the weight parameter is an f64."""
    assert_compiles_for_gpus(_CHAN_WEIGHT)


# ---- the CUDA registrations' own checks ------------------------------------------------------------------------

_CUDA = pytest.mark.skipif(
    not pypattern.backends("sgld_step_")["cuda"]["available"], reason="no CUDA kernels or no GPU here"
)
_TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
KW = dict(step_size=1e-3, nbeta=1.0, localization=1.0, seed=1, step=2, backend="cuda", validate=False)


def _sampler_call(op, params, grads, anchors, masks):
    if op == "sgld":
        return sgld_step_(params, grads, anchors, masks=masks, **KW)
    states = [torch.zeros_like(p) for p in params]
    if op == "sgnht":
        xi = torch.zeros(1, dtype=torch.float64, device=params[0].device)
        return sgnht_step_(params, grads, anchors, states, xi, masks=masks, **KW)
    return rmsprop_sgld_step_(params, grads, anchors, states, masks=masks, **KW)


@_CUDA
@pytest.mark.parametrize("op", ["sgld", "sgnht", "rmsprop_sgld"])
def test_cuda_sampler_refuses_a_mask_of_another_shape(op):
    w = torch.zeros(10, device="cuda")
    big = torch.ones(20, device="cuda")  # more entries than the tensor: read silently before
    with pytest.raises(RuntimeError, match=r"mask shape mismatch at tensor 0"):
        _sampler_call(op, [w], [torch.zeros_like(w)], [torch.zeros_like(w)], [big])
    small = torch.ones(5, device="cuda")  # fewer: read past its end
    with pytest.raises(RuntimeError, match=r"mask shape mismatch at tensor 0"):
        _sampler_call(op, [w], [torch.zeros_like(w)], [torch.zeros_like(w)], [small])


@_CUDA
@pytest.mark.parametrize("op", ["sgld", "sgnht", "rmsprop_sgld"])
def test_cuda_sampler_refuses_a_cpu_mask(op):
    w = torch.zeros(10, device="cuda")
    with pytest.raises(RuntimeError, match=r"mask 0 is not on params\[0\]'s device"):
        _sampler_call(op, [w], [torch.zeros_like(w)], [torch.zeros_like(w)], [torch.ones(10)])


@_CUDA
@_TWO_GPUS
@pytest.mark.parametrize("op", ["sgld", "sgnht", "rmsprop_sgld"])
def test_cuda_sampler_refuses_tensors_on_another_gpu(op):
    """The anchors of tensor 1 stay on cuda:0 while its parameter moved to cuda:1 (a model moved after the first
    step): refused by name, not an illegal address on cuda:0."""
    ps = [torch.zeros(4, device="cuda:0"), torch.zeros(4, device="cuda:1")]
    with pytest.raises(RuntimeError, match=r"tensor 1 is not on params\[0\]'s device"):
        _sampler_call(op, ps, [torch.zeros_like(p) for p in ps], [torch.zeros(4, device="cuda:0")] * 2, None)


@_CUDA
@_TWO_GPUS
def test_cuda_sgnht_refuses_a_thermostat_on_another_gpu():
    w = torch.zeros(4, device="cuda:0")
    xi = torch.zeros(1, dtype=torch.float64, device="cuda:1")
    with pytest.raises(RuntimeError, match="thermostat is on cuda:1"):
        sgnht_step_([w], [torch.zeros_like(w)], [torch.zeros_like(w)], [torch.zeros_like(w)], xi, **KW)


@pytest.mark.skipif(
    not pypattern.backends("covariance_update_")["cuda"]["available"], reason="no CUDA kernels or no GPU here"
)
def test_cuda_covariance_refuses_a_full_m2_of_another_shape():
    """A (K, 1) m2 with K > 1 took the full co-moment path, which writes K x K entries."""
    k, n = 5, 3
    z = lambda *s: torch.zeros(*s, dtype=torch.float64, device="cuda")  # noqa: E731
    a, b = torch.randn(4, k, device="cuda"), torch.randn(4, n, device="cuda")
    with pytest.raises(RuntimeError, match=r"m2_a must have shape \(0,\), \(K,\) or \(K, K\)"):
        torch.ops.pypattern.covariance_update_(z(k), z(n), z(k), z(n), z(k, n), z(k, 1), z(0), a, b, 0)
