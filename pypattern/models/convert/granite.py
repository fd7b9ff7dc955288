"""Granite (``GraniteForCausalLM``) -> pypattern ``Transformer``.

Llama's arithmetic (see :mod:`.llama`; biases per ``attention_bias`` / ``mlp_bias``) with four multipliers: the
token embedding times ``embedding_multiplier`` (``TransformerConfig.embed_scale``), the scores ``q . k *
attention_multiplier`` (``attn_scores_multiplier``, in place of ``head_dim ** -0.5``), each attention and MLP write
times ``residual_multiplier`` before it is added to the residual stream (``residual_multiplier``; the hooks see the
scaled writes) and the logits divided by ``logits_scaling`` (``logits_scaling``).
"""

from __future__ import annotations

from torch import nn

from ._common import refuse
from .llama import llama_like

CLASSES = ("GraniteForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``GraniteForCausalLM``."""
    c = model.config
    cfg, w = llama_like(model, any_scaling=True)
    emb = model.model.embedding_multiplier
    res = [layer.residual_multiplier for layer in model.model.layers]
    if len(set(res)) != 1:
        refuse("residual_multiplier", res, "differs between layers")
    cfg["attn_scores_multiplier"] = float(model.model.layers[0].self_attn.scaling)
    cfg["embed_scale"] = None if emb == 1 else float(emb)
    cfg["residual_multiplier"] = None if res[0] == 1 else float(res[0])
    cfg["logits_scaling"] = None if c.logits_scaling == 1 else float(c.logits_scaling)
    return cfg, w
