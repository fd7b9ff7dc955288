"""The public op :func:`prefix_attention`: validation and the backend's choice."""

from __future__ import annotations

import math
import numbers

import torch

from ... import _backends
from .reference import prefix_attention_reference

_OP = "prefix_attention"
_C_DTYPES = (torch.float32, torch.float64)


def _prefix_attention_c(q, k_prefix, v_prefix, k_new, v_new, mask, scale) -> torch.Tensor:
    return torch.ops.pypattern.prefix_attention(q, k_prefix, v_prefix, k_new, v_new, mask, scale)


_backends.register(_OP, "reference", prefix_attention_reference)
_backends.register(_OP, ("cpp", "cuda"), _prefix_attention_c)


def _fake_prefix_attention(q, k_prefix, v_prefix, k_new, v_new, mask, scale) -> torch.Tensor:
    return q.new_empty(q.shape)


# the C++ op's fake implementation, so that torch.compile and meta tensors can trace through it
_backends.register_fake("pypattern::prefix_attention", _fake_prefix_attention)


def _check(q, k_prefix, v_prefix, k_new, v_new, mask, scale) -> float:
    """The checks of :func:`prefix_attention`'s arguments; returns ``scale`` as a float."""
    named = {"q": q, "k_prefix": k_prefix, "v_prefix": v_prefix, "k_new": k_new, "v_new": v_new, "mask": mask}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"prefix_attention: {name} must be a Tensor, got {type(t).__name__}")
        _backends.refuse_non_strided("prefix_attention", name, t)
    if q.dim() != 5:
        raise ValueError(f"prefix_attention: q must be 5-D (C, B, Rq, H, dh), got shape {tuple(q.shape)}")
    C, B, Rq, H, dh = q.shape
    if k_new.dim() != 5 or k_new.shape[:2] != (C, B) or k_new.shape[4] != dh:
        raise ValueError(
            f"prefix_attention: k_new has shape {tuple(k_new.shape)}; expected ({C}, {B}, Rk, Hkv, {dh}) after q's "
            f"{tuple(q.shape)}"
        )
    Rk, Hkv = k_new.shape[2], k_new.shape[3]
    if Hkv == 0 or H % Hkv:
        raise ValueError(
            f"prefix_attention: q has {H} heads and k_new {Hkv}; the query heads must be a positive multiple of the "
            "key/value heads"
        )
    if v_new.shape != k_new.shape:
        raise ValueError(
            f"prefix_attention: v_new has shape {tuple(v_new.shape)}; expected k_new's {tuple(k_new.shape)}"
        )
    if k_prefix.dim() != 4 or k_prefix.shape[0] != B or k_prefix.shape[2:] != (Hkv, dh):
        raise ValueError(
            f"prefix_attention: k_prefix has shape {tuple(k_prefix.shape)}; expected ({B}, P, {Hkv}, {dh})"
        )
    if v_prefix.shape != k_prefix.shape:
        raise ValueError(
            f"prefix_attention: v_prefix has shape {tuple(v_prefix.shape)}; expected k_prefix's "
            f"{tuple(k_prefix.shape)}"
        )
    Tk = k_prefix.shape[1] + Rk
    if mask.dtype != torch.bool or tuple(mask.shape) != (Rq, Tk):
        raise ValueError(
            f"prefix_attention: mask is {mask.dtype} of shape {tuple(mask.shape)}; expected a bool tensor of shape "
            f"({Rq}, {Tk}) (queries, shared keys + new keys)"
        )
    if not q.is_floating_point():
        raise ValueError(f"prefix_attention: q has dtype {q.dtype}; give a floating-point tensor")
    for name, t in named.items():
        if name != "mask" and t.dtype != q.dtype:
            raise ValueError(
                f"prefix_attention: {name} has dtype {t.dtype}, q has {q.dtype}; they must match"
            )
        if t.device != q.device:
            raise ValueError(f"prefix_attention: {name} is on {t.device}, q on {q.device}; they must match")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"prefix_attention: scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"prefix_attention: scale is {scale}; give a finite number")
    return float(scale)


def prefix_attention(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of many cells' queries over keys shared by every cell followed by each cell's own.

    ``z[c, b, r, h] = sum_j softmax_j(scale * q[c, b, r, h] . k_j) v_j`` over the keys ``j`` that ``mask[r, j]``
    leaves (True masks), where the first ``P`` keys and values are ``k_prefix[b, j, h // G]`` and
    ``v_prefix[b, j, h // G]`` for every cell ``c`` and the next ``Rk`` are the cell's own, ``k_new[c, b, j - P,
    h // G]``, ``G = H // Hkv`` (grouped-query attention: query head ``h`` reads key/value head ``h // G``). A query
    that may attend no key gets NaN, as softmax over only masked scores gives; with no keys at all, zeros. The scores
    are taken in the inputs' dtype.

    The C++ kernel (CPU tensors of float32 or float64) reads every operand in place (any strides, unit stride along
    ``dh``; other tensors are copied once) and makes the scores, the softmax and the mix per (example, key/value
    head) in one pass. On CUDA tensors the CUDA build registers the reference's arithmetic in ATen's ops (compiled,
    not run on the CPU-only machines measured); elsewhere (other dtypes, a CPU-only build), and whenever an input
    requires a gradient under grad mode, the reference: the kernels are not differentiable.

    Parameters
    ----------
    q : Tensor ``(C, B, Rq, H, dh)``
        The queries of ``C`` cells of ``B`` examples, ``Rq`` positions each.
    k_prefix, v_prefix : Tensor ``(B, P, Hkv, dh)``
        Keys and values of the first ``P`` positions, shared by every cell.
    k_new, v_new : Tensor ``(C, B, Rk, Hkv, dh)``
        Each cell's keys and values of the next ``Rk`` positions.
    mask : bool Tensor ``(Rq, P + Rk)``
        True where a query may not attend a key (the same for every cell, example and head).
    scale : float
        The scores' multiplier.
    backend : {"cpp", "cuda", "reference"}, optional
        Forces a backend (default: the C++ kernel on CPU tensors of float32 or float64, the CUDA registration on
        CUDA tensors where built, else the reference).

    Returns
    -------
    Tensor ``(C, B, Rq, H, dh)``, contiguous, of ``q``'s dtype.
    """
    scale = _check(q, k_prefix, v_prefix, k_new, v_new, mask, scale)
    args = (q, k_prefix, v_prefix, k_new, v_new)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    wrapped = not torch.compiler.is_compiling() and (
        any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in args) or _backends.has_tangent(*args)
    )
    if differentiable or wrapped or (torch.compiler.is_compiling() and backend is None):
        if backend not in (None, "reference"):
            raise ValueError(
                f"prefix_attention: backend={backend!r} is not differentiable and has no forward-AD or batching "
                "rule; the inputs require a gradient or are dual tensors; give backend=None"
            )
        return prefix_attention_reference(q, k_prefix, v_prefix, k_new, v_new, mask, scale).contiguous()
    name = _backends.choose_for_dtype(_OP, q, backend, _C_DTYPES, kernels=("cpp",), arg="q")
    if name in ("cpp", "cuda"):
        return _prefix_attention_c(q, k_prefix, v_prefix, k_new, v_new, mask, scale)
    return prefix_attention_reference(q, k_prefix, v_prefix, k_new, v_new, mask, scale).contiguous()
