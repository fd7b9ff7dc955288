"""The fused RMSprop-preconditioned SGLD step (devinterp's ``rmsprop_sgld``): :func:`rmsprop_sgld_step_` (the op),
its specification in ``reference.py`` and its Triton kernel in ``triton.py``; the C++ and CUDA kernels are in
``csrc/rmsprop_sgld/``.

For every tensor ``w`` with gradient ``g``, anchor ``w0``, running mean of squared gradients ``V`` (zeros at the
start) and optional mask ``m``::

    V <- alpha * V + (1 - alpha) * g**2
    G  = 1 / (sqrt(V) + eps)
    w <- w + m * ( -(step_size/2) * G * (nbeta * g + localization * (w - w0) + weight_decay * w)
                   + sqrt(step_size * G) * noise_scale * xi )

then, if ``bounding_box`` is given, ``w`` is clamped to ``w0 +- bounding_box``. ``g`` is the gradient of the
batch-mean loss (``V`` is built from it, not from ``nbeta * g``). Entries whose mask is 0, or whose gradient is NaN
or Inf, keep their ``w`` and ``V``. As in devinterp, the term of the exact preconditioned dynamics that involves
the derivative of ``G`` is left out (``G`` changes slowly for ``alpha`` near 1).

The noise ``xi`` is the SGLD stream of :mod:`pypattern.ops.sgld`, the same on all four backends up to the
rounding of ``log``/``sqrt``/``cos``.
"""

from .op import rmsprop_sgld_step_
from .reference import rmsprop_sgld_step_reference_

__all__ = ["rmsprop_sgld_step_", "rmsprop_sgld_step_reference_"]
