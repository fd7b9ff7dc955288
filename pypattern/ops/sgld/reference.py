"""The plain-torch specification of the fused SGLD step and of its noise stream (see :mod:`pypattern.ops.sgld`).

Written for clarity, not speed: the integer Philox rounds run in int64 tensors, one tensor at a time.
"""

from __future__ import annotations

import math
import numbers

import torch

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
    """The noise ``xi`` of one tensor with ``numel`` elements, shape ``(numel,)``, float32 (reference form).
    ``numel`` >= 0; ``seed`` and ``step`` integers in [0, 2**64), ``tensor_index`` in [0, 2**32) (the widths of
    Philox's key and counter words: a larger value would alias another stream)."""
    checks = (
        ("numel", numel, None),
        ("seed", seed, 64),
        ("tensor_index", tensor_index, 32),
        ("step", step, 64),
    )
    for name, v, bits in checks:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 or (bits and v >= 2**bits):
            valid = "an integer >= 0" if bits is None else f"an integer in [0, 2**{bits})"
            raise ValueError(f"philox_normals: {name} must be {valid}, got {v!r}")
    numel, seed, tensor_index, step = int(numel), int(seed), int(tensor_index), int(step)
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

    Returns an int32 flag per tensor, OR-ed over its entries: 1 where a gradient held a NaN or Inf, 2 where a
    finite gradient gave a non-finite new value (tested before the bounding box clamp). Those entries are left
    unchanged; every other entry is updated.
    """
    flags = torch.zeros(len(params), dtype=torch.int32)
    # The coefficients are folded as the kernels fold them (eps/2 * nbeta, ...), so that the same updates overflow.
    c_grad, c_loc, c_wd = (
        0.5 * step_size * nbeta,
        0.5 * step_size * localization,
        0.5 * step_size * weight_decay,
    )
    noise_std = math.sqrt(step_size) * noise_scale
    for t, (w, g, w0) in enumerate(zip(params, grads, anchors)):
        if w.numel() == 0:
            continue
        bad = ~torch.isfinite(g)
        delta = -(c_grad * g + c_loc * (w - w0) + c_wd * w)
        if noise_std != 0.0:
            xi = philox_normals(w.numel(), seed=seed, tensor_index=t, step=step, device=w.device)
            delta = delta + noise_std * xi.reshape(w.shape).to(w.dtype)
        m = None if masks is None or masks[t] is None else masks[t].to(w.dtype)
        new = w + (delta if m is None else m * delta)
        frozen = torch.zeros_like(bad) if m is None else m == 0
        over = ~torch.isfinite(new) & ~bad & ~frozen
        flags[t] = int(bool(bad.any())) | 2 * int(bool(over.any()))
        if bounding_box is not None:
            new = torch.minimum(torch.maximum(new, w0 - bounding_box), w0 + bounding_box)
        w.copy_(torch.where(bad | over | frozen, w, new))
    return flags


def each_chain(step_fn, params, grads, anchors, *, seeds, **kw) -> torch.Tensor:
    """``step_fn`` (a one-chain step, :func:`sgld_step_reference_`'s arguments) on each chain's rows: row ``c`` of
    ``params`` and ``grads`` with seed ``seeds[c]``, the shared ``anchors`` and ``kw``. Returns the ``(C,
    len(params))`` int32 flags on the CPU."""
    flags = torch.zeros((len(seeds), len(params)), dtype=torch.int32)
    for c, seed in enumerate(seeds):
        flags[c] = step_fn([p[c] for p in params], [g[c] for g in grads], anchors, seed=seed, **kw)
    return flags


def sgld_chains_step_reference_(
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
    seeds,
    step,
) -> torch.Tensor:
    """Plain-torch specification of :func:`pypattern.ops.sgld.op.sgld_chains_step_` (inputs already validated):
    chain ``c`` is :func:`sgld_step_reference_` on rows ``c`` of ``params`` and ``grads`` with seed ``seeds[c]``.
    Returns the ``(C, len(params))`` int32 flags."""
    return each_chain(
        sgld_step_reference_,
        params,
        grads,
        anchors,
        seeds=seeds,
        step_size=step_size,
        nbeta=nbeta,
        localization=localization,
        weight_decay=weight_decay,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        masks=masks,
        step=step,
    )
