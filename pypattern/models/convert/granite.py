"""Granite (``GraniteForCausalLM``) -> pypattern ``Transformer``.

Llama's arithmetic (see :mod:`.llama`; biases per ``attention_bias`` / ``mlp_bias``) with four multipliers: the
token embedding times ``embedding_multiplier`` (``TransformerConfig.embed_scale``), the scores ``q . k *
attention_multiplier`` (``attn_scores_multiplier``, in place of ``head_dim ** -0.5``), each attention and MLP write
times ``residual_multiplier`` before it is added to the residual stream (``residual_multiplier``; the hooks see the
scaled writes) and the logits divided by ``logits_scaling`` (``logits_scaling``).
"""

from __future__ import annotations

from torch import nn

from ._common import positive_option, refuse
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
    att = model.model.layers[0].self_attn.scaling
    cfg["attn_scores_multiplier"] = positive_option("attention_multiplier", att, "attn_scores_multiplier")
    cfg["embed_scale"] = None if emb == 1 else positive_option("embedding_multiplier", emb, "embed_scale")
    cfg["residual_multiplier"] = (
        None if res[0] == 1 else positive_option("residual_multiplier", res[0], "residual_multiplier")
    )
    cfg["logits_scaling"] = (
        None
        if c.logits_scaling == 1
        else positive_option("logits_scaling", c.logits_scaling, "logits_scaling")
    )
    return cfg, w
