"""Argument checks shared by the estimators, each raising an error that names the argument."""

from __future__ import annotations

import itertools

import torch


def refuse_meta(x, name: str, give: str = "a tensor that holds its values") -> None:
    """Refuse ``x`` (passed as ``name``) when it is a meta tensor: a shape without values, which every computation
    would fail on deep inside torch. ``give`` says what to pass instead."""
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (a shape without values); give {give}")


def refuse_meta_model(
    model, name: str = "model", needs: str = "this computation runs it", offloaded_ok: bool = False
) -> None:
    """Refuse ``model`` (passed as ``name``) when it has parameters or buffers on the meta device (shapes without
    values: built under ``torch.device("meta")``, accelerate's ``init_empty_weights``, ``device_map="meta"``),
    naming the first; ``needs`` says what reads their values. With ``offloaded_ok``, a model whose modules carry
    accelerate's hooks (weights offloaded, loaded by each forward) is let through: a computation that only runs its
    forward gets their values."""
    if not isinstance(model, torch.nn.Module):
        return
    if offloaded_ok and any(hasattr(m, "_hf_hook") for m in model.modules()):
        return
    for kind, items in (("parameters", model.named_parameters()), ("buffers", model.named_buffers())):
        for n, t in items:
            if t.device.type == "meta":
                raise ValueError(
                    f"{name} has {kind} on the meta device (shapes without values), e.g. {n!r}, and {needs}; "
                    "load the weights first: from_pretrained without device_map='meta', or "
                    "model.to_empty(device='cpu') and load_state_dict, after which the buffers a state dict does "
                    "not hold (non-persistent ones, such as a rotary embedding's inv_freq) hold uninitialised "
                    "memory and must be computed again (e.g. by building those modules anew)"
                )


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
    without tensors, or not a module). Tensors on the meta device are passed over (an offloaded model's weights,
    loaded onto the device its hooks say at each forward): a model all on meta gives ``default``."""
    if isinstance(model, torch.nn.Module):
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.device.type != "meta":
                return t.device
    return default


def compiled_inner(model):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles, else ``model`` itself: estimators that
    read a model's structure (hook points, heads, parameter names) run the module it wraps, which computes the same
    function with the same parameters."""
    import torch.nn as nn

    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return model


def nonfinite_names(named_tensors) -> list[str]:
    """The names, among ``(name, tensor)`` pairs, of the floating tensors holding a NaN or an infinity."""

    def finite(t: torch.Tensor) -> bool:
        # a finite sum has only finite terms (a NaN or an infinity makes it one too): one pass over the tensor,
        # no mask of its size; a sum that overflowed is checked element by element
        # summed in float64 (float32 on Apple's MPS, which has no float64)
        wide = torch.float32 if t.device.type == "mps" else torch.float64
        with torch.no_grad():
            if t.numel() and bool(torch.isfinite(t.sum(dtype=wide if t.dtype != wide else None))):
                return True
            return bool(torch.isfinite(t).all())

    return [n for n, t in named_tensors if t.is_floating_point() and not finite(t)]


def check_flag(value, name: str) -> None:
    """``value`` must be True or False (a string such as ``"no"`` would read as true); ``name`` names it."""
    import numpy as np

    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name}={value!r} is not valid; give True or False")


def is_count(value) -> bool:
    """``value`` is an integer (Python's, numpy's: any ``numbers.Integral``), not a bool."""
    import numbers

    import numpy as np

    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_real(value) -> bool:
    """``value`` is a real number (Python's or numpy's int or float: any ``numbers.Real``), not a bool."""
    import numbers

    import numpy as np

    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def refuse_inference_parameters(model, what: str) -> None:
    """ValueError when ``model`` has parameters made or loaded under ``torch.inference_mode()``: ``what`` (the
    estimator) takes gradients through them or updates them, which autograd does not allow."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return
    names = [n for n, p in model.named_parameters() if p.is_inference()]
    if names:
        raise ValueError(
            f"{what} takes gradients through the model, but {len(names)} of its parameters (e.g. {names[0]!r}) are "
            "inference tensors (made or loaded under torch.inference_mode()), which autograd cannot use; build "
            "or load the model outside inference mode (torch.no_grad() is fine)"
        )
