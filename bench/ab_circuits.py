"""Two source trees of pypattern timed against each other, interleaved in one run: EAP, EAP-IG (k = 5) and one
pruning-curve point on the bench model of ``bench_circuits.py`` (4 layers, d_model 256, 8 heads, d_mlp 1024, batch
8 x 32, float32, one thread), each beside its multiply-add bound (the plain model doing the bound's arithmetic, as
in ``bench_circuits.py``).

Each round runs every tree once, in turn, in a fresh process (a tree is put first on ``sys.path``); a process
times each piece ``--reps`` times after one warm-up call and reports the minimum. The summary is the minimum over
rounds of each piece per tree, the median over rounds of ours / bound (both measured in the same process) and,
for two trees, the median over rounds of the first tree's time over the second's.

    git archive <commit> pypattern | tar -x -C /tmp/before && cp pypattern/_C*.so /tmp/before/pypattern/
    OMP_NUM_THREADS=1 python bench/ab_circuits.py --trees /tmp/before . --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PIECES = ("eap", "eap_ig5", "point")

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import pypattern
from pypattern.circuits import edge_attribution, edges
from pypattern.circuits.engine import prepare_runs
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff
assert pypattern.__file__.startswith(sys.argv[1].rstrip("/") + "/"), pypattern.__file__
CFG = dict(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=1000, n_ctx=64)
B, T = 8, 32
model = Transformer(TransformerConfig(**CFG, seed=0))
g = torch.Generator().manual_seed(0)
clean = torch.randint(0, CFG["d_vocab"], (B, T), generator=g)
corr = clean.clone()
corr[:, : T // 2] = torch.randint(0, CFG["d_vocab"], (B, T // 2), generator=g)
ans = torch.randint(0, CFG["d_vocab"], (B,), generator=g)
metric = LogitDiff(ans, (ans + 1) % CFG["d_vocab"])
eng, _ = prepare_runs(model, edges(model), clean, corr, metric)
circuit = torch.rand(len(eng.graph), generator=torch.Generator().manual_seed(0)) < 0.05

def fwd_bwd(tokens, k=1):
    emb = model.embed_tokens(tokens)
    if k > 1:
        emb = emb.repeat(k, 1, 1)
    emb = emb.detach().requires_grad_(True)
    x = emb
    for blk in model.blocks:
        x = blk(x)
    logits = model.unembed(model.ln_final(x[:, -1]))
    return torch.autograd.grad(logits[:, 0].sum(), emb)

def bound_eap(k=1):
    with torch.no_grad():
        model(corr)
    return fwd_bwd(clean, k)

@torch.no_grad()
def bound_point():
    x = model.embed_tokens(clean)
    for blk in model.blocks:
        x = blk(x)
    return model.unembed(model.ln_final(x[:, -1]))

pieces = {
    "eap": lambda: edge_attribution(model, clean, corr, metric=metric, method="eap"),
    "eap_bound": bound_eap,
    "eap_ig5": lambda: edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=5),
    "eap_ig5_bound": lambda: bound_eap(5),
    "point": lambda: eng.run(~circuit[None]),
    "point_bound": bound_point,
}
reps = int(sys.argv[2])
out = {}
for name, f in pieces.items():
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    out[name] = min(ts) * 1e3
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", required=True, help="directories holding a pypattern package")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    runs: dict[str, list[dict]] = {t: [] for t in args.trees}
    for r in range(args.rounds):
        for t in args.trees:
            p = subprocess.run(
                [sys.executable, "-c", CHILD, os.path.abspath(t), str(args.reps)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            runs[t].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r} {t}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[t][-1].items()), flush=True)
    print(
        "\nper tree: minimum over rounds (ms); ours / bound: median over rounds of the same process's ratio"
    )
    for t, rs in runs.items():
        best = {k: min(x[k] for x in rs) for k in rs[0]}
        ratios = {p: statistics.median(x[p] / x[f"{p}_bound"] for x in rs) for p in PIECES}
        print(
            t,
            json.dumps({k: round(v, 1) for k, v in best.items()}),
            json.dumps({f"{k}/bound": round(v, 2) for k, v in ratios.items()}),
        )
    if len(args.trees) == 2:
        a, b = (runs[t] for t in args.trees)
        speed = {p: statistics.median(x[p] / y[p] for x, y in zip(a, b)) for p in PIECES}
        print(
            f"{args.trees[0]} / {args.trees[1]}, median over rounds:",
            json.dumps({k: round(v, 2) for k, v in speed.items()}),
        )


if __name__ == "__main__":
    main()
