"""Patterning which algorithm a model learns on parentheses balancing.

On :class:`~pypattern.tasks.ParenthesesTask`'s training distribution (balanced strings vs strings with unequal
counts) the algorithms of :data:`~pypattern.tasks.parens.ALGORITHMS` (equal counts; equal counts and first "(";
equal counts and last ")"; equal counts, first "(" and last ")"; balanced) are all 100% correct; they disagree
only on held-out probes (equal counts with a negative prefix depth), in four probe cells by first and last token.

Observables ("each solution's LLC")
-----------------------------------
For each algorithm ``A``, ``L_A(w)`` is the cross-entropy at the query position on the held-out probes labelled
by ``A`` (mean over the four probe cells). Its posterior mean over the localized tempered posterior at ``w*`` is
``mu_A = L_A(w*) + lambda_A / nβ``, where ``lambda_A = nβ (E_w[L_A] - L_A(w*))`` is the local learning
coefficient of the model measured with solution ``A``'s loss. ``chi[A, z] = -nβ Cov(L_A, l_z - L)`` over training
samples ``z`` (all weights move), estimated with :func:`pypattern.susceptibility.susceptibilities`
(``observable=L_A``), one call per algorithm.

Intervention
------------
Training samples fall into five groups (:data:`PARENS_GROUP_NAMES`): ``0`` balanced, and the unequal-count
strings by first and last token (``1`` "(...)", ``2`` "(...(", ``3`` ")...)", ``4`` ")...("). The columns of
``chi`` are summed per group; to select algorithm ``A`` the observables are the contrasts ``mu_A - mu_B`` for
every other algorithm ``B`` (lower expected loss on ``A``'s answers relative to the others'), each with target
``-a``, inverted with :func:`pypattern.patterning.invert` (``method="constrained"``, bounded weights) over the
four unequal-count groups only: the balanced group keeps weight 1 and the unequal groups keep their total
share, so the class balance does not change (:func:`select_weights`). Training then continues from the
checkpoint with per-sample loss weights.

Which algorithm a seed learned: :func:`~pypattern.tasks.algorithm_scores`' ``"learned"`` -- the algorithm with
the highest mean agreement over the four probe cells, if that agreement is at least 0.9 and the training
accuracy at least 0.98; otherwise ``"other"``.
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
from ..patterning import OnlinePatterner, invert
from ..sampling.runner import sample
from ..susceptibility import susceptibilities
from ..tasks.base import TaskBatch
from ..tasks.parens import (
    ALGORITHMS,
    CLOSE,
    FALSE,
    IDENTIFY_THRESHOLD,
    OPEN,
    PROBE_CELLS,
    TRUE,
    ParenthesesTask,
    algorithm_scores,
)
from ..tasks.training import train
from .chi_settings import ChiSettings

__all__ = [
    "ParensSettings",
    "full_weights",
    "group_chi",
    "invert_unequal_groups",
    "target_contrast",
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
    "unequal_open_first_close_last",
    "unequal_open_first_open_last",
    "unequal_close_first_close_last",
    "unequal_close_first_open_last",
)
NUM_GROUPS = len(PARENS_GROUP_NAMES)


@dataclasses.dataclass
class ParensSettings(ChiSettings):
    """Sizes and settings of the parentheses experiment (defaults: the reduced version)."""

    length: int = 8
    n_layers: int = 1
    d_model: int = 32
    n_heads: int = 2
    d_mlp: int = 64
    batch_size: int = 64
    lr: float = 3e-3
    checkpoint_step: int = 10
    steps: int = 1500
    targets: tuple = tuple(ALGORITHMS)
    probe_train_size: int = 256
    amount: float = 10.0
    min_weight: float = 0.3
    max_weight: float = 2.5
    chi_single_pass: bool = True
    online_every: int = 0
    online_until: int = 0
    identify_threshold: float = IDENTIFY_THRESHOLD
    num_threads: int | None = 1


def sample_groups(batch: TaskBatch) -> torch.Tensor:
    """Group (:data:`PARENS_GROUP_NAMES`) of every sample of a training batch: ``(num_samples,)`` long.

    ``0`` balanced; unequal counts: ``1 + 2 * [starts with ")"] + [ends with "("]``.
    """
    s = batch.tokens[:, 1:-1]
    g = 1 + 2 * (s[:, 0] == CLOSE).long() + (s[:, -1] == OPEN).long()
    g[batch.extra["label"]] = 0
    return g


class GroupWeightedParentheses(ParenthesesTask):
    """:class:`ParenthesesTask` whose per-sample loss is weighted by the sample's group (:data:`NUM_GROUPS`
    groups, see :func:`sample_groups`); weights are rescaled to mean 1 under the training distribution."""

    def __init__(self, length: int, group_weights=None, *, fraction_samples: int = 8192):
        super().__init__(length=length)
        ref = super().sample(fraction_samples, seed=2**31 - 1)
        self.group_fractions = (
            torch.bincount(sample_groups(ref), minlength=NUM_GROUPS).double() / fraction_samples
        )
        self.group_weights = None
        if group_weights is not None:
            self.set_group_weights(group_weights)

    def set_group_weights(self, group_weights) -> None:
        """Set (or change during training: online patterning) the weights; rescaled to data-mean 1."""
        w = torch.as_tensor(np.asarray(group_weights, dtype=np.float64))
        bad = w.shape != (NUM_GROUPS,) or not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0
        if bad:
            raise ValueError(
                f"group_weights must be {NUM_GROUPS} finite non-negative numbers, got {group_weights!r}"
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
    """``{algorithm: callable(model) -> query loss on the held-out probes labelled by that algorithm}``.

    The loss is the mean over the probe cells (:data:`~pypattern.tasks.parens.PROBE_CELLS`) of each cell's mean
    loss, so that every cell counts equally, as in :func:`~pypattern.tasks.algorithm_scores`' ``"cells/"``.
    """
    probes = task.probes("all")
    s = probes.tokens[:, 1:-1]
    cell = probes.extra["cell"]
    present = torch.unique(cell)
    # per-probe weights: 1 / (number of cells * size of the probe's cell), summing to 1
    wt = torch.zeros(len(cell), dtype=torch.float32)
    for c in present:
        m = cell == c
        wt[m] = 1.0 / (len(present) * int(m.sum()))
    out = {}
    for name, alg in ALGORITHMS.items():
        labels = alg(s)
        out[name] = lambda m, labels=labels: (_query_ce(m, probes.tokens, labels) * wt).sum()
    return out


def estimate_solution_chi(model, s: ParensSettings, seed: int = 0):
    """``chi`` (algorithms x training probe samples) at the current weights and the group of each column.

    ``chi[A, z] = -nβ Cov(L_A, l_z - L)`` over SGLD draws of all weights (``L`` the mean loss of the
    ``probe_train_size`` training samples ``z``). ``s.chi_single_pass=False``: one
    :func:`~pypattern.susceptibility.susceptibilities` call per algorithm (``observable=L_A``); ``True``: one
    :func:`~pypattern.sampling.sample` run that records every ``L_A`` and every ``l_z`` at each draw, with the
    covariance taken within each chain and averaged over chains (the same estimator from the same draws: the
    chains do not depend on the observable; 5x less sampling).

    Returns ``(chi (K, N), chi_se (K, N), groups (N,), algorithm names, nbeta)``.
    """
    task = GroupWeightedParentheses(s.length)
    probe = task.sample(s.probe_train_size, seed=30_000 + seed)
    data = task.sample(s.batch_size * 16, seed=40_000 + seed)
    loader = [(data[i : i + s.batch_size]) for i in range(0, len(data), s.batch_size)]
    loader = [(b.tokens, b.targets[:, -1]) for b in loader]
    groups = probe.extra["group"].numpy()
    sampler = s.chi_sampler(seed)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0])[:, -1], batch[1])

    def per_sample(m, batch):
        return F.cross_entropy(m(batch[0])[:, -1], batch[1], reduction="none")

    sol = solution_losses(task)
    names = list(sol)
    if s.chi_single_pass:
        ptoks, plab = probe.tokens, probe.targets[:, -1]
        obs = {
            "L": lambda m, b: torch.stack([f(m) for f in sol.values()]),
            "l": lambda m, b: per_sample(m, (ptoks, plab)),
        }
        res = sample(model, loader, loss_fn=loss_fn, observables=obs, quiet=True, **sampler)
        big_l = np.asarray(res.observables["L"], dtype=np.float64)  # (C, D, K)
        lz = np.asarray(res.observables["l"], dtype=np.float64)  # (C, D, N)
        lz = lz - lz.mean(-1, keepdims=True)
        big_l = big_l - big_l.mean(1, keepdims=True)
        lz = lz - lz.mean(1, keepdims=True)
        cov = np.einsum("cdk,cdn->ckn", big_l, lz) / (big_l.shape[1] - 1)  # per chain
        nbeta = float(res.config["nbeta"])
        per_chain = -nbeta * cov
        chi = per_chain.mean(0)
        se = per_chain.std(0, ddof=1) / np.sqrt(len(per_chain)) if len(per_chain) > 1 else np.zeros_like(chi)
        return chi, se, groups, names, nbeta
    everything = {"all": [n for n, _ in model.named_parameters()]}
    rows, ses, nbeta = [], [], None
    for obs in sol.values():
        res = susceptibilities(
            model,
            loader,
            (probe.tokens, probe.targets[:, -1]),
            everything,
            loss_fn=loss_fn,
            per_sample_loss_fn=per_sample,
            observable=obs,
            **sampler,
        )
        rows.append(res.chi[0])
        ses.append(res.chi_se[0])
        nbeta = res.nbeta
    return np.stack(rows), np.stack(ses), groups, names, nbeta


def select_weights(chi, groups, names, target: str, s: ParensSettings, group_fractions=None):
    """Group weights that lower the expected loss of ``target``'s answers relative to every other solution's.

    The observables inverted are the contrasts ``mu_target - mu_B`` (one per other algorithm ``B``; their
    susceptibilities are the differences of ``chi``'s rows, each scaled to max |.| = 1, see :func:`target_contrast`),
    each with target ``-amount / sqrt(K - 1)``: the common part of the rows (all probe losses moving together)
    cancels. Only the unequal-count groups (1..4) are
    re-weighted, by :func:`~pypattern.patterning.invert` (``"constrained"``, weights in
    ``[min_weight, max_weight]``, with the unequal groups' data fractions as ``fractions``: their total share of the
    data is a constraint of the inversion, so no rescaling afterwards changes the predicted response); the
    balanced group keeps weight 1, so the class balance (True vs False) is unchanged: otherwise the cheapest way
    to lower an algorithm's probe loss is to shift the label prior towards the answer it gives most often, which
    selects nothing.

    Returns ``(weights (NUM_GROUPS,), Intervention, chi_groups)``.
    """
    chi_g = group_chi(chi, groups)
    contrast, tgt = target_contrast(chi_g, names, target, s.amount)
    w, iv = invert_unequal_groups(contrast, tgt, s, group_fractions)
    return w, iv, chi_g


def invert_unequal_groups(contrast, tgt, s: ParensSettings, group_fractions=None):
    """``invert(method="constrained")`` over the four unequal-count groups (their data fractions keep their total
    share), then all :data:`NUM_GROUPS` weights with the balanced group at 1. Returns ``(weights, Intervention)``."""
    iv = invert(
        contrast,
        tgt,
        method="constrained",
        min_weight=s.min_weight,
        max_weight=s.max_weight,
        fractions=None if group_fractions is None else np.asarray(group_fractions, dtype=np.float64)[1:],
    )
    return full_weights(iv.weights, group_fractions), iv


def target_contrast(chi_g, names, target: str, amount: float):
    """The contrasts' susceptibilities to the unequal-count groups and their target.

    Each contrast ``mu_target - mu_B`` is scaled to max |.| = 1 over the groups, so that every other algorithm
    ``B`` counts equally (unscaled, the contrast with the algorithm whose probe answers differ most -- all True
    vs all False -- dominates, and most targets get the same weights).
    """
    ia = names.index(target)
    free = np.arange(1, NUM_GROUPS)
    contrast = np.stack([chi_g[ia, free] - chi_g[b, free] for b in range(len(names)) if b != ia])
    contrast = contrast / np.maximum(np.abs(contrast).max(1, keepdims=True), 1e-300)
    return contrast, -amount * np.ones(len(contrast)) / np.sqrt(len(contrast))


def full_weights(free_weights, group_fractions=None) -> np.ndarray:
    """All group weights: 1 for the balanced group, the unequal groups' weights rescaled to keep their share."""
    f = np.ones(NUM_GROUPS) if group_fractions is None else np.asarray(group_fractions, dtype=np.float64)
    w = np.ones(NUM_GROUPS)
    fw = np.asarray(free_weights, dtype=np.float64)
    w[1:] = fw * f[1:].sum() / float(fw @ f[1:])
    return w


def group_chi(chi, groups) -> np.ndarray:
    """Group susceptibilities ``chi_G[:, g] = G * sum_{z in g} chi[:, z] / N`` (``d mu = chi_G (W - 1) / G``
    for group weights ``W``, :func:`~pypattern.patterning.invert`'s convention)."""
    n = chi.shape[1]
    return np.stack([chi[:, groups == g].sum(1) for g in range(NUM_GROUPS)], 1) * NUM_GROUPS / n


def _summ(sc: dict) -> dict:
    keep = {k: round(v, 4) for k, v in sc.items() if k not in ("best", "learned")}
    keep["best"], keep["learned"] = sc["best"], sc["learned"]
    return keep


def _online_callback(model, task, target: str, s: ParensSettings, seed: int):
    """Online patterning (:class:`~pypattern.patterning.OnlinePatterner`): every ``online_every`` steps until
    ``online_until`` steps after the checkpoint, chi is re-estimated at the current weights and re-inverted."""
    fr = task.group_fractions.numpy()

    def estimate(step):
        chi, _, groups, names, _ = estimate_solution_chi(model, s, seed=seed + 7919 * step)
        return target_contrast(group_chi(chi, groups), names, target, s.amount)[0]

    tgt = -s.amount * np.ones(len(ALGORITHMS) - 1) / np.sqrt(len(ALGORITHMS) - 1)
    pat = OnlinePatterner(
        estimate,
        tgt,
        every=s.online_every,
        # the groups' data fractions, as the single-shot inversion takes them (invert_unequal_groups)
        invert_kwargs={
            "method": "constrained",
            "min_weight": s.min_weight,
            "max_weight": s.max_weight,
            "fractions": np.asarray(fr, dtype=np.float64)[1:],
        },
    )
    # the first estimate (at the checkpoint, same SGLD seed) reproduces the single-shot chi and weights
    w0 = full_weights(pat.weights_for(0), fr)
    task.set_group_weights(w0)
    history = [[0, [round(float(x), 4) for x in w0]]]

    def callback(step, m):
        if step + 1 < s.online_until:
            n = len(pat.history)
            fw = pat.weights_for(step + 1)
            if len(pat.history) > n:  # re-estimated
                w = full_weights(fw, fr)
                task.set_group_weights(w)
                history.append([step + 1, [round(float(x), 4) for x in w]])

    return callback, history


def _check_steps_and_targets(s: ParensSettings) -> None:
    """Refuse, naming the setting, step counts the run cannot follow and unknown targets (before any training)."""
    from .._checks import is_count

    for name in ("checkpoint_step", "steps"):
        value = getattr(s, name)
        if not is_count(value) or value < 0:
            raise ValueError(f"ParensSettings.{name}={value!r} is not valid; give an int >= 0")
    if s.steps < s.checkpoint_step:
        raise ValueError(
            f"ParensSettings.steps={s.steps} is not valid; give at least checkpoint_step={s.checkpoint_step} "
            "(the continuations train from the checkpoint up to steps)"
        )
    unknown = [t for t in s.targets if t not in ALGORITHMS]
    if isinstance(s.targets, str) or unknown:
        raise ValueError(
            f"ParensSettings.targets={s.targets!r} is not valid; give a tuple of names from {list(ALGORITHMS)}"
        )


def run_parens_seed(seed: int, s: ParensSettings | None = None, log=None) -> dict:
    """One seed: checkpoint, chi, then a baseline continuation and one patterned continuation per target."""
    s = s or ParensSettings()
    _check_steps_and_targets(s)
    log = log or (lambda *a: None)
    t0 = time.perf_counter()
    base = GroupWeightedParentheses(s.length)
    cfg = base.model_config(
        n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads, d_mlp=s.d_mlp, seed=seed
    )
    model = Transformer(cfg)
    train(
        model,
        base,
        steps=s.checkpoint_step,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=seed,
        log_every=0,
        quiet=True,
    )
    ckpt = copy.deepcopy(model.state_dict())
    at_ckpt = _summ(algorithm_scores(model, base))
    t1 = time.perf_counter()
    chi, chi_se, groups, names, nbeta = estimate_solution_chi(model, s, seed=seed)
    t2 = time.perf_counter()
    runs = {}
    conds = [("baseline", None, None)]
    for target in s.targets:
        w, iv, _ = select_weights(chi, groups, names, target, s, base.group_fractions.numpy())
        conds.append((f"target:{target}", w, iv))
    for name, w, iv in conds:
        task = GroupWeightedParentheses(s.length, group_weights=w)
        m = Transformer(cfg)
        m.load_state_dict(ckpt)
        steps = s.steps - s.checkpoint_step
        callback, history = None, []
        if iv is not None and s.online_every > 0:
            callback, history = _online_callback(m, task, name.split(":", 1)[1], s, seed)
        tr = train(
            m,
            task,
            steps=steps,
            batch_size=s.batch_size,
            lr=s.lr,
            seed=1000 + seed,
            log_every=50,
            callback=callback,
            quiet=True,
        )
        sc = _summ(algorithm_scores(m, base, threshold=s.identify_threshold))
        gw = [1.0] * NUM_GROUPS if task.group_weights is None else task.group_weights.numpy().tolist()
        runs[name] = {
            "scores": sc,
            "learned": sc["learned"],
            "group_weights": gw,
            "predicted": None if iv is None else iv.predicted.tolist(),
            "residual": None if iv is None else iv.residual,
            "final_train_loss": tr.losses[-1],
            "online_weights": history,
        }
        answers = [round(1 - sc[f"probe_{c}/balanced"], 2) for c in PROBE_CELLS]
        log(
            f"parens seed {seed}: {name}: learned {sc['learned']} (train acc {sc['train/balanced']:.3f}, "
            f"P(True) per probe cell {answers}) weights {[round(x, 3) for x in gw]}"
        )
    chi_g = group_chi(chi, groups)
    return {
        "seed": seed,
        "settings": dataclasses.asdict(s),
        "at_checkpoint": at_ckpt,
        "chi": chi,
        "chi_se": chi_se,
        "chi_groups": chi_g,
        "algorithms": [*names, "other"],
        "chi_observables": names,
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
        rates[c] = {a: float(np.mean([x == a for x in learned[c]])) for a in [*ALGORITHMS, "other"]}
    hit = {t: rates[f"target:{t}"][t] for t in s.targets}
    baseline_rate = {t: rates["baseline"][t] for t in s.targets}
    return {
        "settings": dataclasses.asdict(s),
        "per_seed": per_seed,
        "summary": {
            "seeds": list(seeds),
            "learned": learned,
            "rates": rates,
            "target_hit_rate": hit,
            "baseline_rate": baseline_rate,
        },
    }
