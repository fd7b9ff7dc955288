"""The 0/1 reading of a mask shared by the estimators that take one (component masks, edge masks): a bool tensor
as it is, numbers that are all 0 or 1 as the bool mask they spell, anything else None, for the caller to refuse in
its own terms (a fractional or complex entry says neither "in" nor "out")."""

from __future__ import annotations

import torch


def zero_one_mask(value) -> torch.Tensor | None:
    """``value`` (a tensor or what ``torch.as_tensor`` reads) as a bool mask, or None when it holds an entry other
    than 0 and 1 or is not numbers at all."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):  # not numbers (a string, an object): no mask
        return None
    if t.dtype == torch.bool:
        return t
    if not bool(((t == 0) | (t == 1)).all()):  # a complex entry counts when it is exactly 0 or 1
        return None
    return t != 0
