"""Argument checks shared by the estimators, each raising an error that names the argument."""

from __future__ import annotations

import itertools

import torch


def refuse_meta(x, name: str, give: str = "a tensor that holds its values") -> None:
    """Refuse ``x`` (passed as ``name``) when it is a meta tensor: a shape without values, which every computation
    would fail on deep inside torch. ``give`` says what to pass instead."""
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (a shape without values); give {give}")


def device_arg(device, name: str = "device") -> torch.device:
    """``device`` (passed as ``name``) as a ``torch.device``; a value torch cannot read as one is refused by name."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{name}={device!r} is not a torch device ('cpu', 'cuda', 'cuda:0', ...): {e}"
        ) from None


def model_device(model, default: torch.device | None = None) -> torch.device | None:
    """Where ``model`` computes: its first parameter's device, else its first buffer's, else ``default`` (a model
    without tensors, or not a module)."""
    if isinstance(model, torch.nn.Module):
        for t in itertools.chain(model.parameters(), model.buffers()):
            return t.device
    return default
