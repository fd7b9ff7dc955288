"""Interleaved rounds of a kernel bench: every form timed once per round in CPU time (the order flips every round),
beside the round's bound (multiply-adds at the GEMM rate, or bytes at the copy bandwidth, whichever is larger, both
measured in the round), then per form the range of times, the rate and the median and range of time / bound. The
first line printed names the CPU model and torch's thread count."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``"unknown"`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> str:
    """One line naming what the figures were measured on: CPU model, torch's threads, torch's version."""
    return f"CPU {cpu_model()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def check_agree(name: str, err: float, tol: float) -> None:
    """Stop the bench (exit with a message) when a form disagrees with the reference by more than ``tol``: timing
    forms that compute different things is not a comparison."""
    if not err <= tol:  # also catches NaN
        raise SystemExit(f"{name} disagrees with the reference: {err:.3g} > {tol:.3g}; nothing timed")


def cpu_time(f: Callable[[], object]) -> float:
    t0 = time.process_time()
    f()
    return time.process_time() - t0


def interleaved(
    forms: dict[str, Callable[[], object]],
    rounds: int,
    macs: float,
    nbytes: float,
    gemm_rate: Callable[[], float],
    copy_rate: Callable[[], float],
    digits: int = 1,
) -> None:
    """Run and print the rounds (after one warm-up call of each form); times in ms with ``digits`` decimals."""
    print(machine(), flush=True)
    for f in forms.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in forms}
    bounds = []
    for r in range(rounds):
        rate, bw = gemm_rate(), copy_rate()
        bound = max(macs / rate, nbytes / bw)
        bounds.append(bound)
        for k in list(forms) if r % 2 == 0 else list(reversed(forms)):
            times[k].append(cpu_time(forms[k]))
        print(
            f"round {r}: GEMM {rate / 1e9:.1f} GMAC/s, copy {bw / 1e9:.1f} GB/s, bound {bound * 1e3:.{digits}f} ms; "
            + ", ".join(f"{k} {times[k][-1] * 1e3:.{digits}f} ms" for k in forms),
            flush=True,
        )
    print("\nform: CPU time (range over rounds), GMAC/s, x of the bound (median, range over rounds)")
    for k, ts in times.items():
        xs = [t / b for t, b in zip(ts, bounds)]
        print(
            f"{k}: {min(ts) * 1e3:.{digits}f}-{max(ts) * 1e3:.{digits}f} ms, "
            f"{macs / statistics.median(ts) / 1e9:.1f} GMAC/s, "
            f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"
        )
