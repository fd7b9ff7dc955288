"""What the Triton wrappers of :mod:`pypattern.ops` share for their launches.

A Triton launch goes to torch's *current* CUDA device and that device's current stream, not to the device of the
tensors it is given: a wrapper called with ``cuda:1`` tensors while ``cuda:0`` is current would launch on device 0
with device 1's pointers. Each wrapper therefore launches inside :func:`launch_guard` of its tensors' device (as the
CUDA kernels of ``csrc/`` do with ``c10::cuda::CUDAGuard``).
"""

from __future__ import annotations

import contextlib

import torch

# The largest grid size CUDA allows on axes 1 and 2 (axis 0 takes up to 2**31 - 1): a wrapper puts its large
# dimension on axis 0, and caps any other axis at this size with the kernel looping over the rest.
MAX_GRID_YZ = 65535


def launch_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (the launch then goes to that device and its current
    stream); a null context for any other device (the CPU, where the interpreter runs the kernels)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
