"""Falcon (``FalconForCausalLM``) -> pypattern ``Transformer``.

``self_attention.query_key_value`` is one linear map whose output rows come in one of three layouts: with
``new_decoder_architecture`` (Falcon-40B/180B) grouped per key/value head, ``[g0: its queries, its key, its value,
g1: ...]``; with ``multi_query`` (Falcon-7B) all queries, then the one key and value head; otherwise per head,
``[h0: q k v, h1: q k v, ...]``. Rotary embeddings over the whole head (``rotate_half`` pairing), LayerNorms,
biases on the linear maps when ``bias`` is set, GELU MLPs. Blocks are sequential (``parallel_attn=False``), or
attention and MLP in parallel reading one LayerNorm (``parallel_attn``, or ``num_ln_in_parallel_attn=1``) or two
(``ln_attn`` and ``ln_mlp``, the new decoder architecture's default). ALiBi models (the Falcon-RW checkpoints)
scale the bias with the scores, which pypattern's ALiBi does not: they are refused.
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
    rope,
    standard_scaling,
    unembedding,
)

CLASSES = ("FalconForCausalLM",)


def _split(a: nn.Module, layout: str, H: int, Hkv: int, dh: int) -> tuple:
    """``(W_q, W_k, W_v, b_q, b_k, b_v)`` (``nn.Linear`` layouts) from the fused ``query_key_value``."""
    W, b = a.query_key_value.weight, a.query_key_value.bias
    d_in = W.shape[1]
    if layout == "grouped":
        G = H // Hkv
        Wg = W.reshape(Hkv, G + 2, dh, d_in)
        parts = [
            Wg[:, :G].reshape(H * dh, d_in),
            Wg[:, G].reshape(Hkv * dh, d_in),
            Wg[:, G + 1].reshape(-1, d_in),
        ]
        bg = None if b is None else b.reshape(Hkv, G + 2, dh)
        biases = (
            [None] * 3
            if b is None
            else [bg[:, :G].reshape(-1), bg[:, G].reshape(-1), bg[:, G + 1].reshape(-1)]
        )
    elif layout == "multi_query":
        parts = list(W.split([H * dh, dh, dh], 0))
        biases = [None] * 3 if b is None else list(b.split([H * dh, dh, dh], 0))
    else:  # per head: (H, 3, dh)
        Wh = W.reshape(H, 3, dh, d_in)
        parts = [Wh[:, j].reshape(H * dh, d_in) for j in range(3)]
        biases = [None] * 3 if b is None else [b.reshape(H, 3, dh)[:, j].reshape(-1) for j in range(3)]
    return (*parts, *biases)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``FalconForCausalLM``."""
    c = model.config
    tr = model.transformer
    layers = tr.h
    if len(layers) != c.num_hidden_layers:
        refuse("num_hidden_layers", c.num_hidden_layers, f"the model holds {len(layers)} layers")
    if getattr(c, "alibi", False):
        refuse(
            "alibi",
            True,
            "Falcon multiplies its ALiBi bias by the attention scale together with the scores; pypattern's ALiBi "
            "(BLOOM's) adds it unscaled",
        )
    a0 = layers[0].self_attention
    d, H, dh = c.hidden_size, a0.num_heads, a0.head_dim
    new_arch = bool(c.new_decoder_architecture)
    if new_arch:
        layout, Hkv = "grouped", a0.num_kv_heads
        if not c.parallel_attn:
            refuse("parallel_attn", False, "with new_decoder_architecture the block is parallel")
    elif c.multi_query:
        layout, Hkv = "multi_query", 1
    else:
        layout, Hkv = "per_head", H
        if a0.num_kv_heads != H:
            refuse("num_kv_heads", a0.num_kv_heads, f"with neither multi_query nor the new decoder architecture "
                   f"every head has its own key and value ({H})")  # fmt: skip
    if H % Hkv:
        refuse("num_kv_heads", Hkv, f"it does not divide num_attention_heads={H}")
    standard_scaling(a0, dh, rel_tol=1e-12)  # 1 / sqrt(head_dim): one ulp from head_dim ** -0.5
    base, rotary_dim, freq_dtype, rot_scaling = rope(c, tr.rotary_emb, dh)
    if rotary_dim != dh:
        refuse("rotary dimensions", rotary_dim, f"Falcon rotates whole heads (head_dim={dh})")
    bias = all_or_none(
        [m.self_attention.query_key_value.bias for m in layers]
        + [m.self_attention.dense.bias for m in layers]
        + [m.mlp.dense_h_to_4h.bias for m in layers]
        + [m.mlp.dense_4h_to_h.bias for m in layers],
        "bias",
    )
    parallel = bool(new_arch or c.parallel_attn)
    n_ln = getattr(c, "num_ln_in_parallel_attn", None)
    # Hugging Face's parallel block reads one LayerNorm (num_ln_in_parallel_attn=1; the old architecture's None) or,
    # in the new architecture only, two; its forward fails on any other count (the old architecture's blocks are
    # built with ln_attn / ln_mlp for 2 and read input_layernorm; the new one's leave the MLP's input unset for 3)
    allowed = (1, 2) if new_arch else (None, 1)
    if parallel and n_ln not in allowed:
        refuse(
            "num_ln_in_parallel_attn",
            n_ln,
            f"Hugging Face's Falcon block {'with' if new_arch else 'without'} new_decoder_architecture computes "
            f"only {' or '.join(map(str, allowed))} (its own forward fails on this value)",
        )
    two_norms = new_arch and n_ln == 2
    emb, lm, tied, lm_b = unembedding(model)
    eps = c.layer_norm_epsilon
    cfg = dict(
        n_layers=len(layers),
        d_model=d,
        n_heads=H,
        d_head=dh,
        n_key_value_heads=Hkv,
        d_mlp=layers[0].mlp.dense_h_to_4h.weight.shape[0],
        d_vocab=emb.shape[0],
        n_ctx=c.max_position_embeddings,
        act_fn=act_fn(c.activation, "activation"),
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim,
        rotary_base=base,
        rotary_dtype=torch.float32,
        rotary_freq_dtype=freq_dtype,
        rotary_scaling=rot_scaling,
        parallel_attn_mlp=parallel,
        parallel_shared_norm=parallel and not two_norms,
        attn_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        # the eager attention multiplies the scores by this number (a division by sqrt(head_dim) rounds otherwise)
        attn_scores_multiplier=None if a0.scaling == dh**-0.5 else float(a0.scaling),
        # eager_attention_forward: softmax(..., dtype=torch.float32).to(query.dtype)
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}

    def ln(dst: str, mod: nn.LayerNorm) -> None:
        layer_norm(w, dst, mod, eps, "layer_norm_epsilon")

    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        if two_norms:
            ln(f"{p}.ln1", layer.ln_attn)
            ln(f"{p}.ln2", layer.ln_mlp)
        else:
            ln(f"{p}.ln1", layer.input_layernorm)
            if not parallel:
                ln(f"{p}.ln2", layer.post_attention_layernorm)
        att = layer.self_attention
        put_attention(w, p, _split(att, layout, H, Hkv, dh), att.dense.weight, att.dense.bias, H, Hkv, dh)
        put_mlp(w, p, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h)
    ln("ln_final", tr.ln_f)
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
