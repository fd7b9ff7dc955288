"""Kernel families: each module holds the plain-torch reference (the specification) and one public op that
dispatches to the fastest backend available (see :mod:`pypattern._backends`)."""

from .sgld import sgld_step_, sgld_step_reference_

__all__ = ["sgld_step_", "sgld_step_reference_"]
