"""devinterp 1.x's ``devinterp.utils`` helpers: ``default_nbeta``, ``make_evaluate``, ``evaluate_ce``,
``evaluate_mse``."""

from __future__ import annotations

from collections.abc import Callable

from torch.nn import functional as F

from ..sampling.llc import criterion_evaluate, default_nbeta

__all__ = ["default_nbeta", "evaluate_ce", "evaluate_mse", "make_evaluate"]


def make_evaluate(criterion: Callable) -> Callable:
    """``evaluate(model, (x, y)) = (criterion(model(x), y), model(x))`` for a loss ``criterion(outputs, targets)``."""
    return criterion_evaluate(criterion)


evaluate_ce = make_evaluate(F.cross_entropy)
evaluate_mse = make_evaluate(F.mse_loss)
