"""GPT-Neo (``GPTNeoForCausalLM``: GPT-Neo 125M-2.7B, the TinyStories models) -> pypattern ``Transformer``.

Separate ``q_proj``/``k_proj``/``v_proj`` without biases and ``out_proj`` with one (``nn.Linear``, ``(out, in)``),
LayerNorm, learned absolute positions, an MLP ``c_fc``/``c_proj`` with biases. Its attention does not scale the
scores (``attn_scale=1``) and multiplies queries and keys in float32 for every model dtype (``attn_scores_dtype``);
adding its causal mask, held in the model's dtype, takes the softmax to float32 or the model's dtype, whichever is
wider (``attn_softmax_dtype``). Layers are ``"global"`` or ``"local"`` (``attention_layers``); a
local layer attends to the ``window_size`` latest positions (a per-layer ``sliding_window``). Embeddings are tied
unless the checkpoint says otherwise; no unembedding bias.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    SOFTMAX_FLOAT32_OR_WIDER,
    act_fn,
    layer_norm,
    linear_heads,
    linear_out_heads,
    put_mlp,
    put_unembedding,
    refuse,
    same_parameter,
    window_setting,
)

CLASSES = ("GPTNeoForCausalLM",)


def _window(i: int, kind: str, attn: nn.Module, c) -> int | None:
    """Layer ``i``'s window as its attention computes it: read from the mask the module holds (built from the
    config when the model was, so a ``window_size`` edited on the config afterwards does not change it), which
    must be causal and banded; the config's ``window_size`` when the module holds none."""
    mask = getattr(attn, "bias", None)
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.shape[-1] < 2
    ):
        return None if kind == "global" else int(c.window_size)
    m = mask[0, 0].cpu()
    n = m.shape[-1]
    width = int(m[n - 1].sum())  # the last row: the window, or every position for a global layer
    band = torch.tril(torch.ones(n, n, dtype=torch.bool, device="cpu"))  # compared with the CPU copy m
    if width < n:
        band = band ^ torch.tril(band, -width)
    if width < 1 or not torch.equal(m, band):
        refuse(f"layer {i}'s attention mask", "not causal with a window", "the converter reads causal masks")
    if kind == "global" and width < n:
        refuse(
            f"attention_layers[{i}]",
            "global",
            f"the layer's mask holds a window of {width} positions (a local layer's)",
        )
    return None if width >= n else width


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``GPTNeoForCausalLM``."""
    c = model.config
    tr = model.transformer
    blocks = tr.h
    kinds = list(getattr(c, "attention_layers", None) or [])
    if len(kinds) != len(blocks) or not set(kinds) <= {"global", "local"}:
        refuse(
            "attention_layers", kinds, f"expected 'global' or 'local' for each of the {len(blocks)} layers"
        )
    windows = [_window(i, kind, blk.attn.attention, c) for i, (kind, blk) in enumerate(zip(kinds, blocks))]
    d = c.hidden_size
    a0 = blocks[0].attn.attention
    H, dh = a0.num_heads, a0.head_dim
    if H * dh != d:
        refuse("num_heads", H, f"does not divide hidden_size={d} into heads")
    lm = model.lm_head
    tied = same_parameter(lm.weight, tr.wte.weight)
    lm_b = getattr(lm, "bias", None)
    eps = blocks[0].ln_1.eps
    cfg = dict(
        n_layers=len(blocks),
        d_model=d,
        n_heads=H,
        d_head=dh,
        d_mlp=blocks[0].mlp.c_fc.weight.shape[0],
        d_vocab=tr.wte.weight.shape[0],
        n_ctx=tr.wpe.weight.shape[0],
        act_fn=act_fn(c.activation_function, "activation_function"),
        normalization_type="LN",
        positional_embedding_type="standard",
        ln_eps=eps,
        attn_scale=1.0,
        attn_bias=False,
        attn_out_bias=True,
        mlp_bias=True,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        sliding_window=window_setting(windows),
        # GPTNeoSelfAttention._attn: query/key .to(float32), matmul, + the causal mask in the model's dtype (which
        # promotes a float64 model's scores to float64), softmax, .to(value.dtype)
        attn_scores_dtype=torch.float32,
        attn_softmax_dtype=SOFTMAX_FLOAT32_OR_WIDER,
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": tr.wte.weight, "pos_embed.W_pos": tr.wpe.weight}

    def ln(dst: str, mod: nn.LayerNorm) -> None:
        layer_norm(w, dst, mod, eps, "layer_norm_epsilon")

    for i, blk in enumerate(blocks):
        p = f"blocks.{i}"
        a = blk.attn.attention
        if (a.num_heads, a.head_dim) != (H, dh):
            refuse("num_heads", a.num_heads, f"differs between layers ({H} in layer 0)")
        if getattr(a, "attention_type", kinds[i]) != kinds[i]:
            refuse(f"h[{i}].attn.attention.attention_type", a.attention_type, f"the config says {kinds[i]!r}")
        for x in ("q", "k", "v"):
            if getattr(a, f"{x}_proj").bias is not None:
                refuse(f"h[{i}].attn.attention.{x}_proj.bias", "(present)", "GPT-Neo's projections have none")
        ln(f"{p}.ln1", blk.ln_1)
        ln(f"{p}.ln2", blk.ln_2)
        w[f"{p}.attn.W_Q"] = linear_heads(a.q_proj.weight, H, dh)
        w[f"{p}.attn.W_K"] = linear_heads(a.k_proj.weight, H, dh)
        w[f"{p}.attn.W_V"] = linear_heads(a.v_proj.weight, H, dh)
        w[f"{p}.attn.W_O"] = linear_out_heads(a.out_proj.weight, H, dh)
        w[f"{p}.attn.b_O"] = a.out_proj.bias
        put_mlp(w, p, blk.mlp.c_fc, blk.mlp.c_proj)
    ln("ln_final", tr.ln_f)
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
