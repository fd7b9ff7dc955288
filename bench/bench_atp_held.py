"""Attribution patching called many times on the same weights, with and without a ``fixed_weights`` block held
by the caller around the calls, on the GPT-2-small-shaped model of ``bench_patching`` (batch 8 x 32, logit
difference). Inside the caller's block the calls share one set of attention layouts and packed weight copies:
a weight is packed once it has met ``PackedWeights.PACK_AFTER_ROWS`` rows over the calls, and later calls read
the packed copy. Printed per call: CPU time over the multiply-add bound of ``bench_patching.scale_bounds`` (the
reference matmul's rate measured before each call), and the largest difference from the first call's result.

    OMP_NUM_THREADS=1 python bench/bench_atp_held.py --calls 6 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_patching as bp  # noqa: E402

from pypattern.patching import LogitDiff  # noqa: E402
from pypattern.patching.attribution import attribution_patching  # noqa: E402

KINDS = {
    "atp": dict(sites=["z"]),
    "atp*": dict(sites=["z", "q", "k", "v"], qk_fix=True, grad_drop=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kinds", default="atp,atp*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    c, B, T = bp.SCALE, bp.SCALE_B, bp.SCALE_T
    _, model = bp._scale_models()
    clean, corr, ans, wrong = bp._prompts(c["d_vocab"], B, T)
    metric = LogitDiff(ans, wrong)
    macs = bp.scale_bounds(c, B, T)
    print(
        f"CPU {bp._cpu_model()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        flush=True,
    )
    for kind in args.kinds.split(","):
        call = lambda kw=KINDS[kind]: attribution_patching(model, clean, corr, metric=metric, **kw)  # noqa: E731
        first = call()
        for r in range(args.rounds):
            for held in (False, True) if r % 2 == 0 else (True, False):
                ratios, diff = [], 0.0
                block = model.fixed_weights(max_pack_bytes=None) if held else None
                if block is not None:
                    block.__enter__()
                try:
                    for _ in range(args.calls):
                        rate = bp._cpu_gemm_rate()
                        t0 = time.process_time()
                        got = call()
                        ratios.append((time.process_time() - t0) / (macs[kind] / rate))
                        diff = max(diff, *((got[s].values - first[s].values).abs().max().item() for s in got))
                finally:
                    if block is not None:
                        block.__exit__(None, None, None)
                label = "in the caller's block" if held else "separate calls       "
                print(
                    f"{kind} round {r} {label}: x of bound per call "
                    + " ".join(f"{x:.3f}" for x in ratios)
                    + f"; largest difference from the first call {diff:.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
