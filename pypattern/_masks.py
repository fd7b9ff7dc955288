"""The 0/1 reading of a mask shared by the estimators that take one (component masks, edge masks): a bool tensor
as it is, numbers that are all 0 or 1 as the bool mask they spell, anything else None, for the caller to refuse in
its own terms (a fractional or complex entry says neither "in" nor "out"); :func:`not_a_mask` says why a value is
none, for that message (a None: devinterp's "whole parameter", which pypattern's masks do not take)."""

from __future__ import annotations

import torch

# what a None mask means where it comes from, and what pypattern takes instead (estimate_llc refuses a None mask too)
NONE_MASK = (
    "it is None, which devinterp's create_param_masks writes for 'the whole parameter'; pypattern's masks are "
    "tensors: give a list of parameter names to move whole parameters, or torch.ones_like(parameter, "
    "dtype=torch.bool) as the mask of a whole parameter"
)


def zero_one_mask(value) -> torch.Tensor | None:
    """``value`` (a tensor or what ``torch.as_tensor`` reads) as a bool mask, or None when it holds an entry other
    than 0 and 1 or is not numbers at all (None included: :func:`not_a_mask` says why)."""
    if (
        value is None
    ):  # no mask (devinterp's "whole parameter"): refused by the caller, as estimate_llc refuses it
        return None
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):  # not numbers (a string, an object): no mask
        return None
    if t.dtype == torch.bool:
        return t
    if not bool(((t == 0) | (t == 1)).all()):  # a complex entry counts when it is exactly 0 or 1
        return None
    return t != 0


def not_a_mask(value) -> str:
    """Why :func:`zero_one_mask` read no mask in ``value``, for the caller's message: None (devinterp's "whole
    parameter", with what to give instead), not numbers, or numbers other than 0 and 1."""
    if value is None:
        return NONE_MASK
    try:
        torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return f"it is a {type(value).__name__}, not a mask"
    return "it has other values"
