"""Two source trees of pypattern timed against each other in one process: the five GPT-2-small-shaped patching
grids of ``bench_patching.test_scale_gpt2_small_cpu_time`` (resid_pre, attn_out, z per head over all positions,
AtP over z, AtP* over z/q/k/v with the QK fix and GradDrop), each beside its multiply-add bound from that bench.

The first tree is imported under another package name (its modules import each other relatively), so both run in
the same process on models of the same weights, alternating grid by grid (the order flips every round); each grid
is timed in CPU time (``time.process_time``) between two measurements of the reference matmul's rate (the faster
is used for the bound), as in the bench. Printed per grid and tree: CPU seconds and x of bound per round, and the
second tree's CPU time over the first's in the same round. Before the rounds each tree runs one cell of an exact
grid and each attribution grid named, untimed, so that one-time set-up falls on neither.

    git archive <commit> pypattern | tar -x -C /tmp/before && cp pypattern/_C*.so /tmp/before/pypattern/
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/ab_patching.py /tmp/before --rounds 2
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_patching as bp  # noqa: E402


def _load_as(tree: str, name: str):
    """The ``pypattern`` package of ``tree`` imported as ``name`` (through a symbolic link)."""
    d = tempfile.mkdtemp()
    os.symlink(os.path.join(os.path.abspath(tree), "pypattern"), os.path.join(d, name))
    sys.path.insert(0, d)
    return importlib.import_module(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", help="a source tree whose pypattern/ is timed against this checkout's")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--grids", default="resid_pre,attn_out,z_all_pos,atp,atp*")
    args = ap.parse_args()
    unknown = sorted(set(args.grids.split(",")) - set(bp.SCALE_GRIDS))
    if unknown:
        ap.error(f"--grids {args.grids!r}: unknown {unknown}; choose from {', '.join(bp.SCALE_GRIDS)}")
    if not os.path.isdir(os.path.join(args.before, "pypattern")):
        ap.error(f"before {args.before!r}: expected a source tree holding a pypattern/ package")
    torch.set_num_threads(1)
    import pypattern

    old = _load_as(args.before, "pypattern_before")
    importlib.import_module("pypattern_before.patching.attribution")
    c, Bs, Ts = bp.SCALE, bp.SCALE_B, bp.SCALE_T
    hf, ours = bp._scale_models()
    models = {"before": old.from_hf(hf), "after": ours}
    pkgs = {"before": old, "after": pypattern}
    clean, corr, ans, wrong = bp._prompts(c["d_vocab"], Bs, Ts)
    macs = bp.scale_bounds(c, Bs, Ts)

    def run(name: str, tree: str) -> None:
        P, m = pkgs[tree].patching, models[tree]
        met = P.LogitDiff(ans, wrong)
        if name == "atp":
            P.attribution.attribution_patching(m, clean, corr, metric=met, sites=["z"])
        elif name == "atp*":
            sites = ["z", "q", "k", "v"]
            P.attribution.attribution_patching(
                m, clean, corr, metric=met, sites=sites, qk_fix=True, grad_drop=True
            )
        elif name == "z_all_pos":
            P.activation_patching(m, "z", clean, corr, metric=met, per_position=False)
        else:
            P.activation_patching(m, name, clean, corr, metric=met)

    names = args.grids.split(",")
    # untimed first calls on each tree: the first call on a model pays one-time set-up, which would otherwise land
    # on the tree timed first in round 0; one cell of an exact grid, as the bench does, and each attribution grid
    L = c["n_layers"]
    for t in ("before", "after"):
        P = pkgs[t].patching
        P.activation_patching(
            models[t],
            "resid_pre",
            clean,
            corr,
            metric=P.LogitDiff(ans, wrong),
            layers=[L - 1],
            positions=[Ts - 1],
        )
        for n in names:
            if n.startswith("atp"):
                run(n, t)
    res: dict = {(n, t): [] for n in names for t in ("before", "after")}
    for r in range(args.rounds):
        for n in names:
            for t in ("before", "after") if r % 2 == 0 else ("after", "before"):
                r0 = bp._cpu_gemm_rate()
                t0 = time.process_time()
                run(n, t)
                cpu = time.process_time() - t0
                rate = max(r0, bp._cpu_gemm_rate())
                res[(n, t)].append((cpu, cpu / (macs[n] / rate)))
                print(
                    f"[{time.strftime('%H:%M:%S')}] round {r} {n} {t}: CPU {cpu:.2f} s, bound"
                    f" {macs[n] / rate:.2f} s ({macs[n] / 1e9:.0f} GMAC), {cpu / (macs[n] / rate):.3f}x of bound",
                    flush=True,
                )
    print("summary (before: " + args.before + ")")
    for n in names:
        b, a = res[(n, "before")], res[(n, "after")]
        fmt = lambda xs, i: f"{min(x[i] for x in xs):.2f}-{max(x[i] for x in xs):.2f}"
        print(
            f"{n}: before CPU {fmt(b, 0)} s, {fmt(b, 1)}x of bound; after CPU {fmt(a, 0)} s, {fmt(a, 1)}x of bound;"
            f" after / before " + ", ".join(f"{x[0] / y[0]:.3f}" for x, y in zip(a, b))
        )


if __name__ == "__main__":
    main()
