"""Patterning which algorithm a model learns on parentheses balancing.

On :class:`~pypattern.tasks.ParenthesesTask`'s training distribution (balanced strings vs strings with unequal
counts) the algorithms of :data:`~pypattern.tasks.parens.ALGORITHMS` are all 100% correct; they disagree only on
held-out probes (equal counts with a negative prefix depth).

Observables ("each solution's LLC")
-----------------------------------
For each algorithm ``A``, ``L_A(w)`` is the cross-entropy at the query position on all held-out probes labelled by
``A``. Its posterior mean over the localized tempered posterior at ``w*`` is ``mu_A = L_A(w*) + lambda_A / nβ``,
where ``lambda_A = nβ (E_w[L_A] - L_A(w*))`` is the local learning coefficient of the model measured with solution
``A``'s loss. ``chi[A, z] = -nβ Cov(L_A, l_z - L)`` over training samples ``z`` (all weights move), estimated with
:func:`pypattern.susceptibility.susceptibilities` (``observable=L_A``), one call per algorithm.

Intervention
------------
Training samples fall into four groups: ``0`` balanced, ``1`` unequal counts starting with ")", ``2`` unequal
counts starting with "(" whose prefix depth goes negative, ``3`` unequal counts starting with "(" never negative.
The columns of ``chi`` are summed per group; to select algorithm ``A`` the observables are the contrasts
``mu_A - mu_B`` for every other algorithm ``B`` (lower expected loss on ``A``'s answers relative to the others'),
each with target ``-a``, inverted with
:func:`pypattern.patterning.invert` (``method="constrained"``, bounded weights). Training then continues from the
checkpoint with per-sample loss weights (normalised to mean 1 under the data distribution).

A seed "learned" algorithm ``A`` when ``A`` has the highest agreement on the held-out probes
(:func:`~pypattern.tasks.algorithm_scores`' ``"best"``).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from .._threads import pinned_threads
from ..models.transformer import Transformer
from ..patterning import invert
from ..susceptibility import susceptibilities
from ..tasks.base import TaskBatch
from ..tasks.parens import ALGORITHMS, CLOSE, FALSE, TRUE, ParenthesesTask, _min_depth, algorithm_scores
from ..tasks.training import train

__all__ = [
    "ParensSettings",
    "GroupWeightedParentheses",
    "sample_groups",
    "solution_losses",
    "estimate_solution_chi",
    "select_weights",
    "run_parens_seed",
    "run_parens_experiment",
    "PARENS_GROUP_NAMES",
]

PARENS_GROUP_NAMES = (
    "balanced",
    "unequal_close_first",
    "unequal_open_first_dips",
    "unequal_open_first_no_dip",
)


@dataclasses.dataclass
class ParensSettings:
    """Sizes and settings of the parentheses experiment (defaults: the reduced version)."""

    length: int = 8
    n_layers: int = 1
    d_model: int = 32
    n_heads: int = 2
    d_mlp: int = 64
    batch_size: int = 64
    lr: float = 3e-3
    checkpoint_step: int = 150
    steps: int = 1500
    targets: tuple = ("equal_counts", "equal_counts_first_open", "balanced")
    probe_train_size: int = 256
    chi_num_chains: int = 2
    chi_num_draws: int = 60
    chi_num_burnin_steps: int = 30
    chi_step_size: float = 1e-4
    chi_localization: float = 100.0
    chi_nbeta: float | None = None
    amount: float = 10.0
    min_weight: float = 0.1
    max_weight: float = 3.0
    num_threads: int | None = 1


def sample_groups(batch: TaskBatch) -> torch.Tensor:
    """Group (see the module docstring) of every sample of a training batch: ``(num_samples,)`` long."""
    s = batch.tokens[:, 1:-1]
    bal = batch.extra["label"]
    close_first = s[:, 0] == CLOSE
    dips = _min_depth(s) < 0
    g = torch.full((len(s),), 3, dtype=torch.long)
    g[dips & ~close_first] = 2
    g[close_first] = 1
    g[bal] = 0
    return g


class GroupWeightedParentheses(ParenthesesTask):
    """:class:`ParenthesesTask` whose per-sample loss is weighted by the sample's group (four groups, see
    :func:`sample_groups`); weights are rescaled to mean 1 under the training distribution."""

    def __init__(self, length: int, group_weights=None, *, fraction_samples: int = 8192):
        super().__init__(length=length)
        ref = super().sample(fraction_samples, seed=2**31 - 1)
        self.group_fractions = torch.bincount(sample_groups(ref), minlength=4).double() / fraction_samples
        self.group_weights = None
        if group_weights is not None:
            w = torch.as_tensor(np.asarray(group_weights, dtype=np.float64))
            if w.shape != (4,) or not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
                raise ValueError(
                    f"group_weights must be 4 finite non-negative numbers, got {group_weights!r}"
                )
            self.group_weights = (w / float(w @ self.group_fractions)).float()

    def sample(self, num_samples: int, seed: int | None = None) -> TaskBatch:
        b = super().sample(num_samples, seed)
        b.extra["group"] = sample_groups(b)
        return b

    def per_sample_loss(self, logits, batch):
        per = super().per_sample_loss(logits, batch)
        if self.group_weights is None:
            return per
        return per * self.group_weights[batch.extra["group"]].to(per.dtype)


def _query_ce(model, tokens, labels: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)[:, -1]
    return F.cross_entropy(logits, torch.where(labels, TRUE, FALSE), reduction="none")


def solution_losses(task: ParenthesesTask) -> dict:
    """``{algorithm: callable(model) -> mean query loss on all held-out probes labelled by that algorithm}``."""
    probes = task.probes("all")
    s = probes.tokens[:, 1:-1]
    out = {}
    for name, alg in ALGORITHMS.items():
        labels = alg(s)
        out[name] = lambda m, labels=labels: _query_ce(m, probes.tokens, labels).mean()
    return out


def estimate_solution_chi(model, s: ParensSettings, seed: int = 0):
    """``chi`` (algorithms x training probe samples) at the current weights and the group of each column.

    Returns ``(chi (3, N), chi_se (3, N), groups (N,), algorithm names, nbeta)``.
    """
    task = GroupWeightedParentheses(s.length)
    probe = task.sample(s.probe_train_size, seed=30_000 + seed)
    data = task.sample(s.batch_size * 16, seed=40_000 + seed)
    loader = [(data[i : i + s.batch_size]) for i in range(0, len(data), s.batch_size)]
    loader = [(b.tokens, b.targets[:, -1]) for b in loader]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0])[:, -1], batch[1])

    def per_sample(m, batch):
        return F.cross_entropy(m(batch[0])[:, -1], batch[1], reduction="none")

    everything = {"all": [n for n, _ in model.named_parameters()]}
    names, rows, ses, nbeta = [], [], [], None
    for name, obs in solution_losses(task).items():
        res = susceptibilities(
            model,
            loader,
            (probe.tokens, probe.targets[:, -1]),
            everything,
            loss_fn=loss_fn,
            per_sample_loss_fn=per_sample,
            observable=obs,
            num_chains=s.chi_num_chains,
            num_draws=s.chi_num_draws,
            num_burnin_steps=s.chi_num_burnin_steps,
            step_size=s.chi_step_size,
            localization=s.chi_localization,
            nbeta=s.chi_nbeta,
            seed=seed,
            warn_nonstationary=False,
        )
        names.append(name)
        rows.append(res.chi[0])
        ses.append(res.chi_se[0])
        nbeta = res.nbeta
    return np.stack(rows), np.stack(ses), probe.extra["group"].numpy(), names, nbeta


def select_weights(chi, groups, names, target: str, s: ParensSettings):
    """Group weights that lower the expected loss of ``target``'s answers relative to every other solution's.

    The observables inverted are the contrasts ``mu_target - mu_B`` (one per other algorithm ``B``; their
    susceptibilities are the differences of ``chi``'s rows), each with target ``-amount * scale``: the common
    part of the rows (all probe losses moving together) cancels. Returns ``(Intervention, chi_groups)``.
    """
    n = chi.shape[1]
    chi_g = np.stack([chi[:, groups == g].sum(1) for g in range(4)], 1) * 4 / n
    ia = names.index(target)
    contrast = np.stack([chi_g[ia] - chi_g[b] for b in range(len(names)) if b != ia])
    scale = float(np.abs(contrast).max()) or 1.0
    tgt = -s.amount * scale * np.ones(len(contrast)) / np.sqrt(len(contrast))
    iv = invert(contrast, tgt, method="constrained", min_weight=s.min_weight, max_weight=s.max_weight)
    return iv, chi_g


def _summ(sc: dict) -> dict:
    keep = {k: round(v, 4) for k, v in sc.items() if k != "best"}
    keep["best"] = sc["best"]
    return keep


def run_parens_seed(seed: int, s: ParensSettings | None = None, log=None) -> dict:
    """One seed: checkpoint, chi, then a baseline continuation and one patterned continuation per target."""
    s = s or ParensSettings()
    log = log or (lambda *a: None)
    t0 = time.perf_counter()
    base = GroupWeightedParentheses(s.length)
    cfg = base.model_config(
        n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads, d_mlp=s.d_mlp, seed=seed
    )
    model = Transformer(cfg)
    train(model, base, steps=s.checkpoint_step, batch_size=s.batch_size, lr=s.lr, seed=seed, log_every=0)
    ckpt = copy.deepcopy(model.state_dict())
    at_ckpt = _summ(algorithm_scores(model, base))
    t1 = time.perf_counter()
    chi, chi_se, groups, names, nbeta = estimate_solution_chi(model, s, seed=seed)
    t2 = time.perf_counter()
    runs = {}
    conds = [("baseline", None, None)]
    for target in s.targets:
        iv, chi_g = select_weights(chi, groups, names, target, s)
        conds.append((f"target:{target}", iv.weights, iv))
    for name, w, iv in conds:
        task = GroupWeightedParentheses(s.length, group_weights=w)
        m = Transformer(cfg)
        m.load_state_dict(ckpt)
        steps = s.steps - s.checkpoint_step
        tr = train(m, task, steps=steps, batch_size=s.batch_size, lr=s.lr, seed=1000 + seed, log_every=50)
        sc = _summ(algorithm_scores(m, base))
        runs[name] = {
            "scores": sc,
            "learned": sc["best"],
            "group_weights": None if task.group_weights is None else task.group_weights.numpy().tolist(),
            "predicted": None if iv is None else iv.predicted.tolist(),
            "residual": None if iv is None else iv.residual,
            "final_train_loss": tr.losses[-1],
        }
        log(
            f"parens seed {seed}: {name}: learned {sc['best']} (train acc {sc['train/balanced']:.3f}, "
            f"open-first-negative agreement with balanced {sc['probe_open_first_negative/balanced']:.3f}) "
            f"weights {runs[name]['group_weights']}"
        )
    chi_g = np.stack([chi[:, groups == g].sum(1) for g in range(4)], 1) * 4 / chi.shape[1]
    return {
        "seed": seed,
        "settings": dataclasses.asdict(s),
        "at_checkpoint": at_ckpt,
        "chi": chi,
        "chi_se": chi_se,
        "chi_groups": chi_g,
        "algorithms": names,
        "column_groups": groups,
        "nbeta": nbeta,
        "group_fractions": base.group_fractions.numpy().tolist(),
        "runs": runs,
        "seconds": {"checkpoint": t1 - t0, "chi": t2 - t1, "total": time.perf_counter() - t0},
    }


def run_parens_experiment(seeds=(0, 1, 2), s: ParensSettings | None = None, log=None) -> dict:
    """All seeds with the summary: which algorithm each condition selected, and the selection rates."""
    s = s or ParensSettings()
    with pinned_threads(s.num_threads or None):
        per_seed = [run_parens_seed(seed, s, log) for seed in seeds]
    conds = list(per_seed[0]["runs"])
    learned = {c: [r["runs"][c]["learned"] for r in per_seed] for c in conds}
    rates = {}
    for c in conds:
        rates[c] = {a: float(np.mean([x == a for x in learned[c]])) for a in ALGORITHMS}
    hit = {t: rates[f"target:{t}"][t] for t in s.targets}
    return {
        "settings": dataclasses.asdict(s),
        "per_seed": per_seed,
        "summary": {"seeds": list(seeds), "learned": learned, "rates": rates, "target_hit_rate": hit},
    }
