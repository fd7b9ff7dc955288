"""``from devinterp.optim import SGLD, SGNHT`` (devinterp 1.x) as pypattern's :class:`~pypattern.sampling.SGLD`
and :class:`~pypattern.sampling.SGNHT`, which take devinterp's optimizer keywords (``lr``, ``nbeta``,
``localization``, ``noise_level``, ``diffusion_factor``, ...); :class:`~pypattern.sampling.RMSpropSGLD` too."""

from ...sampling.optim import SGLD
from ...sampling.samplers import SGNHT, RMSpropSGLD

__all__ = ["SGLD", "SGNHT", "RMSpropSGLD"]
