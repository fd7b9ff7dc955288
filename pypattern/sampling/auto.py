"""``step_size="auto"``: a short calibration before a run that picks the SGLD step size.

It is the default of :func:`pypattern.sample`, :func:`pypattern.estimate_llc`, :func:`pypattern.susceptibilities`,
:func:`pypattern.bif` (and what builds on them: :func:`pypattern.refined_llc`, :class:`pypattern.OnlineLLC`, the
``pypattern llc|chi`` commands) when no step is given; a given step (``step_size=``, or ``lr``/``step_size`` in
``optimizer_kwargs``) turns it off. devinterp's entry points (:func:`pypattern.estimate_learning_coeff`,
:func:`pypattern.estimate_learning_coeff_with_summary`, :mod:`pypattern.devinterp`) keep devinterp's own default
step (``lr=0.01``) and never calibrate.

The rule
--------
Candidate step sizes form a geometric grid with ratio 2, from ``max_step_size`` (default ``0.1``) down to
``min_step_size`` (default ``1e-7``): at most 21 candidates, tried from the largest down. For each candidate
``eps`` a *trial* runs ``calibration_chains`` chains (default 8; 4-8 as many as the run when called through
:func:`pypattern.sample`) of ``calibration_steps`` steps (default 200): the first half is burn-in, the second half
gives the draws. A trial is **healthy** when

* no chain diverged or ran away (:class:`SamplingDivergedError`, see :func:`pypattern.sample`),
* the LLC estimate is positive (the chains sit above ``L_n(w*)``),
* the split R-hat of the loss trace is below ``max_r_hat`` (default 1.1), and
* the chains can have relaxed from ``w*`` in the trial's steps (SGLD; "Relaxation" below).

**Coupled pairs** (the default for SGLD without a bounding box when the trials' chains can run batched: their
stacked weights under 64 MB of float32, and ``batched`` not False; coupled trials always run batched). The
scan compares ``eps`` with ``eps / 2`` on the same noise: a trial at ``eps / 2`` (``pair_factor`` = 4 units of
steps for the first healthy candidate, doubled for each smaller one, at most ``max_trial_factor``) and a trial at
``eps`` of half as many steps whose step ``t`` takes the summed noise of the half step's steps ``2t`` and ``2t + 1``
and its batches (``noise_coupling=2`` of :func:`pypattern.sample`: the Euler step of the same Brownian path).
Chain by chain the two trials then differ by their discretisation, not by their noise, so the change of the
estimate when the step is halved, ``D = llc(eps) - llc(eps / 2)`` (the mean over chains of the per-chain
differences, with the standard error of that mean), is measured with a far smaller standard error than on
independent trials (normal crossing, 8-chain trials: 0.0039 against 0.054 at 0.025 / 0.0125, 0.0048 against
0.032 at 0.0125 / 6.25e-3; the coupling weakens where chains' excursions part). ``eps`` is accepted when both trials are healthy and
``|D|`` is at most the largest of ``z`` standard errors of ``D``, the run's own standard error at ``eps / 2``
(predicted from the half step's trial, scaled by the square root of the ratio of draw chain-steps) and
``atol_rel``, and at most ``rtol``: the bias of the run's step is within what the run itself can resolve. The
run uses ``eps / 2``. When the accepted pair's change has a standard error wider than ``rtol`` of the estimate,
the pair passed without resolving a bias of ``rtol`` (the chains' excursions parted): the reason says so and a
:class:`~pypattern.sampling.diagnostics.StepBiasWarning` is given (on ``y = w1 w2 x`` at ``nbeta = 100``, seed 2:
a change of +0.017 with standard error 0.15 at 0.025 / 0.0125, and the run at 0.0125 came out 36% high;
docs/llc_results.md). When no coupled pair passes (the estimates keep changing by more than the run's standard
error down the grid: on the deep linear network (3,3,3,2) at ``nbeta = 100`` the stationary estimate moves from
3.59 to 2.59 between steps 3.1e-3 and 3.9e-4, so no step is unbiased within the run's error), the rule on
independent trials below runs as it would alone, and the reason says so.

**Independent pairs.** The scan stops at the largest healthy ``eps`` whose estimate is **unchanged when the
step is halved**: the trial at ``eps / 2`` (run for twice as many steps, so that both cover the same stretch of Langevin time) is healthy
too and the two estimates differ by at most ``z`` (default 2) combined standard errors,
``|llc(eps) - llc(eps/2)| <= z * sqrt(se(eps)^2 + se(eps/2)^2)``, and by at most ``rtol`` (default 10%) of
``llc(eps/2)``. A change below 2% of the estimate always counts as unchanged (long trials of a large model can
have standard errors of a fraction of a percent, far below what matters for the estimate).

**Resolution** (``resolve=True``, off by default). A pair whose change is within ``rtol`` but whose combined
standard error is too wide to see a change of ``rtol`` (``z * sqrt(se(eps)^2 + se(eps/2)^2) > rtol * llc(eps/2)``)
is not judged on it: both trials run again twice as long, until the pair resolves ``rtol`` or the trials reach
``max_trial_factor`` times ``calibration_steps``; later (smaller) steps keep the longer trials. It is off by
default because it was measured to hurt: it picks smaller steps, and a run of a fixed number of draws then
covers less Langevin time and is not at equilibrium (the deep linear network (3,3,3,2) with the tests' run
went from +1.1% to -19%; the normal crossing's seed 1 from +16% to +21%).

The run then uses ``eps / 2``. The discretisation bias grows about linearly with the step (Richardson:
``llc(eps) = llc + b eps``), so the measured difference ``llc(eps) - llc(eps / 2) = b eps / 2`` *is* the bias of
the chosen step, within the pair's standard error; the report keeps it (``bias``) and the reason prints it. On
the deep-linear-network truths the accepted step itself was measured 14% high, its half within 5%.
Each trial's standard error is ``nbeta * std(loss draws) / sqrt(ESS)`` (pooled over the trial's chains). Trial
lengths double with each halving below the first healthy candidate, up to ``max_trial_factor`` times
``calibration_steps``; the scan gives up 4 candidates below the first healthy one. Called through
:func:`pypattern.sample` (and what builds on it), trials are no longer than the run in chain-steps
(:func:`trial_factor_for_run`, ``run_trial_factor``): a short run is not calibrated with trials many times its own
length, except that a trial ``k`` halvings below the first healthy one that is not stationary runs again for ``2 **
k`` times that trial's steps (up to ``max_trial_factor``), the same Langevin time, before it is judged. Without that
second run a short run's trials at smaller steps were too short to reach stationarity, and the scan failed (the deep
linear network (3, 2) with 4 chains x 200 draws raised :class:`AutoStepError` for 3 of 6 data orders; see
``tests/test_auto_step.py``). A trial run again to relax (below) may also be longer than the run.

Relaxation
----------
The chains start at ``w*``; a trial says something about a step only when they have relaxed to the localized
posterior in its burn-in. SGLD's drift is ``-(eps / 2) (nbeta grad L + gamma (w - w*))`` with ``gamma =
localization + weight_decay``: at a minimum of ``L`` a direction of curvature ``h`` relaxes at the rate ``eps (nbeta
h + gamma) / 2`` per step, so every direction at least at ``eps gamma / 2`` (the flattest), and none faster than
``eps K / 2`` for the largest curvature ``K`` of ``nbeta L + gamma |w - w*|^2 / 2``, where ``K < 4 / eps'`` when a
trial at a step ``eps'`` ran without diverging. A trial of ``S`` steps at ``eps`` therefore covers at least ``R =
eps gamma S / 2`` relaxation times of its flattest direction and at most ``2 eps S / eps'`` of its stiffest
(``eps'`` the largest step whose trial did not diverge). From ``w*``, the share of the estimate of a direction that
covered ``R`` relaxation times falls short of its stationary value by ``(e^-R - e^-2R) / R`` (the second half's
mean): 1.6% at 3. With ``relaxation_times`` (default 3):

* a trial that covers fewer than ``relaxation_times`` relaxation times of even its stiffest direction has relaxed in
  no direction: it is **not relaxed**. When not even a trial of ``max_trial_factor`` units of a candidate could
  cover them, the scan stops there (a smaller step relaxes more slowly still), and the reason says so.
* a trial that is not stationary or not relaxed runs again, before it is judged, for ``relaxation_target`` (default
  20) relaxation times of its flattest direction when that fits in ``max_trial_factor`` units, else for
  ``relaxation_times`` of it, else for ``relaxation_times`` of its stiffest direction (only when longer than it
  ran). Where the flattest directions carry the loss's fluctuations, a stationary trial of ``R`` relaxation times
  holds about ``R`` effective draws per chain, and with a few its split R-hat exceeds 1.1 by chance (the
  regression below at 0.1, 4 chains, 10 seeds: ``R`` = 5, 10, 20, 40 gave 7, 13, 21, 41 effective draws per chain
  and R-hat >= 1.1 in 60%, 20%, 10%, 0% of the trials, with the same estimate; 8 chains failed as often).
* a trial that covers at least ``relaxation_times`` of its flattest direction has relaxed in every direction. One
  in between has relaxed in its stiff directions; its flat ones (which contribute little to the LLC when flat
  against the localization) may still be relaxing: the reason gives both numbers for the chosen pair. (The
  estimate of a singular model creeps up there: on the deep linear network (3, 3, 3, 2) at ``nbeta = 100`` the
  trials' estimates at 3.1e-3 to 3.9e-4 (400 to 1,600 steps) were 13-26% higher over the second half of their
  steps than over the quarter before, while the run of 3,000 steps at the chosen 1.56e-3 gives 3.03 for the
  learning coefficient 3: a rule on that growth refused there.)

Measured on a linear regression at its least-squares minimum (``d = 18``, ``n = 1000``, minibatches of 100,
``nbeta = 0.5``, ``localization = 1``; exact LLC 2.880, the run 4 chains x 200 draws; docs/llc_results.md): trials
of 100 steps fail R-hat at every step from 0.1 down to 5e-5. At the top the chains are stationary but the trials
short (0.1: 5 relaxation times, R-hat 1.12); further down they are still relaxing (estimates 2.60, 2.50, 2.31,
1.88, 1.30, 0.78, ... falling with the step). At 2.4e-5 the chains do not move (0.001 relaxation times of the
flattest direction, at most 0.05 of the stiffest): the loss trace is minibatch noise around ``L_n(w*)`` (R-hat
1.04), and the halving pair covers the same short Langevin time and agrees with itself, so without the relaxation
rules 1.2e-5 is chosen and the estimate is 0.024. With them that trial is not relaxed, the trial at 0.1 runs again
for 400 steps (20 relaxation times; R-hat 1.07) and pairs with 0.05, which is chosen: 2.79 +- 0.23 (the
full-batch loader: 2.79 +- 0.22; without the rules 6.25e-3, after 28 trials).

The bounds assume SGLD (no relaxation rules for other samplers) at a minimum of ``L``: where ``L`` curves down the
flattest direction relaxes more slowly than ``eps gamma / 2`` (or drifts away: R-hat). The stiffest direction's
bound comes from the largest step that ran without diverging: with a ``max_step_size`` so small that the chains
barely move at it, it bounds nothing and only R-hat is left (which a trace of minibatch noise passes).
``relaxation_times=0`` turns the relaxation rules off.

A too-large step diverges, drifts (R-hat) or inflates the estimate (the halving test catches the discretisation
bias). A too-small step covers too little Langevin time for the chains to relax in a trial: its trial runs again
longer or is not relaxed, so the halving pair of a step whose chains barely move (which covers the same short
stretch of Langevin time twice, and agrees with itself) is not accepted. When no candidate passes,
:class:`AutoStepError` is raised with the table of every trial (step, steps, R-hat, estimate, SE, verdict).

What a trial cannot see: a rare excursion that a run of many more chain-steps meets. On the normal crossing
``K = w1^2 w2^4`` the curvature across an arm grows as ``w2^4``, so a step that is stable in every trial can
become unstable far out on an arm: 0.0125, healthy in 8 chains x 3,200 steps, ran away in 64 chains x 9,600 steps;
its half (the chosen step) is stable but has heavy-tailed excursions (docs/llc_results.md). The run itself is the
longest trial: a run at the calibrated step that diverges or runs away is run again from the start at half the
step (at most three times, with a warning; ``reruns`` in the report), in :func:`pypattern.sample`,
:func:`pypattern.susceptibilities` and :func:`pypattern.bif`, unless the run writes a checkpoint or has callbacks
without ``reset()``.

``nbeta`` and ``localization``
-------------------------------
``nbeta`` keeps its rule: the default ``m / ln m`` for batch size ``m`` (devinterp's, the inverse temperature
of the tempered posterior of a batch). ``localization`` is not calibrated: it sets the prior the estimate is
defined by (a different localization is a different quantity, not a more or less accurate one), and no rule
from the data is established; the calibration uses the run's ``localization`` and ``nbeta`` as given and picks
only the step.

Budget
------
A trial at the top of the grid that runs away stops at the first non-finite or runaway draw. A full trial costs
``calibration_chains * calibration_steps`` chain-steps (times its length factor), so the calibration costs a few
such trials: typically 4-10 (for example 8 x 200 x (1 + 2 + 4 + 8) = 24,000 chain-steps); a trial run again to
relax costs up to ``max_trial_factor`` units more. Every trial reuses the
first trial's ``L_n(w*)``. The trials are keyed by ``seed + 1`` (different noise from the run's), and they never
modify the model. A run with a checkpoint records its calibration there (a susceptibility folder in a file of its
own); resuming the same call reads it back instead of calibrating again (:func:`calibrate_or_resume`). A progress bar counts the trials (``quiet=True`` silences it). Measured costs are in
docs/llc_results.md.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .._checks import is_count, is_real
from ..io import Saveable, register
from .diagnostics import (
    NonFiniteLossError,
    NonStationaryWarning,
    SamplingDivergedError,
    StepBiasWarning,
    user_stacklevel,
)

__all__ = ["AutoStepError", "AutoStepReport", "resolve_step_size", "step_size_grid", "wants_auto"]

_PASSED_TO_TRIALS = (
    "weight_decay",
    "noise_scale",
    "bounding_box",
    "restrict_to",
    "masks",
    "runs",
    "grad_accum_steps",
    "batched",
    "backend",
    "num_init_loss_batches",
    "init_loss",
    "cores",
    "sampler",
    "sampling_method",
    "optimizer_kwargs",
)


class AutoStepError(ValueError):
    """No step size of the grid passed the calibration; ``report`` holds every trial (an :class:`AutoStepReport`)
    and the message prints its table."""

    def __init__(self, msg: str, report: AutoStepReport):
        super().__init__(msg)
        self.report = report


#: what the reason of a chosen step says when its trials covered too few relaxation times of the flattest direction
#: (:func:`pypattern.estimate_llc` warns about it)
UNRELAXED_NOTE = "directions that flat may not have relaxed"

#: the longest burn-in :func:`burnin_for_run` gives a run, in units of its draw steps (``num_draws *
#: num_steps_bw_draws``): for the default run (4 chains x 200 draws) 8,000 steps per chain, 32,000 chain-steps, about
#: what a calibration itself costs (8 chains x 200 steps x (1 + 2 + 4 + 8) = 24,000 chain-steps, and up to 8 units
#: more for a trial run again to relax): the burn-in at most about doubles the cost of a call whose step is calibrated
MAX_BURNIN_FACTOR = 40.0

_TRIAL_KEYS = ("step_size", "num_steps", "llc", "se", "r_hat", "verdict")


@register
@dataclass(eq=False)
class AutoStepReport(Saveable):
    """The trials of a ``step_size="auto"`` calibration, one entry per trial (lists of equal length).

    Attributes
    ----------
    step_size, num_steps, llc, se, r_hat : list of float
        The trial's step size, its steps per chain, its LLC estimate, standard error and split R-hat.
    verdict : list of str
        ``"ok"`` (healthy), ``"diverged ..."``, ``"negative LLC"``, ``"not stationary ..."``, ``"not relaxed ..."``
        (too few steps for the chains to relax from ``w*``).
    chosen : float or None
        The chosen step size (None when the calibration refused).
    bias : float or None
        The estimate at twice the chosen step minus the estimate at the chosen step: about the discretisation
        bias of the chosen step (the bias grows about linearly with the step).
    reason : str
        Why it was chosen (or why none was).
    settings : dict
        The calibration's settings (grid range, chains, steps, thresholds, nbeta, localization); ``nbeta`` is the
        value the trials ran at (the default ``m / ln m`` when none was given).
    seconds : float
        Wall time of the calibration.
    reruns : list of dict
        Runs at a calibrated step that diverged or ran away and were run again at half the step (``step_size``,
        ``chain``, ``draw``, ``step``, ``message``); ``chosen`` is then the step of the run that finished.
    burnin : dict
        The run's burn-in where :func:`pypattern.estimate_llc` chose it by :func:`burnin_for_run` (no
        ``num_burnin_steps`` given): ``num_burnin_steps``, ``needed`` (steps for ``relaxation_times`` relaxation
        times of the flattest direction at the chosen step, None without localization or weight decay), ``cap``,
        ``capped``, ``relaxation_times`` (what the burn-in covers of the flattest direction) and ``reason``; empty
        otherwise.
    """

    step_size: list = field(default_factory=list)
    num_steps: list = field(default_factory=list)
    llc: list = field(default_factory=list)
    se: list = field(default_factory=list)
    r_hat: list = field(default_factory=list)
    verdict: list = field(default_factory=list)
    chosen: float | None = None
    bias: float | None = None
    reason: str = ""
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    reruns: list = field(default_factory=list)
    burnin: dict = field(default_factory=dict)

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): one entry per trial in each of the trial lists (real
        numbers, a whole number of steps, a text verdict), a dict per rerun and for the settings."""
        from .results import check_lists

        special = {"verdict": ((str,), "texts"), "num_steps": ((int,), "whole numbers")}
        kinds = {k: special.get(k, ((int, float), "numbers")) for k in _TRIAL_KEYS}
        check_lists(vars(self), kinds, "trial")
        if not isinstance(self.settings, dict):
            raise ValueError(f"settings must be a dict, got {type(self.settings).__name__}")
        if not isinstance(self.reruns, list) or not all(isinstance(r, dict) for r in self.reruns):
            raise ValueError(f"reruns must be a list of dicts, got {self.reruns!r:.80}")
        if not isinstance(self.burnin, dict):
            raise ValueError(f"burnin must be a dict, got {type(self.burnin).__name__}")

    @classmethod
    def from_dict(cls, d: dict) -> AutoStepReport:
        """The report whose :meth:`to_dict` is ``d``."""
        trials = list(d.get("trials") or ())
        return cls(
            **{k: [t[k] for t in trials] for k in _TRIAL_KEYS},
            chosen=d.get("chosen"),
            bias=d.get("bias"),
            reason=str(d.get("reason", "")),
            settings=dict(d.get("settings") or {}),
            seconds=float(d.get("seconds") or 0.0),
            reruns=[dict(r) for r in d.get("reruns") or ()],
            burnin=dict(d.get("burnin") or {}),
        )

    def rows(self) -> list[dict]:
        keys = _TRIAL_KEYS
        return [{k: getattr(self, k)[i] for k in keys} for i in range(len(self.step_size))]

    def to_dict(self) -> dict:
        """Plain values (for a result's ``config``)."""
        return {
            "chosen": self.chosen,
            "bias": self.bias,
            "reason": self.reason,
            "trials": self.rows(),
            "settings": dict(self.settings),
            "seconds": self.seconds,
            "reruns": [dict(r) for r in self.reruns],
            "burnin": dict(self.burnin),
        }

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows())

    def __str__(self) -> str:
        lines = [f"{'step_size':>10} {'steps':>6} {'llc':>10} {'se':>9} {'R-hat':>7}  verdict"]
        for r in self.rows():
            lines.append(
                f"{r['step_size']:>10.3g} {r['num_steps']:>6d} {r['llc']:>10.4g} {r['se']:>9.3g} "
                f"{r['r_hat']:>7.3f}  {r['verdict']}"
            )
        lines.append(f"chosen step_size: {self.chosen} ({self.reason})")
        if self.burnin:
            lines.append(
                f"num_burnin_steps: {self.burnin.get('num_burnin_steps')} ({self.burnin.get('reason')})"
            )
        return "\n".join(lines)


def step_size_grid(max_step_size: float = 0.1, min_step_size: float = 1e-7) -> list[float]:
    """The candidates, largest first: ``max_step_size * 2^-k`` down to ``min_step_size``."""
    for name, v in (("max_step_size", max_step_size), ("min_step_size", min_step_size)):
        if not is_real(v) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0 (a step size), got {v!r}")
    if not (max_step_size > 0 and min_step_size > 0 and min_step_size <= max_step_size):
        raise ValueError(
            f"need 0 < min_step_size <= max_step_size, got min_step_size={min_step_size!r}, "
            f"max_step_size={max_step_size!r}"
        )
    n = int(math.floor(math.log2(max_step_size / min_step_size) + 1e-9)) + 1
    return [max_step_size * 2.0**-k for k in range(n)]


def _check_options(
    *, calibration_chains, calibration_steps, max_trial_factor, pair_factor, run_trial_factor, rtol, atol_rel
) -> None:
    """The calibration's counts (integers: ``calibration_chains`` >= 2, ``calibration_steps`` >= 16, the trial
    factors >= 1, ``run_trial_factor`` also None) and tolerances (finite numbers >= 0); ``ValueError`` naming
    the setting, before any trial runs."""
    counts = (
        ("calibration_chains", calibration_chains, 2, " (R-hat needs chains)"),
        ("calibration_steps", calibration_steps, 16, ""),
        ("max_trial_factor", max_trial_factor, 1, " (units of calibration_steps)"),
        ("pair_factor", pair_factor, 1, " (units of calibration_steps)"),
        ("run_trial_factor", run_trial_factor, 1, " (units of calibration_steps), or None"),
    )
    for name, v, least, what in counts:
        if name == "run_trial_factor" and v is None:
            continue
        if not is_count(v) or v < least:
            raise ValueError(f"{name} must be an int >= {least}{what}, got {v!r}")
    for name, v in (("rtol", rtol), ("atol_rel", atol_rel)):
        if not is_real(v) or not math.isfinite(v) or v < 0:
            raise ValueError(
                f"{name} must be a finite number >= 0 (a relative change of the estimate), got {v!r}"
            )


def resolve_step_size(
    model: nn.Module,
    loader: Iterable,
    *,
    loss_fn: Callable | None = None,
    nbeta: float | None = None,
    localization: float = 0.0,
    num_steps_bw_draws: int = 1,
    seed=0,
    max_step_size: float = 0.1,
    min_step_size: float = 1e-7,
    calibration_chains: int = 8,
    calibration_steps: int = 200,
    max_r_hat: float = 1.1,
    z: float = 2.0,
    rtol: float = 0.1,
    atol_rel: float = 0.02,
    max_trial_factor: int = 8,
    run_trial_factor: int | None = None,
    resolve: bool = False,
    coupled: bool = True,
    pair_factor: int = 4,
    run_draw_steps: int | None = None,
    relaxation_times: float = 3.0,
    relaxation_target: float = 20.0,
    max_burnin_factor: float = MAX_BURNIN_FACTOR,
    quiet: bool = True,
    **sample_kwargs,
) -> tuple[float, AutoStepReport]:
    """Pick the SGLD step size by the rule of :mod:`pypattern.sampling.auto`.

    Parameters
    ----------
    model, loader, loss_fn, nbeta, localization
        As for :func:`pypattern.sample` (``nbeta=None``: ``batch_size / ln(batch_size)``).
    num_steps_bw_draws : int
        Thinning of the trials' draws (the run's, so that trial and run judge the same trace).
    seed : int or sequence of int
        The run's seed; the trials use ``seed + 1``.
    max_step_size, min_step_size : float
        Range of the grid (ratio 2, largest first).
    calibration_chains, calibration_steps : int
        Chains per trial and steps per chain of a trial (half burn-in, half draws).
    max_r_hat : float
        Largest split R-hat of a trial's loss trace counted as stationary.
    z : float
        Standard errors allowed between the estimates at ``eps`` and ``eps / 2``.
    rtol : float
        Largest relative change of the estimate when the step is halved.
    atol_rel : float
        A relative change below this counts as unchanged whatever the standard errors.
    max_trial_factor : int
        Longest trial, in units of ``calibration_steps``.
    run_trial_factor : int, optional
        A softer limit for a short run (:func:`trial_factor_for_run`): trials are no longer than this, except that
        a trial ``k`` halvings below the first healthy one that is not stationary runs again for ``2 ** k`` times
        the first healthy trial's steps (at most ``max_trial_factor``), the same Langevin time, before it is
        judged: a shorter trial at a smaller step may not have reached its stationary distribution yet, and that a
        trial that is not stationary or not relaxed runs again for the length it needs to relax (``relaxation_target``)
        up to ``max_trial_factor``. None: no softer limit.
    resolve : bool
        Rerun a halving pair whose change is within ``rtol`` but whose standard errors are too wide to resolve
        ``rtol`` with both trials twice as long, until it resolves or reaches ``max_trial_factor``. Off by
        default: it picks smaller steps, and a run of a fixed number of draws then covers less Langevin time
        (measured: the deep linear network (3,3,3,2) went from +1.1% to -19%).
    coupled : bool
        Compare a step with its half on coupled noise (the rule's "coupled pairs") when the trials run batched
        SGLD without a bounding box; else, or with ``coupled=False``, on independent trials.
    pair_factor : int
        Coupled pairs: length of the first half-step trial, in units of ``calibration_steps`` (doubled for each
        smaller candidate, at most ``max_trial_factor``).
    run_draw_steps : int, optional
        Chain-steps of the run's draw phase (chains x draws x thinning): coupled pairs accept a change up to the
        run's own standard error, predicted from the half-step trial. None: up to ``rtol / 2``.
    relaxation_times : float
        Relaxation times (of the flattest direction, ``eps * (localization + weight_decay) * steps / 2``, or at
        most of the stiffest) below which a trial is not known to have relaxed from ``w*`` (module docstring,
        "Relaxation"); 0 turns the relaxation rules off.
    relaxation_target : float
        Relaxation times of the flattest direction a trial that is not stationary or not relaxed runs again for,
        when that fits in ``max_trial_factor`` units (else ``relaxation_times``).
    max_burnin_factor : float
        The longest burn-in :func:`pypattern.estimate_llc` gives a run at the chosen step when it chooses one
        (:func:`burnin_for_run`), in units of the run's draw steps (``num_draws * num_steps_bw_draws``); recorded in
        the report's settings, no effect on the trials.
    quiet : bool
        No progress bar (by default one bar counts the trials and shows the step being tried).
    **sample_kwargs
        ``weight_decay``, ``noise_scale``, ``bounding_box``, ``restrict_to``, ``masks``, ``runs`` (every run must
        pass), ``grad_accum_steps``, ``batched``, ``backend``, ``init_loss``, ``num_init_loss_batches``, ``cores``,
        ``sampler`` / ``sampling_method`` and ``optimizer_kwargs`` (the sampler's own hyperparameters: trials run
        the sampler the run will use); other keywords of :func:`pypattern.sample` (callbacks, observables, checkpoints) do not apply to trials
        and are ignored.

    Returns
    -------
    step_size : float
    report : AutoStepReport

    Raises
    ------
    AutoStepError
        No candidate passed; the message holds the table of trials.
    """
    from .llc import llc_from_sample
    from .runner import fits_batched, sample
    from .samplers import sampler_name

    _check_options(
        calibration_chains=calibration_chains,
        calibration_steps=calibration_steps,
        max_trial_factor=max_trial_factor,
        pair_factor=pair_factor,
        run_trial_factor=run_trial_factor,
        rtol=rtol,
        atol_rel=atol_rel,
    )
    if not is_real(max_r_hat) or not max_r_hat > 1:
        raise ValueError(
            f"max_r_hat must be a number > 1 (the largest split R-hat accepted), got {max_r_hat!r}"
        )
    if not is_real(z) or not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a finite number > 0 (standard errors allowed), got {z!r}")
    for name, v in (("relaxation_times", relaxation_times), ("relaxation_target", relaxation_target)):
        if not is_real(v) or not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0 (relaxation times), got {v!r}")
    for name, v in (("resolve", resolve), ("coupled", coupled)):
        if not isinstance(v, bool | np.bool_):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    if not is_count(num_steps_bw_draws) or num_steps_bw_draws < 1:
        raise ValueError(f"num_steps_bw_draws must be an int >= 1 (the thinning), got {num_steps_bw_draws!r}")
    if not is_real(max_burnin_factor) or not (math.isfinite(max_burnin_factor) and max_burnin_factor >= 1):
        raise ValueError(
            "max_burnin_factor must be a finite number >= 1 (the longest burn-in, in units of the run's draw "
            f"steps), got {max_burnin_factor!r}"
        )
    if run_draw_steps is not None and (not is_count(run_draw_steps) or run_draw_steps < 1):
        raise ValueError(
            f"run_draw_steps must be an int >= 1 (the run's draw chain-steps) or None, got {run_draw_steps!r}"
        )
    grid = step_size_grid(max_step_size, min_step_size)
    extra = {k: v for k, v in sample_kwargs.items() if k in _PASSED_TO_TRIALS and v is not None}
    trial_seed = (
        [int(s) + 1 for s in seed][: int(calibration_chains)]
        if isinstance(seed, list | tuple)
        else int(seed) + 1
    )
    if isinstance(trial_seed, list) and len(trial_seed) < int(calibration_chains):
        trial_seed = int(trial_seed[0])
    thin = max(1, int(num_steps_bw_draws))
    rep = AutoStepReport(
        settings=dict(
            max_step_size=float(max_step_size),
            min_step_size=float(min_step_size),
            ratio=2.0,
            calibration_chains=int(calibration_chains),
            calibration_steps=int(calibration_steps),
            max_r_hat=float(max_r_hat),
            z=float(z),
            rtol=float(rtol),
            atol_rel=float(atol_rel),
            nbeta=None if nbeta is None else float(nbeta),
            localization=float(localization),
            relaxation_times=float(relaxation_times),
            relaxation_target=float(relaxation_target),
            max_burnin_factor=float(max_burnin_factor),
        )
    )
    # SGLD's drift -(eps/2)(nbeta grad L + (localization + weight_decay)(w - w*)): at a minimum of L every direction
    # relaxes at least at the rate eps * gamma / 2 per step (the flattest), at most at eps * K / 2 for the largest
    # curvature K of the potential, and K < 4 / eps' when a trial at a step eps' ran without diverging
    relax = (
        sampler_name(extra.get("sampler"), extra.get("sampling_method")) == "sgld" and relaxation_times > 0
    )
    gamma = max(0.0, float(localization or 0.0)) + max(0.0, float(extra.get("weight_decay") or 0.0))
    if relax:  # the flattest direction's pull, read by burnin_for_run
        rep.settings["gamma"] = gamma
    stable: float | None = None  # the largest step whose trial ran without diverging
    t0 = time.perf_counter()
    cache: dict[tuple[int, int, int], dict] = {}
    pbar = None
    if not quiet:
        from .._progress import open_bar

        # shown after the library's usual delay: a calibration of a fraction of a second writes no line to a log
        pbar = open_bar(desc="SGLD step_size=auto", unit="trial", mininterval=0.5)

    def trial(i: int, factor: int, coupling: int = 1) -> dict:
        """The trial of step ``grid[i]`` for ``factor`` units of steps (``coupling=2``: half as many steps, on the
        noise of the trial of ``grid[i + 1]`` for ``factor`` units, see ``noise_coupling`` of :func:`sample`)."""
        longer = [f for (j, f, m) in cache if j == i and m == coupling and f >= factor]
        if longer:  # a trial of this step at least as long already ran: reuse the longest
            return cache[(i, max(longer), coupling)]
        eps = grid[i]
        steps = int(calibration_steps) * factor // coupling
        if pbar is not None:
            pbar.set_postfix_str(f"trying {eps:.3g} for {steps} steps", refresh=True)
        half = steps // 2
        draws = max(4, half // thin)
        row = dict(
            step_size=eps, num_steps=steps, llc=float("nan"), se=float("nan"), r_hat=float("nan"), draws=draws
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonStationaryWarning)
                out = sample(
                    model,
                    loader,
                    loss_fn=loss_fn,
                    num_chains=int(calibration_chains),
                    num_draws=draws,
                    num_burnin_steps=steps - draws * thin,
                    num_steps_bw_draws=thin,
                    step_size=eps,
                    nbeta=nbeta,
                    localization=localization,
                    seed=trial_seed,
                    quiet=True,
                    warn_nonstationary=False,
                    noise_coupling=coupling,
                    **extra,
                )
        except NonFiniteLossError:
            raise  # the data or the model, not the step: no trial can succeed
        except SamplingDivergedError as e:
            at = f"draw {e.draw}" if e.draw is not None and e.draw >= 0 else f"step {e.step}"
            row["verdict"] = f"diverged (chain {e.chain}, {at})"
            row["ok"] = False
            return done(i, factor, coupling, row)
        outs = out if isinstance(out, list) else [out]
        nonlocal stable
        stable = max(stable or 0.0, eps)
        # every trial judges against the same L_n(w*): computed by the first trial that finishes, then reused
        extra.setdefault("init_loss", float(outs[0].init_loss))
        llcs, ses, rhs, chains = [], [], [], []
        for o in outs:
            r = llc_from_sample(o)  # its ess and r_hat are those of the loss trace
            if rep.settings.get("nbeta") is None:  # the default m / ln m: the value the trials ran at
                rep.settings["nbeta"] = float(r.nbeta)
            chains.append(r.llc_per_chain)
            llcs.append(r.llc_mean)
            ses.append(float(r.nbeta * np.std(r.loss_trace, ddof=1) / math.sqrt(max(r.ess, 1.0))))
            rhs.append(r.r_hat)
        # several runs: judged by the worst of them; the table shows the run with the largest R-hat
        w = int(np.nanargmax(rhs)) if np.any(np.isfinite(rhs)) else 0
        row.update(
            llc=float(llcs[w]), se=float(ses[w]), r_hat=float(rhs[w]), llcs=llcs, ses=ses, chains=chains
        )
        if len(outs) > 1 and not all(v < max_r_hat for v in rhs):
            drifting.append(w)  # the run that keeps a joint trial from being stationary
        flat, stiff = relaxation(eps, steps)
        row["relaxation"] = (flat, stiff)
        if not all(v > 0 for v in llcs):
            row["verdict"], row["ok"] = "negative LLC", False
        elif not all(v < max_r_hat for v in rhs):
            row["verdict"], row["ok"] = f"not stationary (R-hat {max(rhs):.2f} >= {max_r_hat})", False
            row["drift"] = True
        elif relax and stiff < relaxation_times:
            times = f"at most {stiff:.2g} < {relaxation_times:g} relaxation times of the stiffest direction"
            row["verdict"], row["ok"], row["drift"] = f"not relaxed ({times} in {steps} steps)", False, True
        else:
            row["verdict"], row["ok"] = "ok", True
        return done(i, factor, coupling, row)

    # several runs: the run with the largest R-hat of each trial that was not stationary
    drifting: list[int] = []

    def relaxation(eps: float, steps: int) -> tuple[float, float]:
        """Relaxation times a trial of ``steps`` steps at ``eps`` covers: at least ``eps * gamma * steps / 2`` (the
        flattest direction), at most ``2 * eps * steps / stable`` (the stiffest)."""
        return eps * gamma * steps / 2, 2 * eps * steps / max(stable or eps, eps)

    def needed(i: int, coupling: int = 1) -> int | None:
        """The units of steps a trial of ``grid[i]`` needs: to cover ``relaxation_target``, else
        ``relaxation_times``, relaxation times of the flattest direction, the first that fits in
        ``max_trial_factor``, else ``relaxation_times`` of the stiffest; None when not even that fits (the trial
        cannot relax, nor can one of a smaller step)."""
        unit = grid[i] * int(calibration_steps) / coupling  # Langevin time of one unit of steps
        for times in (max(relaxation_target, relaxation_times), relaxation_times) if gamma > 0 else ():
            f = math.ceil(2 * times / (gamma * unit) - 1e-9)
            if f <= max_factor:
                return max(1, f)
        f = max(1, math.ceil(relaxation_times * max(stable or grid[i], grid[i]) / (2 * unit) - 1e-9))
        return f if f <= max_factor else None

    def long_enough(i: int, f: int, coupling: int = 1) -> tuple[dict, int]:
        """The trial of ``grid[i]`` for ``f`` units; when it is not stationary or not relaxed, run again for the
        units :func:`needed` gives if they are more. Returns the trial and its units."""
        row = trial(i, f, coupling)
        if not relax or not drifted(row):
            return row, f
        n = needed(i, coupling)
        if n is not None and n > f:
            return trial(i, n, coupling), n
        return row, f

    def done(i: int, factor: int, coupling: int, row: dict) -> dict:
        cache[(i, factor, coupling)] = row
        if coupling > 1:
            row["verdict"] = f"{row['verdict']} (noise of the half step's trial)"
        row["k"] = len(rep.step_size)  # its row in the report
        _add(rep, row)
        if pbar is not None:
            pbar.update(1)
        return row

    def compare(row: dict, half: dict) -> tuple[list, list, list]:
        diffs = [a - b for a, b in zip(row["llcs"], half["llcs"], strict=True)]
        sds = [math.hypot(a, b) for a, b in zip(row["ses"], half["ses"], strict=True)]
        return diffs, sds, half["llcs"]

    max_factor = max(1, int(max_trial_factor))
    # the soft limit of a short run (run_trial_factor); the Langevin time of the first healthy trial is kept below it
    soft = max_factor if run_trial_factor is None else max(1, min(max_factor, int(run_trial_factor)))
    first_ok = None
    ext = 1  # doubled while a halving pair cannot resolve rtol; kept for the smaller steps after it

    def factor(i: int) -> int:
        return 1 if first_ok is None else min(soft, ext * 2 ** (i - first_ok))

    def matched(f: int, base: int, k: int) -> int:
        """The length of a trial ``k`` halvings below the first healthy one (of ``base`` units) that covers the same
        Langevin time: ``base * 2 ** k`` units (at least ``f``, at most ``max_factor``)."""
        return min(max_factor, max(f, base * 2**k))

    def drifted(row: dict) -> bool:
        return not row["ok"] and row.get("drift", False)

    unrelaxed: list[tuple[float, float]] = []  # where a scan stopped as no trial could relax, and ``stable``
    unresolved: list[str] = []  # the accepted coupled pair's change had a standard error wider than rtol

    def cannot_relax(i: int, coupling: int) -> bool:
        """Whether no trial of ``grid[i]`` (and of a smaller step) within ``max_trial_factor`` units can cover
        ``relaxation_times`` relaxation times of even the stiffest direction (known once a trial ran)."""
        if not relax or stable is None or needed(i, coupling) is not None:
            return False
        unrelaxed.append((grid[i], stable))
        return True

    def relaxed_note(*rows: dict) -> str:
        """The relaxation of the accepted pair's trials, for the reason."""
        if not relax:
            return ""
        flat = min(row["relaxation"][0] for row in rows)
        stiff = min(row["relaxation"][1] for row in rows)
        if gamma > 0:  # read by estimate_llc's warning (pypattern.sampling.llc)
            rep.settings["flattest_relaxation_times"] = float(flat)
        if flat >= relaxation_times:
            return f"; its trials cover {flat:.3g} relaxation times of the flattest direction"
        if gamma <= 0:
            return (
                f"; its trials cover at most {stiff:.3g} relaxation times of the stiffest direction (without "
                "localization or weight decay nothing pulls the flattest directions back: they do not relax)"
            )
        return (
            f"; its trials cover at most {stiff:.3g} relaxation times of the stiffest direction and {flat:.2g} of the "
            f"flattest (fewer than {relaxation_times:g}: {UNRELAXED_NOTE})"
        )

    def scan_coupled() -> bool | None:
        """The scan on coupled pairs: whether a step was chosen; None when the trials cannot be coupled."""
        first = None  # the first candidate whose trial was healthy
        f_first = 1  # the length of its half-step trial
        for i in range(len(grid) - 1):
            if first is not None and i > first + 4:
                break
            if cannot_relax(i, 2):
                break
            k = 0 if first is None else i - first
            f = min(soft, max(1, int(pair_factor)) * 2**k)
            fm = f if first is None else matched(f, f_first, k)
            try:
                row, f = long_enough(i, f, coupling=2)
            except (ValueError, RuntimeError):  # noise_coupling refused, or the model does not run under vmap
                if cache or rep.step_size:
                    raise
                return None
            fm = max(fm, f)
            if drifted(row) and fm > f:  # too short for its step: again over the first healthy one's time
                f = fm
                row = trial(i, f, coupling=2)
            if not row["ok"]:
                continue
            if first is None:
                first, f_first = i, f
            half = trial(i + 1, f)
            if drifted(half) and fm > f:
                f = fm
                row, half = trial(i, f, coupling=2), trial(i + 1, f)
                if not row["ok"]:
                    continue
            if not half["ok"]:
                rep.verdict[row["k"]] = f"{rep.verdict[row['k']]}; halved step not healthy"
                continue
            diffs, sds, cs = [], [], []
            for a, b, c in zip(row["chains"], half["chains"], half["llcs"], strict=True):
                d = np.asarray(a) - np.asarray(b)
                diffs.append(float(d.mean()))
                sds.append(float(d.std(ddof=1) / math.sqrt(len(d))))
                cs.append(float(c))
            # the run's own standard error at the half step, predicted from the half step's trial
            if run_draw_steps is None:
                run_ses = [0.5 * rtol * abs(c) for c in cs]
            else:
                trial_steps = half["draws"] * thin * int(calibration_chains)
                run_ses = [se * math.sqrt(trial_steps / max(int(run_draw_steps), 1)) for se in half["ses"]]
            tols = [
                min(rtol * abs(c), max(z * sd, rse, atol_rel * abs(c)))
                for sd, rse, c in zip(sds, run_ses, cs, strict=True)
            ]
            if all(abs(d) <= t for d, t in zip(diffs, tols, strict=True)):
                w = int(np.argmax([abs(d) for d in diffs]))
                rep.chosen, rep.bias = float(grid[i + 1]), float(diffs[w])
                rep.reason = (
                    f"{grid[i]:.3g} is the largest healthy step (R-hat {row['r_hat']:.3f} < {max_r_hat}, no runaway, "
                    f"LLC > 0) whose estimate moves by {diffs[w]:+.3g} ({diffs[w] / abs(cs[w]):+.1%} of "
                    f"{cs[w]:.4g}, standard error {sds[w]:.2g}) when the step is halved, on the same noise: within "
                    f"the run's predicted standard error ({run_ses[w]:.2g}), {z:g} standard errors of the change or "
                    f"{atol_rel:.0%}, and {rtol:.0%} ({abs(diffs[w]):.3g} <= {tols[w]:.3g}); the run uses the half "
                    "step, whose discretisation bias is about that change" + relaxed_note(row, half)
                )
                # the change's own standard error wider than rtol of the estimate: the pair passed without
                # resolving a change of rtol (chains whose excursions part decouple the pair), so the chosen step's
                # bias is not known to be within rtol
                u = int(np.argmax([sd / max(abs(c), 1e-300) for sd, c in zip(sds, cs, strict=True)]))
                if rtol > 0 and sds[u] > rtol * abs(cs[u]):
                    note = (
                        f"the change's standard error ({sds[u]:.2g}) is wider than {rtol:.0%} of the estimate "
                        f"({cs[u]:.4g}): the pair cannot resolve a bias of {rtol:.0%}"
                    )
                    rep.reason += "; " + note
                    unresolved.append(note)
                return True
            w = int(np.argmax([abs(d) / t for d, t in zip(diffs, tols, strict=True)]))
            rep.verdict[row["k"]] += (
                f"; changes when halved ({diffs[w]:+.3g}, se {sds[w]:.2g}, > {tols[w]:.3g})"
            )
        return False

    batched = extra.get("batched")
    n_runs = len(extra["runs"]) if extra.get("runs") is not None else 1
    couple = (
        bool(coupled)
        and sampler_name(extra.get("sampler"), extra.get("sampling_method")) == "sgld"
        and extra.get("bounding_box") is None
        and (batched is True or (batched is None and fits_batched(model, int(calibration_chains) * n_runs)))
    )

    def scan_independent() -> None:
        """The scan on independent trials (the pairs' estimates compared within their standard errors)."""
        nonlocal first_ok, ext
        for i in range(len(grid)):
            if first_ok is not None and i > first_ok + 4:
                break
            if cannot_relax(i, 1):
                break
            f = factor(i)
            row, f = long_enough(i, f)
            if first_ok is not None and drifted(row) and matched(f, 1, i - first_ok) > f:
                row = trial(i, matched(f, 1, i - first_ok))  # again over the first healthy one's time
            if not row["ok"]:
                continue
            if first_ok is None:
                first_ok = i
            if i + 1 >= len(grid) or cannot_relax(i + 1, 1):
                break
            f = factor(i + 1)
            half, f = long_enough(i + 1, f)
            if drifted(half) and matched(f, 1, i + 1 - first_ok) > f:
                half = trial(i + 1, matched(f, 1, i + 1 - first_ok))
            if not half["ok"]:
                rep.verdict[row["k"]] = "ok; halved step not healthy"
                continue
            diffs, sds, cs = compare(row, half)
            # within rtol but too wide to resolve it: both trials again, twice as long (up to max_trial_factor);
            # a change beyond rtol fails whatever the standard errors, so it is not rerun
            while (
                resolve
                and all(abs(d) <= rtol * abs(c) for d, c in zip(diffs, cs, strict=True))
                and any(z * sd > rtol * abs(c) for sd, c in zip(sds, cs, strict=True))
                and factor(i + 1) < soft
            ):
                ext *= 2
                row, half = trial(i, factor(i)), trial(i + 1, factor(i + 1))
                if not (row["ok"] and half["ok"]):
                    break  # a longer trial ran away or drifted: the pair fails
                diffs, sds, cs = compare(row, half)
            if not (row["ok"] and half["ok"]):
                continue
            tols = [min(max(z * sd, atol_rel * abs(c)), rtol * abs(c)) for sd, c in zip(sds, cs, strict=True)]
            if all(abs(d) <= t for d, t in zip(diffs, tols, strict=True)):
                w = int(np.argmax([abs(d) for d in diffs]))
                bias = diffs[w]
                rep.chosen = float(grid[i + 1])
                rep.bias = float(bias)
                rep.reason = (
                    f"{grid[i]:.3g} is the largest healthy step (R-hat {row['r_hat']:.3f} < {max_r_hat}, no runaway, "
                    f"LLC > 0) whose estimate {row['llc']:.4g} agrees with {half['llc']:.4g} at half the step within "
                    f"{z:g} standard errors and {rtol:.0%} ({abs(bias):.3g} <= {tols[w]:.3g}); the run uses the half "
                    f"step, whose discretisation bias is about the difference, {bias:+.3g} "
                    f"({bias / abs(cs[w]):+.1%}, standard error {sds[w]:.2g})" + relaxed_note(row, half)
                )
                break
            w = int(np.argmax([abs(d) / t for d, t in zip(diffs, tols, strict=True)]))
            rep.verdict[row["k"]] = f"ok; changes when halved ({abs(diffs[w]):.3g} > {tols[w]:.3g})"

    try:
        # coupled pairs first; when none passes (or they cannot be coupled), pairs of independent trials
        coupled_result = scan_coupled() if couple else None
        if not coupled_result:
            cache.clear()  # the rule on independent trials runs as it would alone, on its own trials
            stable = None
            scan_independent()
            if coupled_result is False and rep.chosen is not None:
                rep.reason = (
                    "no pair of a step and its half passed on the same noise (their estimates changed by more than "
                    f"the run's standard error); on independent trials: {rep.reason}"
                )
    finally:
        if pbar is not None:
            pbar.close()
    rep.seconds = time.perf_counter() - t0
    if rep.chosen is None:
        rep.reason = "no step size in the grid passed"
        if unrelaxed:
            at, s = unrelaxed[-1]
            rep.reason += (
                f"; the scan stopped at {at:.3g}: no trial of it within max_trial_factor x calibration_steps = "
                f"{max_factor * int(calibration_steps)} steps covers {relaxation_times:g} relaxation times of even its "
                f"stiffest direction (a trial at {s:.3g} ran without diverging), nor does one of a smaller step"
            )
        # a chain mean below L_n(w*) by more than two standard errors: the loss goes down from w*
        below = [
            (s, v)
            for s, v, e, sd in zip(rep.step_size, rep.llc, rep.se, rep.verdict, strict=True)
            if sd.startswith("negative LLC") and math.isfinite(v) and math.isfinite(e) and v + 2 * e < 0
        ]
        raise AutoStepError(
            f"step_size='auto': no step size in [{min_step_size:g}, {max_step_size:g}] gave stationary, relaxed "
            "chains (split R-hat below max_r_hat, no runaway, LLC > 0, relaxed from w*) with an estimate unchanged "
            "when the step is halved; trials:\n"
            f"{rep}\n"
            + (
                f"{len(below)} trial(s) have a negative LLC beyond two standard errors (at {below[-1][0]:.3g}: "
                f"{below[-1][1]:.4g}): the chains' loss went below its value at the initial weights w*, so w* is "
                "not a local minimum of the loss (the estimators assume one). Train the model further (to a "
                "minimum of its loss), or give a step_size of your own. "
                if below
                else ""
            )
            + _blocking_run_note(drifting, extra.get("runs"))
            + (
                "With localization=0 nothing holds the chains near w*: a model that is not at a minimum of its loss "
                "(briefly trained, say) drifts away at every step; give localization (e.g. 100). "
                if not localization
                else ""
            )
            + f"Try longer trials: auto_step_options={{'calibration_steps': {2 * int(calibration_steps)}}} (now "
            f"{int(calibration_steps)}; or 'max_trial_factor', now {max_factor}) for estimate_llc, sample, susceptibilities or bif "
            "(or "
            "calibration_steps= of pypattern.sampling.resolve_step_size, which returns a step to pass as "
            "step_size=); a wider range ('min_step_size', 'max_step_size' there); another localization or nbeta; "
            "or a step_size of your own.",
            rep,
        )
    _warn_if_drift_chose(rep, localization)
    if unresolved and rep.chosen is not None:
        warnings.warn(
            f"step_size='auto' chose {rep.chosen:.3g}, but {unresolved[-1]}, and the change it measured ("
            f"{rep.bias:+.3g}) may be chance: the chosen step's discretisation bias may exceed {rtol:.0%} (on y = "
            "w1 w2 x at nbeta 100, a step so accepted gave +36% and ran away in longer runs). Check with a run at "
            f"half the step (step_size={rep.chosen / 2:.3g}), or calibrate with more chains "
            f"(auto_step_options={{'calibration_chains': {2 * int(calibration_chains)}}}) or longer trials "
            "('calibration_steps')",
            StepBiasWarning,
            stacklevel=user_stacklevel(),
        )
    return rep.chosen, rep


def _blocking_run_note(drifting: list[int], runs) -> str:
    """What the error of a calibration of several runs (``runs``) adds when trials failed as one run's chains were
    not stationary: a joint trial is judged by its worst run, so a slowly mixing run blocks every step."""
    if not drifting or runs is None:
        return ""
    counts = np.bincount(drifting)
    w = int(np.argmax(counts))
    try:
        run = list(runs)[w]
    except (TypeError, IndexError):
        run = None
    if isinstance(run, tuple | list) and len(run) == 2 and isinstance(run[0], list | tuple):
        run = run[0]  # (restrict_to, masks): the parameters it moves
    label = f"moving {run!r:.120}" if run is not None else f"#{w}"
    return (
        f"The runs are calibrated together and a trial is judged by its worst run: run {w} ({label}) was the least "
        f"stationary in {int(counts[w])} of the {len(drifting)} trials that were not stationary, so it blocks the "
        "calibration of all of them. Calibrate that run on its own (estimate_llc(model, loader, restrict_to=...) "
        "or pypattern.sampling.resolve_step_size(..., restrict_to=...)) and pass its step as step_size=, or give "
        "it more steps per trial (calibration_steps). "
    )


#: larger steps whose trials drifted (not stationary) before the chosen one, above which a calibration without
#: localization is suspect
DRIFTED_ABOVE = 4


def _warn_if_drift_chose(rep: AutoStepReport, localization) -> None:
    """Warn when, without localization, every step of the scan down to the chosen one drifted: the first
    stationary trial then comes where the chains barely move from ``w*`` in a trial's steps (on a briefly trained
    GPT-2, 14 steps from 0.1 down drifted and 3e-6 was chosen, its LLC 0.87 against 9.2 at ``localization=100``):
    the estimate measures the chains' start-up, not the posterior."""
    if localization or rep.chosen is None:
        return
    above = {
        s
        for s, v in zip(rep.step_size, rep.verdict, strict=True)
        if s > 2 * rep.chosen and v.startswith("not stat")
    }
    healthy_above = any(
        s > 2 * rep.chosen and v.startswith("ok") for s, v in zip(rep.step_size, rep.verdict, strict=True)
    )
    if len(above) >= DRIFTED_ABOVE and not healthy_above:
        warnings.warn(
            f"step_size='auto' with localization=0: the chains drifted (R-hat >= max_r_hat) at all {len(above)} "
            f"larger steps tried, and the chosen step {rep.chosen:.3g} is where they barely move from w* in a trial: "
            "its estimate may measure the chains' start-up rather than the posterior (it falls with the step). "
            "Nothing holds the chains near w* without localization; give localization (e.g. 100, as the README's "
            "examples do)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _add(rep: AutoStepReport, row: dict) -> None:
    rep.step_size.append(float(row["step_size"]))
    rep.num_steps.append(int(row["num_steps"]))
    rep.llc.append(float(row["llc"]))
    rep.se.append(float(row["se"]))
    rep.r_hat.append(float(row["r_hat"]))
    rep.verdict.append(str(row["verdict"]))


def is_auto(step_size) -> bool:
    """Whether a ``step_size`` argument asks for the calibration explicitly (``"auto"``)."""
    return isinstance(step_size, str) and step_size == "auto"


def wants_auto(step_size, optimizer_kwargs=None) -> bool:
    """Whether a call calibrates its step: ``step_size="auto"``, or no step given at all (``step_size=None`` and
    no ``step_size``/``lr`` in ``optimizer_kwargs``). A given step turns the calibration off.

    Raises
    ------
    ValueError
        ``step_size`` is a string other than ``"auto"``.
    """
    if isinstance(step_size, str):
        if step_size != "auto":
            raise ValueError(f"step_size must be a number > 0, 'auto' or None (= 'auto'), got {step_size!r}")
        return True
    if step_size is not None:
        return False
    okw = optimizer_kwargs or {}
    return all(okw.get(k) is None for k in ("step_size", "lr"))


#: the settings of :func:`resolve_step_size` that ``auto_step_options`` of :func:`pypattern.sample` (and
#: :func:`pypattern.estimate_llc`, :func:`pypattern.susceptibilities`, :func:`pypattern.bif`) passes to the
#: calibration
AUTO_STEP_OPTIONS = (
    "calibration_steps",
    "calibration_chains",
    "max_step_size",
    "min_step_size",
    "max_trial_factor",
    "max_r_hat",
    "z",
    "rtol",
    "atol_rel",
    "run_trial_factor",
    "resolve",
    "coupled",
    "pair_factor",
    "relaxation_times",
    "relaxation_target",
    "max_burnin_factor",
)


def check_auto_step_options(options, calibrating: bool) -> None:
    """Refuse ``auto_step_options`` that is not a mapping of :data:`AUTO_STEP_OPTIONS` names, or that is given
    with a given step (``calibrating`` False: there is no calibration to set)."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise TypeError(
            f"auto_step_options must be a dict of calibration settings (e.g. {{'calibration_steps': 800}}), got "
            f"{type(options).__name__}"
        )
    unknown = sorted(str(k) for k in options if k not in AUTO_STEP_OPTIONS)
    if unknown:
        raise ValueError(
            f"auto_step_options: unknown setting(s) {unknown}; valid are {', '.join(AUTO_STEP_OPTIONS)}"
        )
    if options and not calibrating:
        raise ValueError(
            f"auto_step_options={dict(options)!r} sets the step_size='auto' calibration, but a step size is given "
            "(step_size or lr): leave the step out (or step_size='auto') to calibrate, or drop auto_step_options"
        )


def auto_arguments(call: dict) -> dict:
    """The keyword arguments of :func:`resolve_step_size` from the arguments of a :func:`pypattern.sample` call
    (its ``locals()``): devinterp's names and ``optimizer_kwargs`` translated, settings trials do not use
    dropped."""
    from .samplers import SAMPLER_HYPERPARAMETERS
    from .vocabulary import translate

    hyper = translate(
        {
            k: call.get(k)
            for k in ("nbeta", "temperature", "localization", "weight_decay", "noise_scale", "noise_level")
            + ("bounding_box", "bounding_box_size")
            if call.get(k) is not None
        },
        where="the keyword arguments",
    )
    okw = translate(dict(call.get("optimizer_kwargs") or {}), where="optimizer_kwargs")
    okw.pop("step_size", None)
    own_names = {k for names in SAMPLER_HYPERPARAMETERS.values() for k in names}
    own = {k: okw.pop(k) for k in list(okw) if k in own_names}
    hyper.update(okw)
    out = {k: call[k] for k in ("loss_fn", "num_steps_bw_draws", "seed") if call.get(k) is not None}
    out["quiet"] = bool(call.get("quiet", True))
    out.update({k: call[k] for k in _PASSED_TO_TRIALS if call.get(k) is not None})
    out.update(hyper)
    out.pop("optimizer_kwargs", None)
    if own:  # the sampler's own hyperparameters (SGNHT, RMSprop-SGLD) reach the trials' sampler
        out["optimizer_kwargs"] = own
    if out.get("runs") is not None:
        out.pop("restrict_to", None)
        out.pop("masks", None)
    if call.get("chains") is not None:
        out.pop("cores", None)
    options = dict(call.get("auto_step_options") or {})
    # trials with as many chains as the run, between 4 and 8: the calibration stays cheap relative to small runs
    out["calibration_chains"] = options.get(
        "calibration_chains", min(8, max(4, int(call.get("num_chains") or 4)))
    )
    out["run_draw_steps"] = (
        int(call.get("num_chains") or 4)
        * int(call.get("num_draws") or 200)
        * int(call.get("num_steps_bw_draws") or 1)
    )
    out["run_trial_factor"] = trial_factor_for_run(
        out["calibration_chains"],
        num_chains=call.get("num_chains") or 4,
        num_draws=call.get("num_draws") or 200,
        num_burnin_steps=call.get("num_burnin_steps") or 0,
        num_steps_bw_draws=call.get("num_steps_bw_draws") or 1,
        calibration_steps=options.get("calibration_steps", 200),
        longest=options.get("max_trial_factor", 8),
    )
    out.update(options)
    return out


CALIBRATION_KIND = "step-size-calibration"  # a calibration's record in a file of its own (susceptibilities)


def calibrate_or_resume(
    model: nn.Module,
    loader: Iterable,
    arguments: dict,
    stored: Mapping | None = None,
    resolve: Callable | None = None,
) -> tuple[float, AutoStepReport, dict | None]:
    """``resolve_step_size(model, loader, **arguments)``, or, when ``stored`` is the record of a calibration with
    the same ``arguments`` (read from the checkpoint of the run being resumed), that calibration's step and report:
    a resumed run does not calibrate again. Returns ``(step, report, record)``; ``record`` goes into the run's
    checkpoint (None when the arguments cannot be fingerprinted: such a run calibrates on every call).

    The model's weights and the data are not part of the record's key: the run's own fingerprint, checked when its
    checkpoint is loaded, holds them (and the step), and refuses a checkpoint of other weights or data.
    ``resolve``: the calibration (default :func:`resolve_step_size`)."""
    import json

    from .. import io

    try:
        canon = io.fingerprint(**{k: v for k, v in arguments.items() if k != "quiet"})
        key = json.loads(io.json_text(canon, indent=None))
    except (TypeError, ValueError):
        key = None
    if key is not None and isinstance(stored, Mapping) and stored.get("key") == key:
        try:
            report = AutoStepReport.from_dict(stored["report"])
        except (KeyError, TypeError, ValueError, AttributeError):
            report = None
        if report is not None and isinstance(report.chosen, float) and report.chosen > 0:
            return report.chosen, report, {"key": key, "report": report.to_dict()}
    step, report = (resolve or resolve_step_size)(model, loader, **arguments)
    record = None if key is None else {"key": key, "report": report.to_dict()}
    return step, report, record


def burnin_for_run(report: AutoStepReport | Mapping, num_draws, num_steps_bw_draws=1) -> dict:
    """The burn-in a run of ``num_draws`` draws (every ``num_steps_bw_draws`` steps) at the calibrated step of
    ``report`` needs for its chains to relax from ``w*`` (module docstring, "Relaxation").

    Under SGLD at a minimum the flattest direction relaxes at ``eps * gamma / 2`` per step (``gamma =
    localization + weight_decay``), so ``relaxation_times`` (the calibration's setting, default 3) relaxation
    times of it take ``needed = ceil(2 * relaxation_times / (eps * gamma))`` steps; the burn-in is that, at least
    the draws' steps (``num_draws * num_steps_bw_draws``, the default burn-in of a calibrated step) and at most
    ``max_burnin_factor`` times them (``capped`` then). Without localization and weight decay (``gamma = 0``)
    nothing bounds the flattest direction's relaxation, and for a sampler other than SGLD (or
    ``relaxation_times=0``) the calibration makes no relaxation rules: the burn-in is the draws' steps.

    Returns
    -------
    dict
        ``num_burnin_steps``, ``needed`` (None without a bound), ``cap``, ``capped``, ``relaxation_times`` (of the
        flattest direction the burn-in covers, None without a bound) and ``reason``.
    """
    rep = report.to_dict() if isinstance(report, AutoStepReport) else dict(report)
    settings = dict(rep.get("settings") or {})
    draws = int(num_draws) * int(num_steps_bw_draws)
    factor = float(settings.get("max_burnin_factor", MAX_BURNIN_FACTOR))
    cap = max(draws, int(math.floor(factor * draws)))
    eps, gamma = rep.get("chosen"), settings.get("gamma")
    times = float(settings.get("relaxation_times", 3.0))
    out = dict(num_burnin_steps=draws, needed=None, cap=cap, capped=False, relaxation_times=None)
    if not (is_real(eps) and eps > 0 and is_real(gamma) and gamma > 0 and times > 0):
        why = (
            "without localization or weight decay nothing pulls the flattest directions back, so no relaxation time "
            "bounds the burn-in"
            if is_real(gamma) and times > 0
            else "the calibration made no relaxation rules (a sampler other than SGLD, or relaxation_times=0)"
        )
        out["reason"] = f"as many steps as the draws take ({draws}): {why}"
        return out
    needed = max(1, math.ceil(2 * times / (eps * gamma) - 1e-9))
    steps = max(draws, min(needed, cap))
    covered = eps * gamma * steps / 2
    out.update(num_burnin_steps=steps, needed=needed, capped=needed > cap, relaxation_times=covered)
    rule = (
        f"{times:g} relaxation times of the flattest direction at step {eps:.3g} with localization + weight decay "
        f"{gamma:g} (it relaxes by {eps * gamma / 2:.3g} per step) take {needed} steps"
    )
    if needed > cap:
        out["reason"] = (
            f"{rule}; capped at {cap} (max_burnin_factor={factor:g} times the draws' {draws} steps), which cover "
            f"{covered:.3g} of them: the chains may not have relaxed from w*"
        )
    elif needed <= draws:
        out["reason"] = f"{rule}, no more than the draws' {draws} steps (the default burn-in)"
    else:
        out["reason"] = rule
    return out


def read_calibration(path: str) -> Mapping | None:
    """The calibration record in the file ``path`` (:func:`write_calibration`), None when there is none or the file
    is not such a record (it is then calibrated afresh and rewritten)."""
    import os

    from .. import io

    if not os.path.exists(path):
        return None
    try:
        _, meta = io.load(path, kind=CALIBRATION_KIND)
    except (OSError, ValueError):
        return None
    record = meta.get("calibration")
    return record if isinstance(record, Mapping) else None


def write_calibration(path: str, record: Mapping) -> None:
    """Write a calibration record (:func:`calibrate_or_resume`) to ``path``."""
    from .. import io

    io.save(path, {}, {"calibration": dict(record)}, kind=CALIBRATION_KIND)


def trial_factor_for_run(
    calibration_chains: int,
    *,
    num_chains: int,
    num_draws: int,
    num_burnin_steps: int,
    num_steps_bw_draws: int,
    calibration_steps: int = 200,
    longest: int = 8,
) -> int:
    """The longest trial (in units of ``calibration_steps``) for a run: no trial has more chain-steps than the run
    (at least one unit, at most ``longest``).

    A longer trial resolves a smaller discretisation bias, but a bias below the run's own Monte Carlo error does
    not change what the run can tell; for a short run the long trials were nearly all of the calibration's cost
    (measured: 11.8 CPU-s of calibration for a 0.15 s run, docs/llc_results.md)."""
    steps = int(num_burnin_steps) + (int(num_draws) - 1) * int(num_steps_bw_draws) + 1
    run = int(num_chains) * max(steps, 1)
    unit = int(calibration_chains) * int(calibration_steps)
    return int(min(longest, max(1, math.ceil(run / unit))))


def with_auto_report(result, report: AutoStepReport | None):
    """``result`` (a result or a list of them) with ``config["auto_step"]`` set to the report's plain values."""
    if report is None:
        return result
    for r in result if isinstance(result, list) else [result]:
        r.config["auto_step"] = report.to_dict()
    return result
