"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) -> pypattern ``Transformer``.

``attention.query_key_value`` is one ``nn.Linear`` whose output is laid out per head, ``[h0: q k v, h1: q k v,
...]`` (the model views it as ``(..., n_heads, 3 * d_head)`` and splits the last axis in three). Partial rotary
embeddings (the first ``rotary_pct`` of each head, ``rotate_half`` pairing), LayerNorm, attention and MLP in
parallel (``use_parallel_residual``, the default) or in sequence, biases on every linear map (the attention's
follow ``attention_bias``), no unembedding bias.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    all_or_none,
    attn_softmax_dtype,
    layer_norm,
    put_mlp,
    put_per_head_qkv,
    put_unembedding,
    refuse,
    rope,
    unembedding,
)

CLASSES = ("GPTNeoXForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``GPTNeoXForCausalLM``."""
    c = model.config
    base_model = model.gpt_neox
    layers = base_model.layers
    d, H = c.hidden_size, c.num_attention_heads
    att0 = layers[0].attention
    dh = att0.head_size
    if att0.scaling != dh**-0.5:
        refuse("attention scaling", att0.scaling, f"expected head_size ** -0.5 = {dh**-0.5}")
    ndims = att0.rotary_ndims
    if ndims % 2 and ndims > 1:
        params = getattr(c, "rope_parameters", None) or {}
        refuse(
            "rotary_pct",
            params.get("partial_rotary_factor", getattr(c, "rotary_pct", None)),
            f"it rotates head_size * rotary_pct = {ndims} dimensions, an odd number (the Hugging Face model then "
            f"turns {ndims + 1} dimensions at the frequencies of a {ndims}-dimensional embedding); give a "
            "rotary_pct that makes it even",
        )
    base, rotary_dim, freq_dtype, rot_scaling = rope(c, base_model.rotary_emb, dh)
    # one dimension (head_size * rotary_pct = 1): the model turns 2 dimensions at frequency 1, as rotary_dim=2 does
    if rotary_dim != ndims + ndims % 2:
        refuse("rotary_ndims", ndims, f"differs from the rotary embedding's {rotary_dim} dimensions")
    attn_bias = all_or_none(
        [m.attention.query_key_value.bias for m in layers] + [m.attention.dense.bias for m in layers],
        "attention_bias",
    )
    mlp_bias = all_or_none(
        [m.mlp.dense_h_to_4h.bias for m in layers] + [m.mlp.dense_4h_to_h.bias for m in layers], "mlp biases"
    )
    emb, lm, tied, lm_b = unembedding(model)
    eps = layers[0].input_layernorm.eps
    cfg = dict(
        n_layers=len(layers),
        d_model=d,
        n_heads=H,
        d_head=dh,
        d_mlp=layers[0].mlp.dense_h_to_4h.weight.shape[0],
        d_vocab=emb.shape[0],
        n_ctx=c.max_position_embeddings,
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="LN",
        **(
            # rotary_pct * head_size < 2 leaves no dimension to rotate: the model has no positional information
            dict(positional_embedding_type="none")
            if rotary_dim == 0
            else dict(
                positional_embedding_type="rotary",
                rotary_dim=rotary_dim,
                rotary_base=base,
                rotary_dtype=torch.float32,
                rotary_freq_dtype=freq_dtype,
                rotary_scaling=rot_scaling,
            )
        ),
        parallel_attn_mlp=bool(c.use_parallel_residual),
        attn_bias=attn_bias,
        attn_out_bias=attn_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        # eager_attention_forward: softmax(..., dtype=torch.float32).to(query.dtype)
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}

    def ln(dst: str, mod: nn.LayerNorm) -> None:
        layer_norm(w, dst, mod, eps, "layer_norm_eps")

    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        ln(f"{p}.ln1", layer.input_layernorm)
        ln(f"{p}.ln2", layer.post_attention_layernorm)
        put_per_head_qkv(w, p, layer.attention.query_key_value, layer.attention.dense, H, dh)
        put_mlp(w, p, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h)
    ln("ln_final", base_model.final_layer_norm)
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
