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
    all_or_none,
    attn_softmax_dtype,
    bias_heads,
    linear_heads,
    linear_out_heads,
    refuse,
    rope,
    same_parameter,
)

CLASSES = ("OlmoForCausalLM",)

_EPS = 1e-5  # OlmoLayerNorm's fixed epsilon


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of an ``OlmoForCausalLM``."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    if L != c.num_hidden_layers:
        refuse("num_hidden_layers", c.num_hidden_layers, f"the model holds {L} layers")
    a0 = layers[0].self_attn
    dh = a0.head_dim
    H = a0.q_proj.weight.shape[0] // dh
    Hkv = a0.k_proj.weight.shape[0] // dh
    if a0.scaling != dh**-0.5:
        refuse("attention scaling", a0.scaling, f"expected head_dim ** -0.5 = {dh**-0.5}")
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
    emb = model.get_input_embeddings().weight
    lm = model.get_output_embeddings()
    tied = same_parameter(lm.weight, emb)
    lm_b = getattr(lm, "bias", None)
    attn_bias = all_or_none(
        [getattr(m.self_attn, f"{x}_proj").bias for m in layers for x in "qkv"], "q/k/v projection biases"
    )
    attn_out_bias = all_or_none([m.self_attn.o_proj.bias for m in layers], "o_proj biases")
    mlp_bias = all_or_none(
        [getattr(m.mlp, f"{x}_proj").bias for m in layers for x in ("gate", "up", "down")], "MLP biases"
    )
    clip = getattr(c, "clip_qkv", None)
    cfg = dict(
        n_layers=L,
        d_model=c.hidden_size,
        n_heads=H,
        d_head=dh,
        n_key_value_heads=Hkv,
        d_mlp=layers[0].mlp.up_proj.weight.shape[0],
        d_vocab=emb.shape[0],
        n_ctx=c.max_position_embeddings,
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="LNPre",
        norm_dtype=torch.float32,
        ln_eps=_EPS,
        clip_qkv=None if clip is None else float(clip),
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim,
        rotary_base=base,
        rotary_dtype=torch.float32,
        rotary_freq_dtype=freq_dtype,
        rotary_scaling=rot_scaling,
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
        w[f"{p}.attn.W_Q"] = linear_heads(a.q_proj.weight, H, dh)
        w[f"{p}.attn.W_K"] = linear_heads(a.k_proj.weight, Hkv, dh)
        w[f"{p}.attn.W_V"] = linear_heads(a.v_proj.weight, Hkv, dh)
        w[f"{p}.attn.b_Q"] = bias_heads(a.q_proj.bias, H, dh)
        w[f"{p}.attn.b_K"] = bias_heads(a.k_proj.bias, Hkv, dh)
        w[f"{p}.attn.b_V"] = bias_heads(a.v_proj.bias, Hkv, dh)
        w[f"{p}.attn.W_O"] = linear_out_heads(a.o_proj.weight, H, dh)
        w[f"{p}.attn.b_O"] = a.o_proj.bias
        w[f"{p}.mlp.W_gate"] = f.gate_proj.weight.T
        w[f"{p}.mlp.b_gate"] = f.gate_proj.bias
        w[f"{p}.mlp.W_in"] = f.up_proj.weight.T
        w[f"{p}.mlp.b_in"] = f.up_proj.bias
        w[f"{p}.mlp.W_out"] = f.down_proj.weight.T
        w[f"{p}.mlp.b_out"] = f.down_proj.bias
    if not tied:
        w["unembed.W_U"] = lm.weight.T
    w["unembed.b_U"] = lm_b
    return cfg, w
