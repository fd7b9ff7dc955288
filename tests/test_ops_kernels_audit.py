"""Kernel backends of :mod:`pypattern.ops` against their references on inputs the other op tests leave out:
draws holding inf or NaN in the streaming covariance (the NaN pattern of the reference), a draw count that would
overflow the kernels' int64, negative views (``z.conj().imag``, whose negation torch applies lazily: the kernels
read memory, not values) as read and as written arguments, and expanded (zero-stride) inputs of the fused steps.
Every backend that runs on CPU tensors here (``cpp``, ``reference``, ``triton`` under the interpreter) is checked;
shapes are tiny for the interpreter."""

from __future__ import annotations

import math

import pytest
import torch
from _backend_cases import backend_devices

from pypattern.ops import (
    cross_covariance_update_,
    rmsprop_sgld_step_,
    sgld_step_,
    sgnht_step_,
    signed_sums,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cpu_cases(op: str) -> list:
    return [p for p in backend_devices(op) if p.values[1] == "cpu"]


def _neg_view(values: torch.Tensor) -> torch.Tensor:
    """A strided float tensor equal to ``values`` whose negation is lazy (``is_neg()``): the imaginary part of a
    conjugated complex tensor, as user code makes one."""
    z = torch.complex(torch.zeros_like(values), -values)
    view = z.conj().imag
    assert view.is_neg() and torch.equal(view, values)
    return view


def _contiguous_neg_view(values: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor equal to ``values`` with the lazy negation (its memory holds ``-values``)."""
    view = torch._neg_view(-values)
    assert view.is_neg() and view.is_contiguous() and torch.equal(view, values)
    return view


# ------------------------------------------------------------------------------------------------- covariance


def _cov_state(k: int, n: int) -> list:
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    return [z(k), z(n), z(k), z(n), z(k, n), z(k, k), z(n)]


_STATE = ("shift_a", "shift_b", "mean_a", "mean_b", "comoment", "m2_a", "m2_b")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend, device", _cpu_cases("covariance_update_"))
def test_covariance_draws_holding_inf_or_nan_give_the_references_nan_pattern(backend, device):
    """A column holding inf or NaN has no covariance: the reference's centred products make its row (column) of
    the co-moments NaN, whatever the signs of the other draws; every backend gives the same NaNs and infs, and the
    same values elsewhere."""
    for seed in range(24):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(7, 3, generator=gen, dtype=torch.float64)
        b = torch.randn(7, 2, generator=gen, dtype=torch.float64)
        a[seed % 7, 1] = (math.inf, -math.inf, math.nan)[seed % 3]
        b[(3 * seed) % 7, 0] = math.inf if seed % 2 else -math.inf
        split = 1 + seed % 6
        got, ref = _cov_state(3, 2), _cov_state(3, 2)
        for state, be in ((got, backend), (ref, "reference")):
            cross_covariance_update_(*state, a[:split], b[:split], count=0, backend=be)
            cross_covariance_update_(*state, a[split:], b[split:], count=split, backend=be)
        for name, x, y in zip(_STATE, got, ref):
            assert torch.equal(x.isnan(), y.isnan()), (seed, name, x, y)
            assert torch.equal(x.isinf(), y.isinf()), (seed, name, x, y)
            fin = y.isfinite()
            torch.testing.assert_close(x[fin], y[fin], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend, device", _cpu_cases("covariance_update_"))
def test_covariance_refuses_a_count_that_overflows_int64(backend, device):
    """The kernels keep ``count + draws`` in an int64: past 2**63 - 1 it would wrap to a negative count (the
    means then move the wrong way); refused by name."""
    state = _cov_state(2, 2)
    before = [t.clone() for t in state]
    with pytest.raises(ValueError, match=r"count \+ the chunk's 3 draws"):
        cross_covariance_update_(
            *state, torch.randn(3, 2), torch.randn(3, 2), count=2**63 - 2, backend=backend
        )
    assert all(torch.equal(x, y) for x, y in zip(state, before))
    cross_covariance_update_(*state, torch.randn(3, 2), torch.randn(3, 2), count=2**63 - 4, backend=backend)


@pytest.mark.parametrize("backend, device", _cpu_cases("covariance_update_"))
def test_covariance_reads_negative_view_chunks_as_their_values(backend, device):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 3, generator=gen) + 2.0
    b = torch.randn(5, 2, generator=gen) - 1.0
    got, ref = _cov_state(3, 2), _cov_state(3, 2)
    cross_covariance_update_(*got, _neg_view(a[:2]), _neg_view(b[:2]), count=0, backend=backend)
    cross_covariance_update_(*got, _contiguous_neg_view(a[2:]), _neg_view(b[2:]), count=2, backend=backend)
    cross_covariance_update_(*ref, a[:2], b[:2], count=0, backend="reference")
    cross_covariance_update_(*ref, a[2:], b[2:], count=2, backend="reference")
    for name, x, y in zip(_STATE, got, ref):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend, device", _cpu_cases("covariance_update_"))
def test_covariance_refuses_a_negative_view_state_by_name(backend, device):
    state = _cov_state(3, 2)
    state[4] = _contiguous_neg_view(state[4])
    with pytest.raises(ValueError, match=r"comoment is a negative view"):
        cross_covariance_update_(*state, torch.randn(4, 3), torch.randn(4, 2), count=0, backend=backend)


# ------------------------------------------------------------------------------------------------- fused steps


def _step(op: str, backend: str, p, g, a, s, m, th=None):
    kw = dict(step_size=0.05, nbeta=3.0, localization=1.0, seed=11, step=5, backend=backend, masks=m)
    if op == "sgld_step_":
        return sgld_step_(p, g, a, **kw)
    if op == "sgnht_step_":
        th = torch.full((1,), 0.02, dtype=torch.float64) if th is None else th
        return sgnht_step_(p, g, a, s, th, **kw)
    return rmsprop_sgld_step_(p, g, a, s, **kw)


def _step_values(dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    shape = (3, 5)
    return dict(
        p=torch.randn(shape, generator=gen, dtype=dtype),
        g=torch.randn(shape, generator=gen, dtype=dtype),
        a=torch.randn(shape, generator=gen, dtype=dtype),
        s=torch.rand(shape, generator=gen, dtype=dtype),
        m=torch.rand(shape, generator=gen, dtype=dtype) + 0.5,
    )


_STEPS = ("sgld_step_", "sgnht_step_", "rmsprop_sgld_step_")


def _step_cases():
    return [
        pytest.param(op, *p.values, id=f"{op}-{p.id}", marks=p.marks)
        for op in _STEPS
        for p in _cpu_cases(op)
        if p.values[0] != "reference"
    ]


@pytest.mark.parametrize("op, backend, device", _step_cases())
@pytest.mark.parametrize("make", [_neg_view, _contiguous_neg_view], ids=["strided", "contiguous"])
def test_fused_steps_read_negative_view_grads_anchors_and_masks_as_their_values(op, backend, device, make):
    """The kernels read memory: a negative view given as a gradient, an anchor or a mask is stepped with its
    values, as the reference does."""
    v = _step_values()
    ref_p, ref_s = v["p"].clone(), v["s"].clone()
    ref_flags = _step(op, "reference", [ref_p], [v["g"]], [v["a"]], [ref_s], [v["m"]])
    p, s = v["p"].clone(), v["s"].clone()
    flags = _step(op, backend, [p], [make(v["g"])], [make(v["a"])], [s], [make(v["m"])])
    assert torch.equal(flags, ref_flags)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", _STEPS)
@pytest.mark.parametrize("backend, device", _cpu_cases("sgld_step_"))
def test_fused_steps_refuse_negative_view_params_and_states_by_name(op, backend, device):
    """A tensor the step writes cannot be a negative view: the kernels would write its memory with the values
    (flipping their signs), or torch's fallback fails with a message naming no argument."""
    v = _step_values()
    p = _contiguous_neg_view(v["p"].clone())
    with pytest.raises(ValueError, match=r"params\[0\] is a negative view"):
        _step(op, backend, [p], [v["g"]], [v["a"]], [v["s"].clone()], None)
    assert torch.equal(p, v["p"])
    if op != "sgld_step_":
        name = "momenta" if op == "sgnht_step_" else "square_avgs"
        s = _contiguous_neg_view(v["s"].clone())
        with pytest.raises(ValueError, match=rf"{name}\[0\] is a negative view"):
            _step(op, backend, [v["p"].clone()], [v["g"]], [v["a"]], [s], None)
    if op == "sgnht_step_":
        th = _contiguous_neg_view(torch.full((1,), 0.02, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"thermostat is a negative view"):
            _step(op, backend, [v["p"].clone()], [v["g"]], [v["a"]], [v["s"].clone()], None, th=th)


@pytest.mark.parametrize("op, backend, device", _step_cases())
def test_fused_steps_take_expanded_grads_anchors_and_masks(op, backend, device):
    """Zero-stride (broadcast) inputs that the step only reads: each entry reads the one value it repeats."""
    v = _step_values(torch.float64)
    g = v["g"][:1].expand(3, 5)
    a = v["a"][:, :1].expand(3, 5)
    m = torch.tensor(0.75, dtype=torch.float64).expand(3, 5)
    ref_p, ref_s = v["p"].clone(), v["s"].clone()
    ref = _step(op, "reference", [ref_p], [g.clone()], [a.clone()], [ref_s], [m.clone()])
    p, s = v["p"].clone(), v["s"].clone()
    flags = _step(op, backend, [p], [g], [a], [s], [m])
    assert torch.equal(flags, ref)
    torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------- signed sums


@pytest.mark.parametrize("backend, device", _cpu_cases("signed_sums_"))
def test_signed_sums_reads_negative_views_and_refuses_them_as_outputs(backend, device):
    gen = torch.Generator().manual_seed(5)
    base, t0, t1 = (torch.randn(9, generator=gen) for _ in range(3))
    want = base + t0 - t1
    got = signed_sums(
        [_neg_view(base)], [_contiguous_neg_view(t0), _neg_view(t1)], [0, 2], [1, -1], backend=backend
    )
    assert torch.equal(got[0], want)
    out = _contiguous_neg_view(torch.zeros(9))
    with pytest.raises(ValueError, match=r"out\[0\] is a negative view"):
        signed_sums([base], [t0, t1], [0, 2], [1, -1], out=[out], backend=backend)
    assert torch.equal(out, torch.zeros(9))


@pytest.mark.parametrize("backend, device", _cpu_cases("signed_sums_"))
def test_signed_sums_refuses_an_inference_output_outside_inference_mode(backend, device):
    """torch forbids writing an inference tensor outside inference mode; the C++ kernel writes through its
    memory, so the op refuses it by name on every backend (and writes it inside inference mode)."""
    base, term = torch.ones(5), torch.arange(5.0)
    with torch.inference_mode():
        out = torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"out\[0\] is an inference tensor"):
        signed_sums([base], [term], [0, 1], [-1], out=[out], backend=backend)
    assert torch.equal(out, torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"out\[0\] is an inference tensor"):
        signed_sums([out], [term], [0, 1], [1], out=[out], backend=backend)
    with torch.inference_mode():
        signed_sums([base], [term], [0, 1], [-1], out=[out], backend=backend)
    assert torch.equal(out, base - term)


def test_signed_sums_into_given_outputs_traces_under_compile():
    """The checks of the outputs (inference tensors, negative views) stay out of ``torch.compile``'s trace."""
    gen = torch.Generator().manual_seed(6)
    b, t, u = (torch.randn(4, 17, generator=gen) for _ in range(3))
    out = torch.empty(4, 17)
    torch._dynamo.reset()
    f = torch.compile(
        lambda b, t, u, o: signed_sums([b], [t, u], [0, 2], [1, -1], out=[o])[0] * 2,
        backend="eager",
        fullgraph=True,
    )
    torch.testing.assert_close(f(b, t, u, out), 2 * (b + t - u), rtol=0, atol=0)
    torch.testing.assert_close(out, b + t - u, rtol=0, atol=0)
