"""Hook points as TransformerLens users write hooks: activations edited in place, lists of hook names."""

import pytest
import torch


@pytest.mark.parametrize("normalization_type", ["LN", "LNPre", "RMS", "RMSPre"])
def test_a_scale_edited_in_place_counts_as_a_replaced_one(normalization_type):
    """TransformerLens' usual style, editing an activation in place and returning None, works on ``hook_scale``
    as a returned tensor does (LayerNorm, LNPre and RMSNorm used to keep their own scale when the hook handed back
    the same tensor); a hook that only reads it leaves the run bit-identical to a plain one."""
    from pypattern.models import Transformer, TransformerConfig

    cfg = TransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=11, n_ctx=6, seed=0, dtype=torch.float64,
        normalization_type=normalization_type,
    )  # fmt: skip
    model = Transformer(cfg)
    x = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    plain = model(x)
    name = "blocks.0.ln1.hook_scale"

    def in_place(s, hook):
        s.mul_(2.0)

    def returned(s, hook):
        return s * 2.0

    def read(s, hook):
        read.seen = s.clone()

    a = model.run_with_hooks(x, fwd_hooks=[(name, in_place)])
    b = model.run_with_hooks(x, fwd_hooks=[(name, returned)])
    c = model.run_with_hooks(x, fwd_hooks=[(name, read)])
    assert (a - plain).abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(c, plain)


def test_a_list_of_hook_names_with_an_unknown_one_is_refused():
    """A typo inside a list of names (fwd_hooks, names_filter) raises as a single misspelt name does, instead of
    attaching nothing there."""
    from pypattern.models import Transformer, TransformerConfig

    model = Transformer(TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=7, n_ctx=4, seed=0))
    x = torch.randint(0, 7, (1, 4))
    with pytest.raises(KeyError, match=r"hook names \['blocks.0.attn.hook_zz'\] not found"):
        model.run_with_hooks(
            x, fwd_hooks=[(["blocks.0.attn.hook_z", "blocks.0.attn.hook_zz"], lambda a, hook: a)]
        )
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pree"):
        model.run_with_cache(x, names_filter=["blocks.0.hook_resid_pree"])
    assert not any(hp.active for hp in model.hook_dict.values())  # nothing left attached
    _, cache = model.run_with_cache(x, names_filter=["blocks.0.hook_resid_pre"])
    assert list(cache) == ["blocks.0.hook_resid_pre"]
