"""Susceptibilities: pypattern against devinterp 2.0.1 on the same model, components, draws, in the same run.

Run in the bench venv that has devinterp 2.0.1 (``bash bench/envs/devinterp.sh``)::

    .bench-venvs/devinterp20/bin/python -m pytest -q -s bench/bench_susceptibility.py

Without devinterp (e.g. ``make bench`` in .venv) the whole module skips.

Work
----
* pypattern's Transformer, 2 layers attention-only, d_model 32, 2 heads, vocabulary 16, 17 positions (10,224
  parameters), trained 300 steps on :class:`~pypattern.tasks.InductionTask`.
* Data: 32 sequences. SGLD is full batch (batch size 32 = the data set), so both libraries see the same batch at
  every step; the sampling batch (``phi``) and the probe are that same data set, so ``Lbar`` (devinterp: the
  sampling-task mean loss; ours: the probe mean loss) is the same quantity, and ``phi``'s baseline (devinterp:
  ``init_loss`` over 1 batch; ours: the loss at ``w*``) is the same number. 512 probe tokens.
* Components: the 4 heads (``blocks.{0,1}.attn.head.{0,1}``, masks from :func:`component_masks`, given to devinterp
  as its ``weight_restrictions``), plus the unrestricted run both conventions need: 5 SGLD runs x 4 chains x
  100 draws, lr 1e-3, nbeta 30, localization 100, ``convention="devinterp"``.
* Ours runs all five SGLD runs' 20 chains batched (one ``vmap``-ed forward and backward per step, ``runs=`` of
  :func:`pypattern.sample`), and, since the probe is the full batch, reads the probe losses and ``phi`` from the
  sampler's own forward (one forward + backward per step; devinterp does a forward + backward and an observable
  forward).
* Bound: the floor of our method is its multiply-adds run by torch with no sampler around them: one ``vmap``-ed
  forward + backward of the batch for all 20 chains per step (the per-token losses come out of that forward),
  100 steps, one per draw (``role="bound"``). Reference: devinterp's work done one chain at a time in a bare
  torch loop, one forward + backward of the batch per chain-step and one probe forward per draw (2,000
  chain-steps).
* Memory: ``tracemalloc`` peak (Python and numpy allocations; torch's CPU allocator is not traced, but ours keeps
  only ``(1, tokens + 1)`` float64 accumulators per chain) of a fresh process running one component and the full
  run, 1 chain, at two draw counts, plus the bytes devinterp writes to its Zarr store. Peak RSS is not used: at
  this size the growth (a few MB) is below the process's earlier peak (imports, set-up).
* Agreement: the two chi matrices are independent estimates (different noise); their difference is compared
  with the standard errors over chains (devinterp's per-chain estimates come from re-running its own
  ``compute_susceptibilities`` on each chain of its stored samples).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version as _version
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

devinterp = pytest.importorskip("devinterp")
datasets = pytest.importorskip("datasets")
xr = pytest.importorskip("xarray")

from devinterp.slt.susceptibilities import compute_susceptibilities  # noqa: E402
from devinterp.slt.susceptibilities import susceptibilities as di_susceptibilities  # noqa: E402

from pypattern.models.transformer import Transformer, component_masks  # noqa: E402
from pypattern.susceptibility import susceptibilities  # noqa: E402
from pypattern.tasks.induction import InductionTask  # noqa: E402
from pypattern.tasks.training import train  # noqa: E402

COMPONENTS = ["blocks.0.attn.head.0", "blocks.0.attn.head.1", "blocks.1.attn.head.0", "blocks.1.attn.head.1"]
S = dict(num_chains=4, num_draws=100, lr=1e-3, nbeta=30.0, localization=100.0)
N_DATA = 32
MEM_DRAWS = (100, 800)
RESULTS: dict[str, object] = {}


class _Plain(nn.Module):
    """devinterp treats any model with ``cfg.n_heads`` as TransformerLens and calls ``.to(device,
    print_details=False)``; this wrapper hides ``cfg`` (parameter names gain the prefix ``m.``)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(ids, return_type="logits")


def _per_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.m(ids, return_type="per_token_loss")


def _setup(state_path: str | None = None):
    task = InductionTask(d_vocab=16, seq_len=17)
    model = Transformer(task.model_config(d_model=32, n_heads=2))
    if state_path is None:
        train(model, task, steps=300, batch_size=32)
    else:
        model.load_state_dict(torch.load(state_path, weights_only=True))
    data = task.sample(N_DATA, seed=123).tokens
    return model, data


def run_ours(model, data, components, num_chains, num_draws, cores=1):
    # the sampler's loss is the default one, the mean of the per-token losses (``return_type="loss"``):
    # with full-batch SGLD on the probe, the probe losses and phi come from the sampler's own forward
    return susceptibilities(
        model,
        [data],
        data,
        components,
        sampling_batch=data,
        convention="devinterp",
        num_chains=num_chains,
        num_draws=num_draws,
        step_size=S["lr"],
        nbeta=S["nbeta"],
        localization=S["localization"],
        seed=0,
        cores=cores,
        warn_nonstationary=False,
    )


def run_peer(model, data, components, num_chains, num_draws, out: Path):
    ds = datasets.Dataset.from_dict({"input_ids": data.tolist()}).with_format("torch")
    wr = {"full": None}
    for c in components:
        wr[c] = {"m." + n: m for n, m in component_masks(model, c).items()}
    res = di_susceptibilities(
        _Plain(model),
        ds,
        {"train": (ds, 1)},
        wr,
        sampling_task="train",
        include_sampling_task=True,
        lr=S["lr"],
        n_beta=S["nbeta"],
        localization=S["localization"],
        num_chains=num_chains,
        num_draws=num_draws,
        batch_size=N_DATA,
        num_init_loss_batches=1,
        device="cpu",
        loss_fn=_per_token_loss,
        output_path=out / "samples.zarr",
    )
    sus = res["susceptibilities"]
    chi = np.asarray(sus["sus"].values, dtype=np.float64).T  # (wr, sus_flat)
    assert list(sus["wr"].values) == list(components)
    ids = res["context"]["input_ids"].values.reshape(N_DATA, -1)
    return chi, ids


def _peer_chains(out: Path, components, num_chains):
    """devinterp's estimate per chain: its own compute_susceptibilities on one chain of the stored samples."""
    trees = {
        w: xr.open_datatree(str(out / f"samples_{w}.zarr"), engine="zarr") for w in ["full", *components]
    }
    per = []
    for c in range(num_chains):
        wr = {w: xr.DataTree(dataset=t.dataset.isel(chain=[c])) for w, t in trees.items()}
        r = compute_susceptibilities(wr, "train", include_sampling_task=True)
        per.append(np.asarray(r["susceptibilities"]["sus"].values, dtype=np.float64).T)
    return np.stack(per, 1)  # (wr, chain, sus_flat)


def _floor_batched(model, data, chains, steps):
    """Our method's floor: per step, one vmap-ed forward + backward of the batch for all chains at once."""
    m = Transformer(model.cfg)
    m.load_state_dict(model.state_dict())
    names = [n for n, _ in m.named_parameters()]
    stacked = [
        p.detach().unsqueeze(0).repeat(chains, *[1] * p.dim()).requires_grad_()
        for _, p in m.named_parameters()
    ]

    def one(*ps):
        out = torch.func.functional_call(m, dict(zip(names, ps)), (data,), {"return_type": "per_token_loss"})
        return out.mean()

    f = torch.func.vmap(one)
    for _ in range(steps):
        torch.autograd.grad(f(*stacked).sum(), stacked)


def _bare_loop(model, data, runs, steps, draws):
    """devinterp's work one chain at a time: a forward + backward of the batch per step, a probe forward per
    draw."""
    m = Transformer(model.cfg)
    m.load_state_dict(model.state_dict())
    for _ in range(runs * steps):
        m.zero_grad(set_to_none=True)
        m(data, return_type="loss").backward()
    with torch.no_grad():
        for _ in range(runs * draws):
            m(data, return_type="per_token_loss")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model, data = _setup()
    d = tmp_path_factory.mktemp("sus")
    torch.save(model.state_dict(), d / "state.pt")
    return model, data, d


# ------------------------------------------------------------------------------------------------ timing


def test_time_ours(benchmark, trained):
    model, data, _ = trained
    res = benchmark.pedantic(
        lambda: run_ours(model, data, COMPONENTS, S["num_chains"], S["num_draws"]), rounds=1, iterations=1
    )
    RESULTS["ours"] = res
    steps = (len(COMPONENTS) + 1) * S["num_chains"] * S["num_draws"]
    benchmark.extra_info.update(
        role="ours", label="pypattern", sgld_steps=steps, threads=torch.get_num_threads()
    )
    assert res.chi.shape == (len(COMPONENTS), N_DATA * 16)


def test_time_devinterp(benchmark, trained):
    model, data, d = trained
    out = d / "timed"
    out.mkdir()
    chi, ids = benchmark.pedantic(
        lambda: run_peer(model, data, COMPONENTS, S["num_chains"], S["num_draws"], out),
        rounds=1,
        iterations=1,
    )
    RESULTS["peer"] = (chi, ids, out)
    benchmark.extra_info.update(role="peer", label=f"devinterp {_version('devinterp')}")
    assert chi.shape == (len(COMPONENTS), N_DATA * 16)


def test_time_bound(benchmark, trained):
    model, data, _ = trained
    chains = (len(COMPONENTS) + 1) * S["num_chains"]
    benchmark.pedantic(lambda: _floor_batched(model, data, chains, S["num_draws"]), rounds=1, iterations=1)
    benchmark.extra_info.update(role="bound", label=f"one vmap-ed fwd+bwd of {chains} chains per step")


def test_time_bare_loop(benchmark, trained):
    model, data, _ = trained
    runs = len(COMPONENTS) + 1
    steps = S["num_chains"] * S["num_draws"]
    benchmark.pedantic(lambda: _bare_loop(model, data, runs, steps, steps), rounds=1, iterations=1)
    benchmark.extra_info.update(role="reference", label="bare torch loop, one chain at a time")


def _on_threads(n: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


CORES = os.cpu_count() or 1


@pytest.mark.benchmark(group=f"whole machine ({CORES} cores)")
def test_whole_machine_ours_cores(benchmark, trained):
    """Ours with cores=: the 20 chains in one vmap-ed group per core, one torch thread each."""
    model, data, _ = trained
    run = lambda: run_ours(model, data, COMPONENTS, S["num_chains"], S["num_draws"], CORES)  # noqa: E731
    benchmark.pedantic(lambda: _on_threads(1, run), rounds=1, iterations=1)
    benchmark.extra_info.update(role="ours", label=f"pypattern cores={CORES}")


@pytest.mark.benchmark(group=f"whole machine ({CORES} cores)")
def test_whole_machine_ours_torch_threads(benchmark, trained):
    """Ours in one group on torch's threads instead."""
    model, data, _ = trained
    run = lambda: run_ours(model, data, COMPONENTS, S["num_chains"], S["num_draws"])  # noqa: E731
    benchmark.pedantic(lambda: _on_threads(CORES, run), rounds=1, iterations=1)
    benchmark.extra_info.update(role="ours", label=f"pypattern, {CORES} torch threads")


@pytest.mark.benchmark(group=f"whole machine ({CORES} cores)")
def test_whole_machine_devinterp(benchmark, trained):
    """devinterp 2.0.1 has no multi-process option: torch's threads."""
    model, data, d = trained
    out = d / "whole"
    out.mkdir()
    run = lambda: run_peer(model, data, COMPONENTS, S["num_chains"], S["num_draws"], out)  # noqa: E731
    benchmark.pedantic(lambda: _on_threads(CORES, run), rounds=1, iterations=1)
    benchmark.extra_info.update(
        role="peer", label=f"devinterp {_version('devinterp')}, {CORES} torch threads"
    )


# ------------------------------------------------------------------------------------------------ agreement


def test_agreement(trained):
    model, data, d = trained
    if "ours" not in RESULTS:
        RESULTS["ours"] = run_ours(model, data, COMPONENTS, S["num_chains"], S["num_draws"])
    if "peer" not in RESULTS:
        out = d / "agree"
        out.mkdir()
        RESULTS["peer"] = (*run_peer(model, data, COMPONENTS, S["num_chains"], S["num_draws"], out), out)
    ours = RESULTS["ours"]
    chi_p, ids, out = RESULTS["peer"]
    # devinterp's observable visits the data in its own shuffled order: map its rows back to ours
    rows = [int(np.flatnonzero((data.numpy() == r).all(1))[0]) for r in ids]
    order = np.argsort(rows)
    T = data.shape[1] - 1
    chi_p = chi_p.reshape(len(COMPONENTS), N_DATA, T)[:, order].reshape(len(COMPONENTS), -1)
    per = _peer_chains(out, COMPONENTS, S["num_chains"])
    per = per.reshape(len(COMPONENTS), S["num_chains"], N_DATA, T)[:, :, order].reshape(per.shape)
    se_p = per.std(1, ddof=1) / np.sqrt(S["num_chains"])
    a, b = ours.chi, chi_p
    z = (a - b) / np.sqrt(ours.chi_se**2 + se_p**2)
    row = dict(
        corr=float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
        rel_diff=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        rel_se_ours=float(np.linalg.norm(ours.chi_se) / np.linalg.norm(a)),
        rel_se_peer=float(np.linalg.norm(se_p) / np.linalg.norm(b)),
        rms_z=float(np.sqrt(np.mean(z**2))),
        frac_abs_z_lt_2=float(np.mean(np.abs(z) < 2)),
    )
    print("\nsusceptibility agreement (pypattern vs devinterp):", json.dumps(row, indent=1))
    # independent estimates: the difference is noise of the size the standard errors say
    assert row["corr"] > 0.5, row
    assert np.median(np.abs(z)) < 1.5, row


# ------------------------------------------------------------------------------------------------ memory


_CHILD = r"""
import json, sys, tracemalloc
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
import bench_susceptibility as b
model, data = b._setup({state!r})
which, draws, out = {which!r}, {draws}, Path({out!r})
comps = b.COMPONENTS[:1]
tracemalloc.start()
if which == "ours":
    b.run_ours(model, data, comps, 1, draws)
else:
    b.run_peer(model, data, comps, 1, draws, out)
peak = tracemalloc.get_traced_memory()[1]
disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
print("RESULT", json.dumps(dict(tracemalloc_peak_kb=peak // 1024, zarr_kb=disk // 1024)))
"""


def _child(which: str, draws: int, d: Path) -> dict:
    out = d / f"mem_{which}_{draws}"
    out.mkdir()
    code = _CHILD.format(
        bench=str(Path(__file__).parent), state=str(d / "state.pt"), which=which, draws=draws, out=str(out)
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[0][7:])


def test_memory_vs_draws(trained):
    _, _, d = trained
    rows = {f"{w} {n} draws": _child(w, n, d) for w in ("ours", "devinterp") for n in MEM_DRAWS}
    print("\npeak memory, 1 component + full, 1 chain:", json.dumps(rows, indent=1))
    lo, hi = MEM_DRAWS
    ours_growth = (
        rows[f"ours {hi} draws"]["tracemalloc_peak_kb"] - rows[f"ours {lo} draws"]["tracemalloc_peak_kb"]
    )
    di_growth = (
        rows[f"devinterp {hi} draws"]["tracemalloc_peak_kb"]
        - rows[f"devinterp {lo} draws"]["tracemalloc_peak_kb"]
    )
    # ours keeps float64 accumulators of size (components x tokens): nothing grows with the draws
    assert ours_growth < 256, rows
    assert di_growth > ours_growth, rows
