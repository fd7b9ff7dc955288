"""``from devinterp.optim.sgld import SGLD`` (devinterp 1.x) on pypattern."""

from ...sampling.optim import SGLD

__all__ = ["SGLD"]
