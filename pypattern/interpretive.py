"""Interpretive equivalence by the protocol of the authors' released research code (Sun & Toneva), as library calls.

An *interpretation* is an algorithm (a pipeline of routines); an *implementation* of it is any model that carries
it out, here a chain of one trained model per routine (the argmax output of one feeds the next). Two algorithms are
*distinguishable* when a model is reliably closer to another implementation of its own algorithm than to an
implementation of the other.

Pieces
------
* :func:`accumulated_residual`: a model's representation: the accumulated residual stream (the embedding, then
  every layer's output), mean-pooled over positions, layers concatenated; an implementation concatenates its
  stages' representations along the feature axis.
* :func:`similarity`: ``s(x -> y)``: ``"ridge"`` (:func:`~pypattern.ridge.ridge_similarity_cv`: ridge with an
  intercept, penalty by efficient leave-one-out on a random 90% split (holding out at least 6 inputs), held-out
  ``R^2`` averaged over ``y``'s columns, ``sqrt(max(R^2, 0))``), or ``"cka"`` (debiased linear CKA) or
  ``"procrustes"`` (``1 - angle / (pi / 2)`` with the angular Procrustes distance), both computed on the same
  random 90% of the inputs. Larger is closer.
* :func:`win_test`: for an ordered pair ``(A, B)``: ``num_trials`` trials draw ``a != a'`` from ``A``'s
  implementations and ``b`` from ``B``'s; a *win* when ``s(a -> a') > s(a -> b)``. With ``p`` the win fraction the
  pair is distinguishable in that repeat when ``p - z sqrt(p (1 - p) / num_trials) > 0.5`` (one-sided); the test is
  repeated ``num_repeats`` times and reports the fraction of positive repeats.
* :func:`distinguishability_grid`: that fraction for every ordered pair of algorithms (the diagonal draws ``b``
  from ``A`` itself, ``b`` distinct from ``a`` and ``a'``: a control that should stay near 0).
* :func:`selectivity_curve`: patch ``k`` of ``a``'s circuit heads (outputs replaced by their values on other
  inputs, all positions); for implementations ``b`` of the other algorithms, a win when ``s(a -> b) > s(patched a
  -> b)`` (independent splits); ``k = 0`` is the control (about 0.5).

Implementations are given as *implementation sets*: any object with ``len()`` and ``[i] -> Tensor (num_inputs,
features)``, all on the same inputs in the same order (an implementation of other rows is refused, naming it).

Reading the results
-------------------
* A tie (``s(a -> a') == s(a -> b)``, e.g. ``b`` the same representation as ``a'``, or both held-out ``R^2``
  clamped at 0) is not a win.
* The control is ``win_test(A, None)``. Passing the same set twice, ``win_test(A, A)``, lets ``b`` be ``a'`` (a
  tie) or ``a`` itself (nothing is closer to ``a`` than ``a``), neither of which can win, so its expected win
  fraction is below one half.
* CKA and Procrustes do not change when every representation of one algorithm is rotated (an orthogonal change of
  basis, such as a rotation of a model's residual stream): a rotated copy of a model is no more distinguishable from
  it than the model from itself. The ridge similarity (held-out ``R^2`` averaged uniformly over ``y``'s columns, as
  in the authors' code) does change when the target is rotated, so an exact reparameterisation of a model can
  read as distinguishable from it under ``"ridge"``, more often as ``num_trials`` grows
  (``multioutput="variance_weighted"``, the pooled R^2, is invariant to it); permuting heads or neurons leaves the
  residual stream itself unchanged and so every measure.
* With ``p = 1`` the bound ``p - z sqrt(p (1 - p) / num_trials)`` is ``1`` whatever ``num_trials``: a single trial
  that is won counts as a positive repeat. Use the authors' 20 trials (or more) to read the grid.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .equivalence import linear_cka, procrustes
from .losses import (
    _learned_column_positions,
    _refuse_left_padding,
    _takes,
    _takes_mask,
    check_attention_mask,
    position_limit,
)
from .patching.api import check_tokens
from .ridge import (
    DEFAULT_ALPHAS,
    DEFAULT_TRAIN_FRACTION,
    MULTIOUTPUT,
    _check_alphas,
    ridge_similarity_cv,
    train_test_split,
)

__all__ = [
    "ImplementationSet",
    "accumulated_residual",
    "similarity",
    "MEASURES",
    "WinTestResult",
    "win_test",
    "GridResult",
    "distinguishability_grid",
    "SelectivityResult",
    "selectivity_curve",
    "selectivity_curves",
]

MEASURES = ("ridge", "cka", "procrustes")


class ImplementationSet(Protocol):
    """Implementations of one interpretation: ``len()`` of them, ``[i]`` the ``(num_inputs, features)``
    representation of the ``i``-th on the shared inputs."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


def accumulated_residual(
    model,
    tokens,
    *,
    fwd_hooks: Sequence = (),
    positions: slice | int | Sequence[int] | torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accumulated residual stream of a hooked :class:`~pypattern.models.Transformer`, mean-pooled.

    Parameters
    ----------
    model : Transformer, or a model with residual hook points
        pypattern's ``Transformer`` (and every converted model), or any model with hook points
        ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post`` (a :class:`~pypattern.models.HookedModule`). A Hugging
        Face causal LM is read as the patching functions read it: through :func:`~pypattern.models.hooked_hf`'s
        hook points (its own forward; a family with its residual stream alone included), converted with
        :func:`~pypattern.from_hf` where the adapter does not cover the family (OPT, Granite, BLOOM, Falcon); a
        TransformerLens model converted.
    tokens : LongTensor ``(n, pos)``, or a mapping with ``input_ids`` (and ``attention_mask``, ``position_ids``)
        Token ids in ``0 .. d_vocab - 1`` (any integer dtype); others are refused by name.
    fwd_hooks : list of ``(hook name, fn)``
        Hooks active during the run (e.g. patches).
    positions : slice, int, list of ints, boolean mask, or integer tensor ``(n, k)``, optional
        Pool over these positions only (default all; an int such as ``-1`` reads that one position). A ``(n, k)``
        tensor gives each input its own ``k`` positions (e.g. ``attention_mask.sum(1, keepdim=True) - 1``, each
        input's last real token). With an ``attention_mask``, positions index each input's real tokens (its
        unpadded sequence: with right padding these are the columns, with left padding position 0 is the first
        real token), and a negative position (an int, a list entry, a slice bound, a per-input entry) counts from
        each input's last real token, so ``-1`` reads every input's last real token and a padded batch pools what
        each input alone, unpadded, would.
    attention_mask : ``(n, pos)``, optional
        1 for real tokens, 0 for padding (default: a mapping's own, else every token real): the mean is taken
        over the real tokens among ``positions``, padding weighing 0. The model is given the mask when its
        forward takes ``attention_mask`` (pypattern's ``Transformer``: padding keys are masked out of every
        query's attention), so padding may come on either side; a model whose forward takes none takes right
        padding only (it attends causally, so a real token after padding would attend to it).
    position_ids : ``(n, pos)``, optional
        Passed on to the model's forward (default: a mapping's own, else the model's default). A left-padded
        batch for a model with learned absolute positions read from the first column (converted GPT-2) needs
        ``(attention_mask.cumsum(-1) - 1).clamp(min=0)`` for its real tokens to compute what each input alone
        would (without them a warning says so).

    Returns
    -------
    rep : Tensor ``(n, (n_layers + 1) d_model)``, of the model's dtype
        ``blocks.0.hook_resid_pre`` (embedding) and every ``blocks.{l}.hook_resid_post``, each averaged over the
        positions, concatenated in that order.
    logits : Tensor ``(n, pos, d_vocab)``
    """
    from .equivalence import _hooked
    from .patching.api import _vocab

    if isinstance(model, torch.nn.Module):  # a Hugging Face model read as the patching functions read it
        patched = [h[0] for h in fwd_hooks if isinstance(h, Sequence) and h and isinstance(h[0], str)]
        model = _hooked(model, "accumulated_residual", patched)
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None) or getattr(model, "n_layers", None)
    names = (
        ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
        if isinstance(n_layers, int) and n_layers > 0
        else []
    )
    hook_dict = getattr(model, "hook_dict", None)
    if not names or not hasattr(model, "hooks") or not isinstance(hook_dict, Mapping):
        raise TypeError(
            f"model is a {type(model).__name__}; accumulated_residual reads the hook points of pypattern's "
            "Transformer (or a HookedModule's, or a Hugging Face causal LM's through pypattern.hooked_hf): give one "
            "of those, or convert the model with pypattern.from_hf"
        )
    missing = [n for n in names if n not in hook_dict]
    if missing:
        raise ValueError(
            f"model ({type(model).__name__}) has no hook point {missing[0]!r}; accumulated_residual reads "
            "blocks.0.hook_resid_pre and every blocks.{l}.hook_resid_post"
        )
    if isinstance(tokens, Mapping):
        if "input_ids" not in tokens:
            raise TypeError(f"tokens is a mapping without 'input_ids' (keys {sorted(tokens)})")
        if attention_mask is None:
            attention_mask = tokens.get("attention_mask")
        if position_ids is None:
            position_ids = tokens.get("position_ids")
        tokens = tokens["input_ids"]
    if isinstance(tokens, torch.Tensor) and tokens.dim() == 1:  # one prompt, as the model reads it
        tokens = tokens[None]
    # integer ids in the vocabulary: a negative id would be read from the end of the embedding, a uint8 tensor as a mask
    tokens = check_tokens(tokens, "tokens", _vocab(model), n_ctx=position_limit(model))
    T = tokens.shape[-1]
    per_input = isinstance(positions, torch.Tensor | np.ndarray) and np.ndim(positions) == 2
    sl = _per_input_positions(positions, tokens.shape[0], T) if per_input else _position_index(positions, T)
    weight = None
    lengths = torch.full((tokens.shape[0],), T, dtype=torch.long, device=tokens.device)
    forward_kw: dict[str, torch.Tensor] = {}
    columns = None  # with padding before real tokens: each row's columns of its real tokens, in order
    if attention_mask is not None:
        am = torch.as_tensor(attention_mask).to(tokens.device)
        if tuple(am.shape) != tuple(tokens.shape):
            raise ValueError(f"attention_mask has shape {tuple(am.shape)}; tokens have {tuple(tokens.shape)}")
        check_attention_mask(am, "attention_mask")
        am = am != 0
        if _takes_mask(model):
            forward_kw["attention_mask"] = am.long()
        else:
            _refuse_left_padding(model, am, "accumulated_residual")  # the model reads no mask
        lengths = am.sum(1).cpu()  # each input's number of real tokens
        if bool(
            (am[:, 1:] & ~am[:, :-1]).any()
        ):  # padding before real tokens: positions index the real tokens
            columns = torch.sort((~am).to(torch.uint8), dim=1, stable=True).indices.cpu()
            if not per_input:
                whole = slice(None) if positions is None else positions
                if isinstance(whole, slice) or _from_end(whole):
                    sl = _rows_of(whole, sl, lengths, T)
                else:  # non-negative entries (a list, a tensor, a boolean mask): the same for every row
                    sl = sl.reshape(1, -1).expand(len(lengths), -1)
                per_input = True
            if position_ids is None and _learned_column_positions(model):
                warnings.warn(
                    "accumulated_residual: left padding without position_ids: the model reads learned absolute "
                    "positions 0, 1, 2, ... from the first column, so each padded input's real tokens sit at "
                    "positions shifted by its padding and differ from the unpadded input's; give position_ids="
                    "(attention_mask.cumsum(-1) - 1).clamp(min=0) (or a mapping's 'position_ids'), or pad on the right",
                    UserWarning,
                    stacklevel=2,
                )
        elif not per_input and _from_end(positions):  # counted from each input's own last real token
            sl, per_input = _rows_of(positions, sl, lengths, T), True
    if position_ids is not None:
        if not _takes(model, "position_ids"):
            raise TypeError(
                f"position_ids: {type(model).__name__}.forward takes no position_ids; leave them out (the model "
                "reads the columns 0 .. pos - 1)"
            )
        forward_kw["position_ids"] = torch.as_tensor(position_ids).to(tokens.device)
    if per_input:  # (n, k) positions, each row's counted from its own end: gathered, padding weighing 0
        sl = torch.where(sl < 0, sl + lengths[:, None], sl)
        weight = ((sl >= 0) & (sl < lengths[:, None])).to(torch.float32)
        sl = sl.clamp(0, T - 1)
        if columns is not None:  # the r-th real token's column
            sl = columns.gather(1, sl)
    elif attention_mask is not None:
        weight = am[:, sl].to(torch.float32)
    if weight is not None:
        counts = weight.sum(1, keepdim=True)
        if bool((counts == 0).any()):
            row = int((counts[:, 0] == 0).nonzero()[0, 0])
            raise ValueError(f"input {row} has no real token among positions={positions!r}")
    store: dict[str, torch.Tensor] = {}

    def save(x, hook):
        if weight is None:
            store[hook.name] = x[:, sl].mean(1)
            return
        if per_input:  # each row's own positions
            idx = sl.to(x.device)[..., None].expand(-1, -1, x.shape[-1])
            picked = x.gather(1, idx)
        else:
            picked = x[:, sl]
        # the mean over the real tokens, summed in at least float32 (as torch's mean sums a 16-bit tensor): a
        # 16-bit sum over the positions would overflow (float16 ends at 65504) or round at every term, and cast
        # back to the model's dtype once
        acc = torch.promote_types(x.dtype, torch.float32)
        w = weight.to(device=x.device, dtype=acc)  # the mask's device is the tokens' (maybe not x's)
        pooled = (picked.to(acc) * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        store[hook.name] = pooled.to(x.dtype)

    with torch.no_grad(), model.hooks(list(fwd_hooks) + [(n, save) for n in names]):
        logits = model(tokens, **forward_kw)
    return torch.cat([store[n] for n in names], 1), logits


def _from_end(positions) -> bool:
    """Whether ``positions`` (checked by :func:`_position_index`) counts a position from the end: a negative int,
    list entry or slice bound."""
    if positions is None:
        return False
    if isinstance(positions, slice):
        return any(b is not None and int(b) < 0 for b in (positions.start, positions.stop))
    idx = torch.as_tensor(positions)
    return idx.dtype != torch.bool and bool((idx < 0).any())


def _rows_of(positions, idx: torch.Tensor, lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``positions`` resolved for each input of real length ``lengths[i]`` as :func:`_position_index` resolves it
    for an unpadded input of that length: ``(n, k)`` positions, negative ones left for the caller to count from
    each row's end, rows of a slice padded with ``T`` (a padding position, weighing 0)."""
    if not isinstance(
        positions, slice
    ):  # an int or a list: the same entries, with their signs, for every row
        raw = torch.as_tensor([positions] if isinstance(positions, int | np.integer) else positions).long()
        return raw.reshape(1, -1).expand(len(lengths), -1)
    rows = [list(range(int(n)))[positions] for n in lengths.tolist()]
    k = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [T] * (k - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), k)


def _per_input_positions(positions, n: int, T: int) -> torch.Tensor:
    """Per-input ``positions``, an integer ``(n, k)`` tensor or array with entries in ``-T .. T - 1``, as a CPU
    LongTensor; another shape, dtype or range is refused naming the argument."""
    idx = torch.as_tensor(positions).cpu()
    if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"positions of shape {tuple(idx.shape)} must hold integer positions, got {idx.dtype}")
    if idx.shape[0] != n or idx.shape[1] == 0:
        raise ValueError(
            f"positions has shape {tuple(idx.shape)}; per-input positions are (num_inputs, k) = ({n}, k >= 1)"
        )
    if not bool(((idx >= -T) & (idx < T)).all()):
        raise ValueError(f"positions {idx.tolist()} are out of range for prompts of {T} tokens")
    return idx.long()


def _position_index(positions, T: int) -> torch.Tensor | slice:
    """``positions`` as an index of the position axis: every position (None), or the positions (a LongTensor)
    that an int, a slice, a sequence of ints or a boolean mask of length ``T`` selects; none selected, an
    out-of-range position or another type is refused naming the argument."""
    if positions is None:
        return slice(None)
    if isinstance(positions, bool | np.bool_) or (
        isinstance(positions, torch.Tensor) and positions.dim() == 0
    ):
        raise TypeError(
            f"positions={positions!r} is not valid; give an int, a slice, a sequence of ints or a boolean mask "
            f"of length {T}"
        )
    if isinstance(positions, int | np.integer):
        positions = int(positions)  # a numpy integer too
        if not -T <= positions < T:
            raise ValueError(f"positions={positions} is out of range for prompts of {T} tokens")
        idx = torch.tensor([positions % T], device="cpu")  # a CPU index serves tensors on any device
    elif isinstance(positions, slice):
        idx = torch.arange(T, device="cpu")[positions]
    else:
        try:
            idx = torch.as_tensor(positions)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"positions={positions!r} is not valid; give an int, a slice, a sequence of ints or a boolean "
                f"mask of length {T}"
            ) from None
        if idx.numel() == 0:
            raise ValueError(f"positions={positions!r} selects no position of prompts of {T} tokens")
        if idx.dim() != 1 or not (idx.dtype == torch.bool or not idx.dtype.is_floating_point):
            raise TypeError(
                f"positions must be a 1-d sequence of ints or a boolean mask of length {T}, got "
                f"{idx.dtype} of shape {tuple(idx.shape)}"
            )
        if idx.dtype == torch.bool:
            if idx.numel() != T:
                raise ValueError(
                    f"positions is a boolean mask of length {idx.numel()}; the prompts have {T} tokens"
                )
            idx = idx.nonzero().flatten()
        elif not bool(((idx >= -T) & (idx < T)).all()):
            raise ValueError(f"positions {idx.tolist()} are out of range for prompts of {T} tokens")
        idx = idx.long() % T
    if idx.numel() == 0:
        raise ValueError(f"positions={positions!r} selects no position of prompts of {T} tokens")
    return idx


def similarity(
    measure: str,
    x: torch.Tensor,
    ys: Sequence[torch.Tensor],
    *,
    seed: int,
    train_fraction: float | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    multioutput: str = "uniform_average",
) -> list[float]:
    """``s(x -> y)`` for each ``y`` in ``ys`` with one random split drawn from ``seed`` (see the module
    docstring); larger is closer. A similarity that is not finite (a constant representation) raises
    ``ValueError``: a test would count it as a loss.

    ``train_fraction``: the fraction of the inputs the ridge fit is made on (the rest score it), or that CKA and
    Procrustes are computed on; ``None`` (default) is 90%, for ridge holding out at least 6 inputs (see
    :func:`~pypattern.ridge.ridge_similarity_cv`).

    ``multioutput`` (ridge only): ``"uniform_average"`` (the authors' mean of the columns' held-out R^2) or
    ``"variance_weighted"`` (the pooled R^2, invariant to a rotation of the target; see
    :func:`~pypattern.ridge.ridge_similarity_cv`). ``alphas`` and ``multioutput`` are read by ``"ridge"`` only, and
    checked for every measure (an invalid value is refused, not ignored)."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    # the ridge options are checked whatever the measure (a win test or a grid passes them to every measure)
    if not isinstance(multioutput, str) or multioutput not in MULTIOUTPUT:
        raise ValueError(f"multioutput={multioutput!r} is not valid; choose one of {MULTIOUTPUT}")
    _check_alphas(alphas)
    if not isinstance(x, torch.Tensor | np.ndarray):
        raise TypeError(f"x must be a torch.Tensor or numpy array (num_samples, ...), got {type(x).__name__}")
    if measure != "ridge" and x.ndim < 2:  # named with its own shape, not that of its rows in the split
        raise ValueError(f"x must have shape (num_samples, features...), got shape {tuple(x.shape)}")
    if isinstance(ys, torch.Tensor | np.ndarray) or not isinstance(ys, Sequence):
        raise TypeError(
            f"ys must be a list of representations (a list of one for one), got {type(ys).__name__}"
        )
    for i, y in enumerate(ys):
        if not isinstance(y, torch.Tensor | np.ndarray):
            raise TypeError(f"ys[{i}] must be a torch.Tensor or numpy array, got {type(y).__name__}")
        if measure != "ridge" and y.ndim < 2:
            raise ValueError(
                f"ys[{i}] must have shape (num_samples, features...), got shape {tuple(y.shape)}"
            )
    out = _similarity(
        measure, x, ys, seed=seed, train_fraction=train_fraction, alphas=alphas, multioutput=multioutput
    )
    bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"the {measure} similarity of x to ys[{bad[0]}] is {out[bad[0]]} (a representation constant over the "
            "samples?"
            + (
                " Or, for debiased CKA, one whose samples are mutually orthogonal, such as one-hot codes: its "
                "U-centred Gram is zero"
                if measure == "cka"
                else ""
            )
            + "): a test would count it as a loss; give representations that vary"
        )
    return out


def _similarity(
    measure, x, ys, *, seed, train_fraction, alphas, multioutput="uniform_average"
) -> list[float]:
    if measure == "ridge":
        return list(
            ridge_similarity_cv(
                x, list(ys), alphas=alphas, train_fraction=train_fraction, seed=seed, multioutput=multioutput
            )
        )
    for i, y in enumerate(ys):
        if getattr(y, "shape", (None,))[0] != x.shape[0]:
            raise ValueError(
                f"ys[{i}] has {getattr(y, 'shape', (None,))[0]} samples (rows) but x has {x.shape[0]}: the "
                "representations must hold the same samples in the same order"
            )
    frac = DEFAULT_TRAIN_FRACTION if train_fraction is None else train_fraction
    tr, _ = train_test_split(x.shape[0], frac, seed)
    xs = x[tr]
    if measure == "cka":
        return [linear_cka(xs, y[tr]) for y in ys]
    return [1.0 - procrustes(xs, y[tr], angular=True) / (math.pi / 2) for y in ys]


def _draw_seed(seed) -> int:
    """``seed`` of the protocol's draws (a NumPy generator's), checked: an int >= 0 (a NumPy integer too); None (an
    unkeyed, irreproducible run), a bool, a float or a negative int is refused naming ``seed``."""
    give = "give an int >= 0 (it keys every draw of the test, so that a run can be repeated)"
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed={seed!r} is not valid; {give}")
    if seed < 0:
        raise ValueError(f"seed={seed!r} is not valid; {give}")
    return int(seed)


def _same_inputs(reps: Sequence[tuple[str, object]]) -> None:
    """The representations ``reps`` (``(name, value)``, the first the reference) hold the same inputs: each an
    array of at least one row, all with the first one's number of rows; else refused naming the implementation."""
    ref_name = reps[0][0]
    n = None
    for name, rep in reps:
        if not isinstance(rep, torch.Tensor | np.ndarray) or rep.ndim < 1:
            raise TypeError(
                f"{name} is {type(rep).__name__}{'' if not hasattr(rep, 'shape') else f' of shape {tuple(rep.shape)}'}"
                "; an implementation's representation is a tensor (num_inputs, features)"
            )
        if rep.shape[0] == 0:
            raise ValueError(f"{name} has 0 inputs (rows); give representations of the shared inputs")
        if n is None:
            n = rep.shape[0]
        elif rep.shape[0] != n:
            raise ValueError(
                f"{name} has {rep.shape[0]} inputs (rows) but {ref_name} has {n}: every implementation must "
                "hold the same inputs in the same order"
            )


def _distinct(rng: np.random.Generator, n: int, k: int, name: str) -> list[int]:
    if n < k:
        raise ValueError(f"{name} has {n} implementations; this test draws {k} distinct ones")
    return [int(i) for i in rng.choice(n, size=k, replace=False)]


@dataclass
class WinTestResult:
    """Result of :func:`win_test`.

    ``own``, ``other``: ``(num_repeats, num_trials)`` similarities ``s(a -> a')`` and ``s(a -> b)``; ``p``:
    ``(num_repeats,)`` win fractions; ``positive``: ``(num_repeats,)`` whether ``p - z se > 0.5``;
    ``fraction_positive``: the mean of ``positive`` (the grid entry).
    """

    own: np.ndarray
    other: np.ndarray
    p: np.ndarray
    positive: np.ndarray
    z: float

    @property
    def fraction_positive(self) -> float:
        return float(self.positive.mean())

    @property
    def win_rate(self) -> float:
        return float(self.p.mean())


def _criterion(p: np.ndarray, num_trials: int, z: float) -> np.ndarray:
    return p - z * np.sqrt(p * (1 - p) / num_trials) > 0.5


def win_test(
    impl_a: ImplementationSet,
    impl_b: ImplementationSet | None = None,
    *,
    measure: str = "ridge",
    num_trials: int = 20,
    num_repeats: int = 40,
    z: float = 1.96,
    seed: int = 0,
    **similarity_kw,
) -> WinTestResult:
    """Is ``A`` distinguishable from ``B``? ``impl_b=None`` tests ``A`` against itself (the control: ``b`` is a
    third implementation of ``A``). See the module docstring."""
    for arg, val in (("num_trials", num_trials), ("num_repeats", num_repeats)):
        if isinstance(val, bool) or not isinstance(val, int | np.integer):
            raise TypeError(f"{arg}={val!r} is not valid; give a positive int")
    if num_trials < 1 or num_repeats < 1:
        raise ValueError(f"num_trials and num_repeats must be >= 1, got {num_trials}, {num_repeats}")
    if isinstance(z, bool) or not isinstance(z, int | float | np.number) or not (math.isfinite(z) and z >= 0):
        raise ValueError(f"z={z!r} is not valid; give a finite number >= 0 (1.96: a one-sided 97.5% bound)")
    if measure not in MEASURES:  # before any draw
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    if impl_b is not None and len(impl_b) == 0:
        raise ValueError("impl_b holds no implementation; give at least one")
    rng = np.random.default_rng(_draw_seed(seed))
    own = np.empty((num_repeats, num_trials))
    other = np.empty((num_repeats, num_trials))
    for r in range(num_repeats):
        for t in range(num_trials):
            if impl_b is None:
                ia, ia2, ib = _distinct(rng, len(impl_a), 3, "impl_a")
                b, b_name = impl_a[ib], f"impl_a[{ib}]"
            else:
                ia, ia2 = _distinct(rng, len(impl_a), 2, "impl_a")
                ib = int(rng.integers(len(impl_b)))
                b, b_name = impl_b[ib], f"impl_b[{ib}]"
            split = int(rng.integers(2**31))
            a, a2 = impl_a[ia], impl_a[ia2]
            _same_inputs([(f"impl_a[{ia}]", a), (f"impl_a[{ia2}]", a2), (b_name, b)])
            own[r, t], other[r, t] = similarity(measure, a, [a2, b], seed=split, **similarity_kw)
    if bool((own == other).all()):
        warnings.warn(
            f"win_test: all {own.size} comparisons tied (every similarity equal, e.g. held-out R^2 <= 0 "
            "everywhere): a tie counts as a loss, so the test reports 'not distinguishable' without information; "
            "give more inputs than features, or another measure",
            stacklevel=2,
        )
    p = (own > other).mean(1)
    return WinTestResult(own=own, other=other, p=p, positive=_criterion(p, num_trials, z), z=z)


@dataclass
class GridResult:
    """Result of :func:`distinguishability_grid`: ``fraction[i, j]`` the fraction of positive repeats for the
    ordered pair (``names[i]``, ``names[j]``), ``win_rate[i, j]`` the mean win fraction."""

    names: list[str]
    fraction: np.ndarray
    win_rate: np.ndarray
    tests: dict = field(default_factory=dict)

    def off_diagonal(self) -> np.ndarray:
        return self.fraction[~np.eye(len(self.names), dtype=bool)]


def distinguishability_grid(
    impls: dict[str, ImplementationSet],
    *,
    measure: str = "ridge",
    num_trials: int = 20,
    num_repeats: int = 40,
    z: float = 1.96,
    seed: int = 0,
    **similarity_kw,
) -> GridResult:
    """:func:`win_test` for every ordered pair of ``impls`` (the diagonal is the same-algorithm control)."""
    if not isinstance(impls, Mapping):
        raise TypeError(
            f"impls is a {type(impls).__name__}; give a mapping {{algorithm name: implementation set}}"
        )
    if not impls:
        raise ValueError("impls is empty: give at least one {algorithm name: implementation set} entry")
    if measure not in MEASURES:  # before any draw, named as the grid's own argument
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    seed = _draw_seed(seed)
    names = list(impls)
    k = len(names)
    frac = np.zeros((k, k))
    rate = np.zeros((k, k))
    tests = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            try:
                res = win_test(
                    impls[a],
                    None if i == j else impls[b],
                    measure=measure,
                    num_trials=num_trials,
                    num_repeats=num_repeats,
                    z=z,
                    seed=seed * 1_000_003 + i * k + j,
                    **similarity_kw,
                )
            except ValueError as e:  # win_test's impl_a / impl_b named as the algorithms of this grid
                msg = str(e).replace("impl_a", f"impls[{a!r}]").replace("impl_b", f"impls[{b!r}]")
                raise ValueError(f"{msg} (the grid's ({a!r}, {b!r}) entry)") from None
            frac[i, j], rate[i, j] = res.fraction_positive, res.win_rate
            tests[(a, b)] = res
    return GridResult(names=names, fraction=frac, win_rate=rate, tests=tests)


@dataclass
class SelectivityResult:
    """Result of :func:`selectivity_curve`: ``win_rate[k]`` the fraction of comparisons where ``s(a -> b) >
    s(patched a -> b)`` at budget ``k`` (``num_wins[k]`` of ``num_comparisons[k]``)."""

    budgets: list[int]
    win_rate: dict
    num_wins: dict
    num_comparisons: dict


def _check_patched(patched, clean, i: int, k: int) -> None:
    """``patched_a(i, k)``'s representation must be a tensor (or array) of the inputs of ``impl_a[i]``: the same
    number of rows, else refused naming the call."""
    n = getattr(clean, "shape", (None,))[0]
    if not hasattr(patched, "shape") or not len(patched.shape):
        raise TypeError(
            f"patched_a({i}, {k}) returned {type(patched).__name__}; give a tensor (num_inputs, ...) of the same "
            "inputs as impl_a"
        )
    if patched.shape[0] != n:
        raise ValueError(
            f"patched_a({i}, {k}) has {patched.shape[0]} rows but impl_a[{i}] has {n}: the patched representation "
            "must be of the same inputs"
        )


def _name_of(fn) -> str:
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    return "a lambda" if qual.endswith("<lambda>") else qual


def _check_control(patched_a, patched, clean, i: int) -> None:
    """A budget of 0 patches no head: ``patched_a(i, 0)`` must be ``impl_a[i]`` (the curve's control compares
    ``a`` with itself), the same shape and the same values up to the rounding of the coarser of their float types
    (a representation recomputed in float32 passes); else refused naming ``patched_a`` and ``i``."""
    p = torch.as_tensor(patched).detach().cpu()
    c = torch.as_tensor(clean).detach().cpu()
    where = f"patched_a({i}, 0) (patched_a is {_name_of(patched_a)})"
    if tuple(p.shape) != tuple(c.shape):
        raise ValueError(
            f"{where} has shape {tuple(p.shape)} but impl_a[{i}] has {tuple(c.shape)}: a budget of 0 patches no "
            f"head, so patched_a(i, 0) must return impl_a[i] itself (the curve's k = 0 control)"
        )
    if not p.numel():
        return
    eps = max(
        torch.finfo(t.dtype).eps if t.dtype.is_floating_point else torch.finfo(torch.float64).eps
        for t in (p, c)
    )
    p64, c64 = p.double(), c.double()
    scale = float(c64[torch.isfinite(c64)].abs().max()) if bool(torch.isfinite(c64).any()) else 0.0
    tol = 64 * eps * scale
    same_nan = torch.isnan(p64) == torch.isnan(c64)
    diff = torch.where(torch.isnan(p64) | torch.isnan(c64), torch.zeros_like(p64), (p64 - c64).abs())
    both_inf = torch.isinf(p64) & torch.isinf(c64) & (p64 == c64)
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    worst = float(diff.max()) if diff.numel() else 0.0
    if not bool(same_nan.all()) or not worst <= tol:
        what = "NaN at other entries" if not bool(same_nan.all()) else f"values differ by up to {worst:.3g}"
        raise ValueError(
            f"{where} is not impl_a[{i}] ({what}; allowed: {tol:.3g}, rounding): a budget of 0 patches no head, "
            "so patched_a(i, 0) must return impl_a[i] itself (the curve's k = 0 control, win rate about 0.5, "
            "compares a with a); check that patched_a indexes implementations as impl_a does"
        )


def selectivity_curve(
    impl_a: ImplementationSet,
    patched_a: Callable[[int, int], torch.Tensor],
    others: Sequence[ImplementationSet],
    budgets: Sequence[int],
    *,
    measure: str = "ridge",
    num_trials: int = 20,
    seed: int = 0,
    **similarity_kw,
) -> SelectivityResult:
    """Intervention selectivity against the patching budget ``k`` (see the module docstring).

    ``patched_a(i, k)`` is the representation of implementation ``i`` of ``A`` with its ``k`` most important
    heads patched. ``patched_a(i, 0)`` must equal ``impl_a[i]`` (up to the rounding of the coarser float type):
    ``k = 0`` is the control, ``a`` compared with itself; where budgets hold 0 it is checked at every trial, and a
    different representation (e.g. ``patched_a`` indexing implementations otherwise than ``impl_a``) is refused
    naming ``patched_a`` and ``i``. For each ``k``, ``num_trials`` trials per other
    algorithm, each drawing ``a`` and ``b``; ``s(a -> b)`` and ``s(patched a -> b)`` use independent splits.
    """
    return selectivity_curves(
        impl_a,
        patched_a,
        others,
        budgets,
        measures=(measure,),
        num_trials=num_trials,
        seed=seed,
        **similarity_kw,
    )[measure]


def selectivity_curves(
    impl_a: ImplementationSet,
    patched_a: Callable[[int, int], torch.Tensor],
    others: Sequence[ImplementationSet],
    budgets: Sequence[int],
    *,
    measures: Sequence[str] = MEASURES,
    num_trials: int = 20,
    seed: int = 0,
    **similarity_kw,
) -> dict[str, SelectivityResult]:
    """:func:`selectivity_curve` for several measures at once: ``{measure: SelectivityResult}``.

    The draws (``a``, ``b`` and the two splits of each trial) come from ``seed`` alone, so every measure sees the
    same trials, and each measure's result equals its own :func:`selectivity_curve` call with that ``seed``; each
    patched representation is computed once for all measures. ``similarity_kw`` goes to :func:`similarity`.
    """
    measures = list(measures)
    for m in measures:
        if m not in MEASURES:
            raise ValueError(f"measures must be a subset of {MEASURES}, got {m!r}")
    budgets = list(budgets)
    bad = [k for k in budgets if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0]
    if not budgets or bad:
        raise ValueError(f"budgets={budgets!r} is not valid; give ints >= 0 (0: the unpatched control)")
    if isinstance(num_trials, bool) or not isinstance(num_trials, int | np.integer) or num_trials < 1:
        raise ValueError(f"num_trials={num_trials!r} is not valid; give an int >= 1")
    seed = _draw_seed(seed)
    others = list(others)
    if not others:
        raise ValueError(
            "others is empty: give at least one other algorithm's implementations to compare with"
        )
    if any(len(o) == 0 for o in others) or len(impl_a) == 0:
        raise ValueError("impl_a and every entry of others must hold at least one implementation")
    rng = np.random.default_rng(seed)
    wins = {m: {} for m in measures}
    counts: dict = {}
    ties = dict.fromkeys(measures, 0)
    for k in budgets:
        w = dict.fromkeys(measures, 0)
        c = 0
        for oi, other in enumerate(others):
            for _ in range(num_trials):
                ia = int(rng.integers(len(impl_a)))
                ib = int(rng.integers(len(other)))
                b = other[ib]
                s1, s2 = (int(v) for v in rng.integers(2**31, size=2))
                clean_rep, patched_rep = impl_a[ia], patched_a(ia, k)
                _same_inputs([(f"impl_a[{ia}]", clean_rep), (f"others[{oi}][{ib}]", b)])
                _check_patched(patched_rep, clean_rep, ia, k)
                if k == 0:
                    _check_control(patched_a, patched_rep, clean_rep, ia)
                for m in measures:
                    clean = similarity(m, clean_rep, [b], seed=s1, **similarity_kw)[0]
                    patched = similarity(m, patched_rep, [b], seed=s2, **similarity_kw)[0]
                    w[m] += int(clean > patched)
                    ties[m] += int(clean == patched)
                c += 1
        counts[k] = c
        for m in measures:
            wins[m][k] = w[m]
    total = sum(counts.values())
    for m in measures:
        if total and ties[m] == total:
            warnings.warn(
                f"selectivity_curves: all {total} comparisons of measure {m!r} tied (every similarity equal, e.g. "
                "held-out R^2 <= 0 everywhere): a tie counts as a loss, so its win rates are 0 without information; "
                "give more inputs than features, or another measure",
                stacklevel=2,
            )
    return {
        m: SelectivityResult(
            budgets=list(budgets),
            win_rate={k: wins[m][k] / counts[k] for k in budgets},
            num_wins=dict(wins[m]),
            num_comparisons=dict(counts),
        )
        for m in measures
    }
