"""The plain-torch specification of the chunk update (see :mod:`pypattern.ops.covariance` for the maths)."""

from __future__ import annotations

import torch


def cross_covariance_update_reference_(
    shift_a: torch.Tensor,
    shift_b: torch.Tensor,
    mean_a: torch.Tensor,
    mean_b: torch.Tensor,
    comoment: torch.Tensor,
    m2_a: torch.Tensor,
    m2_b: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    count: int,
) -> None:
    """Plain-torch specification of :func:`cross_covariance_update_` (inputs already validated)."""
    m = a.shape[0]
    if m == 0:
        return
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if count == 0:
        shift_a.copy_(a64.mean(0))
        shift_b.copy_(b64.mean(0))
        mean_a.zero_()
        mean_b.zero_()
    da_rows, db_rows = a64 - shift_a, b64 - shift_b
    ma, mb = da_rows.mean(0), db_rows.mean(0)
    ac, bc = da_rows - ma, db_rows - mb
    n_new = count + m
    w = count * m / n_new
    delta_a, delta_b = ma - mean_a, mb - mean_b
    comoment += ac.T @ bc + w * torch.outer(delta_a, delta_b)
    for m2, xc, d in ((m2_a, ac, delta_a), (m2_b, bc, delta_b)):
        if m2.dim() == 1 and m2.numel() > 0:
            m2 += (xc * xc).sum(0) + w * d * d
        elif m2.dim() == 2:
            m2 += xc.T @ xc + w * torch.outer(d, d)
    mean_a += (m / n_new) * delta_a
    mean_b += (m / n_new) * delta_b
