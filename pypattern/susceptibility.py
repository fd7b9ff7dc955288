"""Susceptibilities and the Bayesian influence function, estimated as posterior covariances over SGLD draws.

Definitions
-----------
Perturb the data distribution ``q -> q_h = (1 - h) q + h q'``. The population loss becomes
``L_h = L + h (L' - L)``, and the localized tempered posterior ``p_h(w) ∝ exp(-nβ L_h(w) - γ/2 |w - w*|²)``
responds to first order as (a fluctuation-dissipation identity)::

    chi = d/dh E_h[phi] |_{h=0} = -nβ · Cov_posterior(phi, L' - L).

For one probe sample or token ``z`` (``q'`` a point mass on ``z``): ``chi_z = -nβ · Cov(phi, l_z - L)``, where
``l_z`` is ``z``'s loss and ``L`` the population loss, estimated here by the mean loss over the probe set (so a
uniform re-weighting of the probe set has zero response). This is the **physics** convention
(``convention="physics"``), the one patterning inverts.

Component observables (structural inference): for a component ``C`` (an attention head, an MLP, the embedding,
any set of weights given by masks) SGLD moves only ``C``'s weights, and ``phi_C`` is the loss on a fixed sampling
batch (or any callable of the model). One row of ``chi`` per component, one column per probe sample or token.
Both conventions read ``phi`` shifted by its value at the initial weights, ``phi - phi(w*)``. The physics ``chi``
is a covariance and does not change under a constant shift of ``phi``; the devinterp ``chi`` below does change,
and is the one of the shifted ``phi``.

The **devinterp** convention (``convention="devinterp"``, what devinterp 2.0.1 reports) has no ``nβ`` factor, and
takes the baseline means from an additional unrestricted run ("full")::

    chi_t = E_C[phi' · Lbar] - E_C[phi' · l_t] - E_C[phi'] · (E_full[Lbar] - E_full[l_t]),   phi' = phi - phi(w*)

with ``Lbar`` the mean probe loss (devinterp's ``phi`` is likewise its sampling loss minus the loss at the
initial weights). It equals ``Cov_C(phi, Lbar - l_t) + E_C[phi'] · (E_C[Lbar - l_t] - E_full[Lbar - l_t])``: the
second term depends on the shift, so another ``phi(w*)`` (or none) gives another ``chi``. Up to sign and the
``nβ`` factor it is the physics covariance when the restricted and unrestricted posteriors have the same means
of ``Lbar`` and ``l_t``, and then no shift changes it. devinterp's ``Lbar`` is the mean loss of its *sampling*
data set: the two agree when the probe is the sampling data (as in
``bench/bench_susceptibility.py``), not for a separate probe set.

Bayesian influence function: ``BIF(z_i, z_j) = -Cov_posterior(l_i, l_j)`` (or the correlation), from draws of
the unrestricted posterior.

Draws stream into :class:`~pypattern.ops.covariance.CrossCovariance` accumulators (float64, exactly mergeable),
one per chain, so memory does not grow with the number of draws and the standard error over chains comes for free.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import inspect
import json
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import io
from ._checks import compiled_inner, is_count
from ._masks import not_a_mask, zero_one_mask
from ._plotting import _is_axes, figure_axes, finish, new_figure
from .gram import _eval_mode_throughout, _is_bridge
from .io import Saveable, register
from .losses import (
    _describe,
    batch_size,
    check_batch,
    counted_entries,
    counted_mask,
    errors_naming,
    probe_losses,
    sample_losses,
    token_losses,
)
from .ops.covariance import CrossCovariance
from .ridge import as_float64, float64_device
from .sampling.auto import (
    auto_arguments,
    calibrate_or_resume,
    check_auto_step_options,
    read_calibration,
    resolve_step_size,
    wants_auto,
    write_calibration,
)
from .sampling.checkpoint import (
    CHECKPOINT_KIND,
    FINGERPRINT_DEFAULTS,
    RESUMABLE_SETTINGS,
    load_checkpoint_state,
    model_architecture,
    model_hooks,
    training_modes,
    warn_changed_settings,
)
from .sampling.data import ChainData, hash_data, to_device
from .sampling.diagnostics import NonFiniteLossError, NonStationaryWarning, naming_runs, user_stacklevel
from .sampling.llc import capped_burnin_message, on_device, resolve_device
from .sampling.optim import SGLD_DEFAULTS, chain_seed
from .sampling.plan import (
    check_callables,
    check_loader,
    check_model,
    check_no_clash,
    refuse_unknown_keywords,
)
from .sampling.results import check_arrays
from .sampling.runner import (
    _eval_mode_for_dropout,
    by_default_rule,
    calibrated_burnin,
    default_burnin,
    is_burnin_rule,
    is_sample_default,
    rerun_at_half_step,
    sample,
    split_loss,
    step_calibrated_by_caller,
)
from .sampling.samplers import sampler_name
from .sampling.vocabulary import DEVINTERP_NAMES, translate

ROW_KIND = "susceptibility-row"  # a finished run's row in a checkpoint folder
CALIBRATION_FILE = "step_size_calibration.npz"  # the step-size calibration's record in a checkpoint folder

__all__ = ["susceptibilities", "bif", "SusceptibilityResult", "BIFResult", "PCAResult", "per_sample_losses"]


# ------------------------------------------------------------------------------------------------ observables


def per_sample_losses(model: nn.Module, batch) -> torch.Tensor:
    """Default per-sample (or per-token) losses of ``model`` on a probe ``batch``, by the library's one rule
    (:func:`pypattern.losses.probe_losses`).

    * token tensors ``(batch, pos)`` and Hugging Face dicts: next-token losses ``(batch, pos - 1)`` (0 at padded
      positions, which therefore carry no covariance);
    * ``(x, y)`` with integer ``y``: cross-entropy per sample ``(batch,)`` (per token if the logits have a sequence
      axis); ``(x, y)`` with float ``y``: squared error averaged over the non-batch axes ``(batch,)``.
    """
    return probe_losses(model, batch)


def _flat(v: torch.Tensor, n: int | None, what: str, *, check: bool = True, device=None) -> torch.Tensor:
    """``v`` as a float64 vector of ``n`` values (on ``device`` when given); non-finite values refused (with
    ``check``; without, the caller checks, see :func:`_check_finite`)."""
    v = v.detach().reshape(-1)
    if (
        device is not None
    ):  # a loss function that returns its values elsewhere (a .cpu() in it): to the accumulator
        v = v.to(device)
    v = as_float64(v)
    if n is not None and v.numel() != n:
        raise ValueError(
            f"{what} returned {v.numel()} values at a draw but {n} at w*: its shape must not change"
        )
    if check:
        _check_finite((v, what))
    return v


def _check_finite(*parts: tuple[torch.Tensor, str]) -> None:
    """Refuse non-finite values in any of ``parts`` (``(values, what returned them)``), naming the first such
    part: one look at the values for all of them (one device synchronisation on a GPU, not one per part)."""
    whole = parts[0][0] if len(parts) == 1 else torch.cat([v.reshape(-1) for v, _ in parts])
    if bool(torch.isfinite(whole).all()):
        return
    for v, what in parts:
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"{what} returned a non-finite value at a draw (a diverging chain?)")


def _run_device(model: nn.Module, device) -> tuple[nn.Module, torch.device]:
    """``(model on the device the estimator runs on, that device)``: ``device=None`` runs on the model's own
    device; another device runs on a copy of the model moved there (the caller's model stays where it is), as
    :func:`pypattern.estimate_llc`'s ``device=``. The device returned is the one the model's tensors report
    (``"cuda"`` is ``cuda:<index>``; a model spread over devices: its first parameter's, where the sampler puts
    the batches), where the probe, the sampling batch and the accumulators go. A ``torch.compile`` wrapper of
    pypattern's :class:`~pypattern.models.Transformer` runs as the model it wraps (the same function and
    parameters), whose parameter and component names (``blocks.0.attn.head.1``) the components are given in."""
    from .models.transformer import Transformer

    if isinstance(compiled_inner(model), Transformer):
        model = compiled_inner(model)
    if device is not None:  # (None: a model spread over several devices stays as it is)
        model = on_device(model, resolve_device(device, model))
    return model, resolve_device(None, model)


# ------------------------------------------------------------------------------------------------ results


@register
@dataclasses.dataclass
class PCAResult(Saveable):
    """Principal susceptibility directions.

    Attributes
    ----------
    directions : ndarray (n_pcs, num_components)
        Unit vectors over components (rows), in decreasing order of explained variance.
    explained_variance, explained_variance_ratio : ndarray (n_pcs,)
    scores : ndarray (num_probe, n_pcs)
        Per-sample/per-token coordinates: the centred (and, with whitening, scaled) columns of chi projected on
        the directions (NaN rows at probe columns that do not count).
    scale : ndarray (num_components,)
        The per-component scale divided out before the SVD (ones without whitening): the standard deviation
        (``ddof=1``) of each component's chi over the counted probe points, so that ``whiten=True`` is the PCA of
        the components' correlation matrix (1 for a component whose chi is the same at every counted point: it has
        no correlation, and variance 0 along every direction).
    mean : ndarray (num_components,)
        The mean of each component's chi over the counted probe points, subtracted before the SVD.

    The directions are the eigenvectors of the covariance (``ddof=1``, over the counted probe points) of the
    components' chi (the correlation with ``whiten=True``) in decreasing order of their eigenvalues
    (``explained_variance``), each of unit norm with its largest-magnitude loading positive.
    """

    directions: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    scores: np.ndarray
    scale: np.ndarray
    mean: np.ndarray

    def _check_loaded(self) -> None:
        """The arrays agree (a file read by :meth:`load`): ``n_pcs`` directions over the components, one score per
        probe point and direction, numbers throughout."""
        check_arrays(
            vars(self),
            {
                "directions": ("n_pcs", "components"),
                "explained_variance": ("n_pcs",),
                "explained_variance_ratio": ("n_pcs",),
                "scores": ("probe", "n_pcs"),
                "scale": ("components",),
                "mean": ("components",),
            },
        )

    def plot(self, path: str | os.PathLike | None = None, ax=None, color=None):
        """The probe points on the first two principal directions (their ``scores``; the first against zero when
        there is one direction), the axes labelled with the share of variance each explains. ``ax``: draw on these
        matplotlib axes (else a new figure); ``color``: one value per probe point for the colour map (e.g. the
        result's ``probe_position``). Probe points that do not count (NaN scores) are left out. Returns the
        figure; writes it to ``path`` if given."""
        fig, ax, own = figure_axes(path, ax, (5, 4))
        sc = np.asarray(self.scores, dtype=np.float64)
        if sc.ndim != 2 or sc.shape[1] == 0:
            raise ValueError(f"this PCAResult has scores of shape {sc.shape}: no direction to plot")
        y = sc[:, 1] if sc.shape[1] > 1 else np.zeros(len(sc))
        keep = np.isfinite(sc[:, 0]) & np.isfinite(y)
        if color is not None:
            color = np.asarray(color)
            if color.shape != (len(sc),):
                raise ValueError(
                    f"color has shape {color.shape}; give one value per probe point, ({len(sc)},)"
                )
            color = color[keep]
        ax.scatter(sc[keep, 0], y[keep], s=6, c=color, cmap="viridis" if color is not None else None)
        r = np.asarray(self.explained_variance_ratio, dtype=np.float64)
        ax.set_xlabel(f"PC1 ({100 * r[0]:.0f}%)")
        ax.set_ylabel(f"PC2 ({100 * r[1]:.0f}%)" if len(r) > 1 else "")
        ax.set_title("probe points on the principal directions")
        finish(fig, path, own, dpi=120)
        return fig


@register
@dataclasses.dataclass
class SusceptibilityResult(Saveable):
    """Susceptibility matrix ``chi`` with its standard error over chains.

    Attributes
    ----------
    chi : ndarray (num_components, num_probe)
        Pooled over all chains' draws.
    chi_se : ndarray (num_components, num_probe)
        Standard error of ``chi`` by the jackknife over chains: ``sqrt((C - 1) / C sum_c (chi_{-c} - mean)^2)``
        with ``chi_{-c}`` pooled over every chain but ``c`` (NaN with one chain). It includes the differences
        between the chains' means, which ``chi`` (pooled) includes and the per-chain estimates do not: with short
        chains, ``chi_chains.std(1) / sqrt(C)`` understates the spread of ``chi`` several-fold. With ``C``
        chains it rests on ``C - 1`` degrees of freedom, so it is itself noisy with few chains: on an exact
        Gaussian posterior, ``(chi - exact) / chi_se`` had a mean square near 1 with 16 chains and of 2-9 over
        three seeds with 4; read it as a t-statistic with ``C - 1`` degrees of freedom.
    chi_chains : ndarray (num_components, num_chains, num_probe)
    components : list of str
    probe_sample, probe_position, probe_token : ndarray (num_probe,)
        Which probe sample (and, for per-token losses, which predicted position and token) each column is;
        position and token are -1 for per-sample losses, the token -1 at a column that does not count.
    probe_counted : ndarray (num_probe,) of bool, or None
        Which columns count (False at padding and ``-100`` labels, whose chi is 0); None when all do.
    phi_mean, loss_mean : ndarray (num_components,), (num_components, num_probe)
        Posterior means of the observable (as it is, not shifted by its value at ``w*``) and of the probe losses
        under each component's run.
    """

    chi: np.ndarray
    chi_se: np.ndarray
    chi_chains: np.ndarray
    components: list
    probe_sample: np.ndarray
    probe_position: np.ndarray
    probe_token: np.ndarray
    phi_mean: np.ndarray
    loss_mean: np.ndarray
    convention: str
    nbeta: float
    num_chains: int
    num_draws: int
    settings: dict
    probe_counted: np.ndarray | None = None

    def _check_loaded(self) -> None:
        """The arrays agree (a file read by :meth:`load`): ``(components, probe)`` matrices, one name per
        component, one row per component and chain in ``chi_chains``, numbers throughout."""
        check_arrays(
            vars(self),
            {
                "chi": ("components", "probe"),
                "chi_se": ("components", "probe"),
                "chi_chains": ("components", "chains", "probe"),
                "probe_sample": ("probe",),
                "probe_position": ("probe",),
                "probe_token": ("probe",),
                "phi_mean": ("components",),
                "loss_mean": ("components", "probe"),
                "probe_counted": ("probe",),
            },
        )
        k = self.chi.shape[0]
        if not isinstance(self.components, list) or len(self.components) != k:
            raise ValueError(
                f"components must be a list of {k} names, one per row of chi, got {_short_text(self.components)}"
            )
        if self.chi_chains.shape[1] != self.num_chains:
            raise ValueError(
                f"chi_chains {self.chi_chains.shape} is not of shape (components, num_chains, probe) with "
                f"num_chains = {self.num_chains}"
            )

    def pca(self, n_components: int | None = None, *, whiten: bool = False) -> PCAResult:
        """PCA of the probe points in component space (``chi.T``: one row per probe point, one feature per
        component), centred over probe points; ``whiten=True`` first scales each component to unit variance.
        Probe points that do not count (``probe_counted`` False: padding, ``-100`` labels) are left out; their
        rows of ``scores`` are NaN. ``n_components`` (default: all) is at most the number of directions the SVD has,
        the smaller of the number of components and of counted probe points (more is a ``ValueError``); directions
        beyond the rank of the centred matrix have explained variance 0 and are an arbitrary orthonormal
        completion. Each direction's sign makes its largest-magnitude loading positive."""
        if n_components is not None and (
            isinstance(n_components, bool)
            or not isinstance(n_components, numbers.Integral)
            or n_components < 1
        ):
            raise ValueError(f"n_components={n_components!r} is not valid; give an int >= 1 or None (all)")
        if not isinstance(whiten, bool | np.bool_):
            raise TypeError(f"whiten={whiten!r} is not valid; give True or False")
        keep = None if self.probe_counted is None else np.asarray(self.probe_counted, dtype=bool)
        x = self.chi.T.astype(np.float64)
        if keep is not None:
            if keep.shape != (x.shape[0],):
                raise ValueError(
                    f"probe_counted has shape {keep.shape}; expected ({x.shape[0]},), one per column"
                )
            x = x[keep]
        if x.shape[0] == 0:
            raise ValueError(
                "probe_counted is False at every probe column (all padding or -100 labels): chi has no probe point "
                "to take principal directions over"
            )
        if not np.isfinite(x).all():
            raise ValueError("chi holds NaN or Inf entries (a diverged chain?): PCA needs finite values")
        most = min(x.shape)  # the SVD of the (probe points x components) matrix has this many directions
        if n_components is not None and int(n_components) > most:
            raise ValueError(
                f"n_components={n_components!r} is more than the {most} principal directions chi has (the smaller "
                f"of its {x.shape[1]} components and {x.shape[0]} counted probe points); give at most {most}, "
                "or None for all"
            )
        mean = x.mean(0)
        xc = x - mean
        scale = xc.std(0, ddof=1) if whiten and x.shape[0] > 1 else np.ones(x.shape[1])
        scale = np.where(scale > 0, scale, 1.0)
        xc = xc / scale
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        k = len(s) if n_components is None else min(int(n_components), len(s))
        var = s**2 / max(x.shape[0] - 1, 1)
        total = var.sum()
        # fix the sign: the largest-magnitude loading of each direction is positive
        signs = np.sign(vt[np.arange(len(s)), np.abs(vt).argmax(1)])
        signs[signs == 0] = 1
        vt, u = vt * signs[:, None], u * signs[None, :]
        scores = (u * s)[:, :k]
        if keep is not None:  # one row per probe column, NaN where it does not count
            full = np.full((len(keep), scores.shape[1]), np.nan)
            full[keep] = scores
            scores = full
        return PCAResult(
            directions=vt[:k],
            explained_variance=var[:k],
            explained_variance_ratio=var[:k] / total if total > 0 else np.zeros(k),
            scores=scores,
            scale=scale,
            mean=mean,
        )

    def to_pandas(self):
        """Long table: one row per (component, probe point) with chi and its standard error; ``counted`` is
        ``probe_counted`` (False at padding and ``-100`` labels, whose chi is 0; True throughout when it is
        None)."""
        import pandas as pd

        k, n = self.chi.shape
        return pd.DataFrame(
            {
                "component": np.repeat(np.asarray(self.components, dtype=object), n),
                "probe_sample": np.tile(self.probe_sample, k),
                "probe_position": np.tile(self.probe_position, k),
                "probe_token": np.tile(self.probe_token, k),
                "chi": self.chi.reshape(-1),
                "chi_se": self.chi_se.reshape(-1),
                "counted": np.tile(
                    np.ones(n, bool) if self.probe_counted is None else np.asarray(self.probe_counted, bool),
                    k,
                ),
            }
        )

    def plot(self, path: str | os.PathLike | None = None, ax=None):
        """Heatmap of chi (components x probe points) and the probe points on the first two principal
        directions (:meth:`PCAResult.plot`, when there are two components and three counted probe points with
        finite chi). ``ax``: draw the heatmap alone on these matplotlib axes (else a new figure with both panels).
        Non-finite entries of chi are drawn blank and left out of the colour scale. Returns the matplotlib figure;
        writes it to ``path`` if given."""
        chi = np.asarray(self.chi, dtype=np.float64)
        if ax is None and not _is_axes(path):
            fig = new_figure(path, (12, 4))
            ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
            own = True
        else:
            fig, ax0, own = figure_axes(path, ax, (8, 4))
            ax1 = None
        finite = chi[np.isfinite(chi)]
        lim = float(np.abs(finite).max()) if finite.size else 0.0
        lim = lim if lim > 0 else 1.0
        im = ax0.imshow(chi, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax0.set_yticks(range(len(self.components)), self.components, fontsize=7)
        ax0.set_xlabel("probe sample / token")
        ax0.set_title(f"susceptibilities ({self.convention} convention)")
        fig.colorbar(im, ax=ax0)
        counted = (
            np.ones(chi.shape[1], bool) if self.probe_counted is None else np.asarray(self.probe_counted)
        )
        if (
            ax1 is not None
            and chi.shape[0] >= 2
            and int(counted.sum()) >= 3
            and bool(np.isfinite(chi[:, counted]).all())
        ):
            self.pca(2).plot(ax=ax1, color=self.probe_position)
        finish(fig, path, own, dpi=120)
        return fig


@register
@dataclasses.dataclass
class BIFResult(Saveable):
    """Bayesian influence ``-Cov(l_i, l_j)`` (and the correlation) between probe points.

    Attributes
    ----------
    bif : ndarray (num_probe, num_probe)
        ``-Cov(l_i, l_j)`` (``ddof=1``) over every chain's draws pooled; exactly symmetric, minus each entry's loss
        variance on its diagonal.
    corr : ndarray (num_probe, num_probe)
        Pearson correlation of the losses, ``Corr(l_i, l_j) = bif_ij / sqrt(bif_ii bif_jj)``, without ``bif``'s
        minus sign (devinterp's default reports a correlation of the losses; :func:`pypattern.devinterp.compute_bif`
        gives this one, sign included): exactly symmetric, within [-1, 1], 1 on its diagonal. NaN in the rows and columns of an entry whose loss does not vary over the draws, padded
        probe entries included (their loss is a constant 0: no correlation is defined; ``bif`` is 0 there).
    probe_counted : ndarray (num_probe,) of bool, or None
        Which probe entries count (False: padding, ``-100`` labels; their rows and columns are 0 in ``bif``);
        None when every entry counts. As :attr:`SusceptibilityResult.probe_counted`.
    """

    bif: np.ndarray
    corr: np.ndarray
    loss_mean: np.ndarray
    probe_sample: np.ndarray
    probe_position: np.ndarray
    probe_token: np.ndarray
    num_chains: int
    num_draws: int
    settings: dict
    probe_counted: np.ndarray | None = None

    def _check_loaded(self) -> None:
        """The arrays agree (a file read by :meth:`load`): ``(probe, probe)`` matrices and one entry per probe
        point in the others, numbers throughout."""
        check_arrays(
            vars(self),
            {
                "bif": ("probe", "probe"),
                "corr": ("probe", "probe"),
                "loss_mean": ("probe",),
                "probe_sample": ("probe",),
                "probe_position": ("probe",),
                "probe_token": ("probe",),
                "probe_counted": ("probe",),
            },
        )


def _short_text(value, limit: int = 80) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[:limit] + '...'}"


# ------------------------------------------------------------------------------------------------ estimators


def _only_batch(loader):
    """The loader's batch if it has exactly one and reads it the same way every time (a list or tuple of one batch,
    a one-batch DataLoader without shuffling), else None: a shuffling loader's one batch comes in another order at
    each read, so the sampler's read need not be the probe's."""
    if isinstance(loader, torch.utils.data.DataLoader):
        if not isinstance(loader.sampler, torch.utils.data.SequentialSampler) or not isinstance(
            loader.batch_sampler, torch.utils.data.BatchSampler
        ):
            return None
    elif not isinstance(loader, list | tuple):
        return None
    try:
        if len(loader) != 1:
            return None
    except TypeError:
        return None
    return next(iter(loader))


def _same_batch(a, b) -> bool:
    """Whether two batches hold the same values (tensors, or tuples/lists of tensors)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        return all(_same_batch(x, y) for x, y in zip(a, b))
    return False


def _exact(name: str) -> str:
    """A parameter name as a sampler pattern that matches that parameter alone: a glob whose wildcard characters
    (``*``, ``?``, ``[``) are bracketed into literals (``.`` is a plain character in a glob already); no other
    parameter's name starts with a parameter's name and a dot, so the pattern's reading as a module prefix covers
    nothing else."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _component_spec(model: nn.Module, comp) -> tuple[list[str], dict[str, torch.Tensor] | None]:
    """(restrict_to names, masks) for one component: a name known to ``model.component_masks``, a mapping
    ``{param_name: mask}``, or a list of parameter names (whole tensors). A component over a frozen parameter
    (``requires_grad=False``) is refused, naming both: sampling moves only parameters that require grad."""
    names, masks = _component_parts(model, comp)
    covered = (
        set(masks) if masks is not None else {n for n, _ in model.named_parameters() if _exact(n) in names}
    )
    frozen = sorted(n for n, p in model.named_parameters() if n in covered and not p.requires_grad)
    if frozen:
        what = repr(comp) if isinstance(comp, str) else "given as " + type(comp).__name__
        raise ValueError(
            f"components: component {what} covers parameters that are frozen (requires_grad=False): {frozen}; "
            "sampling moves only parameters that require grad: unfreeze them with requires_grad_(True) or "
            "choose a component without them"
        )
    return names, masks


def _is_pattern(text: str) -> bool:
    """Whether a component's text is a glob (``*``, ``?``, ``[``) or a regex (it holds a backslash), read as
    :func:`pypattern.sample`'s ``restrict_to`` reads it, rather than a component name."""
    return any(c in text for c in "*?[\\")


def _matching(params: Mapping[str, torch.Tensor], pattern, what: str) -> list[str]:
    """The parameter names ``pattern`` (a glob, a regex, or a compiled regex, as :func:`pypattern.sample`'s
    ``restrict_to``) matches, in the model's order; none is a ValueError naming it."""
    from .sampling.optim import matches

    names = [n for n in params if matches(n, [pattern])]
    if not names:
        shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        raise ValueError(
            f"components: {what} {shown!r} matches no parameter of the model (a glob such as 'blocks.*.attn.W_Q', or a regex); "
            f"its parameters are named like {list(params)[:4]}"
        )
    return names


def _component_parts(model: nn.Module, comp) -> tuple[list[str], dict[str, torch.Tensor] | None]:
    """:func:`_component_spec` before its check of frozen parameters."""
    params = dict(model.named_parameters())
    if isinstance(comp, Mapping):
        masks = {}
        for k, v in comp.items():
            if not isinstance(k, str) or k not in params:
                raise ValueError(
                    f"component mask key {k!r} is not a parameter name of the model (e.g. {next(iter(params))!r})"
                )
            m = zero_one_mask(v)
            if m is None:
                raise ValueError(f"component mask for {k!r} must be boolean (or 0/1 values); {not_a_mask(v)}")
            if tuple(m.shape) != tuple(params[k].shape):
                raise ValueError(
                    f"component mask for {k!r} has shape {tuple(m.shape)}, the parameter {tuple(params[k].shape)}"
                )
            masks[k] = m
        if not masks:
            raise ValueError(
                "a component given as a dict of masks is empty: give at least one {param_name: mask}"
            )
        return [_exact(k) for k in masks], masks
    if isinstance(comp, re.Pattern) or (isinstance(comp, str) and comp not in params and _is_pattern(comp)):
        return [_exact(n) for n in _matching(params, comp, "component")], None
    if isinstance(comp, str):
        if hasattr(model, "component_masks"):
            masks = model.component_masks(comp)
        else:
            from .models.transformer import component_masks

            masks = component_masks(model, comp)
        whole = all(bool(m.all()) for m in masks.values())
        return [_exact(k) for k in masks], None if whole else masks
    if isinstance(comp, Sequence):
        from .sampling.optim import matches

        if not comp:
            raise ValueError(
                "a component given as a list of parameter names is empty: name at least one parameter"
            )
        names: list[str] = []
        bad = []
        for (
            n
        ) in comp:  # a parameter's name, or the parameters a module name or a pattern covers (model's order)
            if isinstance(n, str) and n in params:
                found = [n]
            elif isinstance(n, str | re.Pattern):
                found = [k for k in params if matches(k, [n])]
            else:
                found = []
            if not found:
                bad.append(n)
            names += [k for k in found if k not in names]
        if bad:
            raise ValueError(
                f"components: component parameter names {bad} are not parameters of the model and match none (a list holds "
                "parameter names, module names such as 'blocks.0.attn', or glob / regex patterns such as "
                f"'blocks.*.attn.W_Q'); its parameters are named like {list(params)[:4]}"
            )
        return [_exact(n) for n in names], None
    raise TypeError(f"a component must be a name, a list of parameter names or a dict of masks, got {comp!r}")


def _check_acc_state(state: Mapping[str, torch.Tensor], acc: CrossCovariance, prefix: str, path: str) -> None:
    """Refuse a checkpointed accumulator state whose arrays do not fit ``acc`` (a damaged file), naming it."""
    want = {k: v for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor)}
    for k, v in want.items():
        got = state.get(k)
        if got is None or tuple(got.shape) != tuple(v.shape):
            shape = "missing" if got is None else f"of shape {tuple(got.shape)}"
            raise io.FormatError(
                f"checkpoint {path!r} is damaged: {prefix}{k} is {shape}, expected {tuple(v.shape)}; delete it "
                "to start the group afresh"
            )
    if "count" not in state or state["count"].numel() != 1 or int(state["count"][0]) < 0:
        raise io.FormatError(
            f"checkpoint {path!r} is damaged: {prefix}count is missing or invalid; delete it"
        )


def _probe_losses_at_w_star(model: nn.Module, probe, per_sample_loss_fn: Callable, losses_of) -> torch.Tensor:
    """The probe's per-sample (or per-token) losses at ``w*``, ``losses_of(model)``, with the probe and what
    ``per_sample_loss_fn`` returned checked first, errors naming them: a probe the default loss cannot read (a float,
    3-D or out-of-vocabulary token tensor), and fewer values than probe samples (a batch mean or sum)."""
    library = _library_losses(per_sample_loss_fn)
    if library:
        check_batch(model, probe, "probe")
    try:
        b = batch_size(probe)
    except (TypeError, ValueError):
        b = None
    if b == 0:
        raise ValueError(f"probe has no samples ({_describe(probe)}): give at least one probe sample")
    with errors_naming(model, probe, "probe", library), torch.no_grad():
        l0 = losses_of(model)
    if not isinstance(l0, torch.Tensor):
        raise TypeError(
            f"per_sample_loss_fn returned {type(l0).__name__}; it must return a tensor of losses, (batch,) per "
            "sample or (batch, pos) per token"
        )
    if l0.numel() == 0:
        raise ValueError("the probe has no samples (per_sample_loss_fn returned an empty tensor)")
    if l0.dim() == 0 or (b is not None and l0.numel() < b):
        raise ValueError(
            f"per_sample_loss_fn returned shape {tuple(l0.shape)} on a probe of {b} samples; it must return one "
            "loss per sample (batch,) or per token (batch, pos), not a batch mean or sum"
        )
    bad = ~torch.isfinite(l0.detach())
    if bool(bad.any()):
        where = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1) if bad.dim() else bad.reshape(1)).flatten()
        where = where.tolist()
        empty = set(_rows_without_counted(probe))
        if empty and set(where) <= empty:
            raise ValueError(
                f"probe: per_sample_loss_fn gives a non-finite loss at the initial weights w*, before any step, "
                f"for probe samples {where[:5]}, which have no counted token (all padding or -100 labels): "
                f"{_NO_COUNTED_TOKEN}; drop those samples from the probe, or return per-token losses "
                "(token_losses(model, batch, fill=0.0)[0]), whose padding is left out"
            )
        who = "the default probe loss (the model's next-token losses)" if library else "per_sample_loss_fn"
        raise ValueError(
            f"probe: {who} gives a non-finite loss at the initial weights w*, before any step, for "
            f"probe samples {where[:5]}: the probe data or the model give a non-finite loss (look for NaN "
            "or Inf in the probe's tensors and in the model's weights, and run the model's forward on the probe to "
            "see whether its own logits are finite, e.g. at padded rows: a Hugging Face model with eager attention "
            "in float64 takes its softmax in float32, where a fully padded row is NaN)"
        )
    return l0


#: why a per-sample loss of a row without a counted token is not finite
_NO_COUNTED_TOKEN = (
    "a loss averaged over no token is NaN (pypattern.losses.sample_losses gives NaN for such a row, as does a "
    "mean over token_losses' default NaN fill)"
)


def _rows_without_counted(batch) -> list[int]:
    """The rows of a token batch (or of a pair with per-position targets) that have no counted entry (all padding
    or ``-100`` labels: :func:`pypattern.losses.counted_entries`), read from the batch alone; [] for other batches
    and for batches the default rule does not read."""
    try:
        mask = counted_entries(batch)
    except Exception:  # noqa: BLE001 - only chooses an error message
        return []
    if mask is None or mask.dim() != 2:
        return []
    return [int(i) for i in torch.nonzero(~mask.any(1)).flatten()]


def _nonfinite_only_at(losses: torch.Tensor, rows: list[int]) -> bool:
    """Whether per-sample ``losses`` ``(batch,)`` are non-finite somewhere, and only at ``rows``."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        return False
    bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
    return bool(bad) and set(bad) <= set(rows)


@contextlib.contextmanager
def _naming_rows_without_counted(loader, losses_at: Callable | None):
    """A :class:`~pypattern.sampling.NonFiniteLossError` of the sampler whose loss is the mean of a
    ``per_sample_loss_fn`` of one's own (``losses_at(batch)``: its losses at ``w*``; None for other losses) names
    the loader's rows with no counted token where those are the rows whose losses are not finite (the batches are
    scanned on the error's path only): a per-sample loss over no token is NaN, and so is its mean."""
    try:
        yield
    except NonFiniteLossError as e:
        if losses_at is None:
            raise
        found = None
        try:
            for i, batch in enumerate(loader):
                if i >= 1000:
                    break
                rows = _rows_without_counted(batch)
                if rows:
                    with torch.no_grad():
                        if _nonfinite_only_at(losses_at(batch), rows):
                            found = (i, rows)
                            break
        except Exception:  # noqa: BLE001 - only chooses an error message
            found = None
        if found is None:
            raise
        i, rows = found
        # what failed, from the error's fields (its text gives the sampler's own view of the cause, replaced here):
        # chain -1 is the loss at w* read before any chain ran
        if e.chain is not None and e.chain >= 0:
            head = (
                f"chain {e.chain}'s loss is not finite at step {e.step}, nor at the initial weights w* on the same "
                "batch"
            )
        else:
            head = "loader: the loss at the initial weights w* is not finite"
        raise NonFiniteLossError(
            f"{head}: the loader's batch {i} (in the loader's own order) has rows {rows[:5]} with no counted token "
            f"(all padding or -100 labels), and the sampler's loss is the mean of per_sample_loss_fn over the "
            f"batch: {_NO_COUNTED_TOKEN}; drop such rows from the batches, or return per-token losses "
            "(token_losses(model, batch, fill=0.0)[0]), which are averaged over the counted tokens",
            chain=e.chain,
            draw=e.draw,
            step=e.step,
            step_size=e.step_size,
            suggested_step_size=e.suggested_step_size,
        ) from e


_DEFAULT_TOKEN_LOSSES = (per_sample_losses, probe_losses)


def _library_losses(fn) -> bool:
    """Whether ``fn`` is one of pypattern's per-sample loss functions (no code of the caller's)."""
    return fn in (*_DEFAULT_TOKEN_LOSSES, sample_losses)


def _chain_loss(per_sample_loss_fn: Callable) -> Callable:
    """The sampler's loss of :func:`susceptibilities` and :func:`bif` when ``loss_fn`` is not given: the mean of
    ``per_sample_loss_fn(model, batch)`` over the batch's counted entries, returned with those losses (which reach
    the sampler's callbacks as ``outputs[0]``).

    Counted entries are those of the default per-token losses (:func:`pypattern.losses.counted_entries`: next-token
    targets that are not -100 and not padding by ``attention_mask``; integer pair targets that are not -100). With
    the default ``per_sample_loss_fn`` this is :func:`pypattern.losses.batch_loss` (each counted token weighs the
    same), and the batch is checked by the library's rule as ``batch_loss``'s are; a function of one's own whose
    losses have that mask's shape (per-token losses ``(batch, pos - 1)`` of a token batch, per-position losses of
    a pair) is averaged over the counted entries only, so that padding (0 or NaN there) does not dilute the loss,
    and any other shape (per-sample losses ``(batch,)``) over all its entries."""
    if per_sample_loss_fn in _DEFAULT_TOKEN_LOSSES:

        def lf(m, batch):
            # summed in float64, as the sampler's default loss is (pypattern.sampling.default_loss_fn)
            v, mask = token_losses(m, batch, fill=0.0)
            return (v if v.device.type == "mps" else v.double()).sum() / mask.sum(), v

        return by_default_rule(lf)

    def lf_own(m, batch):
        v = per_sample_loss_fn(m, batch)
        mask = counted_entries(batch) if isinstance(v, torch.Tensor) else None
        if mask is not None and tuple(mask.shape) == tuple(v.shape):
            mask = mask.to(v.device)
            return torch.where(mask, v, torch.zeros_like(v)).sum() / mask.sum(), v
        return v.mean(), v

    return lf_own


class _ProbeEntries:
    """Which probe entries count, and how per-token losses become per-sample ones (``per_token=False``).

    The mask of counted entries (padding and ``-100`` labels excluded: :func:`pypattern.losses.counted_entries`)
    is read once from the probe, with no forward. It applies to the default per-token losses, and to the losses
    of a ``per_sample_loss_fn`` of one's own whose shape is the mask's (per-token losses ``(batch, pos - 1)`` of a
    token probe, such as ``token_losses(model, batch, ...)[0]``; per-position or per-sample losses of a pair with
    ``-100`` targets), as the sampler's loss reads them (:func:`_chain_loss`): a sample's loss is the mean over
    its counted tokens, the mean probe loss ``Lbar`` is the mean over counted entries, entries that do not count
    are read as 0 (whatever the function put there, NaN included) and get no susceptibility (0). Losses of
    another shape (per-sample losses ``(batch,)`` of a token probe) all count, and a sample's per-token losses of
    another shape are averaged over its positions."""

    def __init__(self, model: nn.Module, probe, per_sample_loss_fn: Callable, per_token: bool) -> None:
        self.per_token = per_token
        self.tokens = None  # (batch, pos - 1) bool, or None
        self.pending = None  # a custom function's candidate mask, taken when its losses have its shape
        if per_sample_loss_fn in _DEFAULT_TOKEN_LOSSES:
            self._take(counted_mask(check_batch(model, probe, "probe")))  # from the batch: no forward
        else:
            self.pending = counted_entries(probe)  # None: a probe the default rule does not read

    def _take(self, mask: torch.Tensor | None) -> None:
        """Count the entries of ``mask`` (None: all count)."""
        if mask is None:
            return
        if mask.dim() == 2:
            self.tokens = mask
            if not self.per_token and not bool(mask.any(1).all()):
                bad = [int(i) for i in torch.nonzero(~mask.any(1)).flatten()[:5]]
                raise ValueError(
                    f"probe samples {bad} have no counted token (all padding or -100 labels): with "
                    "per_token=False each sample's loss is the mean over its counted tokens; drop them from "
                    "the probe"
                )
        elif not bool(mask.all()):
            self.tokens = mask  # pairs with -100 targets: those samples do not count

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """Per-token losses ``v`` as the estimator reads them (per sample when ``per_token=False``), entries that
        do not count read as 0."""
        pending, self.pending = self.pending, None  # the first call (at w*, before any draw) decides
        if pending is not None and isinstance(v, torch.Tensor) and tuple(pending.shape) == tuple(v.shape):
            self._take(pending)
        m = self.tokens
        if m is not None and isinstance(v, torch.Tensor) and m.shape == v.shape:
            m = m.to(v.device)
            v = torch.where(m, v, torch.zeros_like(v))
            if not self.per_token and v.dim() == 2:
                return v.sum(1) / m.sum(1)
            return v
        if self.per_token or not isinstance(v, torch.Tensor) or v.dim() != 2:
            return v
        return v.mean(1)

    def counted(self, n: int) -> torch.Tensor | None:
        """Bool ``(n,)`` over the flattened entries (None: all count)."""
        m = self.tokens
        if m is None:
            return None
        if not self.per_token and m.dim() == 2:
            return None  # every sample has a counted token (checked)
        if m.numel() != n:
            return None
        return m.reshape(-1).cpu()


def _probe_token_ids(probe) -> torch.Tensor | None:
    """The ``(batch, pos)`` token ids whose next tokens a language-model probe predicts: a token tensor (1-D: one
    sample), or a Hugging Face dict's ``labels`` (else its ``input_ids``); None for other probes."""
    if (
        isinstance(probe, tuple | list) and len(probe) == 1
    ):  # (tokens,): what DataLoader(TensorDataset) yields
        probe = probe[0]
    if isinstance(probe, Mapping):
        ids = probe.get("labels", probe.get("input_ids"))
    elif isinstance(probe, torch.Tensor):
        ids = probe
    else:
        return None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        return None
    ids = ids[None] if ids.dim() == 1 else ids
    return ids if ids.dim() == 2 else None


def _probe_meta(probe, losses: torch.Tensor, counted: torch.Tensor | None = None) -> tuple[np.ndarray, ...]:
    """Sample, predicted position and token of each probe column; the token is -1 where the column does not
    count (``counted``, flattened: padding or a ``-100`` label), however the padding was marked."""
    sample_idx, pos, tok = _probe_columns(probe, losses)
    if counted is not None and counted.numel() == tok.size:
        tok = np.where(counted.reshape(-1).cpu().numpy(), tok, -1)
    return sample_idx, pos, tok


def _warn_single_counted_entry(n: int, counted: torch.Tensor | None, meta: tuple, per_token: bool) -> None:
    """Warn when the probe has exactly one counted entry: its loss is then the mean probe loss ``Lbar``, so
    ``l_z - Lbar`` is 0 on every draw and chi is 0 identically, whatever the model and the component."""
    if (n if counted is None else int(counted.sum())) != 1:
        return
    i = 0 if counted is None else int(torch.nonzero(counted).flatten()[0])
    sample_idx, pos = int(meta[0][i]), int(meta[1][i])
    what = f"probe sample {sample_idx}" + (f", position {pos}" if pos >= 0 else "")
    if n > 1:
        what += f"; its other {n - 1} entries do not count: padding or -100 labels"
    unit = "token" if per_token and pos >= 0 else "sample"
    warnings.warn(
        f"susceptibilities: the probe has one counted entry ({what}): its loss l_z is the mean probe loss Lbar "
        "itself, so l_z - Lbar = 0 on every draw and chi is 0 identically for every component (a susceptibility "
        f"is measured against the other probe entries); give a probe of at least two counted {unit}s",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _probe_columns(probe, losses: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = _probe_token_ids(probe)
    if (
        losses.dim() == 2
        and ids is not None
        and ids.shape[0] == losses.shape[0]
        and ids.shape[1] > losses.shape[1]
    ):
        b, t = losses.shape
        sample_idx = np.repeat(np.arange(b), t)
        pos = np.tile(np.arange(1, t + 1), b)  # the predicted position
        tok = ids[:, 1 : t + 1].reshape(-1).cpu().numpy().astype(np.int64)
        tok[tok < 0] = -1  # an ignored label (-100) predicts no token
        return sample_idx, pos, tok
    if losses.dim() == 2:
        b, t = losses.shape
        return np.repeat(np.arange(b), t), np.tile(np.arange(t), b), -np.ones(b * t, dtype=np.int64)
    n = losses.numel()
    return np.arange(n), -np.ones(n, dtype=np.int64), -np.ones(n, dtype=np.int64)


def _check_common(model, loader, per_token, kw: dict) -> None:
    """The arguments :func:`susceptibilities` and :func:`bif` share, checked before any forward: ``model`` and
    ``loader`` (as :func:`pypattern.sample` checks them), ``per_token`` a bool, and at least 2 draws per chain (both
    estimate covariances over each chain's draws)."""
    check_model(model)
    check_loader(loader)
    if not isinstance(per_token, bool | np.bool_):
        raise TypeError(f"per_token={per_token!r} is not valid; give True or False")
    d = kw.get("num_draws")
    if isinstance(d, numbers.Integral) and not isinstance(d, bool | np.bool_) and int(d) < 2:
        raise ValueError(
            f"num_draws={d!r} is too few: the estimate is a covariance over each chain's draws, which needs at "
            "least 2 draws per chain; give num_draws >= 2"
        )


# sampler settings that change how the draws are computed or shown, not their values
_NOT_IN_FINGERPRINT = ("quiet", "cores", "checkpoint_every", "warn_nonstationary", "batched", "backend")


def _is_sample_default(name: str, value) -> bool:
    """Whether ``value`` is :func:`pypattern.sample`'s default for its argument ``name``
    (:func:`~pypattern.sampling.runner.is_sample_default`): a checkpoint's fingerprint leaves it out, so that a run
    giving a default explicitly is the same run as one leaving it out."""
    if name == "num_burnin_steps":  # resolved before the fingerprint: no burn-in is the default left out
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == 0
    return is_sample_default(name, value)


def _sample_defaults() -> dict:
    """:func:`pypattern.sample`'s defaults that a checkpoint's fingerprint leaves out (:func:`_is_sample_default`),
    by argument name: what a mismatch message shows for an item one fingerprint lacks."""
    out = {
        k: p.default
        for k, p in inspect.signature(sample).parameters.items()
        if p.default is not inspect.Parameter.empty and _is_sample_default(k, p.default)
    }
    out["num_burnin_steps"] = 0  # the resolved default a fingerprint leaves out (_is_sample_default)
    out["training"] = FINGERPRINT_DEFAULTS["training"]  # no module in train() mode
    return out


def _sampler_kwargs(kw: dict, who: str = "susceptibilities()") -> dict:
    """The sampler settings, SGLD hyperparameters under pypattern's names (devinterp's translated); a keyword
    that is not one is refused, naming ``who`` (the call), it and the closest setting. A result's record of its
    step calibration (``settings["auto_step"]``, a mapping) is dropped: ``**result.settings`` gives the chosen step
    and burn-in, and runs the same chains again without calibrating."""
    if isinstance(kw.get("auto_step"), Mapping):
        kw = {k: v for k, v in kw.items() if k != "auto_step"}
    allowed = {
        "num_chains", "num_draws", "num_burnin_steps", "num_steps_bw_draws", "step_size", "nbeta", "localization",
        "weight_decay", "noise_scale", "bounding_box", "optimizer_kwargs", "seed", "batched", "quiet",
        "backend", "num_init_loss_batches", "warn_nonstationary", "cores", "checkpoint_every", "sampler",
        "sampling_method", "auto_step_options", *DEVINTERP_NAMES,
    }  # fmt: skip
    refuse_unknown_keywords(
        kw,
        allowed,
        who,
        "these sampler settings of pypattern.sample (documented there)",
        what="unknown sampler settings",
    )
    # None is "not given" (dropped below) only where pypattern.sample's default is None or where sample takes None
    # as its default; where sample refuses None (a count, a flag, the seed) it is refused here with sample's message
    # rather than replaced by the default (seed=None would silently be seed 0)
    for name in _NONE_REFUSED:
        if name in kw and kw[name] is None:
            if name == "seed":
                _first_seed(None)  # raises, as pypattern.sample does
            if name in ("quiet", "warn_nonstationary"):
                raise TypeError(f"{name}=None is not valid; give True or False")
            raise ValueError(f"{name} must be an int >= 1, got None")
    kw = translate(kw, where="the call")
    if kw.get("optimizer_kwargs"):
        okw = kw["optimizer_kwargs"]
        # a number set both as a keyword and in optimizer_kwargs is refused now, before a step is calibrated with
        # one of the two (naming the key the caller gave)
        translated = translate(okw, where="optimizer_kwargs", drop_none=False)
        names = {*SGLD_DEFAULTS, "step_size", "nbeta"}
        hyper = {k: v for k, v in kw.items() if k in names}
        if isinstance(hyper.get("step_size"), str) or hyper.get("step_size") is None:  # "auto": calibrated
            hyper.pop("step_size", None)
        check_no_clash(hyper, {k: v for k, v in translated.items() if k in names}, okw)
    name = sampler_name(kw.pop("sampler", None), kw.pop("sampling_method", None))
    if (
        name != "sgld"
    ):  # by name (settings and checkpoint fingerprints hold plain values); SGLD is the default
        kw["sampler"] = name
    return kw


#: sampler settings whose None pypattern.sample refuses (its default is a number, a flag or the seed 0)
_NONE_REFUSED = (
    "num_chains", "num_draws", "num_steps_bw_draws", "seed", "checkpoint_every", "cores", "quiet",
    "warn_nonstationary",
)  # fmt: skip


def _first_seed(seed) -> int:
    """The first chain's seed (``seed`` one int, or one per chain), which keys the default sampling batch; what is
    neither is refused here as :func:`pypattern.sample` refuses it (:func:`~pypattern.sampling.plan.check_seed`),
    before the batch is drawn."""
    from .sampling.plan import check_seed

    seed = check_seed(seed)
    return seed if isinstance(seed, int) else int(seed[0])


def _listed_components(model: nn.Module, which: str) -> list[str]:
    """``components="heads"`` or ``"blocks"`` as the list of component names it stands for, as
    :func:`pypattern.refined_llc` reads it: every head (``"heads"``) or attention layer (``"blocks"``), MLP and
    embedding of pypattern's Transformer (:func:`pypattern.models.list_components`) or of a supported unconverted
    Hugging Face model (:func:`pypattern.models.hf_masks.hf_components`)."""
    from .models.hf_masks import hf_components, is_hf_model
    from .models.transformer import list_components

    if hasattr(model, "cfg"):
        return list_components(model, heads=which == "heads")
    if is_hf_model(model):
        return hf_components(model, heads=which == "heads")
    raise ValueError(
        f"components={which!r} needs pypattern's Transformer or a supported Hugging Face causal LM (pypattern.from_hf "
        "converts others); for other models give a list of parameter-name prefixes or a dict of masks"
    )


def _bridge_converted(model, call: str, custom: bool):
    """A TransformerLens bridge (``TransformerBridge``: its parameters are named by the Hugging Face modules it
    wraps, not by the component names the estimators read) converted with :func:`pypattern.from_hf` when the
    losses and the observable are pypattern's defaults (only numbers come back; the bridge's weights are left
    alone); with functions of the caller's, which call the bridge's own forward, refused naming the conversion.
    Every other model unchanged (a ``HookedTransformer``'s parameters carry the component names already)."""
    if not _is_bridge(model):
        return model
    if custom:
        raise ValueError(
            f"{call}: model is a TransformerLens bridge and loss_fn / per_sample_loss_fn / observable are functions "
            "of your own (they call the bridge's forward); convert it first, model = pp.from_hf(bridge), and "
            "write them for the converted model (its forward takes return_type='per_token_loss'), or leave them "
            "out to use pypattern's losses"
        )
    from .models.convert import from_hf

    return from_hf(model)


# in eval mode for the whole call when the model's train() forward is random, by the sampler's own rule: the
# quantities at w* (phi(w*), the probe losses at w*, a step-size calibration) read the same deterministic forward as
# the draws, so a model left in train() mode gives the same estimate, bit for bit, as in eval() mode (the sampler
# inside finds the model in eval mode already and warns no second time)
@_eval_mode_throughout(context=_eval_mode_for_dropout)
def susceptibilities(
    model: nn.Module,
    loader,
    probe,
    components: Sequence | Mapping[str, Any],
    *,
    loss_fn: Callable | None = None,
    per_sample_loss_fn: Callable = per_sample_losses,
    observable: Callable | None = None,
    sampling_batch=None,
    convention: str = "physics",
    per_token: bool = True,
    checkpoint: str | os.PathLike | None = None,
    group_size: int | None = None,
    device: str | torch.device | None = None,
    callbacks: Sequence[Callable] = (),
    **sampler_settings,
) -> SusceptibilityResult:
    """Estimate the susceptibility matrix ``chi`` (components x probe points); see the module docstring.

    Parameters
    ----------
    model : nn.Module
        At the trained weights ``w*``; not modified.
    loader : iterable of batches
        Training data the SGLD chains draw from (its batch-mean loss drives them).
    probe : batch
        Probe samples: a token tensor ``(batch, pos)`` (per-token losses) or ``(x, y)``. A probe of one counted
        entry has ``l_z = Lbar`` on every draw, so its chi is 0 identically: it is computed, with a
        ``RuntimeWarning``.
    components : list, dict, "heads" or "blocks"
        Each entry a component name (``"blocks.0.attn.head.1"``, ``"blocks.1.mlp"``, ``"embed"``, ... for
        pypattern's transformer, or a parameter-name prefix), a list of parameter names, or ``{param_name: mask}``;
        a dict maps display names to such entries. ``"heads"`` (every head, MLP and the embedding) and
        ``"blocks"`` (attention layers whole) list the components of pypattern's Transformer or of a supported
        Hugging Face model, as :func:`pypattern.refined_llc` does.
    loss_fn : callable(model, batch) -> loss, optional
        Batch-mean training loss for the sampler. Default: the mean of ``per_sample_loss_fn(model, batch)`` over
        the batch's counted entries (padding and ``-100`` labels left out; with the default ``per_sample_loss_fn``
        this is :func:`pypattern.losses.batch_loss`: next-token loss for token batches, cross-entropy or squared
        error for ``(x, y)`` batches, and the loader's batches are checked by its rule; a function of one's own
        returning per-token losses of the batch's shape is averaged over the counted tokens, per-sample losses over
        the samples), the same in :func:`bif`. With the
        default, full-batch SGLD on the probe itself (a loader whose only batch is the probe, as in the
        structural-inference experiments) reads the probe losses, and ``phi`` when the sampling batch is that
        batch too, from the sampler's own forward: one forward and one backward per step instead of three
        forwards and a backward.
    per_sample_loss_fn : callable(model, probe) -> Tensor
        Per-sample ``(B,)`` or per-token ``(B, T)`` losses on the probe. Losses of the shape of the probe's mask
        of counted entries (:func:`pypattern.losses.counted_entries`: per-token losses ``(B, pos - 1)`` of a token
        probe, such as ``lambda m, b: token_losses(m, b, fill=0.0)[0]``) are read as the default ones are: the
        entries that do not count (padding, ``-100`` labels) are left out of ``Lbar`` and get chi 0, whatever
        value the function gives them (NaN included). Per-sample losses ``(B,)`` of a token probe all count: a
        sample with no counted token (all padding or ``-100`` labels) has no loss (NaN with
        :func:`pypattern.losses.sample_losses`) and is refused; drop such samples.
    observable : callable(model) -> scalar, optional
        ``phi``; default: ``loss_fn`` on ``sampling_batch``. Its value at ``w*`` is subtracted from every draw
        (for either ``phi``): with ``convention="physics"`` for precision only, since a covariance does not
        change under a constant shift; with ``convention="devinterp"`` the returned ``chi`` is the formula of
        the module docstring applied to ``phi - phi(w*)``, as devinterp subtracts its loss at the initial
        weights: the formula applied to ``phi`` itself minus ``phi(w*) · (E_C[Lbar - l_t] - E_full[Lbar -
        l_t])``. ``phi_mean`` is the posterior mean of ``phi`` itself, without that shift. The default sampling
        batch is the first batch of the loader in an order keyed by ``seed`` (the same batch in every call with that
        seed, whatever torch's global random state; the loader's first batch when it does not shuffle).
    sampling_batch : batch, optional
        The batch the default ``phi`` (``loss_fn`` on it) is computed on, in the loader's batch format (with the
        default losses checked as the probe is); default: the first batch of the loader in the order keyed by
        ``seed`` (see ``observable``). With ``observable`` given, ``phi`` is the observable's.
    convention : {"physics", "devinterp"}
        See the module docstring.
    per_token : bool
        Keep one column per token (True) or average each probe sample's token losses (False), over its counted
        tokens (padding and ``-100`` labels left out) with the default losses and with losses of one's own of the
        counted mask's shape. Entries that do not count (padded
        positions) stay out of the mean probe loss ``Lbar`` and get chi 0.
    checkpoint : path, optional
        A folder: each finished component's row (and the unrestricted run of the devinterp convention) is written
        there as ``.npz`` (no pickle) as soon as its group is done, and the same call reloads finished ones
        instead of sampling them again; the group being sampled checkpoints its draws and accumulators (every
        ``checkpoint_every`` draws, default 1) and resumes from them, so a killed run loses no finished draw.
        Rows are stored by component name (``component.<name>.npz``) with the component's parameters and masks,
        and the folder's settings (sampler settings, model weights, data, probe, loss functions) are checked: a
        row written by another run, or under this name for another component, is refused with an error naming
        the first differing item; components not in the folder are sampled. ``backend`` and ``batched`` change
        how the draws are computed, not what they are: a resume under other values is accepted, with a warning
        naming the setting (its values may differ from an uninterrupted run's at float rounding).
    group_size : int, optional
        How many SGLD runs (one per component, plus the unrestricted run of the devinterp convention) sample
        together in one :func:`pypattern.sample` call (``runs=``): with batched chains (``batched=True``, or the
        default for small models and for 8 or more chains) every step of all of them is one ``vmap``-ed forward
        and backward, and the probe losses of all chains at a draw are one ``vmap``-ed forward. Default: all runs
        in one group.
        The estimate does not depend on it: each run's chains get the same noise and data either way.
    device : str or torch.device, optional
        Where to sample (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...). Default: the model's device. Another device
        samples a copy of the model moved there (``model`` stays where it is). The probe, the sampling batch and
        the loader's batches are moved to it as they are read, and the draws are accumulated there; the results
        are NumPy arrays either way.
    callbacks : sequence of callable
        Called at every draw of every SGLD run, as :func:`pypattern.sample` calls its callbacks (with the keyword
        arguments they accept among ``chain``, ``run``, ``draw``, ``step``, ``loss``, ``init_loss``, ``model``,
        ``batch``, ``observables``, ``outputs`` and, for chains run one after another, ``optimizer``). ``run``
        numbers the runs of the whole call: with ``convention="devinterp"`` the unrestricted run is run 0 and
        component ``k`` is run ``k + 1``, else component ``k`` is run ``k``; ``chain`` is
        ``run * num_chains + c`` for chain ``c`` of the run (as :func:`pypattern.sample` numbers chains over
        ``runs=``), whatever ``group_size``. ``observables`` holds the probe losses and ``phi`` this function
        records (``"probe_losses"``, ``"phi"``; left out where they are read from the sampler's own forward).
        Rows reloaded from a checkpoint are not sampled again and call no callback; a resumed group calls them
        for the draws not yet done. With ``step_size="auto"`` a run that runs away is run again at half the step
        only when every callback has a ``reset()`` method (called first), as in :func:`pypattern.sample`.
    **sampler_settings
        ``num_chains``, ``num_draws``, ``num_burnin_steps``, ``num_steps_bw_draws``, ``step_size``, ``nbeta``,
        ``localization``, ``seed``, ``sampler`` (``"sgld"``, ``"sgnht"``, ``"rmsprop_sgld"``; devinterp's
        ``sampling_method``), ``optimizer_kwargs``, ``auto_step_options`` (the ``step_size="auto"``
        calibration's settings, e.g. ``{"calibration_steps": 800}``; a ValueError with a given step), ... as in
        :func:`pypattern.sample`, where they are documented; any other keyword is a ``TypeError`` naming it and
        the closest setting. With a calibrated step and no ``num_burnin_steps`` (or ``"auto"``) every run burns
        in as :func:`pypattern.estimate_llc`'s does, for as long as the chosen step needs for the chains to relax
        from ``w*`` along the flattest direction (:func:`pypattern.sampling.auto.burnin_for_run` on the one
        calibration, at least the burn-in the calibration judged the step with); ``settings["num_burnin_steps"]``
        holds it and ``settings["auto_step"]["burnin"]`` says why. A given ``num_burnin_steps`` is kept.

    Returns
    -------
    SusceptibilityResult
    """
    if convention not in ("physics", "devinterp"):
        raise ValueError(f"convention must be 'physics' or 'devinterp', got {convention!r}")
    if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(
            f"checkpoint={checkpoint!r} is not valid; give a folder path (str or os.PathLike) or None"
        )
    if checkpoint is not None and os.path.exists(os.fspath(checkpoint)) and not os.path.isdir(checkpoint):
        raise ValueError(
            f"checkpoint={os.fspath(checkpoint)!r} is a file; susceptibilities keeps one file per component in a "
            "folder: give a folder path"
        )
    if observable is not None and not callable(observable):
        raise TypeError(
            f"observable={observable!r} is not callable; give a function model -> scalar (phi), or None for the "
            "loss on sampling_batch"
        )
    if group_size is not None and not (is_count(group_size) and group_size >= 1):
        raise ValueError(f"group_size must be an int >= 1 or None, got {group_size!r}")
    group_size = None if group_size is None else int(group_size)
    kw = _sampler_settings_defaults(_sampler_kwargs(dict(sampler_settings)))
    user_callbacks = _user_callbacks(callbacks, kw.get("batched"))
    custom = loss_fn is not None or not _library_losses(per_sample_loss_fn) or observable is not None
    model = _bridge_converted(model, "susceptibilities", custom)
    _check_common(model, loader, per_token, kw)
    auto_options = _auto_step_options(kw)
    model, dev = _run_device(model, device)
    if isinstance(components, str) and components in ("heads", "blocks"):
        components = _listed_components(model, components)
    if isinstance(components, str):
        raise TypeError(
            f"components={components!r} is one string; give 'heads' (every head, MLP and the embedding), 'blocks' "
            f"(attention layers whole), or a list of component names, e.g. [{components!r}]"
        )
    if not isinstance(components, Mapping) and (
        isinstance(components, bytes | torch.Tensor) or not isinstance(components, Iterable)
    ):
        raise TypeError(
            f"components={components!r} is not valid; give a list of component names or parameter-name prefixes, "
            "or a dict of name -> names or masks"
        )
    if isinstance(components, Mapping):
        names, specs = list(components), list(components.values())
        bad = [k for k in names if not isinstance(k, str) or not k]
        if bad:
            raise TypeError(
                f"components: the names {bad!r} are not non-empty strings; name each component by a str"
            )
    else:
        specs = list(components)
        names = [c if isinstance(c, str) else f"component_{i}" for i, c in enumerate(specs)]
    if not specs:
        raise ValueError("components is empty: give at least one component")
    seed0 = _first_seed(kw.get("seed", 0))
    given = sampling_batch is not None
    if not given:  # the first batch of a stream keyed by the seed: the same in every call
        sampling_batch = ChainData(loader, chain_seed(seed0, 0, stream=3), {}).next()
    # phi and the probe losses are forwards of the model on these: on its device (as the sampler's batches are)
    sampling_batch, probe = to_device(sampling_batch, dev), to_device(probe, dev)
    phi_batch = "sampling_batch" if given else "loader"  # the argument the sampling batch came in
    default_phi = loss_fn is None and per_sample_loss_fn in _DEFAULT_TOKEN_LOSSES
    if default_phi:
        # the default losses read it: checked as probe is, errors naming where it came from
        check_batch(model, sampling_batch, phi_batch)
    lf = loss_fn if loss_fn is not None else _chain_loss(per_sample_loss_fn)
    # per_sample_loss_fn's losses on a loader's batch, when the sampler's loss is their mean
    own_losses_at = None
    if loss_fn is None and not default_phi:
        own_losses_at = lambda batch: per_sample_loss_fn(model, to_device(batch, dev))  # noqa: E731
    # the runs (checked before the step is calibrated): the unrestricted one first (devinterp convention), then one per component
    names_all = (["unrestricted"] if convention == "devinterp" else []) + [
        f"component_{k}" for k in range(len(specs))
    ]
    run_specs = {"unrestricted": (None, None)}
    for k, spec in enumerate(specs):
        run_specs[f"component_{k}"] = _component_spec(model, spec)
        masks_k = run_specs[f"component_{k}"][1]
        if masks_k is not None and not any(bool(m.any()) for m in masks_k.values()):
            raise ValueError(
                f"components: component {names[k]!r} has an all-False mask over {list(masks_k)}: SGLD would "
                "move no weight and chi would be 0; give a mask that selects at least one weight"
            )

    _burnin_before_calibration(kw)
    auto_step = None
    if wants_auto(kw.get("step_size"), kw.get("optimizer_kwargs")):  # one calibration (unrestricted chains)
        # recorded in the checkpoint folder: a resumed call reuses it instead of calibrating again
        cal = None if checkpoint is None else os.path.join(os.fspath(checkpoint), CALIBRATION_FILE)
        with _naming_rows_without_counted(loader, own_losses_at):
            kw["step_size"], auto_step, record = calibrate_or_resume(
                model,
                loader,
                auto_arguments(dict(kw, loss_fn=lf, auto_step_options=auto_options)),
                None if cal is None else read_calibration(cal),
                resolve_step_size,
            )
        if cal is not None and record is not None:
            write_calibration(cal, record)
    _resolve_burnin(kw, auto_step)
    only = _only_batch(loader)
    only = None if only is None else to_device(only, dev)  # compared on the device the probe is on
    fuse_probe = loss_fn is None and only is not None and _same_batch(only, probe)
    fuse_phi = fuse_probe and observable is None and _same_batch(sampling_batch, only)

    entries = _ProbeEntries(model, probe, per_sample_loss_fn, per_token)

    def losses_of(m) -> torch.Tensor:
        return entries.reduce(per_sample_loss_fn(m, probe))

    def phi_of(m) -> torch.Tensor:
        if observable is not None:
            v = observable(
                m
            )  # a tensor in float64 where float64 is (the CPU for MPS); a number read as float64
            if isinstance(v, torch.Tensor) and not (v.is_complex() or v.dtype == torch.bool):
                return as_float64(v.detach())
            if isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_):
                return torch.as_tensor(float(v), dtype=torch.float64)
            if isinstance(v, np.ndarray) and v.dtype.kind in "iuf":  # (its shape is checked at w*)
                return torch.as_tensor(v, dtype=torch.float64)
            raise TypeError(
                f"observable returned {_short_text(v)}; it must return phi as one real number (a scalar tensor of "
                "a real dtype, or a float)"
            )
        return as_float64(split_loss(lf(m, sampling_batch)).detach())

    l0 = _probe_losses_at_w_star(model, probe, per_sample_loss_fn, losses_of)
    with torch.no_grad(), errors_naming(model, sampling_batch, phi_batch, observable is None and default_phi):
        phi0 = phi_of(model)
    if phi0.numel() != 1:
        raise ValueError(
            f"observable returned shape {tuple(phi0.shape)} at w*; it must return one number (phi, a scalar): "
            "reduce it, e.g. with .sum(), or estimate one susceptibility per entry with one observable each"
        )
    phi0 = phi0.reshape(()).clone()  # (not a view of a parameter the observable returned)
    if not bool(torch.isfinite(phi0)):
        what = "observable" if observable is not None else phi_batch
        own = own_losses_at is not None and observable is None  # phi is the mean of per_sample_loss_fn
        empty = _rows_without_counted(sampling_batch) if own else []
        if empty:
            with torch.no_grad():
                empty = empty if _nonfinite_only_at(own_losses_at(sampling_batch), empty) else []
        if empty:
            raise ValueError(
                f"{what}: phi is {float(phi0)} at the initial weights w*, before any step: the sampling batch's "
                f"rows {empty[:5]} have no counted token (all padding or -100 labels), and phi is the mean of "
                f"per_sample_loss_fn over the batch: {_NO_COUNTED_TOKEN}; drop such rows from the batches, or "
                "return per-token losses (token_losses(model, batch, fill=0.0)[0]), which are averaged over the "
                "counted tokens"
            )
        raise ValueError(
            f"{what}: phi is {float(phi0)} at the initial weights w*, before any step: the data or the model give "
            "a non-finite value (look for NaN or Inf in the batch's tensors and in the model's weights)"
        )
    n = l0.numel()
    counted = entries.counted(n)  # entries outside it (padding) are left out of Lbar and get chi 0
    meta = _probe_meta(probe, l0, counted)
    _warn_single_counted_entry(n, counted, meta, per_token)
    acc_dev = float64_device(l0.device)  # the draws' accumulators: where the probe losses are (float64 there)
    counted_idx = None if counted is None else torch.nonzero(counted).flatten().to(acc_dev)
    phi0_acc = phi0.to(device=acc_dev, dtype=torch.float64)
    C = int(kw["num_chains"])

    def probe_losses(m, batch) -> torch.Tensor:
        return losses_of(m).reshape(-1)

    def phi(m, batch) -> torch.Tensor:
        return phi_of(m).reshape(-1)

    ex = _EXECUTION.get()
    local_of = ex.local_path  # a group checkpoint's file in this process (per rank when distributed)

    def run_group(
        specs_: list, ckpt: str | None, group_fp: dict | None, labels: list[str], run_index: list[int]
    ) -> tuple[list[list[CrossCovariance]], float]:
        """Sample the runs ``specs_`` (``(restrict_to, masks)`` pairs) together; per run, one accumulator per
        chain over (phi) x (l_1..l_N, Lbar); and the nbeta used. With ``ckpt`` the sampler's checkpoint holds the
        accumulators too, and a killed group resumes from its last checkpointed draw. The sampler's warnings name
        the run they concern by ``labels``."""
        # on the device the probe losses are computed on: no copy of them to the host at each draw
        accs = [CrossCovariance(1, n + 1, track_auto="none", device=acc_dev) for _ in range(len(specs_) * C)]

        def acc_state() -> dict:
            # each accumulator's state_dict as arrays: its tensors, and its draw count
            out = {}
            for i, a in enumerate(accs):
                for k, v in a.state_dict().items():
                    if isinstance(v, torch.Tensor):
                        out[f"acc{i}/{k}"] = v.numpy()
                out[f"acc{i}/count"] = np.array([a.count], dtype=np.int64)
            out["fingerprint"] = np.frombuffer(json.dumps(group_fp).encode(), dtype=np.uint8)
            return out

        local = None if ckpt is None else local_of(ckpt)  # the file this process writes
        if local is not None and os.path.exists(local):
            saved = load_checkpoint_state(local)
            # the accumulators were filled by this susceptibility run (the sampler checks its own settings)
            try:
                stored_fp = json.loads(bytes(saved.get("fingerprint", b"{}")).decode())
                if not isinstance(stored_fp, Mapping | None):  # (None: a run without a fingerprint)
                    raise ValueError("not a mapping")
            except (UnicodeDecodeError, ValueError, TypeError, BufferError):
                raise io.FormatError(
                    f"checkpoint {local!r} is damaged: its state/fingerprint member is not the JSON text of a "
                    "fingerprint; delete the file to start the group afresh"
                ) from None
            io.check_fingerprint(stored_fp, group_fp, local, defaults=_sample_defaults())
            done = io.load(local, kind=CHECKPOINT_KIND)[0].get("done")
            for i, a in enumerate(accs):
                pre = f"acc{i}/"
                state = {k[len(pre) :]: torch.from_numpy(v) for k, v in saved.items() if k.startswith(pre)}
                # the file holds every chain's accumulator, as many draws in it as the chain has done
                _check_acc_state(state, a, f"{pre}", local)
                state["count"] = int(state["count"][0])
                if done is not None and i < len(done) and state["count"] != int(done[i]):
                    raise io.FormatError(
                        f"checkpoint {local!r} is damaged: {pre}count is {state['count']} but chain {i} has "
                        f"{int(done[i])} draws done; delete it to start the group afresh"
                    )
                a.load_state_dict({**state, "k": a.k, "n": a.n, "track_auto": a.track_auto})

        def cb(chain, loss, observables, outputs):
            if fuse_probe:  # the sampler's forward was on the probe: its per-sample losses are the probe's
                lz = entries.reduce(outputs[0])
            else:
                lz = observables["probe_losses"]
            lz = _flat(lz, n, "per_sample_loss_fn", check=False, device=acc_dev)
            # the counted entries by a gather with indices made once (a boolean mask would synchronise a GPU)
            lbar = lz.mean() if counted_idx is None else lz.index_select(0, counted_idx).mean()
            if fuse_phi:
                ph = torch.tensor([loss], dtype=torch.float64, device=acc_dev)
                _check_finite((lz, "per_sample_loss_fn"))
            else:
                ph = _flat(observables["phi"], 1, "observable", check=False, device=acc_dev)
                _check_finite((lz, "per_sample_loss_fn"), (ph, "observable"))
            accs[chain].update(
                (ph - phi0_acc).reshape(1, 1),
                torch.cat([lz, lbar.reshape(1)]).reshape(1, -1),
            )

        observables = {}
        if not fuse_probe:
            observables["probe_losses"] = probe_losses
        if not fuse_phi:
            observables["phi"] = phi
        with naming_runs(labels):
            results = (ex.sample or sample)(
                model,
                loader,
                loss_fn=lf,
                runs=specs_,
                observables=observables,
                record_observables=False,
                callbacks=[cb, *(_in_whole_call(f, run_index, C) for f in user_callbacks)],
                checkpoint=ckpt,
                checkpoint_state=acc_state if ckpt is not None else None,
                **kw,
            )
        if ex.reduce is not None:  # pypattern.distributed: each chain's draws are on one rank
            accs = ex.reduce(accs)
        accs = [_on_cpu(a) for a in accs]  # the rows are NumPy arrays
        return [accs[r * C : (r + 1) * C] for r in range(len(specs_))], float(results[0].config["nbeta"])

    # Per-component checkpoints: a finished component's row is saved under its name when its group is done, and
    # reloaded by a call of the same run (settings, weights, data, probe, loss functions) with the same component.
    fp: dict = {}
    if checkpoint is not None:
        fp = io.fingerprint(
            convention=convention,
            per_token=per_token,
            n=n,
            # what the draws depend on: not how they are computed or shown (as pypattern.sample's checkpoints)
            **{k: v for k, v in kw.items() if k not in _NOT_IN_FINGERPRINT and not _is_sample_default(k, v)},
            loss_fn=loss_fn,
            per_sample_loss_fn=per_sample_loss_fn,
            observable=observable,
            probe=io.hash_batch(probe),
            sampling_batch=io.hash_batch(sampling_batch),
            data=hash_data(loader, chain_seed(seed0, 0, stream=1), {}),
            **{f"weights[{k}]": v for k, v in model.state_dict().items()},
            architecture=model_architecture(model),
            # the modules in train() mode as the sampler runs the model (none, the default, adds no item)
            **({} if (modes := training_modes(model)) is None else {"training": modes}),
            # forward and backward hooks on the model's modules (none, the usual case, adds no item)
            **({} if (hooks := model_hooks(model)) is None else {"hooks": hooks}),
            phi0=float(phi0),
        )
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"components has repeated names {dup}: checkpoint rows are stored by name")

    def file_of(run: str) -> str:
        if run == "unrestricted":
            return "unrestricted"
        name = names[int(run.split("_")[1])]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        # a name with other characters gets a hash of itself: "layer 0" and "layer_0" are two files
        return "component." + (
            safe if safe == name else f"{safe}.{hashlib.sha256(name.encode()).hexdigest()[:10]}"
        )

    def row_fp(run: str) -> dict:
        restrict, masks = run_specs[run]
        name = "unrestricted" if run == "unrestricted" else names[int(run.split("_")[1])]
        return {
            **fp,
            **io.fingerprint(
                component=name,
                parameters=restrict,
                masks={k: as_float64(m) for k, m in (masks or {}).items()},
            ),
        }

    # how the draws are computed (not in the fingerprint): kept with each row; a row read back under other values
    # is used, with one warning (its values may differ from this run's at float rounding)
    settings = {k: kw.get(k) for k in RESUMABLE_SETTINGS}
    warned: list = []

    def path_of(name: str) -> str | None:
        return None if checkpoint is None else os.path.join(os.fspath(checkpoint), f"{name}.npz")

    def load_row(run: str) -> dict | None:
        path = path_of(file_of(run))
        if path is None or not os.path.exists(path):
            return None
        arrays, meta = io.load(path, kind=ROW_KIND)
        io.check_fingerprint(meta.get("fingerprint"), row_fp(run), path, defaults=_sample_defaults())
        stored_settings = meta.get("settings")
        if isinstance(stored_settings, Mapping) and not warned:  # (a row written before they were kept: none)
            if warn_changed_settings(stored_settings, settings, path, stacklevel=user_stacklevel(1)):
                warned.append(True)  # once per call, for the first row that differs
        row = {**arrays, **meta.get("row", {})}
        shapes = {"full_means": (n + 1,)} if run == "unrestricted" else {
            "chi": (n,), "chi_chains": (C, n), "chi_loo": (C, n), "loss_mean": (n,), "phi_mean": (), "nbeta": ()
        }  # fmt: skip
        if run != "unrestricted" and "chi_loo" not in row and "chi" in row:
            # a row written before the jackknife's leave-one-chain-out rows were kept: its standard error is the
            # per-chain estimates' spread (see the warning where the result is assembled)
            row["chi_loo"] = np.full((C, n), np.nan)
            row["old_se"] = True
        if run == "unrestricted" and "full_loo" in row:
            shapes["full_loo"] = (C, n + 1)  # (a row written before they were kept has none: pooled means)
        for key, shape in shapes.items():
            v = np.asarray(row.get(key, np.zeros((0,) * 7)))
            if v.shape != shape or v.dtype.kind not in "fi":
                what = "lacks it" if key not in row else f"holds shape {v.shape}, dtype {v.dtype}"
                raise io.FormatError(
                    f"checkpoint row {path!r} is damaged: {key!r} should be numbers of shape {shape} but the file "
                    f"{what}; delete the file to sample that row again"
                )
            if key != "chi_loo" and not np.isfinite(v).all():  # (a row written before them holds NaN rows)
                raise io.FormatError(
                    f"checkpoint row {path!r} is damaged: {key!r} holds values that are not finite (a sampled "
                    "row's are); delete the file to sample that row again"
                )
        return row

    def save_row(run: str, row: dict) -> None:
        if checkpoint is None or not ex.write_rows:
            return
        io.save(
            path_of(file_of(run)),
            {k: v for k, v in row.items() if isinstance(v, np.ndarray)},
            {
                "fingerprint": row_fp(run),
                "row": {k: v for k, v in row.items() if not isinstance(v, np.ndarray)},
                "settings": settings,  # how the row was computed: another value resumes, with a warning
            },
            kind=ROW_KIND,
        )

    def run_label(run: str) -> str:
        """How the sampler's warnings name the run ``run`` (``"unrestricted"`` or ``"component_{k}"``)."""
        if run == "unrestricted":
            return "susceptibilities(), the unrestricted run (devinterp convention)"
        return f"susceptibilities(), component {names[int(run.rsplit('_', 1)[1])]!r}"

    def sample_rows() -> dict:
        rows = {name: load_row(name) for name in names_all}
        todo = [name for name in names_all if rows[name] is None]
        size = group_size or max(len(todo), 1)
        full_means = None if rows.get("unrestricted") is None else rows["unrestricted"]["full_means"]
        for i in range(0, len(todo), size):
            group = todo[i : i + size]
            gpath = path_of(f"sampling.{file_of(group[0])}.{len(group)}")  # the group's draws so far
            group_fp = {**fp, "group": [row_fp(r) for r in group]} if fp else None
            accs_by_run, nbeta = run_group(
                [run_specs[name] for name in group],
                gpath,
                group_fp,
                [run_label(name) for name in group],
                [names_all.index(name) for name in group],
            )
            for name, accs in zip(group, accs_by_run):
                if name == "unrestricted":
                    full_means = _pool(accs).mean_b.numpy()  # E_full[l_t], E_full[Lbar]
                    rows[name] = {"full_means": full_means}
                    if len(accs) > 1:  # without each chain in turn: the jackknife leaves it out of both runs
                        rows[name]["full_loo"] = np.stack(
                            [_pool(accs[:c] + accs[c + 1 :]).mean_b.numpy() for c in range(len(accs))]
                        )
                else:
                    unrestricted = rows.get("unrestricted") or {}
                    full_loo = unrestricted.get("full_loo")
                    if full_loo is None or np.shape(full_loo) != (len(accs), n + 1):
                        full_loo = [full_means] * len(accs)  # physics (no full run), or a row without them
                    pooled = _pool(accs)
                    rows[name] = {
                        "chi": _chi_from(pooled, convention, nbeta, full_means, counted),
                        "chi_chains": np.stack(
                            [_chi_from(acc, convention, nbeta, full_means, counted) for acc in accs]
                        ),
                        # the pooled estimate without each chain in turn: the jackknife's standard error of chi
                        "chi_loo": np.stack(
                            [
                                _chi_from(
                                    _pool(accs[:c] + accs[c + 1 :]), convention, nbeta, full_loo[c], counted
                                )
                                if len(accs) > 1
                                else np.full(n, np.nan)
                                for c in range(len(accs))
                            ]
                        ),
                        "phi_mean": float(pooled.mean_a[0]) + float(phi0),
                        "loss_mean": pooled.mean_b[:n].numpy(),
                        "nbeta": nbeta,
                    }

            def save_group(group=group):
                for name in group:
                    save_row(name, rows[name])

            # one process writes the rows (ex.write_rows); a write that fails there (a read-only folder, a full
            # disk) reaches every process through ex.agree, so none goes on to the next group's sampling alone
            if checkpoint is not None and ex.agree is not None:
                ex.agree(save_group)
            else:
                save_group()
            local = None if gpath is None else local_of(gpath)
            if local is not None and os.path.exists(local):
                os.remove(local)  # its rows are saved
        return rows

    with _naming_rows_without_counted(loader, own_losses_at):
        rows = _with_auto_reruns(sample_rows, kw, auto_step, checkpoint, user_callbacks)
    _warn_capped_burnin("susceptibilities()", kw, auto_step, "chi", "chi_se")
    chi = np.zeros((len(specs), n))
    chi_chains = np.zeros((len(specs), C, n))
    chi_loo = np.zeros((len(specs), C, n))
    phi_mean = np.zeros(len(specs))
    loss_mean = np.zeros((len(specs), n))
    old_rows = []
    for k in range(len(specs)):
        row = rows[f"component_{k}"]
        nbeta_used = float(row["nbeta"])
        chi[k], chi_chains[k], chi_loo[k] = row["chi"], row["chi_chains"], row["chi_loo"]
        phi_mean[k], loss_mean[k] = float(row["phi_mean"]), row["loss_mean"]
        if row.get("old_se"):
            old_rows.append(k)
    se = _jackknife_se(chi_loo) if C > 1 else np.full_like(chi, np.nan)
    unrestricted = rows.get("unrestricted")
    pooled_full = [names[k] for k in range(len(specs)) if k not in old_rows]
    if (
        C > 1
        and pooled_full
        and unrestricted is not None
        and np.shape(unrestricted.get("full_loo")) != (C, n + 1)
    ):
        # the unrestricted run's row was written before its leave-one-chain-out means were kept: every component's
        # leave-one-chain-out chi subtracted the pooled means, so the jackknife leaves that run's chains in and
        # chi_se omits its error (the means alone are stored: its leave-one-out means cannot be recomputed)
        warnings.warn(
            "susceptibilities: the checkpoint's row of the unrestricted run (convention='devinterp') was written by "
            "an earlier version, without its leave-one-chain-out means: the chi_se of "
            f"{pooled_full} is the jackknife over the components' "
            "chains alone and omits the unrestricted run's error, so it understates chi's spread; delete the "
            "checkpoint's unrestricted.npz and the component rows to sample them again with the full jackknife's "
            "standard error",
            stacklevel=user_stacklevel(),
        )
    if old_rows and C > 1:
        se[old_rows] = chi_chains[old_rows].std(1, ddof=1) / np.sqrt(C)
        warnings.warn(
            f"susceptibilities: the checkpoint's rows of {[names[k] for k in old_rows]} were written by an earlier "
            "version, without the leave-one-chain-out estimates: their chi_se is the per-chain estimates' spread / "
            "sqrt(num_chains), which understates chi's spread when the chains' means differ; delete those rows' "
            "files to sample them again with the jackknife's standard error",
            stacklevel=user_stacklevel(),
        )
    return SusceptibilityResult(
        chi=chi,
        chi_se=se,
        chi_chains=chi_chains,
        components=names,
        probe_sample=meta[0],
        probe_position=meta[1],
        probe_token=meta[2],
        phi_mean=phi_mean,
        loss_mean=loss_mean,
        convention=convention,
        nbeta=float(nbeta_used),
        num_chains=C,
        num_draws=int(kw["num_draws"]),
        settings=_settings_of(kw, auto_step),
        probe_counted=None if counted is None else counted.numpy().astype(bool),
    )


@dataclasses.dataclass(frozen=True)
class Execution:
    """How :func:`susceptibilities` runs its samplers; :mod:`pypattern.distributed` supplies its own through
    :func:`executing` (internal: not part of the public API).

    Attributes
    ----------
    sample : callable or None
        The sampler, called like :func:`pypattern.sample`; None: this module's ``sample``.
    reduce : callable(list of CrossCovariance) -> list, optional
        Combines the per-chain accumulators after a group (each chain's draws are on one rank).
    write_rows : bool
        Whether this process writes finished rows into the checkpoint folder.
    local_path : callable(str) -> str
        The file this process uses for a group's sampler checkpoint.
    agree : callable(fn) -> Any, optional
        Runs ``fn`` (a group's row writes) in every process and raises in every process if it raised in any.
    """

    sample: Callable | None = None
    reduce: Callable | None = None
    write_rows: bool = True
    local_path: Callable[[str], str] = os.fspath
    agree: Callable[[Callable], Any] | None = None


_EXECUTION: contextvars.ContextVar[Execution] = contextvars.ContextVar(
    "execution",
    default=Execution(),  # noqa: B039 - frozen: never mutated
)


@contextlib.contextmanager
def executing(execution: Execution):
    """Run the :func:`susceptibilities` calls inside the block with ``execution``."""
    token = _EXECUTION.set(execution)
    try:
        yield
    finally:
        _EXECUTION.reset(token)


_UNRECORDED = object()  # a setting _settings_of does not record (not a plain value)


def _settings_of(kw: dict, auto_step) -> dict:
    """A result's ``settings``: the sampler settings' plain values, and ``auto_step`` (the calibration's report,
    :class:`pypattern.sampling.AutoStepReport` as plain values) when the step was chosen by it. Per-chain seeds
    are kept as a list, and the hyperparameters given in ``optimizer_kwargs`` under their pypattern names
    (``step_size``, ``nbeta``, ``localization``, ...; a keyword given beside them, such as the step a calibration
    chose, taking precedence): ``**settings`` runs the same chains again."""

    def value(v):
        if isinstance(v, np.ndarray) and v.dtype.kind in "biuf" and v.ndim <= 1:
            v = v.tolist()  # per-chain seeds as an integer array, or one seed as a 0-d one
        if isinstance(v, np.generic) and v.dtype.kind in "biuf":
            v = v.item()
        if isinstance(v, (int, float, str, bool, type(None))):
            return v
        if isinstance(v, list | tuple):
            items = [value(x) for x in v]
            if all(isinstance(x, (int, float, str, bool)) for x in items):
                return items
        return _UNRECORDED

    out = {}
    for k, v in kw.items():
        if k != "optimizer_kwargs" and (v := value(v)) is not _UNRECORDED:
            out[k] = v
    okw = kw.get("optimizer_kwargs")
    if isinstance(okw, Mapping):
        for k, v in translate(dict(okw), where="optimizer_kwargs").items():
            if out.get(k) is None and v != "auto" and (v := value(v)) is not _UNRECORDED:
                out[k] = v
    if auto_step is not None:
        out["auto_step"] = auto_step.to_dict()
    return out


def _burnin_before_calibration(kw: dict) -> None:
    """``num_burnin_steps`` as the step calibration sees it: ``"auto"`` (:func:`pypattern.sample`'s rule, here the
    default) is None there, as in :func:`pypattern.sample`, and chosen after it (:func:`_resolve_burnin`); another
    string is refused, naming it."""
    if is_burnin_rule(kw.get("num_burnin_steps")):
        kw["num_burnin_steps"] = None


def _resolve_burnin(kw: dict, auto_step) -> None:
    """``num_burnin_steps`` when none is given (None or ``"auto"``), here where the step is calibrated before the
    runs (the runs are then given the step), by :func:`pypattern.estimate_llc`'s rule: at a calibrated step, as
    long as that step needs for the chains to relax from ``w*`` along the flattest direction
    (:func:`pypattern.sampling.auto.burnin_for_run` on the calibration's report, at least the burn-in the
    calibration judged the step with), recorded in the report's ``burnin`` (the result's
    ``settings["auto_step"]["burnin"]``); at a given step 0 (devinterp's default). A given count is kept. The
    checkpoint's fingerprint holds the resolved count, which a resumed call, reading the calibration back, chooses
    again."""
    if kw.get("num_burnin_steps") is not None:
        return
    draws, every = kw.get("num_draws", 200), kw.get("num_steps_bw_draws", 1)
    counts = all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) and v >= 1
        for v in (draws, every)
    )
    if auto_step is None or not counts:  # (a count that is not one is left for the sampler to name)
        kw["num_burnin_steps"] = default_burnin(auto_step is not None, draws, every)
        return
    kw["num_burnin_steps"] = calibrated_burnin(auto_step, int(draws), int(every))


def _auto_step_options(kw: dict) -> dict | None:
    """``auto_step_options`` taken out of the sampler settings ``kw`` (the calibration reads it; the run, at the
    step it chose, does not), checked as :func:`pypattern.sample` checks it: a mapping of the calibration's
    settings, given only when the step is calibrated."""
    options = kw.pop("auto_step_options", None)
    check_auto_step_options(options, wants_auto(kw.get("step_size"), kw.get("optimizer_kwargs")))
    return None if options is None else dict(options)


def _sampler_settings_defaults(kw: dict) -> dict:
    kw.setdefault("num_chains", 4)
    kw.setdefault("num_draws", 200)
    kw.setdefault("quiet", False)  # a long run shows its progress, as pypattern.sample does
    return kw


def _bif_and_corr(acc: CrossCovariance, counted: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """``(-Cov(l_i, l_j), Corr(l_i, l_j))`` from an accumulator of the probe losses against themselves: exactly
    symmetric (the accumulator's two triangles differ at rounding), the correlation that of the covariance
    returned (1 on its diagonal, clipped to [-1, 1]; NaN at an entry whose loss does not vary), both rows and
    columns of entries outside ``counted`` 0 and NaN."""
    cov = acc.cov(ddof=1).cpu().numpy()
    cov = (cov + cov.T) / 2
    var = np.diag(cov).copy()
    # a loss of zero variance (a padded entry, a constant loss) by the accumulator's own test, as its corr()
    varies = (acc.var_b().cpu().numpy() > 0) & (var > 0)
    if counted is not None:
        out = ~counted.numpy()
        cov[out] = 0.0
        cov[:, out] = 0.0
        varies &= ~out
    sd = np.sqrt(np.where(varies, var, 1.0))
    both = np.outer(varies, varies)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(both, np.clip(cov / np.outer(sd, sd), -1.0, 1.0), np.nan)
    corr[np.diag_indices_from(corr)] = np.where(varies, 1.0, np.nan)
    return -cov, corr


def _jackknife_se(loo: np.ndarray) -> np.ndarray:
    """The jackknife's standard error over chains, ``sqrt((C - 1) / C sum_c (loo_c - mean loo)^2)``, from the
    estimates ``loo (..., C, n)`` pooled over all chains but ``c``: the spread of the pooled estimate, differences
    between the chains' means included (which the per-chain estimates' spread leaves out)."""
    C = loo.shape[-2]
    dev = loo - loo.mean(-2, keepdims=True)
    return np.sqrt((C - 1) / C * (dev**2).sum(-2))


def _pool(accs: Sequence[CrossCovariance]) -> CrossCovariance:
    """The accumulators' draws in one accumulator, on the CPU (where the rows are computed)."""
    out = CrossCovariance(accs[0].k, accs[0].n, track_auto=accs[0].track_auto)
    for a in accs:
        out.merge(a)
    return out


def _on_cpu(acc: CrossCovariance) -> CrossCovariance:
    """``acc`` itself when its state is on the CPU, else a CPU copy of it (the same state, exactly)."""
    if acc.device.type == "cpu":
        return acc
    out = CrossCovariance(acc.k, acc.n, track_auto=acc.track_auto)
    return out.load_state_dict(acc.state_dict())


def _chi_from(
    acc: CrossCovariance, convention: str, nbeta: float, full_means, counted: torch.Tensor | None = None
) -> np.ndarray:
    """One row of chi from an accumulator over (phi) x (l_1..l_N, Lbar); 0 at entries outside ``counted``."""
    chi = _chi_all(acc, convention, nbeta, full_means)
    if counted is not None:
        chi[~counted.numpy()] = 0.0
    return chi


def _chi_all(acc: CrossCovariance, convention: str, nbeta: float, full_means) -> np.ndarray:
    cov = acc.cov(ddof=1)[0].cpu().numpy()  # Cov(phi, l_z) for z = 1..N, then Cov(phi, Lbar)
    if convention == "physics":
        return -nbeta * (cov[:-1] - cov[-1])
    # devinterp: E[phi Lbar] - E[phi l_t] - E[phi] (E_full[Lbar] - E_full[l_t]); E[phi X] from the population
    # covariance and the means
    cnt = acc.count
    cov_pop = cov * (cnt - 1) / cnt
    ma = float(acc.mean_a[0])
    mb = acc.mean_b.cpu().numpy()
    e_phi_x = cov_pop + ma * mb
    return e_phi_x[-1] - e_phi_x[:-1] - ma * (full_means[-1] - full_means[:-1])


def _warn_capped_burnin(who: str, kw: dict, auto_step, estimate: str, se: str) -> None:
    """Warn (:class:`NonStationaryWarning`, unless ``warn_nonstationary=False``) as :func:`pypattern.estimate_llc`
    does when the burn-in chosen for the calibrated step (``auto_step``) was capped at ``max_burnin_factor`` times
    the draws' steps (:func:`~pypattern.sampling.llc.capped_burnin_message`), naming the call ``who``."""
    if auto_step is None or kw.get("warn_nonstationary", True) is False:
        return
    message = capped_burnin_message(auto_step.to_dict(), estimate, se)
    if message is not None:
        warnings.warn(f"{who}: {message}", NonStationaryWarning, stacklevel=user_stacklevel())


def _with_auto_reruns(run: Callable, kw: dict, auto_step, checkpoint, callbacks: Sequence[Callable] = ()):
    """``run()``; when the step was calibrated (``auto_step``), there is no checkpoint and every one of the
    caller's ``callbacks`` has a ``reset()`` method, a run that diverges or runs away is run again from the start
    at half the step (:func:`~pypattern.sampling.runner.rerun_at_half_step`, as :func:`pypattern.sample` does),
    ``kw["step_size"]`` updated and the callbacks reset first."""
    if auto_step is None:
        return run()
    first = float(kw["step_size"])
    # a burn-in chosen by the rule for the calibrated step (not one given) is chosen again for a halved step
    rule = dict(getattr(auto_step, "burnin", None) or {})
    chosen_burnin = (
        rule.get("num_burnin_steps") is not None and kw.get("num_burnin_steps") == rule["num_burnin_steps"]
    )

    def at(step: float):
        if step != first:
            for cb in callbacks:
                cb.reset()
            if chosen_burnin:  # (rerun_at_half_step set auto_step.chosen to the step)
                kw["num_burnin_steps"] = calibrated_burnin(
                    auto_step, int(kw.get("num_draws", 200)), int(kw.get("num_steps_bw_draws", 1))
                )
        kw["step_size"] = step
        return run()

    can_rerun = checkpoint is None and all(callable(getattr(cb, "reset", None)) for cb in callbacks)
    # the runs' step is the calibration's: no given-step checks on it (the calibration judged it)
    with step_calibrated_by_caller():
        return rerun_at_half_step(at, first, auto_step, can_rerun=can_rerun)


def _user_callbacks(callbacks, batched) -> list[Callable]:
    """The caller's ``callbacks`` as a list, checked as :func:`pypattern.sample` checks them (errors naming
    ``callbacks[i]`` by the caller's index)."""
    if callable(callbacks) or not isinstance(callbacks, Iterable) or isinstance(callbacks, str | bytes):
        raise TypeError(f"callbacks={callbacks!r} is not valid; give a list of functions")
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if not callable(cb):
            raise TypeError(f"callbacks[{i}]={cb!r} is not callable")
    check_callables(None, None, callbacks, batched)
    return callbacks


def _in_whole_call(cb: Callable, run_index: Sequence[int], num_chains: int) -> Callable:
    """``cb`` called with ``run`` and ``chain`` numbered over the whole call's runs (``run_index[r]`` for run
    ``r`` of a group's :func:`pypattern.sample` call), with ``cb``'s signature (the sampler passes the keywords it
    declares, and runs chains one after another for one that requires ``optimizer``)."""

    def call(**given):
        r = None
        if "chain" in given:
            r, c = divmod(int(given["chain"]), num_chains)
            given["chain"] = run_index[r] * num_chains + c
        if "run" in given:
            given["run"] = run_index[int(given["run"])]
        return cb(**given)

    try:
        call.__signature__ = inspect.signature(cb)
    except (TypeError, ValueError):  # no signature: the sampler passes every keyword
        pass
    return call


@_eval_mode_throughout(context=_eval_mode_for_dropout)
def bif(
    model: nn.Module,
    loader,
    probe,
    *,
    loss_fn: Callable | None = None,
    per_sample_loss_fn: Callable = per_sample_losses,
    per_token: bool = True,
    device: str | torch.device | None = None,
    callbacks: Sequence[Callable] = (),
    **sampler_settings,
) -> BIFResult:
    """Bayesian influence function ``BIF(z_i, z_j) = -Cov(l_i, l_j)`` over draws of the (unrestricted) localized
    posterior, and the loss correlation matrix; streamed (memory ``O(N^2)``, independent of the draws).
    ``loss_fn``, ``per_sample_loss_fn`` and ``per_token`` are those of :func:`susceptibilities` (the sampler's
    loss by default the mean of ``per_sample_loss_fn`` over the batch's counted entries, as there), and
    ``**sampler_settings`` are too (``sampler=`` included; documented in :func:`pypattern.sample`, an unknown
    keyword a ``TypeError`` naming it; with a calibrated step and no ``num_burnin_steps`` the burn-in chosen as
    there and in :func:`pypattern.estimate_llc`) but ``checkpoint=`` / ``checkpoint_every=``: a BIF run is not
    checkpointed. ``device``: where to sample, as in :func:`susceptibilities` (default: the model's device;
    another one samples a copy of the model moved there, the probe moved with it). ``callbacks``: called at every draw, as :func:`pypattern.sample` calls them (with the
    keywords they accept; ``observables`` holds ``"probe_losses"``, the draw's probe losses), reset before a run
    again at half a calibrated step as there."""
    for key in ("checkpoint", "checkpoint_every"):
        if key in sampler_settings:
            raise TypeError(
                f"bif takes no {key}=: its runs are not checkpointed (susceptibilities and estimate_llc resume from "
                "a checkpoint; bif starts afresh)"
            )
    kw = _sampler_settings_defaults(_sampler_kwargs(dict(sampler_settings), "bif()"))
    user_callbacks = _user_callbacks(callbacks, kw.get("batched"))
    model = _bridge_converted(model, "bif", loss_fn is not None or not _library_losses(per_sample_loss_fn))
    _check_common(model, loader, per_token, kw)
    auto_options = _auto_step_options(kw)
    model, dev = _run_device(model, device)
    probe = to_device(probe, dev)  # the probe losses are forwards of the model on it
    # per_sample_loss_fn's losses on a loader's batch, when the sampler's loss is their mean
    own_losses_at = None
    if loss_fn is None and per_sample_loss_fn not in _DEFAULT_TOKEN_LOSSES:
        own_losses_at = lambda batch: per_sample_loss_fn(model, to_device(batch, dev))  # noqa: E731
        # susceptibilities' sampler loss; with the default per_sample_loss_fn that is batch_loss, which sample()
        # takes for loss_fn=None (and runs batched chains on with its checks made before stacking)
        loss_fn = _chain_loss(per_sample_loss_fn)
    _burnin_before_calibration(kw)
    auto_step = None
    if wants_auto(
        kw.get("step_size"), kw.get("optimizer_kwargs")
    ):  # calibrated before the run (sampling.auto)
        with _naming_rows_without_counted(loader, own_losses_at):
            kw["step_size"], auto_step = resolve_step_size(
                model, loader, **auto_arguments(dict(kw, loss_fn=loss_fn, auto_step_options=auto_options))
            )
    _resolve_burnin(kw, auto_step)

    entries = _ProbeEntries(model, probe, per_sample_loss_fn, per_token)

    def losses_of(m) -> torch.Tensor:
        return entries.reduce(per_sample_loss_fn(m, probe))

    l0 = _probe_losses_at_w_star(model, probe, per_sample_loss_fn, losses_of)
    n = l0.numel()

    # the draws are accumulated where the probe losses are (no copy to the host per draw), in float64 there
    acc_dev = float64_device(l0.device)

    def run() -> CrossCovariance:
        acc = CrossCovariance(n, n, track_auto="var", device=acc_dev)

        def cb(observables):
            lz = _flat(observables["probe_losses"], n, "per_sample_loss_fn", device=acc_dev).reshape(1, -1)
            acc.update(lz, lz)

        with naming_runs(["bif()"]):
            sample(
                model,
                loader,
                loss_fn=loss_fn,
                observables={"probe_losses": lambda m, batch: losses_of(m).reshape(-1)},
                record_observables=False,
                callbacks=[cb, *user_callbacks],
                **kw,
            )
        return acc

    with _naming_rows_without_counted(loader, own_losses_at):
        acc = _with_auto_reruns(run, kw, auto_step, kw.get("checkpoint"), user_callbacks)
    _warn_capped_burnin("bif()", kw, auto_step, "the BIF", "its spread across chains")
    counted = entries.counted(n)
    meta = _probe_meta(probe, l0, counted)
    bif_, corr = _bif_and_corr(acc, counted)
    return BIFResult(
        bif=bif_,
        corr=corr,
        loss_mean=acc.mean_b.cpu().numpy(),
        probe_sample=meta[0],
        probe_position=meta[1],
        probe_token=meta[2],
        num_chains=int(kw["num_chains"]),
        num_draws=int(kw["num_draws"]),
        settings=_settings_of(kw, auto_step),
        probe_counted=None if counted is None else counted.numpy().astype(bool),
    )
