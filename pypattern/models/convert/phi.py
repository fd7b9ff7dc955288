"""Phi-1, Phi-1.5 and Phi-2 (``PhiForCausalLM``) -> pypattern ``Transformer``.

Attention and MLP in parallel reading one LayerNorm's output (``input_layernorm``: ``parallel_attn_mlp`` with
``parallel_shared_norm``), separate ``q_proj``/``k_proj``/``v_proj`` and the output projection ``dense``, all with
biases, grouped-query attention when configured, rotary embeddings on the first ``partial_rotary_factor`` of each
head (``rotate_half`` pairing), an MLP ``fc1`` / ``fc2`` with biases, a final LayerNorm and an unembedding with a
bias. The eager attention takes its softmax in float32. Per-head query/key LayerNorms (``qk_layernorm``) are
refused by name.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    attn_softmax_dtype,
    check_rotary_ndims,
    head_shape,
    layer_norm,
    put_attention,
    put_mlp,
    put_unembedding,
    refuse,
    rope,
    rotary_fields,
    sizes,
    split_biases,
    split_qkv,
    standard_scaling,
    unembedding,
)

CLASSES = ("PhiForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``PhiForCausalLM``."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    if getattr(c, "qk_layernorm", False):
        refuse("qk_layernorm", True, "per-head query/key LayerNorms are not converted")
    a0, dh, H, Hkv = head_shape(model)
    standard_scaling(a0, dh)
    base, rotary_dim, freq_dtype, rot_scaling = rope(c, base_model.rotary_emb, dh)
    check_rotary_ndims(c, a0.rotary_ndims, rotary_dim, dh)
    emb, lm, tied, lm_b = unembedding(model)
    attn_bias, attn_out_bias, mlp_bias = split_biases(layers, out="dense", mlp=("fc1", "fc2"))
    eps = layers[0].input_layernorm.eps
    cfg = dict(
        **sizes(c, L, H, Hkv, dh, layers[0].mlp.fc1.weight.shape[0], emb),
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="LN",
        parallel_attn_mlp=True,
        parallel_shared_norm=True,
        **rotary_fields(base, rotary_dim, freq_dtype, rot_scaling),
        attn_bias=attn_bias,
        attn_out_bias=attn_out_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}
    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a, f = layer.self_attn, layer.mlp
        if a.head_dim != dh or a.scaling != a0.scaling or a.rotary_ndims != a0.rotary_ndims:
            refuse(f"layers[{i}].self_attn", (a.head_dim, a.rotary_ndims), "differs from layer 0")
        layer_norm(w, f"{p}.ln1", layer.input_layernorm, eps, "layer_norm_eps")
        put_attention(w, p, split_qkv(a), a.dense.weight, a.dense.bias, H, Hkv, dh)
        put_mlp(w, p, f.fc1, f.fc2)
    layer_norm(w, "ln_final", base_model.final_layernorm, eps, "layer_norm_eps")
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
