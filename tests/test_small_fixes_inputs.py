"""Token ids outside the vocabulary are refused by the transformer's embedding (a negative id was read from the
end of the vocabulary), and the sampling warnings of susceptibilities() and bif() name the run they concern."""

import warnings

import numpy as np
import pytest
import torch
from _devices import DEVICES

import pypattern as pp
from pypattern.sampling import NonStationaryWarning

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw) -> pp.Transformer:
    cfg = pp.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=10, n_ctx=8, **kw)
    return pp.Transformer(cfg)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("bad", [-1, -10, 10, 11])
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_id(bad, padding_idx):
    model = _model(padding_idx=padding_idx)
    tokens = torch.tensor([[1, 2, 3], [4, bad, 5]])
    with pytest.raises(ValueError, match=rf"tokens contains token id {bad}; valid ids are 0 \.\. 9 "):
        model(tokens)
    with pytest.raises(ValueError, match=rf"tokens contains token id {bad}; "):
        model.run_with_cache(tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8, torch.int16])
def test_token_ids_of_another_dtype_are_refused(dtype):
    # uint8 and bool would index W_E as a mask
    with pytest.raises(TypeError, match=rf"tokens has dtype {dtype}; give token ids in \[0, d_vocab=10\)"):
        _model()(torch.tensor([[1, 0, 1]]).to(dtype))


def test_valid_ids_give_the_same_logits_as_the_lookup_by_hand():
    """Every id of the vocabulary, its first and last included, int64 and int32: the logits of the forward equal
    those of the blocks run on ``W_E[tokens] + W_pos`` by hand, bit for bit."""
    model = _model()
    tokens = torch.tensor([[0, 9, 3, 9, 0], [5, 1, 2, 8, 7]])
    x = model.embed.W_E[tokens] + model.pos_embed.W_pos[:5]
    for block in model.blocks:
        x = block(x)
    expect = model.unembed(model.ln_final(x))
    assert torch.equal(model(tokens), expect)
    assert torch.equal(model(tokens.int()), expect)


@pytest.mark.parametrize("device", DEVICES)
def test_valid_ids_on_each_device_give_the_cpu_logits(device):
    """On a CUDA device the ids are checked without synchronising (an asynchronous assertion); valid ids give the
    CPU's logits there."""
    model = _model()
    tokens = torch.tensor([[0, 9, 3, 9, 0], [5, 1, 2, 8, 7]])
    expect = model(tokens)
    got = model.to(device)(tokens.to(device))
    torch.testing.assert_close(got.cpu(), expect, rtol=1e-5, atol=1e-5)


def test_ids_under_vmap_are_checked_and_per_sample_gradients_unchanged():
    """Under ``torch.func`` (vmap over samples, grad) the ids are checked as given; valid ids give the gradients
    of a forward on each sample alone."""
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])

    def loss(p, t):
        return torch.func.functional_call(model, p, (t[None],), {"return_type": "loss"})

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, tokens)
    alone = torch.func.grad(loss)(params, tokens[1])
    for k in params:
        torch.testing.assert_close(per_sample[k][1], alone[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tokens contains token id -1"):
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(
            params, torch.tensor([[1, 2, 3], [4, -1, 6]])
        )


def _unstationary_trace() -> np.ndarray:
    # two chains at different levels: split R-hat far above 1.1
    rng = np.random.default_rng(0)
    return np.stack([rng.normal(0.0, 1.0, 40), rng.normal(5.0, 1.0, 40)])


def test_diagnostic_warnings_name_the_run_they_concern():
    from pypattern.sampling.diagnostics import check_stationarity, checking_run, naming_runs

    trace = _unstationary_trace()
    with pytest.warns(NonStationaryWarning) as plain:
        check_stationarity(trace)
    text = str(plain[0].message)
    assert text.startswith("the loss trace is not stationary: split R-hat = ")
    with naming_runs(["run a", "run b"]):
        checking_run(1)
        with pytest.warns(NonStationaryWarning) as named:
            check_stationarity(trace)
    assert str(named[0].message) == "run b: " + text
    with naming_runs(["only run"]), pytest.warns(NonStationaryWarning) as one:
        check_stationarity(trace)
    assert str(one[0].message) == "only run: " + text
    # a stationary trace: no warning, named or not
    with naming_runs(["run a"]), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_stationarity(np.random.default_rng(1).normal(size=(2, 40)))


def _induction():
    task = pp.InductionTask(d_vocab=16, seq_len=13)
    model = pp.Transformer(task.model_config(d_model=16, n_heads=2, seed=0))
    pp.tasks.train(model, task, steps=30, seed=0, log_every=0)
    probe = task.sample(4, seed=1).tokens
    return model, [task.sample(16, seed=s).tokens for s in range(2)], probe


# a step far too small for the draws to relax from w*: every run warns (NonStationaryWarning)
_SHORT = dict(num_chains=2, num_draws=8, step_size=1e-6, localization=1.0, quiet=True)


def _caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, NonStationaryWarning)]


@pytest.mark.parametrize("convention", ["physics", "devinterp"])
def test_susceptibility_warnings_name_their_component(convention):
    """The runs sampled together (the default: one sampler call) warn with the component's name in front, each
    warning the one that component's run gives sampled alone (group_size=1: one sampler call per run, the
    curvature in the message being that run's), in the order of the runs."""
    model, train, probe = _induction()
    comps = ["blocks.0.attn.head.0", "unembed"]

    def run(**kw):
        pp.susceptibilities(model, train, probe, comps, convention=convention, **_SHORT, **kw)

    together, alone = _caught(run), _caught(lambda: run(group_size=1))
    names = (
        ["susceptibilities(), the unrestricted run (devinterp convention)"]
        if convention == "devinterp"
        else []
    )
    names += [f"susceptibilities(), component {c!r}" for c in comps]
    assert len(together) == len(names)
    for msg, name in zip(together, names):
        assert msg.startswith(name + ": step_size=1e-06 is too small for this run"), msg
    assert together == alone


def test_bif_warnings_name_bif():
    """bif() samples once: its warning is the plain sampler's on the same run, with bif() in front."""
    from pypattern import truth

    mlp, data = truth.make_teacher_task((8, 32, 4), n=256, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    x, y = data.tensors
    caught = _caught(lambda: pp.bif(mlp, loader, (x[:4], y[:4]), **_SHORT))
    assert len(caught) == 1
    assert caught[0].startswith("bif(): step_size=1e-06 is too small for this run"), caught[0]
    plain = _caught(lambda: pp.sample(mlp, loader, **_SHORT))
    assert len(plain) == 1 and plain[0].startswith("step_size=1e-06 is too small for this run")


def test_flags_on_a_hugging_face_model_name_the_conversion():
    """A Hugging Face model handed to the flags is refused naming pypattern.from_hf and hooked_hf (the message named
    only pypattern's own model types); a model without hooks of another kind keeps the short message."""
    import transformers

    from pypattern.flags import FlagSpec

    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=11, n_positions=8)
    )
    with pytest.raises(ValueError, match=r"pypattern\.from_hf\(model\).*pypattern\.hooked_hf\(model\)"):
        FlagSpec().check(hf)
    with pytest.raises(
        ValueError, match=r"has no hook points \(hook_dict\); give a pypattern Transformer or HookedModule$"
    ):
        FlagSpec().check(torch.nn.Linear(3, 3))


def test_patterning_refuses_bad_fractions_and_callables_by_name():
    """invert's fractions are read as the other arrays are (bools, text and ragged lists refused naming
    ``fractions``; a bool array was taken as 0/1), OnlinePatterner refuses what it cannot call when built (it
    failed at the first weights_for with "object is not callable"), and a susceptibilities result given as chi is
    pointed to its matrix."""
    from pypattern.patterning import OnlinePatterner, invert

    chi = np.array([[1.0, -1.0, 0.5], [0.2, 0.3, -0.5]])
    target = np.array([0.1, -0.1])
    ok = invert(chi, target, method="constrained", fractions=[1.0, 2.0, 1.0])
    assert np.isfinite(ok.weights).all()
    for bad, err in (
        (np.array([True, True, False]), TypeError),
        ("abc", TypeError),
        ([[1.0], [1.0, 2.0]], TypeError),
        ({"a": 1.0}, TypeError),
    ):
        with pytest.raises(err, match="fractions"):
            invert(chi, target, method="constrained", fractions=bad)
    with pytest.raises(TypeError, match="estimate_chi must be a callable"):
        OnlinePatterner(chi, target)
    with pytest.raises(TypeError, match="measure must be a callable"):
        OnlinePatterner(lambda step: chi, target, measure=np.zeros(2))

    result = type("SusceptibilityResult", (), {"chi": chi})()
    with pytest.raises(TypeError, match=r"give its matrix, result\.chi"):
        invert(result, target)


@pytest.mark.parametrize(
    "option",
    [
        dict(use_normalization_before_and_after=True),
        dict(residual_multiplier=0.5),
        dict(clip_qkv=2.0),
        dict(qk_norm="all", normalization_type="RMS"),
    ],
)
def test_edges_refuse_the_models_the_circuits_refuse(option):
    """edges() refuses by name the configurations that patch_edges, edge_attribution, faithfulness and acdc refuse
    (it returned a graph of them)."""
    from pypattern.circuits import edge_attribution, edges

    cfg = pp.TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=11, n_ctx=8, **option)
    model = pp.Transformer(cfg)
    name = next(iter(option))
    with pytest.raises(NotImplementedError, match=name):
        edges(model)
    tokens = torch.randint(0, 11, (2, 5))
    with pytest.raises(NotImplementedError, match=name):
        edge_attribution(model, tokens, tokens.flip(0), metric=pp.patching.LogProb(torch.tensor([1, 2])))


def test_invert_says_when_chi_looks_transposed():
    from pypattern.patterning import invert

    chi = np.arange(12.0).reshape(2, 6)  # (K=2 observables, N=6 samples)
    with pytest.raises(ValueError, match=r"chi \(6, 2\) may be transposed"):
        invert(chi.T, np.zeros(2))
    with pytest.raises(ValueError, match=r"one entry per observable \(2\), got shape \(3,\)$"):
        invert(chi, np.zeros(3))
