"""The fused SGNHT step (stochastic gradient Nosé-Hoover thermostat, Ding et al. 2014, in devinterp's form):
:func:`sgnht_step_` (the op), its specification in ``reference.py`` and its Triton kernel in ``triton.py``; the
C++ and CUDA kernels are in ``csrc/sgnht/``.

For every tensor ``w`` with gradient ``g``, anchor ``w0``, momentum ``p`` and optional mask ``m``, with the
thermostat ``xi`` of the group (all the tensors of one call)::

    D  = nbeta * g + localization * (w - w0) + weight_decay * w
    p <- p + m * ( -xi * p - eps * D + sqrt(2 * A * eps) * noise_scale * zeta )
    w <- w + m * p

then, if ``bounding_box`` is given, an entry with ``|w - w0| > bounding_box`` is clamped to the box and its
momentum reversed. Entries whose mask is 0, or whose gradient is NaN or Inf, keep their ``w`` and ``p``.
The momentum is in units of a move (devinterp's convention: Ding et al.'s ``p h`` with ``eps = h**2``), so
``mean(p**2)`` is ``eps * noise_scale**2`` at equilibrium. After all the tensors are updated (a second phase,
on the sum of ``p**2`` over the active entries accumulated in float64 in the same pass)::

    xi <- xi + sum(p**2) / count - eps * noise_scale**2

with ``count`` the number of entries whose mask is not 0 (no change when it is 0). The target density is that of
SGLD, ``exp(-(nbeta * L + localization/2 |w - w0|^2 + weight_decay/2 |w|^2) / noise_scale**2)``; ``xi`` settles
near ``A`` when the gradient is exact and rises to absorb gradient noise.

The noise ``zeta`` is the SGLD stream of :mod:`pypattern.ops.sgld` (Philox4x32-10 keyed by ``(seed, step, tensor
index, element index)``), the same on all four backends up to the rounding of ``log``/``sqrt``/``cos``.
"""

from .op import sgnht_step_
from .reference import sgnht_step_reference_

__all__ = ["sgnht_step_", "sgnht_step_reference_"]
