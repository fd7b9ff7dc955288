"""The tanh GELU (GPT-2's ``gelu_new``) on the CPU: pypattern's kernel against torch's fused kernel (the reference
backend, what ``F.gelu(x, approximate="tanh")`` runs) and against the peer, Hugging Face's ``NewGELUActivation``
(the written-out formula GPT-2, GPT-J and Phi run in transformers; TransformerLens' ``gelu_new`` is the same
formula), on the same inputs, forward and backward, with the bound of the work: the bytes it must move at the
rate of torch's copy in the same run (forward: read x, write a new y, timed as ``x.clone()``; backward: read the
gradient and x, write a new result, timed as ``torch.add`` of the two). Every variant allocates its result, and so
do the bounds: at 10^7 elements the first touch of a fresh 40 MB result (page faults) is part of the work.

Work: an MLP's pre-activations of GPT-2-small at batch 8 x 32 (8 x 32 x 3072 = 786,432 elements; 3 MiB in float32,
resident in L2 or L3) and 10^7 elements (streamed from memory), of standard deviation 0.5 (freshly initialised
weights), 5 and 30 (torch's CPU kernel slows down as its arguments grow).

Run: ``OMP_NUM_THREADS=1 python bench/bench_activations.py`` (a table: each round times every variant once, in
turn, in CPU time; medians over the rounds with ranges), or ``pytest bench/bench_activations.py`` (pytest-benchmark
of the same variants at one size). Measured figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from pypattern.ops.activations import SQRT_2_OVER_PI, gelu_tanh, gelu_tanh_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rounds import cpu_model  # noqa: E402

try:
    from transformers.activations import NewGELUActivation

    HAS_HF = True
except ImportError:  # pragma: no cover - transformers is a dependency of the set-up
    HAS_HF = False

SIZES = {"8x32x3072": (8, 32, 3072), "1e7": (10_000_000,)}
SCALES = (0.5, 5.0, 30.0)


def _inputs(shape, scale, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    return x, torch.randn(shape, generator=g).to(dtype)


def variants(x: torch.Tensor, gr: torch.Tensor) -> dict:
    """name -> a call doing the work once (forward or backward)."""
    v = {
        "ours fwd": lambda: gelu_tanh(x, backend="cpp"),
        "torch fwd": lambda: F.gelu(x, approximate="tanh"),
        "bound fwd (copy)": lambda: x.clone(),
        "ours bwd": lambda: torch.ops.pypattern.gelu_tanh_backward(gr, x, SQRT_2_OVER_PI),
        "torch bwd": lambda: torch.ops.aten.gelu_backward(gr, x, approximate="tanh"),
        "bound bwd (copy + add)": lambda: torch.add(gr, x),
    }
    if HAS_HF:
        act = NewGELUActivation()
        v["HF NewGELU fwd"] = lambda: act(x)
        xg = x.clone().requires_grad_()
        y = act(xg)
        v["HF NewGELU bwd"] = lambda: torch.autograd.grad(y, xg, gr, retain_graph=True)
    return v


def check_variants(x: torch.Tensor, gr: torch.Tensor, v: dict) -> float:
    """Every variant other than a bound computes the same thing: forward variants the float64 formula at ``x``,
    backward variants its gradient (by autograd in float64) against ``gr``. Returns the largest difference
    relative to the largest value; raises if it is over 1e-5 (1e-12 in float64)."""
    x64 = x.double().requires_grad_()
    y64 = gelu_tanh_reference(x64)
    (g64,) = torch.autograd.grad(y64, x64, gr.double())
    y64 = y64.detach()
    worst = 0.0
    for name, f in v.items():
        if name.startswith("bound"):
            continue
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        want = y64 if "fwd" in name else g64
        err = float((out.double() - want).abs().max() / want.abs().max())
        if not err <= (1e-12 if x.dtype == torch.float64 else 1e-5):
            raise AssertionError(f"{name} differs from the float64 formula by {err:.2e} of the largest value")
        worst = max(worst, err)
    return worst


def _time(f, reps: int) -> float:
    t = time.process_time()
    for _ in range(reps):
        f()
    return (time.process_time() - t) / reps


def table(rounds: int = 7, dtype=torch.float32) -> list[str]:
    lines = [
        f"CPU {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {dtype}; CPU time per "
        f"call, median over {rounds} rounds (range), every variant once per round in turn",
        "",
        "| size | std | variant | time | x of bound | ours faster by |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for size, shape in SIZES.items():
        for scale in SCALES:
            x, gr = _inputs(shape, scale, dtype)
            ref = gelu_tanh_reference(x.double())
            err = (gelu_tanh(x, backend="cpp").double() - ref).abs().max().item()
            v = variants(x, gr)
            check_variants(x, gr, v)  # before any timing
            n = x.numel()
            reps = max(3, int(2e7 // n))
            for f in v.values():
                f()
            times = {k: [] for k in v}
            for _ in range(rounds):
                for k, f in v.items():
                    times[k].append(_time(f, reps))
            med = {k: statistics.median(t) for k, t in times.items()}
            for k, t in times.items():
                kind = "fwd" if "fwd" in k else "bwd"
                bound = med[f"bound {kind} (copy)" if kind == "fwd" else "bound bwd (copy + add)"]
                ours = med[f"ours {kind}"]
                vs = "" if k.startswith(("ours", "bound")) else f"{med[k] / ours:.1f}x"
                lines.append(
                    f"| {size} | {scale} | {k} | {med[k] * 1e3:.3f} ms ({min(t) * 1e3:.3f}-{max(t) * 1e3:.3f}) "
                    f"| {med[k] / bound:.2f} | {vs} |"
                )
            lines.append(f"| {size} | {scale} | max abs error of ours vs float64 formula | {err:.1e} | | |")
    return lines


# ----- pytest-benchmark ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work():
    return _inputs(SIZES["8x32x3072"], 5.0)


@pytest.mark.parametrize(
    "name",
    [
        "ours fwd",
        "torch fwd",
        "HF NewGELU fwd",
        "bound fwd (copy)",
        "ours bwd",
        "torch bwd",
        "HF NewGELU bwd",
        "bound bwd (copy + add)",
    ],
)
def test_gelu(benchmark, work, name):
    x, gr = work
    v = variants(x, gr)
    if name not in v:
        pytest.skip("peer Hugging Face NewGELUActivation: transformers is not importable here")
    assert torch.allclose(gelu_tanh(x, backend="cpp"), gelu_tanh_reference(x), atol=2e-6)
    check_variants(x, gr, {name: v[name]})
    kind = "fwd" if "fwd" in name else "bwd"
    role = {"ours": "ours", "torch": "reference", "HF": "peer", "bound": "bound"}[name.split()[0]]
    benchmark.group = f"tanh GELU {kind}, {x.numel()} float32 elements (std 5)"
    # bytes moved: forward reads x and writes y; backward reads the gradient and x and writes the result
    benchmark.extra_info.update(
        role=role, label=name, elements=x.numel(), bytes=(8 if kind == "fwd" else 12) * x.numel()
    )
    benchmark(v[name])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--float64", action="store_true")
    a = p.parse_args()
    print("\n".join(table(a.rounds, torch.float64 if a.float64 else torch.float32)))
