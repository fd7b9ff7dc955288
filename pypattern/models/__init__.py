"""pypattern's small transformer (TransformerLens names), hook points, and adapters for other models."""

from .hf import HAS_TRANSFORMERS, gpt2_from_config, gpt2_hook_points, hooked_gpt2
from .hooks import ActivationCache, HookedModule, HookedRootModule, HookPoint
from .transformer import Transformer, TransformerConfig, component_masks, list_components

__all__ = [
    "Transformer",
    "TransformerConfig",
    "component_masks",
    "list_components",
    "HookPoint",
    "HookedRootModule",
    "HookedModule",
    "ActivationCache",
    "HAS_TRANSFORMERS",
    "gpt2_from_config",
    "gpt2_hook_points",
    "hooked_gpt2",
]
