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

Scale
-----
Ridge with penalty ``a`` on ``x`` is ridge with penalty ``a / s^2`` on ``x / s`` (coefficients times ``s``). The
penalties are absolute: they are compared with the eigenvalues of the scatter matrix ``Xc^T Xc``, which grow with
the square of ``x``'s scale. Data whose squared values would leave float64's range (largest magnitude beyond
``2^450``, about 3e135, or below ``2^-450``) is computed scaled by a power of two ``s`` (exact), with the penalties
``a / s^2`` (exact too), and the results are given in the data's own units; likewise the targets. When a penalty
``a / s^2`` is itself outside float64's normal range (e.g. the default penalties against data of scale 1e300: the
ratio of scatter to penalty, about 1e600, has no float64 value), the fit is refused naming ``alphas`` and ``x``.

Cost: the decomposition (``min(n, p)^2 max(n, p)`` for the Gram plus its eigendecomposition), ``n r t`` for
``U^T Yc``, ``n r t`` per penalty, and the coefficients of the chosen penalty. The criterion is the mean squared
LOO residual over all samples and targets (one penalty for all targets), or per target (``alpha_per_target``):
scikit-learn's ``RidgeCV`` with its default scoring, which this matches (bench/bench_ridge.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import check_flag as _check_flag
from ._checks import refuse_meta

__all__ = [
    "RidgeLOO",
    "RidgeCVResult",
    "ridge_cv",
    "ridge_similarity_cv",
    "DEFAULT_ALPHAS",
    "DEFAULT_TRAIN_FRACTION",
    "MIN_HELD_OUT",
]

DEFAULT_ALPHAS = (0.1, 1.0, 10.0)

#: the fraction of the inputs the ridge similarity fits on by default (the authors' 90%) ...
DEFAULT_TRAIN_FRACTION = 0.9
#: ... holding out at least this many: the held-out R^2 of a column, 1 - SSE / SST, divides by a sum of squares of
#: (held-out - 1) degrees of freedom, whose reciprocal has unbounded variance below 5 of them
MIN_HELD_OUT = 6


def float64_device(device) -> torch.device:
    """Where float64 values computed from tensors on ``device`` are held: on ``device`` itself, or on the CPU for a
    device type without float64 (Apple's MPS). The estimators that sum in float64 (similarity measures, the
    susceptibility accumulators) compute there, so their results on other devices do not change."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 on :func:`float64_device` of its device (``t`` itself when it is float64 there already)."""
    return t.to(float64_device(t.device)).to(torch.float64)


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
    x = as_float64(
        x.detach().reshape(x.shape[0], -1)
    )  # read as values (on the CPU from a device without float64)
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}); give at least one per sample")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains {int((~torch.isfinite(x)).sum())} non-finite values")
    return x


# data of largest magnitude outside [2^-_SAFE_EXP, 2^_SAFE_EXP] is scaled by a power of two into that range: its
# scatter matrix (sums of n squares, up to about 2^900 n) neither overflows nor underflows
_SAFE_EXP = 450


def _scale_exponent(t: torch.Tensor) -> int:
    """``k`` such that ``t / 2^k`` has its largest magnitude in ``[2^-_SAFE_EXP, 2^_SAFE_EXP]`` (0 when it already
    has, or ``t`` is 0)."""
    size = float(t.abs().max())
    if size == 0.0:
        return 0
    e = math.frexp(size)[1]  # size in [2^(e - 1), 2^e)
    if e > _SAFE_EXP:
        return e - _SAFE_EXP
    if e - 1 < -_SAFE_EXP:
        return e - 1 + _SAFE_EXP
    return 0


def _ldexp(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t * 2^k``, exact unless the result leaves float64's range (``2^k`` need not be a float64 itself)."""
    while k:
        step = max(-1000, min(1000, k))
        t = t * math.ldexp(1.0, step)
        k -= step
    return t


def _check_alphas(alphas) -> torch.Tensor:
    try:
        if isinstance(alphas, torch.Tensor):
            a = as_float64(alphas.detach())
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

    The decomposition is of ``x / 2^x_exp`` (``x_exp`` 0 unless ``x``'s squares would leave float64's range; see
    the module docstring): ``x_mean``, ``w`` and ``u`` are in those units.
    """

    def __init__(self, x, *, fit_intercept: bool = True) -> None:
        _check_flag(fit_intercept, "fit_intercept")
        fit_intercept = bool(fit_intercept)
        x = _as_2d(x, "x")
        n, p = x.shape
        if n < 3:
            raise ValueError(f"x has {n} samples; leave-one-out needs at least 3")
        self.n, self.p = n, p
        self.fit_intercept = fit_intercept
        self.x_size = float(x.abs().max())
        self.x_exp = _scale_exponent(x)
        x = _ldexp(x, -self.x_exp)  # exact: a power of two
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
        residual (over all targets, or per target with ``alpha_per_target``). The results are in the units of
        ``x`` and ``y``; when one of them does not fit in float64 (coefficients or mean squared residuals beyond
        its range) the fit is refused naming ``x`` and ``y``."""
        y = _as_2d(y, "y")
        res, y_exp = self._fit_scaled(y, alphas, alpha_per_target)
        # back to the units of x and y: coefficients times 2^(y_exp - x_exp), intercepts times 2^y_exp, mean
        # squared residuals times 2^(2 y_exp)
        coef = _ldexp(res.coef, y_exp - self.x_exp)
        intercept = _ldexp(res.intercept, y_exp)
        loo = _ldexp(res.loo_mse, 2 * y_exp)
        for what, t in (
            ("coefficients", coef),
            ("intercepts", intercept),
            ("mean squared LOO residuals", loo),
        ):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"the ridge fit's {what} are beyond float64's range (x holds values up to {self.x_size:.3g}, "
                    f"y up to {float(y.abs().max()):.3g}); rescale x or y"
                )
        res.coef, res.intercept, res.loo_mse = coef, intercept, loo
        return res

    def _fit_scaled(self, y, alphas, alpha_per_target: bool) -> tuple[RidgeCVResult, int]:
        """:meth:`fit` of ``y / 2^y_exp`` (an exponent that keeps its squares in float64's range) with the penalties
        in the units of the decomposition: the result's ``coef``, ``intercept`` and ``loo_mse`` are those of
        ``x / 2^x_exp`` and ``y / 2^y_exp`` (its ``alphas`` and ``alpha`` the given penalties), and ``y_exp``."""
        _check_flag(alpha_per_target, "alpha_per_target")
        if y.shape[0] != self.n:
            raise ValueError(f"y has {y.shape[0]} samples; x has {self.n}")
        dev = self.u.device  # the fit's (x's): targets, penalties and criteria are read there
        y_exp = _scale_exponent(y)
        y = _ldexp(y.to(dev), -y_exp)
        given = _check_alphas(alphas).to(dev)
        a = self._scaled_alphas(given)
        y_mean = y.mean(0) if self.fit_intercept else torch.zeros(y.shape[1], dtype=torch.float64, device=dev)
        yc = y - y_mean if self.fit_intercept else y
        b = self.u.T @ yc  # (r, t), shared by every penalty
        rest = None if self.complete else yc - self.u @ b  # the targets outside the column space
        mse = torch.empty(len(a), y.shape[1], dtype=torch.float64, device=dev)
        w_min = self.w.min() if self.w.numel() else self.w.new_zeros(())
        for i, alpha in enumerate(a.tolist()):
            if self.complete:
                # g = a / (w + a) divided by its largest entry: a common factor of g cancels in resid / (1 - h),
                # and scaled so the terms do not all underflow where the penalty is negligible against the scatter
                g = (w_min + alpha) / (self.w + alpha)
            else:
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
            alpha_out: float | torch.Tensor = given[best]
            loo = mse
        else:
            loo = mse.mean(1)
            best = int(loo.argmin())
            coef = self._coef(b / (self.w + a[best])[:, None])
            alpha_out = float(given[best])
        intercept = y_mean - self.x_mean @ coef
        return RidgeCVResult(
            alphas=given, alpha=alpha_out, loo_mse=loo, coef=coef, intercept=intercept
        ), y_exp

    def _scaled_alphas(self, alphas: torch.Tensor) -> torch.Tensor:
        """The penalties for ``x / 2^x_exp``: ``alphas / 4^x_exp`` (exact), each checked to be a normal float64."""
        if self.x_exp == 0:
            return alphas
        out = []
        tiny, huge = torch.finfo(torch.float64).tiny, torch.finfo(torch.float64).max
        for v in alphas.tolist():
            try:
                s = math.ldexp(v, -2 * self.x_exp)
            except OverflowError:
                s = math.inf
            if not tiny <= s <= huge:
                side = "small" if s < tiny else "large"
                raise ValueError(
                    f"alphas holds the penalty {v:g}, too {side} against the scale of x for float64: x holds values "
                    f"up to {self.x_size:.3g}, so its scatter matrix X^T X reaches about {self.x_size:.3g}^2 and the "
                    "ratio of the two is beyond float64's range (the penalties are absolute, they do not scale with "
                    "x); rescale x (e.g. standardise its columns) and give penalties for the rescaled data"
                )
            out.append(s)
        return torch.tensor(out, dtype=torch.float64, device=alphas.device)

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
    leave-one-out (see the module docstring): one decomposition of ``x`` for all penalties and targets.

    The penalties are absolute, in the units of ``x`` squared: ridge minimises ``||Y - X B||^2 + a ||B||^2``, and
    ``a`` is compared with the eigenvalues of the centred scatter matrix ``Xc^T Xc`` (about ``n`` times the
    variance of ``x`` along each direction). Scaling ``x`` by ``s`` acts as the penalty ``a / s^2``: the default
    grid ``(0.1, 1, 10)`` barely penalises standardised features on hundreds of samples, and on data of scale 1e-3
    penalises everything to 0. Choose the grid relative to the data, e.g. a log-spaced range around the mean
    eigenvalue ``||Xc||_F^2 / p`` (``torch.logspace(-3, 3, 13) * (xc ** 2).sum() / p``), or standardise ``x``
    first. ``fit_intercept`` and ``alpha_per_target`` are bools.
    """
    return RidgeLOO(x, fit_intercept=fit_intercept).fit(y, alphas, alpha_per_target=alpha_per_target)


def train_test_split(n: int, train_fraction: float | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random split of ``n`` inputs drawn from ``seed``: ``(fit rows, held-out rows)``, at least 3 to fit and 2
    held out. ``train_fraction`` (in (0, 1)) of the inputs are fit, rounded; ``None`` is
    ``DEFAULT_TRAIN_FRACTION`` (the authors' 90%) holding out at least ``MIN_HELD_OUT`` inputs while at least half of
    them stay to fit (this changes the split only for fewer than 56 inputs, where 90% holds out fewer than 6)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed={seed!r} is not valid; give an int (it draws the train/test split)")
    k = _fit_size(n, train_fraction)
    # a NumPy integer as the int it holds (torch's manual_seed takes Python ints only)
    perm = torch.randperm(
        n, generator=torch.Generator().manual_seed(int(seed)), device="cpu"
    )  # the generator's
    return perm[:k], perm[k:]


def _fit_size(n: int, train_fraction: float | None) -> int:
    """How many of ``n`` inputs :func:`train_test_split` fits on (``train_fraction`` checked)."""
    if train_fraction is not None:
        if isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float | np.floating):
            raise ValueError(f"train_fraction must be a number in (0, 1) or None, got {train_fraction!r}")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1) (or None), got {train_fraction}")
    if n < 5:
        raise ValueError(
            f"the representations have {n} inputs; a train/test split needs at least 5 (3 to fit, 2 held out)"
        )
    frac = DEFAULT_TRAIN_FRACTION if train_fraction is None else train_fraction
    k = min(max(int(round(frac * n)), 3), n - 2)
    if train_fraction is None:  # at least MIN_HELD_OUT held out, but at least half of the inputs fit
        k = max(3, (n + 1) // 2, min(k, n - MIN_HELD_OUT))
    return k


def warn_few_held_out(fn: str, n: int, train_fraction: float | None) -> None:
    """Warn (naming ``fn`` and ``train_fraction``) when the split of ``n`` inputs holds out fewer than
    ``MIN_HELD_OUT``: the held-out R^2 of each column, ``1 - SSE / SST``, then divides by a sum of squares with
    fewer than 5 degrees of freedom, which comes arbitrarily close to 0 (its reciprocal has unbounded variance),
    and the mean over columns is dominated by a few columns whose held-out values nearly coincide."""
    held = n - _fit_size(n, train_fraction)
    if held >= MIN_HELD_OUT:
        return
    from .sampling.diagnostics import user_stacklevel

    if n >= 2 * MIN_HELD_OUT:
        fix = (
            f"hold out at least {MIN_HELD_OUT}: train_fraction <= {(n - MIN_HELD_OUT) / n:.3g} with {n} inputs, or "
            f"train_fraction=None (the default: 90%, at least {MIN_HELD_OUT} held out)"
        )
    else:
        fix = f"give at least {2 * MIN_HELD_OUT} inputs ({MIN_HELD_OUT} held out, as many to fit)"
    warnings.warn(
        f"{fn}: train_fraction={train_fraction!r} on {n} inputs holds out {held}; the held-out R^2 of a column "
        f"from fewer than {MIN_HELD_OUT} inputs is unstable (a column whose few held-out values nearly coincide "
        f"gives an R^2 of -100 or below, and the mean over columns follows it): {fix}",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _varying_columns(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sst, ok)`` of the columns of ``y``: their total sum of squares about the mean, and whether each varies.
    A column is constant when its spread is rounding of its own magnitude, whatever the other columns' scales."""
    sst = ((y - y.mean(0)) ** 2).sum(0)
    eps = torch.finfo(y.dtype).eps
    return sst, sst > y.shape[0] * (64 * eps * y.abs().amax(0)) ** 2


def _uniform_r2(y_te: torch.Tensor, pred: torch.Tensor) -> float:
    """R^2 of each column on the held-out rows, averaged uniformly over columns (constant columns skipped, see
    :func:`_varying_columns`): a column's R^2 does not depend on its scale, and neither does which columns
    count."""
    sst, ok = _varying_columns(y_te)
    if not bool(ok.any()):
        return math.nan
    sse = ((y_te - pred) ** 2).sum(0)
    return float((1.0 - sse[ok] / sst[ok]).mean())


def _pooled_r2(y_te: torch.Tensor, pred: torch.Tensor) -> float:
    """``1 - sum SSE / sum SST`` over every column of the held-out rows (the R^2 of the columns weighted by their
    variance, scikit-learn's ``multioutput="variance_weighted"``): unchanged by an orthogonal map of the target,
    under which both sums are. NaN when no column varies (see :func:`_varying_columns`)."""
    sst, ok = _varying_columns(y_te)
    if not bool(ok.any()):
        return math.nan
    return float(1.0 - ((y_te - pred) ** 2).sum() / sst.sum())


MULTIOUTPUT = ("uniform_average", "variance_weighted")


def warn_constant_target(fn: str, name: str, everywhere: bool, num_held_out: int) -> None:
    """Warn that the ridge similarity ``fn`` returns NaN because the target ``name`` has no variance to predict:
    constant over all the samples (``everywhere``) or only over the ``num_held_out`` held-out ones the split
    left. The warning points at the first line outside pypattern on the stack (the user's call)."""
    from .sampling.diagnostics import user_stacklevel

    where = (
        "over the samples (up to rounding)"
        if everywhere
        else f"over the {num_held_out} held-out samples of this split (up to rounding; it varies over the others)"
    )
    fix = (
        "give a target that varies"
        if everywhere
        else "draw another split (seed) or hold out more samples (a smaller train_fraction)"
    )
    warnings.warn(
        f"{fn}: {name} is constant {where}, so there is no variance to predict and the held-out R^2 is "
        f"undefined: NaN is returned; {fix}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def ridge_similarity_cv(
    x,
    ys,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    train_fraction: float | None = None,
    seed: int = 0,
    sqrt: bool = True,
    multioutput: str = "uniform_average",
) -> float | list[float]:
    """The ridge similarity ``s(x -> y)`` of the authors' released code: ridge from ``x`` to ``y`` with an
    intercept, the penalty chosen from ``alphas`` by efficient LOO on a random ``train_fraction`` of the samples
    (default 90%, holding out at least 6), scored by the held-out ``R^2`` averaged uniformly over ``y``'s columns;
    ``sqrt(max(R^2, 0))`` with ``sqrt`` (else ``R^2`` itself). Not symmetric.

    Invariances (exact, up to rounding), by the definition:

    * ``x -> x Q + c`` for any orthogonal ``Q`` and offset ``c``: the penalty ``||B||^2`` is unchanged by an
      orthogonal map of the predictors and the intercept is not penalised, so the predictions are the same.
    * ``y -> s y + c`` for any ``s != 0`` and offset ``c``: each column's R^2 is unchanged, and so is the penalty
      chosen (the leave-one-out criterion is multiplied by ``s^2``).

    Not invariant:

    * ``y -> y Q`` (a rotation of the target): the predictions rotate with it, but the uniform average of the
      columns' R^2 (the authors' definition) is a mean of ratios, which a rotation changes: ``s(x -> y Q)``
      differs from ``s(x -> y)`` in general (it does not for a permutation or sign flips of the columns).
      ``multioutput="variance_weighted"`` scores the pooled ``R^2 = 1 - sum SSE / sum SST`` instead, which is
      invariant to ``y -> y Q`` too.
    * ``y -> y D`` with ``D`` diagonal (columns scaled differently): each column's R^2 at a fixed penalty is
      unchanged, but the penalty is chosen by the leave-one-out residual summed over columns, which the scales
      weigh (invariant when ``alphas`` holds one penalty).
    * ``x -> s x``: the penalties are absolute (see ``alphas``); ``s x`` with penalty ``a`` is ``x`` with ``a /
      s^2``.

    Parameters
    ----------
    x : ``(n, ...)``
    ys : ``(n, ...)`` or a list of them
        With a list, ``x``'s decomposition is shared (one split, one eigendecomposition) and one value per target
        is returned; each target gets its own penalty. A target with no variance to predict (constant over the
        samples, or over the held-out ones of the split, up to rounding) has no R^2: its value is NaN, with a
        ``RuntimeWarning`` naming it (as :func:`~pypattern.equivalence.ridge_similarity`; CKA is NaN there too).
        A constant ``x`` predicts nothing but the mean: its similarity is 0.
    alphas : sequence of positive floats
        The penalty grid. The penalties are absolute, not relative to the scale of ``x`` (as in the authors'
        code): ridge on ``x`` scaled by ``s`` with penalty ``a`` is ridge on ``x`` with ``a / s^2``, so the same
        grid penalises representations of a small scale heavily (held-out R^2 near or below 0) and those of a
        large scale hardly at all (see :func:`ridge_cv`). To compare representations of different scales, choose
        the grid relative to each (e.g. around the mean eigenvalue of the centred scatter ``||Xc||_F^2 / p``) or
        standardise them first. The similarity does not change with the scale of the targets.
    train_fraction : float or None
        Fraction of the samples, in (0, 1), the penalty is chosen and the fit made on (by leave-one-out); the
        rest score it (rounded; at least 3 fit and 2 held out). ``None`` (default): the authors' 90%, but holding
        out at least ``MIN_HELD_OUT = 6`` samples while at least half remain to fit, which changes the split only
        for fewer than 56 samples. Each column's held-out ``R^2 = 1 - SSE / SST`` divides by a sum of squares of
        (held-out - 1) degrees of freedom; with fewer than 5 it comes arbitrarily close to 0, and the mean over
        columns is dominated by the few columns whose held-out values nearly coincide (on 24 samples, 90% holds out
        2, and the R^2 of unrelated data ranges over -6 to -1e4 where 6 held out give -0.5 to -3). A split that
        holds out fewer than 6 warns, naming ``train_fraction``.
    seed : int
        Draws the split.
    sqrt : bool
    multioutput : ``"uniform_average"`` (default) or ``"variance_weighted"``
        How the held-out R^2 of ``y``'s columns are combined: their mean (the authors' code; columns constant over
        the held-out samples skipped), or ``1 - sum SSE / sum SST`` over all columns (each column's R^2 weighted by
        its variance; invariant to a rotation of ``y``). The penalty is chosen the same way for both.
    """
    _check_flag(sqrt, "sqrt")
    if not isinstance(multioutput, str) or multioutput not in MULTIOUTPUT:
        raise ValueError(f"multioutput={multioutput!r} is not valid; choose one of {MULTIOUTPUT}")
    score = _uniform_r2 if multioutput == "uniform_average" else _pooled_r2
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
    warn_few_held_out("ridge_similarity_cv", xf.shape[0], train_fraction)
    solver = RidgeLOO(xf[tr])
    x_te = _ldexp(xf[te], -solver.x_exp)  # in the units of the decomposition
    out = []
    for i, y in enumerate(tf):
        # in the scaled units (exact powers of two) throughout: R^2 of each column does not change with them
        res, y_exp = solver._fit_scaled(y[tr], alphas, False)
        r2 = score(_ldexp(y[te], -y_exp), x_te @ res.coef + res.intercept)
        if math.isnan(r2):
            everywhere = not bool(_varying_columns(y)[1].any())
            warn_constant_target("ridge_similarity_cv", "ys" if single else f"ys[{i}]", everywhere, len(te))
        out.append(math.sqrt(max(r2, 0.0)) if sqrt and not math.isnan(r2) else r2)
    return out[0] if single else out
