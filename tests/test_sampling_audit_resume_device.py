"""The device is recorded with a sampler checkpoint as a setting of how the draws are computed (as backend and
batched): every noise value is keyed by (seed, chain, step) on every device, so a run checkpointed on one device
is the same run on another, resumed with a warning naming the device; the resumed draws equal an uninterrupted
run's. Checkpoints are read and rewritten with pypattern.io (no pickle)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pypattern import io
from pypattern.sampling import sample
from pypattern.sampling.checkpoint import CHECKPOINT_KIND

KW = dict(
    num_chains=2,
    num_draws=6,
    step_size=1e-3,
    localization=100.0,
    nbeta=10.0,
    seed=3,
    quiet=True,
    warn_nonstationary=False,
    batched=False,
)


class StopAt(Exception):
    pass


def _setup():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
    return model, [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]


def _mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _interrupted_checkpoint(path, model, loader):
    def stop(draw, chain, **_):
        if chain == 1 and draw == 3:
            raise StopAt

    with pytest.raises(StopAt):
        sample(model, loader, loss_fn=_mse, checkpoint=path, callbacks=[stop], **KW)


def _set_recorded_device(path, device):
    arrays, meta = io.load(path, kind=CHECKPOINT_KIND)
    fp = meta["checkpoint"]["fingerprint"]
    assert fp.get("device") == "cpu", "the checkpoint records the device the chains ran on"
    fp["device"] = device
    io.save(path, arrays, meta, kind=CHECKPOINT_KIND)


def test_a_run_checkpointed_on_another_device_resumes_with_a_warning_naming_it(tmp_path):
    model, loader = _setup()
    whole = sample(model, loader, loss_fn=_mse, **KW)
    path = str(tmp_path / "run.npz")
    _interrupted_checkpoint(path, model, loader)
    arrays, _ = io.load(path, kind=CHECKPOINT_KIND)
    assert np.isnan(arrays["loss_trace"]).any()  # stopped part way
    _set_recorded_device(path, "cuda")
    with pytest.warns(UserWarning, match=r"device='cuda'.*device='cpu'"):
        resumed = sample(model, loader, loss_fn=_mse, checkpoint=path, **KW)
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)


def test_the_same_device_resumes_without_a_warning(tmp_path):
    model, loader = _setup()
    path = str(tmp_path / "run.npz")
    _interrupted_checkpoint(path, model, loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = sample(model, loader, loss_fn=_mse, checkpoint=path, **KW)
    assert np.isfinite(resumed.loss_trace).all()
