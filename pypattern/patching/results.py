"""Per-example patching results with means, standard errors, bootstrap intervals and a pandas view."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import is_count, is_real
from .._plotting import figure_axes, finish
from ..io import Saveable, register
from ..sampling.results import check_arrays

__all__ = ["PatchResult"]

#: :attr:`PatchResult.normalized` warns when ``|mean gap|`` is below this fraction of the mean ``|gap|`` over examples
NEAR_CANCEL = 0.05


@register
@dataclass
class PatchResult(Saveable):
    """Result of a patching grid (exact or attribution).

    Attributes
    ----------
    values : Tensor ``(batch, *grid)``
        Metric of the patched run for every example and cell (for attribution patching: the estimate
        ``m_target + AtP``).
    clean, corrupted : Tensor ``(batch,)``
        Metric of the clean and the corrupted run (``corrupted`` is None for zero/mean ablation).

    Means over examples (:meth:`mean`, :meth:`se`, :meth:`ci`, :meth:`top` and the normalising gap of
    :attr:`normalized`) are over :attr:`finite_examples`: an example whose metric is not finite on the clean or
    the corrupted run is left out of them (its own values stay in :attr:`values`).
    axes : tuple of str
        Names of the grid dimensions, e.g. ``("layer", "head", "pos")``.
    coords : dict[str, list]
        Labels along each grid dimension.
    site, direction, metric, method : str
    info : dict
        Settings and bookkeeping of the run. Exact patching (``method="exact"``): ``window``, ``per_position``,
        ``num_cells``, ``max_batch`` (cells per engine batch, after ``max_memory`` lowered it; None: all cells of a
        position) and ``memory_estimate`` (bytes of working memory of one such batch, the engine's estimate,
        :meth:`ExactEngine.memory_estimate <pypattern.patching.engine.ExactEngine.memory_estimate>`; the cached
        clean and corrupted runs and packed weights come on top; absent when a checkpoint held every cell).
        Exact and naive patching: ``inert_skipped``, the cells set to the target run's metric without being
        computed, their patch changing no example's metric (:mod:`pypattern.patching.inert`; not counting cells
        a checkpoint held).
        Attribution patching: ``per_position``, ``max_batch`` (prompts per forward and backward) and ``memory_estimate`` (bytes,
        that many times :func:`~pypattern.patching.attribution.atp_prompt_bytes`), with ``grad_drop``
        ``graddrop``, the GradDrop scores ``(batch, *grid)``.
    """

    values: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor | None
    axes: tuple
    coords: dict
    site: str = ""
    direction: str = "denoising"
    metric: str = ""
    method: str = "exact"
    info: dict = field(default_factory=dict)

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): ``values (batch, *grid)`` of real numbers, one
        ``clean`` (and ``corrupted``) metric per example, one name in ``axes`` per grid dimension and as many
        ``coords`` along each as the grid has cells there."""
        check_arrays(  # the fields' types (tensors) are checked as they are read
            {"values": self.values, "clean": self.clean, "corrupted": self.corrupted},
            {"values": ("batch", ...), "clean": ("batch",), "corrupted": ("batch",)},
        )
        for name in ("values", "clean", "corrupted"):
            v = getattr(self, name)
            if v is not None and not v.is_floating_point():
                raise ValueError(f"{name} must hold metric values (floating point), got {v.dtype} values")
        grid = tuple(self.values.shape[1:])
        axes = self.axes
        if not isinstance(axes, tuple | list) or not all(isinstance(a, str) for a in axes):
            raise ValueError(f"axes must be a tuple of names (str), got {axes!r}")
        if len(axes) != len(grid) or len(set(axes)) != len(axes):
            raise ValueError(
                f"axes {tuple(axes)} does not name the {len(grid)} grid dimensions of values "
                f"{tuple(self.values.shape)} (batch, *grid), one distinct name each"
            )
        if not isinstance(self.coords, dict) or set(self.coords) != set(axes):
            keys = list(self.coords) if isinstance(self.coords, dict) else type(self.coords).__name__
            raise ValueError(f"coords must hold the labels along each of axes {tuple(axes)}, got {keys}")
        for a, n in zip(axes, grid):
            labels = self.coords[a]
            if not isinstance(labels, list | tuple) or len(labels) != n:
                have = len(labels) if isinstance(labels, list | tuple) else type(labels).__name__
                raise ValueError(
                    f"coords[{a!r}] holds {have} labels; values {tuple(self.values.shape)} has {n} along {a!r}"
                )
        if self.direction not in ("denoising", "noising"):
            raise ValueError(f"direction must be 'denoising' or 'noising', got {self.direction!r}")
        if not isinstance(self.info, dict):
            raise ValueError(f"info must be a dict, got {type(self.info).__name__} {str(self.info)[:40]!r}")
        graddrop = self.info.get("graddrop")
        if isinstance(graddrop, torch.Tensor) and tuple(graddrop.shape) != tuple(self.values.shape):
            raise ValueError(
                f"info['graddrop'] {tuple(graddrop.shape)} is not of values' shape {tuple(self.values.shape)}"
            )

    @property
    def finite_examples(self) -> torch.Tensor:
        """``(batch,)`` bool: the examples whose metric is finite on the clean and the corrupted run, those the
        means over examples are taken over."""
        keep = torch.isfinite(self.clean)
        if self.corrupted is not None:
            keep = keep & torch.isfinite(self.corrupted)
        return keep.to(self.values.device)

    def _kept(self, v: torch.Tensor) -> torch.Tensor:
        """``v (batch, ...)`` at :attr:`finite_examples` (all of it when every example is finite)."""
        keep = self.finite_examples.to(v.device)
        return v if bool(keep.all()) else v[keep]

    @property
    def target(self) -> torch.Tensor:
        """Metric of the unpatched target run ``(batch,)`` (corrupted for denoising, clean for noising)."""
        if self.direction == "denoising" and self.corrupted is None:
            raise ValueError(
                "a denoising result's target is its corrupted run, and this result has none (corrupted=None); "
                "give the corrupted run's metric, or direction='noising' for an ablation of the clean run"
            )
        return self.corrupted if self.direction == "denoising" else self.clean

    @property
    def effect(self) -> torch.Tensor:
        """``values - target`` per example ``(batch, *grid)``: the change each patch caused."""
        t = self.target.to(self.values.dtype)
        return self.values - t.view(-1, *([1] * (self.values.dim() - 1)))

    @property
    def normalized(self) -> torch.Tensor:
        """Per-example ``(m_patched - m_corrupt_i) / mean(m_clean - m_corrupt)`` ``(batch, *grid)``.

        The denominator is the batch-mean gap (over :attr:`finite_examples`), so the mean over examples is the
        normalised mean metric (1 = clean level, 0 = corrupted level) and no example divides by a near-zero gap of
        its own. A mean gap of exactly 0 gives NaN (with a RuntimeWarning). A mean gap below 5% of the mean
        ``|m_clean - m_corrupt|`` over the examples (their gaps, of both signs, cancel) is divided by, with a
        RuntimeWarning (once per result): the normalised values are then unstable.
        """
        gap = self._gap("normalized")
        if not (torch.isfinite(gap) and gap != 0):
            same = torch.nonzero(self.clean == self.corrupted).flatten().tolist()
            warnings.warn(
                f"normalized: the mean gap m_clean - m_corrupted is {float(gap)} (examples with "
                f"m_clean == m_corrupted: {same}); the normalised values are undefined and returned as NaN. "
                "Use .effect, or corrupted prompts that change the metric",
                RuntimeWarning,
                stacklevel=2,
            )
            return torch.full_like(self.values, float("nan"))
        c = self.corrupted.to(self.values.dtype).view(-1, *([1] * (self.values.dim() - 1)))
        return (self.values - c) / gap

    def _gap(self, call: str) -> torch.Tensor:
        """The mean gap ``m_clean - m_corrupted`` over :attr:`finite_examples` (0-dim, in values' dtype). Raises
        without a corrupted run; warns (once per result and gap) when the examples' gaps nearly cancel."""
        if self.corrupted is None:
            raise ValueError(
                f"{call} needs a corrupted run; zero/mean ablation has none (use .effect, or normalized=False)"
            )
        dt = self.values.dtype
        gaps = self._kept(self.clean.to(dt) - self.corrupted.to(dt))
        gap, size = gaps.mean(), gaps.abs().mean()
        if bool(torch.isfinite(gap)) and gap != 0 and bool(gap.abs() < NEAR_CANCEL * size):
            key = (float(gap), float(size))
            if self.__dict__.get("_warned_gap") != key:
                self.__dict__["_warned_gap"] = key
                warnings.warn(
                    f"{call}: the mean gap m_clean - m_corrupted is {float(gap):.4g}, under {NEAR_CANCEL:g} x the "
                    f"mean |m_clean - m_corrupted| over the examples ({float(size):.4g}): the examples' gaps cancel, "
                    "so the normalised values (divided by the mean gap) are unstable. Normalise subsets of examples "
                    "whose gaps share a sign, or check that the corruption moves the metric one way",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return gap

    def _stat(self, normalized: bool) -> torch.Tensor:
        return self.normalized if normalized else self.values

    def mean(self, normalized: bool = True) -> torch.Tensor:
        """Mean over examples ``(*grid)`` (over :attr:`finite_examples`). ``normalized=True`` (the default) needs a
        corrupted run: for zero/mean ablation give ``normalized=False`` (the mean patched metric) or use
        :attr:`effect`."""
        return self._kept(self._stat(normalized)).mean(0)

    def se(self, normalized: bool = True) -> torch.Tensor:
        """Standard error of :meth:`mean` ``(*grid)`` (over :attr:`finite_examples`); NaN with one example
        (undefined).

        ``normalized=False``: the standard deviation of the values over the examples, over ``sqrt(n)``.
        ``normalized=True``: the normalised mean is a ratio of means, ``R = mean(a) / mean(b)`` with
        ``a_i = m_patched_i - m_corrupt_i`` and ``b_i = m_clean_i - m_corrupt_i``; its standard error is the delta
        method's, ``std(a_i - R b_i) / (sqrt(n) |mean(b)|)`` (from the variances of ``a`` and ``b`` and their
        covariance: the gap is estimated from the same examples, not fixed). It agrees to first order with the
        spread of :meth:`ci`'s bootstrap, which re-estimates the gap in every resample; a cell that restores every
        example's clean metric (``a_i = b_i``) has standard error 0.
        """
        if not normalized:
            v = self._kept(self.values)
            n = v.shape[0]
            if n > 1:
                return v.std(0, unbiased=True) / np.sqrt(n)
            return torch.full(v.shape[1:], float("nan"), dtype=v.dtype, device=v.device)  # (n = 0 too)
        r = self.mean(True)  # NaN (with a warning) when the mean gap is 0
        dt = self.values.dtype
        shape = (-1, *([1] * (self.values.dim() - 1)))
        c = self.corrupted.to(dt).view(shape)
        a = self._kept(self.values - c)
        b = self._kept(self.clean.to(dt).view(shape) - c)
        n = a.shape[0]
        if n < 2:
            return torch.full_like(r, float("nan"))
        return (a - r * b).std(0, unbiased=True) / (np.sqrt(n) * b.mean().abs())

    def ci(
        self, level: float = 0.95, num_resamples: int = 1000, seed: int = 0, normalized: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Percentile bootstrap confidence interval of the mean (examples resampled; the normalising gap is
        re-estimated in every resample). Returns ``(low, high)``, each ``(*grid)``, in values' dtype (NaN with
        fewer than two examples). Examples are drawn from :attr:`finite_examples`.

        Each of the ``num_resamples`` resamples draws ``n`` examples with replacement (``torch.randint`` from a CPU
        generator seeded with ``seed``); the ends are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
        (linear interpolation, :func:`torch.quantile`) of the resampled means, each normalised by its own mean gap;
        resamples whose mean gap is 0 are left out (with a RuntimeWarning)."""
        if not is_real(level):
            raise TypeError(f"level={level!r} is not valid; give a number in (0, 1)")
        if not 0 < level < 1:
            raise ValueError(f"level={level} is not valid; give a number in (0, 1)")
        if not is_count(num_resamples) or num_resamples < 1:
            raise ValueError(f"num_resamples={num_resamples!r} is not valid; give an int >= 1")
        if not is_count(seed) or seed < 0:
            raise ValueError(f"seed={seed!r} is not valid; give an int >= 0")
        num_resamples, seed = int(num_resamples), int(seed)
        if normalized and self.corrupted is None:
            raise ValueError("normalized CI needs a corrupted run; pass normalized=False")
        if self.values.shape[1:].numel() == 0:  # a grid of no cells
            empty = torch.empty(self.values.shape[1:], dtype=self.values.dtype, device=self.values.device)
            return empty, empty.clone()
        g = torch.Generator().manual_seed(seed)
        values, clean = self._kept(self.values), self._kept(self.clean)
        corrupted = None if self.corrupted is None else self._kept(self.corrupted)
        n = values.shape[0]
        if (
            n < 2
        ):  # one example (or none): every resample is that example, and the interval would be a false point
            nan = torch.full(
                self.values.shape[1:], float("nan"), dtype=self.values.dtype, device=self.values.device
            )
            return nan, nan.clone()
        # resamples drawn on the CPU (the same on every device); a CPU index reads the values on any device
        idx = torch.randint(0, n, (num_resamples, n), generator=g, device="cpu")
        v = values.double()[idx].mean(1)  # (R, *grid)
        if normalized:
            if corrupted is None:
                raise ValueError("normalized CI needs a corrupted run; pass normalized=False")
            self._gap("ci")  # warns when the examples' gaps cancel
            cl, co = clean.double()[idx].mean(1), corrupted.double()[idx].mean(1)
            shape = (-1, *([1] * (v.dim() - 1)))
            gap = cl - co
            zero = gap == 0
            if bool(zero.any()):
                same = torch.nonzero(self.clean == self.corrupted).flatten().tolist()
                warnings.warn(
                    f"ci: {int(zero.sum())} of {num_resamples} resamples have m_clean == m_corrupted on average "
                    f"(examples with m_clean == m_corrupted: {same}); they are left out of the normalised "
                    "interval (NaN when all are)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                if bool(zero.all()):
                    nan = torch.full(
                        v.shape[1:], float("nan"), dtype=self.values.dtype, device=self.values.device
                    )
                    return nan, nan.clone()
                v, gap, co = v[~zero], gap[~zero], co[~zero]
            v = (v - co.view(shape)) / gap.view(shape)
        a = (1 - level) / 2
        q = torch.quantile(v, torch.tensor([a, 1 - a], dtype=v.dtype, device=v.device), dim=0)
        return q[0].to(self.values.dtype), q[1].to(self.values.dtype)

    def top(self, k: int = 10, normalized: bool = False) -> list[tuple[dict, float]]:
        """The ``k`` cells whose mean effect over the examples (over :attr:`finite_examples`) is largest in absolute
        value (``|mean|``, not the mean of ``|effect|``): ``[(coords, mean effect), ...]``.

        The mean effect is ``mean(m_patched - m_target)`` (:attr:`effect`; the target is the corrupted run for
        denoising, the clean run for noising). ``normalized=True``: the same effect in units of the mean gap
        ``mean(m_clean - m_corrupt)``, i.e. ``mean(normalized)`` for denoising (1 = the clean level restored) and
        ``mean(normalized) - 1`` for noising (-1 = the metric brought down to the corrupted level): an effect, 0 for
        a cell that changes nothing, not the normalised value :meth:`mean` gives. Cells of equal ``|mean|`` come in
        grid order (row-major over :attr:`axes`); cells whose mean is NaN (a metric that is NaN on a patched run,
        or a mean gap of 0 when normalised) come after every other cell, in grid order, with their NaN.
        """
        if not is_count(k) or k < 0:  # numpy's integers too, as shortlist_and_confirm's k
            raise ValueError(f"k={k!r} is not valid; give an int >= 0")
        k = int(k)
        m = (
            self._kept(self.effect).mean(0)
            if not normalized
            else self.mean(True) - (0.0 if self.direction == "denoising" else 1.0)
        )
        flat = m.flatten()
        key = torch.where(torch.isnan(flat), torch.full_like(flat, float("inf")), -flat.abs())  # NaN last
        order = torch.sort(key, stable=True).indices[:k]
        out = []
        for i in order.tolist():
            ix = np.unravel_index(i, tuple(m.shape))
            out.append(({a: self.coords[a][j] for a, j in zip(self.axes, ix)}, float(flat[i])))
        return out

    def to_pandas(self, normalized: bool = True):
        """A long table: one row per cell with the grid coordinates, ``mean``, ``se``, ``ci_low``, ``ci_high``.

        Needs pandas (optional); raises ``ImportError`` otherwise. :meth:`to_records` gives the same rows as
        dicts without pandas.
        """
        if importlib.util.find_spec("pandas") is None:
            raise ImportError("to_pandas needs the optional package `pandas`; use .to_records() instead")
        import pandas as pd

        return pd.DataFrame(self.to_records(normalized))

    def to_records(self, normalized: bool = True) -> list[dict]:
        """One dict per cell: grid coordinates, ``mean``, ``se``, ``ci_low``, ``ci_high`` (normalised if asked
        and possible; the normalised ``se`` is :meth:`se`'s delta-method standard error of a ratio of means)."""
        normalized = normalized and self.corrupted is not None
        if self.values.shape[1:].numel() == 0:  # a grid of no cells
            return []
        mean, se = self.mean(normalized), self.se(normalized)
        lo, hi = self.ci(normalized=normalized, num_resamples=500)
        rows = []
        for ix in np.ndindex(*mean.shape):
            r = {a: self.coords[a][j] for a, j in zip(self.axes, ix)}
            r.update(mean=float(mean[ix]), se=float(se[ix]), ci_low=float(lo[ix]), ci_high=float(hi[ix]))
            rows.append(r)
        return rows

    def plot(self, path=None, ax=None, normalized: bool | None = None, title: str | None = None):
        """Heatmap of the mean over the examples (over :attr:`finite_examples`): layers down, the last grid axis
        across (positions, or heads for a per-head grid over all positions); a grid of layer x head x position
        has one row per (layer, head), labelled ``L{layer}H{head}`` (a grid of other or more axes one row per cell of
        all but the last axis, labelled ``name=label ...``); a grid of no axes is one cell.

        ``normalized``: True plots :meth:`mean` normalised (1 = clean level, 0 = corrupted level; needs a
        corrupted run); False the mean :attr:`effect` (patched minus target metric); None (default) the first when
        there is a corrupted run, else the second. The colour scale is symmetric about 0. Returns the axes; with
        ``path`` the figure is also written there (without ``ax``, a figure outside pyplot: matplotlib's backend and
        pyplot's figures are left as they are)."""
        if normalized is None:
            normalized = self.corrupted is not None
        if not isinstance(normalized, bool):
            raise TypeError(f"normalized={normalized!r} is not valid; give True, False or None")
        m = self.mean(True) if normalized else self._kept(self.effect).mean(0)
        m = m.detach().to("cpu", torch.float64)
        axes = list(self.axes)
        if m.dim() == 0:  # no grid axes: one cell
            m, xs, ys, xlab = m.reshape(1, 1), [""], [""], ""
        elif m.dim() == 1:
            m, xs, ys, xlab = m[:, None], [""], self.coords[axes[0]], ""
        elif m.dim() == 2:
            xs, ys, xlab = self.coords[axes[1]], self.coords[axes[0]], axes[1]
        else:  # (layer, head, pos): one row per (layer, head), and per cell of any further leading axis
            short = axes[:-1] == [
                "layer",
                "head",
            ]  # L{layer}H{head}; other axes as name=label, space-separated
            ys = [""]
            for a in axes[:-1]:
                tag, sep = ({"layer": "L", "head": "H"}[a], "") if short else (f"{a}=", " ")
                ys = [f"{y}{sep if y else ''}{tag}{c}" for y in ys for c in self.coords[a]]
            xs, xlab = self.coords[axes[-1]], axes[-1]
            m = m.reshape(-1, m.shape[-1])
        size = (max(5.5, 1.5 + 0.45 * len(xs)), max(2.8, 1.4 + 0.3 * len(ys)))
        fig, ax, own = figure_axes(path, ax, size)
        finite = m[torch.isfinite(m)]
        lim = float(finite.abs().max()) if finite.numel() else 1.0
        lim = lim if lim > 0 else 1.0
        im = ax.imshow(m.numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs], fontsize=8)
        ax.set_yticks(range(len(ys)), [str(y) for y in ys], fontsize=8)
        ax.set_xlabel(xlab)
        ax.set_ylabel("" if not axes else axes[0] if len(axes) < 3 else ", ".join(axes[:-1]))
        what = "normalised (1 = clean, 0 = corrupted)" if normalized else "mean effect"
        ax.set_title(
            title or f"{self.method} {self.direction}: {self.site}, {self.metric}\n{what}", fontsize=9
        )
        fig.colorbar(im, ax=ax, fraction=0.046)
        finish(fig, path, own)
        return ax

    def __repr__(self) -> str:
        """What the grid is, without its tensors (an error message quoting it stays readable)."""
        axes = ", ".join(self.axes)
        return (
            f"PatchResult({self.method} {self.direction} of {self.site!r}, metric {self.metric!r}: values "
            f"{tuple(self.values.shape)} (batch, {axes}))"
        )

    def to_csv(self, path: str, normalized: bool = True) -> None:
        """Write :meth:`to_records` as CSV (no pandas needed)."""
        import csv

        rows = self.to_records(normalized)
        with open(path, "w", newline="") as f:  # a grid of no cells: the header alone
            w = csv.DictWriter(f, fieldnames=[*self.axes, "mean", "se", "ci_low", "ci_high"])
            w.writeheader()
            w.writerows(rows)
