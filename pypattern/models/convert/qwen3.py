"""Qwen3 (``Qwen3ForCausalLM``) -> pypattern ``Transformer``.

Qwen2's arithmetic (see :mod:`.qwen2` and :mod:`.llama`) with an RMSNorm over each head's query and key after their
projections and before rotation (``self_attn.q_norm`` / ``k_norm``, one weight of ``head_dim`` shared by the heads,
computed in float32 as the other norms): ``TransformerConfig.qk_norm``. Biases follow ``attention_bias`` (none by
default); sliding-window attention per layer as Qwen2's.
"""

from __future__ import annotations

from torch import nn

from ._common import put_qk_norms
from .llama import llama_like
from .qwen2 import layer_windows

CLASSES = ("Qwen3ForCausalLM",)


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``Qwen3ForCausalLM``."""
    cfg, w = llama_like(model, sliding_window=layer_windows(model))
    put_qk_norms(model, cfg, w, per_head=True)
    return cfg, w
