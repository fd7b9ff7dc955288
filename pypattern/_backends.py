"""Which kernel backends exist here, and the choice of one for a call.

Backends, fastest first for the device of the tensors:

* ``cuda``: the CUDA kernels in ``pypattern._C`` (CUDA tensors; needs a CUDA build of the extension).
* ``triton``: the Triton kernels in ``pypattern.kernels`` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``, which must be set before ``triton`` is first imported).
* ``cpp``: the C++ (OpenMP) kernels in ``pypattern._C`` (CPU tensors).
* ``reference``: plain torch, the specification; always there.

On CPU tensors the automatic choice is ``cpp`` then ``reference``: the Triton interpreter is a test vehicle,
used only when forced. ``backend="..."`` on an op, or the ``PYPATTERN_BACKEND`` environment variable, forces one;
forcing one that is unavailable for the given tensors raises ``RuntimeError`` saying why.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

NAMES = ("cuda", "triton", "cpp", "reference")


@functools.cache
def _load_c():
    try:
        mod = importlib.import_module("pypattern._C")
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        return None, f"pypattern._C did not import ({e}); reinstall with `pip install -e .`"
    return mod, ""


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pypattern::{op}", key)
    except RuntimeError:
        return False


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton==3.7.1)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, "GPU"
    return False, "no GPU, and TRITON_INTERPRET=1 was not set before triton was imported"


def backends(op: str = "sgld_step_") -> dict[str, dict[str, object]]:
    """Report every backend of ``op`` as ``{name: {"available": bool, "reason": str}}``.

    ``reason`` says why a backend is missing, or how it runs where it is available.
    """
    out: dict[str, dict[str, object]] = {}
    mod, err = _load_c()
    if mod is None:
        out["cuda"] = {"available": False, "reason": err}
        out["cpp"] = {"available": False, "reason": err}
    else:
        if not _has_kernel(op, "CUDA"):
            why = (
                "pypattern._C was built without CUDA (torch is a CPU build, or no CUDA toolkit at build time)"
                if torch.version.cuda is None or not _has_any_cuda()
                else f"no CUDA kernel registered for {op}"
            )
            out["cuda"] = {"available": False, "reason": why}
        elif not torch.cuda.is_available():
            out["cuda"] = {"available": False, "reason": "built with CUDA kernels, but no GPU is visible"}
        else:
            out["cuda"] = {"available": True, "reason": "GPU"}
        ok = _has_kernel(op, "CPU")
        out["cpp"] = {
            "available": ok,
            "reason": f"OpenMP, {torch.get_num_threads()} threads"
            if ok
            else f"no CPU kernel registered for {op}",
        }
    ok, why = _triton_status()
    out["triton"] = {"available": ok, "reason": why}
    out["reference"] = {"available": True, "reason": "plain torch"}
    return out


def _has_any_cuda() -> bool:
    return _has_kernel("sgld_step_", "CUDA")


def choose(op: str, device: torch.device, backend: str | None) -> str:
    """Pick the backend for ``op`` on tensors of ``device`` (see the module docstring)."""
    forced = backend or os.environ.get("PYPATTERN_BACKEND") or None
    return _choose_cached(op, device.type, forced, os.environ.get("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=256)
def _choose_cached(op: str, device_type: str, forced: str | None, _interp: str | None) -> str:
    device = torch.device(device_type)
    if forced is not None:
        if forced not in NAMES:
            raise ValueError(f"backend={forced!r} is not one of {NAMES}")
        if forced == "reference":
            return forced
        info = backends(op)[forced]
        if not info["available"]:
            raise RuntimeError(f"backend {forced!r} was forced but is unavailable: {info['reason']}")
        if forced in ("cpp",) and device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors only, got tensors on {device}")
        if forced == "cuda" and device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' runs on CUDA tensors only, got tensors on {device}")
        if forced == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
        return forced
    info = backends(op)
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpp", "reference")
    for name in order:
        if info[name]["available"]:
            return name
    return "reference"
