"""GPT-BigCode (``GPTBigCodeForCausalLM``: SantaCoder, StarCoder 1) -> pypattern ``Transformer``.

GPT-2's block (LayerNorms, learned absolute positions, every bias, a plain MLP ``c_proj(act(c_fc(x)))``; embeddings
usually tied) with ``nn.Linear`` weights ``(out, in)`` and its own fused ``c_attn``: with ``multi_query`` the
output is ``[queries (n_heads * d_head), the one key head (d_head), the one value head (d_head)]``; without it,
head ``h``'s block ``[q_h, k_h, v_h]`` of ``3 * d_head`` entries, head after head. The scores are ``q . k *
scaling`` (``d_head ** -0.5``, or 1 without ``scale_attn_weights``: ``attn_scores_multiplier``) and the eager
attention takes its softmax in float32. Cross-attention is refused by name.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    attn_softmax_dtype,
    layer_norm,
    put_mlp,
    put_per_head_qkv,
    put_unembedding,
    refuse,
    same_parameter,
)

CLASSES = ("GPTBigCodeForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``GPTBigCodeForCausalLM``."""
    c = model.config
    if getattr(c, "add_cross_attention", False):
        refuse("add_cross_attention", c.add_cross_attention, "cross-attention layers are not converted")
    tr = model.transformer
    blocks = tr.h
    a0 = blocks[0].attn
    # the head layout the modules were built with (a config edited afterwards does not change them)
    d, H, dh, mq = c.n_embd, int(a0.num_heads), int(a0.head_dim), bool(a0.multi_query)
    layout = [(int(b.attn.num_heads), int(b.attn.head_dim), bool(b.attn.multi_query)) for b in blocks]
    if any(x != (H, dh, mq) for x in layout):
        refuse("n_head / multi_query", layout, "differ between layers")
    if H * dh != d:
        refuse("n_head", H, f"does not divide n_embd={d} into heads of {dh}")
    Hkv = 1 if mq else H
    scaling = float(a0.scaling)
    if any(float(b.attn.scaling) != scaling for b in blocks):
        refuse("attention scaling", [b.attn.scaling for b in blocks], "differs between layers")
    lm_w = model.lm_head.weight
    tied = same_parameter(lm_w, tr.wte.weight)
    eps = blocks[0].ln_1.eps
    cfg = dict(
        n_layers=len(blocks),
        d_model=d,
        n_heads=H,
        d_head=dh,
        n_key_value_heads=Hkv,
        d_mlp=blocks[0].mlp.c_fc.weight.shape[0],
        d_vocab=tr.wte.weight.shape[0],
        n_ctx=tr.wpe.weight.shape[0],
        act_fn=act_fn(c.activation_function, "activation_function"),
        normalization_type="LN",
        positional_embedding_type="standard",
        ln_eps=eps,
        attn_scores_multiplier=scaling,
        tie_word_embeddings=tied,
        unembed_bias=False,
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": tr.wte.weight, "pos_embed.W_pos": tr.wpe.weight}

    def ln(dst: str, mod: nn.LayerNorm) -> None:
        layer_norm(w, dst, mod, eps, "layer_norm_epsilon")

    for i, blk in enumerate(blocks):
        p = f"blocks.{i}"
        ln(f"{p}.ln1", blk.ln_1)
        ln(f"{p}.ln2", blk.ln_2)
        if mq:  # [q (H * dh), k (dh), v (dh)]
            W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # (out, d), (out,)
            parts = {
                "Q": (W[:d], b[:d], H),
                "K": (W[d : d + dh], b[d : d + dh], 1),
                "V": (W[d + dh :], b[d + dh :], 1),
            }
            for x, (Wx, bx, n) in parts.items():
                w[f"{p}.attn.W_{x}"] = Wx.reshape(n, dh, d).permute(0, 2, 1)
                w[f"{p}.attn.b_{x}"] = bx.reshape(n, dh)
            w[f"{p}.attn.W_O"] = blk.attn.c_proj.weight.T.reshape(H, dh, d)
            w[f"{p}.attn.b_O"] = blk.attn.c_proj.bias
        else:  # head h: rows [h * 3 dh, (h + 1) * 3 dh) = [q_h, k_h, v_h], GPT-NeoX's layout
            put_per_head_qkv(w, p, blk.attn.c_attn, blk.attn.c_proj, H, dh)
        put_mlp(w, p, blk.mlp.c_fc, blk.mlp.c_proj)
    ln("ln_final", tr.ln_f)
    put_unembedding(w, model.lm_head, tied, None)
    return cfg, w
