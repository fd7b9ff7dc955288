"""The LLC estimators' own warnings (a calibrated step's bias and short trials, an estimate above d / 2) begin with
the run they concern, as the sampler's do, under refined_llc and OnlineLLC, and come once per calibration; the
sampler's progress bar writes nothing for a short run (shown after a delay, as the library's other bars) and still
shows a long one; under pypattern.distributed a warning every rank gives alike comes from rank 0 only."""

import os
import time
import warnings

import pytest
import torch
from torch import nn

import pypattern.sampling.runner as runner
from pypattern.sampling import OnlineLLC, estimate_llc, refined_llc, sample
from pypattern.sampling.auto import UNRELAXED_NOTE, AutoStepReport

STEP = 2e-3


def _problem(n=64, deep=False):
    """Linear regression at its least-squares minimum: a linear model (regular, d = 4), or a deep linear one
    (singular, d = 21: its LLC is well below d / 2, where the short-trials warning is not silenced)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    # solved in float64 and rounded to float32: the same bits in every process (a float32 solve may differ in
    # its last bits between processes, and the ranks of a distributed run must hold the same weights)
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(n, 1)], 1).double(), y.double()).solution.float()
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)) if deep else nn.Sequential(nn.Linear(3, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[0].weight[:1].copy_(sol[:3].T)
        model[0].bias[:1].copy_(sol[3])
        if deep:
            model[1].weight[0, 0] = 1.0
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]
    return model, loader


def _mse(m, batch):
    x, y = batch
    return ((m(x) - y) ** 2).mean()


def _fake_calibration(monkeypatch, calls):
    """step_size='auto' at once: a report whose bias exceeds any run's standard error and whose trials were short
    for the flattest direction (what the estimators warn of), without the calibration's trials."""

    def calibrate(model, loader, arguments, stored, resolve):
        calls.append(1)
        report = AutoStepReport(
            chosen=STEP,
            bias=1e6,
            reason=f"a stand-in calibration; {UNRELAXED_NOTE}",
            settings={"flattest_relaxation_times": 0.1, "atol_rel": 0.0},
        )
        return STEP, report, None

    monkeypatch.setattr(runner, "calibrate_or_resume", calibrate)


KW = dict(
    loss_fn=_mse, num_chains=2, num_draws=20, num_burnin_steps=20, nbeta=50.0, localization=10.0, seed=1
)


def _llc_warnings(record, word):
    return [str(w.message) for w in record if word in str(w.message)]


def test_refined_llc_names_the_run_of_each_estimator_warning_once_per_calibration(monkeypatch):
    calls = []
    _fake_calibration(monkeypatch, calls)
    model, loader = _problem(deep=True)
    comps = {"a": ["0.weight"], "b": ["1.weight"]}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = refined_llc(
            model, loader, components=comps, data=loader[:2], step_size="auto", quiet=True, **KW
        )
    assert len(calls) == 2  # one calibration per data set
    assert res.component == ["full", "a", "b"] * 2
    bias = _llc_warnings(record, "estimated discretisation bias")
    # one calibration per data set: one warning each (not one per row), each naming its run
    assert len(bias) == 2, bias
    assert bias[0].startswith("refined_llc(), the unrestricted run: step_size='auto' chose")
    assert bias[1].startswith("refined_llc(), the unrestricted run on data: step_size='auto' chose")
    short = _llc_warnings(record, "trials were short for the flattest directions")
    assert [s.split(": step_size")[0] for s in short] == [
        "refined_llc(), the unrestricted run",
        "refined_llc(), the unrestricted run on data",
    ]


def test_estimate_llc_with_runs_warns_of_the_calibrations_bias_once(monkeypatch):
    calls = []
    _fake_calibration(monkeypatch, calls)
    model, loader = _problem()
    runs = [(["0.weight"], None), (["0.bias"], None)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = estimate_llc(model, loader, step_size="auto", runs=runs, quiet=True, **KW)
    assert len(out) == 2 and all(r.llc_se < 1e6 for r in out)  # each run's condition holds
    assert len(_llc_warnings(record, "estimated discretisation bias")) == 1


def test_online_llc_names_the_training_step_of_the_estimator_warnings(monkeypatch):
    calls = []
    _fake_calibration(monkeypatch, calls)
    model, loader = _problem(deep=True)
    for components, label in [
        (None, "OnlineLLC at step 0: "),
        ({"a": ["0.weight"]}, "OnlineLLC at step 0, refined_llc(), the unrestricted run: "),
    ]:
        online = OnlineLLC(loader, every=1, components=components, step_size="auto", quiet=True, **KW)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            online(model, 0)
        bias = _llc_warnings(record, "estimated discretisation bias")
        short = _llc_warnings(record, "trials were short for the flattest directions")
        assert len(bias) == 1 and bias[0].startswith(label + "step_size='auto' chose"), bias
        assert len(short) == 1 and short[0].startswith(label), short


def test_an_estimate_above_half_the_dimension_names_its_run():
    """A step far too large: the estimate exceeds d / 2 = 2 (d = 4 weights), which no learning coefficient does."""
    model, loader = _problem()
    big = dict(KW, nbeta=2000.0, localization=1.0, step_size=4e-4, warn_nonstationary=False, quiet=True)
    with pytest.warns(UserWarning, match=r"^the LLC estimate .* exceeds d/2 = 2"):  # no run named: none
        alone = estimate_llc(model, loader, **big)
    assert alone.llc_mean - 3 * alone.llc_se > 2.0  # the condition holds (checked on its own)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        online = OnlineLLC(loader, every=1, components={"a": ["0.weight"]}, **big)
        online(model, 3)
    above = _llc_warnings(record, "exceeds d/2")
    assert len(above) == 1, above
    assert above[0].startswith("OnlineLLC at step 3, refined_llc(), the unrestricted run: the LLC estimate")


def _slow(draw):  # a long run in little CPU: a pause at each draw
    time.sleep(0.12)


PROGRESS = dict(
    loss_fn=_mse, num_chains=1, num_draws=25, step_size=1e-4, localization=10.0, nbeta=50.0, seed=0
)


def test_a_short_run_writes_no_progress_line(capsys):
    """A run of a fraction of a second: its bar is never due (shown after two seconds, as the library's other
    bars), so nothing lands in the log (stderr here is not a terminal)."""
    model, loader = _problem()
    sample(model, loader, quiet=False, warn_nonstationary=False, **PROGRESS)
    assert "SGLD" not in capsys.readouterr().err


@pytest.mark.parametrize("quiet", [False, True])
def test_a_long_run_shows_its_progress_unless_quiet(capsys, quiet):
    """A run of about three seconds: its bar's first line comes once it is due (not one log interval, 30 s, after
    the start); quiet=True writes none."""
    model, loader = _problem()
    t0 = time.perf_counter()
    sample(model, loader, quiet=quiet, warn_nonstationary=False, callbacks=[_slow], **PROGRESS)
    assert time.perf_counter() - t0 > 2.5
    err = capsys.readouterr().err
    assert ("SGLD" in err) is not quiet, err


def _drifted_calibration(model, loader, arguments, stored, resolve):
    """A calibration without localization whose every larger step drifted: it warns
    (``_warn_if_drift_chose``), reading only its own trials, the same on every rank."""
    from pypattern.sampling import auto

    chosen = 1e-4
    steps = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4, chosen]
    report = AutoStepReport(
        step_size=steps,
        num_steps=[100] * 6,
        llc=[1.0] * 6,
        se=[0.1] * 6,
        r_hat=[2.0] * 5 + [1.0],
        verdict=["not stationary (R-hat 2.00 >= 1.1)"] * 5 + ["ok"],
        chosen=chosen,
        bias=0.0,
        reason="a stand-in calibration",
    )
    auto._warn_if_drift_chose(report, 0.0)
    return chosen, report, None


def _seen(chain, draw):  # a warning about the rank's own chains: each rank gives its own
    if draw == 0:
        warnings.warn(f"chain {chain} started", UserWarning, stacklevel=2)


def _rank_worker(rank: int, world: int, folder: str) -> None:
    import datetime
    import json

    import torch.distributed as dist

    from pypattern import distributed

    torch.set_num_threads(1)
    runner.calibrate_or_resume = _drifted_calibration
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(folder, 'init')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    out = {}
    try:
        model, loader = _problem()
        kw = dict(KW, num_chains=3, num_draws=10, quiet=True, warn_nonstationary=False)
        for what, call in [
            ("estimate_llc", lambda: distributed.estimate_llc(model, loader, step_size="auto", **kw)),
            ("sample", lambda: distributed.sample(model, loader, step_size="auto", callbacks=[_seen], **kw)),
        ]:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                call()
            out[what] = [str(w.message)[:40] for w in record]
    finally:
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()


def test_distributed_calibration_warns_from_rank_zero_only(tmp_path):
    import json

    import torch.multiprocessing as mp

    drift = "step_size='auto' with localization=0: the"[:40]
    ctx = mp.start_processes(
        _rank_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish within 120 s")
    outs = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert outs[0]["estimate_llc"].count(drift) == 1
    assert drift not in outs[1]["estimate_llc"]
    # the calibration's warning from rank 0; each rank's own chains' warnings from that rank (chains 0 and 2 on
    # rank 0, chain 1 on rank 1)
    assert sorted(outs[0]["sample"]) == sorted([drift, "chain 0 started", "chain 2 started"])
    assert outs[1]["sample"] == ["chain 1 started"]
