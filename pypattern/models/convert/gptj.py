"""GPT-J (``GPTJForCausalLM``) -> pypattern ``Transformer``.

Attention and MLP in parallel reading one LayerNorm (``ln_1``: ``parallel_attn_mlp`` with
``parallel_shared_norm``), separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` without biases, rotary
embeddings on the first ``rotary_dim`` dimensions of each head with GPT-J's adjacent pairing (angles and their
cosines computed in float32), an MLP ``fc_in`` / ``fc_out`` with biases, a final LayerNorm and an unembedding with a
bias. The ``eager`` attention multiplies queries and keys in float32, scales the float32 products by ``head_dim **
-0.5`` (``attn_scores_dtype``, ``attn_scores_multiplier``) and adds its mask in the model's dtype, which takes the
softmax to float32 or the model's dtype, whichever is wider; ``sdpa`` computes in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    SOFTMAX_FLOAT32_OR_WIDER,
    act_fn,
    all_or_none,
    layer_norm,
    put_attention,
    put_mlp,
    put_unembedding,
    refuse,
    split_qkv,
    unembedding,
)

CLASSES = ("GPTJForCausalLM",)


def _sincos(n: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """GPT-J's rotary table ``[sin | cos]`` of ``n`` positions with its angles computed in ``dtype``."""
    # on the CPU whatever torch's default device (compared with the model's table read to the CPU)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype) / dim))
    ang = torch.arange(n, dtype=torch.int64, device="cpu").to(torch.float32).to(dtype)[:, None] * inv
    return torch.cat((torch.sin(ang), torch.cos(ang)), dim=1)


def _table_dtype(buf: torch.Tensor | None, dim: int) -> torch.dtype:
    """The dtype the model's rotary table was computed in: float32 (Hugging Face's, under the default dtype
    float32), or float64 for a float64 table that holds float64 angles (a model built with float64 as torch's
    default dtype); a table that is neither is refused."""
    if buf is None or buf.dtype != torch.float64:
        return torch.float32
    table = buf.detach().cpu()
    if torch.equal(table, _sincos(table.shape[0], dim, torch.float32).to(torch.float64)):
        return torch.float32
    if torch.allclose(table, _sincos(table.shape[0], dim, torch.float64), rtol=0, atol=1e-13):
        return torch.float64
    refuse("rotary table", "float64", "its values are GPT-J's table in neither float32 nor float64 angles")
    return torch.float32


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``GPTJForCausalLM``."""
    c = model.config
    tr = model.transformer
    layers = tr.h
    L = len(layers)
    if L != c.n_layer:
        refuse("n_layer", c.n_layer, f"the model holds {L} layers")
    a0 = layers[0].attn
    dh = a0.head_dim
    H = a0.num_attention_heads
    if c.rotary_dim is None:
        refuse("rotary_dim", None, "GPT-J without a rotary_dim builds its rotary table over the whole width")
    if c.rotary_dim % 2 or not 0 < c.rotary_dim <= dh:
        refuse("rotary_dim", c.rotary_dim, f"give an even number of dimensions up to head_dim={dh}")
    buf = tr.rotary_emb.embed_positions if hasattr(tr, "rotary_emb") else None
    if buf is not None and buf.dtype not in (torch.float32, torch.float64):
        refuse(
            "rotary table",
            buf.dtype,
            "a table rounded to half precision is not reproduced; cast it to float32",
        )
    rot_dtype = _table_dtype(buf, c.rotary_dim)
    impl = getattr(c, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        refuse("attn_implementation", impl, "the converted attention reproduces 'eager' and 'sdpa'")
    eager = impl in (None, "eager")
    emb, lm, tied, lm_b = unembedding(model)
    attn_bias = all_or_none([b for m in layers for b in split_qkv(m.attn)[3:]], "q/k/v projection biases")
    attn_out_bias = all_or_none([m.attn.out_proj.bias for m in layers], "out_proj biases")
    mlp_bias = all_or_none([b for m in layers for b in (m.mlp.fc_in.bias, m.mlp.fc_out.bias)], "MLP biases")
    eps = layers[0].ln_1.eps
    cfg = dict(
        n_layers=L,
        d_model=c.n_embd,
        n_heads=H,
        d_head=dh,
        d_mlp=layers[0].mlp.fc_in.weight.shape[0],
        d_vocab=emb.shape[0],
        n_ctx=c.n_positions,
        act_fn=act_fn(c.activation_function, "activation_function"),
        normalization_type="LN",
        parallel_attn_mlp=True,
        parallel_shared_norm=True,
        positional_embedding_type="rotary",
        rotary_dim=c.rotary_dim,
        rotary_adjacent_pairs=True,
        rotary_dtype=rot_dtype,
        attn_bias=attn_bias,
        attn_out_bias=attn_out_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
    )
    if eager:  # float32 products times the scale, + the mask in the model's dtype, softmax, .to(value.dtype)
        cfg.update(
            attn_scores_dtype=torch.float32,
            attn_scores_multiplier=a0.scaling,
            attn_softmax_dtype=SOFTMAX_FLOAT32_OR_WIDER,
        )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}
    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a, f = layer.attn, layer.mlp
        if a.head_dim != dh or a.rotary_dim != c.rotary_dim:
            refuse(f"h[{i}].attn", (a.head_dim, a.rotary_dim), f"differs from layer 0 ({dh}, {c.rotary_dim})")
        layer_norm(w, f"{p}.ln1", layer.ln_1, eps, "layer_norm_epsilon")
        put_attention(w, p, split_qkv(a), a.out_proj.weight, a.out_proj.bias, H, H, dh)
        put_mlp(w, p, f.fc_in, f.fc_out)
    layer_norm(w, "ln_final", tr.ln_f, eps, "layer_norm_epsilon")
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
