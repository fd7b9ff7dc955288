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
import numbers
import operator
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import is_count
from .._training import random_in_training
from ..io import Saveable, register
from .auto import wants_auto
from .checkpoint import sub_run_path
from .diagnostics import naming_runs
from .llc import _SAMPLE_ARGUMENTS, estimate_llc
from .plan import (
    chain_indices,
    check_callables,
    check_checkpoint_file,
    check_loader,
    check_settings,
    refuse_unknown_keywords,
)
from .results import check_arrays
from .runner import default_loss_fn, sample
from .vocabulary import translate

__all__ = ["OnlineLLC", "OnlineLLCResult", "preserved_training_state"]


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

    Examples
    --------
    >>> cb = OnlineLLC(loader, every=100, num_chains=4, num_draws=100, step_size=1e-4, localization=100.0)
    >>> for step in range(1000):
    ...     loss = train_step(model)
    ...     cb(model, step, loss=loss)
    >>> cb.result.plot()
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
            steps = list(steps)
            bad = [v for v in steps if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0]
            if bad:
                raise ValueError(f"steps contains {bad[:3]}; give training steps as ints >= 0")
        self.steps = None if steps is None else {int(s) for s in steps}
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
        self._rows: list[dict] = []
        self.seconds = 0.0

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
        if not self.due(step):
            return None
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
        if wants_auto(self.sample_kwargs.get("step_size"), self.sample_kwargs.get("optimizer_kwargs")):
            # "auto" (or no step, its default): keep the step calibrated at the first estimate for the whole curve
            self.sample_kwargs["step_size"] = float(config["step_size"])
            if (
                self.sample_kwargs.get("num_burnin_steps") is None
            ):  # and its burn-in (a given step would get none)
                self.sample_kwargs["num_burnin_steps"] = int(config["num_burnin_steps"])
            self.auto_step = config.get("auto_step")
        return row

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


def as_train_callback(cb: OnlineLLC, also: Callable | None = None) -> Callable[[int, nn.Module], None]:
    """A ``(step, model)`` callback for :func:`pypattern.tasks.train` running ``cb`` (and then ``also``)."""

    def run(step, model):
        cb(model, step)
        if also is not None:
            also(step, model)

    return run
