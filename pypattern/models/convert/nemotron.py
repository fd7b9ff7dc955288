"""Nemotron (``NemotronForCausalLM``: Nemotron-4, Minitron) -> pypattern ``Transformer``.

Separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (biases per ``attention_bias``), grouped-query attention,
rotary embeddings on the first ``partial_rotary_factor`` of each head (half by default; ``rotate_half`` pairing), a
plain MLP ``down_proj(act(up_proj(x)))`` (squared ReLU in the released checkpoints; biases per ``mlp_bias``), and
LayerNorms that multiply by ``1 + w`` (``LayerNorm1P``: torch's fused ``layer_norm`` given ``weight + 1``, with a
bias): ``TransformerConfig.norm_weight_offset=1``. The eager attention takes its softmax in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    attn_softmax_dtype,
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

CLASSES = ("NemotronForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``NemotronForCausalLM``."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    a0, dh, H, Hkv = head_shape(model)
    standard_scaling(a0, dh)
    base, rotary_dim, freq_dtype, rot_scaling = rope(c, base_model.rotary_emb, dh)
    emb, lm, tied, lm_b = unembedding(model)
    attn_bias, attn_out_bias, mlp_bias = split_biases(layers, mlp=("up_proj", "down_proj"))
    eps = base_model.norm.eps
    cfg = dict(
        **sizes(c, L, H, Hkv, dh, layers[0].mlp.up_proj.weight.shape[0], emb),
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="LN",
        norm_weight_offset=1.0,
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

    def norm(dst: str, mod: nn.Module) -> None:
        if type(mod).__name__ != "NemotronLayerNorm1P" or mod.weight is None:
            refuse(
                dst, type(mod).__name__, "expected Nemotron's LayerNorm1P with a weight (x_hat * (1 + w) + b)"
            )
        layer_norm(w, dst, mod, eps, "norm_eps")

    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a = layer.self_attn
        if a.head_dim != dh or a.scaling != a0.scaling:
            refuse(
                f"layers[{i}].self_attn",
                (a.head_dim, a.scaling),
                f"differs from layer 0 ({dh}, {a0.scaling})",
            )
        norm(f"{p}.ln1", layer.input_layernorm)
        norm(f"{p}.ln2", layer.post_attention_layernorm)
        put_attention(w, p, split_qkv(a), a.o_proj.weight, a.o_proj.bias, H, Hkv, dh)
        put_mlp(w, p, layer.mlp.up_proj, layer.mlp.down_proj)
    norm("ln_final", base_model.norm)
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
