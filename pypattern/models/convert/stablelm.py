"""StableLM (``StableLmForCausalLM``) -> pypattern ``Transformer``.

LayerNorms with biases, separate ``q_proj``/``k_proj``/``v_proj`` (biases per ``use_qkv_bias``) and ``o_proj``,
grouped-query attention, rotary embeddings on the first ``partial_rotary_factor`` of each head (``rotate_half``
pairing), a gated SiLU MLP (``gate_proj``, ``up_proj``, ``down_proj``) and a final LayerNorm. With
``use_parallel_residual`` attention and MLP read one LayerNorm (``parallel_shared_norm``; Hugging Face adds
``residual + attention + mlp`` left to right, the converted model ``residual + (attention + mlp)``: the same up to
float rounding), else the MLP reads ``post_attention_layernorm``. The eager attention takes its softmax in float32.
Per-head query/key LayerNorms (``qk_layernorm``) are refused by name.
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

CLASSES = ("StableLmForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``StableLmForCausalLM``."""
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
    parallel = bool(c.use_parallel_residual)
    emb, lm, tied, lm_b = unembedding(model)
    attn_bias, attn_out_bias, mlp_bias = split_biases(layers)
    eps = layers[0].input_layernorm.eps
    cfg = dict(
        **sizes(c, L, H, Hkv, dh, layers[0].mlp.up_proj.weight.shape[0], emb),
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="LN",
        parallel_attn_mlp=parallel,
        parallel_shared_norm=parallel,
        **rotary_fields(base, rotary_dim, freq_dtype, rot_scaling),
        gated_mlp=True,
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
        a = layer.self_attn
        if a.head_dim != dh or a.rotary_ndims != a0.rotary_ndims:
            refuse(f"layers[{i}].self_attn", (a.head_dim, a.rotary_ndims), "differs from layer 0")
        layer_norm(w, f"{p}.ln1", layer.input_layernorm, eps, "layer_norm_eps")
        if not parallel:
            layer_norm(w, f"{p}.ln2", layer.post_attention_layernorm, eps, "layer_norm_eps")
        put_attention(w, p, split_qkv(a), a.o_proj.weight, a.o_proj.bias, H, Hkv, dh)
        put_gated_mlp(w, p, split_gated_mlp(layer.mlp))
    layer_norm(w, "ln_final", base_model.norm, eps, "layer_norm_eps")
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
