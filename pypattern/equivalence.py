"""Representation similarity: linear CKA (biased and debiased, full-batch and minibatch), Procrustes shape
distances, every layer pair of two models at once, and permutation tests; and, on top of them, interpretive
equivalence (do two models share an interpretation?) with implementations sampled by resample ablation.

Conventions
-----------
A representation is a tensor ``(num_samples, ...)``: row ``i`` is what a model computed on input ``i`` (all trailing
dimensions are flattened into features). Two representations compared with each other must come from the *same*
inputs in the same order. Everything is computed in float64 (inputs of other dtypes are cast), on the inputs'
device (on the CPU for inputs on Apple's MPS, which has no float64).

Measures
--------
* Linear CKA: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = X X^T``, ``L = Y Y^T``. The *biased* HSIC
  (``tr(K H L H)``, Kornblith et al. 2019) tends to 1 for unrelated data when samples are few against features;
  the default is the *debiased* HSIC (Song et al. 2012), an unbiased U-statistic: ``<U(K), U(L)> / (n (n - 3))``
  with ``U`` the U-centring of a Gram matrix (zero diagonal; row, column and grand means removed with
  ``1 / (n - 2)`` and ``1 / ((n - 1)(n - 2))``). Debiased CKA can be slightly negative.
* Minibatch CKA (Nguyen et al. 2021): the debiased HSIC terms averaged over batches, then the ratio
  (:class:`MinibatchCKA`); memory is one batch, not the data set.
* Procrustes: on centred, unit-Frobenius ``X``, ``Y``, ``min_Q ||X - Y Q||_F^2 = 2 - 2 ||X^T Y||_*`` over
  orthogonal ``Q`` (zero-padding the narrower one); ``procrustes(..., angular=True)`` gives the angular shape
  metric ``arccos(||X^T Y||_*)`` (Williams et al. 2021), a metric on shapes.

Speed
-----
:func:`cka_matrix` compares every representation of one list with every one of another. Per pair, the feature
form costs ``n d_a d_b`` multiply-adds (``||X^T Y||_F^2``); the Gram form costs ``n^2 d`` per representation to
build and U-centre its Gram once, then *all* pairs are one matrix product of the flattened U-centred Grams,
``(A, n^2) x (n^2, B)``. ``method="auto"`` picks the cheaper one by those counts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_flag as _check_flag
from ._checks import model_device, refuse_meta
from ._training import eval_mode_if_random
from .io import Saveable, register
from .losses import position_limit
from .patching.api import _vocab, check_tokens
from .patching.sites import HEAD_SITES, apply_patch
from .ridge import _fit_size, as_float64

__all__ = [
    "linear_cka",
    "rbf_cka",
    "hsic",
    "u_center",
    "cka_matrix",
    "MinibatchCKA",
    "procrustes",
    "SimilarityTest",
    "permutation_test",
    "ridge_similarity",
    "EquivalenceResult",
    "interpretive_equivalence",
    "representations",
    "resample_implementations",
]


# ------------------------------------------------------------------------------------------------ input checks


def _as_features(x, name: str, min_samples: int = 1) -> torch.Tensor:
    """``(n, ...)`` -> ``(n, d)`` float64, with clear errors for the inputs no measure can use. The measures are
    statistics of the values: a tensor that tracks gradients is read detached."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))  # numpy views with negative strides too
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (num_samples, ...), got {type(x)}"
        )
    refuse_meta(x, name)
    x = x.detach()
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (num_samples, features...), got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has 0 samples (shape {tuple(x.shape)}); give at least one row per input")
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}); give at least one per sample")
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] < min_samples:
        raise ValueError(f"{name} has {x.shape[0]} samples; this measure needs at least {min_samples}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    x = as_float64(x)  # on the CPU from a device without float64
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} non-finite values (NaN or inf)")
    return x


def _unit_features(x, name: str, min_samples: int, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """``x`` checked as by :func:`_as_features`, divided by its largest magnitude and cast to ``dtype``; and that
    magnitude (0 for an all-zero ``x``, which is returned as it is). CKA does not change with the scale of either
    representation. The division happens in float64, before a narrower ``dtype`` is reached, so that data of any
    float64 scale (1e-60 or 1e60) keeps that dtype's relative precision instead of underflowing or overflowing in
    the cast, and the fourth powers the HSIC sums hold stay in range. For a narrower ``dtype`` the columns are
    centred first (in float64, whatever the input's dtype), as a common offset would otherwise take the narrower
    type's precision."""
    wide = _as_features(x, name, min_samples)
    # whether ``wide`` is a copy already (a cast, a gather of a strided input) that may be divided in place
    owned = not _shares_storage(wide, x)
    if dtype != torch.float64:
        wide, owned = _center_columns(wide), True
    size = max(float(wide.max()), -float(wide.min()))  # the largest magnitude, without a copy of |wide|
    if size > 0:
        wide = wide.div_(size) if owned else wide / size
    elif not owned:  # all zero: a copy all the same, which the measures may centre in place
        wide = wide.clone()
    return wide.to(dtype), size


def _shares_storage(t: torch.Tensor, x) -> bool:
    """Whether ``t`` may be the memory of the input ``x`` (a tensor or a numpy array)."""
    ptr = t.untyped_storage().data_ptr()
    if isinstance(x, np.ndarray):
        bounds = getattr(np, "byte_bounds", None) or np.lib.array_utils.byte_bounds
        lo, hi = bounds(x)
        return lo <= ptr < max(hi, lo + 1)
    return not isinstance(x, torch.Tensor) or ptr == x.untyped_storage().data_ptr()


def _check_dtype(dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def _check_pair(x: torch.Tensor, y: torch.Tensor, xname: str = "x", yname: str = "y") -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{xname} and {yname} must hold the same samples in the same order: {xname} has {x.shape[0]} rows, "
            f"{yname} has {y.shape[0]}"
        )
    if x.device != y.device:
        raise ValueError(f"{xname} is on {x.device} but {yname} is on {y.device}")


def _check_method(method: str) -> None:
    if method not in ("auto", "gram", "features"):
        raise ValueError(f"method must be 'auto', 'gram' or 'features', got {method!r}")


def _check_seed(seed, name: str = "seed", allow_none: bool = False) -> int | None:
    """``seed`` as an int (a numpy integer too; None where ``allow_none``); anything else is refused naming
    ``name``."""
    if seed is None and allow_none:
        return None
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, int | np.integer):
        raise TypeError(f"{name}={seed!r} is not valid; give an int" + (" (or None)" if allow_none else ""))
    return int(seed)


def _generator_seed(seed, name: str = "seed", allow_none: bool = False) -> int | None:
    """``seed`` checked as by :func:`_check_seed` and in the range a ``torch.Generator`` takes, ``[-2**63,
    2**64)``; one outside it is refused naming ``name``."""
    seed = _check_seed(seed, name, allow_none)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ValueError(
            f"{name}={seed} is not valid; give an int in [-2**63, 2**64) (it seeds a torch.Generator)"
        )
    return seed


def _min_samples(debiased: bool) -> int:
    return 4 if debiased else 2


# ------------------------------------------------------------------------------------------------ HSIC


def u_center(k: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """U-centring of a symmetric Gram matrix ``(n, n)``, ``n >= 4``: zero diagonal, and off the diagonal
    ``K_ij - r_i / (n - 2) - r_j / (n - 2) + s / ((n - 1)(n - 2))`` with ``r`` the row sums and ``s`` the total of
    ``K`` with its diagonal zeroed. ``<u_center(K), u_center(L)> / (n (n - 3))`` is the unbiased HSIC.
    ``inplace=True`` overwrites ``k`` (a floating tensor)."""
    _check_flag(inplace, "inplace")
    if inplace and not (isinstance(k, torch.Tensor) and k.is_floating_point()):
        raise TypeError(
            f"u_center(inplace=True) overwrites k: give a floating torch.Tensor, got {type(k).__name__}"
            + (f" of dtype {k.dtype}" if isinstance(k, torch.Tensor) else "")
        )
    k = _gram(k, "k", keep=inplace)
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"U-centring needs n >= 4 samples, got {n}")
    if not inplace:
        k = k.clone()
    k.diagonal().zero_()
    r = k.sum(1) / (n - 2)
    # half of s / ((n - 1)(n - 2)): it comes back once through the row and once through the column term
    r -= r.sum() / (2 * (n - 1))
    k -= r[:, None]
    k -= r[None, :]
    k.diagonal().zero_()
    return k


def _gram(g, name: str, keep: bool = False) -> torch.Tensor:
    """A Gram matrix argument checked: a square, real, finite, symmetric (to 1e-6 of its largest entry) tensor or
    array, read detached; in float64 unless ``keep`` (u_center's in-place form keeps the caller's tensor)."""
    if isinstance(g, np.ndarray):
        g = torch.from_numpy(np.ascontiguousarray(g))
    if not isinstance(g, torch.Tensor):
        raise TypeError(
            f"{name} must be an (n, n) Gram matrix (a torch.Tensor or numpy array), got {type(g).__name__}"
        )
    if g.device.type == "meta":
        raise ValueError(
            f"{name} is a meta tensor (a shape without values); give a tensor that holds its values"
        )
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) Gram matrix, got shape {tuple(g.shape)}")
    if g.is_complex() or g.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {g.dtype}; a Gram matrix is real")
    if not keep:
        g = as_float64(g.detach())
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} holds {int((~torch.isfinite(g)).sum())} NaN or Inf entries")
    size = float(g.abs().max()) if g.numel() else 0.0
    if g.numel() and float((g - g.T).abs().max()) > 1e-6 * size:
        raise ValueError(
            f"{name} is not symmetric (largest |K - K^T| {float((g - g.T).abs().max()):.3g} against entries up to "
            f"{size:.3g}); a Gram matrix of a kernel is"
        )
    return g


def _center_columns(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


def hsic(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = True) -> torch.Tensor:  # noqa: E741
    """HSIC of two Gram matrices ``(n, n)`` of the same samples (any kernels).

    ``debiased=True``: the unbiased estimator (Song et al. 2012), needs ``n >= 4``; ``False``:
    ``tr(K H L H) / (n - 1)^2``. Computed on each Gram scaled to a largest magnitude of 1 and scaled back (Grams
    of any float64 scale); a value beyond float64's range is refused naming ``k`` and ``l``.
    """
    _check_flag(debiased, "debiased")
    k, l = _gram(k, "k"), _gram(l, "l")  # noqa: E741
    if k.shape != l.shape:
        raise ValueError(
            f"k and l must be Gram matrices of the same samples: shapes {tuple(k.shape)} and {tuple(l.shape)}"
        )
    k, l = as_float64(k), as_float64(l)  # noqa: E741
    n = k.shape[0]
    if not debiased and n < 2:
        raise ValueError(f"HSIC needs n >= 2 samples, got {n}")
    # HSIC is bilinear: computed on K / max|K| and L / max|L| (the sums of products neither overflow nor
    # underflow) and scaled back once
    sk, sl = _max_magnitude(k), _max_magnitude(l)
    k, l = k / sk, l / sl  # noqa: E741
    if debiased:
        out = (u_center(k, inplace=True) * u_center(l, inplace=True)).sum() / (n * (n - 3))
    else:
        kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
        out = (kc * l).sum() / (n - 1) ** 2
    out = out * sk * sl
    if not bool(torch.isfinite(out)):
        raise ValueError(
            f"the HSIC of k (entries up to {sk:.3g}) and l (entries up to {sl:.3g}) is beyond float64's range; "
            "rescale k or l (CKA, their normalised ratio, does not change with the scale of either)"
        )
    return out


def _is_constant(x: torch.Tensor) -> bool:
    """Whether every sample of ``x (n, d)`` is the same: then CKA is undefined (NaN). Checked exactly, because the
    centred copy of a constant representation is not exactly 0 in floating point (the mean is rounded), and its
    self-HSIC would come out as a tiny positive number instead of 0."""
    return bool((x == x[:1]).all())


def _zero_constant(self_hsic: torch.Tensor, reps: Sequence) -> torch.Tensor:
    """``self_hsic`` ``(len(reps),)`` with the entries of constant representations set to exactly 0 (``reps``:
    the representations, or whether each is constant, :func:`_is_constant`)."""
    flags = [x if isinstance(x, bool) else _is_constant(x) for x in reps]
    const = torch.tensor(flags, device=self_hsic.device)
    return torch.where(const, torch.zeros_like(self_hsic), self_hsic) if bool(const.any()) else self_hsic


def _cka_from_hsic(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    ok = (xx > 0) & (yy > 0)  # each self-HSIC positive (two negative ones make a positive product)
    # sqrt(xx yy) where the product is a normal float64 (so that identical representations give exactly 1), else
    # sqrt(xx) sqrt(yy): the product of two small (or large) self-HSIC leaves float64's range
    prod = (xx * yy).abs()
    fin = torch.finfo(prod.dtype)
    inside = (prod >= fin.tiny) & (prod <= fin.max)
    den = torch.where(inside, prod.sqrt(), xx.abs().sqrt() * yy.abs().sqrt())
    if bool(ok.all()):
        return xy / den
    # a constant representation (or, debiased, a self-HSIC estimated at <= 0 from too few samples): undefined
    return torch.where(ok, xy / den, torch.full_like(xy, math.nan))


def _max_magnitude(x: torch.Tensor) -> float:
    """The largest magnitude of ``x`` (1 when it is 0 or not finite): a scale to divide by."""
    m = float(x.abs().max()) if x.numel() else 0.0
    return m if m > 0 and math.isfinite(m) else 1.0


def _unit_scale(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its largest magnitude: CKA does not change, and the fourth powers its sums hold stay in
    range (inputs of scale 1e-20 or 1e20 in float32)."""
    m = _max_magnitude(x)
    return x if m == 1.0 else x / m


def linear_cka(x, y, *, debiased: bool = True, dtype: torch.dtype = torch.float64) -> float:
    """Linear CKA of two representations of the same ``n`` inputs: ``x (n, ...)``, ``y (n, ...)``.

    ``debiased=True`` (default) uses the unbiased HSIC and needs ``n >= 4``. Returns NaN if either representation
    is constant over the samples (its self-HSIC is 0), or, debiased, if a self-HSIC is estimated at or below 0, or
    its U-centred Gram is zero up to rounding (samples mutually orthogonal, such as one-hot codes of distinct
    inputs: every unbiased HSIC with it is 0, and CKA 0 / 0).
    """
    _check_flag(debiased, "debiased")
    _check_dtype(dtype)
    x, _ = _unit_features(x, "x", _min_samples(debiased), dtype)
    y, _ = _unit_features(y, "y", _min_samples(debiased), dtype)
    _check_pair(x, y)
    const_x, const_y = [_is_constant(x)], [_is_constant(y)]  # before x and y are centred in place
    # the form with fewer multiply-adds (the n x n Grams when there are fewer samples than features)
    xy, xx, yy = _hsic_all([x], [y], debiased, "auto", inplace=True)
    xx, yy = _zero_constant(xx, const_x), _zero_constant(yy, const_y)
    return float(_cka_from_hsic(xy[0, 0], xx[0], yy[0]))


def _rbf_gram(x: torch.Tensor, threshold: float, name: str) -> torch.Tensor:
    """``exp(-|x_i - x_j|^2 / (2 threshold^2 m))``, ``m`` the median of the squared distances of all ``n^2`` pairs
    (the diagonal's zeros included, as Kornblith et al. take it). A median of 0 with samples that differ (more than
    half of the pairs identical) has no bandwidth: refused naming ``name``."""
    xc = _center_columns(_unit_scale(x))  # distances do not change; the squared norms stay in range
    sq = (xc * xc).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T)).clamp_min_(0.0)
    d.diagonal().zero_()
    d = (d + d.T) / 2  # exactly symmetric
    v, m = d.flatten().sort().values, d.numel()
    med = float(v[m // 2]) if m % 2 else float((v[m // 2 - 1] + v[m // 2]) / 2)  # numpy's median
    if not med > 0:
        raise ValueError(
            f"{name}: the median squared distance between its samples is 0 (more than half of the pairs of samples "
            "are identical), so the RBF bandwidth threshold * median is 0; give samples that differ more, or use "
            "linear_cka"
        )
    return torch.exp(-d / (2.0 * threshold**2 * med))


def rbf_cka(x, y, *, threshold: float = 1.0, debiased: bool = True) -> float:
    """CKA with Gaussian (RBF) kernels (Kornblith et al. 2019): ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with
    ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))``, ``sigma^2 = threshold^2`` times the median squared distance
    between the samples of ``x`` (median over all ``n^2`` pairs, the zero diagonal included, as in Kornblith et
    al.'s code), and ``L`` likewise for ``y``.

    ``debiased=True`` (default) uses the unbiased HSIC (``n >= 4``), ``False`` the biased ``tr(K H L H)``
    (``n >= 2``). Invariant to rotations, translations and isotropic scaling of either representation (the
    bandwidth follows the scale). Returns NaN when a representation is constant over the samples (as
    :func:`linear_cka`), or, debiased, when all its samples are at one distance from each other (e.g. one-hot codes
    of distinct inputs: the U-centred Gram is zero, and CKA 0 / 0); a representation with more than half of its pairs
    of samples identical (median distance 0) is refused, and so, debiased, is a ``threshold`` so small that the
    kernel between distinct samples is below float64's precision. Narrow bandwidths are computed without underflow
    (each centred Gram is scaled to a largest magnitude of 1 before the sums of products).
    """
    _check_flag(debiased, "debiased")
    if (
        isinstance(threshold, bool | np.bool_)
        or not isinstance(threshold, int | float | np.integer | np.floating)
        or not (0 < threshold < math.inf)
    ):
        raise ValueError(
            f"threshold={threshold!r} is not valid; give a finite number > 0 (a fraction of the median)"
        )
    x = _as_features(x, "x", _min_samples(debiased))
    y = _as_features(y, "y", _min_samples(debiased))
    _check_pair(x, y)
    if _is_constant(x) or _is_constant(y):
        return math.nan
    k, l = _rbf_gram(x, float(threshold), "x"), _rbf_gram(y, float(threshold), "y")  # noqa: E741
    kc = _centred_kernel(k, debiased, "x", float(threshold))
    lc = _centred_kernel(l, debiased, "y", float(threshold))
    # the HSIC terms up to their common normalisation, which cancels in the ratio
    xy, xx, yy = (kc * lc).sum(), (kc * kc).sum(), (lc * lc).sum()
    return float(_cka_from_hsic(xy, xx, yy))


def _centred_kernel(k: torch.Tensor, debiased: bool, name: str, threshold: float) -> torch.Tensor:
    """The U-centred (``debiased``) or doubly centred RBF Gram ``k`` of ``name``, divided by its largest magnitude
    (CKA does not change): with a narrow bandwidth the off-diagonal entries, all the U-centred Gram is made of, can
    be as small as 1e-150, and the sums of their squares would underflow. A U-centred Gram that is zero up to the
    rounding of its entries (every pair of samples at one distance, such as one-hot codes: off-diagonal entries
    ``a_i + a_j``) is returned as exact zeros, so CKA is NaN (0 / 0) as :func:`linear_cka` gives, not a ratio of
    rounding errors. Off-diagonal entries all below float64's precision (a bandwidth so narrow that the Gram is the
    identity) are refused naming ``threshold``."""
    n = k.shape[0]
    if debiased:
        top = float((k - torch.diag(k.diagonal())).abs().max())  # the largest entry off the diagonal
        limit = torch.finfo(torch.float64).tiny / torch.finfo(torch.float64).eps  # below: not full precision
        if top < limit:
            raise ValueError(
                f"{name}: with threshold={threshold!r} the RBF kernel's entries between distinct samples are all "
                f"at most {top:.3g} (below {limit:.3g}, where float64 keeps no full precision), so its Gram matrix "
                "is the identity to float64 precision and every "
                "debiased HSIC with it is 0 or rounding; give a larger threshold (a fraction of the median "
                "distance, typically 0.5 to 1)"
            )
        c = u_center(k, inplace=True)
        if float(c.abs().max()) <= 4 * n * torch.finfo(torch.float64).eps * top:
            return torch.zeros_like(c)
    else:
        c = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    return c / _max_magnitude(c)


# ------------------------------------------------------------------------------------------------ all pairs


def _gram_stack(reps: list[torch.Tensor], debiased: bool) -> torch.Tensor:
    """``(len(reps), n * n)``: each representation's U-centred (or doubly centred) Gram, flattened; each Gram is
    written straight into its row and centred there."""
    n = reps[0].shape[0]
    out = torch.empty(len(reps), n, n, dtype=torch.float64, device=reps[0].device)
    for i, x in enumerate(reps):
        xc = _center_columns(x)
        if xc.dtype == torch.float64:
            torch.mm(xc, xc.T, out=out[i])
        else:  # a float32 Gram, centred and summed in float64
            out[i].copy_(xc @ xc.T)
        if debiased:
            u_center(out[i], inplace=True)
    return out.reshape(len(reps), n * n)


# memory limits of the two forms: products of at most this many float64 entries at once (256 MB), and Gram stacks of
# at most this many bytes for method="auto" to pick the Gram form
_CHUNK_ELEMENTS = 32 * 2**20
_GRAM_BYTES = 2 * 2**30


def _hsic_features_all(
    xs: list[torch.Tensor], ys: list[torch.Tensor] | None, debiased: bool, inplace: bool = False
):
    """HSIC of every pair (and every representation with itself) in the feature form, ``ys=None`` meaning
    ``xs``; and, debiased, each representation's ``||X^T X||_F^2`` on the same normalisation (else None). Every representation is centred once; then one product of each ``x`` with all ``y`` side by side,
    ``(d_a, n) x (n, sum d_b)``, whose squared entries summed over each ``y``'s columns give ``||X_a^T Y_b||_F^2``.

    Columns are centred first (the estimators do not change, the rounding does). Biased: ``||X^T Y||_F^2 /
    (n - 1)^2``. Unbiased (Song et al.), with ``q_i = |x_i|^2``, ``p_i = |y_i|^2`` and ``K~ = K - diag(q)``:
    ``tr(K~ L~) = ||X^T Y||_F^2 - sum q_i p_i``, ``1^T K~ 1 = |sum x_i|^2 - sum q_i`` and ``(K~ 1)_i = x_i . sum x -
    q_i``; on centred columns ``sum x_i = 0``, so ``1^T K~ 1 = -sum q`` and ``K~ 1 = -q``: the row norms are all
    it needs besides the products.

    Memory: ``inplace`` centres the representations in their own storage (the caller's copies); else one centred
    copy of each. Every product ``X_a^T Y`` (and ``X^T X``) is formed in blocks of ``X_a``'s columns of at most
    ``_CHUNK_ELEMENTS`` entries, squared in place; narrow ``y`` are put side by side (a copy) only while that copy
    stays within the same size.
    """
    n = xs[0].shape[0]
    center = (lambda x: x.sub_(x.mean(0, keepdim=True))) if inplace else _center_columns
    cx = [center(x) for x in xs]
    cy = cx if ys is None else [center(y) for y in ys]
    # the ys side by side, in chunks whose product with the widest x (and whose copy) stays under _CHUNK_ELEMENTS
    widest = max(max(x.shape[1] for x in cx), n)
    chunks, cur, width = [], [], 0
    for j, y in enumerate(cy):
        if cur and (width + y.shape[1]) * widest > _CHUNK_ELEMENTS:
            chunks.append(cur)
            cur, width = [], 0
        cur.append(j)
        width += y.shape[1]
    chunks.append(cur)
    cross = torch.zeros(len(cx), len(cy), dtype=torch.float64, device=cy[0].device)
    for idx in chunks:
        zy = cy[idx[0]] if len(idx) == 1 else torch.cat([cy[j] for j in idx], 1)
        widths = [cy[j].shape[1] for j in idx]
        for a, x in enumerate(cx):
            cross[a, idx] = torch.stack([c.sum() for c in _squared_columns(x, zy).split(widths)])
        del zy
    if ys is None:
        self_x = self_y = torch.diagonal(cross).clone()
    else:
        self_x = torch.stack([_squared_columns(x, x, total=True) for x in cx])
        self_y = torch.stack([_squared_columns(y, y, total=True) for y in cy])
    if not debiased:
        norm = (n - 1) ** 2
        return cross / norm, self_x / norm, self_y / norm, None, None
    qx = torch.stack([_row_norms(x) for x in cx], 1)  # (n, A)
    qy = qx if ys is None else torch.stack([_row_norms(y) for y in cy], 1)

    def unbiased(tr_full, q, p, qp):  # tr_full = ||X^T Y||_F^2, q, p = sums of row norms, qp = sum q_i p_i
        tr = tr_full - qp
        return (tr + q * p / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * qp) / (n * (n - 3))

    sq, sp = qx.sum(0), qy.sum(0)
    out = unbiased(cross, sq[:, None], sp[None, :], qx.T @ qy)
    if ys is None:
        ux = uy = torch.diagonal(out).clone()
    else:
        ux = unbiased(self_x, sq, sq, (qx * qx).sum(0))
        uy = unbiased(self_y, sp, sp, (qy * qy).sum(0))
    # and ||Kc||_F^2 = ||X^T X||_F^2 of each (centred) representation, on the same normalisation: the scale of the
    # rounding in the unbiased terms
    return out, ux, uy, self_x / (n * (n - 3)), self_y / (n * (n - 3))


def _squared_columns(x: torch.Tensor, z: torch.Tensor, total: bool = False) -> torch.Tensor:
    """``(X^T Z)^2`` summed over ``X``'s columns, ``(d_z,)`` float64 (``total``: over every entry, a scalar): the
    product in blocks of ``X``'s columns of at most ``_CHUNK_ELEMENTS`` entries (one block when it fits), each
    squared in place (a float32 product's squares summed in float64)."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, z.shape[1]))
    out = None
    for r in range(0, x.shape[1], rows):
        xr = x if rows >= x.shape[1] else x[:, r : r + rows]  # one block: x itself
        sq = (xr.T @ z).double().square_()
        part = sq.sum() if total else sq.sum(0)
        del sq  # freed before the next block's product
        out = part if out is None else out + part
    return out


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """``|x_i|^2`` of every row, ``(n,)`` float64, in blocks of rows of at most ``_CHUNK_ELEMENTS`` entries."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    return torch.cat([b.double().square().sum(1) for b in x.split(rows)])


def cka_matrix(
    xs: Sequence,
    ys: Sequence | None = None,
    *,
    debiased: bool = True,
    method: str = "auto",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Linear CKA between every representation in ``xs`` and every one in ``ys`` (default ``ys = xs``).

    Parameters
    ----------
    xs, ys : sequences of tensors ``(n, ...)``
        For example every layer's residual stream of two models on the same ``n`` inputs.
    debiased : bool
        Unbiased HSIC (default; ``n >= 4``) or the biased one.
    method : ``"auto"`` | ``"gram"`` | ``"features"``
        ``"features"``: one ``X^T Y`` per pair (``n d_a d_b`` multiply-adds); ``"gram"``: one ``n x n`` Gram per
        representation, then all pairs in one matrix product (``n^2 d`` per representation plus ``n^2`` per pair).
        ``"auto"`` picks the smaller count, but the Gram form only while all Grams fit in 2 GB. Both give the
        same numbers up to rounding. The feature form holds one centred copy of each representation (float64, or
        ``dtype``) and works in products of at most 256 MB (of float64 entries; a float32 product adds its own
        128 MB).
    dtype : ``torch.float64`` (default) or ``torch.float32``
        The precision of the large products (``X^T Y``, or the Grams). With float32 they run about 2-3x faster;
        the sums they feed (and the U-centring) stay in float64. Prefer float64 when samples are few against
        features, where the debiased estimator subtracts terms of similar size.

    Returns
    -------
    Tensor ``(len(xs), len(ys))``, float64 (NaN where a representation is constant, or, debiased, where its
    U-centred Gram is zero up to rounding, as in :func:`linear_cka`).
    """
    _check_flag(debiased, "debiased")
    _check_method(method)
    _check_dtype(dtype)
    same = ys is None
    if isinstance(xs, (torch.Tensor, np.ndarray)) or (
        ys is not None and isinstance(ys, (torch.Tensor, np.ndarray))
    ):
        raise TypeError(
            "xs and ys must be sequences of representations (e.g. a list of tensors), not one tensor"
        )
    for name, v in (("xs", xs), ("ys", ys)):
        if (v is not None or name == "xs") and (
            isinstance(v, str | bytes | Mapping) or not isinstance(v, Sequence | Iterable)
        ):
            raise TypeError(
                f"{name} is a {type(v).__name__}; give a sequence of representations (e.g. a list of tensors "
                "(n, ...))"
            )
    xs = [_unit_features(x, f"xs[{i}]", _min_samples(debiased), dtype)[0] for i, x in enumerate(xs)]
    ys = (
        xs
        if same
        else [_unit_features(y, f"ys[{j}]", _min_samples(debiased), dtype)[0] for j, y in enumerate(ys)]
    )
    if not xs or not ys:
        raise ValueError("xs and ys must each hold at least one representation")
    for i, x in enumerate(xs):
        _check_pair(xs[0], x, "xs[0]", f"xs[{i}]")
    for j, y in enumerate(ys):
        _check_pair(xs[0], y, "xs[0]", f"ys[{j}]")
    const_x = [_is_constant(x) for x in xs]  # before the copies are centred in place
    const_y = const_x if same else [_is_constant(y) for y in ys]
    num, sx, sy = _hsic_all(xs, None if same else ys, debiased, method, inplace=True)
    sx, sy = _zero_constant(sx, const_x), _zero_constant(sy, const_y)
    return _cka_from_hsic(num, sx[:, None], sy[None, :])


def _hsic_all(
    xs: list[torch.Tensor], ys: list[torch.Tensor] | None, debiased: bool, method: str, inplace: bool = False
):
    """Normalised HSIC of every pair and of every representation with itself: ``(A, B), (A,), (B,)``;
    ``ys=None`` means ``xs``. ``method="auto"`` picks the form with fewer multiply-adds. ``inplace``: the
    representations are the caller's own copies, which the feature form centres in place."""
    same = ys is None
    ys_ = xs if same else ys
    n = xs[0].shape[0]
    if method == "auto":
        dx, dy = [x.shape[1] for x in xs], [y.shape[1] for y in ys_]
        feat = n * (sum(dx) * sum(dy) + (0 if same else sum(d * d for d in dx) + sum(d * d for d in dy)))
        # Gram form: the Grams, about 8 passes over each for centring, and the pair products
        gram = n * n * (sum(dx) + (0 if same else sum(dy))) + n * n * (
            8 * (len(xs) + len(ys_)) + len(xs) * len(ys_)
        )
        # the Gram form holds every Gram at once: not beyond _GRAM_BYTES
        fits = (len(xs) + (0 if same else len(ys_))) * n * n * 8 <= _GRAM_BYTES
        method = "gram" if gram < feat and fits else "features"
    eps = torch.finfo(xs[0].dtype).eps  # the precision of the products (the representations' dtype)
    if method == "features":
        num, sx, sy, kx, ky = _hsic_features_all(xs, ys, debiased, inplace)
        # the unbiased self-HSIC is a difference of sums of size ||Kc||_F^2: rounding of eps times them
        return _drop_null_hsic(num, sx, sy, kx, ky, 4 * n * eps, same) if debiased else (num, sx, sy)
    # the doubly centred Grams Kc (their norms are the scale of the rounding), U-centred in place when debiased
    gx = _gram_stack(xs, False)
    gy = gx if same else _gram_stack(ys_, False)
    kx = torch.linalg.vector_norm(gx, dim=1) ** 2
    ky = kx if same else torch.linalg.vector_norm(gy, dim=1) ** 2
    if debiased:
        for g in (gx,) if same else (gx, gy):
            for row in g:
                u_center(row.view(n, n), inplace=True)
    norm = n * (n - 3) if debiased else (n - 1) ** 2
    num = gx @ gy.T / norm
    sx = torch.diagonal(num).clone() if same else torch.linalg.vector_norm(gx, dim=1) ** 2 / norm
    sy = sx if same else torch.linalg.vector_norm(gy, dim=1) ** 2 / norm
    if not debiased:
        return num, sx, sy
    # the U-centred Gram is formed entry by entry: its squared norm is exact to about (n eps)^2 of ||Kc||_F^2
    return _drop_null_hsic(num, sx, sy, kx / norm, ky / norm, (4 * n * eps) ** 2, same)


def _drop_null_hsic(num, sx, sy, kx, ky, tol: float, same: bool):
    """The unbiased HSIC terms with those of a representation whose U-centred Gram is zero up to rounding set to
    exactly 0 (its row and column of ``num`` too): its self-HSIC at most ``tol`` times ``kx`` (``ky``), the squared
    Frobenius norm of its doubly centred Gram ``Kc`` on the same normalisation. The U-centring of a Gram is zero
    exactly when its off-diagonal entries are ``a_i + a_j`` (e.g. samples that are mutually orthogonal, such as
    one-hot codes of distinct inputs, or a representation that is zero but on one sample): then every unbiased HSIC
    with it is 0, its CKA is 0 / 0, and what the products leave is rounding (CKA of any value, above 1 too).
    :func:`_cka_from_hsic` reads the zero self-HSIC as undefined (NaN)."""
    nx = sx <= tol * kx
    ny = nx if same else sy <= tol * ky
    if not (bool(nx.any()) or bool(ny.any())):
        return num, sx, sy
    num = num.masked_fill(nx[:, None] | ny[None, :], 0.0)
    sx = sx.masked_fill(nx, 0.0)
    sy = sx if same else sy.masked_fill(ny, 0.0)
    return num, sx, sy


# ------------------------------------------------------------------------------------------------ minibatch


class MinibatchCKA:
    """Linear CKA between every pair of two lists of representations, accumulated over minibatches
    (Nguyen et al. 2021): the unbiased HSIC of each batch is averaged over batches, and CKA is formed from the
    averages. Both models must see identical batches, each of at least 4 samples.

    >>> acc = MinibatchCKA(num_x=3, num_y=3)
    >>> for batch in loader:                                     # doctest: +SKIP
    ...     acc.update(layers_of(model_a, batch), layers_of(model_b, batch))
    >>> acc.compute()                                            # doctest: +SKIP  (3, 3) tensor

    With ``num_y=None`` it compares ``xs`` with itself (``update(xs)``). ``method`` and ``dtype`` as in
    :func:`cka_matrix`.
    """

    def __init__(
        self,
        num_x: int,
        num_y: int | None = None,
        *,
        method: str = "auto",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        for name, v in (("num_x", num_x), ("num_y", num_y)):
            if v is None and name == "num_y":
                continue
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(
                    f"{name}={v!r} is not valid; give an int >= 1 (the number of representations)"
                )
        num_x, num_y = int(num_x), None if num_y is None else int(num_y)
        _check_method(method)
        _check_dtype(dtype)
        self.method, self.dtype = method, dtype
        self.num_x, self.num_y = num_x, num_y
        # each batch's normalised unbiased HSIC terms (A B + A + B numbers) of its representations scaled to a
        # largest magnitude of 1, and those magnitudes (A + B, or A with ys = xs): the terms rescaled to common
        # scales and summed give the estimate, and the sums without one batch the jackknife
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._scales: list[torch.Tensor] = []
        self._widths: tuple[list[int], list[int]] | None = None  # feature widths of batch 0 (xs, ys)

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def _sums(self, skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The HSIC terms ``(A, num_y)``, ``(A,)``, ``(num_y,)`` summed over the batches (all but ``skip``) on
        common scales: per representation, the largest magnitude over those batches. A term of degree 4 in a batch
        of magnitude ``s`` against the common ``S`` is multiplied by ``(s / S)^4`` (at most 1, so nothing
        overflows; a batch far smaller than another underflows to a contribution of 0, its share of the sums being
        below float64's resolution). CKA does not change with the common scales."""
        keep = [b for b in range(self.num_batches) if b != skip]
        xy, xx, yy = (torch.stack([self._batches[b][i] for b in keep]) for i in range(3))
        s = torch.stack([self._scales[b] for b in keep])  # (batches, A + num_y), or (batches, A) with ys = xs
        top = s.amax(0)
        r = (
            torch.where(top > 0, s / torch.where(top > 0, top, 1.0), 0.0) ** 2
        )  # (s / S)^2, 0 for all-zero data
        rx = r[:, : xx.shape[1]]
        ry = rx if s.shape[1] == xx.shape[1] else r[:, xx.shape[1] :]
        return (xy * rx[:, :, None] * ry[:, None, :]).sum(0), (xx * rx * rx).sum(0), (yy * ry * ry).sum(0)

    def update(self, xs: Sequence, ys: Sequence | None = None) -> MinibatchCKA:
        for name, v in (("xs", xs), ("ys", ys)):
            if isinstance(v, torch.Tensor | np.ndarray):
                raise TypeError(
                    f"{name} is a single {type(v).__name__} of shape {tuple(v.shape)}; give a list of "
                    f"representations (one per layer or model: [{name[:-1]}] for one)"
                )
            if v is not None and (isinstance(v, str | bytes | Mapping) or not isinstance(v, Iterable)):
                raise TypeError(
                    f"{name} is a {type(v).__name__}; give a sequence of representations (e.g. a list of tensors "
                    "(n, ...))"
                )
        xs = list(xs)  # any iterable, as cka_matrix takes
        ys = None if ys is None else list(ys)
        if (ys is None) != (self.num_y is None):
            raise ValueError(
                "pass ys to update() exactly when the accumulator was made with num_y"
                f" (num_y={self.num_y}, ys {'missing' if ys is None else 'given'})"
            )
        if len(xs) != self.num_x or (ys is not None and len(ys) != self.num_y):
            raise ValueError(
                f"expected {self.num_x} representations in xs and {self.num_y} in ys, got {len(xs)} and "
                f"{None if ys is None else len(ys)}"
            )
        # each representation scaled to a largest magnitude of 1 in float64 (and then cast), its magnitude kept
        xs, sx = zip(*(_unit_features(x, f"xs[{i}]", 4, self.dtype) for i, x in enumerate(xs)))
        xs = list(xs)
        if ys is None:
            ys, sy = xs, ()
        else:
            ys, sy = zip(*(_unit_features(y, f"ys[{j}]", 4, self.dtype) for j, y in enumerate(ys)))
            ys = list(ys)
        for j, z in enumerate(list(xs) + list(ys)):
            _check_pair(xs[0], z, "xs[0]", f"representation {j} of this batch")
        widths = ([x.shape[1] for x in xs], [y.shape[1] for y in ys])
        if self._widths is None:
            self._widths = widths
        elif widths != self._widths:
            for name, now, first in (("xs", widths[0], self._widths[0]), ("ys", widths[1], self._widths[1])):
                for i, (a, b) in enumerate(zip(now, first)):
                    if a != b:
                        raise ValueError(
                            f"batch {self.num_batches}: {name}[{i}] has {a} features, but batch 0 had {b}; "
                            "every batch must give each representation the same feature width"
                        )
        same = ys is xs
        terms = _hsic_all(xs, None if same else ys, True, self.method)
        self._batches.append(terms)
        self._scales.append(torch.tensor(sx + sy, dtype=torch.float64, device=terms[0].device))
        return self

    def compute(self) -> torch.Tensor:
        """``(num_x, num_y)`` CKA from the batch-averaged unbiased HSIC terms: NaN where a representation is
        constant over the samples of every batch (its self-HSIC is 0), or where its batch-averaged self-HSIC is
        estimated at or below 0 (too few samples), as in :func:`linear_cka` and :func:`cka_matrix`."""
        if self.num_batches == 0:
            raise RuntimeError("MinibatchCKA.compute() before any update()")
        xy, xx, yy = self._sums()
        return _cka_from_hsic(xy, xx[:, None], yy[None, :])

    def standard_error(self) -> torch.Tensor:
        """``(num_x, num_y)`` jackknife standard error of :meth:`compute` over batches (delete-one-batch):
        ``sqrt((B - 1) / B * sum_b (CKA_(-b) - mean)^2)``, each ``CKA_(-b)`` formed from the sums without batch
        ``b``. Needs at least 2 batches; it treats batches as independent draws of the same size. NaN where
        :meth:`compute` is (or where a leave-one-batch-out estimate is: a representation constant over the other
        batches)."""
        if self.num_batches < 2:
            raise RuntimeError(f"standard_error() needs at least 2 batches, got {self.num_batches}")
        # each CKA_(-b) from its own sums, on the common scales of the batches it keeps
        loo = torch.stack(
            [
                _cka_from_hsic(xy, xx[:, None], yy[None, :])
                for xy, xx, yy in map(self._sums, range(self.num_batches))
            ]
        )
        nb = self.num_batches
        return ((nb - 1) / nb * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()


# ------------------------------------------------------------------------------------------------ Procrustes


def _shape_normalise(x: torch.Tensor, name: str) -> torch.Tensor:
    """Centred columns, unit Frobenius norm, and, when features outnumber samples, the equivalent ``(n, n)``
    factor ``U S`` of the thin SVD (same Gram ``X X^T``, so the same nuclear norms)."""
    x = _center_columns(_unit_scale(x))  # the Frobenius norm of data of scale 1e160 would overflow
    nrm = torch.linalg.matrix_norm(x)
    if not nrm > 0:
        raise ValueError(f"{name} is constant over the samples: its shape is undefined")
    x = x / nrm
    if x.shape[1] > x.shape[0]:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        x = u * s
    return x


def procrustes(x, y, *, angular: bool = False) -> float:
    """Orthogonal Procrustes distance between two representations of the same ``n`` inputs.

    Both are centred and scaled to unit Frobenius norm; then ``d^2 = min_Q ||X - Y Q||_F^2 = 2 - 2 ||X^T Y||_*``
    over orthogonal ``Q`` (the narrower one zero-padded), ``d`` in ``[0, sqrt 2]`` (near 0 computed as the
    residual at the optimal ``Q``, accurate to about 1e-16). ``angular=True`` returns
    ``arccos(||X^T Y||_*) = 2 asin(d / 2)`` in ``[0, pi / 2]`` instead. Invariant to rotations, reflections, translations and
    isotropic scaling of either representation, not to other invertible linear maps.
    """
    _check_flag(angular, "angular")
    x, y = _as_features(x, "x", 2), _as_features(y, "y", 2)
    _check_pair(x, y)
    return _procrustes_normalised(_shape_normalise(x, "x"), _shape_normalise(y, "y"), angular)


def _procrustes_normalised(x: torch.Tensor, y: torch.Tensor, angular: bool) -> float:
    """Distance of centred, unit-norm ``x`` and ``y``; angular: ``2 asin(d / 2)``, which is ``arccos(||X^T
    Y||_*)`` for unit-norm inputs without its cancellation at 0.

    ``d = sqrt(2 - 2 ||X^T Y||_*)`` loses ``eps / d^2`` relative to the cancellation (about 1e-8 absolute near
    0); below ``d^2 = 1e-2`` it is computed instead as the residual ``||X R - Y||_F`` at the optimal orthogonal
    ``R = U V^T`` of ``X^T Y = U S V^T`` (both zero-padded to the same width), exact to the rounding of the
    residual itself (about 1e-16). Identical inputs give 0."""
    if x.shape == y.shape and torch.equal(x, y):
        return 0.0
    m = x.T @ y
    d2 = 2.0 - 2.0 * float(torch.linalg.svdvals(m).sum())
    if d2 > 1e-2:
        d = math.sqrt(d2)
    else:
        width = max(x.shape[1], y.shape[1])
        u, _, vh = torch.linalg.svd(F.pad(m, (0, width - m.shape[1], 0, width - m.shape[0])))
        x = F.pad(x, (0, width - x.shape[1]))
        y = F.pad(y, (0, width - y.shape[1]))
        d = float(torch.linalg.matrix_norm(x @ (u @ vh) - y))
    if angular:
        return 2.0 * math.asin(min(d / 2.0, 1.0))
    return d


# ------------------------------------------------------------------------------------------------ statistics


@register
@dataclass
class SimilarityTest(Saveable):
    """Result of :func:`permutation_test`.

    ``statistic``: the measure on the paired data; ``null``: ``(num_permutations,)`` the measure with the rows of
    ``y`` shuffled; ``p_value``: ``(1 + #{null as extreme}) / (1 + num_permutations)`` (never 0);
    ``alternative``: ``"greater"`` (more similar than chance, for CKA) or ``"less"`` (closer than chance, for a
    distance).
    """

    statistic: float
    null: np.ndarray
    p_value: float
    alternative: str

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): ``null`` one number per permutation (at least one),
        ``p_value`` in ``(0, 1]`` and a multiple of ``1 / (1 + num_permutations)``, ``alternative`` one of
        :func:`permutation_test`'s."""
        from .sampling.results import check_arrays

        n = check_arrays({"null": self.null}, {"null": ("num_permutations",)})["num_permutations"]
        if n < 1:
            raise ValueError("null holds no permutation; a test has at least one")
        if self.alternative not in ("greater", "less"):
            raise ValueError(f"alternative must be 'greater' or 'less', got {self.alternative!r}")
        k = self.p_value * (1 + n)
        if not (0 < self.p_value <= 1 and abs(k - round(k)) < 1e-6 * (1 + n)):
            raise ValueError(
                f"p_value={self.p_value!r} is not (1 + count) / (1 + {n}) for the {n} permutations of null"
            )

    @property
    def null_mean(self) -> float:
        return float(self.null.mean())

    @property
    def null_std(self) -> float:
        return float(self.null.std(ddof=1)) if self.null.size > 1 else math.nan


def permutation_test(
    x,
    y,
    measure: str | Callable = "cka",
    *,
    num_permutations: int = 1000,
    seed: int = 0,
    alternative: str | None = None,
) -> SimilarityTest:
    """Is the similarity of ``x`` and ``y`` more than chance? Shuffles the pairing of rows (samples) of ``y``.

    ``measure``: ``"cka"`` (debiased linear CKA; ``alternative="greater"``), ``"cka_biased"``, ``"procrustes"``
    or ``"procrustes_angular"`` (``alternative="less"``), or a callable ``(x, y) -> float`` (give
    ``alternative``). For CKA the permutations reuse the two U-centred Grams (``n^2`` per permutation).
    """
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int | np.integer):
        raise TypeError(f"num_permutations={num_permutations!r} is not valid; give a positive int")
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    num_permutations = int(num_permutations)
    g = torch.Generator().manual_seed(_generator_seed(seed, "seed"))
    if measure in ("cka", "cka_biased"):
        debiased = measure == "cka"
        xf = _as_features(x, "x", _min_samples(debiased))
        yf = _as_features(y, "y", _min_samples(debiased))
        _check_pair(xf, yf)
        xf, yf = _unit_scale(xf), _unit_scale(yf)  # CKA is scale-free; the Grams' squares stay in range
        kx, ky = _gram_stack([xf, yf], False)
        n = xf.shape[0]
        kx, ky = kx.reshape(n, n), ky.reshape(n, n)
        scale = [float((k * k).sum()) for k in (kx, ky)]  # ||Kc||_F^2, the scale of the rounding
        if debiased:
            kx, ky = u_center(kx, inplace=True), u_center(ky, inplace=True)
        den = float((kx * kx).sum() * (ky * ky).sum())
        if not den > 0:
            raise ValueError("CKA is undefined here: a representation is constant over the samples")
        if debiased:  # as linear_cka: a U-centred Gram zero up to rounding has no CKA (0 / 0)
            tol = (4 * n * torch.finfo(torch.float64).eps) ** 2
            for name, k, sc in (("x", kx, scale[0]), ("y", ky, scale[1])):
                if not float((k * k).sum()) > tol * sc:
                    raise ValueError(
                        f"debiased CKA is undefined here: the U-centred Gram of {name} is zero (its samples are "
                        "mutually orthogonal, e.g. one-hot codes, or the like), so every unbiased HSIC with it is 0; "
                        "use measure='cka_biased' or another representation"
                    )
        scale = 1.0 / math.sqrt(den)
        stat = float((kx * ky).sum()) * scale
        null = np.empty(num_permutations)
        for b in range(num_permutations):
            perm = torch.randperm(n, generator=g, device="cpu").to(ky.device)
            # permuting the samples of y permutes rows and columns of its (U-)centred Gram alike
            null[b] = float((kx * ky[perm][:, perm]).sum()) * scale
        alternative = alternative or "greater"
    else:
        if measure in ("procrustes", "procrustes_angular"):
            # centring, scaling and the SVD reduction commute with permuting samples: normalise once
            ang = measure == "procrustes_angular"
            fn = lambda a, b: _procrustes_normalised(a, b, ang)  # noqa: E731
            prep = _shape_normalise
            alternative = alternative or "less"
        elif callable(measure):
            fn, prep = measure, lambda a, name: a
            if alternative is None:
                raise ValueError("give alternative='greater' or 'less' with a callable measure")
        else:
            raise ValueError(
                f"measure must be 'cka', 'cka_biased', 'procrustes', 'procrustes_angular' or a callable, got {measure!r}"
            )
        xf, yf = _as_features(x, "x", 2), _as_features(y, "y", 2)
        _check_pair(xf, yf)
        xf, yf = prep(xf, "x"), prep(yf, "y")
        stat = float(fn(xf, yf))
        null = np.array(
            [
                float(fn(xf, yf[torch.randperm(xf.shape[0], generator=g, device="cpu").to(yf.device)]))
                for _ in range(num_permutations)
            ]
        )
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    extreme = (null >= stat) if alternative == "greater" else (null <= stat)
    p = (1 + int(extreme.sum())) / (1 + num_permutations)
    return SimilarityTest(statistic=stat, null=null, p_value=p, alternative=alternative)


# ------------------------------------------------------------------------------------------------ interpretive equivalence


def _warn_few_held_out_pooled(n: int, held: int, train_fraction: float) -> None:
    """:func:`ridge_similarity`'s split holds out ``held`` of ``n``: warn (as :func:`ridge_similarity_cv` does)
    below ``MIN_HELD_OUT``, where ``SST`` has fewer than 5 degrees of freedom per column."""
    from .ridge import MIN_HELD_OUT
    from .sampling.diagnostics import user_stacklevel

    if held >= MIN_HELD_OUT:
        return
    if n >= 2 * MIN_HELD_OUT:
        fix = f"hold out at least {MIN_HELD_OUT}: train_fraction <= {(n - MIN_HELD_OUT) / n:.3g} with {n} inputs"
    else:
        fix = f"give at least {2 * MIN_HELD_OUT} inputs ({MIN_HELD_OUT} held out, as many to fit)"
    warnings.warn(
        f"ridge_similarity: train_fraction={train_fraction!r} on {n} inputs holds out {held}; the held-out R^2 "
        f"from fewer than {MIN_HELD_OUT} inputs is unstable (its SST has fewer than {MIN_HELD_OUT - 1} degrees of "
        f"freedom per column, and held-out values that nearly coincide give an R^2 of -100 or below): {fix}",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def ridge_similarity(x, y, *, alpha: float = 0.01, train_fraction: float = 0.5, seed: int = 0) -> float:
    """How well ``y`` is linearly predictable from ``x``: ``sqrt(max(R^2, 0))`` of a ridge regression of ``y`` on
    ``x`` (with intercept), fit on a random ``train_fraction`` of the samples and scored on the rest.

    ``R^2 = 1 - SSE / SST`` pooled over all of ``y``'s columns (high-variance directions count more). The
    penalty is ``alpha`` times the mean eigenvalue of the centred training features' scatter matrix ``X^T X``
    (so ``alpha`` does not depend on the scale of ``x``). Not symmetric in ``x`` and ``y``.

    Invariant (up to rounding) to ``x -> s x Q + c`` and ``y -> t y R + e`` for orthogonal ``Q``, ``R``, nonzero
    scalars ``s``, ``t`` and offsets ``c``, ``e``: the penalty ``||B||^2`` and the mean eigenvalue do not change
    under ``Q``, the penalty scales with ``s^2`` as the scatter does, and the pooled sums of squares do not change
    under ``R``. Not invariant to other linear maps of either side (e.g. columns scaled differently), nor to
    appending a constant column to ``x``: it adds a zero eigenvalue, which lowers the mean eigenvalue and so the
    penalty. (:func:`ridge_similarity_cv`, the authors' similarity, has absolute penalties and averages the
    columns' R^2 uniformly: it is invariant to neither a scaling of ``x`` nor a rotation of ``y``.)

    A ``y`` with no variance to predict (constant over the samples, or over the held-out ones of the split, up to
    rounding) has no R^2: NaN is returned, with a ``RuntimeWarning`` saying which (as :func:`linear_cka` is NaN
    for a constant representation). A constant ``x`` predicts nothing but the mean: the similarity is 0.

    A split that holds out fewer than 6 samples (``MIN_HELD_OUT``, as for :func:`ridge_similarity_cv`; with the
    default ``train_fraction=0.5``, fewer than 12 samples) is kept, with a ``UserWarning`` naming
    ``train_fraction`` and the fix: the held-out ``SST`` then has fewer than 5 degrees of freedom per column.
    """
    x, y = _as_features(x, "x", 4), _as_features(y, "y", 4)
    _check_pair(x, y)
    seed = _generator_seed(seed)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.number)
        or not (0 <= alpha < math.inf)
    ):
        raise ValueError(f"alpha={alpha!r} is not valid; give a finite number >= 0")
    n = x.shape[0]
    # R^2 is invariant to the scale of y and, with the penalty relative to the features', of x: both scaled to
    # 1, so that no product overflows or underflows
    # (new tensors: the inputs untouched)
    x, y = (t / s if (s := float(t.abs().max())) > 0 else t for t in (x, y))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed), device="cpu").to(x.device)
    k = min(max(int(round(train_fraction * n)), 2), n - 2)
    _warn_few_held_out_pooled(n, n - k, train_fraction)
    tr, te = perm[:k], perm[k:]
    mx, my = x[tr].mean(0), y[tr].mean(0)
    xt, yt = x[tr] - mx, y[tr] - my
    # ridge in whichever form is smaller: (X^T X + a k I)^-1 X^T Y or X^T (X X^T + a k I)^-1 Y
    lam = alpha * float((xt * xt).sum()) / xt.shape[1]
    if xt.shape[1] <= k:
        a = xt.T @ xt
        a.diagonal().add_(lam)
        w = torch.linalg.lstsq(a, xt.T @ yt).solution
    else:
        a = xt @ xt.T
        a.diagonal().add_(lam)
        w = xt.T @ torch.linalg.lstsq(a, yt).solution
    pred = (x[te] - mx) @ w + my
    sse = ((y[te] - pred) ** 2).sum()
    sst = ((y[te] - y[te].mean(0)) ** 2).sum()
    # a target constant over the test samples (up to the rounding its centring leaves) has no variance to explain
    floor = (len(te) * 64 * torch.finfo(torch.float64).eps * float(y[te].abs().max())) ** 2 * y.shape[1]
    if not float(sst) > floor:
        yc = y - y.mean(0)
        floor_all = (n * 64 * torch.finfo(torch.float64).eps * float(y.abs().max())) ** 2 * y.shape[1]
        everywhere = not float((yc * yc).sum()) > floor_all
        warn_constant_target("ridge_similarity", "y", everywhere, len(te))
        return math.nan
    return math.sqrt(max(1.0 - float(sse / sst), 0.0))


@register
@dataclass
class EquivalenceResult(Saveable):
    """Result of :func:`interpretive_equivalence` (``.save(path)`` / ``EquivalenceResult.load(path)``).

    ``score`` in ``[0, 1]`` (NaN when every comparison tied): ``1 - |wins / num_trials - 1|`` with ``wins`` out of
    ``2 num_trials`` comparisons (a tie counts half: the similarity cannot tell the two apart); ``ties``: how many
    comparisons tied;
    ``own``, ``other``: ``(num_trials, 2)`` similarities of model A (column 0) and model B (column 1) to an
    implementation of its own and to the other model.
    """

    score: float
    wins: float
    num_trials: int
    own: np.ndarray
    other: np.ndarray
    ties: int = 0

    @property
    def win_rate(self) -> float:
        return self.wins / (2 * self.num_trials)

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): ``own`` and ``other`` ``(num_trials, 2)``, ``ties`` the
        comparisons they tie in, ``wins`` the strict wins plus half the ties, ``score`` from ``wins`` (NaN when every
        comparison tied)."""
        from .sampling.results import check_arrays

        t = check_arrays({"own": self.own, "other": self.other}, {"own": ("t", 2), "other": ("t", 2)})["t"]
        if t != self.num_trials or t < 1:
            raise ValueError(f"own and other hold {t} trials, but num_trials={self.num_trials!r}")
        own, other = np.asarray(self.own, float), np.asarray(self.other, float)
        ties = int((own == other).sum())
        wins = float((own > other).sum()) + 0.5 * ties
        if self.ties != ties or self.wins != wins:
            raise ValueError(
                f"ties={self.ties!r} and wins={self.wins!r} are not those of own and other ({ties} ties, {wins} wins)"
            )
        score = math.nan if ties == own.size else 1.0 - abs(wins / t - 1.0)
        if not (score == self.score or (math.isnan(score) and math.isnan(self.score))):
            raise ValueError(f"score={self.score!r} is not 1 - |wins / num_trials - 1| = {score!r}")


def _scalar_similarity(v) -> float:
    """The value a ``similarity`` callable returned, as a float; one that is not a single number is refused."""
    if isinstance(v, torch.Tensor | np.ndarray) and math.prod(v.shape) != 1:
        raise TypeError(
            f"similarity(x, y) returned a {type(v).__name__} of shape {tuple(v.shape)}; give a callable that "
            "returns one number (larger = closer)"
        )
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"similarity(x, y) returned {v!r} ({type(v).__name__}); give a callable that returns one number "
            "(larger = closer)"
        ) from None


def interpretive_equivalence(
    rep_a,
    rep_b,
    sample_a: Callable[[int], torch.Tensor],
    sample_b: Callable[[int], torch.Tensor],
    *,
    num_trials: int = 20,
    similarity: str | Callable = "ridge",
    seed: int = 0,
    compare: str = "model",
) -> EquivalenceResult:
    """Do two models share an interpretation? The estimator of Sun & Toneva, as we read it.

    An interpretation of a model is judged by its *implementations*: versions of the model whose computation is
    changed only where the interpretation says it does not matter (e.g. components outside the claimed circuit
    resampled with activations from other inputs: :func:`resample_implementations`). Two models are
    interpretively equivalent when their sets of implementations coincide, so a model should then be no closer to
    an implementation of its own interpretation than to the other model. Each trial draws one implementation of
    each model and asks, in both directions, whether the model is closer to its own implementation than to the
    other model (a *win*). With ``s`` wins in ``2 num_trials`` comparisons the score is ``1 - |s / num_trials -
    1|``: 1 when wins are a coin flip (equivalent), 0 when the model is always closer to its own implementation
    (or always farther). A tie (equal similarities, e.g. both held-out R^2 clamped at 0) counts as half a win: the
    similarity cannot tell the two apart; when every comparison ties the score carries no information: it is NaN,
    with a warning (a coin flip's 1 would read as "equivalent" for any two models), and when more than half of
    them tie the score is reported with a warning too (the ties pull it towards 1).

    With the default ``compare="model"`` (the paper's description read literally) identical models score 0,
    although by the definition they are equivalent (their sets of implementations are one set). The two sides of the
    comparison are not alike: the own side is a perturbed model (an implementation), the other side the other
    model itself, unperturbed. A copy of the model is then closer than every implementation (nothing is closer to
    a model than the model), so the model never wins (``s = 0``), and the score ``1 - |s / num_trials - 1|``
    counts that as it counts always winning: 0, the verdict for different interpretations. The same holds for a
    copy with permuted units, or in any basis the similarity ignores, wherever the similarity ranks the copy
    strictly closer. So with ``compare="model"`` only wins above half read as "distinguishable"; a warning says so
    when no comparison is a win.

    ``compare="implementations"`` (the form of the authors' released code) compares like with like and follows
    the definition: each trial draws two implementations of each model, ``a, a'`` of A and ``b, b'`` of B, and a
    win is ``a`` closer to ``a'`` than to ``b`` (and ``b`` to ``b'`` than to ``a``). When the two sets of
    implementations coincide, ``a'`` and ``b`` are draws from the same distribution, so wins are a coin flip and the
    score is near 1: identical models, and models whose implementations differ only by a change of basis the
    similarity ignores, score as equivalent.

    Parameters
    ----------
    rep_a, rep_b : Tensor ``(num_inputs, ...)``, or None with ``compare="implementations"``
        The two models' representations of the same inputs (e.g. every layer's residual stream, concatenated:
        :func:`representations`); with ``compare="implementations"`` they are not read (only checked, when given).
    sample_a, sample_b : callables ``seed -> Tensor (num_inputs, ...)``
        Representations of a random implementation of each model, on the same inputs.
    num_trials : int
        Trials, each drawing one implementation of each model (two comparisons per trial).
    similarity : ``"ridge"`` (:func:`ridge_similarity_cv` of the candidate from the model: ridge with an intercept,
        the penalty from ``{0.1, 1, 10}`` by leave-one-out on a random 90% of the inputs (holding out at least 6),
        ``sqrt(max(R^2, 0))`` of the held-out R^2 averaged over the candidate's features; the closeness of the
        authors' released code; with fewer inputs than features its R^2 is mostly <= 0 and every comparison may
        tie),
        ``"cka"`` (debiased linear CKA) or a callable ``(x, y) -> float``, larger = closer.
    seed : int
        Keys the trials: with ``k = seed * 100_003 + t``, trial ``t`` calls ``sample_a(2 k)`` and
        ``sample_b(2 k + 1)`` (``compare="model"``), or ``sample_a(4 k)``, ``sample_a(4 k + 2)``, ``sample_b(4 k +
        1)`` and ``sample_b(4 k + 3)`` (``compare="implementations"``), and seeds the ridge split with ``k``;
        ``|seed| < 2**44``.
    compare : ``"model"`` or ``"implementations"``
        What an implementation is compared with: the model itself (the paper's description read literally, the
        default; identical models score 0) or a second implementation of the same model (the authors' released
        code; identical models score near 1; see above).
    """
    if compare not in ("model", "implementations"):
        raise ValueError(f"compare={compare!r} is not valid; choose 'model' or 'implementations'")
    if isinstance(num_trials, bool) or not isinstance(num_trials, int | np.integer):
        raise TypeError(f"num_trials={num_trials!r} is not valid; give a positive int")
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    if similarity == "ridge":
        sim = lambda x, y, t: ridge_similarity_cv(x, y, seed=t)  # noqa: E731
    elif similarity == "cka":
        sim = lambda x, y, t: linear_cka(x, y)  # noqa: E731
    elif callable(similarity):
        sim = lambda x, y, t: _scalar_similarity(similarity(x, y))  # noqa: E731
    else:
        raise ValueError(f"similarity must be 'ridge', 'cka' or a callable, got {similarity!r}")
    seed = _check_seed(seed, "seed")
    if not -(2**44) <= seed < 2**44:
        # the trials' seeds, 2 (seed * 100_003 + trial) + 1, must fit a torch.Generator seed
        raise ValueError(f"seed={seed} is not valid; give an int with |seed| < 2**44")
    for name, fn in (("sample_a", sample_a), ("sample_b", sample_b)):
        if not callable(fn):
            raise TypeError(
                f"{name} is a {type(fn).__name__}; give a callable seed -> Tensor (num_inputs, ...) that returns "
                "the representations of a random implementation (e.g. resample_implementations(...))"
            )
    ra = rb = None
    if compare == "model":
        ra, rb = _as_features(rep_a, "rep_a", 4), _as_features(rep_b, "rep_b", 4)
        _check_pair(ra, rb, "rep_a", "rep_b")
    else:  # not read: checked where given
        ra = None if rep_a is None else _as_features(rep_a, "rep_a", 4)
        rb = None if rep_b is None else _as_features(rep_b, "rep_b", 4)
        if ra is not None and rb is not None:
            _check_pair(ra, rb, "rep_a", "rep_b")
    own = np.empty((num_trials, 2))
    other = np.empty((num_trials, 2))
    shape_seen = (0, 0)  # inputs and the widest representation compared (for the warnings)
    same_draws = 0  # trials in which a sampler gave the same representation for two seeds
    for t in range(num_trials):
        key = seed * 100_003 + t
        if compare == "model":
            ia = _as_features(sample_a(2 * key), "sample_a(seed)", 4)
            ib = _as_features(sample_b(2 * key + 1), "sample_b(seed)", 4)
            _check_pair(ra, ia, "rep_a", "sample_a(seed)")
            _check_pair(rb, ib, "rep_b", "sample_b(seed)")
            own[t] = sim(ra, ia, key), sim(rb, ib, key)
            other[t] = sim(ra, rb, key), sim(rb, ra, key)
            shape_seen = (ra.shape[0], max(shape_seen[1], ra.shape[1], rb.shape[1]))
            continue
        a, a2 = (_as_features(sample_a(4 * key + i), "sample_a(seed)", 4) for i in (0, 2))
        b, b2 = (_as_features(sample_b(4 * key + i), "sample_b(seed)", 4) for i in (1, 3))
        for name, x in (("sample_a(seed)", a2), ("sample_b(seed)", b), ("sample_b(seed)", b2)):
            _check_pair(a, x, "sample_a(seed)", name)
        if ra is not None:
            _check_pair(ra, a, "rep_a", "sample_a(seed)")
        if rb is not None:
            _check_pair(rb, b, "rep_b", "sample_b(seed)")
        same_draws += int(torch.equal(a, a2) or torch.equal(b, b2))
        own[t] = sim(a, a2, key), sim(b, b2, key)
        other[t] = sim(a, b, key), sim(b, a, key)
        shape_seen = (a.shape[0], max(shape_seen[1], a.shape[1], b.shape[1]))
    if same_draws == num_trials:
        warnings.warn(
            "interpretive_equivalence(compare='implementations'): a sampler returned the same representation for "
            "different seeds in every trial, so its own implementations always match; give samplers that draw a "
            "random implementation per seed",
            stacklevel=2,
        )
    if not (np.isfinite(own).all() and np.isfinite(other).all()):
        if compare == "model":
            what = {
                ("own", 0): "rep_a -> sample_a(seed)",
                ("own", 1): "rep_b -> sample_b(seed)",
                ("other", 0): "rep_a -> rep_b",
                ("other", 1): "rep_b -> rep_a",
            }
        else:
            what = {
                ("own", 0): "sample_a -> another sample_a",
                ("own", 1): "sample_b -> another sample_b",
                ("other", 0): "sample_a -> sample_b",
                ("other", 1): "sample_b -> sample_a",
            }
        arr, t, j = next(
            (name, int(t), int(j))
            for name, a in (("own", own), ("other", other))
            for t, j in zip(*np.nonzero(~np.isfinite(a)))
        )
        v = (own if arr == "own" else other)[t, j]
        raise ValueError(
            f"the similarity {what[arr, j]} in trial {t} is {v} (a representation constant over the inputs?): a "
            "comparison with it has no winner; give representations that vary"
        )
    ties = int((own == other).sum())
    wins = float((own > other).sum()) + 0.5 * ties
    ridge_hint = ""
    if similarity == "ridge":
        n_in, n_feat = shape_seen
        held = n_in - _fit_size(n_in, None)
        ridge_hint = (
            f" (ridge: {n_in} inputs of up to {n_feat} features, fit on {n_in - held} and scored on {held} held "
            "out; sqrt(max(R^2, 0)) reads every R^2 <= 0 as 0. With fewer inputs than features the held-out R^2 is "
            "mostly <= 0, and the penalties {0.1, 1, 10} are absolute: on representations of a small scale they "
            "swamp the fit and every held-out R^2 is <= 0. Standardise the representations, use similarity='cka', "
            "or rank the negative R^2 too with similarity=lambda x, y: "
            "pypattern.equivalence.ridge_similarity_cv(x, y, sqrt=False))"
        )
    if ties == own.size:
        warnings.warn(
            f"interpretive_equivalence: all {own.size} comparisons tied (every similarity equal, e.g. held-out R^2 "
            "<= 0 everywhere): the similarity cannot tell the representations apart, and the score carries no "
            f"information (score NaN); give more inputs than features, or another similarity{ridge_hint}",
            stacklevel=2,
        )
    elif 2 * ties > own.size:
        warnings.warn(
            f"interpretive_equivalence: {ties} of {own.size} comparisons tied (equal similarities, e.g. held-out "
            "R^2 <= 0): each counts as half a win, which pulls the score towards 1 (equivalent) whatever the models; "
            f"the score mostly says that the similarity cannot tell the representations apart{ridge_hint}",
            stacklevel=2,
        )
    score = float("nan") if ties == own.size else 1.0 - abs(wins / num_trials - 1.0)
    if compare == "model" and ties < own.size and not (own > other).any():
        warnings.warn(
            f"interpretive_equivalence(compare='model'): in all {own.size - ties} comparisons that did not tie the "
            "other model was closer than an implementation of the model's own interpretation, the opposite of "
            f"distinguishable, yet the score ({score:.3g}) counts it as models always closer to their own "
            "implementations are counted: this is what identical models (or a copy in a basis the similarity "
            "ignores) give, because an implementation is a perturbed model and the other model is not. "
            "compare='implementations' compares implementations of both models with each other, and scores such "
            "models as a coin flip (near 1)",
            stacklevel=2,
        )
    return EquivalenceResult(
        score=score,
        wins=wins,
        num_trials=num_trials,
        own=own,
        other=other,
        ties=ties,
    )


def _flat_cache(cache, hooks: Sequence[str]) -> torch.Tensor:
    return torch.cat([cache[h].reshape(cache[h].shape[0], -1) for h in hooks], 1)


def _hooked(model, fn: str, names: Sequence[str] = ()):
    """The hooked model whose activations ``fn`` reads (it has ``run_with_cache``): a Hugging Face causal LM
    through :func:`~pypattern.models.hooked_hf`'s hook points, as the patching functions read it, or converted with
    :func:`~pypattern.from_hf` where the adapter does not cover its family or lacks a hook point of ``names`` (a
    head's ``hook_z``); a TransformerLens model converted; else a TypeError."""
    if isinstance(model, torch.nn.Module):
        from .models.convert import UnsupportedModelError, from_hf
        from .models.hf import HookedHF
        from .patching.api import _hooked_if_hf

        wrapped = _hooked_if_hf(model)
        if (
            isinstance(wrapped, HookedHF)
            and wrapped is not model
            and any(n not in wrapped.hook_dict for n in names)
        ):
            try:  # pypattern's model has every hook point
                wrapped = from_hf(model)
            except UnsupportedModelError:
                pass  # the adapter's hook points: the missing ones are named by the caller
        model = wrapped
    if not hasattr(model, "run_with_cache"):
        raise TypeError(
            f"model is a {type(model).__name__}; {fn} reads a hooked model's activations: give pypattern's "
            "Transformer (pypattern.from_hf converts a Hugging Face model), a HookedModule, or a Hugging Face "
            "causal LM (read through pypattern.hooked_hf)"
        )
    return model


def _site_hook_names(sites, hooks) -> list[str]:
    """The hook names ``resample_implementations``' ``sites`` and ``hooks`` read (what is not a name is left to its
    checks)."""
    names = [h for h in ([hooks] if isinstance(hooks, str) else hooks or ()) if isinstance(h, str)]
    if isinstance(sites, Sequence) and not isinstance(sites, str):
        names += [
            s[0]
            for s in sites
            if isinstance(s, Sequence) and not isinstance(s, str) and s and isinstance(s[0], str)
        ]
    return names


def _check_rep_tokens(model, tokens, argument: str) -> torch.Tensor:
    """``tokens`` (passed as ``argument``) checked: an integer ``(num_inputs, pos)`` tensor of ids in ``model``'s
    vocabulary (a negative id would be read from the end of it) and no longer than its learned positions."""
    if not isinstance(tokens, torch.Tensor):
        hint = (
            " (representations flattens every position, so padding would enter the features: give unpadded "
            "sequences of one length, or pool over the real tokens with "
            "pypattern.interpretive.accumulated_residual(..., attention_mask=))"
            if isinstance(tokens, Mapping)
            else ""
        )
        raise TypeError(
            f"{argument} is a {type(tokens).__name__}; give a token tensor (num_inputs, pos){hint}"
        )
    out = check_tokens(tokens, argument, _vocab(model), n_ctx=position_limit(model))
    # run where the model is (prompts kept on the CPU with a model on a GPU)
    dev = model_device(model)
    return out if dev is None or out.device == dev else out.to(dev)


def _rep_hooks(model, hooks, argument: str = "hooks") -> list[str]:
    """``hooks`` as a list of hook names: the default (every ``hook_resid_post``) for None, one name for a string;
    an empty list or a name that is not a string is refused."""
    if hooks is None:
        return _default_rep_hooks(model)
    if isinstance(hooks, str):
        return [hooks]
    if isinstance(hooks, Mapping | set | frozenset) or not isinstance(hooks, Iterable):
        raise TypeError(
            f"{argument} is a {type(hooks).__name__}; give a hook name or a list of hook names in order (None: "
            "every block's hook_resid_post)"
        )
    hooks = list(hooks)
    if not hooks:
        raise ValueError(
            f"{argument} is empty: give at least one hook name (or None: every block's hook_resid_post)"
        )
    bad = [h for h in hooks if not isinstance(h, str)]
    if bad:
        raise TypeError(f"{argument} holds {bad[0]!r} ({type(bad[0]).__name__}); give hook names (strings)")
    return hooks


def representations(model, tokens: torch.Tensor, hooks: Sequence[str] | str | None = None) -> torch.Tensor:
    """``(num_inputs, D)``: the activations at ``hooks`` (one hook name or a list; default: every block's
    ``hook_resid_post``), each input's positions and hooks flattened and concatenated. ``model`` is a hooked model
    (:class:`~pypattern.models.Transformer` or :class:`~pypattern.models.hooks.HookedModule`; a Hugging Face causal
    LM is read through :func:`~pypattern.models.hooked_hf`'s hook points); ``tokens`` an
    integer ``(num_inputs, pos)`` tensor of ids in its vocabulary. A model in ``train()`` mode whose forward is
    random there (dropout) is read with its ``eval()`` forward, with a warning, and left in its mode."""
    model = _hooked(model, "representations", [hooks] if isinstance(hooks, str) else list(hooks or ()))
    tokens = _check_rep_tokens(model, tokens, "tokens")
    hooks = _rep_hooks(model, hooks)
    _refuse_unknown_hooks(model, hooks, "hooks")  # named here, before the forward
    # a model whose train() forward is random (dropout) is read with its eval() forward, with a warning
    with torch.no_grad(), eval_mode_if_random(model, "representations runs it"):
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
    missing = [h for h in hooks if h not in cache]
    if missing:
        raise KeyError(f"hooks {missing} were not reached in the forward pass")
    return _flat_cache(cache, hooks)


def _refuse_unknown_hooks(model, names: Sequence[str], what: str) -> None:
    """KeyError naming those of ``names`` that are no hook point of ``model`` (when it lists its hook points)."""
    known = getattr(model, "hook_dict", None)
    absent = [h for h in names if known is not None and h not in known]
    if absent:
        raise KeyError(f"{what} {absent} are not hook points of the model (e.g. {sorted(known)[:3]})")


def _default_rep_hooks(model) -> list[str]:
    names = [n for n in model.hook_dict if n.endswith("hook_resid_post")]
    if not names:
        raise ValueError("the model has no hook_resid_post hook points; pass hooks=")
    return names


def _check_sites(sites) -> list[tuple[str, int | None]]:
    """``sites`` as a list of ``(hook name, head)`` pairs, each head an int or None; anything else (a bare hook
    name, a bool or fractional head) is refused naming the entry."""
    form = "(hook name, head index or None), e.g. ('blocks.0.attn.hook_z', 1) or ('blocks.1.hook_attn_out', None)"
    if isinstance(sites, str | Mapping) or not isinstance(sites, Iterable):
        raise TypeError(f"sites is a {type(sites).__name__}; give a list of {form}")
    sites = list(sites)
    if not sites:
        raise ValueError("sites is empty: give the (hook name, head or None) components to resample")
    out = []
    for i, site in enumerate(sites):
        if isinstance(site, str) or not isinstance(site, tuple | list) or len(site) != 2:
            raise TypeError(f"sites[{i}] is {site!r}; give {form}")
        h, head = site
        if not isinstance(h, str):
            raise TypeError(f"sites[{i}] has hook name {h!r} ({type(h).__name__}); give a hook name string")
        if head is not None and (isinstance(head, bool | np.bool_) or not isinstance(head, int | np.integer)):
            raise TypeError(
                f"sites[{i}] has head {head!r} ({type(head).__name__}); give a head index (an int) or None for the "
                "whole activation"
            )
        out.append((h, None if head is None else int(head)))
    return out


def resample_implementations(
    model,
    tokens: torch.Tensor,
    sites: Sequence[tuple[str, int | None]],
    *,
    counterfactual: torch.Tensor | None = None,
    hooks: Sequence[str] | None = None,
) -> Callable[[int], torch.Tensor]:
    """A sampler of implementations for :func:`interpretive_equivalence`: resample ablation of ``sites``.

    Each ``site`` is ``(hook name, head index or None)`` (e.g. ``("blocks.0.attn.hook_z", 1)``: head 1's output
    in layer 0, or ``("blocks.1.hook_attn_out", None)``); these are the components the interpretation says do not
    matter. ``sampler(seed)`` runs ``model`` on ``tokens`` with every site's activation replaced, input by input,
    by its activation on a random other input (drawn with ``seed`` from ``counterfactual``, default ``tokens``
    itself, input ``i`` then drawing among the inputs other than ``i``) and returns :func:`representations` at
    ``hooks``. A model in ``train()`` mode whose forward is random there (dropout) is run with its ``eval()``
    forward, with a warning, and left in its mode: an implementation differs from the model only at ``sites``.
    """
    model = _hooked(model, "resample_implementations", _site_hook_names(sites, hooks))
    tokens = _check_rep_tokens(model, tokens, "tokens")
    sites = _check_sites(sites)
    if counterfactual is not None:
        counterfactual = _check_rep_tokens(model, counterfactual, "counterfactual")
    cf = tokens if counterfactual is None else counterfactual
    if counterfactual is None and tokens.shape[0] < 2:
        raise ValueError(
            f"tokens holds {tokens.shape[0]} input: each input is resampled from another one, so give at least 2 "
            "inputs, or counterfactual inputs to draw from"
        )
    if cf.shape[1:] != tokens.shape[1:]:
        raise ValueError(
            f"counterfactual inputs must have shape (m, {tuple(tokens.shape[1:])}), got {tuple(cf.shape)}"
        )
    rep_hooks = _rep_hooks(model, hooks)
    _refuse_unknown_hooks(model, rep_hooks, "hooks")  # before a sampler is handed out, not at its first call
    hook_names = sorted({h for h, _ in sites})
    _refuse_unknown_hooks(model, hook_names, "site hooks")  # named before the forward
    with torch.no_grad(), eval_mode_if_random(model, "resample_implementations runs it"):
        _, cf_cache = model.run_with_cache(cf, names_filter=hook_names)
    for h in hook_names:
        if h not in cf_cache:
            raise KeyError(f"site hook {h!r} was not reached in the forward pass")
    head_site = {}  # hook name -> its patching site ("z", "pattern", ...) when a head of it is resampled
    for h, head in sites:
        if head is None:
            continue
        site = h.rsplit("hook_", 1)[-1]
        if site not in HEAD_SITES:
            raise ValueError(f"{h!r} is not a per-head hook point ({', '.join(HEAD_SITES)}); give head None")
        head_dim = 1 if site == "pattern" else 2
        if not 0 <= head < cf_cache[h].shape[head_dim]:
            raise ValueError(f"head {head} is out of range for {h!r} with shape {tuple(cf_cache[h].shape)}")
        head_site[h] = site
    n, m = tokens.shape[0], cf.shape[0]

    own = counterfactual is None and m > 1  # from the inputs themselves: input i draws one of the others

    def sample(seed: int) -> torch.Tensor:
        # a NumPy integer as its int; None, a bool, a float or an int a generator cannot take refused naming seed
        gen = torch.Generator().manual_seed(_generator_seed(seed, "seed"))
        if own:
            idx = torch.randint(0, m - 1, (n,), generator=gen, device="cpu")  # a CPU index serves any device
            idx = idx + (idx >= torch.arange(n, device="cpu")).long()  # skip i itself
        else:
            idx = torch.randint(0, m, (n,), generator=gen, device="cpu")

        def make(heads):
            def fn(x, hook):
                src = cf_cache[hook.name][idx]  # a new tensor: input i gets input idx[i]'s activation
                if None in heads:
                    return src
                for head in heads:
                    x = apply_patch(x, src, head_site[hook.name], head, -1)
                return x

            return fn

        fwd = [(h, make([hd for hh, hd in sites if hh == h])) for h in hook_names]
        with eval_mode_if_random(model, "the sampler runs it"), model.hooks(fwd):
            return representations(model, tokens, rep_hooks)

    return sample


# the CCA family, ridge with efficient leave-one-out, and the authors' interpretive-equivalence protocol live in
# their own modules; they are part of this module's public API
from .cca import cca, pwcca, svcca  # noqa: E402
from .ridge import RidgeLOO, ridge_cv, ridge_similarity_cv, warn_constant_target  # noqa: E402

__all__ += ["cca", "svcca", "pwcca", "RidgeLOO", "ridge_cv", "ridge_similarity_cv"]
