"""LLC estimation on loaders and settings as users give them: a shuffling loader of one dropped-remainder batch
draws a new batch each step; the default nbeta of batches of several sizes warns; the automatic step's bias
larger than the run's standard error warns."""

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pypattern as pp
from pypattern.sampling.llc import _warn_auto_bias
from pypattern.sampling.results import LLCResult, SampleResult

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)


def _run(loader, seen, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)

    def loss_fn(m, batch):
        x, y = batch
        seen.append(float(x.sum()))
        return torch.nn.functional.mse_loss(m(x), y)

    args = dict(num_chains=1, num_draws=6, step_size=1e-4, nbeta=10.0, localization=100.0, quiet=True)
    args.update(kw)
    return pp.estimate_llc(model, loader, loss_fn=loss_fn, batched=False, warn_nonstationary=False, **args)


def test_a_shuffled_single_batch_with_drop_last_draws_a_new_batch_each_step():
    x, y = _data(64)
    seen: list = []
    _run(DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, drop_last=True), seen)
    assert len(set(seen)) > 4  # 14 of 64 samples dropped per epoch, a different subset each step
    whole: list = []
    _run(DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True), whole)
    assert len(set(np.round(whole, 3))) == 1  # one batch of all the data: the same samples every step


def test_default_nbeta_of_batches_of_several_sizes_warns():
    x, y = _data(64)
    batches = [(x[:8], y[:8]), (x[8:40], y[8:40]), (x[40:], y[40:])]
    with pytest.warns(UserWarning, match=r"2 sizes \(8\.\.32\); the default nbeta"):
        _run(batches, [], nbeta=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(batches, [])  # nbeta given: nothing to warn of
        _run([(x[:32], y[:32]), (x[32:], y[32:]), (x[:5], y[:5])], [], nbeta=None)  # a ragged last batch only


def _result(bias, se, mean=None, atol_rel=None):
    s = SampleResult.__new__(SampleResult)
    s.config = {"auto_step": {"chosen": 1e-4, "bias": bias}}
    if atol_rel is not None:
        s.config["auto_step"]["settings"] = {"atol_rel": atol_rel}
    r = LLCResult.__new__(LLCResult)
    r.sample, r.llc_se = s, se
    if mean is not None:
        r.llc_mean = mean
    return r


def test_an_automatic_step_whose_bias_exceeds_the_standard_error_warns():
    with pytest.warns(UserWarning, match=r"discretisation bias \(\+0\.121.*larger than llc_se \(0\.029\)"):
        _warn_auto_bias(_result(0.121, 0.029))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_auto_bias(_result(0.01, 0.029))
        _warn_auto_bias(_result(None, 0.029))
        # within the calibration's relative floor (2% of 18.9 = 0.378): a change it counts as immaterial
        _warn_auto_bias(_result(0.35, 0.056, mean=18.9, atol_rel=0.02))
    with pytest.warns(
        UserWarning, match=r"larger than llc_se \(0\.041\), which does not include it, and than 2% "
    ):
        _warn_auto_bias(_result(0.06, 0.041, mean=0.918, atol_rel=0.02))
