"""Kernel families: each module holds the plain-torch reference (the specification) and one public op that
dispatches to the fastest backend available (see :mod:`pypattern._backends`)."""

from .covariance import CrossCovariance, cross_covariance_update_, cross_covariance_update_reference_
from .grad_gram import (
    GramSite,
    center_gram,
    choose_method,
    default_sites,
    grad_gram_embedding,
    grad_gram_embedding_reference,
    grad_gram_linear,
    grad_gram_linear_reference,
    grad_gram_pairwise,
    grad_gram_pairwise_reference,
    gram_parameters,
    per_sample_grad_gram,
    per_sample_grad_gram_reference,
    transformer_lens_sites,
)
from .sgld import sgld_step_, sgld_step_reference_, sgld_step_unchecked_

__all__ = [
    "CrossCovariance",
    "GramSite",
    "center_gram",
    "choose_method",
    "cross_covariance_update_",
    "cross_covariance_update_reference_",
    "default_sites",
    "grad_gram_embedding",
    "grad_gram_embedding_reference",
    "grad_gram_linear",
    "grad_gram_linear_reference",
    "grad_gram_pairwise",
    "grad_gram_pairwise_reference",
    "gram_parameters",
    "per_sample_grad_gram",
    "per_sample_grad_gram_reference",
    "sgld_step_",
    "sgld_step_reference_",
    "sgld_step_unchecked_",
    "transformer_lens_sites",
]
