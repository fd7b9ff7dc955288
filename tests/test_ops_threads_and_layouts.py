"""The ops across thread counts, memory layouts, dtypes and sizes around the kernels' blocks.

* One torch thread against two: the C++ kernels of the sampler steps (their noise and the SGNHT thermostat's sum),
  the streaming covariance (float64 sums), row dots, signed sums, the tanh GELU (forward and backward) and prefix
  attention give the same bits; the pairwise Gram (BLAS products) agrees to rounding. Each also against an
  independent float64 computation.
* The noise is keyed by (seed, step, tensor index, element index in row-major order): a transposed or strided
  parameter gets the noise of its contiguous copy, float32 and float64 parameters share one step, and a parameter
  split into two tensors draws the streams of tensor indices 0 and 1 (checked against :func:`philox_normals`).
* float16 and bfloat16: refused by name where the op takes float32/float64 only, else the reference in that dtype.
"""

from __future__ import annotations

import pytest
import torch

import pypattern
from pypattern.ops import (
    CrossCovariance,
    grad_gram_pairwise,
    philox_normals,
    prefix_attention,
    rmsprop_sgld_step_,
    row_dots,
    sgld_step_,
    sgnht_step_,
    signed_sums,
)
from pypattern.ops.activations import gelu_tanh as gelu_tanh_of_the_family

SAMPLER_OPS = {"sgld": "sgld_step_", "sgnht": "sgnht_step_", "rmsprop": "rmsprop_sgld_step_"}


def _available(op: str, backend: str) -> bool:
    return bool(pypattern.backends(op)[backend]["available"])


def _need(op: str, backend: str) -> None:
    if not _available(op, backend):
        pytest.skip(f"{backend}: {pypattern.backends(op)[backend]['reason']}")


def _at_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _one_and_two_threads(fn):
    return _at_threads(1, fn), _at_threads(2, fn)


def _same_bits(x, y) -> bool:
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(_same_bits(a, b) for a, b in zip(x, y))
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1), y.view(-1))


def _sampler_step(op, backend, params, grads, anchors, *, masks=None, box=None, seed=123, step=7):
    """One step of ``op`` in place; returns the tensors it wrote (params, then its state)."""
    kw = dict(
        step_size=1e-3,
        nbeta=10.0,
        localization=1.0,
        seed=seed,
        step=step,
        backend=backend,
        bounding_box=box,
        masks=masks,
    )
    if op == "sgld":
        sgld_step_(params, grads, anchors, **kw)
        return list(params)
    if op == "sgnht":
        momenta = [torch.full(p.shape, 0.01, dtype=p.dtype) for p in params]
        thermostat = torch.tensor([0.1], dtype=torch.float64)
        sgnht_step_(params, grads, anchors, momenta, thermostat, diffusion_factor=0.5, **kw)
        return list(params) + momenta + [thermostat]
    square_avgs = [torch.full(p.shape, 0.5, dtype=p.dtype) for p in params]
    rmsprop_sgld_step_(params, grads, anchors, square_avgs, **kw)
    return list(params) + square_avgs


# 300 x 257 and 70001 elements: more than one parallel chunk of every sampler kernel (32768 elements), with
# block tails (128 and 1024 elements) inside and at the end of each tensor; 1 and 3 elements
SHAPES = [(300, 257), (129,), (1,), (70001,), (3,)]


def _sampler_problem(dtype, masked):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    anchors = [p + 0.01 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in params]
    masks = [torch.rand(s, generator=gen) > 0.3 for s in SHAPES] if masked else None
    return params, grads, anchors, masks


@pytest.mark.parametrize("op", list(SAMPLER_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked, box", [(False, None), (True, 0.5)], ids=["plain", "mask-box"])
def test_sampler_steps_give_the_same_bits_on_one_and_two_threads(op, dtype, masked, box):
    _need(SAMPLER_OPS[op], "cpp")

    def run(backend="cpp"):
        params, grads, anchors, masks = _sampler_problem(dtype, masked)
        return _sampler_step(op, backend, params, grads, anchors, masks=masks, box=box)

    one, two = _one_and_two_threads(run)
    assert _same_bits(one, two)
    ref = run("reference")
    for x, r in zip(one, ref):
        # the noise is float32 in every backend, its log and cos rounded differently (about 1e-6 of 1)
        torch.testing.assert_close(x, r, rtol=0, atol=1e-6)


def _layout_problem(strided: bool):
    """A float64 matrix (given transposed), a float32 vector (every third element of a longer one) and a float64
    vector: one step over mixed dtypes and layouts; ``strided=False`` gives the contiguous copies."""
    gen = torch.Generator().manual_seed(2)
    matrix = torch.randn(40, 70, generator=gen, dtype=torch.float64)
    vector = torch.randn(300, generator=gen, dtype=torch.float64).float()
    small = torch.randn(5, generator=gen, dtype=torch.float64)
    params = [matrix.t(), vector[::3], small]
    if not strided:
        params = [p.contiguous() for p in params]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    anchors = [p.detach().clone() + 0.1 for p in params]
    return params, grads, anchors, (matrix, vector)


@pytest.mark.parametrize("op", list(SAMPLER_OPS))
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_views_and_mixed_dtypes_get_the_noise_of_contiguous_copies(op, backend):
    _need(SAMPLER_OPS[op], backend)
    params, grads, anchors, (matrix, vector) = _layout_problem(strided=True)
    vector_before = vector.clone()
    out_view = _sampler_step(op, backend, params, grads, anchors, seed=2**63 + 5, step=2**40 + 3)
    # the step wrote through the views, and no element of the longer vector outside its view
    assert params[0].data_ptr() == matrix.data_ptr() and params[1].data_ptr() == vector.data_ptr()
    outside = torch.ones(300, dtype=torch.bool)
    outside[::3] = False
    assert torch.equal(vector[outside], vector_before[outside])
    assert not torch.equal(vector[::3], vector_before[::3])

    params_c, grads_c, anchors_c, _ = _layout_problem(strided=False)
    out_copy = _sampler_step(op, backend, params_c, grads_c, anchors_c, seed=2**63 + 5, step=2**40 + 3)
    for x, y in zip(out_view, out_copy):
        assert _same_bits(x.contiguous(), y.contiguous())
    if backend != "reference":
        params_r, grads_r, anchors_r, _ = _layout_problem(strided=False)
        ref = _sampler_step(op, "reference", params_r, grads_r, anchors_r, seed=2**63 + 5, step=2**40 + 3)
        for x, r in zip(out_view, ref):
            torch.testing.assert_close(x.contiguous(), r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_a_parameter_split_in_two_tensors_draws_the_streams_of_both_tensor_indices(backend):
    """A noise-only SGLD step from 0 with step_size 1 writes the noise itself: one tensor of 300 elements draws
    tensor index 0's stream; the same 300 elements as two tensors (129 + 171) draw index 0's first 129 and index
    1's first 171 normals (the split changes the key, not the distribution), whatever the strides."""
    _need("sgld_step_", backend)
    seed, step = 2**40 + 9, 3

    def noise(shapes, strided=False):
        params = [torch.zeros(s[::-1]).t() if strided and len(s) == 2 else torch.zeros(s) for s in shapes]
        zeros = [torch.zeros(p.shape) for p in params]
        sgld_step_(
            params,
            zeros,
            [z.clone() for z in zeros],
            step_size=1.0,
            nbeta=0.0,
            localization=0.0,
            seed=seed,
            step=step,
            backend=backend,
        )
        return [p.reshape(-1) for p in params]

    tol = dict(rtol=0, atol=2e-6)
    (whole,) = noise([(300,)])
    torch.testing.assert_close(whole, philox_normals(300, seed=seed, tensor_index=0, step=step), **tol)
    first, second = noise([(129,), (3, 57)], strided=True)
    torch.testing.assert_close(first, philox_normals(129, seed=seed, tensor_index=0, step=step), **tol)
    torch.testing.assert_close(second, philox_normals(171, seed=seed, tensor_index=1, step=step), **tol)
    assert torch.equal(first, whole[:129])  # the first piece keeps index 0's stream, bit for bit
    assert not torch.allclose(second, whole[129:], atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("track_auto", ["var", "full"])
def test_covariance_float64_sums_give_the_same_bits_on_one_and_two_threads(dtype, transposed, track_auto):
    _need("covariance_update_", "cpp")
    gen = torch.Generator().manual_seed(0)
    m, k, n = 1300, 300, 200  # panels of 512 draws and a tail; columns split over threads
    a = torch.randn(m, k, generator=gen, dtype=torch.float64) * 3 + 100
    b = torch.randn(m, n, generator=gen, dtype=torch.float64) + a[:, :1]
    a, b = a.to(dtype), b.to(dtype)
    if transposed:
        a, b = a.t().contiguous().t(), b.t().contiguous().t()

    def run(backend="cpp"):
        acc = CrossCovariance(k, n, track_auto=track_auto, backend=backend, buffer_draws=0)
        for i in range(0, m, 700):
            acc.update(a[i : i + 700], b[i : i + 700])
        auto = (acc.cov_aa(), acc.cov_bb()) if track_auto == "full" else (acc.var_a(), acc.var_b())
        return [acc.cov(), *auto, acc.mean_a, acc.mean_b]

    one, two = _one_and_two_threads(run)
    assert _same_bits(one, two)
    x = torch.cat([a, b], 1).double()
    full = torch.cov(x.T)
    expect = [full[:k, k:]]
    expect += (
        [full[:k, :k], full[k:, k:]] if track_auto == "full" else [full.diagonal()[:k], full.diagonal()[k:]]
    )
    expect += [x[:, :k].mean(0), x[:, k:].mean(0)]
    for got, want in zip(one, expect):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "B, M, K, rows",
    [
        (1, 600, 33, [7, 5]),  # three row blocks of 256, a term tail
        (3, 257, 16, [25]),  # one vector of float32 terms, more g rows than a panel
        (2, 513, 2049, [49, 1]),  # just past a 2 KiB chunk of float64 terms (and four of float32)
        (1, 1, 1, [1]),
        (1, 5, 15, [0, 2]),
        (2, 256, 0, [3]),
    ],
)
def test_row_dots_give_the_same_bits_on_one_and_two_threads(dtype, B, M, K, rows):
    _need("row_dots", "cpp")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(B, K, M, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)  # copied once
    g = [torch.randn(B, n, K, generator=gen, dtype=torch.float64).to(dtype) for n in rows]
    one, two = _one_and_two_threads(lambda: row_dots(a, g, backend="cpp"))
    assert _same_bits(one, two)
    want = torch.bmm(a.double(), torch.cat(g, 1).double().transpose(1, 2))
    tol = (1e-5 if dtype == torch.float32 else 1e-13) * max(1.0, K**0.5)
    torch.testing.assert_close(one.double(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 32767, 32768, 32769, 3 * 2**19 + 5])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_signed_sums_give_the_same_bits_on_one_and_two_threads(dtype, n, offset):
    _need("signed_sums_", "cpp")
    gen = torch.Generator().manual_seed(n)
    store = [torch.randn(n + 1, generator=gen, dtype=torch.float64).to(dtype) for _ in range(8)]
    base = [s[offset : offset + n] for s in store[:3]]
    terms = [s[offset : offset + n] for s in store[3:]]
    offsets, signs = [0, 2, 2, 5], [1, -1, 1, 1, -1]
    outs = [torch.zeros(n + 1, dtype=dtype) for _ in range(3)]

    def run():
        out = [o[offset : offset + n] for o in outs]  # unaligned outputs of 8 MiB and more are streamed
        signed_sums(base, terms, offsets, signs, out=out, backend="cpp")
        return [o.clone() for o in out]

    one, two = _one_and_two_threads(run)
    assert _same_bits(one, two)
    chains = [
        base[0] + terms[0] - terms[1],
        base[1].clone(),
        base[2] + terms[2] + terms[3] - terms[4],
    ]
    assert _same_bits(one, chains)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_tanh_forward_and_backward_give_the_same_bits_on_one_and_two_threads(dtype):
    _need("gelu_tanh", "cpp")
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 15, 16, 17, 32769, 70001):
        x = (4 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()

        def run(x=x, n=n):
            y = gelu_tanh_of_the_family(x, backend="cpp")
            (gx,) = torch.autograd.grad(y.sum(), x) if n else (torch.zeros(0, dtype=dtype),)
            return [y.detach(), gx]

        one, two = _one_and_two_threads(run)
        assert _same_bits(one, two)
        x64 = x.detach().double().requires_grad_()
        y64 = torch.nn.functional.gelu(x64, approximate="tanh")
        tol = 1e-5 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(one[0].double(), y64.detach(), rtol=0, atol=tol)
        if n:
            (g64,) = torch.autograd.grad(y64.sum(), x64)
            torch.testing.assert_close(one[1].double(), g64, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dh", [1, 15, 16, 17, 63, 64, 65])
def test_prefix_attention_gives_the_same_bits_on_one_and_two_threads(dtype, dh):
    _need("prefix_attention", "cpp")
    gen = torch.Generator().manual_seed(dh)
    C, B, H, Hkv = 2, 2, 4, 2
    for Rq, P, Rk in ((1, 0, 1), (5, 15, 17), (9, 33, 3)):

        def r(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

        q = r(C, B, H, Rq, dh).transpose(2, 3)  # strided queries
        kp, vp, kn, vn = r(B, P, Hkv, dh), r(B, P, Hkv, dh), r(C, B, Rk, Hkv, dh), r(C, B, Rk, Hkv, dh)
        mask = torch.triu(torch.ones(Rq, P + Rk, dtype=torch.bool), diagonal=P + 1)
        one, two = _one_and_two_threads(
            lambda: prefix_attention(q, kp, vp, kn, vn, mask, dh**-0.5, backend="cpp")  # noqa: B023
        )
        assert _same_bits(one, two)
        want = prefix_attention(
            *(t.double() for t in (q, kp, vp, kn, vn)), mask, dh**-0.5, backend="reference"
        )
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(one.double(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, T, p, q", [(16, 2, 50000, 7), (600, 1, 20, 10), (3, 17, 33, 31), (1, 1, 1, 1)])
def test_grad_gram_pairwise_agrees_to_rounding_on_one_and_two_threads(dtype, B, T, p, q):
    """The products are BLAS GEMMs, which may split a long sum over threads: not bit for bit, to rounding."""
    _need("grad_gram_pairwise", "cpp")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B * T, p, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(B * T, q, generator=gen, dtype=torch.float64).to(dtype)
    ids = torch.randint(-1, 3, (B * T,), generator=gen)
    want = grad_gram_pairwise(x.double(), y.double(), batch=B, backend="reference")
    want_ids = grad_gram_pairwise(None, y.double(), ids, batch=B, backend="reference")
    rtol = 1e-5 if dtype == torch.float32 else 1e-13
    for backend in (
        ("cpp", "triton")
        if _available("grad_gram_pairwise", "triton") and B * T <= 64 and p + q <= 64
        else ("cpp",)
    ):
        for threads in (1, 2):
            got = _at_threads(threads, lambda: grad_gram_pairwise(x, y, batch=B, backend=backend))  # noqa: B023
            got_ids = _at_threads(threads, lambda: grad_gram_pairwise(None, y, ids, batch=B, backend=backend))  # noqa: B023
            assert torch.equal(got, got.T) or backend == "triton"
            torch.testing.assert_close(got, want, rtol=0, atol=rtol * float(want.abs().max()))
            torch.testing.assert_close(
                got_ids, want_ids, rtol=0, atol=rtol * max(1.0, float(want_ids.abs().max()))
            )


HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_is_refused_by_name_where_the_ops_take_float32_and_float64(dtype):
    p, g = torch.randn(10, dtype=dtype), torch.randn(10, dtype=dtype)
    kw = dict(step_size=1e-3, nbeta=1.0, localization=1.0, seed=0, step=0)
    for backend in (None, "cpp", "reference"):
        with pytest.raises(TypeError, match=rf"params\[0\] has dtype {dtype}"):
            sgld_step_([p], [g], [p.clone()], backend=backend, **kw)
        with pytest.raises(TypeError, match=rf"params\[0\] has dtype {dtype}"):
            sgnht_step_(
                [p], [g], [p.clone()], [torch.zeros_like(p)], torch.zeros(1, dtype=torch.float64), **kw
            )
        with pytest.raises(TypeError, match=rf"params\[0\] has dtype {dtype}"):
            rmsprop_sgld_step_([p], [g], [p.clone()], [torch.zeros_like(p)], **kw)
        with pytest.raises(TypeError, match=rf"a has dtype {dtype}"):
            CrossCovariance(3, 4, backend=backend).update(torch.randn(5, 3, dtype=dtype), torch.randn(5, 4))
        with pytest.raises(TypeError, match=rf"y has dtype {dtype}"):
            grad_gram_pairwise(torch.randn(6, 3, dtype=dtype), torch.randn(6, 4, dtype=dtype), batch=3)
    # a float32 step whose gradient is half precision names the gradient
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype"):
        sgld_step_([p.float()], [g], [p.float()], **kw)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_takes_the_reference_in_its_dtype_where_the_ops_accept_it(dtype):
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    a, g = r(2, 3, 300), [r(2, 4, 300)]
    assert _same_bits(row_dots(a, g), torch.bmm(a, g[0].transpose(1, 2)))
    base, terms = [r(17)], [r(17), r(17)]
    assert _same_bits(signed_sums(base, terms, [0, 2], [1, -1])[0], base[0] + terms[0] - terms[1])
    x = r(33)
    assert _same_bits(gelu_tanh_of_the_family(x), torch.nn.functional.gelu(x, approximate="tanh"))
    q, kp, vp, kn, vn = r(1, 1, 2, 1, 4), r(1, 3, 1, 4), r(1, 3, 1, 4), r(1, 1, 2, 1, 4), r(1, 1, 2, 1, 4)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    got = prefix_attention(q, kp, vp, kn, vn, mask, 0.5)
    assert got.dtype == dtype
    want = prefix_attention(*(t.double() for t in (q, kp, vp, kn, vn)), mask, 0.5)
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)
    for op, call in (
        ("row_dots", lambda: row_dots(a, g, backend="cpp")),
        ("signed_sums", lambda: signed_sums(base, terms, [0, 2], [1, -1], backend="cpp")),
        ("gelu_tanh", lambda: gelu_tanh_of_the_family(x, backend="cpp")),
        ("prefix_attention", lambda: prefix_attention(q, kp, vp, kn, vn, mask, 0.5, backend="cpp")),
    ):
        with pytest.raises(ValueError, match=rf"{op}.*{dtype}.*float32 or float64"):
            call()


def test_every_op_family_is_exported_from_pypattern_ops():
    """The package's docstring lists the tanh GELU with the other op families; it is importable from there."""
    import pypattern.ops as ops

    assert ops.gelu_tanh is gelu_tanh_of_the_family
    assert "gelu_tanh" in ops.__all__
