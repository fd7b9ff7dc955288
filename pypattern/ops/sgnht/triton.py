"""Triton kernel of the fused SGNHT step (see :mod:`pypattern.ops.sgnht` for the update and the thermostat).

Imported only when the ``triton`` backend runs. One launch per tensor; each program updates ``BLOCK`` consecutive
elements and writes its float64 sum of ``p**2`` and its count of active entries to a buffer of partial sums;
phase two adds the partial sums up (``torch.sum`` on the device, no host sync) and updates the thermostat.
The noise is the SGLD stream (``philox_normal`` of :mod:`pypattern.ops.sgld.triton`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._triton_launch import launch_guard
from ..sgld.triton import NOISE_KEY_ARGS, as_i32, flag_bits, nonfinite, philox_normal


@triton.jit(do_not_specialize=NOISE_KEY_ARGS)
def _sgnht_kernel(
    w_ptr,
    p_ptr,
    g_ptr,
    a_ptr,
    m_ptr,
    coef_ptr,
    xi_ptr,
    part_ptr,
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
    p = tl.load(p_ptr + offs, mask=valid, other=0.0)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    a = tl.load(a_ptr + offs, mask=valid, other=0.0)
    c_eps = tl.load(coef_ptr + 0).to(w.dtype)
    c_nbeta = tl.load(coef_ptr + 1).to(w.dtype)
    c_loc = tl.load(coef_ptr + 2).to(w.dtype)
    c_wd = tl.load(coef_ptr + 3).to(w.dtype)
    c_noise = tl.load(coef_ptr + 4).to(w.dtype)
    xi = tl.load(xi_ptr).to(w.dtype)
    dp = -xi * p - c_eps * (c_nbeta * g + c_loc * (w - a) + c_wd * w)
    if HAS_NOISE:
        zeta = philox_normal(offs, seed, tensor_index, step_lo, step_hi)
        dp = dp + c_noise * zeta.to(w.dtype)
    bad = nonfinite(g)
    active = valid
    if HAS_MASK:
        m = tl.load(m_ptr + offs, mask=valid, other=0.0).to(w.dtype)
        pn = p + m * dp
        wn = w + m * pn
        active = active & (m != 0)
    else:
        pn = p + dp
        wn = w + pn
    # a finite gradient whose new weight or momentum is not finite, or whose p**2 overflows the thermostat's
    # float64 sum; tested before the box, which would hide an inf
    pn64 = pn.to(tl.float64)
    over = (nonfinite(wn) | nonfinite(pn64 * pn64)) & (tl.abs(g) < float("inf")) & active
    if HAS_BOX:
        box = tl.load(coef_ptr + 5).to(w.dtype)
        outside = tl.abs(wn - a) > box
        wn = tl.minimum(tl.maximum(wn, a - box), a + box)
        pn = tl.where(outside, -pn, pn)
    keep = bad | over
    if HAS_MASK:
        keep = keep | (m == 0)
    wn = tl.where(keep, w, wn)
    pn = tl.where(keep, p, pn)
    tl.store(w_ptr + offs, wn, mask=valid)
    tl.store(p_ptr + offs, pn, mask=valid)
    p64 = pn.to(tl.float64)
    kin = tl.sum(tl.where(active, p64 * p64, 0.0), axis=0)
    cnt = tl.sum(active.to(tl.float64), axis=0)
    tl.store(part_ptr + 2 * pid, kin)
    tl.store(part_ptr + 2 * pid + 1, cnt)
    tl.atomic_or(flag_ptr, flag_bits(bad & valid, over))


def sgnht_step_triton_(
    params,
    grads,
    anchors,
    momenta,
    thermostat,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay,
    diffusion_factor,
    noise_scale,
    bounding_box,
    masks,
    seed,
    step,
    block: int | None = None,
) -> torch.Tensor:
    """Launch the kernel once per tensor, then update the thermostat (inputs validated by
    :func:`pypattern.ops.sgnht.sgnht_step_`). Returns the int32 flags per tensor (as the op's), on the CPU."""
    if not params:
        return torch.zeros(0, dtype=torch.int32)
    device = params[0].device
    with launch_guard(device):
        noise_std = math.sqrt(2.0 * diffusion_factor * step_size) * noise_scale
        coefs = torch.tensor(
            [step_size, nbeta, localization, weight_decay, noise_std, bounding_box or 0.0],
            dtype=torch.float64,
            device=device,
        )
        xi_start = thermostat.reshape(1).clone()
        flags = torch.zeros(len(params), dtype=torch.int32, device=device)
        seed_arg = seed - 2**64 if seed >= 2**63 else seed
        launches = []
        for t, p in enumerate(params):
            n = p.numel()
            if n == 0:
                continue
            blk = block or (65536 if device.type == "cpu" else 1024)
            blk = min(blk, triton.next_power_of_2(n))
            launches.append((t, n, blk, triton.cdiv(n, blk)))
        parts = torch.zeros(2 * sum(grid for *_, grid in launches), dtype=torch.float64, device=device)
        at = 0
        for t, n, blk, grid in launches:
            p, mom = params[t], momenta[t]
            w = p if p.is_contiguous() else p.contiguous()
            pm = mom if mom.is_contiguous() else mom.contiguous()
            m = None if masks is None else masks[t]
            mc = m.to(p.dtype).contiguous() if m is not None else w  # dummy pointer when there is no mask
            _sgnht_kernel[(grid,)](
                w,
                pm,
                grads[t].contiguous(),
                anchors[t].contiguous(),
                mc,
                coefs,
                xi_start,
                parts[2 * at :],
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
            at += grid
            if w is not p:
                p.copy_(w)
            if pm is not mom:
                mom.copy_(pm)
        sums = parts.view(-1, 2).sum(0)
        target = step_size * noise_scale**2
        delta = torch.where(sums[1] > 0, sums[0] / sums[1].clamp_min(1.0) - target, torch.zeros_like(sums[0]))
        thermostat.add_(delta.reshape(thermostat.shape))
        return flags.cpu()
