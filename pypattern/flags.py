"""Inert interpretability flags: train a few residual-stream dimensions into concept flags, steer with them.

A :class:`FlagSpec` names a hook point (a residual stream, e.g. ``"blocks.1.hook_resid_pre"``), the residual
dimensions used as flags and how many concepts they encode. Each concept owns a contiguous group of the flag
dimensions (``len(dims)`` split as evenly as possible, e.g. 16 dimensions for 5 concepts as 4, 3, 3, 3, 3),
and its *code* sets its own group to ``on_value`` and every other flag dimension to ``off_value``.

Training (:func:`train_flags`) has two stages:

1. **Produce the flags.** Language-modelling loss plus ``aux_weight`` times :func:`flag_loss`, the mean
   squared error between the raw flag dimensions (as the model writes them, before any overwrite) and the
   code of the concept readable from the prefix, at every position where that concept is known. The squared
   error to fixed values (rather than a cross-entropy on the flag dimensions) gives flags with a definite
   value, so that setting a flag at inference means writing the same numbers the model writes itself.
2. **Rely on the flags.** Same losses, on data where a fraction ``switch_prob`` of the sequences change
   concept at a random position; from the position before the switch on, the flag dimensions are overwritten
   with the *new* concept's code while the tokens so far still say the old one, so only the flags predict
   what follows. The auxiliary loss is still applied to what the model writes (labelled with the concept
   readable from the prefix), so the model keeps producing honest flags.

At inference, :func:`steer` overwrites the flag dimensions with a concept's code (all positions or some) and
:func:`generate` samples a continuation under it; :func:`flag_report` measures read-out accuracy, steering
against the prompt's concept (with an unsteered baseline), reliance (loss when the flags are ablated) and a
linear probe for the concept on the *non*-flag dimensions (to see whether concept information left them).

Tasks used here must give, in ``TaskBatch.extra``, ``"concept_pos"`` ``(num_samples, pos)`` (concept readable
at each position, -1 when unknown) and, for stage 2 and steering, ``"target_concept"`` ``(num_samples, pos)``
(concept of the next token), ``"switch_pos"`` ``(num_samples,)``, ``"concept"`` ``(num_samples,)``; the task
must accept ``sample(num_samples, seed, switch_prob=...)`` and have ``token_concepts`` ``(d_vocab,)``.
:class:`~pypattern.tasks.topics.TopicTask` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ._checks import is_count, model_device
from ._training import modes_kept, random_in_training, values_kept_on_error
from .equivalence import _check_flag, _generator_seed
from .io import FormatError, Saveable, register
from .losses import _takes, position_limit, read_logits
from .patching.api import _vocab, check_token_ids, check_token_tensor
from .ridge import as_float64, float64_device
from .sampling.diagnostics import user_stacklevel
from .tasks.base import IGNORE, Task, generator

__all__ = [
    "FlagSpec",
    "flag_loss",
    "read_flags",
    "overwrite_flags",
    "steer",
    "ablate_flags",
    "generate",
    "train_flags",
    "FlagTrainResult",
    "probe_accuracy",
    "flag_report",
    "FlagReport",
]


# ----- specification ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlagSpec:
    """Which residual dimensions at which hook point are concept flags.

    Parameters
    ----------
    hook : str
        Hook point whose activation ``(batch, pos, d_model)`` holds the flags, e.g.
        ``"blocks.1.hook_resid_pre"``.
    dims : tuple of int
        Distinct residual dimensions used as flags; at least ``num_concepts`` of them.
    num_concepts : int
        Number of concepts (at least 2). Concept ``c`` owns the ``c``-th of ``num_concepts`` contiguous,
        nearly equal groups of ``dims``.
    on_value, off_value : float
        Value of a concept's own flag dimensions, and of the others, in its code.
    """

    hook: str = "blocks.1.hook_resid_pre"
    dims: tuple[int, ...] = (0, 1, 2, 3)
    num_concepts: int = 2
    on_value: float = 1.0
    off_value: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str) or not self.hook:
            raise ValueError(
                f"hook={self.hook!r} is not valid; give a hook name like 'blocks.1.hook_resid_pre'"
            )
        if isinstance(self.dims, set | frozenset | dict):
            raise TypeError(
                f"dims={self.dims!r} is a {type(self.dims).__name__}, which has no order: the flag dimensions are "
                "split into the concepts' groups in order, so give an ordered sequence (a tuple or list of ints)"
            )
        try:
            dims = tuple(int(d) for d in self.dims)
        except (TypeError, ValueError):
            raise ValueError(f"dims={self.dims!r} is not valid; give a sequence of ints") from None
        if any(isinstance(d, bool) or int(d) != d for d in self.dims):
            raise ValueError(f"dims={self.dims!r} is not valid; give a sequence of ints")
        object.__setattr__(self, "dims", dims)
        nc = self.num_concepts
        if isinstance(nc, bool) or not isinstance(nc, numbers.Integral) or nc < 2:
            raise ValueError(f"num_concepts={nc!r} is not valid; give an int >= 2")
        object.__setattr__(self, "num_concepts", int(nc))  # a numpy integer too
        if len(dims) < self.num_concepts:
            raise ValueError(
                f"dims={dims} has {len(dims)} entries; give at least num_concepts={self.num_concepts}"
            )
        if len(set(dims)) != len(dims):
            dup = sorted({d for d in dims if dims.count(d) > 1})
            raise ValueError(f"dims={dims} repeats {dup}; give distinct dimensions")
        if min(dims) < 0:
            raise ValueError(f"dims={dims} has negative entries; give dimensions in 0..d_model-1")
        for arg in ("on_value", "off_value"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{arg}={v!r} is not valid; give a finite number")
            object.__setattr__(self, arg, float(v))  # a numpy scalar too
        if float(self.on_value) == float(self.off_value):
            raise ValueError(
                f"on_value={self.on_value!r} equals off_value={self.off_value!r}; give two values"
            )

    @property
    def num_flags(self) -> int:
        return len(self.dims)

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Indices into ``dims`` owned by each concept: ``num_concepts`` contiguous, nearly equal groups."""
        n, c = len(self.dims), self.num_concepts
        sizes = [n // c + (1 if i < n % c else 0) for i in range(c)]
        out, start = [], 0
        for s in sizes:
            out.append(tuple(range(start, start + s)))
            start += s
        return tuple(out)

    def code(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Flag values of every concept: ``(num_concepts, num_flags)``, on ``device`` (default the CPU)."""
        device = "cpu" if device is None else device
        out = torch.full(
            (self.num_concepts, self.num_flags), float(self.off_value), dtype=dtype, device=device
        )
        for c, g in enumerate(self.groups):
            out[c, list(g)] = float(self.on_value)
        return out

    def check(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` if ``model`` has no hook point ``hook``, if ``hook`` is a hook point of a
        :class:`~pypattern.models.Transformer` whose activation is not ``(batch, pos, features)`` (an attention
        hook's per-head activations, a layer norm's scale), or if ``dims`` exceed the width of its activation
        (``d_model`` for the residual stream and the hooks written into it, ``d_mlp`` for the MLP's ``hook_pre``
        and ``hook_post``)."""
        names = getattr(model, "hook_dict", None)
        if names is None:
            hint = ""
            if hasattr(getattr(model, "config", None), "model_type"):  # a Hugging Face model
                hint = (
                    ": convert a Hugging Face model with pypattern.from_hf(model), or wrap it with "
                    "pypattern.hooked_hf(model)"
                )
            raise ValueError(
                f"model has no hook points (hook_dict); give a pypattern Transformer or HookedModule{hint}"
            )
        if self.hook not in names:
            near = [n for n in names if "resid" in n][:6]
            raise ValueError(f"hook={self.hook!r} is not a hook point of the model; valid examples: {near}")
        cfg = getattr(model, "cfg", None)
        d_model = getattr(cfg, "d_model", None)
        if d_model is None:
            return
        last = self.hook.rsplit(".", 1)[-1]
        d_mlp = getattr(cfg, "d_mlp", None)
        mlp_wide = ".mlp." in self.hook and last in _MLP_HOOKS and d_mlp is not None
        normed = last == "hook_normalized" and ".attn." not in self.hook  # ln1, ln2, ln_final: d_model wide
        if not (last in _RESIDUAL_HOOKS or normed or mlp_wide):
            raise ValueError(
                f"hook={self.hook!r} is not a residual-stream hook point: its activation is not (batch, pos, "
                "d_model) (attention hooks hold one slice per head, a layer norm's hook_scale one number per "
                "position, a router's hooks one value per expert); give a residual-stream hook such as "
                "'blocks.1.hook_resid_pre'"
            )
        if mlp_wide:
            if max(self.dims) >= d_mlp:
                raise ValueError(
                    f"dims={self.dims} has entries >= {d_mlp}, the width of hook={self.hook!r} (an MLP hook "
                    f"point of width d_mlp={d_mlp}, not a residual-stream one); give dimensions in 0..{d_mlp - 1}, "
                    "or a residual-stream hook such as 'blocks.1.hook_resid_pre'"
                )
            return
        if max(self.dims) >= d_model:
            raise ValueError(
                f"dims={self.dims} has entries >= d_model={d_model}, the width of the residual stream at "
                f"hook={self.hook!r}; give dimensions in 0..{d_model - 1}"
            )


# hook points of a Transformer whose activation is (batch, pos, d_model), and those of its MLPs that are (batch, pos,
# d_mlp); every other one (per-head attention activations, a norm's scale, a router's logits and experts) is not
_RESIDUAL_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_embed",
    "hook_pos_embed",
    "hook_attn_out",
    "hook_mlp_out",
)
_MLP_HOOKS = ("hook_pre", "hook_pre_linear", "hook_post")


def _wide(device) -> torch.dtype:
    """The dtype flag values are made in before they are cast to the activations': float64, or float32 on a device
    without float64 (Apple's MPS), whose activations are at most float32."""
    return torch.float64 if float64_device(device) == torch.device(device) else torch.float32


def _check_spec(spec) -> None:
    """``spec`` is a :class:`FlagSpec` (a hook name alone does not say which dimensions are flags)."""
    if not isinstance(spec, FlagSpec):
        raise TypeError(
            f"spec is a {type(spec).__name__} ({spec!r}); give a FlagSpec, e.g. "
            "FlagSpec('blocks.1.hook_resid_pre', dims=(0, 1, 2, 3), num_concepts=2)"
        )


def _tensor_arg(x, name: str, give: str, **kw) -> torch.Tensor:
    """``torch.as_tensor(x, **kw)``, with a value torch cannot read as a tensor refused naming ``name``; ``give``
    says what is expected."""
    try:
        return torch.as_tensor(x, **kw)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} is a {type(x).__name__} ({x!r:.80}); give {give}") from None


def _labels(concept_labels: torch.Tensor, shape: tuple[int, int], spec: FlagSpec) -> torch.Tensor:
    """Broadcast labels ``(batch,)`` or ``(batch, pos)`` to ``(batch, pos)`` with validation."""
    lab = _tensor_arg(
        concept_labels, "concept_labels", "integer concept indices (batch,) or (batch, pos), -1 for unknown"
    )
    if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
        raise ValueError(f"concept_labels has dtype {lab.dtype}; give integer concept indices")
    # int64 before the range check and the indexing: an unsigned tensor compares with -1 as with 255 (refusing valid
    # labels), and int8 or int16 tensors cannot index the code
    lab = lab.long()
    b, t = shape
    if lab.dim() == 1 and lab.shape[0] == b:
        lab = lab[:, None].expand(b, t)
    elif lab.shape != (b, t):
        raise ValueError(
            f"concept_labels has shape {tuple(lab.shape)}; give ({b},) or ({b}, {t}) to match acts "
            "(batch, pos)"
        )
    if bool((lab >= spec.num_concepts).any()) or bool((lab < -1).any()):
        raise ValueError(
            f"concept_labels has values in [{int(lab.min())}, {int(lab.max())}]; give "
            f"0..{spec.num_concepts - 1} "
            "(or -1 for 'unknown')"
        )
    return lab


def _check_acts(acts: torch.Tensor, spec: FlagSpec) -> None:
    _check_spec(spec)
    if not isinstance(acts, torch.Tensor):
        raise TypeError(f"acts is a {type(acts).__name__}; give a tensor (batch, pos, d_model)")
    if not acts.is_floating_point():
        raise TypeError(f"acts has dtype {acts.dtype}; give the residual stream's floating-point activations")
    if acts.dim() != 3:
        raise ValueError(f"acts has shape {tuple(acts.shape)}; give (batch, pos, d_model)")
    if max(spec.dims) >= acts.shape[-1]:
        raise ValueError(
            f"dims={spec.dims} has entries >= d_model={acts.shape[-1]} of acts; give dimensions in "
            f"0..{acts.shape[-1] - 1}"
        )


def flag_loss(
    acts: torch.Tensor,
    concept_labels: torch.Tensor,
    spec: FlagSpec,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Auxiliary flag loss: mean squared error of the raw flag dimensions to the labelled concept's code.

    ``mean over positions with label >= 0 of mean over k of (acts[b, t, dims[k]] - code[label[b, t], k])**2``,
    where ``attention_mask`` (if given) is 1.

    Parameters
    ----------
    acts : Tensor ``(batch, pos, d_model)``
        Activation at ``spec.hook`` (as the model wrote it).
    concept_labels : integer Tensor ``(batch,)`` or ``(batch, pos)``
        Concept per sample or per position; -1 marks positions without a known concept (excluded).
    spec : FlagSpec
    attention_mask : Tensor ``(batch, pos)`` of 0 and 1 (bool, integer or float), optional
        A padded batch's mask (Hugging Face's ``attention_mask``): positions where it is 0 are padding and are
        excluded, as if labelled -1 (so that per-sample labels can be given for a padded batch).

    Returns
    -------
    Tensor, scalar (0 when no position is labelled, whatever the activations hold elsewhere), in the dtype of
    ``acts``, or float32 for 16-bit ``acts`` (computed in float32: in float16 a flag 256 or more from its code
    would give inf).
    """
    _check_acts(acts, spec)
    lab = _labels(concept_labels, acts.shape[:2], spec).to(acts.device)
    mask = lab >= 0
    if attention_mask is not None:
        mask = mask & _attention_mask(attention_mask, acts.shape[:2], acts.device)
    if not bool(mask.any()):
        # an empty sum: 0, on the graph, with a zero gradient (a sum over all of acts would be NaN where an
        # unlabelled position holds NaN or inf)
        return _widened(acts[..., :0]).sum()
    flags = _widened(acts[..., list(spec.dims)][mask])  # (n_valid, num_flags)
    target = spec.code(flags.dtype, acts.device)[lab[mask]]
    return (flags - target).pow(2).mean()


def _attention_mask(attention_mask, shape: tuple[int, int], device) -> torch.Tensor:
    """``attention_mask`` ``(batch, pos)`` of 0 and 1 as a bool tensor (True: a real token), refused by name when it
    is not one."""
    m = _tensor_arg(attention_mask, "attention_mask", "a (batch, pos) tensor of 0 and 1 (1: a real token)")
    if m.is_complex():
        raise TypeError(f"attention_mask has dtype {m.dtype}; give bool, integer or float 0 and 1")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask has shape {tuple(m.shape)}; give {tuple(shape)} to match acts (batch, pos)"
        )
    m = m.to(device)
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(
                "attention_mask has values other than 0 and 1; give 1 for real tokens, 0 for padding"
            )
        m = m == 1
    return m


def _widened(x: torch.Tensor) -> torch.Tensor:
    """16-bit activations (float16, bfloat16: a half model's, or autocast's) widened to float32: their squared
    distances to a code overflow float16 from a distance of 256 on (a flag loss of inf, every code equally far), and
    a mean rounded to 16 bits is resolved to about 1e-2 only. Other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def read_flags(acts: torch.Tensor, spec: FlagSpec) -> torch.Tensor:
    """Decode the concept from the flag dimensions: the concept whose code is nearest (Euclidean).

    Parameters
    ----------
    acts : Tensor ``(batch, pos, d_model)``
    spec : FlagSpec
        Which dimensions are flags.

    Returns
    -------
    LongTensor ``(batch, pos)``
    """
    _check_acts(acts, spec)
    flags = _widened(acts[..., list(spec.dims)])  # 16-bit distances overflow (every code at inf) or tie
    code = spec.code(flags.dtype, acts.device)
    return (flags[..., None, :] - code).pow(2).sum(-1).argmin(-1)


# ----- overwriting ------------------------------------------------------------------------------------------
def _check_concept_task(task, spec) -> None:
    """The task labels concepts (``sample(..., switch_prob=)`` with ``extra['concept_pos']``) and has as many as
    ``spec.num_concepts``."""
    import inspect

    try:
        takes = "switch_prob" in inspect.signature(task.sample).parameters
    except (TypeError, ValueError, AttributeError):
        takes = False
    if not takes:
        raise ValueError(
            f"task {type(task).__name__} has no concepts to flag: concept flags need a task whose sample() takes "
            "switch_prob and labels extra['concept_pos'] (e.g. pypattern.TopicTask)"
        )
    n = getattr(task, "num_topics", None)
    if isinstance(n, int) and n != spec.num_concepts:
        raise ValueError(
            f"spec.num_concepts={spec.num_concepts} but the task has {n} concepts (num_topics={n}); give a FlagSpec "
            "with one concept per topic"
        )


def _check_vocab(model, task) -> None:
    """The model reads every token the task samples: its vocabulary is at least the task's (a larger one, as a
    converted checkpoint has, is fine: tokens beyond the task's carry no concept)."""
    tv = len(task.token_concepts) if hasattr(task, "token_concepts") else getattr(task, "d_vocab", None)
    mv = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if isinstance(tv, int) and isinstance(mv, int) and mv < tv:
        raise ValueError(
            f"the model's vocabulary has {mv} tokens, fewer than the task's {tv}: the task's tokens "
            f"{mv}..{tv - 1} have no embedding; give a model with at least {tv} tokens"
        )


def _check_positions(model, task) -> None:
    """The model reads sequences as long as the task's: its learned positions (:func:`_position_limit`, a Hugging Face
    model's too, whose embedding would otherwise fail with a bare ``IndexError``) cover the task's ``n_ctx``."""
    seq_len, limit = getattr(task, "n_ctx", None), _position_limit(model)
    if isinstance(seq_len, int) and isinstance(limit, int) and seq_len > limit:
        raise ValueError(
            f"the task's sequences have {seq_len} tokens (n_ctx={seq_len}) but the model has {limit} learned "
            f"positions (0 .. {limit - 1}); give a task of sequences of at most {limit} tokens, or a model with "
            "more positions"
        )


def _concepts_of(task, tokens: torch.Tensor) -> torch.Tensor:
    """The concept of each token (-1: none), tokens beyond the task's vocabulary (a larger model's) included."""
    tc = torch.as_tensor(task.token_concepts, device=tokens.device)  # read where the tokens are
    inside = tokens < len(tc)
    return torch.where(inside, tc[tokens.clamp(max=len(tc) - 1)], torch.full_like(tokens, -1))


def _grown(given: int, b: int, name: str) -> str:
    """The hint of a per-sample ``name`` (``concept``, ``positions``) of ``given`` rows met by a forward of ``b``, a
    multiple of them: a generation that runs each prompt ``b // given`` times (beam search's ``num_beams``,
    ``num_return_sequences``) forwards that many rows per prompt, next to each other."""
    if given < 1 or b <= given or b % given:
        return ""
    k = b // given
    return (
        f": this forward has {b} rows, {k} per row of the {given} given (Hugging Face generate's num_beams or "
        f"num_return_sequences = {k} runs each prompt {k} times, its rows next to each other); give "
        f"{name}.repeat_interleave({k}, dim=0)"
    )


def _position_mask(positions, b: int, t: int, device, start: int = 0) -> torch.Tensor:
    """``(batch, pos)`` bool mask from None (all), an int ``p`` (positions >= p), or a bool tensor, for ``t``
    positions starting at the absolute position ``start`` (that of the first new token of a forward under a
    key-value cache, 0 without one)."""
    if isinstance(positions, bool | np.bool_):
        raise ValueError(
            f"positions={positions!r} is not valid; give None (every position), an int start position or a bool mask"
        )
    if positions is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    if isinstance(positions, numbers.Integral):
        if positions < 0:
            raise ValueError(
                f"positions={positions!r} is not valid; give a start position >= 0 (or a bool mask)"
            )
        return (torch.arange(start, start + t, device=device) >= int(positions))[None].expand(b, t)
    m = torch.as_tensor(positions, device=device)
    if m.dtype != torch.bool:
        raise ValueError(f"positions has dtype {m.dtype}; give None, an int start position or a bool mask")
    given = tuple(m.shape)
    if m.dim() == 1:
        m = m[None].expand(b, -1)
    if m.dim() != 2 or m.shape[0] != b or m.shape[1] < start + t:
        covers = (
            f"{b} sequences, and this forward under a key-value cache covers positions {start}..{start + t - 1}: "
            f"{t} new token(s) after {start} cached ones"
            if start
            else f"{b} sequences of {t} positions"
        )
        grown = _grown(m.shape[0], b, "positions") if m.dim() == 2 and m.shape[1] >= start + t else ""
        raise ValueError(
            f"positions has shape {given}; give a bool mask (pos,) or ({b}, pos) with pos >= {start + t} (the batch "
            f"has {covers}){grown}"
        )
    return m[:, start : start + t]


# keyword arguments under which a forward is given a key-value cache: Hugging Face's (``cache`` from transformers 5
# on, ``past_key_values`` before) and TransformerLens' (``past_kv_cache``)
_CACHE_KWARGS = ("cache", "past_key_values", "past_kv_cache")


def _cache_length(cache) -> int | None:
    """The number of positions held by a key-value cache: a Hugging Face ``Cache``'s ``get_seq_length()``, the
    keys' length of a legacy tuple of ``(keys, values)`` per layer ``(batch, heads, pos, d_head)`` or of
    TransformerLens' cache (``entries[0].past_keys`` ``(batch, pos, heads, d_head)``); None when it cannot be read."""
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        try:
            n = length()
        except Exception:  # noqa: BLE001 - a cache of another kind: its length is unknown
            return None
        return int(n) if isinstance(n, numbers.Integral) or (torch.is_tensor(n) and n.numel() == 1) else None
    entries = getattr(cache, "entries", None)
    if isinstance(entries, list | tuple) and entries:
        keys = getattr(entries[0], "past_keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            return int(keys.shape[1])
    if isinstance(cache, list | tuple):
        if not cache:
            return 0
        layer = cache[0]
        if (
            isinstance(layer, list | tuple)
            and layer
            and isinstance(layer[0], torch.Tensor)
            and layer[0].dim() == 4
        ):
            return int(layer[0].shape[-2])
    return None


def _forward_start(args: tuple, kwargs: dict) -> int | str:
    """The absolute position of the first token a forward is given (called with ``args`` and ``kwargs``), read
    before the forward runs: the first entry of ``cache_position`` (Hugging Face before transformers 5), else the
    length of the cache it is given (0 without one; a cache made inside the forward starts empty), else the length
    of a 2-d ``attention_mask`` (which covers the cached positions too) beyond the input's. A string saying which
    cache could not be read when none of these tells."""
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    given = [(f"{k}=", kwargs[k]) for k in _CACHE_KWARGS if kwargs.get(k) is not None]
    given += [
        (f"positional argument {i} ", a) for i, a in enumerate(args[1:], 1) if hasattr(a, "get_seq_length")
    ]
    if not given:
        return 0
    name, cache = given[0]
    past = _cache_length(cache)
    if past is not None:
        return past
    am = kwargs.get("attention_mask")
    x = args[0] if args else kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if (
        isinstance(am, torch.Tensor)
        and am.dim() == 2
        and isinstance(x, torch.Tensor)
        and x.dim() >= 2
        and am.shape[1] >= x.shape[1]
    ):
        return int(am.shape[1] - x.shape[1])
    return (
        f"it was given a key-value cache ({name}a {type(cache).__name__}) whose length, the absolute position of "
        "its first new token, cannot be read"
    )


def _positions_text(positions) -> str:
    """``positions`` as an error message names it: an int as it is, a mask by its shape."""
    if isinstance(positions, torch.Tensor | np.ndarray):
        return f"positions (a mask of shape {tuple(positions.shape)})"
    return f"positions={positions!r}"


def _cache_refused(who: str, spec: FlagSpec, positions, why: str) -> RuntimeError:
    fix = (
        "run the steered model through its own forward (pypattern.flags.generate(model, ...) generates so)"
        if why == _NO_FORWARD
        else "generate without the cache (use_cache=False in Hugging Face's generate, or a forward over the whole "
        "sequence) or with pypattern.flags.generate"
    )
    return RuntimeError(
        f"{who}: {_positions_text(positions)} selects absolute positions, but a forward reached hook={spec.hook!r} "
        f"whose first token's absolute position is unknown: {why}. Under a key-value cache each forward sees only "
        f"the new tokens, so the positions cannot be placed; {fix}, or give positions=None (every position, right "
        "whatever the cache)"
    )


def overwrite_flags(
    acts: torch.Tensor, spec: FlagSpec, values: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Return ``acts`` with the flag dimensions set to ``values`` where ``mask`` (a differentiable copy).

    Parameters
    ----------
    acts : Tensor ``(batch, pos, d_model)``
    spec : FlagSpec
        Which dimensions are flags.
    values : Tensor ``(num_flags,)``, ``(batch, num_flags)`` or ``(batch, pos, num_flags)``
    mask : bool Tensor ``(batch, pos)``, optional (all positions by default)
    """
    _check_acts(acts, spec)
    b, t, _ = acts.shape
    v = _tensor_arg(
        values,
        "values",
        "flag values (num_flags,), (batch, num_flags) or (batch, pos, num_flags)",
        dtype=acts.dtype,
        device=acts.device,
    )
    if v.dim() == 0 or v.shape[-1] != spec.num_flags:
        raise ValueError(
            f"values has shape {tuple(v.shape)}; its last dimension must be num_flags={spec.num_flags}"
        )
    if v.dim() == 1:
        v = v.expand(b, t, -1)
    elif v.dim() == 2 and v.shape[0] == b:
        v = v[:, None].expand(b, t, -1)
    if v.shape != (b, t, spec.num_flags):
        raise ValueError(
            f"values has shape {tuple(v.shape)}; give (num_flags,), (batch, num_flags) or "
            "(batch, pos, num_flags)"
        )
    idx = list(spec.dims)
    out = acts.clone()
    if mask is None:
        out[..., idx] = v
    else:
        mask = _tensor_arg(mask, "mask", "a bool tensor (batch, pos) or None", device=acts.device)
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, t):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype}; give a bool tensor (batch, pos) = "
                f"({b}, {t})"
            )
        out[..., idx] = torch.where(mask[..., None], v, acts[..., idx])
    return out


def _concept_tensor(concept, spec: FlagSpec) -> torch.Tensor:
    """``concept`` as an integer tensor, one concept (0-d) or one per sample (``(batch,)``), each in range."""
    bad = ValueError(
        f"concept={concept!r} is not valid; give an int or a LongTensor (batch,) of concepts "
        f"0..{spec.num_concepts - 1}"
    )
    if concept is None or isinstance(concept, bool | str | bytes):
        raise bad
    try:
        c = torch.as_tensor(concept)
    except (TypeError, ValueError, RuntimeError):
        raise bad from None
    if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
        raise bad
    if c.dim() > 1:
        raise ValueError(f"concept has shape {tuple(c.shape)}; give an int or a tensor of shape (batch,)")
    if bool((c < 0).any()) or bool((c >= spec.num_concepts).any()):
        raise ValueError(f"concept={c.tolist()} is out of range; give 0..{spec.num_concepts - 1}")
    # int64 for indexing the code: a uint8 tensor would index it as a mask (concepts [1, 1] selecting codes 0 and 1),
    # an int8 or int16 one not at all
    return c.long()


def _concept_values(concept, spec: FlagSpec, b: int) -> torch.Tensor:
    c = _concept_tensor(concept, spec)
    if c.dim() == 0:
        c = c.expand(b)
    if c.shape != (b,):
        raise ValueError(
            f"concept has shape {tuple(c.shape)}; give an int or a tensor of shape ({b},){_grown(c.shape[0], b, 'concept')}"
        )
    # in float64, cast to the activations' dtype where they are written (a float64 model gets the values exactly);
    # a CUDA concept tensor indexes a code on its own device
    return spec.code(_wide(c.device), device=c.device)[c]


@contextlib.contextmanager
def _flag_hook(model, spec: FlagSpec, make_values, positions, who: str) -> Iterator[None]:
    """Overwrite the flags at ``spec.hook`` in every forward of ``model`` within the block; a forward of ``model``
    that ends without reaching the hook point (``stop_at_layer`` before it, a hook point the forward does not run)
    raises ``RuntimeError`` naming it, and one that starts after it (``start_at_layer``, whose given residual stream
    already holds whatever flags it holds) warns."""
    spec.check(model)
    # one counter per forward of the model under way (a stack: a forward may call the model again); the hook function
    # counts in each of them
    running: list[list] = []
    # the absolute position of the first token of each forward under way (innermost last), read from its arguments
    # before it runs (a cache grows during it): an int, or a string saying why it is unknown
    starts: list = []
    cache_site = _cache_site(model)

    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        for entry in running:
            entry[0] += 1
        b, t = x.shape[:2]
        start = 0
        if positions is not None and cache_site is not None:
            start = starts[-1] if starts else _NO_FORWARD
            if isinstance(start, str):
                raise _cache_refused(who, spec, positions, start)
        return overwrite_flags(x, spec, make_values(b), _position_mask(positions, b, t, x.device, start))

    def pre(mod, args, kwargs) -> None:
        running.append([0, kwargs])

    def post(mod, args, kwargs, out) -> None:
        if not running:
            return
        calls, kw = running.pop()
        if calls:
            return
        _unreached(spec, who, kw)

    def start_pre(mod, args, kwargs) -> None:
        starts.append(_forward_start(args, kwargs))

    def start_post(mod, args, kwargs, out) -> None:
        if starts:
            starts.pop()

    handles = []
    undo = None
    if _calls_forward_directly(model):
        # TransformerLens' HookedTransformer.generate calls self.forward, past the module's hooks: the forward
        # itself is wrapped (its calls through the module run the wrapper too), which counts and reads the start
        undo = _wrap_forward(model, pre, post, start_pre, start_post)
    elif isinstance(model, torch.nn.Module):
        handles = [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True),
        ]
    if cache_site is not None and undo is None:
        handles += [
            cache_site.register_forward_pre_hook(start_pre, with_kwargs=True),
            cache_site.register_forward_hook(start_post, with_kwargs=True, always_call=True),
        ]
    try:
        with model.hooks([(spec.hook, fn)]):
            yield
    finally:
        for h in handles:
            h.remove()
        if undo is not None:
            undo()


def _calls_forward_directly(model) -> bool:
    """Whether ``model`` is a TransformerLens ``HookedTransformer`` (2.x / 3.x), whose ``generate`` calls
    ``self.forward`` (with ``past_kv_cache=`` under its cache) rather than the module, so that forward hooks on the
    module do not see its forwards."""
    if not isinstance(model, torch.nn.Module):
        return False
    from .models.convert.hooked_transformer import is_hooked_transformer

    return is_hooked_transformer(model)


_ABSENT = object()


def _wrap_forward(model: torch.nn.Module, pre, post, start_pre, start_post):
    """Replace ``model.forward`` (on the instance) by one that runs ``pre`` / ``start_pre`` before the forward and
    ``post`` (on success) / ``start_post`` (always) after it, with the forward's arguments, as the module's forward
    hooks would; a call through the module (``model(...)``) runs it too. Returns the function that restores the
    forward."""
    before = model.__dict__.get("forward", _ABSENT)
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        pre(model, args, kwargs)
        start_pre(model, args, kwargs)
        try:
            out = inner(*args, **kwargs)
        finally:
            start_post(model, args, kwargs, None)
        post(model, args, kwargs, out)
        return out

    object.__setattr__(model, "forward", forward)

    def undo() -> None:
        if model.__dict__.get("forward") is not forward:
            return  # replaced again since: left as it is
        if before is _ABSENT:
            del model.__dict__["forward"]
        else:
            object.__setattr__(model, "forward", before)

    return undo


_NO_FORWARD = (
    "the hook point ran outside a forward of the model steered (e.g. the wrapped model's own generate or forward "
    "called directly), so whether a key-value cache is in use cannot be seen"
)


def _cache_site(model) -> torch.nn.Module | None:
    """The module whose forward's arguments say whether a key-value cache is in use, and its length: for
    :func:`~pypattern.models.hooked_hf`'s wrapper the Hugging Face decoder (``GPT2Model``, ``LlamaModel``, ...),
    which every forward runs, the wrapper's own, the Hugging Face model's and its ``generate``'s alike; None for
    pypattern's :class:`~pypattern.models.Transformer`, which has no cache (its positions are always those of the
    tokens it is given); the model itself otherwise (a forward that does not go through it is refused with
    positions)."""
    from .models.hf import HookedHF
    from .models.transformer import Transformer

    if isinstance(model, Transformer):
        return None
    if isinstance(model, HookedHF):
        try:
            return model.hf_model.get_submodule(model.arch.base)
        except AttributeError:
            pass
    return model if isinstance(model, torch.nn.Module) else None


def _unreached(spec: FlagSpec, who: str, kwargs: dict) -> None:
    """A forward of the model under :func:`steer` / :func:`ablate_flags` ended without reaching ``spec.hook``: the
    flags were not overwritten. ``RuntimeError`` naming the hook point, or a warning when the forward started
    after it (``start_at_layer``: the residual stream it was given carries its own flags)."""
    start, stop = kwargs.get("start_at_layer"), kwargs.get("stop_at_layer")
    if start is not None:
        warnings.warn(
            f"{who}: a forward with start_at_layer={start!r} did not reach hook={spec.hook!r}, so its flags were not "
            "overwritten in it: they are whatever the residual stream given to it holds (give the hook point of a "
            "block the forward runs to overwrite them there)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return
    why = (
        f" (it was called with stop_at_layer={stop!r}, which stops before the hook point)"
        if stop is not None
        else " (the model lists the hook point, but its forward does not run it: e.g. a hook point replaced after "
        "the model was built, or a wrapper whose hooks were removed)"
    )
    raise RuntimeError(
        f"{who}: the model's forward did not reach hook={spec.hook!r}{why}, so the flags were not overwritten and its "
        "output is that of the unsteered model; give a hook point the forward runs"
    )


@contextlib.contextmanager
def steer(model, spec: FlagSpec, concept: int | torch.Tensor, positions=None) -> Iterator[None]:
    """Within the block, every forward of ``model`` has its flags overwritten with ``concept``'s code.

    Parameters
    ----------
    model : Transformer
        Steered while the context is open (a hook at ``spec.hook``).
    spec : FlagSpec
    concept : int or LongTensor ``(batch,)``
        One concept for the whole batch or one per sample.
    positions : None, int or bool Tensor ``(pos,)`` / ``(batch, pos)``
        None: every position; an int ``p``: positions ``>= p``; a mask: where True (it may be longer than the
        sequence, e.g. for generation; it is cut to the sequence length). Positions are absolute: the column
        indices of the batch as a forward over the whole sequence sees it (of a left-padded batch too, padding
        columns counted). Under a key-value cache, where a forward sees only the new tokens, its first token is
        at the cache's length: a model wrapped by :func:`~pypattern.models.hooked_hf` is steered at the same
        positions whether it runs with a cache or not (its forward with ``past_key_values``/``cache``, the Hugging
        Face model's own ``generate(use_cache=True)``), as in :func:`generate`, which uses none. A mask must then
        cover every position generated.

    Raises
    ------
    ValueError
        On entry, when ``spec.hook`` is not a hook point of the model (a misspelled name, a layer beyond the
        model's), or its ``dims`` exceed the hook's width where the model's config gives it. From a forward, when
        a mask ``positions`` is shorter than the positions it covers.
    RuntimeError
        From a forward of ``model`` within the block that ends without reaching ``spec.hook`` (e.g.
        ``stop_at_layer`` at or before its block, or a hook point the forward does not run), naming the hook point:
        its output is the unsteered model's. A forward that starts after the hook point (``start_at_layer``)
        warns instead (``RuntimeWarning``): the residual stream it is given carries its own flags. With
        ``positions`` other than None, from a forward whose absolute start cannot be read: one given a key-value
        cache of an unknown kind, or, for a model other than pypattern's ``Transformer`` and ``hooked_hf``'s
        wrapper, one that reaches the hook point without going through the model's forward (e.g. the wrapped
        model's ``generate``). A TransformerLens ``HookedTransformer`` is steered at the same positions under its
        ``generate`` with or without ``use_past_kv_cache`` (its ``forward``, which ``generate`` calls directly,
        is watched while the context is open); a ``TransformerBridge``'s ``generate`` runs the bridge's forward.

    Examples
    --------
    >>> with steer(model, spec, concept=1):  # doctest: +SKIP
    ...     logits = model(tokens)
    """
    _check_spec(spec)
    _concept_tensor(concept, spec)
    with _flag_hook(model, spec, lambda b: _concept_values(concept, spec, b), positions, "steer"):
        yield


@contextlib.contextmanager
def ablate_flags(model, spec: FlagSpec, value: float | torch.Tensor = 0.0, positions=None) -> Iterator[None]:
    """Within the block, the flag dimensions are set to ``value`` (a float, or ``(num_flags,)``, e.g. their
    mean over data for a mean ablation). ``positions`` and the errors for a hook point a forward does not reach are
    :func:`steer`'s."""
    _check_spec(spec)
    if isinstance(value, bool) or not isinstance(
        value, numbers.Real | torch.Tensor | np.ndarray | list | tuple
    ):
        raise TypeError(f"value={value!r} is not valid; give a float or ({spec.num_flags},) values")
    try:
        v = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"value={value!r} is not valid; give a float or ({spec.num_flags},) values") from None
    if v.is_complex() or v.dtype == torch.bool:
        raise TypeError(
            f"value has dtype {v.dtype}; give real numbers (a float or ({spec.num_flags},) values)"
            + (": the imaginary part would be dropped" if v.is_complex() else "")
        )
    # float64 until written (cast to the activations' dtype there): a float64 model gets the value exactly
    v = as_float64(v)
    v = v.expand(spec.num_flags) if v.dim() == 0 else v
    if v.shape != (spec.num_flags,):
        raise ValueError(f"value has shape {tuple(v.shape)}; give a float or ({spec.num_flags},)")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"value must be finite, got {v.tolist()}")
    with _flag_hook(model, spec, lambda b: v, positions, "ablate_flags"):
        yield


def _position_limit(model) -> int | None:
    """The longest sequence ``model`` reads: its learned positions (pypattern's ``cfg.max_positions``, a Hugging Face
    model's, wrapped or not, of a family with learned absolute positions such as GPT-2's ``n_positions``), or the
    ``n_ctx`` of a config without ``max_positions`` (TransformerLens'); None when positions do not bound it."""
    limit = position_limit(model)
    cfg = getattr(model, "cfg", None)
    if limit is None and cfg is not None and not hasattr(cfg, "max_positions"):
        n_ctx = getattr(cfg, "n_ctx", None)
        limit = n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) else None
    return limit


def _generation_mask(attention_mask, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`generate`'s ``attention_mask`` as a bool tensor ``(batch, prompt_len)`` on the prompt's device (True: a
    real token), refused by name unless it holds 0 and 1 only, matches the prompt's shape (as the forward's
    ``attention_mask`` is checked), gives every row a real token and pads on the left only (no padding after a real
    token)."""
    from .models.transformer import _checked_attention_mask

    m = _tensor_arg(
        attention_mask,
        "attention_mask",
        "a (batch, prompt_len) tensor of 0 and 1 (1: a real token, 0: padding)",
    )
    # on the CPU, where the forward's check reads the values (on another device it leaves them unread)
    m = _checked_attention_mask(m.cpu(), *tokens.shape)
    empty = ~m.any(-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {row} is all padding (no real token): there is no prompt to continue; give "
            "every prompt at least one real token"
        )
    after = m[:, :-1] & ~m[:, 1:]  # a real token followed by padding
    if bool(after.any()):
        row, col = (int(i) for i in after.nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} has padding after a real token (column {col + 1}): right padding (or "
            "padding between tokens) cannot be continued in a batch, whose new tokens are appended to the last "
            "column of every row; pad on the left (a Hugging Face tokenizer's padding_side='left')"
        )
    return m.to(tokens.device)


def _takes_padding(model) -> None:
    """Refuse, by name, a model whose forward takes no ``attention_mask`` or no ``position_ids``: a left-padded
    batch's real tokens would attend to the padding, or be read at the positions of their columns."""
    for key in ("attention_mask", "position_ids"):
        if _takes(model, key):  # as the losses pass a batch's key on
            continue
        what = (
            "its real tokens would attend to the padding"
            if key == "attention_mask"
            else "its real tokens would be read at the positions of their columns, shifted by the padding"
        )
        raise ValueError(
            f"attention_mask has padding (0s), but {type(model).__name__}.forward takes no {key}, so {what} and "
            "each continuation would differ from that of its prompt alone; generate each prompt alone (or in "
            "batches of prompts of one length), or give a model whose forward takes attention_mask and "
            "position_ids (pypattern's Transformer, pypattern.hooked_hf(model), a Hugging Face causal LM)"
        )


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    steps: int,
    spec: FlagSpec | None = None,
    concept: int | torch.Tensor | None = None,
    positions=None,
    greedy: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` by ``steps`` tokens, optionally with the flags steered to ``concept``.

    Every step runs the model on the whole sequence so far (no key-value cache) and appends one token to every
    row.

    Parameters
    ----------
    model : Transformer (or any causal LM returning logits ``(batch, pos, vocab)``, a Hugging Face model's too)
    prompt : LongTensor ``(batch, prompt_len)`` or ``(prompt_len,)``
        Prompts of different lengths are batched left-padded, with ``attention_mask``.
    steps : int
        Each prompt's length (its real tokens) ``+ steps`` must not exceed the model's ``n_ctx`` when it has
        learned positions (a Hugging Face model's too, e.g. GPT-2's ``n_positions``); a left-padded batch may be
        longer than that.
    spec, concept : optional
        Both or neither; with them every forward runs under :func:`steer`.
    positions : see :func:`steer`
        Column indices of the whole sequence, padding columns included (:func:`steer`'s rule, which Hugging Face's
        ``generate`` under :func:`steer` of a :func:`~pypattern.models.hooked_hf` wrapper follows too): in a
        left-padded batch an int ``p`` selects columns ``>= p`` of every row, whatever its padding. To select
        positions of each prompt's own tokens (``k`` and after, counted from its first real token), give the mask
        ``torch.arange(prompt_len + steps) >= (num_padding[:, None] + k)`` with
        ``num_padding = (attention_mask == 0).sum(-1)``: each row is then steered as its prompt alone with
        ``positions=k``.
    greedy : bool
        Argmax decoding; otherwise sampling at ``temperature`` with a ``torch.Generator`` seeded by ``seed``.
    temperature : float
        Finite and > 0; unused with ``greedy``.
    seed : int
        Seeds the sampling.
    attention_mask : Tensor ``(batch, prompt_len)``, optional
        1 at real tokens, 0 at padding (bool, integer or float 0 and 1; ``(prompt_len,)`` with one prompt), as a
        Hugging Face tokenizer with ``padding_side="left"`` returns it. Each step extends it with a 1 for the new
        token; the model is given it and Hugging Face ``generate``'s positions,
        ``position_ids = attention_mask.cumsum(-1) - 1`` (0 at padding), so each row's greedy continuation is that
        of its prompt generated alone, unpadded (as Hugging Face's ``generate`` batches prompts; a float64 Hugging
        Face model's padding rows are kept finite, :func:`~pypattern.models.hf.finite_padding`). Padding after a
        real token (right padding), a row without a real token or other values are refused (``ValueError``), as is
        a mask with padding for a model whose forward takes no ``attention_mask`` or no ``position_ids``. A mask
        without padding changes nothing.

    Returns
    -------
    LongTensor ``(batch, prompt_len + steps)``
        The prompts (padding included) followed by the generated tokens.
    """
    _check_flag(greedy, "greedy")
    check_token_tensor(prompt, "prompt", "(batch, prompt_len) or (prompt_len,) of token ids")
    tokens = prompt[None] if prompt.dim() == 1 else prompt
    if tokens.dim() != 2:
        raise ValueError(f"prompt has shape {tuple(prompt.shape)}; give (batch, prompt_len) or (prompt_len,)")
    if tokens.shape[1] == 0:
        raise ValueError("prompt is empty (0 tokens): give at least one token to continue from")
    check_token_ids(tokens, "prompt", _vocab(model))
    if (spec is None) != (concept is None):
        raise ValueError("give both spec and concept to steer, or neither")
    if spec is None and positions is not None:
        raise ValueError("positions applies to steering: give it with spec and concept (or leave it out)")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps={steps!r} is not valid; give an int >= 0")
    steps = int(steps)
    keep = None
    if attention_mask is not None:
        keep = _generation_mask(attention_mask, tokens)
        if bool(keep.all()):
            keep = None  # no padding: the prompts' positions are their columns
        else:
            _takes_padding(model)
    n_ctx = _position_limit(model)
    if n_ctx is not None and keep is None and tokens.shape[1] + steps > n_ctx:
        raise ValueError(f"prompt length {tokens.shape[1]} + steps={steps} exceeds the model's n_ctx={n_ctx}")
    if n_ctx is not None and keep is not None:
        lengths = keep.sum(-1)
        row = int(lengths.argmax())
        if int(lengths[row]) + steps > n_ctx:
            raise ValueError(
                f"prompt row {row} has {int(lengths[row])} real tokens (attention_mask) + steps={steps}, which exceeds "
                f"the model's n_ctx={n_ctx} (learned positions 0 .. {n_ctx - 1})"
            )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or (not greedy and temperature <= 0)
    ):
        raise ValueError(
            f"temperature={temperature!r} is not valid; give a finite number > 0 (or greedy=True)"
        )
    g = torch.Generator().manual_seed(_generator_seed(seed))
    # continued where the model is (a CPU prompt, a model on a GPU)
    tokens = tokens.to(model_device(model, tokens.device))
    if keep is not None:
        from .models.hf import finite_padding
        from .models.transformer import real_token_positions

        keep = keep.to(tokens.device)
    ctx = steer(model, spec, concept, positions) if spec is not None else contextlib.nullcontext()
    modes = [(m, m.training) for m in model.modules()]  # each module's mode, restored afterwards
    model.eval()
    try:
        with ctx:
            for _ in range(steps):
                if keep is None:
                    out = model(tokens)
                else:
                    am = keep.long()
                    # a float64 Hugging Face model's padding queries attend to no key: kept finite (hooked_hf's
                    # wrapper keeps them so itself)
                    with finite_padding(model, am):
                        out = model(tokens, attention_mask=am, position_ids=real_token_positions(keep))
                logits = read_logits(out)[:, -1]  # a Hugging Face output's .logits too
                # 16-bit logits widened to float32; a float64 model's kept in float64, whose argmax and softmax a
                # cast to float32 would round (two logits within float32's spacing would tie)
                if logits.dtype != torch.float64:
                    logits = logits.float()
                if greedy:
                    nxt = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / temperature, -1)
                    nxt = torch.multinomial(probs.cpu(), 1, generator=g).squeeze(-1).to(tokens.device)
                tokens = torch.cat([tokens, nxt[:, None]], 1)
                if keep is not None:
                    keep = torch.cat([keep, keep.new_ones(keep.shape[0], 1)], 1)
    finally:
        for m, was_training in modes:
            m.training = was_training
    return tokens


# ----- training ---------------------------------------------------------------------------------------------
@register
@dataclass
class FlagTrainResult(Saveable):
    """Losses logged by :func:`train_flags`: per logged step its ``stage`` (1 or 2), LM loss, flag loss."""

    steps: list = field(default_factory=list)
    stages: list = field(default_factory=list)
    lm_losses: list = field(default_factory=list)
    flag_losses: list = field(default_factory=list)
    seconds: float = 0.0

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): one entry per logged step in each list, the steps and
        stages (1 or 2) whole numbers, the losses numbers."""
        from .sampling.results import check_lists

        whole, real = ((int,), "whole numbers"), ((int, float), "numbers")
        kinds = {"steps": whole, "stages": whole, "lm_losses": real, "flag_losses": real}
        check_lists(vars(self), kinds, "logged step")
        bad = [s for s in self.stages if s not in (1, 2)]
        if bad:
            raise ValueError(f"stages must hold 1 or 2, got {bad[0]!r}")


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the targets other than ``IGNORE``; a 16-bit model's logits are widened to float32
    first (a loss and its sums rounded to 16 bits are resolved to about 1e-2 only)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    mask = targets != IGNORE
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (ce * mask).sum() / mask.sum().clamp_min(1)


def train_flags(
    model,
    task: Task,
    spec: FlagSpec,
    stage1_steps: int = 300,
    stage2_steps: int = 300,
    aux_weight: float = 1.0,
    switch_prob: float = 0.5,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    log_every: int = 10,
    checkpoint: str | os.PathLike | None = None,
    quiet: bool = False,
) -> FlagTrainResult:
    """Fine-tune ``model`` so that ``spec``'s dimensions become concept flags the model relies on.

    Stage 1 (``stage1_steps``): LM loss + ``aux_weight * flag_loss`` on clean data (no switches). Stage 2
    (``stage2_steps``): the same losses on data where a fraction ``switch_prob`` of the sequences switch
    concept at ``switch_pos``; at positions ``>= switch_pos - 1`` the flags are overwritten with the code of
    ``target_concept`` (the new concept), so the first token after the switch is predictable only from them.
    The flag loss always scores what the model writes before the overwrite, against ``concept_pos``. AdamW,
    online batches (a fresh batch every step, keyed by ``seed``).

    Parameters
    ----------
    model : Transformer
    task : Task
        Must provide the ``extra`` entries listed in the module docstring.
    spec : FlagSpec
    stage1_steps, stage2_steps : int
        Steps of stage 1 (producing the flags) and stage 2 (relying on them).
    aux_weight : float
        Weight of the flag loss (0 gives plain LM training in stage 1: the control).
    switch_prob : float
        Fraction of stage 2's sequences that switch concept.
    batch_size, lr, weight_decay
        AdamW's batch size, learning rate and decoupled weight decay.
    seed : int
        Keys the batches (a fresh batch every step).
    log_every : int
        Steps between recorded losses (0: none).
    checkpoint : path, optional
        A file (``.npz``, :mod:`pypattern.io`: written atomically, read without pickle) the run's state is written
        to after a step: the model's parameters and buffers, AdamW's state, the step, the logged losses, the
        training time and the batch generator's state (with torch's global generator's, for a model whose
        ``train()`` forward is random, such as dropout). It is written every 30 seconds, at the end, and when the
        run is stopped by Ctrl-C or SIGTERM, which let the step under way finish and are raised after the write
        (a second one during that step stops at once, writing nothing); an error inside a step (a loss that is not
        finite) leaves it as last written. If the file exists, the run resumes from it and ends with the same
        weights and losses, bit for bit, as an uninterrupted run; a finished run's file returns its result without
        training (the model gets its final weights). Only the same run resumes: the file holds a fingerprint of
        the model's architecture and its weights and buffers at the call's start, the task (its class and
        attributes), ``spec`` and every other argument but ``quiet``; a file of another run is refused with
        :class:`pypattern.io.FingerprintMismatch` naming the first item that differs, a damaged file with
        :class:`pypattern.io.FormatError`.
    quiet : bool
        No progress bar (by default one counts the steps, shown once a run has taken two seconds).

    Integer and real arguments may be Python or numpy scalars (not bools).

    Returns
    -------
    FlagTrainResult
        The model is trained in place and left in eval mode, as :func:`pypattern.tasks.train` leaves it.
        ``seconds`` counts the training time of every call of a resumed run.

    Raises
    ------
    TypeError
        For a model with 16-bit floating parameters (float16, bfloat16): AdamW's updates in 16 bits overflow or
        round away; train a float32 copy (``model.float()``) and cast it back.
    FloatingPointError
        When a loss is not finite. On this and on any other exception raised during training, the model's
        parameters and buffers are restored to their values before the call and every module to its train/eval
        mode before the call (this keeps a copy of them while training).
    """
    _check_spec(spec)
    spec.check(model)
    seed = _generator_seed(seed, allow_none=True)
    counts = {}
    for name, v, least in (
        ("stage1_steps", stage1_steps, 0),
        ("stage2_steps", stage2_steps, 0),
        ("batch_size", batch_size, 1),
        ("log_every", log_every, 0),
    ):
        if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral) or v < least:
            what = "an int >= 1 (or 0: record no losses)" if name == "log_every" else f"an int >= {least}"
            raise ValueError(f"{name}={v!r} is not valid; give {what}")
        counts[name] = int(v)  # a numpy integer too
    reals = {}
    for name, v, what in (
        ("aux_weight", aux_weight, "a finite number >= 0"),
        ("switch_prob", switch_prob, "a value in [0, 1]"),
        ("lr", lr, "a finite number >= 0 (AdamW's lr)"),
        ("weight_decay", weight_decay, "a finite number >= 0 (AdamW's weight_decay)"),
    ):
        if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real):
            raise ValueError(f"{name}={v!r} is not valid; give {what}")
        f = float(v)  # a numpy scalar too
        if not (math.isfinite(f) and f >= 0 and (name != "switch_prob" or f <= 1.0)):
            raise ValueError(f"{name}={v!r} is not valid; give {what}")
        reals[name] = f
    aux_weight, switch_prob, lr, weight_decay = (
        reals[k] for k in ("aux_weight", "switch_prob", "lr", "weight_decay")
    )
    stage1_steps, stage2_steps, batch_size, log_every = (
        counts[k] for k in ("stage1_steps", "stage2_steps", "batch_size", "log_every")
    )
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if half:
        raise TypeError(
            f"model has parameters of dtype {', '.join(half)}: train_flags trains them in their own dtype with "
            "AdamW, whose updates overflow or round away in 16 bits; train a float32 copy (model.float()) and cast "
            "it back after training"
        )
    _check_concept_task(task, spec)
    _check_vocab(model, task)
    _check_positions(model, task)
    from ._train_checkpoint import TrainingSteps, check_checkpoint_arg, model_items, task_items

    check_checkpoint_arg(checkpoint, quiet)
    fp = None
    if checkpoint is not None:  # the run as it starts: the model's weights before any step
        from .io import fingerprint

        fp = fingerprint(
            kind="train_flags",
            task=task_items(task),
            spec=dataclasses.asdict(spec),
            stage1_steps=stage1_steps,
            stage2_steps=stage2_steps,
            aux_weight=aux_weight,
            switch_prob=switch_prob,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            log_every=log_every,
            **model_items(model),
        )
    g = generator(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # the task samples on the CPU: batches and codes go to the model's device
    device = model_device(model, torch.device("cpu"))
    code = spec.code(_wide(device), device=device)  # cast to the activations' dtype where it is written
    res = FlagTrainResult()
    total = stage1_steps + stage2_steps
    # an abort restores the parameters' and buffers' values, and every module's mode
    with values_kept_on_error(model), modes_kept(model):
        model.train()
        run = TrainingSteps(
            checkpoint,
            fp,
            model,
            opt,
            g,
            logs={
                "steps": (res.steps, np.int64),
                "stages": (res.stages, np.int64),
                "lm_losses": (res.lm_losses, np.float64),
                "flag_losses": (res.flag_losses, np.float64),
            },
            logged=lambda step: bool(log_every) and (step % log_every == 0 or step == total - 1),
            total=total,
            device=device,
            random_forward=checkpoint is not None and bool(random_in_training(model)),
        )
        start = run.resume()
        if res.stages != [1 if s < stage1_steps else 2 for s in res.steps]:
            raise FormatError(
                f"checkpoint {os.fspath(checkpoint)!r} is damaged: its logged stages are not those of its steps; "
                "delete it to start afresh"
            )
        with run.running(quiet, "train_flags"):
            for step in range(start, total):
                run.begin()
                stage = 1 if step < stage1_steps else 2
                bseed = int(torch.randint(0, 2**62, (), generator=g, device="cpu"))
                batch = task.sample(batch_size, seed=bseed, switch_prob=0.0 if stage == 1 else switch_prob)
                if "concept_pos" not in batch.extra:
                    raise ValueError(
                        f"task {type(task).__name__} gives no extra['concept_pos']; see pypattern.flags"
                    )
                batch = batch.to(device)
                written: list[torch.Tensor] = []
                mask = values = None
                if stage == 2:
                    mask, values = _stage_two_overwrite(task, batch, spec, code)

                def hook_fn(x, hook, written=written, mask=mask, values=values):
                    written.append(x)
                    return None if mask is None else overwrite_flags(x, spec, values.to(x.dtype), mask)

                with model.hooks([(spec.hook, hook_fn)]):
                    logits = model(batch.tokens)
                if not written:
                    raise _not_called(spec, "train_flags")
                lm = _lm_loss(logits, batch.targets)
                fl = flag_loss(written[0], batch.extra["concept_pos"], spec)
                loss = lm + aux_weight * fl if aux_weight > 0 else lm
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"train_flags: the loss is {float(loss.detach())} at step {step} (stage {stage}; LM "
                        f"{float(lm.detach())}, flag {float(fl.detach())}); lower lr={lr} or aux_weight={aux_weight} "
                        "(the model is restored to its state before the call)"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                logged = None
                if log_every and (step % log_every == 0 or step == total - 1):
                    res.steps.append(step)
                    res.stages.append(stage)
                    res.lm_losses.append(float(lm.detach()))
                    res.flag_losses.append(float(fl.detach()))
                    logged = res.lm_losses[-1]
                run.end(step, logged)
        res.seconds = run.elapsed()
    model.eval()
    return res


def _stage_two_overwrite(
    task, batch, spec: FlagSpec, code: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's overwrite of a batch: where (positions ``>= switch_pos - 1``, ``(batch, pos)``) and with what (the
    code of ``target_concept``, ``(batch, pos, num_flags)``), the task's ``extra`` entries checked by name (a
    concept of -1 would index the last concept's code)."""
    name = type(task).__name__
    for key in ("switch_pos", "target_concept"):
        if key not in batch.extra:
            raise ValueError(
                f"task {name}: extra[{key!r}] is missing from its stage-2 batches; give 'switch_pos' (batch,) and "
                "'target_concept' (batch, pos) (see pypattern.flags)"
            )
    b, t = batch.tokens.shape
    sp = torch.as_tensor(batch.extra["switch_pos"], device=code.device)
    tc = torch.as_tensor(batch.extra["target_concept"], device=code.device)
    for key, v, shape in (("switch_pos", sp, (b,)), ("target_concept", tc, (b, t))):
        if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool or tuple(v.shape) != shape:
            raise ValueError(
                f"task {name}: extra[{key!r}] has shape {tuple(v.shape)} and dtype {v.dtype}; give integers of "
                f"shape {shape}"
            )
    tc = tc.long()
    mask = torch.arange(t, device=code.device)[None] >= (sp.long()[:, None] - 1)
    used = tc[mask]
    if used.numel() and (bool((used < 0).any()) or bool((used >= spec.num_concepts).any())):
        raise ValueError(
            f"task {name}: extra['target_concept'] has values in [{int(used.min())}, {int(used.max())}] at the "
            f"positions stage 2 overwrites (>= switch_pos - 1); give concepts 0..{spec.num_concepts - 1} there"
        )
    return mask, code[tc.clamp(0, spec.num_concepts - 1)]


# ----- measurements -----------------------------------------------------------------------------------------
@torch.no_grad()
def _hook_acts(model, tokens: torch.Tensor, spec: FlagSpec) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=spec.hook)
    if spec.hook not in cache:
        raise _not_called(spec, "flag_report")
    return cache[spec.hook]


def _not_called(spec: FlagSpec, who: str) -> RuntimeError:
    """The error for a model whose forward never reached the hook point ``spec.hook`` (the flags would be neither
    trained nor read)."""
    return RuntimeError(
        f"{who}: the model's forward did not reach hook={spec.hook!r}, although the model lists it: its hook points "
        "are not wired to the modules it runs (e.g. a wrapper whose hooks were removed, or whose forward calls "
        "modules other than the ones it hooks: wrap the model that runs with pypattern.hooked_hf)"
    )


def _ridge_probe(x_fit, y_fit, x_eval, y_eval, num_classes: int, ridge: float) -> tuple[float, float]:
    """One-vs-rest least-squares probe (float64, with bias): (held-out accuracy, held-out R^2 of the
    one-hot)."""
    # the features' device (the model's; the CPU for one without float64): labels, bias column and penalty are
    # made there
    dev = float64_device(x_fit.device)
    x_fit, x_eval = x_fit.to(dev).double(), x_eval.to(dev).double()
    y_fit, y_eval = y_fit.to(dev), y_eval.to(dev)
    mu, sd = x_fit.mean(0), x_fit.std(0).clamp_min(1e-8)
    # a feature constant over the fit sample is centred on its value, to exactly 0 (a float64 mean of equal values
    # may differ from them by a rounding, which the clamped scale would blow up into a feature the probe could fit)
    mu = torch.where((x_fit == x_fit[:1]).all(0), x_fit[0], mu)
    xf = torch.cat([(x_fit - mu) / sd, torch.ones(len(x_fit), 1, dtype=torch.float64, device=dev)], 1)
    xe = torch.cat([(x_eval - mu) / sd, torch.ones(len(x_eval), 1, dtype=torch.float64, device=dev)], 1)
    yf = torch.nn.functional.one_hot(y_fit, num_classes).double()
    ye = torch.nn.functional.one_hot(y_eval, num_classes).double()
    if ridge > 0:
        reg = ridge * torch.eye(xf.shape[1], dtype=torch.float64, device=dev)
        reg[-1, -1] = 0.0  # the bias is not penalised; the system is positive definite all the same
        w = torch.linalg.solve(xf.T @ xf + reg, xf.T @ yf)
    else:
        # ridge=0: the minimum-norm least-squares solution (the pseudo-inverse), the limit of the ridge solution as
        # the penalty goes to 0; the normal equations are singular with fewer fit positions than features, or
        # with collinear or constant features, and solving them would give arbitrary weights
        w = torch.linalg.pinv(xf) @ yf
    pred = xe @ w
    acc = float((pred.argmax(1) == y_eval).double().mean())
    sst = float((ye - ye.mean(0)).pow(2).sum())
    if not sst > 0:  # every held-out position has the same concept: no variance for R^2 to explain
        return acc, float("nan")
    r2 = 1.0 - float((pred - ye).pow(2).sum()) / sst
    return acc, r2


@torch.no_grad()
def probe_accuracy(
    model,
    task: Task,
    spec: FlagSpec,
    which: str = "non_flag",
    num_samples: int = 512,
    seed: int = 0,
    ridge: float = 1e-2,
    only_shared_tokens: bool = False,
) -> tuple[float, float]:
    """Linear probe for the readable concept at ``spec.hook``, fit on one sample and scored on another.

    A ridge least-squares one-vs-rest probe on standardised features (with a bias), fit on
    ``task.sample(num_samples, seed)`` and scored on ``task.sample(num_samples, seed + 1)``, at every position
    whose ``concept_pos`` is known.

    Parameters
    ----------
    model : Transformer
    task : Task
        A concept task (see the module docstring).
    spec : FlagSpec
    which : {"non_flag", "flag", "all"}
        Residual dimensions the probe sees.
    num_samples : int
        Sequences per split (>= 1).
    seed : int
        The probe is fitted on ``task.sample(num_samples, seed)`` and scored on ``task.sample(num_samples,
        seed + 1)``.
    ridge : float
        The probe's L2 penalty on the standardised features' weights (finite, >= 0; the bias is not penalised).
        ``0``: plain least squares, as the minimum-norm solution (the pseudo-inverse, the limit of the ridge
        probe as the penalty goes to 0), which is defined also when there are fewer fit positions than features
        or when features are collinear or constant (with fewer fit positions than features it interpolates the
        fit sample). A feature constant over the fit sample gets weight 0.
    only_shared_tokens : bool
        Score (and fit) only positions whose current token carries no concept (``token_concepts == -1``),
        where the concept must have been moved there from earlier positions.

    Returns
    -------
    (accuracy, r2) : held-out accuracy and held-out R^2 of the one-hot concept.
        Both are NaN when there is nothing to fit or to score (fewer than two fit positions or no held-out one,
        e.g. ``only_shared_tokens`` on a task without shared tokens). R^2 is NaN, with a warning, when every
        held-out position has the same concept (e.g. ``num_samples=1``: one sequence carries one concept): the
        one-hot has no variance to explain; the accuracy is still returned.

    Raises
    ------
    ValueError
        When ``which`` selects no residual dimension (``"non_flag"`` with ``spec.dims`` covering all of
        ``d_model``): a probe on no features measures nothing but the base rate.
    """
    _check_spec(spec)
    spec.check(model)
    _check_flag(only_shared_tokens, "only_shared_tokens")
    if which not in ("non_flag", "flag", "all"):
        raise ValueError(f"which={which!r} is not valid; choose 'non_flag', 'flag' or 'all'")
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is not valid; give an int >= 1 (sequences per split)")
    seed = _generator_seed(seed)
    if (
        isinstance(ridge, bool)
        or not isinstance(ridge, numbers.Real)
        or not (math.isfinite(ridge) and ridge >= 0)
    ):
        raise ValueError(f"ridge={ridge!r} is not valid; give a finite number >= 0 (the probe's L2 penalty)")
    _check_probe_width(model, spec, which)
    _check_positions(model, task)
    return _probe(_probe_data(model, task, spec, num_samples, seed), spec, which, ridge, only_shared_tokens)


def _probe_data(model, task: Task, spec: FlagSpec, num_samples: int, seed: int) -> list:
    """For the fit (``seed``) and the scoring (``seed + 1``) sample: the activations at ``spec.hook`` of the
    positions with a readable concept, their concept, and whether their token is shared."""
    out = []
    device = model_device(model, torch.device("cpu"))
    for s in (seed, seed + 1):
        b = task.sample(num_samples, seed=s, switch_prob=0.0).to(device)
        lab = b.extra["concept_pos"]
        m = lab >= 0
        tc = torch.as_tensor(task.token_concepts, device=b.tokens.device)
        out.append((_hook_acts(model, b.tokens, spec)[m], lab[m], tc[b.tokens][m] < 0))
    return out


def _probe(
    data: list,
    spec: FlagSpec,
    which: str,
    ridge: float,
    only_shared_tokens: bool,
    warn_r2: bool = True,
    caller: str = "probe_accuracy",
) -> tuple[float, float]:
    """Held-out (accuracy, R^2) of the probe on the columns ``which`` selects (see :func:`probe_accuracy`);
    ``warn_r2``: warn when R^2 is undefined (a caller that does not report it passes False)."""
    d = data[0][0].shape[-1]
    if (
        max(spec.dims) >= d
    ):  # a model whose config does not give the hook's width (a wrapped Hugging Face model)
        raise ValueError(
            f"{caller}: spec.dims={spec.dims} has entries >= {d}, the width of the activation at hook={spec.hook!r}; "
            f"give dimensions in 0..{d - 1}"
        )
    if which == "flag":
        cols = list(spec.dims)
    elif which == "all":
        cols = list(range(d))
    else:
        cols = [i for i in range(d) if i not in set(spec.dims)]
    _check_probe_columns(cols, which, spec, d, caller)
    (xf, yf, sf), (xe, ye, se) = data
    if only_shared_tokens:
        xf, yf, xe, ye = xf[sf], yf[sf], xe[se], ye[se]
    if len(xf) < 2 or len(xe) == 0:  # nothing to fit or to score (a task without shared tokens): undefined
        return float("nan"), float("nan")
    acc, r2 = _ridge_probe(xf[:, cols], yf, xe[:, cols], ye, spec.num_concepts, ridge)
    if warn_r2 and math.isnan(r2):
        warnings.warn(
            f"probe (which={which!r}{', only_shared_tokens=True' if only_shared_tokens else ''}): every one of the "
            f"{len(ye)} held-out positions has concept {int(ye[0])}, so the one-hot concept has no variance and its "
            "R^2 is undefined (NaN); the accuracy is returned. Give more sequences (num_samples) so that the "
            "held-out sample holds several concepts",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return acc, r2


def _hook_width(model, spec: FlagSpec) -> int | None:
    """The width of the activation at ``spec.hook`` as the model's config gives it (``d_mlp`` for an MLP hook
    point, else ``d_model``), or None when the config does not say."""
    cfg = getattr(model, "cfg", None)
    last = spec.hook.rsplit(".", 1)[-1]
    if ".mlp." in spec.hook and last in _MLP_HOOKS and getattr(cfg, "d_mlp", None) is not None:
        return cfg.d_mlp
    width = getattr(cfg, "d_model", None)
    return width if isinstance(width, int) else None


def _check_probe_width(model, spec: FlagSpec, which: str, caller: str = "probe_accuracy") -> None:
    """:func:`_check_probe_columns` before any forward, where the model's config gives the hook's width."""
    width = _hook_width(model, spec)
    if width is not None and which == "non_flag":
        _check_probe_columns([i for i in range(width) if i not in set(spec.dims)], which, spec, width, caller)


def _check_probe_columns(
    cols: list, which: str, spec: FlagSpec, d_model: int, caller: str = "probe_accuracy"
) -> None:
    """Refuse a probe on no residual dimension (``which="non_flag"`` when ``spec.dims`` covers all of
    ``d_model``): it would measure only the base rate of the concepts."""
    if cols:
        return
    if caller == "flag_report":
        raise ValueError(
            f"flag_report: spec.dims={spec.dims} covers all {d_model} dimensions of {spec.hook!r}, and the "
            "report's probes (which='non_flag') read the dimensions outside it: there are none; give a FlagSpec "
            "with fewer dims than the hook's width"
        )
    raise ValueError(
        f"which={which!r} selects no residual dimension: spec.dims={spec.dims} covers all {d_model} dimensions of "
        f"{spec.hook!r}, so there is no non-flag dimension to probe; give a FlagSpec with fewer dims than the "
        "hook's width, or which='flag' or 'all'"
    )


@register
@dataclass
class FlagReport(Saveable):
    """Measurements of :func:`flag_report` (fractions in [0, 1], losses in nats per token).

    Attributes
    ----------
    flag_accuracy : float
        Read-out (:func:`read_flags`) accuracy of the readable concept on clean data, at positions with a
        known one.
    steer_success : float
        Fraction of generated tokens in the steered concept's sub-vocabulary when the flags are set to a
        concept *other* than the prompt's.
    steer_baseline : float
        The same fraction (tokens of that other concept) when generating without steering.
    steer_prompt_concept : float
        Fraction of generated tokens in the prompt's own concept under steering.
    loss_clean, loss_ablated : float
        Mean next-token loss on clean data, and with the flags mean-ablated (set to their mean at the hook
        over the data, all positions) or zero-ablated.
    reliance : float
        ``loss_ablated - loss_clean``.
    probe_non_flag, probe_non_flag_r2 : float
        Held-out accuracy and R^2 of a linear probe for the concept on the non-flag dimensions (R^2 NaN, with a
        warning, when every held-out position carries the same concept: see :func:`probe_accuracy`).
    probe_non_flag_shared, probe_non_flag_shared_r2 : float
        The same at positions whose current token is shared (no concept of its own).
    probe_flag : float
        Linear probe accuracy on the flag dimensions only.
    reference : dict
        The probe numbers of ``reference_model`` (before flag training), if given.
    """

    flag_accuracy: float
    steer_success: float
    steer_baseline: float
    steer_prompt_concept: float
    loss_clean: float
    loss_ablated: float
    reliance: float
    probe_non_flag: float
    probe_non_flag_r2: float
    probe_non_flag_shared: float
    probe_non_flag_shared_r2: float
    probe_flag: float
    reference: dict = field(default_factory=dict)

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): the fractions in [0, 1] (or NaN), ``reliance`` the
        difference of the two losses, ``reference`` probe numbers by name."""
        fractions = ("flag_accuracy", "steer_success", "steer_baseline", "steer_prompt_concept")
        fractions += ("probe_non_flag", "probe_non_flag_shared", "probe_flag")
        for name in fractions:
            v = getattr(self, name)
            if not (math.isnan(v) or 0 <= v <= 1):
                raise ValueError(f"{name}={v!r} is not a fraction in [0, 1]")
        diff = self.loss_ablated - self.loss_clean
        if not (
            math.isclose(self.reliance, diff, rel_tol=1e-9, abs_tol=1e-12)
            or (math.isnan(self.reliance) and math.isnan(diff))
        ):
            raise ValueError(
                f"reliance={self.reliance!r} is not loss_ablated - loss_clean = {self.loss_ablated!r} - "
                f"{self.loss_clean!r}"
            )
        ref = self.reference
        if not isinstance(ref, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in ref.items()
        ):
            raise ValueError(f"reference must be a dict of probe name (str) to number, got {ref!r:.80}")


def _probe_numbers(model, task, spec, num_samples, seed, ridge: float = 1e-2) -> dict:
    data = _probe_data(model, task, spec, num_samples, seed + 10)  # one pair of forwards for the three probes
    acc, r2 = _probe(data, spec, "non_flag", ridge, False, caller="flag_report")
    acc_s, r2_s = _probe(data, spec, "non_flag", ridge, True, caller="flag_report")
    acc_f, _ = _probe(
        data, spec, "flag", ridge, False, warn_r2=False, caller="flag_report"
    )  # R^2 not reported
    return {
        "probe_non_flag": acc,
        "probe_non_flag_r2": r2,
        "probe_non_flag_shared": acc_s,
        "probe_non_flag_shared_r2": r2_s,
        "probe_flag": acc_f,
    }


@torch.no_grad()
def flag_report(
    model,
    task: Task,
    spec: FlagSpec,
    num_samples: int = 512,
    prompt_len: int = 4,
    gen_steps: int = 8,
    ablation: str = "mean",
    reference_model=None,
    seed: int = 0,
) -> FlagReport:
    """Measure the flags of ``model`` on ``task`` (see :class:`FlagReport`).

    Parameters
    ----------
    model : Transformer
        The flag-trained model.
    task : Task
        A concept task (see the module docstring), e.g. :class:`~pypattern.tasks.topics.TopicTask`.
    spec : FlagSpec
    num_samples : int
        Sequences per measurement (clean data, prompts, each probe split).
    prompt_len, gen_steps : int
        Prompts are the first ``prompt_len`` tokens of clean sequences; ``gen_steps`` tokens are sampled
        (temperature 1, seeded) with the flags steered, at every position, to a uniformly drawn concept other
        than the prompt's (its concept readable at the last prompt position; prompts with none are dropped).
    ablation : {"mean", "zero"}
    reference_model : optional
        The model before flag training; its probe numbers go to ``reference`` (erosion = before - after).
    seed : int
        Keys the data, the prompts, the steered concepts and the sampling (``seed`` .. ``seed + 3``, and
        ``seed + 10`` for the probes).

    Both models are measured in eval mode and left in the mode they were in. A ``spec`` whose ``dims`` cover all of
    the hook's width is refused (``ValueError``): the probes read the non-flag dimensions, and there are none.
    """
    _check_spec(spec)
    spec.check(model)
    seed = _generator_seed(seed)
    if ablation not in ("mean", "zero"):
        raise ValueError(f"ablation={ablation!r} is not valid; choose 'mean' or 'zero'")
    _check_concept_task(task, spec)
    _check_vocab(model, task)
    for m in (model, reference_model):  # the report's probes read the non-flag dimensions
        if m is not None:
            _check_probe_width(m, spec, "non_flag", "flag_report")
            _check_positions(m, task)
    seq_len = getattr(task, "n_ctx", None)
    if not is_count(prompt_len) or prompt_len < 2:
        raise ValueError(
            f"prompt_len={prompt_len!r} is not valid; give an int >= 2 (a prompt whose last position has a concept)"
        )
    prompt_len = int(prompt_len)
    if seq_len is not None and prompt_len > seq_len:
        raise ValueError(f"prompt_len={prompt_len} is longer than the task's sequences ({seq_len} tokens)")
    for name, v, least in (("num_samples", num_samples, 2), ("gen_steps", gen_steps, 1)):
        if not is_count(v) or v < least:
            raise ValueError(f"{name}={v!r} is not valid; give an int >= {least}")
    num_samples, gen_steps = int(num_samples), int(gen_steps)
    n_ctx = _position_limit(model)
    if isinstance(n_ctx, int) and prompt_len + gen_steps > n_ctx:
        raise ValueError(
            f"prompt_len={prompt_len} + gen_steps={gen_steps} exceeds the model's n_ctx={n_ctx}: the generated "
            "tokens would not fit its positions"
        )
    # measured in eval mode; every module's mode is restored afterwards (submodules may be in mixed modes)
    modes = [(m, m.training) for top in (model, reference_model) if top is not None for m in top.modules()]
    try:
        for top in (model, reference_model):
            if top is not None:
                top.eval()
        return _flag_report(
            model, task, spec, num_samples, prompt_len, gen_steps, ablation, reference_model, seed
        )
    finally:
        for m, was_training in modes:
            m.training = was_training


def _flag_report(
    model, task, spec, num_samples, prompt_len, gen_steps, ablation, reference_model, seed
) -> FlagReport:
    """:func:`flag_report` on checked arguments, the models in eval mode."""
    # the task samples on the CPU; the measurements run on the model's device
    device = model_device(model, torch.device("cpu"))
    data = task.sample(num_samples, seed=seed, switch_prob=0.0).to(device)
    acts = _hook_acts(model, data.tokens, spec)
    lab = data.extra["concept_pos"]
    known = lab >= 0
    flag_acc = float((read_flags(acts, spec)[known] == lab[known]).double().mean())

    loss_clean = float(_lm_loss(model(data.tokens), data.targets))
    value = acts[..., list(spec.dims)].mean((0, 1)) if ablation == "mean" else 0.0
    with ablate_flags(model, spec, value):
        loss_abl = float(_lm_loss(model(data.tokens), data.targets))

    prompts = task.sample(num_samples, seed=seed + 1, switch_prob=0.0).to(device)
    pc = prompts.extra["concept_pos"][:, prompt_len - 1]
    keep = pc >= 0
    tok, pc = prompts.tokens[keep, :prompt_len], pc[keep]
    g = generator(seed + 2)
    shift = torch.randint(1, spec.num_concepts, pc.shape, generator=g, device="cpu")  # g is a CPU generator
    other = (pc + shift.to(pc.device)) % spec.num_concepts
    steered = generate(model, tok, gen_steps, spec, other, seed=seed + 3)[:, prompt_len:]
    free = generate(model, tok, gen_steps, seed=seed + 3)[:, prompt_len:]
    rep = FlagReport(
        flag_accuracy=flag_acc,
        steer_success=float((_concepts_of(task, steered) == other[:, None]).double().mean()),
        steer_baseline=float((_concepts_of(task, free) == other[:, None]).double().mean()),
        steer_prompt_concept=float((_concepts_of(task, steered) == pc[:, None]).double().mean()),
        loss_clean=loss_clean,
        loss_ablated=loss_abl,
        reliance=loss_abl - loss_clean,
        **_probe_numbers(model, task, spec, num_samples, seed),
    )
    if reference_model is not None:
        rep.reference = _probe_numbers(reference_model, task, spec, num_samples, seed)
    return rep
