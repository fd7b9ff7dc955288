"""BLOOM (``BloomForCausalLM``) -> pypattern ``Transformer``.

No positional embedding: ALiBi (each head adds ``slope_h * key_position`` to its scores, slopes and products in
float32; ``positional_embedding_type="alibi"``). A LayerNorm on the word embeddings (``post_embedding_ln``),
LayerNorm before attention and MLP, biases on every linear map, the softmax in float32 for every model dtype,
BLOOM's own tanh GELU constant (``act_fn="bloom_gelu"``), tied embeddings without an unembedding bias.
``self_attention.query_key_value`` is one ``nn.Linear`` whose output is laid out per head, ``[h0: q k v, h1: q k
v, ...]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import all_or_none, layer_norm, put_mlp, put_per_head_qkv, put_unembedding, refuse, unembedding

CLASSES = ("BloomForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``BloomForCausalLM``."""
    c = model.config
    if getattr(c, "apply_residual_connection_post_layernorm", False):
        refuse(
            "apply_residual_connection_post_layernorm",
            True,
            "the residual stream then carries each layer's normalised input, which the converted model's blocks "
            "(x + attn(ln(x))) do not compute",
        )
    # pretraining_tp > 1 with slow_but_exact: Hugging Face sums the output projections over weight slices
    # (F.linear without the bias): the same products, and no dense / dense_4h_to_h bias
    sliced = getattr(c, "pretraining_tp", 1) > 1 and bool(getattr(c, "slow_but_exact", False))
    tr = model.transformer
    layers = tr.h
    a0 = layers[0].self_attention
    # the head layout the modules were built with (a config edited afterwards does not change them)
    d, H, dh = c.hidden_size, int(a0.num_heads), int(a0.head_dim)
    if any((int(m.self_attention.num_heads), int(m.self_attention.head_dim)) != (H, dh) for m in layers):
        refuse("n_head", [int(m.self_attention.num_heads) for m in layers], "differs between layers")
    if H * dh != d:
        refuse("n_head", H, f"does not divide hidden_size={d} into heads of {dh}")
    if not math.isclose(a0.inv_norm_factor, dh**-0.5, rel_tol=1e-15) or getattr(a0, "beta", 1.0) != 1.0:
        refuse(
            "attention scaling",
            (a0.inv_norm_factor, getattr(a0, "beta", 1.0)),
            f"expected head_dim ** -0.5 = {dh**-0.5} and an ALiBi weight of 1",
        )
    attn_bias = all_or_none(
        [m.self_attention.query_key_value.bias for m in layers]
        + [m.self_attention.dense.bias for m in layers],
        "attention biases",
    )
    mlp_bias = all_or_none(
        [m.mlp.dense_h_to_4h.bias for m in layers] + [m.mlp.dense_4h_to_h.bias for m in layers], "MLP biases"
    )
    emb, lm, tied, lm_b = unembedding(model)
    eps = tr.word_embeddings_layernorm.eps
    cfg = dict(
        n_layers=len(layers),
        d_model=d,
        n_heads=H,
        d_head=dh,
        d_mlp=layers[0].mlp.dense_h_to_4h.weight.shape[0],
        d_vocab=emb.shape[0],
        n_ctx=getattr(c, "seq_length", None) or 2048,
        act_fn="bloom_gelu",
        normalization_type="LN",
        positional_embedding_type="alibi",
        post_embedding_ln=True,
        attn_bias=attn_bias,
        attn_out_bias=attn_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        # BloomAttention: F.softmax(scores, dim=-1, dtype=torch.float32).to(query dtype), whatever the dtype
        attn_softmax_dtype=torch.float32,
        # BloomModel builds its ALiBi bias from the attention mask: slope * (each key's count of real tokens - 1)
        positions_from_mask=True,
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}

    def ln(dst: str, mod: nn.LayerNorm) -> None:
        layer_norm(w, dst, mod, eps, "layer_norm_epsilon")

    ln("embed.ln", tr.word_embeddings_layernorm)
    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        ln(f"{p}.ln1", layer.input_layernorm)
        ln(f"{p}.ln2", layer.post_attention_layernorm)
        put_per_head_qkv(w, p, layer.self_attention.query_key_value, layer.self_attention.dense, H, dh)
        put_mlp(w, p, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h)
        if sliced:  # Hugging Face's sliced projections leave out dense's and dense_4h_to_h's biases
            for k in (f"{p}.attn.b_O", f"{p}.mlp.b_out"):
                if w[k] is not None:
                    w[k] = torch.zeros_like(w[k])
    ln("ln_final", tr.ln_f)
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
