"""pypattern: kernels and estimators for reading and writing the internal structure of neural networks."""

from ._backends import backends
from .ops import sgld_step_

__version__ = "0.1.0"

__all__ = ["backends", "sgld_step_", "__version__"]
