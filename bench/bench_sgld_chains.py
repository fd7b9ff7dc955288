"""One SGLD step of C chains in one call (:func:`pypattern.ops.sgld.sgld_chains_step_`) against the same step taken
chain by chain, by plain torch and by devinterp's optimizer, and against the bound of its memory traffic.

Work: one SGLD step, noise on, of C chains of one model, float64 and float32. ``params[t]`` and ``grads[t]`` are
``(C, *shape_t)`` (row c is chain c's tensor t), the anchors ``shape_t`` shared by the chains, every chain starting
at the anchors; hyperparameters as in bench/bench_sgld.py (step size 1e-4, nbeta 46.2, localization 100, no weight
decay, noise scale 1, no bounding box, no masks). Sizes:

- ``tiny``: 16 chains of a model with two tensors, 4x3 and 6x4 (12 and 24 entries, a small deep linear network);
- ``small``: 16 chains of 10 tensors of 1,000 entries (5 of shape 40x25, 5 of 1000);
- ``mid``: 8 chains of 1e6 entries in 10 tensors of 250x400.

Contenders, timed in the same run:

- ours: one ``sgld_chains_step_`` call with ``validate=False, check_finite=False`` (what the batched chain runner
  calls after its first step), and the public call with its defaults (every argument checked, flags looked at);
- per-chain fast path: ``sgld_step_`` once per chain on that chain's rows, through
  ``pypattern.sampling.optim.resolve_step_fn`` (``validate=False``, unchecked; what the runner called before);
- per-chain reference: the same loop on the ``reference`` backend (integer Philox in torch, the specification);
- torch loop: per chain and tensor, in-place torch ops with ``torch.randn_like`` noise;
- devinterp (peer, only where devinterp is importable): its ``SGLD`` optimizer (``devinterp.optim.sgld``, the
  sampler devinterp 1.3.2 and 2.0.1 use by default), one optimizer per chain over that chain's rows as
  ``nn.Parameter`` views, ``lr=step_size``, the same ``nbeta`` and ``localization``, ``noise_level=1``; ``.grad`` is
  set once, before timing, and each timed step calls ``.step()`` on every optimizer.

All contenders get the per-chain row views built once, before timing; a step's gradients are given (no forward or
backward is timed), and no contender's returned flags are reduced or looked at (except the validated call's own
check).

Bound: the bytes one step must move, read w, g, w0 and write w, 4 x itemsize per entry per chain, at the copy
bandwidth of ``Tensor.copy_`` moving the same byte count (half read, half written) measured in the same run. The
count takes one anchor read per chain, as the per-chain contenders do; ``sgld_chains_step_`` reads the shared
anchors once per call, (3C + 1) / 4C of the count (0.78 at C = 8), so at ``mid`` it can come in under the bound.

For ``tiny`` (576 entries in all) and ``small`` (160,000, held in cache) the work is far below any bandwidth
bound: the time is the fixed cost of the calls (Python, the dispatcher, the op's set-up per call and per tensor),
so the figure that matters is the time per step and per chain, not the fraction of the bound. ``mid`` (8e6
entries, 256 MB moved in float64) is past the caches that make ``small``'s copy fast; there the copy is the bound
that counts, and the noise (Philox4x32-10 and Box-Muller per entry) competes with it.

Run (CPU time per step, contenders interleaved round by round, order flipped every round; a markdown table of
medians and ranges over rounds)::

    OMP_NUM_THREADS=1 PYPATTERN_BENCH_THREADS=1 python bench/bench_sgld_chains.py [--rounds 5] [--sizes tiny,small]

or with pytest-benchmark (``pytest bench/bench_sgld_chains.py --benchmark-only``). With devinterp: the same
commands in a bench venv made by ``PYPATTERN_LINK=1 bash bench/envs/devinterp.sh``, e.g.
``OMP_NUM_THREADS=1 .bench-venvs/devinterp20/bin/python bench/bench_sgld_chains.py``; without it the devinterp rows
skip. Threads: ``PYPATTERN_BENCH_THREADS`` (default 1), see bench/conftest.py.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import pytest
import torch

from pypattern.ops.sgld import sgld_chains_step_, sgld_step_
from pypattern.sampling.optim import resolve_step_fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rounds import check_agree, machine  # noqa: E402

EPS, NBETA, LOC = 1e-4, 46.2, 100.0
HYPER = dict(step_size=EPS, nbeta=NBETA, localization=LOC, weight_decay=0.0, noise_scale=1.0)
SIZES = {  # name: (chains, shapes of one chain's tensors)
    "tiny": (16, [(4, 3), (6, 4)]),
    "small": (16, [(40, 25), (1000,)] * 5),
    "mid": (8, [(250, 400)] * 10),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Chains:
    """C chains of one model, all at the anchors: stacked parameters and gradients, each chain's rows of them (views,
    built once), the shared anchors and one seed per chain."""

    def __init__(self, size: str, dtype: torch.dtype):
        self.C, shapes = SIZES[size]
        gen = torch.Generator().manual_seed(0)
        self.anchors = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        self.params = [a.expand(self.C, *a.shape).clone() for a in self.anchors]
        self.grads = [torch.randn((self.C, *s), generator=gen, dtype=dtype) for s in shapes]
        self.seeds = [7919 * (c + 1) for c in range(self.C)]
        self.rows = [[p[c] for p in self.params] for c in range(self.C)]
        self.grad_rows = [[g[c] for g in self.grads] for c in range(self.C)]
        self.entries = sum(a.numel() for a in self.anchors)  # one chain's
        self.nbytes = 4 * self.anchors[0].element_size() * self.entries * self.C


# ----- the contenders: each returns a callable doing one step of all chains (its own step counter) -----------
def ours_fast(ch: Chains) -> Callable[[], object]:
    steps = itertools.count()
    return lambda: sgld_chains_step_(
        ch.params,
        ch.grads,
        ch.anchors,
        seeds=ch.seeds,
        step=next(steps),
        validate=False,
        check_finite=False,
        **HYPER,
    )


def ours_validated(ch: Chains) -> Callable[[], object]:
    steps = itertools.count()
    return lambda: sgld_chains_step_(
        ch.params, ch.grads, ch.anchors, seeds=ch.seeds, step=next(steps), **HYPER
    )


def per_chain_fast(ch: Chains) -> Callable[[], None]:
    step_fn = resolve_step_fn(ch.params[0].device)
    steps = itertools.count()

    def run():
        t = next(steps)
        for c in range(ch.C):
            step_fn(
                ch.rows[c],
                ch.grad_rows[c],
                ch.anchors,
                check=False,
                seed=ch.seeds[c],
                step=t,
                bounding_box=None,
                masks=None,
                **HYPER,
            )

    return run


def per_chain_reference(ch: Chains) -> Callable[[], None]:
    steps = itertools.count()

    def run():
        t = next(steps)
        for c in range(ch.C):
            sgld_step_(
                ch.rows[c],
                ch.grad_rows[c],
                ch.anchors,
                seed=ch.seeds[c],
                step=t,
                backend="reference",
                validate=False,
                check_finite=False,
                **HYPER,
            )

    return run


def torch_loop(ch: Chains, noise_scale: float = 1.0) -> Callable[[], None]:
    """Plain torch as one writes it: per chain and tensor, drift from in-place ops, then ``randn_like`` noise."""
    half, root = 0.5 * EPS, math.sqrt(EPS) * noise_scale

    def run():
        for c in range(ch.C):
            for w, g, a in zip(ch.rows[c], ch.grad_rows[c], ch.anchors):
                drift = torch.sub(w, a).mul_(half * LOC)
                drift.add_(g, alpha=half * NBETA)
                w.sub_(drift).add_(torch.randn_like(w), alpha=root)

    return run


def devinterp_sgld(ch: Chains, noise_level: float = 1.0) -> Callable[[], None]:
    """devinterp's SGLD optimizer, one per chain, over that chain's rows (``nn.Parameter`` views of the stacked
    tensors, so all contenders step the same memory); the gradients are set once."""
    pytest.importorskip("devinterp")
    from devinterp.optim.sgld import SGLD

    opts = []
    with warnings.catch_warnings():  # SGLD's deprecation note, and noise_level != 1 in the agreement check
        warnings.simplefilter("ignore")
        for c in range(ch.C):
            ps = [torch.nn.Parameter(w) for w in ch.rows[c]]
            for p, g in zip(ps, ch.grad_rows[c]):
                p.grad = g
            opts.append(SGLD(ps, lr=EPS, nbeta=NBETA, localization=LOC, noise_level=noise_level))

    def run():
        for opt in opts:
            opt.step()

    return run


def copy_bound(ch: Chains) -> Callable[[], object]:
    """``Tensor.copy_`` of the step's bytes: 2 x entries x C read, as many written."""
    n = 2 * ch.entries * ch.C
    src = torch.randn(n, dtype=ch.params[0].dtype)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


CONTENDERS = {  # name: (role, label, factory)
    "ours": ("ours", "pypattern sgld_chains_step_ (fast)", ours_fast),
    "ours_validated": ("ours", "pypattern sgld_chains_step_ (validated)", ours_validated),
    "per_chain_fast": ("reference", "per-chain sgld_step_ fast path", per_chain_fast),
    "per_chain_reference": ("reference", "per-chain sgld_step_ reference backend", per_chain_reference),
    "torch_loop": ("reference", "per-chain torch loop", torch_loop),
    "devinterp": ("peer", "devinterp SGLD, one optimizer per chain", devinterp_sgld),
    "copy": ("bound", "copy of the same bytes", copy_bound),
}


def devinterp_version() -> str | None:
    try:
        import importlib.metadata

        import devinterp  # noqa: F401

        return importlib.metadata.version("devinterp")
    except ImportError:
        return None


# ----- agreement: the contenders compute the same step -----------------------------------------------------------
def disagreements(size: str = "small", dtype: torch.dtype = torch.float64) -> dict[str, tuple[float, float]]:
    """Largest absolute difference of each contender's new parameters from ours (fast call) after one step from the
    same state, with its tolerance. Noise on: the validated call and the per-chain fast path (the same kernel and
    Philox stream: exact) and the reference backend (the same integers, float rounding of the transforms). Noise
    off: the torch loop and devinterp (their noise is torch's generator, equal to ours in distribution only)."""

    def stepped(make, noise_scale=None):
        """A fresh set of chains after one step (step 0) of ``make``, the timed code itself where the noise is on."""
        ch = Chains(size, dtype)
        if noise_scale is None:
            make(ch)()
        elif make is ours_fast:
            hyper = dict(HYPER, noise_scale=noise_scale)
            sgld_chains_step_(ch.params, ch.grads, ch.anchors, seeds=ch.seeds, step=0, **hyper)
        else:
            make(ch, noise_scale)()
        return ch.params

    def err(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    loose = 2e-6 if dtype == torch.float32 else 1e-7  # the noise is drawn in float32 in every backend
    tight = 1e-6 if dtype == torch.float32 else 1e-12
    with_noise, without = stepped(ours_fast), stepped(ours_fast, 0.0)
    out = {
        "ours_validated": (err(with_noise, stepped(ours_validated)), 0.0),
        "per_chain_fast": (err(with_noise, stepped(per_chain_fast)), 0.0),
        "per_chain_reference": (err(with_noise, stepped(per_chain_reference)), loose),
        "torch_loop": (err(without, stepped(torch_loop, 0.0)), tight),
    }
    if devinterp_version() is not None:
        out["devinterp"] = (err(without, stepped(devinterp_sgld, 0.0)), tight)
    return out


# ----- pytest-benchmark -------------------------------------------------------------------------------------------
PEDANTIC = {"tiny": (20, 200), "small": (20, 20), "mid": (8, 1)}  # rounds, calls per round
SLOW = {"per_chain_reference": {"tiny": (5, 1), "small": (5, 1), "mid": (3, 1)}}  # 30 ms to 1 s a call


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("size", list(SIZES))
def test_step(benchmark, size, dtype, contender):
    role, label, make = CONTENDERS[contender]
    ch = Chains(size, DTYPES[dtype])
    fn = make(ch)
    benchmark.group = f"sgld chains step, {size}: {ch.C} chains x {ch.entries} {dtype}"
    benchmark.extra_info.update(
        role=role,
        label=label,
        bytes=ch.nbytes,
        dtype=dtype,
        chains=ch.C,
        elements=ch.entries * ch.C,
        threads=torch.get_num_threads(),
    )
    rounds, iterations = SLOW.get(contender, PEDANTIC)[size]
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_contenders_compute_the_same_step(dtype):
    """The timed contenders are the same update: checked in the bench run itself."""
    for name, (e, tol) in disagreements("small", DTYPES[dtype]).items():
        assert e <= tol, (name, e, tol)


# ----- the table: interleaved rounds ------------------------------------------------------------------------------
def _cpu_per_call(fn: Callable[[], object], reps: int) -> float:
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def _reps_for(fn: Callable[[], object], target: float) -> int:
    """Calls per timing so that one timing lasts about ``target`` seconds of CPU time (at least one call)."""
    reps, spent = 1, 0.0
    while True:
        spent = _cpu_per_call(fn, reps) * reps
        if spent >= 0.02 or reps >= 1 << 20:
            break
        reps *= 4
    return max(1, math.ceil(target * reps / max(spent, 1e-9)))


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _spread(xs: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(statistics.median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"


def table(size: str, dtype: str, rounds: int, target: float) -> None:
    ch = Chains(size, DTYPES[dtype])
    names = [k for k in CONTENDERS if k != "devinterp" or devinterp_version() is not None]
    fns = {k: CONTENDERS[k][2](ch) for k in names}
    for fn in fns.values():
        fn()
    reps = {k: _reps_for(fn, target) for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 == 0 else reversed(names):
            times[k].append(_cpu_per_call(fns[k], reps[k]))
    bound = times["copy"]
    print(
        f"\n### {size}: {ch.C} chains x {ch.entries:,} entries in {len(ch.anchors)} tensors, {dtype}, "
        f"{ch.nbytes / 1e6:.3g} MB moved per step; bound (copy of those bytes) {_fmt(statistics.median(bound))}\n"
    )
    print(
        "| contender | calls per timing | time per step | per chain | x of the bound | speed-up of ours (fast) |"
    )
    print("|---|---|---|---|---|---|")
    for k in names:
        ts = times[k]
        xs = [t / b for t, b in zip(ts, bound)]
        up = (
            "-" if k == "copy" else _spread([t / o for t, o in zip(ts, times["ours"])], lambda x: f"{x:.2f}x")
        )
        print(
            f"| {CONTENDERS[k][1]} | {reps[k]} | {_spread(ts, _fmt)} | {_spread([t / ch.C for t in ts], _fmt)} | "
            f"{_spread(xs, lambda x: f'{x:.2f}')} | {up} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description="SGLD step of C chains: interleaved rounds, a markdown table.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of " + ", ".join(SIZES))
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of " + ", ".join(DTYPES))
    ap.add_argument("--target", type=float, default=0.2, help="CPU seconds per timing of one contender")
    args = ap.parse_args()
    sizes, dtypes = args.sizes.split(","), args.dtypes.split(",")
    bad = [s for s in sizes if s not in SIZES] + [d for d in dtypes if d not in DTYPES]
    if bad or args.rounds < 1:
        ap.error(f"unknown sizes or dtypes {bad}" if bad else "--rounds must be >= 1")
    torch.set_num_threads(int(os.environ.get("PYPATTERN_BENCH_THREADS", "1")))
    print(machine() + f", devinterp {devinterp_version() or 'not importable: its rows skipped'}")
    print(
        f"{time.strftime('%Y-%m-%d')}; CPU time per step (time.process_time), median and range over "
        f"{args.rounds} interleaved rounds; speed-up = contender's time / ours (fast), per round"
    )
    for d in dtypes:
        for name, (e, tol) in disagreements("small", DTYPES[d]).items():
            check_agree(f"{name} ({d})", e, tol)
    for size in sizes:
        for d in dtypes:
            table(size, d, args.rounds, args.target)


if __name__ == "__main__":
    main()
