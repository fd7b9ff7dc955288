"""Common interface of the synthetic tasks: a batch of token sequences with per-position targets."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._checks import is_count, is_real

__all__ = ["TaskBatch", "Task", "per_sample_loss", "IGNORE", "generator", "offset_seed"]

IGNORE = -100


@dataclass
class TaskBatch:
    """Token sequences and their targets.

    Attributes
    ----------
    tokens : LongTensor ``(num_samples, pos)``
    targets : LongTensor ``(num_samples, pos)``
        The token the model should output *at* each position (``IGNORE`` = -100 where there is no loss).
    extra : dict[str, Tensor]
        Task-specific per-sample tensors with leading dimension ``num_samples`` (labels, flags, ...).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> TaskBatch:
        return TaskBatch(self.tokens[idx], self.targets[idx], {k: v[idx] for k, v in self.extra.items()})

    def to(self, device) -> TaskBatch:
        """The batch with its tokens, targets and tensor extras on ``device`` (the batch itself when they all are
        there already)."""
        device = torch.device(device)
        tensors = [
            self.tokens,
            self.targets,
            *(v for v in self.extra.values() if isinstance(v, torch.Tensor)),
        ]
        if all(t.device == device for t in tensors):
            return self
        return TaskBatch(
            self.tokens.to(device),
            self.targets.to(device),
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()},
        )


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each sample's scored positions.

    Parameters
    ----------
    logits : ``(num_samples, pos, d_vocab)``
    targets : ``(num_samples, pos)`` with ``IGNORE`` where unscored

    Returns
    -------
    Tensor ``(num_samples,)``
    """
    mask = targets != IGNORE
    ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)


class Task:
    """A synthetic task: ``sample(num_samples, seed)`` returns a :class:`TaskBatch`."""

    name: str = "task"
    d_vocab: int
    n_ctx: int

    def sample(self, num_samples: int, seed: int | None = None) -> TaskBatch:
        raise NotImplementedError

    def model_config(self, **overrides):
        """A :class:`~pypattern.models.TransformerConfig` that learns this task in seconds on a CPU."""
        raise NotImplementedError

    def per_sample_loss(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        return per_sample_loss(logits, batch.targets)

    @torch.no_grad()
    def accuracy(self, model, batch: TaskBatch) -> float:
        """Fraction of scored positions where the argmax equals the target."""
        pred = _logits(model, batch.tokens).argmax(-1)
        mask = batch.targets != IGNORE
        return float(((pred == batch.targets) & mask).sum() / mask.sum())


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model(tokens)``'s logits: a tensor, or a Hugging Face ModelOutput's ``.logits`` (as the losses read it)."""
    from ..losses import read_logits

    return read_logits(model(tokens))


def generator(seed: int | None, name: str = "seed") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (an int, numpy's too, in ``[-2**63, 2**64)``), or from
    torch's global generator when ``seed`` is None; another value is refused naming ``name``. torch keys its
    generators by 64 bits: seeds equal modulo ``2**64`` (``-1`` and ``2**64 - 1``) draw the same numbers."""
    if seed is not None and (not is_count(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"{name}={seed!r} is not valid; give an int in [-2**63, 2**64) or None")
    g = torch.Generator()
    g.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed))
    return g


def offset_seed(seed: int, offset: int) -> int:
    """``seed + offset`` kept in :func:`generator`'s range ``[-2**63, 2**64)`` (wrapped modulo ``2**64``, which
    keys the same generator): a derived seed of a valid ``seed`` is valid too."""
    value = int(seed) + offset
    return value - 2**64 if value >= 2**64 else value + 2**64 if value < -(2**63) else value


def count_arg(value, name: str, least: int = 0) -> int:
    """``value`` (passed as ``name``) as an int >= ``least`` (numpy's integers too; not a bool), else refused."""
    if not is_count(value) or value < least:
        raise ValueError(f"{name}={value!r} is not valid; give an int >= {least}")
    return int(value)


def fraction_arg(value, name: str, upper_open: bool = False) -> float:
    """``value`` (passed as ``name``) as a float in ``[0, 1]`` (``[0, 1)`` with ``upper_open``; numpy's numbers
    too; not a bool), else refused."""
    if not is_real(value) or not 0.0 <= value <= 1.0 or (upper_open and value == 1.0):
        raise ValueError(f"{name}={value!r} is not valid; give a number in [0, 1{')' if upper_open else ']'}")
    return float(value)
