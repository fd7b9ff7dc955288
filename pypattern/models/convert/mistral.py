"""Mistral (``MistralForCausalLM``) -> pypattern ``Transformer``.

Llama's arithmetic (see :mod:`.llama`) without biases, with ``sliding_window`` attention on every layer when the
config sets it (query ``i`` attends to keys ``j`` with ``i - sliding_window < j <= i``).
"""

from __future__ import annotations

from torch import nn

from .llama import llama_like

CLASSES = ("MistralForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``MistralForCausalLM``."""
    c = model.config
    # Hugging Face's Mistral attention reads config.sliding_window in every layer and ignores layer_types (it warns
    # and points to Ministral): the converted model does the same (llama_like checks each layer's attention)
    return llama_like(model, sliding_window=getattr(c, "sliding_window", None))
