"""The (backend, device) pairs every op test runs on, decided by the hardware present.

* ``reference`` and ``cpp`` on CPU tensors;
* ``cuda`` on CUDA tensors (where a GPU is visible and the extension was built with CUDA);
* ``triton`` compiled on CUDA tensors where a GPU is visible, else in the interpreter on CPU tensors
  (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` exactly when there is no GPU).

A backend that is unavailable stays in the list as a skipped case whose reason is :func:`pypattern.backends`'
(``pytest -ra`` lists them), so nothing that could run is left out silently.
"""

from __future__ import annotations

import os

import pytest
import torch

import pypattern


def device_of(backend: str) -> str:
    """The device whose tensors ``backend`` is tested on."""
    if backend in ("reference", "cpp"):
        return "cpu"
    if backend == "triton":
        return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    return "cuda"


def backend_devices(op: str, *, reference: bool = True, automatic: bool = False) -> list:
    """``pytest.param(backend, device)`` for every backend registered for ``op`` (without ``reference`` when it is
    False; with ``automatic``, also ``(None, "cuda")``: the op's own choice on CUDA tensors): parametrize a test with
    ``@pytest.mark.parametrize("backend, device", backend_devices(op))``."""
    from pypattern import _backends

    info = pypattern.backends(op)
    cases = []
    for name in ("reference", "cpp", "cuda", "triton"):
        if (name == "reference" and not reference) or name not in _backends.registered(op):
            continue
        device = device_of(name)
        marks = () if info[name]["available"] else pytest.mark.skip(reason=f"{name}: {info[name]['reason']}")
        cases.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    if automatic:
        marks = () if torch.cuda.is_available() else pytest.mark.skip(reason="no CUDA device")
        cases.append(pytest.param(None, "cuda", id="auto-cuda", marks=marks))
    return cases


def to(device: str, *tensors: torch.Tensor):
    """The tensors on ``device`` (a tuple; one tensor when one is given). None stays None."""
    out = tuple(None if t is None else t.to(device) for t in tensors)
    return out[0] if len(out) == 1 else out
