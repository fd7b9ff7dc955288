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
    the tanh of :func:`gelu_tanh_reference`.

    Where ``t`` is +-1 in ``x``'s dtype (``|x|`` large, or infinite) the derivative is exactly 1 (``x > 0``) or 0:
    the second term is ``0 * x * x``, which the formula would make NaN once ``x * x`` overflows (``|x| > 1.8e19``
    in float32, ``1.3e154`` in float64), so those entries take ``x = 0`` in it. They take it before any power of
    ``x`` is formed, so that a derivative of this function (a second derivative of the GELU) is 0 there as well,
    not ``0 * inf``. Elsewhere the formula is evaluated as written."""
    with torch.no_grad():
        t_flat = torch.tanh(c * (x + _A * torch.pow(x, 3.0)))
        flat = t_flat.abs() == 1.0
    x = torch.where(flat, torch.zeros((), dtype=x.dtype, device=x.device), x)
    t = torch.where(flat, t_flat, torch.tanh(c * (x + _A * torch.pow(x, 3.0))))
    return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * _A * x * x))
