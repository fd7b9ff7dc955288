"""OnlineLLC's rows against the LLC computed by hand from the loss trace of pypattern.sample at the same weights."""

import copy
import math

import numpy as np
import torch
from torch import nn

from pypattern.sampling import OnlineLLC, sample

KW = dict(num_chains=3, num_draws=12, step_size=1e-3, localization=10.0, nbeta=20.0, seed=5)


def _loader():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 3, generator=g)
    y = x[:, :1] - x[:, 1:2]
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]


def _split_r_hat(x):
    """Split R-hat written from its definition: 2m half chains of n draws, W the mean of their variances, B n times
    the variance of their means."""
    n = x.shape[1] // 2
    halves = [h for row in x for h in (row[:n], row[-n:])]
    means = [float(np.mean(h)) for h in halves]
    w = np.mean([sum((v - np.mean(h)) ** 2 for v in h) / (n - 1) for h in halves])
    grand = np.mean(means)
    b = n * sum((mu - grand) ** 2 for mu in means) / (len(halves) - 1)
    return math.sqrt(((n - 1) / n * w + b / n) / w)


def test_online_rows_equal_the_llc_computed_from_the_trace_at_each_steps_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))
    cb = OnlineLLC(_loader(), steps=[0, 2, 4], quiet=True, warn_nonstationary=False, **KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = {}
    for step in range(5):
        x, y = _loader()[step % 3]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cb.due(step):
            snapshots[step] = copy.deepcopy(model)
        cb(model, step, loss=loss)
    res = cb.result
    assert list(res.step) == [0, 2, 4]
    for i, s in enumerate(res.step):
        d = sample(snapshots[int(s)], _loader(), quiet=True, warn_nonstationary=False, **KW)
        trace = np.asarray(d.loss_trace, dtype=np.float64)
        per_chain = [KW["nbeta"] * (float(np.mean(row)) - d.init_loss) for row in trace]
        mean = sum(per_chain) / len(per_chain)
        std = math.sqrt(sum((v - mean) ** 2 for v in per_chain) / (len(per_chain) - 1))
        se = math.sqrt(std**2 / len(per_chain) + (KW["nbeta"] * d.init_loss_se) ** 2)
        assert abs(res.llc_mean[i] - mean) <= 1e-12 * abs(mean)
        assert abs(res.llc_std[i] - std) <= 1e-10 * std
        assert abs(res.llc_se[i] - se) <= 1e-10 * se
        assert abs(res.r_hat[i] - _split_r_hat(trace)) <= 1e-10
        assert res.init_loss[i] == d.init_loss
    # the three estimates are at three different weights
    assert len(set(res.llc_mean.tolist())) == 3
