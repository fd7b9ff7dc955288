"""Resume and devinterp-surface cases: explicit defaults in a susceptibility folder, devinterp 1.x keyword
hyperparameters, BatchNorm buffers left as the caller had them, the 1.x LLCEstimator resumed from a checkpoint,
a non-callable criterion."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp


class _Stop(Exception):
    pass


def _data(n=40):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] > 0).long()


def _mlp(batchnorm=False):
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(4)] if batchnorm else []
    return nn.Sequential(nn.Linear(3, 4), *mid, nn.Tanh(), nn.Linear(4, 2))


def test_susceptibility_folder_takes_defaults_given_explicitly(tmp_path):
    model = _mlp()
    x, y = _data(32)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    probe = (x[:5], y[:5])
    comps = {"first": ["0.weight", "0.bias"], "second": ["2.weight"]}
    kw = dict(num_chains=2, num_draws=10, step_size=1e-3, nbeta=10.0, quiet=True)
    done = pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), **kw)
    for extra in (dict(seed=0), dict(num_burnin_steps=0), dict(localization=0.0), dict(num_steps_bw_draws=1)):
        again = pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), **kw, **extra)
        np.testing.assert_array_equal(np.asarray(again.chi), np.asarray(done.chi))
    with pytest.raises(pp.io.FingerprintMismatch, match="seed"):
        pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), seed=1, **kw)


def test_devinterp_v1_keyword_hyperparameters_are_used():
    model = _mlp()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    ce = nn.functional.cross_entropy
    kw = dict(criterion=ce, num_chains=2, num_draws=20, verbose=False)
    for key, value in (("lr", 1e-3), ("nbeta", 50.0), ("localization", 5.0)):
        top = pp.estimate_learning_coeff(model, loader, **kw, **{key: value})
        inside = pp.estimate_learning_coeff(model, loader, **kw, optimizer_kwargs={key: value})
        assert top == inside, key
    assert pp.estimate_learning_coeff(model, loader, **kw, lr=1e-3) != pp.estimate_learning_coeff(
        model, loader, **kw
    )
    with pytest.raises(ValueError, match="given twice"):
        pp.estimate_learning_coeff(model, loader, **kw, lr=1e-3, optimizer_kwargs={"lr": 1e-2})
    with pytest.raises(TypeError, match="criterion='cross_entropy' is not callable"):
        pp.estimate_learning_coeff(model, loader, criterion="cross_entropy", num_chains=2, num_draws=5)


def test_batchnorm_buffers_are_kept_and_an_interrupted_run_resumes_in_process(tmp_path):
    model = _mlp(batchnorm=True).train()
    x, y = _data()
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    kw = dict(num_chains=2, num_draws=8, step_size=1e-3, nbeta=10.0, localization=10.0, quiet=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = pp.estimate_llc(model, loader, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k

    def stop(draw):
        if draw == 3:
            raise _Stop

    path = str(tmp_path / "run.npz")
    with pytest.raises(_Stop):
        pp.estimate_llc(model, loader, checkpoint=path, callbacks=[stop], **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    resumed = pp.estimate_llc(model, loader, checkpoint=path, **kw)
    np.testing.assert_array_equal(resumed.loss_trace, ref.loss_trace)


def test_devinterp_v1_llc_estimator_resumes_from_a_checkpoint(tmp_path):
    from pypattern.devinterp.slt.llc import LLCEstimator
    from pypattern.devinterp.slt.sampler import sample

    model = _mlp()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    kw = dict(
        evaluate=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=10.0),
        num_chains=2,
        num_draws=10,
        verbose=False,
        init_loss=0.5,
    )

    def killer(chain, draw):
        if draw == 5:
            raise _Stop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sample(model, loader, callbacks=[LLCEstimator(2, 10, init_loss=0.5, nbeta=10.0)], **kw)
        path = str(tmp_path / "run.npz")
        with pytest.raises(_Stop):
            sample(
                model,
                loader,
                callbacks=[LLCEstimator(2, 10, init_loss=0.5, nbeta=10.0), killer],
                checkpoint=path,
                **kw,
            )
        res = sample(
            model, loader, callbacks=[LLCEstimator(2, 10, init_loss=0.5, nbeta=10.0)], checkpoint=path, **kw
        )
    assert res["llc/mean"] == ref["llc/mean"]
    np.testing.assert_array_equal(res["loss/trace"], ref["loss/trace"])
