"""Corruptions: what the counterfactual ("corrupted") input is, or what replaces an activation.

- :class:`TokenReplacement`: user-given corrupted prompts (symmetric token replacement, recommended); see
  :func:`pypattern.tasks.symmetric_pairs` to build them.
- :class:`GaussianNoise`: the clean prompt with Gaussian noise added to the token embeddings of chosen
  positions (default: every position), standard deviation ``3 x`` the standard deviation of the token embeddings
  over the vocabulary as the model reads them (``hook_embed``: after an embedding scale or an embedding
  LayerNorm), seeded.
- :class:`ZeroAblation`, :class:`MeanAblation`: replace activations by zeros or by their mean over a
  reference batch (noising only; the mean over its real tokens only given its ``attention_mask``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import is_real
from .sites import _ints

__all__ = [
    "TokenReplacement",
    "GaussianNoise",
    "ZeroAblation",
    "MeanAblation",
    "Corruption",
    "embedding_noise_hook",
    "noise_under_mask",
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
    """Noise on the token embeddings (``hook_embed``) of ``positions``.

    ``positions``: the positions noised, the same for every example (an int, or a sequence, 1-D tensor or array of
    ints; negative ones count from the end); or one sequence of positions per example (a ``(batch, k)`` tensor or
    array, or a list of ``batch`` sequences, which may differ in length: each example's subject tokens, say).
    None (the default) noises every position of every example, including the position the metric reads.

    ``std = std_multiplier *`` (default 3) the standard deviation of the embedded tokens over the whole vocabulary
    as ``hook_embed`` sees them (``W_E.std()`` for a plain lookup; with Gemma's ``embed_scale`` or BLOOM's embedding
    LayerNorm, of their output) unless ``std`` is given. This departs from ROME's causal tracing (Meng et al.,
    2022), which takes 3 x the standard deviation of the embeddings of the data's subject tokens: the default here
    does not depend on the prompts; give ``std=`` for ROME's value. The noise is drawn once from ``seed`` with
    shape ``(batch, pos, d_model)`` (zero outside ``positions``) and reused for every cell.

    Under a patching call's ``attention_mask`` with padding, positions count each row's real tokens: ``p`` is the
    row's ``p``-th real token (``-1`` its last), whichever side it is padded on, and a position past a row's real
    tokens is refused naming the row; None noises every real token and never the padding. The draw is keyed by
    the row and the real token's position: row ``b``'s ``p``-th real token takes the draw at ``[b, p]`` of the
    ``(batch, pos, d_model)`` draw, as the ``p``-th column of an unpadded batch does. So left- and right-padded
    copies of a batch get the same noise at every real token, a right-padded batch the same as without its mask,
    and each row of a padded batch computes what its prompt alone computes given that row's noise (the first row:
    the same ``seed`` alone; another row ``b`` alone draws row 0's noise, so give it ``[b, :n]`` of the batch's
    draw to compare).
    """

    positions: list | int | torch.Tensor | None = None
    std_multiplier: float = 3.0
    seed: int = 0
    std: float | None = None

    def __post_init__(self) -> None:
        for name, v in (("std_multiplier", self.std_multiplier), ("std", self.std)):
            if v is None and name == "std":
                continue
            if not is_real(v):  # numpy's numbers too (np.float32 is no Python float)
                raise TypeError(
                    f"GaussianNoise.{name}={v!r} is not valid: a {type(v).__name__}; give a finite number >= 0 (a "
                    "Python or numpy int or float)"
                )
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"GaussianNoise.{name}={v!r} is not valid; give a finite number >= 0")
            setattr(self, name, float(v))
        # the seed of torch.Generator.manual_seed: an integer (numpy's too) in 0 .. 2**64 - 1
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise TypeError(f"GaussianNoise.seed={self.seed!r} is not valid; give an int")
        if not 0 <= int(self.seed) < 2**64:
            raise ValueError(
                f"GaussianNoise.seed={self.seed!r} is out of range; give an int in 0 .. 2**64 - 1"
            )
        self.seed = int(self.seed)

    #: the prompts' attention mask (bool ``(batch, pos)``, with padding) the noise is placed under: set on a copy
    #: by :func:`noise_under_mask`; None places it by columns. A plain attribute, not a field: no argument of the
    #: constructor, and not part of a checkpoint's fingerprint (which holds the mask itself)
    _attention_mask = None

    def noise(self, model, batch: int, seq_len: int, d_model: int, dtype: torch.dtype) -> torch.Tensor:
        """The noise ``(batch, seq_len, d_model)`` in ``dtype`` on the CPU, added to ``hook_embed``'s output."""
        mask = self._attention_mask
        if mask is not None and tuple(mask.shape) != (batch, seq_len):
            raise ValueError(
                f"GaussianNoise: its attention_mask has shape {tuple(mask.shape)}; the prompts are ({batch}, "
                f"{seq_len})"
            )
        lengths = None if mask is None else mask.sum(1).tolist()
        if self.positions is not None:
            keep = _noise_mask(self.positions, batch, seq_len, lengths)
        elif mask is not None:  # every real token: the first n of the real-token index of each row
            keep = torch.arange(seq_len)[None, :] < mask.sum(1, keepdim=True)
        else:
            keep = None
        if self.std is not None:
            std = self.std
        else:
            emb = getattr(model, "embed", None)
            W_E = getattr(emb, "W_E", None)
            if W_E is None:  # a Hugging Face model (wrapped for its hooks): its input embedding module
                inner = getattr(model, "hf_model", model)
                get = getattr(inner, "get_input_embeddings", None)
                emb = get() if callable(get) else None
                W_E = getattr(emb, "weight", None)
                if not isinstance(W_E, torch.Tensor) or W_E.dim() != 2:
                    raise ValueError(
                        "GaussianNoise needs std=... for this model: it has neither pypattern's embed.W_E nor a "
                        "Hugging Face input embedding (get_input_embeddings()) to take the default from"
                    )
                # a plain lookup reads W_E; another module (Gemma's scaled embedding) is run over the vocabulary
                std = self.std_multiplier * _embedded_std(emb, W_E, plain=type(emb) is torch.nn.Embedding)
            else:
                std = self.std_multiplier * _embedded_std(emb, W_E)
        # drawn on the CPU whatever the model's device (the same noise on every device); the hook
        # (embedding_noise_hook) moves it to the embedding's device
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(batch, seq_len, d_model, generator=g, dtype=torch.float64, device="cpu") * std
        if keep is not None:
            noise = noise * keep[:, :, None]
        if mask is not None:
            # indexed by real token so far: each real column takes the entry of its real position, padding none
            from ..models.transformer import real_token_positions

            idx = real_token_positions(mask).clamp(min=0)
            noise = noise.gather(1, idx[:, :, None].expand(-1, -1, d_model)) * mask[:, :, None]
        noise = noise.to(dtype)
        if not bool(torch.isfinite(noise).all()):
            raise ValueError(
                f"GaussianNoise: a standard deviation of {std:g} gives noise that is not finite in {dtype} (the "
                "corrupted run would be NaN): give a smaller std or std_multiplier"
            )
        return noise


def noise_under_mask(noise: GaussianNoise, keep: torch.Tensor | None) -> GaussianNoise:
    """``noise`` placed under the patching mask ``keep`` (bool ``(batch, pos)``): a copy whose positions count
    each row's real tokens and whose draw lands on them only (:class:`GaussianNoise`); ``noise`` itself without a
    mask or under one without padding (its columns are then the real tokens)."""
    if keep is None or bool(keep.all()):
        return noise
    out = copy.copy(noise)
    out._attention_mask = keep.detach().to("cpu", torch.bool)
    return out


def _noise_mask(positions, batch: int, seq_len: int, lengths: list[int] | None = None) -> torch.Tensor:
    """``(batch, seq_len)`` bool on the CPU: where :class:`GaussianNoise` ``positions`` (shared by the examples, or
    one sequence per example) put noise; refused by name when out of range or of another shape. ``lengths``: each
    row's number of real tokens under an attention mask: the positions then count them (index ``p`` of row ``b``:
    its ``p``-th real token, a negative one from its last), and must fall among them."""
    name = "GaussianNoise.positions"
    ndim = getattr(positions, "ndim", None)  # a tensor's or an array's
    if ndim is not None:
        if ndim > 2:
            raise ValueError(
                f"{name} has shape {tuple(positions.shape)}; give positions shared by all examples (an int or a 1-D "
                f"sequence) or one row per example ({batch}, k)"
            )
        rows = list(positions) if ndim == 2 else None
    elif isinstance(positions, list | tuple) and any(
        isinstance(p, list | tuple) or getattr(p, "ndim", 0) >= 1 for p in positions
    ):
        rows = list(positions)
    else:
        rows = None
    keep = torch.zeros(batch, seq_len, dtype=torch.bool, device="cpu")
    if rows is None:  # the same positions in every example
        pos = _ints(positions, name)
        if lengths is None:
            _in_range(pos, name, seq_len)
            keep[:, pos] = True
        else:
            for b, n in enumerate(lengths):
                keep[b, _real_index(pos, name, b, n)] = True
        return keep
    if len(rows) != batch:
        raise ValueError(
            f"{name} gives positions for {len(rows)} examples (one sequence per example); the prompts are {batch}: "
            "give one sequence of positions per prompt, or a 1-D sequence of positions shared by all of them"
        )
    for b, row in enumerate(rows):
        if isinstance(row, int) or getattr(row, "ndim", 1) == 0:
            raise TypeError(
                f"{name}[{b}]={row!r} is not a sequence: give every example its sequence of positions, or a flat "
                "sequence of positions shared by all examples"
            )
        pos = _ints(row, f"{name}[{b}]")
        if lengths is None:
            _in_range(pos, f"{name}[{b}]", seq_len)
            keep[b, pos] = True
        else:
            keep[b, _real_index(pos, f"{name}[{b}]", b, lengths[b])] = True
    return keep


def _in_range(pos: list[int], name: str, seq_len: int) -> None:
    bad = [p for p in pos if not -seq_len <= p < seq_len]
    if bad:
        raise ValueError(f"{name} contains {bad}: out of range for prompts of {seq_len} positions")


def _real_index(pos: list[int], name: str, row: int, n: int) -> list[int]:
    """The positions ``pos`` of row ``row``, which has ``n`` real tokens, as indices ``0 .. n - 1`` of its real
    tokens (a negative one counts from its last); one past its real tokens is refused naming the row."""
    bad = [p for p in pos if not -n <= p < n]
    if bad:
        raise ValueError(
            f"{name} contains {bad}: under attention_mask positions count each row's real tokens, and row {row} has "
            f"{n} (positions {-n} .. {n - 1})"
        )
    return [p % n for p in pos]


@torch.no_grad()
def _embedded_std(emb, W_E: torch.Tensor, plain: bool | None = None) -> float:
    """Standard deviation (over every token and dimension) of the embedding as ``hook_embed`` reads it: of
    ``W_E`` itself for a plain lookup, else of ``emb(token)`` over the vocabulary (in chunks, float64 sums).
    ``plain``: whether ``emb`` is a plain lookup (default: pypattern's embedding without a scale or a norm)."""
    if plain is None:
        plain = getattr(emb, "scale", None) is None and not hasattr(emb, "ln")
    if plain:
        return float(W_E.detach().double().std())
    V = W_E.shape[0]
    n, s1, s2 = 0, 0.0, 0.0
    for a in range(0, V, 8192):
        x = emb(torch.arange(a, min(a + 8192, V), device=W_E.device)).double()
        n, s1, s2 = n + x.numel(), s1 + float(x.sum()), s2 + float((x * x).sum())
    mean = s1 / n
    return max(s2 / n - mean * mean, 0.0) ** 0.5 * (n / max(n - 1, 1)) ** 0.5


@dataclass
class ZeroAblation(Corruption):
    """Replace the activation by zeros."""

    is_ablation = True


@dataclass
class MeanAblation(Corruption):
    """Replace the activation by its mean over ``reference_tokens`` (default: the clean batch), per position.

    ``attention_mask``: ``(batch, pos)`` of the reference batch (the clean batch when ``reference_tokens`` is None),
    1 at a real token and 0 at padding (bool, int or float values 0 and 1), padded on the right; given, the mean at
    position ``t`` is over the prompts real at ``t`` only, so it does not depend on the pad token. A position where
    no prompt is real gets 0 (a mean over no prompt): with right padding it follows every real token of the batch,
    so patching it cannot change a metric read at a real position of that batch. Without a mask the mean at a
    position takes every prompt, padding or not (unless the call's ``attention_mask`` gives it): over right-padded prompts, a
    position where some prompts are padding averages their padding's activations into the value patched into the
    others, so the result depends on the pad token. A tokenizer's output (a mapping with ``input_ids`` and
    ``attention_mask``, right-padded) may be given as ``reference_tokens``: its mask is then the mean's. Other
    remedy: give ``reference_tokens`` of prompts real at every position (any number of them, of the prompts'
    length: reference prompts of another length are refused). Reference prompts given with their mask may be padded past the model's learned positions when
    each row's real tokens fit them (they then run under that mask, each row's real tokens at positions
    ``0 .. n-1``). The mask is read by :func:`~pypattern.patching.activation_patching`,
    :func:`~pypattern.patching.attribution_patching` and ``shortlist_and_confirm``.
    """

    reference_tokens: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    is_ablation = True

    def __post_init__(self) -> None:
        r = self.reference_tokens
        if isinstance(r, Mapping):
            r = self._from_mapping(r)
        if r is not None and (not isinstance(r, torch.Tensor) or r.dim() != 2 or r.shape[0] == 0):
            raise ValueError(
                "MeanAblation.reference_tokens must be a (batch, pos) tensor of at least one prompt (a mean over "
                f"no prompt is undefined), got {getattr(r, 'shape', r)!r}"
            )
        if self.attention_mask is not None:
            # named as the user gave it: the argument, or the tokenizer output's entry
            name = getattr(self, "_mask_name", "MeanAblation.attention_mask")
            self.attention_mask = mean_mask(self.attention_mask, name, None if r is None else tuple(r.shape))

    def _from_mapping(self, enc: Mapping) -> torch.Tensor:
        """A tokenizer's output given as ``reference_tokens``: its ``input_ids`` are the reference prompts and its
        ``attention_mask`` the mean's mask."""
        name = "MeanAblation.reference_tokens"
        if "input_ids" not in enc:
            raise TypeError(f"{name} is a mapping without 'input_ids' (keys {sorted(enc)}); give token ids")
        am = enc.get("attention_mask")
        if am is not None and self.attention_mask is not None:
            raise ValueError(
                f"{name} holds an attention_mask and MeanAblation.attention_mask is given too: give one of them"
            )
        ids = enc["input_ids"]
        self.reference_tokens = (
            ids if isinstance(ids, torch.Tensor) else _as_tensor(ids, f"{name}['input_ids']")
        )
        if am is not None:
            self._mask_name = f"{name}['attention_mask']"
            self.attention_mask = am if isinstance(am, torch.Tensor) else _as_tensor(am, self._mask_name)
        return self.reference_tokens


def _as_tensor(v, name: str) -> torch.Tensor:
    try:  # a tokenizer's lists (return_tensors=None) or NumPy arrays (return_tensors="np")
        return torch.as_tensor(np.asarray(v))
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} is not a (batch, pos) array ({type(v).__name__}): {e}") from None


def mean_mask(mask, argument: str, shape: tuple | None = None) -> torch.Tensor:
    """A mean ablation's mask ``(batch, pos)`` of 0 (padding) and 1 (a real token), padded on the right, as bool;
    refused naming ``argument`` when it is not a tensor, is not 2-D or of ``shape`` (given), holds other values, or
    has a real token after a padding position (left padding: the real tokens' activations would be those of
    prompts that attend to their padding)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{argument} is a {type(mask).__name__}; give a (batch, pos) tensor of 0 and 1")
    if mask.is_meta or mask.is_complex():
        raise TypeError(
            f"{argument} is a {mask.dtype} tensor on {mask.device}; give a (batch, pos) tensor of 0 and 1"
        )
    if mask.dim() != 2 or (shape is not None and tuple(mask.shape) != tuple(shape)):
        want = "(batch, pos)" if shape is None else f"{tuple(shape)}, the shape of the prompts it masks"
        raise ValueError(f"{argument} has shape {tuple(mask.shape)}; give {want}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(
            f"{argument} must hold 1 (a real token) or 0 (padding), got the value {bad!r} (a {mask.dtype} tensor of "
            f"shape {tuple(mask.shape)})"
        )
    m = mask != 0
    left = m[:, 1:] & ~m[:, :-1]  # a real token after a padding position
    if bool(left.any()):
        row = int(left.any(-1).nonzero()[0, 0])
        raise ValueError(
            f"{argument} is left-padded (row {row} has padding before its real tokens): a mean per position would "
            "mix the prompts' tokens at other positions; pad on the right (tokenizer.padding_side = 'right')"
        )
    return m


def position_axis(name: str) -> int:
    """The position axis of hook ``name``'s activation, the one a per-position mean is taken along: the query axis
    of an attention pattern or its scores ``(batch, head, query, key)``, else 1 (``(batch, pos, ...)``)."""
    return 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, batch_dim: int, pos_dim: int) -> torch.Tensor:
    """The mean of ``x`` over ``batch_dim`` (kept, of size 1), over the prompts ``mask (batch, pos)`` (bool) says
    are real at each position of ``pos_dim``: 0 where none is; the plain mean without a mask or with every entry
    of it 1. Summed in at least float32, returned in ``x``'s dtype."""
    if mask is None or bool(mask.all()):  # every prompt real everywhere: the plain mean
        return x.mean(batch_dim, keepdim=True)
    shape = [1] * x.dim()
    shape[batch_dim], shape[pos_dim] = mask.shape
    w = mask.to(device=x.device).reshape(shape)
    acc = torch.promote_types(x.dtype, torch.float32)
    n = w.sum(batch_dim, keepdim=True, dtype=acc).clamp(min=1)
    # the padding's values left out (not multiplied by 0: an infinite one would give NaN)
    kept = torch.where(w, x, x.new_zeros(()))
    return (kept.sum(batch_dim, keepdim=True, dtype=acc) / n).to(x.dtype)


def embedding_noise_hook(noise: torch.Tensor):
    """A forward hook for ``hook_embed`` that adds ``noise (batch, pos, d_model)`` (cut to the prompt length), in
    the embedding's dtype and on its device (the noise is drawn on the CPU: moved once per device and dtype, not on
    every forward)."""
    moved: dict = {}

    def fn(x, hook):
        key = (x.device, x.dtype)
        if key not in moved:
            moved[key] = noise.to(device=x.device, dtype=x.dtype)
        return x + moved[key][:, : x.shape[1]]

    return fn
