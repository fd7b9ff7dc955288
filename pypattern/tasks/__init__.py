"""Synthetic tasks that train in seconds on a CPU: induction, parentheses balancing, an IOI-like name task,
topics (a language-modelling task with concepts, for concept flags)."""

from .base import IGNORE, Task, TaskBatch, per_sample_loss
from .induction import (
    InductionTask,
    induction_probe,
    prefix_matching_score,
    previous_token_score,
    repeated_tokens,
)
from .ioi import IOITask, symmetric_pairs
from .parens import ALGORITHMS, ParenthesesTask, algorithm_scores
from .topics import TopicTask
from .training import TrainResult, train

__all__ = [
    "IGNORE",
    "Task",
    "TaskBatch",
    "per_sample_loss",
    "InductionTask",
    "prefix_matching_score",
    "previous_token_score",
    "repeated_tokens",
    "induction_probe",
    "IOITask",
    "symmetric_pairs",
    "ParenthesesTask",
    "TopicTask",
    "ALGORITHMS",
    "algorithm_scores",
    "train",
    "TrainResult",
]
