"""Plain-torch specifications of the per-sample gradient Gram kernels (see :mod:`pypattern.ops.grad_gram`):
per-sample gradients materialised, then their Gram, all in float64."""

from __future__ import annotations

import torch


def grad_gram_linear_reference(a: torch.Tensor, d: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
    """Specification: materialise every per-sample gradient of a Linear layer and take their Gram.

    ``a`` ``(B, T, d_in)``, ``d`` ``(B, T, d_out)`` -> ``(B, B)`` in float64. Memory ``B * d_in * d_out``.
    """
    a64, d64 = a.to(torch.float64), d.to(torch.float64)
    g_w = torch.einsum("bto,bti->boi", d64, a64).reshape(a.shape[0], -1)
    g = g_w @ g_w.T
    if bias:
        g_b = d64.sum(1)
        g = g + g_b @ g_b.T
    return g


def grad_gram_embedding_reference(
    ids: torch.Tensor, d: torch.Tensor, *, num_embeddings: int, padding_idx: int | None = None
) -> torch.Tensor:
    """Specification: per-sample embedding gradients ``(B, num_embeddings, dim)`` and their Gram, float64."""
    b, t, dim = d.shape
    d64 = d.to(torch.float64)
    if padding_idx is not None:
        d64 = d64 * (ids != padding_idx).unsqueeze(-1)
    g = torch.zeros(b, num_embeddings, dim, dtype=torch.float64, device=d.device)
    g.scatter_add_(1, ids.long().unsqueeze(-1).expand(b, t, dim), d64)
    g = g.reshape(b, -1)
    return g @ g.T


def grad_gram_pairwise_reference(
    x: torch.Tensor | None, y: torch.Tensor, ids: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """``G_ij = sum_{s,t} K[is, jt] (y_is . y_jt)`` with ``K = x x^T``, or ``[ids equal and >= 0]``; float64.

    ``x`` ``(B*T, p)`` (unused when ``ids`` is given), ``y`` ``(B*T, q)``, ``ids`` ``(B*T,)`` int64 or None.
    """
    r = y.shape[0]
    t = r // batch if batch else 0
    y64 = y.to(torch.float64)
    x64 = x.to(torch.float64) if ids is None else None
    g = torch.zeros(batch, batch, dtype=torch.float64, device=y.device)
    if t == 0:
        return g
    step = max(1, 4096 // max(t, 1))  # samples per block: the row-pair products take O(step * T * B * T)
    for i0 in range(0, batch, step):
        rows = slice(i0 * t, min(batch, i0 + step) * t)
        kd = y64[rows] @ y64.T
        if ids is None:
            ka = x64[rows] @ x64.T
        else:
            ka = ((ids[rows, None] == ids[None, :]) & (ids[rows, None] >= 0)).to(torch.float64)
        g[i0 : i0 + step] = (ka * kd).reshape(-1, t, batch, t).sum((1, 3))
    return g
