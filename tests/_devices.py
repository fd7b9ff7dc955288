"""What the device tests share: the devices they run on (the CPU, and ``cuda`` where torch sees a GPU) and a guard
that records tensors made without a device by given source files (the part of the CUDA paths a machine without a
GPU can check)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

FACTORIES = {
    torch.arange,
    torch.tensor,
    torch.as_tensor,
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.eye,
    torch.linspace,
    torch.logspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.empty_strided,
}


class DeviceLessFactories(TorchFunctionMode):
    """Records the tensor factory calls (``torch.arange``, ``torch.tensor``, ``torch.empty``, ...) made directly by
    code in ``files`` without a ``device=``: such a tensor is on the CPU whatever the model's or the data's device
    (a tensor meant to stay on the CPU, drawn from a CPU generator or used as an index, names ``device="cpu"``).
    ``torch.as_tensor`` of a tensor keeps its device."""

    def __init__(self, files) -> None:
        super().__init__()
        self.files = {Path(f).resolve() for f in files}
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            if not (func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)):
                frame = sys._getframe(1)  # the Python code that called the factory
                path = Path(frame.f_code.co_filename).resolve()
                if path in self.files:
                    self.found.add(f"{path.name}:{frame.f_lineno}: torch.{func.__name__}")
        return func(*args, **kwargs)


def assert_close_on(got, ref, device: str) -> None:
    """A result on ``device`` against the CPU's: equal bit for bit on the CPU (the same run); on a GPU within 1e-6
    relative of the largest entry (the noise is keyed alike on every device, the arithmetic rounds otherwise; a
    wrong batch, mask or order changes results at order one)."""
    import numpy as np

    if isinstance(got, torch.Tensor):
        got = got.detach().cpu()
    if isinstance(ref, torch.Tensor):
        ref = ref.detach().cpu()
    got, ref = np.asarray(got), np.asarray(ref)
    if device == "cpu":
        np.testing.assert_array_equal(got, ref)
    else:
        scale = float(np.nanmax(np.abs(ref))) if ref.size else 0.0
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * scale)
