"""The fused SGLD step.

For every tensor ``w`` with gradient ``g``, anchor ``w0`` (the trained weights ``w*``) and optional mask ``m``::

    w <- w + m * ( -(eps/2) * (nbeta * g + localization * (w - w0) + weight_decay * w) + sqrt(eps) * noise_scale * xi )

then, if ``bounding_box`` is given, ``w`` is clamped to ``w0 +- bounding_box``. Entries whose mask is 0 are left
exactly as they were (no drift, no noise, no clamp). ``g`` is the gradient of the *batch-mean* loss.

The noise ``xi`` is standard normal, drawn from a counter-based generator keyed by ``(seed, step, tensor index,
element index)``: Philox4x32-10 with Triton's constants, key = the 64-bit ``seed``, counter =
``(element // 4, tensor_index, step & 0xffffffff, step >> 32)``; the four 32-bit outputs become uniforms with
Triton's ``uint_to_uniform_float`` and normals by Box-Muller, element ``e`` taking normal ``e % 4``. The element
index is the position in row-major order of the tensor's shape, whatever its strides, so a non-contiguous view
gets the same noise as a contiguous copy. The same key gives the same noise on every call.

Streams across backends: ``reference`` (integer Philox in torch), ``cpp``, ``triton`` and ``cuda`` compute the
*same* Philox integers, so their noise agrees element by element up to the float rounding of ``log``, ``sqrt`` and
``cos`` in each backend's math library (measured max difference about 1e-6, see tests/test_sgld.py); they are
not bit-identical. Noise is drawn in float32 and cast for float64 tensors. The stream differs from
``torch.randn``'s, which matches the others only in distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _backends

_U32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 values held in int64 (exact: splits b into 16-bit halves)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t_hi = a * b_hi  # < 2^48
    t_lo = a * b_lo  # < 2^48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _U32
    return hi, lo


def philox_normals(numel: int, *, seed: int, tensor_index: int, step: int, device=None) -> torch.Tensor:
    """The noise ``xi`` of one tensor with ``numel`` elements, shape ``(numel,)``, float32 (reference form)."""
    n_ctr = (numel + 3) // 4
    c0 = torch.arange(n_ctr, dtype=torch.int64, device=device)
    c1 = torch.full_like(c0, tensor_index & _U32)
    c2 = torch.full_like(c0, step & _U32)
    c3 = torch.full_like(c0, (step >> 32) & _U32)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        hi2, lo2 = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_KEY_A) & _U32
        k1 = (k1 + _PHILOX_KEY_B) & _U32

    def uniform(x):
        s = torch.where(x >= 2**31, x - 2**32, x)  # as int32
        s = torch.where(s < 0, -s - 1, s)
        return s.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    u0 = torch.clamp_min(uniform(c0), 1.0e-7)
    u1 = uniform(c1)
    u2 = torch.clamp_min(uniform(c2), 1.0e-7)
    u3 = uniform(c3)
    two_pi = torch.tensor(6.283185307179586, dtype=torch.float32)
    r0 = torch.sqrt(-2.0 * torch.log(u0))
    r1 = torch.sqrt(-2.0 * torch.log(u2))
    t0, t1 = two_pi * u1, two_pi * u3
    out = torch.stack([r0 * torch.cos(t0), r0 * torch.sin(t0), r1 * torch.cos(t1), r1 * torch.sin(t1)], dim=1)
    return out.reshape(-1)[:numel]


def sgld_step_reference_(
    params,
    grads,
    anchors,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay=0.0,
    noise_scale=1.0,
    bounding_box=None,
    masks=None,
    seed,
    step,
) -> torch.Tensor:
    """Plain-torch specification of :func:`sgld_step_` (inputs already validated).

    Returns an int32 flag per tensor: 1 where that tensor's gradient held a NaN or Inf; such a tensor is left
    unchanged (the other backends leave only the non-finite entries unchanged).
    """
    flags = torch.zeros(len(params), dtype=torch.int32)
    half = 0.5 * step_size
    noise_std = math.sqrt(step_size) * noise_scale
    for t, (w, g, w0) in enumerate(zip(params, grads, anchors)):
        if w.numel() == 0:
            continue
        if not bool(torch.isfinite(g).all()):
            flags[t] = 1
            continue
        delta = -half * (nbeta * g + localization * (w - w0) + weight_decay * w)
        if noise_std != 0.0:
            xi = philox_normals(w.numel(), seed=seed, tensor_index=t, step=step, device=w.device)
            delta = delta + noise_std * xi.reshape(w.shape).to(w.dtype)
        m = None if masks is None else masks[t]
        new = w + (delta if m is None else m.to(w.dtype) * delta)
        if bounding_box is not None:
            new = torch.minimum(torch.maximum(new, w0 - bounding_box), w0 + bounding_box)
        if m is not None:
            new = torch.where(m.to(w.dtype) == 0, w, new)
        w.copy_(new)
    return flags


def _check_scalar(name: str, value, *, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if not positive and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _check_key(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _as_list(name: str, x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(x).__name__}")
    return list(x)


def _validate(params, grads, anchors, masks):
    params, grads, anchors = (
        _as_list("params", params),
        _as_list("grads", grads),
        _as_list("anchors", anchors),
    )
    if not (len(params) == len(grads) == len(anchors)):
        raise ValueError(
            f"params, grads and anchors must have the same length, got {len(params)}, {len(grads)}, {len(anchors)}"
        )
    if masks is not None:
        masks = _as_list("masks", masks)
        if len(masks) != len(params):
            raise ValueError(f"masks must have one entry (or None) per tensor: {len(masks)} != {len(params)}")
    device = params[0].device if params else torch.device("cpu")
    tensor, floats = torch.Tensor, (torch.float32, torch.float64)
    for i, (w, g, a) in enumerate(zip(params, grads, anchors)):
        # One cheap test per tensor; the detailed diagnosis runs only when it fails.
        if not (type(w) is tensor or isinstance(w, tensor)) or not (
            isinstance(g, tensor) and isinstance(a, tensor)
        ):
            for name, x in (("params", w), ("grads", g), ("anchors", a)):
                if not isinstance(x, tensor):
                    raise TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
        dt, shape = w.dtype, w.shape
        if not (
            dt in floats
            and g.dtype == dt
            and a.dtype == dt
            and g.shape == shape
            and a.shape == shape
            and w.device == device
            and g.device == device
            and a.device == device
        ):
            _diagnose(i, w, g, a, device)
        if masks is not None and masks[i] is not None:
            m = masks[i]
            if not isinstance(m, tensor):
                raise TypeError(f"masks[{i}] must be a tensor or None, got {type(m).__name__}")
            if m.shape != shape:
                raise ValueError(f"masks[{i}] has shape {tuple(m.shape)} but params[{i}] has {tuple(shape)}")
            if m.device != device:
                raise ValueError(f"masks[{i}] is on {m.device} but params are on {device}")
            if not (m.dtype == torch.bool or m.is_floating_point()):
                raise TypeError(f"masks[{i}] must be bool or floating point, got {m.dtype}")
    return params, grads, anchors, masks, device


def _diagnose(i, w, g, a, device):
    if w.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"params[{i}] has dtype {w.dtype}; supported are torch.float32 and torch.float64")
    for name, x in (("grads", g), ("anchors", a)):
        if x.shape != w.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but params[{i}] has {tuple(w.shape)}")
        if x.dtype != w.dtype:
            raise TypeError(f"{name}[{i}] has dtype {x.dtype} but params[{i}] has {w.dtype}")
    for name, x in (("params", w), ("grads", g), ("anchors", a)):
        if x.device != device:
            raise ValueError(f"{name}[{i}] is on {x.device} but params[0] is on {device}")
    raise AssertionError("unreachable")  # pragma: no cover


def _signed64(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


def sgld_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    *,
    step_size: float,
    nbeta: float,
    localization: float,
    weight_decay: float = 0.0,
    noise_scale: float = 1.0,
    bounding_box: float | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    seed: int,
    step: int,
    backend: str | None = None,
    check_finite: bool = True,
) -> None:
    """One SGLD step over lists of tensors, in place (see the module docstring for the update and the noise).

    Parameters
    ----------
    params, grads, anchors : list of Tensor
        Same length; tensor ``i`` of each has the same shape, dtype (float32 or float64) and device. ``params``
        are updated in place (any strides); ``anchors`` are the trained weights ``w*``.
    step_size : float
        ``eps`` > 0.
    nbeta : float
        Inverse temperature times the number of samples, ``n * beta`` >= 0.
    localization : float
        ``gamma`` >= 0, strength of the pull towards the anchors.
    weight_decay, noise_scale : float
        >= 0. ``noise_scale = 0`` gives a deterministic step.
    bounding_box : float or None
        Half-width > 0 of the box around the anchors that the result is clamped to.
    masks : list of (Tensor or None), optional
        Bool or float, same shape as the params; 0 freezes an entry (no drift, noise or clamp), other values
        scale its update.
    seed, step : int
        In [0, 2**64). With the tensor index and element index they key the noise.
    backend : {"cuda", "triton", "cpp", "reference"}, optional
        Force a backend (else ``PYPATTERN_BACKEND``, else the fastest available: see :func:`pypattern.backends`).
    check_finite : bool
        Raise ``FloatingPointError`` naming the tensor when a gradient held NaN or Inf. Entries with a non-finite
        gradient are never written, so the parameters stay finite either way.
    """
    params, grads, anchors, masks, device = _validate(params, grads, anchors, masks)
    step_size = _check_scalar("step_size", step_size, positive=True)
    nbeta = _check_scalar("nbeta", nbeta)
    localization = _check_scalar("localization", localization)
    weight_decay = _check_scalar("weight_decay", weight_decay)
    noise_scale = _check_scalar("noise_scale", noise_scale)
    if bounding_box is not None:
        bounding_box = _check_scalar("bounding_box", bounding_box, positive=True)
    seed, step = _check_key("seed", seed), _check_key("step", step)
    if not params:
        return
    sgld_step_unchecked_(
        params,
        grads,
        anchors,
        step_size=step_size,
        nbeta=nbeta,
        localization=localization,
        weight_decay=weight_decay,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        masks=masks,
        seed=seed,
        step=step,
        backend=backend,
        check_finite=check_finite,
    )


def sgld_step_unchecked_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    anchors: list[torch.Tensor],
    *,
    step_size: float,
    nbeta: float,
    localization: float,
    weight_decay: float = 0.0,
    noise_scale: float = 1.0,
    bounding_box: float | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    seed: int,
    step: int,
    backend: str | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """:func:`sgld_step_` without its argument validation (about 35 us of Python per call), for callers that
    validated the same tensors once (the SGLD optimizer and the batched chain runner do so on their first step).

    Returns the per-tensor int32 flags (1 = a non-finite gradient, whose entries were left unchanged); with
    ``check_finite`` it raises ``FloatingPointError`` instead, as :func:`sgld_step_` does.
    """
    if not params:
        return torch.zeros(0, dtype=torch.int32)
    name = _backends.choose("sgld_step_", params[0].device, backend)
    kw = dict(
        step_size=step_size,
        nbeta=nbeta,
        localization=localization,
        weight_decay=weight_decay,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        seed=seed,
        step=step,
    )
    if name == "reference":
        flags = sgld_step_reference_(params, grads, anchors, masks=masks, **kw)
    elif name == "triton":
        from pypattern.kernels.sgld import sgld_step_triton_

        flags = sgld_step_triton_(params, grads, anchors, masks=masks, **kw)
    else:  # cpp and cuda share one registered op; the dispatcher picks the kernel by device
        _backends._load_c()
        flags = torch.ops.pypattern.sgld_step_(
            params if isinstance(params, list) else list(params),
            grads if isinstance(grads, list) else list(grads),
            anchors if isinstance(anchors, list) else list(anchors),
            [] if masks is None else list(masks),
            float(step_size),
            float(nbeta),
            float(localization),
            float(weight_decay),
            float(noise_scale),
            None if bounding_box is None else float(bounding_box),
            _signed64(seed),
            _signed64(step),
        )
    if check_finite and bool(flags.any()):
        bad = torch.nonzero(flags.cpu()).flatten().tolist()
        shapes = ", ".join(f"grads[{i}] (shape {tuple(grads[i].shape)})" for i in bad)
        raise FloatingPointError(
            f"sgld_step_: non-finite gradient in {shapes} at step {step}; those entries were not updated. "
            "A diverging chain usually needs a smaller step_size or a larger localization."
        )
    return flags
