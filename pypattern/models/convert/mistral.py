"""Mistral (``MistralForCausalLM``) -> pypattern ``Transformer``.

Llama's arithmetic (see :mod:`.llama`) without biases, with ``sliding_window`` attention on every layer when the
config sets it (query ``i`` attends to keys ``j`` with ``i - sliding_window < j <= i``).
"""

from __future__ import annotations

from torch import nn

from ._common import refuse
from .llama import llama_like

CLASSES = ("MistralForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``MistralForCausalLM``."""
    c = model.config
    if getattr(c, "layer_types", None) is not None:
        refuse("layer_types", c.layer_types, "per-layer attention types are not converted for Mistral")
    sw = getattr(c, "sliding_window", None)
    return llama_like(model, sliding_window=sw)
