"""The sampler on the models, data and callables researchers bring: one-shot iterators, callbacks and loss
functions of other signatures, BatchNorm and dropout in train() mode, tied and frozen parameters, float64,
component masks, every sampler with runs= and checkpoints; results checked against independent computations
(a regular model's d/2, the exact SGLD recursion of a quadratic loss, the model's own weights and buffers)."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern.sampling.optim import SGLD

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(num_chains=2, num_draws=5, step_size=1e-4, localization=100.0, quiet=True, warn_nonstationary=False)


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.randn(3, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def _mlp(seed=1, **extra):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), **extra)


def _batches(bs=16):
    x, y = _data()
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


# ------------------------------------------------------------------------------------------- one-shot iterators


def _endless():
    x, y = _data()
    g = torch.Generator().manual_seed(0)
    while True:
        i = torch.randint(0, len(x), (16,), generator=g)
        yield x[i], y[i]


@pytest.mark.parametrize("make", [_endless, lambda: itertools.cycle(_batches()), lambda: iter(_batches())])
def test_one_shot_iterators_are_refused_by_name(make):
    """An iterator is read once: L_n(w*) and every chain start a new pass over the loader, which such a loader
    cannot give. An endless one (a `while True` generator, itertools.cycle) used to be shared: each reader went
    on where the last stopped, so batched and sequential runs of one seed differed and a resumed run differed
    from an uninterrupted one. Refused before any forward, naming the argument, in every entry point."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        return _mse(model, batch)

    with pytest.raises(ValueError, match=r"loader is a one-shot iterator .*re-iterable"):
        pp.sample(_mlp(), make(), loss_fn=loss, **KW)
    with pytest.raises(ValueError, match=r"loader is a one-shot iterator"):
        pp.estimate_llc(_mlp(), make(), loss_fn=loss, **KW)
    with pytest.raises(ValueError, match=r"loader is a one-shot iterator"):
        pp.OnlineLLC(make(), every=1, loss_fn=loss, **KW)
    with pytest.raises(ValueError, match=r"data is a one-shot iterator"):
        pp.refined_llc(_mlp(), _batches(), components=["0"], data=make(), loss_fn=loss, **KW)
    assert calls == []
    # the fix the message gives: the batches in a list, read as any list
    fixed = list(itertools.islice(make(), 4))
    a = pp.sample(_mlp(), fixed, loss_fn=_mse, batched=True, **KW)
    b = pp.sample(_mlp(), [tuple(t.clone() for t in bt) for bt in fixed], loss_fn=_mse, batched=False, **KW)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-6)


def test_a_finite_generator_still_names_the_loader():
    """A finite generator (read once) is refused up front with the same pointer to a list."""
    with pytest.raises(ValueError, match=r"loader yielded no batch.*generator is read only once"):
        pp.sample(_mlp(), (b for b in _batches()), loss_fn=_mse, init_loss=0.5, **KW)


def test_re_iterable_objects_without_a_length_are_accepted():
    """An object whose __iter__ starts a new pass (not an iterator itself) is a loader: each chain reads its own
    stream of it, and the run equals that of the same batches in a list (chains of a list read it in order)."""
    batches = _batches()

    class Passes:
        def __iter__(self):
            return iter(batches)

    a = pp.sample(_mlp(), Passes(), loss_fn=_mse, init_loss=0.5, **KW)
    b = pp.sample(_mlp(), batches, loss_fn=_mse, init_loss=0.5, **KW)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


# ------------------------------------------------------------------------------ callbacks and their arguments


def test_a_callback_that_needs_the_optimizer_runs_the_chains_one_after_another():
    """`optimizer` is handed to callbacks when chains run one after another. A callback that requires it used to
    fail with a bare TypeError from inside the batched loop (the default for small models); with batched=None
    the chains now run one after another, and the callback sees each chain's SGLD optimizer holding the model's
    parameters at the draw. batched=True with such a callback is refused by name, before any forward."""
    seen = []

    def cb(optimizer, chain, draw, model):
        assert isinstance(optimizer, SGLD)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        assert {id(p) for p in params} == {id(p) for p in model.parameters()}
        seen.append((chain, draw, optimizer.param_groups[0]["lr"]))

    res = pp.sample(_mlp(), _batches(), loss_fn=_mse, callbacks=[cb], **KW)
    assert res.batched is False
    assert seen == [(c, d, KW["step_size"]) for c in range(2) for d in range(5)]
    ref = pp.sample(_mlp(), _batches(), loss_fn=_mse, batched=False, **KW)
    np.testing.assert_array_equal(res.loss_trace, ref.loss_trace)
    with pytest.raises(ValueError, match=r"callbacks\[0\].*optimizer.*batched=True"):
        pp.sample(_mlp(), _batches(), loss_fn=_mse, callbacks=[cb], batched=True, **KW)


def test_a_callback_with_an_argument_the_sampler_does_not_pass_is_named_before_running():
    """A callback requiring an argument the sampler never passes is refused naming the callback and the
    argument, before the calibration (no step given) or any forward."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        return _mse(model, batch)

    def needs_foo(chain, foo):
        pass

    kw = {k: v for k, v in KW.items() if k != "step_size"}
    with pytest.raises(TypeError, match=r"callbacks\[1\].*'foo'.*chain, run, draw"):
        pp.sample(_mlp(), _batches(), loss_fn=loss, callbacks=[lambda chain: None, needs_foo], **kw)
    with pytest.raises(TypeError, match=r"callbacks\[0\].*positional-only.*'c'"):
        pp.sample(_mlp(), _batches(), loss_fn=loss, callbacks=[lambda c, /: None], **kw)
    assert calls == []
    # a default, *args or **kwargs is fine: it gets what it declares
    got = []
    pp.sample(
        _mlp(), _batches(), loss_fn=loss, callbacks=[lambda chain, foo=1, **k: got.append(k["draw"])], **KW
    )
    assert sorted(got) == sorted([0, 1, 2, 3, 4] * 2)


@pytest.mark.parametrize(
    "where, fn",
    [
        ("loss_fn", lambda batch: batch[1].sum()),
        ("loss_fn", lambda model, batch, weights: batch[1].sum()),
        ("observable 'o'", lambda model: 0.0),
    ],
)
def test_loss_functions_and_observables_of_another_signature_are_named(where, fn):
    """loss_fn and observables are called as fn(model, batch): one of another arity used to fail with Python's
    bare TypeError (naming a lambda) from inside the chains, after a calibration. Refused up front by name."""
    kw = {k: v for k, v in KW.items() if k != "step_size"}
    args = dict(loss_fn=fn) if where == "loss_fn" else dict(loss_fn=_mse, observables={"o": fn})
    with pytest.raises(TypeError, match=rf"{where}.*\(model, batch\)"):
        pp.sample(_mlp(), _batches(), **args, **kw)
    # OnlineLLC checks its estimator's keywords when built, not at the first scheduled step of a training run
    with pytest.raises(TypeError, match=rf"{where}.*\(model, batch\)"):
        pp.OnlineLLC(_batches(), every=10, **args, **kw)


def test_devinterp_evaluate_of_another_signature_names_evaluate():
    """devinterp 1.x's evaluate= is the loss function under its own name: the error names it."""
    with pytest.raises(TypeError, match=r"evaluate.*\(model, batch\)"):
        pp.estimate_learning_coeff_with_summary(
            _mlp(),
            _batches(),
            evaluate=lambda batch: batch[1].sum(),
            optimizer_kwargs=dict(lr=1e-4, nbeta=5.0, localization=100.0),
            num_chains=2,
            num_draws=3,
            verbose=False,
        )


# ------------------------------------------------------------------------------------------------ L_n(w*)


class _Stream(torch.utils.data.IterableDataset):
    """Four batches of 16 rows, streamed (no length)."""

    def __iter__(self):
        x, y = _data()
        for i in range(0, 64, 16):
            yield x[i : i + 16], y[i : i + 16]


class _Stop(Exception):
    pass


def test_init_loss_of_a_short_stream_reads_each_batch_once(tmp_path):
    """A loader without a length whose epoch (4 batches) is shorter than the batches L_n(w*) reads by default
    (max(4, num_chains) = 8): L_n(w*) is the mean over that epoch, each batch once, with no standard error (the
    whole data set was read), as for the same batches in a list. It used to read the epoch and a half again:
    the first batches counted twice (a biased L_n(w*)) and the repeats were taken for independent batches
    (init_loss_se 0.11 here instead of 0, inflating llc_se). A resumed run has the same numbers."""
    loader = torch.utils.data.DataLoader(_Stream(), batch_size=None)
    model = _mlp()
    with torch.no_grad():
        by_hand = np.array([float(_mse(model, b)) for b in _batches()])
    kw = dict(KW, num_chains=8)
    res = pp.estimate_llc(model, loader, loss_fn=_mse, **kw)
    np.testing.assert_allclose(res.sample.init_losses, by_hand, rtol=1e-6)
    assert res.init_loss == pytest.approx(by_hand.mean(), rel=1e-6)
    assert res.init_loss_se == 0.0
    listed = pp.estimate_llc(model, _batches(), loss_fn=_mse, **kw)
    np.testing.assert_array_equal(res.loss_trace, listed.loss_trace)
    assert listed.init_loss_se == 0.0 and res.llc_se == listed.llc_se
    # resumed from a checkpoint: the same L_n(w*) and standard error
    path = str(tmp_path / "c.npz")

    def stop(chain, draw):
        if chain == 3 and draw == 2:
            raise _Stop

    with pytest.raises(_Stop):
        pp.estimate_llc(model, loader, loss_fn=_mse, checkpoint=path, callbacks=[stop], batched=False, **kw)
    resumed = pp.estimate_llc(model, loader, loss_fn=_mse, checkpoint=path, batched=False, **kw)
    assert resumed.init_loss_se == 0.0 and resumed.init_loss == res.init_loss
    # a stream longer than the default batches: a sample of it, with a standard error
    longer = pp.estimate_llc(model, loader, loss_fn=_mse, **dict(KW, num_chains=3))
    assert len(longer.sample.init_losses) == 4 and longer.init_loss_se > 0
    part = pp.estimate_llc(model, loader, loss_fn=_mse, num_init_loss_batches=3, **KW)
    np.testing.assert_allclose(part.sample.init_losses, by_hand[:3], rtol=1e-6)
    assert part.init_loss_se == pytest.approx(by_hand[:3].std(ddof=1) / math.sqrt(3), rel=1e-5)


# ------------------------------------------------------------------------- tied, frozen, BatchNorm, dropout


class _Tied(nn.Module):
    """b.weight is a.weight: one Parameter used twice (named_parameters() names it 'a.weight' only)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_tied_parameters_move_together_and_their_other_name_is_explained():
    """A tied Parameter moves as one tensor (both uses see the moved weights, and batched and sequential chains
    agree); restricting to it by its second name, which named_parameters() leaves out, is refused with the name
    to use instead of a bare 'matches no parameter'."""
    model = _Tied()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def cb(model):
        assert model.b.weight is model.a.weight
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    res = pp.sample(
        model, _batches(), loss_fn=_mse, restrict_to="a.weight", callbacks=[cb], batched=False, **KW
    )
    assert len(seen) == 10 and res.loss_trace.shape == (2, 5)
    assert all(torch.equal(d[n], w0[n]) for d in seen for n in w0 if n != "a.weight")
    assert any(not torch.equal(d["a.weight"], w0["a.weight"]) for d in seen)
    other = pp.sample(model, _batches(), loss_fn=_mse, restrict_to="a.weight", batched=True, **KW)
    np.testing.assert_allclose(other.loss_trace, res.loss_trace, rtol=1e-6)
    with pytest.raises(ValueError, match=r"'b.weight' is 'a.weight': one Parameter used under two names"):
        pp.sample(model, _batches(), loss_fn=_mse, restrict_to="b.weight", **KW)
    with pytest.raises(ValueError, match=r"'b.weight' is 'a.weight'"):
        pp.sample(model, _batches(), loss_fn=_mse, restrict_to=["c.*", "b.weight"], **KW)
    with pytest.raises(ValueError, match=r"'b.weight' is 'a.weight'"):
        pp.sample(model, _batches(), loss_fn=_mse, masks={"b.weight": torch.ones(3, 3)}, **KW)
    with pytest.raises(ValueError, match=r"'b.weight' is 'a.weight'"):
        pp.sample(
            model, _batches(), loss_fn=_mse, restrict_to="c.*", masks={"b.weight": torch.ones(3, 3)}, **KW
        )


def test_devinterp_callback_that_needs_the_optimizer_with_batched_true_is_refused_before_running():
    """devinterp 1.x's sample(callbacks=[cb]) with a callback reading the optimizer and batched=True: refused by
    name before any forward (it used to run until the first draw, then raise a RuntimeError); without batched
    the chains run one after another and the callback sees each chain's SGLD optimizer."""
    from pypattern.devinterp.slt.sampler import sample as v1_sample

    calls, seen = [], []

    def evaluate(model, batch):
        calls.append(1)
        return _mse(model, batch)

    def reads_optimizer(optimizer, chain):
        seen.append((chain, type(optimizer).__name__))

    kw = dict(num_chains=2, num_draws=3, optimizer_kwargs=dict(lr=1e-4, nbeta=5.0, localization=10.0))
    with pytest.raises(
        ValueError, match=r"callbacks\[0\]=.*reads_optimizer.*requires optimizer.*batched=True"
    ):
        v1_sample(
            _mlp(),
            _batches(),
            callbacks=[reads_optimizer],
            evaluate=evaluate,
            batched=True,
            verbose=False,
            **kw,
        )
    assert calls == []
    with pytest.warns(pp.sampling.NonStationaryWarning, match="fall short"):  # 3 draws from w*, no burn-in
        v1_sample(_mlp(), _batches(), callbacks=[reads_optimizer], evaluate=evaluate, verbose=False, **kw)
    assert seen == [(c, "SGLD") for c in range(2) for _ in range(3)]


def test_a_data_set_smaller_than_the_batch_size():
    """64 rows in batches of 100: one batch of all the rows (the same run as that batch in a list); with
    drop_last=True no batch at all, and the error says why."""
    x, y = _data()
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=True)
    a = pp.sample(_mlp(), loader, loss_fn=_mse, **KW)
    b = pp.sample(_mlp(), [(x, y)], loss_fn=_mse, **KW)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-6)
    with torch.no_grad():
        assert a.init_loss == pytest.approx(float(_mse(_mlp(), (x, y))), rel=1e-6)
    dropped = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=True, drop_last=True)
    with pytest.raises(
        ValueError, match=r"loader yielded no batch.*drop_last=True over 64 rows.*batch_size=100"
    ):
        pp.sample(_mlp(), dropped, loss_fn=_mse, **KW)


def _bn_dropout(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.2), nn.Tanh(), nn.Linear(4, 1))


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def _same_snapshot(a, b) -> bool:
    return (
        a[0].keys() == b[0].keys()
        and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        and a[1:3] == b[1:3]
        and all((g is None and h is None) or torch.equal(g, h) for g, h in zip(a[3], b[3], strict=True))
    )


@pytest.mark.parametrize("sampler", ["sgld", "sgnht", "rmsprop_sgld"])
def test_the_model_is_given_back_as_it_came_even_when_the_run_fails(sampler):
    """BatchNorm and dropout in train() mode, a frozen parameter, gradients of a training step in .grad: after a
    run, a run stopped by a callback and a diverged run, every weight, buffer (BatchNorm's running statistics),
    module mode, requires_grad flag and gradient is as it was."""
    x, y = _data()
    model = _bn_dropout().train()
    model[4].bias.requires_grad_(False)
    _mse(model, (x, y)).backward()
    before = _snapshot(model)

    def stop(chain, draw):
        if chain == 1 and draw == 2:
            raise _Stop

    for b in (False, True, None):
        for extra in ({}, {"callbacks": [stop]}, {"step_size": 10.0}):
            with pytest.warns(UserWarning, match="dropout"):
                try:
                    pp.sample(model, _batches(), loss_fn=_mse, sampler=sampler, batched=b, **{**KW, **extra})
                except (_Stop, pp.sampling.SamplingDivergedError, RuntimeError):
                    pass
            assert _same_snapshot(before, _snapshot(model)), (b, extra)


@pytest.mark.parametrize("sampler", ["sgld", "sgnht", "rmsprop_sgld"])
def test_seeds_masks_and_runs_on_every_sampler(sampler):
    """Per sampler, batched and not: one seed gives bit-identical traces, another seed others; a mask moves only
    its entries (every other weight exactly at w* at every draw); runs= gives each run the draws of a separate
    call with its restriction, and shapes are (num_chains, num_draws)."""
    model = _mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = torch.zeros(4, 3)
    mask[1] = 1
    for b in (True, False):
        kw = dict(KW, loss_fn=_mse, sampler=sampler, batched=b)
        one = pp.estimate_llc(model, _batches(), seed=3, **kw)
        again = pp.estimate_llc(model, _batches(), seed=3, **kw)
        other = pp.estimate_llc(model, _batches(), seed=4, **kw)
        np.testing.assert_array_equal(one.loss_trace, again.loss_trace)
        assert not np.array_equal(one.loss_trace, other.loss_trace)
        assert one.loss_trace.shape == one.llc_trace.shape == (2, 5) and one.llc_per_chain.shape == (2,)
        np.testing.assert_allclose(one.llc_trace, one.nbeta * (one.loss_trace - one.init_loss))
        seen = []

        def record(model, seen=seen):
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

        pp.sample(model, _batches(), masks={"0.weight": mask}, callbacks=[record], **kw)
        assert len(seen) == 10
        for d in seen:
            assert all(torch.equal(d[n], w0[n]) for n in w0 if n != "0.weight")
            assert torch.equal(d["0.weight"][mask == 0], w0["0.weight"][mask == 0])
        assert any(not torch.equal(d["0.weight"][mask == 1], w0["0.weight"][mask == 1]) for d in seen[1:])
        runs = pp.sample(model, _batches(), runs=[(None, None), (["0.weight"], {"0.weight": mask})], **kw)
        alone = pp.sample(model, _batches(), restrict_to=["0.weight"], masks={"0.weight": mask}, **kw)
        np.testing.assert_allclose(runs[1].loss_trace, alone.loss_trace, rtol=1e-6)
        np.testing.assert_allclose(
            runs[0].loss_trace, pp.sample(model, _batches(), **kw).loss_trace, rtol=1e-6
        )


def test_a_regular_model_restricted_by_a_mask_is_half_its_moving_entries():
    """y = W x with W 2x3 in float64 (K(W) = |W - W*|^2 / 2: every direction of curvature 1): the localized,
    tempered posterior gives each moving entry (1/2) nbeta / (nbeta + localization), so 3 * 1000/1001 for the whole
    W and half that for a mask on its first row, in one call with runs=."""
    from pypattern import truth

    torch.manual_seed(0)
    model = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    ds = truth.make_regression_data(model, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    (name,) = [n for n, _ in model.named_parameters()]
    mask = torch.zeros(2, 3, dtype=torch.float64)
    mask[0] = 1
    full, half = pp.estimate_llc(
        model,
        loader,
        runs=[(None, None), ([name], {name: mask})],
        step_size=1e-4,
        nbeta=1000.0,
        localization=1.0,
        num_chains=8,
        num_draws=200,
        num_steps_bw_draws=5,
        num_burnin_steps=100,
        seed=0,
        quiet=True,
    )
    for res, moving in ((full, 6), (half, 3)):
        target = moving / 2 * 1000 / 1001
        assert abs(res.llc_mean - target) < max(4 * res.llc_se, 0.05 * target), (res.llc_mean, target)


@pytest.mark.parametrize("sampler", ["sgnht", "rmsprop_sgld"])
def test_a_stopped_run_of_a_batchnorm_model_in_train_mode_resumes_bit_for_bit(tmp_path, sampler):
    """BatchNorm in train() mode (its running statistics change in the forward: chains one after another), a
    shuffling DataLoader, burn-in and thinning: stopped three times and resumed, the same draws as one run."""
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    kw = dict(KW, loss_fn=_mse, sampler=sampler, num_chains=3, num_burnin_steps=3, num_steps_bw_draws=2)
    model = _bn_dropout()
    del model[2]  # no dropout: the model runs in train() mode as given
    model.train()
    whole = pp.sample(model, loader, **kw)
    assert whole.batched is False
    path = str(tmp_path / "c.npz")
    for at in (2, 4, 3):
        n = [0]

        def stop(chain, draw, at=at, n=n):
            n[0] += 1
            if n[0] == at:
                raise _Stop

        with pytest.raises(_Stop):
            pp.sample(model, loader, checkpoint=path, callbacks=[stop], **kw)
    resumed = pp.sample(model, loader, checkpoint=path, **kw)
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)
    assert model.training


def test_hugging_face_models_built_from_configs():
    """A tiny GPT-2 and Llama (random weights, no download): their native and converted forms read the same
    L_n(w*), token batches and dicts with input_ids give the same run, and refined_llc covers each head."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=20, n_positions=16, bos_token_id=0)
    ).eval()
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            hidden_size=16,
            intermediate_size=32,
            vocab_size=20,
            max_position_embeddings=16,
        )
    ).eval()
    toks = torch.randint(0, 20, (32, 8), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(toks), batch_size=8, shuffle=True)
    kw = dict(KW, num_draws=3, batched=False)
    for hf in (gpt2, llama):
        converted = pp.from_hf(hf)
        native = pp.estimate_llc(hf, loader, **kw)
        ours = pp.estimate_llc(converted, loader, **kw)
        with torch.no_grad():
            logits = hf(toks).logits[:, :-1]
            by_hand = nn.functional.cross_entropy(logits.reshape(-1, 20), toks[:, 1:].reshape(-1))
        assert native.init_loss == pytest.approx(float(by_hand), rel=1e-5)
        assert ours.init_loss == pytest.approx(float(by_hand), rel=1e-5)
        assert native.loss_trace.shape == ours.loss_trace.shape == (2, 3)
        ids = [toks[i : i + 8] for i in range(0, 32, 8)]
        a = pp.sample(hf, ids, **kw)
        b = pp.sample(hf, [{"input_ids": t} for t in ids], **kw)
        np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
        refined = pp.refined_llc(hf, ids, components="heads", **kw)
        table = refined.to_pandas()
        assert {"blocks.0.attn.head.0", "blocks.0.attn.head.1"} <= set(table["component"])


def test_refined_llc_names_a_data_loss_of_another_signature_before_the_first_runs():
    """refined_llc samples the training data first, then `data` with data_loss_fn: a data_loss_fn that cannot be
    called as (model, batch) used to fail only after the first data set's runs; it is named before any forward."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        return _mse(model, batch)

    with pytest.raises(TypeError, match=r"data_loss_fn.*\(model, batch\)"):
        pp.refined_llc(
            _mlp(),
            _batches(),
            components=["0"],
            data=_batches(),
            loss_fn=loss,
            data_loss_fn=lambda b: 0,
            **KW,
        )
    assert calls == []


@pytest.mark.parametrize("batched", [True, False])
def test_a_call_under_no_grad_is_the_same_run(batched):
    """Researchers call estimators inside evaluation code under torch.no_grad(): the chains' steps need gradients,
    and the call used to fail blaming loss_fn ("a loss with no gradient"). It is now the same run as outside, bit
    for bit, and the caller's grad mode is as it was; torch.inference_mode(), which forbids gradients, is named."""
    kw = dict(KW, loss_fn=_mse, batched=batched)
    plain = pp.estimate_llc(_mlp(), _batches(), **kw)
    with torch.no_grad():
        inside = pp.estimate_llc(_mlp(), _batches(), **kw)
        assert not torch.is_grad_enabled()
    np.testing.assert_array_equal(inside.loss_trace, plain.loss_trace)
    assert inside.llc_mean == plain.llc_mean
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode"):
        pp.estimate_llc(_mlp(), _batches(), **kw)


class _NoisyInput(nn.Module):
    """Adds noise to its inputs in eval mode too (an augmentation left on): its forward draws random numbers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.l = nn.Linear(3, 1)

    def forward(self, x):
        return self.l(x + 0.1 * torch.randn_like(x))


def test_a_forward_that_draws_random_numbers_in_eval_mode_warns():
    """The same seed repeats a run only when the forward is deterministic. A forward drawing random numbers was
    caught only in training mode; in eval mode two runs of one seed differed without a word. It warns now, and a
    deterministic model in eval mode does not."""
    model = _NoisyInput().eval()
    with pytest.warns(UserWarning, match=r"draws random numbers.*eval mode, and still draws"):
        a = pp.sample(model, _batches(), loss_fn=_mse, batched=False, **KW)
    with pytest.warns(UserWarning, match=r"draws random numbers"):
        b = pp.sample(model, _batches(), loss_fn=_mse, batched=False, **KW)
    assert not np.array_equal(a.loss_trace, b.loss_trace)  # what the warning says
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*draws random numbers.*")
        c = pp.sample(_mlp().eval(), _batches(), loss_fn=_mse, **KW)
        d = pp.sample(_mlp().eval(), _batches(), loss_fn=_mse, **KW)
    np.testing.assert_array_equal(c.loss_trace, d.loss_trace)


@pytest.mark.parametrize(
    "bad, error",
    [
        (dict(num_chains=0), r"num_chains must be an int >= 1, got 0"),
        (dict(quiet="yes"), r"quiet='yes' is not valid"),
        (dict(callbacks=5), r"callbacks=5 is not valid"),
        (dict(seed=-1), r"seed must be an int"),
        (dict(nbeta=5.0, temperature=6.0), r"nbeta"),
        (dict(loss_fn=nn.MSELoss()), r"torch loss module"),
    ],
)
def test_bad_settings_are_named_before_the_step_calibration(bad, error):
    """Without a step (the default), a calibration of tens of thousands of chain-steps runs first. Settings it
    does not read (num_chains, quiet, callbacks, seed, two names of nbeta, a torch loss module) used to be checked
    only after it, or to surface as the calibration's own failure (AutoStepError); they are named before it."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        return _mse(model, batch)

    kw = dict(loss_fn=loss, num_draws=5, quiet=True)
    kw.update(bad)
    with pytest.raises((TypeError, ValueError), match=error) as e:
        pp.estimate_llc(_mlp(), _batches(), **kw)
    assert not isinstance(e.value, pp.sampling.AutoStepError)
    assert calls == []


def test_runs_of_fewer_than_four_draws_are_still_judged_for_relaxation():
    """With fewer than 4 draws per chain there is no R-hat or ESS, and the relaxation check they gate was skipped
    too: num_draws=1 without burn-in (the one draw at w* itself, its LLC nbeta (L_b(w*) - L_n(w*)) whatever the
    step; two chains reading the same first batch even report llc_se = 0) passed without a word. It warns now;
    a run whose burn-in relaxed the chains does not."""
    model = _mlp()
    with pytest.warns(
        pp.sampling.NonStationaryWarning, match=r"fall short of their stationary value by about 100%"
    ):
        one = pp.estimate_llc(
            model, _batches(), loss_fn=_mse, **dict(KW, num_draws=1, warn_nonstationary=True)
        )
    with torch.no_grad():
        first = float(_mse(model, _batches()[0]))
    np.testing.assert_allclose(one.llc_per_chain, one.nbeta * (first - one.init_loss), rtol=1e-6)
    with pytest.warns(pp.sampling.NonStationaryWarning, match=r"fall short"):
        pp.estimate_llc(model, _batches(), loss_fn=_mse, **dict(KW, num_draws=3, warn_nonstationary=True))
    from pypattern import truth

    torch.manual_seed(0)
    dln = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    ds = truth.make_regression_data(dln, 3, dtype=torch.float64)
    kw = dict(step_size=1e-4, nbeta=1000.0, localization=1.0, num_chains=2, num_draws=3, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pp.sampling.NonStationaryWarning)
        relaxed = pp.estimate_llc(dln, [tuple(ds.tensors)], num_burnin_steps=200, **kw)
    assert relaxed.llc_mean > 1.0  # near d/2 = 3, far from the unrelaxed draws' 0
