"""A small training loop for the synthetic tasks, with optional per-sample loss weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .._checks import model_device
from ..losses import read_logits
from .base import Task, TaskBatch, generator

__all__ = ["train", "TrainResult"]


@dataclass
class TrainResult:
    """Losses logged during :func:`train` (``steps`` and the weighted training ``losses``)."""

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
) -> TrainResult:
    """Train ``model`` on ``task`` with AdamW.

    Parameters
    ----------
    batch_size, lr : optional
        Default to the task's ``default_batch_size`` / ``default_lr`` (64 and 3e-3 unless the task says).
    data : TaskBatch, optional
        A fixed training set; with ``num_samples`` one is drawn from the task; with neither, every step draws
        a fresh batch (online training).
    sample_weights : Tensor ``(num_samples,)``, Intervention or callable ``step ->`` either, optional
        Non-negative per-sample loss weights over the fixed training set (an Intervention's ``weights``; requires ``data`` or
        ``num_samples``); normalised to mean 1, the minibatch loss is ``mean(w_i * loss_i)``, an unbiased
        estimate of the re-weighted data distribution's loss. A callable is called at every step (online
        re-weighting).
    callback : callable ``(step, model)``, optional
        Called after every step.

    The model is trained in place (in training mode) and left in eval mode. Its output is read as the library's
    losses read it: a tensor of logits, or an output with ``.logits`` (an unconverted Hugging Face causal LM).

    Returns
    -------
    TrainResult
    """
    if steps < 0:
        raise ValueError(f"steps={steps} is not valid; give >= 0")
    if data is None and num_samples is not None:
        data = task.sample(num_samples, seed=seed + 1)
    if sample_weights is not None and data is None:
        raise ValueError("sample_weights needs a fixed training set: pass data=... or num_samples=...")
    batch_size = batch_size if batch_size is not None else getattr(task, "default_batch_size", 64)
    lr = lr if lr is not None else getattr(task, "default_lr", 3e-3)
    g = generator(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    res = TrainResult()
    dev = model_device(model, torch.device("cpu"))
    model.train()
    for step in range(steps):
        if data is None:
            batch = task.sample(batch_size, seed=int(torch.randint(0, 2**62, (), generator=g)))
            w = None
        else:
            idx = torch.randint(0, len(data), (batch_size,), generator=g)
            batch = data[idx]
            w = None
            if sample_weights is not None:
                sw = sample_weights(step) if callable(sample_weights) else sample_weights
                from ..patterning import Intervention

                sw = sw.weights if isinstance(sw, Intervention) else sw  # an inversion's result: its weights
                try:
                    sw = torch.as_tensor(sw, dtype=torch.float64)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(
                        f"sample_weights{'(step)' if callable(sample_weights) else ''} is a "
                        f"{type(sw).__name__}; give {len(data)} per-sample weights (a tensor or an array) or an "
                        "Intervention"
                    ) from None
                if (
                    sw.shape != (len(data),)
                    or not bool(torch.isfinite(sw).all())
                    or bool((sw < 0).any())
                    or float(sw.sum()) <= 0
                ):
                    raise ValueError(
                        f"sample_weights has shape {tuple(sw.shape)} (min {float(sw.min()):.3g}); give "
                        f"{len(data)} finite non-negative weights with a positive sum"
                    )
                w = (sw / sw.mean())[idx]
        batch = batch.to(dev)  # the task's batches are made on the CPU
        # the logits of what the model returns: a tensor, or a Hugging Face ModelOutput's .logits (as the losses read it)
        per = task.per_sample_loss(read_logits(model(batch.tokens)), batch)
        loss = per.mean() if w is None else (per * w.to(per)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            res.steps.append(step)
            res.losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, model)
    model.eval()
    return res
