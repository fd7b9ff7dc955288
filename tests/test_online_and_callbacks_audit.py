"""OnlineLLC along a training run against estimate_llc run separately at each estimate's weights, and sample's
hooks into a run (callbacks, observables) against the same quantities computed by hand at the draws' weights."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pypattern.sampling import OnlineLLC, estimate_llc, sample
from pypattern.sampling.online import OnlineLLCResult

RUN = dict(step_size=1e-3, localization=10.0, nbeta=20.0, quiet=True, warn_nonstationary=False)


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    y = x.sum(1, keepdim=True)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def _net():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def _square_output(m, b):
    return m(b[0]).pow(2).mean()


def test_each_online_estimate_equals_estimate_llc_at_that_steps_weights_with_its_standard_error():
    model = _net()
    kw = dict(num_chains=2, num_draws=8, step_size=1e-3, localization=10.0, nbeta=20.0, seed=3)
    cb = OnlineLLC(_loader(), steps=[5, 1, 3], **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(7)
    snapshots, losses = {}, {}
    for step in range(6):
        x = torch.randn(16, 3, generator=gen)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cb.due(step):
            snapshots[step] = copy.deepcopy(model)
            losses[step] = float(loss.detach())
        with warnings.catch_warnings():
            warnings.simplefilter(
                "error"
            )  # the training loss as the loop has it: a tensor that requires grad
            cb(model, step, loss=loss)
    res = cb.result
    assert list(res.step) == [1, 3, 5]
    for i, s in enumerate(res.step):
        d = estimate_llc(snapshots[int(s)], _loader(), quiet=True, warn_nonstationary=False, **kw)
        assert res.llc_mean[i] == d.llc_mean
        assert res.llc_std[i] == d.llc_std
        assert res.llc_se[i] == d.llc_se and np.isfinite(d.llc_se)
        assert res.r_hat[i] == d.r_hat
        assert res.init_loss[i] == d.init_loss
        assert res.train_loss[i] == losses[int(s)]
    np.testing.assert_array_equal(res.to_pandas()["llc_se"], res.llc_se)


def test_an_online_result_round_trips_its_standard_errors_and_a_file_without_them_reads_as_nan(tmp_path):
    res = OnlineLLCResult(
        step=np.array([0, 2]),
        llc_mean=np.array([1.0, 2.0]),
        llc_std=np.array([0.5, 0.6]),
        llc_se=np.array([0.1, 0.2]),
        r_hat=np.array([1.0, 1.01]),
        init_loss=np.array([0.3, 0.2]),
        train_loss=np.array([np.nan, 0.25]),
    )
    res.save(tmp_path / "a.npz")
    back = OnlineLLCResult.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(back.llc_se, res.llc_se)
    old = OnlineLLCResult(**{**res.__dict__, "llc_se": np.zeros(0)})
    old.save(tmp_path / "b.npz")
    assert np.isnan(OnlineLLCResult.load(tmp_path / "b.npz").llc_se).tolist() == [True, True]


@pytest.mark.parametrize("batched", [False, True])
def test_callbacks_see_each_draw_once_with_the_weights_batch_loss_and_observables_recorded(batched):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def cb(chain, run, draw, step, model, batch, observables, loss, init_loss):
        calls.append((chain, run, draw, step, [p.detach().clone() for p in model.parameters()], batch))
        calls[-1] += (float(observables["o"]), loss, init_loss)

    burnin, between, draws, chains = 5, 2, 4, 2
    r = sample(
        model,
        _loader(),
        num_chains=chains,
        num_draws=draws,
        num_burnin_steps=burnin,
        num_steps_bw_draws=between,
        seed=0,
        observables={"o": _square_output},
        callbacks=[cb],
        batched=batched,
        **RUN,
    )
    assert r.batched == batched
    # one call per draw and chain, none during burn-in or between draws; a chain's draws in order
    assert sorted((c, d, s) for c, _, d, s, *_ in calls) == [
        (c, d, burnin + d * between) for c in range(chains) for d in range(draws)
    ]
    for c in range(chains):
        assert [d for cc, _, d, *_ in calls if cc == c] == list(range(draws))
    at = copy.deepcopy(model)
    for c, run, d, _, weights, batch, obs, loss, init_loss in calls:
        assert run == 0 and init_loss == r.init_loss
        with torch.no_grad():
            for p, w in zip(at.parameters(), weights, strict=True):
                p.copy_(w)
            by_hand = float(_square_output(at, batch))
            loss_by_hand = float(nn.functional.mse_loss(at(batch[0]), batch[1]))
        assert r.observables["o"][c, d] == pytest.approx(by_hand, rel=1e-6)
        assert obs == r.observables["o"][c, d]
        assert loss == pytest.approx(loss_by_hand, rel=1e-6) and loss == r.loss_trace[c, d]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("batched", [False, True])
def test_a_raising_callback_stops_the_run_and_leaves_the_weights(batched):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    class Stop(Exception):
        pass

    def cb(chain, draw):
        seen.append((chain, draw))
        if draw == 2:
            raise Stop

    with pytest.raises(Stop):
        sample(model, _loader(), num_chains=2, num_draws=6, seed=0, callbacks=[cb], batched=batched, **RUN)
    assert max(d for _, d in seen) == 2  # no draw after the raising one
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("batched", [False, True])
def test_observables_non_scalar_and_non_finite_values_and_unrecorded_traces(batched):
    model = _net()
    loader = _loader()
    obs = {"nan": lambda m, b: torch.tensor(float("nan")), "per_sample": lambda m, b: m(b[0]).squeeze(-1)}
    with pytest.warns(RuntimeWarning, match="'nan'.*non-finite"):
        r = sample(model, loader, num_chains=2, num_draws=3, seed=0, observables=obs, batched=batched, **RUN)
    assert np.isnan(r.observables["nan"]).all() and r.observables["nan"].shape == (2, 3)
    assert r.observables["per_sample"].shape == (2, 3, 16) and r.observables["per_sample"].dtype == np.float64
    got = []
    r2 = sample(
        model,
        loader,
        num_chains=2,
        num_draws=3,
        seed=0,
        observables={"o": _square_output},
        callbacks=[lambda observables, chain, draw: got.append((chain, draw, float(observables["o"])))],
        record_observables=False,
        batched=batched,
        **RUN,
    )
    assert r2.observables == {}
    r3 = sample(
        model,
        loader,
        num_chains=2,
        num_draws=3,
        seed=0,
        observables={"o": _square_output},
        batched=batched,
        **RUN,
    )
    assert sorted(got) == sorted((c, d, r3.observables["o"][c, d]) for c in range(2) for d in range(3))
