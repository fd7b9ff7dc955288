"""Patterning the induction circuit: move its onset earlier or later by re-weighting token groups along a principal
susceptibility direction.

Procedure (one seed)
--------------------
1. Train a 2-layer attention-only transformer on :class:`~pypattern.tasks.InductionTask` (online data, AdamW) up to
   an early checkpoint ``checkpoint_step``, before the induction circuit forms.
2. At the checkpoint, estimate the per-token susceptibilities ``chi`` (components = every attention head and the
   embedding; probe = ``probe_size`` fresh sequences, one column per predicted token) with
   :func:`pypattern.susceptibility.susceptibilities`.
3. Sum the columns of ``chi`` over three token groups (``0``: tokens predictable by induction, ``1``: tokens inside
   the first copy of the repeated segment, ``2``: all other tokens) into a group susceptibility matrix, take the
   principal direction of ``chi`` (over components) whose token scores best separate the induction tokens from
   the rest, and invert ``d mu = ± amount * direction`` with :func:`pypattern.patterning.invert`
   (``method="constrained"``) into group weights. The pole that up-weights the induction group is called
   "accelerate", the other "delay" (this naming uses the task's labels; ``chi`` alone picks the direction and how
   the three groups move).
4. From the checkpoint, train three continuations with identical data and optimizer settings: uniform weights
   (baseline), "accelerate" weights and "delay" weights (per-token loss weights, normalised to token-mean 1).

Onset: the first step (linearly interpolated between evaluations) at which the mean loss on induction-predictable
tokens of a fixed evaluation set drops below ``threshold``. Runs that never cross it are censored at their last
step (``onset = inf``, ``censored_at`` recorded).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .._threads import pinned_threads
from ..models.transformer import Transformer
from ..patterning import direction_target, invert
from ..susceptibility import susceptibilities
from ..tasks.base import IGNORE, TaskBatch
from ..tasks.induction import InductionTask, prefix_matching_score
from ..tasks.training import train
from .chi_settings import ChiSettings

__all__ = [
    "InductionSettings",
    "GroupWeightedInduction",
    "token_groups",
    "induction_curve_point",
    "onset_step",
    "estimate_induction_chi",
    "pattern_weights",
    "run_induction_seed",
    "run_induction_experiment",
    "summarize_onsets",
    "GROUP_NAMES",
]

GROUP_NAMES = ("induction", "first_copy", "other")


@dataclasses.dataclass
class InductionSettings(ChiSettings):
    """Sizes and settings of the induction experiment (defaults: the reduced, minutes-on-a-CPU version)."""

    # d_vocab 64, seq_len 33 (repeat_len 10). With d_vocab 24, seq_len 21 the plateau before the
    # loss drop was heavy-tailed (baseline onsets of seeds 0-5 on one machine: 841, none by 5000, 2033, 1731, none
    # by 5000, 675), and the drop mostly came without a canonical induction head (prefix-matching score of the
    # second-layer heads < 0.1 in 3 of 4 seeds at d_model 32 and in every seed checked at 48). At this size the drop is
    # sharp and the score rises with it in most seeds (docs/patterning_results.md).
    d_vocab: int = 64
    seq_len: int = 33
    d_model: int = 32
    n_heads: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    checkpoint_step: int = 200
    # a cap well above the slowest baseline seen, so that a baseline is not censored
    max_steps: int = 5000
    eval_every: int = 25
    stop_after_onset: int = 100
    cap_factor: float | None = 1.6
    threshold: float = 1.2
    num_eval: int = 256
    probe_size: int = 12
    amount: float = 10.0
    min_weight: float = 0.1
    max_weight: float = 3.0
    num_threads: int | None = 1

    def task(self) -> InductionTask:
        return InductionTask(d_vocab=self.d_vocab, seq_len=self.seq_len)


# ------------------------------------------------------------------------------------------------ data


def token_groups(batch: TaskBatch) -> torch.Tensor:
    """Group of every predicting position of an :class:`InductionTask` batch: ``(num_samples, pos)`` long.

    ``0``: the next token is predictable by induction (``extra["induction_flag"]``); ``1``: the position and its
    next token lie inside the first copy of the repeated segment; ``2``: everything else.
    """
    flag = batch.extra["induction_flag"]
    n, t = flag.shape
    # each row flags repeat_len - 1 positions: as many as the first copy's positions whose next token is in it
    # (read per row, so that a batch of no samples has groups too)
    inside = flag.sum(1)
    src = batch.extra["source_start"]
    pos = torch.arange(t)[None, :]
    first = (pos >= src[:, None]) & (pos < src[:, None] + inside[:, None])
    g = torch.full((n, t), 2, dtype=torch.long)
    g[first] = 1
    g[flag] = 0
    return g


class GroupWeightedInduction(InductionTask):
    """:class:`InductionTask` whose per-sample loss weights each token by its group's weight.

    ``group_weights`` ``(3,)`` are rescaled so that their token-weighted mean under the data distribution is 1
    (so the loss scale stays that of the unweighted task); ``None`` means uniform.
    """

    def __init__(self, d_vocab: int, seq_len: int, group_weights=None, *, fraction_samples: int = 4096):
        super().__init__(d_vocab=d_vocab, seq_len=seq_len)
        ref = super().sample(fraction_samples, seed=2**31 - 1)
        g = token_groups(ref)[ref.targets != IGNORE]
        self.group_fractions = torch.bincount(g, minlength=3).double() / g.numel()
        self.group_weights = None
        if group_weights is not None:
            w = torch.as_tensor(np.asarray(group_weights, dtype=np.float64))
            if w.shape != (3,) or not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
                raise ValueError(
                    f"group_weights must be 3 finite non-negative numbers, got {group_weights!r}"
                )
            self.group_weights = (w / float(w @ self.group_fractions)).float()

    def sample(self, num_samples: int, seed: int | None = None) -> TaskBatch:
        b = super().sample(num_samples, seed)
        b.extra["token_group"] = token_groups(b)
        return b

    def per_sample_loss(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        if self.group_weights is None:
            return super().per_sample_loss(logits, batch)
        mask = batch.targets != IGNORE
        ce = F.cross_entropy(logits.transpose(1, 2), batch.targets.clamp_min(0), reduction="none")
        w = self.group_weights[batch.extra["token_group"]] * mask
        return (ce * w).sum(1) / mask.sum(1).clamp_min(1)


# ------------------------------------------------------------------------------------------------ measurement


@torch.no_grad()
def induction_curve_point(model, batch: TaskBatch) -> tuple[float, float]:
    """Mean next-token loss on induction-predictable tokens and on the other scored tokens of ``batch``."""
    logits = model(batch.tokens)
    ce = F.cross_entropy(logits.transpose(1, 2), batch.targets.clamp_min(0), reduction="none")
    f = batch.extra["induction_flag"]
    other = (batch.targets != IGNORE) & ~f
    return float(ce[f].mean()), float(ce[other].mean())


def onset_step(steps, losses, threshold: float) -> float:
    """First step at which ``losses`` falls below ``threshold`` (linear interpolation between evaluations);
    ``inf`` if it never does."""
    steps, losses = np.asarray(steps, float), np.asarray(losses, float)
    below = np.nonzero(losses < threshold)[0]
    if below.size == 0:
        return math.inf
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    s0, s1, l0, l1 = steps[i - 1], steps[i], losses[i - 1], losses[i]
    return float(s0 + (l0 - threshold) / (l0 - l1) * (s1 - s0))


class _Stop(Exception):
    pass


def _train_segment(model, task, steps, s: InductionSettings, seed, start, ev, curve, stop_on_onset=True):
    """Train ``steps`` steps; every ``eval_every`` steps append ``(step, loss on induction tokens, loss on the other
    tokens, max prefix-matching score of the last layer's heads)`` to ``curve``; stop ``stop_after_onset`` steps after
    the onset."""
    state = {"onset": None}

    def cb(step, m):
        t = start + step + 1
        if t % s.eval_every == 0:
            li, lo = induction_curve_point(m, ev)
            pm = prefix_matching_score(m, half_len=task.repeat_len, num_samples=32, seed=0)
            curve.append((t, li, lo, float(pm[-1].max())))
            if li < s.threshold and state["onset"] is None:
                state["onset"] = t
            if stop_on_onset and state["onset"] is not None and t >= state["onset"] + s.stop_after_onset:
                raise _Stop

    try:
        train(
            model,
            task,
            steps=steps,
            batch_size=s.batch_size,
            lr=s.lr,
            seed=seed,
            log_every=0,
            callback=cb,
            quiet=True,
        )
    except _Stop:
        pass
    model.eval()


# ------------------------------------------------------------------------------------------------ chi and weights


def estimate_induction_chi(model, s: InductionSettings, seed: int = 0):
    """Per-token susceptibilities at the current weights: components = all heads + ``embed``.

    Returns ``(result, column_groups)``: the :class:`~pypattern.susceptibility.SusceptibilityResult` and the group
    ``(num_probe_tokens,)`` of each column.
    """
    task = GroupWeightedInduction(s.d_vocab, s.seq_len)
    probe = task.sample(s.probe_size, seed=10_000 + seed)
    loader = [task.sample(s.batch_size, seed=20_000 + 100 * seed + i).tokens for i in range(16)]
    comps = [f"blocks.{layer}.attn.head.{h}" for layer in range(2) for h in range(s.n_heads)] + ["embed"]

    def lm_loss(m, batch):
        return m(batch, return_type="loss")

    res = susceptibilities(
        model,
        loader,
        probe.tokens,
        comps,
        loss_fn=lm_loss,
        **s.chi_sampler(seed),
    )
    groups = probe.extra["token_group"][res.probe_sample, res.probe_position - 1].numpy()
    return res, groups


def pattern_weights(res, groups: np.ndarray, s: InductionSettings, fractions=None) -> dict:
    """Invert a principal susceptibility direction into group weights for both poles.

    ``fractions``: the groups' shares of the training tokens; the inversion then keeps the data-weighted mean of
    the weights at 1 (``invert(..., fractions=)``), so the weights are used as returned, within the bounds.

    Returns a dict with the chosen principal component ``pc`` (0-based), its ``direction`` over components,
    the separation of induction tokens on every PC (``separation``), the group susceptibility matrix
    ``chi_groups`` (K, 3), and for ``"accelerate"``/``"delay"``: the :class:`Intervention` and the normalised
    group ``weights``.
    """
    pca = res.pca()
    npc = min(3, pca.directions.shape[0])
    ind = groups == 0
    sep = []
    for j in range(npc):
        a, b = pca.scores[ind, j], pca.scores[~ind, j]
        pooled = math.sqrt(0.5 * (a.var(ddof=1) + b.var(ddof=1))) or 1.0
        sep.append(float((a.mean() - b.mean()) / pooled))
    pc = int(np.argmax(np.abs(sep)))
    direction = pca.directions[pc]
    n = res.chi.shape[1]
    chi_g = np.stack([res.chi[:, groups == g].sum(1) for g in range(3)], 1) * 3 / n
    scale = float(np.abs(chi_g).max()) or 1.0
    out = {"pc": pc, "direction": direction, "separation": sep, "chi_groups": chi_g, "pca": pca}
    ivs = {}
    for sign in (+1.0, -1.0):
        iv = invert(
            chi_g,
            direction_target(direction, sign * s.amount * scale),
            method="constrained",
            min_weight=s.min_weight,
            max_weight=s.max_weight,
            fractions=fractions,
        )
        ivs[sign] = iv
    # name the poles: "accelerate" up-weights the induction group (relative to the other pole)
    acc = +1.0 if ivs[+1.0].weights[0] >= ivs[-1.0].weights[0] else -1.0
    for name, sign in (("accelerate", acc), ("delay", -acc)):
        out[name] = {"intervention": ivs[sign], "weights": ivs[sign].weights, "sign": sign}
    return out


# ------------------------------------------------------------------------------------------------ experiment


def _check_steps(s: InductionSettings) -> None:
    """Refuse, naming the setting, step counts the run cannot follow (before any training)."""
    from .._checks import is_count

    for name, least in (("checkpoint_step", 0), ("eval_every", 1), ("max_steps", 0), ("stop_after_onset", 0)):
        value = getattr(s, name)
        if not is_count(value) or value < least:
            raise ValueError(f"InductionSettings.{name}={value!r} is not valid; give an int >= {least}")
    if s.max_steps < s.checkpoint_step:
        raise ValueError(
            f"InductionSettings.max_steps={s.max_steps} is not valid; give at least checkpoint_step="
            f"{s.checkpoint_step} (the continuations train from the checkpoint up to max_steps)"
        )


def run_induction_seed(seed: int, s: InductionSettings | None = None, log=None) -> dict:
    """One seed of the experiment (see the module docstring). Returns curves, onsets, chi and weights."""
    s = s or InductionSettings()
    _check_steps(s)
    log = log or (lambda *a: None)
    t0 = time.perf_counter()
    base_task = GroupWeightedInduction(s.d_vocab, s.seq_len)
    ev = base_task.sample(s.num_eval, seed=777)
    model = Transformer(base_task.model_config(d_model=s.d_model, n_heads=s.n_heads, seed=seed))
    pre: list = []
    _train_segment(model, base_task, s.checkpoint_step, s, seed, 0, ev, pre, stop_on_onset=False)
    ckpt = copy.deepcopy(model.state_dict())
    pre_onset = onset_step([c[0] for c in pre], [c[1] for c in pre], s.threshold) if pre else math.inf
    t1 = time.perf_counter()
    res, groups = estimate_induction_chi(model, s, seed=seed)
    t2 = time.perf_counter()
    pw = pattern_weights(res, groups, s, fractions=base_task.group_fractions.numpy())
    log(f"seed {seed}: chi {res.chi.shape} in {t2 - t1:.0f}s, PC{pw['pc'] + 1} separation {pw['separation']}")
    runs = {}
    cap = s.max_steps
    for name, w in (
        ("baseline", None),
        ("accelerate", pw["accelerate"]["weights"]),
        ("delay", pw["delay"]["weights"]),
    ):
        task = GroupWeightedInduction(s.d_vocab, s.seq_len, group_weights=w)
        m = Transformer(base_task.model_config(d_model=s.d_model, n_heads=s.n_heads, seed=seed))
        m.load_state_dict(ckpt)
        curve = list(pre)
        _train_segment(m, task, cap - s.checkpoint_step, s, 1000 + seed, s.checkpoint_step, ev, curve)
        steps = [c[0] for c in curve]
        onset = onset_step(steps, [c[1] for c in curve], s.threshold)
        if name == "baseline" and s.cap_factor and math.isfinite(onset):
            # patterned runs stop at cap_factor x the baseline onset: a censored delay is then >= cap_factor - 1
            # (never below the checkpoint: a baseline onset before it leaves the patterned runs no steps to train)
            cap = min(s.max_steps, int(math.ceil(s.cap_factor * onset / s.eval_every)) * s.eval_every)
            cap = max(cap, s.checkpoint_step)
        runs[name] = {
            "curve": np.asarray(curve),
            "onset": onset,
            "censored_at": None if math.isfinite(onset) else int(steps[-1]),
            "group_weights": None if task.group_weights is None else task.group_weights.numpy().tolist(),
        }
        log(f"seed {seed}: {name} onset {onset} (weights {runs[name]['group_weights']})")
    return {
        "seed": seed,
        "settings": dataclasses.asdict(s),
        "pre_checkpoint_onset": pre_onset,
        "chi": res,
        "column_groups": groups,
        "patterning": pw,
        "runs": runs,
        "group_fractions": base_task.group_fractions.numpy().tolist(),
        "seconds": {"checkpoint": t1 - t0, "chi": t2 - t1, "total": time.perf_counter() - t0},
    }


def run_induction_experiment(seeds=(0, 1, 2), s: InductionSettings | None = None, log=None) -> dict:
    """All seeds, with the summary: onsets per condition and the relative shifts against the baseline."""
    s = s or InductionSettings()
    with pinned_threads(s.num_threads or None):
        per_seed = [run_induction_seed(seed, s, log) for seed in seeds]
    return {"settings": dataclasses.asdict(s), "per_seed": per_seed, "summary": summarize_onsets(per_seed, s)}


def summarize_onsets(per_seed: list, s: InductionSettings) -> dict:
    """Onsets per condition and their shifts against the baseline, per seed.

    A censored patterned run (no onset by its cap) gives a lower bound on its shift; a seed whose baseline did
    not form the circuit within ``max_steps`` has no shift to measure (NaN, and ``None`` in the per-seed goal
    flags). ``relative_shift_after_checkpoint`` compares the steps trained after ``checkpoint_step``: NaN where the
    baseline onset is at or before it.
    """
    summary = {
        "seeds": [r["seed"] for r in per_seed],
        "onset": {},
        "relative_shift": {},
        "relative_shift_after_checkpoint": {},
    }
    for name in ("baseline", "accelerate", "delay"):
        summary["onset"][name] = [r["runs"][name]["onset"] for r in per_seed]
    summary["censored_at"] = {
        n: [r["runs"][n]["censored_at"] for r in per_seed] for n in ("accelerate", "delay")
    }
    c = s.checkpoint_step
    for name in ("accelerate", "delay"):
        rel, rel_c, lower = [], [], []
        for r in per_seed:
            b, o = r["runs"]["baseline"]["onset"], r["runs"][name]["onset"]
            if not math.isfinite(b):  # the baseline never formed the circuit: no shift to measure
                rel.append(math.nan)
                rel_c.append(math.nan)
                lower.append(math.nan)
                continue
            rel.append(o / b - 1)
            # a baseline onset at or before the checkpoint left no training after it to compare (every run
            # shares the curve up to the checkpoint, so the onsets are equal there): no shift after it (NaN)
            rel_c.append((o - c) / (b - c) - 1 if b > c else math.nan)
            cens = r["runs"][name]["censored_at"]
            # a censored run only gives a lower bound on its onset: the last step it reached
            lower.append((o if cens is None else cens) / b - 1)
        summary["relative_shift"][name] = rel
        summary["relative_shift_after_checkpoint"][name] = rel_c
        summary.setdefault("relative_shift_lower_bound", {})[name] = lower
    summary["baseline_censored_at"] = [r["runs"]["baseline"]["censored_at"] for r in per_seed]
    rs = summary["relative_shift"]
    # per seed: True / False, or None where the baseline did not form the circuit within the cap
    summary["accelerate_ge_20pct"] = [None if math.isnan(x) else bool(x <= -0.2) for x in rs["accelerate"]]
    summary["delay_ge_20pct"] = [
        None if math.isnan(x) else bool(x >= 0.2) for x in summary["relative_shift_lower_bound"]["delay"]
    ]
    summary["accelerate_all_ge_20pct"] = all(x is True for x in summary["accelerate_ge_20pct"])
    summary["delay_all_ge_20pct"] = all(x is True for x in summary["delay_ge_20pct"])
    summary["pc_used"] = [r["patterning"]["pc"] + 1 for r in per_seed]
    return summary
