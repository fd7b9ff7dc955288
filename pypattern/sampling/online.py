"""The LLC during training: :class:`OnlineLLC`, a callback for a training loop.

Called as ``cb(model, step)`` (or ``cb(step, model)``, the order of :func:`pypattern.tasks.train`'s callback)
after an optimizer step, it estimates the LLC at the steps of its schedule and does nothing at the others. It
leaves the training run exactly as it was: torch's global random state (CPU, and CUDA when initialised), numpy's
and Python's global random states are saved and restored, the weights and buffers are copied before the
estimate and copied back bit for bit after it, and the model's training mode is restored. A training run with
the callback therefore ends with the same weights, bit for bit, as one without. Each estimate reads the model as
:func:`pypattern.estimate_llc` does at the same weights: in ``eval()`` mode when its ``train()`` forward is random
(dropout), else in the modes the training loop left it in.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import io
from .._checks import is_count
from .._training import random_in_training
from ..io import Saveable, register
from .auto import AutoStepReport, wants_auto
from .checkpoint import model_architecture, sub_run_path, version_message
from .data import hash_data
from .diagnostics import naming_runs
from .llc import _SAMPLE_ARGUMENTS, estimate_llc
from .optim import chain_seed
from .plan import (
    chain_indices,
    check_callables,
    check_checkpoint_file,
    check_loader,
    check_seed,
    check_settings,
    refuse_unknown_keywords,
)
from .results import check_arrays
from .runner import default_loss_fn, is_burnin_rule, is_sample_default, sample
from .vocabulary import translate

__all__ = ["OnlineLLC", "OnlineLLCResult", "preserved_training_state"]

#: the ``kind`` of the file holding an :class:`OnlineLLC`'s state (:func:`pypattern.io.save`)
STATE_KIND = "online-llc-state"
#: the version of that state (the file's and :meth:`OnlineLLC.state_dict`'s layout)
STATE_VERSION = 1


class preserved_training_state:
    """Context manager: on exit, restore ``model``'s weights and buffers (bit for bit), its training mode, and the
    global random states of torch (CPU and initialised CUDA devices), numpy and Python."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        m = self.model
        self.state = {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}
        self.modes = {mod: mod.training for mod in m.modules()}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.np_rng = np.random.get_state()
        self.py_rng = random.getstate()
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, v in self.model.state_dict(keep_vars=True).items():
                v.copy_(self.state[k])
        for mod, training in self.modes.items():
            mod.train(training)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.np_rng)
        random.setstate(self.py_rng)
        return False


@register
@dataclass(eq=False)
class OnlineLLCResult(Saveable):
    """The estimates of an :class:`OnlineLLC` run, one entry per estimate.

    Attributes
    ----------
    step : ndarray of int ``(num_estimates,)``
    llc_mean, llc_std, r_hat : ndarray ``(num_estimates,)``
    llc_se : ndarray ``(num_estimates,)``
        The standard error of each ``llc_mean`` (:func:`pypattern.estimate_llc`'s ``llc_se``; NaN in a file
        written without it).
    init_loss : ndarray ``(num_estimates,)``
        ``L_n(w*)`` at each estimate (the training loss on the LLC's data).
    train_loss : ndarray ``(num_estimates,)``
        The loss the training loop passed (``loss=``), NaN where none was.
    refined : dict of str to ndarray ``(num_estimates,)``
        Refined LLCs per component (when ``components`` was given; NaN at an estimate that left the component out:
        ``"heads"`` or ``"blocks"`` leave out a component whose weights are all frozen).
    seconds : float
        Time spent in the estimates.
    """

    step: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    llc_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    llc_std: np.ndarray = field(default_factory=lambda: np.zeros(0))
    r_hat: np.ndarray = field(default_factory=lambda: np.zeros(0))
    llc_se: np.ndarray = field(default_factory=lambda: np.zeros(0))
    init_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    refined: dict = field(default_factory=dict)
    seconds: float = 0.0

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): one entry per estimate in every array and in each
        component's curve of ``refined`` (keyed by name), numbers throughout."""
        if not isinstance(self.refined, dict) or not all(isinstance(k, str) for k in self.refined):
            raise ValueError(
                f"refined must be a dict of component name (str) to array, got {self.refined!r:.80}"
            )
        if isinstance(self.llc_se, np.ndarray) and self.llc_se.size == 0 and np.size(self.step) > 0:
            self.llc_se = np.full(np.size(self.step), np.nan)  # a file written without standard errors
        keys = ("step", "llc_mean", "llc_std", "llc_se", "r_hat", "init_loss", "train_loss")
        curves = {f"refined[{k!r}]": v for k, v in self.refined.items()}
        check_arrays(
            {**{k: getattr(self, k) for k in keys}, **curves},
            dict.fromkeys([*keys, *curves], ("estimates",)),
        )

    def to_pandas(self):
        import pandas as pd

        cols = {
            "step": self.step,
            "llc_mean": self.llc_mean,
            "llc_std": self.llc_std,
            "llc_se": self.llc_se,
            "r_hat": self.r_hat,
            "init_loss": self.init_loss,
            "train_loss": self.train_loss,
        }
        cols.update({f"llc[{k}]": v for k, v in self.refined.items()})
        return pd.DataFrame(cols)

    def plot(self, ax=None, *, extra: dict | None = None):
        """The LLC (with its std over chains) against the training step, the loss on a second axis; ``extra``
        maps a label to a sequence of values at the same steps (e.g. the prefix-matching score), drawn on the
        loss axis. Returns the LLC axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        ax.errorbar(self.step, self.llc_mean, self.llc_std, fmt="o-", color="C0", ms=3, label="LLC")
        for i, (k, v) in enumerate(self.refined.items()):
            ax.plot(self.step, v, "--", lw=1, color=f"C{3 + i % 6}", label=f"LLC {k}")
        ax.set_xlabel("training step")
        ax.set_ylabel("LLC")
        ax2 = ax.twinx()
        loss = np.where(np.isfinite(self.train_loss), self.train_loss, self.init_loss)
        given = bool(np.isfinite(self.train_loss).all())
        what = "training loss" if given else ("L_n(w*)" if not np.isfinite(self.train_loss).any() else "loss")
        ax2.plot(self.step, loss, "s-", color="C1", ms=3, label=what)
        for i, (k, v) in enumerate((extra or {}).items()):
            ax2.plot(self.step, np.asarray(v), "^-", color=f"C{2 + i}", ms=3, label=k)
        ax2.set_ylabel("loss" + (" / " + ", ".join(extra) if extra else ""))
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
        return ax


def _is_step(v) -> bool:
    """Whether ``v`` is a training step: an integer (Python's, numpy's, a 0-d integer tensor), not a bool."""
    if isinstance(v, bool | np.bool_):
        return False
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral)


def _check_sample_kwargs(loader, kw: dict, components) -> None:
    """Check :class:`OnlineLLC`'s estimator keywords when it is built, with the checks the estimate makes (before
    a training run reaches the first scheduled step): ``loader``, the keywords' names
    (:func:`pypattern.estimate_llc`'s, or :func:`pypattern.refined_llc`'s with ``components``) and the values
    that do not depend on the model (counts, seed, sampler, hyperparameters, flags, checkpoint path)."""
    check_loader(loader)
    if components is not None:
        from .refined import check_components

        check_components(components)
    taken = _SAMPLE_ARGUMENTS - ({"runs", "restrict_to", "masks"} if components is not None else set())
    what = "refined_llc()'s (with components)" if components is not None else "estimate_llc()'s"
    refuse_unknown_keywords(
        kw, taken, "OnlineLLC", f"{what} keywords, those of pypattern.sample (documented there)"
    )
    args = {
        k: p.default for k, p in inspect.signature(sample).parameters.items() if k not in ("model", "loader")
    }
    args.update(kw)
    step_size, lr = args["step_size"], args["lr"]
    if lr is not None:  # devinterp's name for the step size
        step_size = translate({"step_size": step_size, "lr": lr}, where="OnlineLLC")["step_size"]
    if wants_auto(step_size, args["optimizer_kwargs"]):  # calibrated at the first estimate
        step_size = None
    hyper_names = ("nbeta", "temperature", "localization", "weight_decay", "noise_scale", "noise_level")
    hyper_names += ("bounding_box", "bounding_box_size")
    check_settings(
        loader,
        loss_fn=args["loss_fn"] or default_loss_fn,
        callbacks=args["callbacks"],
        quiet=args["quiet"],
        warn_nonstationary=args["warn_nonstationary"],
        record_observables=args["record_observables"],
        batched=args["batched"],
        num_chains=args["num_chains"],
        num_draws=args["num_draws"],
        num_burnin_steps=0 if args["num_burnin_steps"] is None else args["num_burnin_steps"],
        num_steps_bw_draws=args["num_steps_bw_draws"],
        checkpoint_every=args["checkpoint_every"],
        cores=args["cores"],
        grad_accum_steps=args["grad_accum_steps"],
        num_init_loss_batches=args["num_init_loss_batches"],
        init_loss=args["init_loss"],
        seed=args["seed"],
        hyperparameters=dict(step_size=step_size, **{k: args[k] for k in hyper_names}),
        optimizer_kwargs=args["optimizer_kwargs"],
        sampler=args["sampler"],
        sampling_method=args["sampling_method"],
    )
    check_callables(args["loss_fn"], args["observables"], args["callbacks"], args["batched"])
    if args["chains"] is not None:
        chain_indices(args["chains"])
    if args["checkpoint"] is not None:
        check_checkpoint_file(args["checkpoint"])


#: keywords that say how an estimate is computed or shown, not what it is: left out of an :class:`OnlineLLC`'s
#: fingerprint (another value continues the curve; each step's sampler checkpoint warns where its draws may differ
#: at float rounding, as :data:`~pypattern.sampling.checkpoint.RESUMABLE_SETTINGS` say)
_NOT_COMPARED = (
    "quiet",
    "cores",
    "checkpoint",
    "checkpoint_every",
    "checkpoint_state",
    "warn_nonstationary",
    "callbacks",
    "batched",
    "backend",
    "device",
)


def _fingerprint_defaults() -> dict:
    """What a mismatch message shows for an item one fingerprint leaves out (its default)."""
    out = {
        k: p.default
        for k, p in inspect.signature(sample).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    out.update(components=None)
    return out


def online_fingerprint(loader, components, sample_kwargs: Mapping) -> dict:
    """What identifies an :class:`OnlineLLC` curve (see :func:`pypattern.io.fingerprint`): its ``components``, the estimator's settings as given (devinterp's names translated; defaults,
    and the settings of :data:`_NOT_COMPARED`, left out; no step, or ``"auto"``, as ``step_size="auto"``), the
    loss function and observables by name and code, and a hash of the data as the sampler's checkpoints hash it
    (:func:`~pypattern.sampling.data.hash_data`, keyed by the first seed). Not the weights: they change with
    training (each step's sampler checkpoint holds those of its step). Nor the schedule (``every``, ``steps``): it
    says which steps are estimated, not what an estimate is, so a continued run may estimate at other steps (a
    single step estimated again, a denser schedule after the restart) and its rows join the same curve."""
    kw = translate(
        {k: v for k, v in sample_kwargs.items() if k not in _NOT_COMPARED}, where="OnlineLLC", drop_none=True
    )
    if wants_auto(kw.get("step_size"), kw.get("optimizer_kwargs")):
        kw["step_size"] = "auto"
    if "seed" in kw:  # as the sampler reads it: an integer array is its list of ints
        kw["seed"] = check_seed(kw["seed"])
    settings = {k: v for k, v in kw.items() if not is_sample_default(k, v)}
    seed = check_seed(sample_kwargs.get("seed", 0))
    # the first seed keys the data's order, as in the sampler's checkpoints
    seed0 = seed if isinstance(seed, int) else seed[0]
    # reading the data may draw from torch's global generator (a shuffling DataLoader): the training run's is kept
    with torch.random.fork_rng(devices=[]):
        data = hash_data(loader, chain_seed(seed0, 0, stream=1), {})
    return io.fingerprint(
        components=components,
        **settings,
        data=data,
    )


class OnlineLLC:
    """Estimate the LLC at chosen steps of a training run, leaving the run untouched.

    Parameters
    ----------
    loader : iterable of batches
        The data of the estimate (a fixed loader: its order is keyed by ``seed``, not by the global RNG).
    every : int, optional
        Estimate at every ``every``-th step (``step % every == 0``).
    steps : sequence of int, optional
        Estimate at these steps (with ``every``: at either).
    components : "heads", "blocks", list or dict, optional
        Also the weight-refined LLCs of these components (:func:`pypattern.refined_llc`), batched with the
        full run.
    **sample_kwargs
        :func:`pypattern.estimate_llc`'s keywords, those of :func:`pypattern.sample`, documented there (``loss_fn``,
        ``num_chains``, ``num_draws``, ``step_size``, ``nbeta``, ``localization``, ``seed``, ...; with
        ``components`` not ``runs``, ``restrict_to`` or ``masks``), checked here (an unknown name is a TypeError
        naming it and the closest accepted name, a value the
        estimate would refuse a ValueError or TypeError naming it), not at the first scheduled step.
        ``step_size="auto"`` (the default when no step is given) calibrates at the first estimate and keeps that
        step for the rest of the run (one step for the whole curve; calibrating anew at each estimate would mix
        different biases into it).

    Continuing after a restart
    --------------------------
    With ``checkpoint="run.npz"``, each estimate's sampler run writes its own file (``run.step{step}.npz``), and
    after every estimate the callback writes its state to ``run.online.npz`` (:attr:`state_path`; through
    :mod:`pypattern.io`, no pickle): the rows so far, the step size calibrated at the first estimate
    (``step_size="auto"``) and its burn-in, the fingerprint of the curve, the seconds spent. A new
    :class:`OnlineLLC` given the same ``checkpoint`` (a training run restarted from its own checkpoint) reads that
    file when it is built and continues the curve: the rows of the earlier steps are kept, the calibrated step is
    reused (one step for the whole curve), and a step estimated again (the loop repeats the steps after its last
    checkpoint) replaces its row, read back from that step's sampler checkpoint. The curve is then the one the run
    would have given without the restart.

    It continues only the same curve. The fingerprint holds ``components``,
    the estimator's keywords (defaults left out; devinterp's names translated; how an estimate is computed or shown
    -- ``batched``, ``backend``, ``device``, ``cores``, ``quiet``, ``callbacks``, the checkpoint settings -- left
    out) and a hash of the data as the sampler's checkpoints hash it; the first call checks the model's
    architecture against the one of the curve, and every estimate against the first call's (one callback follows
    one model; a relative ``checkpoint`` is read from the working directory when the callback is built). Another
    value is refused with
    :class:`pypattern.io.FingerprintMismatch` naming the item that differs; a damaged file, or a file of another
    kind at that path, with :class:`pypattern.io.FormatError` naming the file. Use another ``checkpoint`` path, or
    delete the file, to start a new curve. The weights are checked by each re-estimated step's sampler checkpoint
    (the rows of steps not estimated again are kept as they were written).

    Without ``checkpoint`` nothing is written; :meth:`state_dict` and :meth:`load_state_dict` carry the same state
    (plain Python values: store it with the training run's own checkpoint).

    Examples
    --------
    >>> cb = OnlineLLC(loader, every=100, num_chains=4, num_draws=100, step_size=1e-4, localization=100.0)
    >>> for step in range(1000):
    ...     loss = train_step(model)
    ...     cb(model, step, loss=loss)
    >>> cb.result.plot()

    A training run restarted at step 500 from its own checkpoint continues the curve:

    >>> cb = OnlineLLC(loader, every=100, checkpoint="llc.npz", num_chains=4, num_draws=100)
    >>> for step in range(start, 1000):  # start = 501 after the restart
    ...     loss = train_step(model)
    ...     cb(model, step, loss=loss)
    >>> cb.result.step  # 0, 100, ..., 900: the rows before the restart and after
    """

    def __init__(
        self,
        loader: Iterable,
        *,
        every: int | None = None,
        steps: Sequence[int] | None = None,
        components: Any = None,
        **sample_kwargs,
    ):
        if every is None and steps is None:
            raise ValueError("give every (an int >= 1) or steps (a sequence of ints): when to estimate")
        if is_burnin_rule(sample_kwargs.get("num_burnin_steps")):  # estimate_llc's default: the same curve
            sample_kwargs = {k: v for k, v in sample_kwargs.items() if k != "num_burnin_steps"}
        if every is not None and (not is_count(every) or every < 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        every = None if every is None else int(every)
        self.loader = loader
        self.every = every
        if steps is not None:
            if isinstance(steps, str) or not hasattr(steps, "__iter__"):
                raise TypeError(
                    f"steps={steps!r} is not valid; give a sequence of training steps (ints >= 0)"
                )
            if isinstance(steps, np.ndarray | torch.Tensor) and steps.ndim != 1:
                raise ValueError(
                    f"steps has shape {tuple(steps.shape)}; give a sequence of training steps (ints >= 0), e.g. "
                    "[100] for a single step"
                )
            steps = list(steps)
            # integers as __call__ reads a step: Python's, numpy's and 0-d integer tensors' (a tensor's entries)
            bad = [v for v in steps if not _is_step(v) or v < 0]
            if bad:
                raise ValueError(f"steps contains {bad[:3]}; give training steps as ints >= 0")
        self.steps = None if steps is None else {operator.index(s) for s in steps}
        # every estimate reads the components and the callbacks again: a one-shot iterable (a generator, map,
        # filter, iter(...)) is kept as a list, or the checks below and the first estimate would use it up
        if isinstance(components, Iterable) and not isinstance(
            components, str | bytes | Mapping | torch.Tensor
        ):
            components = list(components)
        for key in ("callbacks", "chains"):
            v = sample_kwargs.get(key)
            if isinstance(v, Iterable) and not callable(v) and not isinstance(v, str | bytes | torch.Tensor):
                sample_kwargs[key] = list(v)
        self.components = components
        # checked without touching the training run: reading a default nbeta may iterate the loader, whose
        # shuffle draws from torch's global generator
        with torch.random.fork_rng(devices=[]):
            _check_sample_kwargs(loader, sample_kwargs, components)
        sample_kwargs.setdefault("quiet", True)
        sample_kwargs.setdefault("warn_nonstationary", False)
        self.sample_kwargs = sample_kwargs
        self._given = dict(sample_kwargs)  # as given: the fingerprint's settings ("auto" stays "auto")
        self._fp: dict | None = None
        self._rows: list[dict] = []
        self.seconds = 0.0
        # the report of the step-size calibration of the curve (AutoStepReport.to_dict()), or None
        self.auto_step: dict | None = None
        self._architecture: str | None = None  # of the model the curve is estimated on (the first call's)
        # the architecture of the curve being continued, checked at the first call
        self._stored_architecture: str | None = None
        self._calibrated: dict = {}  # the step_size (and num_burnin_steps) the first estimate calibrated
        checkpoint = sample_kwargs.get("checkpoint")
        if checkpoint is not None:
            # the folder of the curve is the one it names when the callback is built: a training loop that changes
            # its working directory afterwards still writes the state and the steps' sampler checkpoints there
            checkpoint = sample_kwargs["checkpoint"] = os.path.abspath(os.fspath(checkpoint))
        self.state_path: str | None = sub_run_path(checkpoint, "online")
        """The file of the callback's state (``run.online.npz`` for ``checkpoint="run.npz"``), or None."""
        if self.state_path is not None and os.path.exists(self.state_path):
            self._load_file(self.state_path)

    def due(self, step: int) -> bool:
        """Whether ``step`` is on the schedule."""
        return (self.every is not None and step % self.every == 0) or (
            self.steps is not None and step in self.steps
        )

    def __call__(self, model, step, loss: float | None = None) -> dict | None:
        """Estimate at ``step`` if it is on the schedule; returns the row (or None). ``step`` is an integer (a
        Python or numpy int, or a 0-d integer tensor). A step estimated before is estimated again and its row
        replaced (a training loop resumed from its own checkpoint repeats steps): the result has one row per
        step."""
        if _is_step(model) and isinstance(step, nn.Module):  # pypattern.tasks.train's (step, model)
            model, step = step, model
        if not isinstance(model, nn.Module):
            raise TypeError(f"OnlineLLC: model must be a torch.nn.Module, got {type(model).__name__}")
        if not _is_step(step):
            raise TypeError(f"OnlineLLC: step must be an int (the training step), got {step!r}")
        step = operator.index(step)
        if self._architecture is None:
            self._check_architecture(model)
        if not self.due(step):
            return None
        if self._architecture != (now := model_architecture(model)):
            # one curve is one model's: a callback given another model (a second run in turn) would mix the two
            raise io.FingerprintMismatch(
                f"OnlineLLC: at step {step} the model has another architecture than the one this curve was "
                f"estimated on: architecture = {self._architecture!r} before, {now!r} now (a hash of the model's "
                "module tree and configuration). One OnlineLLC follows one training run: build a new OnlineLLC "
                "(with another checkpoint path) for another model.",
                path=self.state_path or "",
                item="architecture",
                stored=self._architecture,
                current=now,
            )
        if loss is not None:
            try:
                loss = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"OnlineLLC: loss must be a number (the training loss at this step) or None, got {loss!r:.80}"
                ) from None
        t0 = time.perf_counter()
        with preserved_training_state(model):
            # the model as estimate_llc reads it: in eval() mode when its train() forward is random (dropout; no
            # warning at every estimate), else in the modes the training loop left (a BatchNorm in train() mode
            # normalises by the batch's statistics there too)
            if random_in_training(model):
                model.eval()
            with naming_runs([f"OnlineLLC at step {step}"]):  # its warnings name the training step
                row = self._estimate(model, step, loss)
        self.seconds += time.perf_counter() - t0
        self._rows = [r for r in self._rows if r["step"] != step] + [row]
        if self.state_path is not None:
            self._save_file(self.state_path)
        return row

    def _estimate(self, model: nn.Module, step: int, loss) -> dict:
        kw = dict(self.sample_kwargs)
        kw["checkpoint"] = sub_run_path(kw.get("checkpoint"), f"step{step}")  # one file per estimate
        row: dict = {"step": step, "train_loss": float("nan") if loss is None else float(loss)}
        if self.components is None:
            r = estimate_llc(model, self.loader, **kw)
            config = r.sample.config
            row.update(
                llc_mean=r.llc_mean, llc_std=r.llc_std, llc_se=r.llc_se, r_hat=r.r_hat, init_loss=r.init_loss
            )
        else:
            from .refined import refined_llc

            res = refined_llc(model, self.loader, components=self.components, include_full=True, **kw)
            config = res.config
            row.update(
                llc_mean=float(res.llc_mean[0]),
                llc_std=float(res.llc_std[0]),
                llc_se=float(res.llc_se[0]) if len(res.llc_se) else float("nan"),
                r_hat=float(res.r_hat[0]),
                init_loss=float(res.init_loss[0]),
                refined={c: float(v) for c, v in zip(res.component[1:], res.llc_mean[1:], strict=True)},
            )
        if not self._calibrated and self._auto():
            # "auto" (or no step, its default): keep the step calibrated at the first estimate for the whole curve
            burnin = None
            if self.sample_kwargs.get("num_burnin_steps") is None:
                burnin = int(config["num_burnin_steps"])  # and its burn-in (a given step would get none)
            self._use_calibrated(float(config["step_size"]), burnin)
            self.auto_step = config.get("auto_step")
        return row

    def _use_calibrated(self, step_size: float, num_burnin_steps: int | None) -> None:
        """Estimate at ``step_size`` (and burn in ``num_burnin_steps``, when not None) from now on: the step
        calibrated at the first estimate of the curve."""
        self._calibrated = {"step_size": step_size}
        self.sample_kwargs.pop("lr", None)  # devinterp's name, "auto": the calibrated step replaces it
        # the calibration's settings set a calibration no later estimate runs (sample() refuses them beside a step)
        self.sample_kwargs.pop("auto_step_options", None)
        self.sample_kwargs["step_size"] = step_size
        if num_burnin_steps is not None:
            self.sample_kwargs["num_burnin_steps"] = self._calibrated["num_burnin_steps"] = num_burnin_steps

    def _auto(self) -> bool:
        """Whether the step is calibrated (``step_size`` or devinterp's ``lr`` "auto", or no step given)."""
        g = self._given
        given = translate({"step_size": g.get("step_size"), "lr": g.get("lr")}, where="OnlineLLC")
        return wants_auto(given.get("step_size"), g.get("optimizer_kwargs"))

    # ------------------------------------------------------------------------------------------ state

    def fingerprint(self) -> dict:
        """What identifies this curve (components, settings, data; see the class docstring), as
        :func:`pypattern.io.fingerprint` builds it (JSON values)."""
        if self._fp is None:
            self._fp = online_fingerprint(self.loader, self.components, self._given)
        return self._fp

    def _check_architecture(self, model: nn.Module) -> None:
        """Record the model's architecture at the first call; refuse one other than the continued curve's."""
        now = model_architecture(model)
        if self._stored_architecture is not None:
            where = (
                f"OnlineLLC state {self.state_path!r}"
                if self.state_path is not None
                else "the state given to OnlineLLC.load_state_dict"
            )
            self._check_architecture_is(self._stored_architecture, now, where)
        self._architecture = now

    def _check_architecture_is(self, was: str, now: str, where: str) -> None:
        if was != now:
            raise io.FingerprintMismatch(
                f"OnlineLLC: {where} is the curve of a model of another architecture: architecture = {was!r} "
                f"there, {now!r} now (a hash of the model's module tree and configuration: a size, layer type, "
                "activation, dtype or any other field of its configuration differs). Continue it with that "
                "run's model, or use another checkpoint path (or delete the file) to start a new curve.",
                path=self.state_path or "",
                item="architecture",
                stored=was,
                current=now,
            )

    def state_dict(self) -> dict:
        """The state a new :class:`OnlineLLC` continues from (:meth:`load_state_dict`): plain Python values
        (ints, floats, strings, lists, dicts; no arrays), so that it can be stored with a training run's own
        checkpoint (``torch.save(..., weights_only``-safe) or as JSON.

        Keys: ``version``; ``fingerprint`` (:meth:`fingerprint`); ``rows`` (one dict per estimate, as
        :meth:`__call__` returns them, in order); ``calibrated`` (the ``step_size``, and ``num_burnin_steps``
        when none was given, calibrated at the first estimate with ``step_size="auto"``; empty otherwise);
        ``auto_step`` (that calibration's report, as :attr:`auto_step` holds it, or None); ``architecture`` (a
        hash of the model's, or None before the first call); ``seconds``."""
        rows = []
        for r in self._rows:
            row = {k: (int(v) if k == "step" else float(v)) for k, v in r.items() if k != "refined"}
            if "refined" in r:
                row["refined"] = {str(c): float(v) for c, v in r["refined"].items()}
            rows.append(row)
        report = self.auto_step
        return {
            "version": STATE_VERSION,
            "fingerprint": dict(self.fingerprint()),
            "rows": rows,
            "calibrated": dict(self._calibrated),
            "auto_step": dict(report) if isinstance(report, Mapping) else None,
            "architecture": self._architecture or self._stored_architecture,
            "seconds": float(self.seconds),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue the curve of ``state`` (:meth:`state_dict` of the callback of the same run, before a restart):
        its rows replace this callback's, its calibrated step is reused, its seconds counted.

        Raises
        ------
        pypattern.io.FingerprintMismatch
            ``state`` is the curve of another run: other components, settings or data (naming the
            first item that differs); the model's architecture is checked at the next call.
        pypattern.io.FormatError
            ``state`` is not such a state, or is damaged (naming what is wrong).
        """
        self._restore(state, None)

    def _save_file(self, path: str) -> None:
        state = self.state_dict()
        rows = state.pop("rows")
        names = list(dict.fromkeys(c for r in rows for c in r.get("refined", {})))
        arrays = {"step": np.array([r["step"] for r in rows], dtype=np.int64)}
        for k in _ROW_FLOATS:
            arrays[k] = np.array([r[k] for r in rows], dtype=np.float64)
        for i, c in enumerate(names):  # by index: a component's name may hold any character
            arrays[f"refined/{i}"] = np.array([r["refined"].get(c, np.nan) for r in rows], dtype=np.float64)
            arrays[f"refined_given/{i}"] = np.array([c in r["refined"] for r in rows], dtype=np.bool_)
        state["components_estimated"] = names
        state["has_refined"] = self.components is not None
        io.save(path, arrays, {"online_llc": state}, kind=STATE_KIND)

    def _load_file(self, path: str) -> None:
        arrays, meta = io.load(path, kind=STATE_KIND)
        state = meta.get("online_llc")

        def bad(what: str) -> io.FormatError:
            return io.FormatError(
                f"OnlineLLC state {path!r} is damaged: {what}; delete it to start a new curve"
            )

        if not isinstance(state, dict):
            raise bad("its header holds no 'online_llc' mapping")
        state = dict(state)
        version = state.get("version")
        if version != STATE_VERSION:
            raise io.FormatError(
                version_message(path, version, STATE_VERSION).replace("checkpoint", "OnlineLLC state", 1)
            )
        names = state.pop("components_estimated", None)
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise bad(f"its 'components_estimated' is {names!r:.80}, not a list of component names")
        has_refined = state.pop("has_refined", None)
        if not isinstance(has_refined, bool):
            raise bad(f"its 'has_refined' is {has_refined!r:.80}, not a bool")
        for k in ("step", *_ROW_FLOATS):
            if k not in arrays:
                raise bad(f"it lacks the array {k!r}")
        n = arrays["step"].shape[0] if arrays["step"].ndim == 1 else -1
        wanted = {"step", *_ROW_FLOATS}
        for i in range(len(names)):
            wanted |= {f"refined/{i}", f"refined_given/{i}"}
        extra = sorted(set(arrays) - wanted)
        if extra:
            raise bad(f"it holds arrays {extra[:3]} of no component it names")
        for k in sorted(wanted):
            a = arrays.get(k)
            if a is None:
                raise bad(f"it lacks the array {k!r}")
            kind = "iu" if k == "step" else ("b" if k.startswith("refined_given/") else "f")
            if a.ndim != 1 or a.shape[0] != n or a.dtype.kind not in kind:
                raise bad(
                    f"{k!r} has shape {a.shape} and dtype {a.dtype}, expected one entry per row (of {n})"
                )
        rows = []
        for j in range(n):
            row = {"step": int(arrays["step"][j]), **{k: float(arrays[k][j]) for k in _ROW_FLOATS}}
            if has_refined:
                row["refined"] = {
                    c: float(arrays[f"refined/{i}"][j])
                    for i, c in enumerate(names)
                    if bool(arrays[f"refined_given/{i}"][j])
                }
            elif names:
                raise bad(f"it holds refined LLCs of {names[:3]} but its curve has no components")
            rows.append(row)
        state["rows"] = rows
        self._restore(state, path)

    def _restore(self, state: Mapping, path: str | None) -> None:
        """Check ``state`` (read from the file ``path``, or given to :meth:`load_state_dict`) and continue it."""
        where = (
            f"OnlineLLC state {path!r}"
            if path is not None
            else "the state given to OnlineLLC.load_state_dict"
        )
        fix = (
            "delete it to start a new curve" if path is not None else "give the state_dict() of an OnlineLLC"
        )

        def bad(what: str) -> io.FormatError:
            return io.FormatError(f"{where} is damaged: {what}; {fix}")

        if not isinstance(state, Mapping):
            raise io.FormatError(f"{where} is a {type(state).__name__}, not a mapping; {fix}")
        version = state.get("version")
        if version != STATE_VERSION:
            raise io.FormatError(
                f"{where} has version {version!r}, this pypattern reads version {STATE_VERSION}; {fix}"
            )
        stored = state.get("fingerprint")
        if not isinstance(stored, Mapping):
            raise bad(f"its 'fingerprint' is {stored!r:.80}, not a mapping")
        try:
            io.check_fingerprint(
                stored, self.fingerprint(), path or "state_dict", defaults=_fingerprint_defaults()
            )
        except io.FingerprintMismatch as e:
            message = str(e)
            head = f"checkpoint {e.path!r} was written by a different run"
            tail = "Use another checkpoint path, or delete this one to start afresh."
            if message.startswith(head):
                message = f"OnlineLLC: {where} is the curve of a different run" + message[len(head) :]
            message = message.replace(
                tail,
                "Continue it with that run's settings and data, or use another checkpoint path (or "
                "delete the file) to start a new curve."
                if path is not None
                else "Continue it with that run's settings and data, or start a new curve.",
            )
            raise io.FingerprintMismatch(
                message, path=path or "", item=e.item, stored=e.stored, current=e.current
            ) from None
        rows = state.get("rows")
        if not isinstance(rows, list | tuple):
            raise bad(f"its 'rows' is {rows!r:.80}, not a list of rows")
        seen: set[int] = set()
        out = []
        for j, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise bad(f"row {j} is {r!r:.80}, not a mapping")
            step = r.get("step")
            if not _is_step(step) or step < 0 or step in seen:
                raise bad(
                    f"row {j}'s step is {step!r}, not a step >= 0 estimated once (steps so far "
                    f"{sorted(seen)[:5]})"
                )
            seen.add(int(step))
            row = {"step": int(step)}
            for k in _ROW_FLOATS:
                v = r.get(k)
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise bad(f"row {j} (step {step}) has {k} = {v!r:.80}, not a number")
                row[k] = float(v)
            if set(r) - {"step", *_ROW_FLOATS, "refined"}:
                raise bad(f"row {j} (step {step}) has the keys {sorted(set(r))}, not a row's")
            if self.components is not None:
                ref = r.get("refined")
                if not isinstance(ref, Mapping) or not all(
                    isinstance(c, str) and isinstance(v, numbers.Real) and not isinstance(v, bool)
                    for c, v in ref.items()
                ):
                    raise bad(
                        f"row {j} (step {step}) has refined = {ref!r:.80}, not component names to numbers"
                    )
                row["refined"] = {c: float(v) for c, v in ref.items()}
            elif "refined" in r:
                raise bad(f"row {j} (step {step}) holds refined LLCs, but the curve has no components")
            out.append(row)
        calibrated = state.get("calibrated")
        if not isinstance(calibrated, Mapping) or set(calibrated) - {"step_size", "num_burnin_steps"}:
            raise bad(
                f"its 'calibrated' is {calibrated!r:.80}, not a mapping of step_size and num_burnin_steps"
            )
        auto = self._auto()
        step_size = calibrated.get("step_size")
        if step_size is not None and (
            isinstance(step_size, bool)
            or not isinstance(step_size, numbers.Real)
            or not 0 < step_size < math.inf
            or not auto
        ):
            raise bad(
                f"its calibrated step_size is {step_size!r}, not a step > 0 of a curve with step_size='auto'"
            )
        if auto and out and step_size is None:
            raise bad("it holds estimates with step_size='auto' but not the step they were calibrated at")
        burnin = calibrated.get("num_burnin_steps")
        if burnin is not None and (
            not is_count(burnin)
            or burnin < 0
            or step_size is None
            or self._given.get("num_burnin_steps") is not None
        ):
            raise bad(f"its calibrated num_burnin_steps is {burnin!r}, not the burn-in of a calibrated step")
        seconds = state.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 <= seconds < math.inf:
            raise bad(f"its 'seconds' is {seconds!r:.80}, not a time in seconds")
        architecture = state.get("architecture")
        if architecture is not None and not isinstance(architecture, str):
            raise bad(f"its 'architecture' is {architecture!r:.80}, not a hash")
        report = state.get("auto_step")
        if report is not None:
            try:
                report = AutoStepReport.from_dict(dict(report)).to_dict()
            except (KeyError, TypeError, ValueError, AttributeError):
                raise bad(
                    f"its 'auto_step' is {report!r:.80}, not a step-size calibration's report"
                ) from None
        if self._architecture is not None and architecture is not None:  # (a callback called before)
            self._check_architecture_is(architecture, self._architecture, where)
        # the same curve: continued
        self._rows = out
        self.seconds = float(seconds)
        self.auto_step = report
        self.sample_kwargs, self._calibrated = dict(self._given), {}
        if step_size is not None:
            self._use_calibrated(float(step_size), None if burnin is None else int(burnin))
        self._stored_architecture = architecture

    @property
    def result(self) -> OnlineLLCResult:
        """The estimates so far."""
        rows = self._rows
        # every component estimated at some step (a component whose weights all became frozen is left out of the
        # later estimates: NaN there)
        names = list(dict.fromkeys(k for r in rows for k in r.get("refined", {})))
        return OnlineLLCResult(
            step=np.array([r["step"] for r in rows], dtype=np.int64),
            llc_mean=np.array([r["llc_mean"] for r in rows], dtype=np.float64),
            llc_std=np.array([r["llc_std"] for r in rows], dtype=np.float64),
            llc_se=np.array([r["llc_se"] for r in rows], dtype=np.float64),
            r_hat=np.array([r["r_hat"] for r in rows], dtype=np.float64),
            init_loss=np.array([r["init_loss"] for r in rows], dtype=np.float64),
            train_loss=np.array([r["train_loss"] for r in rows], dtype=np.float64),
            refined={
                k: np.array([r.get("refined", {}).get(k, np.nan) for r in rows], dtype=np.float64)
                for k in names
            },
            seconds=self.seconds,
        )


#: the number columns of a row (besides ``step`` and ``refined``)
_ROW_FLOATS = ("llc_mean", "llc_std", "llc_se", "r_hat", "init_loss", "train_loss")


def as_train_callback(cb: OnlineLLC, also: Callable | None = None) -> Callable[[int, nn.Module], None]:
    """A ``(step, model)`` callback for :func:`pypattern.tasks.train` running ``cb`` (and then ``also``)."""

    def run(step, model):
        cb(model, step)
        if also is not None:
            also(step, model)

    return run
