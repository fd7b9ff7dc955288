"""``from devinterp.optim import SGLD`` (devinterp 1.x) as pypattern's :class:`~pypattern.sampling.SGLD`, which
takes devinterp's optimizer keywords (``lr``, ``nbeta``, ``localization``, ``noise_level``, ...)."""

from ...sampling.optim import SGLD

__all__ = ["SGLD"]
