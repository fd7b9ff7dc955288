"""Qwen2 (``Qwen2ForCausalLM``) -> pypattern ``Transformer``.

Llama's arithmetic (see :mod:`.llama`) with biases on the query, key and value projections only (none on
``o_proj`` or the MLP). Sliding-window attention per layer (``layer_types``, from ``use_sliding_window`` and
``max_window_layers``): a per-layer ``sliding_window`` when the layers differ.
"""

from __future__ import annotations

from torch import nn

from ._common import refuse
from .llama import llama_like

CLASSES = ("Qwen2ForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``Qwen2ForCausalLM``."""
    return llama_like(model, sliding_window=layer_windows(model))


def layer_windows(model: nn.Module) -> list:
    """The sliding window of each of a Qwen-style model's layers (``layer_types``: ``"sliding_attention"`` layers
    read ``config.sliding_window``, ``"full_attention"`` ones every earlier key: None)."""
    c = model.config
    types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
    if not set(types) <= {"full_attention", "sliding_attention"}:
        refuse("layer_types", types, "only 'full_attention' and 'sliding_attention' layers are converted")
    if len(types) != len(model.model.layers):
        refuse("layer_types", types, f"the model holds {len(model.model.layers)} layers")
    sw = c.sliding_window
    if "sliding_attention" in types and (not isinstance(sw, int) or isinstance(sw, bool) or sw < 1):
        refuse("sliding_window", sw, "layer_types ask for sliding-window attention without a positive window")
    return [sw if t == "sliding_attention" else None for t in types]
