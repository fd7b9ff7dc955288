"""Gemma, Gemma 2 and Gemma 3 (``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``) -> pypattern
``Transformer``.

What the three share: separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` without biases (``attention_bias``
adds them), grouped- or multi-query attention with an explicit ``head_dim``, rotary embeddings on the whole head,
a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``; tanh GELU), tied embeddings, the token embedding scaled by
``sqrt(hidden_size)`` (the model's ``embed_scale`` buffer, in the weights' dtype: ``TransformerConfig.embed_scale``)
and RMSNorms that compute ``x_hat * (1 + w)`` in float32 before casting back (``norm_weight_offset=1``).

Gemma 2 adds sandwich norms (``post_attention_layernorm`` after the attention, ``pre_feedforward_layernorm`` /
``post_feedforward_layernorm`` around the MLP: ``use_normalization_before_and_after``), the attention scale
``query_pre_attn_scalar ** -0.5``, soft-capped attention scores and logits, and sliding-window attention on the
layers ``layer_types`` names. Gemma 3 drops the score capping (its attention applies none, whatever
``attn_logit_softcapping`` says), adds per-head query/key norms
(``qk_norm``, with the same ``1 + w`` weights) and gives local and global layers their own rotary base and scaling.
The eager attention takes its softmax in float32 (as the Llama family's).

VaultGemma (``VaultGemmaForCausalLM``) is Gemma 2 without the norms after the attention and the MLP: the
``pre_feedforward_layernorm`` in front of the MLP is its second norm, and the writes reach the residual stream as
the attention and the MLP give them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import (
    act_fn,
    attn_softmax_dtype,
    head_shape,
    layer_ropes,
    positive_option,
    put_attention,
    put_gated_mlp,
    put_unembedding,
    refuse,
    sizes,
    split_biases,
    split_gated_mlp,
    split_qkv,
    unembedding,
    window_setting,
)

CLASSES = (
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "VaultGemmaForCausalLM",
)


class _LanguageModel:
    """The language model of a multimodal ``Gemma3ForConditionalGeneration`` seen as a text causal LM (its config is
    the text config, ``model`` the text decoder, the output head the model's ``lm_head``): what the converter reads."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config.get_text_config()
        self.model = model.model.language_model
        self._head = model.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self._head


def _layer_types(c, n: int) -> list[str]:
    types = list(getattr(c, "layer_types", None) or ["full_attention"] * n)
    if len(types) != n:
        refuse("layer_types", types, f"expected one per layer ({n} layers)")
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            refuse("layer_types", t, "only 'full_attention' and 'sliding_attention' layers are converted")
    return types


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a Gemma, Gemma 2 or Gemma 3 causal LM; of a multimodal
    ``Gemma3ForConditionalGeneration``, its language model (the converted model reads tokens; the vision tower and
    its projector are not part of it)."""
    name = type(model).__name__
    vault = name == "VaultGemmaForCausalLM"  # Gemma 2 without the norms after the attention and the MLP
    gen = (
        1
        if name == "GemmaForCausalLM"
        else (2 if name in ("Gemma2ForCausalLM", "VaultGemmaForCausalLM") else 3)
    )
    if name == "Gemma3ForConditionalGeneration":
        model = _LanguageModel(model)
    c = model.config
    base_model = model.model
    layers = base_model.layers
    L = len(layers)
    if getattr(c, "use_bidirectional_attention", False):
        refuse("use_bidirectional_attention", True, "only causal attention is converted")
    a0, dh, H, Hkv = head_shape(model)
    d = c.hidden_size
    types = _layer_types(c, L) if gen > 1 else ["full_attention"] * L
    windows = [c.sliding_window if t == "sliding_attention" else None for t in types]

    # rotary embeddings: one for the model, or (Gemma 3) one per kind of layer
    ropes = layer_ropes(c, base_model.rotary_emb, dh, types)
    if ropes["rotary_dim"] != dh:
        refuse("rotary dimensions", ropes["rotary_dim"], f"this model rotates the whole head (head_dim={dh})")

    # the embedding's scale as the model holds it (a buffer in the weights' dtype, not saved with the weights)
    emb_mod = model.get_input_embeddings()
    emb = emb_mod.weight
    scale_buf = getattr(emb_mod, "embed_scale", None)
    if scale_buf is None:
        refuse("embed_tokens", type(emb_mod).__name__, "expected Gemma's scaled word embedding (embed_scale)")
    embed_scale = float(scale_buf.to(emb.dtype))
    if not math.isclose(embed_scale, math.sqrt(d), rel_tol=1e-2):
        refuse("embed_scale", embed_scale, f"expected sqrt(hidden_size) = {math.sqrt(d)}")
    _, lm, tied, lm_b = unembedding(model)

    attn_bias, attn_out_bias, mlp_bias = split_biases(layers)
    scaling = a0.scaling
    for i, m in enumerate(layers):
        a = m.self_attn
        if a.head_dim != dh or a.scaling != scaling:
            refuse(
                f"layers[{i}].self_attn", (a.head_dim, a.scaling), f"differs from layer 0 ({dh}, {scaling})"
            )
        if getattr(a, "sliding_window", None) != windows[i]:
            refuse(
                f"layers[{i}].self_attn.sliding_window", a.sliding_window, f"layer_types implies {windows[i]}"
            )
    # Gemma 2's attention passes its cap to the attention function; Gemma 3's passes none (a configured
    # attn_logit_softcapping is not applied by its forward), and the converted model computes what it computes
    attn_cap = getattr(c, "attn_logit_softcapping", None) if gen == 2 else None
    if gen == 2 and getattr(a0, "attn_logit_softcapping", attn_cap) != attn_cap:
        refuse("attn_logit_softcapping", a0.attn_logit_softcapping, f"the config says {attn_cap}")
    logit_cap = getattr(c, "final_logit_softcapping", None) if gen > 1 else None
    if attn_cap is not None:
        attn_cap = positive_option("attn_logit_softcapping", attn_cap, "attn_scores_soft_cap")
    if logit_cap is not None:
        logit_cap = positive_option("final_logit_softcapping", logit_cap, "output_logits_soft_cap")
    act_name = c.hidden_act if gen == 1 else c.hidden_activation
    eps = layers[0].input_layernorm.eps
    cfg = dict(
        **sizes(c, L, H, Hkv, dh, layers[0].mlp.up_proj.weight.shape[0], emb),
        act_fn=act_fn(act_name, "hidden_act" if gen == 1 else "hidden_activation"),
        normalization_type="RMS",
        norm_dtype=torch.float32,
        norm_weight_offset=1.0,
        embed_scale=embed_scale,
        **ropes,
        gated_mlp=True,
        attn_bias=attn_bias,
        attn_out_bias=attn_out_bias,
        mlp_bias=mlp_bias,
        unembed_bias=lm_b is not None,
        tie_word_embeddings=tied,
        ln_eps=eps,
        attn_scale=1.0 / scaling,
        sliding_window=window_setting(windows),
        qk_norm=gen == 3,
        use_normalization_before_and_after=gen > 1 and not vault,
        attn_scores_soft_cap=attn_cap,
        output_logits_soft_cap=logit_cap,
        attn_softmax_dtype=attn_softmax_dtype(model, eager_upcasts=True),
    )
    w: dict[str, torch.Tensor | None] = {"embed.W_E": emb}

    def norm(dst: str, mod: nn.Module) -> None:
        if mod.eps != eps:
            refuse("rms_norm_eps", mod.eps, f"differs between norms ({eps} elsewhere)")
        w[f"{dst}.w"] = mod.weight

    for i, layer in enumerate(layers):
        p = f"blocks.{i}"
        a, f = layer.self_attn, layer.mlp
        norm(f"{p}.ln1", layer.input_layernorm)
        if gen == 1:
            norm(f"{p}.ln2", layer.post_attention_layernorm)
        elif vault:
            norm(f"{p}.ln2", layer.pre_feedforward_layernorm)
        else:
            norm(f"{p}.ln1_post", layer.post_attention_layernorm)
            norm(f"{p}.ln2", layer.pre_feedforward_layernorm)
            norm(f"{p}.ln2_post", layer.post_feedforward_layernorm)
        if gen == 3:
            for which in ("q", "k"):
                qk = getattr(a, f"{which}_norm")
                if tuple(qk.weight.shape) != (dh,):
                    refuse(f"layers[{i}].self_attn.{which}_norm", tuple(qk.weight.shape), f"expected ({dh},)")
                norm(f"{p}.attn.{which}_norm", qk)
        put_attention(w, p, split_qkv(a), a.o_proj.weight, a.o_proj.bias, H, Hkv, dh)
        put_gated_mlp(w, p, split_gated_mlp(f))
    norm("ln_final", base_model.norm)
    put_unembedding(w, lm, tied, lm_b)
    return cfg, w
