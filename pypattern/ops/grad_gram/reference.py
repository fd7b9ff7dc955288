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
        # padding positions carry no gradient, whatever d holds there (nn.Embedding's backward skips them)
        d64 = torch.where((ids != padding_idx).unsqueeze(-1), d64, 0.0)
    g = torch.zeros(b, num_embeddings, dim, dtype=torch.float64, device=d.device)
    g.scatter_add_(1, ids.long().unsqueeze(-1).expand(b, t, dim), d64)
    g = g.reshape(b, -1)
    return g @ g.T


def grad_gram_pairwise_reference(
    x: torch.Tensor | None, y: torch.Tensor, ids: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """``G_ij = sum_{s,t} K[is, jt] (y_is . y_jt)`` with ``K = x x^T``, or ``[ids equal and >= 0]``; float64. With
    ``ids``, the sum runs over the matching pairs only: a row pair that does not match adds nothing, even where its
    product is NaN or inf (as the kernels compute it, and as nn.Embedding's gradient ignores padding positions).

    ``x`` ``(B*T, p)`` (unused when ``ids`` is given), ``y`` ``(B*T, q)``, ``ids`` ``(B*T,)`` int64 or None.
    """
    r = y.shape[0]
    t = r // batch if batch else 0
    y64 = y.to(torch.float64)
    x64 = x.to(torch.float64) if ids is None else None
    if ids is not None:
        # padding rows take no part, whatever they hold (nor in a gradient through the products)
        y64 = torch.where((ids >= 0).unsqueeze(1), y64, 0.0)
    g = torch.zeros(batch, batch, dtype=torch.float64, device=y.device)
    if t == 0:
        return g
    step = max(1, 4096 // max(t, 1))  # samples per block: the row-pair products take O(step * T * B * T)
    for i0 in range(0, batch, step):
        rows = slice(i0 * t, min(batch, i0 + step) * t)
        kd = y64[rows] @ y64.T
        if ids is None:
            prod = (x64[rows] @ x64.T) * kd
        else:
            # a pair of rows whose ids differ (or a padding row) is no term of the sum: it adds nothing, not 0 times
            # its product (which is NaN when that product is not finite), as in the gradient of nn.Embedding,
            # whose padding positions and other tokens' rows never meet
            match = (ids[rows, None] == ids[None, :]) & (ids[rows, None] >= 0)
            prod = torch.where(match, kd, 0.0)
        g[i0 : i0 + step] = prod.reshape(-1, t, batch, t).sum((1, 3))
    return g
