"""The sampler's contracts on what user code hands it: observable values of a fixed real shape, the loss function's
own errors at the first batched step (not taken for a vmap limitation), observables that fail under vmap handled
the same way at every draw (a resumed run records what an uninterrupted one does), and errors naming the argument
the caller gave the loss in (devinterp 1.x's ``evaluate`` and ``criterion``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pypattern import io
from pypattern.sampling import NonFiniteLossError, estimate_learning_coeff, sample
from pypattern.sampling.checkpoint import State
from pypattern.sampling.context import LossContractError
from pypattern.sampling.runner import loss_argument


def _regression(sizes=(16, 16, 1), seed=0):
    """A small MLP and a list loader whose batches have ``sizes`` samples (a list has no ragged-batch rule)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 3, generator=g)
    y = x @ torch.randn(3, 1, generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    bounds = np.cumsum((0, *sizes))
    return model, [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _classification(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = (x[:, 0] > 0).long()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


RUN = dict(num_chains=1, num_draws=3, step_size=1e-3, localization=10.0, nbeta=30.0, quiet=True)
RUN = {**RUN, "warn_nonstationary": False}


# ---------------------------------------------------------------------------------------------------------------
# observable traces: one shape, real numbers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(
    "fn, shape",
    [
        (lambda m, b: m(b[0]).squeeze(-1), r"\(1,\)"),  # the 1-sample batch: 1 value, not 16
        (lambda m, b: m(b[0].repeat(41 if len(b[0]) == 1 else 1, 1)).squeeze(-1), r"\(41,\)"),  # larger
    ],
    ids=["smaller", "larger"],
)
def test_an_observable_whose_shape_changes_is_refused_by_name(fn, shape, batched):
    """A per-sample observable on batches of 16, 16 and 1 samples: the third draw's value has another shape than
    the first draw's; both chain loops refuse it naming the observable and both shapes."""
    model, loader = _regression()
    with pytest.raises(
        ValueError, match=rf"observable 'out' .*shape {shape} at draw 2.*\(16,\).*must not change"
    ):
        sample(model, loader, batched=batched, observables={"out": fn}, **RUN)
    # batches of one size: recorded as they are
    model, loader = _regression(sizes=(16, 16, 16))
    res = sample(model, loader, batched=batched, observables={"out": fn}, **RUN)
    assert res.observables["out"].shape == (1, 3, 16) and np.isfinite(res.observables["out"]).all()
    assert res.batched is batched


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(
    "value",
    [torch.tensor(1.0 + 2.0j), np.complex128(1.0 + 2.0j), [1.0, 2.0j]],
    ids=["tensor", "numpy", "list"],
)
def test_a_complex_observable_is_refused_by_name(value, batched):
    """A complex value (a tensor, a NumPy scalar or a list) is refused naming the observable, in both chain loops:
    a trace holds real numbers, never a complex value's real part."""
    model, loader = _regression(sizes=(16, 16, 16))
    with pytest.raises(ValueError, match=r"observable 'c' returned a complex value .*at draw 0 of chain 0"):
        sample(model, loader, batched=batched, observables={"c": lambda m, b: value}, **RUN)


def test_an_observable_that_is_not_numbers_is_refused_by_name():
    model, loader = _regression(sizes=(16, 16, 16))
    with pytest.raises(ValueError, match=r"observable 's' returned a str of dtype <U3"):
        sample(model, loader, batched=False, observables={"s": lambda m, b: "abc"}, **RUN)


def test_a_trace_read_from_a_checkpoint_fixes_the_observables_shape():
    """A resumed run's state holds the trace read back from its file (``State.load``): its shape is the first
    draw's, and a value of another shape is refused as in an uninterrupted run."""
    state = State(1, 3)
    state.obs["out"] = np.full((1, 3, 16), np.nan)  # as State.load sets it
    with pytest.raises(ValueError, match=r"shape \(8,\) at draw 1 of chain 0, but of shape \(16,\)"):
        state.record_obs("out", 0, 1, torch.zeros(8))
    state.record_obs("out", 0, 1, torch.ones(16))
    np.testing.assert_array_equal(state.obs["out"][0, 1], np.ones(16))


# ---------------------------------------------------------------------------------------------------------------
# the loss function's own errors at the first batched step
# ---------------------------------------------------------------------------------------------------------------
class DataProblem(KeyError):
    pass


_CALLS: dict = {}


def test_a_loss_error_at_the_first_batched_step_keeps_its_type():
    """The loss raises once, at the first step (its first call after the passes over w*) or at the second: under
    batched=True its own error propagates with its type, not taken for a model or loss_fn that does not run under
    vmap."""
    model, loader = _classification()
    calls = {"n": 0, "at": None}

    def loss_fn(m, b):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise DataProblem("sample 17 has no label")
        return nn.functional.cross_entropy(m(b[0]), b[1])

    kw = dict(RUN, num_chains=2, init_loss=0.5, batched=True)
    for at in (1, 2):  # the first step, the second
        calls.update(n=0, at=at)
        with pytest.raises(DataProblem, match="sample 17 has no label"):
            sample(model, loader, loss_fn=loss_fn, **kw)
    calls.update(n=0, at=None)
    ref = sample(model, loader, loss_fn=loss_fn, **kw)
    assert ref.batched


@pytest.mark.parametrize("batched", [True, None])
def test_a_loss_error_on_a_batch_under_vmap_is_the_loss_functions_own(batched):
    """The loss function refuses a batch by looking at its values: under vmap that look is data-dependent control
    flow (vmap's error), without vmap it raises the loss function's own error, which propagates."""
    model, loader = _classification()

    def loss_fn(m, b):
        if bool((b[1] > 5).any()):  # the labels are 0 and 1
            raise DataProblem("a label above 5")
        return nn.functional.cross_entropy(m(b[0]), b[1])

    bad = DataLoader(TensorDataset(loader.dataset.tensors[0], loader.dataset.tensors[1] + 7), batch_size=16)
    with pytest.raises(DataProblem, match="a label above 5"):
        sample(model, bad, loss_fn=loss_fn, **dict(RUN, num_chains=2, init_loss=0.5, batched=batched))
    # on good data the same loss does not run under vmap: batched=True says so, batched=None runs sequentially
    kw = dict(RUN, num_chains=2, init_loss=0.5, batched=batched)
    if batched:
        with pytest.raises(RuntimeError, match="does not run under vmap"):
            sample(model, loader, loss_fn=loss_fn, **kw)
    else:
        res = sample(model, loader, loss_fn=loss_fn, **kw)
        ref = sample(model, loader, loss_fn=loss_fn, **dict(kw, batched=False))
        assert not res.batched
        np.testing.assert_array_equal(res.loss_trace, ref.loss_trace)


def test_a_loss_error_at_the_first_step_of_a_resumed_batched_run_keeps_its_type(tmp_path):
    model, loader = _classification()
    path = str(tmp_path / "run.npz")
    calls = _CALLS  # a module global (a dict): not part of the run's fingerprint, as a closure value would be
    calls.update(n=0, at=None)

    def loss_fn(m, b):
        _CALLS["n"] += 1
        if _CALLS["n"] == _CALLS["at"]:
            raise DataProblem("sample 17 has no label")
        return nn.functional.cross_entropy(m(b[0]), b[1])

    class Stop(Exception):
        pass

    def stop(draw):
        if draw == 1:
            raise Stop

    kw = dict(RUN, num_chains=2, batched=True, checkpoint=path)
    with pytest.raises(Stop):
        sample(model, loader, loss_fn=loss_fn, callbacks=[stop], **kw)
    calls.update(n=0, at=1)  # a resumed run reads L_n(w*) from the file: its first call is its first step
    with pytest.raises(DataProblem):
        sample(model, loader, loss_fn=loss_fn, **kw)
    calls.update(n=0, at=None)
    resumed = sample(model, loader, loss_fn=loss_fn, **kw)
    calls.update(n=0, at=None)
    clean = sample(model, loader, loss_fn=loss_fn, **dict(kw, checkpoint=None))
    np.testing.assert_array_equal(resumed.loss_trace, clean.loss_trace)


# ---------------------------------------------------------------------------------------------------------------
# observables that fail under vmap
# ---------------------------------------------------------------------------------------------------------------
def _vmapped(x: torch.Tensor) -> float:
    """1.0 when ``x`` is a batched tensor of ``torch.func.vmap`` (the value is computed for all chains at once)."""
    return float(torch._C._functorch.is_batchedtensor(x))


def test_an_observable_failing_under_vmap_at_some_draws_records_the_same_in_a_resumed_run(tmp_path):
    """An observable that does not run under vmap on the 8-sample batch only: every draw is evaluated the same
    way (vmapped, or chain by chain where vmap fails) whether the run is resumed or not: the draws after a
    failure are vmapped again, in an uninterrupted run as in one resumed after that failure."""
    model, loader = _regression(sizes=(16, 16, 8))

    def probe(m, b):
        x = b[0]
        if x.shape[0] == 8:
            float(x.sum())  # a Python number: vmap cannot make one
        return torch.tensor(_vmapped(x))

    kw = dict(RUN, num_draws=7, batched=True, observables={"v": probe})
    clean = sample(model, loader, **kw)
    np.testing.assert_array_equal(clean.observables["v"][0], [1, 1, 0, 1, 1, 0, 1])

    class Stop(Exception):
        pass

    def stop(draw):
        if draw == 4:
            raise Stop

    path = str(tmp_path / "run.npz")
    with pytest.raises(Stop):
        sample(model, loader, checkpoint=path, callbacks=[stop], **kw)
    resumed = sample(model, loader, checkpoint=path, **kw)
    np.testing.assert_array_equal(resumed.observables["v"], clean.observables["v"])
    np.testing.assert_array_equal(resumed.loss_trace, clean.loss_trace)


def test_an_observable_error_without_vmap_too_propagates():
    model, loader = _regression(sizes=(16, 16, 16))

    def obs(m, b):
        raise DataProblem("no such probe")

    with pytest.raises(DataProblem, match="no such probe"):
        sample(model, loader, batched=True, observables={"o": obs}, **RUN)


# ---------------------------------------------------------------------------------------------------------------
# devinterp 1.x: errors name evaluate or criterion, not loss_fn
# ---------------------------------------------------------------------------------------------------------------
def _per_sample_evaluate(m, d):
    return nn.functional.cross_entropy(m(d[0]), d[1], reduction="none")


def _per_sample_criterion(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("init_loss", [None, 0.5], ids=["w*-pass", "chains"])
@pytest.mark.parametrize(
    "given",
    [dict(evaluate=_per_sample_evaluate), dict(criterion=_per_sample_criterion)],
    ids=["evaluate", "criterion"],
)
def test_devinterp_1x_loss_errors_name_the_argument_given(given, init_loss, batched):
    """A per-sample loss is refused naming evaluate or criterion, in the pass over w* and in both chain loops."""
    model, loader = _classification()
    (name,) = given
    with pytest.raises(LossContractError, match=rf"^{name} returned a loss of shape \(16,\)"):
        estimate_learning_coeff(
            model,
            loader,
            optimizer_kwargs=dict(lr=1e-3, localization=10.0, nbeta=30.0),
            num_chains=2,
            num_draws=4,
            verbose=False,
            init_loss=init_loss,
            batched=batched,
            **given,
        )


def test_devinterp_1x_vmap_and_non_finite_errors_name_evaluate():
    model, loader = _classification()
    kw = dict(optimizer_kwargs=dict(lr=1e-3, localization=10.0, nbeta=30.0), num_chains=2, num_draws=4)
    kw = dict(kw, verbose=False)

    def item(m, d):  # a Python number inside: does not run under vmap
        return nn.functional.cross_entropy(m(d[0]), d[1]) * float(m[0].weight.sum().item() * 0 + 1)

    with pytest.raises(RuntimeError, match="batched=True but the model or evaluate does not run under vmap"):
        estimate_learning_coeff(model, loader, evaluate=item, init_loss=0.5, batched=True, **kw)

    def nan(m, d):
        return nn.functional.cross_entropy(m(d[0]), d[1]) * float("nan")

    with pytest.raises(NonFiniteLossError, match=r"check evaluate\)"):
        estimate_learning_coeff(model, loader, evaluate=nan, **kw)
    with pytest.raises(
        LossContractError, match=r"^loss_fn returned a loss of shape \(16,\)"
    ):  # sample's name
        sample(model, loader, loss_fn=_per_sample_evaluate, **dict(RUN, num_chains=2))


def test_the_loss_argument_name_is_not_part_of_a_runs_fingerprint(tmp_path):
    """A checkpoint written under another name of the loss argument resumes, and has the same fingerprint."""
    model, loader = _classification()
    kw = dict(RUN, num_chains=2, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    ref = sample(model, loader, checkpoint=a, **kw)
    with loss_argument("evaluate"):
        res = sample(model, loader, checkpoint=b, **kw)
        again = sample(model, loader, checkpoint=a, **kw)  # resumes a's file (all draws done)
    np.testing.assert_array_equal(res.loss_trace, ref.loss_trace)
    np.testing.assert_array_equal(again.loss_trace, ref.loss_trace)
    assert io.load(a)[1]["checkpoint"]["fingerprint"] == io.load(b)[1]["checkpoint"]["fingerprint"]


class _NoMask(torch.nn.Module):
    """A user's model whose forward reads no attention mask."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, tokens):
        return self.inner(tokens)


def _dict_batches(left_padded_from: int | None = None):
    """pypattern's Transformer and right-padded dict batches; with ``left_padded_from``, the batches from that one
    on left-padded and the model wrapped in one whose forward reads no mask."""
    import pypattern as pp

    task = pp.InductionTask(d_vocab=8, seq_len=9)
    model = pp.Transformer(task.model_config(d_model=8, n_heads=2, seed=0, dtype=torch.float64))
    if left_padded_from is not None:
        model = _NoMask(model)
    ids = task.sample(16, seed=1).tokens
    am = torch.ones_like(ids)
    am[1::2, -2:] = 0  # right padding: exact for a causal model that reads no mask
    batches = [
        {"input_ids": ids[i : i + 4], "attention_mask": am[i : i + 4].clone()} for i in range(0, 16, 4)
    ]
    if left_padded_from is not None:
        for b in batches[left_padded_from:]:
            b["attention_mask"][0] = 1
            b["attention_mask"][0, :2] = 0
    return model, batches


def test_hugging_face_dict_batches_run_batched_as_the_chains_one_by_one():
    """Dict batches with an attention_mask run as batched chains (the default loss's mask checks cannot read values
    under vmap and are made on each batch before stacking): the same draws as chains run one after another."""
    from pypattern.sampling import sample

    model, batches = _dict_batches()
    kw = dict(num_chains=2, num_draws=4, step_size=1e-4, localization=100.0, nbeta=10.0, seed=1, quiet=True)
    auto = sample(model, batches, **kw)
    assert auto.batched
    one_by_one = sample(model, batches, batched=False, **kw)
    np.testing.assert_allclose(auto.loss_trace, one_by_one.loss_trace, rtol=1e-10, atol=0)


@pytest.mark.parametrize("batched", [True, False])
def test_a_left_padded_batch_met_while_sampling_is_refused_in_both_loops(batched):
    """A batch read after L_n(w*)'s (left padding, for a model that reads no mask) is refused naming the loader
    in batched chains as in chains run one by one (the check is made on each batch before stacking, as vmap cannot
    read values)."""
    from pypattern.sampling import sample

    model, batches = _dict_batches(left_padded_from=1)
    kw = dict(num_chains=2, num_draws=20, step_size=1e-4, localization=100.0, nbeta=10.0, seed=1, quiet=True)
    with pytest.raises(ValueError, match="left padding"):
        sample(model, batches, batched=batched, num_init_loss_batches=1, **kw)
