"""``pypattern patch``: the patching demo on the built-in model and task (heatmap PNG + CSV table)."""

from __future__ import annotations

import csv
import os
import time

import torch

from .._checks import is_count
from ._outputs import check_outputs
from .user_model import _write

__all__ = ["QUICK", "run_patch_demo"]

#: Tiny sizes for ``pypattern patch --quick``: checks that the demo runs; figures mean nothing.
QUICK = dict(steps=40, num_prompts=12)


def run_patch_demo(
    out_dir: str = "out/patch", steps: int = 300, num_prompts: int = 64, seed: int = 0
) -> dict:
    """Train the built-in transformer on the IOI-like task, then patch it.

    Runs exact denoising patching of ``resid_pre`` (layer x position) and of every head's output ``z`` (layer x
    head, all positions) with the "ABC" corruption (the earlier mention of the subject replaced by a third name,
    :meth:`~pypattern.tasks.IOITask.patching_pairs`) and the logit-difference metric, plus attribution
    patching (AtP) over the same grids, and writes ``patching_heatmap.png``, ``patching_table.csv`` and
    ``patching_summary.json`` (the returned dict) into ``out_dir``.

    Returns
    -------
    dict
        Accuracy, clean/corrupted logit difference, the strongest cells, AtP/exact Spearman agreement, timings
        and the written paths (``heatmap``, ``table``, ``summary``).

    Raises
    ------
    ValueError
        ``seed`` not an int in ``[0, 2**63)``, ``steps`` negative or ``num_prompts`` below 1, naming it, before
        any work.
    """
    from scipy.stats import spearmanr

    from .._threads import pinned_threads
    from ..models.transformer import Transformer
    from ..patching import LogitDiff, activation_patching, attribution_patching
    from ..tasks import IOITask, train

    # checked before any work, naming the demo's own arguments (the prompts are drawn with seed + 1 and the
    # accuracy's samples with seed + 99)
    if not is_count(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} is not valid; give an int in [0, 2**63)")
    for name, value, least in (("steps", steps, 0), ("num_prompts", num_prompts, 1)):
        if not is_count(value) or value < least:
            raise ValueError(f"{name}={value!r} is not valid; give an int >= {least}")
    check_outputs(out_dir, ("patching_heatmap.png", "patching_table.csv", "patching_summary.json"))
    os.makedirs(out_dir, exist_ok=True)
    with pinned_threads(1), torch.random.fork_rng(devices=[]):
        t0 = time.perf_counter()
        task = IOITask()
        torch.manual_seed(seed)
        model = Transformer(task.model_config(seed=seed))
        train(model, task, steps=steps, seed=seed, quiet=True)
        acc = task.accuracy(model, task.sample(1000, seed=seed + 99))
        t_train = time.perf_counter() - t0
        clean, corr, ans, wrong = task.patching_pairs(num_prompts, seed=seed + 1, corruption="abc")
        met = LogitDiff(ans, wrong)
        t1 = time.perf_counter()
        resid = activation_patching(model, "resid_pre", clean, corr, metric=met)
        heads = activation_patching(model, "z", clean, corr, metric=met, per_position=False)
        t_exact = time.perf_counter() - t1
        t2 = time.perf_counter()
        atp_r = attribution_patching(model, clean, corr, metric=met, sites=["resid_pre"])["resid_pre"]
        atp_h = attribution_patching(model, clean, corr, metric=met, sites=["z"], per_position=False)["z"]
        t_atp = time.perf_counter() - t2
        same_r, same_h = _unchanged_cells(model, clean, corr, len(resid.coords["layer"]))
        rho_r = _spearman(resid, atp_r, same_r, spearmanr)
        rho_h = _spearman(heads, atp_h, same_h, spearmanr)

        png = os.path.join(out_dir, "patching_heatmap.png")
        _plot(resid, heads, atp_r, task, png)
        table = os.path.join(out_dir, "patching_table.csv")
        _write_table(table, [("exact", resid), ("exact", heads), ("atp", atp_r), ("atp", atp_h)])
    summary = {
        "task": "ioi (ABC corruption)",
        "settings": {"steps": steps, "num_prompts": num_prompts, "seed": seed},
        "accuracy": acc,
        "logit_diff_clean": float(resid.clean.mean()),
        "logit_diff_corrupted": float(resid.corrupted.mean()),
        "top_resid_pre": _cells(resid.top(3, normalized=True)),
        "top_heads": _cells(heads.top(3, normalized=True)),
        "spearman_atp_exact_resid_pre": rho_r,
        "spearman_atp_exact_heads": rho_h,
        "seconds_train": round(t_train, 2),
        "seconds_exact": round(t_exact, 3),
        "seconds_atp": round(t_atp, 4),
        "heatmap": png,
        "table": table,
        "summary": os.path.join(out_dir, "patching_summary.json"),
    }
    _write(out_dir, "patching_summary.json", summary)
    return summary


@torch.no_grad()
def _unchanged_cells(model, clean, corr, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells whose clean and corrupted activations are equal on every prompt: ``(layer, pos)`` of ``resid_pre``
    and ``(layer, head)`` of ``z`` (all positions). Patching them changes nothing: their exact effect is 0 (what
    the patched run gives there is rounding, about 1e-8 of the metric)."""
    names = [f"blocks.{layer}.{h}" for layer in range(n_layers) for h in ("hook_resid_pre", "attn.hook_z")]
    _, cc = model.run_with_cache(clean, names_filter=names)
    _, kc = model.run_with_cache(corr, names_filter=names)
    same = {n: cc[n] == kc[n] for n in names}
    resid = torch.stack([same[f"blocks.{layer}.hook_resid_pre"].all(2).all(0) for layer in range(n_layers)])
    heads = torch.stack(
        [same[f"blocks.{layer}.attn.hook_z"].all(3).all(1).all(0) for layer in range(n_layers)]
    )
    return resid, heads


def _spearman(exact, atp, unchanged: torch.Tensor, spearmanr) -> float:
    """Spearman correlation of the mean effects of exact patching and AtP over the grid, with the cells patching
    cannot change (``unchanged``) at exactly 0 in both: ties, not the order of the exact run's rounding errors
    (AtP gives them exactly 0)."""
    e, a = exact.effect.mean(0).clone(), atp.effect.mean(0).clone()
    e[unchanged], a[unchanged] = 0.0, 0.0
    return float(spearmanr(e.flatten(), a.flatten())[0])


def _cells(top: list[tuple[dict, float]]) -> str:
    """``PatchResult.top`` as one line: ``layer 1 head 3: +0.62; ...``."""
    return "; ".join(" ".join(f"{k} {v}" for k, v in c.items()) + f": {m:+.3f}" for c, m in top)


def _plot(resid, heads, atp_r, task, path: str) -> None:
    from . import _figures as plt

    labels = [t if t != "f" else "filler" for t in task.template]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    panels = [
        (resid.mean(), "exact: resid_pre (normalised)", "position", labels),
        (atp_r.mean(), "AtP: resid_pre (normalised)", "position", labels),
        (heads.mean(), "exact: head outputs z, all positions", "head", None),
    ]
    for ax, (m, title, xlab, xt) in zip(axes, panels):
        lim = max(float(m.abs().max()), 1e-6)
        im = ax.imshow(m.numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlab)
        ax.set_ylabel("layer")
        ax.set_yticks(range(m.shape[0]))
        if xt:
            ax.set_xticks(range(len(xt)))
            ax.set_xticklabels(xt, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Denoising activation patching, IOI-like task, logit difference (1 = clean, 0 = corrupted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_table(path: str, results) -> None:
    rows = []
    for method, r in results:
        for rec in r.to_records(normalized=True):
            rows.append(
                {
                    "method": method,
                    "site": r.site,
                    "layer": rec["layer"],
                    "head": rec.get("head", ""),
                    "pos": rec.get("pos", "all"),
                    "mean": rec["mean"],
                    "se": rec["se"],
                    "ci_low": rec["ci_low"],
                    "ci_high": rec["ci_high"],
                }
            )
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> dict:
    """``python -m pypattern.experiments.patching_demo [out_dir] [--quick] [--seed N]``."""
    import argparse

    from ..cli import seed_int

    ap = argparse.ArgumentParser(prog="python -m pypattern.experiments.patching_demo", description=__doc__)
    ap.add_argument(
        "out_dir", nargs="?", default="out/patch", help="folder for the heatmap, table and summary"
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the demo runs; figures mean nothing"
    )
    ap.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of the model, the training and the prompts (0 .. 2**63 - 1)",
    )
    a = ap.parse_args(argv)
    summary = run_patch_demo(a.out_dir, seed=a.seed, **(QUICK if a.quick else {}))
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return summary


if __name__ == "__main__":  # pragma: no cover
    main()
