"""A small training loop for the synthetic tasks, with optional per-sample loss weights."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import model_device
from .._training import random_in_training, values_kept_on_error
from ..io import Saveable, register
from ..losses import read_logits
from .base import Task, TaskBatch, count_arg, generator, offset_seed

__all__ = ["train", "TrainResult"]


@register
@dataclass
class TrainResult(Saveable):
    """Losses logged during :func:`train` (``.save(path)`` / ``TrainResult.load(path)``, as every result).

    Attributes
    ----------
    steps : list of int
        The steps at which a loss was logged.
    losses : list of float
        The weighted training loss at those steps.
    """

    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)


def train(
    model: torch.nn.Module,
    task: Task,
    steps: int = 500,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    data: TaskBatch | None = None,
    num_samples: int | None = None,
    sample_weights: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    seed: int = 0,
    log_every: int = 10,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train ``model`` on ``task`` with AdamW.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place.
    task : Task
        Draws the training data (:meth:`Task.sample`) and scores it (:meth:`Task.per_sample_loss`).
    steps : int
        AdamW steps (0: no training).
    batch_size, lr : optional
        Default to the task's ``default_batch_size`` / ``default_lr`` (64 and 3e-3 unless the task says); ``lr``
        is a finite number >= 0.
    data : TaskBatch, optional
        A fixed training set; with ``num_samples`` one is drawn from the task; with neither, every step draws
        a fresh batch (online training).
    weight_decay : float
        AdamW's decoupled weight decay (a finite number >= 0).
    num_samples : int, optional
        Size of a fixed training set drawn from the task (with ``seed + 1``, modulo ``2**64``) when ``data`` is
        not given (with ``data``, only its length is accepted).
    sample_weights : Tensor ``(num_samples,)``, Intervention or callable ``step ->`` either, optional
        Non-negative per-sample loss weights over the fixed training set (an Intervention's ``weights``; requires ``data`` or
        ``num_samples``); normalised to mean 1, the minibatch loss is ``mean(w_i * loss_i)``, an unbiased
        estimate of the re-weighted data distribution's loss. A callable is called at every step (online
        re-weighting).
    seed : int
        Keys the batches drawn from the fixed set or the task, and the fixed set itself.
    log_every : int
        Steps between recorded losses (0: none recorded; the last step is recorded too).
    callback : callable ``(step, model)``, optional
        Called after every step.
    checkpoint : path, optional
        A file (``.npz``, :mod:`pypattern.io`: written atomically, read without pickle) the run's state is written
        to after a step: the model's parameters and buffers, AdamW's state, the step, the logged losses and the
        batch generator's state (with torch's global generator's, for a model whose ``train()`` forward is random,
        such as dropout). It is written every 30 seconds, at the end, and when the run stops after a finished step:
        an exception raised by ``callback`` (its step counts as done), or Ctrl-C or SIGTERM, which let the step
        under way finish and are raised after the write (a second one during that step stops at once, writing
        nothing). If the file exists, the run resumes from it and ends with the same weights and losses, bit for
        bit, as an uninterrupted run; a finished run's file returns its result without training (the model gets
        its final weights). Only the same run resumes: the file holds a fingerprint of the model's architecture
        and its weights and buffers at the call's start, the task (its class and attributes), ``steps``,
        ``batch_size``, ``lr``, ``weight_decay``, ``seed``, ``log_every``, the training set and the sample weights
        (a callable's code and what it captures); a file of another run is refused with
        :class:`pypattern.io.FingerprintMismatch` naming the first item that differs, a damaged file with
        :class:`pypattern.io.FormatError`. ``callback`` is not compared, and is not called for the steps done
        before the resume. With a checkpoint, an exception during the run restores the model's parameters and
        buffers to their values before the call, so that the same call again resumes from the file.
    quiet : bool
        No progress bar (by default one counts the steps, shown once a run has taken two seconds).

    The model is trained in place (in training mode) and left in eval mode. Its output is read as the library's
    losses read it: a tensor of logits, or an output with ``.logits`` (an unconverted Hugging Face causal LM).

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        A count, seed, ``lr`` or ``weight_decay`` out of range (naming it), empty ``data``, or ``sample_weights``
        without a fixed training set.
    TypeError
        ``task``, ``data`` or ``callback`` of the wrong kind.
    pypattern.io.FingerprintMismatch, pypattern.io.FormatError
        ``checkpoint`` holds another run, or is damaged.
    """
    steps, log_every = count_arg(steps, "steps"), count_arg(log_every, "log_every")
    if num_samples is not None:
        num_samples = count_arg(num_samples, "num_samples", 1)
    if batch_size is not None:
        batch_size = count_arg(batch_size, "batch_size", 1)
    if seed is None:  # an int keys the run (generator(None) would draw from torch's global generator)
        raise ValueError("seed=None is not valid; give an int in [-2**63, 2**64)")
    generator(seed)  # checked before any step
    seed = int(seed)
    _check_train_args(task, data, lr, weight_decay, callback)
    from .._train_checkpoint import TrainingSteps, check_checkpoint_arg

    check_checkpoint_arg(checkpoint, quiet)
    if data is not None and num_samples is not None and num_samples != len(data):
        raise ValueError(
            f"num_samples={num_samples} is not valid with data of {len(data)} samples: num_samples sets the size "
            "of a training set drawn from the task; give data or num_samples, not both"
        )
    if data is None and num_samples is not None:
        data = task.sample(num_samples, seed=offset_seed(seed, 1))
    if sample_weights is not None and data is None:
        raise ValueError("sample_weights needs a fixed training set: pass data=... or num_samples=...")
    batch_size = batch_size if batch_size is not None else getattr(task, "default_batch_size", 64)
    lr = lr if lr is not None else getattr(task, "default_lr", 3e-3)
    fp = None
    if checkpoint is not None:  # the run as it starts: the model's weights before any step
        fp = _fingerprint(
            model, task, steps, batch_size, lr, weight_decay, seed, log_every, data, sample_weights
        )
    g = generator(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    res = TrainResult()
    dev = model_device(model, torch.device("cpu"))
    # with a checkpoint, an abort restores the weights the run started from (the same call then resumes)
    with values_kept_on_error(model) if checkpoint is not None else contextlib.nullcontext():
        model.train()
        run = TrainingSteps(
            checkpoint,
            fp,
            model,
            opt,
            g,
            logs={"steps": (res.steps, np.int64), "losses": (res.losses, np.float64)},
            logged=lambda step: bool(log_every) and (step % log_every == 0 or step == steps - 1),
            total=steps,
            device=dev,
            random_forward=checkpoint is not None and bool(random_in_training(model)),
        )
        start = run.resume()
        with run.running(quiet, "train"):
            for step in range(start, steps):
                run.begin()
                if data is None:
                    batch = task.sample(batch_size, seed=int(torch.randint(0, 2**62, (), generator=g)))
                    w = None
                else:
                    idx = torch.randint(0, len(data), (batch_size,), generator=g)
                    batch = data[idx]
                    w = None
                    if sample_weights is not None:
                        w = _weights(sample_weights, step, len(data))[idx]
                batch = batch.to(dev)  # the task's batches are made on the CPU
                # the logits of what the model returns: a tensor, or a Hugging Face ModelOutput's .logits (as the
                # losses read it)
                per = task.per_sample_loss(read_logits(model(batch.tokens)), batch)
                loss = per.mean() if w is None else (per * w.to(per)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                logged = None
                if log_every and (step % log_every == 0 or step == steps - 1):
                    logged = float(loss.detach())
                    res.steps.append(step)
                    res.losses.append(logged)
                run.end(step, logged)
                if callback is not None:
                    callback(step, model)
    model.eval()
    return res


def _check_train_args(task, data, lr, weight_decay, callback) -> None:
    """Refuse, naming the argument, a task that draws or scores nothing, a fixed training set that is not a
    non-empty :class:`TaskBatch`, a learning rate or weight decay that is not a finite number >= 0 and a callback
    that cannot be called (before any step)."""
    from .._checks import is_real

    if not all(callable(getattr(task, m, None)) for m in ("sample", "per_sample_loss")):
        raise TypeError(
            f"task is a {type(task).__name__}; give a Task (one with sample() and per_sample_loss(), such as "
            "pypattern.InductionTask())"
        )
    if data is not None:
        if not isinstance(data, TaskBatch):
            hint = ""
            if isinstance(data, dict) or hasattr(data, "input_ids") or isinstance(data, torch.Tensor):
                hint = (
                    " (train scores the task's own targets; for a Hugging Face batch, a dict with input_ids, "
                    "attention_mask and labels, or a tensor of tokens, train in your own loop with the weighted "
                    "loss: the per-sample losses times pypattern.reweight(data, weights, mode='loss')[rows], or "
                    "batches drawn by pypattern.reweight(data, weights))"
                )
            raise TypeError(f"data is a {type(data).__name__}; give a TaskBatch (task.sample(...)){hint}")
        if len(data) == 0:
            raise ValueError("data holds no samples; give a TaskBatch of at least one sample")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if value is not None and (not is_real(value) or not 0.0 <= value < float("inf")):
            raise ValueError(f"{name}={value!r} is not valid; give a finite number >= 0")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} is not valid; give a function (step, model) or None")


def _weights(sample_weights, step: int, n: int) -> torch.Tensor:
    """The per-sample weights of ``step``, normalised to mean 1 ``(n,)``."""
    sw = sample_weights(step) if callable(sample_weights) else sample_weights
    from ..patterning import Intervention, _as_float64

    plan = isinstance(sw, Intervention)
    sw = sw.weights if plan else sw  # an inversion's result: its weights
    name = f"sample_weights{'(step)' if callable(sample_weights) else ''}"
    try:  # (bools and complex numbers refused by name: a mask is no weights, an imaginary part would be dropped)
        sw = torch.as_tensor(_as_float64(sw, name), dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"{name} is a {type(sw).__name__}; give {n} per-sample weights (a tensor or an array of real "
            f"numbers) or an Intervention ({e})"
        ) from None
    if sw.shape != (n,) or not bool(torch.isfinite(sw).all()) or bool((sw < 0).any()) or float(sw.sum()) <= 0:
        hint = ""
        if plan and sw.dim() == 1 and 0 < sw.numel() < n:
            hint = (
                f" (an Intervention holds one weight per column of chi: when its {sw.numel()} columns are groups, "
                f"give plan.per_sample(groups), groups[i] the group of row i; when they are some of the training "
                f"set's rows, invert(..., num_data={n}) and give w = np.ones({n}); w[rows] = plan.weights)"
            )
        low = f" (min {float(sw.min()):.3g})" if sw.numel() else ""
        raise ValueError(
            f"{name} has shape {tuple(sw.shape)}{low}; give {n} finite non-negative weights with a positive "
            f"sum{hint}"
        )
    return sw / sw.mean()


def _fingerprint(
    model, task, steps, batch_size, lr, weight_decay, seed, log_every, data, sample_weights
) -> dict:
    """What makes a :func:`train` run the same run (see the ``checkpoint`` argument)."""
    from .. import io
    from .._train_checkpoint import model_items, task_items
    from ..patterning import Intervention

    if isinstance(sample_weights, Intervention):
        sample_weights = sample_weights.weights
    return io.fingerprint(
        kind="train",
        task=task_items(task),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        log_every=log_every,
        data=None if data is None else {"tokens": data.tokens, "targets": data.targets, "extra": data.extra},
        sample_weights=sample_weights,
        **model_items(model),
    )
