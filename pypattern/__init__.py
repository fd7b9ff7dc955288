"""pypattern: kernels and estimators for reading and writing the internal structure of neural networks.

Reading: :func:`sample` / :func:`estimate_llc` (SGLD with the fused step, the local learning coefficient),
:func:`susceptibilities` and :func:`bif` (posterior covariances of observables with per-sample losses),
:mod:`pypattern.equivalence` (CKA, Procrustes and their tests, to compare two models' representations),
:mod:`pypattern.patching` (activation and attribution patching). Writing: :mod:`pypattern.patterning` (invert
susceptibilities into data re-weightings), :mod:`pypattern.flags` (train residual dimensions into concept flags,
steer with them). Kernels: :mod:`pypattern.ops` (see :func:`backends`).
"""

from . import equivalence, flags, patterning, truth
from ._backends import backends
from .equivalence import (
    MinibatchCKA,
    cka_matrix,
    interpretive_equivalence,
    linear_cka,
    permutation_test,
    procrustes,
)
from .flags import FlagReport, FlagSpec, flag_loss, flag_report, generate, steer, train_flags
from .models import Transformer, TransformerConfig, component_masks
from .ops import (
    CrossCovariance,
    GramSite,
    center_gram,
    per_sample_grad_gram,
    sgld_step_,
    transformer_lens_sites,
)
from .patching import (
    KL,
    GaussianNoise,
    LogitDiff,
    LogProb,
    MeanAblation,
    PatchResult,
    Prob,
    TokenReplacement,
    ZeroAblation,
    activation_patching,
    attribution_patching,
    shortlist_and_confirm,
)
from .patterning import invert, reweight
from .sampling import (
    SGLD,
    LLCResult,
    SampleResult,
    SamplingDivergedError,
    calibrate_step_size,
    default_nbeta,
    estimate_learning_coeff,
    estimate_learning_coeff_with_summary,
    estimate_llc,
    sample,
)
from .susceptibility import SusceptibilityResult, bif, susceptibilities
from .tasks import (
    InductionTask,
    IOITask,
    ParenthesesTask,
    TopicTask,
    algorithm_scores,
    prefix_matching_score,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "KL",
    "MinibatchCKA",
    "cka_matrix",
    "interpretive_equivalence",
    "linear_cka",
    "permutation_test",
    "procrustes",
    "GaussianNoise",
    "InductionTask",
    "IOITask",
    "LogProb",
    "LogitDiff",
    "MeanAblation",
    "ParenthesesTask",
    "PatchResult",
    "Prob",
    "TokenReplacement",
    "ZeroAblation",
    "activation_patching",
    "algorithm_scores",
    "attribution_patching",
    "prefix_matching_score",
    "shortlist_and_confirm",
    "train",
    "SGLD",
    "CrossCovariance",
    "GramSite",
    "LLCResult",
    "SampleResult",
    "SamplingDivergedError",
    "SusceptibilityResult",
    "Transformer",
    "TransformerConfig",
    "__version__",
    "backends",
    "bif",
    "calibrate_step_size",
    "center_gram",
    "component_masks",
    "default_nbeta",
    "estimate_learning_coeff",
    "estimate_learning_coeff_with_summary",
    "estimate_llc",
    "invert",
    "equivalence",
    "flags",
    "FlagReport",
    "FlagSpec",
    "flag_loss",
    "flag_report",
    "generate",
    "steer",
    "train_flags",
    "TopicTask",
    "patterning",
    "per_sample_grad_gram",
    "reweight",
    "sample",
    "sgld_step_",
    "susceptibilities",
    "transformer_lens_sites",
    "truth",
]
