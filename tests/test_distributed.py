"""pypattern.distributed: chains over two gloo ranks give the single-process results on every rank; a failure on
one rank raises on both."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypattern
from pypattern import distributed

KW = dict(num_chains=3, num_draws=15, step_size=1e-3, localization=10.0, nbeta=20.0, seed=4, quiet=True)


def _task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    return model, loader, (x[:5], y[:5])


def _make_loss(scale: float, device: torch.device):
    """A loss of one name on every rank; ``scale`` changes what it computes, ``device`` (each rank's own) does
    not."""

    def loss(model, batch):
        x, y = batch
        return scale * nn.functional.cross_entropy(model(x.to(device.type)), y)

    return loss


RUNS = [(None, None), ("0.weight", None)]  # the whole model, then its first layer's weight alone


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {}
    try:
        model, loader, probe = _task()
        llc = distributed.estimate_llc(model, loader, warn_nonstationary=False, **KW)
        out["loss_trace"] = llc.loss_trace.tolist()
        out["llc_mean"] = llc.llc_mean
        per_run = distributed.estimate_llc(model, loader, runs=RUNS, warn_nonstationary=False, **KW)
        out["runs_llc"] = [r.llc_mean for r in per_run]
        sus = distributed.susceptibilities(
            model, loader, probe, ["0.weight", "2.weight"], warn_nonstationary=False, **KW
        )
        out["chi"], out["chi_chains"] = sus.chi.tolist(), sus.chi_chains.tolist()
        ck = os.path.join(out_dir, "sus_ck")  # shared folder: rank 0 writes rows, each rank its group file
        sus_ck = distributed.susceptibilities(
            model, loader, probe, ["0.weight", "2.weight"], checkpoint=ck, warn_nonstationary=False, **KW
        )
        out["chi_ck"] = sus_ck.chi.tolist()
        dist.barrier()
        out["ck_files"] = sorted(os.listdir(ck))

        # one chain on two ranks: rank 1 owns none, and still returns the observables (the same collectives)
        obs = {"w": lambda m, b: m[0].weight.sum()}
        one = distributed.sample(
            model, loader, observables=obs, warn_nonstationary=False, **{**KW, "num_chains": 1}
        )
        out["one_chain_obs"] = {k: v.tolist() for k, v in one.observables.items()}

        def fails_on_rank1(chain):
            if chain == 1:
                raise KeyError("boom")

        try:
            distributed.sample(model, loader, callbacks=[fails_on_rank1], warn_nonstationary=False, **KW)
        except Exception as e:  # noqa: BLE001 - recorded for the test
            out["error"] = f"{type(e).__name__}: {e}"
        # ranks that disagree: every rank raises, naming the argument
        for name, kw in (
            ("step_size", {**KW, "step_size": 1e-3 * (1 + rank)}),
            ("num_draws", {**KW, "num_draws": 15 + rank}),
            ("extra", {**KW, "num_burnin_steps": 2} if rank else KW),
            ("seed", {**KW, "seed": rank}),  # 0 (the default) on rank 0
            ("loss_fn", {**KW, "loss_fn": _make_loss(1.0 + rank, torch.device("cpu"))}),
        ):
            try:
                distributed.estimate_llc(model, loader, warn_nonstationary=False, **kw)
            except ValueError as e:
                out[f"mismatch_{name}"] = str(e)
        # the same call in other words: devinterp's lr on one rank, a default given explicitly on the other
        same = {**{k: v for k, v in KW.items() if k != "step_size"}, "lr": KW["step_size"]} if rank else KW
        same = {**same, "weight_decay": 0.0} if not rank else same
        out["same_call_llc"] = distributed.estimate_llc(
            model, loader, warn_nonstationary=False, **same
        ).llc_mean
        # one loss function on every rank, each capturing its own device: the same call
        out["device_loss_llc"] = distributed.estimate_llc(
            model, loader, loss_fn=_make_loss(2.0, torch.device("cpu", rank)), warn_nonstationary=False, **KW
        ).llc_mean
        # an argument one rank cannot read: every rank raises at once (none waits in a collective)
        try:
            distributed.estimate_llc(
                model, loader, **{**KW, "num_chains": "three" if rank else KW["num_chains"]}
            )
        except (ValueError, RuntimeError) as e:
            out["unreadable"] = f"{type(e).__name__}: {e}"
        if rank == 1:
            with torch.no_grad():
                model[0].weight.neg_()
        try:
            distributed.susceptibilities(model, loader, probe, ["0.weight"], warn_nonstationary=False, **KW)
        except ValueError as e:
            out["mismatch_weights"] = str(e)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    # gloo's teardown at interpreter exit aborts the process now and then (plain torch does too): the results are
    # written, so leave without it
    os._exit(0)


def test_two_ranks_equal_one_process():
    model, loader, probe = _task()
    llc = pypattern.estimate_llc(model, loader, warn_nonstationary=False, **KW)
    sus = pypattern.susceptibilities(
        model, loader, probe, ["0.weight", "2.weight"], warn_nonstationary=False, **KW
    )
    device_loss = pypattern.estimate_llc(
        model, loader, loss_fn=_make_loss(2.0, torch.device("cpu")), warn_nonstationary=False, **KW
    )
    assert device_loss.llc_mean != llc.llc_mean
    obs = {"w": lambda m, b: m[0].weight.sum()}
    one = pypattern.sample(
        model, loader, observables=obs, warn_nonstationary=False, **{**KW, "num_chains": 1}
    )
    per_run = pypattern.estimate_llc(model, loader, runs=RUNS, warn_nonstationary=False, **KW)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        outs = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(2)]
    for o in outs:  # every rank has the whole result, equal to the single-process one
        assert list(o["one_chain_obs"]) == ["w"]
        np.testing.assert_array_equal(o["one_chain_obs"]["w"], one.observables["w"])
        # bit for bit: chains batched or not as the whole run decides, whichever rank holds them
        np.testing.assert_array_equal(o["loss_trace"], llc.loss_trace)
        assert o["llc_mean"] == llc.llc_mean and o["same_call_llc"] == llc.llc_mean
        assert o["runs_llc"] == [r.llc_mean for r in per_run]  # one LLC per run, as in one process
        assert o["device_loss_llc"] == device_loss.llc_mean
        np.testing.assert_allclose(o["chi"], sus.chi, rtol=1e-4, atol=1e-6 * np.abs(sus.chi).max())
        np.testing.assert_allclose(
            o["chi_chains"], sus.chi_chains, rtol=1e-4, atol=1e-6 * np.abs(sus.chi).max()
        )
        np.testing.assert_allclose(o["chi_ck"], sus.chi, rtol=1e-9, atol=1e-12)
        assert o["ck_files"] == [
            "component.0.weight.npz",
            "component.2.weight.npz",
        ]  # group files removed when done
    # chain 1 runs on rank 1: it raises its own error there, and rank 0 stops instead of waiting
    assert outs[1]["error"] == "KeyError: 'boom'"
    assert outs[0]["error"].startswith("RuntimeError: rank 1 failed")
    assert outs[1]["unreadable"] == "ValueError: num_chains must be an int >= 1, got 'three'"
    assert outs[0]["unreadable"].startswith("RuntimeError: rank 1 failed")
    for o in outs:
        assert "different values of 'step_size'" in o["mismatch_step_size"]
        assert "different values of 'num_draws'" in o["mismatch_num_draws"]
        # an argument left out is compared as its default, and each rank's value is named
        assert (
            "different values of 'num_burnin_steps': None (the default) on rank(s) [0], 2 on rank(s) [1]"
            in o["mismatch_extra"]
        )
        assert (
            "different values of 'seed': 0 (the default) on rank(s) [0], 1 on rank(s) [1]"
            in o["mismatch_seed"]
        )
        # loss functions of one name that compute different things: named, with where they differ
        assert (
            "different values of 'loss_fn': loss_fn.closure[1] = 1.0 on rank 0, 2.0 on rank 1"
            in o["mismatch_loss_fn"]
        )
        assert "different values of 'weights[0.weight]'" in o["mismatch_weights"]


def test_needs_a_process_group():
    model, loader, _ = _task()
    with pytest.raises(RuntimeError, match="initialised process group"):
        distributed.sample(model, loader, **KW)
    assert distributed.owned_chains(5, 1, 2) == [1, 3]
    assert distributed.rank_path("out/run.npz", 1, 4) == "out/run.rank1of4.npz"
