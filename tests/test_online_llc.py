"""OnlineLLC: estimates at the scheduled steps of a training loop without disturbing it (bit-identical weights
with and without the callback, global RNG and training mode restored)."""

import numpy as np
import pytest
import torch
from torch import nn

from pypattern.sampling import OnlineLLC, estimate_llc


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 1))


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(1, keepdim=True)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def _train(cb=None, steps=12):
    """A user's loop: batches from torch's global RNG, dropout on, SGD with momentum."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(123)
    losses = []
    for step in range(steps):
        x = torch.randn(16, 4)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if cb is not None:
            cb(model, step, loss=float(loss))
            assert model.training
    return model, losses, torch.rand(3)


def test_training_with_callback_is_bit_identical():
    ref, ref_losses, ref_next = _train()
    cb = OnlineLLC(_loader(), every=4, num_chains=2, num_draws=10, step_size=1e-3, localization=10.0, seed=0)
    got, losses, nxt = _train(cb)
    assert losses == ref_losses
    assert torch.equal(nxt, ref_next)  # the global RNG continues where it would have
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    res = cb.result
    assert list(res.step) == [0, 4, 8]
    np.testing.assert_array_equal(res.train_loss, [ref_losses[0], ref_losses[4], ref_losses[8]])
    assert np.all(np.isfinite(res.llc_mean))
    df = res.to_pandas()
    assert list(df["step"]) == [0, 4, 8]


def test_estimate_equals_estimate_llc_at_those_weights():
    model = _net().eval()
    kw = dict(num_chains=2, num_draws=10, step_size=1e-3, localization=10.0, seed=0)
    cb = OnlineLLC(_loader(), steps=[7], **kw)
    assert cb(model, 6) is None
    row = cb(7, model)  # pypattern.tasks.train's (step, model) order works too
    direct = estimate_llc(model, _loader(), quiet=True, **kw)
    assert row["llc_mean"] == pytest.approx(direct.llc_mean, rel=1e-12)


def test_schedule_is_required():
    with pytest.raises(ValueError, match="every"):
        OnlineLLC(_loader())
    with pytest.raises(ValueError, match="every must be"):
        OnlineLLC(_loader(), every=0)


def test_schedule_steps_are_checked_by_name():
    import pypattern as pp

    loader = [torch.randn(4, 3)]
    for bad, err in (([2.5], ValueError), ([-1], ValueError), (["x"], ValueError), (5, TypeError)):
        with pytest.raises(err, match="steps"):
            pp.OnlineLLC(loader, steps=bad)
    assert pp.OnlineLLC(loader, steps=[0, 3]).steps == {0, 3}


def test_every_estimate_at_the_calibrated_step_burns_in(monkeypatch):
    """The step calibrated at the first estimate is kept for the curve, and so is a calibrated step's burn-in
    (the draws' steps): the later estimates, given the step, burn in as long as the first."""
    import pypattern.sampling.runner as runner
    from pypattern.sampling.auto import AutoStepReport

    monkeypatch.setattr(
        runner, "resolve_step_size", lambda *a, **k: (1e-3, AutoStepReport(chosen=1e-3, reason="test"))
    )
    seen = []
    real = runner._sample

    def spy(plan, model, loader):
        seen.append((plan.hyper["step_size"], plan.num_burnin_steps))
        return real(plan, model, loader)

    monkeypatch.setattr(runner, "_sample", spy)
    model = _net().eval()
    cb = OnlineLLC(
        _loader(), every=1, num_chains=2, num_draws=10, num_steps_bw_draws=2, localization=10.0, seed=0
    )
    cb(model, 0)
    cb(model, 1)
    assert seen == [(1e-3, 20), (1e-3, 20)]


def test_a_deterministic_model_in_train_mode_is_read_as_estimate_llc_reads_it():
    """A BatchNorm model left in train() mode by the loop (no dropout): the estimate equals estimate_llc's at the
    same weights, which samples it in train() mode (the callback leaves it in that mode); a model with dropout
    is read in eval() mode by both (the test above)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    kw = dict(num_chains=2, num_draws=4, step_size=1e-4, nbeta=20.0, localization=100.0, seed=2, quiet=True)
    ref = estimate_llc(model, _loader(), **kw)
    cb = OnlineLLC(_loader(), steps=[0], **kw)
    cb(model, 0)
    assert model.training and model[1].training
    assert cb.result.init_loss[0] == ref.init_loss
    assert cb.result.llc_mean[0] == ref.llc_mean
    model.eval()
    assert estimate_llc(model, _loader(), **kw).init_loss != ref.init_loss  # the mode matters for this model


def test_keywords_are_checked_when_the_callback_is_built():
    """A mistyped keyword or a value the estimate refuses is an error at construction, with the estimators' own
    messages, not at the first scheduled step after the training run has run that far."""
    loader = _loader()
    with pytest.raises(TypeError, match=r"OnlineLLC got unexpected keyword arguments \['num_chians'\]"):
        OnlineLLC(loader, steps=[50], num_chians=4)
    with pytest.raises(ValueError, match=r"step_size \(lr\) must be a finite number > 0, got -1.0"):
        OnlineLLC(loader, steps=[50], step_size=-1.0)
    with pytest.raises(ValueError, match=r"num_chains must be an int >= 1, got 0"):
        OnlineLLC(loader, every=10, num_chains=0)
    with pytest.raises(ValueError, match=r"seed must be an int"):
        OnlineLLC(loader, every=10, seed=-3)
    with pytest.raises(ValueError, match=r"sampler"):
        OnlineLLC(loader, every=10, sampler="hmc")
    with pytest.raises(TypeError, match=r"OnlineLLC got unexpected keyword arguments \['restrict_to'\]"):
        OnlineLLC(loader, every=10, components=["0"], restrict_to="0.*")
    # valid keywords, the calibrated step and devinterp's names pass
    cb = OnlineLLC(loader, every=10, num_chains=2, lr=1e-3, nbeta=np.float64(4.0), seed=np.int64(1))
    assert cb.sample_kwargs["lr"] == 1e-3
    OnlineLLC(loader, every=10, step_size="auto", localization=10.0)
    # the check leaves torch's global generator as it was, also for a loader read to find its batch size
    x = torch.randn(40, 3)
    ds = torch.utils.data.TensorDataset(x, x[:, :1])
    sampled = torch.utils.data.DataLoader(
        ds, batch_sampler=torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds), 8, False)
    )
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    OnlineLLC(sampled, every=10, num_chains=2)
    torch.testing.assert_close(torch.rand(3), want, rtol=0, atol=0)


def test_numpy_steps_in_either_order_and_a_repeated_step_replaces_its_row():
    model = _net().eval()
    kw = dict(num_chains=2, num_draws=5, step_size=1e-3, localization=10.0, seed=0)
    cb = OnlineLLC(_loader(), every=3, **kw)
    assert cb(np.int64(4), model) is None
    first = cb(np.int64(3), model)  # (step, model) with a numpy step
    assert first["step"] == 3 and isinstance(first["step"], int)
    assert cb(model, torch.tensor(6))["step"] == 6
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    again = cb(model, 3)  # estimated again at other weights: the row for step 3 is replaced
    assert list(cb.result.step) == [6, 3]
    assert cb.result.llc_mean[1] == again["llc_mean"] != first["llc_mean"]
    with pytest.raises(TypeError, match="step must be an int"):
        cb(model, 3.0)
    with pytest.raises(TypeError, match="step must be an int"):
        cb(model, True)
