"""End-to-end experiments and the demos of the ``pypattern`` command.

Patterning on built-in tasks (induction onset, parentheses algorithm selection): ``run_patterning_demo(out_dir)``
runs both and writes plots; the pieces are importable on their own. The other demos: :mod:`.llc_demo` (``pypattern
llc``), :mod:`.patching_demo` (``pypattern patch``), :mod:`.flags_demo`, :mod:`.equivalence_demo` and
:mod:`.parens_llc` (parentheses patterning with each solution's own LLC).
"""

from .induction import InductionSettings, run_induction_experiment, run_induction_seed
from .parens import ParensSettings, run_parens_experiment, run_parens_seed
from .patterning_demo import run_patterning_demo

__all__ = [
    "run_patterning_demo",
    "InductionSettings",
    "run_induction_experiment",
    "run_induction_seed",
    "ParensSettings",
    "run_parens_experiment",
    "run_parens_seed",
]
