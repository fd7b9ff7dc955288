"""Ridge regression with the penalty chosen by efficient leave-one-out (LOO) cross-validation over a grid, and the
ridge similarity of interpretive equivalence built on it.

One decomposition per design matrix serves every penalty and every target
----------------------------------------------------------------------------
With an unpenalised intercept, ridge on ``(X, Y)`` is ridge without intercept on the centred ``Xc = X - mean``,
``Yc = Y - mean``; its hat matrix is ``H = 1 1^T / n + Xc (Xc^T Xc + a I)^-1 Xc^T``. Let ``U (n, r)``, ``w (r,)``
be an orthonormal basis of the column space of ``Xc`` and the squared singular values (from the eigendecomposition
of ``Xc Xc^T`` when ``n <= p``, of ``Xc^T Xc`` when ``n > p``). Then, for each penalty ``a`` with
``f = w / (w + a)``:

* fitted residuals ``R = Yc - U diag(f) U^T Yc`` (``U^T Yc`` is formed once for all penalties),
* leverages ``h_i = 1 / n + sum_j U_ij^2 f_j``,
* LOO residuals ``R_i / (1 - h_i)`` (exact: the LOO fit refits the intercept too).

Both are taken as sums of positive terms in ``g = 1 - f = a / (w + a)``: with ``n <= p`` ``U`` is a complete
orthonormal basis of the (centred) samples' space, so ``R = U diag(g) U^T Yc`` and ``1 - h_i = sum_j U_ij^2 g_j``;
with ``n > p`` the parts outside the column space are added. Differences of nearly equal numbers (a penalty small
against the features' scale) would otherwise lose every digit.

Cost: the decomposition (``min(n, p)^2 max(n, p)`` for the Gram plus its eigendecomposition), ``n r t`` for
``U^T Yc``, ``n r t`` per penalty, and the coefficients of the chosen penalty. The criterion is the mean squared
LOO residual over all samples and targets (one penalty for all targets), or per target (``alpha_per_target``):
scikit-learn's ``RidgeCV`` with its default scoring, which this matches (bench/bench_ridge.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import refuse_meta

__all__ = ["RidgeLOO", "RidgeCVResult", "ridge_cv", "ridge_similarity_cv", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = (0.1, 1.0, 10.0)


def _as_2d(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))  # numpy views with negative strides too
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (num_samples, ...), got {type(x)}"
        )
    refuse_meta(x, name)
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (num_samples, ...), got a scalar")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {x.dtype}; give real-valued features")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has 0 samples (shape {tuple(x.shape)}); give at least one row per input")
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}); give at least one per sample")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)  # read as values
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}); give at least one per sample")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains {int((~torch.isfinite(x)).sum())} non-finite values")
    return x


def _check_alphas(alphas) -> torch.Tensor:
    try:
        if isinstance(alphas, torch.Tensor):
            a = alphas.detach().to(torch.float64)
        else:  # checked on the CPU; fit() moves them to the data's device
            a = torch.as_tensor(list(alphas), dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"alphas must be a non-empty 1-d sequence of positive finite penalties, got {alphas!r}"
        ) from None
    if a.dim() != 1 or a.numel() == 0 or bool((a <= 0).any()) or not bool(torch.isfinite(a).all()):
        raise ValueError(
            f"alphas must be a non-empty 1-d sequence of positive finite penalties, got {alphas!r}"
        )
    return a


@dataclass
class RidgeCVResult:
    """Result of :meth:`RidgeLOO.fit` / :func:`ridge_cv`.

    Attributes
    ----------
    alphas : Tensor ``(num_alphas,)``
    alpha : float, or Tensor ``(num_targets,)`` with ``alpha_per_target``
        The penalty with the smallest mean squared LOO residual (the first on ties).
    loo_mse : Tensor ``(num_alphas,)``, or ``(num_alphas, num_targets)`` with ``alpha_per_target``
        Mean squared LOO residual of each penalty.
    coef : Tensor ``(num_features, num_targets)``
    intercept : Tensor ``(num_targets,)``

    Every tensor is float64 on the device of the design matrix ``x`` (targets on another device are moved there).
    """

    alphas: torch.Tensor
    alpha: float | torch.Tensor
    loo_mse: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor

    def predict(self, x) -> torch.Tensor:
        """``(m, num_features)`` -> ``(m, num_targets)``."""
        x = _as_2d(x, "x")
        if x.shape[1] != self.coef.shape[0]:
            raise ValueError(f"x has {x.shape[1]} features; the fit has {self.coef.shape[0]}")
        return x.to(self.coef.device) @ self.coef + self.intercept


def _centred_basis(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """An orthonormal basis ``(n, n - 1)`` of the vectors summing to 0: the last ``n - 1`` columns of the
    Householder reflection that maps ``e_1`` to ``1 / sqrt(n)``; on ``device`` (that of the data)."""
    v = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64, device=device)
    v[0] -= 1.0
    h = torch.eye(n, dtype=torch.float64, device=device) - 2.0 * torch.outer(v, v) / (v @ v)
    return h[:, 1:]


class RidgeLOO:
    """The decomposition of one design matrix ``x (n, p)``, reused by every :meth:`fit` (any targets, any
    penalties).

    Parameters
    ----------
    x : Tensor or array ``(n, ...)``
        Trailing dimensions are flattened into ``p`` features; float64 throughout.
    fit_intercept : bool
        Unpenalised intercept (centre ``x`` and the targets); the LOO residuals then refit it too.
    """

    def __init__(self, x, *, fit_intercept: bool = True) -> None:
        x = _as_2d(x, "x")
        n, p = x.shape
        if n < 3:
            raise ValueError(f"x has {n} samples; leave-one-out needs at least 3")
        self.n, self.p = n, p
        self.fit_intercept = fit_intercept
        # every tensor of the fit lives on the data's device (a CUDA x: the whole fit on CUDA)
        self.x_mean = x.mean(0) if fit_intercept else torch.zeros(p, dtype=torch.float64, device=x.device)
        xc = x - self.x_mean if fit_intercept else x
        self.gram_mode = n <= p
        if self.gram_mode:
            # a complete orthonormal basis of the samples' space (with an intercept: of the centred space, the
            # constant direction left out), so that residuals and 1 - leverages are sums of positive terms
            # a / (w + a), never differences of nearly equal numbers
            gram = xc @ xc.T
            if fit_intercept:
                q = _centred_basis(n, x.device)  # (n, n - 1)
                w, v = torch.linalg.eigh(q.T @ gram @ q)
                u = q @ v
            else:
                w, u = torch.linalg.eigh(gram)  # (n,), (n, n)
            self._xc = xc  # coefficients are xc^T times the dual solution
        else:
            w, v = torch.linalg.eigh(xc.T @ xc)  # (p,), (p, p)
            keep = w > w.max().clamp_min(0) * p * torch.finfo(torch.float64).eps
            w, v = w[keep], v[:, keep]
            u = (xc @ v) / w.sqrt()
            self._v = v
        self.w = w.clamp_min(0)
        self.u = u
        self._u2 = u * u
        # leverage outside the basis (primal form: the rest of the samples' space), 0 for a complete basis
        base = 1.0 / n if fit_intercept else 0.0
        # (a basis of all of the centred space leaves nothing outside: exactly 0, not a difference of ones)
        self.complete = self.gram_mode or u.shape[1] == n - (1 if fit_intercept else 0)
        self._outside = None if self.complete else (1.0 - base - self._u2.sum(1)).clamp_min(0)

    def fit(
        self, y, alphas: Sequence[float] = DEFAULT_ALPHAS, *, alpha_per_target: bool = False
    ) -> RidgeCVResult:
        """Fit ``y (n, ...)`` for every penalty in ``alphas``; keep the one with the smallest mean squared LOO
        residual (over all targets, or per target with ``alpha_per_target``)."""
        y = _as_2d(y, "y")
        if y.shape[0] != self.n:
            raise ValueError(f"y has {y.shape[0]} samples; x has {self.n}")
        dev = self.u.device  # the fit's (x's): targets, penalties and criteria are read there
        y = y.to(dev)
        a = _check_alphas(alphas).to(dev)
        y_mean = y.mean(0) if self.fit_intercept else torch.zeros(y.shape[1], dtype=torch.float64, device=dev)
        yc = y - y_mean if self.fit_intercept else y
        b = self.u.T @ yc  # (r, t), shared by every penalty
        rest = None if self.complete else yc - self.u @ b  # the targets outside the column space
        mse = torch.empty(len(a), y.shape[1], dtype=torch.float64, device=dev)
        for i, alpha in enumerate(a.tolist()):
            g = alpha / (self.w + alpha)  # 1 - w / (w + a), without the subtraction
            resid = self.u @ (g[:, None] * b)
            one_minus_h = self._u2 @ g
            if rest is not None:
                resid = resid + rest
                one_minus_h = one_minus_h + self._outside
            mse[i] = ((resid / one_minus_h[:, None]) ** 2).mean(0)
        if alpha_per_target:
            best = mse.argmin(0)  # (t,), first minimum
            d = 1.0 / (self.w[:, None] + a[best][None, :])  # (r, t)
            coef = self._coef(d * b)
            alpha_out: float | torch.Tensor = a[best]
            loo = mse
        else:
            loo = mse.mean(1)
            best = int(loo.argmin())
            coef = self._coef(b / (self.w + a[best])[:, None])
            alpha_out = float(a[best])
        intercept = y_mean - self.x_mean @ coef
        return RidgeCVResult(alphas=a, alpha=alpha_out, loo_mse=loo, coef=coef, intercept=intercept)

    def _coef(self, db: torch.Tensor) -> torch.Tensor:
        """Coefficients ``(p, t)`` from ``diag(1 / (w + a)) U^T Yc`` (``(r, t)``)."""
        if self.gram_mode:
            return self._xc.T @ (self.u @ db)
        return self._v @ (self.w.sqrt()[:, None] * db)


def ridge_cv(
    x,
    y,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    fit_intercept: bool = True,
    alpha_per_target: bool = False,
) -> RidgeCVResult:
    """Ridge regression of ``y (n, ...)`` on ``x (n, ...)`` with the penalty chosen from ``alphas`` by efficient
    leave-one-out (see the module docstring): one decomposition of ``x`` for all penalties and targets."""
    return RidgeLOO(x, fit_intercept=fit_intercept).fit(y, alphas, alpha_per_target=alpha_per_target)


def train_test_split(n: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed={seed!r} is not valid; give an int (it draws the train/test split)")
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float | np.floating):
        raise ValueError(f"train_fraction must be a number in (0, 1), got {train_fraction!r}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if n < 5:
        raise ValueError(
            f"the representations have {n} inputs; a train/test split needs at least 5 (3 to fit, 2 held out)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed), device="cpu")  # the generator's
    k = min(max(int(round(train_fraction * n)), 3), n - 2)
    return perm[:k], perm[k:]


def _uniform_r2(y_te: torch.Tensor, pred: torch.Tensor) -> float:
    """R^2 of each column on the held-out rows, averaged uniformly over columns (constant columns skipped). A
    column is constant when its spread is rounding of its own magnitude, whatever the other columns' scales: a
    column's R^2 does not depend on its scale, and neither does which columns count."""
    sst = ((y_te - y_te.mean(0)) ** 2).sum(0)
    sse = ((y_te - pred) ** 2).sum(0)
    eps = torch.finfo(y_te.dtype).eps
    ok = sst > y_te.shape[0] * (64 * eps * y_te.abs().amax(0)) ** 2
    if not bool(ok.any()):
        return math.nan
    return float((1.0 - sse[ok] / sst[ok]).mean())


def ridge_similarity_cv(
    x,
    ys,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    train_fraction: float = 0.9,
    seed: int = 0,
    sqrt: bool = True,
) -> float | list[float]:
    """The ridge similarity ``s(x -> y)`` of the authors' released code: ridge from ``x`` to ``y`` with an
    intercept, the penalty chosen from ``alphas`` by efficient LOO on a random ``train_fraction`` of the samples,
    scored by the held-out ``R^2`` averaged uniformly over ``y``'s columns; ``sqrt(max(R^2, 0))`` with ``sqrt``
    (else ``R^2`` itself). Not symmetric.

    Parameters
    ----------
    x : ``(n, ...)``
    ys : ``(n, ...)`` or a list of them
        With a list, ``x``'s decomposition is shared (one split, one eigendecomposition) and one value per target
        is returned; each target gets its own penalty.
    seed : int
        Draws the split.
    """
    xf = _as_2d(x, "x")
    single = not isinstance(ys, (list, tuple))
    targets = [ys] if single else list(ys)
    tf = [_as_2d(y, f"ys[{i}]").to(xf.device) for i, y in enumerate(targets)]  # read on x's device
    for i, y in enumerate(tf):
        if y.shape[0] != xf.shape[0]:
            raise ValueError(
                f"x has {xf.shape[0]} samples but ys[{i}] has {y.shape[0]}: give the same inputs"
            )
    tr, te = train_test_split(xf.shape[0], train_fraction, seed)
    solver = RidgeLOO(xf[tr])
    out = []
    for y in tf:
        res = solver.fit(y[tr], alphas)
        r2 = _uniform_r2(y[te], res.predict(xf[te]))
        out.append(math.sqrt(max(r2, 0.0)) if sqrt and not math.isnan(r2) else r2)
    return out[0] if single else out
