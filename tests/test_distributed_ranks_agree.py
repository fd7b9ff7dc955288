"""pypattern.distributed on two gloo ranks: the single-process warnings, a bad argument on one rank of a
susceptibility call stopping both, and a checkpoint of another run refused on every rank."""

import datetime
import json
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypattern
from pypattern import distributed

# a step large enough that 3 chains of 40 draws mix poorly: one process warns about the effective sample size
KW = dict(num_chains=3, num_draws=40, step_size=2e-2, localization=10.0, nbeta=20.0, seed=4, quiet=True)


def _task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    return model, loader, (x[:5], y[:5])


def _recorded(call):
    """``call()`` and the messages of the NonStationaryWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, sorted(
        str(w.message) for w in caught if isinstance(w.message, pypattern.NonStationaryWarning)
    )


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/init",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    out = {}
    model, loader, probe = _task()
    res, out["warnings"] = _recorded(lambda: distributed.estimate_llc(model, loader, **KW))
    out["trace"], out["llc"] = res.loss_trace.tolist(), res.llc_mean

    # a checkpoint resumed by a call with another step: every rank refuses, naming the setting
    ck = os.path.join(folder, "run.npz")
    small = {**KW, "step_size": 1e-3, "num_draws": 6, "warn_nonstationary": False}
    distributed.estimate_llc(model, loader, checkpoint=ck, **small)
    try:
        distributed.estimate_llc(model, loader, checkpoint=ck, **{**small, "step_size": 2e-3})
        out["other_run"] = "no error"
    except Exception as e:  # noqa: BLE001 - recorded for the test
        out["other_run"] = f"{type(e).__name__}: {e}"

    # two names of one number that disagree on rank 1 only: rank 1 raises its error, rank 0 stops at once
    # instead of waiting for rank 1 in the argument comparison
    kw = {**small, "step_size": 1e-3}
    if rank == 1:
        kw["lr"] = 2e-3
    try:
        distributed.susceptibilities(model, loader, probe, ["0.weight"], **kw)
        out["bad_argument"] = "no error"
    except Exception as e:  # noqa: BLE001 - recorded for the test
        out["bad_argument"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    # gloo's teardown at interpreter exit aborts the process now and then: the results are written
    os._exit(0)


def test_two_ranks_warn_refuse_and_stop_as_one_process():
    model, loader, _ = _task()
    single, single_warnings = _recorded(lambda: pypattern.estimate_llc(model, loader, **KW))
    assert any("effective sample size" in m for m in single_warnings)  # the case exercises the check
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(2, folder), nprocs=2, join=True)
        outs = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]
    for rank, o in enumerate(outs):
        np.testing.assert_array_equal(o["trace"], single.loss_trace)
        assert o["llc"] == single.llc_mean
        # the whole trace's diagnostics: rank 0 warns as one process does, rank 1 stays silent
        assert o["warnings"] == (single_warnings if rank == 0 else [])
        assert o["other_run"].startswith("FingerprintMismatch: checkpoint ")
        assert (
            f"run.rank{rank}of2.npz" in o["other_run"]
            and "step_size = 0.001 there, 0.002 now" in o["other_run"]
        )
    assert outs[1]["bad_argument"].startswith("ValueError: ") and "lr=0.002" in outs[1]["bad_argument"]
    assert outs[0]["bad_argument"] == "RuntimeError: rank 1 failed (see its error); this rank stops too"
