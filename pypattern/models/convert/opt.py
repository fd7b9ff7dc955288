"""OPT (``OPTForCausalLM``) -> pypattern ``Transformer``.

Learned positions (``embed_positions``, whose first two rows are an offset no unpadded sequence reads: ``W_pos`` is
the table from row 2 on), LayerNorm before the attention (``self_attn_layer_norm``) and before the MLP
(``final_layer_norm`` of each layer), separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` and an MLP ``fc1`` /
``fc2`` (biases per ``enable_bias``), a final LayerNorm, and the unembedding tied to the embedding. The eager
attention takes its softmax in float32. LayerNorms
without parameters (``layer_norm_elementwise_affine=False``) become ``"LNPre"``. The query is scaled before its
product with the keys (the same function; it rounds like the division by ``sqrt(d_head)`` to float64 precision).
Refused by name: post-LayerNorm blocks (``do_layer_norm_before=False``, OPT-350m), a projected embedding
(``word_embed_proj_dim`` other than ``hidden_size``), and a model without its final LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    all_or_none,
    attn_softmax_dtype,
    layer_norm,
    put_attention,
    put_mlp,
    put_unembedding,
    refuse,
    split_qkv,
    standard_scaling,
    unembedding,
)

CLASSES = ("OPTForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of an ``OPTForCausalLM``."""
    c = model.config
    dec = model.model.decoder
    layers = dec.layers
    L = len(layers)
    if L != c.num_hidden_layers:
        refuse("num_hidden_layers", c.num_hidden_layers, f"the model holds {L} layers")
    if not c.do_layer_norm_before:
        refuse("do_layer_norm_before", False, "post-LayerNorm blocks are not converted")
    if dec.project_in is not None or dec.project_out is not None:
        refuse(
            "word_embed_proj_dim",
            c.word_embed_proj_dim,
            f"an embedding projected to hidden_size={c.hidden_size}",
        )
    if dec.final_layer_norm is None:
        refuse("final_layer_norm", None, "a decoder without its final LayerNorm is not converted")
    a0 = layers[0].self_attn
    dh = a0.head_dim
    H = a0.num_heads
    standard_scaling(a0, dh)
    offset = getattr(dec.embed_positions, "offset", 2)
    pos = dec.embed_positions.weight[offset:]
    emb, lm, tied, lm_b = unembedding(model)
    affine = c.layer_norm_elementwise_affine
    norms = [m for layer in layers for m in (layer.self_attn_layer_norm, layer.final_layer_norm)]
    eps = norms[0].eps
    attn_bias = all_or_none(
        [b for m in layers for b in split_qkv(m.self_attn)[3:]], "q/k/v projection biases"
    )
    attn_out_bias = all_or_none([m.self_attn.out_proj.bias for m in layers], "out_proj biases")
    mlp_bias = all_or_none([b for m in layers for b in (m.fc1.bias, m.fc2.bias)], "MLP biases")
    cfg = dict(
        positions_from_mask=True,  # OPT's learned positions count each row's real tokens from the mask
        n_layers=L,
        d_model=c.hidden_size,
        n_heads=H,
        d_head=dh,
        d_mlp=layers[0].fc1.weight.shape[0],
        d_vocab=emb.shape[0],
        n_ctx=pos.shape[0],
        act_fn=act_fn(c.activation_function, "activation_function"),
        normalization_type="LN" if affine else "LNPre",
        positional_embedding_type="standard",
        attn_bias=attn_bias,
        attn_out_bias=attn_out_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),  # eager: softmax in float32
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb, "pos_embed.W_pos": pos}

    def norm(dst: str, mod: nn.Module) -> None:
        if affine:
            layer_norm(w, dst, mod, eps, "layer norm eps")
        elif mod.eps != eps:
            refuse("layer norm eps", mod.eps, f"differs between norms ({eps} elsewhere)")

    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a = layer.self_attn
        if a.head_dim != dh:
            refuse(f"layers[{i}].self_attn.head_dim", a.head_dim, f"differs from layer 0 ({dh})")
        norm(f"{p}.ln1", layer.self_attn_layer_norm)
        norm(f"{p}.ln2", layer.final_layer_norm)
        put_attention(w, p, split_qkv(a), a.out_proj.weight, a.out_proj.bias, H, H, dh)
        put_mlp(w, p, layer.fc1, layer.fc2)
    norm("ln_final", dec.final_layer_norm)
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
