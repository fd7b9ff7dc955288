"""``from devinterp.slt.sampler import sample, estimate_learning_coeff_with_summary`` (devinterp 1.x) on
pypattern (``sample`` here is 1.x's callback-driven one; 2.x's is :mod:`pypattern.devinterp.slt.sampling`'s)."""

from ...sampling.llc import estimate_learning_coeff, estimate_learning_coeff_with_summary
from ..v1 import sample

__all__ = ["estimate_learning_coeff", "estimate_learning_coeff_with_summary", "sample"]
