"""step_size="auto" (pypattern.sampling.auto): truths with the step chosen by the calibration, the report in the
result, the refusal with its table. Fast versions run in `make test`; the held-out and HF checks are slow.

Developed on the regular model and the deep linear networks (4,3,8) and (3,3,3,2) rank 1; held out: the DLN
(5,3,5) (Aoyagi: 6.5), the normal crossing w1^2 w2^4 at nbeta 30 against its exact finite-nbeta target, and the
HF models."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from _calls import count_calls

from pypattern import truth
from pypattern.sampling import AutoStepError, estimate_llc, resolve_step_size


def _loader(ds):
    return torch.utils.data.DataLoader(ds, batch_size=len(ds))


def _regular():
    torch.manual_seed(0)
    model = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    return model, _loader(truth.make_regression_data(model, 3, dtype=torch.float64))


def test_regular_model_with_auto_step_and_report():
    # tests/test_llc.py's regular model (d = 6, lambda = 3) with the step chosen by the calibration: the default
    # when no step is given
    model, loader = _regular()
    r = estimate_llc(
        model,
        loader,
        nbeta=1000.0,
        localization=1.0,
        num_chains=8,
        num_draws=400,
        num_steps_bw_draws=5,
        num_burnin_steps=100,
        seed=0,
        quiet=True,
    )
    cfg = r.sample.config
    rep = cfg["auto_step"]
    assert isinstance(cfg["step_size"], float) and cfg["step_size"] == rep["chosen"]
    trials = rep["trials"]
    steps = [t["step_size"] for t in trials]
    assert steps == sorted(steps, reverse=True)  # scanned from the largest down, ratio 2
    assert set(np.round(np.array(steps[:-1]) / np.array(steps[1:]), 12)) <= {1.0, 2.0}
    # the chosen step is the half of the last accepted one, whose trial ran on the same noise (coupled pair,
    # half as many steps); both healthy
    assert trials[-1]["step_size"] == rep["chosen"] and trials[-1]["verdict"] == "ok"
    assert trials[-2]["verdict"] == "ok (noise of the half step's trial)"
    assert (
        trials[-2]["step_size"] == 2 * rep["chosen"]
        and 2 * trials[-2]["num_steps"] == trials[-1]["num_steps"]
    )
    assert any(t["verdict"].startswith("diverged") for t in trials)  # the top of the grid runs away here
    assert "largest healthy step" in rep["reason"] and "same noise" in rep["reason"]
    # the estimated bias of the chosen step is the pair's difference
    assert rep["bias"] == pytest.approx(trials[-2]["llc"] - trials[-1]["llc"])
    assert r.r_hat < 1.1
    assert abs(r.llc_mean - 3.0) / 3.0 < 0.15, (r, rep)


def test_refuses_with_the_table_when_no_step_works():
    model, loader = _regular()
    with pytest.raises(AutoStepError) as e:
        resolve_step_size(
            model, loader, nbeta=1000.0, localization=1.0, max_step_size=0.1, min_step_size=0.02, seed=0
        )
    rep = e.value.report
    # coupled pairs for 0.1 and 0.05 (a step and its half on the same noise), then the rule on independent
    # trials over the whole grid: every trial diverged
    assert rep.chosen is None and rep.step_size == [0.1, 0.05, 0.1, 0.05, 0.025]
    assert all(v.startswith("diverged") for v in rep.verdict)
    msg = str(e.value)
    assert "step_size  steps" in msg and "diverged" in msg and "0.025" in msg
    assert "nothing holds the chains" not in msg  # localization was given
    with pytest.raises(AutoStepError, match=r"With localization=0 nothing holds the chains near w\*"):
        resolve_step_size(model, loader, nbeta=1000.0, max_step_size=0.1, min_step_size=0.02, seed=0)
    with pytest.raises(ValueError, match="calibration_chains"):
        resolve_step_size(model, loader, calibration_chains=1)
    with pytest.raises(ValueError, match="min_step_size"):
        resolve_step_size(model, loader, max_step_size=1e-3, min_step_size=1e-2)


def _dln_auto(widths, rank, chains=16, draws=1000):
    model = truth.DeepLinearNetwork(widths, dtype=torch.float64).set_teacher(rank, seed=2, scale=0.5)
    ds = truth.make_regression_data(model, widths[0], dtype=torch.float64)
    r = estimate_llc(
        model,
        _loader(ds),
        step_size="auto",
        nbeta=100.0,
        localization=1.0,
        num_chains=chains,
        num_draws=draws,
        num_steps_bw_draws=2,
        num_burnin_steps=1000,
        seed=3,
        quiet=True,
    )
    return r, truth.dln_learning_coefficient(widths, rank)


@pytest.mark.slow
@pytest.mark.parametrize("widths, rank", [((4, 3, 8), 0), ((3, 3, 3, 2), 1), ((5, 3, 5), 0)])
def test_deep_linear_network_auto(widths, rank):
    # with coupled halving pairs: (4,3,8) 5.93 (lambda 6), (3,3,3,2) rank 1 3.03 (lambda 3; no coupled pair passes,
    # the independent rule chooses), (5,3,5) 5.89 (6.5) (docs/llc_results.md)
    r, lam = _dln_auto(widths, rank)
    assert abs(r.llc_mean - lam) / lam < 0.15, (r, lam)
    assert r.r_hat < 1.1


def _normal_crossing_auto(chains, draws):
    powers, nbeta = [1, 2], 30.0
    model = truth.NormalCrossing(powers, dtype=torch.float64)
    ds = truth.make_normal_crossing_data(2, dtype=torch.float64)
    r = estimate_llc(
        model,
        _loader(ds),
        step_size="auto",
        nbeta=nbeta,
        localization=1.0,
        num_chains=chains,
        num_draws=draws,
        num_burnin_steps=1000,
        seed=1,
        quiet=True,
    )
    return r, truth.localized_normal_crossing_expectation(powers, nbeta, 1.0, grid=601)


def test_normal_crossing_auto_fast():
    # seeds 1-8 with coupled halving pairs: +13.4, +7.2, +11.3, +2.2, +1.7, +11.8, +3.2, +6.3% (docs/llc_results.md;
    # on independent pairs 5 of 8 were within 15%)
    r, target = _normal_crossing_auto(16, 1000)
    assert abs(r.llc_mean - target) / target < 0.15, (r, target)


@pytest.mark.slow
def test_normal_crossing_auto():
    # 32 chains x 2000 draws (tests/test_llc.py's run), seeds 1-8 with coupled halving pairs: +7.0, +1.8, +5.4,
    # +2.9, +9.2, +8.8, +9.4, +0.1% (docs/llc_results.md; on independent pairs 7 of 8 within 15%, up to +15.4%)
    r, target = _normal_crossing_auto(32, 2000)
    assert abs(r.llc_mean - target) / target < 0.15, (r, target)


def test_bif_and_susceptibilities_take_auto():
    from pypattern import bif, susceptibilities

    model, loader = _regular()
    x, y = next(iter(loader))
    probe = (x[:4], y[:4])
    kw = dict(nbeta=10.0, localization=1.0, num_chains=2, num_draws=10, seed=0)
    # calls with 2 chains calibrate with 4 (as many as the run, between 4 and 8), trials no longer than the run
    # (2 x 10 chain-steps: one unit)
    chosen, _ = resolve_step_size(
        model, loader, nbeta=10.0, localization=1.0, seed=0, calibration_chains=4, max_trial_factor=1
    )
    res = bif(model, loader, probe, **kw)  # no step: "auto"
    assert res.settings["step_size"] == chosen and res.settings["auto_step"]["chosen"] == chosen
    chi = susceptibilities(model, loader, probe, [["layers.0.weight"]], step_size="auto", **kw)
    assert chi.settings["step_size"] == chosen
    # a given step turns the calibration off, also through optimizer_kwargs (devinterp's lr)
    res = bif(model, loader, probe, optimizer_kwargs={"lr": 1e-3}, **kw)
    assert "auto_step" not in res.settings


def test_auto_is_the_default_only_when_no_step_is_given(monkeypatch):
    import pypattern.sampling.runner as runner
    from pypattern import estimate_learning_coeff_with_summary, sample
    from pypattern.sampling.auto import wants_auto

    assert wants_auto(None) and wants_auto("auto") and wants_auto(None, {"nbeta": 3.0})
    assert (
        not wants_auto(1e-3) and not wants_auto(None, {"lr": 1e-3}) and not wants_auto(None, {"step_size": 1})
    )
    with pytest.raises(ValueError, match="'auto'"):
        wants_auto("fast")
    model, loader = _regular()
    r = sample(model, loader, optimizer_kwargs={"lr": 1e-4}, nbeta=1000.0, num_draws=4, quiet=True)
    assert r.config["step_size"] == 1e-4 and "auto_step" not in r.config
    # devinterp's entry point keeps devinterp's default step (lr = 0.01) and never calibrates
    seen = []

    def no_calibration(*a, **k):
        raise AssertionError("estimate_learning_coeff_with_summary calibrated")

    def plan(*a, **k):
        p = make_plan(*a, **k)
        seen.append(p.hyper["step_size"])
        return p

    make_plan = runner.make_plan
    monkeypatch.setattr(runner, "resolve_step_size", no_calibration)
    monkeypatch.setattr(runner, "make_plan", plan)
    estimate_learning_coeff_with_summary(model, loader, num_chains=2, num_draws=4, verbose=False)
    assert seen == [0.01]


def test_hf_gpt2_auto_step_stationary_and_repeatable():
    # a tiny GPT-2 (transformers, random config weights) trained briefly on induction sequences; the calibration
    # with short trials picks a step whose chains are stationary, and two runs with different seeds agree within
    # their standard errors (the full-size comparison: pypattern.experiments.auto_step_hf, docs/llc_results.md)
    pytest.importorskip("transformers")
    from pypattern.experiments.auto_step_hf import HFAutoSettings, _data, _train, build_model, compare
    from pypattern.losses import batch_loss

    s = HFAutoSettings(
        d_model=8, n_layers=1, n_heads=2, d_vocab=8, seq_len=7, num_sequences=32, train_steps=100
    )
    torch.set_num_threads(1)
    tokens = _data(s)
    model = build_model("gpt2", s)
    _train(model, tokens, s)
    loader = torch.utils.data.DataLoader(tokens, batch_size=s.batch_size, shuffle=True)
    kw = dict(loss_fn=batch_loss, localization=100.0, seed=0)
    eps, rep = resolve_step_size(
        model, loader, calibration_chains=4, calibration_steps=40, max_trial_factor=2, **kw
    )
    assert rep.chosen == eps and eps in rep.step_size
    rows = []
    for seed in (1, 2):
        r = estimate_llc(
            model, loader, step_size=eps, num_chains=4, num_draws=60, num_burnin_steps=40, quiet=True,
            **dict(kw, seed=seed),
        )  # fmt: skip
        assert r.r_hat < 1.1, (seed, r.r_hat, rep)
        pc = np.asarray(r.llc_per_chain).ravel()
        # L_n(w*) over the whole epoch (4 batches): the standard error is the spread over chains
        assert r.init_loss_se == 0.0 and r.llc_se == pytest.approx(pc.std(ddof=1) / np.sqrt(len(pc)))
        rows.append({"llc": r.llc_mean, "se": r.llc_se})
    assert compare(rows)["agree"], rows


def test_trials_run_the_runs_sampler(monkeypatch):
    """With ``sampler=`` and the sampler's own hyperparameters in ``optimizer_kwargs``, every calibration trial
    samples with that sampler and those hyperparameters (the chosen step is a step of that sampler)."""
    import pypattern.sampling.runner as runner

    seen = []
    real = runner.sample

    def spy(*args, **kwargs):
        seen.append((kwargs.get("sampler"), dict(kwargs.get("optimizer_kwargs") or {})))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "sample", spy)
    model, loader = _regular()
    r = runner.sample(
        model,
        loader,
        sampler="rmsprop_sgld",
        optimizer_kwargs={"alpha": 0.9},
        nbeta=10.0,
        localization=1.0,
        num_chains=2,
        num_draws=10,
        seed=0,
        quiet=True,
    )
    assert r.config["sampler"] == "rmsprop_sgld" and r.config["alpha"] == 0.9
    trials = seen[1:]  # the first call is the run itself
    assert trials and all(s == "rmsprop_sgld" and o == {"alpha": 0.9} for s, o in trials), trials
    assert "auto_step" in r.config and r.config["step_size"] > 0


class _Quadratic(torch.nn.Module):
    """L(w) = 50 w^2 (curvature 100): SGLD at nbeta 1 diverges for step sizes above 0.04."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return 50.0 * (self.w**2).sum() + 0.0 * x.sum()


def _calibrated_at(monkeypatch, step):
    """resolve_step_size replaced by one that picks ``step`` (a calibration that missed an instability)."""
    import pypattern.sampling.runner as runner
    from pypattern.sampling.auto import AutoStepReport

    def fake(*args, **kwargs):
        return step, AutoStepReport(chosen=step, reason="test")

    monkeypatch.setattr(runner, "resolve_step_size", fake)


def test_auto_run_that_runs_away_is_run_again_at_half_the_step(monkeypatch, tmp_path):
    from pypattern import sample
    from pypattern.sampling.diagnostics import SamplingDivergedError

    loader = torch.utils.data.DataLoader(torch.zeros(8, 1, dtype=torch.float64), batch_size=8)
    kw = dict(loss_fn=lambda m, b: m(b), nbeta=1.0, num_chains=2, num_draws=50, seed=0, quiet=True)
    _calibrated_at(monkeypatch, 0.1)
    with pytest.warns(UserWarning, match="running it again at 0.05"):
        res = sample(_Quadratic(), loader, **kw)
    rep = res.config["auto_step"]
    # 0.1 and 0.05 run away (|1 - step * 100 / 2| > 1), 0.025 is stable
    assert [r["step_size"] for r in rep["reruns"]] == [0.1, 0.05]
    assert (
        rep["chosen"] == res.config["step_size"] == 0.025
        and "run again from the start at 0.025" in rep["reason"]
    )
    assert np.isfinite(res.loss_trace).all() and res.loss_trace.shape == (2, 50)
    # the rerun equals a run given that step from the start (with the burn-in of a calibrated step: the draws')
    assert res.config["num_burnin_steps"] == 50
    given = sample(_Quadratic(), loader, step_size=0.025, num_burnin_steps=50, **kw)
    assert np.array_equal(res.loss_trace, given.loss_trace)

    # callbacks that can start over are reset before each rerun; the run's draws reach them once
    class Counter:
        def __init__(self):
            self.n, self.resets = 0, 0

        def __call__(self, loss):
            self.n += 1

        def reset(self):
            self.n, self.resets = 0, self.resets + 1

    cb = Counter()
    with pytest.warns(UserWarning, match="running it again"):
        sample(_Quadratic(), loader, callbacks=[cb], **kw)
    assert cb.resets == 2 and cb.n == 2 * 50
    # not rerun: a callback without reset(), or a checkpoint (its file holds the diverged run's draws)
    with pytest.raises(SamplingDivergedError, match="step_size=0.1"):
        sample(_Quadratic(), loader, callbacks=[lambda loss: None], **kw)
    with pytest.raises(SamplingDivergedError, match="step_size=0.1"):
        sample(_Quadratic(), loader, checkpoint=str(tmp_path / "run.npz"), **kw)
    # a given step is never changed
    with pytest.raises(SamplingDivergedError, match="step_size=0.1"):
        sample(_Quadratic(), loader, step_size=0.1, **kw)


def test_trials_are_no_longer_than_the_run():
    from pypattern.sampling.auto import trial_factor_for_run

    # in chain-steps: 2 chains x 80 steps < one unit of 4 x 200; 4 x 300 is 1.5 units; long runs stop at 8
    assert trial_factor_for_run(4, num_chains=2, num_draws=40, num_burnin_steps=39, num_steps_bw_draws=1) == 1
    assert (
        trial_factor_for_run(4, num_chains=4, num_draws=200, num_burnin_steps=100, num_steps_bw_draws=1) == 2
    )
    assert (
        trial_factor_for_run(8, num_chains=32, num_draws=2000, num_burnin_steps=1000, num_steps_bw_draws=1)
        == 8
    )
    model, loader = _regular()
    r = estimate_llc(
        model,
        loader,
        nbeta=1000.0,
        localization=1.0,
        num_chains=2,
        num_draws=40,
        num_burnin_steps=40,
        seed=0,
        quiet=True,
        warn_nonstationary=False,
    )
    trials = r.sample.config["auto_step"]["trials"]
    # one unit (200 steps) per trial; the coupled pair's trial of the larger step runs half as many steps
    assert trials and all(t["num_steps"] in (100, 200) for t in trials), trials
    assert {t["num_steps"] for t in trials if "noise of the half step" not in t["verdict"]} == {200}
    assert r.sample.config["step_size"] == r.sample.config["auto_step"]["chosen"]


def test_bif_and_susceptibilities_rerun_a_calibrated_step_that_runs_away(monkeypatch):
    import pypattern.susceptibility as sus
    from pypattern.sampling.auto import AutoStepReport

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = x @ torch.randn(3, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    probe = (x[:4], y[:4])
    # nbeta 50: curvature about 100 * E[x^2], so 0.1 and 0.05 run away and 0.025 does not
    monkeypatch.setattr(
        sus, "resolve_step_size", lambda *a, **k: (0.1, AutoStepReport(chosen=0.1, reason="test"))
    )
    kw = dict(nbeta=50.0, localization=1.0, num_chains=2, num_draws=30, seed=0, quiet=True)
    with pytest.warns(UserWarning, match="running it again"):
        res = sus.bif(model, loader, probe, **kw)
    rep = res.settings["auto_step"]
    assert res.settings["step_size"] == rep["chosen"] < 0.1 and rep["reruns"][0]["step_size"] == 0.1
    # the rerun equals a run given that step (and the burn-in of a calibrated step: the draws')
    ref = sus.bif(model, loader, probe, **dict(kw, step_size=res.settings["step_size"], num_burnin_steps=30))
    np.testing.assert_array_equal(res.bif, ref.bif)
    with pytest.warns(UserWarning, match="running it again"):
        chi = sus.susceptibilities(model, loader, probe, [["weight"]], **kw)
    assert chi.settings["step_size"] == res.settings["step_size"]
    ref = sus.susceptibilities(
        model,
        loader,
        probe,
        [["weight"]],
        **dict(kw, step_size=chi.settings["step_size"], num_burnin_steps=30),
    )
    np.testing.assert_array_equal(chi.chi, ref.chi)


class _Linear(torch.nn.Module):
    """Squared error of a linear map on (x, y) batches."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2, dtype=torch.float64)

    def forward(self, x):
        return self.lin(x)


def _coupled_pair(step, nbeta, coupling=2, **kw):
    """A run at ``step`` coupled (noise_coupling=2) to one at ``step / 2`` with twice the steps, on a shuffled
    loader of 5 batches: their loss traces, draw for draw (the coarse run's draw k at the fine run's draw k)."""
    from pypattern import sample

    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    model = _Linear()

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    common = dict(loss_fn=loss_fn, num_chains=3, num_draws=6, nbeta=nbeta, seed=4, quiet=True, **kw)
    common.setdefault("warn_nonstationary", False)
    coarse = sample(model, loader, step_size=step, num_burnin_steps=5, noise_coupling=coupling, **common)
    fine = sample(model, loader, step_size=step / 2, num_burnin_steps=10, num_steps_bw_draws=2, **common)
    return coarse.loss_trace, fine.loss_trace


def test_noise_coupling_follows_the_half_step_runs_brownian_path():
    # without drift (nbeta 1e-300, no localization) both runs are the Brownian path of the same noise: the coarse
    # run at step t sits where the fine run is at step 2t, and reads the same batch there (shuffled loader)
    a, b = _coupled_pair(0.02, 1e-300)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    assert np.ptp(a) > 0  # the chains moved
    # with drift the two runs differ by their discretisation only: far less than two independent runs do
    a, b = _coupled_pair(0.005, 20.0, localization=1.0)
    c, _ = _coupled_pair(0.005, 20.0, localization=1.0, coupling=1)
    assert np.abs(a - b).mean() < 0.25 * np.abs(c - b).mean(), (np.abs(a - b).mean(), np.abs(c - b).mean())


def test_noise_coupling_masks_and_refusals():
    from pypattern import sample

    # a restricted run: the frozen weights stay at w*, coupled or not
    a, b = _coupled_pair(0.02, 1e-300, restrict_to="lin.bias")
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    model, loader = _regular()
    kw = dict(num_chains=2, num_draws=4, nbeta=10.0, quiet=True)
    for bad, name in (
        (dict(step_size="auto"), "step_size"),
        (dict(step_size=1e-3, sampler="sgnht"), "sampler"),
        (dict(step_size=1e-3, bounding_box=1.0), "bounding_box"),
        (dict(step_size=1e-3, batched=False), "batched"),
    ):
        with pytest.raises(ValueError, match=name):
            sample(model, loader, noise_coupling=2, **kw, **bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="noise_coupling must be an int >= 1"):
            sample(model, loader, step_size=1e-3, noise_coupling=bad, **kw)


@pytest.mark.parametrize("seed", [1, 5])
def test_short_run_reruns_a_drifting_trial_over_the_first_healthy_ones_time(seed):
    # 4 chains x 200 draws: the run is one unit of trial steps long, so trials are capped at that unit; a trial of a
    # smaller step is then too short to reach stationarity, and the scan raised AutoStepError for these data
    # orders. A drifting trial below the first healthy one now runs again over that trial's Langevin time.
    import warnings

    from pypattern import truth

    m = truth.DeepLinearNetwork((3, 2)).set_teacher(2)  # regular: lambda = 6 / 2
    ds = truth.make_regression_data(m, 3, 300)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = estimate_llc(m, loader, num_chains=4, num_draws=200, quiet=True, seed=seed)
    assert abs(r.llc_mean - 3.0) < 0.75, r
    trials = r.sample.config["auto_step"]["trials"]
    coupled = [t for t in trials if "noise of the half step" in t["verdict"]]
    first = next(t for t in coupled if t["verdict"].startswith("ok"))
    reruns = 0
    for a, b in zip(coupled, coupled[1:]):
        if a["step_size"] == b["step_size"]:  # a drifting trial, then the same step over the matched time
            assert a["verdict"].startswith("not stationary") and a["num_steps"] < b["num_steps"]
            halvings = round(math.log2(first["step_size"] / b["step_size"]))
            assert b["num_steps"] == min(first["num_steps"] * 2**halvings, 8 * 200 // 2)
            reruns += 1
    assert reruns >= 1, trials


def test_a_choice_after_drifting_steps_without_localization_warns():
    """Without localization, a step chosen below four or more steps whose trials all drifted is where the chains
    barely move: warned, naming localization. Not with a localization, nor when a larger step was healthy (a step
    chosen smaller for its bias), nor after fewer drifting steps."""
    from pypattern.sampling.auto import AutoStepReport, _warn_if_drift_chose

    steps = [0.1 / 2**k for k in range(15)]
    drift = ["not stationary (R-hat 1.30 >= 1.1)"] * 14 + ["ok"]
    rep = AutoStepReport(step_size=steps, verdict=drift, chosen=steps[-1] / 2)
    with pytest.warns(UserWarning, match=r"localization=0: the chains drifted .* at all 14 larger steps"):
        _warn_if_drift_chose(rep, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_drift_chose(rep, 100.0)
        biased = AutoStepReport(
            step_size=steps, verdict=drift[:5] + ["ok; changes when halved (1 > 0.1)"] * 9 + ["ok"],
            chosen=steps[-1] / 2,
        )  # fmt: skip
        _warn_if_drift_chose(biased, 0.0)
        few = AutoStepReport(step_size=steps[:4], verdict=drift[:3] + ["ok"], chosen=steps[3] / 2)
        _warn_if_drift_chose(few, 0.0)


@pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning")
def test_a_resumed_run_reuses_its_calibration(tmp_path, monkeypatch):
    """A checkpointed run with step_size="auto" records its calibration in the checkpoint; resuming the same call
    reads it instead of calibrating again (the trials can cost more than a short run), and gives the result of
    the uninterrupted run, report included. A record whose calibration settings differ is not used."""
    import pypattern.sampling.runner as runner
    from pypattern import sample
    from pypattern.sampling.auto import AutoStepReport, calibrate_or_resume
    from pypattern.sampling.checkpoint import stored_calibration

    class Stop(Exception):
        pass

    model, loader = _regular()
    # trials of 32 steps: 14 of them, 5 runaway (NaN estimates in the report) and drifting ones among them
    kw = dict(nbeta=1000.0, localization=1.0, num_chains=2, num_draws=12, seed=3, quiet=True)
    kw["auto_step_options"] = {"calibration_steps": 32}
    whole = sample(model, loader, step_size="auto", **kw)
    assert any(math.isnan(t["llc"]) for t in whole.config["auto_step"]["trials"])
    calls = count_calls(monkeypatch, runner, "resolve_step_size")
    path = str(tmp_path / "run.npz")
    seen = []

    def stop(draw, **_):
        seen.append(draw)
        if len(seen) == 5:
            raise Stop

    with pytest.raises(Stop):
        sample(model, loader, step_size="auto", checkpoint=path, callbacks=[stop], **kw)
    assert len(calls) == 1
    record = stored_calibration(path)
    assert record is not None and record["report"]["chosen"] == whole.config["step_size"]
    resumed = sample(model, loader, step_size="auto", checkpoint=path, **kw)
    assert len(calls) == 1  # no second calibration
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)
    # the calibration's report as the uninterrupted run's (its wall time aside; NaN estimates of runaway trials)
    same = [
        json.dumps({k: v for k, v in r.config["auto_step"].items() if k != "seconds"}, sort_keys=True)
        for r in (resumed, whole)
    ]
    assert same[0] == same[1]
    assert resumed.config["auto_step"]["seconds"] == record["report"]["seconds"]
    # a record of other calibration settings (here another seed's) is not taken: it calibrates (short trials: the
    # calibration's cost is not what is checked); the record of the same settings is
    import pypattern.sampling.auto as auto

    cheap = dict(nbeta=10.0, localization=1.0, calibration_chains=4, calibration_steps=32, max_trial_factor=2)
    _, _, other = calibrate_or_resume(
        model,
        loader,
        dict(cheap, seed=4),
        resolve=lambda *a, **k: (0.5, AutoStepReport(chosen=0.5, reason="4")),
    )
    calls = count_calls(monkeypatch, auto, "resolve_step_size")
    assert calibrate_or_resume(model, loader, dict(cheap, seed=4), other)[0] == 0.5 and not calls
    step, report, fresh = calibrate_or_resume(model, loader, dict(cheap, seed=9), other)
    assert len(calls) == 1 and fresh["key"] != other["key"] and step == report.chosen != 0.5


@pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning")
def test_a_resumed_susceptibility_call_reuses_its_calibration(tmp_path, monkeypatch):
    """susceptibilities with step_size="auto" and a checkpoint folder keep the calibration in the folder; the
    same call again (a resume) does not calibrate, and gives the same chi."""
    import pypattern.susceptibility as sus
    from pypattern import susceptibilities

    model, loader = _regular()
    x, y = next(iter(loader))
    probe = (x[:4], y[:4])
    kw = dict(nbeta=10.0, localization=1.0, num_chains=2, num_draws=10, seed=0, quiet=True)
    kw["auto_step_options"] = {"calibration_steps": 32}  # short trials: the calibrations' cost is not checked
    calls = count_calls(monkeypatch, sus, "resolve_step_size")
    first = susceptibilities(model, loader, probe, [["layers.0.weight"]], checkpoint=str(tmp_path), **kw)
    assert len(calls) == 1 and (tmp_path / sus.CALIBRATION_FILE).exists()
    again = susceptibilities(model, loader, probe, [["layers.0.weight"]], checkpoint=str(tmp_path), **kw)
    assert len(calls) == 1
    np.testing.assert_array_equal(np.asarray(again.chi), np.asarray(first.chi))
    assert json.dumps(again.settings["auto_step"], sort_keys=True) == json.dumps(
        first.settings["auto_step"], sort_keys=True
    )
    # another seed calibrates again (and its run is refused as another run by the rows' fingerprints)
    with pytest.raises(Exception, match="seed"):
        susceptibilities(
            model, loader, probe, [["layers.0.weight"]], checkpoint=str(tmp_path), **{**kw, "seed": 1}
        )
    assert len(calls) == 2


def _least_squares_regression(batch_size):
    """A linear map (5 inputs, 3 outputs and a bias: d = 18) at the least-squares minimum of its MSE on n = 1000
    points. The loss is quadratic, so the LLC at nbeta 0.5 and localization 1 is exactly ``1/2 sum nbeta h / (nbeta
    h + 1)`` over the Hessian's eigenvalues ``h``: 2.88. Every direction is flat against the localization (``nbeta
    h`` from 0.08 to 1.3): the chains relax at about ``eps / 2`` per step."""
    g = torch.Generator().manual_seed(0)
    din, dout, n, nbeta = 5, 3, 1000, 0.5
    x = torch.randn(n, din, generator=g, dtype=torch.float64) * torch.linspace(
        0.5, 2, din, dtype=torch.float64
    )
    teacher = torch.randn(dout, din, generator=g, dtype=torch.float64)
    y = x @ teacher.T + 0.5 * torch.randn(n, dout, generator=g, dtype=torch.float64) + 1.0
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, y).solution
    model = torch.nn.Linear(din, dout, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(sol[:din].T)
        model.bias.copy_(sol[din])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True
    )
    h = torch.linalg.eigvalsh(2 * xa.T @ xa / (n * dout)).repeat(dout)
    return model, loader, float((nbeta * h / (nbeta * h + 1.0)).sum() / 2)


@pytest.mark.parametrize("batch_size", [100, 1000])
def test_auto_step_lets_slowly_relaxing_chains_relax(batch_size):
    # at nbeta 0.5 trials of 100-200 steps fail R-hat from 0.1 down (too few effective draws at the top, still
    # relaxing below) until steps so small that the chains do not move: with minibatches the loss trace is then
    # minibatch noise (R-hat ~1.04) and the halving pair covers the same short Langevin time and agrees with itself
    # (without the relaxation rules: 1.2e-5, estimate 0.024 of 2.88; full batch 6.25e-3 after 28 trials). The trial
    # at 0.1 runs again for 20 relaxation times, and 0.05 is chosen (docs/llc_results.md)
    model, loader, exact = _least_squares_regression(batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run's own 4 x 200 draws: R-hat ~1.1-1.3 at nbeta 0.5
        r = estimate_llc(model, loader, nbeta=0.5, localization=1.0, seed=0, quiet=True)
    rep = r.sample.config["auto_step"]
    chosen = rep["trials"][-1]
    assert chosen["step_size"] == rep["chosen"] == r.sample.config["step_size"]
    # the chosen step's trial covered at least 3 relaxation times of the flattest direction (eps * 1 * steps / 2)
    assert chosen["step_size"] * chosen["num_steps"] / 2 >= 3, rep
    assert "relaxation times of the flattest direction" in rep["reason"]
    assert abs(r.llc_mean - exact) / exact < 0.15, (r.llc_mean, r.llc_se, exact, rep)


def test_refuses_where_no_trial_can_relax():
    # every trial fails R-hat (max_r_hat barely above 1): the scan goes down the grid until no trial within
    # max_trial_factor x calibration_steps steps can cover 3 relaxation times of even the stiffest direction (0.1
    # ran without diverging: the largest curvature is below 4 / 0.1), and stops there with the table and the reason
    model, loader, _ = _least_squares_regression(100)
    with pytest.raises(AutoStepError) as e:
        resolve_step_size(
            model, loader, nbeta=0.5, localization=1.0, seed=0, calibration_chains=4, calibration_steps=40,
            max_trial_factor=2, max_r_hat=1.0001,
        )  # fmt: skip
    rep = e.value.report
    assert rep.chosen is None and rep.step_size and all(not v.startswith("ok") for v in rep.verdict)
    # at most 2 units of 40 steps: a coupled trial at eps (40 steps) covers at most 2 * eps * 40 / 0.1 relaxation
    # times, fewer than 3 below 3.75e-3, and an independent one (80 steps) below 1.875e-3: the coupled pairs stop
    # at 3.125e-3, the independent trials at 1.5625e-3, before running them
    coupled = [s for s, v in zip(rep.step_size, rep.verdict, strict=True) if "noise of the half step" in v]
    assert min(coupled) == 6.25e-3 and min(rep.step_size) == 3.125e-3
    assert "the scan stopped at 0.00156" in rep.reason
    assert "relaxation times of even its stiffest direction" in str(e.value)
