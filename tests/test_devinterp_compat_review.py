"""devinterp's public calls on pypattern, as devinterp 1.3.2 and 2.0.1 make them: Hugging Face datasets of every
version, the keywords devinterp 1.x hands its callbacks, its default ``evaluate``, its optimizers' ``step`` and
param-group keys, its result keys, dtypes and dims."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pypattern import devinterp as di
from pypattern.models.transformer import Transformer, TransformerConfig


def _transformer():
    cfg = TransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8, seed=0
    )
    return Transformer(cfg)


def _tokens(n=48, seed=1):
    return torch.randint(0, 11, (n, 8), generator=torch.Generator().manual_seed(seed))


SET2 = dict(num_chains=2, num_draws=3, num_burnin_steps=1, batch_size=8, init_seed=7, num_init_loss_batches=2)


class _HFDataset5:
    """What a Hugging Face ``Dataset`` of ``datasets`` >= 5 does: columns by name, rows by index, and a
    ``ValueError`` (not ``KeyError``) for a column it does not have."""

    def __init__(self, columns):
        self._cols = {k: [list(map(int, r)) for r in v] for k, v in columns.items()}

    @property
    def column_names(self):
        return list(self._cols)

    def __len__(self):
        return len(next(iter(self._cols.values())))

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._cols:
                raise ValueError(f"Column '{key}' doesn't exist.")
            return self._cols[key]
        return {k: v[key] for k, v in self._cols.items()}


class _NoColumnNames(_HFDataset5):
    column_names = None


# ------------------------------------------------------------------------------------------------ datasets >= 5


@pytest.mark.parametrize("cls", [_HFDataset5, _NoColumnNames])
def test_v2_calls_read_a_dataset_whose_missing_column_is_a_value_error(cls):
    model, ids = _transformer(), _tokens()
    ds = cls({"input_ids": ids})
    kw = dict(lr=1e-3, n_beta=5.0, localization=50.0, **SET2)
    want = di.sample(model, ids, {"probe": ids}, **kw)
    got = di.sample(model, ds, {"probe": ds}, **kw)
    np.testing.assert_array_equal(got.init_loss.values, want.init_loss.values)
    np.testing.assert_array_equal(got["loss_probe"], want["loss_probe"])
    assert np.isfinite(float(di.llc(model, ds, {}, **kw)["llc_mean"]))
    sus = di.susceptibilities(
        model,
        ds,
        {"task": ds, "probe": ds},
        {"full": None, "l0": di.create_param_masks(model, "l0")},
        sampling_task="task",
        **kw,
    )
    assert np.asarray(sus["susceptibilities"]["sus"]).shape[1] == 1
    assert np.asarray(di.bif(model, ds, {"probe": ds}, **kw)["influences"]).ndim == 4
    with pytest.raises(TypeError, match="'input_ids' column"):
        di.sample(model, cls({"tokens": ids}), {}, **kw)


# ------------------------------------------------------------------------------------------------ optimizers


def _opt_run(cls, gen_seed, positional=False, **kw):
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    opt = cls(m.parameters(), lr=1e-2, nbeta=5.0, **kw)
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step(g) if positional else opt.step(noise_generator=g)
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("cls", ["SGLD", "SGNHT", "RMSpropSGLD"])
def test_step_takes_devinterps_noise_generator(cls):
    """devinterp's SGLD.step(noise_generator=...): the steps' noise comes from the generator; equal generator
    states give equal trajectories, other states other ones, whatever the optimizer's own seed (which keys only
    SGNHT's initial momenta)."""
    from pypattern.devinterp import optim

    c = getattr(optim, cls)
    a = _opt_run(c, 5, seed=1)
    torch.testing.assert_close(_opt_run(c, 5, seed=1), a, rtol=0, atol=0)
    torch.testing.assert_close(_opt_run(c, 5, positional=True, seed=1), a, rtol=0, atol=0)
    if cls != "SGNHT":
        torch.testing.assert_close(_opt_run(c, 5, seed=2), a, rtol=0, atol=0)
    assert not torch.equal(_opt_run(c, 6, seed=1), a)
    with pytest.raises(TypeError, match="noise_generator must be a torch.Generator"):
        c(nn.Linear(2, 2).parameters(), lr=1e-2).step(noise_generator=3)


@pytest.mark.parametrize("cls", ["SGLD", "SGNHT", "RMSpropSGLD"])
def test_param_groups_answer_devinterps_keys(cls):
    from pypattern.devinterp import optim

    opt = getattr(optim, cls)(nn.Linear(2, 2).parameters(), lr=1e-2, noise_level=0.5, bounding_box_size=2.0)
    g = opt.param_groups[0]
    assert (g["lr"], g["noise_level"], g["bounding_box_size"]) == (1e-2, 0.5, 2.0)
    assert "noise_level" in g and g.get("noise_level") == 0.5
    g["noise_level"] = 0.25
    assert g["noise_scale"] == 0.25 and g["noise_level"] == 0.25
    g["bounding_box"] = 3.0
    assert g["bounding_box_size"] == 3.0


# ------------------------------------------------------------------------------------------------ 1.x callbacks


def _regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = x[:, :1] - x[:, 1:2] + 0.1 * torch.randn(128, 1, generator=g)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True
    )


def _mse(model, data):
    x, y = data
    out = model(x)
    return nn.functional.mse_loss(out, y), {"output": out}


class _GradientNorm:
    """devinterp 1.3.2's GradientNorm: reads the optimizer's param groups (``lr``) and the gradients."""

    def __init__(self, C, D):
        self.norms = torch.zeros(C, D)

    def __call__(self, chain, draw, optimizer, **kwargs):
        total = sum(
            (p.grad * 0.5 * g["lr"]).square().sum() for g in optimizer.param_groups for p in g["params"]
        )
        self.norms[chain, draw] = total.sqrt()

    def get_results(self):
        return {"gradient_norm/trace": self.norms.numpy()}


class _WeightNorm:
    """devinterp 1.3.2's WeightNorm: a norm of the weights written into a tensor, read with .numpy() (devinterp
    calls callbacks under no_grad)."""

    def __init__(self, C, D):
        self.norms = torch.zeros(C, D)

    def __call__(self, chain, draw, model, **kwargs):
        self.norms[chain, draw] = sum(p.square().sum() for p in model.parameters()).sqrt()

    def get_results(self):
        return {"weight_norm/trace": self.norms.numpy()}


class _Locals:
    """Reads devinterp's sample_single_chain locals by name."""

    def __init__(self):
        self.seen = []

    def __call__(self, chain, draw, i, results, data, num_steps, grad_accum_steps, kwargs, callback):
        assert callback is self  # devinterp's loop variable: the callback being called
        self.seen.append(
            (chain, draw, i, results, len(data[0]), num_steps, grad_accum_steps, kwargs["init_loss"])
        )

    def get_results(self):
        return {"seen": self.seen}


class OnlineLLCEstimator:
    """devinterp's own OnlineLLCEstimator (not pypattern's class): devinterp's sample() sets init_loss on it
    before the run, and it reads it at every draw."""

    def __init__(self, C, D, init_loss, nbeta):
        self.init_loss, self.nbeta, self.llcs = init_loss, nbeta, np.zeros((C, D))

    def __call__(self, chain, draw, loss, **kwargs):
        self.llcs[chain, draw] = self.nbeta * (float(loss) - self.init_loss)

    def get_results(self):
        return {"llc/trace": self.llcs}


def test_v1_callbacks_get_devinterps_locals_optimizer_and_gradients():
    from pypattern.devinterp.slt.sampler import sample

    model, loader = _regression()
    C, D = 2, 4
    kw = dict(
        evaluate=_mse,
        num_chains=C,
        num_draws=D,
        num_burnin_steps=2,
        grad_accum_steps=2,
        seed=0,
        verbose=False,
        optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0),
    )
    gn, wn, loc, est = _GradientNorm(C, D), _WeightNorm(C, D), _Locals(), OnlineLLCEstimator(C, D, 0.0, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = sample(model, loader, callbacks=[gn, wn, loc, est], **kw)
    assert (r["gradient_norm/trace"] > 0).all() and (r["weight_norm/trace"] > 0).all()
    seen = r["seen"]
    assert len(seen) == C * D
    # i counts micro-batches: the draw after 2 burn-in steps of 2 micro-batches each is micro-batch 5
    assert [s[2] for s in seen[:D]] == [5, 7, 9, 11]
    assert all(isinstance(s[3], tuple) and s[3] for s in seen) or all(s[3] is None for s in seen)
    assert {s[4] for s in seen} == {16} and {s[5] for s in seen} == {12} and {s[6] for s in seen} == {2}
    init = seen[0][7]
    assert est.init_loss == pytest.approx(init) and init > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = di.estimate_learning_coeff_with_summary(model, loader, online=True, **kw)
    np.testing.assert_allclose(r["llc/trace"], base["llc/trace"], rtol=1e-4, atol=1e-5)
    with pytest.raises(AttributeError, match="not recorded by the fused samplers"):
        getattr(di.SGLD(model.parameters(), lr=1e-3), "noise")  # noqa: B009 - the attribute read is the test


# ------------------------------------------------------------------------------------------------ 1.x evaluate


class _SelfLoss(nn.Module):
    """A model that takes devinterp's whole batch and returns its loss (what devinterp 1.3's default evaluate,
    ``model(data)``, needs)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        x, y = batch
        return nn.functional.l1_loss(self.inner(x), y)


@pytest.mark.parametrize("entry", ["summary", "sample"])
def test_v1_default_evaluate_is_the_models_own_loss_on_pairs(entry):
    from pypattern.devinterp.slt.llc import LLCEstimator
    from pypattern.devinterp.slt.sampler import sample

    inner, loader = _regression()
    model = _SelfLoss(inner)
    kw = dict(num_chains=2, num_draws=4, seed=0, verbose=False, optimizer_kwargs=dict(lr=1e-3, nbeta=10.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = di.estimate_learning_coeff_with_summary(model, loader, evaluate=lambda m, b: m(b), **kw)
        if entry == "summary":
            got = di.estimate_learning_coeff_with_summary(model, loader, **kw)
        else:
            got = sample(model, loader, [LLCEstimator(2, 4, 0.0, nbeta=10.0)], **kw)
    # equal to the rounding of float32 losses (the default sums in float64 what the model returns)
    np.testing.assert_allclose(got["loss/trace"], want["loss/trace"], rtol=1e-6)
    assert got["llc/mean"] == pytest.approx(want["llc/mean"], rel=1e-6, abs=1e-5)
    # a model that does not take the pair: the library's loss (MSE of model(x) for float y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mse = di.estimate_learning_coeff_with_summary(inner, loader, **kw)
        ref = di.estimate_learning_coeff_with_summary(
            inner, loader, evaluate=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), **kw
        )
    np.testing.assert_allclose(mse["loss/trace"], ref["loss/trace"], rtol=1e-6)


def test_v1_summary_has_exactly_devinterps_keys():
    model, loader = _regression()
    kw = dict(evaluate=_mse, num_chains=3, num_draws=4, seed=0, verbose=False)
    kw["optimizer_kwargs"] = dict(lr=1e-3, nbeta=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = di.estimate_learning_coeff_with_summary(model, loader, **kw)
        on = di.estimate_learning_coeff_with_summary(model, loader, online=True, **kw)
    assert set(out) == {"llc/mean", "llc/std", "llc-chain/0", "llc-chain/1", "llc-chain/2", "loss/trace"}
    assert set(on) == {"init_loss", "llc/means", "llc/stds", "llc/trace", "loss/trace"}
    assert out["loss/trace"].dtype == np.float32 and out["loss/trace"].shape == (3, 4)


# ------------------------------------------------------------------------------------------------ 2.x results


def test_v2_results_keys_dtypes_dims_and_the_susceptibilities_tree():
    import pickle

    model, ids = _transformer(), _tokens()
    kw = dict(lr=1e-3, n_beta=5.0, localization=50.0, **SET2)
    r = di.llc(model, ids, {}, **kw)
    assert set(r) == {"llc_mean", "llc_std", "llc_per_chain", "llc_scalar", "loss_trace", "init_loss"}
    assert set(r.keys()) == set(dict(r)) == set(r) and not any(k.startswith("_") for k in r)
    for k in ("llc_mean", "llc_std", "llc_per_chain", "loss_trace"):
        assert r[k].dtype == np.float32, k
    assert r["llc_per_chain"].dims == ("chain",) and r["loss_trace"].dims == ("chain", "step")
    back = pickle.loads(pickle.dumps(r))
    assert back.dims == r.dims and set(back) == set(r)

    samples = di.sample(model, ids, {"probe": ids[:24]}, **kw)
    assert not any(k.startswith("_") for k in samples)
    b = di.compute_bif(samples)
    assert set(b) == {"influences", "input_ids"}
    assert b["input_ids"].dims == ("batch", "position")

    s = di.compute_susceptibilities({"full": samples, "l0": samples}, "probe", include_sampling_task=True)
    assert set(s) == {"susceptibilities", "context"}
    assert s["/susceptibilities/sus"].dims == ("sus_flat", "wr")
    np.testing.assert_array_equal(s["sus"], s["susceptibilities"]["sus"])  # the flat names read through
    np.testing.assert_array_equal(s["input_ids"], s["/context/input_ids"])
    np.testing.assert_array_equal(s["ctx_batch"], s["context"]["batch"])
    assert s["dataset_id_to_name"] == ["probe"] == s["susceptibilities"].attrs["dataset_id_to_name"]
    assert "sus" in s and "/context/position" in s and "nothing" not in s


def test_v2_unembed_restriction_of_a_tied_model_is_empty():
    """devinterp selects 'unembed' among named_parameters(), where GPT-2's tied lm_head.weight is not listed."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    tied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    assert di.create_param_masks(tied, "unembed") == {}
    assert di.create_param_masks(tied, "embed") == {"transformer.wte.weight": None}
    untied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, tie_word_embeddings=False))
    assert di.create_param_masks(untied, "unembed") == {"lm_head.weight": None}
    assert set(di.create_param_masks(_transformer(), "unembed")) == {"unembed.W_U", "unembed.b_U"}


def test_v2_sample_metadata_in_attrs_with_devinterps_config_keys():
    model, ids = _transformer(), _tokens()
    r = di.sample(model, ids, {"probe": ids[:24]}, lr=1e-3, n_beta=5.0, **SET2)
    md = r.attrs["metadata"]
    assert md == r.metadata
    cfg = md["config"]
    sampler = cfg["sampler"]
    for k, v in dict(
        epoch_mode="cycle",
        init_noise=None,
        save_metrics=False,
        cores=1,
        online=False,
        scheduler_type="constant",
    ).items():
        assert sampler[k] == v, k
    assert "scheduler_kwargs" in sampler and sampler["n_beta"] == 5.0 and sampler["num_chains"] == 2
    assert cfg["observables"] == [
        {"type": "ObserveDifferentDataset", "obs_id": "probe", "batches_per_draw": 3}
    ]
    assert cfg["chain_buffer_size"] == 3 and cfg["shared_observable_dims"] == ["token", "token_pos"]
    assert cfg["tokenizer_context_length"] == 8


@pytest.mark.parametrize("batched", [None, False, True])
def test_v1_callbacks_see_the_model_after_the_steps_update(batched):
    """devinterp calls its callbacks after the optimizer's step: on one full batch read every step, the loss of
    the model a callback sees at draw d is the loss recorded at draw d + 1 (not draw d's own), whether the chains
    run one after another or side by side."""
    from pypattern.devinterp.slt.sampler import sample

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x[:, :1] + 0.1 * torch.randn(32, 1, generator=g)
    batch = (x, y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    seen: list = []

    def cb(chain, draw, loss, model):
        seen.append((chain, draw, float(loss), float(nn.functional.mse_loss(model(x), y))))

    D = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample(
            model,
            [batch],
            callbacks=[cb],
            evaluate=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
            num_chains=1,
            num_draws=D,
            seed=0,
            verbose=False,
            optimizer_kwargs=dict(lr=1e-2, nbeta=10.0, localization=1.0),
            batched=batched,
        )
    assert [s[1] for s in seen] == list(range(D))
    for d in range(D - 1):
        assert seen[d][3] == pytest.approx(seen[d + 1][2], rel=1e-6)
        assert seen[d][3] != pytest.approx(seen[d][2], rel=1e-6)
