"""Qwen2 (``Qwen2ForCausalLM``) -> pypattern ``Transformer``.

Llama's arithmetic (see :mod:`.llama`) with biases on the query, key and value projections only (none on
``o_proj`` or the MLP). Sliding-window attention is converted when every layer uses it (``layer_types`` all
``"sliding_attention"``); a mixture of sliding and full layers is refused.
"""

from __future__ import annotations

from torch import nn

from ._common import refuse
from .llama import llama_like

CLASSES = ("Qwen2ForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``Qwen2ForCausalLM``."""
    return llama_like(model, sliding_window=uniform_window(model))


def uniform_window(model: nn.Module) -> int | None:
    """The sliding window of every layer of a Qwen-style model (None: full attention), or refuse a mixture."""
    c = model.config
    types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
    kinds = set(types)
    if not kinds <= {"full_attention", "sliding_attention"}:
        refuse("layer_types", types, "only 'full_attention' and 'sliding_attention' layers are converted")
    if len(kinds) > 1:
        refuse("layer_types", types, "a mixture of sliding-window and full attention layers is not converted")
    sw = c.sliding_window if kinds == {"sliding_attention"} else None
    if kinds == {"sliding_attention"} and sw is None:
        refuse("sliding_window", sw, "layer_types ask for sliding-window attention without a window")
    for i, layer in enumerate(model.model.layers):
        got = getattr(layer.self_attn, "sliding_window", sw)
        if got != sw:
            refuse(f"layers[{i}].self_attn.sliding_window", got, f"the config implies {sw}")
    return sw
