"""devinterp's public signatures against pypattern.devinterp's, read from the installed devinterp (the tables of
tests/test_devinterp_parity_audit.py come from this script). Run where devinterp is installed::

    OMP_NUM_THREADS=1 .bench-venvs/devinterp20/bin/python bench/compare_devinterp_api.py   # or devinterp13

For each callable of devinterp's LLC, susceptibility and BIF interface (those the installed release has) it prints
devinterp's signature as table data, then every difference: a devinterp parameter pypattern lacks, a default that
differs, a positional parameter that sits elsewhere, a parameter pypattern requires that devinterp does not.
Extra keyword parameters of pypattern's are not differences.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys

PATHS = [
    "slt.llc:llc", "slt.llc:compute_llc", "slt.sampling:sample", "slt.susceptibilities:susceptibilities",
    "slt.susceptibilities:compute_susceptibilities", "slt.bif:bif", "slt.bif:compute_bif",
    "slt.weight_restrictions:create_param_masks", "slt.sampler:estimate_learning_coeff_with_summary",
    "slt.sampler:estimate_learning_coeff", "slt.sampler:sample", "slt.llc:LLCEstimator", "slt.llc:OnlineLLCEstimator",
    "utils:default_nbeta", "utils:get_init_loss_one_batch", "utils:get_init_loss_multi_batch",
    "utils:get_init_loss_full_batch", "utils:make_evaluate", "utils:evaluate", "optim:SGLD", "optim:SGNHT",
    "optim:SGMCMC", "optim:SGMCMC.sgld", "optim:SGMCMC.sgnht", "optim:SGMCMC.rmsprop_sgld", "optim:SGMCMC.get_method",
]  # fmt: skip
KIND = {"POSITIONAL_OR_KEYWORD": "p", "KEYWORD_ONLY": "k", "VAR_KEYWORD": "**", "VAR_POSITIONAL": "*"}


def _get(prefix: str, path: str):
    mod, name = path.split(":")
    try:
        obj = importlib.import_module(f"{prefix}.{mod}")
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj


def _table(obj) -> list[tuple[str, str, str]]:
    return [
        (
            p.name,
            KIND.get(p.kind.name, p.kind.name),
            "<required>" if p.default is p.empty else repr(p.default),
        )
        for p in inspect.signature(obj).parameters.values()
    ]


def main() -> int:
    if importlib.util.find_spec("devinterp") is None:
        raise SystemExit(
            "devinterp is not installed here: run in .bench-venvs/devinterp20 (bash bench/envs/devinterp.sh)"
        )
    from importlib.metadata import version

    print(f"devinterp {version('devinterp')}")
    n_diff = 0
    for path in PATHS:
        theirs = _get("devinterp", path)
        if theirs is None:
            continue
        ours = _get("pypattern.devinterp", path)
        t = _table(theirs)
        print(f"{path!r}: {t},")
        if ours is None:
            print(f"  MISSING in pypattern.devinterp: {path}")
            n_diff += 1
            continue
        o = _table(ours)
        by_name = {n: (i, k, d) for i, (n, k, d) in enumerate(o)}
        for i, (name, kind, default) in enumerate(t):
            if kind == "**":
                if not any(k == "**" for _, k, _ in o):
                    print("  no **kwargs")
                    n_diff += 1
                continue
            if name not in by_name:
                print(f"  no parameter {name}")
                n_diff += 1
                continue
            _, k, d = by_name[name]
            if default != "<required>" and d != default:
                print(f"  {name}: default {d} (devinterp {default})")
                n_diff += 1
            if kind == "p" and (i >= len(o) or o[i][0] != name or o[i][1] != "p"):
                print(f"  position {i}: {o[i][:2] if i < len(o) else None} (devinterp {name})")
                n_diff += 1
        for name, k, d in o:
            if d == "<required>" and k in ("p", "k") and name not in {n for n, _, _ in t}:
                print(f"  requires {name}, which devinterp does not have")
                n_diff += 1
    print(f"{n_diff} differences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
