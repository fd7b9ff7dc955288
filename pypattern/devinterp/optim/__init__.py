"""``from devinterp.optim import SGLD, SGNHT, SGMCMC`` (devinterp 1.x and 2.x) as pypattern's
:class:`~pypattern.sampling.SGLD` and :class:`~pypattern.sampling.SGNHT`, which take devinterp's optimizer keywords
(``lr``, ``nbeta``, ``localization``, ``noise_level``, ``diffusion_factor``, ...), and ``SGMCMC``'s factories
(:mod:`pypattern.devinterp.optim.sgmcmc`); :class:`~pypattern.sampling.RMSpropSGLD` too."""

from ...sampling.optim import SGLD
from ...sampling.samplers import SGNHT, RMSpropSGLD
from .sgmcmc import SGMCMC, SamplingMethodLiteral

__all__ = ["SGLD", "SGMCMC", "SGNHT", "RMSpropSGLD", "SamplingMethodLiteral"]
