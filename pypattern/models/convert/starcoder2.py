"""StarCoder2 (``Starcoder2ForCausalLM``) -> pypattern ``Transformer``.

LayerNorms with biases (``norm_epsilon``), separate ``q_proj``/``k_proj``/``v_proj`` and ``o_proj`` (biases per
``use_bias``), grouped-query attention, rotary embeddings over the whole head, a plain MLP ``c_proj(act(c_fc(x)))``
(biases per ``use_bias``; ``gelu_pytorch_tanh`` in the released checkpoints), a final LayerNorm and, when the
config sets it, ``sliding_window`` attention on every layer (as Mistral's). The eager attention takes its softmax in
float32. Dropouts are identities in ``eval()``.
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

CLASSES = ("Starcoder2ForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``Starcoder2ForCausalLM``."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    a0, dh, H, Hkv = head_shape(model)
    standard_scaling(a0, dh)
    base, rotary_dim, freq_dtype, rot_scaling = rope(c, base_model.rotary_emb, dh)
    if rotary_dim != dh:
        refuse("rotary dimensions", rotary_dim, f"this model rotates the whole head (head_dim={dh})")
    emb, lm, tied, lm_b = unembedding(model)
    attn_bias, attn_out_bias, mlp_bias = split_biases(layers, mlp=("c_fc", "c_proj"))
    eps = base_model.norm.eps
    window = getattr(c, "sliding_window", None)
    cfg = dict(
        **sizes(c, L, H, Hkv, dh, layers[0].mlp.c_fc.weight.shape[0], emb),
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="LN",
        **rotary_fields(base, rotary_dim, freq_dtype, rot_scaling),
        attn_bias=attn_bias,
        attn_out_bias=attn_out_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        sliding_window=window,
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}
    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a = layer.self_attn
        if a.head_dim != dh:
            refuse(f"layers[{i}].self_attn.head_dim", a.head_dim, f"differs from layer 0 ({dh})")
        layer_norm(w, f"{p}.ln1", layer.input_layernorm, eps, "norm_epsilon")
        layer_norm(w, f"{p}.ln2", layer.post_attention_layernorm, eps, "norm_epsilon")
        put_attention(w, p, split_qkv(a), a.o_proj.weight, a.o_proj.bias, H, Hkv, dh)
        put_mlp(w, p, layer.mlp.c_fc, layer.mlp.c_proj)
    layer_norm(w, "ln_final", base_model.norm, eps, "norm_epsilon")
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
