"""The plain-torch specification of the fused RMSprop-preconditioned SGLD step (see
:mod:`pypattern.ops.rmsprop_sgld`).

Written for clarity, not speed: one tensor at a time, the noise from :func:`pypattern.ops.sgld.philox_normals`.
"""

from __future__ import annotations

import math

import torch

from ..sgld.reference import philox_normals


def rmsprop_sgld_step_reference_(
    params,
    grads,
    anchors,
    square_avgs,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay=0.0,
    alpha=0.99,
    eps=0.1,
    noise_scale=1.0,
    bounding_box=None,
    masks=None,
    seed,
    step,
) -> torch.Tensor:
    """Plain-torch specification of :func:`pypattern.ops.rmsprop_sgld.rmsprop_sgld_step_` (inputs validated).

    Returns an int32 flag per tensor, OR-ed over its entries: 1 where a gradient held a NaN or Inf, 2 where a
    finite gradient gave a non-finite new weight or ``V`` (tested before the bounding box). Those entries are left
    unchanged, their ``square_avgs`` too.
    """
    flags = torch.zeros(len(params), dtype=torch.int32)
    noise_std = math.sqrt(step_size) * noise_scale
    for t, (w, g, w0, v) in enumerate(zip(params, grads, anchors, square_avgs)):
        if w.numel() == 0:
            continue
        finite = torch.isfinite(g)
        v_new = alpha * v + (1.0 - alpha) * g * g
        precond = 1.0 / (torch.sqrt(v_new) + eps)
        delta = -0.5 * step_size * precond * (nbeta * g + localization * (w - w0) + weight_decay * w)
        if noise_std != 0.0:
            xi = philox_normals(w.numel(), seed=seed, tensor_index=t, step=step, device=w.device)
            delta = delta + noise_std * torch.sqrt(precond) * xi.reshape(w.shape).to(w.dtype)
        m = None if masks is None or masks[t] is None else masks[t].to(w.dtype)
        new = w + (delta if m is None else m * delta)
        frozen = torch.zeros_like(finite) if m is None else m == 0
        over = (~torch.isfinite(new) | ~torch.isfinite(v_new)) & finite & ~frozen
        flags[t] = int(not bool(finite.all())) | 2 * int(bool(over.any()))
        if bounding_box is not None:
            new = torch.minimum(torch.maximum(new, w0 - bounding_box), w0 + bounding_box)
        keep = ~finite | over | frozen
        w.copy_(torch.where(keep, w, new))
        v.copy_(torch.where(keep, v, v_new))
    return flags
