"""devinterp's public calls on pypattern, as devinterp 1.3.2 and 2.0.1 make them: Hugging Face datasets of every
version, the keywords devinterp 1.x hands its callbacks, its default ``evaluate``, its optimizers' ``step`` and
param-group keys, its result keys, dtypes and dims."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pypattern import devinterp as di
from pypattern.models.transformer import Transformer, TransformerConfig


def _transformer():
    cfg = TransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8, seed=0
    )
    return Transformer(cfg)


def _tokens(n=48, seed=1):
    return torch.randint(0, 11, (n, 8), generator=torch.Generator().manual_seed(seed))


SET2 = dict(num_chains=2, num_draws=3, num_burnin_steps=1, batch_size=8, init_seed=7, num_init_loss_batches=2)


class _HFDataset5:
    """What a Hugging Face ``Dataset`` of ``datasets`` >= 5 does: columns by name, rows by index, and a
    ``ValueError`` (not ``KeyError``) for a column it does not have."""

    def __init__(self, columns):
        self._cols = {k: [list(map(int, r)) for r in v] for k, v in columns.items()}

    @property
    def column_names(self):
        return list(self._cols)

    def __len__(self):
        return len(next(iter(self._cols.values())))

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._cols:
                raise ValueError(f"Column '{key}' doesn't exist.")
            return self._cols[key]
        return {k: v[key] for k, v in self._cols.items()}


class _NoColumnNames(_HFDataset5):
    column_names = None


# ------------------------------------------------------------------------------------------------ datasets >= 5


@pytest.mark.parametrize("cls", [_HFDataset5, _NoColumnNames])
def test_v2_calls_read_a_dataset_whose_missing_column_is_a_value_error(cls):
    model, ids = _transformer(), _tokens()
    ds = cls({"input_ids": ids})
    kw = dict(lr=1e-3, n_beta=5.0, localization=50.0, **SET2)
    want = di.sample(model, ids, {"probe": ids}, **kw)
    got = di.sample(model, ds, {"probe": ds}, **kw)
    np.testing.assert_array_equal(got.init_loss.values, want.init_loss.values)
    np.testing.assert_array_equal(got["loss_probe"], want["loss_probe"])
    assert np.isfinite(float(di.llc(model, ds, {}, **kw)["llc_mean"]))
    sus = di.susceptibilities(
        model,
        ds,
        {"task": ds, "probe": ds},
        {"full": None, "l0": di.create_param_masks(model, "l0")},
        sampling_task="task",
        **kw,
    )
    assert np.asarray(sus["susceptibilities"]["sus"]).shape[1] == 1
    assert np.asarray(di.bif(model, ds, {"probe": ds}, **kw)["influences"]).ndim == 4
    with pytest.raises(TypeError, match="'input_ids' column"):
        di.sample(model, cls({"tokens": ids}), {}, **kw)


# ------------------------------------------------------------------------------------------------ optimizers


def _opt_run(cls, gen_seed, positional=False, **kw):
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    opt = cls(m.parameters(), lr=1e-2, nbeta=5.0, **kw)
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step(g) if positional else opt.step(noise_generator=g)
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("cls", ["SGLD", "SGNHT", "RMSpropSGLD"])
def test_step_takes_devinterps_noise_generator(cls):
    """devinterp's SGLD.step(noise_generator=...): the steps' noise comes from the generator; equal generator
    states give equal trajectories, other states other ones, whatever the optimizer's own seed (which keys only
    SGNHT's initial momenta)."""
    from pypattern.devinterp import optim

    c = getattr(optim, cls)
    a = _opt_run(c, 5, seed=1)
    torch.testing.assert_close(_opt_run(c, 5, seed=1), a, rtol=0, atol=0)
    torch.testing.assert_close(_opt_run(c, 5, positional=True, seed=1), a, rtol=0, atol=0)
    if cls != "SGNHT":
        torch.testing.assert_close(_opt_run(c, 5, seed=2), a, rtol=0, atol=0)
    assert not torch.equal(_opt_run(c, 6, seed=1), a)
    with pytest.raises(TypeError, match="noise_generator must be a torch.Generator"):
        c(nn.Linear(2, 2).parameters(), lr=1e-2).step(noise_generator=3)


@pytest.mark.parametrize("cls", ["SGLD", "SGNHT", "RMSpropSGLD"])
def test_param_groups_answer_devinterps_keys(cls):
    from pypattern.devinterp import optim

    opt = getattr(optim, cls)(nn.Linear(2, 2).parameters(), lr=1e-2, noise_level=0.5, bounding_box_size=2.0)
    g = opt.param_groups[0]
    assert (g["lr"], g["noise_level"], g["bounding_box_size"]) == (1e-2, 0.5, 2.0)
    assert "noise_level" in g and g.get("noise_level") == 0.5
    g["noise_level"] = 0.25
    assert g["noise_scale"] == 0.25 and g["noise_level"] == 0.25
    g["bounding_box"] = 3.0
    assert g["bounding_box_size"] == 3.0
