"""The attention of exact activation patching's recomputed positions (:func:`pypattern.ops.attention.prefix_attention`)
at GPT-2-small shape: for each patched position p of a 32-token prompt, the cells' queries at positions p .. 31 over
the target run's cached keys at 0 .. p - 1 and their own at p .. 31 (causal), batch 8, 12 heads of 64, float32, one
thread, CPU time; ``--cells`` cells per call (the engine batches cells that enter at one position), every position
once per layer, 12 layers. Forms timed interleaved in one run:

- ``prefix_attention``: the C++ kernel, operands read in place (keys and values as the target run caches them,
  ``(B, T, H, dh)``, sliced to the prefix);
- ``torch (head-major bmm)``: the engine's torch form (queries, keys and values laid out head-major, each cell's
  cached and own keys copied into one tensor, ``bmm`` for the scores and the mix, ``masked_fill`` and ``softmax``);
- ``reference``: :func:`~pypattern.ops.attention.prefix_attention_reference` (einsums, the specification);
- ``torch SDPA``: the peer form, ``torch.nn.functional.scaled_dot_product_attention`` with the boolean mask, on the
  keys laid out as Hugging Face's and TransformerLens' attention would hold them (cached and own concatenated per
  cell, heads first).

Bound: the multiply-adds that must be done (the scores and the mix over the keys each query may attend, ``2 x dh``
per pair) at the rate of a ``(256, 768) @ (768, 3072)`` product measured in the same run (the faster of torch's
matmul and oneDNN's packed one, as in ``bench/bench_patching.py``), or the bytes that must move (queries, the cells'
own keys and values and the output once, the shared keys and values once per call) at the copy bandwidth measured
in the same run, whichever is larger.

Run: ``OMP_NUM_THREADS=1 python bench/bench_prefix_attention.py`` (``--rounds``, ``--cells``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from pypattern.ops.attention import prefix_attention, prefix_attention_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rounds import check_agree, cpu_time, interleaved  # noqa: E402
from bench_patching import _cpu_gemm_rate  # noqa: E402


def torch_head_major(q, kp, vp, kn, vn, mask, scale):
    """The engine's torch form: head-major layout, each cell's keys in one tensor, bmm, masked softmax, bmm."""
    C, B, Rq, H, dh = q.shape
    P = kp.shape[1]
    Tk = P + kn.shape[2]
    qt = q.permute(1, 3, 0, 2, 4).reshape(B * H * C, Rq, dh)

    def keys(shared, own):
        out = torch.empty(B, H, C, Tk, dh, dtype=q.dtype)
        out[:, :, :, :P] = shared.permute(0, 2, 1, 3)[:, :, None]
        out[:, :, :, P:] = own.permute(1, 3, 0, 2, 4)
        return out.view(B * H * C, Tk, dh)

    s = torch.bmm(qt, keys(kp, kn).transpose(1, 2)) * scale
    pat = torch.softmax(s.view(B, H, C, Rq, Tk).masked_fill(mask, float("-inf")), -1)
    z = torch.bmm(pat.view(B * H * C, Rq, Tk), keys(vp, vn))
    return z.view(B, H, C, Rq, dh).permute(2, 0, 3, 1, 4).reshape(C, B, Rq, H, dh)


def torch_sdpa(q, kp, vp, kn, vn, mask, scale):
    """The peer form: keys concatenated per cell, heads first, SDPA with a boolean mask (True: attend)."""
    C, B, Rq, H, dh = q.shape
    P = kp.shape[1]

    def keys(shared, own):
        both = torch.cat([shared.unsqueeze(0).expand(C, *shared.shape), own], 2)  # (C, B, Tk, H, dh)
        return both.permute(0, 1, 3, 2, 4).reshape(C * B, H, P + own.shape[2], dh)

    z = F.scaled_dot_product_attention(
        q.permute(0, 1, 3, 2, 4).reshape(C * B, H, Rq, dh),
        keys(kp, kn),
        keys(vp, vn),
        attn_mask=~mask,
        scale=scale,
    )
    return z.view(C, B, H, Rq, dh).permute(0, 1, 3, 2, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cells", type=int, default=1)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    B, T, H, dh, C = 8, 32, 12, 64, args.cells
    gen = torch.Generator().manual_seed(0)
    cached_k = torch.randn(B, T, H, dh, generator=gen)  # the target run's keys and values, (B, T, H, dh)
    cached_v = torch.randn(B, T, H, dh, generator=gen)
    calls, macs, nbytes = [], 0, 0
    for p in range(T):
        Rq = T - p
        q = torch.randn(C, B, Rq, H, dh, generator=gen)
        kn, vn = torch.randn(C, B, Rq, H, dh, generator=gen), torch.randn(C, B, Rq, H, dh, generator=gen)
        mask = torch.arange(T)[None, :] > torch.arange(p, T)[:, None]
        calls.append((q, cached_k[:, :p], cached_v[:, :p], kn, vn, mask, dh**-0.5))
        macs += C * B * H * 2 * dh * int((~mask).sum())
        nbytes += 4 * (4 * q.numel() + 2 * B * p * H * dh)
    macs *= args.layers
    nbytes *= args.layers

    def form(f):
        return lambda: [f(*c) for _ in range(args.layers) for c in calls]

    forms = {
        "prefix_attention": form(prefix_attention),
        "torch (head-major bmm)": form(torch_head_major),
        "reference": form(prefix_attention_reference),
        "torch SDPA": form(torch_sdpa),
    }
    src, dst = torch.randn(2**26), torch.empty(2**26)
    gemm_rate = (
        _cpu_gemm_rate  # the faster of torch's matmul and oneDNN's packed one, as the patching bench's bound
    )

    def copy_rate():
        t = min(cpu_time(lambda: dst.copy_(src)) for _ in range(3))
        return 2 * src.numel() * 4 / t

    # agreement of every form with a float64 reference on a few calls
    for name, f in (
        ("prefix_attention", prefix_attention),
        ("torch (head-major bmm)", torch_head_major),
        ("torch SDPA", torch_sdpa),
    ):
        err = 0.0
        for c in calls[::8]:
            want = prefix_attention_reference(
                *(t.double() if t.is_floating_point() else t for t in c[:6]), c[6]
            )
            err = max(err, float((f(*c).double() - want).abs().max()))
        print(f"{name} against float64: max |error| {err:.1e}")
        check_agree(name, err, 1e-4)
    print(
        f"{args.layers} layers x {T} positions, {C} cell(s) per call, batch {B}, {H} heads of {dh}: "
        f"{macs / 1e9:.2f} GMAC (causal), {nbytes / 2**20:.0f} MiB moved"
    )
    interleaved(forms, args.rounds, macs, nbytes, gemm_rate, copy_rate, digits=1)


if __name__ == "__main__":
    main()
