"""Losses of a model on a batch as users hold it: one rule shared by every estimator's defaults.

Batches
-------
* a **token tensor** ``(batch, pos)`` of integer ids (a 1-D tensor is one sequence): a causal language model's
  next-token loss, every position counted;
* a **Hugging Face style mapping** (``dict`` or ``transformers.BatchEncoding``) with ``input_ids``, optionally
  ``attention_mask`` (0 = padding) and ``labels`` (-100 = ignore; as in Hugging Face, labels are *not* shifted
  by the user: the logits at position ``t`` are scored against ``labels[t + 1]``). Without ``labels`` the targets
  are the ``input_ids``. ``position_ids`` and ``token_type_ids`` (integers) are passed on to models whose
  ``forward`` takes them. Labels shifted by the user (``labels[:, t] == input_ids[:, t + 1]`` wherever a label is
  given, and differing from ``input_ids`` at two or more positions) are refused: read as unshifted they would score
  each position against the token after the next one;
* a **one-element** ``(tokens,)`` / ``[tokens]`` (what a ``DataLoader`` over ``TensorDataset(tokens)`` yields):
  the token tensor it holds;
* a **pair** ``(x, y)`` / ``[x, y]``: ``model(x)`` scored against ``y``; cross-entropy for integer ``y`` (class
  index per sample, or per position when the logits have a sequence axis; ``y == -100`` is ignored; any integer
  dtype, read as int64; a model with one output, or an output without a class axis, is refused, cross-entropy over
  one class being 0), mean squared error for floating ``y``; boolean or complex ``y`` is refused. A tuple or
  list of more elements (``(x, y, weights)``) is refused: the default loss would ignore the rest; a loss function
  of one's own reads them. Two pairs that a ``DataLoader`` over a ``TensorDataset`` of a language model's tensors
  yields are refused, since read as ``(x, y)`` they score something else than the next token:

  - ``(input_ids, labels)``: token ids ``x`` (batch, pos) and integer ``y`` of its shape equal to ``x`` at every
    position where ``y`` is not -100 (the ids themselves, or Hugging Face's unshifted labels) would score the
    logits at ``t`` against the input token at ``t``, copying the input (refused for a model with a vocabulary
    by :func:`check_batch`, and by the losses whenever the logits have a sequence axis). Give
    ``{"input_ids": x, "labels": y}``, or pairs shifted by the user, ``(x[:, :-1], y[:, 1:])``, which are read as
    they are;
  - ``(input_ids, attention_mask)``: integer ``y`` of ``x``'s shape holding only 0s and 1s in the pattern of a
    padding mask (every row ``1 .. 1 0 .. 0``, or every row ``0 .. 0 1 .. 1``) while the model scores more than two
    classes per position would be scored as classes 0 and 1 of the vocabulary (refused by the losses, which see
    the number of classes). Give ``{"input_ids": x, "attention_mask": y}``. Per-position binary targets of a
    model with two outputs per position are read as they are.

  A pair whose integer ``y`` is -100 throughout has no counted target and is refused (its loss is undefined).

A batch of no sample (batch size 0), or without any counted target (every label -100, all padding, or sequences
of one token), has no mean loss: :func:`batch_loss` and :func:`check_batch` refuse it (``ValueError``); per-sample
losses are NaN for a sample without counted targets (a pair's cross-entropy: 0 where ``y == -100``), and per-token
losses hold ``fill`` there.

A next-token target at position ``t + 1`` counts when ``labels[t + 1] != -100``, ``attention_mask[t + 1] == 1``
and ``attention_mask[t] == 1`` (the prediction is made from a real token). With right padding (or none) this
equals Hugging Face's own ``.loss`` when the labels hold -100 at the padding; with left padding it drops the one
term Hugging Face keeps in which a padding position predicts the first real token. Left-padded batches also need
``position_ids`` for models with absolute positions.

Models
------
Called as ``model(input_ids=..., attention_mask=..., use_cache=False)`` when ``forward`` takes ``input_ids``
(Hugging Face causal LMs and :func:`pypattern.models.hf.hooked_hf` adapters), otherwise ``model(tokens)`` with
``attention_mask=`` (and ``position_ids=``) only when ``forward`` takes it (pypattern's ``Transformer`` and
TransformerLens models take both; any module returning logits; a causal model without a mask is exact on
right-padded batches, and :func:`check_batch` refuses left-padded ones for it). A float64 Hugging Face model
given a padded batch runs with the adapter's guard against its eager attention's NaN at padding positions that
see no key (left padding; right padding under a
sliding window): :func:`pypattern.models.hf.finite_padding`, so the real tokens' losses are those of each prompt
alone, not NaN. Outputs are read as a tensor of logits, an object or mapping with ``.logits`` /
``["logits"]`` (a Hugging Face ``ModelOutput``), or a tuple whose first element is the logits (or whose second is,
after a 0-dim loss: ``(loss, logits, ...)``, Hugging Face's ``return_dict=False`` order; the logits are read, as
from a ``ModelOutput`` holding both); a 0-dim tensor (or an output with only ``.loss``, or a tuple of a loss
alone) is taken as the loss itself (then only :func:`batch_loss` applies).

Everything here is free of ``.item()`` and of branching on tensor values, so it runs under
``torch.func.functional_call`` and ``torch.vmap`` (over parameters, e.g. many chains at once).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import model_device, refuse_meta
from .models.packed import functorch_wrapped

__all__ = [
    "IGNORE_INDEX",
    "ParsedBatch",
    "parse_batch",
    "check_batch",
    "position_limit",
    "vocab_size",
    "batch_size",
    "as_pytree",
    "batch_tensors",
    "map_batch",
    "forward_error",
    "errors_naming",
    "check_batch_values",
    "counted_entries",
    "model_output",
    "read_logits",
    "read_loss",
    "batch_loss",
    "sample_losses",
    "token_losses",
    "probe_losses",
]

IGNORE_INDEX = -100
_PASS_KEYS = ("position_ids", "token_type_ids")


@dataclass(frozen=True)
class ParsedBatch:
    """A batch read by :func:`parse_batch`.

    Attributes
    ----------
    kind : {"tokens", "hf", "pair"}
    inputs : torch.Tensor
        Token ids ``(batch, pos)`` (``"tokens"``/``"hf"``; a 1-D input gets a batch axis of 1) or ``x`` (``"pair"``).
    target : torch.Tensor or None
        ``labels`` ``(batch, pos)`` (``"hf"``, None = the input ids) or ``y`` (``"pair"``).
    attention_mask : torch.Tensor or None
        ``(batch, pos)``, 1 for real tokens, 0 for padding.
    extra : dict
        Other model inputs of a mapping (``position_ids``, ``token_type_ids``).
    """

    kind: str
    inputs: torch.Tensor
    target: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_lm(self) -> bool:
        """True for next-token batches (a token tensor or a mapping with ``input_ids``)."""
        return self.kind in ("tokens", "hf")


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a {batch.dtype} tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        items = ", ".join(
            f"{k!r}: {tuple(v.shape)} {v.dtype}"
            if isinstance(v, torch.Tensor)
            else f"{k!r}: {type(v).__name__}"
            for k, v in batch.items()
        )
        return f"a {type(batch).__name__} with keys {{{items}}}"
    if isinstance(batch, tuple | list):
        inner = ", ".join(_describe(x) if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch)
        return f"a {type(batch).__name__} of {len(batch)} element(s) ({inner})"
    return f"a {type(batch).__name__}"


def _mapping_like(template: Mapping, items: dict) -> Mapping:
    """A mapping of ``template``'s kind holding ``items``: a plain dict for a dict, else a copy of ``template``
    (a ``transformers.BatchEncoding`` or ``UserDict`` keeps its class and attributes) with its entries replaced; a
    dict when the mapping cannot be copied and filled (a read-only mapping)."""
    if type(template) is dict:
        return items
    try:
        new = copy.copy(template)
        for k in list(new.keys()):
            if k not in items:
                del new[k]
        for k, v in items.items():
            new[k] = v
        return new
    except Exception:  # noqa: BLE001 - a mapping that cannot be copied or written: its entries as a dict
        return dict(items)


def map_batch(fn: Callable, *batches: Any) -> Any:
    """``fn`` applied leaf by leaf to ``batches`` of one structure (``fn(*leaves)`` at each leaf), the result in
    the first batch's structure. Every mapping is a container (a ``dict``, and a ``transformers.BatchEncoding`` or
    ``UserDict``, which torch's pytree would take as one leaf), as are tuples (named ones too) and lists; any other
    object goes to torch's ``tree_map`` (containers it registers, and leaves).

    Raises
    ------
    ValueError
        When the batches' structures differ (other keys, lengths or kinds of container), naming the difference."""
    first = batches[0]
    if isinstance(first, Mapping):
        keys = list(first.keys())
        for b in batches[1:]:
            if not isinstance(b, Mapping) or set(b.keys()) != set(keys):
                theirs = sorted(map(str, b.keys())) if isinstance(b, Mapping) else type(b).__name__
                raise ValueError(
                    f"batches of different structures: keys {sorted(map(str, keys))} and {theirs}"
                )
        return _mapping_like(first, {k: map_batch(fn, *(b[k] for b in batches)) for k in keys})
    if isinstance(first, tuple | list):
        for b in batches[1:]:
            if not isinstance(b, tuple | list) or len(b) != len(first):
                what = f"{type(b).__name__} of {len(b)}" if isinstance(b, tuple | list) else type(b).__name__
                raise ValueError(
                    f"batches of different structures: a {type(first).__name__} of {len(first)} and a {what}"
                )
        items = [map_batch(fn, *xs) for xs in zip(*batches)]
        if isinstance(first, tuple) and hasattr(first, "_fields"):  # a namedtuple
            return type(first)(*items)
        try:
            return type(first)(items)
        except TypeError:  # a tuple or list subclass built otherwise
            return tuple(items) if isinstance(first, tuple) else items
    return torch.utils._pytree.tree_map(fn, *batches)


def _has_other_mapping(batch: Any) -> bool:
    """Whether ``batch`` holds a mapping that is not a ``dict`` (which torch's pytree takes as one leaf)."""
    if isinstance(batch, Mapping):
        return not isinstance(batch, dict) or any(_has_other_mapping(v) for v in batch.values())
    if isinstance(batch, tuple | list):
        return any(_has_other_mapping(v) for v in batch)
    return False


def as_pytree(batch: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(tree, rebuild)``: ``batch`` with every mapping a ``dict`` (what ``torch.func.vmap`` and torch's pytree walk:
    a ``transformers.BatchEncoding`` is one leaf to them), and the function that gives such a tree (or a slice of
    it under vmap) ``batch``'s kinds of mapping back; ``batch`` itself and the identity when it holds dicts only."""
    if not _has_other_mapping(batch):
        return batch, lambda tree: tree

    def plain(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
            return type(x)(*(plain(v) for v in x))
        if isinstance(x, tuple | list):
            return tuple(plain(v) for v in x) if isinstance(x, tuple) else [plain(v) for v in x]
        return x

    return plain(batch), lambda tree: map_batch(lambda _, b: b, batch, tree)


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors in ``batch``, in :func:`map_batch`'s order (a mapping of any kind is walked)."""
    found: list[torch.Tensor] = []
    map_batch(lambda v: found.append(v) if isinstance(v, torch.Tensor) else None, batch)
    return found


_EXPECTED = (
    "a token tensor (batch, pos) of integer ids (or a one-element tuple/list holding it), a mapping with "
    "'input_ids' (optional 'attention_mask', 'labels'), or a pair (x, y) of tensors; for other batches pass your "
    "own loss function"
)


def _as_tensors_hint(values) -> str:
    """A hint for batches holding lists or arrays of ids (a tokenizer's output without ``return_tensors``)."""
    if any(isinstance(v, list | tuple) or type(v).__module__ == "numpy" for v in values):
        return (
            " (lists or arrays of ids: make them tensors, torch.tensor(...), or ask the tokenizer for "
            "return_tensors='pt')"
        )
    return ""


def _is_int(t: torch.Tensor) -> bool:
    """An integer tensor (not bool)."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _ids(t: torch.Tensor, what: str, batch: Any) -> torch.Tensor:
    if not _is_int(t):
        raise TypeError(f"{what} must hold integer token ids, got {_describe(batch)}; expected {_EXPECTED}")
    if t.dtype not in (torch.int32, torch.int64):
        # ids of a narrow or unsigned type (uint16 from a memory-mapped token file, int8, ...): an embedding
        # reads int32 or int64 only
        t = t.long()
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{what} must have shape (batch, pos) or (pos,), got {_describe(batch)}")
    return t


def check_attention_mask(mask: torch.Tensor, argument: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless every entry of ``mask`` is 0 (padding) or 1 (a real token).
    Under vmap (each of a run's batched chains reading its own batch) the values cannot be read: where the caller
    checked the batches before stacking them (:func:`check_batch_values` inside :func:`stacked_batches_checked`)
    the check is left out; elsewhere it runs, and vmap refuses it (the chains then run one by one, checked)."""
    if _checked_before_stacking(mask):
        return
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(
            f"{argument} must hold 1 (a real token) or 0 (padding), got the value {bad!r} "
            f"(a {mask.dtype} tensor of shape {tuple(mask.shape)})"
        )


def parse_batch(batch: Any) -> ParsedBatch:
    """Read a batch in one of the forms of the module docstring.

    Raises
    ------
    TypeError, ValueError
        For anything else, naming what was expected and what arrived (type, keys, shapes, dtypes).
    """
    if isinstance(batch, torch.Tensor):
        return ParsedBatch("tokens", _ids(batch, "a tensor batch", batch))
    if isinstance(batch, Mapping):
        if "input_ids" not in batch or not isinstance(batch["input_ids"], torch.Tensor):
            raise TypeError(
                f"a mapping batch needs a tensor 'input_ids', got {_describe(batch)}; expected {_EXPECTED}"
                + _as_tensors_hint(batch.values())
            )
        ids = _ids(batch["input_ids"], "batch['input_ids']", batch)
        fields: dict[str, torch.Tensor | None] = {}
        for key in ("attention_mask", "labels", *_PASS_KEYS):
            v = batch.get(key)
            if v is not None:
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"batch[{key!r}] must be a tensor, got {_describe(batch)}")
                per_sequence = key == "labels" and tuple(v.shape) == (ids.shape[0],) and ids.shape[1] != 1
                if v.dim() == 1:
                    v = v.unsqueeze(0)
                if tuple(v.shape) != tuple(ids.shape):
                    raise ValueError(
                        f"batch[{key!r}] must have the shape of input_ids {tuple(ids.shape)}, got {_describe(batch)}"
                        + "; one entry per token"
                        + (
                            "; for one class label per sequence (a sequence classifier) give the pair "
                            "(input_ids, labels), or a loss function of your own for a padded batch"
                            if per_sequence
                            else ""
                        )
                    )
                if key == "labels" and not _is_int(v):
                    raise TypeError(
                        f"batch['labels'] must hold integer token ids (or {IGNORE_INDEX} where a position does not "
                        f"count), got {_describe(batch)}"
                    )
                if key == "labels" and v.dtype != torch.int64:
                    v = v.long()  # cross-entropy reads int64 targets
                if key in _PASS_KEYS and not _is_int(v):
                    # embeddings index with them (learned positions, token types); a rotary model would read
                    # fractional positions without a word
                    raise TypeError(
                        f"batch[{key!r}] must hold integers, got {_describe(batch)}; give "
                        f"batch[{key!r}].long()"
                    )
                if key == "attention_mask":
                    check_attention_mask(v, "batch['attention_mask']")
            fields[key] = v
        extra = {k: fields[k] for k in _PASS_KEYS if fields[k] is not None}
        return ParsedBatch("hf", ids, fields["labels"], fields["attention_mask"], extra)
    if isinstance(batch, tuple | list) and len(batch) == 1 and isinstance(batch[0], torch.Tensor):
        # DataLoader(TensorDataset(tokens)) yields [tokens]
        return ParsedBatch("tokens", _ids(batch[0], "a one-element batch's tensor", batch))
    if (
        isinstance(batch, tuple | list)
        and len(batch) >= 2
        and all(isinstance(t, torch.Tensor) and t.dim() == 1 and _is_int(t) for t in batch)
        and len({t.shape for t in batch}) > 1
    ):
        # token sequences of unequal lengths (what a tokenizer gives without padding=True): no pair (x, y) has
        # 1-D integer x and y of unequal lengths, nor is a longer tuple a batch of the default loss
        lens = [int(t.shape[0]) for t in batch]
        raise ValueError(
            f"{_describe(batch)} reads as {len(batch)} token sequences of unequal lengths {lens}, which are not one "
            "batch: pad them to one length and give {'input_ids': ids, 'attention_mask': mask} (mask 1 at the real "
            "tokens, 0 at the padding; a tokenizer's padding=True output, or pad_sequence(..., batch_first=True) "
            "with its mask), or stack sequences of one length, torch.stack([...]) of shape "
            f"({len(batch)}, pos)"
        )
    if isinstance(batch, tuple | list) and len(batch) > 2:
        seqs = all(isinstance(t, torch.Tensor) and t.dim() == 1 and _is_int(t) for t in batch) and (
            len({t.shape for t in batch}) == 1
        )
        raise ValueError(
            f"the default loss reads (inputs, targets) and would ignore the other elements of {_describe(batch)}; "
            "give (x, y) batches, or pass a loss function (model, batch) -> loss (loss_fn=) that uses the others "
            "(e.g. sample weights)"
            + (
                f"; for {len(batch)} token sequences give them as one tensor, torch.stack([...]) of shape "
                f"({len(batch)}, pos)"
                if seqs
                else ""
            )
        )
    if isinstance(batch, tuple | list) and len(batch) == 2:
        x, y = batch[0], batch[1]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(
                f"a pair batch (x, y) must hold two tensors, got {_describe(batch)}; expected {_EXPECTED}"
                + _as_tensors_hint(batch)
            )
        if y.dtype == torch.bool or y.is_complex():
            raise TypeError(
                f"a pair batch (x, y) needs integer y (class indices, {IGNORE_INDEX} = ignore) or floating y "
                f"(regression targets), got {_describe(batch)}; give y.long() for classes or y.float() for a "
                "regression"
            )
        if _is_int(y) and y.dtype != torch.int64:
            y = y.long()  # cross-entropy reads int64 targets (int32 labels from numpy or a dataset's column)
        return ParsedBatch("pair", x, y)
    raise TypeError(f"the default loss cannot read {_describe(batch)}; expected {_EXPECTED}")


def _reads_sequences(model: nn.Module) -> bool:
    """Whether ``model`` is a sequence model whose batches are ``(batch, pos)`` token ids: pypattern's and
    TransformerLens' transformers (a ``cfg`` with ``n_ctx``) and Hugging Face models (a ``PreTrainedModel``);
    not a user's module that embeds one token per sample."""
    if isinstance(getattr(getattr(model, "cfg", None), "n_ctx", None), int):
        return True
    return _is_hf_model(model)


def _valid_ids(v: int | None) -> str:
    """The token ids a vocabulary of ``v`` takes, in words (``v`` None: any id >= 0)."""
    return f"0 .. {v - 1} (the model's vocabulary has {v} tokens)" if v is not None else ">= 0"


def check_vocab_ids(model: nn.Module, ids: torch.Tensor, argument: str) -> None:
    """Refuse token ids below 0 or not below ``model``'s vocabulary (where it states one), naming ``argument`` (an
    embedding lookup would fail deep inside the model with a bare ``IndexError``, or read a negative id from the
    end)."""
    if not ids.numel():
        return
    refuse_meta(ids, argument, "the token ids themselves")
    v = vocab_size(model)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (v is not None and hi >= v):
        valid = _valid_ids(v)
        raise ValueError(f"{argument} contains token id {lo if lo < 0 else hi}; valid ids are {valid}")


def vocab_size(model: nn.Module) -> int | None:
    """The number of token ids ``model`` embeds, where it can be read: ``model.cfg.d_vocab`` (pypattern's and
    TransformerLens' models), the rows of ``model.get_input_embeddings()`` (Hugging Face), or
    ``model.config.vocab_size``; None otherwise."""
    v = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if isinstance(v, int):
        return v
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            v = getattr(get(), "num_embeddings", None)
        except (AttributeError, NotImplementedError):
            v = None
        if isinstance(v, int):
            return v
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if isinstance(v, int) else None


# Hugging Face families with learned absolute positions that do not derive them from the attention mask
_LEARNED_POSITION_TYPES = frozenset({"gpt2", "gpt_neo", "gpt_bigcode"})

#: Hugging Face families whose learned absolute positions bound the sequence length, and the config field of it
LEARNED_POSITIONS = {
    "gpt2": "n_positions",
    "gpt_bigcode": "n_positions",
    "gpt_neo": "max_position_embeddings",
    "opt": "max_position_embeddings",
}


def position_limit(model: nn.Module) -> int | None:
    """The number of learned positions of ``model`` (pypattern's ``cfg.max_positions``, or a Hugging Face model's,
    possibly wrapped, of a family with learned absolute positions); None when positions do not bound the length
    (rotary or no positional embeddings, or a model whose limit cannot be read)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "max_positions"):
        v = cfg.max_positions
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    inner = getattr(model, "model", model)
    config = getattr(inner, "config", None)
    field_ = LEARNED_POSITIONS.get(getattr(config, "model_type", None))
    v = getattr(config, field_, None) if field_ else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _reads_every_position_id(model: nn.Module) -> bool:
    """Whether ``model`` (possibly a :func:`~pypattern.models.hf.hooked_hf` wrapper) is a Hugging Face model of a
    family that indexes its learned position embedding with every ``position_ids`` entry, padding's included
    (GPT-2, GPT-Neo, GPT-BigCode), so that a negative entry fails inside the embedding. pypattern's ``Transformer``
    reads the real tokens' ids only and names a bad one itself; OPT offsets its ids by 2."""
    if hasattr(getattr(model, "cfg", None), "max_positions"):
        return False
    inner = getattr(model, "model", model)
    return getattr(getattr(inner, "config", None), "model_type", None) in _LEARNED_POSITION_TYPES and bool(
        position_limit(model)
    )


def check_batch(model: nn.Module, batch: Any, argument: str) -> ParsedBatch:
    """:func:`parse_batch` for the batch a caller passed as ``argument`` (e.g. ``"probe"``), with errors naming it,
    and the token ids of a token batch checked against ``model``'s vocabulary (:func:`vocab_size`): an id out of
    range would otherwise fail inside the embedding (or, negative, be read from the end of it).

    The ``labels`` that are scored are checked the same way (ids in the vocabulary, or -100). A mapping batch whose ``attention_mask``
    has padding before real tokens (left padding) is refused when ``model``'s forward takes no ``attention_mask``:
    its real tokens would attend to the padding. Likewise ``position_ids`` other than ``0 .. pos - 1`` at the real
    tokens (``attention_mask`` 1; padding positions' ids are not read) for a model whose forward takes none. Left
    padding without ``position_ids`` for a model reading learned positions from the first column (Hugging Face's
    GPT-2, GPT-Neo, GPT-BigCode, and pypattern's ``Transformer`` with ``positional_embedding_type="standard"`` whose
    ``cfg.mask_positions`` is False, e.g. converted from those) warns: each row's real tokens sit at shifted
    positions.
    Negative ``position_ids`` for a Hugging Face GPT-2, GPT-Neo or GPT-BigCode model, which looks every entry up
    in its position embedding, padding's included, are refused.

    Raises
    ------
    TypeError, ValueError
        Naming ``argument``, what arrived and what was expected.
    """
    try:
        pb = parse_batch(batch)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{argument}: {e}") from None
    _refuse_no_sample(pb, batch, argument)
    if pb.attention_mask is not None and not _takes_mask(model):
        _refuse_left_padding(model, pb.attention_mask, argument)
    pos = pb.extra.get("position_ids")
    if pb.attention_mask is not None and pos is None and _takes_mask(model):
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in _LEARNED_POSITION_TYPES:  # pypattern's Transformer: its config says
            learned = _learned_column_positions(model)
            mt = "learned positions, positional_embedding_type='standard'" if learned else None
        am = pb.attention_mask.bool()
        if mt is not None and bool((am[:, 1:] & ~am[:, :-1]).any()):
            from .sampling.diagnostics import user_stacklevel  # the caller's line, whichever entry point

            warnings.warn(
                f"{argument}: left padding without position_ids: {type(model).__name__} ({mt}) reads learned "
                "absolute positions 0, 1, 2, ... from the first column, so each padded row's real tokens sit at "
                "positions shifted by its padding and their losses differ from the unpadded sequence's; give "
                "batch['position_ids'] = (attention_mask.cumsum(-1) - 1).clamp(min=0), or pad on the right",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
    if pos is not None and pos.numel() and _takes(model, "position_ids") and _reads_every_position_id(model):
        low = int(pos.min())
        if low < 0:
            row, col = (int(i) for i in (pos == low).nonzero()[0])
            raise ValueError(
                f"{argument}: batch['position_ids'] contains {low} (row {row}, column {col}), but "
                f"{type(model).__name__} looks every entry up in its learned position embedding (padding's too), "
                f"whose indices are 0 .. {position_limit(model) - 1}; give position_ids = "
                "(attention_mask.cumsum(-1) - 1).clamp(min=0) (Hugging Face's generate() fills padding with 1)"
            )
    if pos is not None and not _takes(model, "position_ids"):
        plain = torch.arange(pos.shape[-1], device=pos.device).expand_as(pos)
        differ = pos != plain
        if pb.attention_mask is not None:
            # padding positions' ids are not read (Hugging Face's generate() fills them with 1): only the real
            # tokens' ids must be their columns, 0 .. n - 1 in a right-padded row
            differ = differ & pb.attention_mask.to(pos.device).bool()
        if bool(differ.any()):
            row = int(differ.any(-1).nonzero()[0, 0])
            real = " at its real tokens (attention_mask 1)" if pb.attention_mask is not None else ""
            raise ValueError(
                f"{argument}: batch['position_ids'] row {row} is not 0 .. {pos.shape[-1] - 1}{real}, but "
                f"{type(model).__name__}.forward takes no position_ids: the model would read every row at positions "
                "0, 1, 2, ...; give batches whose sequences start at position 0 (right-padded), or a model whose "
                "forward takes position_ids"
            )
    if "token_type_ids" in pb.extra and not _takes(model, "token_type_ids"):
        raise ValueError(
            f"{argument}: the batch has 'token_type_ids', but {type(model).__name__}.forward takes none and would "
            "ignore them (Hugging Face's GPT-2 adds their embeddings, even all-zero ones): drop the key from the "
            "batch to compute without them"
        )
    if not pb.is_lm:
        x, y = pb.inputs, pb.target
        if x.dim() == 1 and _is_int(x) and _is_int(y) and x.shape == y.shape and _reads_sequences(model):
            raise ValueError(
                f"{argument}: two 1-D token tensors of {x.shape[0]} ids, read as a pair (x, y) of inputs and targets, "
                f"but {type(model).__name__} reads batches of sequences (batch, pos); for two sequences give them "
                "as one tensor, torch.stack([...]) of shape (2, pos)"
            )
        if x.dim() and y.dim() and x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{argument}: the pair (x, y) has {x.shape[0]} rows in x {tuple(x.shape)} but {y.shape[0]} in y "
                f"{tuple(y.shape)}; give one target per sample"
            )
        if _is_int(y) and y.numel() and not bool((y != IGNORE_INDEX).any()):
            raise ValueError(
                f"{argument}: the pair {_describe(batch)} has no counted target: every y is {IGNORE_INDEX}; its "
                "loss is undefined"
            )
        if vocab_size(model) is not None:
            why = _misread_pair(x, y, None)
            if why is not None:
                raise ValueError(f"{argument}: {why}")
    if pb.is_lm:
        why = _preshifted_labels(pb, off_cpu=True)
        if why is not None:
            raise ValueError(f"{argument}: {why}")
        counted = _counted(pb)
        if not bool(counted.any()):
            raise ValueError(
                f"{argument}: the batch {_describe(batch)} has no counted token: every next-token target is padding "
                f"(attention_mask 0) or labelled {IGNORE_INDEX}, or the sequences have one token; its loss is "
                "undefined"
            )
    if pb.is_lm:
        limit = position_limit(model)
        if limit is not None:
            pos_ids = pb.extra.get("position_ids")
            last = _last_position_read(model, pb, pos_ids)
            if last > limit:
                what = "position_ids reach" if pos_ids is not None else "sequences of length"
                raise ValueError(
                    f"{argument}: {what} {last}, but {type(model).__name__} has {limit} learned positions "
                    f"(0 .. {limit - 1}); give sequences of at most {limit} tokens (truncate or split them)"
                )
    if pb.is_lm and pb.inputs.numel():
        check_vocab_ids(model, pb.inputs, argument)
        v = vocab_size(model)
        valid = _valid_ids(v)
        if pb.target is not None and pb.target.numel():
            counts = pb.target[:, 1:] != IGNORE_INDEX  # the targets that are scored (see _lm_token_terms)
            if pb.attention_mask is not None:
                am = pb.attention_mask.bool()
                counts = counts & am[:, 1:] & am[:, :-1]
            t = pb.target[:, 1:][counts]
            if t.numel() and (int(t.min()) < 0 or (v is not None and int(t.max()) >= v)):
                bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
                raise ValueError(
                    f"{argument}: batch['labels'] contains {bad}; labels are token ids {valid} or "
                    f"{IGNORE_INDEX} for positions that do not count"
                )
    return pb


def forward_error(model: nn.Module, batch: Any, argument: str, error: Exception) -> TypeError | None:
    """A clearer error for ``error``, raised by ``model`` (or a loss function) on ``batch`` (passed as
    ``argument``), when the batch's floating tensors have another dtype than the model's floating parameters (torch
    says only that two operands differ); None when they agree."""
    dtypes = (
        {p.dtype for p in model.parameters() if p.is_floating_point()}
        if isinstance(model, nn.Module)
        else set()
    )
    if len(dtypes) != 1:
        return None
    (want,) = dtypes
    leaves = batch_tensors(batch)
    other = sorted({str(t.dtype) for t in leaves if t.is_floating_point() and t.dtype != want})
    if not other:
        return None
    return TypeError(
        f"{argument}: the batch holds {' and '.join(other)} tensors but the model's parameters are {want}, and the "
        f"forward failed ({type(error).__name__}: {error}); convert one to the other's dtype (the batch's tensors "
        f"with .to({want}), or the model with .to(...))"
    )


@contextlib.contextmanager
def errors_naming(model: nn.Module, batch: Any, argument: str, library: bool) -> Iterator[None]:
    """Errors of a loss computed in the block on ``batch`` (passed as ``argument``) said to come from it: the
    library's own loss refusing the batch (``library``: a ``TypeError`` / ``ValueError`` about its targets or
    shapes) gets ``argument`` in front of its message, a forward that fails because the batch's dtype is not the
    model's gets :func:`forward_error`'s message, and torch's error for operands whose shapes do not fit
    (:data:`_SHAPE_ERRORS`) is said to come from ``argument``'s batch, described; other errors pass as they are."""
    try:
        yield
    except (TypeError, ValueError) as e:
        if library:
            raise type(e)(f"{argument}: {e}") from None
        raise
    except RuntimeError as e:
        clearer = forward_error(model, batch, argument, e)
        if clearer is None and type(e) is RuntimeError and any(m in str(e) for m in _SHAPE_ERRORS):
            clearer = RuntimeError(
                f"{argument}: the loss failed on its batch ({_describe(batch)}): {e}; check the batch's shapes "
                "against the model's inputs"
            )
        raise (clearer or e) from e


# torch's messages for operands of shapes that do not fit (a batch's width, length or layout the model does not read)
_SHAPE_ERRORS = (
    "cannot be multiplied",
    "must match the size",
    "size mismatch",
    "Expected size",
    "expected input",
    "shape '[",
    "invalid for input of size",
    "Sizes of tensors must match",
    "doesn't match the broadcast shape",
)


def batch_size(batch: Any) -> int:
    """Number of samples in ``batch`` (sequences for token batches, rows of ``x`` for pairs).

    A batch of another form (one the defaults do not read, used with a custom loss) counts the leading dimension
    of its first tensor.

    Raises
    ------
    ValueError
        When the batch holds no tensor at all.
    """
    try:
        return int(parse_batch(batch).inputs.shape[0])
    except (TypeError, ValueError, IndexError) as e:  # IndexError: a 0-d tensor has no batch axis
        why = str(e)
    leaves = batch_tensors(batch)
    if not leaves or leaves[0].dim() == 0:
        raise ValueError(
            f"cannot count the samples of {_describe(batch)}: it holds no tensor with a batch axis ({why})"
        )
    return int(leaves[0].shape[0])


_SIG_CACHE: dict[Any, frozenset[str]] = {}


def _callable_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(
            f"model is a {type(model).__name__}, not callable; give the model (a torch.nn.Module, or a callable on "
            "the batch's inputs)"
        )


def _forward_params(model: nn.Module) -> frozenset[str]:
    """Names of ``model.forward``'s parameters, plus ``"**"`` when it takes ``**kwargs``."""
    _callable_model(model)
    fwd = type(model).forward if isinstance(model, nn.Module) else model
    if fwd in _SIG_CACHE:
        return _SIG_CACHE[fwd]
    try:
        params = inspect.signature(fwd).parameters
        names = frozenset(params)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            names = names | {"**"}
    except (TypeError, ValueError):
        names = frozenset()
    _SIG_CACHE[fwd] = names
    return names


def _last_position_read(model: nn.Module, pb: ParsedBatch, pos_ids: torch.Tensor | None) -> int:
    """One more than the largest learned position ``model`` reads on ``pb``'s tokens: the largest ``position_ids``
    entry (the sequence length without them). pypattern's ``Transformer`` given an ``attention_mask`` reads the
    positions of real tokens only (ids at padding are not read), and with ``cfg.mask_positions`` and no
    ``position_ids`` counts each row's real tokens from 0, so its longest row of real tokens bounds it."""
    am = pb.attention_mask
    real_only = (
        am is not None and _takes_mask(model) and hasattr(getattr(model, "cfg", None), "mask_positions")
    )
    if pos_ids is not None:
        read = pos_ids
        if real_only:
            try:
                read = torch.where(am.to(pos_ids.device).bool(), pos_ids, torch.zeros_like(pos_ids))
            except RuntimeError:  # shapes that do not match: the model's forward names them
                read = pos_ids
        return int(read.max()) + 1 if read.numel() else 0
    if real_only and model.cfg.mask_positions:
        return int(am.bool().sum(-1).max()) if am.numel() else 0
    return pb.inputs.shape[1]


def _learned_column_positions(model: nn.Module) -> bool:
    """Whether ``model`` is pypattern's ``Transformer`` (or a module with its ``cfg``) reading learned absolute
    positions from the first column when given an ``attention_mask`` without ``position_ids`` (converted GPT-2,
    GPT-Neo, GPT-BigCode models; not OPT's, whose positions come from the mask: ``cfg.mask_positions``)."""
    cfg = getattr(model, "cfg", None)
    return (
        getattr(cfg, "positional_embedding_type", None) == "standard"
        and getattr(cfg, "mask_positions", None) is False
    )


def _takes_mask(model: nn.Module) -> bool:
    """True when :func:`model_output` passes a batch's ``attention_mask`` on to ``model``."""
    names = _forward_params(model)
    return "attention_mask" in names or ("input_ids" in names and "**" in names)


def _takes(model: nn.Module, key: str) -> bool:
    """True when :func:`model_output` passes a batch's ``key`` (``position_ids``, ``token_type_ids``) on."""
    names = _forward_params(model)
    return key in names or ("input_ids" in names and "**" in names)


def _refuse_left_padding(model: nn.Module, attention_mask: torch.Tensor, argument: str) -> None:
    """A real token after a padding position, for a model that reads no mask: its real tokens would attend to the
    padding. Refused, naming ``argument``."""
    if _checked_before_stacking(attention_mask):
        return
    am = attention_mask.bool()
    inner = am[:, 1:] & ~am[:, :-1]
    if bool(inner.any()):
        row = int(inner.any(-1).nonzero()[0, 0])
        raise ValueError(
            f"{argument}: attention_mask row {row} has padding before real tokens (left padding), but "
            f"{type(model).__name__}.forward takes no attention_mask, so its real tokens would attend to the "
            "padding and their losses and activations would differ from a masked model's; pad on the right (the "
            "model is causal, so right padding is exact) or pass a model whose forward takes attention_mask"
        )


def _on_model(model: nn.Module, pb: ParsedBatch) -> ParsedBatch:
    """``pb`` with its tensors where ``model`` computes (a batch held on the CPU for a model on a GPU, as the
    estimators move theirs); ``pb`` itself when they are there already or the model holds no tensors."""
    device = model_device(model)
    tensors = [pb.inputs, pb.target, pb.attention_mask, *pb.extra.values()]
    if device is None or all(t is None or t.device == device for t in tensors):
        return pb
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    return ParsedBatch(
        pb.kind, on(pb.inputs), on(pb.target), on(pb.attention_mask), {k: on(v) for k, v in pb.extra.items()}
    )


_STACKED_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("stacked_checked", default=False)


def _checked_before_stacking(t: torch.Tensor) -> bool:
    """Whether ``t``'s values cannot be read here (a vmapped batch) and were checked before the batches were
    stacked (:func:`stacked_batches_checked`): a value check on it is left out."""
    return functorch_wrapped(t) and _STACKED_CHECKED.get()


@contextlib.contextmanager
def stacked_batches_checked() -> Iterator[None]:
    """In the block, the value checks of the default losses (:func:`check_batch_values`) are left out under vmap:
    the caller checks every batch it stacks for the vmapped calls before stacking it."""
    token = _STACKED_CHECKED.set(True)
    try:
        yield
    finally:
        _STACKED_CHECKED.reset(token)


def check_batch_values(model: nn.Module, batch: Any, argument: str = "batch") -> None:
    """The checks of the default losses that read a batch's values (an ``attention_mask`` of 0s and 1s; no left
    padding for a model whose forward takes no mask), for a batch about to be stacked with others under vmap
    (batched chains), where the losses cannot read them. For batches of the default losses (they are parsed)."""
    pb = parse_batch(batch)
    if pb.attention_mask is None:
        return
    if pb.kind != "pair" and not _takes_mask(model):
        _refuse_left_padding(model, pb.attention_mask, argument)


def model_output(model: nn.Module, batch: Any | ParsedBatch) -> Any:
    """Run ``model`` on the inputs of ``batch`` (see the module docstring for how it is called); the raw output.
    The batch's tensors are moved to where the model computes first. A left-padded batch for a model whose forward
    takes no ``attention_mask`` is refused."""
    return _output(model, _on_model(model, batch if isinstance(batch, ParsedBatch) else parse_batch(batch)))


def _is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` (which computes no loss of its own without ``labels``)."""
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _unmasked_empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with every row that holds no real token set to 1 throughout. Such a row has no counted target, so
    no loss reads its logits; but a Hugging Face model masks all of its keys, and with eager attention in float64
    (whose softmax runs in float32, where the mask value is -inf) its activations are NaN, which the backward pass
    carries into every parameter's gradient (0 x NaN). Value-free: runs under vmap."""
    return torch.where(mask.bool().any(-1, keepdim=True), mask, torch.ones_like(mask))


def _output(model: nn.Module, pb: ParsedBatch, for_loss: bool = False) -> Any:
    """:func:`model_output` of a parsed batch already where the model computes. ``for_loss``: the output is read
    for the losses of the batch's counted targets only, so a Hugging Face model gets rows without any real token
    unmasked (:func:`_unmasked_empty_rows`)."""
    _callable_model(model)
    if pb.kind == "pair":
        return model(pb.inputs)
    names = _forward_params(model)
    if pb.attention_mask is not None and not _takes_mask(model):
        _refuse_left_padding(model, pb.attention_mask, "batch")
    if "input_ids" in names:
        kw: dict[str, Any] = {"input_ids": pb.inputs}
        if pb.attention_mask is not None and ("attention_mask" in names or "**" in names):
            am = pb.attention_mask
            kw["attention_mask"] = _unmasked_empty_rows(am) if for_loss and _is_hf_model(model) else am
        if "use_cache" in names or "**" in names:
            kw["use_cache"] = False
        for k, v in pb.extra.items():
            if k in names or "**" in names:
                kw[k] = v
        if "attention_mask" in kw:
            from .models.hf import finite_padding

            with finite_padding(model, kw.get("attention_mask")):
                return model(**kw)
        return model(**kw)
    kw = {}
    if pb.attention_mask is not None and "attention_mask" in names:
        kw["attention_mask"] = pb.attention_mask
    for k, v in pb.extra.items():
        if k in names:
            kw[k] = v
    return model(pb.inputs, **kw)


def _is_loss(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 0


def _loss_then_logits(out: Any) -> bool:
    """Whether ``out`` is a tuple or list ``(loss, logits, ...)``: a 0-dim loss first and a tensor with axes second
    (Hugging Face's ``return_dict=False`` order when the loss is computed)."""
    return (
        isinstance(out, tuple | list)
        and len(out) > 1
        and _is_loss(out[0])
        and isinstance(out[1], torch.Tensor)
        and out[1].dim() > 0
    )


def read_logits(out: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, ``.logits`` / ``["logits"]``, or the first element of a tuple (the
    second after a 0-dim loss: ``(loss, logits, ...)``).

    Raises
    ------
    TypeError
        When the output holds no logits (e.g. only a scalar loss), naming what arrived.
    """
    if _output_loss(out) is not None:
        t = _output_loss(out)  # a loss without logits: refused below
    elif isinstance(out, torch.Tensor):
        t = out
    elif isinstance(out, Mapping) and out.get("logits") is not None:
        t = out["logits"]
    elif not isinstance(out, tuple | list | Mapping) and getattr(out, "logits", None) is not None:
        t = out.logits
    elif _loss_then_logits(out):
        t = out[1]
    elif isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        t = out[0]
    else:
        raise TypeError(
            f"cannot read logits from the model's output ({_describe(out)}): expected a tensor of logits, an object "
            "with .logits (a Hugging Face ModelOutput) or a tuple whose first element is the logits"
        )
    if _is_loss(t):
        raise TypeError(
            "the model returned a scalar (a loss), but per-sample and per-token losses need its logits: make the "
            "model return logits, or pass your own per-sample loss function"
        )
    return t


def read_loss(out: Any) -> torch.Tensor:
    """The loss in what a loss function returned: a tensor, a tuple (loss first), a mapping with ``"loss"`` or an
    object with ``.loss`` (devinterp's rules; this is what estimators call on a user's ``loss_fn`` output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out:
        return out[0]
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if getattr(out, "loss", None) is not None:
        return out.loss
    raise TypeError(
        f"a loss function must return a tensor, a tuple (loss first), a mapping with 'loss' or an object with .loss; "
        f"got {_describe(out)}"
    )


def _output_loss(out: Any) -> torch.Tensor | None:
    """A scalar loss the model returned instead of logits, else None."""
    if _is_loss(out):
        return out
    if isinstance(out, tuple | list):
        return out[0] if out and _is_loss(out[0]) and not _loss_then_logits(out) else None
    if isinstance(out, Mapping):
        loss = out.get("loss") if "logits" not in out or out.get("logits") is None else None
        return loss if _is_loss(loss) else None
    if not isinstance(out, tuple | list) and getattr(out, "logits", None) is None:
        loss = getattr(out, "loss", None)
        return loss if _is_loss(loss) else None
    return None


def _counted(pb: ParsedBatch) -> torch.Tensor:
    """The mask ``(batch, pos - 1)`` of next-token targets that count (not -100, both positions unpadded)."""
    targets = (pb.target if pb.target is not None else pb.inputs)[:, 1:]
    mask = targets != IGNORE_INDEX
    if pb.attention_mask is not None:
        am = pb.attention_mask.bool()
        mask = mask & am[:, 1:] & am[:, :-1]
    return mask


def counted_mask(pb: ParsedBatch) -> torch.Tensor | None:
    """The mask :func:`token_losses` returns, read from the batch alone (no forward): counted next-token targets
    of a token batch, ``y != -100`` for a pair with integer targets; None for float targets (every entry
    counts)."""
    if pb.is_lm:
        return _counted(pb)
    if not pb.target.is_floating_point():
        return pb.target != IGNORE_INDEX
    return None


def counted_entries(batch: Any) -> torch.Tensor | None:
    """:func:`counted_mask` of ``batch``, or None when every entry counts or the default rule cannot read the batch
    (a batch of one's own loss function, or an ``attention_mask`` of other values than 0 and 1). Runs under vmap,
    on batches stacked for batched chains: there the mask's values are not read."""
    with stacked_batches_checked():
        try:
            pb = parse_batch(batch)
        except (TypeError, ValueError):
            return None
    return counted_mask(pb)


def _lm_token_terms(logits: torch.Tensor, pb: ParsedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses ``(batch, pos - 1)`` (0 where masked) and the mask of counted positions."""
    if logits.dim() != 3 or logits.shape[:2] != pb.inputs.shape:
        raise ValueError(
            f"a token batch of shape {tuple(pb.inputs.shape)} needs logits (batch, pos, vocab) of the same batch and "
            f"pos, got {tuple(logits.shape)}"
        )
    lg = logits[:, :-1]
    if lg.dtype in (torch.float16, torch.bfloat16):
        lg = lg.float()
    targets = (pb.target if pb.target is not None else pb.inputs)[:, 1:]
    mask = _counted(pb)
    _check_targets(targets, mask, logits.shape[-1], pb.target is not None)
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    nll = -torch.log_softmax(lg, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, nll, torch.zeros_like(nll)), mask


def _check_targets(targets: torch.Tensor, mask: torch.Tensor, vocab: int, labels: bool) -> None:
    """Refuse counted next-token targets outside ``0 .. vocab - 1`` (the logits' last axis), naming them: a label
    of -1 (a padding label other than -100) or one beyond the vocabulary would otherwise fail in the gather with
    torch's bare index error (or, on a GPU, a device assert). Under vmap (batched chains, whose batches
    :func:`check_batch` checked before stacking) and off the CPU (no wait for the device at every step) the values
    are not read."""
    if functorch_wrapped(targets, mask) or targets.device.type != "cpu" or not targets.numel():
        return
    t = targets[mask]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        what = "batch['labels']" if labels else "the token ids"
        raise ValueError(
            f"{what} contains {bad} at a counted position, but the model's logits score {vocab} tokens: give labels "
            f"0 .. {vocab - 1}, and {IGNORE_INDEX} (not another negative value) where a token does not count"
        )


def _pair_terms(
    out: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (``(batch,)``) or per-position (``(batch, pos)``) terms of a pair and their mask (``x``: the
    pair's inputs, for :func:`_check_classes`)."""
    if not y.is_floating_point():
        _check_classes(out, y, x)
        out = _widened(out)
        if out.dim() == 3:  # (batch, pos, classes)
            terms = F.cross_entropy(out.transpose(1, 2), y, reduction="none")
        else:
            terms = F.cross_entropy(out, y, reduction="none")
        return terms, y != IGNORE_INDEX
    out, y = _same_shape(_widened(out), _widened(y))
    err = (out - y) ** 2
    err = err.reshape(err.shape[0], -1).mean(1) if err.dim() > 0 else err
    return err, torch.ones_like(err, dtype=torch.bool)


def _widened(t: torch.Tensor) -> torch.Tensor:
    """A 16-bit floating tensor (float16, bfloat16: a half model's logits or outputs, or a pair's targets) widened
    to float32, as the next-token losses widen their logits: a loss computed and returned in 16 bits is resolved
    to about 1e-2 of its value only (a cross-entropy of 35 to 0.25 in bfloat16), and a squared error of 256 or more
    overflows float16 to inf. Any other tensor as it is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _misread_pair(x: torch.Tensor, y: torch.Tensor, classes: int | None) -> str | None:
    """Why the default loss must not read the pair ``(x, y)`` as inputs and per-position targets (the module
    docstring's two refused pairs), or None. ``x`` token ids ``(batch, pos)`` and integer ``y`` of its shape:

    * ``y`` equal to ``x`` wherever ``y`` is not -100 (at least one such position): the input ids, or Hugging
      Face's unshifted labels, which would score the logits at ``t`` against the input token at ``t``;
    * with ``classes`` (the model's scores per position) above 2: ``y`` of 0s and 1s only (some 1s, rows of at
      least two positions), every row ``1 .. 1 0 .. 0`` or every row ``0 .. 0 1 .. 1``: an attention mask, scored
      as classes 0 and 1.

    Reads values: not for tensors under vmap."""
    if x.dim() != 2 or not _is_int(x) or not _is_int(y) or x.shape != y.shape or not y.numel():
        return None
    counted = y != IGNORE_INDEX
    if bool(counted.any()) and torch.equal(x[counted], y[counted].to(x.dtype)):
        return (
            "a pair (x, y) with y equal to x for a language model (at every position where y is not "
            f"{IGNORE_INDEX}): pairs are scored per position (the output at t against y[t]), which would score "
            "copying the input. This is what a DataLoader over TensorDataset(input_ids, labels) yields; for the "
            "next-token loss give the tokens alone, or {'input_ids': x, 'labels': y} (labels unshifted, as Hugging "
            "Face's: a Dataset whose items are dicts, or a collate_fn that builds them), or pairs shifted by you, "
            "(x[:, :-1], y[:, 1:])"
        )
    if classes is not None and classes > 2 and y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all() & y.any()):
        step = y[:, 1:] - y[:, :-1]
        if bool((step <= 0).all()) or bool((step >= 0).all()):
            return (
                f"the pair's integer targets y {tuple(y.shape)} hold only 0s and 1s in the pattern of an attention "
                "mask (every row 1 .. 1 0 .. 0, or every row 0 .. 0 1 .. 1), but the model scores "
                f"{classes} classes per position, so they would be scored as classes 0 and 1. This is what a "
                "DataLoader over TensorDataset(input_ids, attention_mask) yields; for the next-token loss over the "
                "unpadded tokens give {'input_ids': x, 'attention_mask': y} (a Dataset whose items are dicts, or a "
                "collate_fn that builds them). For targets that really are classes 0 and 1, pass a loss function "
                "of your own"
            )
    return None


def _preshifted_labels(pb: ParsedBatch, off_cpu: bool = False) -> str | None:
    """Why a mapping's ``labels`` must not be read as Hugging Face's unshifted labels, or None: they equal the
    ``input_ids`` shifted left by one (``labels[:, t] == input_ids[:, t + 1]``) at every position ``t < pos - 1``
    where they are not -100, and differ from the ``input_ids`` themselves at two or more of those positions. Such
    labels were shifted by the user (each position's label is the next token), and scoring the logits at ``t``
    against ``labels[t + 1]`` would score the token after the next one. Reads values: not for tensors under vmap,
    nor off the CPU unless ``off_cpu`` (a read would wait for the device: the losses, called at every step, leave
    it to :func:`check_batch`, which the estimators call on every batch before they run it)."""
    if pb.kind != "hf" or pb.target is None or pb.inputs.shape[1] < 3:
        return None
    lab, ids = pb.target, pb.inputs
    if functorch_wrapped(lab, ids) or (
        not off_cpu and (lab.device.type != "cpu" or ids.device.type != "cpu")
    ):
        return None
    head = lab[:, :-1]
    given = head != IGNORE_INDEX
    if int((given & (head != ids[:, :-1])).sum()) < 2:
        return None  # unshifted labels (the ids themselves where given), or too few differences to tell
    if not torch.equal(head[given], ids[:, 1:][given].to(head.dtype)):
        return None
    return (
        "batch['labels'] equals input_ids shifted left by one (labels[:, t] == input_ids[:, t + 1] wherever a "
        "label is given): labels shifted by you. As in Hugging Face, labels are unshifted (the loss shifts them: "
        "the logits at t are scored against labels[t + 1]), so these would score each position against the token "
        f"after the next one. Give labels = input_ids ({IGNORE_INDEX} where a token does not count), or the pair "
        "(input_ids[:, :-1], your_labels[:, :-1]), which is read as it is"
    )


def _refuse_preshifted(pb: ParsedBatch) -> None:
    why = _preshifted_labels(pb)
    if why is not None:
        raise ValueError(why)


def _check_classes(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None) -> None:
    """Integer targets ``y`` of class scores ``out``: one per sample (``out (batch, classes)``, ``y (batch,)``) or
    per position (``(batch, pos, classes)`` and ``(batch, pos)``), each a class index or -100. With the inputs
    ``x`` of a pair, per-position targets that :func:`_misread_pair` finds misread are refused too."""
    if out.dim() < 2 and y.dim() >= 1:
        raise ValueError(
            f"the pair's targets y {tuple(y.shape)} are integers ({y.dtype}: class indices) but the model's output "
            f"{tuple(out.shape)} has no class axis (one score per sample); give float targets (y.float()) for a "
            "regression, or a model with one output per class (batch, classes)"
        )
    if out.dim() not in (2, 3):
        return  # other layouts (classes on axis 1 of an image's scores): as torch's cross-entropy reads them
    want = tuple(out.shape[:-1])
    if out.shape[-1] == 1:
        raise ValueError(
            f"the pair's targets y are integers ({y.dtype}: class indices) but the model's output {tuple(out.shape)} "
            "scores one class, and cross-entropy over one class is identically 0; give float targets (y.float()) "
            "for a regression, or a model with one output per class"
        )
    if tuple(y.shape) != want:
        hint = " (squeeze its last dimension)" if tuple(y.shape) == (*want, 1) else ""
        raise ValueError(
            f"the pair's integer targets y have shape {tuple(y.shape)}; class scores of shape {tuple(out.shape)} "
            f"need y of shape {want}{hint}"
        )
    if functorch_wrapped(y, out) or (x is not None and functorch_wrapped(x)):
        return  # under vmap (batched chains): the values cannot be read; the unbatched calls checked them
    n = out.shape[-1]
    counted = y[y != IGNORE_INDEX]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= n):
        bad = int(counted.min()) if int(counted.min()) < 0 else int(counted.max())
        raise ValueError(
            f"the pair's targets y contain class {bad}; the model scores {n} classes (0 .. {n - 1}), and "
            f"{IGNORE_INDEX} marks a target that does not count"
        )
    if x is not None and out.dim() == 3:
        why = _misread_pair(x, y, n)
        if why is not None:
            raise ValueError(why)


def _same_shape(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression output and its targets in one shape: equal, or one with a trailing axis of size 1 the other
    lacks (``(batch, 1)`` against ``(batch,)``); any other pair is refused (it would broadcast to a
    ``(batch, batch)`` error and a wrong loss)."""
    if out.shape == y.shape:
        return out, y
    if out.dim() == y.dim() + 1 and out.shape[-1] == 1 and out.shape[:-1] == y.shape:
        return out.squeeze(-1), y
    if y.dim() == out.dim() + 1 and y.shape[-1] == 1 and y.shape[:-1] == out.shape:
        return out, y.squeeze(-1)
    raise ValueError(
        f"the model's output has shape {tuple(out.shape)} and the batch's float targets y {tuple(y.shape)}: a "
        "regression loss needs one shape (they would broadcast to another); reshape y or the output"
    )


def _own_loss_or_logits(model: nn.Module, batch: Any):
    """The batch parsed and the model run on it: ``(parsed batch, the loss the model returns itself or None, its
    logits or None)``, the reading :func:`batch_loss` and the sampler's default loss share."""
    pb = _on_model(model, parse_batch(batch))
    _refuse_no_sample(pb, batch)
    out = _output(model, pb, for_loss=True)
    own = _output_loss(out)
    return pb, own, None if own is not None else read_logits(out)


def _refuse_no_sample(pb: ParsedBatch, batch: Any, argument: str = "the batch") -> None:
    """Refuse (``ValueError``) a batch of no sample (batch size 0), passed as ``argument`` (or one of
    ``"loader"``'s batches): its loss is undefined."""
    if not (pb.inputs.dim() and pb.inputs.shape[0] == 0):
        return
    who = "loader: one of its batches" if argument == "loader" else argument
    raise ValueError(
        f"{who} has no samples ({_describe(batch)}, batch size 0), so its loss is undefined; give a batch of "
        "at least one sample"
    )


def _refuse_nothing_counted(mask: torch.Tensor, batch: Any) -> None:
    """Refuse a batch whose mean loss would be 0 / 0 (NaN): no counted target in ``mask``. Under vmap (batched
    chains, whose batches were checked before stacking) and off the CPU (reading a value would wait for the device
    on every step; the estimators check every batch before they run it) the values are not read."""
    if functorch_wrapped(mask) or mask.device.type != "cpu" or bool(mask.any()):
        return
    raise ValueError(
        f"the batch {_describe(batch)} has no counted target: every next-token target is padding (attention_mask "
        f"0) or labelled {IGNORE_INDEX}, the sequences have one token, or every y is {IGNORE_INDEX}; its mean loss "
        "is undefined (0 / 0)"
    )


def batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The batch's mean loss: a scalar (replaces the old ``default_loss_fn``).

    Token batches: the mean of the next-token cross-entropies over every counted position of the batch (each
    token weighs the same, as Hugging Face's ``.loss``). Pairs: ``cross_entropy(model(x), y)`` for integer ``y``
    (the sequence axis of 3-D logits handled), else ``mse_loss(model(x), y)``; the pairs the module docstring
    refuses (token ids with their own ids or labels, or with their attention mask, as targets) raise
    ``ValueError``. 16-bit logits or outputs (float16, bfloat16) are widened to float32 first, for pairs as for
    token batches. A model that returns a scalar (or an output with only ``.loss``) has that scalar returned.
    A batch with no counted target (its mean would be 0 / 0) raises ``ValueError`` on the CPU; under vmap (batched
    chains, whose batches are checked before they are stacked) and on other devices (no wait for the device; the
    estimators check every batch before they run it) its values are not read.
    """
    pb, own, logits = _own_loss_or_logits(model, batch)
    if own is not None:
        return own
    if pb.is_lm:
        _refuse_preshifted(pb)
        terms, mask = _lm_token_terms(logits, pb)
        _refuse_nothing_counted(mask, batch)
        return terms.sum() / mask.sum()
    if not pb.target.is_floating_point():
        _check_classes(logits, pb.target, pb.inputs)
        _refuse_nothing_counted(pb.target != IGNORE_INDEX, batch)
        logits = _widened(logits)
        if logits.dim() == 3:
            return F.cross_entropy(logits.transpose(1, 2), pb.target)
        return F.cross_entropy(logits, pb.target)
    return F.mse_loss(*_same_shape(_widened(logits), _widened(pb.target)))


def token_losses(
    model: nn.Module, batch: Any, fill: float = float("nan")
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and the mask of positions that count.

    Returns
    -------
    losses : torch.Tensor
        Token batches: ``(batch, pos - 1)``, the loss of predicting token ``t + 1`` at position ``t``; pairs with a
        sequence axis: ``(batch, pos)``; other pairs: ``(batch,)``. Masked entries (padding, ``-100``) hold
        ``fill`` (NaN by default; pass ``fill=0.0`` for values that are safe to sum).
    mask : torch.Tensor
        Boolean, the shape of ``losses``: True where the entry counts.
    """
    pb = _on_model(model, parse_batch(batch))
    try:
        logits = read_logits(_output(model, pb, for_loss=True))
    except IndexError:
        # an id out of the model's range (a token id or a position id past its learned positions) fails inside an
        # embedding lookup: the batch's checks name what is out of range
        check_batch(model, batch, "batch")
        raise
    if pb.is_lm:
        _refuse_preshifted(pb)
    terms, mask = _lm_token_terms(logits, pb) if pb.is_lm else _pair_terms(logits, pb.target, pb.inputs)
    if fill != 0.0:
        terms = torch.where(mask, terms, torch.full_like(terms, fill))
    return terms, mask


def sample_losses(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-sample losses ``(batch,)``: each sample's mean over its counted tokens (NaN for a sample with none).

    For pairs without a sequence axis this is the per-sample cross-entropy (0 where ``y == -100``) or squared
    error averaged over the non-batch axes.
    """
    terms, mask = token_losses(model, batch, fill=0.0)
    if terms.dim() == 1:
        return terms
    return terms.sum(-1) / mask.sum(-1)


def probe_losses(model: nn.Module, batch: Any, fill: float = 0.0) -> torch.Tensor:
    """The default observable on a probe batch (replaces ``susceptibility.per_sample_losses``).

    Token batches: per-token losses ``(batch, pos - 1)`` with ``fill`` at masked positions (constant across draws,
    so they carry no covariance; take :func:`token_losses`' mask to drop them). Pairs: per-sample losses
    ``(batch,)``, or per position ``(batch, pos)`` when the logits have a sequence axis, exactly as before.
    """
    return token_losses(model, batch, fill=fill)[0]
