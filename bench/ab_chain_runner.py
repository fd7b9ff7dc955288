"""Two source trees of pypattern timed against each other on the chain runner's per-step cost, interleaved in one
run: ``estimate_llc`` with 16 chains run together on a deep linear network (widths 4-3-8, rank-0 teacher, float64,
the whole data set as one batch), where a step's arithmetic is a few hundred multiply-adds and its time is the
runner's overhead per step: the forward and backward under ``vmap``, the sampler's update and the bookkeeping.

Workloads: ``auto`` is the call of ``tests/test_auto_step.py``'s deep-linear-network case (``step_size="auto"``,
its calibration trials included: 1,000 draws every 2 steps after 1,000 burn-in steps); ``fixed`` is the same
sampling at ``step_size=1e-3`` without calibration.

Each round runs every tree once, in turn, in a fresh process (the tree first on ``sys.path``), one thread; a process
reports the call's CPU time (``time.process_time``) and the estimate, which must be the same float in every tree
(the same draws). The summary is, per workload and tree, the median (range) over rounds, and for two trees the
first tree's time over the second's, per round.

    git archive <commit> pypattern | tar -x -C /tmp/before && cp pypattern/_C*.so /tmp/before/pypattern/
    OMP_NUM_THREADS=1 python bench/ab_chain_runner.py --trees /tmp/before . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import pypattern
from pypattern import estimate_llc, truth
assert pypattern.__file__.startswith(sys.argv[1].rstrip("/") + "/"), pypattern.__file__
warnings.simplefilter("ignore")
model = truth.DeepLinearNetwork((4, 3, 8), dtype=torch.float64).set_teacher(0, seed=2, scale=0.5)
ds = truth.make_regression_data(model, 4, dtype=torch.float64)
loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
step = "auto" if sys.argv[2] == "auto" else 1e-3
t0 = time.process_time()
r = estimate_llc(model, loader, step_size=step, nbeta=100.0, localization=1.0, num_chains=16, num_draws=1000,
                 num_steps_bw_draws=2, num_burnin_steps=1000, seed=3, quiet=True)
print(json.dumps({"cpu": time.process_time() - t0, "llc": float(r.llc_mean)}))
"""


def run(tree: str, workload: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, os.path.abspath(tree), workload],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--trees", nargs="+", default=["."], help="source trees holding pypattern/ (first is 'before')"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="auto,fixed")
    a = ap.parse_args()
    for t in a.trees:
        if not os.path.isdir(os.path.join(t, "pypattern")):
            ap.error(f"--trees: {t!r} holds no pypattern/ package")
    unknown = [w for w in a.workloads.split(",") if w not in ("auto", "fixed")]
    if unknown:
        ap.error(f"--workloads: {unknown} are not among 'auto', 'fixed'")
    if a.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {a.rounds}")
    import torch
    from _rounds import machine

    torch.set_num_threads(1)  # as in the timed processes
    print(machine(), flush=True)
    for w in a.workloads.split(","):
        times: dict[str, list[float]] = {t: [] for t in a.trees}
        llcs = set()
        for r in range(a.rounds):
            order = a.trees if r % 2 == 0 else a.trees[::-1]
            for t in order:
                res = run(t, w)
                times[t].append(res["cpu"])
                llcs.add(res["llc"])
            print(f"{w} round {r}: " + ", ".join(f"{t} {times[t][-1]:.2f} s" for t in a.trees), flush=True)
        if len(llcs) != 1:
            raise SystemExit(f"{w}: the trees' estimates differ: {sorted(llcs)}; not the same draws")
        for t in a.trees:
            xs = times[t]
            print(
                f"{w}: {t}: median {statistics.median(xs):.2f} s (range {min(xs):.2f}-{max(xs):.2f}), llc {llcs}"
            )
        if len(a.trees) == 2:
            b, c = a.trees
            ratios = [x / y for x, y in zip(times[b], times[c])]
            print(
                f"{w}: {b} / {c} per round: "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + f" (median {statistics.median(ratios):.2f})"
            )


if __name__ == "__main__":
    main()
