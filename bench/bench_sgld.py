"""The fused SGLD step against plain torch on the same work, and against the bound of its memory traffic.

Work: one SGLD step over float32 parameters split into many tensors (like a model's weights and biases), noise on.
Traffic: read w, g, w0 and write w = 16 bytes per element; the bound is ``Tensor.copy_`` moving the same bytes
(8 bytes read + 8 written per element) in the same run. At 1e7 both stream from memory and the kernel comes
close to the copy. At 1e6 the 16 MB copy runs from cache, and the kernel is bound by its arithmetic instead:
generating one normal (Philox4x32-10 + Box-Muller) costs more per element than a cached copy. Measured figures,
with date, CPU, threads and command, are in docs/benchmarks.md.

Run: ``make bench`` (or ``pytest bench/bench_sgld.py --benchmark-only``). Threads: see bench/conftest.py.
"""

import math

import pytest
import torch

import pypattern
from pypattern.ops.sgld import sgld_step_

EPS, NBETA, LOC, WD = 1e-4, 46.2, 100.0, 0.0
SIZES = {"1e6": 1_000_000, "1e7": 10_000_000}


def _tensors(n):
    """25 weight matrices and 25 bias vectors with n elements in all."""
    bias = 1000
    w = (n - 25 * bias) // 25
    shapes = [(w,)] * 24 + [(n - 25 * bias - 24 * w,)] + [(bias,)] * 25
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    anchors = [p.clone() for p in params]
    assert sum(p.numel() for p in params) == n
    return params, grads, anchors


def torch_loop_step(params, grads, anchors, noise_scale=1.0):
    """What one writes in plain torch: a per-tensor loop of in-place ops and torch.randn noise."""
    h, s = 0.5 * EPS, math.sqrt(EPS) * noise_scale
    for w, g, a in zip(params, grads, anchors):
        drift = g * (h * NBETA)
        drift.add_(w - a, alpha=h * LOC)
        w.sub_(drift)
        w.add_(torch.randn_like(w), alpha=s)


def torch_foreach_step(params, grads, anchors, noise_scale=1.0):
    """The same with torch._foreach ops (what torch.optim's foreach paths use)."""
    h, s = 0.5 * EPS, math.sqrt(EPS) * noise_scale
    diff = torch._foreach_sub(params, anchors)
    torch._foreach_mul_(diff, h * LOC)
    torch._foreach_add_(diff, grads, alpha=h * NBETA)
    torch._foreach_sub_(params, diff)
    noise = [torch.randn_like(w) for w in params]
    torch._foreach_add_(params, noise, alpha=s)


def _setup(benchmark, n, role, label):
    benchmark.extra_info.update(
        role=role, label=label, bytes=16 * n, elements=n, threads=torch.get_num_threads()
    )


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize(
    "backend",
    [b for b, v in pypattern.backends().items() if v["available"] and b in ("cpp", "cuda")],
)
@pytest.mark.parametrize("path", ["validated", "fast"])
def test_fused(benchmark, size, backend, path):
    """``validated``: the public call as a user writes it (checks every argument, including that the anchors are
    finite); ``fast``: ``validate=False``, what the SGLD optimizer and the chain runner call after their first step."""
    n = SIZES[size]
    benchmark.group = f"sgld step, {size} float32 in 50 tensors"
    _setup(benchmark, n, "ours", f"pypattern[{backend}, {path}]")
    params, grads, anchors = _tensors(n)
    counter = iter(range(10**9))
    benchmark.pedantic(
        lambda: sgld_step_(
            params,
            grads,
            anchors,
            step_size=EPS,
            nbeta=NBETA,
            localization=LOC,
            seed=0,
            step=next(counter),
            backend=backend,
            validate=path == "validated",
        ),
        rounds=20 if n < 5e6 else 8,
        warmup_rounds=2,
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_torch_loop(benchmark, size):
    n = SIZES[size]
    benchmark.group = f"sgld step, {size} float32 in 50 tensors"
    _setup(benchmark, n, "reference", "torch loop")
    params, grads, anchors = _tensors(n)
    benchmark.pedantic(
        lambda: torch_loop_step(params, grads, anchors), rounds=10 if n < 5e6 else 4, warmup_rounds=1
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_torch_foreach(benchmark, size):
    n = SIZES[size]
    benchmark.group = f"sgld step, {size} float32 in 50 tensors"
    _setup(benchmark, n, "reference", "torch foreach")
    params, grads, anchors = _tensors(n)
    benchmark.pedantic(
        lambda: torch_foreach_step(params, grads, anchors), rounds=10 if n < 5e6 else 4, warmup_rounds=1
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_copy_bound(benchmark, size):
    n = SIZES[size]
    benchmark.group = f"sgld step, {size} float32 in 50 tensors"
    _setup(benchmark, n, "bound", "copy of the same bytes")
    src, dst = torch.randn(2 * n), torch.empty(2 * n)
    benchmark.pedantic(lambda: dst.copy_(src), rounds=20 if n < 5e6 else 8, warmup_rounds=2)


def test_fused_agrees_with_reference_here():
    """The benchmarked kernel is the tested one: a quick agreement check in the bench run itself."""
    params, grads, anchors = _tensors(100_000)
    ref = [p.clone() for p in params]
    kw = dict(step_size=EPS, nbeta=NBETA, localization=LOC, seed=1, step=1)
    sgld_step_(params, grads, anchors, **kw)
    sgld_step_(ref, grads, anchors, backend="reference", **kw)
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


def test_torch_steps_are_the_same_update():
    """The plain-torch steps timed beside the kernel compute its update: checked with the noise off on both sides."""
    params, grads, anchors = _tensors(100_000)
    kw = dict(step_size=EPS, nbeta=NBETA, localization=LOC, noise_scale=0.0, seed=0, step=0)
    ours = [p.clone() for p in params]
    sgld_step_(ours, grads, anchors, **kw)
    for step in (torch_loop_step, torch_foreach_step):
        theirs = [p.clone() for p in params]
        step(theirs, grads, anchors, noise_scale=0.0)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
