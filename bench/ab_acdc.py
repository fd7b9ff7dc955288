"""Two source trees of pypattern timed against each other on one ACDC run, interleaved in one run of this script:
a random-weight model (4 layers, d_model 512, 8 heads, d_mlp 2048, vocabulary 2000), batch 8 x 16, the logit
difference at the last position, threshold 0.02, float32, one thread, CPU time of the whole ``acdc`` call.

Each round runs every tree once, in turn, in a fresh process (the tree put first on ``sys.path``); a process prints
its CPU time, the kept edges and the number of patched runs (equal between trees that decide alike).

    git archive <commit> pypattern | tar -x -C /tmp/before && cp pypattern/_C*.so /tmp/before/pypattern/
    OMP_NUM_THREADS=1 python bench/ab_acdc.py --trees /tmp/before . --rounds 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import pypattern
from pypattern.circuits import acdc
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff
assert pypattern.__file__.startswith(sys.argv[1].rstrip("/") + "/"), pypattern.__file__
cfg = dict(n_layers=4, d_model=512, n_heads=8, d_head=64, d_mlp=2048, d_vocab=2000, n_ctx=32)
B, T = 8, 16
model = Transformer(TransformerConfig(**cfg, seed=0))
g = torch.Generator().manual_seed(0)
clean = torch.randint(0, cfg["d_vocab"], (B, T), generator=g)
corr = clean.clone()
corr[:, : T // 2] = torch.randint(0, cfg["d_vocab"], (B, T // 2), generator=g)
ans = torch.randint(0, cfg["d_vocab"], (B,), generator=g)
metric = LogitDiff(ans, (ans + 1) % cfg["d_vocab"])
t0 = time.process_time()
c = acdc(model, clean, corr, metric=metric, threshold=0.02)
print(f"{time.process_time() - t0:.2f} {int(c.mask.sum())} {c.info['num_runs']}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", required=True, help="source trees holding a pypattern/ package")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    trees = [os.path.abspath(t) for t in args.trees]
    times: dict[str, list[float]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for t in trees:
            p = subprocess.run([sys.executable, "-c", CHILD, t], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"the run of tree {t} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            out = p.stdout.split()
            times[t].append(float(out[0]))
            print(f"round {r} {t}: {out[0]} s CPU, {out[1]} edges kept, {out[2]} patched runs", flush=True)
    if len(trees) == 2:
        a, b = trees
        ratios = [x / y for x, y in zip(times[b], times[a])]
        print("second / first per round: " + ", ".join(f"{x:.3f}" for x in ratios))


if __name__ == "__main__":
    main()
