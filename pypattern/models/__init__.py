"""pypattern's transformer (TransformerLens names), hook points, converters from Hugging Face models, and adapters
for models kept in their own form."""

from .convert import UnsupportedModelError, from_hf, from_pretrained
from .hf import (
    HAS_TRANSFORMERS,
    HookedHF,
    gpt2_from_config,
    gpt2_hook_points,
    hf_hook_points,
    hooked_gpt2,
    hooked_hf,
)
from .hf_masks import hf_component_masks, hf_components
from .hooks import ActivationCache, HookedModule, HookedRootModule, HookPoint
from .transformer import Transformer, TransformerConfig, component_masks, list_components

__all__ = [
    "Transformer",
    "TransformerConfig",
    "component_masks",
    "list_components",
    "from_hf",
    "from_pretrained",
    "UnsupportedModelError",
    "HookPoint",
    "HookedRootModule",
    "HookedModule",
    "ActivationCache",
    "HAS_TRANSFORMERS",
    "gpt2_from_config",
    "gpt2_hook_points",
    "hooked_gpt2",
    "hooked_hf",
    "HookedHF",
    "hf_hook_points",
    "hf_component_masks",
    "hf_components",
]
