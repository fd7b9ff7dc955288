"""devinterp's ``devinterp.slt`` import paths on pypattern (see :mod:`pypattern.devinterp`). The package itself
holds devinterp 1.x's names: ``SGLD`` (1.3's ``from devinterp.slt import SGLD``) and those 1.x's
``from devinterp.slt import *`` gave (``estimate_learning_coeff(_with_summary)``, ``sample``, ``LLCEstimator``,
``OnlineLLCEstimator``); devinterp 2.x's are in its modules (``slt.llc.llc``, ``slt.sampling.sample``, ...)."""

from ...sampling.llc import estimate_learning_coeff, estimate_learning_coeff_with_summary
from ...sampling.optim import SGLD
from ..v1 import LLCEstimator, OnlineLLCEstimator, sample

__all__ = [
    "SGLD",
    "LLCEstimator",
    "OnlineLLCEstimator",
    "estimate_learning_coeff",
    "estimate_learning_coeff_with_summary",
    "sample",
]
