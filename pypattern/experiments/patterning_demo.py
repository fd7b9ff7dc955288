"""``pypattern demo patterning``: both patterning experiments end to end, with plots and a JSON report.

Run as ``pypattern demo patterning [--full | --quick] [--out DIR]`` or ``python -m
pypattern.experiments.patterning_demo [DIR] [--full | --quick]``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from ..io import json_text
from ._outputs import check_outputs
from .induction import GROUP_NAMES, InductionSettings, run_induction_experiment
from .parens import PARENS_GROUP_NAMES, ParensSettings, run_parens_experiment

__all__ = [
    "full_settings",
    "headline",
    "main",
    "quick_settings",
    "reduced_settings",
    "run_patterning_demo",
]


def reduced_settings() -> tuple[dict, InductionSettings, dict, ParensSettings]:
    """Settings of the default demo (< 10 minutes on 2 cores)."""
    ind = InductionSettings()
    par = ParensSettings(steps=1000)
    return {"seeds": (0, 1, 2)}, ind, {"seeds": (0, 1)}, par


def full_settings() -> tuple[dict, InductionSettings, dict, ParensSettings]:
    """Settings of the full run (``full=True``): more seeds, longer caps and more SGLD draws."""
    ind = InductionSettings(
        max_steps=8000, cap_factor=2.5, chi_num_chains=4, chi_num_draws=100, probe_size=16
    )
    par = ParensSettings(steps=1500, chi_num_chains=4, chi_num_draws=100)
    return {"seeds": (0, 1, 2)}, ind, {"seeds": tuple(range(6))}, par


def quick_settings() -> tuple[dict, InductionSettings, dict, ParensSettings]:
    """Tiny sizes, one seed each (``quick=True``): checks that the pipeline runs, in about a minute; its
    figures mean nothing."""
    ind = InductionSettings(
        d_vocab=12, seq_len=13, d_model=16, n_heads=2, batch_size=16, checkpoint_step=20, max_steps=60,
        eval_every=10, num_eval=32, probe_size=3, chi_num_chains=2, chi_num_draws=6, chi_num_burnin_steps=2,
        threshold=2.0,
    )  # fmt: skip
    par = ParensSettings(
        length=6, d_model=16, d_mlp=16, batch_size=32, checkpoint_step=10, steps=40, probe_train_size=48,
        chi_num_chains=2, chi_num_draws=6, chi_num_burnin_steps=2,
    )  # fmt: skip
    return {"seeds": (0,)}, ind, {"seeds": (0,)}, par


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.bool_):  # (before the numbers: a numpy bool is written as true/false, not its repr)
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    return repr(x)


def _plot_induction(res: dict, out: Path) -> list[str]:
    from . import _figures as plt

    paths = []
    per = res["per_seed"]
    s = res["settings"]
    fig, axes = plt.subplots(2, len(per), figsize=(4.2 * len(per), 6.4), squeeze=False)
    colors = {"baseline": "k", "accelerate": "tab:green", "delay": "tab:red"}
    for ax, ax_pm, r in zip(axes[0], axes[1], per):
        for name, run in r["runs"].items():
            c = run["curve"]
            on = run["onset"]
            lab = (
                f"{name} (onset {on:.0f})"
                if math.isfinite(on)
                else f"{name} (no onset by {run['censored_at']})"
            )
            ax.plot(c[:, 0], c[:, 1], color=colors[name], label=lab)
            if c.shape[1] > 3:
                ax_pm.plot(c[:, 0], c[:, 3], color=colors[name], label=name)
        ax_pm.set_ylim(0, 1)
        ax_pm.set_xlabel("training step")
        ax_pm.set_ylabel("prefix matching, last layer (max head)")
        ax_pm.axvline(s["checkpoint_step"], color="gray", ls="--", lw=1)
        ax.axhline(s["threshold"], color="gray", ls=":", lw=1)
        ax.axvline(s["checkpoint_step"], color="gray", ls="--", lw=1)
        ax.set_title(f"seed {r['seed']}: PC{r['patterning']['pc'] + 1} patterning")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss on induction tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "induction_onset.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))

    fig, axes = plt.subplots(2, len(per), figsize=(4.2 * len(per), 6.5), squeeze=False)
    for j, r in enumerate(per):
        chi = r["chi"]
        pca = r["patterning"]["pca"]
        k = min(3, pca.directions.shape[0])
        x = np.arange(len(chi.components))
        for i in range(k):
            axes[0, j].bar(
                x + (i - 1) * 0.25,
                pca.directions[i],
                width=0.25,
                label=f"PC{i + 1} ({100 * pca.explained_variance_ratio[i]:.0f}%)",
            )
        axes[0, j].set_xticks(
            x, [c.replace("blocks.", "L").replace(".attn.head.", "H") for c in chi.components]
        )
        axes[0, j].set_title(f"seed {r['seed']}: principal susceptibility directions", fontsize=9)
        axes[0, j].legend(fontsize=7)
        g = r["column_groups"]
        for gi, gname in enumerate(GROUP_NAMES):
            m = g == gi
            axes[1, j].scatter(
                pca.scores[m, 0], pca.scores[m, 1] if k > 1 else 0 * pca.scores[m, 0], s=6, label=gname
            )
        axes[1, j].set_xlabel("PC1 score")
        axes[1, j].set_ylabel("PC2 score")
        axes[1, j].legend(fontsize=7)
    fig.tight_layout()
    p = out / "induction_chi_directions.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))
    return paths


def _plot_parens(res: dict, out: Path) -> list[str]:
    from . import _figures as plt

    per = res["per_seed"]
    conds = list(per[0]["runs"])
    algs = per[0]["algorithms"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    grid = np.array([[algs.index(r["runs"][c]["learned"]) for r in per] for c in conds])
    ax.imshow(grid, cmap="Set2", vmin=0, vmax=len(algs) - 1, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            run = per[j]["runs"][conds[i]]
            sc = run["scores"]
            ax.text(
                j,
                i,
                f"{algs[grid[i, j]]}\nagr. {sc['cells/' + sc['best']]:.2f} train {sc['train/' + sc['best']]:.2f}",
                ha="center",
                va="center",
                fontsize=6,
            )
    ax.set_yticks(range(len(conds)), conds, fontsize=7)
    ax.set_xticks(range(len(per)), [f"seed {r['seed']}" for r in per])
    ax.set_title(
        "algorithm learned (best cell agreement >= 0.9 and training fit >= 0.98, else 'other')", fontsize=8
    )
    w = np.array([per[0]["runs"][c]["group_weights"] for c in conds])
    x = np.arange(len(PARENS_GROUP_NAMES))
    for i, c in enumerate(conds):
        ax2.bar(x + (i - len(conds) / 2) * 0.8 / len(conds), w[i], width=0.8 / len(conds), label=c)
    ax2.set_xticks(x, [n.replace("_", "\n") for n in PARENS_GROUP_NAMES], fontsize=6)
    ax2.set_ylabel(f"group weight (seed {per[0]['seed']})")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    p = out / "parens_algorithms.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [str(p)]


def run_patterning_demo(out_dir, full: bool = False, log=print, quick: bool = False) -> dict:
    """Run the induction-onset and parentheses-selection patterning experiments, write plots and a summary.

    Parameters
    ----------
    out_dir : path
        Created if missing; receives ``induction_onset.png``, ``induction_chi_directions.png``,
        ``parens_algorithms.png`` and ``patterning_summary.json``.
    full : bool
        Full sizes (:func:`full_settings`) instead of the reduced demo (:func:`reduced_settings`, < 10 minutes
        on 2 cores).
    quick : bool
        Tiny sizes (:func:`quick_settings`): a check that everything runs, not a measurement.
    log : callable or None
        Progress messages.

    Returns
    -------
    dict
        ``{"induction": summary, "parens": summary, "plots": [paths], "seconds": {...}, "report": path}``
        plus the settings; :func:`headline` condenses it for a person to read.
    """
    if full and quick:
        raise ValueError("full=True and quick=True: choose at most one of them")
    out = Path(out_dir)
    names = ("induction_onset.png", "induction_chi_directions.png", "parens_algorithms.png")
    check_outputs(out, (*names, "patterning_summary.json"))
    os.makedirs(out, exist_ok=True)
    log = log or (lambda *a: None)
    ik, ind_s, pk, par_s = full_settings() if full else quick_settings() if quick else reduced_settings()
    t0 = time.perf_counter()
    ind = run_induction_experiment(ik["seeds"], ind_s, log=log)
    t1 = time.perf_counter()
    par = run_parens_experiment(pk["seeds"], par_s, log=log)
    t2 = time.perf_counter()
    plots = _plot_induction(ind, out) + _plot_parens(par, out)
    induction_summary = dict(ind["summary"])
    induction_summary["group_weights"] = {
        n: [r["runs"][n]["group_weights"] for r in ind["per_seed"]] for n in ("accelerate", "delay")
    }
    induction_summary["group_names"] = list(GROUP_NAMES)
    parens_summary = dict(par["summary"])
    parens_summary["group_weights"] = {
        c: [r["runs"][c]["group_weights"] for r in par["per_seed"]] for c in par["per_seed"][0]["runs"]
    }
    parens_summary["scores"] = {
        c: [r["runs"][c]["scores"] for r in par["per_seed"]] for c in par["per_seed"][0]["runs"]
    }
    parens_summary["at_checkpoint"] = [r["at_checkpoint"] for r in par["per_seed"]]
    parens_summary["group_names"] = list(PARENS_GROUP_NAMES)
    result = {
        "full": full,
        "induction": induction_summary,
        "induction_settings": ind["settings"],
        "parens": parens_summary,
        "parens_settings": par["settings"],
        "plots": plots,
        "seconds": {"induction": t1 - t0, "parens": t2 - t1, "total": time.perf_counter() - t0},
    }
    report = out / "patterning_summary.json"
    with open(report, "w") as f:
        f.write(json_text(_jsonable(result), indent=1))
    result["report"] = str(report)
    return result


def _pct(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.0f}%"


def _shift(ind: dict, name: str, i: int) -> str:
    """Seed ``i``'s onset shift of run ``name`` against the baseline; a run censored at its cap (no onset by then)
    shows the lower bound its last step gives, as ``>= +60%``."""
    if ind["censored_at"][name][i] is None:
        return _pct(ind["relative_shift"][name][i])
    bound = _pct(ind["relative_shift_lower_bound"][name][i])
    return bound if bound == "n/a" else f">= {bound}"


def headline(result: dict) -> dict:
    """A few lines a person can read from :func:`run_patterning_demo`'s result: induction onsets and shifts per
    seed, the parentheses selection rates, where the plots and the full report are, and the time taken. Also reads
    the written report (``json.load`` of ``patterning_summary.json``, with ``"report"`` added), where the onsets
    that are not finite are null."""
    ind, par = result["induction"], result["parens"]
    onset = ind["onset"]
    lines = {}
    for i, seed in enumerate(ind["seeds"]):
        on = " / ".join(
            "none" if onset[n][i] is None or not math.isfinite(onset[n][i]) else f"{onset[n][i]:.0f}"
            for n in ("baseline", "accelerate", "delay")
        )
        shifts = " / ".join(_shift(ind, n, i) for n in ("accelerate", "delay"))
        lines[f"induction seed {seed}: onset step baseline / accelerate / delay"] = f"{on} (shift {shifts})"
    for t, rate in par["target_hit_rate"].items():
        lines[f"parentheses target {t!r}: selected in (patterned vs baseline)"] = (
            f"{rate:.0%} vs {par['baseline_rate'][t]:.0%} of {len(par['seeds'])} seeds"
        )
    lines["plots"] = ", ".join(result["plots"])
    lines["seconds"] = round(result["seconds"]["total"], 1)
    lines["report"] = result["report"]
    return lines


def main(argv=None) -> int:
    """``python -m pypattern.experiments.patterning_demo [out_dir] [--full | --quick]``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m pypattern.experiments.patterning_demo",
        description="The patterning experiments (induction onset, parentheses algorithm selection).",
    )
    ap.add_argument(
        "out_dir", nargs="?", default="patterning_demo", help="folder for the plots and the report"
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument(
        "--full", action="store_true", help="full sizes (more seeds, longer step caps, more SGLD draws)"
    )
    size.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the pipeline runs; figures mean nothing"
    )
    a = ap.parse_args(argv)
    res = run_patterning_demo(a.out_dir, full=a.full, quick=a.quick)
    print("patterning experiments:")
    for k, v in headline(res).items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
