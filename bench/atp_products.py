"""Where attribution patching's time goes against its multiply-add bound, on the GPT-2-small-shaped model of
``bench_patching`` (batch 8 x 32, logit difference, AtP over ``z``), one thread.

Per round, in CPU time (the forms interleaved, the order flipped every round):

* ``reference``: the bound's product, ``(256, 768) @ (768, 3072)`` repeated on one weight (the faster of
  ``torch.matmul`` and oneDNN's packed matmul, ``bench_patching._cpu_gemm_rate``);
* ``chain``: every product of one forward at 256 rows (query, key, value, output, MLP in and out of each of the 12
  layers), each layer with weights of its own (85 M floats, more than the caches), each product's output the next
  one's input: the products alone as a forward meets them;
* ``atp``: one call of ``attribution_patching``, then a second call with its products timed by a dispatch mode
  (the ``mm`` / ``addmm`` / oneDNN linear calls); the rest is the first call's time less the products'.

Printed: each rate in GMAC per CPU-second, and the call's time split into its products (at their rate inside the
call, against the chain's and the reference's) and the rest, as multiples of the bound (65 GMAC at the reference's
rate).

    OMP_NUM_THREADS=1 python bench/atp_products.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_patching as bp  # noqa: E402
from _rounds import machine  # noqa: E402

from pypattern.patching import LogitDiff  # noqa: E402
from pypattern.patching.attribution import attribution_patching  # noqa: E402

_PRODUCTS = ("aten.mm.default", "aten.addmm.default", "mkldnn._linear_pointwise.default")


class _ProductTimer(TorchDispatchMode):
    """CPU time and multiply-adds of the matrix products dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu = 0.0
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not any(name.endswith(p) for p in _PRODUCTS):
            return func(*args, **(kwargs or {}))
        t = time.process_time()
        out = func(*args, **(kwargs or {}))
        self.cpu += time.process_time() - t
        x = args[1] if name.endswith("addmm.default") else args[0]
        self.macs += x.numel() * out.shape[-1]
        return out


def _chain(c: dict, rows: int, seed: int = 0):
    """The products of one forward over ``c``'s layers, each layer with weights of its own, as a function."""
    g = torch.Generator().manual_seed(seed)
    d, dm = c["d_model"], c["d_mlp"]
    hd = c["n_heads"] * c["d_head"]
    layers = [
        [torch.randn(d, hd, generator=g) * 0.03 for _ in range(3)]
        + [torch.randn(hd, d, generator=g) * 0.03, torch.randn(d, dm, generator=g) * 0.03]
        + [torch.randn(dm, d, generator=g) * 0.03]
        for _ in range(c["n_layers"])
    ]
    x0 = torch.randn(rows, d, generator=g)
    macs = c["n_layers"] * rows * (3 * d * hd + hd * d + 2 * d * dm)

    def run():
        x = x0
        for wq, wk, wv, wo, w_in, w_out in layers:
            x @ wq, x @ wk
            v = x @ wv
            x = ((v @ wo) @ w_in) @ w_out
        return x

    return run, macs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    c, B, T = bp.SCALE, bp.SCALE_B, bp.SCALE_T
    _, model = bp._scale_models()
    clean, corr, ans, wrong = bp._prompts(c["d_vocab"], B, T)
    bound_macs = bp.scale_bounds(c, B, T)["atp"]
    chain, chain_macs = _chain(c, B * T)

    def atp():
        return attribution_patching(model, clean, corr, metric=LogitDiff(ans, wrong), sites=["z"])

    atp()  # the first call of the process pays one-off costs
    chain()
    rows: dict[str, list[float]] = {k: [] for k in ("reference", "chain", "atp", "atp_products", "atp_rest")}
    product_macs = 0
    for r in range(args.rounds):
        forms = ["reference", "chain", "atp"]
        for form in forms if r % 2 == 0 else forms[::-1]:
            if form == "reference":
                rows["reference"].append(bp._cpu_gemm_rate())
            elif form == "chain":
                best = float("inf")
                for _ in range(3):
                    t = time.process_time()
                    chain()
                    best = min(best, time.process_time() - t)
                rows["chain"].append(chain_macs / best)
            else:
                t = time.process_time()
                atp()
                rows["atp"].append(time.process_time() - t)
                timer = _ProductTimer()  # a second call, its products timed
                with timer:
                    atp()
                rows["atp_products"].append(timer.cpu)
                rows["atp_rest"].append(rows["atp"][-1] - timer.cpu)
                product_macs = timer.macs
    print(f"[atp_products] {machine()}, {args.rounds} rounds; AtP over z at batch {B} x {T}")
    ref = statistics.median(rows["reference"])
    bound = bound_macs / ref
    p = statistics.median(rows["atp_products"])

    def rng(v, fmt="{:.1f}", scale=1.0):
        return f"{fmt.format(min(v) * scale)}-{fmt.format(max(v) * scale)}"

    print(
        f"reference product: {rng(rows['reference'], scale=1e-9)} GMAC/s (bound {bound:.3f} s, {bound_macs / 1e9:.1f} GMAC)"
    )
    print(f"chain of one forward's products: {rng(rows['chain'], scale=1e-9)} GMAC/s")
    print(
        f"AtP call: {rng(rows['atp'], '{:.3f}')} s, "
        f"{statistics.median(rows['atp']) / bound:.2f}x of the bound"
    )
    print(
        f"  products: {product_macs / 1e9:.1f} GMAC in {rng(rows['atp_products'], '{:.3f}')} s, "
        f"{product_macs / p / 1e9:.1f} GMAC/s, {p / bound:.2f}x of the bound"
    )
    print(
        f"  the rest: {rng(rows['atp_rest'], '{:.3f}')} s, {statistics.median(rows['atp_rest']) / bound:.2f}x of the bound"
    )


if __name__ == "__main__":
    main()
