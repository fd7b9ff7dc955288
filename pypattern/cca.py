"""The CCA family of representation similarities: canonical correlations (``cca``, with a ridge option), SVCCA
(Raghu et al. 2017) and PWCCA (Morcos et al. 2018).

Definitions
-----------
Both representations ``x (n, p)`` and ``y (n, q)`` of the same ``n`` inputs are centred (columns). The canonical
correlations are the singular values of ``Sxx^-1/2 Sxy Syy^-1/2`` (``S`` the scatter matrices ``Xc^T Xc`` etc.),
equivalently of ``Qx^T Qy`` with ``Qx``, ``Qy`` orthonormal bases of the centred column spaces: the cosines of the
principal angles between those spaces. There are ``min(rank x, rank y)`` of them (``min(p, q)`` for data of full
rank), in ``[0, 1]``, sorted descending. With ``ridge = r > 0`` each scatter matrix becomes ``S + r * mean_eig(S) *
I`` (the penalty is relative to the mean eigenvalue, so it does not depend on the scale of the data), and the
singular values are taken as above (regularised CCA; they shrink towards 0 as ``r`` grows).

With ``p >= n - 1`` (or ``q >= n - 1``) and no ridge the centred column space is the whole (centred) sample space
and the canonical correlations are all 1 whatever the data: the functions refuse it.

* ``svcca``: each representation is reduced to its top principal directions explaining ``threshold`` (default
  0.99) of its variance (the fewest directions that reach it), then CCA of the reduced representations; the
  similarity is the mean canonical correlation.
* ``pwcca`` (projection-weighted CCA, as Morcos et al. define it): the canonical correlations ``rho_i`` weighted
  by ``alpha_i = sum_j |<h_i, x_j>|``, with ``h_i`` the unit-norm canonical variates of ``x`` in sample space and
  ``x_j`` the centred columns (neurons) of ``x``: ``sum_i alpha_i rho_i / sum_i alpha_i``. Not symmetric: the
  weights come from the first argument. Two or more correlations equal to 1 next to smaller ones (x and y share
  a subspace: some columns in common, or more directions of variance together than samples - 1) are refused:
  the variates of a shared subspace are any of its bases and the weights depend on which.

Computation
-----------
One thin SVD ``Xc = U S V^T`` per centred representation, one product ``Ux^T Uy`` of the orthonormal bases
(``n kx ky``) and one SVD of that ``kx x ky`` matrix (scaled by ``S / sqrt(S^2 + lambda)`` per direction with a
ridge). The SVD is read from the eigendecomposition of the ``p x p`` scatter matrix when the data is well
conditioned (smallest eigenvalue above ``1e-6`` of the largest; ``U = Xc V / S``, about 3x faster), and computed
from the data otherwise, so that an ill-conditioned representation's condition number is not squared (canonical
correlations stay invariant to invertible maps of condition up to about ``1e12`` in float64). The PWCCA weights
are read from the SVD (``H^T Xc = L^T diag(S) V^T``), without forming the canonical variates. Everything in
float64. A direction counts as rank deficiency when its singular value is below the rounding level of the input:
``(sqrt(n) + sqrt(p)) * eps * max |x|`` with ``eps`` of the input's dtype (float32 data: ``1.2e-7``, bfloat16
``7.8e-3``; the float64 SVD's own ``max(n, p) * eps * S_max`` at least), read with every column scaled to unit
norm: a 16- or 32-bit copy of a rank-deficient representation keeps its rank, and one of full rank keeps its
directions above the rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._checks import refuse_meta
from .ridge import as_float64

__all__ = ["cca", "svcca", "pwcca"]


def _features(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))  # numpy views with negative strides too
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (num_samples, ...), got {type(x)}"
        )
    refuse_meta(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (num_samples, features...), got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype} (the imaginary part would be dropped)")
    # the input's rounding level (integers are exact: float64's), for the rank cutoff
    eps = max(torch.finfo(x.dtype).eps if x.dtype.is_floating_point else 0.0, torch.finfo(torch.float64).eps)
    if x.shape[0] == 0:
        raise ValueError(f"{name} has 0 samples (shape {tuple(x.shape)}); give at least one row per input")
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}); give at least one per sample")
    x = as_float64(x.detach().reshape(x.shape[0], -1))  # on the CPU from a device without float64
    if x.shape[0] < 3:
        raise ValueError(f"{name} has {x.shape[0]} samples; CCA needs at least 3")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains {int((~torch.isfinite(x)).sum())} non-finite values (NaN or inf)")
    # the measures are scale-invariant: scaled to 1, scatter matrices neither overflow nor underflow
    size = float(x.abs().max())
    if size > 0:
        x = x / size
    return x, eps


def _check_ridge(ridge: float) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, int | float | np.integer | np.floating):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    ridge = float(ridge)
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    return ridge


class _Side:
    """One centred representation: its thin SVD ``Xc = U S V^T`` restricted to the kept directions (``e = S^2``,
    the scatter matrix's eigenvalues, ``v = V``, ``u = U``), the whitening scale of each direction and its rank."""

    #: smallest eigenvalue of the scatter matrix, relative to the largest, for which the basis is read from its
    #: eigendecomposition (condition of the data below 1e3: the basis is orthonormal to about 1e-10); below it
    #: from the SVD of the data
    WELL_CONDITIONED = 1e-6

    def __init__(
        self, xe: tuple[torch.Tensor, float], name: str, ridge: float, threshold: float | None
    ) -> None:
        x, eps_in = xe
        if bool((x == x[:1]).all()):  # exactly: centring a constant leaves rounding noise, not zeros
            raise ValueError(f"{name} is constant over the samples: CCA is undefined")
        n, p = x.shape
        self.xc = x - x.mean(0)
        # a column constant over the samples centres to rounding noise, not zeros: zeroed (it carries no direction).
        # Its norm is at most sqrt(n) times its entries' rounding (the input's) or the float64 mean's (n roundings)
        f64 = torch.finfo(torch.float64).eps
        flat = self.xc.norm(dim=0) <= max(n**0.5 * eps_in / 2.0, n * f64) * x.abs().max(0).values
        if bool(flat.any()):
            self.xc[:, flat] = 0.0
        u, well = None, False
        if p <= n:  # well-conditioned data (the common case): from the p x p scatter matrix, about 3x faster
            e, v = torch.linalg.eigh(self.xc.T @ self.xc)
            e, v = e.flip(0), v.flip(1)  # descending
            well = float(e[-1]) > self.WELL_CONDITIONED * float(e[0])
        if (
            p > n or not well
        ):  # the SVD keeps the condition number of the data (the scatter matrix squares it)
            u, sv, vh = torch.linalg.svd(self.xc, full_matrices=False)  # descending
            e, v = sv.square(), vh.T
        else:
            sv = e.sqrt()
        # below the rounding level of the input (or of the SVD itself) a direction is noise, not data. The input's
        # rounding is relative to each entry, so the count of real directions is read with every column scaled to
        # unit norm (a feature 1e-6 times smaller than the others is as well determined as they are): rounding
        # errors, each at most half an eps_in of its entry and of either sign, form an (n, p) matrix whose spectral
        # norm is at most about (sqrt(n) + sqrt(p)) times that bound, the cutoff (a whole eps_in of the largest
        # entry would drop real directions of 16-bit data with a common offset: the rounding of an entry near a
        # large offset is half its spacing, not a whole eps_in of it). The spectrum of the data keeps that many
        # leading directions, down to the float64 SVD's own floor (max(n, p) roundings of the largest singular
        # value)
        big = max(n, p)
        norms = self.xc.norm(dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        sv_eq = torch.linalg.svdvals(self.xc / norms)
        noise = (n**0.5 + p**0.5) * eps_in * float((x.abs() / norms).max()) / 2.0
        tol_eq = max(noise, big * f64 * float(sv_eq[0]))
        real = min(int((sv_eq > tol_eq).sum()), int((sv > big * f64 * sv[0]).sum()))
        if threshold is not None:  # SVCCA: the fewest leading directions with >= threshold of the variance
            total = float(e.sum())
            if not total > 0:
                raise ValueError(f"{name} is constant over the samples: no variance to keep")
            frac = torch.cumsum(e, 0) / total
            q = torch.tensor([threshold], dtype=frac.dtype, device=frac.device)  # searchsorted: same device
            # never past the directions of nonzero variance: the cumulative fraction of those may round to just
            # below 1, and threshold=1 would keep a direction of rounding noise (a canonical correlation of 0)
            k = min(int(torch.searchsorted(frac, q)[0]) + 1, len(sv), max(real, 1))
            sv, e, v, u = sv[:k], e[:k], v[:, :k], None if u is None else u[:, :k]
        keep = torch.arange(len(sv), device=sv.device) < real  # a mask on the data's device
        self.rank = int(keep.sum())  # directions of nonzero variance
        if ridge == 0.0:
            if not bool(keep.any()):
                # not constant (checked above): every column's variation is within its entries' rounding
                raise ValueError(
                    f"{name}'s variation over the samples is all below the rounding of its input dtype (a large "
                    "common offset against a small spread): CCA is undefined; give the representations in a wider "
                    "dtype (float32 or float64), or with the offset subtracted before they are rounded"
                )
            sv, e, v, u = sv[keep], e[keep], v[:, keep], None if u is None else u[:, keep]
            dims = e.numel()  # the directions of nonzero variance: wide data of low rank is fine
            if dims >= n - 1:
                raise ValueError(
                    f"{name} has {dims} directions of nonzero variance"
                    f"{'' if threshold is None else ' (after the SVD reduction)'} for {n} samples: after centring, "
                    "canonical correlations are all 1 when they reach samples - 1; give more samples, fewer "
                    "features, or ridge > 0"
                )
            self.scale = 1.0 / sv
            self.shrink = torch.ones_like(sv)  # S * scale: 1 without a ridge
        else:
            # the mean of the scatter matrix's p eigenvalues (of the kept k with SVCCA), zeros included
            lam = ridge * float(e.sum()) / (p if threshold is None else e.numel())
            if not lam > 0:
                raise ValueError(f"{name} is constant over the samples: CCA is undefined")
            self.scale = (e + lam).rsqrt()
            self.shrink = sv * self.scale
        # u: U itself, or None when it is Xc V / S (read from the scatter matrix: never formed)
        self.sv, self.e, self.v, self.u = sv, e, v, u


def _basis_product(sx: _Side, sy: _Side) -> torch.Tensor:
    """``Ux^T Uy (kx, ky)``, with ``U = Xc V / S`` for a side whose ``U`` was not formed."""
    if sx.u is not None and sy.u is not None:
        return sx.u.T @ sy.u
    if sx.u is None and sy.u is None:  # Xc^T Yc (n p q), then the small factors
        return (sx.v / sx.sv).T @ (sx.xc.T @ sy.xc) @ (sy.v / sy.sv)
    if sx.u is None:
        return _basis_product(sy, sx).T
    return (sx.u.T @ sy.xc) @ (sy.v / sy.sv)


def _cca_svd(x, y, ridge: float, threshold: float | None):
    sx = _Side(x, "x", ridge, threshold)
    sy = _Side(y, "y", ridge, threshold)
    # (Vx diag(scale_x))^T Xc^T Yc (Vy diag(scale_y)) = diag(S_x scale_x) Ux^T Uy diag(S_y scale_y)
    m = sx.shrink[:, None] * _basis_product(sx, sy) * sy.shrink[None, :]  # (kx, ky)
    left, rho, _ = torch.linalg.svd(m, full_matrices=False)
    return sx, sy, left, rho.clamp(0.0, 1.0)


def _pair(x, y):
    x, y = _features(x, "x"), _features(y, "y")
    if x[0].shape[0] != y[0].shape[0]:
        raise ValueError(
            f"x and y must hold the same samples in the same order: x has {x[0].shape[0]} rows, y has "
            f"{y[0].shape[0]}"
        )
    if x[0].device != y[0].device:
        raise ValueError(f"x is on {x[0].device} but y is on {y[0].device}: give both on the same device")
    return x, y


def cca(x, y, *, ridge: float = 0.0) -> torch.Tensor:
    """All canonical correlations of ``x (n, ...)`` and ``y (n, ...)``, descending.

    Parameters
    ----------
    x, y : Tensor or array ``(n, ...)``
        Representations of the same inputs in the same order; trailing dimensions are flattened.
    ridge : float
        0 for plain CCA (then each representation needs fewer dimensions than samples), or ``r > 0`` to add ``r``
        times the mean eigenvalue to each scatter matrix (see the module docstring).

    Returns
    -------
    Tensor ``(min(rank x, rank y),)``, float64, in ``[0, 1]``.
    """
    x, y = _pair(x, y)
    sx, sy, _, rho = _cca_svd(x, y, _check_ridge(ridge), None)
    return rho[: min(sx.rank, sy.rank)]


def svcca(x, y, *, threshold: float = 0.99, ridge: float = 0.0, reduce: str = "mean") -> float | torch.Tensor:
    """SVCCA (Raghu et al. 2017): keep each representation's leading principal directions that explain
    ``threshold`` of its variance, then CCA of the reduced representations.

    Parameters
    ----------
    x, y : ``(n, ...)``
        Two representations of the same ``n`` inputs (every axis after the first is a feature).
    threshold : float in (0, 1]
        Fraction of variance kept (1 keeps every direction of nonzero variance, i.e. plain CCA).
    ridge : float
        As in :func:`cca`, applied to the reduced representations.
    reduce : ``"mean"`` | ``"none"``
        The mean canonical correlation (a float), or all of them (Tensor ``(min(k_x, k_y),)``).
    """
    if (
        isinstance(threshold, bool | np.bool_)
        or not isinstance(threshold, int | float | np.integer | np.floating)
        or not 0 < threshold <= 1
    ):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    x, y = _pair(x, y)
    rho = _cca_svd(x, y, _check_ridge(ridge), float(threshold))[3]
    return float(rho.mean()) if reduce == "mean" else rho


#: canonical correlations this close to 1 count as 1 (a shared direction of x and y; float64 rounding is ~1e-15)
_TIED_AT_ONE = 1e-9


def pwcca(x, y, *, ridge: float = 0.0) -> float:
    """Projection-weighted CCA (Morcos et al. 2018): the canonical correlations weighted by how much of ``x``'s
    neurons each canonical variate of ``x`` accounts for, ``sum_i alpha_i rho_i / sum_i alpha_i`` with
    ``alpha_i = sum_j |<h_i, x_j>|`` (see the module docstring). Weights come from ``x``: not symmetric."""
    x, y = _pair(x, y)
    sx, sy, left, rho = _cca_svd(x, y, _check_ridge(ridge), None)
    r = rho.numel()
    ones = int((rho >= 1.0 - _TIED_AT_ONE).sum())
    if 2 <= ones < r:
        n = x[0].shape[0]
        why = (
            f" (x has {sx.rank} and y {sy.rank} directions of nonzero variance, more than the {n - 1} of the "
            f"centred sample space together: they must share {sx.rank + sy.rank - (n - 1)})"
            if sx.rank + sy.rank > n - 1
            else ""
        )
        raise ValueError(
            f"pwcca: {ones} canonical correlations equal 1{why}; their canonical variates are any basis of the "
            "shared subspace, and the weights alpha_i (L1 sums over x's neurons) depend on which, so the value is not "
            "defined: give more samples, or leave out the columns x and y share"
        )
    # H^T Xc with H = Xc V diag(scale) L (canonical variates of x; unit norm without ridge): L^T diag(scale e) V^T
    proj = left[:, :r].T @ (sx.v * (sx.scale * sx.e)).T  # (r, p)
    h_norm = torch.sqrt(((left[:, :r] * (sx.scale * sx.e.sqrt())[:, None]) ** 2).sum(0))  # |h_i|
    alpha = proj.abs().sum(1) / h_norm
    total = float(alpha.sum())
    if not total > 0:
        return float(rho.mean())
    return float((alpha * rho).sum() / total)
