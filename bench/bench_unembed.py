"""The unembedding of a few final rows over GPT-2's vocabulary: the three forms of ``h (rows, 768) @ W_U (768,
50257)`` that :func:`pypattern.patching.engine.unembed_product` chooses between, timed against each other in one
run, one thread, float32: ``h @ W_U``, ``(W_U^T h^T)^T`` (a transposed view of the product of the transposes) and
oneDNN's matmul reading ``W_U`` in place (``torch.ops.mkldnn._linear_pointwise`` with ``W_U^T`` as its ``(out,
in)`` operand), beside the library's own choice.

Bound: the product reads ``W_U`` (154 MB) once and does ``rows x 768 x 50257`` multiply-adds; the line prints both
the multiply-add rate and the bytes rate of each form.

Run: ``OMP_NUM_THREADS=1 python bench/bench_unembed.py`` (``--rows 2,8,64`` for other row counts).
"""

from __future__ import annotations

import argparse

import torch

from pypattern.models.packed import _best_of_interleaved, _ops_present, packed_gemm_enabled
from pypattern.patching.engine import unembed_product


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,12,16,32,128")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--d-model", type=int, default=768)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d, V = args.d_model, args.vocab
    W = torch.randn(d, V, generator=torch.Generator().manual_seed(0))
    print(f"W_U ({d}, {V}) float32, one thread; oneDNN chosen for fixed weights: {packed_gemm_enabled()}")
    for rows in (int(r) for r in args.rows.split(",")):
        h = torch.randn(rows, d)
        forms = {
            "h @ W_U": lambda h=h: h @ W,
            "(W_U^T h^T)^T": lambda h=h: (W.T @ h.T).T,
        }
        if _ops_present():
            forms["oneDNN in place"] = lambda h=h: torch.ops.mkldnn._linear_pointwise(
                h, W.t(), None, "none", [], ""
            )
        forms["unembed_product"] = lambda h=h: unembed_product(h, W)
        times = _best_of_interleaved(list(forms.values()), reps=2, rounds=5)
        cells = []
        for name, t in zip(forms, times):
            t = t / 2
            cells.append(
                f"{name} {t * 1e3:.1f} ms ({rows * d * V / t / 1e9:.1f} GMAC/s, {W.numel() * 4 / t / 1e9:.1f} GB/s)"
            )
        print(f"{rows:4d} rows: " + "; ".join(cells))


if __name__ == "__main__":
    main()
