"""Property-based tests of checkpoint and resume (hypothesis): a tiny model sampled with a checkpoint is stopped by
a callback raising at generated draws (one to three stops in a row, any chain, any draw, any checkpoint interval,
sequential or batched chains, with an observable), resumed each time, and the final result must equal an
uninterrupted run's bit for bit; a resume with a generated changed argument must be refused with a
:class:`pypattern.io.FingerprintMismatch` naming that argument, and equal arguments given in other containers must
be accepted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pypattern
from pypattern.io import FingerprintMismatch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.NonStationaryWarning"),
]


class _Stop(Exception):
    """Stands for a killed process: raised by a callback, it propagates out of the sampler."""


def _model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _loader(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(24, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _other_ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], label_smoothing=0.1)


def _first_logit(model, batch):
    """An observable: the first logit of the first sample at each draw."""
    return model(batch[0])[0, 0]


@st.composite
def run_settings(draw):
    num_chains = draw(st.integers(1, 3))
    num_draws = draw(st.integers(1, 6))
    return dict(
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin_steps=draw(st.integers(0, 2)),
        num_steps_bw_draws=draw(st.integers(1, 2)),
        checkpoint_every=draw(st.integers(1, 3)),
        batched=draw(st.booleans()),
        seed=draw(st.one_of(st.integers(0, 2**32), st.lists(st.integers(0, 99), min_size=num_chains,
                                                             max_size=num_chains))),
        step_size=draw(st.sampled_from([1e-4, 1e-3])),
        nbeta=draw(st.sampled_from([5.0, 20.0])),
        localization=draw(st.sampled_from([0.0, 10.0])),
        observables={"first_logit": _first_logit} if draw(st.booleans()) else {},
        loss_fn=_ce,
        quiet=True,
    )  # fmt: skip


def _stops(draw, kw):
    """One to three (chain, draw) points at which a callback raises."""
    points = st.tuples(st.integers(0, kw["num_chains"] - 1), st.integers(0, kw["num_draws"] - 1))
    return draw(st.lists(points, min_size=1, max_size=3))


def _sample(model, loader, estimator: str, **kw):
    if estimator == "estimate_llc":
        return pypattern.estimate_llc(model, loader, **kw)
    return pypattern.sample(model, loader, **kw)


def _killer(at):
    def callback(chain, draw):
        if (chain, draw) == at:
            raise _Stop(at)

    return callback


@given(data=st.data())
def test_killed_and_resumed_runs_equal_an_uninterrupted_run_bit_for_bit(data, tmp_path_factory):
    kw = data.draw(run_settings(), label="settings")
    stops = _stops(data.draw, kw)
    estimator = data.draw(st.sampled_from(["sample", "estimate_llc"]), label="estimator")
    path = tmp_path_factory.mktemp("resume") / "run.npz"
    model, loader = _model(), _loader()
    full = _sample(model, loader, estimator, **kw)
    stopped = 0
    for at in stops:
        try:
            _sample(model, loader, estimator, checkpoint=path, callbacks=[_killer(at)], **kw)
        except _Stop:
            stopped += 1
    event(f"stopped {stopped} of {len(stops)} times")
    seen = []
    resumed = _sample(
        model,
        loader,
        estimator,
        checkpoint=path,
        callbacks=[lambda chain, draw: seen.append((chain, draw))],
        **kw,
    )
    a, b = (full, resumed) if estimator == "sample" else (full.sample, resumed.sample)
    np.testing.assert_array_equal(b.loss_trace, a.loss_trace)
    assert b.init_loss == a.init_loss
    assert b.observables.keys() == a.observables.keys()
    for name in a.observables:
        np.testing.assert_array_equal(b.observables[name], a.observables[name])
    if estimator == "estimate_llc":
        assert resumed.llc_mean == full.llc_mean
        np.testing.assert_array_equal(resumed.llc_per_chain, full.llc_per_chain)
    # every draw of the result was made once: a resume redoes at most the draws after the last checkpoint
    assert len(seen) <= kw["num_chains"] * kw["num_draws"]
    # the model is left at w* (a stopped run restores the weights)
    for p, q in zip(model.parameters(), _model().parameters()):
        assert torch.equal(p, q)


def _changed(draw, kw):
    """(name the refusal must give, the changed keyword arguments, the changed model, the changed loader)."""
    what = draw(
        st.sampled_from(
            ["step_size", "nbeta", "localization", "seed", "num_draws", "num_chains", "num_burnin_steps",
             "num_steps_bw_draws", "loss_fn", "data", "weights", "masks", "observables"]
        )
    )  # fmt: skip
    new, model, loader = dict(kw), _model(), _loader()
    if what in ("step_size", "nbeta", "localization"):
        new[what] = kw[what] * 2 + 1e-4
    elif what == "seed":
        seed = kw["seed"]
        new["seed"] = seed + 1 if isinstance(seed, int) else [s + 1 for s in seed]
    elif what in ("num_draws", "num_burnin_steps", "num_steps_bw_draws"):
        new[what] = kw[what] + 1
    elif what == "num_chains":
        new["num_chains"] = kw["num_chains"] + 1
        if not isinstance(kw["seed"], int):
            new["seed"] = [*kw["seed"], 7]
    elif what == "loss_fn":
        new["loss_fn"] = _other_ce
    elif what == "data":
        loader = _loader(seed=1)
    elif what == "weights":
        layer = draw(st.sampled_from(["0.weight", "0.bias", "2.weight", "2.bias"]))
        with torch.no_grad():
            dict(model.named_parameters())[layer].neg_()  # the same sum of |w|: only the bytes tell
        what = f"weights[{layer}]"
    elif what == "masks":
        new["masks"] = {"0.weight": torch.arange(12).reshape(4, 3) % 2 == 0}
    elif what == "observables":
        new["observables"] = {} if kw["observables"] else {"first_logit": _first_logit}
    return what, new, model, loader


@given(data=st.data())
def test_resume_with_a_changed_argument_is_refused_naming_it(data, tmp_path_factory):
    kw = data.draw(run_settings(), label="settings")
    at = (data.draw(st.integers(0, kw["num_chains"] - 1)), data.draw(st.integers(0, kw["num_draws"] - 1)))
    path = tmp_path_factory.mktemp("refuse") / "run.npz"
    model, loader = _model(), _loader()
    try:
        pypattern.sample(model, loader, checkpoint=path, callbacks=[_killer(at)], **kw)
    except _Stop:
        pass
    if (
        not path.exists()
    ):  # stopped before its first checkpoint: a finished checkpoint is checked the same way
        pypattern.sample(model, loader, checkpoint=path, **kw)
    what, new, model2, loader2 = _changed(data.draw, kw)
    event(f"changed: {what.split('[')[0]}")
    with pytest.raises(FingerprintMismatch) as e:
        pypattern.sample(model2, loader2, checkpoint=path, **new)
    assert e.value.item == what, (e.value.item, what, str(e.value))
    assert str(path) in str(e.value) and what in str(e.value)
    # the unchanged call still resumes (the refusal changed nothing on disk); equal values in other containers
    # (a tuple seed for a list, numpy numbers for Python ones) are the same run
    same = dict(kw)
    if isinstance(kw["seed"], list):
        same["seed"] = tuple(kw["seed"])
    same["num_draws"] = np.int64(kw["num_draws"])
    same["step_size"] = np.float64(kw["step_size"])
    resumed = pypattern.sample(_model(), _loader(), checkpoint=path, **same)
    full = pypattern.sample(_model(), _loader(), **kw)
    np.testing.assert_array_equal(resumed.loss_trace, full.loss_trace)
