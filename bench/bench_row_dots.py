"""The edge-score contraction of EAP and EAP-IG (:func:`pypattern.ops.dots.row_dots`) at GPT-2-small shape: every
attention layer's source differences ``(B, n, T*d)`` (n = 1 + 13 l sources upstream of layer l) against its 36 head
inputs' gradients, split as the engine holds them (query, key and value, 12 each), batch 8 x 32, d 768, float32, one
thread, CPU time. Forms timed interleaved in one run, each over all 12 layers:

- ``row_dots``: the C++ kernel, the three gradient tensors read in place;
- ``bmm per input kind``: ``torch.bmm`` (MKL) once per query/key/value tensor, as the engine did before the kernel;
- ``bmm concatenated``: the reference, ``torch.bmm`` with the three tensors concatenated (the copy included);
- ``einsum``: ``torch.einsum("bnk,bvk->bnv")`` per tensor, the form of a straightforward torch implementation.

auto-circuit has no separate step for it: its EAP differentiates edge masks, and this contraction happens inside
that backward (``bench/bench_circuits.py`` times auto-circuit's whole EAP against ours).

Bound: the multiply-adds (``sum_l n_l x 36 x B x T x d``, 6.2 GMAC) at the rate of a ``(256, 768) @ (768, 3072)``
product (the faster of torch's matmul and oneDNN's packed one, as in ``bench/bench_patching.py``: the GEMM rate this
CPU reaches on a well-shaped product, measured in the same run), or the bytes that must
be read (every source row once per layer, the gradients once) at the copy bandwidth measured in the same run (a
``copy_`` of 256 MiB), whichever is larger.

Run: ``OMP_NUM_THREADS=1 python bench/bench_row_dots.py`` (``--rounds``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from pypattern.ops.dots import row_dots, row_dots_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rounds import check_agree, cpu_time, interleaved  # noqa: E402
from bench_patching import _cpu_gemm_rate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    B, T, d, H = 8, 32, 768, 12
    K = T * d
    gen = torch.Generator().manual_seed(0)
    n_all = 1 + (args.layers - 1) * (H + 1)
    D = torch.randn(n_all, B, T, d, generator=gen)  # the engine's (n_src, B, T, d)
    grads = [[torch.randn(H, B, T, d, generator=gen) for _ in range(3)] for _ in range(args.layers)]
    ns = [1 + layer * (H + 1) for layer in range(args.layers)]
    macs = sum(n * 3 * H for n in ns) * B * K
    bytes_read = sum(n for n in ns) * B * K * 4 + args.layers * 3 * H * B * K * 4

    def a_of(n):
        return D[:n].transpose(0, 1).reshape(B, n, K)

    def g_of(G):
        return G.transpose(0, 1).reshape(B, H, K)

    forms = {
        "row_dots": lambda: [row_dots(a_of(n), [g_of(G) for G in Gs]) for n, Gs in zip(ns, grads)],
        "bmm per input kind": lambda: [
            [torch.bmm(a_of(n), g_of(G).transpose(1, 2)) for G in Gs] for n, Gs in zip(ns, grads)
        ],
        "bmm concatenated": lambda: [
            row_dots_reference(a_of(n), [g_of(G) for G in Gs]) for n, Gs in zip(ns, grads)
        ],
        "einsum": lambda: [
            [torch.einsum("bnk,bvk->bnv", a_of(n), g_of(G)) for G in Gs] for n, Gs in zip(ns, grads)
        ],
    }
    src, dst = torch.randn(2**26), torch.empty(2**26)
    gemm_rate = (
        _cpu_gemm_rate  # the faster of torch's matmul and oneDNN's packed one, as the patching bench's bound
    )

    def copy_rate():
        t = min(cpu_time(lambda: dst.copy_(src)) for _ in range(3))
        return 2 * src.numel() * 4 / t  # read and write

    # agreement of every form, in float32, with float64 on the first layers (relative to the largest product)
    ref = [
        row_dots_reference(a_of(n).double(), [g_of(G).double() for G in Gs]) for n, Gs in zip(ns[:3], grads)
    ]
    for name, f in forms.items():
        got = [torch.cat(r, -1) if isinstance(r, (list, tuple)) else r for r in f()[:3]]
        err = max(float(((g.double() - r).abs() / r.abs().max()).max()) for g, r in zip(got, ref))
        print(f"{name} against float64: {err:.1e} of the largest product")
        check_agree(name, err, 1e-5)
    print(
        f"{args.layers} layers, batch {B} x {T}, d {d}: {macs / 1e9:.2f} GMAC, {bytes_read / 2**20:.0f} MiB read"
    )
    interleaved(forms, args.rounds, macs, bytes_read, gemm_rate, copy_rate, digits=0)


if __name__ == "__main__":
    main()
