"""Peak memory of AtP* at the GPT-2-small shape of ``bench_patching`` with ``max_batch`` prompts per part.

One setting per process (the peak resident set of a fresh process over its resident set before the call, with
the model and prompts loaded; ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), one thread:

    for k in none 4 2 1; do OMP_NUM_THREADS=1 python bench/atp_memory.py $k; done
"""

from __future__ import annotations

import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_patching as bp  # noqa: E402

from pypattern.patching import LogitDiff, attribution_patching  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    if len(sys.argv) != 2 or not (sys.argv[1] == "none" or sys.argv[1].isdigit() and int(sys.argv[1]) > 0):
        raise SystemExit(
            "usage: python bench/atp_memory.py MAX_BATCH, where MAX_BATCH is 'none' (all prompts in one part) or a "
            "positive number of prompts per part"
        )
    mb = None if sys.argv[1] == "none" else int(sys.argv[1])
    hf, model = bp._scale_models()
    del hf
    c = bp.SCALE
    clean, corr, ans, wrong = bp._prompts(c["d_vocab"], bp.SCALE_B, bp.SCALE_T)
    gc.collect()
    rss0 = bp._peak_reset()
    t = time.process_time()
    attribution_patching(
        model,
        clean,
        corr,
        metric=LogitDiff(ans, wrong),
        sites=["z", "q", "k", "v"],
        qk_fix=True,
        grad_drop=True,
        max_batch=mb,
    )
    cpu = time.process_time() - t
    peak = bp._peak()
    print(
        f"max_batch {mb}: CPU {cpu:.1f} s, peak RSS {peak / 2**30:.2f} GiB"
        f" (+{(peak - rss0) / 2**30:.2f} GiB over {rss0 / 2**30:.2f} GiB before)"
    )


if __name__ == "__main__":
    main()
