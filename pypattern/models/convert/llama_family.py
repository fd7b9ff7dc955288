"""Llama-style families whose arithmetic is Llama's (see :mod:`.llama`) up to one option each.

* **SmolLM3** (``SmolLM3ForCausalLM``): layers without rotary positions (``no_rope_layers``: 0 marks a NoPE
  layer, by default every fourth) become ``TransformerConfig.rotary_layers``; sliding windows per ``layer_types``
  when ``use_sliding_window`` is set.
* **Seed-OSS** (``SeedOssForCausalLM``): biases on the q/k/v projections and, per ``attention_out_bias``, the
  output projection.
* **Helium** (``HeliumForCausalLM``): rotary pairs ``(2i, 2i + 1)`` (``rotary_adjacent_pairs``), RMSNorm weights
  multiplied in float32 before the cast (``norm_weight_before_cast``), and its scores' multiplier ``1 /
  sqrt(head_dim)``, one ulp from ``head_dim ** -0.5``, kept exactly (``attn_scores_multiplier``).
* **ERNIE 4.5** (``Ernie4_5ForCausalLM``, the dense models): rotary pairs ``(2i, 2i + 1)``, queries and keys cast to
  float32 before they turn (``rotary_input_dtype``); biases per ``use_bias``.
* **Ministral** (``MinistralForCausalLM``): Mistral's layers with a sliding window on the layers ``layer_types``
  names (``"sliding_attention"``), full attention on the others.
* **Arcee** (``ArceeForCausalLM``): a plain MLP ``down_proj(act(up_proj(x)))`` (squared ReLU in the released
  checkpoints), no gate; biases per ``attention_bias`` and ``mlp_bias``.
* **GLM** (``GlmForCausalLM``) and **GLM-4** (``Glm4ForCausalLM``): rotary pairs ``(2i, 2i + 1)`` on the first
  ``partial_rotary_factor`` of each head (half by default), biases on the q/k/v projections (``attention_bias``),
  one fused ``gate_up_proj`` (the gate's rows, then the up projection's). GLM-4 adds a norm after the attention
  (``post_self_attn_layernorm``) and one after the MLP (``post_mlp_layernorm``) before each write to the residual
  stream (``use_normalization_before_and_after``; ``post_attention_layernorm`` is the norm in front of the MLP).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import refuse, split_fused_gate_up
from .llama import llama_like
from .qwen2 import layer_windows

CLASSES = (
    "SmolLM3ForCausalLM",
    "SeedOssForCausalLM",
    "HeliumForCausalLM",
    "Ernie4_5ForCausalLM",
    "MinistralForCausalLM",
    "ArceeForCausalLM",
    "GlmForCausalLM",
    "Glm4ForCausalLM",
)


def _plain_mlp(m: nn.Module) -> tuple:
    """:func:`~._common.split_gated_mlp`'s tuple of a plain MLP (``up_proj``, ``down_proj``): no gate."""
    return None, m.up_proj.weight, m.down_proj.weight, None, m.up_proj.bias, m.down_proj.bias


def _glm(model: nn.Module, sandwich: bool) -> tuple[dict, dict]:
    """GLM's conversion (GLM-4's with ``sandwich``: its norms after the attention and the MLP)."""
    cfg, w = llama_like(model, mlp=split_fused_gate_up, partial_rotary=True)
    cfg["rotary_adjacent_pairs"] = True
    if not sandwich:
        return cfg, w
    cfg["use_normalization_before_and_after"] = True
    eps = cfg["ln_eps"]
    for i, layer in enumerate(model.model.layers):
        for dst, mod in (
            ("ln1_post", layer.post_self_attn_layernorm),
            ("ln2_post", layer.post_mlp_layernorm),
        ):
            if mod.variance_epsilon != eps:
                refuse("rms_norm_eps", mod.variance_epsilon, f"differs between norms ({eps} elsewhere)")
            w[f"blocks.{i}.{dst}.w"] = mod.weight
    return cfg, w


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a SmolLM3, Seed-OSS, Helium, ERNIE 4.5, Ministral, Arcee,
    GLM or GLM-4 causal LM."""
    name = type(model).__name__
    if name == "MinistralForCausalLM":  # sliding windows on the layers layer_types names
        return llama_like(model, sliding_window=layer_windows(model))
    if name == "ArceeForCausalLM":  # a plain MLP
        return llama_like(model, mlp=_plain_mlp)
    if name in ("GlmForCausalLM", "Glm4ForCausalLM"):
        return _glm(model, sandwich=name == "Glm4ForCausalLM")
    if name == "HeliumForCausalLM":  # rotary pairs (2i, 2i + 1); RMSNorm weights multiplied before the cast
        cfg, w = llama_like(model)
        cfg["rotary_adjacent_pairs"] = True
        cfg["norm_weight_before_cast"] = True
        return cfg, w
    if name == "Ernie4_5ForCausalLM":  # rotary pairs (2i, 2i + 1), queries and keys turned from float32
        cfg, w = llama_like(model)
        cfg["rotary_adjacent_pairs"] = True
        cfg["rotary_input_dtype"] = torch.float32
        return cfg, w
    if name != "SmolLM3ForCausalLM":
        return llama_like(model)
    c = model.config
    layers = model.model.layers
    L = len(layers)
    types = list(getattr(c, "layer_types", None) or ["full_attention"] * L)
    if not set(types) <= {"full_attention", "sliding_attention"}:
        refuse("layer_types", types, "only 'full_attention' and 'sliding_attention' layers are converted")
    sliding = bool(getattr(c, "use_sliding_window", False))
    if "sliding_attention" in types and not sliding:
        refuse("layer_types", types, "sliding layers with use_sliding_window=False are not converted")
    windows = [c.sliding_window if sliding and t == "sliding_attention" else None for t in types]
    cfg, w = llama_like(model, sliding_window=windows)
    rope = [bool(layer.self_attn.use_rope) for layer in layers]
    # Hugging Face reads entry i for layer i: entries past the last layer are unused
    if list(map(bool, c.no_rope_layers))[: len(rope)] != rope:
        refuse("no_rope_layers", c.no_rope_layers, f"the layers' attention modules say {rope}")
    if not all(rope):
        cfg["rotary_layers"] = tuple(rope)
    return cfg, w
