"""attribution_patching's default sites fit the model: an attention-only model (no MLP output) gets the other
three, each equal to the call naming it; naming mlp_out on it is still refused by name."""

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, attribution_patching


def _case(attn_only):
    cfg = TransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_mlp=None if attn_only else 32,
        d_vocab=20,
        n_ctx=8,
        seed=0,
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 20, (3, 5), generator=g), torch.randint(0, 20, (3, 5), generator=g)
    return Transformer(cfg), clean, corr, LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


@pytest.mark.parametrize("attn_only", [True, False])
def test_default_sites_fit_the_model(attn_only):
    model, clean, corr, metric = _case(attn_only)
    res = attribution_patching(model, clean, corr, metric=metric)
    want = ["resid_pre", "attn_out", "z"] if attn_only else ["resid_pre", "attn_out", "mlp_out", "z"]
    assert sorted(res) == sorted(want)
    for site in want:
        alone = attribution_patching(model, clean, corr, metric=metric, sites=[site])[site]
        assert torch.equal(res[site].values, alone.values)


def test_mlp_out_named_on_an_attention_only_model_is_refused():
    model, clean, corr, metric = _case(True)
    with pytest.raises(ValueError, match="mlp_out"):
        attribution_patching(model, clean, corr, metric=metric, sites=["mlp_out"])
