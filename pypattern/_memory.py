"""glibc's heap thresholds for the engines that allocate and free large blocks on every call (exact and
attribution patching, the circuits engine), and the warning of a memory budget below one unit of work."""

from __future__ import annotations

import ctypes
import os

_HEAP_SET = False


def keep_freed_heap() -> None:
    """Once per process, on glibc (unless its ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` are set):
    serve allocations up to 32 MiB from the heap (glibc's own upper limit for its dynamic threshold) and keep up to
    256 MiB of freed memory at its top instead of returning it to the system. By default glibc raises those
    thresholds only as far as the largest block freed so far, so the tens to hundreds of MiB of per-destination
    inputs that a patched run or a backward allocates and frees are returned to the system after every call and
    faulted in again, page by page, on the next (on the bench model about 7,600 page faults per pruning point and
    21,000 per EAP-IG call: 18 ms of system time per point, two thirds of the plain forward's CPU time, and a
    tenth of EAP-IG's time; on the GPT-2-small-shaped ``resid_pre`` grid 77,000-200,000 faults per call of eight
    positions, about 5% of its CPU time)."""
    global _HEAP_SET
    if _HEAP_SET:
        return
    _HEAP_SET = True
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD


_HUGE = 2**21  # a transparent huge page (x86-64, aarch64 with 4 KiB pages)
_MADVISE = None  # libc's madvise, once looked up (False where there is none)


def huge_pages_hint(t):
    """Ask Linux to back a large CPU tensor ``t`` that nothing has written yet with transparent huge pages
    (``madvise(MADV_HUGEPAGE)`` over the 2 MiB-aligned part of its storage), and return ``t``. Blocks above
    glibc's heap thresholds (:func:`keep_freed_heap`) come fresh from the system on every call, and are faulted in
    page by page as they are first written: 30,000 faults for the 123 MB of node outputs EAP records at
    GPT-2-small shape, about 4% of its CPU time, against about 500 with huge pages. A hint only: nothing happens
    on other systems, for tensors under 64 MiB or on other devices, or where the kernel's setting is ``never``."""
    global _MADVISE
    n = t.numel() * t.element_size()
    if n < 2**26 or t.device.type != "cpu" or _MADVISE is False:
        return t
    if _MADVISE is None:
        try:
            if not os.uname().sysname == "Linux":
                raise OSError
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _MADVISE = libc.madvise
        except (OSError, AttributeError):  # pragma: no cover - not Linux with glibc
            _MADVISE = False
            return t
    a = t.data_ptr()
    lo, hi = -(-a // _HUGE) * _HUGE, (a + n) // _HUGE * _HUGE
    if hi > lo:  # MADV_HUGEPAGE; an error (no THP in this kernel) leaves the pages as they are
        _MADVISE(lo, hi - lo, 14)
    return t


def warn_budget_too_small(name: str, budget: float, need: int, unit: str, stacklevel: int = 2) -> None:
    """Warn (``RuntimeWarning``) that the memory budget ``name=budget`` (bytes) is below the ``need`` bytes of the
    smallest unit of work (``unit``, e.g. "one cell of the exact engine"), which runs anyway and may exceed it."""
    import warnings

    warnings.warn(
        f"{name}={budget:.0f} bytes is below the working memory of {unit}, an estimated {int(need)} bytes "
        f"({int(need) / 2**20:.1f} MiB): it runs anyway, one at a time, and may exceed the budget; give "
        f"{name} >= {int(need)} to stay within it",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
