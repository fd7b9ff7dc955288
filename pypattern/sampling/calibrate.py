"""Step-size calibration: the LLC and the health of the loss trace over a sweep of step sizes.

A step size is *healthy* when no chain diverged, the LLC is positive (the chains sit above ``L_n(w*)``; a
negative LLC means ``w*`` is not a local minimum at this resolution or the step is too large) and the loss trace
is stationary (split R-hat below ``max_r_hat``). Too small a step leaves the chains near ``w*`` (LLC too small and
drifting upward); too large a step diverges or inflates the LLC. The recommendation is the largest healthy step
size whose LLC agrees within ``plateau_tol`` with the next smaller healthy one (the plateau). Where no healthy
step size agrees with its next smaller healthy neighbour (no plateau in the sweep, or one healthy step size), it is
the smallest healthy one, with a warning: that step's LLC may be biased low (the chains have not left w*'s
neighbourhood); widen the sweep or lengthen the chains. Where no step size is healthy, ``recommended`` is None and
a ``UserWarning`` names what failed at each step (diverged, negative LLC, not stationary) and what to try: smaller
step sizes, more burn-in (``num_burnin_steps``) and draws, a larger ``localization``.

Each step's run checks its own discretisation bias (:class:`~pypattern.sampling.diagnostics.StepBiasWarning`, as
:func:`pypattern.estimate_llc` at a given step does); the sweep notes it in that step's reason ("the run warned of
its discretisation bias") instead of passing one warning per step on, and warns once, when the recommended step is
one of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .._checks import is_real
from ..io import Saveable, register
from .checkpoint import sub_run_path
from .diagnostics import NonFiniteLossError, NonStationaryWarning, StepBiasWarning, user_stacklevel
from .llc import _SAMPLE_ARGUMENTS, estimate_llc
from .plan import refuse_unknown_keywords
from .results import check_arrays
from .runner import SamplingDivergedError

__all__ = ["CalibrationResult", "calibrate_step_size"]

#: the arrays of a :class:`CalibrationResult`, one entry per step size (its table's columns)
_COLUMNS = ("step_sizes", "llc_mean", "llc_std", "r_hat", "ess", "diverged", "healthy")


@register
@dataclass(eq=False)
class CalibrationResult(Saveable):
    """One row per step size (arrays of shape ``(num_step_sizes,)``) and the recommended step size."""

    step_sizes: np.ndarray
    llc_mean: np.ndarray
    llc_std: np.ndarray
    r_hat: np.ndarray
    ess: np.ndarray
    diverged: np.ndarray
    healthy: np.ndarray
    recommended: float | None = None
    reasons: list = field(default_factory=list)

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): one entry per step size in every array and in
        ``reasons`` (a text each), numbers throughout."""
        n = check_arrays(vars(self), dict.fromkeys(_COLUMNS, ("n",)))["n"]
        if not isinstance(self.reasons, list) or len(self.reasons) != n:
            have = len(self.reasons) if isinstance(self.reasons, list) else type(self.reasons).__name__
            raise ValueError(
                f"reasons holds {have} entries for the {n} step sizes of step_sizes; one text each"
            )
        bad = [r for r in self.reasons if not isinstance(r, str)]
        if bad:
            raise ValueError(f"reasons must hold texts (str), got {bad[0]!r}")

    def rows(self) -> list[dict]:
        return [
            {**{k: getattr(self, k)[i].item() for k in _COLUMNS}, "reason": self.reasons[i]}
            for i in range(len(self.step_sizes))
        ]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows())

    def __str__(self) -> str:
        lines = [f"{'step_size':>10} {'llc':>10} {'std':>9} {'R-hat':>7} {'ESS':>7}  health"]
        for r in self.rows():
            lines.append(
                f"{r['step_sizes']:>10.3g} {r['llc_mean']:>10.4g} {r['llc_std']:>9.3g} {r['r_hat']:>7.3f} "
                f"{r['ess']:>7.1f}  {'ok' if r['healthy'] else r['reason']}"
            )
        lines.append(f"recommended step_size: {self.recommended}")
        return "\n".join(lines)

    def plot(self, ax=None):
        """LLC (with std over chains) against step size, unhealthy points hollow; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        ok = self.healthy.astype(bool)
        ax.errorbar(self.step_sizes[ok], self.llc_mean[ok], self.llc_std[ok], fmt="o-", label="healthy")
        ax.plot(self.step_sizes[~ok], self.llc_mean[~ok], "o", mfc="none", label="unhealthy")
        if self.recommended is not None:
            ax.axvline(self.recommended, color="k", ls="--", lw=1, label="recommended")
        ax.set_xscale("log")
        ax.set_xlabel("step size")
        ax.set_ylabel("LLC")
        ax.legend()
        return ax


def calibrate_step_size(
    model: nn.Module,
    loader,
    step_sizes: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    *,
    max_r_hat: float = 1.1,
    plateau_tol: float = 0.2,
    **sample_kwargs,
) -> CalibrationResult:
    """Estimate the LLC at each step size and judge the loss trace (see the module docstring).

    Parameters
    ----------
    model, loader
        The model at ``w*`` and its batches, as :func:`pypattern.sample` takes them.
    step_sizes : sequence of float
        Sorted or not; evaluated in increasing order.
    max_r_hat : float
        Largest split R-hat of the loss trace counted as stationary.
    plateau_tol : float
        Relative agreement with the next smaller healthy step size for the recommendation.
    **sample_kwargs
        Passed to :func:`pypattern.sampling.estimate_llc`: the keywords of :func:`pypattern.sample`, documented
        there, but ``step_size`` and ``optimizer_kwargs`` (``num_chains``, ``num_draws``, ``nbeta``,
        ``localization``, ``seed``, ...); any other keyword is a ``TypeError`` naming it. ``quiet`` defaults to True; with ``checkpoint``, each step size's run
        has its own file (``run.npz`` -> ``run.step0.npz``, ...).

    Returns
    -------
    CalibrationResult
        One row per step size; ``recommended`` is None when no step size is healthy.

    Warns
    -----
    UserWarning
        When no step size is healthy (``recommended`` is None): the message names each step size with what failed
        there and what to try (smaller step sizes, more burn-in and draws, a larger localization). Also when no
        plateau confirms the recommendation (see the module docstring).
    StepBiasWarning
        When the recommended step's own run warned of its discretisation bias.
    """
    try:
        sizes = sorted(float(s) for s in step_sizes)
    except (TypeError, ValueError):
        sizes = []  # refused below with the empty sequence
    if not sizes or any(not s > 0 or s == float("inf") for s in sizes):
        raise ValueError(f"step_sizes must be a non-empty sequence of numbers > 0, got {step_sizes!r}")
    repeated = sorted({s for s in sizes if sizes.count(s) > 1})
    if repeated:  # two runs of one step agree by construction: they would pass for a plateau
        raise ValueError(
            f"step_sizes={step_sizes!r} gives {', '.join(f'{s:g}' for s in repeated)} more than once; give each step "
            "size once (the recommendation compares each step with the next smaller one)"
        )
    for bad in ("step_size", "optimizer_kwargs"):
        if bad in sample_kwargs:
            raise ValueError(f"{bad} is set by the sweep; pass the other hyperparameters as keywords")
    refuse_unknown_keywords(
        sample_kwargs,
        _SAMPLE_ARGUMENTS - {"step_size", "optimizer_kwargs"},
        "calibrate_step_size()",
        "pypattern.sample()'s keywords (documented there) but step_size and optimizer_kwargs",
    )
    for name, v, lo in (("max_r_hat", max_r_hat, "> 0"), ("plateau_tol", plateau_tol, ">= 0")):
        if not is_real(v) or math.isnan(v) or (v <= 0 if lo == "> 0" else v < 0):
            raise ValueError(f"{name}={v!r} is not valid; give a number {lo}")
    sample_kwargs.setdefault("quiet", True)
    ckpt = sample_kwargs.pop("checkpoint", None)
    n = len(sizes)
    out = {k: np.full(n, np.nan) for k in ("llc_mean", "llc_std", "r_hat", "ess")}
    diverged = np.zeros(n, dtype=bool)
    healthy = np.zeros(n, dtype=bool)
    reasons = []
    # each run's step-bias warning (StepBiasWarning), if it gave one
    bias_notes: list[str | None] = [None] * n
    for i, eps in enumerate(sizes):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("ignore", NonStationaryWarning)
                warnings.simplefilter("always", StepBiasWarning)
                # one checkpoint file per step size
                path = sub_run_path(ckpt, f"step{i}")
                r = estimate_llc(model, loader, step_size=eps, checkpoint=path, **sample_kwargs)
            for w in caught:  # the run's other warnings pass on; its step-bias check goes into the table
                if issubclass(w.category, StepBiasWarning):
                    bias_notes[i] = str(w.message)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        except NonFiniteLossError:
            raise  # the data or the model, not the step: every step size would fail
        except SamplingDivergedError as e:
            diverged[i] = True
            reasons.append(f"diverged (chain {e.chain}, draw {e.draw})")
            continue
        out["llc_mean"][i], out["llc_std"][i], out["r_hat"][i], out["ess"][i] = (
            r.llc_mean,
            r.llc_std,
            r.r_hat,
            r.ess,
        )
        note = "; the run warned of its discretisation bias" if bias_notes[i] else ""
        if not r.llc_mean > 0:
            reasons.append("negative LLC" + note)
        elif not r.r_hat < max_r_hat:
            reasons.append(f"not stationary (R-hat {r.r_hat:.2f})" + note)
        else:
            healthy[i] = True
            reasons.append("ok" + note)
    recommended = None
    ok = [i for i in range(n) if healthy[i]]
    for a, b in zip(ok[:-1], ok[1:]):
        la, lb = out["llc_mean"][a], out["llc_mean"][b]
        if abs(lb - la) <= plateau_tol * abs(la):
            recommended = sizes[b]
    if recommended is None and ok:
        recommended = sizes[ok[0]]
        llcs = ", ".join(f"{out['llc_mean'][i]:.3g}" for i in ok)
        at = ", ".join(f"{sizes[i]:g}" for i in ok)
        what = (
            f"no healthy step size agrees within plateau_tol={plateau_tol:g} with its next smaller healthy one "
            f"(LLCs {llcs} at {at})"
            if len(ok) > 1
            else f"only one step size is healthy ({at}, LLC {llcs}): no plateau to confirm it"
        )
        warnings.warn(
            f"calibrate_step_size: {what}; recommending the smallest healthy one, {recommended:g}, whose LLC may be "
            "biased low: widen the sweep or lengthen the chains (num_draws)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    if not ok:
        _warn_none_healthy(sizes, reasons, sample_kwargs, max_r_hat)
    if recommended is not None and bias_notes[sizes.index(recommended)]:
        warnings.warn(
            f"calibrate_step_size recommends {recommended:g}, but its run warned: "
            f"{bias_notes[sizes.index(recommended)]}",
            StepBiasWarning,
            stacklevel=user_stacklevel(),
        )
    return CalibrationResult(
        step_sizes=np.array(sizes),
        diverged=diverged,
        healthy=healthy,
        recommended=recommended,
        reasons=reasons,
        **out,
    )


def _warn_none_healthy(sizes, reasons, sample_kwargs: dict, max_r_hat: float) -> None:
    """Warn that no step size of the sweep is healthy (no recommendation): what failed at each step, and what to
    try."""
    steps = "; ".join(f"{s:g}: {r}" for s, r in zip(sizes, reasons))
    now = {
        k: sample_kwargs[k] for k in ("num_burnin_steps", "num_draws", "localization") if k in sample_kwargs
    }

    def given(name: str) -> str:
        return f" (now {now[name]!r})" if name in now else ""

    tries = [
        f"smaller step sizes (below {sizes[0]:g}, the smallest tried)",
        f"more burn-in (num_burnin_steps{given('num_burnin_steps')}) and draws (num_draws{given('num_draws')}), "
        f"so that the loss trace is stationary (split R-hat below max_r_hat={max_r_hat:g})",
        f"a larger localization{given('localization')}, which holds the chains near w*",
    ]
    if any(r.startswith("negative LLC") for r in reasons):
        tries.append(
            "a w* that is a trained local minimum (a negative LLC: the chains found lower loss than w*)"
        )
    warnings.warn(
        f"calibrate_step_size: no step size of the sweep is healthy, so there is no recommendation (recommended is "
        f"None); per step size: {steps}. Try {'; '.join(tries)}",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
