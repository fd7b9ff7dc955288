"""Exact patching of left-padded prompts under an attention mask against the same grid without padding, on the
GPT-2-small-shaped model of ``bench_patching`` (12 layers, d_model 768, vocabulary 50,257, random weights; batch
8 x 32, logit difference), one thread, CPU time.

Under a mask with padding the exact engine masks the padding keys and rotates (or, with ALiBi, biases) at each
row's positions, and takes batched products for the attention where the unmasked engine takes the C++
prefix-attention kernel (which reads one mask for every example). Timed, interleaved over ``--rounds`` (the order
flipped every round): the grid on unpadded prompts of 32 tokens (no mask), and on the same number of columns with
row ``b`` left-padded by ``2 b`` tokens (its last ``32 - 2 b`` tokens real). Printed: each grid's CPU time, the
padded grid's time over the unpadded one's, and the largest difference between the unpadded grid and the padded
grid's row 0 (no padding), which must agree.

    OMP_NUM_THREADS=1 python bench/bench_patching_padded.py --grids z_all_pos,resid_pre --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_patching as bp  # noqa: E402
from _rounds import machine  # noqa: E402

from pypattern.patching import LogitDiff, activation_patching  # noqa: E402

GRIDS = {
    "resid_pre": dict(site="resid_pre"),
    "attn_out": dict(site="attn_out"),
    "z_all_pos": dict(site="z", per_position=False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", default="z_all_pos")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    names = args.grids.split(",")
    unknown = [n for n in names if n not in GRIDS]
    if unknown:
        raise SystemExit(f"--grids: unknown {unknown}; choose from {list(GRIDS)}")
    torch.set_num_threads(1)
    c, B, T = bp.SCALE, bp.SCALE_B, bp.SCALE_T
    _, model = bp._scale_models()
    clean, corr, ans, wrong = bp._prompts(c["d_vocab"], B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : 2 * b] = (
            0  # row b left-padded by 2 b tokens (the corrupted tokens at 5 and 20 stay real in most)
        )
    metric = LogitDiff(ans, wrong)
    times: dict[str, dict[str, list[float]]] = {n: {"plain": [], "padded": []} for n in names}
    err: dict[str, float] = {}
    for r in range(args.rounds):
        for name in names:
            order = ["plain", "padded"] if r % 2 == 0 else ["padded", "plain"]
            out = {}
            for form in order:
                kw = dict(attention_mask=mask) if form == "padded" else {}
                t = time.process_time()
                out[form] = activation_patching(model, clean_tokens=clean, corrupted_tokens=corr, metric=metric,
                                                quiet=True, **GRIDS[name], **kw)  # fmt: skip
                times[name][form].append(time.process_time() - t)
                assert out[form].info["method"] == "exact"
            err[name] = float((out["plain"].values[0] - out["padded"].values[0]).abs().max())
    print(
        f"[bench_patching_padded] {machine()}, {args.rounds} rounds, batch {B} x {T}, row b left-padded by 2 b"
    )
    for name in names:
        p, q = times[name]["plain"], times[name]["padded"]
        ratio = statistics.median(b / a for a, b in zip(p, q))
        print(
            f"{name}: unpadded {min(p):.1f}-{max(p):.1f} s, padded {min(q):.1f}-{max(q):.1f} s, padded / unpadded "
            f"{ratio:.2f}; row 0 (no padding) max |diff| {err[name]:.1e}"
        )


if __name__ == "__main__":
    main()
