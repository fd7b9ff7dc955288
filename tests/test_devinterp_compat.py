"""devinterp users change only the import: devinterp 1.x's ``estimate_learning_coeff(_with_summary)`` and
devinterp 2.x's ``sample`` / ``llc`` / ``susceptibilities`` / ``bif`` (:mod:`pypattern.devinterp`) give the same
numbers as the native pypattern calls they translate to, on a small MLP and on pypattern's Transformer."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pypattern
from pypattern import (
    default_nbeta,
    estimate_learning_coeff,
    estimate_learning_coeff_with_summary,
    estimate_llc,
)
from pypattern.models.transformer import Transformer, TransformerConfig
from pypattern.sampling import SGLD

FAST = dict(num_chains=2, num_draws=12)


def _mlp_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _mlp_loader(bs=16):
    x, y = _mlp_data()
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)


def _transformer():
    cfg = TransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8, seed=0
    )
    return Transformer(cfg)


def _tokens(n=48, seed=1):
    return torch.randint(0, 11, (n, 8), generator=torch.Generator().manual_seed(seed))


def _ce(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1])


def _native(model, loader, loss_fn, nbeta, **kw):
    return estimate_llc(
        model,
        loader,
        loss_fn=loss_fn,
        step_size=1e-3,
        nbeta=nbeta,
        localization=100.0,
        seed=3,
        quiet=True,
        warn_nonstationary=False,
        **kw,
    )


def _v1(model, loader, **kw):
    kw.setdefault("optimizer_kwargs", dict(lr=1e-3, nbeta=10.0, localization=100.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_learning_coeff_with_summary(
            model, loader, sampling_method=SGLD, seed=3, verbose=False, warn_nonstationary=False, **FAST, **kw
        )


# ------------------------------------------------------------------------------------------------ devinterp 1.x


@pytest.mark.parametrize("how", ["criterion", "evaluate"])
def test_v1_mlp_equals_native(how):
    model, loader = _mlp(), _mlp_loader()
    kw = {"criterion": nn.CrossEntropyLoss()} if how == "criterion" else {"evaluate": _ce}
    out = _v1(model, loader, **kw)
    ref = _native(model, loader, _ce, 10.0, num_init_loss_batches=2, **FAST)
    assert {"llc/mean", "llc/std", "llc-chain/0", "llc-chain/1", "loss/trace"} == set(out)  # devinterp's keys
    np.testing.assert_allclose(out["loss/trace"], ref.loss_trace, rtol=1e-6)
    assert out["llc/mean"] == pytest.approx(ref.llc_mean, rel=1e-6)
    assert out["llc/std"] == pytest.approx(ref.llc_std, rel=1e-5)
    # the LLC is nbeta (mean loss - init loss) per chain, computed here from the trace
    per_chain = 10.0 * (out["loss/trace"].astype(np.float64).mean(1) - ref.init_loss)
    assert [out[f"llc-chain/{i}"] for i in range(2)] == pytest.approx(per_chain, rel=1e-5)
    assert estimate_learning_coeff(
        model,
        loader,
        seed=3,
        verbose=False,
        warn_nonstationary=False,
        optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0),
        **kw,
        **FAST,
    ) == pytest.approx(out["llc/mean"], rel=1e-6)


def test_v1_transformer_token_loader_equals_native():
    model, ids = _transformer(), _tokens()
    loader = DataLoader(ids, batch_size=8, shuffle=True)

    def evaluate(m, b):
        return m(b, return_type="loss"), {"logits": None}

    out = _v1(model, loader, evaluate=evaluate)
    ref = _native(model, loader, lambda m, b: m(b, return_type="loss"), 10.0, num_init_loss_batches=2, **FAST)
    np.testing.assert_allclose(out["loss/trace"], ref.loss_trace, rtol=1e-6)
    assert out["llc/mean"] == pytest.approx(ref.llc_mean, rel=1e-6)
    # devinterp's default evaluate is model(batch), which fails on a model returning logits; token batches get
    # the library's next-token loss instead, the loss evaluate gives above
    # (the library's loss sums its per-token losses in float64: equal to float32 rounding of the losses, which
    # nbeta = 10 scales to about 1e-5 of an LLC)
    dflt = _v1(model, loader)
    np.testing.assert_allclose(dflt["loss/trace"], out["loss/trace"], rtol=1e-6)
    assert dflt["llc/mean"] == pytest.approx(out["llc/mean"], rel=1e-6, abs=1e-5)


def test_v1_default_nbeta_and_online():
    model, loader = _mlp(), _mlp_loader(bs=16)
    out = _v1(model, loader, evaluate=_ce, optimizer_kwargs=dict(lr=1e-3, localization=100.0))
    ref = _native(model, loader, _ce, 16 / math.log(16), num_init_loss_batches=2, **FAST)
    assert out["llc/mean"] == pytest.approx(ref.llc_mean, rel=1e-6)
    on = _v1(model, loader, evaluate=_ce, online=True)
    assert set(on) == {"init_loss", "llc/means", "llc/stds", "llc/trace", "loss/trace"}
    want = 10.0 * (on["loss/trace"].astype(np.float64) - on["init_loss"])  # devinterp: per draw, not running
    np.testing.assert_allclose(on["llc/trace"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(on["llc/means"], want.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(on["llc/stds"], want.std(0, ddof=1), rtol=1e-4, atol=1e-5)


def test_default_nbeta_top_level():
    assert pypattern.default_nbeta is default_nbeta
    assert "default_nbeta" in pypattern.__all__
    assert default_nbeta(_mlp_loader(bs=16)) == pytest.approx(16 / math.log(16))
    assert default_nbeta(16, grad_accum_steps=2) == pytest.approx(32 / math.log(32))
    assert default_nbeta(dataloader=[torch.zeros(5, 3)]) == pytest.approx(5 / math.log(5))
    with pytest.warns(UserWarning, match="undefined"):
        assert default_nbeta(1) == 1.0
    with pytest.raises(ValueError, match="grad_accum_steps"):
        default_nbeta(16, grad_accum_steps=0)


def test_v1_device_honoured():
    model, loader = _mlp(), _mlp_loader()
    base = _v1(model, loader, evaluate=_ce)
    for dev in ("cpu", torch.device("cpu")):
        out = _v1(model, loader, evaluate=_ce, device=dev)
        assert out["llc/mean"] == pytest.approx(base["llc/mean"], rel=1e-6)
    # a model elsewhere is copied to the device; the caller's model stays where it is
    m64 = _mlp().double()
    before = [p.detach().clone() for p in m64.parameters()]
    x, y = _mlp_data()
    loader64 = DataLoader(TensorDataset(x.double(), y), batch_size=16, shuffle=True)
    _v1(m64, loader64, evaluate=_ce, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, m64.parameters()))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda'.*CUDA"):
            _v1(model, loader, evaluate=_ce, device="cuda")
    with pytest.raises(ValueError, match="device='gpu7'"):
        _v1(model, loader, evaluate=_ce, device="gpu7")


def test_v1_unsupported_options_are_named():
    model, loader = _mlp(), _mlp_loader()

    class SGHMC(torch.optim.Optimizer):
        pass

    with pytest.raises(ValueError, match="evaluate= and criterion="):
        _v1(model, loader, evaluate=_ce, criterion=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="sampling_method='SGHMC' is not a known sampler; valid are 'sgld'"):
        estimate_learning_coeff_with_summary(
            model, loader, evaluate=_ce, sampling_method=SGHMC, verbose=False
        )
    with pytest.raises(
        ValueError, match="sampler='sgnht' and sampling_method='SGLD' name different samplers"
    ):
        _v1(model, loader, evaluate=_ce, sampler="sgnht")
    with pytest.raises(ValueError, match="diffusion_factor=0.1, a hyperparameter of sampler='sgnht'"):
        _v1(model, loader, evaluate=_ce, optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, diffusion_factor=0.1))
    with pytest.raises(NotImplementedError, match="add_grad_correction=True"):
        _v1(model, loader, evaluate=_ce, optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, add_grad_correction=True))
    with pytest.raises(NotImplementedError, match="gpu_idxs"):
        _v1(model, loader, evaluate=_ce, gpu_idxs=[0, 1])
    with pytest.raises(NotImplementedError, match="cores"):
        _v1(model, loader, evaluate=_ce, cores=["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match="optimizer_kwargs has unknown keys \\['momentum'\\]"):
        _v1(model, loader, evaluate=_ce, optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, momentum=0.9))
    with pytest.raises(TypeError, match="criterion= needs \\(x, y\\) batches"):
        _v1(_transformer(), DataLoader(_tokens(), batch_size=8), criterion=nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="unsupported keyword argument\\(s\\) \\['online_trace'\\]"):
        _v1(model, loader, evaluate=_ce, online_trace=True)
    with pytest.raises(TypeError, match="\\['loss_fn'\\]"):  # devinterp's evaluate= is the way in
        _v1(model, loader, evaluate=_ce, loss_fn=_ce)
    with pytest.warns(UserWarning, match="use_amp=True"):
        estimate_learning_coeff_with_summary(
            model,
            loader,
            evaluate=_ce,
            use_amp=True,
            device="cpu",
            verbose=False,
            warn_nonstationary=False,
            **FAST,
        )


@pytest.mark.parametrize(
    "method, sampler, own",
    [
        ("SGNHT", "sgnht", {"diffusion_factor": 0.02}),
        ("rmsprop_sgld", "rmsprop_sgld", {"alpha": 0.9, "eps": 0.05}),
    ],
)
def test_v1_other_samplers_equal_native(method, sampler, own):
    """devinterp 1.x's sampling_method (its SGNHT class, or a name) and the sampler's own optimizer_kwargs run
    pypattern's fused sampler: the same numbers as estimate_llc(sampler=...)."""
    from pypattern.devinterp.optim import SGNHT

    model, loader = _mlp(), _mlp_loader()
    okw = dict(lr=1e-3, nbeta=10.0, localization=100.0, save_noise=False, **own)
    out = estimate_learning_coeff_with_summary(
        model,
        loader,
        evaluate=_ce,
        sampling_method=SGNHT if method == "SGNHT" else method,
        optimizer_kwargs=okw,
        seed=3,
        verbose=False,
        warn_nonstationary=False,
        **FAST,
    )
    ref = _native(
        model, loader, _ce, 10.0, num_init_loss_batches=2, sampler=sampler, optimizer_kwargs=own, **FAST
    )
    sgld = _native(model, loader, _ce, 10.0, num_init_loss_batches=2, **FAST)
    assert ref.sample.config["sampler"] == sampler and all(ref.sample.config[k] == v for k, v in own.items())
    np.testing.assert_allclose(out["loss/trace"], ref.loss_trace, rtol=1e-6)
    assert out["llc/mean"] == pytest.approx(ref.llc_mean, rel=1e-6)
    assert np.abs(ref.loss_trace - sgld.loss_trace).max() > 1e-4  # another sampler, other draws


def test_v1_callbacks_get_results_merged():
    model, loader = _mlp(), _mlp_loader()

    class Count:
        def __init__(self):
            self.n, self.done = 0, False

        def __call__(self, chain, draw, loss):
            self.n += 1

        def finalize(self):
            self.done = True

        def get_results(self):
            return {"count": self.n, "finalized": self.done}

    out = _v1(model, loader, evaluate=_ce, callbacks=[Count()])
    assert out["count"] == 2 * 12 and out["finalized"] is True


def test_v1_sample_with_estimator_callbacks_equals_the_summary():
    """devinterp 1.x's callback interface: ``sample(model, loader, callbacks=[LLCEstimator(...)])`` fills the
    estimator with the same draws as ``estimate_learning_coeff_with_summary`` (same seed), and devinterp-style
    callbacks get its keywords (the loss a 0-d tensor, the chain's model, the batch as ``data``)."""
    from pypattern.devinterp.slt.callback import SamplerCallback
    from pypattern.devinterp.slt.llc import LLCEstimator, OnlineLLCEstimator
    from pypattern.devinterp.slt.sampler import sample as sample_v1

    model, loader = _mlp(), _mlp_loader()
    summary = _v1(model, loader, evaluate=_ce)
    online = _v1(model, loader, evaluate=_ce, online=True)
    init = online["init_loss"]

    class Seen(SamplerCallback):
        def __init__(self):
            super().__init__()
            self.items, self.finalized = [], False

        def __call__(self, chain, draw, **kwargs):
            assert kwargs["loss"].dim() == 0 and isinstance(kwargs["model"], nn.Module)
            x, y = kwargs["data"]
            self.items.append((chain, draw, kwargs["loss"].item(), x.shape[0]))

        def finalize(self):
            self.finalized = True

    est = LLCEstimator(num_chains=2, num_draws=12, init_loss=init, nbeta=10.0)
    on = OnlineLLCEstimator(2, 12, init_loss=torch.tensor(init), nbeta=10.0)
    seen = Seen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sample_v1(
            model, loader, [est, on, seen], evaluate=_ce, sampling_method=SGLD, seed=3, verbose=False,
            optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0), init_loss=init,
            warn_nonstationary=False, **FAST,
        )  # fmt: skip
    assert seen.finalized and len(seen.items) == 24
    r = est.get_results()
    # devinterp 1.x's sample returns its callbacks' results merged (those that keep none are left out)
    assert out["llc/mean"] == r["llc/mean"] and "llc/means" in out
    np.testing.assert_allclose(r["loss/trace"], summary["loss/trace"], rtol=1e-6)
    assert r["llc/mean"] == pytest.approx(summary["llc/mean"], rel=1e-5)
    assert r["llc/std"] == pytest.approx(summary["llc/std"], rel=1e-4)
    assert [r[f"llc-chain/{i}"] for i in range(2)] == pytest.approx(
        [summary[f"llc-chain/{i}"] for i in range(2)], rel=1e-5
    )
    o = on.get_results()
    for k in ("llc/means", "llc/stds", "llc/trace", "loss/trace"):
        np.testing.assert_allclose(o[k], online[k], rtol=1e-4, atol=1e-6)
    # a loss traced by a callback is the draw's loss
    traced = {(c, d): v for c, d, v, _ in seen.items}
    assert traced[(1, 5)] == pytest.approx(float(summary["loss/trace"][1, 5]), rel=1e-6)


def test_v1_estimators_refuse_what_does_not_fit():
    from pypattern.devinterp.slt.llc import LLCEstimator

    with pytest.raises(ValueError, match="nbeta is not given"):
        LLCEstimator(2, 3, init_loss=0.5)
    with pytest.raises(ValueError, match="num_draws=0"):
        LLCEstimator(2, 0, init_loss=0.5, nbeta=1.0)
    est = LLCEstimator(2, 3, init_loss=0.5, nbeta=1.0)
    with pytest.raises(IndexError, match="chain 2, draw 0 is outside"):
        est(2, 0, loss=torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="NaN detected in loss at chain 0, draw 1"):
        est(0, 1, loss=torch.tensor(float("nan")))
    est(0, 0, loss=torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="never recorded"):
        est.finalize()


# ------------------------------------------------------------------------------------------------ devinterp 2.x

from pypattern import devinterp as di  # noqa: E402 - grouped with its tests


def _lm_loss(m, ids):
    return m(ids, return_type="per_token_loss")


def _init_loss(model, ids, bs, k, seed, loss):
    """devinterp 2.x's L_n(w*): the first k batches of its init-loss DataLoader(shuffle=True, generator seeded
    by init_seed), computed directly: torch's DataLoader iterator draws one int64 base seed from the generator,
    then its RandomSampler takes randperm from the same generator."""
    g = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    order = torch.randperm(len(ids), generator=g)
    with torch.no_grad():
        return float(
            np.mean([loss(model, ids[order[i * bs : (i + 1) * bs]]).double().mean() for i in range(k)])
        )


SET2 = dict(num_chains=2, num_draws=5, num_burnin_steps=3, num_steps_bw_draws=2, batch_size=8, init_seed=7)


@pytest.mark.parametrize(
    "method, extra, sampler, own",
    [
        ("sgmcmc_sgld", {}, "sgld", {}),
        (
            "rmsprop_sgld",
            {"rmsprop_alpha": 0.9, "sampling_method_kwargs": {"eps": 0.05}},
            "rmsprop_sgld",
            None,
        ),
        (
            "sgnht",
            {"sampling_method_kwargs": {"diffusion_factor": 0.02}},
            "sgnht",
            {"diffusion_factor": 0.02},
        ),
    ],
)
def test_v2_llc_transformer_equals_native(method, extra, sampler, own):
    own = {"alpha": 0.9, "eps": 0.05} if own is None else own
    model, ids = _transformer(), _tokens()
    res = di.llc(
        model,
        {"input_ids": ids.tolist()},
        {},
        lr=1e-3,
        n_beta=5.0,
        localization=50.0,
        num_init_loss_batches=3,
        sampling_method=method,
        **extra,
        **SET2,
    )
    assert {"llc_mean", "llc_std", "llc_per_chain", "llc_scalar", "loss_trace", "init_loss"} <= set(res)
    steps = 5 * 2 + 3  # devinterp averages every step, burn-in included
    assert res.loss_trace.shape == (2, steps)
    init = _init_loss(model, ids, 8, 3, 7, _lm_loss)
    assert res.init_loss == pytest.approx(init, rel=1e-6)
    ref = estimate_llc(
        model,
        DataLoader(TensorDataset(ids), batch_size=8, shuffle=True, drop_last=True),
        loss_fn=lambda m, b: _lm_loss(m, b[0]).mean(),
        num_chains=2,
        num_draws=steps,
        step_size=1e-3,
        nbeta=5.0,
        localization=50.0,
        seed=7,
        init_loss=init,
        quiet=True,
        warn_nonstationary=False,
        sampler=sampler,
        optimizer_kwargs=own,
    )
    np.testing.assert_allclose(res.loss_trace, ref.loss_trace, rtol=1e-5)
    np.testing.assert_allclose(res.llc_per_chain, ref.llc_per_chain, rtol=1e-4, atol=1e-6)
    assert res.llc_mean == pytest.approx(ref.llc_mean, rel=1e-4, abs=1e-6)
    assert res.llc_std == pytest.approx(np.std(ref.llc_per_chain), rel=1e-4, abs=1e-6)  # xarray's ddof=0


def test_v2_init_loss_per_chain_when_chains_read_their_own_order():
    """devinterp 2.0.1 with match_sampling_input_ids_across_chains=False seeds chain c's init-loss loader with
    init_seed + c: init_loss (chain, token_pos) holds each chain's own batches, and the LLC subtracts their mean."""
    model, ids = _transformer(), _tokens()
    kw = dict(lr=1e-3, n_beta=5.0, localization=50.0, num_init_loss_batches=2, **SET2)
    s = di.sample(model, ids, {}, match_sampling_input_ids_across_chains=False, **kw)
    per_chain = [_init_loss(model, ids, 8, 2, 7 + c, _lm_loss) for c in range(2)]
    np.testing.assert_allclose(s.init_loss.values.mean(axis=1), per_chain, rtol=1e-5)
    assert per_chain[0] != pytest.approx(per_chain[1], rel=1e-6)
    r = di.compute_llc(s)
    assert r.init_loss == pytest.approx(np.mean(per_chain), rel=1e-5)
    matched = di.sample(model, ids, {}, **kw)
    np.testing.assert_allclose(matched.init_loss.values.mean(axis=1), per_chain[0], rtol=1e-5)


def test_v2_llc_mlp_with_index_loss_equals_native():
    """An MLP through devinterp 2.x's token interface: each row holds a sample index, the loss looks it up."""
    model, (x, y) = _mlp(), _mlp_data()

    def loss_fn(m, input_ids):
        i = input_ids[:, 0]
        return nn.functional.cross_entropy(m(x[i]), y[i], reduction="none")[:, None]

    ids = torch.stack([torch.arange(len(x)), torch.zeros(len(x), dtype=torch.long)], 1)
    res = di.llc(
        model, ids, lr=1e-3, n_beta=10.0, localization=100.0, loss_fn=loss_fn, num_init_loss_batches=2, **SET2
    )
    ref = estimate_llc(
        model,
        DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, drop_last=True),
        loss_fn=_ce,
        num_chains=2,
        num_draws=13,
        step_size=1e-3,
        nbeta=10.0,
        localization=100.0,
        seed=7,
        init_loss=_init_loss(model, ids, 8, 2, 7, loss_fn),
        quiet=True,
        warn_nonstationary=False,
    )
    np.testing.assert_allclose(res.loss_trace, ref.loss_trace, rtol=1e-5)
    assert res.llc_mean == pytest.approx(ref.llc_mean, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("batched", [False, True])
def test_v2_sample_layout_and_bif_equals_native(batched):
    model, ids = _transformer(), _tokens()
    probe_ds = {"input_ids": _tokens(20, seed=5)}
    s = di.sample(
        model,
        ids,
        {"probe set": (probe_ds, 2)},
        lr=1e-3,
        n_beta=5.0,
        localization=50.0,
        batched=batched,
        **SET2,
    )
    T = 7
    assert s.init_loss.shape == (2, T) and s.sampling_loss.shape == (2, 5, 8, T)
    assert s.sampling_loss_micro.shape == (2, 13, 8, T) and s.sampling_input_ids_micro.shape == (
        2,
        13,
        8,
        T + 1,
    )
    assert s.loss_probe_set.shape == (2, 5, 16, T) and s.input_ids_probe_set.shape == (16, T + 1)
    assert s["loss_probe_set"].dims == ("chain", "draw", "batch_probe_set", "token_pos")
    # the draws are steps burn-in + k * num_steps_bw_draws; each step's losses are of the ids it read
    np.testing.assert_array_equal(s.sampling_loss, s.sampling_loss_micro[:, [3, 5, 7, 9, 11]])
    with torch.no_grad():
        l0 = _lm_loss(model, torch.as_tensor(s.sampling_input_ids_micro[1, 0])).numpy()
    np.testing.assert_allclose(s.sampling_loss_micro[1, 0], l0, rtol=1e-5)  # step 0 is at w*
    # BIF: the correlation over draws equals pypattern.bif's on the same sequences with the same chains
    probe = torch.as_tensor(s.input_ids_probe_set)
    for method in ("sequence", "token"):
        b = di.bif(model, ids, {"probe set": (probe_ds, 2)}, lr=1e-3, n_beta=5.0, localization=50.0,
                   correlation_method=method, batched=batched, **SET2)  # fmt: skip
        ref = pypattern.bif(
            model,
            DataLoader(TensorDataset(ids), batch_size=8, shuffle=True, drop_last=True),
            probe,
            loss_fn=lambda m, bt: _lm_loss(m, bt[0]).mean(),
            per_sample_loss_fn=_lm_loss,
            per_token=method == "token",
            num_chains=2,
            num_draws=5,
            num_burnin_steps=3,
            num_steps_bw_draws=2,
            step_size=1e-3,
            nbeta=5.0,
            localization=50.0,
            seed=7,
            batched=batched,
            warn_nonstationary=False,
        )
        want = ref.corr if method == "sequence" else ref.corr.reshape(16, T, 16, T).transpose(0, 2, 1, 3)
        assert b.influences.shape == ((16, 16) if method == "sequence" else (16, 16, T, T))
        np.testing.assert_allclose(b.influences, want, rtol=1e-3, atol=1e-4)
        np.testing.assert_array_equal(b.input_ids, s.input_ids_probe_set)


def test_v2_sampling_loss_averages_the_gradient_accumulation_micro_batches():
    """devinterp 2.x's ``sampling_loss`` of a draw is the element-wise mean over its step's micro-batches."""
    model, ids = _transformer(), _tokens()
    kw = {**SET2, "gradient_accumulation_steps": 2, "batch_size": 4}
    s = di.sample(model, ids, {}, lr=1e-3, n_beta=5.0, localization=50.0, **kw)
    C, D, T = s.sampling_loss.shape[0], s.sampling_loss.shape[1], s.sampling_loss.shape[3]
    assert s.sampling_loss.shape == (C, D, 4, T) and s.sampling_loss_micro.shape[2] == 8
    steps = kw["num_burnin_steps"] + kw["num_steps_bw_draws"] * np.arange(D)
    micro = s.sampling_loss_micro[:, steps]
    np.testing.assert_allclose(s.sampling_loss, (micro[:, :, :4] + micro[:, :, 4:]) / 2, rtol=1e-6)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_v2_gradient_accumulation_runs_one_batch_per_forward(batched, shuffle):
    """devinterp 2.x's gradient_accumulation_steps: every forward reads batch_size sequences (the memory of one
    batch), and every micro-batch's per-token losses are recorded (the averaging over micro-batches is checked in
    the test above).
    Without shuffling, step j reads the batches 3j, 3j + 1, 3j + 2 of the dataset, cycled."""
    per_token_loss = di.per_token_loss
    model, ids = _transformer(), _tokens(40)
    seen = []

    def lf(m, x):
        seen.append(x.shape[0])
        return per_token_loss(m, x)

    kw = dict(num_chains=2, num_draws=3, num_burnin_steps=1, batch_size=4, init_seed=5, quiet=True)
    s = di.sample(
        model, ids, {}, lr=1e-3, n_beta=5.0, localization=50.0, gradient_accumulation_steps=3,
        shuffle=shuffle, batched=batched, loss_fn=lf, **kw,
    )  # fmt: skip
    assert s.sampling_loss_micro.shape == (2, 4, 12, ids.shape[1] - 1)
    # vmap-ed forwards see one chain's batch of 4 as well
    assert max(seen) == 4
    got = s.sampling_input_ids_micro.values
    if not shuffle:
        for j in range(4):
            want = torch.cat([ids[((3 * j + r) % 10) * 4 : ((3 * j + r) % 10 + 1) * 4] for r in range(3)])
            np.testing.assert_array_equal(got[0, j], want.numpy())
    # every recorded micro-batch's losses are its forward's, at the chain's weights of that step: the first step's
    # (at w*) recomputed directly
    with torch.no_grad():
        first = per_token_loss(model, torch.as_tensor(got[0, 0])).numpy()
    np.testing.assert_allclose(s.sampling_loss_micro.values[0, 0], first, rtol=1e-5, atol=1e-6)


def test_v2_susceptibilities_formula():
    model, ids = _transformer(), _tokens()
    obs = {"train": ids[:16], "probe": {"input_ids": _tokens(16, seed=9)}}
    wr = {"full": None, "attn": {"blocks.0.attn.W_Q": None, "blocks.0.attn.W_K": None}}
    res = di.susceptibilities(model, ids, obs, wr, sampling_task="train", lr=1e-3, n_beta=5.0,
                              localization=50.0, batches_per_draw=1, **SET2)  # fmt: skip
    assert res.sus.shape == (8 * 7, 1) and res.wr == ["attn"] and res.dataset_id_to_name == ["probe"]
    assert res.input_ids.shape == (8 * 8,) and res.target_position.max() == 7
    # the restricted run moved only its parameters: other weights' losses equal... recompute chi by loops
    full, r = res.samples["full"], res.samples["attn"]
    init = full.init_loss.mean()
    full_lbar = full.loss_train.astype(np.float64).mean()
    chi = np.zeros((8, 7))
    for b in range(8):
        for t in range(7):
            e_phi_l = e_phi_lbar = e_phi = 0.0
            n = 0
            for c in range(2):
                for d in range(5):
                    lbar = r.loss_train[c, d].astype(np.float64).mean()
                    phi = lbar - init
                    e_phi_l += phi * r.loss_probe[c, d, b, t]
                    e_phi_lbar += phi * lbar
                    e_phi += phi
                    n += 1
            delta = full_lbar - full.loss_probe[:, :, b, t].astype(np.float64).mean()
            chi[b, t] = e_phi_lbar / n - e_phi_l / n - e_phi / n * delta
    np.testing.assert_allclose(res.sus[:, 0], chi.reshape(-1), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="'full'"):
        di.susceptibilities(model, ids, obs, {"attn": None}, sampling_task="train", lr=1e-3, n_beta=5.0)


def test_v2_unsupported_options_are_named():
    model, ids = _transformer(), _tokens()
    base = dict(lr=1e-3, n_beta=5.0, num_chains=1, num_draws=2, batch_size=8)
    for kw, name in [
        (dict(output_path="x.zarr"), "output_path"),
        (dict(init_noise=0.1), "init_noise"),
        (dict(save_metrics=True), "save_metrics"),
        (
            dict(sampling_method="rmsprop_sgld", sampling_method_kwargs={"add_grad_correction": True}),
            "add_grad",
        ),
    ]:
        with pytest.raises(NotImplementedError, match=name):
            di.llc(model, ids, {}, **base, **kw)
    for kw, match in [
        (dict(sampling_method="hmc"), "sampling_method='hmc' is not a known sampler"),
        (dict(rmsprop_eps=1e-8), "rmsprop_eps can only be set when sampling_method='rmsprop_sgld'"),
        (
            dict(sampling_method="rmsprop_sgld", rmsprop_eps=0.1, sampling_method_kwargs={"eps": 0.2}),
            "rmsprop_eps is set both",
        ),
        (dict(sampling_method_kwargs={"eps": 1e-8}), "eps=1e-08, a hyperparameter of sampler='rmsprop_sgld'"),
        (
            dict(sampling_method="sgnht", sampling_method_kwargs={"lr": 0.1}),
            "give these as keyword arguments",
        ),
        (
            dict(sampling_method="sgnht", sampling_method_kwargs={"momentum": 0.1}),
            "unknown keys \\['momentum'\\]",
        ),
        (dict(sampling_method="rmsprop_sgld", rmsprop_alpha=1.0), "alpha must be in \\[0, 1\\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            di.llc(model, ids, {}, **base, **kw)
    with pytest.raises(TypeError, match="input_ids"):
        di.llc(model, [1, 2, 3], {}, **base)
    with pytest.raises(ValueError, match="param_masks names \\['nope'\\]"):
        di.llc(model, ids, {}, param_masks={"nope": None}, **base)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            di.llc(model, ids, {}, device="cuda", **base)


def test_v2_results_read_as_devinterp_xarray_results():
    """The reads a devinterp 2.0.1 script makes on its xarray results work unchanged: ``.values``,
    ``.to_numpy()``, ``.item()``, ``float()``, ``.dims``; ``sample(...).dataset`` and its ``metadata``; the
    susceptibilities' ``/susceptibilities`` and ``/context`` subtrees (devinterp's ``_build_output``) with their
    coordinates and ``attrs["dataset_id_to_name"]``."""
    model, ids = _transformer(), _tokens()
    base = dict(lr=1e-3, n_beta=5.0, localization=50.0, batches_per_draw=1, **SET2)
    s = di.sample(model, ids, {"probe": ids[:16]}, **base)
    assert type(s.dataset.init_loss.values) is np.ndarray and s.dataset.init_loss.dims == (
        "chain",
        "token_pos",
    )
    assert s.dataset.metadata["config"]["sampler"]["n_beta"] == 5.0
    np.testing.assert_array_equal(s["loss_probe"].values, dict.__getitem__(s, "loss_probe"))
    r = di.compute_llc(s)
    assert float(r["llc_mean"]) == r["llc_mean"].item() == pytest.approx(r["llc_per_chain"].values.mean())
    assert r["llc_per_chain"].dims == ("chain",) and r["loss_trace"].to_numpy().shape == (2, 13)
    assert type(r.llc_per_chain * 2) is np.ndarray  # arithmetic gives plain arrays
    obs = {"train": ids[:16], "probe": {"input_ids": _tokens(16, seed=9)}, "probe2": _tokens(8, seed=4)}
    wr = {"full": None, "attn": {"blocks.0.attn.W_Q": None}, "mlp": {"blocks.0.mlp.W_in": None}}
    res = di.susceptibilities(model, ids, obs, wr, sampling_task="train", **base)
    tree, ctx = res["susceptibilities"], res["context"]
    assert tree["sus"].dims == ("sus_flat", "wr") and list(tree["wr"].values) == ["attn", "mlp"]
    np.testing.assert_array_equal(tree["sus"].values, res.sus)
    assert tree.attrs["dataset_id_to_name"] == ctx.attrs["dataset_id_to_name"] == ["probe", "probe2"]
    # coordinates: sus row k is (dataset_id, batch, target_position) of observable dataset_id
    n = 8 * 7
    assert tree["sus"].shape == (2 * n, 2)
    np.testing.assert_array_equal(tree["dataset_id"].values, np.repeat([0, 1], n))
    np.testing.assert_array_equal(tree["batch"].values[:n], np.repeat(np.arange(8), 7))
    np.testing.assert_array_equal(tree["target_position"].values[:n], np.tile(np.arange(1, 8), 8))
    # the context is the probes' tokens, flattened, with their own coordinates
    full = res.samples["full"]
    want = np.concatenate([full.input_ids_probe.reshape(-1), full.input_ids_probe2.reshape(-1)])
    np.testing.assert_array_equal(ctx["input_ids"].values, want)
    np.testing.assert_array_equal(ctx["position"].values[:64], np.tile(np.arange(8), 8))
    np.testing.assert_array_equal(ctx["batch"].values[:64], np.repeat(np.arange(8), 8))


@pytest.mark.parametrize("method", ["sequence", "token"])
def test_v2_compute_bif_index_ranges(method):
    """devinterp 2.0.1's compute_bif(batch_index_range_1=, batch_index_range_2=, batch_size=, device=): the
    influence of the selected sequences on the selected ones, computed here directly from the losses over draws
    (chains and draws pooled)."""
    model, ids = _transformer(), _tokens()
    s = di.sample(model, ids, {"probe": ids[:16]}, lr=1e-3, n_beta=5.0, batches_per_draw=1, **SET2)
    r1, r2 = [5, 0, 2], [1, 7]
    b = di.compute_bif(
        s,
        correlation_method=method,
        batch_index_range_1=r1,
        batch_index_range_2=r2,
        batch_size=2,
        device="cpu",
    )
    loss = np.asarray(s.loss_probe, dtype=np.float64).reshape(-1, 8, 7)  # (chain * draw, batch, token_pos)
    if method == "sequence":
        c = np.corrcoef(loss.mean(2).T)
        want = c[np.ix_(r1, r2)]
    else:
        c = np.corrcoef(loss.reshape(len(loss), -1).T).reshape(8, 7, 8, 7)
        want = np.stack([np.stack([c[i, :, j, :] for j in r2]) for i in r1])
    assert b.influences.shape == want.shape
    np.testing.assert_allclose(b.influences.values, want, rtol=1e-4, atol=1e-5)
    assert b.influences.dims[:2] == ("batch_1", "batch_2")
    full = di.compute_bif(s, correlation_method=method)
    np.testing.assert_array_equal(b.influences.values, full.influences.values[r1][:, r2])
    with pytest.raises(ValueError, match="batch_index_range_2"):
        di.compute_bif(s, batch_index_range_2=[8])


def _bif_samples():
    """A devinterp 2.x sample result with two observables: 'probe' (3 sequences) and 'zz' (2)."""
    g = np.random.default_rng(0)
    return {
        "loss_probe": g.normal(size=(2, 6, 3, 4)).astype(np.float32),
        "input_ids_probe": g.integers(0, 9, size=(3, 5)),
        "loss_zz": g.normal(size=(2, 6, 2, 4)).astype(np.float32),
        "input_ids_zz": g.integers(0, 9, size=(2, 5)),
    }


def test_compute_bif_reads_one_loss_key_given_as_a_str():
    s = _bif_samples()
    one = di.compute_bif(s, loss_keys="probe")
    listed = di.compute_bif(s, loss_keys=["probe"])
    assert one["influences"].shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(one["influences"], listed["influences"])
    np.testing.assert_array_equal(one["input_ids"], s["input_ids_probe"])
    assert di.compute_bif(s, loss_keys="zz")["influences"].shape == (2, 2, 4, 4)
    with pytest.raises(KeyError, match=r"\['nope'\] not found"):
        di.compute_bif(s, loss_keys="nope")
    with pytest.raises(ValueError, match="loss_keys is empty"):
        di.compute_bif(s, loss_keys=[])


@pytest.mark.parametrize("which", ["batch_index_range_1", "batch_index_range_2"])
def test_compute_bif_refuses_negative_batch_indices(which):
    s = _bif_samples()
    with pytest.raises(
        ValueError, match=rf"{which}=\[-1, 0\] must hold sequence indices in 0\.\.4 \(no negative"
    ):
        di.compute_bif(s, **{which: [-1, 0]})
    b = di.compute_bif(s, **{which: [4, 0]})
    np.testing.assert_array_equal(
        np.asarray(b.coords["batch_1" if which.endswith("1") else "batch_2"]), [4, 0]
    )


def test_devinterp_import_paths_mirrored():
    """devinterp's module paths under pypattern.devinterp: users change only the package name."""
    from pypattern.devinterp.optim import SGLD as SGLD_a
    from pypattern.devinterp.optim.sgld import SGLD as SGLD_b
    from pypattern.devinterp.slt.bif import bif, compute_bif
    from pypattern.devinterp.slt.llc import compute_llc, llc
    from pypattern.devinterp.slt.sampler import estimate_learning_coeff_with_summary as elc
    from pypattern.devinterp.slt.sampling import sample
    from pypattern.devinterp.slt.susceptibilities import compute_susceptibilities, susceptibilities
    from pypattern.devinterp.utils import default_nbeta as dn
    from pypattern.devinterp.utils import evaluate_ce, make_evaluate

    assert (llc, compute_llc, sample, bif, compute_bif) == (
        di.llc,
        di.compute_llc,
        di.sample,
        di.bif,
        di.compute_bif,
    )
    assert (susceptibilities, compute_susceptibilities) == (di.susceptibilities, di.compute_susceptibilities)
    assert elc is estimate_learning_coeff_with_summary and dn is default_nbeta and SGLD_a is SGLD_b is SGLD
    from pypattern.devinterp.optim import SGNHT as SGNHT_a
    from pypattern.devinterp.optim.sgnht import SGNHT as SGNHT_b

    assert SGNHT_a is SGNHT_b is pypattern.sampling.SGNHT
    model, loader = _mlp(), _mlp_loader()
    x, y = next(iter(loader))
    loss, out = evaluate_ce(model, (x, y))
    assert float(loss.detach()) == pytest.approx(float(nn.functional.cross_entropy(model(x), y).detach()))
    a = _v1(model, loader, evaluate=make_evaluate(nn.functional.cross_entropy))
    assert a["llc/mean"] == pytest.approx(_v1(model, loader, evaluate=_ce)["llc/mean"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ weight restrictions


def _rows(n, sl):
    m = torch.zeros(n, dtype=torch.bool)
    m[sl] = True
    return m


def test_v2_create_param_masks_on_a_transformer():
    """devinterp 2.0.1's rule for a TransformerLens-named model ('l{L}h{H}': index H along dim 0 of W_Q, W_K,
    W_V, W_O, b_Q, b_K, b_V; b_O in no head), written out here entry by entry."""
    model = Transformer(
        TransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=24, d_vocab=11, n_ctx=8, seed=0)
    )
    from pypattern.devinterp.slt.weight_restrictions import create_param_masks

    got = create_param_masks(model, "l1h2")
    names = ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"]
    assert sorted(got) == sorted(f"blocks.1.attn.{n}" for n in names)
    params = dict(model.named_parameters())
    for k, m in got.items():
        want = torch.zeros(params[k].shape, dtype=torch.bool)
        want[2] = True
        assert torch.equal(m, want), k
    assert create_param_masks(model, "l1g2").keys() == got.keys()  # MHA: a group is a head
    mlp = create_param_masks(model, "L0 mlp")
    assert set(mlp) == {n for n in params if n.startswith("blocks.0.mlp.")} and set(mlp.values()) == {None}
    assert set(create_param_masks(model, "l0")) == {n for n in params if n.startswith("blocks.0.")}
    assert create_param_masks(model, "embed") == {"embed.W_E": None}
    assert create_param_masks(model, "full") == {n: None for n in params}
    both = create_param_masks(model, ["l1h2", "l1h0", "l0 attn"])
    assert torch.equal(both["blocks.1.attn.W_Q"][:, 0, 0], torch.tensor([True, False, True, False]))
    assert both["blocks.0.attn.W_Q"] is None
    assert create_param_masks(model, "unembed.b_U") == {"unembed.b_U": None}
    for bad, msg in [("l2h0", "layer 2 is out of range"), ("l0h4", "4 is out of range"), ("l0x", "unknown")]:
        with pytest.raises(ValueError, match=msg):
            create_param_masks(model, bad)
    with pytest.raises(ValueError, match="'full' cannot be combined"):
        create_param_masks(model, ["full", "l0"])


def test_v2_create_param_masks_on_hf_models():
    """devinterp 2.0.1's layouts (its _model_structures and _head_masks, written out here): GPT-2's fused c_attn
    (Q | K | V along the output dimension) and c_proj rows; GPT-NeoX's query_key_value rows grouped
    (head, q/k/v, d_head) and dense columns; Llama's q/k/v_proj rows (K/V by the head's key/value head
    ``head * n_kv // n_heads``) and o_proj columns; a group is its query heads with their shared key/value head."""
    transformers = pytest.importorskip("transformers")
    from pypattern.devinterp import create_param_masks

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=2, n_head=4)
    )
    got = create_param_masks(gpt2, "l1h2")
    cols = _rows(48, slice(8, 12)) | _rows(48, slice(24, 28)) | _rows(48, slice(40, 44))
    want = {
        "transformer.h.1.attn.c_attn.weight": cols[None].expand(16, 48),
        "transformer.h.1.attn.c_attn.bias": cols,
        "transformer.h.1.attn.c_proj.weight": _rows(16, slice(8, 12))[:, None].expand(16, 16),
    }
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    neox = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=11, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=20
        )
    )
    got = create_param_masks(neox, "l0h3")
    rows = torch.zeros(4, 3, 4, dtype=torch.bool)
    rows[3] = True
    rows = rows.reshape(-1)
    want = {
        "gpt_neox.layers.0.attention.query_key_value.weight": rows[:, None].expand(48, 16),
        "gpt_neox.layers.0.attention.query_key_value.bias": rows,
        "gpt_neox.layers.0.attention.dense.weight": _rows(16, slice(12, 16))[None].expand(16, 16),
    }
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=11,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    p = "model.layers.1.self_attn."
    for restriction, q, kv in [("l1h3", slice(12, 16), slice(4, 8)), ("l1g0", slice(0, 8), slice(0, 4))]:
        got = create_param_masks(llama, restriction)
        want = {
            p + "q_proj.weight": _rows(16, q)[:, None].expand(16, 16),
            p + "k_proj.weight": _rows(8, kv)[:, None].expand(8, 16),
            p + "v_proj.weight": _rows(8, kv)[:, None].expand(8, 16),
            p + "o_proj.weight": _rows(16, q)[None].expand(16, 16),
        }
        assert sorted(got) == sorted(want), restriction
        for k in want:
            assert torch.equal(got[k], want[k]), (restriction, k)
    attn = create_param_masks(llama, "l0 attn")
    assert set(attn) == {f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkvo"} and set(
        attn.values()
    ) == {None}


def _tied_transformer(tied=True):
    cfg = TransformerConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=11,
        n_ctx=8,
        seed=0,
        tie_word_embeddings=tied,
    )
    return Transformer(cfg)


def _masks_and_warnings(model, restriction):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        masks = di.create_param_masks(model, restriction)
    return masks, [str(w.message) for w in rec if "create_param_masks" in str(w.message)]


def test_create_param_masks_warns_when_unembed_leaves_out_a_tied_weight():
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    tied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    masks, msgs = _masks_and_warnings(tied, "unembed")
    assert masks == {}  # as devinterp: the tied weight is listed under the embedding's name only
    assert len(msgs) == 1
    assert "'unembed'" in msgs[0] and "tied to the embedding" in msgs[0]
    assert "['transformer.wte.weight']" in msgs[0] and "selects nothing" in msgs[0] and "'embed'" in msgs[0]
    # with the embedding in the list the tied weight is selected: nothing to warn about
    masks, msgs = _masks_and_warnings(tied, ["embed", "unembed"])
    assert masks == {"transformer.wte.weight": None} and msgs == []
    untied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, tie_word_embeddings=False))
    masks, msgs = _masks_and_warnings(untied, "unembed")
    assert masks == {"lm_head.weight": None} and msgs == []


def test_create_param_masks_warns_for_a_tied_native_transformer_and_names_what_unembed_selects():
    masks, msgs = _masks_and_warnings(_tied_transformer(), ["unembed", "l0h1"])
    assert "unembed.b_U" in masks and "embed.W_E" not in masks
    assert len(msgs) == 1 and "['embed.W_E']" in msgs[0] and "selects ['unembed.b_U'] only" in msgs[0]
    masks, msgs = _masks_and_warnings(_tied_transformer(tied=False), "unembed")
    assert set(masks) == {"unembed.W_U", "unembed.b_U"} and msgs == []


def test_llc_refusing_empty_param_masks_points_at_a_tied_unembedding():
    ids = torch.randint(0, 11, (8, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"param_masks is empty.*'unembed'.*tied to its embedding.*'embed'"):
        di.llc(
            _tied_transformer(),
            ids,
            param_masks={},
            lr=1e-4,
            n_beta=10.0,
            num_chains=1,
            num_draws=2,
            batch_size=4,
        )


def test_evaluate_that_is_not_callable_and_devinterp2_step_settings_are_named():
    """devinterp 1.x ``evaluate=3`` and devinterp 2.x ``lr="1e-4"`` / ``n_beta=-1`` are refused naming the
    argument as the caller spelled it."""
    from pypattern.devinterp.slt.llc import llc

    with pytest.raises(TypeError, match="evaluate=3 is not callable"):
        _v1(_mlp(), _mlp_loader(), evaluate=3)
    model, ids = _transformer(), _tokens()
    kw = dict(num_chains=1, num_draws=2, batch_size=4, num_init_loss_batches=1, quiet=True)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got '1e-4'"):
        llc(model, ids, lr="1e-4", n_beta=2.0, **kw)
    with pytest.raises(ValueError, match="n_beta must be a finite number > 0, got -1.0"):
        llc(model, ids, lr=1e-4, n_beta=-1.0, **kw)


class _DropoutLM(nn.Module):
    """pypattern's Transformer with dropout on its logits: its train() forward is random."""

    def __init__(self):
        super().__init__()
        self.inner = _transformer()
        self.drop = nn.Dropout(0.3)

    def forward(self, ids, **kw):
        return self.drop(self.inner(ids, **kw))


def test_v2_dropout_model_data_order_numpy_numbers_and_v1_init_loss():
    """devinterp 2.x's sample: a model in train() mode with dropout gives the same L_n(w*) and chains as in eval()
    (both read its eval() forward, L_n(w*) included); shuffle=False with gradient accumulation cycles through
    every batch of batch_size as devinterp does (the remainder of one big batch included); numpy scalars are
    numbers. devinterp 1.x's sample gives its estimators the run's L_n(w*), and
    default_nbeta takes devinterp 2.x's keyword."""
    from pypattern.devinterp.slt.llc import LLCEstimator
    from pypattern.devinterp.slt.sampler import sample as sample_v1

    model, ids = _DropoutLM(), _tokens(40)
    kw = dict(lr=1e-3, n_beta=5.0, num_chains=2, num_draws=4, batch_size=8, quiet=True, init_seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = di.sample(model.train(), ids, {}, **kw)
        ev = di.sample(model.eval(), ids, {}, **kw)
    np.testing.assert_array_equal(train.init_loss.values, ev.init_loss.values)
    np.testing.assert_array_equal(train.sampling_loss.values, ev.sampling_loss.values)
    s = di.sample(
        _transformer(), ids, {}, **{**kw, "lr": np.float32(1e-3), "n_beta": np.float64(5.0)},
        gradient_accumulation_steps=3, shuffle=False, num_burnin_steps=5,
    )  # fmt: skip
    seen = {tuple(r) for r in s.sampling_input_ids_micro.values.reshape(-1, ids.shape[1]).tolist()}
    assert seen == {tuple(r) for r in ids.tolist()}  # 40 sequences, steps of 3 x 8: every one is read
    assert pypattern.default_nbeta(16, gradient_accumulation_steps=2) == pytest.approx(32 / math.log(32))
    tmodel = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    est = LLCEstimator(num_chains=2, num_draws=5, init_loss=None, nbeta=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sample_v1(
            tmodel, loader, [est], evaluate=_ce, sampling_method=SGLD, seed=1, verbose=False, num_chains=2,
            num_draws=5, optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0), init_loss=0.7,
        )  # fmt: skip
    assert est.init_loss == 0.7 and np.isfinite(out["llc/mean"])


def test_v2_a_model_with_dropout_is_warned_of_devinterps_train_mode_in_either_mode():
    """devinterp 2.0.1 reads a model with dropout in train() mode, pypattern in eval() mode: the shim says so for a
    model in either mode, pointing at the caller's line; a model without dropout gets no such warning."""
    ids = _tokens(16)
    kw = dict(lr=1e-3, n_beta=5.0, num_chains=1, num_draws=2, batch_size=8, quiet=True, init_seed=0)
    for model in (_DropoutLM().eval(), _DropoutLM().train()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            di.sample(model, ids, {}, **kw)
        said = [w for w in caught if "devinterp calls model.train()" in str(w.message)]
        assert len(said) == 1 and "drop.p=0.3" in str(said[0].message)
        assert said[0].filename == __file__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        di.sample(_transformer(), ids, {}, **kw)
    assert not [w for w in caught if "devinterp calls model.train()" in str(w.message)]


def test_v1_summary_hands_its_init_loss_to_estimator_callbacks():
    """As devinterp 1.x's sample() does: an LLCEstimator or OnlineLLCEstimator among the callbacks gets the run's
    L_n(w*) (a placeholder init_loss, even None, is replaced), so its keys, merged last, agree with the run's."""
    from pypattern.devinterp.slt.llc import OnlineLLCEstimator

    model, loader = _mlp(), _mlp_loader()
    plain = _v1(model, loader, evaluate=_ce, online=True)
    for placeholder in (0.0, None):
        est = OnlineLLCEstimator(2, 12, init_loss=placeholder, nbeta=10.0)
        out = _v1(model, loader, evaluate=_ce, online=True, callbacks=[est])
        assert out["init_loss"] == pytest.approx(plain["init_loss"], rel=1e-12)
        np.testing.assert_allclose(out["llc/means"], plain["llc/means"], rtol=1e-5, atol=1e-6)


def test_v2_datasets_of_items_holding_input_ids():
    """A torch Dataset or a list whose items are {"input_ids": ...} (devinterp 2.0.1 reads both) gives the same
    run as the token tensor."""
    model, ids = _transformer(), _tokens()
    kw = dict(lr=1e-3, n_beta=5.0, localization=50.0, num_init_loss_batches=2, **SET2)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i]}

    want = di.sample(model, ids, {}, **kw)
    for data in (Items(), [{"input_ids": r} for r in ids]):
        got = di.sample(model, data, {}, **kw)
        np.testing.assert_array_equal(got.init_loss.values, want.init_loss.values)
    with pytest.raises(TypeError, match="items holding 'input_ids'"):
        di.sample(model, [{"tokens": r} for r in ids], {}, **kw)


def test_v1_sampler_module_has_the_names_devinterp_1x_imports_from_it():
    """devinterp 1.x's README imports ``sample, LLCEstimator`` from ``devinterp.slt.sampler``; its module also held
    ``OnlineLLCEstimator``, ``default_nbeta`` and ``SGLD``: the same import from ``pypattern.devinterp.slt.sampler``
    gives pypattern's, and the README's call runs."""
    import pypattern
    from pypattern.devinterp import optim
    from pypattern.devinterp.slt import llc, sampler
    from pypattern.devinterp.slt.sampler import SGLD as SGLD_
    from pypattern.devinterp.slt.sampler import LLCEstimator, default_nbeta, sample

    assert sampler.OnlineLLCEstimator is llc.OnlineLLCEstimator and LLCEstimator is llc.LLCEstimator
    assert SGLD_ is optim.SGLD and default_nbeta is pypattern.default_nbeta
    model, loader = _mlp(), _mlp_loader()
    est = LLCEstimator(num_chains=2, num_draws=12, init_loss=0.5, nbeta=default_nbeta(loader))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample(
            model,
            loader,
            [est],
            evaluate=_ce,
            sampling_method=SGLD_,
            seed=3,
            verbose=False,
            optimizer_kwargs=dict(lr=1e-3, nbeta=default_nbeta(loader), localization=100.0),
            warn_nonstationary=False,
            **FAST,
        )
    out = est.get_results()
    assert np.isfinite(out["llc/mean"]) and out["loss/trace"].shape == (2, 12)


def test_v2_token_ids_outside_the_vocabulary_are_refused_by_name():
    """devinterp 2.x's calls check the dataset's and each observable's token ids against the model's vocabulary
    (as pypattern's own entry points do): a ValueError naming them, not a bare IndexError from the embedding."""
    model, ids = _transformer(), _tokens()
    v = model.cfg.d_vocab
    with pytest.raises(ValueError, match=rf"dataset contains token id {v}; valid ids are 0 \.\. {v - 1}"):
        di.sample(
            model, ids.clamp_max(v - 1).index_fill(1, torch.tensor([3]), v), {}, lr=1e-3, n_beta=5.0, **SET2
        )
    bad = ids[:16].clone()
    bad[:, 1] = -1  # in every sequence: whichever are drawn
    with pytest.raises(ValueError, match=r"observables\['probe'\] contains token id -1"):
        di.sample(model, ids, {"probe": bad}, lr=1e-3, n_beta=5.0, batches_per_draw=1, **SET2)


def test_v1_sample_sets_every_estimators_init_loss_before_any_callback_reads_it():
    """devinterp 1.x's sample() sets L_n(w*) on its LLC estimators before the callbacks run: a callback listed
    before the estimator reads the estimator's init_loss at every draw, the first included."""
    from torch.utils.data import DataLoader, TensorDataset

    from pypattern.devinterp.slt.llc import OnlineLLCEstimator
    from pypattern.devinterp.slt.sampler import sample as v1_sample
    from pypattern.devinterp.utils import evaluate_mse

    torch.manual_seed(0)
    x = torch.randn(64, 5)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32, shuffle=True)
    model = nn.Linear(5, 1)
    est = OnlineLLCEstimator(2, 4, init_loss=None, nbeta=10.0)
    seen = []

    def reader(chain, draw, **kw):
        seen.append(est.init_loss)

    v1_sample(model, loader, [reader, est], evaluate=evaluate_mse, optimizer_kwargs=dict(lr=1e-4, nbeta=10.0),
              num_chains=2, num_draws=4, seed=0, verbose=False)  # fmt: skip
    assert len(seen) == 8 and all(isinstance(v, float) for v in seen) and len(set(seen)) == 1
    assert seen[0] == est.init_loss


@pytest.mark.parametrize("seed", [1.5, "1", True])
def test_v2_sample_refuses_an_init_seed_that_is_not_an_int(seed):
    """devinterp 2.0.1 validates init_seed as an int; a float is not truncated to another run's seed."""
    model, ids = _transformer(), _tokens()
    with pytest.raises(ValueError, match="init_seed must be an int"):
        di.sample(model, ids, {}, lr=1e-3, n_beta=5.0, **{**SET2, "init_seed": seed})


def test_v1_online_estimator_state_is_readable_at_each_draw_as_devinterps():
    """devinterp's trace callbacks (OnlineTraceStatistics(est, "llcs")) read an estimator's float32 tensors
    ``losses`` and ``llcs`` at every draw and copy the entry into their own tensors: the entries of a draw are
    written by then, and equal the finished run's traces."""
    from torch.utils.data import DataLoader, TensorDataset

    from pypattern.devinterp.slt.llc import OnlineLLCEstimator
    from pypattern.devinterp.slt.sampler import sample as v1_sample
    from pypattern.devinterp.utils import evaluate_mse

    torch.manual_seed(0)
    x = torch.randn(64, 5)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32, shuffle=True)
    est = OnlineLLCEstimator(2, 4, init_loss=None, nbeta=10.0)
    assert isinstance(est.llcs, torch.Tensor) and est.llcs.dtype == torch.float32
    copies = {"llcs": torch.zeros(2, 4), "losses": torch.zeros(2, 4)}

    def trace(chain, draw, **kw):  # as devinterp's OnlineTraceStatistics, listed after the estimator
        for name, into in copies.items():
            into[chain, draw] = getattr(est, name)[chain, draw]

    res = v1_sample(nn.Linear(5, 1), loader, [est, trace], evaluate=evaluate_mse,
                    optimizer_kwargs=dict(lr=1e-4, nbeta=10.0), num_chains=2, num_draws=4, seed=0, verbose=False)  # fmt: skip
    del res
    out = est.get_results()
    np.testing.assert_allclose(copies["losses"].numpy(), out["loss/trace"], rtol=0, atol=0)
    np.testing.assert_allclose(copies["llcs"].numpy(), out["llc/trace"], rtol=1e-5, atol=1e-6)
    assert bool((copies["llcs"] != 0).any())
