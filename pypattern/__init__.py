"""pypattern: kernels and estimators for reading and writing the internal structure of neural networks."""

from ._backends import backends
from .ops import (
    CrossCovariance,
    GramSite,
    center_gram,
    per_sample_grad_gram,
    sgld_step_,
    transformer_lens_sites,
)

__version__ = "0.1.0"

__all__ = [
    "CrossCovariance",
    "GramSite",
    "__version__",
    "backends",
    "center_gram",
    "per_sample_grad_gram",
    "sgld_step_",
    "transformer_lens_sites",
]
