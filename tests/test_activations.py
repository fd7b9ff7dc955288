"""The tanh GELU op (pypattern.ops.activations): every backend against the float64 formula on random and
adversarial inputs (scales, dtypes, shapes, strides, empty and zero-dimensional tensors, infinities and NaN), its
derivative, the automatic choice, and the model's use of it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pypattern
from pypattern.models.transformer import GELU_FAST_C, apply_act
from pypattern.ops.activations import (
    SQRT_2_OVER_PI,
    gelu_tanh,
    gelu_tanh_backward_reference,
    gelu_tanh_reference,
    gelu_tanh_unchecked,
)

HAS_CPP = pypattern.backends("gelu_tanh")["cpp"]["available"]


def _cases():
    cases = [pytest.param("reference", "cpu", id="reference-cpu")]
    why = pypattern.backends("gelu_tanh")["cpp"]["reason"]
    cases.append(
        pytest.param("cpp", "cpu", id="cpp-cpu", marks=() if HAS_CPP else pytest.mark.skip(reason=why))
    )
    gpu = torch.cuda.is_available()
    cuda = pypattern.backends("gelu_tanh")["cuda"]
    mark = () if cuda["available"] else pytest.mark.skip(reason=str(cuda["reason"]))
    cases.append(pytest.param("cuda", "cuda", id="cuda-cuda", marks=mark))
    # on CUDA tensors the automatic choice: the CUDA kernel where it is built, else torch's fused kernel
    cases.append(
        pytest.param(
            None, "cuda", id="auto-cuda", marks=() if gpu else pytest.mark.skip(reason="no CUDA device")
        )
    )
    return cases


CASES = _cases()
TOL = {torch.float32: 1e-6, torch.float64: 4e-15}
TOL_CUDA = {torch.float32: 4e-6, torch.float64: 4e-15}  # the CUDA build's fast-math exp and division


def _ref64(x: torch.Tensor, c: float) -> torch.Tensor:
    return gelu_tanh_reference(x.double().cpu(), c)


def _check(y: torch.Tensor, x: torch.Tensor, c: float):
    """y against the float64 formula: absolute error within the dtype's rounding of |x| (at least 1)."""
    ref = _ref64(x, c)
    scale = x.double().cpu().abs().clamp_min(1.0)
    err = ((y.double().cpu() - ref).abs() / scale).max().item() if x.numel() else 0.0
    tol = (TOL_CUDA if x.is_cuda else TOL)[x.dtype]
    assert err <= tol, f"{x.dtype}: error {err}"


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-3, 0.5, 3.0, 30.0, 1e4])
@pytest.mark.parametrize("c", [SQRT_2_OVER_PI, GELU_FAST_C])
def test_forward_matches_formula(backend, device, dtype, scale, c):
    g = torch.Generator().manual_seed(int(scale * 1000) % 9973)
    x = (torch.randn(3, 70001, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    _check(gelu_tanh(x, c, backend=backend), x, c)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_strides_and_empty(backend, device, dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 40, 9, generator=g, dtype=dtype).to(device) * 4
    views = [
        base,
        base.transpose(0, 2),  # non-contiguous
        base[:, ::3, 1:],  # strided slice
        base[2, 5, 4],  # zero-dimensional
        base[:0],  # empty
        torch.empty(0, 7, dtype=dtype, device=device),
        base.expand(2, *base.shape),  # zero stride
    ]
    for v in views:
        y = gelu_tanh(v, backend=backend)
        assert y.shape == v.shape and y.dtype == v.dtype and y.device == v.device
        _check(y, v, SQRT_2_OVER_PI)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values(backend, device, dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, math.nan, big, -big, 1e-40, -1e-40, -9.3, -25.0, 9.3, 88.0],
        dtype=dtype,
    ).to(device)
    y = gelu_tanh(x, backend=backend).cpu()
    ref = F.gelu(x.cpu().double(), approximate="tanh").to(dtype)  # torch's values, in the same dtype
    assert torch.isnan(y[4]) and torch.isnan(ref[4])
    assert torch.isnan(y[3]) == torch.isnan(ref[3])  # -inf: 0 * inf in the formula
    keep = [i for i in range(len(x)) if i not in (3, 4, 5, 6)]
    rtol = 1e-5 if device == "cuda" else 1e-6  # the CUDA build's fast-math exp
    assert torch.allclose(y[keep].double(), ref[keep].double(), rtol=rtol, atol=1e-30)
    assert y[2] == math.inf and not torch.isnan(y[keep]).any()
    if backend in (
        "cpp",
        "cuda",
    ):  # at +-max the kernels give the limits (the formula overflows to inf or NaN)
        assert y[5] == big and y[6] == 0.0


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [SQRT_2_OVER_PI, GELU_FAST_C])
def test_backward_matches_formula(backend, device, dtype, c):
    g = torch.Generator().manual_seed(5)
    x0 = torch.cat([torch.randn(40000, generator=g, dtype=torch.float64) * s for s in (0.3, 2.0, 12.0)])
    gr = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = x0.to(dtype).to(device).requires_grad_()
    gelu_tanh(x, c, backend=backend).backward(gr.to(dtype).to(device))
    ref = gelu_tanh_backward_reference(gr, x0.to(dtype).double(), c)
    tol = (1e-5 if device == "cuda" else 3e-6) if dtype == torch.float32 else 1e-14
    err = ((x.grad.double().cpu() - ref).abs() / gr.abs().clamp_min(1.0)).max().item()
    assert err <= tol, err


@pytest.mark.parametrize("backend, device", CASES[:2])
def test_gradcheck_and_second_derivative(backend, device):
    x = (torch.randn(4, 9, dtype=torch.float64) * 2).requires_grad_()
    f = lambda t: gelu_tanh(t, backend=backend)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.skipif(not HAS_CPP, reason="C++ kernel not built")
def test_cpp_independent_of_threads():
    x = torch.randn(8, 32, 3072) * 5
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = gelu_tanh(x, backend="cpp")
        da = torch.ops.pypattern.gelu_tanh_backward(x, x, SQRT_2_OVER_PI)
        torch.set_num_threads(2)
        b = gelu_tanh(x, backend="cpp")
        db = torch.ops.pypattern.gelu_tanh_backward(x, x, SQRT_2_OVER_PI)
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(a, b) and torch.equal(da, db)


def test_automatic_choice_and_errors(monkeypatch):
    x16 = torch.randn(5, 6, dtype=torch.bfloat16)
    y = gelu_tanh(x16)  # the C++ kernel takes float32/float64 only: torch's kernel
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.gelu(x16, approximate="tanh"))
    if HAS_CPP:
        with pytest.raises(ValueError, match="x has dtype torch.bfloat16.*'cpp'"):
            gelu_tanh(x16, backend="cpp")
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        gelu_tanh(torch.arange(3))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got list"):
        gelu_tanh([1.0])
    with pytest.raises(ValueError, match="not one of"):
        gelu_tanh(torch.randn(3), backend="fast")
    monkeypatch.setenv("PYPATTERN_BACKEND", "reference")  # forcing a backend: the model's path follows it
    x = torch.randn(7, 5) * 20
    assert torch.equal(gelu_tanh_unchecked(x), F.gelu(x, approximate="tanh"))


def test_unchecked_paths():
    """The model's entry point: the C++ kernel on plain CPU float tensors (with and without gradients), torch's
    kernel or the formula under vmap, and on other dtypes; all equal to the formula."""
    x = torch.randn(3, 11, dtype=torch.float64) * 3
    for c in (SQRT_2_OVER_PI, GELU_FAST_C):
        assert torch.allclose(gelu_tanh_unchecked(x, c), gelu_tanh_reference(x, c), rtol=0, atol=1e-14)
        xv = x.clone().requires_grad_()
        y = torch.func.vmap(lambda r, c=c: gelu_tanh_unchecked(r, c))(xv)
        assert torch.allclose(y, gelu_tanh_reference(x, c), rtol=0, atol=1e-14)
        gv = torch.func.vmap(torch.func.grad(lambda r, c=c: gelu_tanh_unchecked(r, c).sum()))(x)
        assert torch.allclose(gv, gelu_tanh_backward_reference(torch.ones_like(x), x, c), rtol=0, atol=1e-13)
    h = torch.randn(4, 4, dtype=torch.float16)
    assert torch.equal(gelu_tanh_unchecked(h), F.gelu(h, approximate="tanh"))


@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast", "gelu_pytorch_tanh"])
def test_apply_act_equals_hf_formulas(act):
    """The model's activations against Hugging Face's written-out formulas (float64)."""
    x = torch.randn(2, 5, 300, dtype=torch.float64) * 4
    if act == "gelu_fast":
        ref = 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    else:
        ref = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    assert torch.allclose(apply_act(x, act), ref, rtol=1e-14, atol=1e-14)


def test_compile_traces_the_op():
    f = torch.compile(lambda t: gelu_tanh(t) * 2.0, backend="eager")
    x = torch.randn(33)
    assert torch.allclose(f(x), 2.0 * gelu_tanh_reference(x), atol=1e-6)
    assert gelu_tanh(torch.randn(3, 4, device="meta")).shape == (3, 4)


def test_compiled_whole_graph_and_contiguous_results():
    """``torch.compile(fullgraph=True)`` traces both entry points (torch's ops while compiling); every backend
    returns a contiguous result, as documented, for a transposed input too."""
    from pypattern.ops.activations import gelu_tanh, gelu_tanh_unchecked

    x = torch.randn(5, 3, dtype=torch.float64)
    want = torch.nn.functional.gelu(x, approximate="tanh")
    for fn in (gelu_tanh, gelu_tanh_unchecked):
        torch._dynamo.reset()
        f = torch.compile(lambda t, fn=fn: fn(t) * 2, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(f(x), 2 * want, rtol=1e-12, atol=1e-14)
    # a backend given by name is traced as that backend's op, its gradient too
    for backend in ("reference", *(("cpp",) if HAS_CPP else ())):
        torch._dynamo.reset()
        f = torch.compile(
            lambda t, b=backend: gelu_tanh(t, backend=b) * 2, backend="aot_eager", fullgraph=True
        )
        torch.testing.assert_close(f(x), 2 * want, rtol=1e-12, atol=1e-14)
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xg).sum(), xg)
        xr = x.clone().requires_grad_(True)
        (want_g,) = torch.autograd.grad(2 * torch.nn.functional.gelu(xr, approximate="tanh").sum(), xr)
        torch.testing.assert_close(g, want_g, rtol=1e-12, atol=1e-14)
    xt = torch.randn(4, 6, dtype=torch.float64).T
    for backend in ("reference", "cpp"):
        if backend == "cpp" and not HAS_CPP:
            continue
        out = gelu_tanh(xt, backend=backend)
        assert out.is_contiguous()
        torch.testing.assert_close(
            out, torch.nn.functional.gelu(xt, approximate="tanh"), rtol=1e-12, atol=1e-14
        )


def test_gelu_tanh_constant_checked_and_torch_func_grad_works():
    from pypattern.ops.activations import gelu_tanh

    x = torch.randn(5, dtype=torch.float64)
    for bad in (float("nan"), -0.5, 0.0, True):
        with pytest.raises(ValueError, match="c=.* is not valid"):
            gelu_tanh(x, bad)
    g = torch.func.grad(lambda t: gelu_tanh(t).sum())(x)
    want = torch.func.grad(lambda t: torch.nn.functional.gelu(t, approximate="tanh").sum())(x)
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
    v = torch.func.vmap(gelu_tanh)(x.reshape(5, 1))
    torch.testing.assert_close(v.reshape(-1), gelu_tanh(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [SQRT_2_OVER_PI, GELU_FAST_C])
def test_forward_mode_ad_carries_the_tangent(dtype, c):
    """Forward-mode AD through both entry points (dual tensors of torch.autograd.forward_ad, with and without
    grad mode, and torch.func.jvp) gives the tangent of the formula, ``t * gelu'(x)``; a forced kernel, which has
    no forward-AD rule, is refused for a dual tensor instead of dropping its tangent."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(4, 33, dtype=torch.float64).to(dtype) * 3
    t = torch.randn_like(x)
    want = gelu_tanh_backward_reference(t.double(), x.double(), c)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    fns = {
        "auto": lambda v: gelu_tanh(v, c),
        "reference": lambda v: gelu_tanh(v, c, backend="reference"),
        "unchecked": lambda v: gelu_tanh_unchecked(v, c),
    }
    for name, fn in fns.items():
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
                y = fn(fwAD.make_dual(x, t))
                primal, tangent = fwAD.unpack_dual(y)
            assert tangent is not None, name
            torch.testing.assert_close(tangent.double(), want, **tol)
            torch.testing.assert_close(primal.double(), gelu_tanh_reference(x.double(), c), **tol)
        _, tangent = torch.func.jvp(fn, (x,), (t,))
        torch.testing.assert_close(tangent.double(), want, **tol)
    if HAS_CPP:
        with fwAD.dual_level(), pytest.raises(ValueError, match="backend='cpp' has no forward-mode AD rule"):
            gelu_tanh(fwAD.make_dual(x, t), c, backend="cpp")
    # outside a dual level the kernel runs as before
    assert torch.equal(gelu_tanh(x, c), gelu_tanh(x, c, backend="cpp" if HAS_CPP else None))


@pytest.mark.skipif(not HAS_CPP, reason="C++ kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_accuracy_is_as_documented(dtype):
    """The accuracy stated in pypattern/ops/activations against the exact formula (extended precision): ulps by
    range of x, and -0 past the exponent's clamp where the exact value is a representable number."""
    import numpy as np

    x = torch.linspace(-30, 10, 400_001, dtype=torch.float64).to(dtype)
    xl = x.double().numpy().astype(np.longdouble)
    u = np.longdouble(SQRT_2_OVER_PI) * (xl + np.longdouble("0.044715") * xl**3)
    with np.errstate(over="ignore"):
        exact = xl / (1 + np.exp(-2 * u))
    npdt = np.float32 if dtype == torch.float32 else np.float64
    rounded = exact.astype(npdt)
    got = gelu_tanh(x, backend="cpp").double().numpy()
    xs = x.double().numpy()
    lost = (got == 0) & (rounded != 0)
    lo, hi = (-10.8, -9.67) if dtype == torch.float32 else (-21.55, -21.05)
    assert lost.any() and xs[lost].min() >= lo and xs[lost].max() <= hi
    assert np.all(np.signbit(got[lost]))
    ok = ~lost & (rounded != 0)
    ulps = (np.abs(got - exact) / np.spacing(np.abs(rounded)).astype(np.longdouble)).astype(np.float64)
    far = 200 if dtype == torch.float32 else 2000
    for a, b, bound in ((-30, -9, far), (-9, -5, 165), (-5, -2, 45), (-2, 0, 8), (0, 10.5, 2)):
        sel = ok & (xs >= a) & (xs < b)
        assert ulps[sel].max() <= bound, (a, b, ulps[sel].max())
    assert float(np.abs(got - exact)[ok].max()) < (5.2e-7 if dtype == torch.float32 else 1.2e-15)
