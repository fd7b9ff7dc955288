"""Hugging Face GPT-2-style models built from a config (no download), seen through TransformerLens hook names.

``transformers`` is optional: :func:`gpt2_from_config` raises ``ImportError`` (with the reason) when it is not
installed; :func:`gpt2_hook_points` and :class:`~pypattern.models.hooks.HookedModule` need nothing beyond torch.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from .hooks import HookedModule

__all__ = ["HAS_TRANSFORMERS", "gpt2_from_config", "gpt2_hook_points", "hooked_gpt2"]

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def gpt2_from_config(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_vocab: int = 64,
    n_ctx: int = 32,
    d_mlp: int | None = None,
    act_fn: str = "gelu_new",
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised ``transformers.GPT2LMHeadModel`` (built from a config: nothing is downloaded).

    Raises
    ------
    ImportError
        When ``transformers`` is not installed (it is not a dependency of pypattern).
    """
    if not HAS_TRANSFORMERS:
        raise ImportError(
            "gpt2_from_config needs the optional package `transformers` (pip install transformers)"
        )
    import torch
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=d_vocab,
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_inner=d_mlp,
        activation_function=act_fn,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    model.eval()
    return model


def gpt2_hook_points(n_layers: int, prefix: str = "transformer") -> dict[str, str]:
    """TransformerLens hook names -> module paths of a Hugging Face GPT-2 (``GPT2LMHeadModel``).

    ``blocks.{l}.hook_resid_pre`` is the input of ``h.{l}``, ``hook_resid_post`` its output,
    ``hook_attn_out`` the output of ``h.{l}.attn`` and ``hook_mlp_out`` the output of ``h.{l}.mlp``.
    """
    pts: dict[str, str] = {"hook_embed": f"{prefix}.wte", "hook_pos_embed": f"{prefix}.wpe"}
    for layer in range(n_layers):
        h = f"{prefix}.h.{layer}"
        pts[f"blocks.{layer}.hook_resid_pre"] = f"{h}:input"
        pts[f"blocks.{layer}.hook_attn_out"] = f"{h}.attn"
        pts[f"blocks.{layer}.hook_mlp_out"] = f"{h}.mlp"
        pts[f"blocks.{layer}.hook_resid_post"] = h
    return pts


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens).logits


def hooked_gpt2(model: nn.Module) -> HookedModule:
    """Wrap a ``GPT2LMHeadModel`` so that ``forward(tokens)`` returns logits and TL hook names work."""
    n_layers = model.config.n_layer
    pts = {k: "model." + v for k, v in gpt2_hook_points(n_layers).items()}
    return HookedModule(_LogitsOnly(model), pts, n_layers=n_layers)
