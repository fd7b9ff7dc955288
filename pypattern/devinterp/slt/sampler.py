"""``from devinterp.slt.sampler import estimate_learning_coeff_with_summary`` (devinterp 1.x) on pypattern."""

from ...sampling.llc import estimate_learning_coeff, estimate_learning_coeff_with_summary

__all__ = ["estimate_learning_coeff", "estimate_learning_coeff_with_summary"]
