"""Row dot products: :func:`row_dots` (the op), its specification in ``reference.py``; the C++ kernel is in
``csrc/dots/``.

::

    row_dots(a, [g_1, ..., g_r])[b, m, n] = sum_k a[b, m, k] G[b, n, k],    G = cat(g_1, ..., g_r)

The edge-score contraction of EAP and EAP-IG (``pypattern.circuits``): each edge's score, per prompt, is the dot
product of its source's output difference with its destination input's gradient over positions and features.
Per attention layer that is a hundred or so source rows against three dozen gradient rows of tens of thousands of
terms, a shape on which a GEMM library (MKL's ``bmm``) packs the long operand and runs at a quarter to half of its
rate; the C++ kernel holds a block of 4 x 6 dot products in vector registers and reads both sides in place
(``bench/bench_row_dots.py``; figures in docs/benchmarks.md). On CUDA tensors a CUDA build registers cuBLAS's
batched GEMM over the concatenated rows (``csrc/dots/dots_cuda.cpp``; compiled, not run here): cuBLAS serves that
shape on a GPU. Other dtypes take the reference (``torch.bmm``).
"""

from .op import row_dots
from .reference import row_dots_reference

__all__ = ["row_dots", "row_dots_reference"]
