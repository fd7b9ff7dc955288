"""LLC estimation: pypattern against devinterp on the same work, in the same run.

Run in a bench venv that has devinterp (created by ``bash bench/envs/devinterp.sh``)::

    .bench-venvs/devinterp13/bin/python -m pytest -q bench/bench_llc.py --benchmark-only   # devinterp 1.3.2
    .bench-venvs/devinterp20/bin/python -m pytest -q bench/bench_llc.py --benchmark-only   # devinterp 2.0.1

Without devinterp (e.g. in .venv) the devinterp cases skip and the rest still runs.

Work
----
* MLP 128-256-256-10 (101,386 parameters) trained on a teacher task; 4 chains x 200 draws, batch 256, lr 1e-4,
  localization 100, nbeta = 256 / ln 256. The bound is the floor: one forward and one backward of the same batch
  per step (a forward is one multiply-add per weight per sample, 100,864 x 256; with the backward's two about
  3 x 101k x 256 = 78 M multiply-adds, 156 M flops, per step), timed in the same run, plus the
  SGLD update (4 passes over 101k floats, negligible). Reported: time per chain-step of each estimator, the
  floor, and the ratios.
* Normal crossing K = w1^2 w2^4 as devinterp's test builds it (x ~ N(0, 2^2), y = 0.25 N(0, 1), n = 1000, MSE,
  full batch, lr 4e-4, nbeta = n / ln n, localization 1): 10 chains x 3000 draws. Per-step overhead is everything
  in this case (the model has 2 parameters).

Both estimators start from the same weights on the same data; their estimates must agree within 2 standard
deviations (over chains), checked before anything is timed. Timing rounds are few (each is a full estimate) and
interleaved (ours, devinterp, then the other order); the rows give the minimum and the range over rounds, and
the CPU model; ratios come from the same run.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from pypattern import truth
from pypattern.sampling import estimate_llc

try:
    from importlib.metadata import version as _version

    import devinterp

    DEVINTERP = _version("devinterp")
except ImportError:  # pragma: no cover - the main venv has no devinterp
    devinterp = None
    DEVINTERP = None

needs_devinterp = pytest.mark.skipif(
    devinterp is None, reason="devinterp is not importable in this environment"
)
RESULTS: dict[str, dict] = {}
MLP = dict(num_chains=4, num_draws=200, lr=1e-4, localization=100.0, batch_size=256)
# multiply-adds of one chain-step of the MLP: a forward (one per weight per sample) and its backward (two)
MLP_STEP_MADDS = 3 * (128 * 256 + 256 * 256 + 256 * 10) * MLP["batch_size"]
NC = dict(num_chains=10, num_draws=3000, lr=4e-4, localization=1.0, n=1000, powers=(1, 2))


def _threads(n: int | None):
    torch.set_num_threads(n or os.cpu_count() or 1)


def _ce(model, data):
    x, y = data
    return nn.functional.cross_entropy(model(x), y)


def _mse(model, data):
    x, y = data
    return nn.functional.mse_loss(model(x), y)


# ---------------------------------------------------------------------------------------------------------------
# the work
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_task():
    torch.set_num_threads(1)
    model, ds = truth.make_teacher_task((128, 256, 256, 10), n=8192, seed=0)
    truth.train(model, ds, steps=400, batch_size=256, lr=1e-3, seed=0)
    return model, ds


def _mlp_loader(ds, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=MLP["batch_size"], shuffle=True, generator=g)


@pytest.fixture(scope="module")
def nc_task():
    g = torch.Generator().manual_seed(0)
    n = NC["n"]
    x = torch.randn(n, 1, generator=g) * 2.0
    y = 0.25 * torch.randn(n, 1, generator=g)
    model = truth.NormalCrossing(list(NC["powers"]))
    ds = torch.utils.data.TensorDataset(x, y)
    return model, ds


def _nc_loader(ds):
    return torch.utils.data.DataLoader(ds, batch_size=len(ds), shuffle=False)


# ---------------------------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------------------------
def _run_pypattern(model, loader, evaluate, kw, nbeta, batched=None, cores=1):
    r = estimate_llc(
        model,
        loader,
        loss_fn=evaluate,
        num_chains=kw["num_chains"],
        num_draws=kw["num_draws"],
        step_size=kw["lr"],
        localization=kw["localization"],
        nbeta=nbeta,
        seed=0,
        quiet=True,
        batched=batched,
        cores=cores,
        warn_nonstationary=False,
    )
    return r.llc_mean, r.llc_std


def _run_devinterp(model, loader, evaluate, kw, nbeta, cores=1):
    import copy

    model = copy.deepcopy(model)
    okw = dict(lr=kw["lr"], localization=kw["localization"], nbeta=nbeta)
    if DEVINTERP.startswith("1."):
        from devinterp.optim.sgld import SGLD
        from devinterp.slt.sampler import estimate_learning_coeff_with_summary

        out = estimate_learning_coeff_with_summary(
            model,
            loader,
            evaluate=evaluate,
            sampling_method=SGLD,
            optimizer_kwargs=okw,
            num_chains=kw["num_chains"],
            num_draws=kw["num_draws"],
            cores=cores,
            seed=0,
            verbose=False,
        )
        return float(out["llc/mean"]), float(out["llc/std"])
    return _run_devinterp2(model, loader, evaluate, kw, nbeta, cores)


def _run_devinterp2(model, loader, evaluate, kw, nbeta, cores):
    """devinterp 2.x takes a HuggingFace dataset of "input_ids" and a per-token loss (batch, seq - 1): each row
    holds a sample index, and the loss looks the sample up, so both libraries see the same data."""
    from datasets import Dataset
    from devinterp.slt.llc import llc

    del cores  # 2.x has no multi-process option; chains run one after another
    x, y = loader.dataset.tensors
    per_sample = nn.functional.cross_entropy if evaluate is _ce else nn.functional.mse_loss

    def loss_fn(m, input_ids):
        idx = input_ids[:, 0].long()
        out = per_sample(m(x[idx]), y[idx], reduction="none")
        return out.reshape(len(idx), -1).mean(dim=1, keepdim=True)

    ds = Dataset.from_dict({"input_ids": [[i, 0] for i in range(len(x))]}).with_format("torch")
    res = llc(
        model,
        ds,
        {},
        lr=kw["lr"],
        n_beta=nbeta,
        loss_fn=loss_fn,
        num_chains=kw["num_chains"],
        num_draws=kw["num_draws"],
        batch_size=loader.batch_size,
        localization=kw["localization"],
        num_init_loss_batches=max(4, kw["num_chains"]),
        device="cpu",
    )
    return float(res.llc_mean.values), float(res.llc_std.values)


def _time(fn, rounds):
    best, out = math.inf, None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Wall times of each of ``fns`` once per round, in turn, the order flipping every round (a change in load
    falls on all of them)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in list(fns) if r % 2 == 0 else list(reversed(fns)):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _range(ts: list[float], scale: float) -> str:
    return f"{min(ts) * scale:.4g}-{max(ts) * scale:.4g}"


def _floor_per_step(model, ds, rounds=5, steps=50):
    """One forward + backward of a batch-256 step, and a bare torch SGLD loop (torch.randn noise)."""
    x, y = ds.tensors[0][:256], ds.tensors[1][:256]
    params = list(model.parameters())
    best_fb, best_loop = math.inf, math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            for p in params:
                p.grad = None
            nn.functional.cross_entropy(model(x), y).backward()
        best_fb = min(best_fb, (time.perf_counter() - t) / steps)
    work = [p.detach().clone().requires_grad_() for p in params]
    anchors = [p.detach().clone() for p in params]
    names = [n for n, _ in model.named_parameters()]
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, work)), (x,))
            loss = nn.functional.cross_entropy(out, y)
            grads = torch.autograd.grad(loss, work)
            with torch.no_grad():
                for w, g, a in zip(work, grads, anchors):
                    w.add_(-0.5e-4 * (46.0 * g + 100.0 * (w - a)) + 1e-2 * torch.randn_like(w))
        best_loop = min(best_loop, (time.perf_counter() - t) / steps)
    return best_fb, best_loop


def _gemm_rate() -> float:
    """Multiply-adds per CPU second of the reference ``(256, 768) @ (768, 3072)`` product (bench_patching's)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_patching import _cpu_gemm_rate

    return _cpu_gemm_rate()


def _cpu() -> str:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _rounds import cpu_model

    return cpu_model()


def _report():
    if not RESULTS:
        return
    lines = [
        "",
        f"LLC benchmark (devinterp {DEVINTERP or 'not installed: peer cases skipped'}; torch {torch.__version__}):",
        "  *_ms: wall time per chain-step (floor: one forward + backward of the batch, the bound; bare_torch_sgld:"
        " a plain torch SGLD step, the reference; madds_bound_ms: a chain-step's multiply-adds at the GEMM rate; ours, devinterp: the whole estimate over its chain-steps);"
        " ours_s: wall time of the whole estimate; ours_over_floor: ours_ms / floor_ms;"
        " speedup_vs_devinterp: devinterp's time / ours; *_range: over rounds interleaved with the peer's",
    ]
    for k, v in RESULTS.items():
        lines.append(
            "  "
            + k
            + ": "
            + ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        )
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# MLP, one thread each
# ---------------------------------------------------------------------------------------------------------------
def test_mlp_one_thread(benchmark, mlp_task):
    model, ds = mlp_task
    _threads(1)
    steps = MLP["num_chains"] * MLP["num_draws"]
    nbeta = 256 / math.log(256)
    floor, bare = _floor_per_step(model, ds)
    fns = {
        "ours": lambda: _run_pypattern(model, _mlp_loader(ds), _ce, MLP, nbeta),
        "ours_sequential": lambda: _run_pypattern(model, _mlp_loader(ds), _ce, MLP, nbeta, batched=False),
    }
    ours, ours_std = fns["ours"]()
    if devinterp is not None:  # the same estimate before anything is timed
        fns["devinterp"] = lambda: _run_devinterp(model, _mlp_loader(ds), _ce, MLP, nbeta)
        di, di_std = fns["devinterp"]()
        assert abs(ours - di) <= 2 * max(ours_std, di_std), dict(llc=ours, llc_devinterp=di)
    times = _interleaved(fns, rounds=2)
    benchmark.pedantic(fns["ours"], rounds=1, iterations=1)
    t_ours = min(times["ours"])
    row = dict(
        threads=1,
        cpu=_cpu(),
        floor_ms=floor * 1e3,
        bare_torch_sgld_ms=bare * 1e3,
        ours_ms=t_ours / steps * 1e3,
        ours_ms_range=_range(times["ours"], 1e3 / steps),
        ours_sequential_ms=min(times["ours_sequential"]) / steps * 1e3,
        ours_over_floor=t_ours / steps / floor,
        madds_bound_ms=MLP_STEP_MADDS / _gemm_rate() * 1e3,
        llc=ours,
        llc_std=ours_std,
    )
    if devinterp is not None:
        t_di = min(times["devinterp"])
        row.update(
            devinterp_ms=t_di / steps * 1e3,
            devinterp_ms_range=_range(times["devinterp"], 1e3 / steps),
            speedup_vs_devinterp=t_di / t_ours,
            llc_devinterp=di,
            llc_std_devinterp=di_std,
        )
    RESULTS["mlp 101k, 1 thread"] = row
    benchmark.extra_info.update(row)
    _report()


def test_mlp_whole_machine(benchmark, mlp_task):
    """Each library's own multi-core option: ours ``cores=`` (chains in threads, one intra-op thread each), also
    shown with torch's threads instead (``cores=1``, ``set_num_threads(cores)``); devinterp's ``cores=``."""
    model, ds = mlp_task
    cores = os.cpu_count() or 1
    steps = MLP["num_chains"] * MLP["num_draws"]
    nbeta = 256 / math.log(256)
    _threads(cores)
    t_omp, _ = _time(lambda: _run_pypattern(model, _mlp_loader(ds), _ce, MLP, nbeta), rounds=2)
    _threads(1)
    t_ours, (ours, ours_std) = _time(
        lambda: _run_pypattern(model, _mlp_loader(ds), _ce, MLP, nbeta, cores=cores), rounds=2
    )
    benchmark.pedantic(
        lambda: _run_pypattern(model, _mlp_loader(ds), _ce, MLP, nbeta, cores=cores), rounds=1, iterations=1
    )
    row = dict(
        threads=cores,
        ours_ms=t_ours / steps * 1e3,
        ours_torch_threads_ms=t_omp / steps * 1e3,
        llc=ours,
        llc_std=ours_std,
    )
    if devinterp is not None:
        # devinterp 1.x's own multi-core option: one process per core (cores=...), one torch thread each;
        # 2.x has none: torch's threads
        _threads(1 if DEVINTERP.startswith("1.") else cores)
        t_di, (di, di_std) = _time(
            lambda: _run_devinterp(model, _mlp_loader(ds), _ce, MLP, nbeta, cores=cores), rounds=1
        )
        row.update(
            devinterp_ms=t_di / steps * 1e3,
            speedup_vs_devinterp=t_di / t_ours,
            llc_devinterp=di,
            llc_std_devinterp=di_std,
        )
        assert abs(ours - di) <= 2 * max(ours_std, di_std), row
    _threads(1)
    RESULTS[f"mlp 101k, whole machine ({cores} cores)"] = row
    benchmark.extra_info.update(row)
    _report()


# ---------------------------------------------------------------------------------------------------------------
# normal crossing, one thread each
# ---------------------------------------------------------------------------------------------------------------
def test_normal_crossing_one_thread(benchmark, nc_task):
    model, ds = nc_task
    _threads(1)
    n = NC["n"]
    nbeta = n / math.log(n)
    steps = NC["num_chains"] * NC["num_draws"]
    fns = {"ours": lambda: _run_pypattern(model, _nc_loader(ds), _mse, NC, nbeta)}
    ours, ours_std = fns["ours"]()
    assert np.isfinite(ours)
    if devinterp is not None:  # the same estimate before anything is timed
        fns["devinterp"] = lambda: _run_devinterp(model, _nc_loader(ds), _mse, NC, nbeta)
        di, di_std = fns["devinterp"]()
        assert abs(ours - di) <= 2 * max(ours_std, di_std), dict(llc=ours, llc_devinterp=di)
    times = _interleaved(fns, rounds=2)
    benchmark.pedantic(fns["ours"], rounds=1, iterations=1)
    t_ours = min(times["ours"])
    row = dict(
        threads=1,
        cpu=_cpu(),
        ours_s=t_ours,
        ours_s_range=_range(times["ours"], 1),
        ours_us_per_step=t_ours / steps * 1e6,
        llc=ours,
        llc_std=ours_std,
    )
    if devinterp is not None:
        t_di = min(times["devinterp"])
        row.update(
            devinterp_s=t_di,
            devinterp_s_range=_range(times["devinterp"], 1),
            speedup_vs_devinterp=t_di / t_ours,
            llc_devinterp=di,
            llc_std_devinterp=di_std,
        )
    RESULTS["normal crossing 10x3000, 1 thread"] = row
    benchmark.extra_info.update(row)
    _report()
