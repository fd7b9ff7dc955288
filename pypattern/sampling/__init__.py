"""SGLD sampling and the local learning coefficient (LLC).

* :class:`SGLD`: a ``torch.optim.Optimizer`` whose step is the fused op :func:`pypattern.ops.sgld.sgld_step_`.
* :func:`sample`: chains of SGLD from the trained weights (batched with ``torch.func`` or sequential), loss
  traces, observables, callbacks, divergence errors, R-hat/ESS, checkpoint and resume; ``sampler="sgnht"`` or
  ``"rmsprop_sgld"`` runs the chains with :class:`SGNHT` or :class:`RMSpropSGLD` instead.
* :func:`estimate_llc`: the LLC, per chain and over chains; :func:`estimate_learning_coeff` and
  :func:`estimate_learning_coeff_with_summary` keep devinterp 1.x's names and meanings.
* :func:`calibrate_step_size`: LLC and trace health over a sweep of step sizes.

Modules: ``optim`` (SGLD, noise keys), ``samplers`` (SGNHT, RMSprop-SGLD, the sampler names), ``vocabulary`` (hyperparameter names; devinterp's translated), ``plan``
(argument checks, the frozen run plan), ``data`` (each chain's keyed batches), ``sequential`` and ``batched``
(the chain loops), ``context`` (what the loops share: callbacks, checkpoints, divergence checks), ``checkpoint``
(state, file and fingerprint), ``runner`` (:func:`sample`), ``results``, ``diagnostics``, ``llc``,
``calibrate``.
"""

from .auto import AutoStepError, AutoStepReport, resolve_step_size
from .calibrate import CalibrationResult, calibrate_step_size
from .diagnostics import (
    DriftWarning,
    NonFiniteLossError,
    NonStationaryWarning,
    StepBiasWarning,
    check_mixing,
    check_stationarity,
    ess,
    r_hat,
)
from .llc import (
    default_nbeta,
    estimate_learning_coeff,
    estimate_learning_coeff_with_summary,
    estimate_llc,
    llc_from_sample,
)
from .online import OnlineLLC, OnlineLLCResult
from .optim import SGLD, chain_seed
from .refined import RefinedLLCResult, refined_llc
from .results import LLCResult, SampleResult
from .runner import SamplingDivergedError, default_loss_fn, sample
from .samplers import SGNHT, RMSpropSGLD, make_sampler

__all__ = [
    "SGNHT",
    "RMSpropSGLD",
    "make_sampler",
    "SGLD",
    "AutoStepError",
    "AutoStepReport",
    "OnlineLLC",
    "OnlineLLCResult",
    "RefinedLLCResult",
    "refined_llc",
    "resolve_step_size",
    "CalibrationResult",
    "LLCResult",
    "NonFiniteLossError",
    "DriftWarning",
    "NonStationaryWarning",
    "SampleResult",
    "StepBiasWarning",
    "SamplingDivergedError",
    "calibrate_step_size",
    "chain_seed",
    "check_mixing",
    "check_stationarity",
    "default_loss_fn",
    "default_nbeta",
    "ess",
    "estimate_learning_coeff",
    "estimate_learning_coeff_with_summary",
    "estimate_llc",
    "llc_from_sample",
    "r_hat",
    "sample",
]
