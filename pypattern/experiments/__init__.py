"""End-to-end experiments: patterning on built-in tasks (induction onset, parentheses algorithm selection).

``run_patterning_demo(out_dir, full=False)`` runs both and writes plots; the pieces are importable on their own.
"""

from .cli import run_patterning_demo
from .induction import InductionSettings, run_induction_experiment, run_induction_seed
from .parens import ParensSettings, run_parens_experiment, run_parens_seed

__all__ = [
    "run_patterning_demo",
    "InductionSettings",
    "run_induction_experiment",
    "run_induction_seed",
    "ParensSettings",
    "run_parens_experiment",
    "run_parens_seed",
]
