"""Llama (``LlamaForCausalLM``) -> pypattern ``Transformer``; the shared Llama-style conversion Mistral, Phi-3,
Qwen2 and Qwen3 use too.

Separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (``nn.Linear``, ``(out, in)``), grouped-query attention,
rotary embeddings on the whole head (``rotate_half`` pairing; angles and their cosines computed in float32),
RMSNorm computed in float32, gated SiLU MLP (``gate_proj`` -> ``W_gate``, ``up_proj`` -> ``W_in``, ``down_proj``
-> ``W_out``), biases per ``attention_bias`` (all four attention projections) and ``mlp_bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    all_or_none,
    attn_softmax_dtype,
    head_shape,
    put_attention,
    put_gated_mlp,
    put_unembedding,
    refuse,
    rope,
    rotary_fields,
    split_gated_mlp,
    split_qkv,
    standard_scaling,
    unembedding,
    window_setting,
)

CLASSES = ("LlamaForCausalLM",)


def llama_like(
    model: nn.Module,
    sliding_window: int | list | None = None,
    qkv=split_qkv,
    mlp=split_gated_mlp,
    partial_rotary: bool = False,
    any_scaling: bool = False,
) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a Llama-style causal LM (``model.model.layers[i]`` with
    ``self_attn`` (``o_proj``), ``mlp`` (``down_proj``), ``input_layernorm``/``post_attention_layernorm``
    RMSNorms, ``model.norm``, ``model.rotary_emb``); ``sliding_window`` for every layer, one per layer, or None,
    checked against each layer's attention.
    ``qkv`` / ``mlp`` read a layer's projections (separate ``q/k/v_proj`` and ``gate/up/down_proj`` by default;
    Phi-3 fuses them; a plain MLP's reader gives None for the gate and its bias); ``partial_rotary``: the model
    rotates only the first dimensions of each head;
    ``any_scaling``: the scores' multiplier may differ from ``head_dim ** -0.5``. A multiplier other than
    ``head_dim ** -0.5`` (``1 / sqrt(head_dim)``, one ulp away, or any with ``any_scaling``) becomes
    ``attn_scores_multiplier``: the scores are multiplied by it as the eager attention does."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    a0, dh, H, Hkv = head_shape(model, qkv)
    windows = list(sliding_window) if isinstance(sliding_window, list) else [sliding_window] * len(layers)
    d = c.hidden_size
    if not any_scaling:
        standard_scaling(a0, dh, rel_tol=1e-12)
    if any(m.self_attn.scaling != a0.scaling for m in layers):
        refuse("attention scaling", [m.self_attn.scaling for m in layers], "differs between layers")
    base, rotary_dim, freq_dtype, rot_scaling = rope(c, base_model.rotary_emb, dh)
    if rotary_dim != dh and not partial_rotary:
        refuse(
            "rotary dimensions",
            rotary_dim,
            f"this model rotates the whole head (head_dim={dh}); a partial rotary factor is not applied by it",
        )
    splits = [(qkv(m.self_attn), mlp(m.mlp)) for m in layers]
    gated = all_or_none([f[0] for _, f in splits], "gate projections")  # a plain MLP's reader gives no gate
    attn_in_bias = all_or_none([b for q, _ in splits for b in q[3:]], "q/k/v projection biases")
    attn_out_bias = all_or_none([m.self_attn.o_proj.bias for m in layers], "o_proj biases")
    mlp_bias = all_or_none([b for _, f in splits for b in f[3 if gated else 4 :]], "mlp_bias")
    emb, lm, tied, lm_b = unembedding(model)
    eps = layers[0].input_layernorm.variance_epsilon
    cfg = dict(
        n_layers=len(layers),
        d_model=d,
        n_heads=H,
        d_head=dh,
        n_key_value_heads=Hkv,
        d_mlp=splits[0][1][1].shape[-2],
        d_vocab=emb.shape[0],
        n_ctx=c.max_position_embeddings,
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="RMS",
        norm_dtype=torch.float32,
        **rotary_fields(base, rotary_dim, freq_dtype, rot_scaling),
        gated_mlp=gated,
        attn_bias=attn_in_bias,
        attn_out_bias=attn_out_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        sliding_window=window_setting(windows),
        # eager_attention_forward: softmax(..., dtype=torch.float32).to(query.dtype)
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    if a0.scaling != dh**-0.5:
        cfg["attn_scores_multiplier"] = float(a0.scaling)
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}

    def norm(dst: str, mod: nn.Module) -> None:
        if mod.variance_epsilon != eps:
            refuse("rms_norm_eps", mod.variance_epsilon, f"differs between norms ({eps} elsewhere)")
        w[f"{dst}.w"] = mod.weight

    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a = layer.self_attn
        if a.head_dim != dh:
            refuse("head_dim", a.head_dim, f"differs between layers ({dh} in layer 0)")
        if getattr(a, "sliding_window", windows[i]) != windows[i]:
            refuse(
                f"layers[{i}].self_attn.sliding_window", a.sliding_window, f"the config implies {windows[i]}"
            )
        norm(f"{p}.ln1", layer.input_layernorm)
        norm(f"{p}.ln2", layer.post_attention_layernorm)
        put_attention(w, p, splits[i][0], a.o_proj.weight, a.o_proj.bias, H, Hkv, dh)
        put_gated_mlp(w, p, splits[i][1])
    norm("ln_final", base_model.norm)
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``LlamaForCausalLM``."""
    return llama_like(model)
