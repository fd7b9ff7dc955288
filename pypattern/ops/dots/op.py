"""The public op :func:`row_dots`: validation and the backend's choice."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import _backends
from .reference import row_dots_reference

_OP = "row_dots"
_C_DTYPES = (torch.float32, torch.float64)


def _row_dots_c(a: torch.Tensor, g: list[torch.Tensor]) -> torch.Tensor:
    return torch.ops.pypattern.row_dots(a, g)


_backends.register(_OP, "reference", row_dots_reference)
_backends.register(_OP, ("cpp", "cuda"), _row_dots_c)


def _fake_row_dots(a: torch.Tensor, g: list[torch.Tensor]) -> torch.Tensor:
    return a.new_empty(a.shape[0], a.shape[1], sum(t.shape[1] for t in g))


# the C++ op's shape function, so that torch.compile and meta tensors can trace through it
_backends.register_fake("pypattern::row_dots", _fake_row_dots)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride (or at most one element), else a contiguous copy (a new
    empty tensor when ``t`` is empty: torch calls every empty tensor contiguous and ``contiguous()`` keeps its
    strides)."""
    if t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.new_empty(t.shape) if t.numel() == 0 else t.contiguous()


def row_dots(a: torch.Tensor, g: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Dot products of every row of ``a`` with every row of each ``g_i``, per batch element:
    ``out[b, m, n] = sum_k a[b, m, k] * G[b, n, k]`` with ``G`` the rows of ``g`` one after the other.

    The products of ``torch.bmm(a, torch.cat(g, 1).transpose(1, 2))`` without forming the concatenation. The C++
    kernel (CPU tensors of float32 or float64) is written for few rows on each side and many terms (an edge-score
    contraction: a hundred or so rows of ``a``, a few dozen of ``g``, tens of thousands of terms), where a GEMM
    library packs the long operand and runs well below its rate; it reads the rows in place (any strides, unit
    stride along ``k``; other tensors are copied once) and sums each product in the input dtype with vector
    accumulators over chunks of 2 KiB of terms (512 float32 or 256 float64), the chunks' vector sums added in
    order and their lanes summed pairwise at the end; each output is one thread's sum, so the result does not
    depend on the number of threads. On CUDA tensors the CUDA build registers cuBLAS's batched GEMM
    over the concatenated rows (compiled, not run on the CPU-only machines measured); elsewhere (other dtypes,
    a CPU-only build) the reference, ``torch.bmm``. Not differentiable under reverse-mode autograd: no backend
    returns a result that carries a gradient (the inputs are detached). Forward-mode AD dual tensors
    (``torch.autograd.forward_ad``) and ``torch.func`` transforms (``jvp``, ``vmap``, ``grad``) take the reference
    on the inputs as given, so their tangents, batching and derivatives are torch's ``bmm``'s (the kernels have
    no forward-AD or batching rule and would drop the tangent). While ``torch.compile`` traces it with the automatic
    choice, it is the reference too, which the compiler handles itself; a backend given by name is traced as that
    backend's op (the C++ op through its fake implementation).

    Parameters
    ----------
    a : Tensor ``(B, M, K)``
    g : sequence of Tensors ``(B, N_i, K)``
        At least one, of ``a``'s dtype and device.
    backend : {"cpp", "cuda", "reference"}, optional
        Forces a backend (default: the C++ kernel on CPU tensors of float32 or float64, the CUDA registration on
        CUDA tensors where built, else the reference).

    Returns
    -------
    Tensor ``(B, M, sum_i N_i)``, contiguous.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"row_dots: a must be a Tensor, got {type(a).__name__}")
    if isinstance(g, torch.Tensor):
        raise TypeError("row_dots: g must be a sequence of Tensors (a list of one tensor for one)")
    g = list(g)
    if not g:
        raise ValueError("row_dots: g is empty; give at least one tensor (B, N, K)")
    if a.dim() != 3:
        raise ValueError(f"row_dots: a must be 3-D (batch, rows, terms), got shape {tuple(a.shape)}")
    _backends.refuse_non_strided("row_dots", "a", a)
    if a.dtype == torch.bool:  # no product of bools is a dot product (torch's bmm has none)
        raise TypeError("row_dots: a has dtype torch.bool; give a floating-point, integer or complex tensor")
    B, _, K = a.shape
    for i, t in enumerate(g):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"row_dots: g[{i}] must be a Tensor, got {type(t).__name__}")
        _backends.refuse_non_strided("row_dots", f"g[{i}]", t)
        if t.dim() != 3 or t.shape[0] != B or t.shape[2] != K:
            raise ValueError(f"row_dots: g[{i}] has shape {tuple(t.shape)}; expected ({B}, rows, {K}) as a's")
        if t.dtype != a.dtype or t.device != a.device:
            raise ValueError(
                f"row_dots: g[{i}] is {t.dtype} on {t.device}, a is {a.dtype} on {a.device}; they must match"
            )
    if torch.compiler.is_compiling() and backend is None:  # traced: torch's bmm, which the compiler handles
        return row_dots_reference(a.detach(), [t.detach() for t in g]).contiguous()
    # (not while torch.compile traces a forced backend: these checks are not traceable, and the op is)
    if not torch.compiler.is_compiling() and (
        any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (a, *g))
        or _backends.has_tangent(a, *g)
    ):
        if backend not in (None, "reference"):
            raise ValueError(
                f"row_dots: backend={backend!r} has no forward-AD or batching rule, and the inputs are dual tensors "
                "or run under torch.func transforms; give backend=None"
            )
        return row_dots_reference(a, g).contiguous()
    # the CUDA registration (cuBLAS) takes every dtype bmm does; the C++ kernel float32 and float64
    name = _backends.choose_for_dtype(_OP, a, backend, _C_DTYPES, kernels=("cpp",), arg="a")
    if name == "cpp":
        return _row_dots_c(_unit_last(a.detach()), [_unit_last(t.detach()) for t in g])
    if name == "cuda":
        return _row_dots_c(a.detach(), [t.detach() for t in g])
    return row_dots_reference(a.detach(), [t.detach() for t in g])
