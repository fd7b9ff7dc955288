"""The destination-input sums of exact edge patching (:func:`pypattern.ops.sums.signed_sums`) on a pruning point's
own workload: the engine of ``bench_circuits.py`` at GPT-2-small shape (12 layers, d 768, random weights, batch 8 x
32, float32; ``--shape bench`` for the bench model) evaluates the bench's point (a random 5% circuit, its complement
patched; ``--points 10``: ten circuits in one call), and every ``signed_sums`` call it makes is recorded (about 370
inputs of (8, 32, 768) from about 1,600 source blocks at GPT-2 shape, one call per stage). One thread, CPU time;
forms timed interleaved in one run, each over all the recorded calls:

- ``signed_sums``: the op as the engine calls it (validation, then the C++ kernel);
- ``kernel alone``: ``torch.ops.pypattern.signed_sums_`` on the same lists (the op's Python layer left out);
- ``chain of adds``: ``torch.add(base, t0, alpha=s0, out=o)`` then ``o.add_(t, alpha=s)`` per term, as the
  engine did before the op;
- ``reference``: ``backend="reference"``, one fresh tensor per term.

Bound: the bytes that must move, per call every distinct term and base read once and every output written once
(the chain reads each term once per use and reads and writes each output once per term), at the faster of two
copies of 256 MiB measured in the same round (read and write counted): torch's ``copy_``, whose stores go through
the cache (each destination line is read before it is written, so it moves a third more than it counts), and a
copy with streamed stores (``signed_sums`` of one output with no terms).

Run: ``OMP_NUM_THREADS=1 python bench/bench_signed_sums.py`` (``--rounds``, ``--shape``, ``--points``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _rounds import machine
from bench_circuits import CFG, GPT2_CFG, make_setup, point_circuit

import pypattern.circuits.engine as engine_module
from pypattern.circuits import edges
from pypattern.circuits.engine import prepare_runs
from pypattern.ops.sums import signed_sums


def cpu_time(f) -> float:
    t0 = time.process_time()
    f()
    return time.process_time() - t0


def record(cfg: dict, points: int) -> list[tuple]:
    """The ``signed_sums`` calls of one pruning point (or ``points`` points in one call): ``(base, terms, offsets,
    signs, out)`` each, ``out`` fresh contiguous tensors."""
    model, clean, corr, metric = make_setup(cfg=cfg)
    eng, _ = prepare_runs(model, edges(model), clean, corr, metric)
    if points == 1:
        masks = ~point_circuit(eng.graph)[None]
    else:
        masks = ~(torch.rand(points, len(eng.graph), generator=torch.Generator().manual_seed(0)) < 0.05)
    calls = []

    def recorder(base, terms, offsets, signs, *, out=None, backend=None):
        calls.append(
            (list(base), list(terms), list(offsets), list(signs), [torch.empty_like(o) for o in out])
        )
        return signed_sums(base, terms, offsets, signs, out=out, backend=backend)

    engine_module.signed_sums = recorder
    try:
        eng.run(masks)
    finally:
        engine_module.signed_sums = signed_sums
    return [c for c in calls if c[0]]


def chain(base, terms, offsets, signs, out) -> None:
    for p, o in enumerate(out):
        i0, i1 = offsets[p], offsets[p + 1]
        if i1 == i0:
            o.copy_(base[p])
            continue
        torch.add(base[p], terms[i0], alpha=signs[i0], out=o)
        for i in range(i0 + 1, i1):
            o.add_(terms[i], alpha=signs[i])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", choices=("gpt2", "bench"), default="gpt2")
    ap.add_argument("--points", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    calls = record(GPT2_CFG if args.shape == "gpt2" else CFG, args.points)
    item = calls[0][0][0].element_size()
    n_out = sum(len(c[0]) for c in calls)
    n_terms = sum(len(c[1]) for c in calls)
    distinct = sum(len({t.data_ptr() for t in c[1]}) + len({b.data_ptr() for b in c[0]}) for c in calls)
    must = sum(
        (len({t.data_ptr() for t in c[1]}) + len({b.data_ptr() for b in c[0]}) + len(c[0])) * c[0][0].numel()
        for c in calls
    )
    must *= item
    chain_bytes = sum((len(c[1]) * 3 + len(c[0])) * c[0][0].numel() for c in calls) * item

    forms = {
        "signed_sums": lambda: [signed_sums(b, t, o_, s, out=out) for b, t, o_, s, out in calls],
        "kernel alone": lambda: [
            torch.ops.pypattern.signed_sums_(out, b, t, o_, s) for b, t, o_, s, out in calls
        ],
        "chain of adds": lambda: [chain(b, t, o_, s, out) for b, t, o_, s, out in calls],
        "reference": lambda: [
            signed_sums(b, t, o_, s, out=out, backend="reference") for b, t, o_, s, out in calls
        ],
    }
    # agreement: every form equals the chain bit for bit
    forms["chain of adds"]()
    want = [[o.clone() for o in c[4]] for c in calls]
    for k, f in forms.items():
        f()
        same = all(torch.equal(o, w) for c, ws in zip(calls, want) for o, w in zip(c[4], ws))
        print(f"{k}: equal to the chain of adds bit for bit: {same}")
        if not same:
            raise SystemExit(f"{k} differs from the chain of adds; nothing timed")
    src, dst = torch.randn(2**26), torch.empty(2**26)

    def copy_rates():
        t = min(cpu_time(lambda: dst.copy_(src)) for _ in range(3))
        ts = min(cpu_time(lambda: signed_sums([src], [], [0, 0], [], out=[dst])) for _ in range(3))
        return 2 * src.numel() * 4 / t, 2 * src.numel() * 4 / ts  # read and write

    print(
        f"{args.shape} shape, {args.points} point(s): {len(calls)} calls, {n_out} outputs of "
        f"{tuple(calls[0][0][0].shape)}, {n_terms} terms ({distinct} distinct blocks per call, bases included); "
        f"{must / 1e9:.3f} GB must move, the chain moves {chain_bytes / 1e9:.3f} GB"
    )
    print(machine(), flush=True)
    times = {k: [] for k in forms}
    bounds = []
    for r in range(args.rounds):
        bw_copy, bw_stream = copy_rates()
        bw = max(bw_copy, bw_stream)
        bounds.append(must / bw)
        order = list(forms) if r % 2 == 0 else list(reversed(forms))
        for k in order:
            times[k].append(cpu_time(forms[k]))
        print(
            f"round {r}: copy_ {bw_copy / 1e9:.1f} GB/s, streamed copy {bw_stream / 1e9:.1f} GB/s, bound "
            f"{bounds[-1] * 1e3:.1f} ms; " + ", ".join(f"{k} {times[k][-1] * 1e3:.1f} ms" for k in forms),
            flush=True,
        )
    print(
        "\nform: CPU time (range over rounds), x of the bound (median, range over rounds), x of signed_sums"
    )
    for k, ts in times.items():
        xs = [t / b for t, b in zip(ts, bounds)]
        rel = [t / s for t, s in zip(ts, times["signed_sums"])]
        print(
            f"{k}: {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f} ms, {statistics.median(xs):.2f}x "
            f"({min(xs):.2f}-{max(xs):.2f}) of the bound, {statistics.median(rel):.2f}x "
            f"({min(rel):.2f}-{max(rel):.2f}) of signed_sums"
        )


if __name__ == "__main__":
    main()
