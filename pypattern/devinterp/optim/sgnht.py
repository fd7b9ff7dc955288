"""``from devinterp.optim.sgnht import SGNHT`` (devinterp 1.x) on pypattern: the fused
:class:`~pypattern.sampling.SGNHT` (``sampling_method=SGNHT`` in ``estimate_learning_coeff``)."""

from ...sampling.samplers import SGNHT

__all__ = ["SGNHT"]
