"""In-place sampler steps and the gradient Gram kernels on inputs whose handling must not depend on the backend:
overlapping views, state tensors that take gradients, inference tensors outside inference mode, meta tensors;
the pairwise Gram's gradient and an empty batch of the outer form."""

from __future__ import annotations

import pytest
import torch

import pypattern
from pypattern.ops import grad_gram_linear, grad_gram_pairwise, rmsprop_sgld_step_, sgld_step_, sgnht_step_

KW = dict(step_size=1e-3, nbeta=10.0, localization=5.0, seed=7, step=3)
BACKENDS = ["reference"] + (["cpp"] if pypattern.backends("sgld_step_")["cpp"]["available"] else [])


def _overlapping(shape=(6, 5)):
    """An as_strided view whose rows overlap (torch's own overlap test cannot tell), of positive values."""
    return torch.rand(20).add_(0.5).as_strided(shape, (2, 1))


def _step(kind, w, state=None, thermostat=None, backend=None):
    g, a = torch.randn(w.shape, dtype=w.dtype), torch.randn(w.shape, dtype=w.dtype)
    if kind == "sgld":
        return sgld_step_([w], [g], [a], backend=backend, **KW)
    if kind == "sgnht":
        th = torch.zeros((), dtype=torch.float64) if thermostat is None else thermostat
        p = torch.zeros(w.shape, dtype=w.dtype) if state is None else state
        return sgnht_step_([w], [g], [a], [p], th, backend=backend, **KW)
    v = torch.ones(w.shape, dtype=w.dtype) if state is None else state
    return rmsprop_sgld_step_([w], [g], [a], [v], backend=backend, **KW)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgld", "sgnht", "rmsprop"])
def test_overlapping_views_refused(kind, backend):
    with pytest.raises(ValueError, match=r"params\[0\] has elements that share memory"):
        _step(kind, _overlapping(), backend=backend)
    if kind != "sgld":
        name = "momenta" if kind == "sgnht" else "square_avgs"
        with pytest.raises(ValueError, match=rf"{name}\[0\] has elements that share memory"):
            _step(kind, torch.randn(6, 5), state=_overlapping(), backend=backend)
    # a strided view without overlap is stepped in place, the same on every backend
    outs = []
    for be in BACKENDS:
        base = torch.zeros(6, 10)
        w = base[:, ::2]
        torch.manual_seed(0)
        _step(kind, w, backend=be)
        assert bool((base[:, 1::2] == 0).all()) and bool((w != 0).any())
        outs.append(w.clone())
    assert all(torch.allclose(o, outs[0], rtol=1e-5, atol=1e-7) for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgnht", "rmsprop"])
def test_states_that_take_gradients_refused(kind, backend):
    name = "momenta" if kind == "sgnht" else "square_avgs"
    state = torch.ones(6, 5).requires_grad_()
    with pytest.raises(RuntimeError, match=rf"{name}\[0\] requires grad and grad mode is on"):
        _step(kind, torch.randn(6, 5), state=state, backend=backend)
    with torch.no_grad():
        _step(kind, torch.randn(6, 5), state=state, backend=backend)  # as torch's optimizers step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgld", "sgnht", "rmsprop"])
def test_inference_tensors_outside_inference_mode_refused(kind, backend):
    with torch.inference_mode():
        w = torch.randn(6, 5)
        state = torch.ones(6, 5)
        th = torch.zeros((), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"params\[0\] is an inference tensor"):
        _step(kind, w, backend=backend)
    if kind != "sgld":
        name = "momenta" if kind == "sgnht" else "square_avgs"
        with pytest.raises(RuntimeError, match=rf"{name}\[0\] is an inference tensor"):
            _step(kind, torch.randn(6, 5), state=state, backend=backend)
    if kind == "sgnht":
        with pytest.raises(RuntimeError, match="thermostat is an inference tensor"):
            _step(kind, torch.randn(6, 5), thermostat=th, backend=backend)
    with torch.inference_mode():  # inside inference mode the step runs
        before = w.clone()
        _step(kind, w, state=None if kind == "sgld" else state, backend=backend)
        assert not torch.equal(before, w)


@pytest.mark.parametrize("kind", ["sgld", "sgnht", "rmsprop"])
def test_meta_tensors_refused_clearly(kind):
    w = torch.empty(3, device="meta")
    g, a = torch.empty(3, device="meta"), torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="params are on the meta device"):
        if kind == "sgld":
            sgld_step_([w], [g], [a], **KW)
        elif kind == "sgnht":
            sgnht_step_([w], [g], [a], [torch.empty(3, device="meta")], torch.zeros((), device="meta"), **KW)
        else:
            rmsprop_sgld_step_([w], [g], [a], [torch.empty(3, device="meta")], **KW)


def test_thermostat_sharing_memory_refused():
    w = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"thermostat shares memory with params\[0\]"):
        _step("sgnht", w, thermostat=w.view(-1)[0])


def test_pairwise_gram_gradient_and_empty_outer():
    """A gradient through the pairwise contraction is the reference's (the kernels have no autograd formula: a
    forced kernel returns a value); the outer form of an empty batch is an empty Gram."""
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(12, 6, dtype=torch.float64)
    G = grad_gram_pairwise(x, y, batch=4)
    assert G.requires_grad
    (gx,) = torch.autograd.grad(G.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    from pypattern.ops.grad_gram import grad_gram_pairwise_reference

    (ref,) = torch.autograd.grad(grad_gram_pairwise_reference(x2, y, None, 4).sum(), x2)
    assert torch.allclose(gx, ref, rtol=1e-12, atol=1e-12)
    if pypattern.backends("grad_gram_pairwise")["cpp"]["available"]:
        forced = grad_gram_pairwise(x, y, batch=4, backend="cpp")
        assert not forced.requires_grad and torch.allclose(forced, G.detach(), rtol=1e-12, atol=1e-12)
    empty = grad_gram_linear(torch.randn(0, 3, 5), torch.randn(0, 3, 6), method="outer")
    assert empty.shape == (0, 0)


def test_philox_normals_checks_its_counter():
    from pypattern.ops import philox_normals

    assert philox_normals(5, seed=3, tensor_index=0, step=1).shape == (5,)
    for kw, name in (
        (dict(numel=-1, seed=0, tensor_index=0, step=0), "numel"),
        (dict(numel=3, seed=-1, tensor_index=0, step=0), "seed"),
        (dict(numel=3, seed=2**64 + 3, tensor_index=0, step=0), "seed"),
        (dict(numel=3, seed=0, tensor_index=2**32, step=0), "tensor_index"),
        (dict(numel=3, seed=0, tensor_index=0, step=2**64), "step"),
        (dict(numel=3.0, seed=0, tensor_index=0, step=0), "numel"),
    ):
        n = kw.pop("numel")
        with pytest.raises(ValueError, match=f"philox_normals: {name} must be"):
            philox_normals(n, **kw)


def test_covariance_update_refuses_aliased_state():
    """A state tensor the update writes may not share memory with another one or with what it reads."""
    from pypattern.ops import cross_covariance_update_

    def f(*shape):
        return torch.zeros(*shape, dtype=torch.float64)

    k, n = 3, 4
    s_a, s_b, m_b, C = f(k), f(n), f(n), f(k, n)
    a, b = torch.randn(5, k, dtype=torch.float64), torch.randn(5, n, dtype=torch.float64)
    with pytest.raises(ValueError, match="mean_a shares memory with shift_a"):
        cross_covariance_update_(s_a, s_b, s_a, m_b, C, f(0), f(0), a, b, count=0)
    with pytest.raises(ValueError, match="comoment shares memory with mean_b"):
        cross_covariance_update_(s_a, s_b, f(k), C[0], C, f(0), f(0), a, b, count=0)
    with pytest.raises(ValueError, match="mean_a shares memory with a"):
        cross_covariance_update_(s_a, s_b, a[0], m_b, C, f(0), f(0), a, b, count=0)
    states = [(f(k), f(n), f(k, n)) for _ in range(2)]  # separate tensors: accepted, the backends agree
    for (m_a, m_b2, C2), be in zip(states, ["reference", None]):
        cross_covariance_update_(s_a, s_b, m_a, m_b2, C2, f(0), f(0), a, b, count=0, backend=be)
    assert all(torch.allclose(x, y, rtol=1e-12, atol=1e-12) for x, y in zip(*states))
    assert bool(states[0][2].abs().sum() > 0)
