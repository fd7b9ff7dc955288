"""OnlineLLC across a restart of the training run: a new callback given the same ``checkpoint`` (or the
``state_dict`` of the one before) continues the curve, with the step calibrated at the first estimate, and the
curve equals the one of the run without the restart; the curve of another run (settings, data,
components, model) is refused naming what differs, and a damaged or foreign state file naming the file."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import pypattern.sampling.runner as runner
from pypattern import io
from pypattern.sampling import OnlineLLC, estimate_llc

STEPS = range(7)  # estimates at 0, 2, 4, 6


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def _loader(batch_size: int = 16, scale: float = 1.0):
    x, y = _data()
    return [(x[i : i + batch_size], scale * y[i : i + batch_size]) for i in range(0, 64, batch_size)]


def _loss(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _other_loss(model, batch):
    return nn.functional.l1_loss(model(batch[0]), batch[1])


KW = dict(loss_fn=_loss, num_chains=2, num_draws=20, localization=10.0, seed=0)


def _arch(hidden: int = 8):
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def _start():
    """A model near a minimum (the step-size calibration needs one) and the training run's optimizer."""
    torch.manual_seed(0)
    model = _arch()
    x, y = _data()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        adam.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        adam.step()
    return model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)


def _train(model, opt, steps, cb, save_at=None):
    """A training loop calling ``cb`` after each step; the training state after step ``save_at`` (its own
    checkpoint) is returned."""
    x, y = _data()
    saved = None
    for step in steps:
        i = 16 * (step % 4)
        loss = nn.functional.mse_loss(model(x[i : i + 16]), y[i : i + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        cb(model, step, loss=loss)
        if step == save_at:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    return saved


def _restarted(saved):
    model = _arch()
    model.load_state_dict(saved[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    opt.load_state_dict(saved[1])
    return model, opt


def _same_curve(a, b):
    for k in ("step", "llc_mean", "llc_std", "llc_se", "r_hat", "init_loss", "train_loss"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run without a restart (step_size="auto", calibrated at the first estimate), with the weights at each
    estimate."""
    ck = tmp_path_factory.mktemp("straight") / "llc.npz"
    model, opt = _start()
    cb = OnlineLLC(_loader(), every=2, checkpoint=ck, **KW)
    weights = {}

    def keep(m, step, loss=None):
        if cb(m, step, loss=loss) is not None:
            weights[step] = copy.deepcopy(m.state_dict())

    _train(model, opt, STEPS, keep)
    return cb, weights


def test_a_restarted_run_continues_the_curve_from_the_checkpoint(straight, tmp_path, monkeypatch):
    ref, weights = straight
    step_size = ref.sample_kwargs["step_size"]
    assert (
        isinstance(step_size, float) and ref.auto_step["chosen"] == step_size
    )  # (the report of the first estimate)
    assert list(ref.result.step) == [0, 2, 4, 6]
    # each row is estimate_llc at that step's weights, at the step and burn-in calibrated at the first estimate
    model = _arch()
    model.load_state_dict(weights[4])
    burnin = ref.sample_kwargs["num_burnin_steps"]
    direct = estimate_llc(
        model,
        _loader(),
        step_size=step_size,
        num_burnin_steps=burnin,
        quiet=True,
        warn_nonstationary=False,
        **KW,
    )
    assert ref.result.llc_mean[2] == direct.llc_mean

    ck = tmp_path / "llc.npz"
    model, opt = _start()
    first = OnlineLLC(_loader(), every=2, checkpoint=ck, **KW)
    # the training run writes its own checkpoint after step 3, estimates at step 4, and dies before its next one
    saved = _train(model, opt, range(5), first, save_at=3)
    assert sorted(os.listdir(tmp_path)) == [f"llc.{t}.npz" for t in ("online", "step0", "step2", "step4")]
    del first, model, opt

    calibrations = []
    real = runner.resolve_step_size
    monkeypatch.setattr(runner, "resolve_step_size", lambda *a, **k: calibrations.append(1) or real(*a, **k))
    model, opt = _restarted(saved)
    cb = OnlineLLC(_loader(), every=2, checkpoint=ck, **KW)
    assert list(cb.result.step) == [0, 2, 4]  # the rows before the restart, read at construction
    assert cb.sample_kwargs["step_size"] == step_size and cb.sample_kwargs["num_burnin_steps"] == burnin
    assert cb.auto_step["chosen"] == step_size
    _train(
        model, opt, range(4, 7), cb
    )  # step 4 again (its row replaced, read from its sampler checkpoint), 6
    assert not calibrations  # the step calibrated before the restart, not a new one at step 4's weights
    _same_curve(cb.result, ref.result)
    assert cb.result.seconds > 0


def test_a_state_dict_carries_the_curve_without_a_checkpoint(straight, tmp_path):
    ref, _ = straight
    model, opt = _start()
    first = OnlineLLC(_loader(), every=2, **KW)
    saved = _train(model, opt, range(4), first, save_at=3)
    state = json.loads(json.dumps(first.state_dict()))  # plain values
    assert [r["step"] for r in state["rows"]] == [0, 2]
    model, opt = _restarted(saved)
    cb = OnlineLLC(_loader(), every=2, **KW)
    cb.load_state_dict(state)
    assert cb.sample_kwargs["step_size"] == ref.sample_kwargs["step_size"]
    _train(model, opt, range(4, 7), cb)
    _same_curve(cb.result, ref.result)
    assert cb.state_path is None and not os.listdir(tmp_path)  # nothing written without checkpoint=
    with pytest.raises(io.FingerprintMismatch, match="load_state_dict.*num_draws = 20 there, 10 now"):
        OnlineLLC(_loader(), every=2, **{**KW, "num_draws": 10}).load_state_dict(state)
    with pytest.raises(io.FormatError, match="row 1's step is 0"):
        cb.load_state_dict({**state, "rows": [state["rows"][0], state["rows"][0]]})
    with pytest.raises(io.FormatError, match="row 0's step is -1"):
        cb.load_state_dict({**state, "rows": [{**state["rows"][0], "step": -1}]})


def test_devinterps_lr_auto_keeps_the_calibrated_step(straight):
    """lr="auto" (devinterp's name) calibrates at the first estimate and estimates the next at that step, as
    step_size="auto" does."""
    ref, weights = straight
    cb = OnlineLLC(_loader(), steps=[0, 2], lr="auto", **KW)
    for step in (0, 2):
        model = _arch()
        model.load_state_dict(weights[step])
        cb(model, step)
    np.testing.assert_array_equal(cb.result.llc_mean, ref.result.llc_mean[:2])


FIXED = dict(KW, step_size=1e-3, num_draws=10)


@pytest.fixture
def written(tmp_path):
    """A state file of a short curve at a given step (one estimate, at step 0)."""
    ck = tmp_path / "llc.npz"
    model, _ = _start()
    cb = OnlineLLC(_loader(), every=2, checkpoint=ck, **FIXED)
    cb(model, 0)
    return ck, cb


@pytest.mark.parametrize(
    "change, item",
    [
        (dict(components={"first": ["0.*"]}), "components"),
        (dict(num_draws=12), "num_draws"),
        (dict(nbeta=5.0), "nbeta"),
        (dict(step_size=2e-3), "step_size"),
        (dict(step_size="auto"), "step_size"),
        (dict(loss_fn=_other_loss), "loss_fn"),
        (dict(loader=_loader(scale=2.0)), "data"),
        (dict(loader=_loader(batch_size=8)), "data"),
    ],
)
def test_another_run_is_refused_naming_what_differs(written, change, item):
    ck, _ = written
    kw = dict(FIXED, every=2, checkpoint=ck)
    kw.update(change)
    loader = kw.pop("loader", _loader())
    with pytest.raises(io.FingerprintMismatch, match=f"llc.online.npz.*different run: {item} = ") as e:
        OnlineLLC(loader, **kw)
    assert e.value.item == item


def test_how_the_estimates_are_computed_is_not_another_run(written):
    ck, first = written
    kw = dict(FIXED, checkpoint=ck, batched=False, quiet=False, warn_nonstationary=True)
    kw["lr"] = kw.pop("step_size")  # devinterp's name of the same step
    cb = OnlineLLC(_loader(), every=2, **kw)
    _same_curve(cb.result, first.result)
    with pytest.raises(io.FingerprintMismatch, match="another architecture") as e:
        cb(_arch(hidden=9), 1)  # the curve of another model
    assert e.value.item == "architecture"


def _damage(path, state):
    arrays, meta = io.load(path)
    meta = {**meta, "online_llc": state(dict(meta["online_llc"]), arrays)}
    io.save(path, arrays, meta, kind=meta["kind"])


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "llc.online.npz"),
        ("pickle", "llc.online.npz"),
        ("sampler checkpoint", "llc.online.npz.*holds a 'sample-checkpoint'"),
        ("newer", "version 7.*newer pypattern"),
        ("array missing", "damaged: it lacks the array 'llc_mean'"),
        ("array length", "damaged: 'llc_std' has shape"),
        ("step twice", "damaged: row 1's step is 0"),
        ("calibrated step", "damaged: its calibrated step_size"),
        ("seconds", "damaged: its 'seconds'"),
    ],
)
def test_a_damaged_or_foreign_state_file_is_refused_by_name(written, how, message):
    ck, _ = written
    path = str(ck).replace("llc.npz", "llc.online.npz")
    if how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "pickle":
        torch.save({"rows": []}, path)
    elif how == "sampler checkpoint":
        os.replace(str(ck).replace("llc.npz", "llc.step0.npz"), path)
    elif how == "newer":
        _damage(path, lambda s, a: {**s, "version": 7})
    elif how == "array missing":
        _damage(path, lambda s, a: (a.pop("llc_mean"), s)[1])
    elif how == "array length":
        _damage(path, lambda s, a: (a.update(llc_std=np.zeros(2)), s)[1])
    elif how == "step twice":
        _damage(path, lambda s, a: (a.update({k: np.concatenate([v, v]) for k, v in a.items()}), s)[1])
    elif how == "calibrated step":
        _damage(path, lambda s, a: {**s, "calibrated": {"step_size": 1e-3}})  # the curve's step was given
    elif how == "seconds":
        _damage(path, lambda s, a: {**s, "seconds": -1.0})
    with pytest.raises(io.FormatError, match=message) as e:
        OnlineLLC(_loader(), every=2, checkpoint=ck, **FIXED)
    assert path in str(e.value)
