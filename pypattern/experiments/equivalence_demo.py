"""``pypattern demo cka``: compare the representations of induction models that did and did not form a
canonical induction head (layer by layer CKA and Procrustes on the tokens predictable by induction, with
permutation p-values)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np

from .._threads import pinned_threads
from ..equivalence import cka_matrix, permutation_test, procrustes
from ..io import json_text
from ..models.transformer import Transformer
from ..tasks.induction import InductionTask, prefix_matching_score
from ..tasks.training import train
from ._outputs import check_outputs

__all__ = ["EquivalenceDemoSettings", "check_settings", "run_equivalence_demo"]


@dataclasses.dataclass
class EquivalenceDemoSettings:
    """Defaults: the induction experiment's model and task (docs/patterning_results.md), seeds 0-2 (in the
    measured run of 2026-12-01, seeds 0 and 1 formed a canonical induction head and seed 2 did not)."""

    d_vocab: int = 64
    seq_len: int = 33
    d_model: int = 32
    n_heads: int = 2
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    num_inputs: int = 256
    num_permutations: int = 100
    num_threads: int | None = 1

    @classmethod
    def quick(cls) -> EquivalenceDemoSettings:
        """Tiny sizes (30 training steps, 40 inputs): checks that the demo runs; figures mean nothing."""
        return cls(d_vocab=16, seq_len=13, d_model=16, steps=30, num_inputs=40, num_permutations=20)


def check_settings(s: EquivalenceDemoSettings) -> EquivalenceDemoSettings:
    """Refuse, naming the field, settings the demo would fail on only after training its models: fewer than two
    distinct seeds >= 0 (the demo compares pairs), counts below 1, a learning rate that is not a finite positive
    number, a thread count that is not None or an int >= 1."""
    from .._checks import is_count, is_real

    if not isinstance(s, EquivalenceDemoSettings):
        raise TypeError(f"settings are a {type(s).__name__}; give an EquivalenceDemoSettings")
    try:
        seeds = () if isinstance(s.seeds, str) else tuple(s.seeds)
    except TypeError:
        seeds = ()
    if not all(is_count(v) and v >= 0 for v in seeds) or len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ValueError(
            f"seeds={s.seeds!r} is not valid; give two or more distinct ints >= 0 (the demo compares every pair)"
        )
    for field in (
        "d_vocab",
        "seq_len",
        "d_model",
        "n_heads",
        "steps",
        "batch_size",
        "num_inputs",
        "num_permutations",
    ):
        value = getattr(s, field)
        if not is_count(value) or value < 1:
            raise ValueError(f"{field}={value!r} is not valid; give an int >= 1")
    if not is_real(s.lr) or not 0 < s.lr < float("inf"):
        raise ValueError(f"lr={s.lr!r} is not valid; give a finite number > 0")
    if s.num_threads is not None and (not is_count(s.num_threads) or s.num_threads < 1):
        raise ValueError(f"num_threads={s.num_threads!r} is not valid; give None or an int >= 1")
    return s


def run_equivalence_demo(out_dir: str | Path = "out/demo/cka", s: EquivalenceDemoSettings | None = None):
    """Train one model per seed, then compare every pair layer by layer. Writes ``equivalence.json`` and
    ``equivalence_cka.png``; returns the headline numbers. Settings are checked (:func:`check_settings`), and
    the inputs must hold at least 4 tokens predictable by induction (debiased CKA needs 4 samples), before any
    model is trained."""
    s = check_settings(s or EquivalenceDemoSettings())
    out = Path(out_dir)
    check_outputs(out, ("equivalence.json", "equivalence_cka.png"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = InductionTask(d_vocab=s.d_vocab, seq_len=s.seq_len)
    batch = task.sample(s.num_inputs, seed=99)
    flag = batch.extra["induction_flag"]
    if int(flag.sum()) < 4:  # the samples of every comparison; checked before any training
        raise ValueError(
            f"num_inputs={s.num_inputs!r} gives {int(flag.sum())} tokens predictable by induction; the comparisons "
            "need at least 4 (debiased CKA): give more inputs"
        )
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(2)]
    scores, reps = {}, {}
    with pinned_threads(s.num_threads or None):
        for seed in s.seeds:
            m = Transformer(task.model_config(d_model=s.d_model, n_heads=s.n_heads, seed=seed))
            train(
                m, task, steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=seed, log_every=0, quiet=True
            )
            m.eval()
            scores[seed] = float(prefix_matching_score(m, half_len=task.repeat_len, num_samples=64)[-1].max())
            _, cache = m.run_with_cache(batch.tokens, names_filter=names)
            reps[seed] = [cache[n][flag] for n in names]  # (induction tokens, d_model) per layer
        pairs = {}
        for a, b in itertools.combinations(s.seeds, 2):
            cka = cka_matrix(reps[a], reps[b]).numpy()
            pairs[f"{a}-{b}"] = {
                "cka": cka.tolist(),
                "procrustes": [procrustes(reps[a][i], reps[b][i]) for i in range(2)],
                "cka_p_value": [
                    permutation_test(
                        reps[a][i], reps[b][i], num_permutations=s.num_permutations, seed=i
                    ).p_value
                    for i in range(2)
                ],
            }
    result = {
        "settings": dataclasses.asdict(s),
        "prefix_matching_score": scores,
        "num_induction_tokens": int(flag.sum()),
        "pairs": pairs,
        "seconds": time.perf_counter() - t0,
    }
    (out / "equivalence.json").write_text(json_text(result))
    _plot(result, out / "equivalence_cka.png")
    summary = {"prefix-matching score per seed": {k: round(v, 2) for k, v in scores.items()}}
    for key, p in pairs.items():
        summary[f"seeds {key}: CKA layer 0 / layer 1 (p)"] = (
            f"{p['cka'][0][0]:.3f} ({p['cka_p_value'][0]:.3f}) / {p['cka'][1][1]:.3f} ({p['cka_p_value'][1]:.3f})"
        )
    summary["seconds"] = round(result["seconds"], 1)
    summary["report"] = str(out / "equivalence.json")
    return summary


def _plot(result: dict, path: Path) -> None:
    from . import _figures as plt

    pairs = result["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.2), squeeze=False)
    for ax, (key, p) in zip(axes[0], pairs.items()):
        m = np.asarray(p["cka"])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        a, b = key.split("-")
        sa, sb = result["prefix_matching_score"][int(a)], result["prefix_matching_score"][int(b)]
        ax.set_title(f"seed {a} (PM {sa:.2f}) vs {b} (PM {sb:.2f})", fontsize=8)
        ax.set_xticks(range(m.shape[1]), [f"L{j}" for j in range(m.shape[1])])
        ax.set_yticks(range(m.shape[0]), [f"L{i}" for i in range(m.shape[0])])
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="debiased linear CKA")
    fig.savefig(path, dpi=110)
    plt.close(fig)
