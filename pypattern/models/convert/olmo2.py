"""OLMo 2 and OLMo 3 (``Olmo2ForCausalLM``, ``Olmo3ForCausalLM``) -> pypattern ``Transformer``.

Llama's projections, rotary embeddings and gated SiLU MLP (see :mod:`.llama`), but the norms sit elsewhere: none in
front of the attention or the MLP (``pre_norms=False``), one after each of them before its output is added to the
residual stream (``post_attention_layernorm``, ``post_feedforward_layernorm``:
``use_normalization_before_and_after``), and one RMSNorm over the whole query projection and one over the whole key
projection, across the heads (``q_norm`` / ``k_norm``: ``qk_norm="all"``). Its RMSNorms compute in float32 and
multiply by their weight before casting back, which equals Llama's order (cast, then multiply) in float32 and
float64 and differs by rounding in half precision. OLMo 3 adds sliding-window attention on the layers
``layer_types`` names.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    all_or_none,
    attn_softmax_dtype,
    bias_heads,
    layer_ropes,
    linear_heads,
    linear_out_heads,
    refuse,
    same_parameter,
    window_setting,
)

CLASSES = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of an ``Olmo2ForCausalLM`` or ``Olmo3ForCausalLM``."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    if L != c.num_hidden_layers:
        refuse("num_hidden_layers", c.num_hidden_layers, f"the model holds {L} layers")
    a0 = layers[0].self_attn
    dh = a0.head_dim
    H = a0.q_proj.weight.shape[0] // dh
    Hkv = a0.k_proj.weight.shape[0] // dh
    if a0.scaling != dh**-0.5:
        refuse("attention scaling", a0.scaling, f"expected head_dim ** -0.5 = {dh**-0.5}")
    types = list(getattr(c, "layer_types", None) or ["full_attention"] * L)
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            refuse("layer_types", t, "only 'full_attention' and 'sliding_attention' layers are converted")
    windows = [c.sliding_window if t == "sliding_attention" else None for t in types]
    ropes = layer_ropes(c, base_model.rotary_emb, dh, types)  # OLMo 3: one rotary embedding per kind of layer
    if ropes["rotary_dim"] != dh:
        refuse("rotary dimensions", ropes["rotary_dim"], f"this model rotates the whole head (head_dim={dh})")
    emb = model.get_input_embeddings().weight
    lm = model.get_output_embeddings()
    tied = same_parameter(lm.weight, emb)
    lm_b = getattr(lm, "bias", None)
    attn_bias = all_or_none(
        [getattr(m.self_attn, f"{x}_proj").bias for m in layers for x in "qkv"], "q/k/v projection biases"
    )
    attn_out_bias = all_or_none([m.self_attn.o_proj.bias for m in layers], "o_proj biases")
    mlp_bias = all_or_none(
        [getattr(m.mlp, f"{x}_proj").bias for m in layers for x in ("gate", "up", "down")], "MLP biases"
    )
    eps = layers[0].post_attention_layernorm.variance_epsilon
    cfg = dict(
        n_layers=L,
        d_model=c.hidden_size,
        n_heads=H,
        d_head=dh,
        n_key_value_heads=Hkv,
        d_mlp=layers[0].mlp.up_proj.weight.shape[0],
        d_vocab=emb.shape[0],
        n_ctx=c.max_position_embeddings,
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="RMS",
        norm_dtype=torch.float32,
        pre_norms=False,
        use_normalization_before_and_after=True,
        qk_norm="all",
        positional_embedding_type="rotary",
        **ropes,
        rotary_dtype=torch.float32,
        gated_mlp=True,
        attn_bias=attn_bias,
        attn_out_bias=attn_out_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        sliding_window=window_setting(windows),
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}

    def norm(dst: str, mod: nn.Module, size: int) -> None:
        if mod.variance_epsilon != eps:
            refuse("rms_norm_eps", mod.variance_epsilon, f"differs between norms ({eps} elsewhere)")
        if tuple(mod.weight.shape) != (size,):
            refuse(dst, tuple(mod.weight.shape), f"expected an RMSNorm over {size} features")
        w[f"{dst}.w"] = mod.weight

    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a, f = layer.self_attn, layer.mlp
        if a.head_dim != dh or a.scaling != a0.scaling:
            refuse(
                f"layers[{i}].self_attn",
                (a.head_dim, a.scaling),
                f"differs from layer 0 ({dh}, {a0.scaling})",
            )
        if getattr(a, "sliding_window", None) != windows[i]:
            refuse(
                f"layers[{i}].self_attn.sliding_window", a.sliding_window, f"layer_types implies {windows[i]}"
            )
        for name in ("input_layernorm", "pre_feedforward_layernorm"):  # a norm in front: not this family
            if hasattr(layer, name):
                refuse(f"layers[{i}].{name}", type(getattr(layer, name)).__name__, "OLMo 2 has no pre-norms")
        norm(f"{p}.ln1_post", layer.post_attention_layernorm, c.hidden_size)
        norm(f"{p}.ln2_post", layer.post_feedforward_layernorm, c.hidden_size)
        norm(f"{p}.attn.q_norm", a.q_norm, H * dh)
        norm(f"{p}.attn.k_norm", a.k_norm, Hkv * dh)
        w[f"{p}.attn.W_Q"] = linear_heads(a.q_proj.weight, H, dh)
        w[f"{p}.attn.W_K"] = linear_heads(a.k_proj.weight, Hkv, dh)
        w[f"{p}.attn.W_V"] = linear_heads(a.v_proj.weight, Hkv, dh)
        w[f"{p}.attn.b_Q"] = bias_heads(a.q_proj.bias, H, dh)
        w[f"{p}.attn.b_K"] = bias_heads(a.k_proj.bias, Hkv, dh)
        w[f"{p}.attn.b_V"] = bias_heads(a.v_proj.bias, Hkv, dh)
        w[f"{p}.attn.W_O"] = linear_out_heads(a.o_proj.weight, H, dh)
        w[f"{p}.attn.b_O"] = a.o_proj.bias
        w[f"{p}.mlp.W_gate"] = f.gate_proj.weight.T
        w[f"{p}.mlp.b_gate"] = f.gate_proj.bias
        w[f"{p}.mlp.W_in"] = f.up_proj.weight.T
        w[f"{p}.mlp.b_in"] = f.up_proj.bias
        w[f"{p}.mlp.W_out"] = f.down_proj.weight.T
        w[f"{p}.mlp.b_out"] = f.down_proj.bias
    norm("ln_final", base_model.norm, c.hidden_size)
    if not tied:
        w["unembed.W_U"] = lm.weight.T
    w["unembed.b_U"] = lm_b
    return cfg, w
