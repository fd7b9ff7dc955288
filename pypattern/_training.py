"""What makes a model's forward random in ``train()`` mode: dropout modules, and the dropout rates, layer drops and
router jitter that Hugging Face modules keep as plain numbers and apply only while training."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

# instance attributes holding a probability or noise scale that a module applies in training mode only
_RANDOM_ATTRS = ("dropout", "layerdrop", "jitter")


def random_in_training(model: nn.Module) -> list[str]:
    """The parts of ``model`` (modules in ``train()`` mode) that make its forward random, as ``"name.attr=value"``
    strings (empty when its forward is deterministic): ``nn.Dropout`` modules with ``p > 0``, and number-valued
    attributes whose name mentions dropout, layer drop or jitter (``attention_dropout``, OPT's ``dropout`` and
    ``layerdrop``, BLOOM's ``hidden_dropout``, Mixtral's ``jitter_noise``) that are positive."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd):
            if m.p > 0:
                found.append(f"{name}.p={m.p}")
            continue
        for attr, v in vars(m).items():
            if attr.startswith("_") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if v > 0 and any(k in attr.lower() for k in _RANDOM_ATTRS):
                found.append(f"{name}.{attr}={v}" if name else f"{attr}={v}")
    return found


@contextlib.contextmanager
def eval_mode_if_random(model: nn.Module, what: str, stacklevel: int = 4) -> Iterator[None]:
    """``model`` in ``eval()`` mode for the block when its ``train()`` forward is random (:func:`random_in_training`),
    with a warning that says what runs it so (``what``, e.g. "the sampler runs it"), and every module's mode restored
    afterwards; nothing happens for a deterministic model."""
    active = random_in_training(model) if isinstance(model, nn.Module) else []
    if not active:
        yield
        return
    warnings.warn(
        f"the model is in training mode and has dropout ({', '.join(active[:3])}{', ...' if len(active) > 3 else ''}): "
        f"{what} in eval mode and restores its mode afterwards; call model.eval() first to silence this",
        UserWarning,
        stacklevel=stacklevel,
    )
    with eval_mode(model):
        yield


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` back in its own ``train()`` / ``eval()`` mode after the block, also when the block
    raises (the block may change them)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in ``eval()`` mode for the block, every module's own mode put back afterwards."""
    with modes_kept(model):
        model.eval()
        yield


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """The block may run ``model`` in ``train()`` mode (BatchNorm updates its running statistics there); every buffer
    holds its value from before the block again afterwards, also when the block raises."""
    saved = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, nn.Module) else []
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape:
                    b.copy_(v)


@contextlib.contextmanager
def values_kept_on_error(model: nn.Module) -> Iterator[None]:
    """The block trains ``model`` in place; when it raises, every parameter and buffer holds its value from before
    the block again, and every parameter's ``.grad`` the gradient it held (or None) before the block (a copy of
    them is kept while the block runs)."""
    with torch.no_grad():
        saved = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]
        grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, before in saved:
                t.copy_(before)
            for p, g in grads:
                p.grad = g
        raise


@contextlib.contextmanager
def frozen_parameters(model: nn.Module, params: list | None = None) -> Iterator[None]:
    """No gradient taken for ``model``'s parameters (or the list ``params`` of them, when the caller holds it) in
    the block: each one's ``requires_grad`` is turned off and, for those that had it, turned back on afterwards,
    also when the block raises (a frozen parameter stays frozen)."""
    frozen = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            if p.is_inference():  # made under inference mode: its flag can be turned back on only there
                with torch.inference_mode():
                    p.requires_grad_(True)
            else:
                p.requires_grad_(True)
