"""TransformerLens 4.x ``TransformerBridge`` -> the Hugging Face model it wraps, in its own module layout.

A bridge wraps the Hugging Face model in place: each sub-module is replaced by a bridge component that keeps the
original as ``_original_component`` (and some components hold extra split copies of fused weights). This module
rebuilds a plain Hugging Face model of the same class whose parameters and buffers are the original modules'
tensors (shared, not copied), which the family converters then read. TransformerLens itself is never imported.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ._common import UnsupportedModelError

# Marks a bridge attention component that runs the Hugging Face attention module itself (TransformerLens'
# ``AttentionBridge`` only wraps it in hooks): the softmax is taken as that module's attention implementation takes it
HF_ATTENTION = "the Hugging Face attention module's"

# A TransformerBridge's attention components compute the attention themselves (their forward does not run the
# Hugging Face attention code), except AttentionBridge: the dtype each TransformerLens 4.x component takes its softmax
# in (None: the model's dtype; HF_ATTENTION: the Hugging Face module runs)
_BRIDGE_SOFTMAX_DTYPE: dict[str, torch.dtype | str | None] = {
    "PositionEmbeddingsAttentionBridge": torch.float32,  # Llama, Mistral, Qwen2: softmax(..., dtype=float32)
    "_SmolLM3AttentionBridge": torch.float32,  # SmolLM3: the Llama component, no rotary on NoPE layers
    "JointQKVPositionEmbeddingsAttentionBridge": None,  # GPT-NeoX, Phi-3, Falcon
    "JointQKVAttentionBridge": None,  # GPT-2
    "BloomAttentionBridge": torch.float32,  # BLOOM: softmax(..., dtype=float32), cast back to the model's dtype
    "AttentionBridge": HF_ATTENTION,  # GPT-J, GPT-Neo, OPT: hooks around the Hugging Face module's forward
}


def _bridge_softmax_dtype(bridge: nn.Module) -> torch.dtype | str | None:
    """The dtype the bridge's attention components take their softmax in (:data:`HF_ATTENTION` when they run the
    Hugging Face attention modules), or refuse for an unknown component or components that differ."""
    kinds = {
        type(m).__name__
        for m in bridge.modules()
        if any(c.__name__ == "AttentionBridge" for c in type(m).__mro__)
    }
    unknown = sorted(kinds - set(_BRIDGE_SOFTMAX_DTYPE))
    if unknown or not kinds:
        raise UnsupportedModelError(
            f"TransformerBridge attention components {unknown or 'none found'} are not supported: the bridge computes "
            f"the attention itself, and pypattern knows the softmax dtype of {sorted(_BRIDGE_SOFTMAX_DTYPE)} only"
        )
    dts = {_BRIDGE_SOFTMAX_DTYPE[k] for k in kinds}
    if len(dts) > 1:
        raise UnsupportedModelError(
            f"TransformerBridge attention components {sorted(kinds)} take their softmax in different dtypes"
        )
    return dts.pop()


def is_transformer_lens(model: Any) -> bool:
    """True for objects defined by the ``transformer_lens`` package."""
    return (type(model).__module__ or "").startswith("transformer_lens")


def _resolve(root: nn.Module, path: str) -> torch.Tensor:
    """The tensor at ``path`` (Hugging Face names) in a bridged module tree, stepping through every wrapper."""
    obj: Any = root
    for part in path.split("."):
        while "_original_component" in getattr(obj, "_modules", {}):
            obj = obj._modules["_original_component"]
        obj = getattr(obj, part)
    return obj


def unwrap_bridge(bridge: Any, supported: tuple[str, ...]) -> nn.Module:
    """The Hugging Face model inside a TransformerLens 4.x ``TransformerBridge``, rebuilt in its own layout.

    Parameters
    ----------
    bridge : transformer_lens.model_bridge.TransformerBridge
    supported : tuple of str
        Hugging Face class names that can be converted.

    Raises
    ------
    UnsupportedModelError
        When ``bridge`` is no ``TransformerBridge`` around a supported class, or its weights were processed
        (``enable_compatibility_mode`` / ``process_weights`` fold and centre them, so they no longer are the Hugging
        Face model's weights), or its attention components are not known (the bridge computes the attention itself,
        and the converted model takes the softmax in the dtype the bridge does: ``bridge_attn_softmax_dtype``).
    """
    name = type(bridge).__name__
    try:
        inner = bridge.original_model
    except AttributeError:
        inner = None
    if not isinstance(inner, nn.Module):
        raise UnsupportedModelError(
            f"model={name} (from {type(bridge).__module__}) is not supported: pypattern converts TransformerLens "
            f"4.x TransformerBridge models that wrap a local Hugging Face model of {supported}, and "
            "TransformerLens 2.x / 3.x HookedTransformer models"
        )
    cls_name = type(inner).__name__
    if cls_name not in supported:
        raise UnsupportedModelError(
            f"the TransformerBridge wraps {cls_name!r}, which is not supported; pypattern converts {supported}"
        )
    if getattr(bridge, "_weights_processed", False):
        raise UnsupportedModelError(
            "a TransformerBridge with processed weights (_weights_processed=True) is not supported: enable_compatibility_mode() / "
            "process_weights() folded or centred the weights, so they are no longer the Hugging Face model's; "
            "convert a bridge booted without weight processing (or enable_compatibility_mode(no_processing=True))"
        )
    with torch.device("meta"):
        clean = type(inner)(copy.deepcopy(inner.config))
    clean.eval()
    tensors = {}
    for pname, _ in clean.named_parameters(remove_duplicate=False):
        tensors[pname] = _resolve(inner, pname)
    for bname, _ in clean.named_buffers(remove_duplicate=False):
        tensors[bname] = _resolve(inner, bname)
    for full, t in tensors.items():
        mod_path, _, leaf = full.rpartition(".")
        mod = clean.get_submodule(mod_path) if mod_path else clean
        if leaf in mod._parameters:
            mod._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t
    # tied embeddings stay tied: both names resolve to the bridged model's one tensor
    clean.config._attn_implementation = getattr(inner.config, "_attn_implementation", None)
    # the converted model computes what the bridge's forward computes (read by _common.attn_softmax_dtype); where
    # the bridge runs the Hugging Face attention modules, their attention implementation decides, as for the model
    softmax_dtype = _bridge_softmax_dtype(bridge)
    if softmax_dtype != HF_ATTENTION:
        clean.bridge_attn_softmax_dtype = softmax_dtype
    return clean
