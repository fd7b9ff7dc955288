"""devinterp's ``SGMCMC`` (``from devinterp.optim import SGMCMC``, 1.3 and 2.x) on pypattern: its factories step
as devinterp's update rule says, serve as ``sampling_method`` of the 1.x estimator, and refuse what they do not
record; the callbacks' constructors show devinterp's signature. Where devinterp is installed, the mirrored calls
are checked against its own signatures and its LLC (these tests skip without it)."""

from __future__ import annotations

import importlib
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import pypattern.devinterp as pdi
from pypattern.devinterp.optim import SGLD, SGNHT, RMSpropSGLD
from pypattern.devinterp.slt.sampler import estimate_learning_coeff_with_summary


def _devinterp_version():
    try:
        from importlib.metadata import version

        importlib.import_module("devinterp")
        return tuple(int(p) for p in version("devinterp").split(".")[:2])
    except Exception:  # noqa: BLE001 - not installed, or not importable here
        return None


DEVINTERP = _devinterp_version()
needs_devinterp = pytest.mark.skipif(DEVINTERP is None, reason="devinterp is not installed")


# ------------------------------------------------------------------------------------------------ SGMCMC


def test_sgmcmc_is_importable_from_devinterps_paths():
    from pypattern.devinterp.optim import SGMCMC as a
    from pypattern.devinterp.optim import SamplingMethodLiteral
    from pypattern.devinterp.optim.sgmcmc import SGMCMC as b

    assert a is b is pdi.SGMCMC
    assert set(SamplingMethodLiteral.__args__) == {"sgld", "rmsprop_sgld", "sgnht"}
    assert a.get_method("sgld") == a.sgld
    assert a.get_method("rmsprop_sgld") == a.rmsprop_sgld
    assert a.get_method("sgnht") == a.sgnht
    with pytest.raises(ValueError, match="'sgld', 'rmsprop_sgld', or 'sgnht', got 'adam'"):
        a.get_method("adam")


def _quadratic_steps(opt, w, c, n):
    for _ in range(n):
        opt.zero_grad()
        (c * w**2).sum().backward()
        opt.step()
    return w.detach().clone()


@pytest.mark.parametrize("via", ["factory", "constructor"])
def test_sgmcmc_sgld_steps_by_devinterps_update_rule(via):
    """noise_level=0: w <- w - lr/2 * (nbeta * grad + localization * (w - w0) + weight_decay * w), by hand."""
    from pypattern.devinterp.optim import SGMCMC

    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    c = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    lr, nbeta, loc, wd = 0.05, 4.0, 3.0, 0.2
    w = nn.Parameter(w0.clone())
    make = SGMCMC.sgld if via == "factory" else SGMCMC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make([w], lr=lr, noise_level=0.0, weight_decay=wd, localization=loc, nbeta=nbeta)
    got = _quadratic_steps(opt, w, c, 3)
    ref = w0.clone()
    for _ in range(3):
        ref = ref - lr / 2 * (nbeta * 2 * c * ref + loc * (ref - w0) + wd * ref)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factory", ["sgld", "rmsprop_sgld"])
@pytest.mark.parametrize("name", ["mask", "optimize_over"])
def test_sgmcmc_masks_freeze_their_zero_entries(factory, name):
    """2.x's ``mask`` and 1.3's ``optimize_over``: entries where the mask is 0 do not move (drift nor noise)."""
    from pypattern.devinterp.optim import SGMCMC

    w0 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    w = nn.Parameter(w0.clone())
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    opt = getattr(SGMCMC, factory)([w], lr=0.01, nbeta=10.0, **{name: mask})
    got = _quadratic_steps(opt, w, torch.ones(4), 5)
    assert torch.equal(got[mask == 0], w0[mask == 0])
    assert (got[mask == 1] != w0[mask == 1]).all()
    with pytest.raises(ValueError, match="mask= and optimize_over="):
        getattr(SGMCMC, factory)([w], lr=0.01, nbeta=10.0, mask=mask, optimize_over=mask)


def _task():
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] - x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def _ev(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _summary(model, loader, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_learning_coeff_with_summary(
            model,
            loader,
            evaluate=_ev,
            num_chains=2,
            num_draws=20,
            seed=3,
            verbose=False,
            init_loss=0.5,
            **kw,
        )


@pytest.mark.parametrize(
    "factory, cls, own",
    [
        ("sgld", SGLD, {}),
        ("rmsprop_sgld", RMSpropSGLD, {"alpha": 0.9, "eps": 0.05}),
        ("sgnht", SGNHT, {"diffusion_factor": 0.02}),
    ],
)
def test_sgmcmc_factories_are_sampling_methods_of_the_estimator(factory, cls, own):
    """``sampling_method=SGMCMC.<factory>`` runs the sampler of the same name: the same chains as the class."""
    from pypattern.devinterp.optim import SGMCMC

    model, loader = _task()
    okw = dict(lr=1e-3, nbeta=10.0, **own)
    if factory != "sgnht":  # devinterp's SGNHT takes no localization
        okw["localization"] = 50.0
    a = _summary(model, loader, sampling_method=getattr(SGMCMC, factory), optimizer_kwargs=dict(okw))
    b = _summary(model, loader, sampling_method=cls, optimizer_kwargs=dict(okw))
    np.testing.assert_array_equal(a["loss/trace"], b["loss/trace"])
    assert math.isfinite(a["llc/mean"])


def test_sgmcmc_refuses_what_it_does_not_record_naming_it():
    from pypattern.devinterp.optim import SGMCMC

    w = nn.Parameter(torch.ones(3))
    for factory in ("sgld", "sgnht", "rmsprop_sgld"):
        make = getattr(SGMCMC, factory)
        make([w], lr=1e-3, nbeta=2.0, metrics=[], save_metrics=False, sketch_dim=None, sketch_seed=0)
        for key, value in (("save_metrics", True), ("sketch_dim", 8), ("metrics", ["noise_norm"])):
            with pytest.raises(NotImplementedError, match=rf"SGMCMC\.{factory}\({key}="):
                make([w], lr=1e-3, nbeta=2.0, **{key: value})
    with pytest.raises(NotImplementedError, match="add_grad_correction=True"):
        SGMCMC.rmsprop_sgld([w], lr=1e-3, nbeta=2.0, add_grad_correction=True)
    with pytest.raises(NotImplementedError, match="prior="):
        SGMCMC([w], lr=1e-3, nbeta=2.0, prior="initial")
    with pytest.raises(NotImplementedError, match="preconditioner='rmsprop'"):
        SGMCMC([w], lr=1e-3, nbeta=2.0, preconditioner="rmsprop")


# ------------------------------------------------------------------------------------------------ callbacks


def test_online_estimator_has_devinterps_constructor_signature():
    from pypattern.devinterp.slt.llc import LLCEstimator, OnlineLLCEstimator

    a = inspect.signature(OnlineLLCEstimator)
    assert list(a.parameters) == [
        "num_chains",
        "num_draws",
        "init_loss",
        "device",
        "eval_field",
        "nbeta",
        "temperature",
    ]
    assert a == inspect.signature(LLCEstimator)
    est = OnlineLLCEstimator(2, 3, 0.25, "cpu", "loss", 8.0)  # positionally, as devinterp's
    assert (est.num_chains, est.num_draws, est.init_loss, est.eval_field, est.nbeta) == (
        2,
        3,
        0.25,
        "loss",
        8.0,
    )
    for c in range(2):
        for d in range(3):
            est(chain=c, draw=d, loss=torch.tensor(0.25 + 0.1 * (c + d)))
    r = est.get_results()
    ref = 8.0 * (0.1 * (np.arange(2)[:, None] + np.arange(3)[None, :]))
    np.testing.assert_allclose(r["llc/trace"], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["llc/means"], ref.mean(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ against devinterp


def _params(f):
    return [
        (p.name, p.kind, None if p.default is inspect.Parameter.empty else repr(p.default))
        for p in inspect.signature(f).parameters.values()
    ]


@needs_devinterp
def test_sgmcmc_factories_take_every_argument_of_the_installed_devinterp():
    from devinterp.optim import SGMCMC as theirs

    from pypattern.devinterp.optim import SGMCMC as ours

    for name in ("sgld", "sgnht", "rmsprop_sgld"):
        mine = dict((n, (k, d)) for n, k, d in _params(getattr(ours, name)))
        for n, _kind, default in _params(getattr(theirs, name)):
            assert n in mine, (name, n)
            assert mine[n][1] == default, (name, n, mine[n][1], default)
        # devinterp's positional order up to bounding_box_size (the releases differ after it: 1.3's
        # optimize_over, metrics; 2.x's mask, save_metrics, ...; pypattern takes 1.3's by position, 2.x's by name)
        pos = [
            n for n, k, _ in _params(getattr(theirs, name)) if k is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]
        pos = pos[: pos.index("bounding_box_size") + 1]
        assert [n for n, (k, _) in mine.items()][: len(pos)] == pos, name


@needs_devinterp
@pytest.mark.skipif(DEVINTERP is not None and DEVINTERP < (2, 0), reason="devinterp 2.x's calls")
@pytest.mark.parametrize(
    "module, name",
    [
        ("slt.llc", "compute_llc"),
        ("slt.susceptibilities", "susceptibilities"),
        ("slt.susceptibilities", "compute_susceptibilities"),
        ("slt.bif", "bif"),
        ("slt.bif", "compute_bif"),
        ("slt.weight_restrictions", "create_param_masks"),
    ],
)
def test_v2_calls_have_devinterps_signatures(module, name):
    theirs = getattr(importlib.import_module(f"devinterp.{module}"), name)
    ours = getattr(importlib.import_module(f"pypattern.devinterp.{module}"), name)
    assert _params(ours) == _params(theirs)


@needs_devinterp
@pytest.mark.skipif(DEVINTERP is not None and DEVINTERP < (2, 0), reason="devinterp 2.x's calls")
def test_v2_sample_and_llc_take_devinterps_arguments_in_its_order():
    from devinterp.slt.llc import llc as their_llc
    from devinterp.slt.sampling import sample as their_sample

    # pypattern adds keyword-only quiet/batched after devinterp's arguments, and lets llc's observables default
    assert _params(pdi.sample)[: len(_params(their_sample))] == _params(their_sample)
    theirs = [p for p in _params(their_llc) if p[0] != "observables"]
    assert [p for p in _params(pdi.llc) if p[0] != "observables"] == theirs


@needs_devinterp
@pytest.mark.skipif(DEVINTERP is not None and DEVINTERP < (2, 0), reason="devinterp 2.x's calls")
def test_v2_llc_agrees_with_devinterp_within_standard_errors():
    """One script, two imports: the same model, data, settings and seed; the LLCs agree within their standard
    errors over chains, and both read the same ``init_loss`` (the same batches of the same seeded loader)."""
    datasets = pytest.importorskip("datasets")
    from devinterp.slt.llc import llc as their_llc

    V, T = 8, 6

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(V, 12)
            self.o = nn.Linear(12, V)

        def forward(self, x):
            return self.o(torch.tanh(self.e(x)))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, V, (256, 1), generator=g)
    ids = (start + torch.arange(T)) % V
    model = LM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        out = model(ids)[:, :-1]
        loss = F.cross_entropy(out.reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    kw = dict(
        lr=1e-3,
        n_beta=10.0,
        localization=100.0,
        num_chains=6,
        num_draws=60,
        batch_size=32,
        num_init_loss_batches=4,
        init_seed=5,
        match_sampling_input_ids_across_chains=False,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pdi.llc(model, ds, {}, **kw)
        b = their_llc(model, ds, {}, **kw)
    assert float(a["init_loss"]) == pytest.approx(float(b["init_loss"]), rel=1e-5)
    pa = np.asarray(a["llc_per_chain"].values, dtype=np.float64)
    pb = np.asarray(b["llc_per_chain"].values, dtype=np.float64)
    se = math.sqrt(pa.var(ddof=1) / len(pa) + pb.var(ddof=1) / len(pb))
    assert abs(pa.mean() - pb.mean()) < 4 * se, (pa.mean(), pb.mean(), se)
    assert np.shape(a["loss_trace"].values) == np.shape(b["loss_trace"].values)


# ------------------------------------------------------------------------------------------------ BIF block options


def _lm_and_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8, 8), nn.Linear(8, 8))
    g = torch.Generator().manual_seed(2)
    return model, torch.randint(0, 8, (64, 6), generator=g), torch.randint(0, 8, (16, 6), generator=g)


BIF_KW = dict(
    lr=1e-3, n_beta=5.0, num_chains=2, num_draws=4, batch_size=8, num_init_loss_batches=1, batches_per_draw=2
)


def test_bif_block_options_devinterp_could_not_run_are_refused_by_name():
    """devinterp blocks the BIF computation by ``bif_batch_size`` on ``bif_device`` (``compute_bif``:
    ``batch_size``, ``device``); pypattern's one-block CPU result does not depend on them, and a value devinterp
    could not run with (a block size below 1, a device torch cannot use) is an error, not ignored."""
    model, ids, probe = _lm_and_tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = pdi.sample(model, ids, {"p": probe}, **BIF_KW)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        pdi.compute_bif(samples, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got True"):
        pdi.compute_bif(samples, batch_size=True)
    with pytest.raises(ValueError, match="device='gpu7' is not a torch device"):
        pdi.compute_bif(samples, device="gpu7")
    with pytest.raises(ValueError, match="device='meta'"):
        pdi.compute_bif(samples, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda'.*CUDA"):
            pdi.compute_bif(samples, device="cuda")
    with pytest.raises(ValueError, match="bif_batch_size must be an int >= 1, got -2"):
        pdi.bif(model, ids, {"p": probe}, bif_batch_size=-2, **BIF_KW)
    with pytest.raises(ValueError, match="bif_device='gpu7'"):
        pdi.bif(model, ids, {"p": probe}, bif_device="gpu7", **BIF_KW)
    # valid values leave the result as it is: the Pearson correlations over the pooled draws, by hand
    a = pdi.compute_bif(samples, correlation_method="sequence", batch_size=3, device=torch.device("cpu"))
    x = np.asarray(samples["loss_p"], dtype=np.float64).mean(3).reshape(-1, 16)
    np.testing.assert_allclose(a["influences"], np.corrcoef(x.T), rtol=1e-5, atol=1e-6)
