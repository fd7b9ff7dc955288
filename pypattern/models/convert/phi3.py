"""Phi-3 (``Phi3ForCausalLM``) -> pypattern ``Transformer``.

Llama's arithmetic (see :mod:`.llama`) with fused projections: ``qkv_proj`` rows are the queries, then the keys,
then the values (``n_heads``, ``n_kv_heads``, ``n_kv_heads`` heads of ``head_dim``); ``gate_up_proj`` rows the
gate, then the up projection. The rotary embedding may turn only the first ``partial_rotary_factor`` of each head;
``sliding_window`` applies to every layer. No biases.
"""

from __future__ import annotations

from torch import nn

from ._common import split_fused_gate_up
from .llama import llama_like

CLASSES = ("Phi3ForCausalLM",)


def _qkv(a: nn.Module) -> tuple:
    W = a.qkv_proj.weight
    b = a.qkv_proj.bias
    nq = a.config.num_attention_heads * a.head_dim
    nk = a.num_key_value_heads * a.head_dim
    cut = lambda t: (None,) * 3 if t is None else (t[:nq], t[nq : nq + nk], t[nq + nk :])  # noqa: E731
    return (*cut(W), *cut(b))


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``Phi3ForCausalLM``."""
    sw = getattr(model.config, "sliding_window", None)
    return llama_like(model, sliding_window=sw, qkv=_qkv, mlp=split_fused_gate_up, partial_rotary=True)
