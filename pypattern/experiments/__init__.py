"""End-to-end experiments and the demos of the ``pypattern`` command.

Patterning on built-in tasks (induction onset, parentheses algorithm selection): ``run_patterning_demo(out_dir)``
runs both and writes plots; the pieces are importable on their own. The other demos: :mod:`.llc_demo` (``pypattern
llc``), :mod:`.patching_demo` (``pypattern patch``), :mod:`.flags_demo`, :mod:`.equivalence_demo` and
:mod:`.parens_llc` (parentheses patterning with each solution's own LLC).
"""

import importlib

# imported when first read (PEP 562): ``python -m pypattern.experiments.<module>`` then runs a module the package
# has not imported already (runpy warns otherwise)
_LAZY = {
    "InductionSettings": "induction",
    "run_induction_experiment": "induction",
    "run_induction_seed": "induction",
    "ParensSettings": "parens",
    "run_parens_experiment": "parens",
    "run_parens_seed": "parens",
    "run_patterning_demo": "patterning_demo",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "run_patterning_demo",
    "InductionSettings",
    "run_induction_experiment",
    "run_induction_seed",
    "ParensSettings",
    "run_parens_experiment",
    "run_parens_seed",
]
