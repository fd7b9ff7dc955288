"""The specification of :func:`signed_sums`: each output its base plus its signed terms, left to right."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def signed_sums_reference_(
    out: Sequence[torch.Tensor],
    base: Sequence[torch.Tensor],
    terms: Sequence[torch.Tensor],
    offsets: Sequence[int],
    signs: Sequence[int],
) -> None:
    """``out[p] = base[p] + signs[i0] * terms[i0] + ... + signs[i1 - 1] * terms[i1 - 1]`` with ``i0 = offsets[p]``,
    ``i1 = offsets[p + 1]``: each sign ``+1`` or ``-1`` an add or a subtract, in that order, in the tensors' dtype;
    ``out[p]`` is written once its sum is formed (it may be ``base[p]`` itself)."""
    for p in range(len(base)):
        acc = base[p]
        for i in range(offsets[p], offsets[p + 1]):
            acc = acc + terms[i] if signs[i] == 1 else acc - terms[i]
        out[p].copy_(acc)
