"""Streaming cross-covariance of two blocks of per-draw observables: the chunk update
:func:`cross_covariance_update_` (the op; its specification in ``reference.py``, its Triton kernel in ``triton.py``,
its C++ and CUDA kernels in ``csrc/covariance/``) and the accumulator :class:`CrossCovariance` around it.

Draws arrive in chunks: ``a`` of shape ``(m, K)`` and ``b`` of shape ``(m, N)`` hold ``m`` draws of ``K`` and
``N`` observables (for susceptibilities: ``K`` component observables and ``N`` per-sample or per-token losses).
The accumulator keeps, all in float64 and of a size independent of the number of draws:

* ``count`` ``n`` (a Python int),
* ``shift_a`` ``(K,)``, ``shift_b`` ``(N,)``: the mean of the first non-empty chunk, subtracted from every later
  draw before anything else. Draws close to their shift then subtract exactly (Sterbenz), so inputs with a large
  mean and a tiny variance (``1e8 + 1e-3 * noise``) keep all their significant digits;
* ``mean_a`` ``(K,)``, ``mean_b`` ``(N,)``: the running means of the shifted draws;
* ``comoment`` ``(K, N)``: ``C_ab = sum_d (a_d - mean_a)(b_d - mean_b)^T``;
* optionally ``m2_a``, ``m2_b``: the auto co-moments, either their diagonals ``(K,)``/``(N,)`` (``"var"``,
  enough for correlations) or the full ``(K, K)``/``(N, N)`` matrices (``"full"``).

Chunk update (Welford/Chan): with the chunk's own mean ``ma`` (of its ``m`` shifted draws), its centred co-moment
``C_c = (a - ma)^T (b - mb)`` and ``delta_a = ma - mean_a``, ``delta_b = mb - mean_b``::

    C_ab   <- C_ab + C_c + (n m / (n + m)) delta_a delta_b^T
    mean_a <- mean_a + (m / (n + m)) delta_a          (and mean_b alike)
    n      <- n + m

Merging two accumulators (Chan, Golub and LeVeque's parallel formula) is the same update with the other
accumulator's ``(n, mean, C)`` in place of the chunk's, after moving its means to this one's shift; the result
equals a single pass over all draws up to rounding, so chains and ranks combine in any order.

:class:`CrossCovariance` wraps the state; it also gathers chunks of fewer than ``buffer_draws`` draws (one draw
at a time, typically) into a small float64 buffer, so that per-draw streaming runs as GEMMs too.

Results: ``cov = C_ab / (n - ddof)`` ``(K, N)``, the means, ``var``/``cov`` of each block and the Pearson
correlation ``C_ab / sqrt(diag(m2_a) diag(m2_b)^T)``.

Backends of :func:`cross_covariance_update_` (the chunk update; everything else is O(K N) torch):

* ``reference``: plain torch on the whole chunk (the specification).
* ``cpp``: row panels of 512 draws, each a full Chan update in one pass over the panel: cast to float64 (any
  dtype and strides), subtract the shift and the *running* mean, gather column sums (and sums of squares); the
  rank-one correction ``-(m^2 / (n + m)) delta_a delta_b^T`` rides in the same GEMM as one extra row, then one
  BLAS ``dgemm`` per panel (MKL through ATen). Workspace ``513 * (K + N)`` doubles, whatever the chunk size.
* ``triton``: the chunk means in torch; one kernel computes ``C_c`` tile by tile in float64 from the raw chunk
  (centring on load), adding the Chan term on the last step.
* ``cuda``: column-mean, tiled float64 co-moment (64 x 64 tiles, centring on load) and update kernels.
"""

from .accumulator import AutoMode, CrossCovariance
from .op import cross_covariance_update_
from .reference import cross_covariance_update_reference_

__all__ = ["AutoMode", "CrossCovariance", "cross_covariance_update_", "cross_covariance_update_reference_"]
