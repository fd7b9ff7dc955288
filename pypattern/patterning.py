"""Patterning: invert the linear response of structure to data into a data intervention.

Setting
-------
Structural coordinates ``mu = E_posterior[phi]`` (one per observable: a component's loss, a solution's LLC, a
principal susceptibility coordinate) respond linearly to small shifts of the data distribution. With data points
(or groups) ``z = 1..N`` and the perturbation ``q_h = q + sum_z h_z (delta_z - q)``::

    d mu = chi @ h,        chi[k, z] = d mu_k / d h_z   (the physics-convention susceptibilities)

Re-weighting the data with per-point weights ``w`` (mean 1; weight 1 is the original distribution) is the
perturbation ``h = (w - 1) / N`` (because ``sum (w - 1) = 0``). :func:`invert` finds the intervention that moves
``mu`` by a target ``d mu``.

When the ``N`` columns are a probe drawn from ``M`` training points (one column per probe sample, as
:func:`pypattern.susceptibilities` gives), re-weighting the probe's points inside the training data, the others at
weight 1, is ``h = (w - 1) / M``: give ``num_data=M`` to :func:`invert` (without it the prediction is ``M / N``
times the response the weights make). A per-token probe's padded and ``-100`` label columns are no data points:
give ``counted=result.probe_counted`` and they keep weight 1 while the counted columns alone hold the total.

Columns that are groups of data points (``G`` groups, group ``g`` holding the share ``f_g`` of the ``N_data``
points) follow the same rule with one weight ``W_g`` per group, ``d mu = chi (W - 1) / G``, when group ``g``'s
column is ``chi[:, g] = (G / N_data) sum_{z in g} chi_z``, which equals ``G f_g`` times the derivative of ``mu``
with respect to mixing in the group's distribution (``q + h (q_g - q)``). For groups of equal size ``G f_g = 1``
and the column is that mixing derivative itself; for unequal groups multiply each group's mixing derivative by
``G f_g`` before inverting (and give ``fractions``, below):

* ``"pinv"``: the minimum-norm ``h = chi_c^+ d mu`` (exact when the target is reachable);
* ``"ridge"``: ``h = chi_c^T (chi_c chi_c^T + alpha I)^-1 d mu`` (shrinks noisy directions of ``chi``);

  with ``chi_c = chi (I - 1 1^T / N)``, each row centred: ``h`` then sums to 0, so the weights have mean 1 and the
  response predicted is the one a re-weighting applies (a uniform part of ``h`` is no re-weighting at all);
* ``"constrained"``: weights ``w >= min_weight`` with ``mean(w) = 1`` exactly, minimising
  ``|chi (w - 1)/N - d mu|^2 + alpha |w - 1|^2 / N`` (solved through its dual in K variables, so N may be in
  the millions), i.e. a real re-weighting of the data with
  minimal deviation from uniform. When the columns are groups of unequal size, ``fractions`` (each group's share
  of the data) makes the fixed total the data-weighted one, ``sum_j f_j w_j = sum_j f_j``: the re-weighted data
  then keep mean weight 1 without any rescaling afterwards (a rescaling would change the response from the one
  predicted).

:func:`reweight` turns weights into a weighted-sampling loader or per-sample loss weights; :class:`OnlinePatterner`
re-estimates ``chi`` during training and re-inverts ("online" patterning).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from ._checks import device_arg, is_count, refuse_meta
from .io import Saveable, register
from .sampling.diagnostics import user_stacklevel
from .sampling.results import check_arrays

__all__ = ["invert", "Intervention", "reweight", "direction_target", "OnlinePatterner"]


@register
@dataclasses.dataclass
class Intervention(Saveable):
    """The result of :func:`invert`.

    Attributes
    ----------
    h : ndarray (N,)
        Data perturbation (mixing weights towards each point; sums to 0, or with :func:`invert`'s ``fractions``
        (``f``, normalised to sum 1) ``sum_i f_i h_i = 0``).
    weights : ndarray (N,)
        Per-point data weights ``1 + N h`` (``1 + M h`` with :func:`invert`'s ``num_data=M``) (mean 1, or with
        ``fractions`` the ``f``-weighted mean 1). Only
        ``"constrained"`` guarantees them non-negative (``>= min_weight``).
    predicted : ndarray (K,)
        The predicted response ``chi @ h``.
    target : ndarray (K,)
    residual : float
        ``|predicted - target| / |target|``: the fraction of the target that is not reachable (0 = reached).
    method : str
    """

    h: np.ndarray
    weights: np.ndarray
    predicted: np.ndarray
    target: np.ndarray
    residual: float
    method: str

    def _check_loaded(self) -> None:
        """The arrays agree (a file read by :meth:`load`): ``h`` and ``weights`` one entry per data point or group,
        ``predicted`` and ``target`` one per observable, all finite numbers, ``residual`` finite and >= 0; ``method``
        one of :func:`invert`'s."""
        check_arrays(
            {"h": self.h, "weights": self.weights, "predicted": self.predicted, "target": self.target},
            {"h": ("N",), "weights": ("N",), "predicted": ("K",), "target": ("K",)},
        )
        if self.method not in ("pinv", "ridge", "constrained"):
            raise ValueError(f"method must be 'pinv', 'ridge' or 'constrained', got {self.method!r}")
        for name in ("h", "weights", "predicted", "target"):  # (invert gives finite numbers only)
            if not np.isfinite(np.asarray(getattr(self, name), dtype=np.float64)).all():
                raise ValueError(f"{name} holds NaN or Inf; an Intervention holds finite numbers")
        if not (math.isfinite(self.residual) and self.residual >= 0):
            raise ValueError(f"residual must be a finite number >= 0, got {self.residual!r}")

    def per_sample(self, groups: Sequence[int] | np.ndarray) -> np.ndarray:
        """Expand group weights to samples: ``groups[i]`` is the group of sample ``i``."""
        raw = np.asarray(groups)
        if raw.size and not (np.issubdtype(raw.dtype, np.integer) and raw.dtype != np.bool_):
            raise ValueError(f"groups must be integer group indices, got dtype {raw.dtype}")
        groups = raw.astype(np.int64)
        if groups.size and (groups.min() < 0 or groups.max() >= len(self.weights)):
            raise ValueError(
                f"groups must index the {len(self.weights)} weights, got range "
                f"[{groups.min()}, {groups.max()}]"
            )
        return self.weights[groups]


def _as_float64(x, name: str) -> np.ndarray:
    """``x`` (the argument ``name``) as a float64 array; a tensor is read as values (detached, on the CPU: one that
    tracks gradients converts to numpy only so). Complex values, a meta tensor and what is not numbers are refused
    by name (a complex array's imaginary part would be dropped), and so are bools (a mask is not a set of values)."""
    if isinstance(x, torch.Tensor):
        refuse_meta(x, name, "its values")
        x = x.detach().cpu()
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array of real numbers: {e}") from None
    if a.dtype.kind == "c":
        raise TypeError(f"{name} is complex ({a.dtype}); give real numbers")
    if a.dtype.kind == "b":  # a mask read as 0/1 numbers would pass silently for weights it was not meant as
        raise TypeError(
            f"{name} holds bools (True/False); give real numbers (a mask meant as 0/1 values converted: "
            "numpy's .astype(float), torch's .float())"
        )
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be an array of real numbers, got {a.dtype} values")
    return a.astype(np.float64)


def _as_2d(chi) -> np.ndarray:
    if hasattr(chi, "chi") and not isinstance(chi, np.ndarray | torch.Tensor):  # a susceptibilities() result
        raise TypeError(
            f"chi is a {type(chi).__name__}; give its matrix, result.chi (K, N) (and to invert, "
            "counted=result.probe_counted: its padded and -100 label columns are not data points)"
        )
    chi = _as_float64(chi, "chi")
    if chi.ndim == 1:
        chi = chi[None, :]
    if chi.ndim != 2:
        raise ValueError(f"chi must be (num_observables, num_data), got shape {chi.shape}")
    if chi.shape[1] == 0:
        raise ValueError("chi has no data columns: nothing to re-weight")
    if chi.shape[0] == 0:
        raise ValueError("chi has no observables (shape (0, N)): there is no response to move")
    if not np.isfinite(chi).all():
        raise ValueError("chi holds NaN or Inf")
    return chi


def _counted_mask(counted, n: int) -> np.ndarray:
    """``counted`` (:func:`invert`'s argument) as a bool array ``(n,)`` with at least one True, else refused by
    name."""
    if isinstance(counted, torch.Tensor):
        refuse_meta(counted, "counted", "its values")
        counted = counted.detach().cpu().numpy()
    try:
        mask = np.asarray(counted)
    except (TypeError, ValueError) as e:
        raise TypeError(f"counted must be an array of bools, one per column of chi: {e}") from None
    if mask.dtype != np.bool_:
        raise TypeError(
            f"counted must be an array of bools (True where a column is a data point), got {mask.dtype} values"
        )
    if mask.shape != (n,):
        raise ValueError(f"counted has shape {mask.shape}; give one bool per column of chi, shape ({n},)")
    if not mask.any():
        raise ValueError(
            "counted is False at every column of chi (all padding or -100 labels): there is no data point to "
            "re-weight"
        )
    return mask


def invert(
    chi,
    target,
    *,
    method: str = "pinv",
    alpha: float = 0.0,
    min_weight: float | None = None,
    max_weight: float | None = None,
    rcond: float | None = None,
    fractions=None,
    num_data: int | None = None,
    counted=None,
) -> Intervention:
    """Find the data intervention ``h`` with ``chi @ h ≈ target`` (see the module docstring).

    Parameters
    ----------
    chi : array (K, N)
        Susceptibilities of K observables to N data points or groups (physics convention; a group's column as the
        module docstring says: ``G f_g`` times the derivative for mixing in the group's distribution).
    target : array (K,)
        Desired change ``d mu`` of the observables.
    method : {"pinv", "ridge", "constrained"}
    alpha : float
        Ridge strength (``"ridge"``, must be > 0) or the penalty on ``|w - 1|^2 / N`` (``"constrained"``).
        ``"ridge"`` minimises ``|chi_c (w - 1) / M - d mu|^2 + alpha |w - 1|^2 / N^2`` (``M = N`` unless
        ``num_data=M``): a penalty on the weights whatever ``num_data``, so that with ``num_data=M`` the
        perturbation is ``h = chi_c^T (chi_c chi_c^T + alpha (M / N)^2 I)^-1 d mu``.
    min_weight, max_weight : float, optional
        Bounds on the weights for ``"constrained"`` only (default: non-negative, unbounded above; ``min_weight``
        must be >= 0: a weight is a multiplicity of data).
    rcond : float, optional
        Cut-off for small singular values in ``"pinv"``.
    fractions : array (N,), optional
        ``"constrained"`` only: each column's share of the data (groups of unequal size; positive, any scale).
        The total kept fixed is then ``sum_j f_j w_j = sum_j f_j`` instead of ``sum_j w_j = N``.
    num_data : int, optional
        The size ``M`` of the training data when the ``N`` columns are some of its points only (a probe drawn
        from it, as :func:`pypattern.susceptibilities` gives, one column per probe sample): the weights then
        re-weight those ``N`` points inside the ``M``, every other point keeping weight 1, and a point's
        perturbation is ``h = (w - 1) / M``, not ``(w - 1) / N`` (re-weighting ``N`` of ``M`` points moves the
        data ``N / M`` times as far as re-weighting all of them). Default: the columns are the whole data
        (``M = N``). Without it, the weights of a probe's columns applied inside a larger data set move ``mu``
        ``N / M`` of the way predicted. Not with ``fractions`` (groups partition the data). The data's weights
        for :func:`reweight` are then 1 at every point but the columns' rows, which take ``weights``:
        ``w = np.ones(M); w[probe_rows] = plan.weights``.
    counted : array (N,) of bool, optional
        Which columns are data points: False at columns that are none (padding and ``-100`` labels of a per-token
        ``chi``, :attr:`pypattern.SusceptibilityResult.probe_counted`, whose ``chi`` is 0). Those columns are left
        out of the inversion: they get ``h = 0`` and weight 1, and the others alone hold the total (their weights
        have mean 1, their ``h`` sums to 0, ``N`` above is their number and ``num_data`` is at least it). Default:
        every column counts; a ``chi`` with columns that are exactly 0 beside others that are not then warns
        (as data points, such columns take weights that re-balance the others): give ``counted`` to say which
        columns count (``np.ones(N, bool)`` when all do).
    """
    chi = _as_2d(chi)
    k, n_all = chi.shape
    keep = None
    if counted is not None:
        keep = _counted_mask(counted, n_all)
        if not keep.all():
            chi = chi[:, keep]
    k, n = chi.shape
    tgt = _as_float64(target, "target")
    if tgt.shape != (k,) and sum(s != 1 for s in tgt.shape) > 1:
        raise ValueError(
            f"target has shape {tgt.shape}; give one entry per observable, shape ({k},) (a column (K, 1) or row "
            "(1, K) is read as that vector, a matrix is not)"
        )
    tgt = tgt.reshape(-1)
    if tgt.shape != (k,):
        hint = (
            f"; chi {chi.shape} may be transposed: it is (observables K, samples N), one row per entry of target"
            if tgt.shape == (n,) and n != k
            else ""
        )
        raise ValueError(f"target must have one entry per observable ({k}), got shape {tgt.shape}{hint}")
    if not np.isfinite(tgt).all():
        raise ValueError("target holds NaN or Inf")
    for arg, val in (("min_weight", min_weight), ("max_weight", max_weight)):
        if val is not None and (
            isinstance(val, bool | np.bool_) or not isinstance(val, int | float | np.number) or np.isnan(val)
        ):
            raise ValueError(f"{arg}={val!r} is not valid; give a number (or None for max_weight)")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number) or not np.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r} is not valid; give a finite number >= 0")
    if alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if rcond is not None and (
        isinstance(rcond, bool | np.bool_)
        or not isinstance(rcond, int | float | np.number)
        or not np.isfinite(rcond)
        or rcond < 0
    ):
        raise ValueError(f"rcond={rcond!r} is not valid; give a finite number >= 0 (or None for the default)")
    if method in ("pinv", "ridge") and (min_weight is not None or max_weight is not None):
        raise ValueError(
            f"min_weight/max_weight bound the weights of method='constrained' only; method={method!r} does not "
            "bound them (its weights may be negative): use method='constrained'"
        )
    if min_weight is None:
        min_weight = 0.0
    if min_weight < 0:
        raise ValueError(
            f"min_weight={min_weight!r} is not valid; weights are data multiplicities, give >= 0"
        )
    if num_data is not None:
        if not is_count(num_data) or int(num_data) < n:
            which = "" if keep is None else " counted"
            raise ValueError(
                f"num_data={num_data!r} is not valid; give the number of training data points the {n}{which} "
                f"columns of chi are drawn from, an int >= {n} (or None: the columns are the whole data)"
            )
        if fractions is not None:
            raise ValueError(
                "num_data and fractions do not go together: fractions are the shares of groups that partition the "
                "data, num_data the size of the data a subset of points (the columns) is drawn from"
            )
    m_data = n if num_data is None else int(num_data)
    if fractions is not None and method != "constrained":
        raise ValueError(f"fractions apply to method='constrained' only, got method={method!r}")
    if method == "pinv" and alpha != 0:
        raise ValueError(
            f"alpha={alpha!r} applies to method='ridge' or 'constrained' only; method='pinv' has no penalty "
            "(rcond= cuts its small singular values)"
        )
    if rcond is not None and method != "pinv":
        raise ValueError(
            f"rcond applies to method='pinv' only, got method={method!r} (alpha= sets its penalty)"
        )
    if keep is None and n > 1:
        zero = ~chi.any(axis=0)
        if zero.any() and not zero.all():
            where = np.flatnonzero(zero)
            shown = ", ".join(str(int(i)) for i in where[:5]) + (", ..." if where.size > 5 else "")
            warnings.warn(
                f"chi has {where.size} of its {n} columns exactly 0 (columns {shown}), as padding and -100 "
                "labels of a per-token chi give: counted as data points, they take weights that re-balance the "
                "others; give counted=result.probe_counted (False at the columns that are not data points) to "
                "leave them out, or counted=np.ones(N, bool) when every column is a data point",
                stacklevel=user_stacklevel(),
            )
    # the columns' response to their weights w: d mu = chi (w - 1) / M = chi_n (w - 1) / n with chi_n = chi n / M,
    # solved as for columns that are the whole data (M = n), then read back as h = (w - 1) / M
    chi_given = chi
    if m_data != n:
        chi = chi * (n / m_data)
    # chi on sum-zero perturbations (mean-1 weights): each row centred in units of a power of two 2^e (exact
    # scalings), so that the row sums of chi near float64's largest value do not overflow
    e = math.frexp(float(np.abs(chi).max()))[1] if chi.size else 0
    unit = np.ldexp(chi, -e)
    unit_c = unit - unit.mean(1, keepdims=True)  # chi_c = unit_c 2^e
    if float(np.abs(unit_c).max()) <= 1e-12 * float(np.abs(unit).max()) and bool(np.any(tgt)):
        warnings.warn(
            "chi is the same for every data point (zero, or constant along each row): re-weighting the data moves "
            "no observable, so the weights stay uniform and no part of the target is reached (residual 1)",
            stacklevel=user_stacklevel(),
        )
    if method == "pinv":
        # pinv(chi_c) = pinv(unit_c) 2^-e: the singular values of chi_c itself may exceed float64
        h = np.ldexp(np.linalg.pinv(unit_c, rcond=rcond if rcond is not None else 1e-12) @ tgt, -e)
    elif method == "ridge":
        if alpha <= 0:
            raise ValueError(f"method='ridge' needs alpha > 0, got {alpha}")
        h = _ridge(unit_c, e, tgt, float(alpha))
    elif method == "constrained":
        c = np.ones(n) if fractions is None else _as_float64(fractions, "fractions").reshape(-1)
        if fractions is not None and keep is not None:
            if c.shape != (n_all,):
                raise ValueError(
                    f"fractions must be {n_all} finite positive numbers (one per column of chi), got shape "
                    f"{c.shape}"
                )
            c = c[keep]  # (the shares of the counted columns; the others' are not read)
        if c.shape != (n,) or not np.isfinite(c).all() or (c <= 0).any():
            raise ValueError(
                f"fractions must be {n_all} finite positive numbers (one per column), got {fractions!r}"
            )
        h = _constrained(chi, tgt, alpha, min_weight, max_weight, c * (n / c.sum()))
    else:
        raise ValueError(f"method must be 'pinv', 'ridge' or 'constrained', got {method!r}")
    with np.errstate(over="ignore", invalid="ignore"):  # (out of float64's range: refused below, by name)
        if method != "constrained":
            top = float(np.abs(h).max())
            if 0 < top < np.inf:  # exactly sum-zero (it is, to rounding); in h's units: its sum may overflow
                h = top * (h / top - (h / top).mean())
        weights = 1.0 + n * h
        if m_data != n:  # h = (w - 1) / M; the response chi_n (w - 1) / n is chi (w - 1) / M
            chi, h = chi_given, (weights - 1.0) / m_data
        pred = chi @ h
    if not (np.isfinite(weights).all() and np.isfinite(h).all() and np.isfinite(pred).all()):
        raise ValueError(
            f"the weights that reach target (largest entry {float(np.abs(tgt).max()):.3g}) leave float64's range: "
            f"the target is beyond what chi (largest entry {float(np.abs(chi_given).max()):.3g}) can reach with "
            "representable weights; give a smaller target, or method='constrained' for the bounded re-weighting "
            "that moves the observables furthest towards it"
        )
    if keep is not None and not keep.all():  # the columns that are not data points: h 0, weight 1
        h_all, w_all = np.zeros(n_all), np.ones(n_all)
        h_all[keep], w_all[keep] = h, weights
        h, weights = h_all, w_all
    # both norms of the target's scale divided out first: no overflow for targets near float64's largest
    scale = float(np.abs(tgt).max()) if tgt.size else 0.0
    if scale > 0:
        resid = float(np.linalg.norm((pred - tgt) / scale) / np.linalg.norm(tgt / scale))
    else:
        resid = float(np.linalg.norm(pred))
    return Intervention(h=h, weights=weights, predicted=pred, target=tgt, residual=resid, method=method)


def _ridge(a: np.ndarray, e: int, tgt: np.ndarray, alpha: float) -> np.ndarray:
    """``h = chi_c^T (chi_c chi_c^T + alpha I)^-1 tgt`` with ``chi_c = a 2^e`` the row-centred ``chi`` (as
    :func:`invert` centres it, in units of a power of two) and ``alpha > 0``, by
    the SVD ``chi_c = U S V^T``: ``h = V diag(s / (s^2 + alpha)) U^T tgt``. No ``K x K`` system is formed, so more
    observables than data (``K > N``), rank-deficient rows and an ``alpha`` far below ``chi_c``'s scale squared
    are exact to rounding; singular values at ``chi_c``'s rounding level (``max(K, N) eps s_max``, among them the
    direction of the uniform perturbation that the centring removes) count as 0, so ``alpha -> 0`` gives the
    minimum-norm (``"pinv"``) solution.

    ``chi_c`` is decomposed in units of a power of two ``2^e`` (exact scalings) that brings its largest entry to
    ``[0.5, 1)``, with the penalty ``alpha 2^(-2 e)`` in those units and the target divided by its largest entry
    (``h`` is linear in it): the same ``h`` without overflow or underflow for any finite ``chi``."""
    k, n = a.shape
    top = float(np.abs(a).max())
    size = float(np.abs(tgt).max())
    if top == 0 or size == 0:
        return np.zeros(n)  # re-weighting moves nothing, or nothing is to move
    e2 = int(np.frexp(top)[1])
    a, e = np.ldexp(a, -e2), e + e2  # chi_c = a 2^e
    u, sv, vt = np.linalg.svd(a, full_matrices=False)
    mu = float(np.ldexp(alpha, -2 * e))  # alpha in a's units (0 or inf where it leaves float64's range)
    keep = sv > sv[0] * max(k, n) * np.finfo(np.float64).eps
    gain = np.zeros_like(sv)
    gain[keep] = sv[keep] / (sv[keep] * sv[keep] + mu)
    # chi_c^T (chi_c chi_c^T + alpha)^-1 = 2^-e a^T (a a^T + mu)^-1
    h = vt.T @ (gain * (u.T @ (tgt / size)))
    return np.ldexp(h, -e) * size


def _within(w: np.ndarray, lo: float, hi: float | None) -> bool:
    return bool((w >= lo - 1e-12).all() and (hi is None or (w <= hi + 1e-12).all()))


def _exact_total(w: np.ndarray, c: np.ndarray, lo: float, hi: float | None) -> np.ndarray:
    """``w`` clipped to ``[lo, hi]`` with ``c @ w = c.sum()`` made exact by moving the tiny surplus onto the weights
    with room."""
    total = float(c.sum())
    n = w.shape[0]
    w = np.clip(w, lo, np.inf if hi is None else hi)
    # make the equality exact without leaving the bounds: move the tiny surplus onto the weights with room
    surplus = float(c @ w) - total
    if surplus > 0:
        room = w - lo
    else:
        room = np.full(n, np.inf) if hi is None else hi - w
        room = np.where(np.isfinite(room), room, 1.0)
    # the weights strictly inside the bounds take it where they have the room (those at a bound stay there)
    inside = np.where((w > lo) & (hi is None or w < hi), room, 0.0)
    if float(c @ inside) >= abs(surplus):
        room = inside
    if abs(surplus) > 0 and float(c @ room) > 0:
        w = w - surplus * room / float(c @ room)
    return w


def _constrained(chi, tgt, alpha, lo, hi, c) -> np.ndarray:
    """Weights in ``[lo, hi]`` with ``c @ w = c.sum()`` (``c`` scaled to sum N); returns ``h = (w - 1) / N``."""
    k, n = chi.shape
    if lo > 1 or (hi is not None and hi < 1):
        raise ValueError(
            f"the bounds [{lo}, {hi}] must contain the uniform weight 1: give min_weight <= 1 <= max_weight "
            f"(min_weight={lo!r}, max_weight={hi!r})"
        )
    # in chi's units: chi and the target divided by its size and the penalty by its square give the same weights
    size = float(np.abs(chi).max())
    if size > 0:
        with np.errstate(over="ignore", under="ignore"):
            chi, alpha = chi / size, alpha / size / size
            # the target in those units, at most ``far`` times the furthest any such weights move an observable
            # (|chi (w - 1) / N| <= max |w - 1| <= N / min(c), chi's entries at most 1 now): beyond that the answer
            # is the one moving the observables furthest along it (the linear program's), the penalty and the
            # response's own size counting only 1e-100 of the way, below float64's rounding; a larger target
            # (whose square, or whose ratio to chi, may leave float64's range) gives the same weights
            far = min(1e100 * max(1.0, n / float(c.min())), 1e250)
            top = float(np.abs(tgt).max())
            if top > 0:
                ratio = top / size  # (inf where it overflows)
                tgt = (tgt / top) * min(ratio, far)
        if np.isinf(alpha):
            return np.zeros(n)  # the penalty outweighs any response: the uniform weights
    a = chi / n  # d mu = a @ (w - 1)
    scale = 1.0 / max(float(tgt @ tgt), 1e-300)  # the objective of order 1, for the comparisons below

    def f(w):
        r = a @ (w - 1) - tgt
        d = w - 1
        return scale * float(r @ r + alpha * (d @ d) / n)

    def rounding(w):
        # f(w)'s own rounding (alpha = 0): each residual r_k to a few units of the terms it sums (in units of the
        # target's largest entry, which f divides out)
        d, unit = w - 1, 1.0 / max(float(np.abs(tgt).max()), 1e-300)
        e = 16 * np.finfo(np.float64).eps * (np.abs(a) @ np.abs(d) + np.abs(tgt)) * unit
        r = np.abs(a @ d - tgt) * unit
        return float(2 * r @ e + e @ e) / max(float((tgt * unit) @ (tgt * unit)), 1e-300)

    # where the bounds do not bind, the answer is closed-form: the minimiser with the total held (without a
    # penalty the minimum-norm one, which reaches the target where it can be reached)
    d = _face_solve(a, c, tgt, 0.0, alpha / n, np.zeros(n))
    if _within(1 + d, lo, hi):
        return (_exact_total(1 + d, c, lo, hi) - 1) / n
    if not float(np.abs(d).max()) > 0:
        return np.zeros(n)  # a zero target: the uniform weights
    d = _box_least_squares(
        a, tgt, alpha / n, c, np.full(n, lo - 1.0), np.full(n, np.inf if hi is None else hi - 1.0)
    )
    w = 1 + d
    if alpha == 0:
        # the response a @ (w - 1) nearest the target is unique (the objective is strictly convex in it), the
        # weights reaching it are not: among them, the ones nearest uniform (the smallest |w - 1|). Without the
        # bounds that is the minimum-norm solution of a @ d = reached, c @ d = 0; it is taken when it keeps them
        # (and reaches the same response, to the objective's rounding).
        d = _face_solve(a, c, a @ (w - 1), 0.0, 0.0, np.zeros(n))
        cand = 1 + d
        if (
            _within(cand, lo, hi)
            and f(cand) <= f(w) + rounding(w) + rounding(cand)
            and d @ d < (w - 1) @ (w - 1)
        ):
            w = cand
    return (_exact_total(w, c, lo, hi) - 1) / n


def _box_least_squares(a, t, mu, c, lo_d, hi_d) -> np.ndarray:
    """``argmin_d |a d - t|^2 + mu |d|^2`` subject to ``lo_d <= d <= hi_d`` and ``c @ d = 0`` (``a (k, n)``, ``c``
    positive, the bounds containing 0), by proximal steps: each adds ``rho |d - d_prev|^2``, with ``mu + rho``
    large enough that each step's dual (:func:`_box_dual`) keeps its precision; without a penalty (``mu = 0``)
    the steps converge to a minimiser reached from the uniform weights. After each step the weights it holds at a
    bound are taken as the active set (:func:`_on_active_set`): the rest solved exactly, the answer as soon as the
    KKT conditions certify it; else the steps stop when the objective stops falling (at most 500), and the classic
    active-set steps go on from the last one. The active-set steps' budget doubles from one proximal step to the
    next (in all at most 256 times the first): where one row of ``a`` is far smaller than another, or the box is
    tight, the proximal steps hardly move along the small rows, and the active-set steps, not more proximal ones,
    find the optimum."""
    k, n = a.shape
    reach = float(np.abs(np.concatenate([lo_d, hi_d[np.isfinite(hi_d)]])).max(initial=1.0)) or 1.0
    rows = np.sqrt(np.einsum("ij,ij->i", a, a))
    # the dual's values grow like |t| / m: keep |a^T y| within 1e6 of the weights' range
    need = (
        1e-7 * float(rows.max(initial=0.0)) ** 2
        + 1e-6 * float(rows.max(initial=0.0) * np.abs(t).max()) / reach
    )
    rho = max(0.0, need - mu)
    m = mu + rho
    d = np.zeros(n)
    y = np.zeros(k)
    best = np.inf
    # the active-set steps' budget after each proximal step: doubling, up to 256 times the first in all
    first = 4 * k + 16
    spent = 0
    for step in range(1 if rho == 0 else 500):
        s = (rho / m) * d  # the step's centre: m |d - s|^2 / 2 is its penalty, up to a constant
        extent = np.abs(t) + np.abs(a) @ np.abs(s)
        e, y = _box_dual(a, t - a @ s, m, c, lo_d - s, hi_d - s, y, extent)
        d_new = e + s
        r = a @ d_new - t
        obj = float(r @ r + mu * (d_new @ d_new))
        d = d_new
        # the steps find the weights at a bound long before they converge: with those fixed, the rest solved
        # exactly, and kept when it is the optimum (the KKT conditions hold)
        tries = min(first << min(step, 8), 256 * first - spent)
        if tries > 0:
            spent += tries
            exact = _on_active_set(a, t, mu, c, lo_d, hi_d, d, tries=tries)
            if exact is not None:
                return exact
        if obj >= best * (1 - 1e-12):
            break  # the objective has stopped falling (where the bounds bind, d itself converges more slowly)
        best = obj
    exact = _on_active_set(a, t, mu, c, lo_d, hi_d, d, tries=8 * first, classic=True)
    return d if exact is None else exact


def _on_active_set(
    a, t, mu, c, lo_d, hi_d, d, tries: int | None = None, classic: bool = False
) -> np.ndarray | None:
    """The minimiser of :func:`_box_least_squares`'s problem found from ``d`` (feasible, near it) by active-set
    steps, or None when ``tries`` of them (default ``4 k + 16``) do not reach it. The entries of ``d`` at a bound
    are held there and the others solved for exactly (:func:`_face_solve`: the solution nearest the current one
    where it is not unique). A solution within the bounds is the minimiser when the KKT conditions hold (with
    ``lam`` the total's multiplier, the gradient ``g`` of the objective has ``g_i + lam c_i`` = 0 on the free
    entries, >= 0 at a lower bound and <= 0 at an upper one), else the entries that violate them are freed (with
    no entry free, also the one that sets ``lam``: the total moves only with a partner). Each condition is judged
    to its own rounding: ``g_i`` sums ``a_ki r_k`` over the observables, each residual ``r_k`` a difference of
    terms of size ``|a_k| |x|`` and ``|t_k|``, so that where one row of ``a`` is far smaller than another, the
    small row's part of the gradient is not taken for the large row's rounding.

    A solution out of bounds first has the entries it takes out held at the bound they cross, in the order a step
    toward it crosses them, as many as leave the rest able to reach the total (the rest moved to the nearest point
    that keeps it), and all violating entries are freed at once. Once a set of held entries comes back, or three
    sets in a row have no fewer violations than the fewest so far, the steps turn into the classic ones (from the
    start with ``classic``), which cannot cycle: one violating entry freed at a time, and a solution out of bounds
    approached only as far as the first bound it crosses (the objective falls at each).

    Where a multiplier at a bound is within its rounding of the wrong sign (rows of ``a`` so unequal that the
    small row's part of the gradient is below the large row's rounding, near 1e-8 of it), the gradient cannot
    decide but the objective can: such an entry (up to ``k + 4`` of them, the likeliest first) is freed for one
    classic step, kept free when the objective falls by more than its rounding, else held again. Each step costs
    ``O(n k^2)``."""
    k, n = a.shape
    eps = np.finfo(np.float64).eps
    span = np.maximum(np.abs(lo_d), np.where(np.isfinite(hi_d), np.abs(hi_d), 0.0)) + np.abs(d)

    def start():  # d's entries at a bound held there
        at_lo = d - lo_d <= 1e-12 * span
        at_hi = (hi_d - d <= 1e-12 * span) & ~at_lo
        return np.where(at_lo, lo_d, np.where(at_hi, hi_d, d)), at_lo, at_hi, []

    x, at_lo, at_hi, _ = start()
    abs_a = np.abs(a)

    unit = 1.0 / max(float(np.abs(t).max(initial=0.0)), 1e-300)  # (the objective in the target's units)

    def objective(x):
        r = (a @ x - t) * unit
        # and its rounding: each residual to a few units of the terms it sums
        e = 16 * eps * (abs_a @ np.abs(x) + np.abs(t)) * unit
        pen = mu * float((x * unit) @ (x * unit))
        return float(r @ r) + pen, float(2 * np.abs(r) @ e + e @ e) + 4 * eps * pen

    seen, one = set(), classic
    fewest, backup = n + 1, 3  # the fewest violations seen, and the sets of held entries allowed no fewer
    safe = None  # the last point within the bounds and the total (None: d's), the entries to free from it
    best = None  # the certified point of least objective
    # while an undecided entry is tried: (the certified point and its held entries, its objective, the entries left)
    probe = None
    for _ in range(4 * k + 16 if tries is None else tries):
        free = ~(at_lo | at_hi)
        moved = False
        if free.any():
            idx = np.flatnonzero(free)
            af, cf = a[:, idx], c[idx]
            fixed = np.where(free, 0.0, x)  # (no copy of a's columns)
            b = t - a @ fixed  # what the free entries are to reach
            z = -float(c @ fixed)  # and their total
            xf = _face_solve(af, cf, b, z, mu, x[idx])
            lo_f, hi_f = lo_d[idx], hi_d[idx]
            slack = 1e-12 * span[idx]
            out = (xf < lo_f - slack) | (xf > hi_f + slack)
            moved = bool(out.any())
            if moved and one:
                # from the current entries (within the bounds, the total kept) toward the solution, as far as the
                # first bound it crosses, held there
                step = xf - x[idx]
                bound = np.where(xf < lo_f, lo_f, hi_f)
                when = np.full(idx.size, np.inf)
                when[out] = (bound[out] - x[idx[out]]) / step[out]
                j = int(np.argmin(when))
                x[idx] = np.clip(x[idx] + min(max(float(when[j]), 0.0), 1.0) * step, lo_f, hi_f)
                x[idx[j]] = bound[j]
                at_lo[idx[j]], at_hi[idx[j]] = bool(xf[j] < lo_f[j]), bool(xf[j] > hi_f[j])
            elif moved:
                # the entries it takes out of bounds held at the bound they cross, in the order the step from the
                # current entries crosses them, as many as leave the others able to reach the total
                cross = np.flatnonzero(out)
                bound = np.where(xf[cross] < lo_f[cross], lo_f[cross], hi_f[cross])
                cross = cross[
                    np.argsort((bound - x[idx[cross]]) / (xf[cross] - x[idx[cross]]), kind="stable")
                ]
                to_lo = xf[cross] < lo_f[cross]
                bound = np.where(to_lo, lo_f[cross], hi_f[cross])
                # m = 0, 1, ... of them held: their total, the least and the most the others can reach
                held = np.concatenate([[0.0], np.cumsum(cf[cross] * bound)])
                low = float(cf @ lo_f) - np.concatenate([[0.0], np.cumsum(cf[cross] * lo_f[cross])])
                fin = np.isfinite(hi_f)
                high = float(cf[fin] @ hi_f[fin]) - np.concatenate(
                    [[0.0], np.cumsum(np.where(fin[cross], cf[cross] * hi_f[cross], 0.0))]
                )
                unbounded = (~fin).sum() - np.concatenate([[0], np.cumsum(~fin[cross])])
                high = np.where(unbounded > 0, np.inf, high)
                need = z - held
                margin = 1e-12 * (float(cf @ np.abs(xf)) + abs(z))
                ok = (need >= low - margin) & (need <= high + margin)
                m = int(np.flatnonzero(ok)[-1]) if ok.any() else -1
                if m < 0 or (m == 0 and low[0] + margin < need[0] < high[0] - margin):
                    # none can be held (the entries the last step left are off the total): back to the last
                    # point within the bounds and the total, from there the classic steps
                    x, at_lo, at_hi, release = start() if safe is None else (v.copy() for v in safe)
                    at_lo[release] = at_hi[release] = False
                    one = True
                    continue
                hold = idx[cross[:m]]
                at_lo[hold[to_lo[:m]]], at_hi[hold[~to_lo[:m]]] = True, True
                x[hold] = bound[:m]
                # the others at the end of their range where the total leaves them no other place, else moved to
                # the nearest point that keeps it (the step from there crosses the bounds in a meaningful order)
                rest = np.setdiff1d(idx, hold, assume_unique=True)
                if need[m] <= low[m] + margin:
                    at_lo[rest], x[rest] = True, lo_d[rest]
                elif need[m] >= high[m] - margin:
                    at_hi[rest], x[rest] = True, hi_d[rest]
                else:
                    x[rest] = _onto_total(x[rest], c[rest], lo_d[rest], hi_d[rest], float(need[m]))
            else:
                x[idx] = np.clip(xf, lo_f, hi_f)
        if probe is not None:
            # the undecided entry's one step: kept when the objective fell by more than its rounding
            (x0, lo0, hi0, setter0), (f0, noise0), left = probe
            f1, noise1 = objective(x)
            if f1 < f0 - noise0 - noise1:
                probe = None
            elif left:
                x, at_lo, at_hi = x0.copy(), lo0.copy(), hi0.copy()
                probe = (probe[0], probe[1], left[1:])
                at_lo[left[0]] = at_hi[left[0]] = False
                if setter0 >= 0:
                    at_lo[setter0] = at_hi[setter0] = False
                continue
            else:
                return x0
        if moved:
            continue
        r = a @ x - t
        g = a.T @ r + mu * x  # half the gradient
        # each g_i's rounding: the terms it sums (the residuals' own, |a_k| |x| and |t_k|, carried by |a_ki|)
        size = abs_a.T @ (abs_a @ np.abs(x) + np.abs(t)) + mu * np.abs(x)
        setter = -1
        if free.any():
            lam = -float(c[free] @ g[free]) / float(c[free] @ c[free])
            lam_size = float(c[free] @ size[free]) / float(c[free] @ c[free])
        else:  # all at a bound: the multiplier in the interval the bounds allow, if any
            ratio = -g / c
            lower = np.where(at_lo, ratio, -np.inf)
            upper = np.where(at_hi, ratio, np.inf)
            if np.isfinite(lower.max()):
                setter = int(np.argmax(lower))
            elif np.isfinite(upper.min()):
                setter = int(np.argmin(upper))
            lam = float(ratio[setter]) if setter >= 0 else 0.0
            lam_size = float(size[setter] / c[setter]) if setter >= 0 else 0.0
        kkt = g + lam * c
        # (the solves' rounding grows like the square root of the number of entries they sum)
        tol = 64 * eps * (1 + math.sqrt(n) / 64) * (size + (abs(lam) + lam_size) * c) + 1e-300
        wrong = np.where(at_lo, -kkt, np.where(at_hi, kkt, np.abs(kkt))) - tol  # > 0: a violation
        if wrong.max() <= 0:
            if abs(float(c @ x)) > 1e-9 * float(c @ np.abs(x) + c @ np.abs(d)):
                break  # (the total kept, to rounding: each solve holds it)
            # the multipliers at a bound within their rounding of the wrong sign, likeliest first
            undecided = np.flatnonzero(~free & (wrong > -2 * tol))
            undecided = undecided[undecided != setter]
            undecided = undecided[np.argsort(-wrong[undecided] / tol[undecided], kind="stable")][: k + 4]
            if not undecided.size:
                return x  # (each step from the last point so certified lowered the objective)
            value = objective(x)
            best = (x.copy(), value)
            if value[0] <= value[1]:
                return x  # an objective at its rounding: the target reached, nothing to decide
            probe = ((x.copy(), at_lo.copy(), at_hi.copy(), setter), value, [int(i) for i in undecided[1:]])
            release = np.zeros(n, bool)
            release[undecided[0]] = True
            one = True
        elif wrong[free].max(initial=0.0) > 0:
            break  # the free entries' solve is not at rounding level: left to the proximal steps
        else:
            state = hash(np.packbits(at_lo).tobytes() + np.packbits(at_hi).tobytes())
            count = int((wrong > 0).sum())
            fewest, backup = (count, 3) if count < fewest else (fewest, backup - 1)
            # back at a set already solved, or three sets in a row without fewer violations than the fewest: from
            # here on the classic steps
            one = one or state in seen or backup < 0
            seen.add(state)
            worst = int(np.argmax(wrong))
            safe = (
                x.copy(),
                at_lo.copy(),
                at_hi.copy(),
                np.array([worst] + ([setter] if setter >= 0 else [])),
            )
            if one:
                release = np.zeros(n, bool)
                release[worst] = True
            else:
                release = wrong > 0  # (at a bound: the free entries' part holds, just checked)
        if setter >= 0:
            release[setter] = True
        at_lo[release] = at_hi[release] = False
    return None if best is None else best[0]


def _onto_total(v, c, lo, hi, total) -> np.ndarray:
    """The point nearest ``v`` with ``lo <= x <= hi`` and ``c @ x = total`` (``c`` positive, such a point existing):
    ``clip(v - lam c, lo, hi)``, ``lam`` by :func:`_total_root` (the total as one more entry, held at ``-total``)."""
    lam = _total_root(np.append(-v, 0.0), np.append(c, 1.0), np.append(lo, -total), np.append(hi, -total))
    return np.clip(v - c * lam, lo, hi)


def _face_solve(af, cf, b, z, mu, start) -> np.ndarray:
    """``argmin_x |af x - b|^2 + mu |x|^2`` subject to ``cf @ x = z`` (``cf`` positive); without a penalty
    (``mu = 0``) the minimiser nearest ``start`` where it is not unique. ``x`` is the total's part along ``cf`` plus
    the solution in the complement of ``cf``, through ``af``'s columns projected on it (``ap``) and the thin SVD
    ``ap = U S V^T``: ``V diag(s / (s^2 + mu)) U^T`` (``S^-1`` with ``mu = 0``, singular values at ``ap``'s rounding
    level counting as 0) applied to what is left to reach. The SVD comes from the QR of ``ap^T`` (Householder's,
    accurate column by column: rows of ``af`` of any relative size) and the SVD of its ``k x k`` triangle; a step
    of refinement on the exact gradient (``V diag(1 / (s^2 + mu)) V^T`` applied to it) then corrects what the
    small triangle's SVD rounds off along a row far smaller than another. ``O(nf k^2)``, no ``nf x nf`` matrix."""
    k, nf = af.shape
    cc = float(cf @ cf)
    base = start if mu == 0 else np.zeros(nf)
    base = base + ((z - float(cf @ base)) / cc) * cf
    if nf == 1:
        return base  # the total alone fixes it
    from scipy.linalg import qr

    ap = af - np.outer(af @ cf, cf / cc)
    q, tri = qr(ap.T, mode="economic", check_finite=False)  # ap = tri^T q^T
    u, sv, wt = np.linalg.svd(tri.T, full_matrices=False)  # ap = u diag(sv) (q wt^T)^T
    keep = sv > np.finfo(np.float64).eps * max(k, nf) * float(np.linalg.norm(af))
    u, sv, wt = u[:, keep], sv[keep], wt[keep]
    x = base + q @ (wt.T @ ((sv / (sv * sv + mu)) * (u.T @ (b - af @ base))))
    for _ in range(2):
        grad = ap.T @ (af @ x - b) + mu * (x - base)  # (half) the gradient along the complement of cf
        fix = q @ (wt.T @ ((wt @ (q.T @ grad)) / (sv * sv + mu)))
        x = x - fix
        if not np.abs(fix).max(initial=0.0) > 4 * np.finfo(np.float64).eps * np.abs(x).max(initial=0.0):
            break
    return x


def _total_root(u, c, lo, hi, guess: float | None = None) -> float:
    """The ``lam`` with ``c @ clip(-(u + c lam), lo, hi) = 0`` (``c > 0``, ``lo <= 0 <= hi``): the sum falls
    piecewise linearly in ``lam``. Newton's steps on it from ``guess`` (default: the root where nothing is clipped)
    end in one step once inside the piece holding the root, and a few when ``guess`` is a nearby problem's root;
    each costs ``O(n)``. They are kept inside the bracket the sum's signs give (bisected where a step leaves it);
    after 30 the breakpoints are searched instead (:func:`_total_root_sorted`)."""
    lam = -float(c @ u) / float(c @ c) if guess is None or not np.isfinite(guess) else float(guess)
    below, above = -np.inf, np.inf  # the sum is > 0 below the root, < 0 above it
    for _ in range(30):
        v = -(u + c * lam)
        free, high = (v > lo) & (v < hi), v >= hi
        value = float(c @ np.clip(v, lo, hi))
        if value == 0:
            return lam
        if value > 0:
            below = lam
        else:
            above = lam
        slope = -float(c[free] @ c[free])
        step = lam - value / slope if slope < 0 else np.nan
        if below < step < above:
            # each v_i falls with lam: the same entries free and at the upper bound at both ends is the same
            # linear piece, holding the root; one more step from there, where the sum is small, corrects the
            # rounding of a step from far away
            w = -(u + c * step)
            if bool((((w > lo) & (w < hi)) == free).all() and ((w >= hi) == high).all()):
                return float(step - float(c @ np.clip(w, lo, hi)) / slope)
        elif np.isfinite(below) and np.isfinite(above):
            step = 0.5 * (below + above)
            if step in (below, above):
                return float(step)  # the bracket at rounding level
        else:
            break  # no bracket to bisect: the search below
        lam = step
    return _total_root_sorted(u, c, lo, hi)


def _total_root_sorted(u, c, lo, hi) -> float:
    """:func:`_total_root` by bisection over the sorted breakpoints and the piece holding the root solved
    exactly."""

    def total(lam):
        return float(c @ np.clip(-(u + c * lam), lo, hi))

    finite = np.isfinite(hi)
    points = np.unique(np.concatenate([(-u - lo) / c, (-u[finite] - hi[finite]) / c[finite]]))
    # the number of breakpoints where the sum is still positive
    left, right = 0, len(points)
    while left < right:
        mid = (left + right) // 2
        if total(points[mid]) > 0:
            left = mid + 1
        else:
            right = mid
    below = points[left - 1] if left > 0 else -np.inf
    above = points[left] if left < len(points) else np.inf
    if np.isfinite(above):
        anchor, inside = above, (above - 1.0 if not np.isfinite(below) else 0.5 * (below + above))
    else:
        anchor, inside = below, below + 1.0
    value = total(anchor)
    if value == 0:
        return float(anchor)
    d = -(u + c * inside)
    free = (d > lo) & (d < hi)
    slope = -float(c[free] @ c[free])
    return float(anchor - value / slope) if slope < 0 else float(anchor)


def _box_dual(
    a, t, m, c, lo_d, hi_d, y, extent, max_iter: int = 200, polish: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``argmin_d |a d - t|^2 + m |d|^2`` subject to ``lo_d <= d <= hi_d`` and ``c @ d = 0`` (``a (k, n)``,
    ``m > 0``), and the dual variables ``y`` it ends at (``y`` in: the start; ``extent`` (k,): the scale of the
    whole problem's values, for the tolerances).

    Solved through its dual in ``k`` variables ``y``: ``d(y) = clip(-(a^T y + c lam), lo_d, hi_d)`` with ``lam``
    the root keeping ``c @ d = 0`` (:func:`_total_root`), and ``y`` maximises the strongly concave, piecewise
    quadratic ``G(y) = -m |y|^2 / 2 - y @ t + sum_i (d_i^2 / 2 + d_i (a^T y + c lam)_i)``, whose gradient
    ``a d - t - m y`` is the primal's residual. Newton steps over the weights not at a bound, with a line search on
    ``G``, stop when that residual is at rounding level: each costs ``O(n k^2 + n log n)``; no ``n x n`` matrix is
    formed."""
    k, n = a.shape

    last = [None]  # the previous root: the start of the next search

    def primal(y):
        u = a.T @ y
        lam = last[0] = _total_root(u, c, lo_d, hi_d, last[0])
        return np.clip(-(u + c * lam), lo_d, hi_d), u + c * lam

    def value(y, d, s):
        return float(-0.5 * m * (y @ y) - y @ t + 0.5 * (d @ d) + s @ d)

    def tolerance(y, d, s, free, rel):
        # the residual's own rounding: a free d_i is a difference of terms of size |a|^T |y| + c |lam|
        noise = (
            8
            * np.finfo(np.float64).eps
            * (np.abs(a[:, free]) @ (np.abs(a[:, free]).T @ np.abs(y) + np.abs(s[free])))
        )
        return rel * (extent + np.abs(t) + np.abs(a) @ np.abs(d) + m * np.abs(y)) + noise + 1e-300

    d, s = primal(y)
    g_now = value(y, d, s)
    for _ in range(max_iter):
        grad = a @ d - t - m * y
        free = (d > lo_d) & (d < hi_d)
        if (np.abs(grad) <= tolerance(y, d, s, free, 1e-12)).all():
            return d, y
        af, cf = a[:, free], c[free]
        hess = m * np.eye(k) + af @ af.T
        if cf.size:
            ac = af @ cf
            hess -= np.outer(ac, ac) / float(cf @ cf)  # lam follows y, keeping the total
        step = np.linalg.solve(hess, grad)  # an ascent direction: hess is positive definite
        slope = float(step @ grad)
        frac = 1.0
        while frac > 1e-20:
            y_new = y + frac * step
            d_new, s_new = primal(y_new)
            g_new = value(y_new, d_new, s_new)
            # (a full step whose predicted gain is below G's rounding is taken: its value cannot judge it)
            if g_new >= g_now + 1e-4 * frac * slope or (frac == 1.0 and slope <= 1e-13 * abs(g_now)):
                break
            frac *= 0.25
        else:
            break  # no ascent left at rounding level: judged by the residual below
        y, d, s, g_now = y_new, d_new, s_new, g_new
    grad = a @ d - t - m * y
    if (np.abs(grad) <= tolerance(y, d, s, (d > lo_d) & (d < hi_d), 1e-8)).all():
        return d, y
    if polish:
        # Newton's steps can stall where the active set keeps changing between kinks of G: a quasi-Newton ascent
        # (L-BFGS on -G, which needs no second derivative) from where they stopped, then Newton again
        from scipy.optimize import minimize

        def neg(yv):
            dv, sv = primal(yv)
            return -value(yv, dv, sv), -(a @ dv - t - m * yv)

        scale = float(np.abs(t).max() + extent.max() + 1e-300)
        found = minimize(
            neg,
            y,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 20000, "ftol": 0.0, "gtol": 1e-15 * scale},
        )
        return _box_dual(a, t, m, c, lo_d, hi_d, found.x, extent, max_iter, polish=False)
    raise RuntimeError(
        f"method='constrained' did not converge in {max_iter} Newton steps on its dual (n = {n}, residual "
        f"{np.abs(grad).max():.3g})"
    )


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def direction_target(direction, amount: float) -> np.ndarray:
    """Target ``d mu = amount * direction / |direction|`` (e.g. a principal susceptibility direction: positive
    ``amount`` moves along it, negative against it). ``amount`` is one real number (a Python or numpy number, or
    a one-element tensor or 0-d array); a bool, a string or an array of several values is a ``TypeError``."""
    d = _as_float64(direction, "direction").reshape(-1)
    if not np.isfinite(d).all():
        raise ValueError(f"direction must be finite, got {d.tolist()}")
    if isinstance(amount, torch.Tensor) and amount.numel() == 1:
        amount = amount.detach().cpu().item()
    elif isinstance(amount, np.ndarray) and amount.shape == ():
        amount = amount.item()
    if isinstance(amount, bool | np.bool_) or not isinstance(amount, int | float | np.number):
        raise TypeError(f"amount={amount!r} is not valid; give a real number (the size of the target's step)")
    if isinstance(amount, complex | np.complexfloating):
        raise TypeError(f"amount={amount!r} is complex; give a real number")
    amount = float(amount)
    if not np.isfinite(amount):
        raise ValueError(f"amount must be finite, got {amount!r}")
    size = float(np.abs(d).max(initial=0.0))
    if size == 0:
        raise ValueError(f"direction must have a non-zero entry, got {d.tolist()}")
    d = d / size  # its largest entry +-1: the norm neither overflows nor underflows
    return amount * d / np.linalg.norm(d)


def _sampler_rows(loader: torch.utils.data.DataLoader, size: int) -> torch.Tensor | None:
    """The rows of ``loader.dataset`` (of ``size`` rows) that ``loader`` reads in an epoch, a row read twice listed
    twice, or None when it reads every row once; a sampler whose rows or frequencies a weighted draw would not keep
    is refused by name."""
    instead = (
        "pass data=loader.dataset to draw among all its rows, or a DataLoader over "
        "torch.utils.data.Subset(loader.dataset, rows) (or with sampler=SubsetRandomSampler(rows)) to draw among "
        "some of them"
    )
    if loader.batch_size is None and loader.batch_sampler is not None:  # DataLoader(batch_sampler=...)
        raise ValueError(
            f"data is a DataLoader with a batch_sampler of its own ({type(loader.batch_sampler).__name__}), which "
            f"reweight cannot keep (it draws the samples of every batch by the weights): {instead}"
        )
    s = loader.sampler
    kind = type(s)
    if kind is torch.utils.data.SequentialSampler:
        n = len(s)  # it reads rows 0 .. len(data_source) - 1
    elif kind is torch.utils.data.RandomSampler:
        n = len(s.data_source)
        if s.replacement or s.num_samples != n:
            raise ValueError(
                f"data is a DataLoader whose RandomSampler draws {s.num_samples} of its {n} rows "
                f"{'with' if s.replacement else 'without'} replacement per epoch, which reweight cannot keep (it "
                f"draws by the weights, with replacement): {instead}, and num_samples= for the epoch's length"
            )
    elif kind is torch.utils.data.SubsetRandomSampler:
        try:
            rows = torch.as_tensor(np.asarray(list(s.indices)), dtype=torch.long).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(
                f"data is a DataLoader whose SubsetRandomSampler has indices that are not row numbers "
                f"({s.indices!r}): give it int indices into loader.dataset"
            ) from None
        if rows.numel() == 0:
            raise ValueError(
                "data is a DataLoader whose SubsetRandomSampler reads no rows (indices is empty)"
            )
        bad = rows[(rows < 0) | (rows >= size)]
        if bad.numel():
            raise ValueError(
                f"data is a DataLoader whose SubsetRandomSampler reads rows {bad[:5].tolist()}, outside "
                f"0..{size - 1} (its dataset has {size} rows)"
            )
        return (
            None if rows.numel() == size and bool((rows.sort().values == torch.arange(size)).all()) else rows
        )
    else:
        raise ValueError(
            f"data is a DataLoader whose sampler is a {kind.__name__}, which reweight cannot keep (it draws with "
            "its own sampler, by the weights; it keeps a SequentialSampler, a RandomSampler over every row once and "
            f"a SubsetRandomSampler's rows): {instead}"
        )
    if n > size:
        raise ValueError(
            f"data is a DataLoader whose {kind.__name__} reads rows 0..{n - 1} but its dataset has {size} rows"
        )
    return None if n == size else torch.arange(n)


def reweight(
    data,
    weights,
    *,
    mode: str = "sampler",
    batch_size: int | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
):
    """Apply per-sample weights to a data set.

    Parameters
    ----------
    data : Dataset, DataLoader or tensor
        A map-style data set, a DataLoader over one (its ``.dataset`` is drawn from as it is, so the batches have
        the structure of ``data``'s; its ``collate_fn``, ``batch_size``, ``drop_last``, ``pin_memory`` and worker
        settings (``num_workers``, ``worker_init_fn``, ``prefetch_factor``, ``persistent_workers``, ``timeout``,
        ``multiprocessing_context``) are kept, and its ``generator``: see ``generator``) or a tensor whose first
        axis is samples (a ``TensorDataset`` of it: each batch is a one-element list ``[rows]``), a
        :class:`pypattern.tasks.TaskBatch` (each batch is the ``TaskBatch`` of the rows drawn) or a dict of tensors
        or arrays with the samples on their first axis, such as a tokenizer's output with ``input_ids``,
        ``attention_mask`` and ``labels`` (each batch holds the same keys, the rows drawn of each value).
        With ``mode="sampler"`` a DataLoader's sampler says which rows are drawn from: a ``SequentialSampler``, or
        a ``RandomSampler`` without replacement and with ``num_samples`` its data's size, over the whole data set
        reads every row; a ``SubsetRandomSampler`` (a train/validation split) reads its ``indices`` only, and
        the new loader draws among those rows alone (a row listed twice counts twice). A loader with another
        sampler (weighted, with replacement, distributed, custom) or a ``batch_sampler`` of its own is refused:
        pass its ``.dataset``, or a DataLoader over ``torch.utils.data.Subset(dataset, rows)``, instead.
    weights : array (num_samples,) or Intervention
        Non-negative, not all zero (an :class:`Intervention`: its ``weights``). One per row of the data set
        (``len(loader.dataset)`` for a DataLoader, also when its sampler reads some rows only: the weights of
        the rows it does not read are not used).
    mode : {"sampler", "loss"}
        ``"sampler"``: a DataLoader that draws samples with probability proportional to the weights (with
        replacement; ``num_samples`` per epoch, default the number of rows the given data reads in an epoch:
        the data set's size, or the length of a ``SubsetRandomSampler``'s ``indices``). ``"loss"``: the weights,
        one per row of the data set whatever a DataLoader's sampler, as a float tensor normalised to mean 1, to
        multiply per-sample losses with. It is on the CPU unless ``device`` says
        otherwise: with losses on a GPU, pass ``device=losses.device`` (or move the weights, or the indexed slice
        of them, there) before multiplying, since torch refuses a CPU tensor times a CUDA one.
    batch_size : int, optional
        Samples per batch of the ``"sampler"`` loader: default the given DataLoader's, else 32 (a DataLoader that
        yields samples one by one, ``batch_size=None``, gives batches of 32 collated by torch's default).
    num_samples : int, optional
        ``mode="sampler"`` only: samples drawn per epoch (>= 1); default the number of rows the given data reads
        in an epoch.
    generator : torch.Generator, optional
        ``mode="sampler"`` only: the random source of the weighted draws. Default: a DataLoader's own
        ``generator`` (the one its shuffling drew from; the global one when it has none). A DataLoader's
        ``generator`` also stays the new loader's, which seeds its workers from it (as ``data`` did); with both
        the same generator, each epoch's draws and worker seeds follow from its state, as ``data``'s did. With a
        data set or a tensor, a given ``generator`` is the new loader's too: iterating it leaves the global
        generator as it was.
    device : torch.device or str, optional
        ``mode="loss"`` only: the device of the returned weights (default the CPU), e.g. that of the per-sample
        losses they multiply.
    """
    plan = weights if isinstance(weights, Intervention) else None
    if plan is not None:  # its weights
        weights = plan.weights
    try:
        w = torch.as_tensor(_as_float64(weights, "weights"), device="cpu")  # moved to ``device`` at the end
    except (TypeError, ValueError) as e:  # e names weights and what was wrong with it
        raise TypeError(
            f"{e}; give per-sample weights or an Intervention (this one is of type {type(weights).__name__})"
        ) from None
    if mode == "loss":  # the sampler's settings have no meaning here: refused rather than ignored
        given = [
            k
            for k, v in (("batch_size", batch_size), ("num_samples", num_samples), ("generator", generator))
            if v is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} apply to mode='sampler' only; mode='loss' returns the weights"
            )
        if device is not None:
            device = device_arg(device)
    elif device is not None and mode == "sampler":  # the batches come from the data set as they are
        raise ValueError(
            "device applies to mode='loss' only (the weights it returns); mode='sampler' returns a DataLoader whose "
            "batches are moved to a device by the training loop"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator={generator!r} is not valid; give a torch.Generator or None")
    if w.dim() != 1:
        raise ValueError(f"weights must be 1-D, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError("weights is empty (length 0); give one weight per sample of data")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative (use invert(method='constrained'))")
    if float(w.sum()) <= 0:
        raise ValueError("weights are all zero")
    # a TaskBatch or a dict of tensors (a tokenizer's output): its rows are drawn by index, batches taken as
    # data[rows] / {key: value[rows]} (default_collate knows neither a TaskBatch nor the dict's keys as rows)
    take = _RowTaker.of(data)
    dataset = getattr(data, "dataset", data) if take is None else range(take.size)
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        what = "a DataLoader over " if dataset is not data else ""
        raise TypeError(
            f"data is {what}{type(dataset).__name__}, which cannot be drawn from by index; reweight needs a map-style "
            "data set (with len() and indexing: a Dataset, a tensor, or a DataLoader over one)"
        )
    size = len(dataset)
    # the rows mode="sampler" draws among, each as often as data reads it in an epoch; None: every row once
    rows = None
    if mode == "sampler" and isinstance(data, torch.utils.data.DataLoader):
        rows = _sampler_rows(data, size)
    if size != w.numel():
        hint = ""
        if rows is not None and w.numel() == rows.numel():
            hint = (
                f" (its sampler reads {rows.numel()} of them: give one weight per row of data.dataset; "
                "those of the rows it does not read are not used)"
            )
        if plan is not None and w.numel() < size:
            hint += (
                f" (an Intervention holds one weight per column of chi: when its {w.numel()} columns are some of the "
                f"data's rows, invert(..., num_data={size}), the data's weights are 1 but at those rows: "
                "w = np.ones(len(data)); w[rows] = plan.weights)"
            )
        raise ValueError(f"weights has {w.numel()} entries but the data has {size} samples{hint}")
    if mode == "loss":
        w = w / w.max()  # scaled first: the mean of weights near float64's largest overflows
        w = (w / w.mean()).to(torch.float32)
        return w if device is None else w.to(device)
    if mode != "sampler":
        raise ValueError(f"mode must be 'sampler' or 'loss', got {mode!r}")
    if isinstance(data, torch.Tensor):  # a bare tensor; a DataLoader's dataset is drawn from as it is
        dataset = torch.utils.data.TensorDataset(data)
    loader_kw = {}
    if take is not None:  # the loader draws row indices, each batch taken from data at once
        loader_kw["collate_fn"] = take
    if isinstance(data, torch.utils.data.DataLoader):
        loader_kw = dict(
            collate_fn=data.collate_fn,
            num_workers=data.num_workers,
            pin_memory=data.pin_memory,
            drop_last=data.drop_last,
            timeout=data.timeout,
            worker_init_fn=data.worker_init_fn,
            multiprocessing_context=data.multiprocessing_context,
            generator=data.generator,  # the workers' seeds, as in data
            pin_memory_device=data.pin_memory_device,
        )
        if data.num_workers > 0:  # (DataLoader refuses these without workers)
            loader_kw.update(prefetch_factor=data.prefetch_factor, persistent_workers=data.persistent_workers)
        if hasattr(data, "in_order"):
            loader_kw["in_order"] = data.in_order
        if generator is None:
            generator = data.generator  # the draws as reproducible as data's own shuffling
        if batch_size is None:
            batch_size = data.batch_size
        if data.batch_size is None and data.collate_fn is torch.utils.data.default_convert:
            # the loader yields samples one by one (batch_size=None): batches of the new loader are collated
            loader_kw["collate_fn"] = torch.utils.data.default_collate
    elif generator is not None:
        # the loader's own seed (drawn at each iter() for its workers) from it too, not from the global generator
        loader_kw["generator"] = generator
    if batch_size is None:
        batch_size = 32
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; give an int >= 1")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) or num_samples < 1
    ):
        raise ValueError(
            f"num_samples={num_samples!r} is not valid; give an int >= 1 (or None: as many as the data reads "
            "in an epoch)"
        )
    if rows is not None:  # the weights of the rows data reads, once per read; 0 elsewhere
        w = torch.zeros_like(w).index_add_(0, rows, w[rows])
        if float(w.sum()) <= 0:
            raise ValueError(
                f"weights are all zero on the {rows.numel()} rows data's sampler reads "
                f"({type(data.sampler).__name__}): give a positive weight to at least one of them"
            )
    sampler = torch.utils.data.WeightedRandomSampler(
        w,
        num_samples=(size if rows is None else rows.numel()) if num_samples is None else int(num_samples),
        replacement=True,
        generator=generator,
    )
    return torch.utils.data.DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, **loader_kw)


class _RowTaker:
    """The rows ``idx`` of a :class:`pypattern.tasks.TaskBatch` (``data[idx]``) or of a dict of tensors or arrays
    of one length along their first axis, such as a tokenizer's output (``{key: value[idx]}``, of ``data``'s own
    mapping type where it can be built from a dict): the ``collate_fn`` of :func:`reweight`'s loader over row
    indices."""

    def __init__(self, data, size: int):
        self.data, self.size = data, size

    @classmethod
    def of(cls, data) -> _RowTaker | None:
        from .tasks.base import TaskBatch

        if isinstance(data, TaskBatch):
            return cls(data, len(data))
        if not isinstance(data, Mapping) or not data or not all(isinstance(k, str) for k in data):
            return None  # (a dict keyed by row numbers is a map-style data set as it is)
        sizes = {}
        for k, v in data.items():
            if not isinstance(v, torch.Tensor | np.ndarray):
                raise TypeError(
                    f"data[{k!r}] is a {type(v).__name__}; a dict of rows holds tensors or arrays whose first axis "
                    "is the samples (a tokenizer's output with return_tensors='pt')"
                )
            if v.ndim == 0:
                raise ValueError(
                    f"data[{k!r}] is a scalar; each value of a dict of rows has the samples on axis 0"
                )
            sizes[k] = v.shape[0]
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"data's values have different numbers of rows ({sizes}); a dict of rows holds one row per sample "
                "in each value"
            )
        return cls(data, next(iter(sizes.values())))

    def __call__(self, idx):
        if not isinstance(self.data, Mapping):
            return self.data[torch.as_tensor(idx, dtype=torch.long)]
        rows = {
            k: v[torch.as_tensor(idx, dtype=torch.long)]
            if isinstance(v, torch.Tensor)
            else v[np.asarray(idx)]
            for k, v in self.data.items()
        }
        if type(self.data) is dict:
            return rows
        try:  # e.g. a tokenizer's BatchEncoding, whose .to(device) the training loop may use
            return type(self.data)(rows)
        except Exception:
            return rows


class OnlinePatterner:
    """Online patterning: re-estimate ``chi`` at checkpoints during training and re-invert.

    Parameters
    ----------
    estimate_chi : callable(step) -> array (K, N)
        Estimates the susceptibilities at the current weights (e.g. with :func:`pypattern.susceptibilities`).
    target : callable(step, current_mu) -> array (K,) or array (K,)
        The desired change of the observables from now on.
    measure : callable(step) -> array (K,), optional
        The current observables, passed to a callable target (given with a fixed target, which would never read
        it: a ValueError).
    every : int
        Re-estimate every ``every`` calls of :meth:`weights_for`.
    invert_kwargs : dict
        Passed to :func:`invert` (default ``method="constrained"``); a key :func:`invert` does not take is a
        ``TypeError`` here, not at the first re-estimation.

    ``weights_for(step)`` returns the current per-point weights; between checkpoints it returns the last ones.
    ``history`` keeps (step, Intervention) for every re-inversion.
    """

    def __init__(
        self,
        estimate_chi: Callable,
        target,
        *,
        measure: Callable | None = None,
        every: int = 100,
        invert_kwargs: dict | None = None,
    ):
        if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not callable(estimate_chi):
            raise TypeError(
                f"estimate_chi must be a callable(step) -> chi (K, N), got {type(estimate_chi).__name__} (for a fixed "
                "chi, call invert once instead)"
            )
        if measure is not None and not callable(measure):
            raise TypeError(
                f"measure must be a callable(step) -> array (K,) or None, got {type(measure).__name__}"
            )
        if measure is not None and not callable(target):
            raise ValueError(
                "measure is read only by a callable target(step, current_mu); with a fixed target it would never be "
                "called: give target as a callable, or leave measure out"
            )
        if invert_kwargs is not None:
            if not isinstance(invert_kwargs, Mapping):
                raise TypeError(
                    f"invert_kwargs must be a dict of invert()'s keyword arguments, got {type(invert_kwargs).__name__}"
                )
            known = [k for k, p in inspect.signature(invert).parameters.items() if p.kind is p.KEYWORD_ONLY]
            bad = [k for k in invert_kwargs if k not in known]
            if bad:
                raise TypeError(
                    f"invert_kwargs has keys {bad} that invert() does not take; its keyword arguments are {known}"
                )
        self.estimate_chi, self.target, self.measure, self.every = estimate_chi, target, measure, every
        self.invert_kwargs = {"method": "constrained", **(invert_kwargs or {})}
        self.history: list[tuple[int, Intervention]] = []
        self._weights: np.ndarray | None = None
        self._calls = 0

    def weights_for(self, step: int) -> np.ndarray:
        if self._weights is None or self._calls % self.every == 0:
            chi = self.estimate_chi(step)  # (its own errors propagate as they are)
            try:
                chi = _as_2d(chi)
            except (TypeError, ValueError) as e:
                kind = TypeError if isinstance(e, TypeError) else ValueError
                raise kind(f"estimate_chi({step!r}) returned a chi that is not valid: {e}") from None
            tgt = (
                self.target(step, None if self.measure is None else self.measure(step))
                if callable(self.target)
                else self.target
            )
            try:
                iv = invert(chi, tgt, **self.invert_kwargs)
            except (TypeError, ValueError) as e:
                what = f"target(step={step!r}, ...) returned" if callable(self.target) else "target is"
                kind = TypeError if isinstance(e, TypeError) else ValueError
                raise kind(f"{e} (at step {step!r}; {what} {_short(tgt)})") from None
            self.history.append((step, iv))
            self._weights = iv.weights
        self._calls += 1
        return self._weights
