"""The public per-sample gradient Gram kernels: argument validation, then (for the pairwise contraction) the
backend chosen by :mod:`pypattern._backends`. The maths is in :mod:`pypattern.ops.grad_gram`."""

from __future__ import annotations

import math
import numbers

import torch

from ... import _backends
from .reference import grad_gram_pairwise_reference


def _grad_gram_pairwise_c(x, y, ids, batch) -> torch.Tensor:
    """The registered ``torch.ops.pypattern.grad_gram_pairwise`` (csrc/grad_gram/): the dispatcher runs the C++
    kernel on CPU tensors and the CUDA kernel on CUDA tensors."""
    # the kernels register no autograd formula: their result is a value (a gradient through the contraction is
    # the reference's, chosen automatically when one is wanted)
    xx = x.detach().contiguous() if ids is None else y.new_zeros(0, 0)
    return torch.ops.pypattern.grad_gram_pairwise(xx, y.detach().contiguous(), ids, batch)


def _fake_grad_gram_pairwise(x, y, ids, batch) -> torch.Tensor:
    return y.new_empty(batch, batch, dtype=torch.float64)


# the C++ op's fake implementation, so that torch.compile and meta tensors can trace through it
_backends.register_fake("pypattern::grad_gram_pairwise", _fake_grad_gram_pairwise)

_backends.register("grad_gram_pairwise", "reference", grad_gram_pairwise_reference)
_backends.register("grad_gram_pairwise", "triton", "pypattern.ops.grad_gram.triton:grad_gram_pairwise_triton")
_backends.register("grad_gram_pairwise", ("cpp", "cuda"), _grad_gram_pairwise_c)


def _check_pairwise(x, y, ids, batch):
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError(f"y must be a 2-D tensor (B*T, q), got {getattr(y, 'shape', y)}")
    _backends.refuse_non_strided("grad_gram_pairwise", "y", y)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    if (batch == 0 and y.shape[0] != 0) or (batch > 0 and y.shape[0] % batch != 0):
        raise ValueError(f"y has {y.shape[0]} rows, not a multiple of batch={batch}")
    if y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"y has dtype {y.dtype}; supported are torch.float32 and torch.float64")
    if ids is None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x must be a 2-D tensor with {y.shape[0]} rows, got {getattr(x, 'shape', x)}")
        _backends.refuse_non_strided("grad_gram_pairwise", "x", x)
        if x.dtype != y.dtype:
            raise TypeError(f"x has dtype {x.dtype} but y has {y.dtype}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
    else:
        if not isinstance(ids, torch.Tensor) or ids.shape != (y.shape[0],) or ids.dtype != torch.int64:
            raise ValueError(
                f"ids must be an int64 tensor of shape ({y.shape[0]},), got "
                f"{getattr(ids, 'dtype', None)} {tuple(getattr(ids, 'shape', ()))}"
            )
        _backends.refuse_non_strided("grad_gram_pairwise", "ids", ids)
        if ids.device != y.device:
            raise ValueError(f"ids is on {ids.device} but y is on {y.device}")


def grad_gram_pairwise(
    x: torch.Tensor | None,
    y: torch.Tensor,
    ids: torch.Tensor | None = None,
    *,
    batch: int,
    backend: str | None = None,
) -> torch.Tensor:
    """The pairwise contraction ``G_ij = sum_{s,t} K[is, jt] (y_is . y_jt)``, shape ``(batch, batch)``, float64.

    Parameters
    ----------
    x : Tensor, shape ``(B*T, p)``, or None
        Rows grouped by sample (rows ``i*T .. i*T+T-1`` belong to sample ``i``); ``K = x x^T``. Ignored when
        ``ids`` is given.
    y : Tensor, shape ``(B*T, q)``
        float32 or float64, same dtype as ``x``.
    ids : Tensor, shape ``(B*T,)``, int64, optional
        Then ``K[r, c] = 1`` where ``ids[r] == ids[c] >= 0`` (negative ids never match: padding).
    batch : int
        ``B``.
    backend : {"cuda", "triton", "cpp", "reference"}, optional
        Force a backend (else ``PYPATTERN_BACKEND``, else the fastest available). Only the reference is
        differentiable: when grad mode is on and ``x`` or ``y`` requires grad, the automatic choice is the
        reference; a forced kernel returns a value without a gradient.
    """
    _check_pairwise(x, y, ids, batch)
    if batch == 0:
        return torch.zeros(0, 0, dtype=torch.float64, device=y.device)
    wants_grad = torch.is_grad_enabled() and (y.requires_grad or (ids is None and x.requires_grad))
    if wants_grad and backend is None and _backends._forced(None)[0] is None:
        backend = "reference"
    g = _backends.dispatch("grad_gram_pairwise", y.device, backend)(x, y, ids, batch)
    # the kernels take the products in the inputs' dtype: a float32 product can overflow where float64 would not
    _refuse_overflow("grad_gram_pairwise", g, *([y] if ids is not None else [x, y]))
    return g


def _as_btd(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (B, d) or (B, ..., d), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def choose_method(batch: int, positions: int, d_in: int, d_out: int) -> str:
    """``"pairwise"`` or ``"outer"``, whichever needs fewer multiply-adds (see :mod:`pypattern.ops.grad_gram`)."""
    pairwise = batch * batch * positions * positions * (d_in + d_out)
    outer = batch * positions * d_in * d_out + batch * batch * d_in * d_out
    return "pairwise" if pairwise <= outer else "outer"


def _sym_gram_add_(g: torch.Tensor, w: torch.Tensor, block: int = 128) -> None:
    """``g += w w^T`` (float64 ``g``), computing only the blocks on and above the diagonal (about 60% of the
    multiply-adds of one GEMM at B = 512)."""
    b = w.shape[0]
    for i0 in range(0, b, block):
        wi = w[i0 : i0 + block]
        for j0 in range(i0, b, block):
            blk = (wi @ w[j0 : j0 + block].T).to(torch.float64)
            g[i0 : i0 + block, j0 : j0 + block] += blk
            if j0 != i0:
                g[j0 : j0 + block, i0 : i0 + block] += blk.T


def grad_gram_dense(g: torch.Tensor) -> torch.Tensor:
    """Gram ``g g^T`` of per-sample gradients given as rows, ``(B, P)`` -> ``(B, B)`` float64.

    Block products in the input dtype, summed in float64; only the blocks on and above the diagonal are computed.
    Finite inputs below float64 whose products overflow that dtype raise ``FloatingPointError`` (as the other
    Gram kernels do) instead of returning inf.
    """
    if not isinstance(g, torch.Tensor) or g.dim() != 2:
        raise ValueError(f"g must be a 2-D tensor (B, P), got {getattr(g, 'shape', g)}")
    if not g.is_floating_point():  # integer products would wrap around
        raise TypeError(f"g must be a floating-point tensor, got {g.dtype}")
    out = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64, device=g.device)
    _sym_gram_add_(out, g)
    _refuse_overflow("grad_gram_dense", out, g)
    return out


def _check_max_bytes(op: str, max_bytes) -> int:
    """``max_bytes`` as an int number of bytes: a finite real number (an int, a float, a numpy scalar) of at least 1;
    a bool, a string or another type is a TypeError, 0, a negative, NaN or infinity a ValueError."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Real):
        raise TypeError(
            f"{op}: max_bytes must be a number of bytes (an int >= 1), got {max_bytes!r} "
            f"({type(max_bytes).__name__})"
        )
    if not math.isfinite(max_bytes) or max_bytes < 1:
        raise ValueError(f"{op}: max_bytes must be a finite number of bytes >= 1, got {max_bytes!r}")
    return int(max_bytes)


def _outer_gram(a: torch.Tensor, d: torch.Tensor, max_bytes: int) -> torch.Tensor:
    b, _, d_in = a.shape
    d_out = d.shape[2]
    per_feature = max(1, b * d_out * a.element_size())
    step = max(1, min(d_in, max_bytes // per_feature))
    g = torch.zeros(b, b, dtype=torch.float64, device=a.device)
    if b == 0:
        return g
    for p0 in range(0, d_in, step):
        w = torch.bmm(a[:, :, p0 : p0 + step].transpose(1, 2), d).reshape(b, -1)
        _sym_gram_add_(g, w)
    return g


def grad_gram_linear(
    a: torch.Tensor,
    d: torch.Tensor,
    *,
    bias: bool = True,
    weight: bool = True,
    method: str = "auto",
    max_bytes: int = 32 * 2**20,
    backend: str | None = None,
) -> torch.Tensor:
    """Gram of the per-sample gradients of one ``nn.Linear`` from its inputs and output gradients.

    Parameters
    ----------
    a : Tensor, shape ``(B, d_in)`` or ``(B, ..., d_in)``
        Layer inputs (middle dimensions are positions ``T``).
    d : Tensor, shape ``(B, d_out)`` or ``(B, ..., d_out)``
        Gradients of ``sum_i l_i`` with respect to the layer outputs, same middle dimensions as ``a``.
    bias, weight : bool
        Include the bias / weight gradient.
    method : {"auto", "pairwise", "outer"}
        See :mod:`pypattern.ops.grad_gram`; ``"auto"`` picks the one with fewer multiply-adds.
    max_bytes : int
        Workspace cap of ``"outer"`` in bytes (it processes slices of the input features; at least one feature
        per slice): a finite number >= 1 (a float is rounded down).
    backend : str, optional
        Backend of the pairwise contraction.

    Returns
    -------
    Tensor, shape ``(B, B)``, float64 (products in the input dtype, sums in float64).
    """
    a3, d3 = _as_btd("a", a), _as_btd("d", d)
    max_bytes = _check_max_bytes("grad_gram_linear", max_bytes)
    if a.shape[:-1] != d.shape[:-1]:
        raise ValueError(
            f"a and d must agree in batch and positions, got {tuple(a.shape)} and {tuple(d.shape)}"
        )
    if method not in ("auto", "pairwise", "outer"):
        raise ValueError(f"method must be 'auto', 'pairwise' or 'outer', got {method!r}")
    for name, x in (("a", a3), ("d", d3)):
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} has dtype {x.dtype}; supported are torch.float32 and torch.float64")
    if a3.dtype != d3.dtype:
        raise TypeError(f"a has dtype {a3.dtype} but d has {d3.dtype}; give both in one dtype")
    if a3.device != d3.device:
        raise ValueError(f"a is on {a3.device} but d is on {d3.device}; give both on one device")
    b, t, d_in = a3.shape
    g = torch.zeros(b, b, dtype=torch.float64, device=a3.device)
    if weight:
        if method == "auto":
            method = choose_method(b, t, d_in, d3.shape[2])
        if method == "pairwise":
            x = a3.reshape(b * t, d_in)
            if bias:  # fold the bias in: (x . x' + 1)(y . y') summed over positions is exactly its Gram term
                x = torch.cat([x, x.new_ones(b * t, 1)], 1)
            return g + grad_gram_pairwise(x, d3.reshape(b * t, d3.shape[2]), batch=b, backend=backend)
        g += _outer_gram(a3, d3, max_bytes)
    if bias:
        s = d3.sum(1, dtype=torch.float64)
        g += s @ s.T
    _refuse_overflow("grad_gram_linear", g, a3, d3)
    return g


def _refuse_overflow(op: str, g: torch.Tensor, *inputs: torch.Tensor) -> None:
    """A Gram that is not finite from finite inputs below float64: its products, taken in the inputs' dtype,
    overflowed (where float64 would not): refused, as :func:`grad_gram_pairwise` does."""
    if all(t.dtype == torch.float64 for t in inputs) or g.device.type == "meta":  # meta: no values to check
        return
    if bool(torch.isfinite(g).all()):
        return
    if all(bool(torch.isfinite(t).all()) for t in inputs):
        big = ", ".join(f"{float(t.abs().max()):.3g}" for t in inputs if t.numel())
        raise FloatingPointError(
            f"{op}: the {inputs[-1].dtype} products overflow (largest magnitudes {big}); give float64 inputs"
        )


def grad_gram_embedding(
    ids: torch.Tensor,
    d: torch.Tensor,
    *,
    padding_idx: int | None = None,
    method: str = "auto",
    max_bytes: int = 32 * 2**20,
    backend: str | None = None,
) -> torch.Tensor:
    """Gram of the per-sample gradients of one ``nn.Embedding`` from its token ids and output gradients.

    Parameters
    ----------
    ids : Tensor, shape ``(B,)`` or ``(B, ...)``, integer
    d : Tensor, shape ``(B, ..., dim)``
        Gradients of ``sum_i l_i`` with respect to the embedding outputs.
    padding_idx : int, optional
        Positions holding this id carry no gradient (as in ``nn.Embedding``).
    method : {"auto", "pairwise", "outer"}
        ``"pairwise"``: ``B^2 T^2 dim`` multiply-adds (the kernels). ``"outer"``: scatter the per-sample gradients
        of the ``V`` distinct ids of the batch, ``(B, V, dim)`` in slices of at most ``max_bytes``, and take their
        Gram (``B^2 V dim``). ``"auto"`` takes the one with fewer multiply-adds (``V`` against ``T^2``).
    max_bytes : int
        Workspace cap of ``"outer"`` in bytes (at least one id per slice): a finite number >= 1 (a float is rounded
        down).
    backend : str, optional
        Backend of the pairwise contraction (``"pairwise"``; see :func:`grad_gram_pairwise`).

    Returns
    -------
    Tensor, shape ``(B, B)``, float64.
    """
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dtype.is_floating_point
        or ids.dtype.is_complex
        or ids.dtype == torch.bool
        or ids.dim() < 1
    ):
        raise TypeError(f"ids must be an integer tensor of shape (B, ...), got {getattr(ids, 'dtype', ids)}")
    if method not in ("auto", "pairwise", "outer"):
        raise ValueError(f"method must be 'auto', 'pairwise' or 'outer', got {method!r}")
    max_bytes = _check_max_bytes("grad_gram_embedding", max_bytes)
    b = ids.shape[0]
    t = math.prod(ids.shape[1:])
    flat = ids.reshape(b, t)
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"d must be a tensor of shape ids.shape + (dim,), got {type(d).__name__}")
    if ids.device != d.device:
        raise ValueError(f"ids is on {ids.device} but d is on {d.device}; give both on one device")
    if ids.device.type == "meta":  # the ids' values decide which positions pair up
        raise ValueError(
            "ids and d are on the meta device: the Gram reads the ids' values (which positions share a token); "
            "give tensors with data"
        )
    if d.dim() < 2 or d.shape[:-1] != ids.shape:
        raise ValueError(
            f"d must have shape ids.shape + (dim,) = {tuple(ids.shape)} + (dim,), got {tuple(d.shape)}"
        )
    if d.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"d has dtype {d.dtype}; supported are torch.float32 and torch.float64")
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError(
            f"ids must be token ids >= 0, got {int(flat.min())} (padding is given by padding_idx)"
        )
    dim = d.shape[-1]
    d3 = d.reshape(b, t, dim)
    r = flat.reshape(-1).to(torch.int64)
    if padding_idx is not None:
        if (
            isinstance(padding_idx, bool)
            or not isinstance(padding_idx, numbers.Integral)
            or not 0 <= padding_idx < 2**63
        ):
            raise ValueError(
                f"padding_idx={padding_idx!r} is not valid; give a token id (an int >= 0) or None"
            )
        r = torch.where(r == int(padding_idx), torch.full_like(r, -1), r)
    if method == "auto" or method == "outer":
        uniq, inv = torch.unique(r, return_inverse=True)
        n_valid = int((uniq >= 0).sum())
        if method == "auto":
            method = "outer" if n_valid <= 2 * t * t else "pairwise"
    if method == "pairwise":
        return grad_gram_pairwise(None, d3.reshape(b * t, dim), r, batch=b, backend=backend)
    # outer: column v of the compressed vocabulary; padding (-1) sorts first in uniq
    offset = uniq.numel() - n_valid
    col = (inv - offset).reshape(b, t)  # -1 for padding
    g = torch.zeros(b, b, dtype=torch.float64, device=d.device)
    step = max(1, max_bytes // max(1, b * dim * d.element_size()))
    for v0 in range(0, n_valid, step):
        v1 = min(n_valid, v0 + step)
        inside = (col >= v0) & (col < v1)
        idx = torch.where(inside, col - v0, torch.full_like(col, v1 - v0))  # outside -> a dump row
        w = torch.zeros(b, v1 - v0 + 1, dim, dtype=d.dtype, device=d.device)
        w.scatter_add_(1, idx.unsqueeze(-1).expand(b, t, dim), d3)
        _sym_gram_add_(g, w[:, : v1 - v0].reshape(b, -1))
    _refuse_overflow("grad_gram_embedding", g, d)
    return g


def center_gram(g: torch.Tensor) -> torch.Tensor:
    """``H G H`` with ``H = I - 11^T / B``: the Gram of the centred per-sample gradients, ``(B, B)``."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor (a square Gram matrix), got {type(g).__name__}")
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g must be a square Gram matrix (B, B), got {tuple(g.shape)}")
    if not (g.is_floating_point() or g.is_complex()):
        raise TypeError(f"g has dtype {g.dtype}; give a floating-point Gram matrix")
    return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
