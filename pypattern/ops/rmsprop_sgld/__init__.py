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
the derivative of ``G`` is left out. The draws are then exact only while ``G`` stays constant, and biased towards
larger gradients where ``G`` follows the chain's position: the running mean covers about
``step_size / (1 - alpha)`` of Langevin time, and when that is short against the posterior's relaxation time ``V``
tracks the local ``g**2``, so the draws come from about ``exp(-U(w)) * prod(sqrt(V(w)) + eps)`` instead of
``exp(-U(w))``. The bias does not vanish as the step shrinks at fixed ``alpha``: it grows. Measured on linear
regression (d = 5, nbeta = 26.4, localization = 1, exact LLC 2.45, full batch, ``alpha = 0.99``, ``eps = 0.1``):
2.66 at step 1e-3, 3.24 at 1e-4 (+32 %); 3.28 at step 1e-3 with ``alpha = 0.9`` (the same window); 2.54 at 1e-4
with ``alpha = 0.9999`` and 2.59 at 1e-3 with ``eps = 1`` (``G`` nearly constant). Keep ``step_size / (1 - alpha)``
long and ``eps`` large against ``sqrt(V)``, or use SGLD or SGNHT, which have no such term.

The noise ``xi`` is the SGLD stream of :mod:`pypattern.ops.sgld`, the same on all four backends up to the
rounding of ``log``/``sqrt``/``cos``.
"""

from .op import rmsprop_sgld_step_
from .reference import rmsprop_sgld_step_reference_

__all__ = ["rmsprop_sgld_step_", "rmsprop_sgld_step_reference_"]
