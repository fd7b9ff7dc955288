"""Per-sample loss-gradient Gram matrices without per-sample gradients: the tensor kernels of one layer
(:func:`grad_gram_linear`, :func:`grad_gram_embedding` and the contraction :func:`grad_gram_pairwise`; their
specifications in ``reference.py``, the Triton kernel in ``triton.py``, the C++ and CUDA kernels in
``csrc/grad_gram/``). The Gram of a whole model, which walks its modules, is :mod:`pypattern.gram`.

For a batch of ``B`` samples with per-sample losses ``l_i`` and the parameters ``theta`` of some layers,
``G_ij = <grad l_i, grad l_j>`` (shape ``(B, B)``); the centred form ``Gc = H G H`` with ``H = I - 11^T / B`` is
the Gram of the centred gradients ``g_i - mean_j g_j`` (``Gc / (B - 1)`` is their covariance across samples).

Layer by layer, with ``a_it`` the input and ``d_it`` the gradient of ``sum_j l_j`` with respect to the output of
the layer at position ``t`` of sample ``i`` (``T`` positions: 1 for a plain ``(B, d)`` input):

* ``nn.Linear`` (``y = x W^T + b``): ``grad_W l_i = sum_t d_it a_it^T`` and ``grad_b l_i = sum_t d_it``, so::

      G_ij = sum_{s,t} (a_is . a_jt) (d_is . d_jt)  +  (sum_s d_is) . (sum_t d_jt)      [second term: bias]

  For ``T = 1`` this is ``(A A^T + 1) * (D D^T)`` elementwise (with the bias): two ``(B, B)`` matrix products
  instead of ``B`` copies of the ``(d_out, d_in)`` weight gradient.
* ``nn.Embedding`` (ids ``k_it``): ``grad_E l_i`` has row ``v`` equal to ``sum_{t: k_it = v} d_it``, so
  ``G_ij = sum_{s,t} [k_is == k_jt] (d_is . d_jt)``; positions holding ``padding_idx`` do not count. Evaluated
  pairwise (``B^2 T^2 dim``) or by scattering the per-sample gradients of the ``V`` ids present (``B^2 V dim``).
* positional embeddings (``y[:, t] = W[t]``): the per-sample gradient is ``d_i`` itself (``T dim`` numbers).
* LayerNorm (``y = xhat * w + b``): per-sample gradients ``sum_t d_it * xhat_it`` and ``sum_t d_it`` (``2 d``
  numbers), taken directly.

Two ways to evaluate the Linear term, chosen by ``method="auto"`` from the multiply-add count:

* ``"pairwise"`` (the kernels): ``B^2 T^2 (d_in + d_out)`` multiply-adds, memory ``O(B^2)`` plus one block of
  row-pair products. Best when ``T`` is small against the layer width.
* ``"outer"``: form ``W_i = A_i^T D_i`` for slices of the input features (``B T d_in d_out``) and take their
  Gram (``B^2 d_in d_out``); memory capped by ``max_bytes``. Best for long sequences through narrow layers.

Backends of the pairwise contraction :func:`grad_gram_pairwise` (``"outer"`` is BLAS through torch everywhere):

* ``reference``: the two ``(BT, BT)`` kernel matrices in torch, multiplied and summed by blocks (the spec).
* ``cpp``: blocks of about 512 rows: two GEMMs (``at::mm``, MKL) per block pair ``I <= J``, then one fused
  OpenMP pass multiplies them and sums ``T x T`` sub-blocks in float64; the upper triangle is mirrored.
* ``triton``: one program per ``(BLOCK, BLOCK)`` tile of row pairs; both dot products by ``tl.dot`` over feature
  slices, the product reduced into ``G`` by atomic adds (one per tile when ``T`` is a multiple of ``BLOCK``).
* ``cuda``: the same tiling with shared-memory dot products and atomic adds.

Cost: the Gram of per-sample gradients needs ``B^2 P`` multiply-adds for ``P`` parameters unless a layer has few
positions (``T^2 (d_in + d_out) < d_in d_out``): one-position layers gain hugely (``B^2 (d_in + d_out)``), long
sequences through narrow layers do not, and then the gain over ``vmap(grad)`` is memory (no ``B x P`` array).
"""

from .op import (
    center_gram,
    choose_method,
    grad_gram_dense,
    grad_gram_embedding,
    grad_gram_linear,
    grad_gram_pairwise,
)
from .reference import grad_gram_embedding_reference, grad_gram_linear_reference, grad_gram_pairwise_reference

__all__ = [
    "center_gram",
    "choose_method",
    "grad_gram_dense",
    "grad_gram_embedding",
    "grad_gram_embedding_reference",
    "grad_gram_linear",
    "grad_gram_linear_reference",
    "grad_gram_pairwise",
    "grad_gram_pairwise_reference",
]

# The model-level names moved to pypattern.gram (the ops layer holds tensor kernels only and never imports model
# code); the old import path still resolves them, on first access and with a DeprecationWarning.
MOVED_TO_GRAM = (
    "GramSite",
    "default_sites",
    "gram_parameters",
    "per_sample_grad_gram",
    "per_sample_grad_gram_reference",
    "transformer_lens_sites",
)


def moved_to_gram(module: str, name: str):
    """The object ``name`` that moved from ``module`` to :mod:`pypattern.gram`, with a DeprecationWarning."""
    import importlib
    import warnings

    warnings.warn(
        f"{module}.{name} moved to pypattern.gram.{name} (also pypattern.{name} where exported); "
        "import it from there",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module("pypattern.gram"), name)


def __getattr__(name: str):
    if name in MOVED_TO_GRAM:
        return moved_to_gram(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
