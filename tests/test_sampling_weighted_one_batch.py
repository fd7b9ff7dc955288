"""A loader of one batch whose sampler draws (weighted, with replacement) gives a fresh draw every step, as the
same loader with smaller batches does: it is not read once and cached as a fixed batch of every sample."""

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.sampling.data import _one_batch_of_all


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.arange(16.0)[:, None], torch.randn(16, 1, generator=g))


def _batches_seen(loader) -> set:
    seen = set()

    def loss_fn(model, batch):
        x, y = batch
        seen.add(tuple(x[:, 0].tolist()))
        return ((model(x) - y) ** 2).mean()

    model = torch.nn.Linear(1, 1)
    pp.sample(
        model, loader, loss_fn=loss_fn, step_size=1e-4, num_chains=1, num_draws=6, seed=0, batched=False
    )
    return seen


@pytest.mark.filterwarnings("ignore::pypattern.NonStationaryWarning")
def test_a_weighted_one_batch_loader_draws_a_new_batch_each_step():
    ds = _data()
    w = np.linspace(0.1, 1.0, 16)
    whole = pp.reweight(ds, w, batch_size=16)  # one batch per epoch, drawn with replacement by weight
    assert not _one_batch_of_all(whole)
    seen = _batches_seen(whole)
    assert len(seen) > 3, seen  # independent weighted draws of 16 rows from 16 practically never repeat
    # a sampler with replacement given to a plain DataLoader: the same rule
    rs = torch.utils.data.RandomSampler(ds, replacement=True, generator=torch.Generator().manual_seed(1))
    assert not _one_batch_of_all(torch.utils.data.DataLoader(ds, batch_size=16, sampler=rs))
    # a loader without replacement of one batch of every row is read once (every step sees the same rows)
    plain = torch.utils.data.DataLoader(ds, batch_size=16)
    assert _one_batch_of_all(plain)
    assert len(_batches_seen(plain)) == 1
