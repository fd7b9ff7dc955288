"""pypattern: kernels and estimators for reading and writing the internal structure of neural networks.

Reading: :func:`sample` / :func:`estimate_llc` (SGLD with the fused step, the local learning coefficient),
:func:`susceptibilities` and :func:`bif` (posterior covariances of observables with per-sample losses),
:mod:`pypattern.equivalence` (CKA, Procrustes and their tests, to compare two models' representations),
:mod:`pypattern.patching` (activation and attribution patching). Writing: :mod:`pypattern.patterning` (invert
susceptibilities into data re-weightings), :mod:`pypattern.flags` (train residual dimensions into concept flags,
steer with them). Kernels: :mod:`pypattern.ops` (see :func:`backends`).
"""

from . import (
    circuits,
    devinterp,
    equivalence,
    flags,
    losses,
    models,
    ops,
    patching,
    patterning,
    sampling,
    susceptibility,
    tasks,
    truth,
)
from ._backends import backends
from .equivalence import (
    MinibatchCKA,
    cka_matrix,
    interpretive_equivalence,
    linear_cka,
    permutation_test,
    procrustes,
)
from .flags import (
    FlagReport,
    FlagSpec,
    ablate_flags,
    flag_loss,
    flag_report,
    generate,
    overwrite_flags,
    probe_accuracy,
    read_flags,
    steer,
    train_flags,
)
from .gram import GramSite, per_sample_grad_gram, transformer_lens_sites
from .models import Transformer, TransformerConfig, component_masks
from .models.convert import UnsupportedModelError, from_hf, from_pretrained
from .models.hf import hooked_hf
from .ops import CrossCovariance, center_gram, sgld_chains_step_, sgld_step_
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
    DriftWarning,
    LLCResult,
    NonStationaryWarning,
    OnlineLLC,
    SampleResult,
    SamplingDivergedError,
    StepBiasWarning,
    calibrate_step_size,
    default_nbeta,
    estimate_learning_coeff,
    estimate_learning_coeff_with_summary,
    estimate_llc,
    refined_llc,
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
)

__version__ = "0.1.0"

# The public names, in groups; each group is sorted (Python's string order: capitals first).
# tests/test_api.py checks that every name resolves and that each group below stays sorted.

# Estimators: sampling and the LLC, susceptibilities, patterning, patching, representation similarity.
__all__ = [
    "MinibatchCKA",
    "OnlineLLC",
    "SGLD",
    "activation_patching",
    "attribution_patching",
    "bif",
    "calibrate_step_size",
    "cka_matrix",
    "default_nbeta",
    "estimate_learning_coeff",
    "estimate_learning_coeff_with_summary",
    "estimate_llc",
    "interpretive_equivalence",
    "invert",
    "linear_cka",
    "permutation_test",
    "procrustes",
    "refined_llc",
    "reweight",
    "sample",
    "shortlist_and_confirm",
    "susceptibilities",
]
# Patching corruptions and metrics (arguments of activation_patching and attribution_patching).
__all__ += [
    "GaussianNoise",
    "KL",
    "LogProb",
    "LogitDiff",
    "MeanAblation",
    "Prob",
    "TokenReplacement",
    "ZeroAblation",
]
# Concept flags: the spec, the loss, training, steering, generation and the report.
__all__ += [
    "FlagSpec",
    "ablate_flags",
    "flag_loss",
    "flag_report",
    "generate",
    "overwrite_flags",
    "probe_accuracy",
    "read_flags",
    "steer",
    "train_flags",
]
# Results (each with save/load), the sampler's divergence error and its diagnostics' warnings.
__all__ += [
    "DriftWarning",
    "FlagReport",
    "LLCResult",
    "NonStationaryWarning",
    "PatchResult",
    "SampleResult",
    "SamplingDivergedError",
    "StepBiasWarning",
    "SusceptibilityResult",
]
# Ops: the fused SGLD step, streaming covariance, per-sample gradient Gram, and the backend report.
__all__ += [
    "CrossCovariance",
    "GramSite",
    "backends",
    "center_gram",
    "per_sample_grad_gram",
    "sgld_chains_step_",
    "sgld_step_",
    "transformer_lens_sites",
]
# Models: the hooked transformer (TransformerLens hook names), converters from Hugging Face and TransformerLens
# (and the error they raise for what they do not convert exactly), the adapter for Hugging Face models left
# unconverted, and per-component parameter masks.
__all__ += [
    "Transformer",
    "TransformerConfig",
    "UnsupportedModelError",
    "component_masks",
    "from_hf",
    "from_pretrained",
    "hooked_hf",
]
# Tasks: synthetic tasks and their scores (training loop: pypattern.tasks.train).
__all__ += [
    "IOITask",
    "InductionTask",
    "ParenthesesTask",
    "TopicTask",
    "algorithm_scores",
    "prefix_matching_score",
]
# Submodules, for everything else (pypattern.distributed is imported on its own: it needs torch.distributed).
__all__ += [
    "circuits",
    "devinterp",
    "equivalence",
    "flags",
    "losses",
    "models",
    "ops",
    "patching",
    "patterning",
    "sampling",
    "susceptibility",
    "tasks",
    "truth",
]
__all__ += ["__version__"]
