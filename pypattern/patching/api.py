"""Activation patching: the public entry point (exact engine or the naive one-forward-per-cell loop)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import compiled_inner, is_count, is_real, model_device, refuse_meta, refuse_meta_model
from .._progress import progress_bar, sigterm_as_interrupt
from ..losses import position_limit
from .corruptions import (
    Corruption,
    GaussianNoise,
    MeanAblation,
    TokenReplacement,
    ZeroAblation,
    embedding_noise_hook,
    masked_mean,
    mean_mask,
    noise_under_mask,
    position_axis,
)
from .engine import ExactEngine, cells_that_fit, metric_of_rows, truncate_cache, unembed_rows
from .inert import inert_cells, set_inert
from .metrics import (
    Metric,
    bind_metric,
    check_metric_on_stacks,
    finite_examples,
    logits_at,
    metric_on,
    metric_positions,
    no_op_causes,
    one_prompt,
    result_name,
    same_prompts,
    warn_no_op,
    warn_nonfinite_examples,
)
from .results import PatchResult
from .sites import HEAD_SITES, Cell, apply_patch, check_site, hook_name, make_cells, site_heads

__all__ = ["activation_patching", "prepare_runs", "PatchingRuns", "engine_batch"]


@dataclass
class PatchingRuns:
    """The target and source runs of one patching experiment (built by :func:`prepare_runs`).

    Attributes
    ----------
    tokens : LongTensor ``(batch, pos)``
        The target run's prompts (corrupted for denoising, clean for noising).
    noise : Tensor ``(batch, pos, d_model)`` or None
        Embedding noise of the target run (Gaussian-noise corruption, denoising).
    cache : dict
        The target run's activations by hook name.
    source : dict
        The activations patched in, by hook name, ``(batch, pos, ...)``.
    m_clean, m_corr : Tensor ``(batch,)``
        The metric on the clean and the corrupted run (``m_corr`` None for ablations).
    pos : int or LongTensor ``(batch,)``
        Where the metric reads the logits (non-negative).
    T, B : int
        Prompt length and batch size.
    coupled : bool
        Whether the metric relates the examples of a run (an example's value moves when another example's logits
        do, e.g. a metric centred over the batch): a patch that leaves one example's logits alone may then still
        move its value.
    keep : BoolTensor ``(batch, pos)`` or None
        The prompts' attention mask (True: a real token), None without one.
    masking : dict
        The keywords every forward of the runs took for the mask (``attention_mask`` and ``position_ids``; empty
        without padding, or where the runs are those of the exact engine over right-padded prompts).
    """

    tokens: torch.Tensor
    noise: torch.Tensor | None
    cache: dict
    source: dict
    m_clean: torch.Tensor
    m_corr: torch.Tensor | None
    pos: int | torch.Tensor
    T: int
    B: int
    coupled: bool = False
    keep: torch.Tensor | None = None
    masking: dict = dataclasses.field(default_factory=dict)

    @property
    def metric_rows(self) -> int:
        """Rows up to the last metric position, the only ones a patched run needs: ``max(pos) + 1``."""
        return (self.pos if isinstance(self.pos, int) else int(self.pos.max())) + 1


def _hooked_if_hf(model):
    """A Hugging Face causal LM (an object with ``config.model_type`` and input embeddings) wrapped by
    :func:`~pypattern.models.hooked_hf` (a family it has no layout for, by its residual stream alone); a TransformerLens
    ``HookedTransformer`` or bridge, or a Hugging Face model of a family the adapter does not cover but the converters do,
    converted with :func:`~pypattern.from_hf` (a HookedTransformer that does not convert runs through its own
    hooks); any other model as it is."""
    from ..models.convert import UnsupportedModelError, from_hf
    from ..models.convert.hooked_transformer import is_hooked_transformer
    from ..models.convert.transformer_lens import is_transformer_lens
    from ..models.hf import HookedHF, hooked_hf, is_hf_causal_lm, unwrap_hf
    from ..models.transformer import Transformer

    refuse_meta_model(model, needs="patching runs it", offloaded_ok=True)
    if isinstance(compiled_inner(model), Transformer):  # torch.compile's wrapper of pypattern's model
        return compiled_inner(model)
    if is_hooked_transformer(model) or is_transformer_lens(model):
        # the same function in pypattern's model: head sites and the exact engine, and the hook points'
        # TransformerLens meaning (a bridge's hook_resid_mid is its ln2's input: writing it moves only the MLP's
        # input, not the residual stream)
        try:
            return from_hf(model)
        except UnsupportedModelError:
            return model  # TransformerLens' own hooks, one forward per cell
    if isinstance(model, (Transformer, HookedHF)) or hasattr(model, "hook_dict"):
        return model
    # a Hugging Face model inside a wrapper that holds it unchanged (nn.DataParallel, a PEFT-style .base_model; one
    # with parameters of its own is refused)
    inner, _ = unwrap_hf(model)
    if isinstance(inner, HookedHF):
        return inner  # the adapter inside a wrapper
    if not is_hf_causal_lm(inner):
        return model
    from ..models.convert import SUPPORTED_CLASSES
    from ..models.hf import HF_ARCHS

    if (
        getattr(inner.config, "model_type", None) not in HF_ARCHS
        and type(inner).__name__ in SUPPORTED_CLASSES
    ):
        return from_hf(inner)  # no native adapter (OPT, Granite, BLOOM, Falcon): the same function, converted
    return hooked_hf(model)


def _generic_note(model) -> str | None:
    """For a Hugging Face model seen through :func:`~pypattern.models.hooked_hf` that :func:`~pypattern.from_hf`
    does not convert (a family read by its residual stream alone, :func:`~pypattern.models.hf.generic_hf_arch`, or
    one with a layout but no converter, as Cohere), what the adapter reads, for an error about a site it does not
    have; None for any other model."""
    from ..models.convert import SUPPORTED_CLASSES
    from ..models.hf import HookedHF

    if not isinstance(model, HookedHF):
        return None
    arch = model.arch
    sites = sorted({n.split(".hook_")[-1] for n in model.hook_dict if n.startswith("blocks.")})
    if arch.generic:
        return (
            f"model_type={arch.model_type!r} has no layout of its own in pypattern.hooked_hf, which reads its "
            f"residual stream only (sites {', '.join(sites)})"
        )
    cls = type(model.hf_model).__name__
    if cls in SUPPORTED_CLASSES:
        return None
    return (
        f"pypattern.from_hf does not convert {cls}; pypattern.hooked_hf gives it the sites {', '.join(sites)}"
    )


def _layers(model) -> int:
    n = model.cfg.n_layers if hasattr(model, "cfg") else getattr(model, "n_layers", None)
    if not is_count(n):
        raise ValueError(
            "the model has no number of layers: wrap it as pypattern.models.HookedModule(module, hook_points, "
            "n_layers=...)"
        )
    return int(n)


def resolve_corruption(corrupted_tokens, corruption):
    """The corruption of a run: ``TokenReplacement(corrupted_tokens)`` or ``corruption``; both or neither is an
    error (a corruption given next to corrupted tokens would otherwise be ignored)."""
    if corrupted_tokens is not None:
        if corruption is not None:
            raise ValueError(
                f"corrupted_tokens and corruption={type(corruption).__name__}(...) are both given: the run is "
                "ambiguous; give corrupted_tokens (token replacement) or corruption, not both"
            )
        return TokenReplacement(corrupted_tokens)
    if corruption is None:
        raise ValueError(
            "give corrupted_tokens=... or corruption=GaussianNoise()/ZeroAblation()/MeanAblation()"
        )
    if not isinstance(corruption, Corruption):
        raise TypeError(
            f"corruption={corruption!r} is not a corruption; give GaussianNoise(), ZeroAblation() or MeanAblation() "
            "(or corrupted_tokens=... for token replacement)"
        )
    return corruption


def warn_if_no_op(call: str, clean_tokens, corrupted_tokens, corruption, metric, keep=None) -> None:
    """Warn, once for the call ``call``, when its corruption changes nothing (corrupted prompts equal to the clean
    ones; a mean ablation over one prompt, the clean one; Gaussian noise of standard deviation 0) or its metric is
    0 on every run (a ``LogitDiff`` whose answer and wrong tokens are the same): every effect is then 0 whatever
    the model (see
    :func:`~pypattern.patching.metrics.no_op_causes`). ``keep``: the prompts' attention mask (bool ``(batch,
    pos)``, :func:`patching_mask`) or None; under it the prompts are compared at their real tokens only (the
    padding's ids reach no real token: corrupted prompts that differ from the clean ones at padding only change
    nothing). Arguments the call refuses are left to its checks."""
    if corrupted_tokens is not None and corruption is not None:
        return  # ambiguous: refused by resolve_corruption
    same = corrupted_tokens is not None and (
        same_prompts(clean_tokens, corrupted_tokens)
        or _same_real_tokens(clean_tokens, corrupted_tokens, keep)
    )
    mean_of_one = None
    if corrupted_tokens is None and isinstance(corruption, MeanAblation):
        ref = corruption.reference_tokens if corruption.reference_tokens is not None else clean_tokens
        if one_prompt(ref, clean_tokens):
            mean_of_one = int(ref.shape[0])
        elif corruption.reference_tokens is None and _one_real_prompt(clean_tokens, corruption, keep):
            mean_of_one = int(ref.shape[0])
    hint = " (or MeanAblation(reference_tokens=...) with other prompts)"
    no_noise = (
        corrupted_tokens is None
        and isinstance(corruption, GaussianNoise)
        and (corruption.std == 0 if corruption.std is not None else corruption.std_multiplier == 0)
    )
    causes = no_op_causes(metric, same=same, mean_of_one=mean_of_one, mean_hint=hint, no_noise=no_noise)
    warn_no_op(call, causes, "effect")


def _same_real_tokens(clean, other, keep) -> bool:
    """Whether the token tensors ``clean`` and ``other`` hold the same ids at every real token of the mask ``keep``
    (bool ``(batch, pos)`` of their shape; False without one or for anything else: left to the caller's checks)."""
    if keep is None or not (isinstance(clean, torch.Tensor) and isinstance(other, torch.Tensor)):
        return False
    if (
        clean.is_meta
        or other.is_meta
        or clean.shape != other.shape
        or tuple(clean.shape) != tuple(keep.shape)
    ):
        return False
    a, b = clean.detach().cpu(), other.detach().cpu()
    return bool(((a == b) | ~keep.cpu()).all())


def _one_real_prompt(clean, corruption, keep) -> bool:
    """Whether a mean ablation over the clean prompts ``clean (batch, pos)``, taken under its mask (its own
    ``attention_mask``, else the prompts' ``keep``), averages copies of one prompt: every row with the same mask
    row and the same ids at its real tokens (the padding's ids are left out of the mean)."""
    mask = corruption.attention_mask if corruption.attention_mask is not None else keep
    if mask is None or not isinstance(clean, torch.Tensor) or clean.is_meta or clean.dim() != 2:
        return False
    mask = torch.as_tensor(mask).detach().cpu() != 0
    if tuple(mask.shape) != tuple(clean.shape) or clean.shape[0] == 0:
        return False
    t = clean.detach().cpu()
    return bool((mask == mask[:1]).all()) and bool(((t == t[:1]) | ~mask).all())


def check_corruption_tokens(corruption, d_vocab: int | None, shape: tuple) -> None:
    """Check the token ids a corruption carries (corrupted or reference prompts)."""
    if isinstance(corruption, TokenReplacement):
        check_tokens(corruption.corrupted_tokens, "corrupted_tokens", d_vocab, shape)
    elif isinstance(corruption, MeanAblation) and corruption.reference_tokens is not None:
        ref = check_tokens(corruption.reference_tokens, "MeanAblation.reference_tokens", d_vocab)
        if ref.shape[1] != shape[1]:
            raise ValueError(
                f"MeanAblation.reference_tokens has shape {tuple(ref.shape)}; it must have the prompts' "
                f"length {shape[1]}"
            )
    if isinstance(corruption, MeanAblation) and corruption.attention_mask is not None:
        ref = corruption.reference_tokens
        # the mask of the reference prompts, or of the clean prompts (checked against the reference at construction)
        mean_mask(
            corruption.attention_mask, "MeanAblation.attention_mask", shape if ref is None else ref.shape
        )


def check_tokens(
    tokens, argument: str, d_vocab: int | None, shape: tuple | None = None, n_ctx: int | None = None
) -> torch.Tensor:
    """Refuse prompts that are not an integer ``(batch, pos)`` tensor of ids in ``0 .. d_vocab - 1`` (a negative
    id would otherwise be read from the end of the vocabulary), or longer than ``n_ctx`` learned positions. The
    prompts are returned as ``torch.long`` (ids of any integer dtype are ids: a uint8 tensor used as an index would
    be a mask)."""
    if isinstance(tokens, Mapping):
        raise TypeError(_mapping_prompts(tokens, argument))
    check_token_tensor(tokens, argument, "(batch, pos)", any_int=True)
    if tokens.dim() != 2:
        raise ValueError(f"{argument} has shape {tuple(tokens.shape)}; give (batch, pos)")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{argument} has shape {tuple(tokens.shape)}: give at least one prompt of one token")
    if shape is not None and tuple(tokens.shape) != tuple(shape):
        raise ValueError(
            f"{argument} has shape {tuple(tokens.shape)}; it must equal the clean shape {tuple(shape)}"
        )
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise ValueError(
            f"{argument} has {tokens.shape[1]} positions; the model has {n_ctx} learned positions (n_ctx): give "
            f"prompts of at most {n_ctx} tokens"
        )
    check_token_ids(tokens, argument, d_vocab)
    return tokens.long()


def _mapping_prompts(tokens: Mapping, argument: str) -> str:
    """Why prompts given as a tokenizer's output (a ``BatchEncoding`` or dict) are refused by a function that takes
    no attention mask (the callers of :func:`check_tokens`: the circuits' engine, whose prompts are named
    ``clean``/``corrupted`` and which the circuit functions hand tensors and a mask, and the others), and what to
    give."""
    if argument in ("clean", "corrupted"):
        return (
            f"{argument} is a {type(tokens).__name__}; the circuits' runs (pypattern.circuits.engine.prepare_runs) "
            "take a LongTensor (batch, pos) of token ids, with the mask as attention_mask=...: give its input_ids "
            "and attention_mask apart, or call a circuit function (patch_edges, edge_attribution, faithfulness, "
            "pruning_curve, acdc), which takes a tokenizer's output, or attention_mask=..., left padding included "
            "(each row's values are those of its prompt alone; the metric must read real tokens, and "
            "ablation='mean' needs right padding)"
        )
    msg = (
        f"{argument} is a {type(tokens).__name__}; give a LongTensor (batch, pos) of token ids. This function takes"
        " no attention mask: pass the input_ids of unpadded prompts of one length, or of right-padded "
        "prompts with the metric read at each example's last real position (a Metric's per-example position, e.g. "
        "LogitDiff(answer, wrong, position=attention_mask.sum(1) - 1)); left padding changes the numbers (each "
        "prompt's real tokens attend to its padding, at shifted positions). activation_patching, "
        "attribution_patching and the circuit functions take a tokenizer's output, or attention_mask=..., left "
        "padding included"
    )
    am = tokens.get("attention_mask")
    if am is not None and not isinstance(am, torch.Tensor):
        try:  # a tokenizer's lists (return_tensors=None) or NumPy arrays (return_tensors="np")
            am = torch.as_tensor(np.asarray(am))
        except (TypeError, ValueError, RuntimeError):  # ragged lists, objects: no left padding to name
            am = None
    if isinstance(am, torch.Tensor) and am.dim() in (1, 2) and am.numel() and not am.is_meta:
        am = (am != 0).reshape(-1, am.shape[-1])
        left = am[:, 1:] & ~am[:, :-1]  # a real token after a padding position
        if bool(left.any()):
            row = int(left.any(-1).nonzero()[0, 0])
            msg += (
                f". This {argument}'s attention_mask is left-padded (row {row} has padding before its real "
                "tokens): pad on the right instead (tokenizer.padding_side = 'right')"
            )
    return msg


# ---------------------------------------------------------------------------------------------------------------
# attention masks of padded prompts


def read_prompts(clean_tokens, corrupted_tokens, attention_mask, names=("clean_tokens", "corrupted_tokens")):
    """``(clean_tokens, corrupted_tokens, attention_mask)`` with a tokenizer's output (a dict or ``BatchEncoding``
    holding ``input_ids`` and optionally ``attention_mask``) given as prompts read as its ids and mask. The
    corrupted prompts' mask must equal the clean ones' (one mask serves both runs), and a mask given both in a dict
    and as ``attention_mask=`` must be the same. Lists and NumPy arrays (``return_tensors=None`` / ``"np"``) are
    read as tensors. The mask is returned as given (checked by :func:`patching_mask`). ``names``: the arguments'
    names in the caller's signature (the messages name them)."""
    masks = []
    out = []
    clean_name, corrupted_name = names
    for tokens, argument in ((clean_tokens, clean_name), (corrupted_tokens, corrupted_name)):
        if not isinstance(tokens, Mapping):
            out.append(tokens)
            masks.append(None)
            continue
        if "input_ids" not in tokens:
            raise TypeError(
                f"{argument} is a {type(tokens).__name__} without 'input_ids' (keys {sorted(map(str, tokens))}); give "
                "a LongTensor (batch, pos) of token ids, or a tokenizer's output holding input_ids and attention_mask"
            )
        ids = tokens["input_ids"]
        out.append(ids if isinstance(ids, torch.Tensor) else _as_array(ids, f"{argument}['input_ids']"))
        am = tokens.get("attention_mask")
        am = (
            am
            if am is None or isinstance(am, torch.Tensor)
            else _as_array(am, f"{argument}['attention_mask']")
        )
        masks.append(am)
        if am is not None and tokens.get("position_ids") is not None:
            _check_given_positions(tokens["position_ids"], am, argument)
        if tokens.get("token_type_ids") is not None:
            tt = torch.as_tensor(np.asarray(tokens["token_type_ids"]))
            if bool((tt != 0).any()):
                raise ValueError(
                    f"{argument}['token_type_ids'] holds other types than 0: patching runs token ids, an "
                    "attention_mask and positions only; drop them"
                )
    clean_mask, corr_mask = masks
    if clean_mask is not None and attention_mask is not None and not _same_mask(clean_mask, attention_mask):
        raise ValueError(
            f"attention_mask is given and {clean_name} holds another one (its 'attention_mask'): give one of them, "
            "or the same mask in both"
        )
    mask = attention_mask if attention_mask is not None else clean_mask
    if corr_mask is not None and not _same_mask(corr_mask, mask):
        raise ValueError(
            f"attention_mask: {corrupted_name} holds an attention_mask other than the clean prompts' "
            f"({'none given' if mask is None else 'they differ'}); the corrupted prompts share the clean prompts' "
            "mask: pad both batches alike (the same real positions in every row)"
        )
    return out[0], out[1], mask


def _as_array(v, name: str) -> torch.Tensor:
    try:  # a tokenizer's lists (return_tensors=None) or NumPy arrays (return_tensors="np")
        return torch.as_tensor(np.asarray(v))
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} is not a (batch, pos) array ({type(v).__name__}): {e}") from None


def _same_mask(a, b) -> bool:
    """Whether two masks (tensors, arrays or None: None is a mask of ones) mark the same real tokens."""
    if a is None and b is None:
        return True
    try:
        ta = None if a is None else torch.as_tensor(np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a))
        tb = None if b is None else torch.as_tensor(np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b))
    except (TypeError, ValueError, RuntimeError):
        return False
    ta = torch.ones_like(tb) if ta is None else ta
    tb = torch.ones_like(ta) if tb is None else tb
    return ta.shape == tb.shape and bool(((ta != 0) == (tb != 0)).all())


def _check_given_positions(position_ids, mask, argument: str) -> None:
    """A tokenizer output's ``position_ids``: they must be each row's real tokens counted from 0 (the positions
    patching runs the prompts at) at every real token."""
    from ..models.transformer import real_token_positions

    try:
        pos = torch.as_tensor(
            np.asarray(position_ids.cpu() if isinstance(position_ids, torch.Tensor) else position_ids)
        )
        keep = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)) != 0
        ok = pos.shape == keep.shape and bool((pos.long() == real_token_positions(keep))[keep].all())
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(
            f"{argument}['position_ids'] are not each row's real tokens counted from 0 "
            "((attention_mask.cumsum(-1) - 1).clamp(min=0)), the positions patching runs each prompt at (as it "
            "would be alone); drop them"
        )


def patching_mask(attention_mask, shape: tuple) -> torch.Tensor | None:
    """The ``attention_mask`` of a patching call as bool ``(batch, pos)`` on the CPU (True: a real token), or None;
    refused, naming ``attention_mask``, unless it is a tensor (or array) of the clean prompts' ``shape`` holding
    only 0 and 1 (bool, integer or floating) with at least one real token per row."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, (np.ndarray, list, tuple)):
        attention_mask = _as_array(attention_mask, "attention_mask")
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask is a {type(attention_mask).__name__}; give a (batch, pos) tensor of 1 at real tokens and "
            "0 at padding"
        )
    if attention_mask.is_meta or attention_mask.is_complex():
        raise TypeError(
            f"attention_mask is a {attention_mask.dtype} tensor on {attention_mask.device}; give a (batch, pos) "
            "tensor of 1 at real tokens and 0 at padding (bool, integer or floating)"
        )
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; it must equal the clean prompts' shape "
            f"{tuple(shape)} (one entry per token, shared by the corrupted prompts)"
        )
    m = attention_mask.detach().cpu()
    bad = (m != 0) & (m != 1)
    if bool(bad.any()):
        raise ValueError(
            f"attention_mask must hold 1 (a real token) or 0 (padding), got the value {m[bad][0].item()!r} (a "
            f"{m.dtype} tensor of shape {tuple(m.shape)})"
        )
    keep = m != 0
    empty = ~keep.any(-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {row} is all 0 (padding only); every prompt needs at least one real token"
        )
    return keep


def padding_before_real(keep: torch.Tensor | None) -> int | None:
    """The first row of ``keep (batch, pos)`` (bool) with padding before a real token (left padding, or a gap),
    or None: a mask of right padding only (each row's real tokens first) or None."""
    if keep is None:
        return None
    gap = keep[:, 1:] & ~keep[:, :-1]
    if not bool(gap.any()):
        return None
    return int(gap.any(-1).nonzero()[0, 0])


def last_real_positions(keep: torch.Tensor) -> torch.Tensor:
    """The column of each row's last real token of the mask ``keep (batch, pos)`` (nonzero: real), a LongTensor
    ``(batch,)``."""
    m = keep.bool()
    return (m.shape[1] - 1 - m.flip(-1).long().argmax(-1)).long()


def check_positions_real(keep: torch.Tensor | None, pos) -> None:
    """Refuse a metric position (``pos``: an int or ``(batch,)``, non-negative) that falls on padding of ``keep``,
    naming the row and its last real token."""
    if keep is None:
        return
    B, T = keep.shape
    p = torch.full((B,), pos, device="cpu") if isinstance(pos, int) else torch.as_tensor(pos).cpu().long()
    real = keep.cpu()[torch.arange(B, device="cpu"), p]
    if bool(real.all()):
        return
    row = int((~real).nonzero()[0, 0])
    last = last_real_positions(keep).tolist()
    raise ValueError(
        f"metric.position reads position {int(p[row])} of row {row}, which attention_mask marks as padding: the "
        f"metric must read real tokens; each row's last real token is at {last} (give the metric "
        "position=torch.tensor([...]) per example)"
    )


def check_real_length(
    keep: torch.Tensor | None,
    limit: int | None,
    T: int,
    argument: str = "clean_tokens",
    mask_name: str = "attention_mask",
) -> bool:
    """Refuse prompts the model's ``limit`` learned positions (None: no limit) cannot read: under a mask ``keep``
    with padding the runs read each row's real tokens at positions ``0 .. n-1``, so its longest row of real tokens
    must fit (the padded width may exceed it); without padding every one of the ``T`` columns must. Returns whether
    the columns exceed the limit (every forward must then take the mask and positions). The messages name the
    prompts as ``argument`` and their mask as ``mask_name``."""
    if limit is None or T <= limit:
        return False
    if keep is None or bool(keep.all()):
        raise ValueError(
            f"{argument} has {T} positions; the model has {limit} learned positions (n_ctx): give prompts of at "
            f"most {limit} tokens"
        )
    longest = int(keep.sum(1).max())
    if longest > limit:
        row = int(keep.sum(1).argmax())
        raise ValueError(
            f"{argument} row {row} has {longest} real tokens under {mask_name}; the model has {limit} learned "
            f"positions (n_ctx): give prompts of at most {limit} tokens"
        )
    return True


def masked_position_ids(keep: torch.Tensor) -> torch.Tensor:
    """The positions every forward of a masked run reads, ``(batch, pos)`` for the mask ``keep`` (bool): each row's
    real tokens counted from 0 (:func:`~pypattern.models.transformer.real_token_positions`, each prompt as it would
    be alone), 0 at padding, whose ids no forward reads."""
    from ..models.transformer import real_token_positions

    return real_token_positions(keep).masked_fill(~keep, 0)


def masking_kwargs(model, keep: torch.Tensor | None, device) -> dict:
    """The keywords each forward of a patching computation takes for the mask ``keep`` (bool ``(batch, pos)``):
    ``attention_mask`` and ``position_ids`` (:func:`masked_position_ids`), or nothing for no mask or a mask
    without padding. A model whose forward does not take both (by name, or as ``input_ids`` with ``**kwargs``:
    the rule of :func:`pypattern.losses._takes`) is refused when the mask holds padding."""
    from ..losses import _takes
    from ..models.hf import HookedHF
    from ..models.hooks import HookedModule
    from ..models.transformer import Transformer

    if keep is None or bool(keep.all()):
        return {}
    keep = keep.to(device)
    pos = masked_position_ids(keep)
    if isinstance(model, Transformer):
        return {"attention_mask": keep, "position_ids": pos}
    if isinstance(model, HookedHF):
        inner = model.hf_model
    elif isinstance(model, HookedModule):
        inner = model.module
    else:
        inner = model
    # the losses' rule: a parameter of that name, or input_ids with **kwargs (a wrapper handing them on)
    if not (_takes(inner, "attention_mask") and _takes(inner, "position_ids")):
        raise ValueError(
            f"attention_mask holds padding, but the model's forward ({type(model).__name__}) takes no "
            "attention_mask and position_ids (parameters of those names, or input_ids with **kwargs): give "
            "unpadded prompts or right-padded ones without a mask (the metric reading each prompt's last real "
            "token), or convert the model with pypattern.from_hf"
        )
    return {"attention_mask": keep.long(), "position_ids": pos}


def mean_mask_under(keep: torch.Tensor | None, own, refs: bool, what: str, own_name: str, remedy: str = ""):
    """The mask a per-position mean ablation takes under the runs' attention mask ``keep (batch, pos)`` (bool, or
    None): ``own`` (its own mask, or None) without padding in ``keep``; with padding before a real token refused
    (the columns of left-padded prompts hold tokens at other positions, whose mean means nothing); ``own`` for a
    mean over reference prompts of their own (``refs``, which run unmasked); else ``keep``, a given ``own`` having
    to equal it. The messages name the ablation as ``what`` and its own mask as ``own_name``; ``remedy`` ends the
    refusal of left padding. The one rule of :func:`mean_with_mask` and the circuits' mean ablation."""
    if keep is None or bool(keep.all()):
        return own
    row = padding_before_real(keep)
    if row is not None:
        raise ValueError(
            f"{what} with a left-padded attention_mask (row {row} has padding before a real token): the mean per "
            "position would mix the prompts' tokens at other positions; pad the prompts on the right (the mean "
            f"then takes the prompts real at each position){remedy}"
        )
    if refs:
        return own  # other prompts: their own mask is the mean's
    if own is None:
        return keep
    if not _same_mask(own, keep):
        raise ValueError(
            f"{own_name} differs from attention_mask: both mask the clean prompts the mean is over; give the same "
            f"mask (or leave {own_name} out: the mean then takes the prompts real at each position)"
        )
    return own


def mean_with_mask(corruption, keep: torch.Tensor | None):
    """A corruption under the patching mask ``keep``: a :class:`MeanAblation` over the clean prompts takes its mean
    over the prompts real at each position (the patching mask, when it gives none of its own), by
    :func:`mean_mask_under`'s rules; a :class:`GaussianNoise` counts its positions over each row's real tokens and
    lands on them only (:func:`~pypattern.patching.corruptions.noise_under_mask`); any other corruption as it
    is."""
    if isinstance(corruption, GaussianNoise):
        return noise_under_mask(corruption, keep)
    if not isinstance(corruption, MeanAblation):
        return corruption
    own = corruption.attention_mask
    mask = mean_mask_under(
        keep, own, corruption.reference_tokens is not None, "MeanAblation", "MeanAblation.attention_mask"
    )
    return corruption if mask is own else dataclasses.replace(corruption, attention_mask=mask)


def check_token_tensor(tokens, argument: str, shape: str, any_int: bool = False) -> None:
    """Refuse ``tokens`` (passed as ``argument``) that are not an integer tensor (``shape`` describes the one
    expected, e.g. ``"(batch, pos)"``): of dtype long or int32, or with ``any_int`` of any integer dtype (for a
    caller that converts them to long)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{argument} is a {type(tokens).__name__}; give a LongTensor {shape}")
    if not (_integer_dtype(tokens) if any_int else tokens.dtype in (torch.long, torch.int32)):
        # uint8 would index as a boolean mask, other types are not token ids
        raise TypeError(f"{argument} has dtype {tokens.dtype}; give integer token ids (torch.long)")
    refuse_meta(tokens, argument, "the token ids themselves")


def check_token_ids(tokens: torch.Tensor, argument: str, d_vocab: int | None) -> None:
    """Refuse token ids outside ``0 .. d_vocab - 1`` (a negative id would otherwise be read from the end of the
    vocabulary)."""
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or (d_vocab is not None and hi >= d_vocab):
            top = "" if d_vocab is None else f" .. {d_vocab - 1}"
            bad = lo if lo < 0 else hi
            raise ValueError(f"{argument} contains token id {bad}; valid ids are 0{top} (d_vocab={d_vocab})")


def _integer_dtype(tokens: torch.Tensor) -> bool:
    """Whether the tensor's dtype is an integer one (not a float, a complex or a bool): ids of it are token ids."""
    return not (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool)


def _long_ids(tokens):
    """Token ids of an integer dtype as ``torch.long`` (a uint8 tensor used as an index would be a mask, an int16
    one is no index at all); anything else as it is, for :func:`check_tokens` to refuse."""
    if isinstance(tokens, torch.Tensor) and tokens.dtype != torch.long and _integer_dtype(tokens):
        return tokens.long()
    return tokens


def long_token_args(clean_tokens, corrupted_tokens, corruption):
    """A patching call's prompts, and those its corruption carries (``TokenReplacement.corrupted_tokens``,
    ``MeanAblation.reference_tokens``), with ids of any integer dtype as ``torch.long`` (a corruption holding
    others is replaced by a copy; the caller's is left as it is)."""
    if isinstance(corruption, TokenReplacement):
        ids = _long_ids(corruption.corrupted_tokens)
        if ids is not corruption.corrupted_tokens:
            corruption = dataclasses.replace(corruption, corrupted_tokens=ids)
    elif isinstance(corruption, MeanAblation) and corruption.reference_tokens is not None:
        ids = _long_ids(corruption.reference_tokens)
        if ids is not corruption.reference_tokens:
            corruption = dataclasses.replace(corruption, reference_tokens=ids)
    return _long_ids(clean_tokens), _long_ids(corrupted_tokens), corruption


#: set while a public function calls another (:func:`half_precision_warned`): only the outer one warns
_HALF_WARNED: contextvars.ContextVar[bool] = contextvars.ContextVar("pypattern_half_warned", default=False)

#: what is rounding noise in a half-precision model, by kind of call
_HALF_NOISE = {
    "patching": ("patching effects", "effects"),
    "circuits": ("edge scores and patched metrics", "scores"),
}


def half_precision_dtype(model) -> torch.dtype | None:
    """float16 or bfloat16 where ``model`` (a module) has parameters in it, else None."""
    if not isinstance(model, torch.nn.Module):
        return None
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            return p.dtype
    return None


def warn_half_precision(model, kind: str, call: str) -> None:
    """Warn, once per call of a public patching (``kind="patching"``) or circuit (``"circuits"``) function named
    ``call``, where ``model`` computes in float16 or bfloat16: the values are returned in float32, but they are read
    from activations rounded to 16 bits, so effects and scores are mostly rounding (the command line patches a
    float32 copy instead). Inside :func:`half_precision_warned` (a call made by one that has warned) it is silent.
    The warning points at the first line outside pypattern (the user's call)."""
    if _HALF_WARNED.get():
        return
    dtype = half_precision_dtype(model)
    if dtype is None:
        return
    from ..sampling.diagnostics import user_stacklevel

    what, result = _HALF_NOISE[kind]
    warnings.warn(
        f"{call}: the model computes in {dtype} and {what} computed in half precision are mostly rounding noise "
        f"(the values are returned in float32, but the activations are rounded to {dtype}); pass model.float() "
        f"for precise {result}",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


@contextlib.contextmanager
def half_precision_warned():
    """The calls made inside do not warn of a half-precision model (:func:`warn_half_precision`): the public
    function that makes them has."""
    token = _HALF_WARNED.set(True)
    try:
        yield
    finally:
        _HALF_WARNED.reset(token)


def _vocab(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    v = getattr(cfg, "d_vocab", None) if cfg is not None else getattr(model, "d_vocab", None)
    if not isinstance(v, int):  # a wrapped Hugging Face model (hooked_hf): its config's vocabulary
        inner = getattr(model, "model", None)
        v = getattr(getattr(inner, "config", getattr(model, "config", None)), "vocab_size", None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def prepare_runs(
    model,
    site_hooks: list[str],
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor | None,
    metric: Metric,
    corruption: Corruption | None,
    direction: str,
    full_cache: bool,
    attention_mask: torch.Tensor | None = None,
) -> PatchingRuns:
    """Run clean and corrupted prompts, bind the metric, and collect target/source activations.

    ``attention_mask (batch, pos)`` (of the clean prompts, shared by the corrupted ones; checked by
    :func:`patching_mask`): the metric must read real tokens, and every forward runs with the mask and each row's
    real tokens at positions ``0 .. n-1`` (:func:`masking_kwargs`; the exact engine then runs with the same mask
    and positions, :func:`engine_on_runs`), except the exact engine's runs (``full_cache``) over right-padded
    prompts that fit the model's learned positions: the real tokens never read the later padding, so the unmasked
    runs and engine compute them as the masked forward does."""
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction={direction!r} is not valid; choose 'denoising' or 'noising'")
    clean_tokens, corrupted_tokens, corruption = long_token_args(clean_tokens, corrupted_tokens, corruption)
    corruption = resolve_corruption(corrupted_tokens, corruption)
    d_vocab = _vocab(model)
    # under a mask the learned positions bound each row's real tokens, not the columns (check_real_length)
    limit = position_limit(model)
    clean = check_tokens(
        clean_tokens, "clean_tokens", d_vocab, n_ctx=None if attention_mask is not None else limit
    )
    B, T = clean.shape
    keep = patching_mask(attention_mask, (B, T))
    # the naive loop's forwards always take the mask; the exact engine's where it must: padding before a real
    # token (left padding, or gaps), or columns past the learned positions (each row read at its real positions)
    beyond = check_real_length(keep, limit, T)
    mask_forwards = not full_cache or beyond or padding_before_real(keep) is not None
    corruption = mean_with_mask(corruption, keep)
    check_corruption_tokens(corruption, d_vocab, (B, T))
    # prompts run where the model is (kept on the CPU with a model on a GPU)
    dev = model_device(model, clean.device)
    clean = clean.to(dev)
    pos = metric_positions(metric, B, T)
    check_positions_real(keep, pos)
    masking = masking_kwargs(model, keep, dev) if mask_forwards else {}
    ref_masking = reference_masking(model, corruption, limit, dev)
    corr_tokens, corr_noise = None, None
    if isinstance(corruption, TokenReplacement):
        corr_tokens = corruption.corrupted_tokens.to(dev)
    elif isinstance(corruption, GaussianNoise):
        corr_tokens = clean
        d_model = model.cfg.d_model if hasattr(model, "cfg") else None
        if d_model is None:
            _, c = model.run_with_cache(clean[:1], names_filter="hook_embed")
            d_model = c["hook_embed"].shape[-1]
        dtype = next(model.parameters()).dtype
        corr_noise = corruption.noise(model, B, T, d_model, dtype)
    elif not corruption.is_ablation:
        raise TypeError(f"corruption={corruption!r} is not a known corruption")
    if corruption.is_ablation and direction != "noising":
        raise ValueError(
            f"{type(corruption).__name__} replaces activations of the clean run: use direction='noising'"
        )

    def run(tokens, noise, names, forward_kw=None):
        """``forward_kw``: the mask keywords of the forward (default: the runs' ``masking``)."""
        hooks = [("hook_embed", embedding_noise_hook(noise))] if noise is not None else []
        with torch.no_grad(), model.hooks(hooks):  # patching takes no gradient
            kw = masking if forward_kw is None else forward_kw
            return model.run_with_cache(tokens, names_filter=names, **kw)

    from ..models.transformer import Transformer

    final = None
    if full_cache and isinstance(model, Transformer):  # the cache holds the final norm's output
        final = "ln_final.hook_normalized" if model.cfg.normalization_type else None
        final = final or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def run_at(tokens, noise, names):
        """Logits at the metric position(s) ``(batch, vocab)``, the final-norm rows there (None unless the cache
        holds them) and the cache; with a full cache of pypattern's Transformer only the metric position's row is
        unembedded."""
        if final is None:
            logits, cache = run(tokens, noise, names)
            return logits_at(logits, pos), None, cache
        # the exact engine's runs: no gradient, and the weights' products as the engine computes them
        with torch.no_grad(), model.fixed_weights():
            with model.hooks([("hook_embed", embedding_noise_hook(noise))] if noise is not None else []):
                _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None, **masking)
        rows = logits_at(cache[final], pos)
        return unembed_rows(model, rows), rows, cache

    def metric_of(logits, rows):
        """The metric as the exact engine computes it for its cells (from the rows where it can)."""
        return metric(logits) if rows is None else metric_of_rows(model, rows, metric)

    # the exact engine's cache: every hook but the norms' scales, which it does not read (a hook there takes a
    # LayerNorm off its fused kernel, whose rounding differs: in a 16-bit model the cached run would not be the
    # model's forward); else the sites' hooks, as a list (TransformerLens takes a list)
    names = (lambda n: not n.endswith("hook_scale")) if full_cache else sorted(set(site_hooks))
    clean_logits, clean_rows, clean_cache = run_at(clean, None, names)
    bind_metric(metric, clean_logits.detach())
    on_logits = metric_on(metric, clean_logits, B).detach()  # the metric's contract, on full logits
    check_metric_on_stacks(metric, clean_logits.detach(), on_logits)
    coupled = _couples_examples(metric, clean_logits.detach(), on_logits)
    dtype = values_dtype(model)
    m_clean = as_values(metric_of(clean_logits, clean_rows).detach(), dtype)
    m_corr, corr_cache = None, None
    if corr_tokens is not None:
        corr_logits, corr_rows, corr_cache = run_at(corr_tokens, corr_noise, names)
        m_corr = as_values(metric_of(corr_logits, corr_rows).detach(), dtype)
        check_finite_examples(m_clean, m_corr, "the corrupted run")
    if direction == "denoising":
        tgt = (corr_tokens, corr_noise, corr_cache)
        source = {n: clean_cache[n] for n in site_hooks}
    else:
        tgt = (clean, None, clean_cache)
        if isinstance(corruption, ZeroAblation):
            source = {n: torch.zeros_like(clean_cache[n]) for n in site_hooks}
        elif isinstance(corruption, MeanAblation):
            ref = clean_cache
            if corruption.reference_tokens is not None:
                if corruption.reference_tokens.shape[1] != T:
                    raise ValueError("MeanAblation.reference_tokens must have the prompts' length")
                # reference prompts run where the clean ones do (a GPU model's prompts are on its device)
                _, ref = run(
                    corruption.reference_tokens.to(clean.device), None, sorted(set(site_hooks)), ref_masking
                )
            # per position (a pattern's: the query position), over the prompts real there given a mask
            mask = corruption.attention_mask
            source = {
                n: masked_mean(ref[n], mask, 0, position_axis(n)).expand_as(clean_cache[n])
                for n in site_hooks
            }
        else:
            source = {n: corr_cache[n] for n in site_hooks}
    return PatchingRuns(
        tokens=tgt[0],
        noise=tgt[1],
        cache=tgt[2],
        source=source,
        m_clean=m_clean,
        m_corr=m_corr,
        pos=pos,
        T=T,
        B=B,
        coupled=coupled,
        keep=keep,
        masking=masking,
    )


def reference_masking(model, corruption, limit: int | None, device, tokens=None) -> dict:
    """The keywords the forward of a :class:`MeanAblation`'s reference prompts takes (its ``reference_tokens``,
    else ``tokens``, the clean prompts, when given): none (they run as they are: right-padded, their real tokens
    never read the later padding), but for prompts wider than the model's ``limit`` learned positions, which run
    under the ablation's mask (each row's real tokens at ``0 .. n-1``, the positions they hold unpadded); a row of
    more real tokens than ``limit``, or such prompts without a mask, are refused naming
    ``MeanAblation.reference_tokens``."""
    if not isinstance(corruption, MeanAblation):
        return {}
    ref = corruption.reference_tokens if corruption.reference_tokens is not None else tokens
    if ref is None:
        return {}
    own = corruption.attention_mask
    own = None if own is None else own.detach().to("cpu", torch.bool)
    name = "MeanAblation.reference_tokens" if corruption.reference_tokens is not None else "clean_tokens"
    if not check_real_length(own, limit, ref.shape[1], name, "its attention_mask"):
        return {}
    return masking_kwargs(model, own, device)


def _couples_examples(metric, logits: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether ``metric`` relates the examples of a run: its value for another example is not the same, bit for
    bit, when the first's or the last's logits ``(batch, vocab)`` change (``values``: the metric of ``logits``).
    A metric that fails on the changed logits counts as relating them."""
    B = logits.shape[0]
    if B < 2:
        return False
    with torch.no_grad():
        for b in (0, B - 1):
            one = logits.clone()
            one[b] = torch.roll(one[b], 1, -1)
            try:
                got = metric(one)
            except Exception:
                return True
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != (B,):
                return True
            keep = torch.arange(B, device=got.device) != b
            a, v = got[keep].detach(), values.detach().to(got.device)[keep]
            if a.dtype != v.dtype or not bool(((a == v) | (a.isnan() & v.isnan())).all()):
                return True
    return False


def values_dtype(model) -> torch.dtype:
    """The dtype the metric's values are kept in for ``model``: its floating parameters' (float32 for a 16-bit
    model, as the engines compute its metrics, and for a model without floating parameters)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.promote_types(dtype, torch.float32)


def as_values(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Metric values of integer or bool dtype (an accuracy, a rank) in ``dtype`` (:func:`values_dtype`), so that
    differences and means of them are effects; floating values as they are (as
    :func:`~pypattern.circuits.patch_edges` keeps them)."""
    if m.is_floating_point() or m.is_complex():
        return m
    return m.to(dtype)


def check_finite_examples(m_clean: torch.Tensor, m_other: torch.Tensor, run: str) -> None:
    """Warn, naming them, of the examples whose metric on ``run`` (``m_other``) is not finite while it is on the
    clean run (those are left out of the means over examples), and refuse a run on which no example is finite on
    both."""
    keep = finite_examples(m_clean, m_other)
    if not bool(keep.any()):
        raise ValueError(
            f"metric is not finite on the clean run or on {run} for every example: no example is left to measure; "
            "give a metric that is finite on the unpatched runs"
        )
    warn_nonfinite_examples(torch.where(torch.isfinite(m_clean).to(m_other.device), m_other, 0.0), run)


def _naive(model, site: str, cells: list[Cell], runs: PatchingRuns, metric: Metric) -> torch.Tensor:
    out = []
    dtype = values_dtype(model)
    base = [("hook_embed", embedding_noise_hook(runs.noise))] if runs.noise is not None else []
    with torch.no_grad():
        for c in cells:
            hooks = list(base)
            for layer in c.layers:
                name = hook_name(site, layer)
                src = runs.source[name]
                hooks.append((name, lambda x, hook, s=src, c=c: apply_patch(x, s, site, c.head, c.pos)))
            logits = model.run_with_hooks(runs.tokens, fwd_hooks=hooks, **runs.masking)
            out.append(as_values(metric(logits_at(logits, runs.pos)), dtype))
    return torch.stack(out)


def _inert(model, site: str, cells: list[Cell], runs: PatchingRuns, direction: str, causal: bool):
    """``(inert (n_cells, batch) bool, target metric (batch,))``: the cells whose patch cannot change the metric
    of an example (:func:`~pypattern.patching.inert.inert_cells`; ``causal``: pypattern's Transformer run as its
    weights say), and the metric they take there, the target run's."""
    tgt = runs.m_corr if direction == "denoising" else runs.m_clean
    inert = inert_cells(model, site, cells, runs.cache, runs.source, runs.pos, causal, runs.B, keep=runs.keep)
    if runs.coupled:  # a metric relating the examples: every example's logits must be left alone
        inert = inert.all(1, keepdim=True).expand_as(inert).clone()
    return inert, tgt


def engine_on_runs(
    model,
    runs: PatchingRuns,
    site: str,
    metric,
    max_batch: int | None,
    max_pack_bytes: int | None = 0,
    max_memory: int | None = None,
    warn_budget: bool = True,
) -> ExactEngine:
    """The exact engine on the recorded ``runs`` (:func:`prepare_runs` with ``full_cache``), their caches cut
    after the last metric position (:attr:`PatchingRuns.metric_rows`); ``max_memory``: the bytes a batch's working
    memory, logits and metric temporaries included, may take (:class:`~pypattern.patching.engine.ExactEngine`);
    ``warn_budget``: the engine warns when one cell does not fit."""
    return ExactEngine(
        model,
        truncate_cache(runs.cache, runs.metric_rows),
        truncate_cache(runs.source, runs.metric_rows),
        site,
        metric,
        runs.pos,
        max_batch=max_batch,
        max_pack_bytes=max_pack_bytes,
        max_memory=max_memory,
        warn_budget=warn_budget,
        # the mask and positions the runs were made with (none for unmasked runs)
        attention_mask=runs.masking.get("attention_mask"),
        position_ids=runs.masking.get("position_ids"),
    )


def warn_if_over_budget(engine: ExactEngine, max_memory, packs, stacklevel: int = 3) -> None:
    """The ``RuntimeWarning`` of a ``max_memory`` (the caller's bytes, ``packs`` of them for packed weights) below
    the working memory of one cell, which the engine (built with ``warn_budget=False``) runs anyway."""
    if max_memory is not None and engine.budget_too_small:
        from .._memory import warn_budget_too_small

        need = engine.memory_estimate(1) + (packs or 0)
        unit = "one cell of the exact engine" + (f" with {packs} bytes of packed weights" if packs else "")
        warn_budget_too_small("max_memory", max_memory, need, unit, stacklevel=stacklevel + 1)


def engine_batch(cfg, batch: int, seq_len: int, max_batch: int | None, max_memory: int | None) -> int | None:
    """Cells per exact-engine batch: ``max_batch``, lowered so that the batch's working memory estimate
    (:func:`~pypattern.patching.engine.engine_bytes`, every site's per-layer rows counted) stays within
    ``max_memory`` bytes (at least 1 cell). The logits over the vocabulary are fitted by the engine
    (:class:`~pypattern.patching.engine.ExactEngine`'s ``max_memory``), which warns when not even one cell fits."""
    check_batch_limits(max_batch, max_memory)
    max_batch = None if max_batch is None else int(max_batch)
    if max_memory is None:
        return max_batch
    fit = max(1, cells_that_fit(cfg, batch, seq_len, max_memory))
    return fit if max_batch is None else min(fit, max_batch)


def check_batch_limits(max_batch, max_memory) -> None:
    """``max_batch`` a positive int or None, ``max_memory`` a finite positive number or None (numpy's integers
    and floats too; not a bool)."""
    if max_batch is not None and (not is_count(max_batch) or max_batch < 1):
        raise ValueError(f"max_batch={max_batch!r} is not valid; give a positive int or None")
    if max_memory is not None and (
        not is_real(max_memory) or not (max_memory > 0 and max_memory < float("inf"))
    ):
        raise ValueError(
            f"max_memory={max_memory!r} is not valid; give a finite positive number of bytes or None"
        )


def activation_patching(
    model,
    site: str,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor | None = None,
    *,
    metric: Metric,
    corruption: Corruption | None = None,
    direction: str = "denoising",
    per_position: bool = True,
    layers=None,
    heads=None,
    positions=None,
    window: int = 1,
    method: str = "auto",
    max_batch: int | None = None,
    max_memory: int | None = 2**30,
    quiet: bool = False,
    checkpoint: str | os.PathLike | None = None,
    attention_mask: torch.Tensor | None = None,
) -> PatchResult:
    """Patch ``site`` at every cell of a (layer[, head][, position]) grid and measure ``metric``.

    Parameters
    ----------
    model : Transformer, HookedModule or a Hugging Face causal LM
        Head sites (``z``, ``q``, ``k``, ``v``, ``pattern``) need pypattern's :class:`~pypattern.models.Transformer`;
        a :class:`~pypattern.models.HookedModule` supports the residual sites it has hook points for; a Hugging
        Face model of a family :func:`~pypattern.models.hooked_hf` adapts is wrapped by it (residual sites, one
        forward per cell; convert it with :func:`~pypattern.from_hf` for head sites and the exact engine); one of a
        family neither adapted nor converted (Mamba, CodeGen, Cohere, MPT, ...) by its residual stream alone
        (``resid_pre``, ``resid_post``).
    site : str
        ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``, ``z``, ``q``, ``k``, ``v``,
        ``pattern`` (per position: the query position). ``q`` and ``k`` are the queries and keys before the
        rotary rotation (``hook_q``/``hook_k``); a patched one is rotated at the position it is patched into.
        Under grouped-query attention the heads of ``k`` and ``v`` are the ``n_key_value_heads`` key/value heads
        (as in TransformerLens): patching one changes every query head of its group. ``resid_mid`` does not
        exist with ``parallel_attn_mlp`` nor in attention-only models, ``mlp_out`` not in attention-only models.
    clean_tokens, corrupted_tokens : LongTensor ``(batch, pos)``, or a tokenizer's output
        Corrupted prompts for symmetric token replacement (recommended); or pass ``corruption``. A tokenizer's
        output (a dict or ``BatchEncoding`` with ``input_ids`` and ``attention_mask``, padded on either side) is
        read as its ids and mask; the corrupted prompts' mask must equal the clean ones', and one given with
        ``attention_mask=`` too must be the same.
    metric : Metric
        E.g. ``LogitDiff(answer, wrong)``; its ``position`` says where the logits are read: a real token of each
        prompt under a mask (a position on padding is refused, naming the row).
    corruption : GaussianNoise, ZeroAblation or MeanAblation, optional
        Over right-padded prompts, ``MeanAblation(attention_mask=...)`` averages each position over the prompts
        real there only (without it the padding's activations enter the mean, which then depends on the pad id);
        under ``attention_mask=`` with right padding the mean over the clean prompts takes that mask. A
        ``MeanAblation`` with a left-padded ``attention_mask`` is refused (a column of left-padded prompts holds
        tokens at other positions). Reference prompts of their own, given with their mask (right-padded), may be
        padded past the model's learned positions when each row's real tokens fit them: they then run under that
        mask. Under ``attention_mask=`` with padding, ``GaussianNoise`` positions count each row's real tokens and
        the noise lands on real tokens only (each row's values are its prompt's alone given its row of the draw;
        see :class:`~pypattern.patching.GaussianNoise`).
    direction : {"denoising", "noising"}
        Denoising patches clean activations into the corrupted run (sufficiency); noising patches corrupted
        (or ablated) activations into the clean run (necessity).
    per_position : bool
        One cell per position, or one cell patching all positions at once.
    layers, heads, positions : int, sequence of int or slice, optional
        Restrict the grid. A slice selects from the valid first layers (``0 .. n_layers - window``), the heads or
        the positions (``positions=slice(-3, None)``: the last three).
    window : int
        Patch ``window`` consecutive layers at once (sliding window); 1 = single layers (recommended first).
    method : {"auto", "exact", "naive"}
        ``exact``: the batched engine that recomputes only what a patch can change (pypattern's Transformer);
        ``naive``: one full forward per cell; ``auto``: exact when possible.
    max_batch : int, optional
        Exact engine: at most this many cells per batch. The batch settings change which cells share a forward,
        so the values agree across settings to rounding (not bit for bit).
    max_memory : int, optional
        Exact engine: bytes of working memory per batch (default 1 GiB); the batch is the largest number of
        cells whose estimate (:meth:`~pypattern.patching.engine.ExactEngine.memory_estimate`:
        :func:`~pypattern.patching.engine.engine_bytes` and the logits over the vocabulary with
        the metric's temporaries, counted once on the target run; nothing vocabulary-sized for ``LogitDiff``, which
        reads two columns) fits, at least one cell: a budget below one cell's estimate runs one cell per batch
        with a ``RuntimeWarning`` naming the bytes it needs. The batch and its estimate are reported in
        ``info["max_batch"]`` and ``info["memory_estimate"]``. Weights
        packed for oneDNN's matmul (a copy of the blocks' float32 weights, where that matmul is the faster on the
        CPU) come out of the same budget when they take at most half of it, else none are packed. The caches of
        the clean and corrupted runs come on top. None: no bound beyond ``max_batch``.
    quiet : bool
        No progress bar (one is shown, over the cells, once a grid has run for two seconds).
    checkpoint : path, optional
        An ``.npz`` file: the values of the cells done so far are written to it as the grid goes (every 30 s, at
        the end, and when the grid stops on an exception; a stop by Ctrl-C or SIGTERM writes them too), and a call
        of the same run reads them back and computes only the rest. The same run: the
        same model weights, site, grid, direction, method, prompts, corruption and metric (by its code and its
        values on the clean and corrupted runs); another run is refused (``FingerprintMismatch``). The batch
        settings (``max_batch``, ``max_memory``) may differ: the cells left are then batched otherwise, and their
        values agree with an uninterrupted run's to rounding (a few units in the last place, as those of any two
        runs with other batch settings do), not bit for bit. A finished run's file gives its result without
        patching again. The attention mask is part of the run: a file of another mask is refused.
    attention_mask : Tensor ``(batch, pos)``, optional
        The clean prompts' mask (1 at real tokens, 0 at padding; bool, integer or floating 0s and 1s), shared by
        the corrupted prompts, padding on either side (Llama-family tokenizers pad on the left). Every forward then
        runs with the mask and with ``position_ids = real_token_positions(mask)``: each prompt is computed as it
        would be alone, its real tokens at positions ``0 .. n-1`` and no real token attending to padding, so a
        row's values are those of its prompt alone (at its columns). Padding between real tokens (a gap) is
        masked the same way, but a sliding window (Mistral, Gemma 2 and 3, GPT-Neo's local layers) counts columns,
        as the model's masked forward (Hugging Face's too) does: a gapped row of such a model is its masked
        forward, not its prompt alone. A patch at a padding column changes no real token: its effect is 0
        exactly. Corrupted prompts that differ from the clean ones at padding only change nothing (a warning says
        so). With padding before a real token in any row (left padding, or gaps) the
        exact engine runs with the mask and these positions (padding keys masked out of every query, rotary and
        ALiBi positions per row), computing each cell as the masked forward does; with right padding only it runs
        without the mask (the real tokens never read the later padding). A model whose forward takes no
        ``attention_mask`` and ``position_ids`` (a :class:`~pypattern.models.HookedModule` of another module) is
        refused a mask with padding.
        ``info["attention_mask"]`` says whether a mask was given, ``info["method"]`` which method ran.

    Returns
    -------
    PatchResult
        ``values (batch, layer[, head][, pos])``. Settings under which every effect is 0 whatever the model
        (corrupted prompts equal to the clean ones, a ``MeanAblation`` over one prompt, the clean one, a
        ``LogitDiff`` whose answer and wrong tokens are the same) are named in a ``RuntimeWarning``. A cell whose
        patch cannot change an example's metric holds the target run's metric there exactly (effect exactly 0, not
        rounding noise): where it writes the target's own activation (positions before the first corrupted
        token, tokens that agree), after the metric's position, or where what it changes cannot reach the
        metric's row (a row-local patch in the last block at another row, keys beyond a sliding window); see
        :mod:`pypattern.patching.inert`. Cells inert for every example are not computed (the naive loop skips
        each; the exact engine each block of the grid all of whose cells are, e.g. the positions before the
        first corrupted token: the other blocks run as they would with them, so every value is the same bit for
        bit); ``info["inert_skipped"]`` counts them (cells a checkpoint held are not counted).
    """
    warn_half_precision(model, "patching", "activation_patching")
    clean_tokens, corrupted_tokens, attention_mask = read_prompts(
        clean_tokens, corrupted_tokens, attention_mask
    )
    with _deterministic(model):
        if method == "exact" or (isinstance(site, str) and site in HEAD_SITES):
            from ..models.convert import converted_if_convertible

            # per-head hook points and the exact engine: pypattern's model
            model = converted_if_convertible(model)
        with _own_wrapper(model) as run:
            return _activation_patching(
                run, site, clean_tokens, corrupted_tokens, metric=metric, corruption=corruption,
                direction=direction, per_position=per_position, layers=layers, heads=heads, positions=positions,
                window=window, method=method, max_batch=max_batch, max_memory=max_memory, quiet=quiet,
                checkpoint=checkpoint, attention_mask=attention_mask,
            )  # fmt: skip


def _blocks(cells: list[Cell], idx: list[int], B: int, batch: int | None) -> list[list[int]]:
    """The cells ``idx`` in the blocks the grid is computed and checkpointed in: groups of one position (the
    exact engine batches the cells of a position together, sorted by layer, in batches of ``batch`` cells), a group
    larger than a block cut at the engine's batch edges, small groups merged in order of first appearance until a
    block unembeds at least :attr:`ExactEngine.UNEMBED_ROWS` rows. Fixed by the cells and the batch, so that a
    resumed grid computes its remaining blocks as an uninterrupted one does (with another batch setting, to
    rounding)."""
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(cells[i].pos, []).append(i)
    least = max(1, -(-ExactEngine.UNEMBED_ROWS // max(1, B)))
    # a block of a large group: whole engine batches, at least `least` cells (one call per block when unbounded)
    cap = None if batch is None else batch * max(1, -(-least // batch))
    out: list[list[int]] = []
    for g in groups.values():
        g = sorted(g, key=lambda i: cells[i].layer)  # as the engine orders a position's cells
        parts = [g] if cap is None or len(g) <= cap else [g[k : k + cap] for k in range(0, len(g), cap)]
        for part in parts:
            if out and len(out[-1]) < least and len(parts) == 1:
                out[-1].extend(part)
            else:
                out.append(list(part))
    return out


def _architecture(model) -> str:
    """A hash of the model's module tree and configuration (dtype included; what its weights do not say)."""
    from ..sampling.checkpoint import model_architecture

    inner = getattr(model, "model", None)  # a hook wrapper's model (a Hugging Face model's configuration)
    if isinstance(inner, torch.nn.Module):
        return model_architecture(model) + model_architecture(inner)
    return model_architecture(model)


def _corruption_items(corruption) -> dict | None:
    """A corruption's class and declared fields (a dataclass's; a user's subclass also by its other attributes)."""
    if corruption is None:
        return None
    if dataclasses.is_dataclass(corruption):
        items = {f.name: getattr(corruption, f.name) for f in dataclasses.fields(corruption)}
    else:
        items = dict(getattr(corruption, "__dict__", {}))
    if isinstance(corruption, MeanAblation) and items.get("attention_mask") is None:
        # no mask: left out, as fingerprints leave items at their defaults out
        items.pop("attention_mask", None)
    return {
        "class": f"{type(corruption).__module__}.{type(corruption).__qualname__}",
        **{k: _ids(v) for k, v in items.items()},
    }


def _ids(tokens):
    """Token ids as int64 on the CPU (what a fingerprint hashes); anything else as it is."""
    if isinstance(tokens, torch.Tensor) and not tokens.is_floating_point() and not tokens.is_complex():
        return tokens.detach().to("cpu", torch.int64)
    return tokens


#: the header item holding a patching or circuits checkpoint's own format version (the header's ``"version"`` is
#: the file format's, which :func:`pypattern.io.save` writes)
CHECKPOINT_VERSION_KEY = "checkpoint_version"


def check_checkpoint_version(meta, path, current: int) -> None:
    """Refuse a checkpoint whose header ``meta`` holds another format version than ``current`` (the one this
    pypattern writes for its kind) with :class:`pypattern.io.FormatError` naming the file and both versions: one of
    a newer version says to upgrade pypattern, any other to start afresh. A header without a version is read as
    version 1 (a file of version 1 may lack the item: such files hold version 1's layout and resume)."""
    from .. import io
    from ..sampling.checkpoint import version_message

    version = meta.get(CHECKPOINT_VERSION_KEY, 1)
    if type(version) is not int or version != current:  # (True == 1 in Python)
        raise io.FormatError(version_message(path, version, current))


class _Grid:
    """The values ``(n_cells, batch)`` of a patching grid, computed block by block with a progress bar and, with a
    ``checkpoint``, written as they come and read back by a call of the same run (:meth:`fingerprint`)."""

    KIND = "ActivationPatchingCheckpoint"
    #: the layout of the file :meth:`_save` writes (the header's ``checkpoint_version``)
    VERSION = 1
    EVERY_S = 30.0

    def __init__(self, cells, runs, checkpoint, quiet: bool, site: str) -> None:
        self.n, self.B = len(cells), runs.B
        # on the device the metric is computed on (a GPU model's values stay there)
        self.values = torch.empty(self.n, self.B, dtype=runs.m_clean.dtype, device=runs.m_clean.device)
        self.done = torch.zeros(self.n, dtype=torch.bool, device="cpu")  # read as indices and saved
        self.path, self.quiet, self.site, self.runs, self.fp = checkpoint, quiet, site, runs, None
        self.todo = list(range(self.n))
        self.inert_skipped = 0  # cells set to the target run's metric without being computed (skip_inert)

    def fingerprint(self, model, method, direction, per_position, window, coords, clean, corrupted, corruption,
                    metric, keep=None) -> None:  # fmt: skip
        """With a checkpoint: this run's fingerprint; the values a file of the same run holds are read back (a
        file of another run is refused)."""
        if self.path is None:
            return
        from .. import io

        r = self.runs
        self.fp = io.fingerprint(
            kind="activation patching",
            site=self.site,
            method=method,
            direction=direction,
            per_position=per_position,
            window=window,
            grid=coords,
            # int32 and int64 ids of the same prompts are the same run, and so are corrupted_tokens=X and
            # corruption=TokenReplacement(X)
            clean=_ids(clean),
            corrupted=_ids(
                corrupted if corrupted is not None else getattr(corruption, "corrupted_tokens", None)
            ),
            corruption=_corruption_items(resolve_corruption(corrupted, corruption)),
            # the prompts' attention mask when it holds padding (a mask of ones runs as none): left out without one
            **({"attention_mask": _ids(keep)} if keep is not None else {}),
            metric=metric,
            **{f"weights[{n}]": t for n, t in model.state_dict().items()},
            architecture=_architecture(model),
            # the metric's values on the two runs: a change its code and settings do not show
            metric_clean=r.m_clean,
            metric_corrupted=r.m_corr,
        )
        if not os.path.exists(self.path):
            return
        arrays, meta = io.load(self.path, kind=self.KIND)
        check_checkpoint_version(meta, self.path, self.VERSION)
        io.check_fingerprint(meta.get("fingerprint"), self.fp, self.path)
        vals, done = arrays.get("values"), arrays.get("done")
        if (
            vals is None
            or done is None
            or vals.dtype != np.float64
            or done.dtype != np.bool_
            or vals.shape != (self.n, self.B)
            or done.shape != (self.n,)
        ):
            raise io.FormatError(
                f"{os.fspath(self.path)!r} is damaged: it holds no values (float64, {self.n} cells x {self.B} "
                f"prompts) and done flags (bool, {self.n}) of this grid"
            )
        if meta.get("values_hash") != io.hash_tensor(vals) or meta.get("done_hash") != io.hash_tensor(done):
            raise io.FormatError(
                f"{os.fspath(self.path)!r} is damaged: its values or done flags are not those written with it "
                "(their hashes differ); delete it to start afresh"
            )
        self.done = torch.from_numpy(done.copy())
        self.values[self.done.to(self.values.device)] = torch.from_numpy(vals[done]).to(self.values)
        self.todo = [i for i in range(self.n) if not bool(self.done[i])]

    def skip_inert(
        self, blocks: list[list[int]], inert: torch.Tensor, target_metric: torch.Tensor
    ) -> list[int]:
        """The cells of the ``blocks`` not done yet whose block holds only cells inert for every example
        (``inert (n_cells, batch)``, :func:`~pypattern.patching.inert.inert_cells`), set to the target run's
        metric ``(batch,)``: what computing their block would give, as :func:`set_inert` overwrites every value of
        it. Whole blocks only, so that every block computed holds the cells it holds without the skip (the exact
        engine's rounding depends on the cells sharing a call). Counted in :attr:`inert_skipped`."""
        full = inert.all(1).tolist()
        skip = [i for b in blocks if all(full[i] for i in b) for i in b if not bool(self.done[i])]
        if skip:
            self.values[skip] = target_metric.to(self.values)
        self.inert_skipped += len(skip)
        return skip

    def run(self, blocks: list[list[int]], compute, done: list[int] = ()) -> None:
        """Each block's values from ``compute(cell indices) -> (len, batch)``, but for the cells a checkpoint
        gave; ``done``: cells set already. Blocks are saved whole, so a run resumed with the batch settings of the
        stopped one computes whole blocks; under other settings a block may hold cells the checkpoint gave, and
        only its other cells are computed (and counted by the progress bar)."""
        self.done[list(done)] = True
        finished = int(self.done.sum())
        blocks = [[i for i in b if not bool(self.done[i])] for b in blocks]
        blocks = [b for b in blocks if b]
        saved = time.perf_counter()
        unsaved = False  # blocks finished since the last save
        with (
            sigterm_as_interrupt(),  # SIGTERM writes the finished blocks, as Ctrl-C does
            progress_bar(
                self.quiet, total=self.n, initial=finished, desc=f"patching {self.site}", unit="cell"
            ) as bar,
        ):
            try:
                for k, idx in enumerate(blocks):
                    self.values[idx] = compute(idx).to(self.values)
                    self.done[idx] = True
                    unsaved = True
                    last = k == len(blocks) - 1
                    if self.path is not None and (last or time.perf_counter() - saved >= self.EVERY_S):
                        self._save()
                        saved, unsaved = time.perf_counter(), False
                    if bar is not None:
                        bar.update(len(idx))
            except BaseException:  # stopped (Ctrl-C, an error in a block): the finished blocks are kept
                if self.path is not None and unsaved:
                    self._save()
                raise
        if self.path is not None and not blocks and self.todo:
            self._save()

    def _save(self) -> None:
        from .. import io

        vals = self.values.to("cpu", torch.float64)
        vals = vals.where(self.done[:, None], torch.zeros((), dtype=torch.float64)).numpy()
        done = self.done.numpy()
        io.save(
            self.path,
            {"values": vals, "done": done},
            # the arrays' hashes: a file edited or damaged since is refused, not read as results
            {
                CHECKPOINT_VERSION_KEY: self.VERSION,
                "fingerprint": self.fp,
                "values_hash": io.hash_tensor(vals),
                "done_hash": io.hash_tensor(done),
            },
            kind=self.KIND,
        )


@contextlib.contextmanager
def _own_wrapper(model):
    """``model`` as patching runs it (:func:`_hooked_if_hf`); a wrapper made here takes its hooks off the user's
    model when patching ends (they stayed on it, one set per call)."""
    from ..models.hooks import HookedModule

    run = _hooked_if_hf(model)
    made = run is not model and isinstance(run, HookedModule)
    try:
        yield run
    finally:
        if made:
            run.remove_hooks()


def _exact_or_naive(model, method: str, stacklevel: int = 4) -> str:
    """``method`` ("auto" or "exact") for pypattern's Transformer: the exact engine computes from the weights and
    would not run functions attached to the model's hook points or modules, so a model with any gets the naive loop
    (which runs its forward, hooks included) under "auto", with a warning, and is refused under "exact"."""
    from ..models.hooks import attached_hooks

    hooked = attached_hooks(model)
    if not hooked:
        return "exact"
    where = f"{hooked[:4]}{' ...' if len(hooked) > 4 else ''}"
    if method == "exact":
        raise ValueError(
            f"method='exact' cannot run this model: it has hooks attached at {where}, which the exact engine would "
            "not run (it computes from the weights); remove them (model.reset_hooks(), handle.remove()) or use "
            "method='naive', one forward per cell with the hooks"
        )
    warnings.warn(
        f"the model has hooks attached at {where}: patching runs one forward per cell (method='naive') so that "
        "they take effect; the exact engine would not run them",
        stacklevel=stacklevel,
    )
    return "naive"


def _deterministic(model):
    """A model whose forward is random in ``train()`` mode (dropout) is patched with its ``eval()`` forward, with a
    warning, and put back in its mode afterwards (as the converted model, which has no dropout, would be)."""
    from .._training import eval_mode_if_random

    return eval_mode_if_random(model, "patching runs it", stacklevel=5)


def _activation_patching(
    model, site, clean_tokens, corrupted_tokens, *, metric, corruption, direction, per_position, layers, heads,
    positions, window, method, max_batch, max_memory, quiet=True, checkpoint=None, attention_mask=None,
) -> PatchResult:  # fmt: skip
    from ..models.hooks import attached_hooks
    from ..models.packed import pack_budget
    from ..models.transformer import Transformer

    for name, flag in (("per_position", per_position), ("quiet", quiet)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}={flag!r} is not valid; give True or False")
    if checkpoint is not None:  # before any run: a path that cannot be a file is refused by name
        from ..sampling.plan import check_checkpoint_file

        check_checkpoint_file(checkpoint)
    clean_tokens, corrupted_tokens, corruption = long_token_args(clean_tokens, corrupted_tokens, corruption)
    is_tf = isinstance(model, Transformer)
    check_site(model.cfg if is_tf else None, site)
    if method not in ("auto", "exact", "naive"):
        raise ValueError(f"method={method!r} is not valid; choose 'auto', 'exact' or 'naive'")
    if method == "exact" and not is_tf:
        raise ValueError("method='exact' needs pypattern's Transformer; use method='naive' for other models")
    if is_tf and method != "naive":
        method = _exact_or_naive(model, method)
    method = ("exact" if is_tf else "naive") if method == "auto" else method
    n_layers = _layers(model)
    n_heads = site_heads(model.cfg, site) if is_tf else 0
    if site in HEAD_SITES and not is_tf:
        note = _generic_note(model)
        raise ValueError(
            f"site={site!r} needs pypattern's Transformer (per-head hook points)"
            + (f"; {note}" if note else "")
        )
    limit = position_limit(model)
    B, T = check_tokens(
        clean_tokens, "clean_tokens", _vocab(model), n_ctx=None if attention_mask is not None else limit
    ).shape
    keep = patching_mask(attention_mask, (B, T))
    padded = keep is not None and not bool(keep.all())
    cells, axes, coords, shape = make_cells(
        site, n_layers, n_heads, T, per_position, layers, heads, positions, window
    )
    window = int(window)  # a numpy integer too (make_cells checked it): recorded as an int
    site_hooks = sorted({hook_name(site, layer) for c in cells for layer in c.layers})

    def grid_of(runs: PatchingRuns) -> _Grid:
        """The grid's values, with what a checkpoint of this run holds read back."""
        grid = _Grid(cells, runs, checkpoint, quiet, site)
        grid.fingerprint(model, method, direction, per_position, window, coords, clean_tokens, corrupted_tokens,
                         corruption, metric, keep if padded else None)  # fmt: skip
        return grid

    available = None if is_tf else getattr(model, "hook_dict", None)
    if available is not None:
        missing = [h for h in site_hooks if h not in available]
        if missing:
            generic = getattr(getattr(model, "arch", None), "generic", False)
            why = (
                _generic_note(model)
                if generic
                else "a model with attention and MLP in parallel has no resid_mid"
            )
            raise ValueError(
                f"site={site!r} does not exist in this model: it has no hook point {missing[0]!r} ({why})"
            )
    warn_if_no_op("activation_patching", clean_tokens, corrupted_tokens, corruption, metric, keep)
    if method == "naive":
        check_batch_limits(max_batch, max_memory)  # one forward per cell: neither bounds it, both are checked
        runs = prepare_runs(
            model, site_hooks, clean_tokens, corrupted_tokens, metric, corruption, direction, False, keep
        )
        grid = grid_of(runs)
        # patches that cannot change the metric of an example: the target run's metric there, exactly; a cell
        # inert for every example is not run at all (its forward would be overwritten whole)
        inert, tgt = _inert(model, site, cells, runs, direction, causal=is_tf and not attached_hooks(model))
        skipped = grid.skip_inert([[i] for i in range(len(cells))], inert, tgt)
        grid.run(
            [[i] for i in range(len(cells))],
            lambda idx: set_inert(
                _naive(model, site, [cells[i] for i in idx], runs, metric).to(grid.values), inert[idx], tgt
            ),
            done=skipped,
        )
        vals = grid.values
    else:
        engine_batch(model.cfg, B, T, max_batch, max_memory)  # checks both arguments before any run
        # weights packed for oneDNN's matmul come out of the same memory budget as the engine's batch
        packs = pack_budget(model, max_memory)
        # one block for the recorded runs and the engine: the attention layouts and packs are made once
        with model.fixed_weights(max_pack_bytes=packs):
            # masked runs where the engine must read the mask (prepare_runs), which it then takes from them
            runs = prepare_runs(
                model, site_hooks, clean_tokens, corrupted_tokens, metric, corruption, direction, True, keep
            )
            T_eff = runs.metric_rows
            budget = max_memory if not packs else max_memory - packs
            batch = engine_batch(model.cfg, B, T_eff, max_batch, budget)
            grid = grid_of(runs)
            estimate = None
            if grid.todo:
                # the engine lowers the batch so that its logits (and the metric's temporaries) fit too
                engine = engine_on_runs(
                    model, runs, site, metric, batch, packs, max_memory=None if max_memory is None else budget,
                    warn_budget=False,
                )  # fmt: skip
                warn_if_over_budget(engine, max_memory, packs, stacklevel=3)
                batch = engine.max_batch
                # patches that cannot change the metric of an example (the same activation as the target's, out
                # of the metric's reach): the target run's metric there, exactly (computed, it is rounding noise)
                inert, tgt = _inert(model, site, cells, runs, direction, causal=True)
                live = [i for i, c in enumerate(cells) if c.pos < T_eff]
                dead = [i for i, c in enumerate(cells) if c.pos >= T_eff]
                if dead:  # a patch after the metric's last row changes nothing
                    grid.values[dead] = tgt.to(grid.values)
                blocks = _blocks(cells, live, B, batch)
                # cells per engine batch: the batch setting, at most the cells of one block
                most = max((len(b) for b in blocks), default=1)
                estimate = engine.memory_estimate(min(batch or most, most), len(live))
                # a block whose every cell is inert for every example is not run (its values would be overwritten
                # whole); the blocks are those of the grid with them, so that the others share an engine call
                # with the same cells, and come out the same bit for bit, whatever a checkpoint holds
                skipped = grid.skip_inert(blocks, inert, tgt)
                grid.run(
                    blocks,
                    # the inert entries set in the grid's dtype: the target's metric exactly (a float64 metric of
                    # a float32 model is not rounded to the engine's float32)
                    lambda idx: set_inert(
                        engine.run([cells[i] for i in idx]).to(grid.values), inert[idx], tgt
                    ),
                    done=dead + skipped,
                )
            vals = grid.values
    values = vals.T.reshape(B, *shape)
    return PatchResult(
        values=values,
        clean=runs.m_clean,
        corrupted=runs.m_corr,
        axes=axes,
        coords=coords,
        site=site,
        direction=direction,
        metric=result_name(metric),
        method=method,
        info={
            "window": window,
            "per_position": per_position,
            "num_cells": len(cells),
            "inert_skipped": grid.inert_skipped,
            "attention_mask": keep is not None,
            "method": method,
            **({"max_batch": batch} if method == "exact" else {}),
            **({"memory_estimate": estimate} if method == "exact" and estimate is not None else {}),
        },
    )
