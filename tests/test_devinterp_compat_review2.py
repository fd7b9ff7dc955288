"""devinterp 1.x's entry points on pypattern, as devinterp users call them: ``seed`` refused when it is not an int
(not truncated), ``init_loss`` as a one-element tensor or array, devinterp's optimizer diagnostic switches
(``metrics=[]`` a no-op, switched on a ``NotImplementedError`` in the estimator as in :class:`SGLD`), and the
``SGMCMC.sgnht`` note in the estimator's docstring."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import pypattern as pp
from pypattern.devinterp.optim import SGLD
from pypattern.devinterp.slt.sampler import (
    LLCEstimator,
    estimate_learning_coeff,
    estimate_learning_coeff_with_summary,
    sample,
)


def _task():
    torch.manual_seed(0)
    x = torch.randn(128, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    return model, loader, x, y


def _ev(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


OKW = dict(lr=1e-3, localization=100.0, nbeta=10.0)
KW = dict(evaluate=_ev, num_chains=2, num_draws=4, verbose=False)


def _llc(model, loader, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = {**KW, "optimizer_kwargs": dict(OKW), **kw}
        return estimate_learning_coeff_with_summary(model, loader, **args)


def _v1_sample(model, loader, **kw):
    est = LLCEstimator(num_chains=2, num_draws=4, init_loss=None, nbeta=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = {**KW, "optimizer_kwargs": dict(OKW), **kw}
        return sample(model, loader, callbacks=[est], **args)


def _estimate(model, loader, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = {**KW, "optimizer_kwargs": dict(OKW), **kw}
        return estimate_learning_coeff(model, loader, **args)


# ------------------------------------------------------------------------------------------------------- seed
@pytest.mark.parametrize(
    "entry", [_llc, _estimate, _v1_sample], ids=["with_summary", "estimate", "v1_sample"]
)
@pytest.mark.parametrize(
    "seed", [1.5, 1.999, 1.0, True, np.bool_(True), "12", b"12", [1.5, 2.7], [1, True], [1, "2"]]
)
def test_seed_not_an_int_is_refused_not_truncated(entry, seed):
    model, loader, _, _ = _task()
    with pytest.raises(TypeError, match=r"seed=.* is not valid; give an int"):
        entry(model, loader, seed=seed)


def test_seed_numpy_integers_and_sequences_are_ints():
    model, loader, _, _ = _task()
    base = _llc(model, loader, seed=3)
    assert _llc(model, loader, seed=np.int64(3))["llc/mean"] == base["llc/mean"]
    listed = _llc(model, loader, seed=[1, 2])
    for other in ((1, 2), [np.int32(1), np.int64(2)], np.array([1, 2])):
        assert _llc(model, loader, seed=other)["llc/mean"] == listed["llc/mean"]
    # the range and the length are still checked (by pypattern.sample)
    with pytest.raises(ValueError, match="seed"):
        _llc(model, loader, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="seed"):
        _llc(model, loader, seed=-1)


# -------------------------------------------------------------------------------------------------- init_loss
def test_init_loss_one_element_tensor_or_array_is_its_number():
    model, loader, x, y = _task()
    with torch.no_grad():
        init = _ev(model, (x, y))  # a 0-d tensor, as devinterp users pass it
    ref = _llc(model, loader, seed=0, init_loss=float(init))
    for v in (init, init.reshape(1), init.numpy(), init.reshape(1).numpy()):
        got = _llc(model, loader, seed=0, init_loss=v)
        assert got["llc/mean"] == ref["llc/mean"]
    # devinterp 1.x's sample() and the native sample() too
    est = _v1_sample(model, loader, seed=0, init_loss=init)
    assert est["llc/mean"] == pytest.approx(ref["llc/mean"])
    native = dict(num_chains=2, num_draws=4, step_size=1e-3, nbeta=10.0, quiet=True, seed=0, loss_fn=_ev)
    a = pp.sample(model, loader, init_loss=float(init), **native)
    b = pp.sample(model, loader, init_loss=init, **native)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    assert b.init_loss == a.init_loss


@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(2),
        np.ones(2),
        torch.tensor(float("nan")),
        np.array(float("inf")),
        torch.tensor(True),
        torch.tensor(1 + 1j),
        np.array(["0.5"]),
        "0.5",
    ],
    ids=["tensor2", "array2", "nan_tensor", "inf_array", "bool_tensor", "complex_tensor", "str_array", "str"],
)
def test_init_loss_not_one_number_is_refused_by_name(bad):
    model, loader, _, _ = _task()
    with pytest.raises(ValueError, match="init_loss must be a finite number or None"):
        _llc(model, loader, seed=0, init_loss=bad)
    with pytest.raises(ValueError, match="init_loss must be a finite number or None"):
        pp.sample(
            model, loader, loss_fn=_ev, num_chains=2, num_draws=2, step_size=1e-3, quiet=True, init_loss=bad
        )


# ---------------------------------------------------------------------------- devinterp's diagnostic switches
SWITCHES = ("save_noise", "save_mala_vars", "noise_norm", "grad_norm", "weight_norm", "distance")


def test_diagnostic_switches_off_are_no_ops_in_estimator_and_optimizer():
    model, loader, _, _ = _task()
    ref = _llc(model, loader, seed=0)["llc/mean"]
    for extra in (
        dict(metrics=[]),
        dict(metrics=None),
        {k: False for k in SWITCHES},
        dict(metrics=(), save_noise=False, save_mala_vars=False),
    ):
        okw = {**OKW, **extra}
        given = dict(okw)
        assert _llc(model, loader, seed=0, optimizer_kwargs=okw)["llc/mean"] == ref, extra
        assert okw == given  # the caller's dict is not changed
        SGLD(model.parameters(), **okw)
    # devinterp 1.3.2's sample() writes metrics=[] into the caller's optimizer_kwargs: a dict reused after a
    # devinterp call runs on pypattern's 1.x sample() and the native sample() too
    _v1_sample(model, loader, seed=0, optimizer_kwargs={**OKW, "metrics": []})
    res = pp.sample(
        model,
        loader,
        loss_fn=_ev,
        num_chains=2,
        num_draws=2,
        quiet=True,
        optimizer_kwargs={**OKW, "metrics": []},
    )
    assert "metrics" not in res.config


@pytest.mark.parametrize(
    "extra",
    [dict(metrics=["grad_norm"]), *({k: True} for k in SWITCHES)],
    ids=["metrics", *SWITCHES],
)
def test_diagnostic_switches_on_raise_not_implemented_naming_them(extra):
    model, loader, _, _ = _task()
    (key,) = extra
    okw = {**OKW, **extra}
    with pytest.raises(NotImplementedError, match=rf"{key}=.*not recorded"):
        _llc(model, loader, seed=0, optimizer_kwargs=okw)
    with pytest.raises(NotImplementedError, match=rf"{key}=.*not recorded"):
        _v1_sample(model, loader, seed=0, optimizer_kwargs=okw)
    with pytest.raises(NotImplementedError, match=rf"{key}=.*not recorded"):
        SGLD(model.parameters(), **okw)
    with pytest.raises(NotImplementedError, match=rf"{key}=.*not recorded"):
        pp.sample(model, loader, loss_fn=_ev, num_chains=2, num_draws=2, quiet=True, optimizer_kwargs=okw)


# --------------------------------------------------------------------------------------------- SGMCMC.sgnht
def test_sgmcmc_sgnht_mapping_documented():
    doc = " ".join(estimate_learning_coeff_with_summary.__doc__.split())
    assert "``SGMCMC.sgnht`` (whose chains barely move" in doc
    assert "matches devinterp's ``SGNHT`` class" in doc

    def sgnht():  # devinterp 1.3.2's SGMCMC.sgnht factory, by its __name__
        pass

    from pypattern.sampling.samplers import sampler_name

    assert sampler_name(sampling_method=sgnht) == "sgnht"


@pytest.mark.parametrize("cls", ["SGLD", "SGNHT", "RMSpropSGLD"])
def test_every_sampler_class_takes_devinterps_diagnostic_switches_by_one_rule(cls):
    """devinterp 1.3.2's SGNHT takes the same switches as its SGLD: pypattern's three samplers accept them off
    (a dict a devinterp call left ``metrics=[]`` in) and refuse them on, by name."""
    import pypattern.sampling as S

    Sampler = getattr(S, cls)
    w = torch.nn.Parameter(torch.ones(3))
    off = dict(save_noise=False, save_mala_vars=False, noise_norm=False, metrics=[], distance=False)
    Sampler([w], step_size=1e-3, nbeta=1.0, **off)
    for key, value in (("save_noise", True), ("metrics", ["noise_norm"]), ("grad_norm", True)):
        with pytest.raises(NotImplementedError, match=f"{cls}\\({key}="):
            Sampler([w], step_size=1e-3, nbeta=1.0, **{key: value})


def test_the_devinterp_names_are_reachable_from_the_top_level_package():
    import subprocess
    import sys

    # a fresh interpreter: only `import pypattern`, as a user types pp.devinterp.llc
    code = "import pypattern as pp; print(pp.devinterp.llc.__module__, pp.devinterp.default_nbeta.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["pypattern.devinterp", "default_nbeta"]
