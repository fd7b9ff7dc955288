"""glibc's heap thresholds for the engines that allocate and free large blocks on every call (exact and
attribution patching, the circuits engine)."""

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
