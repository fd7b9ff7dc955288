"""The specification of :func:`row_dots`: a batched matmul with the concatenated right-hand rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def row_dots_reference(a: torch.Tensor, g: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out[b, m, n] = sum_k a[b, m, k] * G[b, n, k]`` with ``G = cat(g, 1)``: ``a (B, M, K)``, each ``g_i (B,
    N_i, K)``; returns ``(B, M, sum N_i)``."""
    G = torch.cat(list(g), 1) if len(g) != 1 else g[0]
    return torch.bmm(a, G.transpose(1, 2))
