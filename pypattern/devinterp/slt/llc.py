"""``from devinterp.slt.llc import llc`` (devinterp 2.x) and ``LLCEstimator`` / ``OnlineLLCEstimator`` (devinterp
1.x's callbacks, with their base ``SamplerCallback``) as ``from pypattern.devinterp.slt.llc import ...``."""

from .. import compute_llc, llc
from ..v1 import LLCEstimator, OnlineLLCEstimator, SamplerCallback

__all__ = ["LLCEstimator", "OnlineLLCEstimator", "SamplerCallback", "compute_llc", "llc"]
