"""The unembedding of a few final rows over GPT-2's vocabulary: the three forms of ``h (rows, 768) @ W_U (768,
50257)`` that :func:`pypattern.patching.engine.unembed_product` chooses between, timed against each other in one
run, one thread, float32: ``h @ W_U``, ``(W_U^T h^T)^T`` (a transposed view of the product of the transposes) and
oneDNN's matmul reading ``W_U`` in place (``torch.ops.mkldnn._linear_pointwise`` with ``W_U^T`` as its ``(out,
in)`` operand), beside the library's own choice.

Every form is checked against the float64 product before it is timed. Forms timed interleaved (``bench/_rounds.py``)
in CPU time, ``--rounds`` rounds per row count.

Bound: the product reads ``W_U`` (154 MB) and ``h`` once and writes the logits once, and does ``rows x 768 x
50257`` multiply-adds: the larger of the bytes at the copy bandwidth and the multiply-adds at the GEMM rate (the
faster of torch's matmul and oneDNN's packed one on ``(256, 768) @ (768, 3072)``), both measured in each round.

Run: ``OMP_NUM_THREADS=1 python bench/bench_unembed.py`` (``--rows 2,8,64`` for other row counts, ``--rounds``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from pypattern.models.packed import _ops_present, packed_gemm_enabled
from pypattern.patching.engine import unembed_product

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rounds import check_agree, cpu_time, interleaved  # noqa: E402
from bench_patching import _cpu_gemm_rate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,12,16,32,128")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d, V = args.d_model, args.vocab
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(d, V, generator=gen)
    src, dst = torch.randn(2**26), torch.empty(2**26)

    def copy_rate():
        t = min(cpu_time(lambda: dst.copy_(src)) for _ in range(3))
        return 2 * src.numel() * 4 / t  # read and write

    print(f"W_U ({d}, {V}) float32, one thread; oneDNN chosen for fixed weights: {packed_gemm_enabled()}")
    for rows in (int(r) for r in args.rows.split(",")):
        h = torch.randn(rows, d, generator=gen)
        forms = {
            "h @ W_U": lambda h=h: h @ W,
            "(W_U^T h^T)^T": lambda h=h: (W.T @ h.T).T,
        }
        if _ops_present():
            forms["oneDNN in place"] = lambda h=h: torch.ops.mkldnn._linear_pointwise(
                h, W.t(), None, "none", [], ""
            )
        forms["unembed_product"] = lambda h=h: unembed_product(h, W)
        want = h.double() @ W.double()
        for name, f in forms.items():  # every form computes the same product before any is timed
            check_agree(name, float((f().double() - want).abs().max() / want.abs().max()), 1e-5)
        macs = rows * d * V
        nbytes = 4 * (W.numel() + h.numel() + rows * V)  # read W_U and h once, write the logits once
        print(f"\n{rows} rows: {macs / 1e9:.3f} GMAC, {nbytes / 1e6:.0f} MB moved")
        interleaved(forms, args.rounds, macs, nbytes, _cpu_gemm_rate, copy_rate, digits=1)


if __name__ == "__main__":
    main()
