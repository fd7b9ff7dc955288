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
    all_or_none,
    attn_softmax_dtype,
    bias_heads,
    layer_norm,
    linear_heads,
    linear_out_heads,
    refuse,
    rope,
    same_parameter,
)

CLASSES = ("PhiForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``PhiForCausalLM``."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    if L != c.num_hidden_layers:
        refuse("num_hidden_layers", c.num_hidden_layers, f"the model holds {L} layers")
    if getattr(c, "qk_layernorm", False):
        refuse("qk_layernorm", True, "per-head query/key LayerNorms are not converted")
    a0 = layers[0].self_attn
    dh = a0.head_dim
    H = a0.q_proj.weight.shape[0] // dh
    Hkv = a0.k_proj.weight.shape[0] // dh
    if a0.scaling != dh**-0.5:
        refuse("attention scaling", a0.scaling, f"expected head_dim ** -0.5 = {dh**-0.5}")
    base, rotary_dim, freq_dtype, rot_scaling = rope(c, base_model.rotary_emb, dh)
    if rotary_dim != a0.rotary_ndims:
        refuse("rotary dimensions", a0.rotary_ndims, f"the rotary embedding has {rotary_dim} frequencies x 2")
    emb = model.get_input_embeddings().weight
    lm = model.get_output_embeddings()
    tied = same_parameter(lm.weight, emb)
    lm_b = getattr(lm, "bias", None)
    attn_bias = all_or_none(
        [getattr(m.self_attn, f"{x}_proj").bias for m in layers for x in "qkv"], "q/k/v projection biases"
    )
    attn_out_bias = all_or_none([m.self_attn.dense.bias for m in layers], "dense biases")
    mlp_bias = all_or_none([b for m in layers for b in (m.mlp.fc1.bias, m.mlp.fc2.bias)], "MLP biases")
    eps = layers[0].input_layernorm.eps
    cfg = dict(
        n_layers=L,
        d_model=c.hidden_size,
        n_heads=H,
        d_head=dh,
        n_key_value_heads=Hkv,
        d_mlp=layers[0].mlp.fc1.weight.shape[0],
        d_vocab=emb.shape[0],
        n_ctx=c.max_position_embeddings,
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="LN",
        parallel_attn_mlp=True,
        parallel_shared_norm=True,
        positional_embedding_type="rotary" if rotary_dim else "none",
        rotary_dim=rotary_dim or None,
        rotary_base=base,
        rotary_dtype=torch.float32,
        rotary_freq_dtype=freq_dtype,
        rotary_scaling=rot_scaling,
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
        w[f"{p}.attn.W_Q"] = linear_heads(a.q_proj.weight, H, dh)
        w[f"{p}.attn.W_K"] = linear_heads(a.k_proj.weight, Hkv, dh)
        w[f"{p}.attn.W_V"] = linear_heads(a.v_proj.weight, Hkv, dh)
        w[f"{p}.attn.b_Q"] = bias_heads(a.q_proj.bias, H, dh)
        w[f"{p}.attn.b_K"] = bias_heads(a.k_proj.bias, Hkv, dh)
        w[f"{p}.attn.b_V"] = bias_heads(a.v_proj.bias, Hkv, dh)
        w[f"{p}.attn.W_O"] = linear_out_heads(a.dense.weight, H, dh)
        w[f"{p}.attn.b_O"] = a.dense.bias
        w[f"{p}.mlp.W_in"] = f.fc1.weight.T
        w[f"{p}.mlp.b_in"] = f.fc1.bias
        w[f"{p}.mlp.W_out"] = f.fc2.weight.T
        w[f"{p}.mlp.b_out"] = f.fc2.bias
    layer_norm(w, "ln_final", base_model.final_layernorm, eps, "layer_norm_eps")
    if not tied:
        w["unembed.W_U"] = lm.weight.T
    w["unembed.b_U"] = lm_b
    return cfg, w
