"""Every saveable result as the public API makes it (not built by hand) survives save -> load field for field:
the load checks a field's type against its annotation, so a value the API puts where the annotation says
otherwise would be refused here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern.sampling.online import OnlineLLC


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    return a == b


def _regression(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.randn(3, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))


def _fitted_linear(x, y):
    """A linear model at its least-squares minimum on ``(x, y)``: the calibration of ``step_size="auto"`` needs
    ``w*`` at a minimum (the random MLP's estimates are negative at every step)."""
    model = nn.Linear(3, 1)
    xa = torch.cat([x, torch.ones(len(x), 1)], 1)
    sol = torch.linalg.lstsq(xa, y).solution
    with torch.no_grad():
        model.weight.copy_(sol[:3].T)
        model.bias.copy_(sol[3])
    return model


KW = dict(
    num_chains=2, num_draws=8, num_burnin_steps=2, step_size=1e-3, nbeta=10.0, localization=10.0, quiet=True
)


def _made():
    x, y = _regression()
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    out = {}
    out["llc_auto"] = pp.estimate_llc(_fitted_linear(x, y), data, **{**KW, "step_size": "auto"})
    out["calibration"] = pp.calibrate_step_size(
        _mlp(), data, step_sizes=(1e-4, 1e-3), **{k: v for k, v in KW.items() if k != "step_size"}
    )
    out["refined"] = pp.refined_llc(_mlp(), data, components={"first": ["0.weight", "0.bias"]}, **KW)
    online = OnlineLLC(data, every=1, **KW)
    model = _mlp()
    for step in range(2):
        online(model, step, loss=0.5)
    out["online"] = online.result
    a, b = torch.randn(30, 4, generator=torch.Generator().manual_seed(1)), torch.randn(30, 5)
    out["similarity_test"] = pp.permutation_test(a, b, "procrustes", num_permutations=5)
    topics = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=12)
    lm = pp.Transformer(topics.model_config(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0))
    spec = pp.FlagSpec("blocks.0.hook_resid_post", dims=(0, 1), num_concepts=2)
    out["flag_train"] = pp.train_flags(lm, topics, spec, stage1_steps=3, stage2_steps=3, log_every=0)
    out["flag_report"] = pp.flag_report(lm, topics, spec, num_samples=16, gen_steps=2)
    chi = pp.susceptibilities(_mlp(), data, (x[:4], y[:4]), {"first": ["0.weight"]}, **KW)
    out["intervention"] = pp.invert(np.asarray(chi.chi), np.array([1.0]))
    return out


MADE = None


@pytest.mark.parametrize(
    "name",
    [
        "llc_auto",
        "calibration",
        "refined",
        "online",
        "similarity_test",
        "flag_train",
        "flag_report",
        "intervention",
    ],
)
def test_api_results_round_trip(name, tmp_path):
    global MADE
    if MADE is None:
        MADE = _made()
    res = MADE[name]
    path = tmp_path / "r.npz"
    res.save(path)
    back = type(res).load(path)
    assert _same(res, back), name
