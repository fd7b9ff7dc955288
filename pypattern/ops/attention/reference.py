"""The specification of :func:`prefix_attention`: each cell's queries over the shared keys and the cell's own."""

from __future__ import annotations

import torch


def prefix_attention_reference(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``z (C, B, Rq, H, dh)``: ``z[c, b, r, h] = sum_j softmax_j(scale * q[c, b, r, h] . k_j) v_j`` over the keys
    ``j`` that ``mask[r, j]`` does not mask, with ``k_j = k_prefix[b, j, h // G]`` for ``j < P`` and
    ``k_new[c, b, j - P, h // G]`` after (values alike), ``G = H // Hkv``; the scores in the inputs' dtype."""
    C, B, Rq, H, dh = q.shape
    P, Hkv = k_prefix.shape[1], k_new.shape[3]
    G = H // Hkv

    def keys(shared: torch.Tensor, own: torch.Tensor) -> torch.Tensor:  # (C, B, Tk, H, dh)
        both = torch.cat([shared.unsqueeze(0).expand(C, B, P, Hkv, dh), own], dim=2)
        return both.repeat_interleave(G, dim=3)

    K, V = keys(k_prefix, k_new), keys(v_prefix, v_new)
    scores = torch.einsum("cbrhd,cbkhd->cbhrk", q, K) * scale
    scores = scores.masked_fill(mask.to(scores.device), float("-inf"))
    pattern = torch.softmax(scores, dim=-1)
    return torch.einsum("cbhrk,cbkhd->cbrhd", pattern, V)
