"""devinterp 1.x's ``devinterp.utils`` functions: ``default_nbeta``, ``make_evaluate``, ``evaluate``,
``evaluate_ce``, ``evaluate_mse`` and the initial-loss functions ``get_init_loss_one_batch``,
``get_init_loss_multi_batch`` and ``get_init_loss_full_batch`` (the loss at ``w*`` that
``estimate_learning_coeff(..., init_loss=...)`` takes)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .._training import buffers_kept, eval_mode_if_random
from ..sampling.data import to_device
from ..sampling.llc import criterion_evaluate, default_nbeta, on_device, resolve_device
from ..sampling.runner import split_loss

__all__ = [
    "default_nbeta",
    "evaluate",
    "evaluate_ce",
    "evaluate_mse",
    "get_init_loss_full_batch",
    "get_init_loss_multi_batch",
    "get_init_loss_one_batch",
    "make_evaluate",
]


def make_evaluate(criterion: Callable) -> Callable:
    """``evaluate(model, (x, y)) = (criterion(model(x), y), model(x))`` for a loss ``criterion(outputs, targets)``."""
    return criterion_evaluate(criterion)


def evaluate(criterion: Callable, model, data):
    """devinterp 1.x's ``evaluate(criterion, model, (x, y))``: ``(criterion(model(x), y), model(x))``."""
    return criterion_evaluate(criterion)(model, data)


evaluate_ce = make_evaluate(F.cross_entropy)
evaluate_mse = make_evaluate(F.mse_loss)


def _batches(dataloader, seed, what: str) -> Iterable:
    """The batches to score: with a ``seed``, those of a loader over the same data set and batch size that reads
    the data set in order (devinterp's seeded loader, which does not shuffle); else ``dataloader``'s own."""
    if not isinstance(dataloader, Iterable):
        raise TypeError(f"{what}: dataloader={dataloader!r} is not iterable; give a torch DataLoader")
    if seed is None:
        return dataloader
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"{what}: seed={seed!r} needs a torch DataLoader (its data set is read again in order); got a "
            f"{type(dataloader).__name__}: pass seed=None to read the batches as given"
        )
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(
        dataloader.dataset, batch_size=dataloader.batch_size, generator=gen, collate_fn=dataloader.collate_fn
    )


def _mean_loss(batches: Iterable, model, evaluate: Callable, device, what: str, limit: int | None) -> float:
    if not callable(evaluate):
        raise TypeError(f"{what}: evaluate={evaluate!r} is not callable; give evaluate(model, batch) -> loss")
    dev = resolve_device(device, model)
    m = on_device(model, dev)
    total, count = 0.0, 0
    with torch.no_grad(), buffers_kept(m), eval_mode_if_random(m, f"{what} runs it"):
        for data in batches if limit is None else islice(batches, limit):
            total += float(split_loss(evaluate(m, to_device(data, dev)), "evaluate").detach())
            count += 1
    if count == 0:
        raise ValueError(f"{what}: the dataloader gave no batch")
    return total / count


def get_init_loss_one_batch(dataloader, model, evaluate: Callable, device, seed=None) -> float:
    """The loss ``evaluate(model, batch)`` of the loader's first batch (with a ``seed``: the data set's first
    ``batch_size`` items, read in order), on ``device`` (the caller's model is not moved; a copy is, if needed).

    A model in ``train()`` mode with dropout is scored in ``eval()`` mode (with a warning), as the sampler runs it;
    buffers (BatchNorm's running statistics) are left as they were."""
    return _mean_loss(
        _batches(dataloader, seed, "get_init_loss_one_batch"),
        model,
        evaluate,
        device,
        "get_init_loss_one_batch",
        1,
    )


def get_init_loss_multi_batch(
    dataloader, n_batches: int, model, evaluate: Callable, device, seed=None
) -> float:
    """The mean over the loader's first ``min(n_batches, len(dataloader))`` batches of ``evaluate(model, batch)``
    (devinterp 1.x's initial loss of ``estimate_learning_coeff``, with ``n_batches = num_chains *
    grad_accum_steps``); otherwise as :func:`get_init_loss_one_batch`."""
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"get_init_loss_multi_batch: n_batches={n_batches!r} must be a positive int")
    batches = _batches(dataloader, seed, "get_init_loss_multi_batch")
    try:
        n_batches = min(n_batches, len(batches))
    except TypeError:  # an iterable without a length: read up to n_batches
        pass
    return _mean_loss(batches, model, evaluate, device, "get_init_loss_multi_batch", n_batches)


def get_init_loss_full_batch(dataloader, model, evaluate: Callable, device, seed=None) -> float:
    """The mean over every batch of the loader of ``evaluate(model, batch)`` (a mean of batch means, as
    devinterp's: a short last batch weighs as much as a full one); otherwise as :func:`get_init_loss_one_batch`."""
    return _mean_loss(
        _batches(dataloader, seed, "get_init_loss_full_batch"),
        model,
        evaluate,
        device,
        "get_init_loss_full_batch",
        None,
    )
