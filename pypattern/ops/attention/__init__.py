"""Prefix attention: :func:`prefix_attention` (the op), its specification in ``reference.py``; the C++ kernel is in
``csrc/attention/``.

::

    prefix_attention(q, k_prefix, v_prefix, k_new, v_new, mask, scale)[c, b, r, h]
        = sum_j softmax_j(scale * q[c, b, r, h] . k_j, mask[r, j] masked) v_j,
    k_j = k_prefix[b, j, h // G] (j < P),  k_new[c, b, j - P, h // G] (j >= P),  G = n_heads // n_key_value_heads

Exact activation patching (``pypattern.patching``) recomputes, for many patched cells at once, the positions of a
prompt from the patch on: each cell's queries attend the target run's cached keys and values before the patch
(shared by every cell) and the cell's own after it. In torch that is a layout copy of the queries, keys and values
per block, batched products (MKL's ``bmm``, which runs these small shapes at a fraction of its GEMM rate) and the
mask and softmax as separate passes; the C++ kernel reads the operands in place and does the scores, the softmax
and the mix of each (example, key/value head) in one pass over cache-resident buffers
(``bench/bench_prefix_attention.py``; figures in docs/benchmarks.md). On CUDA tensors a CUDA build registers the
reference's arithmetic in ATen's ops (``csrc/attention/attention_cuda.cpp``; compiled, not run here). Other dtypes
take the reference.
"""

from .op import prefix_attention
from .reference import prefix_attention_reference

__all__ = ["prefix_attention", "prefix_attention_reference"]
