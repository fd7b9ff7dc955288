"""Adversarial inputs for the ops of :mod:`pypattern.ops` that the other op tests leave out, on every backend that
runs here (``reference`` and ``cpp`` on CPU tensors, ``cuda`` and compiled ``triton`` on CUDA tensors where a GPU
exists, ``triton`` in the interpreter on CPU tensors where none does; see tests/_backend_cases.py):

* the tanh GELU's derivatives at large finite inputs (where ``x * x`` overflows, the written-out derivative is
  ``0 * inf``) against the closed form, and on transposed inputs and gradients against float64 autograd;
* a zero-size axis in every position of each op's inputs, against float64 computations written out here;
* values at the ends of the dtype (denormals, 1e38 or 1e307, +-inf) in the fused steps' weights, anchors and
  gradients, against the ``reference`` backend (whose noise is keyed alike);
* inputs on another device (the meta device) and 16-bit inputs, refused naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from _backend_cases import backend_devices

from pypattern.ops import (
    cross_covariance_update_,
    grad_gram_pairwise,
    prefix_attention,
    rmsprop_sgld_step_,
    row_dots,
    sgld_step_,
    sgnht_step_,
    signed_sums,
)
from pypattern.ops.activations import gelu_tanh
from pypattern.ops.activations.reference import (
    SQRT_2_OVER_PI,
    gelu_tanh_backward_reference,
    gelu_tanh_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")

HF_C = 0.7978845608  # Hugging Face's gelu_fast constant


# ------------------------------------------------------------------------------------------------- gelu_tanh


@pytest.mark.parametrize("backend, device", backend_devices("gelu_tanh"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [SQRT_2_OVER_PI, HF_C], ids=["torch_c", "hf_c"])
def test_gelu_tanh_derivative_at_large_finite_inputs_is_one_or_zero(backend, device, dtype, c):
    """For ``|x| >= 20`` the derivative is 1 (x > 0) or 0 (x < 0) to within 1e-250 (the tanh is +-1 in every
    dtype, save float64's tail at x = -20 that the C++ kernel keeps).
    The written-out formula (and torch's ``gelu_backward``) multiplies ``1 - t^2 = 0`` by ``x^2``, which is inf
    once ``|x| > 1.8e19`` in float32 (``1.3e154`` in float64): NaN there, on the reference backend and for a
    gradient taken with ``create_graph``, where the C++ kernel gave 1 or 0."""
    big = 1e38 if dtype == torch.float32 else 1e300
    vals = [20.0, -20.0, 25.5, -33.0, 1e10, -1e10, 1e20, -1e20, 1e30, -1e30, big, -big]
    expected = torch.tensor([1.0 if v > 0 else 0.0 for v in vals], dtype=torch.float64)
    go = torch.linspace(0.5, 2.0, len(vals), dtype=dtype).double()
    for create_graph in (False, True):
        x = torch.tensor(vals, dtype=dtype, device=device, requires_grad=True)
        (gx,) = torch.autograd.grad(
            gelu_tanh(x, c, backend=backend), x, go.to(dtype).to(device), create_graph=create_graph
        )
        torch.testing.assert_close(gx.double().cpu(), go * expected, rtol=0, atol=1e-250)
        if create_graph:  # the second derivative of a flat function: 0, not 0 * inf
            (hx,) = torch.autograd.grad(gx.sum(), x)
            torch.testing.assert_close(
                hx.double().cpu(), torch.zeros(len(vals), dtype=torch.float64), rtol=0, atol=0
            )
    # the formula itself, for any c: 1 or 0 where the tanh is flat, NaN kept where x is NaN
    x = torch.tensor([*vals, math.nan], dtype=dtype)
    g = gelu_tanh_backward_reference(torch.ones_like(x), x, c)
    assert torch.equal(g[:-1].double(), expected) and math.isnan(g[-1])


@pytest.mark.parametrize("backend, device", backend_devices("gelu_tanh"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 31, 33, 63, 65, 127, 129])
def test_gelu_tanh_derivatives_on_transposed_inputs_and_gradients_against_float64_autograd(
    backend, device, dtype, n
):
    """The first and second derivatives, with ``x`` a transposed view and the incoming gradient another layout
    (a step-sliced transposed view), against float64 autograd through the written-out formula."""
    gen = torch.Generator().manual_seed(n)
    x0 = torch.randn(3, n, generator=gen, dtype=torch.float64) * 4
    go0 = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    x = x0.to(dtype).t().to(device).requires_grad_()  # (n, 3), strides (1, n)
    go = torch.zeros(3, 2 * n, dtype=dtype)
    go[:, ::2] = go0.t().to(dtype)
    go = go.to(device)[:, ::2].t()  # (n, 3), strides (2, 2n)
    (gx,) = torch.autograd.grad(gelu_tanh(x, backend=backend), x, go, create_graph=True)
    (hx,) = torch.autograd.grad(gx.sum(), x)
    xd = x0.to(dtype).double().t().requires_grad_()
    (gd,) = torch.autograd.grad(gelu_tanh_reference(xd), xd, go0.to(dtype).double(), create_graph=True)
    (hd,) = torch.autograd.grad(gd.sum(), xd)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx.double().cpu(), gd, **tol)
    torch.testing.assert_close(hx.double().cpu(), hd, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_tanh_16_bit_takes_the_reference_and_its_gradient_agrees(dtype):
    """16-bit inputs: the automatic choice is torch's (gradients as float64 autograd within the dtype's
    rounding, 1 or 0 at large inputs); a forced kernel is refused naming ``x`` and the dtypes it takes."""
    x0 = torch.cat(
        [torch.randn(65, generator=torch.Generator().manual_seed(3)) * 3, torch.tensor([300.0, -300.0])]
    )
    x = x0.to(dtype).requires_grad_()
    (g,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    assert g.dtype == dtype
    xd = x0.to(dtype).double().requires_grad_()
    (gd,) = torch.autograd.grad(gelu_tanh_reference(xd).sum(), xd)
    torch.testing.assert_close(g.double(), gd, rtol=2e-2, atol=2e-2)
    assert g[-2] == 1 and g[-1] == 0
    with pytest.raises(
        ValueError, match=rf"x has dtype {dtype}; the 'cpp' backend .* takes float32 or float64"
    ):
        gelu_tanh(x.detach(), backend="cpp")


@pytest.mark.parametrize("backend, device", backend_devices("gelu_tanh"))
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 5), (0, 0)])
def test_gelu_tanh_on_empty_inputs(backend, device, shape):
    x = torch.empty(shape, device=device, requires_grad=True)
    y = gelu_tanh(x, backend=backend)
    assert y.shape == x.shape
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape


# ------------------------------------------------------------------------------------------------- row_dots


@pytest.mark.parametrize("backend, device", backend_devices("row_dots"))
@pytest.mark.parametrize("dims", [(0, 3, 2, 5), (2, 0, 2, 5), (2, 3, 0, 5), (2, 3, 2, 0), (0, 0, 0, 0)])
def test_row_dots_with_a_zero_size_axis_in_each_position(backend, device, dims):
    B, M, N, K = dims
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(B, M, K, generator=gen)
    g = [torch.randn(B, N, K, generator=gen), torch.randn(B, 1, K, generator=gen)]
    out = row_dots(a.to(device), [t.to(device) for t in g], backend=backend)
    expected = (a.double()[:, :, None, :] * torch.cat(g, 1).double()[:, None, :, :]).sum(-1)
    assert out.shape == (B, M, N + 1)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_row_dots_refuses_other_devices_and_forced_16_bit_by_name():
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"g\[1\] is torch\.float32 on meta, a is torch\.float32 on cpu"):
        row_dots(a, [torch.randn(2, 1, 4), torch.empty(2, 3, 4, device="meta")])
    h = a.half()
    with pytest.raises(ValueError, match=r"a has dtype torch\.float16; the 'cpp' backend"):
        row_dots(h, [h], backend="cpp")


# ---------------------------------------------------------------------------------------------- signed_sums


@pytest.mark.parametrize("backend, device", backend_devices("signed_sums_"))
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 5), ()])
def test_signed_sums_with_a_zero_size_axis_in_each_position(backend, device, shape):
    gen = torch.Generator().manual_seed(6)
    base = [torch.randn(shape, generator=gen).to(device) for _ in range(2)]
    terms = [torch.randn(shape, generator=gen).to(device) for _ in range(3)]
    out = signed_sums(base, terms, [0, 2, 3], [1, -1, 1], backend=backend)
    assert torch.equal(out[0], base[0] + terms[0] - terms[1])
    assert torch.equal(out[1], base[1] + terms[2])


def test_signed_sums_refuses_another_device_by_name():
    with pytest.raises(
        ValueError, match=r"terms\[1\] is torch\.float32 on meta, base\[0\] is torch\.float32 on cpu"
    ):
        signed_sums([torch.ones(3)], [torch.ones(3), torch.empty(3, device="meta")], [0, 2], [1, -1])
    with pytest.raises(ValueError, match=r"out\[0\] is torch\.float32 on meta"):
        signed_sums([torch.ones(3)], [torch.ones(3)], [0, 1], [1], out=[torch.empty(3, device="meta")])


# ------------------------------------------------------------------------------------------ prefix_attention


def _attention_args(C, B, Rq, H, dh, P, Rk, Hkv, dtype=torch.float32, seed=7):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    mask = torch.rand(Rq, P + Rk, generator=gen) < 0.3
    return (
        r(C, B, Rq, H, dh),
        r(B, P, Hkv, dh),
        r(B, P, Hkv, dh),
        r(C, B, Rk, Hkv, dh),
        r(C, B, Rk, Hkv, dh),
        mask,
    )


def _attention_naive(q, kp, vp, kn, vn, mask, scale):
    """Loops over cells, examples, heads and queries, in float64."""
    C, B, Rq, H, dh = q.shape
    Hkv = kn.shape[3]
    z = torch.zeros(C, B, Rq, H, dh, dtype=torch.float64)
    for c in range(C):
        for b in range(B):
            for h in range(H):
                hk = h // (H // Hkv)
                K = torch.cat([kp[b, :, hk], kn[c, b, :, hk]]).double()
                V = torch.cat([vp[b, :, hk], vn[c, b, :, hk]]).double()
                for r in range(Rq):
                    if K.shape[0] == 0:
                        continue
                    s = (K @ q[c, b, r, h].double()) * scale
                    s[mask[r]] = -math.inf
                    z[c, b, r, h] = torch.softmax(s, 0) @ V
    return z


@pytest.mark.parametrize("backend, device", backend_devices("prefix_attention"))
@pytest.mark.parametrize(
    "dims",
    [
        (0, 2, 3, 2, 4, 2, 1, 1),  # no cells
        (1, 0, 3, 2, 4, 2, 1, 1),  # no examples
        (1, 2, 0, 2, 4, 2, 1, 1),  # no queries
        (1, 2, 3, 2, 0, 2, 1, 1),  # no features
        (1, 2, 3, 2, 4, 0, 1, 1),  # no shared keys
        (1, 2, 3, 2, 4, 2, 0, 1),  # no own keys
        (1, 2, 3, 2, 4, 0, 0, 1),  # no keys at all: zeros
        (1, 1, 1, 1, 1, 1, 1, 1),
    ],
)
def test_prefix_attention_with_a_zero_size_axis_in_each_position(backend, device, dims):
    args = _attention_args(*dims)
    z = prefix_attention(*(t.to(device) for t in args), 0.5, backend=backend)
    assert z.shape == args[0].shape
    torch.testing.assert_close(
        z.double().cpu(), _attention_naive(*args, 0.5), rtol=1e-5, atol=1e-5, equal_nan=True
    )


def test_prefix_attention_gradients_against_float64_autograd_of_the_naive_loops():
    """Inputs that require a gradient take the reference (the kernels are not differentiable): its gradients are
    the naive loops'; a forced kernel is refused naming the backend."""
    args = list(_attention_args(2, 2, 3, 4, 5, 3, 2, 2, dtype=torch.float64))
    xs = [t.clone().requires_grad_() for t in args[:5]]
    ys = [t.clone().requires_grad_() for t in args[:5]]
    w = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    got = torch.autograd.grad((prefix_attention(*xs, args[5], 0.3) * w).sum(), xs)
    want = torch.autograd.grad((_attention_naive(*ys, args[5], 0.3) * w).sum(), ys)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"backend='cpp' is not differentiable"):
        prefix_attention(*xs, args[5], 0.3, backend="cpp")


def test_prefix_attention_refuses_other_devices_and_forced_16_bit_by_name():
    args = _attention_args(1, 2, 3, 2, 4, 2, 1, 1)
    with pytest.raises(ValueError, match=r"v_new is on meta, q on cpu"):
        prefix_attention(*args[:4], args[4].to("meta"), args[5], 0.5)
    with pytest.raises(ValueError, match=r"mask is on meta, q on cpu"):
        prefix_attention(*args[:5], args[5].to("meta"), 0.5)
    half = [t.half() for t in args[:5]]
    with pytest.raises(ValueError, match=r"q has dtype torch\.float16; the 'cpp' backend"):
        prefix_attention(*half, args[5], 0.5, backend="cpp")


# ---------------------------------------------------------------------------------------- grad_gram_pairwise


@pytest.mark.parametrize("backend, device", backend_devices("grad_gram_pairwise"))
@pytest.mark.parametrize("dims", [(3, 0, 4, 5), (3, 2, 0, 5), (3, 2, 4, 0), (1, 1, 1, 1)])
def test_grad_gram_pairwise_with_a_zero_size_axis_in_each_position(backend, device, dims):
    batch, T, p, q = dims
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(batch * T, p, generator=gen)
    y = torch.randn(batch * T, q, generator=gen)
    ids = torch.randint(-1, 3, (batch * T,), generator=gen)
    X, Y = x.double().view(batch, T, p), y.double().view(batch, T, q)
    want = torch.einsum("isp,jtp,isq,jtq->ij", X, X, Y, Y)
    got = grad_gram_pairwise(x.to(device), y.to(device), batch=batch, backend=backend)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    idv = ids.view(batch, T)
    same = ((idv[:, :, None, None] == idv[None, None, :, :]) & (idv[:, :, None, None] >= 0)).double()
    want_ids = torch.einsum("isjt,isq,jtq->ij", same, Y, Y)
    got_ids = grad_gram_pairwise(None, y.to(device), ids.to(device), batch=batch, backend=backend)
    torch.testing.assert_close(got_ids.cpu(), want_ids, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- covariance


@pytest.mark.parametrize("backend, device", backend_devices("covariance_update_"))
@pytest.mark.parametrize("dims", [(0, 3, 4), (3, 0, 4), (0, 0, 4), (1, 1, 2)])
def test_covariance_update_with_a_zero_size_axis(backend, device, dims):
    """``K = 0`` or ``N = 0`` columns: two chunks (the second shifted far from zero) against the float64
    co-moments written out here."""
    K, N, m = dims
    gen = torch.Generator().manual_seed(10)
    A = torch.cat([torch.randn(m, K, generator=gen), torch.randn(m + 3, K, generator=gen) * 1e3 + 5])
    B = torch.cat([torch.randn(m, N, generator=gen), torch.randn(m + 3, N, generator=gen)])

    def z(*s):
        return torch.zeros(*s, dtype=torch.float64, device=device)

    st = [z(K), z(N), z(K), z(N), z(K, N), z(K, K), z(N)]
    cross_covariance_update_(*st, A[:m].to(device), B[:m].to(device), count=0, backend=backend)
    cross_covariance_update_(*st, A[m:].to(device), B[m:].to(device), count=m, backend=backend)
    Ad, Bd = A.double(), B.double()
    ac, bc = Ad - Ad.mean(0), Bd - Bd.mean(0)
    # the means are kept relative to the shifts (the first chunk's means)
    torch.testing.assert_close((st[0] + st[2]).cpu(), Ad.mean(0))
    torch.testing.assert_close((st[1] + st[3]).cpu(), Bd.mean(0))
    torch.testing.assert_close(st[4].cpu(), ac.T @ bc, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(st[5].cpu(), ac.T @ ac, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(st[6].cpu(), (bc * bc).sum(0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend, device", backend_devices("covariance_update_"))
@pytest.mark.parametrize("scale", [1e38, 3e19, 1e-40], ids=["near_max", "square_overflows", "denormal"])
def test_covariance_float32_chunks_at_the_ends_of_the_dtype_against_float64(backend, device, scale):
    """float32 draws near the dtype's largest (whose squares and products overflow float32) and denormal ones:
    the co-moments as float64 sums of the centred draws, to float64's rounding."""
    K, N, m = 3, 2, 5
    gen = torch.Generator().manual_seed(11)
    A = ((torch.rand(2 * m, K, generator=gen) * 2 - 1) * scale).float()
    B = ((torch.rand(2 * m, N, generator=gen) * 2 - 1) * scale).float()
    f = torch.float64
    st = [torch.zeros(*s, dtype=f, device=device) for s in ((K,), (N,), (K,), (N,), (K, N), (K, K), (N, N))]
    cross_covariance_update_(*st, A[:m].to(device), B[:m].to(device), count=0, backend=backend)
    cross_covariance_update_(*st, A[m:].to(device), B[m:].to(device), count=m, backend=backend)
    ac, bc = A.double() - A.double().mean(0), B.double() - B.double().mean(0)
    for got, want in ((st[4], ac.T @ bc), (st[5], ac.T @ ac), (st[6], bc.T @ bc)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu() / want.abs().max(), want / want.abs().max(), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------- the fused sampler steps


def _fused_step(op, backend, device, w, g, a, s, kw):
    th = torch.tensor([0.01], dtype=torch.float64, device=device)
    common = dict(seed=3, step=4, backend=backend, check_finite=False, **kw)
    if op == "sgld_step_":
        flags = sgld_step_([w], [g], [a], **common)
    elif op == "sgnht_step_":
        flags = sgnht_step_([w], [g], [a], [s], th, **common)
    else:
        flags = rmsprop_sgld_step_([w], [g], [a], [s], **common)
    return flags.cpu(), w.cpu(), s.cpu(), th.cpu()


_STEP_KWS = [
    dict(step_size=1e-3, nbeta=10.0, localization=1.0, noise_scale=0.0),
    dict(step_size=1.0, nbeta=1.0, localization=0.0, noise_scale=0.0, weight_decay=0.5),
    dict(step_size=1e-3, nbeta=1.0, localization=1.0, noise_scale=1.0, bounding_box=1e30),
]


@pytest.mark.parametrize("op", ["sgld_step_", "sgnht_step_", "rmsprop_sgld_step_"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_steps_at_the_ends_of_the_dtype_agree_with_the_reference(op, dtype):
    """Weights, anchors and gradients holding denormals, values near the dtype's largest and zeros (updates that
    overflow, differences of huge anchors, denormal drifts): every backend's flags exactly, and its weights and
    states as the reference's (non-contiguous weights: every other entry of a buffer)."""
    others = [p for p in backend_devices(op, reference=False) if not p.marks]
    if not others:
        pytest.skip(f"no backend of {op} but the reference runs here")
    big = 1e38 if dtype == torch.float32 else 1e307
    tiny = 1e-40 if dtype == torch.float32 else 1e-310
    w0 = torch.tensor([0.0, tiny, -tiny, big, -big, 1.0, -2.0, 3 * tiny, big, -big, 0.5], dtype=dtype)
    g0 = torch.tensor([tiny, 1.0, big, tiny, -tiny, big, -big, 0.0, -big, big, 1e-30], dtype=dtype)
    a0 = torch.tensor([tiny, 0.0, 2 * tiny, -big, big, 1.0, -2.0, tiny, big, -big, 0.5], dtype=dtype)

    def run(backend, device):
        buf = torch.zeros(2 * len(w0), dtype=dtype, device=device)
        w = buf[::2]
        w.copy_(w0.to(device))
        s = torch.full_like(w, 0.1)
        return [
            _fused_step(op, backend, device, w.clone(), g0.to(device), a0.to(device), s.clone(), kw)
            for kw in _STEP_KWS
        ]

    want = run("reference", "cpu")
    for p in others:
        backend, device = p.values
        for kw, got, ref in zip(_STEP_KWS, run(backend, device), want):
            assert torch.equal(got[0], ref[0]), (backend, kw, got[0], ref[0])
            for x, y in zip(got[1:3], ref[1:3]):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=0, equal_nan=True, msg=f"{backend} {kw}")
            torch.testing.assert_close(got[3], ref[3], rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------- sparse layouts


def _sparse(t: torch.Tensor) -> torch.Tensor:
    return t.to_sparse()


def _cov_state(K, N):
    z = torch.zeros
    f = torch.float64
    return [
        z(K, dtype=f),
        z(N, dtype=f),
        z(K, dtype=f),
        z(N, dtype=f),
        z(K, N, dtype=f),
        z(0, dtype=f),
        z(0, dtype=f),
    ]


_SPARSE_CALLS = {
    "gelu_tanh x": (
        r"gelu_tanh: x is a tensor of layout torch\.sparse_coo",
        lambda: gelu_tanh(_sparse(torch.randn(3, 3))),
    ),
    "row_dots a": (
        r"row_dots: a is a tensor of layout torch\.sparse_coo",
        lambda: row_dots(_sparse(torch.randn(2, 3, 4)), [torch.randn(2, 3, 4)]),
    ),
    "row_dots g": (
        r"row_dots: g\[1\] is a tensor of layout torch\.sparse_coo",
        lambda: row_dots(torch.randn(2, 3, 4), [torch.randn(2, 1, 4), _sparse(torch.randn(2, 3, 4))]),
    ),
    "signed_sums terms": (
        r"signed_sums: terms\[0\] is a tensor of layout torch\.sparse_coo",
        lambda: signed_sums([torch.randn(3)], [_sparse(torch.randn(3))], [0, 1], [1]),
    ),
    "prefix_attention k_new": (
        r"prefix_attention: k_new is a tensor of layout torch\.sparse_coo",
        lambda: prefix_attention(
            *(lambda a: (*a[:3], _sparse(a[3]), *a[4:]))(_attention_args(1, 2, 3, 2, 4, 2, 1, 1)), 0.5
        ),
    ),
    "grad_gram_pairwise y": (
        r"grad_gram_pairwise: y is a tensor of layout torch\.sparse_coo",
        lambda: grad_gram_pairwise(torch.randn(4, 3), _sparse(torch.randn(4, 3)), batch=2),
    ),
    "covariance a": (
        r"a is a tensor of layout torch\.sparse_coo",
        lambda: cross_covariance_update_(
            *_cov_state(3, 2), _sparse(torch.randn(4, 3)), torch.randn(4, 2), count=0
        ),
    ),
    "sgld grads": (
        r"grads\[0\] is a tensor of layout torch\.sparse_coo.*nn\.Embedding\(sparse=True\)",
        lambda: sgld_step_(
            [torch.randn(3)],
            [_sparse(torch.randn(3))],
            [torch.randn(3)],
            step_size=1e-3,
            nbeta=1.0,
            localization=1.0,
            seed=1,
            step=1,
        ),
    ),
    "sgnht momenta": (
        r"momenta\[0\] is a tensor of layout torch\.sparse_coo",
        lambda: sgnht_step_(
            [torch.randn(3)],
            [torch.randn(3)],
            [torch.randn(3)],
            [_sparse(torch.randn(3))],
            torch.zeros(1, dtype=torch.float64),
            step_size=1e-3,
            nbeta=1.0,
            localization=1.0,
            seed=1,
            step=1,
        ),
    ),
}


@pytest.mark.parametrize("call", sorted(_SPARSE_CALLS))
def test_sparse_inputs_are_refused_naming_the_argument(call):
    """A sparse tensor failed inside torch or the kernels with messages naming no argument ("Cannot access data
    pointer of Tensor that doesn't have storage", "unsupported memory format option Contiguous"), or (row_dots'
    reference) ran where the C++ kernel failed."""
    match, fn = _SPARSE_CALLS[call]
    with pytest.raises(TypeError, match=match):
        fn()


def test_the_sgld_optimizer_names_a_sparse_embedding_gradient():
    from pypattern.sampling import SGLD

    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SGLD(emb.parameters(), lr=1e-3, nbeta=1.0, localization=1.0)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"grads\[0\] is a tensor of layout torch\.sparse_coo.*sparse=False"):
        opt.step()
