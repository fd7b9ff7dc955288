"""The sampler: :func:`sample` runs chains of SGLD from the trained weights and returns their traces.

It is an orchestrator over small modules: :mod:`.plan` checks the arguments and resolves them into a frozen
:class:`~.plan.RunPlan`; :mod:`.checkpoint` holds the state the draws go into and its file; :mod:`.sequential` and
:mod:`.batched` are the two chain loops, sharing a :class:`~.context.RunContext` (callbacks, checkpoint writes,
divergence checks); :mod:`.data` is each chain's keyed stream of batches.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
import numbers
import operator
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import io
from .._checks import is_count, model_device, refuse_inference_parameters
from .._threads import pinned_threads
from .._training import buffers_kept, eval_mode_if_random
from ..losses import (
    _lm_token_terms,
    _own_loss_or_logits,
    _pair_terms,
    batch_loss,
    check_batch,
    errors_naming,
    read_loss,
)
from .auto import (
    auto_arguments,
    burnin_for_run,
    calibrate_or_resume,
    check_auto_step_options,
    resolve_step_size,
    wants_auto,
    with_auto_report,
)
from .batched import UnstackableBatches, VmapUnsupported, run_batched
from .checkpoint import State, load_checkpoint_state, run_fingerprint, stored_step
from .context import LossContractError, RunContext, Stopped
from .data import (
    ChainData,
    batch_size_of,
    batches_per_epoch,
    covering_batches,
    ragged_last_batch,
    rows_dropped_by_shuffle,
    to_device,
)
from .diagnostics import (
    _RUN_NAMES,
    MAX_SHORTFALL,
    NonFiniteLossError,
    NonStationaryWarning,
    SamplingDivergedError,
    check_drift,
    check_mixing,
    check_relaxation,
    check_stationarity,
    check_step_bias,
    checking_run,
    draw_shortfall,
    ess,
    r_hat,
    relaxation_bounds,
    step_bias,
    user_stacklevel,
)
from .optim import check_backend
from .plan import (
    RunPlan,
    chain_indices,
    check_callables,
    check_checkpoint_file,
    check_loader,
    check_model,
    check_settings,
    default_nbeta,
    make_plan,
)
from .results import SampleResult
from .samplers import sampler_name
from .sequential import run_sequential
from .vocabulary import DEVINTERP_NAMES, translate

__all__ = [
    "SamplingDivergedError",
    "default_loss_fn",
    "default_nbeta",
    "load_checkpoint_state",
    "sample",
    "split_loss",
]

BATCHED_MAX_PARAMS = 1 << 17  # batched=None runs chains batched (vmap) up to this many parameters,
BATCHED_MIN_CHAINS = 8  # or, on a GPU, when at least this many chains run together
BATCHED_MAX_STACKED = 1 << 24  # and chains x parameters stay under this (64 MB of float32 weights)


#: the argument the loss function came in, which the sampler's errors about it name: ``loss_fn`` of
#: :func:`sample`, unless an entry point that takes it under another name runs ``sample`` inside
#: :func:`loss_argument` (devinterp 1.x's ``evaluate`` and ``criterion``). Not part of a run's fingerprint.
_LOSS_ARGUMENT: contextvars.ContextVar[str] = contextvars.ContextVar(
    "pypattern_loss_argument", default="loss_fn"
)


@contextlib.contextmanager
def loss_argument(name: str):
    """Within the block, the sampler's errors about the loss function name it ``name`` (the argument the caller
    gave it in, e.g. ``"evaluate"``) instead of ``loss_fn``."""
    token = _LOSS_ARGUMENT.set(name)
    try:
        yield
    finally:
        _LOSS_ARGUMENT.reset(token)


def split_loss(out, argument: str = "loss_fn") -> torch.Tensor:
    """The loss from what a loss function returned: a tensor, a tuple (loss first), a dict with ``"loss"`` or an
    object with ``.loss`` (devinterp's rules). The loss must be one real number (a tensor of one element): a
    per-sample loss ``(batch,)`` or ``(batch, 1)`` and a complex loss are refused, naming ``argument`` (the
    argument the loss function was given in) and the shape or dtype."""
    try:
        loss = read_loss(out)
    except TypeError as e:
        raise TypeError(f"{argument}: {e}") from None
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{argument} returned a loss of type {type(loss).__name__}; it must be a tensor of one element (the "
            "batch's mean loss, differentiable in the parameters)"
        )
    if loss.is_complex():
        raise LossContractError(
            f"{argument} returned a complex loss (dtype {loss.dtype}); it must be a real number, the batch's mean "
            "loss (a real floating tensor of one element)"
        )
    if loss.numel() != 1:
        raise LossContractError(
            f"{argument} returned a loss of shape {tuple(loss.shape)}; it must be one number, the batch's mean "
            "loss (a tensor of one element): reduce per-sample losses with .mean()"
        )
    return loss


def default_loss_fn(model, batch) -> torch.Tensor:
    """The batch's mean loss by the library's one rule (:func:`pypattern.losses.batch_loss`): token tensors and
    Hugging Face dicts (``input_ids``, ``attention_mask``, ``labels``) give the mean next-token cross-entropy over
    their counted tokens; ``(x, y)`` gives cross-entropy of ``model(x)`` for integer ``y``, else mean squared error.

    The per-token (per-sample) losses are summed in float64 (float32 on a device without float64, MPS), so the
    loss is float64 for a float32 model: the LLC ``nbeta (E[L(w)] - L(w*))`` reads differences of losses
    ``nbeta`` times magnified, and a float32 mean's rounding (half a unit in the last place, about 3e-8 at a loss
    of 0.6) shifted ``L(w*)``, shared by every draw, by 0.2 LLC units at ``nbeta = 1e7`` on a float32 MLP (0.004
    summed in float64). The gradient is that of the float32 mean (up to rounding). A model that returns its own
    loss has that loss returned as it is."""
    pb, own, logits = _own_loss_or_logits(model, batch)
    if own is not None:
        return own
    terms, mask = _lm_token_terms(logits, pb) if pb.is_lm else _pair_terms(logits, pb.target, pb.inputs)
    if terms.device.type != "mps":
        terms = terms.double()
    if terms.dim() == 0:
        return terms
    return terms.sum() / mask.sum()


def _always(model, batch) -> bool:
    return True


def by_default_rule(fn: Callable, when: Callable[[Any, Any], bool] | None = None) -> Callable:
    """``fn``, a loss function ``(model, batch)`` that computes its loss by the library's one rule (wrapping
    :func:`pypattern.losses.batch_loss` or its per-token losses), marked so that the sampler treats it as it treats
    :func:`default_loss_fn` (:func:`reads_by_default_rule`): the batches whose ``L_n(w*)`` it computes are checked
    by :func:`pypattern.losses.check_batch` first, and the rule's refusals name the argument the batch came in.
    ``when(model, batch)`` says whether the rule computes the loss of ``batch`` (default: always)."""
    fn._pypattern_default_rule = when if when is not None else _always
    return fn


def always_by_default_rule(loss_fn: Callable) -> bool:
    """Whether the library's one rule computes ``loss_fn``'s loss on every batch: :func:`default_loss_fn`,
    :func:`pypattern.losses.batch_loss`, or a loss function marked by :func:`by_default_rule` without a predicate
    (susceptibilities' and bif's default)."""
    return (
        loss_fn is default_loss_fn
        or loss_fn is batch_loss
        or getattr(loss_fn, "_pypattern_default_rule", None) is _always
    )


def reads_by_default_rule(loss_fn: Callable, model, batch) -> bool:
    """Whether the library's one rule computes ``loss_fn``'s loss on ``batch``: always for the losses of
    :func:`always_by_default_rule`, a loss function marked by :func:`by_default_rule` with a predicate when it
    says so, any other never (a loss function of one's own reads its batches as it will)."""
    if always_by_default_rule(loss_fn):
        return True
    when = getattr(loss_fn, "_pypattern_default_rule", None)
    return callable(when) and when(model, batch) is True


@torch.enable_grad()  # the chains' steps take gradients: also when called under torch.no_grad()
def sample(
    model: nn.Module,
    loader: Iterable,
    *,
    loss_fn: Callable | None = None,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int | str | None = None,
    num_steps_bw_draws: int = 1,
    step_size: float | str | None = None,
    nbeta: float | None = None,
    localization: float = 0.0,
    weight_decay: float = 0.0,
    noise_scale: float | None = None,
    bounding_box: float | None = None,
    noise_level: float | None = None,
    bounding_box_size: float | None = None,
    temperature: float | None = None,
    lr: float | str | None = None,
    restrict_to: str | re.Pattern | Sequence[str | re.Pattern] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    sampler: str | type | None = None,
    sampling_method: str | type | None = None,
    observables: Mapping[str, Callable] | Sequence[Callable] = (),
    callbacks: Sequence[Callable] = (),
    seed: int | Sequence[int] = 0,
    init_loss: float | None = None,
    num_init_loss_batches: int | None = None,
    batched: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    quiet: bool = False,
    backend: str | None = None,
    warn_nonstationary: bool = True,
    runs: Sequence[tuple[str | Sequence[str] | None, Mapping[str, torch.Tensor] | None]] | None = None,
    record_observables: bool = True,
    cores: int = 1,
    grad_accum_steps: int = 1,
    chains: Sequence[int] | None = None,
    checkpoint_state: Callable[[], Mapping[str, np.ndarray]] | None = None,
    noise_coupling: int = 1,
    device: str | torch.device | None = None,
    auto_step_options: Mapping[str, Any] | None = None,
) -> SampleResult | list[SampleResult]:
    """Run ``num_chains`` chains of SGLD (or another ``sampler``) from the trained weights ``w*`` (the model's
    current parameters).

    Chain ``c`` takes ``num_burnin_steps`` steps, then records a draw every ``num_steps_bw_draws`` steps until it
    has ``num_draws``. At each step it evaluates ``loss_fn(model, batch)`` on its next batch, records it (at a
    draw) together with the observables, and takes one SGLD step (:class:`SGLD`, the fused op). The model passed
    in is not modified.

    Parameters
    ----------
    model : nn.Module
        At the weights ``w*`` to sample around.
    loader : iterable of batches
        A ``DataLoader`` (or any re-iterable). Each chain reads its own deterministic stream of batches, keyed by
        ``(seed, chain, epoch)``: shuffling is reproducible and differs between chains. A one-shot iterator (a
        generator, ``iter(...)`` of something, ``itertools.cycle``) cannot start a pass per chain: ValueError.
    loss_fn : callable(model, batch) -> loss, optional
        The batch-mean loss; may return a tensor, a tuple (loss first), a dict with ``"loss"`` or an object with
        ``.loss`` (devinterp's ``evaluate``). Default: cross-entropy for integer targets, else MSE, on
        ``batch = (x, y)``.
    num_chains, num_draws, num_burnin_steps, num_steps_bw_draws : int
        Chain layout (devinterp's names and meanings). ``num_burnin_steps`` defaults (None) to as many steps as
        the draws take, ``num_draws * num_steps_bw_draws``, when the step is calibrated (``step_size="auto"``,
        the default: its trials judge a step with that share of burn-in, and chains started at ``w*`` need it to
        reach the distribution they sample), and to 0 (devinterp's default) when a step is given. ``"auto"``
        (:func:`pypattern.estimate_llc`'s default): with a calibrated step, as long as that step needs for the
        chains to relax from ``w*`` along the flattest direction (:func:`pypattern.sampling.auto.burnin_for_run`:
        ``relaxation_times`` relaxation times at ``step_size * (localization + weight_decay) / 2`` per step, at
        least the draws' steps and the burn-in the calibration judged the step with, at most ``max_burnin_factor``
        (``auto_step_options``, default 40) times the draws' steps; recorded in ``config["auto_step"]["burnin"]``);
        with a given step as None. A calibrated
        run whose burn-in is shorter than the burn-in its calibration judged the chosen step with (half its
        shortest trial there, at most ``calibration_steps / 2``: 100 steps by default), as a run of a few draws
        is, warns (:class:`NonStationaryWarning`): its draws may come before its chains relaxed from ``w*``.
    step_size : float or "auto", optional
        SGLD step size ``eps`` (devinterp's ``lr``). Default (None, and no ``lr``/``step_size`` in
        ``optimizer_kwargs``): ``"auto"``, chosen by a short calibration before the run
        (:mod:`pypattern.sampling.auto`, with its own progress bar unless ``quiet``); the result's
        ``config["step_size"]`` is the chosen step and ``config["auto_step"]`` the calibration's trials, the
        estimated discretisation bias and the reason. A given step turns the calibration off.
    nbeta : float, optional
        ``n * beta``; default ``batch_size / ln(batch_size)`` (devinterp's default). ``temperature`` is devinterp's
        older name for it, ``lr`` devinterp's name for ``step_size``.
    localization, weight_decay, noise_scale, bounding_box, restrict_to, masks
        See :class:`SGLD`. ``noise_level`` and ``bounding_box_size`` are devinterp's names for ``noise_scale``
        (default 1) and ``bounding_box``; two names of one hyperparameter must not disagree (ValueError).
    noise_level, bounding_box_size, temperature, lr : optional
        devinterp's names for ``noise_scale``, ``bounding_box``, ``nbeta`` and ``step_size`` (see those); a
        value given under both names must be the same.
    optimizer_kwargs : dict, optional
        devinterp-style ``{"lr", "nbeta", "localization", "weight_decay", "noise_level", "bounding_box_size"}``
        (pypattern's names work too); a number given here and as a keyword argument above must have one value
        (ValueError otherwise). The result's ``config`` and
        checkpoints use pypattern's names (:mod:`pypattern.sampling.vocabulary`). The sampler's own
        hyperparameters go here too: SGNHT's ``diffusion_factor`` (default 0.01), RMSprop-SGLD's ``alpha`` (0.99)
        and ``eps`` (0.1).
    sampler, sampling_method : {"sgld", "sgnht", "rmsprop_sgld"} or a sampler class, optional
        The chains' dynamics, each step one fused op: SGLD (default), SGNHT (:class:`SGNHT`: momentum and a
        thermostat per chain) or RMSprop-preconditioned SGLD (:class:`RMSpropSGLD`); the classes (pypattern's or
        devinterp's) name theirs. All three target ``exp(-nbeta L_n(w) - localization/2 |w - w*|^2)`` up to
        their discretisation bias. RMSprop-SGLD leaves out the term in the derivative of its preconditioner, as
        devinterp does: exact for a constant preconditioner, it biases the draws towards larger gradients when
        the running mean of squared gradients follows the chain's position, which happens when its window,
        ``step_size / (1 - alpha)`` of Langevin time, is short: the bias grows as the step shrinks (measured
        +9 % at step 1e-3 and +32 % at 1e-4 on a linear regression with ``alpha = 0.99``; see
        :mod:`pypattern.ops.rmsprop_sgld`). Sequential and batched chains, checkpoints (with
        the sampler's state) and the noise keys work the same for all three. The result's ``config["sampler"]``
        names it. ``sampling_method`` is devinterp's name for it (both given must agree).
    observables : mapping name -> callable(model, batch) -> Tensor or float, or a sequence of callables
        Evaluated (without gradient) at every draw on the draw's batch; traces ``(num_chains, num_draws, *shape)``
        (float64). The first draw fixes ``shape``: a value of another shape (a per-sample observable on a batch of
        another size), a complex value or one that is not numbers is a ValueError naming the observable.
        With batched chains each observable is first tried under ``torch.func.vmap`` (all chains in one call);
        one that does not run under vmap is evaluated chain by chain (remembered for the batch's shapes and
        dtypes, which decide it: a resumed run computes each draw's values as an uninterrupted run does), where
        an exception it raises without vmap too propagates. A non-finite value (NaN or Inf) is recorded as it is,
        with a ``RuntimeWarning`` (once per observable) naming the chain and draw.
    callbacks : sequence of callable
        Called at every draw with the keyword arguments they accept among ``chain``, ``run``, ``draw``,
        ``step``, ``loss`` (float), ``init_loss`` (the run's ``L_n(w*)``, float), ``model`` (the chain's model),
        ``batch``, ``observables`` (dict) and
        ``outputs`` (the tensors ``loss_fn`` returned after the loss, detached: a loss function returning
        ``(loss, per_sample_losses)`` hands the per-sample losses of the draw's forward to the callbacks without
        a second forward; with ``grad_accum_steps > 1`` each is joined over the step's micro-batches, concatenated
        along its first dimension, stacked when it has none, or a list of the micro-batches' tensors when their
        other dimensions differ). ``batch`` is the step's first micro-batch. Chains run one after another
        (``batched=False``) also hand ``optimizer``, the chain's sampler (:class:`SGLD`, :class:`SGNHT` or
        :class:`RMSpropSGLD`), and their ``model``'s parameters hold the step's gradient: a callback runs after
        the step's backward, before its update. A callback that requires ``optimizer`` (no default) makes
        ``batched=None`` run the chains one after another (``batched=True`` with it is a ValueError); one that
        requires an argument not in this list, or takes positional-only ones, is a TypeError naming it, before
        the run. Stream values into accumulators here. An exception raised by a callback stops the
        run (a checkpoint keeps finished draws). A callback with a ``reset()`` method lets a run at a calibrated
        step (``step_size="auto"``) that ran away start over at half the step (``reset()`` is called first).
    seed : int or sequence of ``num_chains`` ints
        Keys every noise value (through :func:`chain_seed`) and the data order; a sequence gives each chain its
        own (chain ``c`` is keyed by ``chain_seed(seed[c], c)``, devinterp's per-chain seeds).
    init_loss : float, optional
        ``L_n(w*)``; default: the mean loss at ``w*`` over ``num_init_loss_batches`` batches.
    num_init_loss_batches : int, optional
        Default: one epoch of ``loader``, unless that is more forwards than half the run's chain-steps (then that
        many, at least ``max(4, num_chains)``); ``max(4, num_chains)`` for a loader without a length (its whole
        epoch, each batch once, when that is shorter: then no standard error, as for a whole epoch). The
        standard error of ``L_n(w*)`` from fewer batches than an epoch is ``init_loss_se`` of the result. Over a
        whole epoch ``L_n(w*)`` is the mean loss over every row the chains read: a shuffling ``DataLoader``'s
        rows that one epoch leaves out (its ragged last batch, or the rows ``drop_last`` drops, others each epoch)
        count by their rows; an unshuffled loader's dropped rows, which no chain reads, do not.
    batched : bool, optional
        ``True``: run the chains together (parameters stacked along a chain axis, one ``vmap``-ed forward and
        one backward per step); ``False``: one chain after another; ``None`` (default): batched, if the model
        runs under ``torch.func.vmap`` (no in-place buffer updates, no random ops), for models of at most
        ``BATCHED_MAX_PARAMS`` = 2^17 parameters (and, on a GPU, whenever at least ``BATCHED_MIN_CHAINS`` = 8
        chains run together), with at most ``BATCHED_MAX_STACKED`` = 2^24 stacked parameters; else sequential.
        Measured per chain-step on a CPU, one thread (``bench/bench_batched_chains.py``, docs/benchmarks.md):
        batched is 1.04-1.34x faster for 4-20 chains of MLPs of 22k and 99k parameters and 1.5-2.6x for a
        10k-parameter transformer, and slower from about 260k parameters on (0.82-0.87x at 263k, 0.45-0.60x at
        1.05 million). Both give the same draws for the same seed, up to float rounding. Whether the loss runs
        under vmap is found at the first step (of a run, or of a resumed run): an exception there is checked by
        calling the loss without vmap for each chain on its batch; one raised there too is the loss function's
        own and propagates as it is, only one that vmap alone meets means "does not run under vmap". Batched chains stack their batches of a step: with
        ``batched=None``, chains whose batches of a step differ in shape (a collate that pads each batch to its
        own longest sequence) go on one after another from that step (the result's ``batched`` is False);
        ``batched=True`` refuses them (ValueError naming ``loader`` and the shapes).
    checkpoint : path, optional
        ``.npz`` file (:mod:`pypattern.io`, no pickle) rewritten atomically every ``checkpoint_every`` draws with
        the finished draws and the state of unfinished chains. If it exists, the run resumes from it and ends with
        the same result as an uninterrupted run. It must have been written by the same run: the file holds a
        fingerprint of the chain layout, seed, hyperparameters, loss function and observables (by name and what
        they capture: a partial's arguments, a function's code, defaults and closure, a loss module's settings),
        moving parameters and masks, a hash of every weight and buffer and of the data (a ``TensorDataset``
        loader's tensors; any other loader's batches of one epoch, read through once); a file of
        any other run is refused with :class:`pypattern.io.FingerprintMismatch` naming the first differing item.
    checkpoint_every : int
        Draws between rewrites of ``checkpoint`` (default 1: after every draw); an int >= 1.
    quiet : bool
        No progress bar.
    backend : str, optional
        Force a backend of the sampler's fused op (``"cuda"``, ``"triton"``, ``"cpp"`` or ``"reference"``; another
        name is a ValueError).
    warn_nonstationary : bool
        Warn (:class:`NonStationaryWarning`) when the split R-hat of the loss trace exceeds 1.1 or its effective
        sample size is low, and, at a given step, when the draws fall short of their stationary value (the chains
        not yet relaxed from ``w*``; SGLD, RMSprop-SGLD and SGNHT) or when the step's estimated discretisation bias
        exceeds 10% (SGLD and RMSprop-SGLD; :class:`~pypattern.sampling.diagnostics.StepBiasWarning`, from the
        Hessian's trace at the chains' last weights: a few forwards after the run), and, at ``localization=0`` (or
        one too weak to act within the run: the flattest directions relax over fewer than 0.1 relaxation times in
        its steps) after a burn-in as long as the draws (a calibrated step's default), when the chains keep moving
        away from ``w*`` (:class:`~pypattern.sampling.DriftWarning`: their ``|w - w*|^2`` grows from the first to
        the last quarter of the draws, recorded at each draw, about 0.08 ms per draw for 100k parameters, only when
        checked); there an SGLD step calibrated by ``step_size='auto'`` has its bias checked too (the calibration's
        halving test cannot see it where nothing holds the chains).
    runs : sequence of ``(restrict_to, masks)`` pairs, optional
        Several restricted samplers in one call (instead of ``restrict_to`` and ``masks``): ``num_chains`` chains
        for each run, all batched together when ``batched`` allows (one forward and backward per step for every
        run). Chain ``c`` of run ``r`` has the global index ``r * num_chains + c`` (the ``chain`` a callback
        receives, with ``run=r``) and the noise and data of chain ``c`` of a separate call with that run's
        ``restrict_to`` and ``masks``: the draws are the same up to float rounding. Returns one
        :class:`SampleResult` per run.
    record_observables : bool
        Keep the observables' traces (default). ``False``: evaluate them at every draw and hand them to the
        callbacks only (memory independent of the number of draws).
    grad_accum_steps : int
        Batches per step (devinterp's meaning): the step's loss and gradient are the means over
        ``grad_accum_steps`` consecutive batches of the chain's stream; the recorded loss is that mean, and
        observables and callbacks see the step's first batch. The default ``nbeta`` becomes
        ``m / ln m`` with ``m = batch_size * grad_accum_steps``.
    checkpoint_state : callable() -> dict of str to ndarray, optional
        Called at every checkpoint write: its arrays go into the same file, atomically with the draws they
        describe (state the callbacks build, e.g. accumulators). Read them back with
        :func:`load_checkpoint_state` before resuming: the draws in the file are not replayed.
    chains : sequence of int, optional
        Run only these chains (global indices ``r * num_chains + c``); the others' rows of the traces stay NaN.
        :mod:`pypattern.distributed` gives each rank its share this way. An empty list is refused (ValueError:
        nothing would run), except inside a ``torch.distributed`` process group, where a rank may own no chain.
    cores : int
        Run the chains in ``cores`` groups at once, one Python thread each, with torch pinned to one intra-op
        thread (each op runs on its calling thread, so the groups use ``cores`` cores; torch releases the GIL
        inside its ops). Each group is sequential or batched as ``batched`` says. The draws do not depend on it
        (bitwise against a run in one torch thread, which each group runs in; against more intra-op threads,
        whose reductions add in another order, up to float rounding).
        Callbacks and checkpoint writes are serialised under a lock; a chain's draws reach the callbacks in
        order. Use it for models whose steps are large enough to outweigh the GIL; small ops are faster in one
        thread.
    noise_coupling : int
        ``m > 1`` couples this run to a run with the same arguments, the same seed and ``step_size / m``: step ``t``
        takes the noise of steps ``m t, ..., m t + m - 1`` of that run, summed and divided by ``sqrt(m)`` (the
        Euler step of the same Brownian path), and the batches of its step ``m t``. The two runs then differ by
        their discretisation, not by their noise: the difference of their estimates has a far smaller variance
        than that of independent runs (the ``step_size="auto"`` calibration compares halved steps this way).
        SGLD only, run batched, at a given step, without ``bounding_box`` or ``checkpoint``.
    device : str or torch.device, optional
        Where to sample (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...). Default: the model's device. Another device
        samples a copy of the model moved there (``model`` stays where it is); the batches are moved to it as
        they are read.
    auto_step_options : dict, optional
        Settings of the ``step_size="auto"`` calibration (:func:`pypattern.sampling.resolve_step_size`'s:
        ``calibration_steps``, ``calibration_chains``, ``max_step_size``, ``min_step_size``, ``max_trial_factor``,
        ``max_r_hat``, ``z``, ``rtol``, ``atol_rel``, ``run_trial_factor``, ``resolve``, ``coupled``,
        ``pair_factor``, ``relaxation_times``, ``relaxation_target``), e.g. ``{"calibration_steps": 800}`` for
        longer trials when the calibration refuses (:class:`~pypattern.sampling.AutoStepError`). Only with the
        calibration (no step given): with a given step it is a ValueError.

    Returns
    -------
    SampleResult, or a list of them (one per run) when ``runs`` is given

    Raises
    ------
    SamplingDivergedError
        A loss, gradient or parameter became NaN or Inf, or a chain's loss ran away (above
        ``L_n(w*) + max(10 |L_n(w*)|, 10 d / nbeta)`` for ``d`` moving parameters at 5 consecutive steps, burn-in
        and steps between draws included, or on average over the chain's draws: an LLC twenty times larger than
        possible); the message names the chain, draw, step and step size, and suggests a tenth of the step size.
        A loss that is not finite at the initial weights ``w*`` too (on ``L_n(w*)``'s batches, or on the batch
        where a chain met it) raises :class:`~pypattern.sampling.NonFiniteLossError` instead (also a
        ``ValueError``): the data or the model, not the step size, are the cause.
    TypeError, ValueError
        ``model`` not an ``nn.Module`` (or on the meta device), ``loader`` not an iterable of batches, or a batch
        the default loss cannot read (a tuple of more than ``(x, y)``, class targets for a model with one output,
        sequences longer than the model's learned positions, a dtype other than the model's), naming the
        argument.

    Notes
    -----
    A model in training mode with dropout layers is put in eval mode for the run (and back afterwards), with a
    warning: dropout would make the draws random beyond the seed and a resume inexact. The chains take gradients
    whatever the caller's grad mode (a call under ``torch.no_grad()`` is the same run); under
    ``torch.inference_mode()``, which forbids them, it is a RuntimeError.
    Two distinct parameters sharing memory (``lm_head.weight = nn.Parameter(embed.weight)``) are a ValueError: the
    chains' copies would untie them; tie them as one ``Parameter``. Chains run one after another warn (once per
    call) when moving parameters get no gradient although the loss changes with them (a reentrant
    ``torch.utils.checkpoint`` after frozen embeddings): they would move by noise and localization alone.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "sample() takes gradients, which torch.inference_mode() does not allow (torch.no_grad() is fine: the "
            "sampler enables gradients itself); call it outside the inference_mode block"
        )
    check_model(model)
    refuse_inference_parameters(model, "sample()")
    check_loader(loader)
    if not callable(callbacks) and isinstance(callbacks, Iterable) and not isinstance(callbacks, str | bytes):
        callbacks = list(callbacks)  # read once (an iterator of callbacks too)
    # before a step-size search or any forward: the callables' signatures; a callback that reads the optimizer
    # runs with chains one after another (batched=None)
    sequential_for_callbacks = check_callables(loss_fn, observables, callbacks, batched, _LOSS_ARGUMENT.get())
    if device is not None:  # a copy of the model on that device (the chains' batches follow the model)
        from .llc import on_device, resolve_device

        model = on_device(model, resolve_device(device, model))
    if not (is_count(noise_coupling) and noise_coupling >= 1):
        raise ValueError(f"noise_coupling must be an int >= 1, got {noise_coupling!r}")
    noise_coupling = int(noise_coupling)
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
        raise TypeError(
            f"optimizer_kwargs={optimizer_kwargs!r} is not valid; give a dict of hyperparameters (e.g. "
            "{'lr': 1e-4, 'nbeta': 10.0, 'localization': 100.0}) or None"
        )
    check_backend(backend)
    if noise_coupling > 1:
        why = [
            f"{name}={value!r}"
            for name, value, bad in (
                ("step_size", "auto", wants_auto(step_size, optimizer_kwargs)),
                ("sampler", sampler or sampling_method, sampler_name(sampler, sampling_method) != "sgld"),
                (
                    "bounding_box",
                    bounding_box or bounding_box_size,
                    (bounding_box or bounding_box_size) is not None,
                ),
                ("batched", False, batched is False),
                ("checkpoint", checkpoint, checkpoint is not None),
            )
            if bad
        ]
        if why:
            raise ValueError(
                f"noise_coupling={noise_coupling} needs batched SGLD at a given step, without a bounding box or a "
                f"checkpoint; got {', '.join(why)}"
            )
    _check_param_dtypes(model)
    _check_shared_memory(model)
    if chains is not None:  # before a step-size search: a call that runs no chain is refused first
        chain_indices(chains)
    if checkpoint is not None:  # before a step-size search or L_n(w*)
        check_checkpoint_file(checkpoint)
    if lr is not None:  # devinterp's name for the step size
        step_size = translate({"step_size": step_size, "lr": lr}, where="the call")["step_size"]
        lr = None
    burnin_rule = is_burnin_rule(num_burnin_steps)
    if burnin_rule:  # chosen after the calibration (which, like the default, sees none given)
        num_burnin_steps = None
    auto_step = calibration = None
    calibrating = wants_auto(step_size, optimizer_kwargs)
    check_auto_step_options(auto_step_options, calibrating)
    if calibrating:  # "auto" or no step given: calibrate first (sampling.auto)
        # the settings that do not depend on the step checked before the calibration's tens of thousands of
        # chain-steps (a bad value would otherwise surface after them, or as the calibration's own failure)
        _check_settings_before_calibration(loader, locals())
        # the checkpoint's calibration, or the given step its run sampled at ((None, None) without a file)
        stored, given = (None, None) if checkpoint is None else stored_step(checkpoint)
        if given is not None:  # refused before the calibration's work: its run sampled at a given step
            raise io.FingerprintMismatch(
                f"checkpoint {os.fspath(checkpoint)!r} was written by a run at a given step, step_size={given!r}; "
                "this call calibrates its step (step_size='auto', or none given): resume with "
                f"step_size={given!r}, or use another checkpoint path, or delete this one to start afresh.",
                path=os.fspath(checkpoint),
                item="step_size",
                stored=given,
                current="auto",
            )
        step_size, auto_step, calibration = calibrate_or_resume(
            model, loader, auto_arguments(locals()), stored, resolve_step_size
        )
    chosen_burnin = False
    if burnin_rule and auto_step is not None:  # as long as the calibrated step needs to relax from w*
        num_burnin_steps, chosen_burnin = calibrated_burnin(auto_step, num_draws, num_steps_bw_draws), True
    if num_burnin_steps is None:  # as the calibration's trials: half the chain-steps burn-in; devinterp's 0
        num_burnin_steps = default_burnin(auto_step is not None, num_draws, num_steps_bw_draws)
    if auto_step is not None and warn_nonstationary and not chosen_burnin:
        _warn_short_burnin(num_burnin_steps, auto_step)
    if sequential_for_callbacks and batched is None:
        batched = False
    plan = make_plan(
        model,
        loader,
        loss_fn=loss_fn or default_loss_fn,
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        hyperparameters=dict(
            step_size=step_size,
            lr=lr,
            nbeta=nbeta,
            temperature=temperature,
            localization=localization,
            weight_decay=weight_decay,
            noise_scale=noise_scale,
            noise_level=noise_level,
            bounding_box=bounding_box,
            bounding_box_size=bounding_box_size,
        ),
        optimizer_kwargs=optimizer_kwargs,
        restrict_to=restrict_to,
        masks=masks,
        runs=runs,
        observables=observables,
        callbacks=callbacks,
        seed=seed,
        init_loss=init_loss,
        num_init_loss_batches=num_init_loss_batches,
        batched=batched,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        quiet=quiet,
        backend=backend,
        warn_nonstationary=warn_nonstationary,
        record_observables=record_observables,
        cores=cores,
        grad_accum_steps=grad_accum_steps,
        chains=chains,
        checkpoint_state=checkpoint_state,
        sampler=sampler,
        sampling_method=sampling_method,
    )
    if noise_coupling != 1:
        plan = dataclasses.replace(plan, noise_coupling=noise_coupling, batched=True)
    if (
        auto_step is None and _STEP_CALIBRATED_BY_CALLER.get()
    ):  # a step the caller calibrated (susceptibilities)
        plan = dataclasses.replace(plan, calibrated=True)
    if calibration is not None:
        plan = dataclasses.replace(plan, calibration=calibration)
    with _eval_mode_for_dropout(model), buffers_kept(model):
        if auto_step is None:
            return _sample(plan, model, loader)
        out = with_auto_report(_sample_auto(plan, model, loader, auto_step, chosen_burnin), auto_step)
    calibration = _Calibration()  # the runs of the call share one calibration: its warnings come once
    for res in out if isinstance(out, list) else [out]:
        res._calibration = calibration
    return out


class _Calibration:
    """One step calibration, shared by the results of the sampler call that made it (one per run with
    ``runs=``): the LLC estimators warn of its bias once for all of them."""

    def __init__(self) -> None:
        self.bias_warned = False


def calibration_of(res) -> _Calibration | None:
    """The calibration a result of :func:`sample` was run at (shared by the results of one call), None for a
    given step or a result made otherwise (read from a file)."""
    return getattr(res, "_calibration", None)


def _run_names(n: int) -> list[str | None]:
    """The names of a call's ``n`` runs where the caller names them (:func:`naming_runs`: the names their
    diagnostic warnings begin with): ``names[r]`` for run ``r``, one name for every run, else None."""
    state = _RUN_NAMES.get()
    names = state.names if state is not None else ()
    if len(names) == 1:
        return [names[0]] * n
    return [names[r] if r < len(names) else None for r in range(n)]


def run_name(res) -> str | None:
    """The name the run of a result of :func:`sample` had where the caller named its runs
    (:func:`~pypattern.sampling.diagnostics.naming_runs`: the name its diagnostic warnings began with), else
    None."""
    return getattr(res, "_run_name", None)


_SAMPLER_LABEL = {"sgld": "SGLD", "sgnht": "SGNHT", "rmsprop_sgld": "RMSprop-SGLD"}  # progress bars


def _unlocalized_hint(plan: RunPlan) -> str:
    """What a non-stationarity warning adds for a run without localization (the likeliest cause of a drift)."""
    if float(plan.hyper.get("localization") or 0.0) != 0.0:
        return ""
    return (
        " With localization=0 nothing holds the chains near w*: along the loss's flat directions they drift, and "
        "the estimate grows with the run; give localization (e.g. localization=100, as the README's examples do)."
    )


def default_burnin(calibrated: bool, num_draws, num_steps_bw_draws) -> int:
    """``num_burnin_steps`` when none is given: the draws' steps for a calibrated step, 0 for a given one (the
    counts are checked as the run's, a count that is not a positive int left for that check to name)."""
    if not calibrated or isinstance(num_draws, bool) or isinstance(num_steps_bw_draws, bool):
        return 0
    try:
        draws, every = operator.index(num_draws), operator.index(num_steps_bw_draws)
    except TypeError:
        return 0
    return draws * every if draws > 0 and every > 0 else 0


def is_sample_default(name: str, value) -> bool:
    """Whether ``value`` is :func:`sample`'s default for its argument ``name`` (a number, string, bool or None):
    fingerprints leave such values out, so that giving a default explicitly is the same run as leaving it out."""
    p = inspect.signature(sample).parameters.get(name)
    if p is None or p.default is inspect.Parameter.empty:
        return False
    simple = (numbers.Number, str, type(None))
    if not (isinstance(value, simple) and isinstance(p.default, simple)):
        return False
    if isinstance(value, bool) != isinstance(p.default, bool):
        return False
    return value == p.default


def is_burnin_rule(num_burnin_steps) -> bool:
    """Whether ``num_burnin_steps`` asks for the calibrated step's rule (``"auto"``, :func:`calibrated_burnin`);
    another string is refused by name (a count or None is left for the run's own check)."""
    if not isinstance(num_burnin_steps, str):
        return False
    if num_burnin_steps != "auto":
        raise ValueError(
            f"num_burnin_steps={num_burnin_steps!r} is not valid; give an int >= 0, None (the default) or 'auto'"
        )
    return True


def calibrated_burnin(report, num_draws: int, num_steps_bw_draws: int = 1) -> int:
    """The burn-in of a run of ``num_draws`` draws (every ``num_steps_bw_draws`` steps) at the step the
    calibration ``report`` chose, by the rule of ``num_burnin_steps="auto"``: as long as that step needs for the
    chains to relax from ``w*`` along the flattest direction (:func:`~pypattern.sampling.auto.burnin_for_run`), and
    no shorter than the burn-in the calibration judged the step with (:func:`_trial_burnin`). Recorded in
    ``report.burnin`` (the result's ``config["auto_step"]["burnin"]``)."""
    rule = burnin_for_run(report, num_draws, num_steps_bw_draws)
    trial = _trial_burnin(report)
    if trial > rule["num_burnin_steps"]:
        rule["num_burnin_steps"] = trial
        rule["reason"] += f"; raised to the {trial} steps of burn-in the calibration judged the step with"
    report.burnin = rule
    return int(rule["num_burnin_steps"])


def _trial_burnin(report) -> int:
    """The burn-in the calibration ``report`` judged its chosen step with: half the steps of its shortest trial
    there, and no more than half of one unit of trial (``calibration_steps``: a longer run lets the calibration
    run longer trials, which must not ask the run for a longer burn-in in turn); 0 without a chosen step."""
    chosen = getattr(report, "chosen", None)
    steps = [
        int(n)
        for eps, n in zip(
            getattr(report, "step_size", ()) or (), getattr(report, "num_steps", ()) or (), strict=False
        )
        if chosen is not None and eps == chosen and isinstance(n, numbers.Integral | float) and n > 0
    ]
    unit = (getattr(report, "settings", None) or {}).get("calibration_steps")
    if isinstance(unit, numbers.Integral) and unit > 0:
        steps.append(int(unit))
    return min(steps) // 2 if steps and chosen is not None else 0


def _warn_short_burnin(num_burnin_steps, report) -> None:
    """Warn (:class:`NonStationaryWarning`) when a run at a calibrated step burns in for fewer steps than the
    calibration's trials at that step did (:func:`_trial_burnin`): the calibration judged the step by draws taken
    after that burn-in, and chains started at ``w*`` need about as long to relax; a run of a few draws (the default
    burn-in is the draws' steps: one step for ``num_draws=1``) would draw before they did (an estimate of
    0.14 +- 0.22 for a regular model of learning coefficient 1)."""
    need = _trial_burnin(report)
    if not is_count(num_burnin_steps) or int(num_burnin_steps) >= need:
        return
    warnings.warn(
        f"num_burnin_steps={int(num_burnin_steps)} is shorter than the {need} steps of burn-in the calibration "
        f"judged step_size={report.chosen:.3g} with: the chains, started at w*, may not have relaxed before their "
        f"draws, and the estimate then falls short. Give num_burnin_steps={need} (or more draws: the default "
        "burn-in is as many steps as the draws take)",
        NonStationaryWarning,
        stacklevel=user_stacklevel(),
    )


#: set (:func:`step_calibrated_by_caller`) while an estimator runs :func:`sample` at a step it calibrated itself
#: (``susceptibilities`` and ``bif`` calibrate once for all their runs): the runs' plans count as calibrated, so
#: the checks of a given step (its bias, its relaxation) are not made on a step the calibration chose
_STEP_CALIBRATED_BY_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pypattern_step_calibrated_by_caller", default=False
)


@contextlib.contextmanager
def step_calibrated_by_caller(calibrated: bool = True):
    """Within the block, :func:`sample` takes a numeric step as the caller's calibrated one (see
    :data:`_STEP_CALIBRATED_BY_CALLER`)."""
    token = _STEP_CALIBRATED_BY_CALLER.set(bool(calibrated))
    try:
        yield
    finally:
        _STEP_CALIBRATED_BY_CALLER.reset(token)


AUTO_RUN_HALVINGS = 3  # reruns of a run whose calibrated step ran away, each at half the step


def _sample_auto(plan: RunPlan, model: nn.Module, loader, report, chosen_burnin: bool = False):
    """The run at a calibrated step, run again at half the step when it runs away (:func:`rerun_at_half_step`);
    a burn-in chosen for the step by the rule of ``num_burnin_steps="auto"`` (``chosen_burnin``) is chosen again
    for the halved step (:func:`calibrated_burnin`: the flattest direction relaxes half as fast per step).

    A trial cannot see a rare instability that a run of many more chain-steps meets (the module docstring of
    :mod:`pypattern.sampling.auto`): the run itself is the longest trial. Not rerun (the error propagates as with
    a given step): a run with a checkpoint (its file holds the diverged run's draws) or with callbacks that
    cannot start over (every callback must have a ``reset()`` method, called before the rerun)."""
    callbacks = list(plan.callbacks or ())
    first = float(plan.hyper["step_size"])

    def run(step: float):
        burnin = plan.num_burnin_steps
        if step != first:
            for cb in callbacks:
                cb.reset()
            if chosen_burnin:  # (rerun_at_half_step set report.chosen to the step)
                burnin = calibrated_burnin(report, plan.num_draws, plan.num_steps_bw_draws)
        return _sample(
            dataclasses.replace(
                plan, hyper={**plan.hyper, "step_size": step}, calibrated=True, num_burnin_steps=burnin
            ),
            model,
            loader,
        )

    can_rerun = plan.checkpoint is None and all(callable(getattr(cb, "reset", None)) for cb in callbacks)
    return rerun_at_half_step(run, first, report, can_rerun=can_rerun)


def rerun_at_half_step(run: Callable[[float], Any], step: float, report, *, can_rerun: bool = True):
    """``run(step)``; a run that diverges or runs away (:class:`SamplingDivergedError`) is run again from the
    start at half the step, at most ``AUTO_RUN_HALVINGS`` times, each recorded in the calibration's ``report``
    (``reruns``, ``chosen``, ``reason``) and warned about. With ``can_rerun=False`` the error propagates."""
    for k in range(AUTO_RUN_HALVINGS + 1):
        try:
            return run(step)
        except SamplingDivergedError as e:
            if not can_rerun or k == AUTO_RUN_HALVINGS or isinstance(e, NonFiniteLossError):
                raise
            old, step = step, step / 2
            report.reruns.append(
                dict(step_size=old, chain=int(e.chain), draw=int(e.draw), step=int(e.step), message=str(e))
            )
            report.chosen = step
            report.reason += (
                f"; the run at {old:.3g} diverged or ran away (chain {e.chain}, step {e.step}: an excursion the "
                f"trials did not meet) and was run again from the start at {step:.3g}"
            )
            warnings.warn(
                f"step_size='auto': the run at the calibrated step {old:.3g} diverged or ran away (chain "
                f"{e.chain}, step {e.step}), an instability too rare for the calibration trials; running it "
                f"again at {step:.3g}",
                stacklevel=user_stacklevel(),
            )
    raise AssertionError("unreachable")


def _check_param_dtypes(model: nn.Module) -> None:
    """Refuse a model whose moving parameters are not float32 or float64 (the samplers' kernels), naming the
    first such parameter, before anything runs."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"model parameter {name!r} has dtype {p.dtype}; the samplers move float32 and float64 parameters "
                "only: sample a float32 copy (model.float(), or pypattern.from_hf(model, dtype=torch.float32) for "
                "a Hugging Face model)"
            )


def _check_shared_memory(model: nn.Module) -> None:
    """Refuse two distinct parameters that share memory, one of them moving (``lm_head.weight =
    nn.Parameter(embed.weight)``: tied in memory, two tensors to ``named_parameters``). The chains run on copies
    (``copy.deepcopy`` gives each parameter its own memory; the batched chains stack each name apart), which would
    untie them: the run would sample another model, with the tied tensor's entries twice, each copy with its
    part of the gradient. Tied weights are one ``Parameter`` (listed once), which is sampled once."""
    from ..ops.sgld.op import overlapping_pairs

    named = list(model.named_parameters())
    tensors = [p for _, p in named]
    for j, i, _ in overlapping_pairs(tensors):
        if not (tensors[i].requires_grad or tensors[j].requires_grad):
            continue
        a, b = named[j][0], named[i][0]
        raise ValueError(
            f"model parameters {a!r} and {b!r} are two Parameters sharing memory (tied with nn.Parameter(...) "
            "around the other's tensor): the sampler's copies of the model would untie them and sample a "
            f"different model. Tie them as one Parameter (e.g. model.{b} = model.{a}, as Hugging Face's "
            "tie_weights() does), or give one its own memory"
        )


def _eval_mode_for_dropout(model: nn.Module):
    """Eval mode for the run when the model is in training mode with dropout (or another random part: layer drop,
    router jitter; restored afterwards, with a warning): it would make the draws random beyond the seed and a resume
    inexact."""
    return eval_mode_if_random(
        model, "the sampler runs it (deterministic draws, exact resume)", stacklevel=user_stacklevel(1)
    )


# torch's UserWarning for an operator without a batching rule under vmap (it then runs one chain at a time)
_NO_BATCHING_RULE = r"There is a performance drop because we have not yet implemented the batching rule for "


@contextlib.contextmanager
def _quiet_vmap_fallback():
    """Leaves out torch's warning that an operator has no batching rule under ``torch.func.vmap`` while the
    chains run: vmap then runs that operator chain by chain, with the same values (Hugging Face's default
    ``sdpa`` attention on the CPU, ``aten::_scaled_dot_product_flash_attention_for_cpu``, is one). torch gives it
    at every call, and each trial of ``step_size="auto"`` would show it again; nothing in it is the user's to act
    on. Entered in the calling thread, around the groups' threads; other warnings are shown as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE, category=UserWarning)
        yield


def _sample(plan: RunPlan, model: nn.Module, loader: Iterable) -> SampleResult | list[SampleResult]:
    """The run of ``plan``; its diagnostics warn (``warn_nonstationary``), a given step's (``plan.calibrated``
    False) relaxation from ``w*`` included and its discretisation bias (:class:`_GivenStepChecks`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    w_star = {n: p.detach().clone() for n, p in model.named_parameters()}
    data_cache: dict = {}
    fingerprint = None
    if plan.checkpoint is not None:
        fingerprint = run_fingerprint(plan, model, loader, w_star, data_cache)
    if plan.checkpoint is not None and os.path.exists(plan.checkpoint):
        st = State.load(plan.checkpoint, plan, fingerprint, device, w_star)
    else:
        st = State(plan.num_total_chains, plan.num_draws)
    st.calibration = plan.calibration
    # the loss function's argument, which errors name: read here, as the chains' threads (cores > 1) do not see
    # the caller's context
    argument = _LOSS_ARGUMENT.get()
    if st.init_losses is None:
        st.init_losses = _init_losses(plan, model, loader, device, data_cache, argument)
    init_se = (
        0.0
        if plan.init_loss is not None
        else init_loss_standard_error(st.init_losses, _init_epoch_batches(plan, loader, len(st.init_losses)))
    )

    mine = plan.mine()
    total = plan.total_steps
    pbar = None
    remaining = int(sum(total - int(st.next_step[g]) for g in mine if st.done[g] < plan.num_draws))
    if not plan.quiet and remaining:
        from .._progress import open_bar

        # shown after two seconds, as the library's other bars (a short run writes nothing); in a log (no
        # terminal, no notebook) a first line then and one every 30 s, not two a second
        pbar = open_bar(
            total=remaining, desc=_SAMPLER_LABEL.get(plan.sampler, plan.sampler), unit="step", mininterval=0.5
        )
    ctx = RunContext(
        plan=plan,
        model=model,
        loader=loader,
        w_star=w_star,
        state=st,
        fingerprint=fingerprint,
        device=device,
        split_loss=split_loss if argument == "loss_fn" else functools.partial(split_loss, argument=argument),
        init_loss=float(np.mean(st.init_losses)),
        data_cache=data_cache,
        loss_argument=argument,
        pbar=pbar,
        keep_ends=KEPT_END_ELEMENTS
        if _checks_given_step(plan, _SAMPLERS) or _checks_calibrated_bias(plan)
        else 0,
        track_distance=_checks_drift(plan),
    )
    t0 = time.perf_counter()
    ran_batched = False
    try:
        todo = [g for g in mine if st.done[g] < plan.num_draws]
        parts = [todo[i :: plan.cores] for i in range(min(plan.cores, len(todo)))]
        with _quiet_vmap_fallback():
            if len(parts) <= 1:
                ran_batched = _run_part(ctx, todo)
            else:
                with pinned_threads(1):
                    ran_batched = _run_threads(ctx, parts)
    finally:
        st.seconds += time.perf_counter() - t0
        if pbar is not None:
            pbar.close()
    if plan.checkpoint is not None:
        st.save(plan.checkpoint, fingerprint, plan.checkpoint_state)
    results = [_result(plan, st, r, ran_batched, init_se) for r in range(len(plan.runs))]
    for res, name in zip(results, _run_names(len(results)), strict=True):
        res._run_name = name  # for the warnings the estimators give after the call (refined_llc's)
    for r in sorted(ctx.stepped_runs - ctx.read_runs):  # the loss gave none of the run's weights a gradient
        results[r].config["unread"] = True
    # runs read back whole from a checkpoint took no step here: the loss's gradient at w* on the first batch tells
    for r in [r for r in range(len(plan.runs)) if r not in ctx.stepped_runs and _ran_rows(plan, r)]:
        if not _reads_moving(ctx, plan.runs[r].moving):
            results[r].config["unread"] = True
    if plan.warn_nonstationary:
        hint = _unlocalized_hint(plan)
        for r, res in enumerate(results):
            checking_run(r)  # the warnings below name run r where the caller names the runs (naming_runs)
            ran = res.loss_trace[_ran_rows(plan, r)]
            # a drifting trace is reported once: by its R-hat, else its effective sample size, else (a given step)
            # by the relaxation times the run covered; a given step's discretisation bias in any case
            if not len(ran):
                continue
            C = plan.num_chains
            ends = {g: w for g, w in st.ends.items() if r * C <= g < (r + 1) * C}
            checks = _GivenStepChecks(
                plan,
                model,
                loader,
                w_star,
                data_cache,
                argument,
                r,
                ran,
                res.init_loss,
                device,
                st.end_states,
            )
            if _checks_given_step(plan, ("sgld", "rmsprop_sgld")):
                checks.bias(ends)
            elif _checks_calibrated_bias(plan):
                checks.bias(ends, calibrated=True)
            # fewer than 4 draws per chain have no R-hat or ESS, which say nothing then: the relaxation check,
            # which needs neither, still judges a given step (a single draw at w* falls short by its whole value)
            few = ran.shape[-1] < 4 and bool(np.isfinite(ran).all())
            if (
                few or (check_stationarity(ran, hint=hint) and check_mixing(ran, hint=hint))
            ) and _checks_given_step(plan, _SAMPLERS):
                checks.relaxation(ends)
            if _checks_drift(plan):
                gamma, rate = _hold(plan)
                check_drift(
                    st.dist[[r * C + i for i in _ran_rows(plan, r)]],
                    localization=gamma,
                    step_size=float(plan.hyper["step_size"]),
                    hold_steps=1.0 / rate if rate > 0 else None,
                )
    return results if plan.several_runs else results[0]


def _reads_moving(ctx: RunContext, moving: Sequence[str]) -> bool:
    """Whether the loss at ``w*`` on chain 0's first batch gives one of the tensors ``moving`` a gradient (or
    ``moving`` is every trainable parameter, or the check cannot run: then they count as read)."""
    params = dict(ctx.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if len(moving) >= len(trainable):
        return True
    try:
        batch = to_device(ChainData(ctx.loader, ctx.plan.key(0, stream=1), ctx.data_cache).next(), ctx.device)
        with torch.enable_grad(), buffers_kept(ctx.model):
            loss = ctx.split_loss(ctx.plan.loss_fn(ctx.model, batch))
            if not loss.requires_grad:
                return False
            grads = torch.autograd.grad(loss, [params[n] for n in moving], allow_unused=True)
    except Exception:  # noqa: BLE001 - only decides whether the run is reported unread
        return True
    return any(g is not None for g in grads)


def _gamma(plan: RunPlan) -> float:
    """What pulls a run's chains towards ``w*``: ``localization + weight_decay`` (each taken as 0 when unset)."""
    hyper = plan.hyper
    return max(0.0, float(hyper.get("localization") or 0.0)) + max(
        0.0, float(hyper.get("weight_decay") or 0.0)
    )


def _rms_eps(plan: RunPlan) -> float:
    """RMSprop-SGLD's own ``eps`` (default 0.1): its preconditioner ``1 / (sqrt(V) + eps)`` is at most ``1 / eps``."""
    return float(plan.sampler_hyper.get("eps") or 0.1)


def _step_speed(plan: RunPlan) -> float:
    """The largest factor SGLD's (1) or RMSprop-SGLD's preconditioner (``1 / eps``) multiplies the step by."""
    return 1.0 if plan.sampler == "sgld" else 1.0 / _rms_eps(plan)


def _draw_steps(plan: RunPlan) -> np.ndarray:
    """The steps of a run's draws from ``w*`` (each draw's loss is that before its step's update)."""
    return plan.num_burnin_steps + plan.num_steps_bw_draws * np.arange(plan.num_draws)


def _hold(plan: RunPlan) -> tuple[float, float]:
    """``(gamma, rate)``: what holds a run's chains near ``w*`` (``localization + weight_decay``) and the fastest
    rate per step at which it can relax a direction it alone holds: ``eps gamma / 2`` for SGLD, times the largest
    factor RMSprop-SGLD's preconditioner multiplies the step by (``1 / eps`` of its own, default 0.1), and
    ``sqrt(eps gamma)`` for SGNHT (a damped oscillator of that curvature relaxes no faster than critically damped,
    at its frequency; ``p`` moves ``w`` by a step of ``sqrt(eps)`` units of time)."""
    gamma, eps = _gamma(plan), float(plan.hyper["step_size"])
    if plan.sampler == "sgnht":
        return gamma, math.sqrt(eps * gamma)
    return gamma, _step_speed(plan) * eps * gamma / 2


#: the relaxation times of a direction held by the localization alone over a run (its rate from :func:`_hold` times
#: the run's steps) below which the localization does not hold the chains within the run: the drift it lets through
#: between the first and last quarters of the draws is then at least 90% of free diffusion's
#: (an Ornstein-Uhlenbeck direction from ``w*`` after a burn-in as long as the draws: 1.61-fold against 1.67)
WEAK_HOLD = 0.1


def _checks_drift(plan: RunPlan) -> bool:
    """Whether a run's chains are checked for drift away from ``w*`` (:func:`~.diagnostics.check_drift`): nothing
    holds them within the run (no ``bounding_box``, and ``localization`` plus ``weight_decay`` 0 or so weak that
    the flattest directions relax over fewer than :data:`WEAK_HOLD` relaxation times in the run's steps, at the
    fastest rate of :func:`_hold`: ``localization=1e-6`` drifts as none does), and the draws start after as much
    burn-in as they take (a calibrated step's default, which its trials judged the relaxation from ``w*`` with: the
    distance's rise over earlier draws would be that relaxation), diagnostics on, not a coupled run. A stronger
    localization is not checked: its chains still relaxing from ``w*`` raise ``|w - w*|^2`` as drifting ones do
    (the deep linear network (4, 3, 8) at localization 1, 0.5 relaxation times: the check fired with the estimate
    within 2% of its learning coefficient)."""
    hyper = plan.hyper
    if not (plan.warn_nonstationary and plan.noise_coupling == 1 and hyper.get("bounding_box") is None):
        return False
    if not (plan.calibrated or plan.num_burnin_steps >= plan.num_draws * plan.num_steps_bw_draws):
        return False
    gamma, rate = _hold(plan)
    return rate * plan.total_steps < WEAK_HOLD


def _checks_calibrated_bias(plan: RunPlan) -> bool:
    """Whether an SGLD run at a calibrated step has its discretisation bias checked as a given step's is: where
    nothing holds its chains within the run (:func:`_checks_drift`). The calibration's halving test assumes that
    the chains sample one posterior at every step, whose estimate changes linearly with the step; unheld, they go
    where the loss's curvature is as large as the step allows (a deep linear network of rank 0 without
    localization: out along its flat directions to ``eps * curvature`` of order 1), so a step and its half give
    the same, biased, estimate (12 against the learning coefficient 6) and the drift stops (the trace is
    stationary there)."""
    return plan.calibrated and plan.sampler == "sgld" and plan.num_draws > 0 and _checks_drift(plan)


#: the samplers whose given step is checked (its relaxation from ``w*`` and its discretisation bias)
_SAMPLERS = ("sgld", "sgnht", "rmsprop_sgld")

#: the most elements of the chains' last weights a run at a given step keeps for its bias check (64 MB of float32)
KEPT_END_ELEMENTS = 1 << 24


def _checks_given_step(plan: RunPlan, samplers: tuple[str, ...] = ("sgld",)) -> bool:
    """Whether a run's given step is checked (:class:`_GivenStepChecks`): one of ``samplers`` at a given step, not
    a coupled run, with its diagnostics on."""
    return (
        plan.warn_nonstationary
        and not plan.calibrated
        and plan.sampler in samplers
        and plan.noise_coupling == 1
        and plan.num_draws > 0
    )


class _GivenStepChecks:
    """The checks of an SGLD run at a given step (``plan.calibrated`` False), run ``r`` of ``plan``: whether its
    chains relaxed from ``w*`` (:meth:`relaxation`) and whether its step is small enough for its discretisation
    bias (:meth:`bias`). Their curvatures are measured by :func:`_mean_curvature` (three forwards on one batch per
    point)."""

    def __init__(
        self, plan, model, loader, w_star, data_cache, argument, r, trace, init_loss, device, end_states=None
    ):
        self.plan, self.model, self.loader, self.w_star = plan, model, loader, w_star
        self.end_states = end_states or {}
        self.data_cache, self.argument, self.device = data_cache, argument, device
        hyper = plan.hyper
        self.eps, self.nbeta = float(hyper["step_size"]), float(hyper["nbeta"])
        self.gamma = _gamma(plan)
        self.draw_steps = _draw_steps(plan)
        self.noise = float(hyper.get("noise_scale") or 1.0)
        self.run = plan.runs[r]
        params = dict(model.named_parameters())
        masks = self.run.masks or {}
        self.d = sum(
            int(masks[n].count_nonzero()) if n in masks else params[n].numel() for n in self.run.moving
        )
        self.llc = self.nbeta * (float(np.mean(trace)) - float(init_loss))
        self.usable = bool(self.d and math.isfinite(self.eps) and self.eps > 0 and plan.total_steps > 0)
        # the curvatures measured (_probed), keyed by ("ends" or "w*", preconditioned)
        self._measured: dict = {}

    def end_curvature(
        self, ends: Mapping[int, Mapping[str, torch.Tensor]], preconditioned: bool = False
    ) -> float | None:
        """``tr(H) / d`` where the chains are: the mean of Hutchinson's estimates at the chains' last weights
        ``ends`` (at least :data:`BIAS_PROBES` probes, taken in turn over the chains; at ``w*`` when none was
        kept), by central differences over about one step's noise, ``sqrt(step_size)``; None when it cannot be
        measured, or when its forwards would exceed :data:`CHECK_SHARE` of the run's. Measured once.
        ``preconditioned``: ``tr(P H) / d`` with RMSprop-SGLD's preconditioner ``P`` at each chain's end (probes
        ``P^(1/2) u``; None when no chain's running means were kept)."""
        return self._probed(("ends", preconditioned), ends, list(ends.values()) or [None], preconditioned)

    def w_star_curvature(
        self, ends: Mapping[int, Mapping[str, torch.Tensor]], preconditioned: bool = False
    ) -> float | None:
        """``tr(H) / d`` at ``w*`` (``tr(P H) / d`` with the preconditioners at the chains' ends when
        ``preconditioned``), measured as :meth:`end_curvature` measures it at the ends; None when it cannot be (or
        when the chains' ends were not kept: :meth:`end_curvature` is then at ``w*`` already)."""
        if not ends:
            return None
        return self._probed(("w*", preconditioned), ends, [None], preconditioned)

    def _probed(
        self, key, ends: Mapping[int, Mapping[str, torch.Tensor]], centers: list, preconditioned: bool
    ) -> float | None:
        """The mean of Hutchinson's estimates of ``tr(H) / d`` at ``centers`` (None: ``w*``), at least
        :data:`BIAS_PROBES` probes taken in turn over them (``preconditioned``: scaled by the preconditioners at the
        chains' ``ends``, in turn); cached under ``key``. None when a preconditioner is missing, a probe fails, or
        the probes' forwards would exceed :data:`CHECK_SHARE` of the run's."""
        if key not in self._measured:
            self._measured[key] = None
            scales: list = [None]
            if preconditioned:
                scales = [self._state_of_end(g) for g in ends]
                if not ends or any(v is None for v in scales):
                    return None
            n = max(BIAS_PROBES, len(centers))
            # three forwards per probe: skipped (None) where they would cost more than a tenth of the run's own
            # forwards (a short run, whose estimate is too noisy for its bias to be read anyway)
            if 3 * n > CHECK_SHARE * self.plan.total_steps * self.plan.num_chains:
                return None
            spread = math.sqrt(self.eps) * self.noise
            kappas = []
            for k in range(n):
                kappa = self.curvature(
                    spread, center=centers[k % len(centers)], probe=k, scale=scales[k % len(scales)]
                )
                if kappa is None:
                    return None
                kappas.append(kappa)
            self._measured[key] = float(np.mean(kappas))
        return self._measured[key]

    def _state_of_end(self, g: int) -> dict[str, torch.Tensor] | None:
        """RMSprop-SGLD's preconditioner ``P^(1/2)`` per moving tensor at chain ``g``'s end, or None."""
        st = self.end_states.get(g)
        if not st:
            return None
        rms_eps = _rms_eps(self.plan)
        out = {}
        for n in self.run.moving:
            v = st.get(f"square_avg/{n}")
            if v is None:
                return None
            out[n] = (v.sqrt() + rms_eps).reciprocal().sqrt()
        return out

    def curvature(self, spread: float, center=None, probe: int = 0, scale=None) -> float | None:
        return _mean_curvature(
            self.plan,
            self.model,
            self.loader,
            self.w_star,
            self.data_cache,
            self.argument,
            self.run,
            self.device,
            spread,
            center=center,
            probe=probe,
            scale=scale,
        )

    def relaxation(self, ends: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Warn when the draws fall short of their stationary value by more than
        :data:`~pypattern.sampling.diagnostics.MAX_SHORTFALL` along a typical direction, the chains not yet relaxed
        from ``w*`` by the draws' steps (:func:`~pypattern.sampling.diagnostics.check_relaxation`; the reasoning of
        ``step_size="auto"``, module :mod:`pypattern.sampling.auto`, "Relaxation", applied to the step given). Free
        when the step's bounds (:func:`~pypattern.sampling.diagnostics.relaxation_bounds`) already show enough
        relaxation; otherwise the mean curvature of ``nbeta L + gamma |w - w*|^2 / 2`` is measured, at ``w*`` and
        at the chains' last weights ``ends`` (:meth:`end_curvature`), and the larger taken: at a singular ``w*``
        (the origin of a normal crossing or of a deep linear network of rank 0) the loss is flat and the curvature
        the chains relax at is where they go (there, at ``w*`` alone, steps 1e-3 to 2.5e-3 warned of a shortfall
        of 10-25% while their estimates were within 5% of the truth).

        RMSprop-SGLD's preconditioner ``1 / (sqrt(V) + eps)`` multiplies the step by at most ``1 / eps`` (its
        ``eps``, default 0.1): its rate is taken at that most, so that a warning is certain (the draws fall short
        at least by what it says); the bounds' free pass, which assumes the step as given, does not apply."""
        plan = self.plan
        if not self.usable:
            return
        if plan.sampler == "sgnht":
            self._sgnht_relaxation(ends)
            return
        eps, steps = self.eps, plan.total_steps
        speed = _step_speed(plan)
        mean_step = plan.num_burnin_steps + plan.num_steps_bw_draws * (plan.num_draws - 1) / 2
        flat, typical = relaxation_bounds(
            self.llc,
            step_size=eps,
            gamma=self.gamma,
            num_params=self.d,
            total_steps=steps,
            mean_draw_step=mean_step,
            noise_scale=self.noise,
        )
        # the bounds' relaxation rates are lower bounds: a shortfall they leave small is smaller still
        if speed == 1.0 and draw_shortfall(max(flat, typical) / steps, self.draw_steps) <= MAX_SHORTFALL:
            return
        curvature = self._held_curvature(math.sqrt(speed * eps * steps) * self.noise, ends)
        if curvature is None:
            return
        check_relaxation(
            speed * eps * curvature / 2,
            self.draw_steps,
            step_size=eps,
            llc_mean=self.llc,
            curvature=curvature,
        )

    def _held_curvature(
        self, distance: float, ends: Mapping[int, Mapping[str, torch.Tensor]]
    ) -> float | None:
        """The curvature that holds the chains: ``nbeta`` times the loss's mean curvature (:meth:`curvature` over
        ``distance`` from ``w*``, or at the chains' ends where that is larger) plus the localization; None when it
        cannot be measured."""
        kappa = self.curvature(distance)
        if kappa is None:
            return None
        if ends:
            kappa = max(kappa, self.end_curvature(ends) or kappa)
        return self.nbeta * max(kappa, 0.0) + self.gamma

    def _sgnht_relaxation(self, ends: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """:meth:`relaxation` for SGNHT. Its update ``p <- (1 - xi) p - eps grad U + noise``, ``w <- w + p`` is
        underdamped Langevin dynamics with a time step ``sqrt(eps)`` (``p / sqrt(eps)`` the velocity, friction ``xi /
        sqrt(eps)``): along a direction of curvature ``c`` a damped oscillator of frequency ``sqrt(c)``, which
        approaches its stationary spread from ``w*`` no faster than when critically damped, at ``sqrt(c)`` per unit
        of time, ``sqrt(eps c)`` per step. The draws' shortfall at that rate is the least they can have, whatever
        the thermostat's friction: a warning is certain. It assumes the thermostat does not heat the chains beyond
        its equilibrium (``xi >= 0``; the momenta start at their stationary size, ``sqrt(eps) noise_scale``). The
        curvature is measured as :meth:`relaxation` does, over the distance the momenta carry the chains in the run
        (``sqrt(eps) noise_scale`` per step)."""
        plan = self.plan
        eps, steps = self.eps, plan.total_steps
        curvature = self._held_curvature(math.sqrt(eps) * steps * self.noise, ends)
        if curvature is None:
            return
        check_relaxation(
            math.sqrt(eps * curvature), self.draw_steps, step_size=eps, llc_mean=self.llc, curvature=curvature
        )

    def bias(self, ends: Mapping[int, Mapping[str, torch.Tensor]], calibrated: bool = False) -> None:
        """Warn when the discretisation bias of the step, estimated from the trace of the loss's Hessian where the
        chains are (:meth:`end_curvature` at their last weights ``ends``) or at ``w*`` (:meth:`w_star_curvature`),
        whichever is larger, exceeds
        :data:`~pypattern.sampling.diagnostics.MAX_STEP_BIAS` of the estimate. ``calibrated``: a calibrated SGLD
        step on a run nothing holds (:func:`_checks_calibrated_bias`), whose warning says so.

        SGLD: :func:`~pypattern.sampling.diagnostics.step_bias`. RMSprop-SGLD: the same with ``tr(P H)`` for
        ``tr(H)``, ``P`` its preconditioner ``1 / (sqrt(V) + eps)`` at the chains' last running means ``V``: on a
        quadratic its update is SGLD in ``z = P^(-1/2) (w - w*)`` on the Hessian ``P^(1/2) H P^(1/2)``, whose
        estimate ``nbeta z^T P^(1/2) H P^(1/2) z / 2`` is the same, so the bias of :func:`step_bias` carries over
        with that trace (it assumes ``P`` constant over the draws: ``V`` averages the squared gradients over about
        ``1 / (1 - alpha)`` = 100 steps; and, as devinterp's, the update leaves out the correction term of a
        varying ``P``). Measured on a regular model (``y = W x``, ``W`` 2x3, ``nbeta`` 1000): at step 1e-4 the
        estimate was 24% high and the check said 22%.

        SGNHT is not checked. On a quadratic its thermostat holds the mean kinetic energy over the parameters at
        ``eps sigma^2``, and the configurational temperature of a direction of curvature ``c`` is proportional to
        ``1 / (4 - 2 xi - eps c)``: a regular model whose directions all carry their ``1/2`` is unbiased at any
        stable step (measured at 1e-3, where SGLD is 33% high: -6%), and the bias comes from the spread of the
        curvatures only, to first order ``eps (c_eff - c_mean) / 4``. On the deep linear network (4, 3, 8) at rank
        0 (``nbeta`` 100, localization 1) that read +10% to +11% at step 7e-3, where the estimate was +1% to +4%
        (at 1e-2, near divergence: +10%): a singular model's chains move between stiff and flat directions, which
        evens out the temperatures, and a warning on it would be false."""
        if not self.usable or not (self.llc > 0 and math.isfinite(self.llc)):
            return
        plan = self.plan
        pre = plan.sampler == "rmsprop_sgld"
        kappa = self.end_curvature(ends, preconditioned=pre)
        if kappa is None:
            return
        # where a too-large step has carried the chains off to flatter regions than w*'s, the curvature at their
        # ends understates the bias (measured: SGLD 2e-2 at localization 100 read 7.9% where the estimate was 46%
        # high): the larger of it and the curvature at w*
        at_w_star = self.w_star_curvature(ends, preconditioned=pre)
        if at_w_star is not None:
            kappa = max(kappa, at_w_star)
        trace = kappa * self.d
        curvature = self.noise**2 * self.nbeta * trace / (2 * self.llc) if trace > 0 else 0.0
        bias = step_bias(self.eps, self.nbeta, trace, self.llc, self.noise)
        # the estimate must be a stationary value to have a bias: directions of that curvature must have relaxed by
        # the draws (else the run is too short to judge). The rate is at most that of the curvature holding the
        # chains (nbeta times the loss's curvature, plus the localization): an estimate near 0 from chains that
        # barely moved (a step far too small) would make the curvature read from it, and the rate, huge
        held = self.nbeta * max(kappa, 0.0) + self.gamma
        rate = self.eps * min(curvature, held) / 2
        if draw_shortfall(rate, self.draw_steps) > MAX_SHORTFALL:
            return
        check_step_bias(
            bias,
            step_size=self.eps,
            llc_mean=self.llc,
            curvature=curvature,
            calibrated=calibrated,
            localization=self.gamma,
            sampler=plan.sampler,
        )


#: Hutchinson probes of the Hessian's trace behind a given step's bias check (taken in turn over the chains' ends)
BIAS_PROBES = 4

#: the largest share of a run's own forwards (steps times chains) the end-of-run curvature measurement may add
CHECK_SHARE = 0.1


def _mean_curvature(
    plan: RunPlan,
    model: nn.Module,
    loader: Iterable,
    w_star: Mapping[str, torch.Tensor],
    data_cache: dict,
    argument: str,
    run,
    device: torch.device,
    spread: float,
    center: Mapping[str, torch.Tensor] | None = None,
    probe: int = 0,
    scale: Mapping[str, torch.Tensor] | None = None,
) -> float | None:
    """``tr(H) / d`` of the loss at ``center`` (moving weights; default ``w*``) over the ``d`` moving parameters of
    ``run`` (Hutchinson's estimate along one random sign vector ``u``, by central differences: ``(L(w + h u) + L(w -
    h u) - 2 L(w)) / (h^2 d)``, on the first batch ``L_n(w*)`` reads), or None when it cannot be measured. ``h`` is
    ``spread`` (the distance a coordinate diffuses over the run without drift) at most 5% of the moving weights'
    RMS (at least 1e-3). ``probe`` keys the sign vector. ``scale``: a positive factor per entry of each moving
    tensor ``S`` (RMSprop-SGLD's ``P^(1/2)``), probing along ``S u`` for ``tr(S H S) / d`` (``h`` then divided by
    ``S``'s RMS, so that the probe moves the weights as far). The model's weights are restored to ``w*``."""
    params = dict(model.named_parameters())
    masks = run.masks or {}
    at = {n: (center[n] if center is not None and n in center else w_star[n]) for n in run.moving}
    gen = torch.Generator().manual_seed((int(plan.key(0, stream=2)) + int(probe)) % (2**63))
    dirs: dict[str, torch.Tensor] = {}
    total, d = 0.0, 0
    for n in run.moving:
        p = params[n]
        u = (
            torch.randint(0, 2, tuple(p.shape), generator=gen, dtype=torch.int8).to(
                device=p.device, dtype=p.dtype
            )
            * 2
            - 1
        )
        if n in masks:
            u = u * masks[n].to(device=p.device, dtype=p.dtype)
        d += int(u.count_nonzero())
        if scale is not None:
            u = u * scale[n].to(device=p.device, dtype=p.dtype)
        dirs[n] = u
        total += float(w_star[n].float().pow(2).sum())  # (float32: also on MPS, which has no float64)
    if not d:
        return None
    h = min(float(spread), 0.05 * max(math.sqrt(total / sum(params[n].numel() for n in run.moving)), 0.02))
    if scale is not None:
        rms = math.sqrt(sum(float(u.double().pow(2).sum()) for u in dirs.values()) / d)
        if not (rms > 0 and math.isfinite(rms)):
            return None
        h /= rms
    if not (h > 0 and math.isfinite(h)):
        return None
    try:
        batch = to_device(ChainData(loader, plan.key(0, stream=2), data_cache).next(), device)
        values = []
        with torch.no_grad():
            for sign in (0.0, 1.0, -1.0):
                for n, u in dirs.items():
                    params[n].copy_(at[n] + (sign * h) * u)
                values.append(float(split_loss(plan.loss_fn(model, batch), argument)))
    except (RuntimeError, ValueError, TypeError, StopIteration):
        return None
    finally:
        with torch.no_grad():
            for n in dirs:
                params[n].copy_(w_star[n])
    l0, lp, lm = values
    kappa = (lp + lm - 2 * l0) / (h * h * d)
    return kappa if math.isfinite(kappa) else None


def default_init_loss_batches(plan: RunPlan, num_batches: int | None) -> int:
    """How many batches ``L_n(w*)`` is averaged over by default: the whole epoch, unless its forwards would cost
    more than half the run's chain-steps (then that many, at least ``max(4, num_chains)``); ``max(4,
    num_chains)`` for a loader without a length.

    ``L_n(w*)`` is shared by every chain, so its error is not in the spread over chains: over a few batches of a
    small data set it was the largest error of the estimate (see :func:`init_loss_standard_error`)."""
    floor = max(4, plan.num_chains)
    if num_batches is None:
        return floor
    return min(num_batches, max(floor, plan.num_total_chains * plan.total_steps // 2))


def init_loss_standard_error(init_losses, num_batches: int | None) -> float:
    """Standard error of ``L_n(w*)`` (the mean of ``init_losses``, ``k`` batches of an epoch of ``num_batches``)
    as an estimate of the loss over the whole epoch: ``sd / sqrt(k) * sqrt((N - k) / (N - 1))`` (sampling
    without replacement; ``0`` when the whole epoch was read), ``sd / sqrt(k)`` when ``N`` is unknown, ``nan``
    when it cannot be estimated (one batch of several)."""
    v = np.asarray(init_losses, dtype=np.float64)
    k = len(v)
    if num_batches is not None and k >= num_batches:
        return 0.0
    if k < 2:
        return float("nan")
    se = float(v.std(ddof=1)) / np.sqrt(k)
    if num_batches is not None:
        se *= np.sqrt((num_batches - k) / (num_batches - 1))
    return float(se)


def _warn_if_random(
    value: float, again: Callable[[], float], device: torch.device, training: bool = True
) -> None:
    """Warn when the loss at ``w*`` of the first batch, ``value``, comes out otherwise when computed ``again`` with
    the random number generators seeded afresh: the forward (or the loss function) draws random numbers that the
    run's seed does not key (functional dropout in training mode, a sampled loss), so the same seed does not repeat
    the same draws and a resume is not exact. Dropout modules are found by type and put in eval mode before;
    ``training``: whether some module is still in training mode (the advice differs)."""
    devices = [device] if device.type == "cuda" else []  # the CPU generator is always forked
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        # the generators fork_rng gives back only (torch.manual_seed would reseed every GPU's)
        torch.default_generator.manual_seed(0x5EED)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(0x5EED)
        other = again()
    same = other == value if device.type == "cpu" else math.isclose(other, value, rel_tol=1e-6, abs_tol=0.0)
    if not same and math.isfinite(value) and math.isfinite(other):
        warnings.warn(
            f"the loss at the initial weights on the first batch was {value!r} and then {other!r}: the model's "
            "forward or the loss function draws random numbers (e.g. torch.nn.functional.dropout in training "
            "mode, noise added to the inputs or activations), which the run's seed does not key: the same seed will "
            "not repeat these draws and a resume will not be exact. "
            + (
                "Call model.eval() (or make the forward deterministic) first"
                if training
                else "Make the forward deterministic (the model is in eval mode, and still draws)"
            ),
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _init_epoch_batches(plan: RunPlan, loader, num_read: int) -> int | None:
    """The batches of an epoch of ``loader`` for the standard error of ``L_n(w*)`` read over ``num_read`` of them:
    its length's, else (a loader without a length) ``num_read`` when fewer than the batches asked for were read,
    which happens only when its epoch ended first (:func:`_init_losses`: the whole epoch), else unknown (None)."""
    n = batches_per_epoch(loader)
    if n is not None:
        return n
    return (
        num_read if num_read < (plan.num_init_loss_batches or default_init_loss_batches(plan, None)) else None
    )


def _init_losses(
    plan: RunPlan, model: nn.Module, loader, device, data_cache: dict, argument: str = "loss_fn"
) -> np.ndarray:
    """``L_n(w*)`` on each of its batches: ``init_loss`` if given, else the loss at ``w*`` over
    ``num_init_loss_batches`` batches (default :func:`default_init_loss_batches`; at most one epoch, that of a
    loader without a length too, when it ends first; over a whole
    epoch of a shuffling loader that drops or does not read a ragged last batch, the mean over every row the
    chains read). Errors name the loss function by ``argument``, the argument it came in."""
    if plan.init_loss is not None:
        return np.array([plan.init_loss])
    n = batches_per_epoch(loader)
    k = plan.num_init_loss_batches or default_init_loss_batches(plan, n)
    if n is not None:
        k = min(k, n)
    if k < 1:
        raise ValueError("loader yielded no batch (it has length 0): give a loader with at least one batch")
    stream = ChainData(loader, plan.key(0, stream=2), data_cache)

    def loss_at_w_star(batch) -> float:
        # the library's rule computes the loss (the default, batch_loss passed by name, or a loss function marked
        # by by_default_rule): check the batch, errors naming the argument it came from
        library = reads_by_default_rule(plan.loss_fn, model, batch)
        if library:
            check_batch(model, batch, "loader")
        with errors_naming(model, batch, "loader", library):
            out = plan.loss_fn(model, batch)
        return float(split_loss(out, argument))

    # a shuffling loader that drops a ragged last batch: each epoch leaves other rows out, and the chains read
    # every row over their epochs; L_n(w*) over the whole epoch is the loss over all of them
    rows = rows_dropped_by_shuffle(loader) if n is not None and k >= n else None
    with torch.no_grad():
        if rows is not None:
            # the rows in order, in batches of the loader's size and one smaller last batch, weighted by their
            # rows: each value below is shifted so that their mean is the mean loss over every row (one value per
            # batch of an epoch, k of them)
            cover = covering_batches(loader, rows)
            first = to_device(cover[0], device)
            full = np.array(
                [loss_at_w_star(first)] + [loss_at_w_star(to_device(c, device)) for c in cover[1:-1]]
            )
            r = len(rows) % int(
                loader.batch_sampler.batch_size
            )  # the last batch's rows (the others are full)
            l_r = loss_at_w_star(to_device(cover[-1], device))
            vals = full * ((len(rows) - r) / len(rows)) + l_r * (r / len(rows))
        else:
            first = to_device(stream.next(), device)
            read = [loss_at_w_star(first)]
            for _ in range(k - 1):
                batch = stream.next()
                if n is None and stream.epoch > 0:
                    # a loader without a length ended its epoch before k batches: L_n(w*) over that epoch, each
                    # batch once (a second pass would count its first batches twice, as independent batches)
                    break
                read.append(loss_at_w_star(to_device(batch, device)))
            full = vals = np.array(read)
        # random ops in the forward (dropout in training mode, noise a model adds in eval mode too): one forward
        _warn_if_random(
            float(full[0]), lambda: loss_at_w_star(first), device, any(m.training for m in model.modules())
        )
        if (
            n is not None
            and k >= n
            and ragged_last_batch(loader)
            and stream.it is not None
            and not stream.sequential
        ):
            # the whole epoch of a shuffling loader: the ragged last batch (which chains do not read, but whose
            # samples other epochs' orders put in their read batches) joins L_n(w*), weighted by its samples, so
            # that it is the loss over every sample whatever the order (each value below is shifted so that their
            # mean is that weighted mean). An unshuffled loader's ragged batch holds the same samples in every
            # epoch, which the chains never read: L_n(w*) leaves them out too
            last = next(stream.it, None)
            if last is not None:
                r, b = batch_size_of(last), int(loader.batch_size)
                l_r = loss_at_w_star(to_device(last, device))
                vals = vals * (k * b / (k * b + r)) + l_r * (r / (k * b + r))
    if not np.all(np.isfinite(vals)):
        raise NonFiniteLossError(
            f"loader: the loss at the initial weights w* is not finite ({vals}, one value per batch read): the data "
            "or the model give a non-finite loss before any step (look for NaN or Inf in the batches' tensors and "
            "in the model's weights, run the model's forward on one batch to see whether its own logits are "
            f"finite, e.g. at padded rows, and check {argument})",
            chain=-1,
            draw=-1,
            step=-1,
            step_size=plan.hyper["step_size"],
        )
    return vals


def _ran_rows(plan: RunPlan, r: int) -> list[int]:
    """Run ``r``'s rows whose chains this call ran (all of them unless ``chains`` was given)."""
    C = plan.num_chains
    return [g - r * C for g in plan.mine() if r * C <= g < (r + 1) * C]


def _result(plan: RunPlan, st: State, r: int, ran_batched: bool, init_se: float) -> SampleResult:
    C = plan.num_chains
    rows = slice(r * C, (r + 1) * C)
    loss = st.loss[rows].copy()
    ran = loss[_ran_rows(plan, r)]  # diagnostics over the chains run
    return SampleResult(
        loss_trace=loss,
        init_loss=float(np.mean(st.init_losses)),
        init_losses=np.asarray(st.init_losses, dtype=np.float64),
        init_loss_se=float(init_se),
        observables={k: v[rows].copy() for k, v in st.obs.items()},
        config=dict(
            num_chains=C,
            num_draws=plan.num_draws,
            num_burnin_steps=plan.num_burnin_steps,
            num_steps_bw_draws=plan.num_steps_bw_draws,
            seed=list(plan.seed) if isinstance(plan.seed, tuple) else plan.seed,
            **plan.hyper,
            sampler=plan.sampler,
            **plan.sampler_hyper,
            # a compiled regex as {"regex": its pattern} (a result's config is saved as JSON)
            restrict_to=[
                {"regex": p.pattern} if isinstance(p, re.Pattern) else p for p in plan.runs[r].patterns
            ]
            or None,
        ),
        r_hat=r_hat(ran) if len(ran) else float("nan"),
        ess=ess(ran) if len(ran) else float("nan"),
        seconds=st.seconds,
        batched=ran_batched,
    )


def _check_settings_before_calibration(loader, call: Mapping[str, Any]) -> None:
    """:func:`check_settings` on the arguments of a :func:`sample` call (its ``locals()``) whose step is to be
    calibrated: the checks the run's plan makes that do not depend on the step or the model, with the step left
    out, before the calibration. Warnings are left to the run (the default ``nbeta`` reads the loader's first
    batch, with torch's generator forked: the run reads it again)."""
    names = ("nbeta", "temperature", "localization", "weight_decay", "noise_scale", "noise_level")
    names += ("bounding_box", "bounding_box_size")
    okw = call["optimizer_kwargs"]
    if isinstance(okw, Mapping):  # the step is the calibration's
        okw = {k: v for k, v in okw.items() if DEVINTERP_NAMES.get(k, k) != "step_size"}
    burnin = call["num_burnin_steps"]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_settings(
            loader,
            loss_fn=call["loss_fn"] or default_loss_fn,
            callbacks=call["callbacks"],
            quiet=call["quiet"],
            warn_nonstationary=call["warn_nonstationary"],
            record_observables=call["record_observables"],
            batched=call["batched"],
            num_chains=call["num_chains"],
            num_draws=call["num_draws"],
            num_burnin_steps=0 if burnin is None else burnin,
            num_steps_bw_draws=call["num_steps_bw_draws"],
            checkpoint_every=call["checkpoint_every"],
            cores=call["cores"],
            grad_accum_steps=call["grad_accum_steps"],
            num_init_loss_batches=call["num_init_loss_batches"],
            init_loss=call["init_loss"],
            seed=call["seed"],
            hyperparameters=dict(step_size=None, **{k: call[k] for k in names}),
            optimizer_kwargs=okw,
            sampler=call["sampler"],
            sampling_method=call["sampling_method"],
        )


def batches_by_default(model: nn.Module, num_chains: int) -> bool:
    """Whether ``batched=None`` runs ``num_chains`` chains of ``model`` together (at the same step): more than one
    chain, their stacked parameters at most ``BATCHED_MAX_STACKED``, and at most ``BATCHED_MAX_PARAMS`` parameters
    each, or, on a GPU, at least ``BATCHED_MIN_CHAINS`` chains. On a CPU the vmap-ed step of larger models is
    slower than the chains one after another (bench/bench_batched_chains.py: 0.82-0.87x at 263k parameters, 0.45-0.60x
    at 1.05 million, with 4 to 20 chains)."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if num_chains < 2 or num_chains * n_params > BATCHED_MAX_STACKED:
        return False
    if n_params <= BATCHED_MAX_PARAMS:
        return True
    return num_chains >= BATCHED_MIN_CHAINS and getattr(model_device(model), "type", "cpu") == "cuda"


def fits_batched(model: nn.Module, num_chains: int) -> bool:
    """Whether ``num_chains`` chains of ``model`` stacked stay under ``BATCHED_MAX_STACKED`` parameters (what runs
    that must be batched, such as coupled calibration trials, are allowed)."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return num_chains * n_params <= BATCHED_MAX_STACKED


def _run_part(ctx: RunContext, chains: list[int]) -> bool:
    """Run a group of chains, batched when ``batched`` says so and the model runs under vmap, else one after
    another; whether it ran batched. With ``batched=None``, chains whose batches of a step cannot be stacked (of
    different shapes) go on one after another from that step; ``batched=True`` refuses them (ValueError naming
    ``loader``)."""
    plan, st = ctx.plan, ctx.state
    same_step = len({int(st.next_step[g]) for g in chains}) <= 1
    use_batched = plan.batched
    if use_batched is None:  # decided for the whole run (not the group): cores and ranks give the same draws
        use_batched = same_step and batches_by_default(ctx.model, plan.num_chains * len(plan.runs))
    resume = None
    if use_batched and same_step and chains:
        try:
            run_batched(ctx, chains)
            return True
        except VmapUnsupported as e:
            if plan.batched:
                raise RuntimeError(
                    f"batched=True but the model or {ctx.loss_argument} does not run under vmap: "
                    f"{str(e).rstrip('.')}. Hugging Face models build their attention mask with data-dependent "
                    "code when a batch has an attention_mask; batched=False, or batched left at its default "
                    "(None: automatic), runs them chain by chain"
                ) from e
        except UnstackableBatches as e:
            if plan.batched:
                raise ValueError(
                    f"batched=True but the loader's batches differ between chains: {e}. Batched chains stack "
                    "their batches, which needs one shape for every batch (pad every batch to one length, or "
                    "drop a ragged last batch); give batched=False (or None) to run the chains one after another"
                ) from None
            resume = e.resume  # one after another from the step whose batches differ
        chains = [g for g in chains if st.done[g] < plan.num_draws]
    if chains:
        if plan.noise_coupling > 1:
            raise RuntimeError(
                "noise_coupling > 1 runs chains batched only; "
                + (
                    "the loader's batches of a step differ in shape between chains (pad every batch to one "
                    "length, or drop a ragged last batch)"
                    if resume is not None
                    else "these chains are at different steps"
                )
            )
        run_sequential(ctx, chains, resume=resume)
    return False


def _run_threads(ctx: RunContext, parts: list[list[int]]) -> bool:
    """Run the groups ``parts`` in one thread each; the first error stops the others and is raised here."""
    errors: list[BaseException] = []
    modes: list[bool] = []

    def work(part):
        try:
            modes.append(_run_part(ctx, part))
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread below
            errors.append(e)
            ctx.stop.set()

    threads = [
        threading.Thread(target=work, args=(p,), name=f"pypattern-chains-{i}") for i, p in enumerate(parts)
    ]
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join()
    except BaseException:  # Ctrl-C in the caller: stop the groups at their next step
        ctx.stop.set()
        for th in threads:
            th.join()
        raise
    if errors:
        raise errors[0]
    return any(modes)
