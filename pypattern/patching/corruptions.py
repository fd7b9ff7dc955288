"""Corruptions: what the counterfactual ("corrupted") input is, or what replaces an activation.

- :class:`TokenReplacement`: user-given corrupted prompts (symmetric token replacement, recommended); see
  :func:`pypattern.tasks.symmetric_pairs` to build them.
- :class:`GaussianNoise`: the clean prompt with Gaussian noise added to the token embeddings of chosen
  positions, standard deviation ``3 x`` the standard deviation of the token embeddings, seeded.
- :class:`ZeroAblation`, :class:`MeanAblation`: replace activations by zeros or by their mean over a
  reference batch (noising only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TokenReplacement",
    "GaussianNoise",
    "ZeroAblation",
    "MeanAblation",
    "Corruption",
    "embedding_noise_hook",
]


class Corruption:
    """Base class of corruptions."""

    is_ablation = False


@dataclass
class TokenReplacement(Corruption):
    """Corrupted prompts ``(batch, pos)`` of the same shape as the clean ones."""

    corrupted_tokens: torch.Tensor


@dataclass
class GaussianNoise(Corruption):
    """Noise on the token embeddings (``hook_embed``) of ``positions`` (None: all positions).

    ``std = std_multiplier * W_E.std()`` unless ``std`` is given; the noise is drawn once from ``seed`` with
    shape ``(batch, pos, d_model)`` (zero outside ``positions``) and reused for every cell.
    """

    positions: list | int | None = None
    std_multiplier: float = 3.0
    seed: int = 0
    std: float | None = None

    def noise(self, model, batch: int, seq_len: int, d_model: int, dtype: torch.dtype) -> torch.Tensor:
        if self.std is not None:
            std = self.std
        else:
            W_E = getattr(getattr(model, "embed", None), "W_E", None)
            if W_E is None:
                raise ValueError("GaussianNoise needs std=... for a model without embed.W_E")
            std = self.std_multiplier * float(W_E.detach().double().std())
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(batch, seq_len, d_model, generator=g, dtype=torch.float64) * std
        if self.positions is not None:
            pos = [self.positions] if isinstance(self.positions, int) else list(self.positions)
            keep = torch.zeros(seq_len, dtype=torch.bool)
            keep[pos] = True
            noise = noise * keep[None, :, None]
        return noise.to(dtype)


@dataclass
class ZeroAblation(Corruption):
    """Replace the activation by zeros."""

    is_ablation = True


@dataclass
class MeanAblation(Corruption):
    """Replace the activation by its mean over ``reference_tokens`` (default: the clean batch), per position."""

    reference_tokens: torch.Tensor | None = None
    is_ablation = True


def embedding_noise_hook(noise: torch.Tensor):
    """A forward hook for ``hook_embed`` that adds ``noise (batch, pos, d_model)`` (cut to the prompt length)."""

    def fn(x, hook):
        return x + noise[:, : x.shape[1]].to(x.dtype)

    return fn
