"""Qwen3 (``Qwen3ForCausalLM``) -> pypattern ``Transformer``.

Qwen2's arithmetic (see :mod:`.qwen2` and :mod:`.llama`) with an RMSNorm over each head's query and key after their
projections and before rotation (``self_attn.q_norm`` / ``k_norm``, one weight of ``head_dim`` shared by the heads,
computed in float32 as the other norms): ``TransformerConfig.qk_norm``. Biases follow ``attention_bias`` (none by
default); sliding-window attention per layer as Qwen2's.
"""

from __future__ import annotations

from torch import nn

from ._common import refuse
from .llama import llama_like
from .qwen2 import layer_windows

CLASSES = ("Qwen3ForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``Qwen3ForCausalLM``."""
    cfg, w = llama_like(model, sliding_window=layer_windows(model))
    eps = cfg["ln_eps"]
    dh = cfg["d_head"]
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        for which in ("q", "k"):
            norm = getattr(a, f"{which}_norm", None)
            if norm is None or tuple(norm.weight.shape) != (dh,):
                refuse(
                    f"layers[{i}].self_attn.{which}_norm",
                    None if norm is None else tuple(norm.weight.shape),
                    f"expected an RMSNorm over head_dim={dh}",
                )
            if norm.variance_epsilon != eps:
                refuse("rms_norm_eps", norm.variance_epsilon, f"differs between norms ({eps} elsewhere)")
            w[f"blocks.{i}.attn.{which}_norm.w"] = norm.weight
    cfg["qk_norm"] = True
    return cfg, w
