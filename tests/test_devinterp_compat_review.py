"""devinterp's public calls on pypattern, as devinterp 1.3.2 and 2.0.1 make them: Hugging Face datasets of every
version, the keywords devinterp 1.x hands its callbacks, its default ``evaluate``, its optimizers' ``step`` and
param-group keys, its result keys, dtypes and dims."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
