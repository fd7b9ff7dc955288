"""Patterning parentheses algorithms with each solution's own LLC as the observable.

:mod:`pypattern.experiments.parens` patterns from an early checkpoint with the held-out probe losses ``L_A`` as
observables. This module uses each solution's own LLC instead:

1. **Solution models** (:func:`train_solution`). For each algorithm ``A`` of
   :data:`~pypattern.tasks.parens.ALGORITHMS` a model (the :class:`~.parens.ParensSettings` architecture) is
   trained on the normal training distribution mixed with held-out-style probe strings labelled by ``A``
   (:class:`SolutionParentheses`). Only half of each probe cell is used for training ("fit" probes,
   :func:`split_probes`); the other half ("check" probes) is never trained on. :func:`check_solution` accepts
   the model as ``w*_A`` if its training accuracy is >= 0.98 and its agreement with ``A`` on the *check* probes
   is >= 0.9 in every probe cell.

2. **LLC and its susceptibility** (:func:`llc_susceptibility`). Around ``w*_A``, SGLD samples the localized
   tempered posterior ``p(w) ~ exp(-nβ L_n(w) - γ/2 |w - w*_A|^2)`` of the *normal, unweighted* training loss
   ``L_n`` (query cross-entropy). ``lambda_A = nβ (E_w[L_n(w)] - L_n(w*_A))``. For ``N`` training samples ``z``
   (per-sample losses ``l_z(w)``, ``L = mean_z l_z``), re-weighting the data towards ``z``
   (``L_h = L + h_z (l_z - L)``) changes the LLC by::

       d lambda / d h_z = -nβ Cov_w(nβ L(w), l_z(w) - L(w))                 ("cov": the posterior moves)
                          + nβ (E_w[l_z - L] - (l_z - L)(w*))                 ("direct": the loss itself moves)

   The brief's formula is the covariance term alone (``kind="cov"``); ``kind="full"`` (the default used for the
   interventions) is the total derivative of ``lambda`` under the re-weighted loss. The covariance is taken
   within each chain and averaged over chains (as :func:`.parens.estimate_solution_chi`). Columns are summed per
   training group (:data:`.parens.PARENS_GROUP_NAMES`) with :func:`.parens.group_chi`.

3. **Intervention** (:func:`select_llc_weights`). All solutions fit the training data (``L_n(w*_A) ~ 0``), so
   the Bayesian free energy ``F_A ~ n L_n(w*_A) + lambda_A log n`` prefers the solution with the lowest LLC. To
   select the target ``T``, the contrasts ``lambda_T - lambda_B`` for every other algorithm ``B`` are lowered:
   :func:`.parens.target_contrast` (each contrast scaled to max |.| = 1, target ``-amount / sqrt(K - 1)``), inverted
   with :func:`pypattern.patterning.invert` (``method="constrained"``, weights in ``[min_weight,
   max_weight]``) over the four unequal-count groups; the balanced group keeps weight 1 and the unequal groups
   keep their total share (:func:`.parens.full_weights`): the class balance does not change.

4. **Selection** (:func:`train_from_scratch`). A fresh model (init seed ``seed``) trains ``steps`` steps on
   :class:`~.parens.GroupWeightedParentheses` with those weights (online batches, data seed ``1000 + seed``);
   the baseline is the same run without weights. Which algorithm it learned:
   :func:`~pypattern.tasks.algorithm_scores`' ``"learned"``.
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
from ..sampling.diagnostics import r_hat
from ..sampling.runner import sample
from ..tasks.base import TaskBatch, generator
from ..tasks.parens import ALGORITHMS, PROBE_CELLS, ParenthesesTask, algorithm_scores
from ..tasks.training import train
from .parens import (
    NUM_GROUPS,
    GroupWeightedParentheses,
    ParensSettings,
    group_chi,
    invert_unequal_groups,
    sample_groups,
    target_contrast,
)

__all__ = [
    "LLCSettings",
    "SolutionParentheses",
    "split_probes",
    "train_solution",
    "check_solution",
    "llc_susceptibility",
    "group_llc_chi",
    "select_llc_weights",
    "train_from_scratch",
    "run_parens_llc",
]


@dataclasses.dataclass
class LLCSettings(ParensSettings):
    """:class:`~.parens.ParensSettings` (architecture, ``steps``, ``lr``, weight bounds, ``amount``) plus the
    solution models' training and the LLC sampler."""

    #: the solutions whose LLCs are compared (and the targets): a 1-layer model trained as in
    #: :func:`train_solution` did not fit the training data as "balanced" (see docs/patterning_results.md, section 3)
    targets: tuple = (
        "equal_counts",
        "equal_counts_first_open",
        "equal_counts_last_close",
        "equal_counts_first_open_last_close",
    )
    probe_fraction: float = 0.25  # share of each solution-training batch that is "fit" probes labelled by A
    solution_steps: int = 1500
    llc_num_chains: int = 16
    llc_num_draws: int = 300
    llc_num_burnin_steps: int = 300
    llc_step_size: float = 1e-4
    llc_localization: float = 100.0
    llc_nbeta: float | None = None  # None: batch_size / ln(batch_size)
    llc_num_batches: int = 16  # the SGLD data set: llc_num_batches * batch_size training samples
    llc_probe_size: int = 512  # N training samples whose losses l_z are recorded at every draw
    kind: str = "full"  # "full" or "cov" (see the module docstring)


def split_probes(task: ParenthesesTask, seed: int = 0):
    """Split the held-out probes into ``(fit, check)`` halves, each probe cell split separately (``fit`` gets
    ``floor(size / 2)`` of each cell). Returns two :class:`~pypattern.tasks.base.TaskBatch` (``extra["cell"]``)."""
    probes = task.probes("all")
    g = generator(seed)
    fit, check = [], []
    for c in range(len(PROBE_CELLS)):
        idx = torch.nonzero(probes.extra["cell"] == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = len(idx) // 2
        fit.append(idx[:k])
        check.append(idx[k:])
    return probes[torch.cat(fit)], probes[torch.cat(check)]


class SolutionParentheses(ParenthesesTask):
    """The training distribution with a share ``probe_fraction`` of every batch replaced by ``fit`` probe strings
    labelled by ``algorithm`` (uniformly drawn, with replacement). Used only to train the solution models."""

    def __init__(self, length: int, algorithm: str, fit: TaskBatch, probe_fraction: float = 0.25):
        super().__init__(length=length)
        self.algorithm, self.probe_fraction = algorithm, probe_fraction
        self.fit_strings = fit.tokens[:, 1:-1]
        self.fit_labels = ALGORITHMS[algorithm](self.fit_strings)

    def sample(self, num_samples: int, seed: int | None = None) -> TaskBatch:
        b = super().sample(num_samples, seed)
        g = generator(None if seed is None else seed + 7)
        use = torch.rand(num_samples, generator=g) < self.probe_fraction
        pick = torch.randint(0, len(self.fit_strings), (num_samples,), generator=g)
        s = torch.where(use[:, None], self.fit_strings[pick], b.tokens[:, 1:-1])
        label = torch.where(use, self.fit_labels[pick], b.extra["label"])
        return self._batch(s, label, torch.where(use, 2, b.extra["kind"]))


def _config(s: ParensSettings, seed: int):
    return ParenthesesTask(s.length).model_config(
        n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads, d_mlp=s.d_mlp, seed=seed
    )


@torch.no_grad()
def check_solution(model, algorithm: str, task: ParenthesesTask, check: TaskBatch, s: ParensSettings) -> dict:
    """Does ``model`` implement ``algorithm``? ``ok``: training accuracy (:func:`algorithm_scores`, 2000 fresh
    samples) >= 0.98 and agreement with ``algorithm`` on the never-trained-on ``check`` probes >= 0.9 in every
    probe cell. Also returns the per-cell check agreement and :func:`algorithm_scores`' ``learned`` (all probes,
    half of which the model was trained on)."""
    sc = algorithm_scores(model, task, threshold=s.identify_threshold)
    pred = task.predict(model, check)
    agree = (pred == ALGORITHMS[algorithm](check.tokens[:, 1:-1])).float()
    cells = [float(agree[check.extra["cell"] == c].mean()) for c in range(len(PROBE_CELLS))]
    train_acc = sc[f"train/{algorithm}"]
    return {
        "algorithm": algorithm,
        "ok": bool(train_acc >= 0.98 and min(cells) >= 0.9),
        "train_acc": train_acc,
        "check_cells": cells,
        "learned_all_probes": sc["learned"],
    }


def train_solution(algorithm: str, s: LLCSettings, seed: int = 0, split_seed: int = 0):
    """Train the solution model ``w*_A`` (init seed ``seed``, data seed ``5000 + seed``) on
    :class:`SolutionParentheses`; returns ``(model, check_solution(...) dict)``."""
    task = ParenthesesTask(s.length)
    fit, check = split_probes(task, split_seed)
    stask = SolutionParentheses(s.length, algorithm, fit, s.probe_fraction)
    model = Transformer(_config(s, seed))
    train(
        model,
        stask,
        steps=s.solution_steps,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=5000 + seed,
        log_every=0,
        quiet=True,
    )
    model.eval()
    return model, check_solution(model, algorithm, task, check, s)


def _per_sample(model, tokens, labels_tok):
    return F.cross_entropy(model(tokens)[:, -1], labels_tok, reduction="none")


def llc_susceptibility(model, s: LLCSettings, seed: int = 0) -> dict:
    """The LLC of ``model`` on the unweighted training loss and its susceptibility to each training sample.

    SGLD (:func:`pypattern.sampling.sample`): ``llc_num_chains`` chains, ``llc_num_burnin_steps`` burn-in,
    ``llc_num_draws`` draws, step ``llc_step_size``, localization ``llc_localization``, ``nbeta`` (default
    ``batch_size / ln batch_size``), on ``llc_num_batches`` fixed batches of the training distribution
    (seed ``40_000 + seed``). At every draw the per-sample losses ``l_z`` of ``llc_probe_size`` other training
    samples (seed ``30_000 + seed``) are recorded.

    Returns a dict: ``llc`` (from the SGLD minibatch loss trace, as :func:`~pypattern.sampling.estimate_llc`),
    ``llc_probe`` (``nβ (E[L] - L(w*))`` with ``L`` the mean of the recorded ``l_z``), ``llc_per_chain``,
    ``r_hat``, ``init_loss``, ``loss_trace`` (chains x draws), ``chi_cov`` and ``chi_direct`` (``(N,)``, see the
    module docstring; ``chi_full = chi_cov + chi_direct``; means over chains of ``chi_cov_chains`` and
    ``chi_direct_chains``, ``(C, N)``), the ``groups`` of the columns, ``nbeta``.
    """
    task = GroupWeightedParentheses(s.length)
    probe = task.sample(s.llc_probe_size, seed=30_000 + seed)
    data = task.sample(s.batch_size * s.llc_num_batches, seed=40_000 + seed)
    loader = [data[i : i + s.batch_size] for i in range(0, len(data), s.batch_size)]
    loader = [(b.tokens, b.targets[:, -1]) for b in loader]
    ptoks, plab = probe.tokens, probe.targets[:, -1]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0])[:, -1], batch[1])

    res = sample(
        model,
        loader,
        loss_fn=loss_fn,
        observables={"l": lambda m, b: _per_sample(m, ptoks, plab)},
        num_chains=s.llc_num_chains,
        num_draws=s.llc_num_draws,
        num_burnin_steps=s.llc_num_burnin_steps,
        step_size=s.llc_step_size,
        localization=s.llc_localization,
        nbeta=s.llc_nbeta,
        seed=seed,
        quiet=True,
        warn_nonstationary=False,
    )
    nbeta = float(res.config["nbeta"])
    with torch.no_grad():
        l_star = _per_sample(model, ptoks, plab).double().numpy()
    lz = np.asarray(res.observables["l"], dtype=np.float64)  # (C, D, N)
    big_l = lz.mean(-1)  # (C, D)
    dz = lz - big_l[..., None]  # l_z - L
    lc = big_l - big_l.mean(1, keepdims=True)
    dc = dz - dz.mean(1, keepdims=True)
    cov = np.einsum("cd,cdn->cn", lc, dc) / (lz.shape[1] - 1)  # per chain
    cov_chains = -nbeta * nbeta * cov  # (C, N)
    d_star = l_star - l_star.mean()
    direct_chains = nbeta * (dz.mean(1) - d_star)  # (C, N)
    loss_trace = np.asarray(res.loss_trace, dtype=np.float64)
    per_chain = nbeta * (loss_trace - res.init_loss).mean(1)
    return {
        "llc": float(per_chain.mean()),
        "llc_std": float(per_chain.std(ddof=1)) if len(per_chain) > 1 else float("nan"),
        "llc_per_chain": per_chain,
        "llc_probe": float(nbeta * (big_l.mean() - l_star.mean())),
        "r_hat": float(r_hat(loss_trace)),
        "init_loss": float(res.init_loss),
        "init_loss_probe": float(l_star.mean()),
        "loss_trace": loss_trace,
        "chi_cov": cov_chains.mean(0),
        "chi_direct": direct_chains.mean(0),
        "chi_cov_chains": cov_chains,
        "chi_direct_chains": direct_chains,
        "groups": sample_groups(probe).numpy(),
        "nbeta": nbeta,
    }


def group_llc_chi(est: dict, kind: str = "full", se: bool = False):
    """``d lambda / d h_g`` per training group (:func:`.parens.group_chi` convention) from
    :func:`llc_susceptibility`'s columns: ``kind`` ``"full"`` (cov + direct), ``"cov"`` or ``"direct"``.
    ``se=True``: also the standard error over chains (``(value, se)``)."""
    cols = {
        "full": est["chi_cov_chains"] + est["chi_direct_chains"],
        "cov": est["chi_cov_chains"],
        "direct": est["chi_direct_chains"],
    }[kind]
    per_chain = group_chi(cols, est["groups"])  # (C, NUM_GROUPS)
    value = per_chain.mean(0)
    if not se:
        return value
    c = len(per_chain)
    return value, (per_chain.std(0, ddof=1) / np.sqrt(c) if c > 1 else np.full(NUM_GROUPS, np.nan))


def select_llc_weights(chi_g: np.ndarray, names, target: str, s: ParensSettings, group_fractions=None):
    """Group weights that lower ``lambda_target - lambda_B`` for every other solution ``B``.

    ``chi_g``: ``(K, NUM_GROUPS)``, row ``A`` = ``d lambda_A / d h_g`` at ``w*_A``. Contrasts and target from
    :func:`.parens.target_contrast` (``amount = s.amount``), :func:`~pypattern.patterning.invert` with
    ``method="constrained"`` in ``[s.min_weight, s.max_weight]`` over the unequal-count groups, then
    :func:`.parens.full_weights` (balanced group weight 1, class balance kept). Returns ``(weights, Intervention)``.
    """
    contrast, tgt = target_contrast(np.asarray(chi_g, dtype=np.float64), list(names), target, s.amount)
    return invert_unequal_groups(contrast, tgt, s, group_fractions)


def train_from_scratch(seed: int, s: ParensSettings, group_weights=None) -> dict:
    """A fresh model (init seed ``seed``) trained ``s.steps`` steps on online batches of
    :class:`~.parens.GroupWeightedParentheses` (data seed ``1000 + seed``; ``group_weights`` None = baseline).
    Returns :func:`algorithm_scores` (``learned`` etc.) plus the wall time."""
    t0 = time.perf_counter()
    task = GroupWeightedParentheses(s.length, group_weights=group_weights)
    m = Transformer(_config(s, seed))
    tr = train(
        m, task, steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=1000 + seed, log_every=100, quiet=True
    )
    sc = algorithm_scores(m, ParenthesesTask(s.length), threshold=s.identify_threshold)
    return {
        "learned": sc["learned"],
        "best": sc["best"],
        "train_acc": sc["train/balanced"],
        "p_true_cells": [round(1 - sc[f"probe_{c}/balanced"], 3) for c in PROBE_CELLS],
        "final_loss": tr.losses[-1] if tr.losses else None,
        "seconds": time.perf_counter() - t0,
    }


def run_parens_llc(
    seeds=(0, 1, 2, 3, 4),
    s: LLCSettings | None = None,
    solution_seed: int = 0,
    sgld_seed: int = 100,
    log=None,
):
    """Solutions for ``s.targets`` (init seed ``solution_seed``), their LLC susceptibilities (SGLD seed
    ``sgld_seed``; the tables in docs/patterning_results.md used ``solution_seed=0, sgld_seed=100``),
    one weight vector per target, then the baseline and every target trained from scratch for every seed.
    Returns a JSON-able dict (lists and floats)."""
    s = s or LLCSettings()
    log = log or (lambda *a: None)
    names = list(s.targets)
    fr = GroupWeightedParentheses(s.length).group_fractions.numpy()
    out: dict = {"settings": dataclasses.asdict(s), "solutions": {}, "runs": {}}
    with pinned_threads(s.num_threads or None):
        chi_rows = []
        for a in names:
            t0 = time.perf_counter()
            model, chk = train_solution(a, s, seed=solution_seed)
            t1 = time.perf_counter()
            est = llc_susceptibility(copy.deepcopy(model), s, seed=sgld_seed)
            chi_rows.append(group_llc_chi(est, s.kind))
            out["solutions"][a] = {
                **chk,
                **{k: est[k] for k in ("llc", "llc_std", "llc_probe", "r_hat", "init_loss", "nbeta")},
                "chi_groups": {k: group_llc_chi(est, k).tolist() for k in ("full", "cov", "direct")},
                "seconds": {"train": t1 - t0, "llc": time.perf_counter() - t1},
            }
            log(f"solution {a}: {out['solutions'][a]}")
        chi_g = np.stack(chi_rows)
        weights = {"baseline": None}
        for t in s.targets:
            w, iv = select_llc_weights(chi_g, names, t, s, fr)
            weights[t] = w
            out.setdefault("weights", {})[t] = {"weights": w.tolist(), "residual": iv.residual}
            log(f"target {t}: weights {np.round(w, 3).tolist()}")
        for seed in seeds:
            for cond, w in weights.items():
                r = train_from_scratch(seed, s, w)
                out["runs"].setdefault(cond, []).append(r)
                log(f"seed {seed} {cond}: {r}")
    return out
