"""OLMo (``OlmoForCausalLM``, the first OLMo models) -> pypattern ``Transformer``.

Llama's layout (see :mod:`.llama`: separate projections, rotary embeddings, gated SiLU MLP) with LayerNorms that
have no weight or bias and compute in float32 with epsilon 1e-5 (``normalization_type="LNPre"``), and the query,
key and value projections clamped to ``[-clip_qkv, clip_qkv]`` when the config sets ``clip_qkv``
(``TransformerConfig.clip_qkv``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    attn_softmax_dtype,
    head_shape,
    positive_option,
    put_attention,
    put_gated_mlp,
    put_unembedding,
    refuse,
    rope,
    rotary_fields,
    sizes,
    split_biases,
    split_gated_mlp,
    split_qkv,
    standard_scaling,
    unembedding,
)

CLASSES = ("OlmoForCausalLM",)

_EPS = 1e-5  # OlmoLayerNorm's fixed epsilon


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of an ``OlmoForCausalLM``."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    a0, dh, H, Hkv = head_shape(model)
    standard_scaling(a0, dh)
    for i, layer in enumerate(layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name)
            if list(norm.parameters()) or type(norm).__name__ != "OlmoLayerNorm":
                refuse(
                    f"layers[{i}].{name}", type(norm).__name__, "expected OLMo's LayerNorm without parameters"
                )
    base, rotary_dim, freq_dtype, rot_scaling = rope(c, base_model.rotary_emb, dh)
    if rotary_dim != dh:
        refuse("rotary dimensions", rotary_dim, f"this model rotates the whole head (head_dim={dh})")
    emb, lm, tied, lm_b = unembedding(model)
    attn_bias, attn_out_bias, mlp_bias = split_biases(layers)
    clip = getattr(c, "clip_qkv", None)
    cfg = dict(
        **sizes(c, L, H, Hkv, dh, layers[0].mlp.up_proj.weight.shape[0], emb),
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="LNPre",
        norm_dtype=torch.float32,
        ln_eps=_EPS,
        clip_qkv=None if clip is None else positive_option("clip_qkv", clip, "clip_qkv"),
        **rotary_fields(base, rotary_dim, freq_dtype, rot_scaling),
        gated_mlp=True,
        attn_bias=attn_bias,
        attn_out_bias=attn_out_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}
    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a, f = layer.self_attn, layer.mlp
        if a.head_dim != dh or a.scaling != a0.scaling:
            refuse(
                f"layers[{i}].self_attn",
                (a.head_dim, a.scaling),
                f"differs from layer 0 ({dh}, {a0.scaling})",
            )
        put_attention(w, p, split_qkv(a), a.o_proj.weight, a.o_proj.bias, H, Hkv, dh)
        put_gated_mlp(w, p, split_gated_mlp(f))
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
