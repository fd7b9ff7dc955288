"""OLMo 2, OLMo 3 and EXAONE 4 (``Olmo2ForCausalLM``, ``Olmo3ForCausalLM``, ``Exaone4ForCausalLM``) -> pypattern
``Transformer``.

Llama's projections, rotary embeddings and gated SiLU MLP (see :mod:`.llama`), but the norms sit elsewhere: none in
front of the attention or the MLP (``pre_norms=False``), one after each of them before its output is added to the
residual stream (``post_attention_layernorm``, ``post_feedforward_layernorm``:
``use_normalization_before_and_after``), and one RMSNorm over the whole query projection and one over the whole key
projection, across the heads (``q_norm`` / ``k_norm``: ``qk_norm="all"``). Its RMSNorms compute in float32 and
multiply by their weight before casting back, which equals Llama's order (cast, then multiply) in float32 and
float64 and differs by rounding in half precision. OLMo 3 adds sliding-window attention on the layers
``layer_types`` names.

EXAONE 4 places its norms as OLMo 2 does, but normalises each head's query and key on its own (``q_norm`` /
``k_norm`` over ``head_dim``, one weight shared by the heads: ``qk_norm=True``, as Qwen3), multiplies by the norms'
weights after the cast back (Llama's order), and, when its config sets a ``sliding_window``, turns queries and keys
only on the sliding-window layers (``TransformerConfig.rotary_layers``: the global layers have no positions).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    act_fn,
    attn_softmax_dtype,
    head_shape,
    layer_ropes,
    put_attention,
    put_gated_mlp,
    put_unembedding,
    refuse,
    sizes,
    split_biases,
    split_gated_mlp,
    split_qkv,
    standard_scaling,
    unembedding,
    window_setting,
)

CLASSES = ("Olmo2ForCausalLM", "Olmo3ForCausalLM", "Exaone4ForCausalLM")


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of an ``Olmo2ForCausalLM``, ``Olmo3ForCausalLM`` or
    ``Exaone4ForCausalLM``."""
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    a0, dh, H, Hkv = head_shape(model)
    standard_scaling(a0, dh)
    # OLMo 2 has no sliding windows: its attention and masks read neither layer_types nor sliding_window (a config
    # may still carry them, e.g. copied from an OLMo 3 config)
    exaone = type(model).__name__ == "Exaone4ForCausalLM"
    windowed = exaone or type(model).__name__ == "Olmo3ForCausalLM"
    types = list((getattr(c, "layer_types", None) if windowed else None) or ["full_attention"] * L)
    if len(types) != L:
        refuse("layer_types", types, f"expected one per layer ({L} layers)")
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            refuse("layer_types", t, "only 'full_attention' and 'sliding_attention' layers are converted")
    windows = [c.sliding_window if t == "sliding_attention" else None for t in types]
    if exaone and "sliding_attention" in types and c.sliding_window is None:
        refuse("layer_types", types, "sliding-window layers without a sliding_window")
    ropes = layer_ropes(c, base_model.rotary_emb, dh, types)  # OLMo 3: one rotary embedding per kind of layer
    if ropes["rotary_dim"] != dh:
        refuse("rotary dimensions", ropes["rotary_dim"], f"this model rotates the whole head (head_dim={dh})")
    emb, lm, tied, lm_b = unembedding(model)
    attn_bias, attn_out_bias, mlp_bias = split_biases(layers)
    eps = layers[0].post_attention_layernorm.variance_epsilon
    cfg = dict(
        **sizes(c, L, H, Hkv, dh, layers[0].mlp.up_proj.weight.shape[0], emb),
        act_fn=act_fn(c.hidden_act, "hidden_act"),
        normalization_type="RMS",
        norm_dtype=torch.float32,
        pre_norms=False,
        use_normalization_before_and_after=True,
        qk_norm=True if exaone else "all",
        **ropes,
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
        # EXAONE 4's attentions all hold the config's window and apply it on the sliding layers only
        own = getattr(a, "sliding_window", None)
        if exaone:
            if bool(a.is_sliding) != (types[i] == "sliding_attention"):
                refuse(f"layers[{i}].self_attn.is_sliding", a.is_sliding, f"layer_types says {types[i]!r}")
            own = own if a.is_sliding else None
        if own != windows[i]:
            refuse(
                f"layers[{i}].self_attn.sliding_window", a.sliding_window, f"layer_types implies {windows[i]}"
            )
        for name in ("input_layernorm", "pre_feedforward_layernorm"):  # a norm in front: not this family
            if hasattr(layer, name):
                refuse(
                    f"layers[{i}].{name}",
                    type(getattr(layer, name)).__name__,
                    "this family has no norm in front of the attention or the MLP",
                )
        norm(f"{p}.ln1_post", layer.post_attention_layernorm, c.hidden_size)
        norm(f"{p}.ln2_post", layer.post_feedforward_layernorm, c.hidden_size)
        norm(f"{p}.attn.q_norm", a.q_norm, dh if exaone else H * dh)
        norm(f"{p}.attn.k_norm", a.k_norm, dh if exaone else Hkv * dh)
        put_attention(w, p, split_qkv(a), a.o_proj.weight, a.o_proj.bias, H, Hkv, dh)
        put_gated_mlp(w, p, split_gated_mlp(f))
    norm("ln_final", base_model.norm, c.hidden_size)
    put_unembedding(w, lm, tied, lm_b)
    if exaone and c.sliding_window is not None and "full_attention" in types:  # global layers: no positions
        cfg["rotary_layers"] = tuple(t == "sliding_attention" for t in types)
    return cfg, w
