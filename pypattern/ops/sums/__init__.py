"""Signed sums of same-shaped tensors: :func:`signed_sums` (the op), its specification in ``reference.py``; the C++
kernel is in ``csrc/sums/``.

::

    signed_sums(base, terms, offsets, signs)[p] = base[p] + sum_{offsets[p] <= i < offsets[p + 1]} signs[i] terms[i]

Exact edge patching (``pypattern.circuits``) forms each destination input of a stage as the residual stream (or the
all-ablated input) plus or minus the outputs of a few sources: at GPT-2-small shape a pruning point forms about 370
inputs of 8 x 32 x 768 from about 1,600 source blocks in 23 calls (one per stage), and about half of a call's terms
repeat a block that another of its inputs reads. The C++ kernel forms all the outputs of a call in one pass over
chunks of each tensor, so that a block read by several outputs comes from memory once, and writes large outputs past
the cache (``bench/bench_signed_sums.py``; figures in docs/benchmarks.md); the engine had done it as one torch add
per term. On CUDA tensors a CUDA build registers torch's multi-tensor (foreach) copy and adds. Other dtypes take the
reference.
"""

from .op import signed_sums
from .reference import signed_sums_reference_

__all__ = ["signed_sums", "signed_sums_reference_"]
