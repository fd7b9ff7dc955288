"""Kernel families, one folder each: ``reference.py`` (the plain-torch specification), the public op with its
validation, and ``triton.py`` (the Triton kernel); the C++ and CUDA kernels are in ``csrc/<family>/``. Each folder
registers its implementations with :mod:`pypattern._backends`, whose chooser picks the fastest one available for
the tensors given.

* :mod:`~pypattern.ops.sgld`: the fused SGLD step :func:`sgld_step_`, and :func:`sgld_chains_step_` for many chains in
  one call.
* :mod:`~pypattern.ops.sgnht`: the fused SGNHT step :func:`sgnht_step_` (momentum and thermostat).
* :mod:`~pypattern.ops.rmsprop_sgld`: the fused RMSprop-preconditioned SGLD step :func:`rmsprop_sgld_step_`.
* :mod:`~pypattern.ops.covariance`: the streaming cross-covariance :class:`CrossCovariance`.
* :mod:`~pypattern.ops.grad_gram`: per-sample gradient Gram kernels of one layer.
* :mod:`~pypattern.ops.activations`: the tanh GELU :func:`gelu_tanh` of GPT-2-style models (CPU kernel).
* :mod:`~pypattern.ops.attention`: prefix attention :func:`prefix_attention`, the attention of exact activation
  patching's recomputed positions (CPU kernel).
* :mod:`~pypattern.ops.dots`: row dot products :func:`row_dots`, the edge-score contraction (CPU kernel).
* :mod:`~pypattern.ops.sums`: signed sums :func:`signed_sums`, the destination inputs of exact edge patching (CPU
  kernel).
"""

from .activations import gelu_tanh, gelu_tanh_reference
from .attention import prefix_attention, prefix_attention_reference
from .covariance import CrossCovariance, cross_covariance_update_, cross_covariance_update_reference_
from .dots import row_dots, row_dots_reference
from .grad_gram import (
    MOVED_TO_GRAM,
    center_gram,
    choose_method,
    grad_gram_dense,
    grad_gram_embedding,
    grad_gram_embedding_reference,
    grad_gram_linear,
    grad_gram_linear_reference,
    grad_gram_pairwise,
    grad_gram_pairwise_reference,
    moved_to_gram,
)
from .rmsprop_sgld import rmsprop_sgld_step_, rmsprop_sgld_step_reference_
from .sgld import (
    philox_normals,
    sgld_chains_step_,
    sgld_chains_step_reference_,
    sgld_step_,
    sgld_step_reference_,
)
from .sgnht import sgnht_step_, sgnht_step_reference_
from .sums import signed_sums, signed_sums_reference_

__all__ = [
    "CrossCovariance",
    "center_gram",
    "choose_method",
    "cross_covariance_update_",
    "cross_covariance_update_reference_",
    "gelu_tanh",
    "gelu_tanh_reference",
    "grad_gram_dense",
    "grad_gram_embedding",
    "grad_gram_embedding_reference",
    "grad_gram_linear",
    "grad_gram_linear_reference",
    "grad_gram_pairwise",
    "grad_gram_pairwise_reference",
    "philox_normals",
    "prefix_attention",
    "prefix_attention_reference",
    "rmsprop_sgld_step_",
    "rmsprop_sgld_step_reference_",
    "row_dots",
    "row_dots_reference",
    "sgld_chains_step_",
    "sgld_chains_step_reference_",
    "sgld_step_",
    "sgld_step_reference_",
    "sgnht_step_",
    "sgnht_step_reference_",
    "signed_sums",
    "signed_sums_reference_",
]


def __getattr__(name: str):
    if name in MOVED_TO_GRAM:
        return moved_to_gram(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
