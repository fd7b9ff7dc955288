"""The public op :func:`gelu_tanh`: validation, the backend's choice and the autograd rule."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ... import _backends
from .reference import SQRT_2_OVER_PI, gelu_tanh_backward_reference, gelu_tanh_reference

_OP = "gelu_tanh"
_C_DTYPES = (torch.float32, torch.float64)


def _gelu_tanh_torch(x: torch.Tensor, c: float) -> torch.Tensor:
    """torch's fused tanh GELU when ``c`` is its constant, else the written-out formula."""
    if c == SQRT_2_OVER_PI:
        return F.gelu(x, approximate="tanh")
    return gelu_tanh_reference(x, c)


# For |x| >= 20, c (x + 0.044715 x^3) >= 301 at c = sqrt(2 / pi): the tanh is +-1 in every dtype (1 - tanh(301) is
# about 1e-261), and the derivative is exactly 1 (x > 0) or 0 (x < 0)
_FLAT = 20.0


def _gelu_tanh_backward_torch(grad: torch.Tensor, x: torch.Tensor, c: float) -> torch.Tensor:
    if c == SQRT_2_OVER_PI:
        g = torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
        # torch's formula multiplies 1 - t^2 = 0 by x^2, which is inf once |x| > 1.8e19 in float32 (1.3e154 in
        # float64): NaN where the derivative is 1 or 0, as the C++ kernel and the written-out formula give it
        return torch.where(x.abs() >= _FLAT, grad * (x > 0), g)
    return gelu_tanh_backward_reference(grad, x, c)


def _gelu_tanh_c(x: torch.Tensor, c: float) -> torch.Tensor:
    return torch.ops.pypattern.gelu_tanh(x, float(c))


def _gelu_tanh_backward_c(grad: torch.Tensor, x: torch.Tensor, c: float) -> torch.Tensor:
    return torch.ops.pypattern.gelu_tanh_backward(grad, x, float(c))


_backends.register(_OP, "reference", _gelu_tanh_torch)
_backends.register(_OP, ("cpp", "cuda"), _gelu_tanh_c)
_BACKWARD = {
    "reference": _gelu_tanh_backward_torch,
    "cpp": _gelu_tanh_backward_c,
    "cuda": _gelu_tanh_backward_c,
}


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, c: float, backend: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.c, ctx.backend = c, backend
        return _backends.implementation(_OP, backend)(x, c)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the backward is wanted (higher derivatives): the formula
            return gelu_tanh_backward_reference(grad, x, ctx.c), None, None
        return _BACKWARD[ctx.backend](grad.to(x.dtype), x, ctx.c), None, None


def _choose(x: torch.Tensor, backend: str | None) -> str:
    return _backends.choose_for_dtype(_OP, x, backend, _C_DTYPES)


def gelu_tanh(x: torch.Tensor, c: float = SQRT_2_OVER_PI, *, backend: str | None = None) -> torch.Tensor:
    """The tanh GELU ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))`` of ``x`` (any shape and strides; the result is
    contiguous), differentiable (higher derivatives through the written-out formula). Under ``torch.func``
    transforms and for forward-mode AD dual tensors (``torch.autograd.forward_ad``) it runs torch's operations
    (the ``reference`` backend), whose batching and forward-AD rules are torch's.

    Parameters
    ----------
    x : Tensor
        Floating-point input.
    c : float
        The constant inside the tanh: ``sqrt(2 / pi)`` (GPT-2's ``gelu_new``, torch's ``approximate="tanh"``) or
        Hugging Face's ``gelu_fast`` constant ``0.7978845608``.
    backend : str, optional
        ``"cpp"`` (CPU tensors of float32 or float64), ``"cuda"`` (CUDA tensors of float32 or float64) or
        ``"reference"`` (torch); default: the automatic choice (see :mod:`pypattern._backends`), which takes
        ``"reference"`` for the dtypes the kernels do not handle.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = type(x).__name__ if not isinstance(x, torch.Tensor) else f"a tensor of dtype {x.dtype}"
        raise TypeError(f"gelu_tanh: x must be a floating-point tensor, got {got}")
    _backends.refuse_non_strided("gelu_tanh", "x", x)
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not (math.isfinite(c) and c > 0):
        raise ValueError(
            f"gelu_tanh: c={c!r} is not valid; give a finite number > 0 (sqrt(2 / pi) by default)"
        )
    c = float(c)
    compiling = torch.compiler.is_compiling()
    if compiling and backend is None:  # traced: torch's ops, which the compiler fuses
        return _gelu_tanh_torch(x, c).contiguous()
    # a backend given by name is traced as its op (the C++ ops have fake implementations): the checks for
    # torch.func and dual tensors below are not traceable, and are skipped while compiling
    if not compiling and torch._C._functorch.is_functorch_wrapped_tensor(
        x
    ):  # under torch.func (grad, vmap, jvp): torch's ops
        if backend not in (None, "reference"):
            raise ValueError(
                f"gelu_tanh: backend={backend!r} cannot run under torch.func transforms; give backend=None"
            )
        return _gelu_tanh_torch(x, c).contiguous()
    if not compiling and _backends.has_tangent(
        x
    ):  # a forward-AD dual tensor: torch's ops carry its tangent, the kernels drop it
        if backend not in (None, "reference"):
            raise ValueError(
                f"gelu_tanh: backend={backend!r} has no forward-mode AD rule and x is a dual tensor "
                "(torch.autograd.forward_ad); give backend=None"
            )
        return _gelu_tanh_torch(x, c).contiguous()
    name = _choose(x, backend)
    if torch.is_grad_enabled() and x.requires_grad:
        return _GeluTanh.apply(x, c, name).contiguous()
    return _backends.implementation(_OP, name)(x, c).contiguous()


def gelu_tanh_unchecked(x: torch.Tensor, c: float = SQRT_2_OVER_PI) -> torch.Tensor:
    """:func:`gelu_tanh` without validation or ``backend``, for a model's forward: the C++ kernel on a plain CPU
    tensor of float32 or float64 (not one of ``torch.func``'s wrapped tensors under ``vmap``, ``grad`` or
    ``jvp``, for which the op has no batching or forward-AD rule, nor a forward-mode AD dual tensor) when it is
    built and ``PYPATTERN_BACKEND`` forces nothing; else torch's fused tanh GELU (``c = sqrt(2 / pi)``) or the written-out formula (also while ``torch.compile`` traces the
    model, whose compiler fuses those ops itself)."""
    if torch.compiler.is_compiling():
        return _gelu_tanh_torch(x, c)
    if (
        x.device.type == "cpu"
        and x.dtype in _C_DTYPES
        and x.layout == torch.strided
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and not _backends.has_tangent(x)
        and _backends._forced(None)[0] is None
        and _c_ready()
    ):
        if torch.is_grad_enabled() and x.requires_grad:
            return _GeluTanh.apply(x, c, "cpp")
        return torch.ops.pypattern.gelu_tanh(x, c)
    return _gelu_tanh_torch(x, c)


def _c_ready() -> bool:
    global _C_READY
    if _C_READY is None:
        _C_READY = bool(_backends.backends(_OP)["cpp"]["available"])
    return _C_READY


_C_READY: bool | None = None


def _fake_like_first(x, c):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_like_last(grad, x, c):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# shape functions of the C++ ops, so that torch.compile and meta tensors can trace through them
_backends.register_fake("pypattern::gelu_tanh", _fake_like_first)
_backends.register_fake("pypattern::gelu_tanh_backward", _fake_like_last)
