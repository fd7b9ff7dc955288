"""GPT-2 (``GPT2LMHeadModel``) -> pypattern ``Transformer``.

GPT-2's ``Conv1D`` weights are stored ``(in, out)`` (``y = x @ W + b``); ``c_attn`` is the fused query/key/value
projection whose output splits into three ``d_model`` blocks (queries, keys, values), each ``(n_heads, d_head)``
head-major. LayerNorm, learned absolute positions, every bias, no unembedding bias; embeddings usually tied.
``scale_attn_by_inverse_layer_idx`` gives each layer its own score multiplier (``attn_scores_multiplier``).
``reorder_and_upcast_attn`` with eager attention takes the scores and their softmax in float32
(``attn_scores_dtype``, ``attn_softmax_dtype``) for a 16-bit model; a float64 model's own forward refuses it.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import act_fn, attn_softmax_dtype, layer_norm, model_dtype, refuse, same_parameter

CLASSES = ("GPT2LMHeadModel",)


def _inverse_layer_multipliers(c, blocks, dh: int) -> tuple[float, ...] | None:
    """With ``scale_attn_by_inverse_layer_idx`` (the Stanford CRFM GPT-2 models), each layer's scores are
    ``q . k * scaling`` with ``scaling = d_head ** -0.5 / (layer + 1)`` (without ``scale_attn_weights``: ``1 /
    (layer + 1)``), the attention module's own ``scaling``; None otherwise."""
    if not getattr(c, "scale_attn_by_inverse_layer_idx", False):
        return None
    out = []
    for i, blk in enumerate(blocks):
        s = getattr(blk.attn, "scaling", None)
        if not isinstance(s, float):
            s = (dh**-0.5 if c.scale_attn_weights else 1.0) / float(i + 1)
        out.append(s)
    return tuple(out)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``GPT2LMHeadModel``."""
    c = model.config
    if getattr(c, "add_cross_attention", False):
        refuse("add_cross_attention", c.add_cross_attention, "cross-attention layers are not converted")
    tr = model.transformer
    blocks = tr.h
    d, H = c.n_embd, c.n_head
    dh = d // H
    # reorder_and_upcast_attn (eager attention only): queries and keys multiplied in float32 (baddbmm with the
    # scaling as alpha), the softmax in float32, the pattern cast to the values' dtype; a float64 model's float64
    # mask promotes the scores past float32, and its own forward raises
    upcast = (
        getattr(c, "reorder_and_upcast_attn", False) and getattr(c, "_attn_implementation", None) == "eager"
    )
    if upcast and hasattr(model, "bridge_attn_softmax_dtype") and model_dtype(model) != torch.float32:
        # a TransformerLens bridge computes the attention itself, in its own dtype
        refuse(
            "reorder_and_upcast_attn",
            True,
            f"a TransformerLens bridge around a {model_dtype(model)} model computes its attention otherwise than "
            "the Hugging Face model's float32 scores; convert the Hugging Face model itself",
        )
    if upcast and model_dtype(model) == torch.float64:
        refuse(
            "reorder_and_upcast_attn",
            True,
            "with eager attention a float64 GPT-2 model's own forward refuses it (its float64 mask makes the "
            "float32 scores float64); convert the model with attn_implementation='sdpa' (which ignores the "
            "option) or in float32",
        )
    d_mlp = blocks[0].mlp.c_fc.weight.shape[1]
    lm_w = model.lm_head.weight
    tied = same_parameter(lm_w, tr.wte.weight)
    lm_b = getattr(model.lm_head, "bias", None)
    eps = blocks[0].ln_1.eps
    cfg = dict(
        n_layers=len(blocks),
        d_model=d,
        n_heads=H,
        d_head=dh,
        d_mlp=d_mlp,
        d_vocab=tr.wte.weight.shape[0],
        n_ctx=tr.wpe.weight.shape[0],
        act_fn=act_fn(c.activation_function, "activation_function"),
        normalization_type="LN",
        positional_embedding_type="standard",
        ln_eps=eps,
        attn_scale=None if c.scale_attn_weights else 1.0,
        attn_scores_multiplier=_inverse_layer_multipliers(c, blocks, c.n_embd // c.n_head),
        tie_word_embeddings=tied,
        unembed_bias=lm_b is not None,
        # GPT-2's eager_attention_forward takes the softmax in the model's dtype
        attn_softmax_dtype=torch.float32 if upcast else attn_softmax_dtype(model, eager_upcasts=False),
        attn_scores_dtype=torch.float32 if upcast else None,
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": tr.wte.weight, "pos_embed.W_pos": tr.wpe.weight}

    def ln(dst: str, mod: nn.LayerNorm) -> None:
        layer_norm(w, dst, mod, eps, "layer_norm_epsilon")

    for i, blk in enumerate(blocks):
        p = f"blocks.{i}"
        ln(f"{p}.ln1", blk.ln_1)
        ln(f"{p}.ln2", blk.ln_2)
        W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # (d, 3d), (3d,)
        for j, x in enumerate("QKV"):
            w[f"{p}.attn.W_{x}"] = W[:, j * d : (j + 1) * d].reshape(d, H, dh).permute(1, 0, 2)
            w[f"{p}.attn.b_{x}"] = b[j * d : (j + 1) * d].reshape(H, dh)
        w[f"{p}.attn.W_O"] = blk.attn.c_proj.weight.reshape(H, dh, d)
        w[f"{p}.attn.b_O"] = blk.attn.c_proj.bias
        w[f"{p}.mlp.W_in"] = blk.mlp.c_fc.weight
        w[f"{p}.mlp.b_in"] = blk.mlp.c_fc.bias
        w[f"{p}.mlp.W_out"] = blk.mlp.c_proj.weight
        w[f"{p}.mlp.b_out"] = blk.mlp.c_proj.bias
    ln("ln_final", tr.ln_f)
    if not tied:
        w["unembed.W_U"] = lm_w.T
    w["unembed.b_U"] = lm_b
    return cfg, w
