"""Two source trees of pypattern timed against each other, interleaved in one run: EAP, EAP-IG (k = 5), one
pruning-curve point and ten points in one call (``points10``, the circuits of ``bench_circuits.py --table``) on the
bench model of ``bench_circuits.py`` (4 layers, d_model 256, 8 heads, d_mlp 1024, batch 8 x 32, float32, one
thread), each beside its multiply-add bound (``bench_circuits.bound_eap`` / ``bound_point``: the plain model doing
exactly the bound's arithmetic; ten plain forwards for ten points).

Each round runs every tree once, in turn, in a fresh process (a tree is put first on ``sys.path``; the bench module
is this checkout's); a process times each piece ``--reps`` times in CPU time (``time.process_time``) after one
warm-up call and reports the minimum. The summary is, per piece, the median (range) over rounds of ours / bound
(both measured in the same process) and, for two trees, of the first tree's time over the second's.

    git archive <commit> pypattern | tar -x -C /tmp/before && cp pypattern/_C*.so /tmp/before/pypattern/
    OMP_NUM_THREADS=1 python bench/ab_circuits.py --trees /tmp/before . --rounds 5

``--pieces point`` (or any comma-separated subset) times only those pieces and their bounds; ``--shape gpt2`` runs
them on the GPT-2-small-shaped model of ``bench_circuits.py --shape gpt2`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PIECES = ("eap", "eap_ig5", "point", "points10")

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[3])
import torch
torch.set_num_threads(1)
import pypattern
from pypattern.circuits import edge_attribution, edges
from pypattern.circuits.engine import prepare_runs
from bench_circuits import GPT2_CFG, CFG, bound_eap, bound_point, make_setup, point_circuit
assert pypattern.__file__.startswith(sys.argv[1].rstrip("/") + "/"), pypattern.__file__
model, clean, corr, metric = make_setup(cfg=GPT2_CFG if sys.argv[5] == "gpt2" else CFG)
eng, _ = prepare_runs(model, edges(model), clean, corr, metric)
circuit = point_circuit(eng.graph)
circuits10 = torch.rand(10, len(eng.graph), generator=torch.Generator().manual_seed(0)) < 0.05
pieces = {
    "eap": lambda: edge_attribution(model, clean, corr, metric=metric, method="eap"),
    "eap_bound": lambda: bound_eap(model, clean, corr),
    "eap_ig5": lambda: edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=5),
    "eap_ig5_bound": lambda: bound_eap(model, clean, corr, 5),
    "point": lambda: eng.run(~circuit[None]),
    "point_bound": lambda: bound_point(model, clean),
    "points10": lambda: eng.run(~circuits10),
    "points10_bound": lambda: [bound_point(model, clean) for _ in range(10)],
}
reps = int(sys.argv[2])
wanted = sys.argv[4].split(",")
out = {}
for name, f in pieces.items():
    if name.removesuffix("_bound") not in wanted:
        continue
    f()
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        f()
        ts.append(time.process_time() - t0)
    out[name] = min(ts) * 1e3
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", required=True, help="directories holding a pypattern package")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pieces", default=",".join(PIECES), help=f"comma-separated, of {PIECES}")
    ap.add_argument(
        "--shape", choices=("bench", "gpt2"), default="bench", help="the model: the bench's or GPT-2-small's"
    )
    args = ap.parse_args()
    pieces = args.pieces.split(",")
    unknown = sorted(set(pieces) - set(PIECES))
    if unknown:
        ap.error(f"--pieces {args.pieces!r}: unknown {unknown}; choose from {', '.join(PIECES)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    here = os.path.dirname(os.path.abspath(__file__))
    runs: dict[str, list[dict]] = {t: [] for t in args.trees}
    for r in range(args.rounds):
        for t in args.trees:
            p = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    os.path.abspath(t),
                    str(args.reps),
                    here,
                    args.pieces,
                    args.shape,
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if p.returncode != 0:
                raise SystemExit(f"the run of tree {t} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            runs[t].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r} {t}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[t][-1].items()), flush=True)

    def med(xs):
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    print(
        "\nper tree: minimum over rounds (ms, CPU time); ours / bound: median (range) over rounds, same process"
    )
    for t, rs in runs.items():
        best = {k: round(min(x[k] for x in rs), 1) for k in rs[0]}
        ratios = {f"{p}/bound": med([x[p] / x[f"{p}_bound"] for x in rs]) for p in pieces}
        print(t, json.dumps(best), json.dumps(ratios))
    if len(args.trees) == 2:
        a, b = (runs[t] for t in args.trees)
        speed = {p: med([x[p] / y[p] for x, y in zip(a, b)]) for p in pieces}
        print(f"{args.trees[0]} / {args.trees[1]}, median (range) over rounds:", json.dumps(speed))


if __name__ == "__main__":
    main()
