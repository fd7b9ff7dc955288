"""Shared set-up of the benchmark suites.

* Threads are pinned (``PYPATTERN_BENCH_THREADS``, default 1) and reported with the CPU model: other processes share
  these cores, and two OpenMP threads were sometimes far slower than one here.
* Each benchmark labels itself in ``benchmark.extra_info``: ``role`` is ``ours``, ``reference``, ``peer`` or
  ``bound`` (the work's own limit, e.g. a plain copy of the same bytes, or the floor of one forward+backward);
  ``bytes`` (memory traffic) or ``madds`` (multiply-adds) give the work. At the end of the run a table prints, per
  group and in the same run, every benchmark's minimum time, its ratio to each reference/peer, and how close it
  comes to the bound. Where benchmarks give their ``dtype``, ours is set against the bounds of the same dtype only;
  ``bound_units`` (default 1) says how many times the work of its group's bound and references a case does (e.g.
  ten pruning points in one call against a bound and a peer of one point each).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rounds import cpu_model  # noqa: E402

THREADS = int(os.environ.get("PYPATTERN_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)


def pytest_report_header(config):
    return f"pypattern bench: CPU {cpu_model()}, torch {torch.__version__}, torch.set_num_threads({THREADS})"


def _rows(config):
    run = getattr(config, "_benchmarksession", None)
    if run is None:
        return []
    return [b for b in run.benchmarks if getattr(b, "stats", None) is not None]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _rows(config)
    if not rows:
        return
    tr = terminalreporter
    tr.section(f"pypattern: ratios measured in this run (min times, {THREADS} thread(s), CPU {cpu_model()})")
    groups: dict[str, list] = {}
    for b in rows:
        groups.setdefault(b.group or "-", []).append(b)
    for group, bs in groups.items():
        tr.write_line(f"[{group}]")
        refs = [b for b in bs if b.extra_info.get("role") in ("reference", "peer")]
        bounds = [b for b in bs if b.extra_info.get("role") == "bound"]
        for b in sorted(bs, key=lambda b: b.stats.min):
            t = b.stats.min
            parts = [f"{b.name:<58} {t * 1e3:10.3f} ms"]
            if "bytes" in b.extra_info:
                parts.append(f"{b.extra_info['bytes'] / t / 1e9:7.2f} GB/s")
            if "madds" in b.extra_info:
                parts.append(f"{b.extra_info['madds'] / t / 1e9:7.2f} GMAC/s")
            if b.extra_info.get("role") == "ours":
                k = b.extra_info.get("bound_units", 1)
                times = f" x {k}" if k != 1 else ""
                for r in refs:
                    parts.append(f"{k * r.stats.min / t:6.2f}x vs {r.extra_info.get('label', r.name)}{times}")
                for r in bounds:
                    dtypes = {x.extra_info.get("dtype") for x in (b, r)}
                    if None not in dtypes and len(dtypes) > 1:
                        continue  # a bound in another dtype is not this case's bound
                    parts.append(
                        f"{100 * k * r.stats.min / t:5.1f}% of bound ({r.extra_info.get('label', r.name)}{times})"
                    )
            tr.write_line("  " + " | ".join(parts))
