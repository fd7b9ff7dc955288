"""Batches of no sample are refused as such, naming the argument; a resumed devinterp-convention run whose
unrestricted row lacks its leave-one-chain-out means says its chi_se omits that run's error."""

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pypattern import io
from pypattern.losses import batch_loss, check_batch
from pypattern.models import Transformer
from pypattern.susceptibility import ROW_KIND, bif, susceptibilities

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 11, 6
SAMPLER = dict(num_chains=1, num_draws=2, num_burnin_steps=0, step_size=1e-4, nbeta=1.0, quiet=True)


def _tf():
    return Transformer(
        n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=V, n_ctx=T, act_fn="gelu", normalization_type="LN",
        seed=0,
    )  # fmt: skip


EMPTY = {
    "tokens": torch.zeros((0, T), dtype=torch.long),
    "dict": {"input_ids": torch.zeros((0, T), dtype=torch.long), "attention_mask": torch.ones((0, T))},
    "pair": (torch.zeros((0, T), dtype=torch.long), torch.zeros((0, T), dtype=torch.long)),
}


@pytest.mark.parametrize("form", list(EMPTY))
def test_a_batch_of_no_sample_is_refused_as_such(form):
    model, batch = _tf(), EMPTY[form]
    with pytest.raises(ValueError, match=r"^probe has no samples \(.*, batch size 0\)"):
        check_batch(model, batch, "probe")
    with pytest.raises(ValueError, match=r"^the batch has no samples \(.*, batch size 0\)"):
        batch_loss(model, batch)


@pytest.mark.parametrize("form", ["tokens", "dict"])
def test_estimators_name_the_argument_that_holds_no_sample(form):
    model, empty = _tf(), EMPTY[form]
    good = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(0))
    comps = ["blocks.0.attn.head.0"]
    with pytest.raises(ValueError, match=r"^probe has no samples \(.*, batch size 0\)"):
        susceptibilities(model, [good], empty, comps, **SAMPLER)
    with pytest.raises(ValueError, match=r"^loader: one of its batches has no samples \(.*, batch size 0\)"):
        susceptibilities(model, [empty], good, comps, **SAMPLER)
    with pytest.raises(ValueError, match=r"^probe has no samples \(.*, batch size 0\)"):
        bif(model, [good], empty, **SAMPLER)


def test_a_batch_with_samples_but_no_counted_token_keeps_its_own_message():
    model = _tf()
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.zeros_like(ids)}
    with pytest.raises(ValueError, match=r"^probe: .* has no counted token"):
        check_batch(model, batch, "probe")


# ---------------------------------------------------------------------------------- unrestricted rows


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(4, generator=g, dtype=torch.float64)).unsqueeze(1) + 0.5
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + 0.3)
    return model, x, y


@pytest.mark.filterwarnings("ignore::pypattern.NonStationaryWarning")
def test_an_unrestricted_row_without_leave_one_out_means_warns(tmp_path):
    """The unrestricted run's row written in the format without ``full_loo``: component rows computed against it
    take the pooled means in every leave-one-chain-out estimate, which a warning says; with the field kept there is
    no warning and the standard error is the full jackknife."""
    model, x, y = _problem()
    kw = dict(
        num_chains=3, num_draws=20, step_size=6e-3, nbeta=10.0, localization=20.0, seed=2, quiet=True,
        convention="devinterp",
    )  # fmt: skip
    args = (model, [(x, y)], (x[:5], y[:5]), {"b": ["weight"]})
    first = susceptibilities(*args, checkpoint=str(tmp_path), **kw)
    files = sorted(os.listdir(tmp_path))
    assert "unrestricted.npz" in files
    # resumed with the field kept: the same numbers, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        same = susceptibilities(*args, checkpoint=str(tmp_path), **kw)
    np.testing.assert_array_equal(same.chi_se, first.chi_se)
    # the unrestricted row rewritten without its leave-one-chain-out means, the component row sampled again
    path = str(tmp_path / "unrestricted.npz")
    arrays, meta = io.load(path, kind=ROW_KIND)
    assert arrays["full_loo"].shape == (3, 5 + 1)
    del arrays["full_loo"]
    io.save(path, arrays, meta, kind=ROW_KIND)
    for f in files:
        if f.startswith("component"):
            os.remove(tmp_path / f)
    with pytest.warns(
        UserWarning, match=r"unrestricted run .* without its leave-one-chain-out means.*\['b'\]"
    ):
        again = susceptibilities(*args, checkpoint=str(tmp_path), **kw)
    np.testing.assert_allclose(again.chi, first.chi, rtol=1e-12, atol=0)
    # and the component row saved then still warns when read back
    with pytest.warns(UserWarning, match=r"unrestricted run .* omits the unrestricted run's error"):
        susceptibilities(*args, checkpoint=str(tmp_path), **kw)
