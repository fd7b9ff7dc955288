"""Triton kernel of the fused RMSprop-preconditioned SGLD step (see :mod:`pypattern.ops.rmsprop_sgld`).

Imported only when the ``triton`` backend runs. One launch per tensor; each program updates ``BLOCK`` consecutive
elements and their running mean ``V``; the noise is the SGLD stream.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._triton_launch import launch_guard
from ..sgld.triton import NOISE_KEY_ARGS, as_i32, flag_bits, nonfinite, philox_normal


@triton.jit(do_not_specialize=NOISE_KEY_ARGS)
def _rmsprop_sgld_kernel(
    w_ptr,
    v_ptr,
    g_ptr,
    a_ptr,
    m_ptr,
    coef_ptr,
    flag_ptr,
    n,
    seed,
    tensor_index,
    step_lo,
    step_hi,
    HAS_MASK: tl.constexpr,
    HAS_BOX: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    v = tl.load(v_ptr + offs, mask=valid, other=0.0)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    a = tl.load(a_ptr + offs, mask=valid, other=0.0)
    c_half = tl.load(coef_ptr + 0).to(w.dtype)
    c_nbeta = tl.load(coef_ptr + 1).to(w.dtype)
    c_loc = tl.load(coef_ptr + 2).to(w.dtype)
    c_wd = tl.load(coef_ptr + 3).to(w.dtype)
    c_alpha = tl.load(coef_ptr + 4).to(w.dtype)
    c_rms_eps = tl.load(coef_ptr + 5).to(w.dtype)
    c_noise = tl.load(coef_ptr + 6).to(w.dtype)
    # 1 - alpha formed in float64 on the host, then cast: in float32 after the cast, alpha = 0.9999 would give a
    # (1 - alpha) off by 1e-4 relative (as the reference, C++ and CUDA kernels do)
    c_one_minus_alpha = tl.load(coef_ptr + 8).to(w.dtype)
    vn = c_alpha * v + c_one_minus_alpha * g * g
    precond = 1.0 / (tl.sqrt(vn) + c_rms_eps)
    delta = -c_half * precond * (c_nbeta * g + c_loc * (w - a) + c_wd * w)
    if HAS_NOISE:
        xi = philox_normal(offs, seed, tensor_index, step_lo, step_hi)
        delta = delta + c_noise * tl.sqrt(precond) * xi.to(w.dtype)
    bad = nonfinite(g)
    active = valid
    if HAS_MASK:
        m = tl.load(m_ptr + offs, mask=valid, other=0.0).to(w.dtype)
        new = w + m * delta
        active = active & (m != 0)
    else:
        new = w + delta
    # a finite gradient whose new weight or V is not finite (tested before the box, which would hide an inf)
    over = (nonfinite(new) | nonfinite(vn)) & (tl.abs(g) < float("inf")) & active
    if HAS_BOX:
        box = tl.load(coef_ptr + 7).to(w.dtype)
        new = tl.minimum(tl.maximum(new, a - box), a + box)
    keep = bad | over
    if HAS_MASK:
        keep = keep | (m == 0)
    tl.store(w_ptr + offs, tl.where(keep, w, new), mask=valid)
    tl.store(v_ptr + offs, tl.where(keep, v, vn), mask=valid)
    tl.atomic_or(flag_ptr, flag_bits(bad & valid, over))


def rmsprop_sgld_step_triton_(
    params,
    grads,
    anchors,
    square_avgs,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay,
    alpha,
    eps,
    noise_scale,
    bounding_box,
    masks,
    seed,
    step,
    block: int | None = None,
) -> torch.Tensor:
    """Launch the kernel once per tensor (inputs validated by
    :func:`pypattern.ops.rmsprop_sgld.rmsprop_sgld_step_`). Returns the int32 flags per tensor (as the op's), on
    the CPU."""
    if not params:
        return torch.zeros(0, dtype=torch.int32)
    device = params[0].device
    with launch_guard(device):
        noise_std = math.sqrt(step_size) * noise_scale
        coefs = torch.tensor(
            [
                0.5 * step_size,
                nbeta,
                localization,
                weight_decay,
                alpha,
                eps,
                noise_std,
                bounding_box or 0.0,
                1.0 - alpha,
            ],
            dtype=torch.float64,
            device=device,
        )
        flags = torch.zeros(len(params), dtype=torch.int32, device=device)
        seed_arg = seed - 2**64 if seed >= 2**63 else seed
        for t, (p, v) in enumerate(zip(params, square_avgs)):
            n = p.numel()
            if n == 0:
                continue
            w = p if p.is_contiguous() else p.contiguous()
            vc = v if v.is_contiguous() else v.contiguous()
            m = None if masks is None else masks[t]
            mc = m.to(p.dtype).contiguous() if m is not None else w  # dummy pointer when there is no mask
            blk = block or (65536 if device.type == "cpu" else 1024)
            blk = min(blk, triton.next_power_of_2(n))
            _rmsprop_sgld_kernel[(triton.cdiv(n, blk),)](
                w,
                vc,
                grads[t].contiguous(),
                anchors[t].contiguous(),
                mc,
                coefs,
                flags[t:],
                n,
                seed_arg,
                as_i32(t),
                as_i32(step),
                as_i32(step >> 32),
                HAS_MASK=m is not None,
                HAS_BOX=bounding_box is not None,
                HAS_NOISE=noise_std != 0.0,
                BLOCK=blk,
            )
            if w is not p:
                p.copy_(w)
            if vc is not v:
                v.copy_(vc)
        return flags.cpu()
