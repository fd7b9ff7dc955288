"""devinterp 1.x's callback interface on pypattern: ``sample(model, loader, callbacks, ...)``, the
``SamplerCallback`` base class and the ``LLCEstimator`` / ``OnlineLLCEstimator`` callbacks, with devinterp's
constructor arguments and result keys.

A devinterp 1.x script that builds its own estimator and hands it to ``sample`` changes only the import::

    from pypattern.devinterp.slt.llc import LLCEstimator        # was: from devinterp.slt.llc import ...
    from pypattern.devinterp.slt.sampler import sample          # was: from devinterp.slt.sampler import ...

    est = LLCEstimator(num_chains=4, num_draws=100, init_loss=init_loss, nbeta=nbeta)
    sample(model, loader, callbacks=[est], evaluate=evaluate, num_chains=4, num_draws=100,
           optimizer_kwargs=dict(lr=1e-4, nbeta=nbeta, localization=100.0))
    est.get_results()["llc/mean"]

Callbacks are called at every draw (after burn-in, every ``num_steps_bw_draws`` steps) with the keywords devinterp
1.3.2 hands them (the locals of its ``sample_single_chain``): ``chain``, ``draw``, ``loss`` (the draw's loss as a
0-d float32 tensor), ``model`` (the chain's model, its parameters holding the step's gradient), ``data`` (the
batch), ``optimizer`` (the chain's sampler: its ``param_groups`` hold ``params`` and ``lr``, so devinterp's
``GradientNorm`` runs), ``i``, ``results`` and the run's settings (see :func:`_as_devinterp_callback`), plus
pypattern's ``step``, ``run``, ``batch``, ``observables`` and ``outputs``; a callback that declares only some of
them gets those. ``finalize()`` is called after the run. A run with callbacks other than :class:`LLCEstimator` /
:class:`OnlineLLCEstimator` runs its chains one after another (``batched=False``), as devinterp does, so that
``optimizer`` and the gradients are there.

As in devinterp 1.3.2, a callback runs after the step's update: ``model`` holds the updated weights (and, in
chains run one after another, the gradient of the draw's loss; chains run side by side, ``batched=True``, hand a
plain copy of each chain's updated weights). What differs from devinterp 1.3.2: ``data`` is the step's first
micro-batch and ``results`` joins the step's micro-batches (devinterp: the last
one); the samplers are fused, so devinterp's optimizer metrics (``optimizer.noise``, ``optimizer.dws``,
``optimizer.localization_loss``: what ``NoiseNorm`` and ``MalaAcceptanceRate`` read) are not there.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["LLCEstimator", "OnlineLLCEstimator", "SamplerCallback", "devinterp_callbacks", "sample"]


class SamplerCallback:
    """devinterp 1.x's callback base class: ``__call__`` at every draw, ``finalize()`` after the run,
    ``get_results()`` for what it computed."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device

    def share_memory_(self) -> SamplerCallback:
        """devinterp shares its tensors across processes; pypattern's chains run in one process: a no-op."""
        return self

    def __call__(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(chain, draw, **kwargs)")

    def finalize(self, *args, **kwargs) -> None:
        pass

    def get_results(self, *args, **kwargs) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define get_results()")


def _nbeta(nbeta, temperature) -> float:
    if nbeta is None and temperature is None:
        raise ValueError(
            "nbeta is not given: pass nbeta= (the inverse temperature the chains were sampled at)"
        )
    if nbeta is not None and temperature is not None:
        raise ValueError(
            f"nbeta={nbeta!r} and temperature={temperature!r} are given; temperature is devinterp's old name of "
            "nbeta: give one of them"
        )
    if nbeta is None:
        warnings.warn(
            "temperature= is devinterp's old name of nbeta; pass nbeta=", DeprecationWarning, stacklevel=3
        )
        nbeta = temperature
    nbeta = float(nbeta)
    if not (math.isfinite(nbeta) and nbeta > 0):
        raise ValueError(f"nbeta={nbeta!r} is not valid; give a positive number")
    return nbeta


def _counts(num_chains, num_draws) -> tuple[int, int]:
    for name, v in (("num_chains", num_chains), ("num_draws", num_draws)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is not valid; give a positive int")
    return num_chains, num_draws


def _scalar_loss(loss, chain: int, draw: int) -> float:
    v = float(torch.as_tensor(loss).detach().float().mean())
    if math.isnan(v):
        raise RuntimeError(f"NaN detected in loss at chain {chain}, draw {draw}")
    return v


class LLCEstimator(SamplerCallback):
    """devinterp 1.x's ``LLCEstimator``: each chain's mean loss over its draws, ``llc = nbeta * (mean loss -
    init_loss)`` per chain, its mean and standard deviation (ddof=1) over chains.

    Parameters
    ----------
    num_chains, num_draws : int
        As given to :func:`sample` (chain ``c``'s draw ``d`` is recorded at ``[c, d]``).
    init_loss : float or Tensor
        ``L_n(w*)``.
    device : str or torch.device
        Accepted for devinterp's signature; the losses are kept on the CPU.
    eval_field : str
        The keyword whose value is the draw's loss (default ``"loss"``).
    nbeta, temperature : float
        The inverse temperature the chains were sampled at (``temperature``: devinterp's old name; give one).
    """

    def __init__(
        self,
        num_chains: int,
        num_draws: int,
        init_loss,
        device: torch.device | str = "cpu",
        eval_field: str = "loss",
        nbeta: float | None = None,
        temperature: float | None = None,
    ) -> None:
        super().__init__(device)
        self.num_chains, self.num_draws = _counts(num_chains, num_draws)
        self.init_loss = init_loss
        self.nbeta = _nbeta(nbeta, temperature)
        self.temperature = temperature
        self.eval_field = eval_field
        # as devinterp keeps them during the run (callbacks such as its OnlineTraceStatistics read them at each
        # draw): float32 tensors of zeros, each entry written at its draw; which entries were is kept apart
        self.losses = torch.zeros(self.num_chains, self.num_draws, dtype=torch.float32)
        self._seen = np.zeros((self.num_chains, self.num_draws), dtype=bool)

    def update(self, chain: int, draw: int, loss) -> None:
        if not (0 <= chain < self.num_chains and 0 <= draw < self.num_draws):
            raise IndexError(
                f"chain {chain}, draw {draw} is outside this estimator's {self.num_chains} chains x "
                f"{self.num_draws} draws: give it the num_chains and num_draws of the sample() call"
            )
        self.losses[chain, draw] = _scalar_loss(loss, chain, draw)
        self._seen[chain, draw] = True

    def __call__(self, chain: int, draw: int, **kwargs) -> None:
        if self.eval_field not in kwargs:
            raise KeyError(
                f"eval_field={self.eval_field!r} is not among the callback's keywords {sorted(kwargs)}"
            )
        self.update(chain, draw, kwargs[self.eval_field])

    def _recorded(self) -> tuple[np.ndarray, float]:
        """The recorded losses ``(num_chains, num_draws)`` in float64 and ``init_loss`` as a float; every entry
        must have been recorded."""
        if not self._seen.all():
            n = int((~self._seen).sum())
            raise RuntimeError(
                f"{n} of the {self._seen.size} (chain, draw) losses were never recorded: the sample() call ran "
                "fewer chains or draws than this estimator was built for"
            )
        return (
            self.losses.numpy().astype(np.float64),
            float(torch.as_tensor(self.init_loss, dtype=torch.float64)),
        )

    def finalize(self) -> None:
        losses, init = self._recorded()
        self.llc_per_chain = self.nbeta * (losses.mean(1) - init)
        self.llc_mean = float(self.llc_per_chain.mean())
        self.llc_std = float(self.llc_per_chain.std(ddof=1)) if self.num_chains > 1 else float("nan")

    def get_results(self) -> dict:
        """``{"llc/mean", "llc/std", "llc-chain/<i>", "loss/trace" (num_chains, num_draws)}`` (after the run)."""
        if not hasattr(self, "llc_per_chain"):
            self.finalize()
        return {
            "llc/mean": self.llc_mean,
            "llc/std": self.llc_std,
            **{f"llc-chain/{i}": float(v) for i, v in enumerate(self.llc_per_chain)},
            "loss/trace": self.losses.numpy().copy(),
        }


class OnlineLLCEstimator(LLCEstimator):
    """devinterp 1.x's ``OnlineLLCEstimator``: the per-draw ``nbeta * (loss - init_loss)`` of every chain, and its
    mean and standard deviation (ddof=1) over chains at each draw. Same arguments as :class:`LLCEstimator`. As in
    devinterp, ``llcs`` (a float32 tensor ``(num_chains, num_draws)``) is written at each draw during the run
    (``init_loss`` is set before the run by :func:`sample`); :meth:`finalize` recomputes it from the losses in
    float64."""

    def __init__(
        self,
        num_chains: int,
        num_draws: int,
        init_loss,
        device: torch.device | str = "cpu",
        eval_field: str = "loss",
        nbeta: float | None = None,
        temperature: float | None = None,
    ) -> None:
        super().__init__(num_chains, num_draws, init_loss, device, eval_field, nbeta, temperature)
        self.llcs = torch.zeros(self.num_chains, self.num_draws, dtype=torch.float32)

    def update(self, chain: int, draw: int, loss) -> None:
        super().update(chain, draw, loss)
        if self.init_loss is not None:
            init = float(torch.as_tensor(self.init_loss, dtype=torch.float64))
            self.llcs[chain, draw] = self.nbeta * (float(self.losses[chain, draw]) - init)

    def finalize(self) -> None:
        losses, init = self._recorded()
        llcs = self.nbeta * (losses - init)
        self.llcs = torch.from_numpy(llcs.astype(np.float32))
        self.llc_means = llcs.mean(0)
        self.llc_stds = llcs.std(0, ddof=1) if self.num_chains > 1 else np.full(self.num_draws, np.nan)

    def get_results(self) -> dict:
        """``{"init_loss", "llc/means" (num_draws,), "llc/stds" (num_draws,), "llc/trace" (num_chains,
        num_draws), "loss/trace"}`` (after the run)."""
        if not hasattr(self, "llc_means"):
            self.finalize()
        return {
            "init_loss": self.init_loss,
            "llc/means": self.llc_means.astype(np.float32),
            "llc/stds": self.llc_stds.astype(np.float32),
            "llc/trace": self.llcs.numpy().copy(),
            "loss/trace": self.losses.numpy().copy(),
        }


_PASSED = (
    "chain",
    "run",
    "draw",
    "step",
    "loss",
    "init_loss",
    "batch",
    "observables",
    "outputs",
    "model",
    "optimizer",
)
# devinterp's sample() sets its L_n(w*) on the callbacks of these classes (its own or pypattern's) before the run
_ESTIMATORS = ("LLCEstimator", "OnlineLLCEstimator")

# devinterp 1.3.2's sample_single_chain locals that pypattern has no value for: handed as devinterp's empty ones
_EMPTY_LOCALS = {"pbar": None, "optimizer_metrics": [], "kwargs": {}}


def _is_estimator(cb) -> bool:
    """devinterp's own LLCEstimator / OnlineLLCEstimator, or this module's."""
    return type(cb).__name__ in _ESTIMATORS or isinstance(cb, LLCEstimator)


def _as_devinterp_callback(
    cb: Callable, estimators: Sequence | None = None, given_init: list | None = None
) -> Callable:
    """``cb`` called as devinterp 1.3.2 calls it, with the locals of its ``sample_single_chain``
    (``callback(**locals())``): ``chain``, ``draw``, ``loss`` (a 0-d float32 tensor; ``cumulative_loss`` too),
    ``model`` (the chain's model, its parameters holding the step's gradient), ``data`` (the batch), ``optimizer``
    (the chain's sampler), ``i`` (the micro-batch index, ``(step + 1) * grad_accum_steps - 1``), ``results`` (the
    tensors ``evaluate`` returned after the loss, or None), ``callback`` (the callback itself, devinterp's loop
    variable), and the run's settings under devinterp's names
    (``ref_model``, ``loader``, ``evaluate``, ``optimizer_kwargs``, ``sampling_method``, ``num_draws``,
    ``num_burnin_steps`` and ``num_steps_bw_draws`` in micro-batches, ``grad_accum_steps``, ``num_steps``,
    ``device``, ``seed``, ``verbose``, ``use_amp``, ``callbacks``, ``optimize_over_per_model_param``), besides
    pypattern's ``step``, ``run``, ``batch``, ``observables`` and ``outputs``. It receives the keywords it
    declares (all of them when it takes ``**kwargs``). ``call.devinterp_locals`` holds the run's settings (filled
    by the entry point before the run)."""
    try:
        params = inspect.signature(cb).parameters.values()
    except (TypeError, ValueError):
        params = None
    takes_all = params is None or any(p.kind == p.VAR_KEYWORD for p in params)
    wanted = None if takes_all else {p.name for p in params}
    settings: dict[str, Any] = {}
    # the estimators among the run's callbacks (devinterp's or this module's): devinterp sets the run's L_n(w*) on
    # each before any callback reads it (its online one and others, such as OnlineLossStatistics, read it at every
    # draw); here at the first call of any of the run's callbacks, before that callback runs
    estimators = [cb] if estimators is None and _is_estimator(cb) else list(estimators or ())
    given_init = [] if given_init is None else given_init  # the init_loss handed to them (once per run)

    def call(**kw):
        init_loss = kw.pop("init_loss", None)
        if estimators and init_loss is not None and given_init != [init_loss]:
            for e in estimators:
                e.init_loss = float(init_loss)
            given_init[:] = [init_loss]
        kw = {**_EMPTY_LOCALS, **settings, **kw, "kwargs": {"init_loss": init_loss}}
        kw["loss"] = torch.tensor(kw["loss"], dtype=torch.float32)
        kw["cumulative_loss"] = kw["loss"]
        kw["data"] = kw.get("batch")
        kw["callback"] = cb  # devinterp's loop variable: the callback being called
        accum = int(settings.get("grad_accum_steps", 1))
        kw["i"] = (int(kw["step"]) + 1) * accum - 1
        outs = kw.get("outputs") or ()
        kw["results"] = tuple(outs) if outs else None
        seed = settings.get("seed")
        if isinstance(seed, list | tuple):
            kw["seed"] = seed[kw["chain"] % len(seed)]
        if "optimizer" not in kw and (wanted is not None and "optimizer" in wanted):
            raise RuntimeError(
                f"callback {getattr(cb, '__qualname__', type(cb).__name__)} reads optimizer, which only chains run "
                "one after another hand it: leave batched unset (or False)"
            )
        with torch.no_grad():  # as devinterp calls its callbacks
            cb(**(kw if wanted is None else {k: v for k, v in kw.items() if k in wanted}))

    # the keywords the sampler must provide (it builds the chain's model only for callbacks that read it)
    need = set(_PASSED)
    if wanted is not None and "model" not in wanted:
        need.discard("model")
    # optimizer required only when the callback requires it (the sampler then runs the chains one after another,
    # and refuses batched=True before running); chains run side by side do not pass it
    needs_optimizer = params is not None and any(
        p.name == "optimizer" and p.default is p.empty and p.kind != p.VAR_POSITIONAL for p in params
    )
    call.__signature__ = inspect.Signature(
        [
            inspect.Parameter(
                k,
                inspect.Parameter.KEYWORD_ONLY,
                **({"default": None} if k == "optimizer" and not needs_optimizer else {}),
            )
            for k in sorted(need)
        ]
    )
    call.__qualname__ = getattr(cb, "__qualname__", type(cb).__name__)  # errors about it name the callback
    # what only chains run one after another hand over: the chain's sampler and its model holding the step's gradient
    call.reads_chain = wanted is None or bool(wanted & {"optimizer", "model"})
    # devinterp calls its callbacks after the step's update: the chains run one after another do too
    call.after_step = True
    call.finalize = getattr(cb, "finalize", None)
    call.get_results = getattr(cb, "get_results", None)
    call.inner = cb
    call.devinterp_locals = settings
    return call


def devinterp_callbacks(callbacks: Sequence[Callable] | None) -> list[Callable]:
    """devinterp 1.x callbacks wrapped for pypattern's sampler (see the module docstring)."""
    if callbacks is None:
        return []
    if callable(callbacks):
        callbacks = [callbacks]
    try:
        callbacks = list(callbacks)
    except TypeError:
        raise TypeError(
            f"callbacks={callbacks!r} is not valid; give a list of callbacks (SamplerCallback objects or callables)"
        ) from None
    for i, cb in enumerate(callbacks):
        if not callable(cb):
            raise TypeError(
                f"callbacks[{i}] is a {type(cb).__name__}, not callable; give SamplerCallback objects"
            )
    estimators = [cb for cb in callbacks if _is_estimator(cb)]
    given_init: list = []  # shared by the wrappers: the first to run sets every estimator's init_loss
    return [_as_devinterp_callback(cb, estimators, given_init) for cb in callbacks]


def sample(
    model: nn.Module,
    loader,
    callbacks: Sequence[Callable],
    evaluate: Callable | None = None,
    sampling_method=None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    num_draws: int = 100,
    num_chains: int = 10,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    init_loss: float | None = None,
    grad_accum_steps: int = 1,
    cores: int = 1,
    seed: int | Sequence[int] | None = None,
    device: str | torch.device | None = None,
    verbose: bool = True,
    optimize_over_per_model_param: Mapping[str, torch.Tensor] | None = None,
    gpu_idxs: Sequence[int] | None = None,
    batch_size: int = 1,
    use_amp: bool = False,
    criterion: Callable | None = None,
    **kwargs,
) -> dict:
    """devinterp 1.x's ``sample``: runs the chains and hands every draw to ``callbacks`` (finalized after the
    run; its LLC estimators get the run's ``L_n(w*)``, given or computed, as devinterp sets it); returns the
    callbacks' ``get_results()`` merged into one dict, as devinterp does. Arguments as
    :func:`pypattern.sampling.llc.estimate_learning_coeff_with_summary` (``batch_size`` is accepted and unused, as
    in devinterp)."""
    from ..sampling.llc import estimate_learning_coeff_with_summary

    if callbacks is None or (not callable(callbacks) and len(callbacks) == 0):
        warnings.warn("sample() got no callbacks: the draws are computed and dropped", stacklevel=2)
    wrapped = devinterp_callbacks(callbacks)
    estimate_learning_coeff_with_summary(
        model,
        loader,
        callbacks=wrapped,
        evaluate=evaluate,
        criterion=criterion,
        sampling_method=sampling_method,
        optimizer_kwargs=optimizer_kwargs,
        num_draws=num_draws,
        num_chains=num_chains,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        init_loss=init_loss,
        grad_accum_steps=grad_accum_steps,
        cores=cores,
        seed=seed,
        device=device,
        gpu_idxs=gpu_idxs,
        verbose=verbose,
        optimize_over_per_model_param=optimize_over_per_model_param,
        use_amp=use_amp,
        _wrapped_callbacks=True,
        **kwargs,
    )
    results: dict = {}
    for cb in wrapped:
        if callable(getattr(cb, "get_results", None)):
            try:
                results.update(cb.get_results())
            except NotImplementedError:  # a callback that keeps no results (SamplerCallback's default)
                continue
    return results
