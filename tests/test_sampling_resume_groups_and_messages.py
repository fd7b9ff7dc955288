"""Sampling on models users bring: checkpoints of runs in several groups, errors that name what is wrong."""

from __future__ import annotations

import re
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pypattern as pp
from pypattern.sampling.llc import llc_of_samples


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, generator=g, dtype=dtype)
    y = torch.randn(128, 1, generator=g, dtype=dtype)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def _mlp(dtype=torch.float64):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)


_KW = dict(
    step_size=1e-3,
    nbeta=10.0,
    localization=100.0,
    num_chains=4,
    num_draws=10,
    num_burnin_steps=3,
    num_steps_bw_draws=2,
    quiet=True,
    seed=[5, 6, 7, 8],
    warn_nonstationary=False,
)


class _Interrupt:
    """A callback raising KeyboardInterrupt at its ``at``-th call."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, draw, chain):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def _lag(chain):
    """Holds back the second group of chains (chains 1 and 3 of ``cores=2``), so that the first group writes the
    checkpoint while the second is between its own checkpoint draws."""
    if chain % 2:
        time.sleep(0.004)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
@pytest.mark.parametrize("batched", [False, True])
def test_a_run_in_two_groups_checkpointed_every_few_draws_resumes_bit_for_bit(tmp_path, sampler, batched):
    """With ``cores=2`` the two groups of chains reach their checkpoint draws at different times: every file
    written must hold each unfinished chain's weights at the draw it says the chain has done, so that a run
    stopped by Ctrl-C resumes to the uninterrupted run's draws exactly (the file held later draws than the weights
    it kept: a stale restart point, or a "damaged" file)."""
    model, loader = _mlp(), _data()
    model[2].bias.requires_grad_(False)  # a frozen parameter stays at w*
    whole = pp.sample(model, loader, sampler=sampler, cores=2, batched=batched, **_KW)
    path = str(tmp_path / "run.npz")
    for at in (9, 23, 31):
        if (tmp_path / "run.npz").exists():
            (tmp_path / "run.npz").unlink()
        with pytest.raises(KeyboardInterrupt):
            pp.sample(
                model,
                loader,
                sampler=sampler,
                cores=2,
                batched=batched,
                checkpoint=path,
                checkpoint_every=3,
                callbacks=[_lag, _Interrupt(at)],
                **_KW,
            )
        resumed = pp.sample(
            model,
            loader,
            sampler=sampler,
            cores=2,
            batched=batched,
            checkpoint=path,
            checkpoint_every=3,
            callbacks=[_lag],
            **_KW,
        )
        np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)
    assert not model[2].bias.requires_grad


def test_restrict_to_naming_a_frozen_parameter_is_not_called_a_component_name():
    """A ``restrict_to`` that names only frozen parameters of a plain MLP is refused as frozen; the message does not
    call the parameter's name a component name and point to ``masks=`` (which would be refused for the same
    reason); a component name of pypattern's Transformer still gets that pointer."""
    model, loader = _mlp(), _data()
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen") as info:
        pp.estimate_llc(model, loader, restrict_to="2.weight", **_KW)
    assert "component name" not in str(info.value)
    tf = pp.models.Transformer(
        pp.models.TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=5, n_ctx=4)
    )
    tokens = torch.randint(0, 5, (4, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="component name"):
        pp.estimate_llc(tf, [tokens], restrict_to="blocks.0.attn.head.1", **_KW)


def test_a_lazy_model_and_a_model_with_nothing_to_move_are_named():
    loader = _data(torch.float32)
    with pytest.raises(ValueError, match="model parameter '0.weight' is not initialized yet"):
        pp.estimate_llc(nn.Sequential(nn.LazyLinear(1)), loader, **_KW)
    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="its 2 parameters are all frozen"):
        pp.estimate_llc(frozen, loader, **_KW)
    with pytest.raises(ValueError, match="no parameters at all"):
        pp.estimate_llc(nn.Identity(), loader, **_KW)


def _one_weight_regression():
    """A one-weight least-squares model at its exact minimum ``w*``, full batch (a deterministic gradient):
    ``L(w) - L(w*) = a (w - w*)^2`` with ``a`` the mean of ``x^2``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, generator=g, dtype=torch.float64)
    y = 0.8 * x + 0.3 * torch.randn(256, 1, generator=g, dtype=torch.float64)
    w_star = float(torch.linalg.lstsq(x, y).solution)
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(w_star)
    return model, DataLoader(TensorDataset(x, y), batch_size=256), float((x**2).mean()), w_star


def _euler_llc(a, w_star, nbeta, localization, step, weight_decay=0.0, noise_scale=1.0):
    """``nbeta E[L(w) - L(w*)]`` under the stationary law of SGLD's Euler chain on the quadratic:
    ``w <- w - step/2 (2 a nbeta (w - w*) + localization (w - w*) + weight_decay w) + sqrt(step) noise_scale xi``
    is Gaussian with precision ``p = 2 a nbeta + localization + weight_decay``, mean ``(2 a nbeta + localization)
    w* / p`` and variance ``noise_scale^2 / (p (1 - step p / 4))``."""
    p = 2 * a * nbeta + localization + weight_decay
    mean = (2 * a * nbeta + localization) * w_star / p
    var = noise_scale**2 / (p * (1 - step * p / 4))
    return nbeta * a * (var + (mean - w_star) ** 2)


@pytest.mark.parametrize(
    "weight_decay, noise_scale, localization",
    [(0.0, 1.0, 10.0), (30.0, 1.0, 10.0), (0.0, 0.5, 10.0), (20.0, 0.7, 0.0)],
)
def test_sgld_on_a_quadratic_matches_the_exact_stationary_expectation(
    weight_decay, noise_scale, localization
):
    """The estimate against the closed form of the chain's stationary law (discretisation included), within four
    standard errors, for the hyperparameters that change that law: weight decay and the noise scale."""
    model, loader, a, w_star = _one_weight_regression()
    step, nbeta = 2e-3, 50.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an estimate above d/2 warns (weight decay): checked below
        res = pp.estimate_llc(
            model,
            loader,
            step_size=step,
            nbeta=nbeta,
            localization=localization,
            weight_decay=weight_decay,
            noise_scale=noise_scale,
            num_chains=12,
            num_draws=1200,
            num_burnin_steps=200,
            quiet=True,
            seed=2,
        )
    truth = _euler_llc(a, w_star, nbeta, localization, step, weight_decay, noise_scale)
    assert abs(res.llc_mean - truth) < 4 * res.llc_se, (res.llc_mean, res.llc_se, truth)
    assert res.llc_se < 0.08 * truth  # a test with power


def test_an_estimate_above_half_the_dimension_under_weight_decay_names_weight_decay():
    """Weight decay centres the chains away from ``w*``: an estimate above ``d/2`` (exactly the chain's stationary
    value, so not a discretisation bias) is blamed on ``weight_decay``, not on the step size."""
    model, loader, a, w_star = _one_weight_regression()
    kw = dict(step_size=2e-3, nbeta=50.0, localization=10.0, num_chains=4, num_draws=500, quiet=True, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pp.estimate_llc(model, loader, weight_decay=30.0, num_burnin_steps=300, **kw)
    assert res.llc_mean > 0.5 + 3 * res.llc_se  # above d/2 = 0.5
    assert _euler_llc(a, w_star, 50.0, 10.0, 2e-3, 30.0) > 1.5  # and so is the chain's exact stationary value
    above = [str(w.message) for w in caught if "exceeds d/2" in str(w.message)]
    assert len(above) == 1 and "weight_decay=30" in above[0] and "step size is probably" not in above[0]


@pytest.mark.filterwarnings("ignore:step_size='auto' chose")  # its bias warning: not the subject here
def test_a_calibrated_run_of_one_draw_warns_that_its_burn_in_is_shorter_than_the_calibrations():
    """With ``step_size="auto"`` the default burn-in is as many steps as the draws take: one step for
    ``num_draws=1``, so the single draw comes before the chains relaxed from ``w*`` (0.14 +- 0.22 for a regular
    model of learning coefficient 1, without a warning). The run now warns, naming the burn-in the calibration's
    trial had, which covers at least three relaxation times of the flattest direction (from the Hessian of
    ``nbeta L``); given that burn-in, the estimate finds ``d/2``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = x @ torch.tensor([[1.0], [-1.0]]) + 0.3 * torch.randn(256, 1, generator=g)
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    kw = dict(num_draws=1, num_chains=32, quiet=True, seed=0)
    opts = {"calibration_chains": 4}
    with pytest.warns(
        pp.sampling.NonStationaryWarning, match="num_burnin_steps=1 is shorter than the"
    ) as caught:
        short = pp.sample(model, loader, auto_step_options=opts, **kw)  # the draws' steps: one
    need = int(re.search(r"Give num_burnin_steps=(\d+)", str(caught[0].message)).group(1))
    config = short.config
    early = llc_of_samples(short, model)
    assert early.llc_mean < 1.0 - 2 * early.llc_se  # the draws came too early: short of d/2
    flattest = float(torch.linalg.eigvalsh(2 * x.T.double() @ x.double() / len(x)).min()) * config["nbeta"]
    assert need * config["step_size"] * flattest / 2 >= 3.0
    res = pp.estimate_llc(model, loader, step_size=config["step_size"], num_burnin_steps=need, **kw)
    assert abs(res.llc_mean - 1.0) < 3 * res.llc_se, (res.llc_mean, res.llc_se)
    # estimate_llc's default burn-in ("auto") is at least that burn-in: no warning, and the estimate finds d/2
    with warnings.catch_warnings():
        warnings.simplefilter("error", pp.sampling.NonStationaryWarning)
        ruled = pp.estimate_llc(model, loader, auto_step_options=opts, **kw)
    assert ruled.sample.config["num_burnin_steps"] == need
    assert abs(ruled.llc_mean - 1.0) < 3 * ruled.llc_se, (ruled.llc_mean, ruled.llc_se)


def test_sgld_takes_devinterp_2x_metric_switches_off_and_refuses_them_on():
    from pypattern.devinterp.optim import SGMCMC
    from pypattern.sampling import SGLD
    from pypattern.sampling.samplers import sampler_name

    p = [torch.nn.Parameter(torch.zeros(3))]
    SGLD(p, lr=0.01, save_metrics=False, sketch_dim=None, sketch_seed=5)
    for kw in ({"save_metrics": True}, {"sketch_dim": 8}):
        with pytest.raises(NotImplementedError, match=next(iter(kw))):
            SGLD(p, lr=0.01, **kw)
    assert sampler_name(sampling_method=SGMCMC) == "sgld"
