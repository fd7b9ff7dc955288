"""Activation patching: sites, corruptions, metrics, the exact batched engine and attribution patching."""

from .api import activation_patching, prepare_runs
from .attribution import attribution_patching, shortlist_and_confirm
from .corruptions import Corruption, GaussianNoise, MeanAblation, TokenReplacement, ZeroAblation
from .engine import ExactEngine
from .metrics import KL, LogitDiff, LogProb, Metric, Prob, kl_div, logit_diff, logprob, prob
from .results import PatchResult
from .sites import HEAD_SITES, RESID_SITES, SITES, Cell, hook_name, make_cells

__all__ = [
    "activation_patching",
    "prepare_runs",
    "attribution_patching",
    "shortlist_and_confirm",
    "ExactEngine",
    "Corruption",
    "TokenReplacement",
    "GaussianNoise",
    "ZeroAblation",
    "MeanAblation",
    "Metric",
    "LogitDiff",
    "Prob",
    "LogProb",
    "KL",
    "logit_diff",
    "prob",
    "logprob",
    "kl_div",
    "PatchResult",
    "SITES",
    "HEAD_SITES",
    "RESID_SITES",
    "Cell",
    "hook_name",
    "make_cells",
]
