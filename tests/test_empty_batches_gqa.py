"""Empty batches and empty sequences run through grouped-query attention (the key/value heads' expansion named its
head count from the data, which an empty batch cannot give)."""

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
@pytest.mark.parametrize("kv", [1, 2, 4])
def test_empty_inputs_give_empty_logits_and_caches(shape, kv):
    cfg = TransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=4,
        n_key_value_heads=kv,
        d_mlp=24,
        d_vocab=11,
        n_ctx=8,
        seed=0,
        positional_embedding_type="rotary",
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
    )
    model = Transformer(cfg)
    tokens = torch.zeros(shape, dtype=torch.long)
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (*shape, 11)
    assert cache["blocks.1.attn.hook_z"].shape == (*shape, 4, 4)
    assert cache["blocks.1.attn.hook_k"].shape == (*shape, kv, 4)
    # a non-empty batch's rows are unchanged by the expansion's form (against the heads repeated by hand)
    full = torch.randint(0, 11, (3, 5))
    _, c = model.run_with_cache(full)
    k = c["blocks.0.attn.hook_k"]
    assert torch.equal(model.blocks[0].attn.expand_kv(k), k.repeat_interleave(4 // kv, dim=-2))
