"""susceptibilities and bif: seed=None refused as pypattern.sample refuses it, callbacks= called at every draw as
the sampler calls them; on two gloo ranks: a checkpoint row write that fails on rank 0 stops every rank at once,
and estimate_llc's warnings come from rank 0 only."""

import datetime
import json
import os
import tempfile
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypattern
from pypattern import distributed
from pypattern import susceptibility as sus

KW = dict(
    num_chains=2,
    num_draws=4,
    step_size=1e-3,
    nbeta=10.0,
    localization=10.0,
    seed=3,
    quiet=True,
    warn_nonstationary=False,
)


def _task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    return model, loader, (x[:5], y[:5])


def _regular_task():
    """A 4-parameter regular model whose estimate at step 0.1 overshoots d/2 = 2 by more than 3 standard errors."""
    g = torch.Generator().manual_seed(0)
    n, d = 256, 4
    X = torch.randn(n, d, generator=g)
    Y = X @ torch.randn(d, 1, generator=g) + 0.3 * torch.randn(n, 1, generator=g)
    m = nn.Linear(d, 1, bias=False)
    Xd, Yd = X.double(), Y.double()
    with torch.no_grad():  # the least-squares weights, in float64 (the same bits in every process)
        m.weight.copy_(torch.linalg.solve(Xd.T @ Xd, Xd.T @ Yd).T.float())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=n)
    return m, loader


LLC_KW = dict(
    num_chains=4, num_draws=100, num_burnin_steps=50, nbeta=10.0, localization=1.0, step_size=0.1, quiet=True
)


def _messages(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, sorted(str(w.message) for w in caught if "exceeds d/2" in str(w.message))


@pytest.mark.parametrize("fn", ["susceptibilities", "bif"])
@pytest.mark.parametrize("name", ["seed", "num_chains", "num_draws"])
def test_none_for_a_setting_sample_refuses_is_refused_by_name(fn, name):
    model, loader, probe = _task()
    with pytest.raises(ValueError, match=f"{name} must be an int") as sample_error:
        pypattern.sample(model, loader, **{**KW, name: None})
    call = (
        (lambda: pypattern.susceptibilities(model, loader, probe, ["0.weight"], **{**KW, name: None}))
        if fn == "susceptibilities"
        else (lambda: pypattern.bif(model, loader, probe, **{**KW, name: None}))
    )
    with pytest.raises(ValueError) as got:
        call()
    assert str(got.value) == str(sample_error.value)


def test_susceptibility_callbacks_see_every_draw_of_every_run_numbered_over_the_call():
    """Each run's draws (losses) reach the callbacks with the run and chain of the whole call, whatever group_size:
    they equal pypattern.sample's loss traces of the same runs."""
    model, loader, probe = _task()
    comps = {"first": ["0.weight"], "last": ["2.weight", "2.bias"]}
    got: dict = {}

    def record(run, chain, draw, loss, observables):
        assert "probe_losses" in observables
        got[(run, chain, draw)] = loss

    res = pypattern.susceptibilities(
        model, loader, probe, comps, convention="devinterp", group_size=1, callbacks=[record], **KW
    )
    plain = pypattern.susceptibilities(
        model, loader, probe, comps, convention="devinterp", group_size=1, **KW
    )
    np.testing.assert_array_equal(res.chi, plain.chi)  # callbacks change nothing
    runs = [(None, None), (["0.weight"], None), (["2.weight", "2.bias"], None)]
    ref = pypattern.sample(model, loader, runs=runs, **KW)
    C, D = KW["num_chains"], KW["num_draws"]
    assert sorted(got) == [(r, r * C + c, d) for r in range(3) for c in range(C) for d in range(D)]
    for r, out in enumerate(ref):
        trace = np.array([[got[(r, r * C + c, d)] for d in range(D)] for c in range(C)])
        np.testing.assert_allclose(trace, out.loss_trace, rtol=1e-6, atol=1e-9)


def test_bif_callbacks_see_every_draw():
    model, loader, probe = _task()
    got: dict = {}

    def record(chain, draw, loss, observables):
        got[(chain, draw)] = (loss, observables["probe_losses"].detach().clone())

    res = pypattern.bif(model, loader, probe, callbacks=[record], **KW)
    ref = pypattern.sample(model, loader, **KW)
    C, D = KW["num_chains"], KW["num_draws"]
    trace = np.array([[got[(c, d)][0] for d in range(D)] for c in range(C)])
    np.testing.assert_allclose(trace, ref.loss_trace, rtol=1e-6, atol=1e-9)
    # the BIF is minus the sample covariance of the probe losses the callbacks saw (over all draws)
    L = torch.stack([got[k][1].reshape(-1) for k in sorted(got)]).double().numpy()
    np.testing.assert_allclose(res.bif, -np.cov(L.T), rtol=1e-6, atol=1e-12)
    with pytest.raises(TypeError, match=r"callbacks\[0\]"):
        pypattern.bif(model, loader, probe, callbacks=[lambda nonsense: None], **KW)


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/init",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=12),
    )
    out = {}
    m, ld = _regular_task()
    _, out["warnings"] = _messages(
        lambda: distributed.estimate_llc(m, ld, warn_nonstationary=False, **LLC_KW)
    )

    # the rows are written by rank 0 alone: its write fails (a read-only folder, a full disk) after the first group
    model, loader, probe = _task()
    if rank == 0:
        save = sus.io.save

        def failing_save(path, arrays, meta, *, kind, **kw):
            if kind == sus.ROW_KIND:
                raise OSError(28, "No space left on device", path)
            return save(path, arrays, meta, kind=kind, **kw)

        sus.io.save = failing_save
    t0 = time.monotonic()
    try:
        distributed.susceptibilities(
            model,
            loader,
            probe,
            ["0.weight", "2.weight"],
            checkpoint=os.path.join(folder, "rows"),
            group_size=1,
            **KW,
        )
        out["row_write"] = "no error"
    except Exception as e:  # noqa: BLE001 - recorded for the test
        out["row_write"] = f"{type(e).__name__}: {e}"
    out["seconds"] = time.monotonic() - t0
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if rank == 0:  # alive until rank 1 is done: rank 1 does not learn of the failure from rank 0's exit
        t1 = time.monotonic()
        while not os.path.exists(os.path.join(folder, "rank1.json")) and time.monotonic() - t1 < 25:
            time.sleep(0.1)
    # gloo's teardown at interpreter exit aborts the process now and then: the results are written
    os._exit(0)


def test_two_ranks_a_failed_row_write_stops_both_and_llc_warnings_come_once():
    m, ld = _regular_task()
    _, single = _messages(lambda: pypattern.estimate_llc(m, ld, warn_nonstationary=False, **LLC_KW))
    assert single  # the case exercises the warning
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(2, folder), nprocs=2, join=True)
        outs = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]
    assert outs[0]["warnings"] == single
    assert outs[1]["warnings"] == []
    assert outs[0]["row_write"].startswith("OSError: ") and "No space left" in outs[0]["row_write"]
    assert outs[1]["row_write"] == "RuntimeError: rank 0 failed (see its error); this rank stops too"
    assert outs[1]["seconds"] < 10  # at once, not at the process group's timeout
