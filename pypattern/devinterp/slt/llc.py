"""``from devinterp.slt.llc import llc`` (devinterp 2.x) and ``LLCEstimator`` / ``OnlineLLCEstimator`` (devinterp
1.x's callbacks) as ``from pypattern.devinterp.slt.llc import ...``."""

from .. import compute_llc, llc
from ..v1 import LLCEstimator, OnlineLLCEstimator

__all__ = ["LLCEstimator", "OnlineLLCEstimator", "compute_llc", "llc"]
