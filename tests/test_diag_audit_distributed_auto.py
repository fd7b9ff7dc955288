"""pypattern.distributed at a calibrated step (step_size='auto') over two gloo ranks: the single-process result,
also when the chains of one rank only run away at the calibrated step."""

import datetime
import json
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pypattern
import pypattern.susceptibility as sus
from pypattern import distributed
from pypattern.sampling import runner
from pypattern.sampling.auto import AutoStepReport


class _Quartic(torch.nn.Module):
    """L(w) = w^2 / 2 + 5 w^4: SGLD at step 0.13 (nbeta 1) runs away from some noise paths, not from others (seed
    1: chain 0 runs away, chain 1 does not); at 0.065 from none."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * (self.w**2).sum() + 5.0 * (self.w**4).sum() + 0.0 * x.sum()


def _loss(m, b):
    return m(b)


KW = dict(loss_fn=_loss, nbeta=1.0, num_chains=2, num_draws=200, seed=1, quiet=True, warn_nonstationary=False)


def _loader():
    return torch.utils.data.DataLoader(torch.zeros(8, 1, dtype=torch.float64), batch_size=8)


class _Weight(torch.nn.Module):
    """One weight ``w`` that the per-sample loss below reads directly."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return x


def _per_sample_quartic(m, b):
    return 0.5 * (m.w**2).sum() + 5.0 * (m.w**4).sum() + 0.0 * b.sum(1)


# seed 2: chain 0 runs away at 0.13 (draw 49), chain 1 does not
SUS = dict(per_sample_loss_fn=_per_sample_quartic, nbeta=1.0, num_chains=2, num_draws=50, seed=2, quiet=True)


def _susceptibilities(call):
    return call(
        _Weight(), _loader(), torch.zeros(2, 1, dtype=torch.float64), [["w"]], warn_nonstationary=False, **SUS
    )


def _calibrated_at(step):
    """resolve_step_size replaced by one that picks ``step`` (a calibration that missed a rare runaway)."""

    def fake(*args, **kwargs):
        return step, AutoStepReport(chosen=step, reason="test")

    runner.resolve_step_size = fake


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting in a collective fails after 30 s instead of hanging
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    out = {}
    try:
        _calibrated_at(0.13)
        sus.resolve_step_size = runner.resolve_step_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = distributed.estimate_llc(_Quartic(), _loader(), **KW)
            out["loss_trace"] = res.loss_trace.tolist()
            out["step_size"] = res.sample.config["step_size"]
            out["chosen"] = res.sample.config["auto_step"]["chosen"]
            out["llc_mean"], out["llc_se"] = res.llc_mean, res.llc_se
            # a given step at which rank 0's chain runs away: every rank raises SamplingDivergedError
            try:
                distributed.sample(_Quartic(), _loader(), **{**KW, "step_size": 0.13})
            except Exception as e:  # noqa: BLE001 - recorded for the test
                out["given"] = [type(e).__name__, str(e)[:200]]
            chi = _susceptibilities(distributed.susceptibilities)
            out["chi"], out["chi_step"] = chi.chi.tolist(), chi.settings["step_size"]
    except Exception as e:  # noqa: BLE001 - recorded for the test
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)


def test_a_calibrated_step_that_runs_away_on_one_rank_only_is_halved_on_every_rank(monkeypatch):
    # each rank reran only its own chains at half the step: rank 0 (whose chain ran away) sampled at 0.065, rank 1
    # at 0.13, and the combined trace mixed the two steps
    fake = lambda *a, **k: (0.13, AutoStepReport(chosen=0.13))  # noqa: E731
    monkeypatch.setattr(runner, "resolve_step_size", fake)
    monkeypatch.setattr(sus, "resolve_step_size", fake)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = pypattern.estimate_llc(_Quartic(), _loader(), **KW)
        chi = _susceptibilities(sus.susceptibilities)
        given = pypattern.sample(
            _Quartic(),
            _loader(),
            step_size=0.065,
            num_burnin_steps=one.sample.config["num_burnin_steps"],
            **KW,
        )
    assert one.sample.config["step_size"] == 0.065  # the single-process run halved the step once
    assert chi.settings["step_size"] == 0.065
    np.testing.assert_array_equal(one.loss_trace, given.loss_trace)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        outs = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(2)]
    for o in outs:
        assert "error" not in o, o.get("error")
        assert o["step_size"] == o["chosen"] == 0.065
        np.testing.assert_array_equal(o["loss_trace"], one.loss_trace)
        assert o["llc_mean"] == one.llc_mean and o["llc_se"] == one.llc_se
        # the step-halving of susceptibilities and bif catches SamplingDivergedError: raised on every rank
        assert o["given"][0] == "SamplingDivergedError", o["given"]
        # (rank 1 raised a RuntimeError and left, while rank 0 ran again and waited for it in a collective)
        assert o["chi_step"] == 0.065
        np.testing.assert_allclose(o["chi"], chi.chi, rtol=1e-9, atol=1e-12)
    assert "rank 0 failed" in outs[1]["given"][1]
