"""Specification of the tanh GELU and its derivative (the formulas written out, as Hugging Face's ``gelu_new``)."""

from __future__ import annotations

import math

import torch

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_tanh_reference(x: torch.Tensor, c: float = SQRT_2_OVER_PI) -> torch.Tensor:
    """``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``, elementwise, in ``x``'s dtype."""
    return 0.5 * x * (1.0 + torch.tanh(c * (x + _A * torch.pow(x, 3.0))))


def gelu_tanh_backward_reference(
    grad: torch.Tensor, x: torch.Tensor, c: float = SQRT_2_OVER_PI
) -> torch.Tensor:
    """``grad * d gelu_tanh / dx``: ``grad (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2))``, with ``t``
    the tanh of :func:`gelu_tanh_reference`."""
    t = torch.tanh(c * (x + _A * torch.pow(x, 3.0)))
    return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * _A * x * x))
