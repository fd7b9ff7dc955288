"""The plain-torch specification of the fused SGNHT step (see :mod:`pypattern.ops.sgnht`).

Written for clarity, not speed: one tensor at a time, the noise from :func:`pypattern.ops.sgld.philox_normals`.
"""

from __future__ import annotations

import math

import torch

from ..sgld.reference import philox_normals


def sgnht_step_reference_(
    params,
    grads,
    anchors,
    momenta,
    thermostat,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay=0.0,
    diffusion_factor=0.01,
    noise_scale=1.0,
    bounding_box=None,
    masks=None,
    seed,
    step,
) -> torch.Tensor:
    """Plain-torch specification of :func:`pypattern.ops.sgnht.sgnht_step_` (inputs already validated).

    Returns an int32 flag per tensor, OR-ed over its entries: 1 where a gradient held a NaN or Inf, 2 where a
    finite gradient gave a non-finite new weight or momentum, or a momentum whose square overflows float64 (tested
    before the bounding box). Those entries are left unchanged, their momenta too (and count in the thermostat's
    mean with their old momentum when active).
    """
    flags = torch.zeros(len(params), dtype=torch.int32)
    xi = float(thermostat.reshape(()).item())
    noise_std = math.sqrt(2.0 * diffusion_factor * step_size) * noise_scale
    kinetic = torch.zeros((), dtype=torch.float64)
    count = 0
    for t, (w, g, w0, p) in enumerate(zip(params, grads, anchors, momenta)):
        if w.numel() == 0:
            continue
        finite = torch.isfinite(g)
        drift = nbeta * g + localization * (w - w0) + weight_decay * w
        dp = -xi * p - step_size * drift
        if noise_std != 0.0:
            zeta = philox_normals(w.numel(), seed=seed, tensor_index=t, step=step, device=w.device)
            dp = dp + noise_std * zeta.reshape(w.shape).to(w.dtype)
        m = None if masks is None or masks[t] is None else masks[t].to(w.dtype)
        p_new = p + (dp if m is None else m * dp)
        w_new = w + (p_new if m is None else m * p_new)
        frozen = torch.zeros_like(finite) if m is None else m == 0
        p64 = p_new.to(torch.float64)
        over = (~torch.isfinite(w_new) | ~torch.isfinite(p64 * p64)) & finite & ~frozen
        flags[t] = int(not bool(finite.all())) | 2 * int(bool(over.any()))
        if bounding_box is not None:
            outside = (w_new - w0).abs() > bounding_box
            w_new = torch.minimum(torch.maximum(w_new, w0 - bounding_box), w0 + bounding_box)
            p_new = torch.where(outside, -p_new, p_new)
        keep = ~finite | over | frozen
        w_new = torch.where(keep, w, w_new)
        p_new = torch.where(keep, p, p_new)
        w.copy_(w_new)
        p.copy_(p_new)
        active = torch.ones_like(finite) if m is None else m != 0
        kinetic = kinetic + (p_new.to(torch.float64) ** 2)[active].sum().cpu()
        count += int(active.sum())
    if count > 0:
        thermostat.add_(float(kinetic) / count - step_size * noise_scale**2)
    return flags
