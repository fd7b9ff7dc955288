"""The public chunk update of the streaming cross-covariance: argument validation, then the backend chosen by
:mod:`pypattern._backends` (the maths is in :mod:`pypattern.ops.covariance`)."""

from __future__ import annotations

import math

import torch

from ... import _backends
from .reference import cross_covariance_update_reference_


def _covariance_update_c(shift_a, shift_b, mean_a, mean_b, comoment, m2_a, m2_b, a, b, count) -> None:
    """The registered ``torch.ops.pypattern.covariance_update_`` (csrc/covariance/): the dispatcher runs the C++
    kernel on CPU tensors and the CUDA kernels on CUDA tensors."""
    torch.ops.pypattern.covariance_update_(
        shift_a, shift_b, mean_a, mean_b, comoment, m2_a, m2_b, a, b, count
    )


_backends.register("covariance_update_", "reference", cross_covariance_update_reference_)
_backends.register(
    "covariance_update_", "triton", "pypattern.ops.covariance.triton:cross_covariance_update_triton_"
)
_backends.register("covariance_update_", ("cpp", "cuda"), _covariance_update_c)


def check_chunk(a, b, k: int, n: int, device) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    for name, x, cols in (("a", a, k), ("b", b, n)):
        _backends.refuse_non_strided("", name, x)
        if x.dim() != 2 or x.shape[1] != cols:
            raise ValueError(f"{name} must have shape (draws, {cols}), got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} has dtype {x.dtype}; supported are torch.float32 and torch.float64")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the accumulator is on {device}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold the same number of draws, got {a.shape[0]} and {b.shape[0]}")


def _check_state(name: str, t: torch.Tensor, shape: tuple, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    _backends.refuse_non_strided("", name, t)
    if t.dtype != torch.float64:
        raise TypeError(f"{name} must be float64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the accumulator is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.is_neg():
        raise ValueError(
            f"{name} is a negative view (torch applies its negation lazily, is_neg() is True: the imaginary part "
            "of a conjugated complex tensor); the update writes its memory directly; give a tensor without it "
            "(.resolve_neg() makes one)"
        )


def cross_covariance_update_(
    shift_a: torch.Tensor,
    shift_b: torch.Tensor,
    mean_a: torch.Tensor,
    mean_b: torch.Tensor,
    comoment: torch.Tensor,
    m2_a: torch.Tensor,
    m2_b: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    count: int,
    backend: str | None = None,
) -> None:
    """Add one chunk of draws to an accumulator's state, in place (see :mod:`pypattern.ops.covariance`).

    Parameters
    ----------
    shift_a, mean_a : Tensor, shape ``(K,)``, float64
    shift_b, mean_b : Tensor, shape ``(N,)``, float64
        Set from the chunk when ``count == 0`` (the shifts are then written, so they may share memory with no other
        argument; later they are only read).
    comoment : Tensor, shape ``(K, N)``, float64
    m2_a, m2_b : Tensor, float64
        Auto co-moments: shape ``(0,)`` (not tracked), ``(K,)``/``(N,)`` (diagonal) or ``(K, K)``/``(N, N)``.
    a : Tensor, shape ``(m, K)``
    b : Tensor, shape ``(m, N)``
        The chunk: float32 or float64, any strides, on the accumulator's device; ``m`` may be 0.
    count : int
        Number of draws already accumulated (the caller adds ``m`` to it).
    backend : {"cuda", "triton", "cpp", "reference"}, optional
        Force a backend (else ``PYPATTERN_BACKEND``, else the fastest available).
    """
    if not isinstance(comoment, torch.Tensor) or comoment.dim() != 2:
        raise ValueError(f"comoment must be a 2-D tensor (K, N), got {getattr(comoment, 'shape', comoment)}")
    device = comoment.device
    if device.type == "meta" or any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in (a, b)):
        raise ValueError(
            "the covariance state or the chunk is on the meta device: an update reads and writes their values; "
            "give tensors with data"
        )
    k, n = comoment.shape
    check_chunk(a, b, k, n, device)
    _check_state("comoment", comoment, (k, n), device)
    for name, t, d in (
        ("shift_a", shift_a, k),
        ("mean_a", mean_a, k),
        ("shift_b", shift_b, n),
        ("mean_b", mean_b, n),
    ):
        _check_state(name, t, (d,), device)
    for name, t, d in (("m2_a", m2_a, k), ("m2_b", m2_b, n)):
        if tuple(t.shape) not in ((0,), (d,), (d, d)):
            raise ValueError(f"{name} must have shape (0,), ({d},) or ({d}, {d}), got {tuple(t.shape)}")
        _check_state(name, t, tuple(t.shape), device)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < 2**63:
        raise ValueError(
            f"count must be an int in 0 .. 2**63 - 1 (the draws accumulated so far), got {count!r}"
        )
    # the kernels keep the new count in an int64, which would wrap to negative
    if count + a.shape[0] >= 2**63:
        raise ValueError(
            f"count + the chunk's {a.shape[0]} draws is {count + a.shape[0]}, past 2**63 - 1 (the draws an "
            f"accumulator can count); got count={count}"
        )
    # the shifts are set from the chunk's mean when count == 0, and only read after that
    shifts = (("shift_a", shift_a), ("shift_b", shift_b))
    written = (
        ("comoment", comoment),
        ("mean_a", mean_a),
        ("mean_b", mean_b),
        ("m2_a", m2_a),
        ("m2_b", m2_b),
        *(shifts if count == 0 else ()),
    )
    # every backend writes the state in place: one that takes gradients, or an inference tensor outside inference
    # mode, is refused by name (the kernels write through raw pointers, past torch's own checks)
    grad_mode, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    for name, t in written:
        if grad_mode and t.requires_grad:
            raise RuntimeError(
                f"{name} requires grad and grad mode is on: the update writes it in place, which would corrupt "
                "autograd; give a state that does not require grad, or update under torch.no_grad()"
            )
        if not inference and t.is_inference():
            raise RuntimeError(
                f"{name} is an inference tensor (made under torch.inference_mode()) and the update writes it in "
                "place outside inference mode, which torch forbids; update inside torch.inference_mode(), or give "
                "a normal tensor (.clone() it outside inference mode)"
            )
    _refuse_aliases(written=written, read=(*(() if count == 0 else shifts), ("a", a), ("b", b)))
    if a.shape[0] == 0:
        return
    # a negative view (``z.conj().imag``) holds its values negated in memory, which the Triton kernel reads as
    # they are: the chunk is taken as its values (a copy only for such a view)
    a, b = a.resolve_neg(), b.resolve_neg()
    impl = _backends.dispatch("covariance_update_", device, backend)
    impl(shift_a, shift_b, mean_a, mean_b, comoment, m2_a, m2_b, a, b, count)
    if impl is _covariance_update_c and device.type == "cpu":
        _nan_where_the_means_are_not_finite_(mean_a, mean_b, comoment, m2_a, m2_b)


def _nan_where_the_means_are_not_finite_(mean_a, mean_b, comoment, m2_a, m2_b) -> None:
    """NaN in every co-moment entry of a column whose running mean is inf or NaN (a draw of it held inf or NaN),
    as the reference gives: its centred draws hold ``inf - inf``. The C++ kernel (csrc/covariance/
    covariance_cpu.cpp) subtracts the running mean, not the chunk's, and adds the Chan correction as a separate
    rank-one term, so such an entry can come out as +-inf instead. O(K + N) when every mean is finite."""
    bad_a, bad_b = ~torch.isfinite(mean_a), ~torch.isfinite(mean_b)
    if not (bool(bad_a.any()) or bool(bad_b.any())):
        return
    comoment[bad_a] = math.nan
    comoment[:, bad_b] = math.nan
    for m2, bad in ((m2_a, bad_a), (m2_b, bad_b)):
        if m2.numel() == 0:
            continue
        m2[bad] = math.nan
        if m2.dim() == 2:
            m2[:, bad] = math.nan


def _refuse_aliases(written, read) -> None:
    """No state tensor the update writes shares memory with another one or with a tensor it reads (the update
    would read values it is overwriting: a mean that is its own shift, a comoment inside a chunk)."""
    from ..sgld.op import overlapping_pairs, shares

    named = list(written) + list(read)
    for j, i, status in overlapping_pairs([t for _, t in named]):
        if j < len(written):  # j < i: a written tensor whenever either is
            raise ValueError(
                f"{named[j][0]} {shares(status)} with {named[i][0]}: the update would read values it is "
                "overwriting; give each state tensor its own memory"
            )
