"""Which kernel backends exist here, the registry of each op's implementations, and the choice of one for a call.

Backends, fastest first for the device of the tensors:

* ``cuda``: the CUDA kernels in ``pypattern._C`` (CUDA tensors; needs a CUDA build of the extension).
* ``triton``: the Triton kernels in ``pypattern/ops/<op>/triton.py`` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``, which must be set before ``triton`` is first imported).
* ``cpp``: the C++ (OpenMP) kernels in ``pypattern._C`` (CPU tensors).
* ``reference``: plain torch, the specification; always there.

On CPU tensors the automatic choice is ``cpp`` then ``reference``: the Triton interpreter is a test vehicle,
used only when forced. ``backend="..."`` on an op, or the ``PYPATTERN_BACKEND`` environment variable, forces one:
forcing a name that is not a backend raises ``ValueError``; forcing one that is unavailable here or for the device
of the given tensors raises ``RuntimeError`` saying why; forcing a kernel on a dtype it does not take raises
``ValueError`` naming the argument, its dtype and the dtypes taken (the automatic choice takes the reference for
those dtypes).

Each op folder registers its implementations with :func:`register` under the name of its ``torch.ops.pypattern``
operator (``"sgld_step_"``, ``"covariance_update_"``, ``"grad_gram_pairwise"``); its public function then calls
:func:`dispatch`, which chooses the backend for the tensors' device and returns the implementation. Triton
implementations are registered as ``"module:attribute"`` strings, so that their modules are imported only when
that backend runs; ``triton`` itself is imported only when the Triton backend could be chosen (CUDA tensors
without a CUDA kernel, or the backend forced) or is reported on (:func:`backends`), never by the automatic choice
on CPU tensors. A ``triton`` whose import fails, whatever it raises, is an unavailable backend with that reason.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad

NAMES = ("cuda", "triton", "cpp", "reference")

# (op, backend) -> the implementation, or "module:attribute" naming it (imported on first use)
_REGISTRY: dict[tuple[str, str], Callable | str] = {}


def register(op: str, backends: str | tuple[str, ...], impl: Callable | str) -> None:
    """Register ``impl`` as the implementation of ``op`` on each of ``backends``.

    ``impl`` takes the op's arguments after validation (the op's folder documents them), or is a
    ``"module:attribute"`` string naming such a function, imported when the backend is first chosen.
    """
    for name in (backends,) if isinstance(backends, str) else backends:
        if name not in NAMES:
            raise ValueError(f"backend {name!r} is not one of {NAMES}")
        _REGISTRY[(op, name)] = impl
    _dispatch_cached.cache_clear()
    _choose_cached.cache_clear()  # availability of a Triton backend depends on the registry


def registered(op: str) -> tuple[str, ...]:
    """The backends for which ``op`` has an implementation, in the order of :data:`NAMES`."""
    return tuple(name for name in NAMES if (op, name) in _REGISTRY)


def implementation(op: str, backend: str) -> Callable:
    """The implementation of ``op`` registered for ``backend`` (``"module:attribute"`` entries are imported)."""
    try:
        impl = _REGISTRY[(op, backend)]
    except KeyError:
        have = registered(op)
        raise KeyError(
            f"op {op!r} has no implementation for backend {backend!r}"
            + (f"; it has {have}" if have else "; no op of that name is registered")
        ) from None
    if isinstance(impl, str):
        module, _, attr = impl.partition(":")
        impl = getattr(importlib.import_module(module), attr)
        _REGISTRY[(op, backend)] = impl
    return impl


@functools.cache
def _load_c():
    try:
        mod = importlib.import_module("pypattern._C")
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        return None, f"pypattern._C did not import ({e}); reinstall with `pip install -e .`"
    return mod, ""


def register_fake(name: str, fn: Callable) -> None:
    """``fn`` as the fake (shape) implementation of the C++ op ``name`` (``"pypattern::row_dots"``), so that
    ``torch.compile`` and meta tensors can trace through it; nothing without the extension, nothing again after a
    reload."""
    mod, _ = _load_c()
    if mod is None:  # pragma: no cover - broken install
        return
    try:
        torch.library.register_fake(name)(fn)
    except RuntimeError:  # already registered (a reload)
        pass


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pypattern::{op}", key)
    except RuntimeError:
        return False


@functools.cache
def _triton_status() -> tuple[bool, str]:
    """Whether Triton kernels can run here, and why not (imports ``triton``: called only when a Triton backend
    could be chosen or is reported on). A ``triton`` whose import fails for any reason (a missing package, or a
    broken install raising at import) makes the backend unavailable with that reason."""
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "triton":
            return False, "triton is not installed (pip install triton==3.7.1)"
        return False, f"triton failed to import ({type(e).__name__}: {e})"
    except Exception as e:  # a broken install can raise anything at import (a driver or runtime mismatch)
        return False, f"triton failed to import ({type(e).__name__}: {e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, "GPU"
    return False, "no GPU, and TRITON_INTERPRET=1 was not set before triton was imported"


def refuse_non_strided(op: str, name: str, t: torch.Tensor, hint: str = "") -> None:
    """Refuse a tensor of a layout other than ``torch.strided`` (a sparse or MKL-DNN tensor), naming the argument
    (after ``op``, unless it is empty): the kernels read memory through strides, and torch's own operations fail on
    such a tensor with messages that name neither (``Cannot access data pointer of Tensor that doesn't have
    storage``). ``hint`` is appended to the message."""
    if t.layout != torch.strided:
        raise TypeError(
            f"{op + ': ' if op else ''}{name} is a tensor of layout {t.layout}; give a dense (torch.strided) tensor (.to_dense() makes "
            f"one){hint}"
        )


def has_tangent(*tensors: torch.Tensor) -> bool:
    """Whether any of ``tensors`` is a forward-mode AD dual tensor (``torch.autograd.forward_ad``) carrying a
    tangent at the current dual level. The C++ and CUDA kernels have no forward-AD rule: torch would run them on
    the primal and drop the tangent without an error, so the ops take torch's own operations for such inputs.
    Costs one attribute read outside a ``dual_level`` context."""
    level = getattr(forward_ad, "_current_level", None)  # -1 outside a dual level
    if level is not None and level < 0:
        return False
    return any(forward_ad.unpack_dual(t, level=level).tangent is not None for t in tensors)


def op_names() -> list[str]:
    """The operators ``pypattern._C`` registers (``torch.ops.pypattern.<name>``), sorted; empty before it loads."""
    return sorted(
        str(n).split("::", 1)[1]
        for n in torch._C._dispatch_get_all_op_names()
        if str(n).startswith("pypattern::")
    )


def _check_op(op: str) -> None:
    """Refuse a name that is not an operator of ``pypattern._C`` (a misspelt name would read as "no kernel" for
    every backend); nothing to check against when the extension did not load."""
    mod, _ = _load_c()
    if mod is not None:
        known = op_names()
        if op not in known:
            raise ValueError(f"op={op!r} is not an operator of pypattern; valid: {known}")


def _availability(op: str, name: str) -> tuple[bool, str]:
    """Whether backend ``name`` of ``op`` runs here, and why not (or how it runs). Only ``"triton"`` imports
    ``triton``."""
    if name == "reference":
        return True, "plain torch"
    if name == "triton":
        if (op, "triton") not in _REGISTRY:
            return False, f"no Triton kernel registered for {op}"
        return _triton_status()
    mod, err = _load_c()
    if mod is None:
        return False, err
    if name == "cpp":
        if _has_kernel(op, "CPU"):
            return True, f"OpenMP, {torch.get_num_threads()} threads"
        return False, f"no CPU kernel registered for {op}"
    if not _has_kernel(op, "CUDA"):
        if torch.version.cuda is None or not _has_any_cuda():
            return False, (
                "pypattern._C was built without CUDA (torch is a CPU build, or no CUDA toolkit at build time)"
            )
        return False, f"no CUDA kernel registered for {op}"
    if not torch.cuda.is_available():
        return False, "built with CUDA kernels, but no GPU is visible"
    return True, "GPU"


def backends(op: str = "sgld_step_") -> dict[str, dict[str, object]]:
    """Report every backend of ``op`` as ``{name: {"available": bool, "reason": str}}``.

    ``reason`` says why a backend is missing, or how it runs where it is available.
    """
    _check_op(op)
    out: dict[str, dict[str, object]] = {}
    for name in ("cuda", "cpp", "triton", "reference"):
        ok, why = _availability(op, name)
        out[name] = {"available": ok, "reason": why}
    return out


def _has_any_cuda() -> bool:
    return _has_kernel("sgld_step_", "CUDA")


def _forced(backend: str | None) -> tuple[str | None, str]:
    """The forced backend, if any, and where it came from (the ``backend`` argument or the environment). An empty
    ``backend`` is the automatic choice, as an empty ``PYPATTERN_BACKEND`` is (and the samplers' ``backend=""``);
    a value that is no string (``0``, ``False``, a list) is refused, not taken for the automatic choice."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be one of {NAMES} or None, got {backend!r} ({type(backend).__name__})")
    if backend:
        return backend, "backend"
    env = os.environ.get("PYPATTERN_BACKEND") or None
    return env, "the environment variable PYPATTERN_BACKEND"


def choose(op: str, device: torch.device, backend: str | None) -> str:
    """Pick the backend for ``op`` on tensors of ``device`` (see the module docstring)."""
    if backend is not None and torch.compiler.is_compiling():
        # traced by torch.compile: the cached choice (imports, availability probes) cannot be traced; a backend
        # given by name is taken as given when it is registered for the op (the op then runs, or fails, as traced)
        if (op, backend) not in _REGISTRY:
            raise ValueError(f"backend={backend!r} is not registered for {op!r} (it has {registered(op)})")
        return backend
    forced, source = _forced(backend)
    return _choose_cached(op, device.type, forced, source, os.environ.get("TRITON_INTERPRET"))


def internal_backend(op: str, device: torch.device) -> str | None:
    """The ``backend`` argument for a call of ``op`` that an estimator makes on its own (exact patching's attention,
    the circuits' sums and contractions) on tensors of ``device``: None (the automatic choice, or the backend
    ``PYPATTERN_BACKEND`` forces) where that choice can run ``op`` there, else ``"reference"``. A backend forced for
    the ops that have it (``triton`` for the samplers' kernels on a GPU) then does not stop the estimators whose ops
    lack it; a value that is not a backend's name still raises ValueError."""
    try:
        choose(op, device, None)
    except RuntimeError:
        return "reference"
    return None


def choose_for_dtype(
    op: str,
    x: torch.Tensor,
    backend: str | None,
    dtypes: tuple,
    kernels: tuple = ("cpp", "cuda"),
    arg: str = "x",
) -> str:
    """:func:`choose` for an op whose ``kernels`` take only ``dtypes``: on other dtypes the reference, unless one
    of those kernels is forced, which is refused naming ``arg``, its dtype and the dtypes taken."""
    name = choose(op, x.device, backend)
    if name in kernels and x.dtype not in dtypes:
        forced, source = (backend, "backend") if torch.compiler.is_compiling() else _forced(backend)
        if forced == name:
            taken = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(
                f"{op}: {arg} has dtype {x.dtype}; the {name!r} backend (forced by {source}) takes {taken} (leave "
                "the backend to the automatic choice for others)"
            )
        return "reference"
    return name


def dispatch(op: str, device: torch.device, backend: str | None) -> Callable:
    """The implementation of ``op`` for tensors on ``device``: :func:`choose`, then the registry's entry."""
    if backend is not None and torch.compiler.is_compiling():
        return implementation(op, choose(op, device, backend))
    forced, source = _forced(backend)
    return _dispatch_cached(op, device.type, forced, source, os.environ.get("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=256)
def _dispatch_cached(
    op: str, device_type: str, forced: str | None, source: str, interp: str | None
) -> Callable:
    return implementation(op, _choose_cached(op, device_type, forced, source, interp))


@functools.lru_cache(maxsize=256)
def _choose_cached(op: str, device_type: str, forced: str | None, source: str, _interp: str | None) -> str:
    device = torch.device(device_type)
    if forced is not None:
        if forced not in NAMES:
            shown = f"backend={forced!r}" if source == "backend" else f"{source}={forced!r}"
            hint = "" if source == "backend" else "; unset it for the automatic choice"
            raise ValueError(f"{shown} is not one of {NAMES}{hint}")
        if forced == "reference":
            return forced
        _check_op(op)
        ok, why = _availability(op, forced)
        if not ok:
            by = "" if source == "backend" else f" by {source}"
            raise RuntimeError(f"backend {forced!r} was forced{by} but is unavailable: {why}")
        if forced in ("cpp",) and device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors only, got tensors on {device}")
        if forced == "cuda" and device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' runs on CUDA tensors only, got tensors on {device}")
        if forced == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
        return forced
    _check_op(op)
    if device.type == "cuda":
        order = ("cuda", "triton", "reference")
    elif device.type == "cpu":  # the Triton interpreter runs only when forced: triton is not imported here
        order = ("cpp", "reference")
    else:  # meta, mps, xpu, ...: only plain torch runs there
        order = ("reference",)
    for name in order:
        if _availability(op, name)[0]:  # in order: a later backend is not looked at once one is available
            return name
    return "reference"
