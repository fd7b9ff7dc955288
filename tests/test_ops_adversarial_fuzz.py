"""Adversarial inputs for every public op of :mod:`pypattern.ops`, on every backend that runs here (``reference`` and
``cpp`` on CPU tensors, ``triton`` in the interpreter where the op has a Triton kernel; see tests/_backend_cases.py):
each result checked against a float64 computation written out here (or, for the fused steps, whose noise is keyed
alike on every backend, against the ``reference`` backend), each refusal checked to name the offending argument.

The inputs: sizes that are no multiple of a vector width (1, 3, 7, 15, 17, 31, 33, 63, 65, 127, 129) and zero-size
axes; transposed, step-sliced, offset and expanded (zero-stride) views; 0-dim tensors; values far from 1, NaN and
inf; dtypes each op takes or refuses; in-place outputs that share memory with each other or with inputs in ways
the ops must refuse. Seeds are fixed, so every run draws the same cases.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from _backend_cases import backend_devices

import pypattern
from pypattern.ops import (
    CrossCovariance,
    cross_covariance_update_,
    grad_gram_embedding,
    grad_gram_linear,
    grad_gram_pairwise,
    prefix_attention,
    rmsprop_sgld_step_,
    row_dots,
    sgld_step_,
    sgnht_step_,
    signed_sums,
)
from pypattern.ops.activations import gelu_tanh

pytestmark = pytest.mark.usefixtures("one_thread")

ODD = (1, 3, 7, 15, 17, 31, 33, 63, 65, 127, 129)
LAYOUTS = ("contiguous", "transposed", "strided", "offset", "expanded")


def _cpu_cases(op: str) -> list:
    """The (backend, device) cases of ``op`` whose device is the CPU (the C++ kernel, the reference and the
    Triton interpreter; the CUDA cases are other files')."""
    return [p for p in backend_devices(op) if p.values[1] == "cpu"]


def _layout(values: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A tensor equal to ``values`` (cast to ``dtype``) in the given memory layout: contiguous, a transposed view,
    a view with a step of 2 along the last dimension, a view at a storage offset, or (``expanded``) a zero-stride
    view of its first row along dimension 0 (then it holds that row's values: the caller compares against the
    returned tensor's values). A layout the shape cannot have (a transpose of a 1-D tensor) is contiguous."""
    v = values.to(dtype).clone()
    shape = tuple(v.shape)
    if layout == "transposed" and len(shape) >= 2:
        return v.transpose(-1, -2).clone(memory_format=torch.contiguous_format).transpose(-1, -2)
    if layout == "strided" and len(shape) >= 1:
        buf = torch.full((*shape[:-1], 2 * shape[-1] + 1), 7.0, dtype=dtype)
        view = buf[..., 1::2]
        view.copy_(v)
        return view
    if layout == "offset":
        buf = torch.full((v.numel() + 3,), 7.0, dtype=dtype)
        view = buf[3:].view(shape)
        view.copy_(v)
        return view
    if layout == "expanded" and len(shape) >= 2 and shape[0] > 0:
        return v[:1].expand(shape)
    return v


# ------------------------------------------------------------------------------------------------- row_dots


def _row_dots_naive(a, gs):
    G = torch.cat([g.double() for g in gs], 1)
    return (a.double()[:, :, None, :] * G[:, None, :, :]).sum(-1)


@pytest.mark.parametrize("backend, device", _cpu_cases("row_dots"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_dots_odd_sizes_and_layouts_against_float64(backend, device, dtype):
    gen = torch.Generator().manual_seed(11)
    eps = torch.finfo(dtype).eps
    for K in (0, *ODD):
        for M, N in ((1, 1), (3, 7), (0, 2), (5, 0)):
            a0 = torch.randn(2, M, K, generator=gen, dtype=torch.float64)
            g0 = torch.randn(2, N, K, generator=gen, dtype=torch.float64)
            g1 = torch.randn(2, 1, K, generator=gen, dtype=torch.float64)
            for la, lg in zip(LAYOUTS, reversed(LAYOUTS)):
                a, g = _layout(a0, dtype, la), _layout(g0, dtype, lg)
                out = row_dots(a, [g, g1.to(dtype)], backend=backend)
                ref = _row_dots_naive(a, [g, g1.to(dtype)])
                assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
                scale = (
                    a.double().abs() @ torch.cat([g, g1.to(dtype)], 1).double().abs().transpose(1, 2)
                ).clamp_min(1e-300)
                err = ((out.double() - ref).abs() / scale).max().item() if ref.numel() else 0.0
                assert err <= 8 * eps * max(1.0, K**0.5), (K, M, N, la, lg, err)


@pytest.mark.parametrize("backend, device", _cpu_cases("row_dots"))
def test_row_dots_nan_inf_and_huge_values_as_float64(backend, device):
    a = torch.randn(2, 3, 33, generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 4, 33, generator=torch.Generator().manual_seed(3))
    a[0, 1, 5], a[1, 2, 7], g[0, 0, 0] = math.nan, math.inf, 3e38  # the huge row meets no inf
    out = row_dots(a, [g], backend=backend)
    ref = _row_dots_naive(a, [g]).float()  # a float64 sum that overflows float32 is inf there too
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-4)


def test_row_dots_dtypes():
    """16-bit floats run on the reference under the automatic choice (a forced kernel refuses them, naming ``a``);
    bool, which has no dot product, is refused naming ``a``."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float16, torch.bfloat16):
        a = torch.randn(2, 3, 17, generator=gen).to(dtype)
        g = torch.randn(2, 5, 17, generator=gen).to(dtype)
        out = row_dots(a, [g])
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), _row_dots_naive(a, [g]), rtol=2e-2, atol=5e-2)
        if pypattern.backends("row_dots")["cpp"]["available"]:
            with pytest.raises(ValueError, match=r"a has dtype torch\.(b?float16); the 'cpp' backend"):
                row_dots(a, [g], backend="cpp")
    ones = torch.ones(1, 2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"row_dots: a has dtype torch\.bool"):
        row_dots(ones, [ones])
    with pytest.raises(ValueError, match=r"row_dots: g\[0\] is torch\.float64 on cpu, a is torch\.float32"):
        row_dots(torch.ones(1, 2, 3), [torch.ones(1, 2, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"row_dots: a must be 3-D"):
        row_dots(torch.tensor(1.0), [torch.tensor(1.0)])


# ---------------------------------------------------------------------------------------------- signed_sums


def _chain(base, terms, offsets, signs):
    out = []
    for p in range(len(base)):
        acc = base[p].clone(memory_format=torch.contiguous_format)
        for i in range(offsets[p], offsets[p + 1]):
            acc = torch.add(acc, terms[i], alpha=signs[i])
        out.append(acc)
    return out


@pytest.mark.parametrize("backend, device", _cpu_cases("signed_sums_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_sums_odd_sizes_and_layouts_equal_the_chain(backend, device, dtype):
    """New outputs, given strided outputs and outputs that are their own bases all equal the chain of torch adds
    bit for bit, whatever the layouts of bases and terms (expanded ones included) and with terms repeated."""
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    for n in (0, *ODD):
        for shape in ((n,), (3, n), (n, 5), (2, 1, n), ()):
            P = 3
            base = [
                _layout(torch.randn(shape, generator=gen, dtype=torch.float64), dtype, rng.choice(LAYOUTS))
                for _ in range(P)
            ]
            offsets = [0]
            for _ in range(P):
                offsets.append(offsets[-1] + rng.randint(0, 3))
            terms = [
                _layout(torch.randn(shape, generator=gen, dtype=torch.float64), dtype, rng.choice(LAYOUTS))
                for _ in range(offsets[-1])
            ]
            if terms:
                terms[-1] = terms[0]
            signs = [rng.choice((1, -1)) for _ in terms]
            ref = _chain(base, terms, offsets, signs)
            got = signed_sums(base, terms, offsets, signs, backend=backend)
            assert all(torch.equal(x, y) for x, y in zip(got, ref)), (shape, n)
            outs = [_layout(torch.zeros(shape, dtype=torch.float64), dtype, "strided") for _ in range(P)]
            signed_sums(base, terms, offsets, signs, out=outs, backend=backend)
            assert all(torch.equal(x, y) for x, y in zip(outs, ref)), (shape, n)
            own = [b.clone(memory_format=torch.contiguous_format) for b in base]
            signed_sums(own, terms, offsets, signs, out=own, backend=backend)
            assert all(torch.equal(x, y) for x, y in zip(own, ref)), (shape, n)


@pytest.mark.parametrize("backend, device", _cpu_cases("signed_sums_"))
def test_signed_sums_nan_inf_overflow_as_torch_adds(backend, device):
    b = torch.tensor([1.0, math.nan, math.inf, -math.inf, 3e38, 1e-45])
    t = torch.tensor([math.inf, 1.0, math.inf, math.inf, 3e38, -1e-45])
    for sign in (1, -1):
        (got,) = signed_sums([b], [t], [0, 1], [sign], backend=backend)
        ref = torch.add(b, t, alpha=sign)
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got.nan_to_num(0.5), ref.nan_to_num(0.5))


@pytest.mark.parametrize("backend, device", _cpu_cases("signed_sums_"))
def test_signed_sums_refuses_an_output_whose_strides_fold_it_onto_itself(backend, device):
    """``as_strided((3, 3), (2, 1))`` puts elements (0, 2) and (1, 0) at one address: torch's overlap test calls
    it too hard to decide, and the sums were written with the last write winning (out[0, 2] held 103 for 102).
    Refused now by name; a strided output whose elements are apart is still written exactly."""
    b = torch.arange(9.0).reshape(3, 3)
    t = torch.full((3, 3), 100.0)
    folded = torch.zeros(7).as_strided((3, 3), (2, 1))
    assert torch._debug_has_internal_overlap(folded) == 2  # torch cannot tell
    with pytest.raises(
        ValueError, match=r"signed_sums: out\[0\] has elements that share memory \(its strides"
    ):
        signed_sums([b], [t], [0, 1], [1], out=[folded], backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] has elements that share memory \(an expanded view\)"):
        signed_sums([b], [t], [0, 1], [1], out=[torch.zeros(3).expand(3, 3)], backend=backend)
    for apart in (torch.zeros(9).as_strided((3, 3), (1, 3)), torch.zeros(3, 6)[:, ::2]):
        signed_sums([b], [t], [0, 1], [1], out=[apart], backend=backend)
        assert torch.equal(apart, b + t)


def test_signed_sums_dtypes():
    """16-bit floats, integers and complex numbers take the reference's adds (a forced kernel refuses them,
    naming ``base[0]``); bool, where + is a logical or and - no operation, is refused naming ``base[0]``; mixed
    dtypes are refused naming both tensors."""
    for dtype in (torch.float16, torch.bfloat16, torch.int32, torch.complex64):
        b = (torch.arange(6) - 2).to(dtype)
        t = torch.ones(6, dtype=dtype) * 3
        (got,) = signed_sums([b], [t, t], [0, 2], [1, -1])
        assert got.dtype == dtype and torch.equal(got, b)
        if pypattern.backends("signed_sums_")["cpp"]["available"]:
            with pytest.raises(ValueError, match=r"base\[0\] has dtype .*; the 'cpp' backend"):
                signed_sums([b], [t], [0, 1], [1], backend="cpp")
    ones = torch.ones(3, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"signed_sums: base\[0\] has dtype torch\.bool"):
        signed_sums([ones], [ones], [0, 1], [-1])
    with pytest.raises(ValueError, match=r"terms\[0\] is torch\.float64 on cpu, base\[0\] is torch\.float32"):
        signed_sums([torch.ones(3)], [torch.ones(3, dtype=torch.float64)], [0, 1], [1])


# ------------------------------------------------------------------------------------------ prefix_attention


def _attention_naive(q, kp, vp, kn, vn, mask, scale):
    q, kp, vp, kn, vn = (t.double() for t in (q, kp, vp, kn, vn))
    C, B, Rq, H, dh = q.shape
    G = H // kn.shape[3]
    out = torch.zeros(C, B, Rq, H, dh, dtype=torch.float64)
    for c in range(C):
        for b in range(B):
            for h in range(H):
                K = torch.cat([kp[b, :, h // G], kn[c, b, :, h // G]], 0)
                V = torch.cat([vp[b, :, h // G], vn[c, b, :, h // G]], 0)
                if K.shape[0]:
                    s = (scale * q[c, b, :, h] @ K.T).masked_fill(mask, -math.inf)
                    out[c, b, :, h] = torch.softmax(s, -1) @ V
    return out


@pytest.mark.parametrize("backend, device", _cpu_cases("prefix_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefix_attention_odd_sizes_and_layouts_against_float64(backend, device, dtype):
    gen = torch.Generator().manual_seed(6)
    tol = 3e-5 if dtype == torch.float32 else 1e-12
    shapes = ((1, 1, 1, 1, 1, 1, 1), (2, 3, 5, 4, 2, 7, 3), (1, 2, 3, 3, 1, 0, 2), (2, 1, 2, 2, 2, 3, 0))
    for dh in (1, 3, 7, 17, 33, 65):
        for C, B, Rq, H, Hkv, P, Rk in shapes:

            def r(*s):
                return torch.randn(*s, generator=gen, dtype=torch.float64)

            raw = (
                r(C, B, Rq, H, dh),
                r(B, P, Hkv, dh),
                r(B, P, Hkv, dh),
                r(C, B, Rk, Hkv, dh),
                r(C, B, Rk, Hkv, dh),
            )
            mask = torch.rand(Rq, P + Rk, generator=gen) < 0.3
            for layout in LAYOUTS:
                args = [_layout(t, dtype, layout) for t in raw]
                m = _layout(mask, torch.bool, layout)
                got = prefix_attention(*args, m, 0.37, backend=backend)
                assert got.dtype == dtype and got.is_contiguous()
                ref = _attention_naive(*args, m, 0.37)
                torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("backend, device", _cpu_cases("prefix_attention"))
@pytest.mark.parametrize("value", [math.nan, math.inf, 1e30, -1e30])
def test_prefix_attention_special_values_as_float64(backend, device, value):
    """NaN and inf in a query and a value, and a fully masked query row: NaN exactly where the float64 softmax
    has it (an inf score against others is NaN too), finite entries close."""
    gen = torch.Generator().manual_seed(7)
    q, kp, vp = (
        torch.randn(1, 1, 3, 2, 7, generator=gen),
        torch.randn(1, 4, 2, 7, generator=gen),
        torch.randn(1, 4, 2, 7, generator=gen),
    )
    kn, vn = torch.randn(1, 1, 2, 2, 7, generator=gen), torch.randn(1, 1, 2, 2, 7, generator=gen)
    q[0, 0, 1, 0, 3] = value
    vp[0, 2, 1, 1] = value
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[2] = True
    got = prefix_attention(q, kp, vp, kn, vn, mask, 0.5, backend=backend)
    ref = _attention_naive(q, kp, vp, kn, vn, mask, 0.5).float()
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.isinf(), ref.isinf())
    fin = ref.isfinite()
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------- gelu_tanh


def _gelu_naive(x):
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("backend, device", _cpu_cases("gelu_tanh"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_tanh_odd_sizes_and_layouts_against_float64(backend, device, dtype):
    """Forward and backward (through autograd, grad_output in another layout) against the float64 formula and its
    autograd derivative; results contiguous, of ``x``'s shape and dtype."""
    gen = torch.Generator().manual_seed(8)
    tol = 3e-6 if dtype == torch.float32 else 1e-13
    for n in (0, *ODD):
        for shape in ((n,), (3, n), (n, 2), (2, 1, n)):
            raw = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
            for layout in LAYOUTS:
                x = _layout(raw, dtype, layout)
                y = gelu_tanh(x, backend=backend)
                assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
                torch.testing.assert_close(y.double(), _gelu_naive(x), rtol=tol, atol=tol)
                xr = x.detach().requires_grad_()
                go = _layout(torch.randn(shape, generator=gen, dtype=torch.float64), dtype, "transposed")
                (gx,) = torch.autograd.grad(gelu_tanh(xr, backend=backend), xr, go)
                x64 = x.detach().double().requires_grad_()
                (g64,) = torch.autograd.grad(_gelu_naive(x64), x64, go.double())
                torch.testing.assert_close(gx.double(), g64, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("backend, device", _cpu_cases("gelu_tanh"))
def test_gelu_tanh_nan_and_inf_propagate(backend, device):
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 1e30, -1e30], dtype=dtype)
        y = gelu_tanh(x, backend=backend)
        ref = gelu_tanh(x, backend="reference")
        assert torch.isnan(y[0]) and y[1] == math.inf
        assert torch.equal(y.isnan(), ref.isnan())
        assert y[3] == 0 and y[4] == torch.tensor(1e30, dtype=dtype)  # 0.5 x (1 + 1) exactly


def test_gelu_tanh_dtypes():
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(33, generator=torch.Generator().manual_seed(9)).to(dtype)
        y = gelu_tanh(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), _gelu_naive(x), rtol=1e-2, atol=1e-2)
        if pypattern.backends("gelu_tanh")["cpp"]["available"]:
            with pytest.raises(ValueError, match=r"x has dtype torch\.(b?float16); the 'cpp' backend"):
                gelu_tanh(x, backend="cpp")
    for bad in (torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool), 3.0):
        with pytest.raises(TypeError, match=r"gelu_tanh: x must be a floating-point tensor"):
            gelu_tanh(bad)


# -------------------------------------------------------------------------------------------------- grad_gram


def _pairwise_naive(x, y, ids, batch):
    y = y.double()
    T = y.shape[0] // batch
    if ids is None:
        K = x.double() @ x.double().T
    else:
        K = ((ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)).double()
    return (K * (y @ y.T)).reshape(batch, T, batch, T).sum((1, 3))


@pytest.mark.parametrize("backend, device", _cpu_cases("grad_gram_pairwise"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_gram_pairwise_odd_sizes_and_layouts_against_float64(backend, device, dtype):
    gen = torch.Generator().manual_seed(10)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for B, T, p, q in (
        (1, 1, 1, 1),
        (3, 1, 7, 17),
        (2, 3, 33, 5),
        (5, 2, 1, 65),
        (4, 1, 129, 3),
        (2, 7, 3, 0),
        (2, 2, 0, 3),
    ):
        x0 = torch.randn(B * T, p, generator=gen, dtype=torch.float64)
        y0 = torch.randn(B * T, q, generator=gen, dtype=torch.float64)
        ids0 = torch.randint(-1, 4, (B * T,), generator=gen)
        for layout in LAYOUTS:
            if layout == "expanded" and (p == 0 or q == 0):
                continue
            x, y = _layout(x0.T, dtype, layout).T, _layout(y0, dtype, layout)
            ids = _layout(ids0[None], torch.int64, "strided")[0]
            got = grad_gram_pairwise(x, y, batch=B, backend=backend)
            torch.testing.assert_close(got, _pairwise_naive(x, y, None, B), rtol=tol, atol=tol)
            got = grad_gram_pairwise(None, y, ids, batch=B, backend=backend)
            torch.testing.assert_close(got, _pairwise_naive(None, y, ids, B), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend, device", _cpu_cases("grad_gram_pairwise"))
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_grad_gram_pairwise_nonfinite_as_float64(backend, device, value):
    gen = torch.Generator().manual_seed(12)
    x, y = torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen)
    x[1, 1] = value
    got = grad_gram_pairwise(x, y, batch=3, backend=backend)
    ref = _pairwise_naive(x, y, None, 3)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())


def test_grad_gram_dtypes_refused_by_name():
    for dtype in (torch.float16, torch.bfloat16, torch.int64):
        t = torch.ones(2, 2, dtype=dtype)
        with pytest.raises(TypeError, match=rf"y has dtype {dtype}"):
            grad_gram_pairwise(t, t, batch=2)
        with pytest.raises(TypeError, match=rf"a has dtype {dtype}"):
            grad_gram_linear(t, t)
        with pytest.raises(TypeError, match=rf"d has dtype {dtype}"):
            grad_gram_embedding(torch.ones(2, 2, dtype=torch.int64), torch.ones(2, 2, 3, dtype=dtype))
    with pytest.raises(TypeError, match=r"x has dtype torch\.float32 but y has torch\.float64"):
        grad_gram_pairwise(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.float64), batch=2)
    with pytest.raises(ValueError, match=r"y must be a 2-D tensor"):
        grad_gram_pairwise(torch.tensor(1.0), torch.tensor(1.0), batch=1)


# ------------------------------------------------------------------------------------ the fused sampler steps

_STEP_SIZES = (0, 1, 3, 7, 15, 17, 31, 33, 63, 65, 127, 129)


def _step_case(rng: random.Random, gen: torch.Generator) -> dict:
    """Random tensors (shapes of rank 0 to 3 with odd and zero sizes), layouts, masks, special gradients and
    hyperparameters of one fused step, as float64 values."""
    shapes = []
    for _ in range(rng.randint(1, 3)):
        rank = rng.choice((0, 1, 2, 3))
        shapes.append(tuple(rng.choice(_STEP_SIZES if rank == 1 else _STEP_SIZES[:8]) for _ in range(rank)))

    def r(s, scale=1.0):
        return torch.randn(s, generator=gen, dtype=torch.float64) * scale

    grads = [r(s, rng.choice((1.0, 1e3))) for s in shapes]
    if rng.random() < 0.3:
        for g in grads:
            if g.numel():
                g.view(-1)[rng.randrange(g.numel())] = rng.choice((math.nan, math.inf, -math.inf, 1e300))
    masks = None
    if rng.random() < 0.5:
        masks = [
            None
            if rng.random() < 0.3
            else (torch.rand(s, generator=gen) < 0.6)
            if rng.random() < 0.5
            else torch.rand(s, generator=gen, dtype=torch.float64).round(decimals=1)
            for s in shapes
        ]
    params = [r(s) for s in shapes]
    return dict(
        shapes=shapes,
        params=params,
        grads=grads,
        anchors=[p + 0.01 * r(p.shape) for p in params],
        states=[r(s).abs() * 0.1 for s in shapes],
        masks=masks,
        layouts=[rng.choice(LAYOUTS[:4]) for _ in shapes],
        kw=dict(
            step_size=rng.choice((1e-3, 0.1)),
            nbeta=rng.choice((0.0, 10.0)),
            localization=rng.choice((0.0, 1.0)),
            weight_decay=rng.choice((0.0, 0.1)),
            noise_scale=rng.choice((0.0, 1.0)),
            bounding_box=rng.choice((None, 0.05)),
            seed=rng.randrange(2**64),
            step=rng.randrange(2**64),
        ),
    )


def _run_step(op: str, case: dict, dtype, backend: str):
    """The step on tensors built from ``case`` in its layouts: (flags, params, states, thermostat) or the
    exception's type and message."""
    L = case["layouts"]
    params = [_layout(v, dtype, lay) for v, lay in zip(case["params"], L)]
    grads = [_layout(v, dtype, lay) for v, lay in zip(case["grads"], reversed(L))]
    anchors = [_layout(v, dtype, "offset") for v in case["anchors"]]
    states = [_layout(v, dtype, "strided") for v in case["states"]]
    masks = case["masks"] and [
        None if m is None else m if m.dtype == torch.bool else m.to(dtype) for m in case["masks"]
    ]
    thermostat = torch.tensor([0.01], dtype=torch.float64)
    kw = dict(case["kw"], masks=masks, backend=backend, check_finite=False)
    try:
        if op == "sgld_step_":
            flags = sgld_step_(params, grads, anchors, **kw)
        elif op == "sgnht_step_":
            flags = sgnht_step_(params, grads, anchors, states, thermostat, **kw)
        else:
            flags = rmsprop_sgld_step_(params, grads, anchors, states, **kw)
    except Exception as e:  # noqa: BLE001 - compared with the reference's
        return f"{type(e).__name__}: {e}"
    return flags, params, states, thermostat


@pytest.mark.parametrize("op", ["sgld_step_", "sgnht_step_", "rmsprop_sgld_step_"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_steps_agree_with_the_reference_on_adversarial_inputs(op, dtype):
    """Every backend of each fused step against the ``reference`` backend on the same random cases: the flags
    exactly, the params, states and thermostat within the noise's rounding (the backends' log, sqrt and cos),
    and the same error where one is raised."""
    others = [p.values[0] for p in _cpu_cases(op) if p.values[0] != "reference" and not p.marks]
    if not others:
        pytest.skip(f"no backend of {op} but the reference runs here")
    rng, gen = random.Random(13), torch.Generator().manual_seed(13)
    for _ in range(25):
        case = _step_case(rng, gen)
        ref = _run_step(op, case, dtype, "reference")
        for backend in others:
            got = _run_step(op, case, dtype, backend)
            if isinstance(ref, str) or isinstance(got, str):
                assert got == ref, (backend, case["shapes"])
                continue
            assert torch.equal(got[0], ref[0]), (backend, case["shapes"], got[0], ref[0])
            close = dict(rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-6, equal_nan=True)
            for a, b in zip(got[1], ref[1]):
                torch.testing.assert_close(a, b, **close)
            if op != "sgld_step_":
                for a, b in zip(got[2], ref[2]):
                    torch.testing.assert_close(a, b, **close)
            torch.testing.assert_close(got[3], ref[3], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend, device", _cpu_cases("sgld_step_"))
def test_fused_steps_refuse_dtypes_and_aliases_by_name(backend, device):
    kw = dict(step_size=1e-3, nbeta=1.0, localization=1.0, seed=1, step=2, backend=backend)
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.ones(5, dtype=dtype)
        with pytest.raises(TypeError, match=rf"params\[0\] has dtype {dtype}"):
            sgld_step_([t], [t.clone()], [t.clone()], **kw)
    w = torch.randn(5)
    with pytest.raises(
        TypeError, match=r"grads\[0\] has dtype torch\.float64 but params\[0\] has torch\.float32"
    ):
        sgld_step_([w], [w.double()], [w.clone()], **kw)
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[0\]"):
        sgld_step_([w], [w], [w.clone()], **kw)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        sgld_step_([w[:3], w[2:]], [torch.ones(3), torch.ones(3)], [torch.ones(3), torch.ones(3)], **kw)
    with pytest.raises(ValueError, match=r"params\[0\] has elements that share memory"):
        sgld_step_([torch.ones(1).expand(4)], [torch.ones(4)], [torch.ones(4)], **kw)
    with pytest.raises(RuntimeError, match=r"params\[0\] requires grad and grad mode is on"):
        sgld_step_([torch.ones(4, requires_grad=True)], [torch.ones(4)], [torch.ones(4)], **kw)
    with pytest.raises(ValueError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        sgld_step_([torch.ones(4)], [torch.empty(4, device="meta")], [torch.ones(4)], **kw)
    with pytest.raises(ValueError, match=r"square_avgs\[0\] has elements that share memory"):
        rmsprop_sgld_step_(
            [torch.ones(5)], [torch.ones(5)], [torch.ones(5)], [torch.zeros(1).expand(5)], **kw
        )


@pytest.mark.parametrize("backend, device", _cpu_cases("sgnht_step_"))
def test_a_mask_that_is_another_tensors_state_is_refused(backend, device):
    """A mask sharing memory with a momentum, a running mean ``V`` or the thermostat, which the step overwrites:
    the mask of a later tensor was read after the earlier tensor's state was written, and the step silently
    differed from the same step with the mask copied (and the mask itself changed for the next step). Refused
    now, naming both; with the mask copied, the step runs."""
    gen = torch.Generator().manual_seed(14)
    kw = dict(step_size=1e-2, nbeta=1.0, localization=1.0, seed=1, step=2, noise_scale=0.0, backend=backend)
    w0 = [torch.randn(4, generator=gen) for _ in range(2)]
    g0 = [torch.randn(4, generator=gen) for _ in range(2)]
    a0 = [torch.randn(4, generator=gen) for _ in range(2)]
    state0 = torch.tensor([0.0, 1.0, 0.0, 2.0])

    def sgnht(mask_of_state: bool):
        w, p = [t.clone() for t in w0], [state0.clone(), torch.ones(4)]
        masks = [None, p[0] if mask_of_state else p[0].clone()]
        thermostat = torch.zeros(1, dtype=torch.float64)
        sgnht_step_(w, [t.clone() for t in g0], [t.clone() for t in a0], p, thermostat, masks=masks, **kw)
        return w

    def rmsprop(mask_of_state: bool):
        w, v = [t.clone() for t in w0], [state0.clone(), torch.ones(4)]
        masks = [None, v[0] if mask_of_state else v[0].clone()]
        rmsprop_sgld_step_(w, [t.clone() for t in g0], [t.clone() for t in a0], v, masks=masks, **kw)
        return w

    with pytest.raises(ValueError, match=r"momenta\[0\] shares memory with masks\[1\]"):
        sgnht(True)
    with pytest.raises(ValueError, match=r"square_avgs\[0\] shares memory with masks\[1\]"):
        rmsprop(True)
    # the copied masks run; the mask's zeros freeze their entries
    for w in (sgnht(False)[1], rmsprop(False)[1]):
        assert w[0] == w0[1][0] and w[2] == w0[1][2] and w[1] != w0[1][1]
    same = torch.tensor([0.5, 0.0, 1.0, 0.3])
    with pytest.raises(ValueError, match=r"momenta\[0\] shares memory with masks\[0\]"):
        sgnht_step_(
            [w0[0].clone()], [g0[0]], [a0[0]], [same], torch.zeros(1, dtype=torch.float64), masks=[same], **kw
        )
    buf = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    w64 = [t.double() for t in w0[:1]]
    with pytest.raises(ValueError, match=r"thermostat shares memory with masks\[0\]"):
        sgnht_step_(
            w64, [g0[0].double()], [a0[0].double()], [w64[0].clone()], buf[1:2], masks=[buf[:4]], **kw
        )


# ------------------------------------------------------------------------------------------------- covariance


def _cov_naive(A, B):
    A, B = A.double(), B.double()
    ac, bc = A - A.mean(0), B - B.mean(0)
    m = A.shape[0] - 1
    return ac.T @ bc / m, (ac * ac).sum(0) / m, ac.T @ ac / m, bc.T @ bc / m


@pytest.mark.parametrize("backend, device", _cpu_cases("covariance_update_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_covariance_chunks_of_any_layout_against_float64(backend, device, dtype):
    """Random chunkings (empty chunks included), chunk layouts (transposed, strided, every other row, expanded),
    auto modes and a large common offset of the columns, against the float64 covariance of all draws."""
    rng, gen = random.Random(15), torch.Generator().manual_seed(15)
    sizes = (0, 1, 3, 7, 17, 33, 65) if backend != "triton" else (0, 1, 3, 7, 17)
    for _ in range(20):
        k, n = rng.choice(sizes), rng.choice(sizes)
        chunks = [rng.choice((0, 1, 2, 5, 17)) for _ in range(rng.randint(1, 4))] + [3]
        offset = rng.choice((0.0, 1e4))
        A = (torch.randn(sum(chunks), k, generator=gen, dtype=torch.float64) + offset).to(dtype)
        B = (torch.randn(sum(chunks), n, generator=gen, dtype=torch.float64) * 3).to(dtype)
        mode = rng.choice(("none", "var", "full"))
        acc = CrossCovariance(k, n, track_auto=mode, backend=backend, buffer_draws=rng.choice((0, 4)))
        i = 0
        for c in chunks:
            acc.update(
                _layout(A[i : i + c], dtype, rng.choice(LAYOUTS[:4])),
                _layout(B[i : i + c], dtype, rng.choice(LAYOUTS[:4])),
            )
            i += c
        cov, var, caa, cbb = _cov_naive(A, B)
        tol = (1e-4 if offset == 0 else 1.0) if dtype == torch.float32 else 1e-9
        torch.testing.assert_close(acc.cov(), cov, rtol=tol, atol=tol)
        if mode != "none":
            torch.testing.assert_close(acc.var_a(), var, rtol=tol, atol=tol)
        if mode == "full":
            torch.testing.assert_close(acc.cov_aa(), caa, rtol=tol, atol=tol)
            torch.testing.assert_close(acc.cov_bb(), cbb, rtol=tol, atol=tol)
    # an expanded chunk has no spread; a chunk whose columns are one tensor is its own covariance
    acc = CrossCovariance(4, 3, track_auto="var", backend=backend)
    acc.update(torch.randn(1, 4, generator=gen).expand(5, 4), torch.randn(5, 1, generator=gen).expand(5, 3))
    assert acc.cov().abs().max() == 0 and acc.var_a().abs().max() == 0
    x = torch.randn(7, 3, generator=gen, dtype=dtype)
    acc = CrossCovariance(3, 3, backend=backend)
    acc.update(x, x)
    torch.testing.assert_close(acc.cov(), _cov_naive(x, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend, device", _cpu_cases("covariance_update_"))
def test_cross_covariance_nan_inf_as_float64(backend, device):
    a = torch.randn(6, 3, generator=torch.Generator().manual_seed(16))
    b = torch.randn(6, 2, generator=torch.Generator().manual_seed(17))
    a[2, 1], b[4, 0] = math.nan, math.inf
    acc = CrossCovariance(3, 2, track_auto="full", backend=backend)
    acc.update(a[:4], b[:4])
    acc.update(a[4:], b[4:])
    cov, _, caa, cbb = _cov_naive(a, b)
    assert torch.equal(acc.cov().isnan(), cov.isnan())
    assert torch.equal(acc.cov_aa().isnan(), caa.isnan()) and torch.equal(acc.cov_bb().isnan(), cbb.isnan())
    fin = cov.isfinite()
    torch.testing.assert_close(acc.cov()[fin], cov[fin], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend, device", _cpu_cases("covariance_update_"))
def test_covariance_update_refuses_state_that_takes_gradients_or_is_an_inference_tensor(backend, device):
    """The update writes its state in place: a state tensor that requires grad under grad mode, or an inference
    tensor outside inference mode, is refused naming it on every backend (the Triton kernel wrote such a state
    silently; the others failed with torch's message, which names no argument)."""
    K, N = 3, 2

    def state():
        f64 = dict(dtype=torch.float64)
        return [torch.zeros(K, **f64), torch.zeros(N, **f64), torch.zeros(K, **f64), torch.zeros(N, **f64),
                torch.zeros(K, N, **f64), torch.zeros(0, **f64), torch.zeros(0, **f64)]  # fmt: skip

    a, b = torch.randn(4, K), torch.randn(4, N)
    s = state()
    s[4].requires_grad_()
    with pytest.raises(RuntimeError, match=r"comoment requires grad and grad mode is on"):
        cross_covariance_update_(*s, a, b, count=0, backend=backend)
    s = state()
    s[0].requires_grad_()  # the shift is written when count == 0
    with pytest.raises(RuntimeError, match=r"shift_a requires grad and grad mode is on"):
        cross_covariance_update_(*s, a, b, count=0, backend=backend)
    with torch.inference_mode():
        s = state()
    with pytest.raises(RuntimeError, match=r"comoment is an inference tensor"):
        cross_covariance_update_(*s, a, b, count=0, backend=backend)
    # under no_grad, and inside inference mode, the update runs and equals the float64 covariance
    s = state()
    s[4].requires_grad_()
    with torch.no_grad():
        cross_covariance_update_(*s, a, b, count=0, backend=backend)
    torch.testing.assert_close(s[4] / 3, _cov_naive(a, b)[0])
    with torch.inference_mode():
        s = state()
        cross_covariance_update_(*s, a, b, count=0, backend=backend)
    torch.testing.assert_close(s[4] / 3, _cov_naive(a, b)[0])


def test_covariance_chunk_dtypes_refused_by_name():
    for dtype in (torch.float16, torch.bfloat16, torch.int64):
        with pytest.raises(TypeError, match=rf"a has dtype {dtype}"):
            CrossCovariance(3, 2).update(torch.ones(4, 3, dtype=dtype), torch.ones(4, 2, dtype=dtype))
    with pytest.raises(ValueError, match=r"a must have shape \(draws, 3\), got \(\)"):
        CrossCovariance(3, 2).update(torch.tensor(1.0), torch.tensor(1.0))


def test_grad_gram_devices_refused_by_name():
    """Layer inputs and output gradients on two devices are refused naming the caller's arguments (``a`` and
    ``d``, not the contraction's ``x`` and ``y``; ``ids`` and ``d``, where torch failed inside with ``Tensor.item()
    cannot be called on meta tensors``); meta ids, whose values the Gram needs, are refused too, while a Linear's
    Gram of meta tensors still traces."""
    meta = dict(device="meta")
    with pytest.raises(ValueError, match=r"a is on meta but d is on cpu"):
        grad_gram_linear(torch.randn(2, 3, **meta), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"ids is on meta but d is on cpu"):
        grad_gram_embedding(torch.zeros(2, 3, dtype=torch.long, **meta), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"ids is on cpu but d is on meta"):
        grad_gram_embedding(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 4, **meta))
    with pytest.raises(ValueError, match=r"ids and d are on the meta device"):
        grad_gram_embedding(torch.zeros(2, 3, dtype=torch.long, **meta), torch.randn(2, 3, 4, **meta))
    with pytest.raises(TypeError, match=r"d must be a tensor"):
        grad_gram_embedding(torch.zeros(2, 3, dtype=torch.long), [[1.0]])
    assert grad_gram_linear(torch.randn(2, 3, **meta), torch.randn(2, 4, **meta)).shape == (2, 2)
    ids = torch.tensor([[0, 1, 1], [2, 1, 0]])
    d = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    per_sample = torch.zeros(2, 3, 4, dtype=torch.float64).index_put_(
        (torch.arange(2)[:, None].expand(2, 3), ids), d, accumulate=True
    )
    flat = per_sample.reshape(2, -1)
    torch.testing.assert_close(grad_gram_embedding(ids, d), flat @ flat.T)
