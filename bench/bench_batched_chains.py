"""Batched against sequential chains: the time per chain-step of ``pypattern.sample`` with ``batched=True`` (the
chains' parameters stacked, one ``vmap``-ed forward and backward and one fused step call per step) and with
``batched=False`` (one chain after another, each with its own optimizer), on the same models, chains and data, in
one run. These figures are what ``batched=None`` chooses by (``BATCHED_MAX_PARAMS``, ``BATCHED_MIN_CHAINS`` in
``pypattern/sampling/runner.py``).

Work: SGLD at a fixed step (1e-4, nbeta 100, localization 100, no burn-in), ``--steps`` draws of one step each, on

- ``mlp22k``: a 64-256-16 float32 MLP (tanh) on random regression data (batches of 64, mean squared error);
- ``mlp99k``: a 128-512-64 float32 MLP on the same kind of data;
- ``mlp263k``, ``mlp525k``, ``mlp1m``: 256-512-256, 512-512-512 and 512-1024-512 float32 MLPs (263k, 525k and 1.05
  million parameters) on the same kind of data;
- ``transformer``: pypattern's ``Transformer`` for the built-in induction task (d_model 32, 2 heads, 2 layers),
  batches of 16 sequences (next-token cross-entropy),

with 4 and 20 chains (``--chains``). Both modes give the same draws for the same seed (checked: the loss traces agree to float
rounding). Each round runs every (model, chains, mode) once, the modes' order flipped every round; the figure is
the marginal CPU time per chain and step (a run of ``--steps`` draws less one of 10, over the steps between, so
that the runs' set-up cancels), median (range) over rounds, and the ratio sequential / batched per round.

    OMP_NUM_THREADS=1 python bench/bench_batched_chains.py [--rounds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

SIZES = {
    "mlp22k": (64, 256, 16),
    "mlp99k": (128, 512, 64),
    "mlp263k": (256, 512, 256),
    "mlp525k": (512, 512, 512),
    "mlp1m": (512, 1024, 512),
}
MODELS = (*SIZES, "transformer")
SHORT = 10  # steps of the short run whose time is taken off (the runs' set-up)


def make(name: str):
    """(model, loader, number of parameters) for ``name``."""
    import pypattern as pp

    g = torch.Generator().manual_seed(0)
    if name.startswith("mlp"):
        d_in, hidden, d_out = SIZES[name]
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)
        )
        x = torch.randn(512, d_in, generator=g)
        y = torch.randn(512, d_out, generator=g)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    else:
        task = pp.InductionTask(d_vocab=16, seq_len=13)
        model = pp.Transformer(task.model_config(d_model=32, n_heads=2, n_layers=2, seed=0))
        tokens = task.sample(256, seed=0).tokens
        loader = torch.utils.data.DataLoader(tokens, batch_size=16)
    return model, loader, sum(p.numel() for p in model.parameters())


def run(model, loader, chains: int, steps: int, batched: bool):
    import pypattern as pp

    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pp.sample(
            model,
            loader,
            num_chains=chains,
            num_draws=steps,
            num_burnin_steps=0,
            step_size=1e-4,
            nbeta=100.0,
            localization=100.0,
            batched=batched,
            seed=1,
            quiet=True,
        )
    return time.process_time() - t0, out.loss_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--chains", default="4,20", help="comma-separated chain counts")
    a = ap.parse_args()
    models = a.models.split(",")
    try:
        a.chains = [int(c) for c in a.chains.split(",")]
    except ValueError:
        ap.error(f"--chains: {a.chains!r} is not a comma-separated list of ints")
    if any(c < 2 for c in a.chains):
        ap.error(f"--chains: every count must be >= 2, got {a.chains}")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: {unknown} are not among {list(MODELS)}")
    if a.rounds < 1 or a.steps <= SHORT:
        ap.error(f"--rounds must be >= 1 and --steps > {SHORT}, got {a.rounds}, {a.steps}")
    from _rounds import machine

    torch.set_num_threads(1)
    print(machine(), flush=True)
    print("| model (parameters) | chains | batched, ms per chain-step | sequential | sequential / batched |")
    print("| --- | --- | --- | --- | --- |")
    for name in models:
        model, loader, n = make(name)
        for chains in a.chains:
            run(model, loader, chains, 2, True)  # warm-up of both modes
            run(model, loader, chains, 2, False)
            t = {True: [], False: []}
            traces = {}
            for r in range(a.rounds):
                for b in (True, False) if r % 2 == 0 else (False, True):
                    # the marginal cost of a step: set-up (the initial loss, optimizers, checks) cancels
                    s, trace = run(model, loader, chains, a.steps, b)
                    s0, _ = run(model, loader, chains, SHORT, b)
                    t[b].append(1e3 * (s - s0) / (chains * (a.steps - SHORT)))
                    traces[b] = trace
            diff = float(np.abs(traces[True] - traces[False]).max())
            scale = float(np.abs(traces[False]).max())
            if not diff <= 1e-4 * max(scale, 1.0):
                raise SystemExit(
                    f"{name}, {chains} chains: batched and sequential traces differ by {diff:.3g}"
                )
            ratio = [x / y for x, y in zip(t[False], t[True])]

            def cell(xs):
                return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

            print(
                f"| {name} ({n}) | {chains} | {cell(t[True])} | {cell(t[False])} | {cell(ratio)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
