"""``from devinterp.slt.sampler import ...`` (devinterp 1.x) on pypattern: ``sample`` (1.x's callback-driven one;
2.x's is :mod:`pypattern.devinterp.slt.sampling`'s), ``estimate_learning_coeff(_with_summary)`` and the other names
1.x's module had in its namespace (its README imports ``sample, LLCEstimator`` from here): the callbacks
``LLCEstimator`` / ``OnlineLLCEstimator``, ``default_nbeta``, ``get_init_loss_multi_batch`` and the ``SGLD``
optimizer."""

from ...sampling.llc import default_nbeta, estimate_learning_coeff, estimate_learning_coeff_with_summary
from ...sampling.optim import SGLD
from ..utils import get_init_loss_multi_batch
from ..v1 import LLCEstimator, OnlineLLCEstimator, sample

__all__ = [
    "SGLD",
    "LLCEstimator",
    "OnlineLLCEstimator",
    "default_nbeta",
    "estimate_learning_coeff",
    "estimate_learning_coeff_with_summary",
    "get_init_loss_multi_batch",
    "sample",
]
