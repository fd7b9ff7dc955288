"""Result dataclasses of the sampler and the LLC estimator, saved with :mod:`pypattern.io` (``.npz`` with a JSON
header; no pickle: loading never executes code)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._plotting import figure_axes, finish
from ..io import Saveable, register

__all__ = ["LLCResult", "SampleResult"]


def _pattern_text(pattern: tuple) -> str:
    parts = [str(p) for p in pattern if p is not ...] + (["..."] if pattern and pattern[-1] is ... else [])
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"


def check_lists(fields: dict[str, Any], kinds: dict[str, tuple[tuple[type, ...], str]], per: str) -> int:
    """Check a loaded result's lists (its ``_check_loaded``): each field ``name`` of ``kinds`` is a list of one
    entry per ``per`` (as many as the first field has), each entry of the types ``kinds[name][0]`` and not a bool;
    ``kinds[name][1]`` says what they are (``"numbers"``, ``"texts"``). Returns the count; raises ValueError naming
    the field."""
    first = next(iter(kinds))
    n = len(fields[first]) if isinstance(fields[first], list) else None
    for name, (types, what) in kinds.items():
        v = fields[name]
        if not isinstance(v, list) or len(v) != n:
            have = f"{len(v)} entries" if isinstance(v, list) else type(v).__name__
            raise ValueError(f"{name} must be a list of one entry per {per} ({n}, as {first}), got {have}")
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, types)]
        if bad:
            raise ValueError(f"{name} must hold {what}, got {bad[0]!r}")
    return n


def check_arrays(fields: dict[str, Any], shapes: dict[str, tuple]) -> dict[str, int]:
    """Check a loaded result's arrays (its ``_check_loaded``): each field ``name`` of ``shapes`` is an ndarray
    (or a tensor) of real numbers (bool, integer or float) whose shape matches ``shapes[name]``, a tuple of int
    sizes and names, a name standing for the same size in every field where it appears, ending in ``...`` where any
    further axes may follow; a field that is None is skipped (an optional array). Returns the sizes of the names;
    raises ValueError naming the field and the shape expected."""
    sizes: dict[str, tuple[int, str, tuple]] = {}  # name -> (size, the field that set it, its shape)
    for name, pattern in shapes.items():
        v = fields[name]
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            real = not v.is_complex()
        elif isinstance(v, np.ndarray):
            real = v.dtype.kind in "biuf"
        else:
            raise ValueError(f"{name} must be an array {_pattern_text(pattern)}, got {type(v).__name__}")
        if not real:
            raise ValueError(f"{name} must hold real numbers, got {v.dtype} values")
        shape = tuple(v.shape)
        open_end = bool(pattern) and pattern[-1] is ...
        fixed = pattern[:-1] if open_end else pattern
        if len(shape) < len(fixed) or (not open_end and len(shape) != len(fixed)):
            raise ValueError(f"{name} {shape} is not of shape {_pattern_text(pattern)}")
        for have, want in zip(shape, fixed):
            if isinstance(want, str):
                size, first, first_shape = sizes.setdefault(want, (have, name, shape))
                if have != size:
                    raise ValueError(
                        f"{name} {shape} is not of shape {_pattern_text(pattern)} with {want} = {size} as in "
                        f"{first} {first_shape}"
                    )
            elif have != want:
                raise ValueError(f"{name} {shape} is not of shape {_pattern_text(pattern)}")
    return {k: v[0] for k, v in sizes.items()}


def _draw_table(loss_trace: np.ndarray, columns: dict):
    """A long pandas table of ``(num_chains, num_draws)`` traces."""
    import pandas as pd

    c, d = np.asarray(loss_trace).shape
    out = {"chain": np.repeat(np.arange(c), d), "draw": np.tile(np.arange(d), c)}
    out["loss"] = np.asarray(loss_trace).reshape(-1)
    for k, v in columns.items():
        out[k] = np.asarray(v).reshape(-1)
    return pd.DataFrame(out)


@register
@dataclass(eq=False)
class SampleResult(Saveable):
    """What :func:`pypattern.sampling.sample` returns.

    Attributes
    ----------
    loss_trace : ndarray, ``(num_chains, num_draws)``, float64
        Batch-mean loss at each draw (evaluated at the weights before that step's update, as devinterp does).
    init_loss : float
        ``L_n(w*)``: the mean of ``init_losses``.
    init_losses : ndarray, ``(num_init_loss_batches,)``
        The loss at ``w*`` on each of the batches averaged into ``init_loss``.
    init_loss_se : float
        Standard error of ``init_loss`` as the loss over one epoch of the loader: ``0`` when the whole epoch was
        read or ``init_loss`` was given, ``nan`` when it cannot be estimated (one batch of several).
    observables : dict of str to ndarray ``(num_chains, num_draws, *shape)``
        Traces of the observables.
    config : dict
        The hyperparameters of the run (step_size, nbeta, localization, ...).
    r_hat, ess : float
        Split R-hat and effective sample size of the loss trace.
    seconds : float
        Wall time of the sampling (excluding time before a resume).
    batched : bool
        Whether the chains ran batched (vmap) or one after another (also False when they went on one after
        another partway through, from a step whose batches differ in shape between chains).
    """

    loss_trace: np.ndarray
    init_loss: float
    init_losses: np.ndarray
    init_loss_se: float = float("nan")
    observables: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    r_hat: float = float("nan")
    ess: float = float("nan")
    seconds: float = 0.0
    batched: bool = False

    def _check_loaded(self) -> None:
        """The arrays agree (a file read by :meth:`load`): ``(chains, draws)`` loss trace, observables'
        traces ``(chains, draws, *shape)`` under str names, numbers throughout."""
        for name in ("observables", "config"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        for key in self.observables:
            if not isinstance(key, str):
                raise ValueError(f"observables must be keyed by name (str), got key {key!r}")
        check_arrays(
            {"loss_trace": self.loss_trace, "init_losses": self.init_losses}
            | {f"observables[{k!r}]": v for k, v in self.observables.items()},
            {"loss_trace": ("chains", "draws"), "init_losses": ("batches",)}
            | {f"observables[{k!r}]": ("chains", "draws", ...) for k in self.observables},
        )

    @property
    def num_chains(self) -> int:
        return int(self.loss_trace.shape[0])

    @property
    def num_draws(self) -> int:
        return int(self.loss_trace.shape[1])

    def to_pandas(self):
        """One row per (chain, draw): ``chain``, ``draw``, ``loss`` and one column per scalar observable
        (observables with more than one value per draw stay in :attr:`observables`)."""
        return _draw_table(self.loss_trace, {k: v for k, v in self.observables.items() if np.ndim(v) == 2})


@register
@dataclass(eq=False)
class LLCResult(Saveable):
    """What :func:`pypattern.sampling.estimate_llc` returns.

    ``llc_per_chain[c] = nbeta * (mean(loss_trace[c]) - init_loss)``; ``llc_mean`` and ``llc_std`` (ddof=1, as
    devinterp) are over chains; ``llc_trace = nbeta * (loss_trace - init_loss)``, ``(num_chains, num_draws)``.

    ``llc_se`` is the standard error of ``llc_mean``: the spread over chains (``llc_std / sqrt(num_chains)``)
    combined with the error of ``L_n(w*)``, which every chain shares (``nbeta * init_loss_se``, zero when it was
    computed over the whole epoch). Compare two estimates by their ``llc_se``, not their ``llc_std``.
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    llc_trace: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    nbeta: float
    r_hat: float = float("nan")
    ess: float = float("nan")
    sample: SampleResult | None = None
    llc_se: float = float("nan")
    init_loss_se: float = float("nan")

    def _check_loaded(self) -> None:
        """The arrays agree (a file read by :meth:`load`): ``(chains, draws)`` traces of numbers, one LLC per
        chain (and a :attr:`sample`, checked as it is read, of as many chains)."""
        sizes = check_arrays(
            {"loss_trace": self.loss_trace, "llc_trace": self.llc_trace, "llc_per_chain": self.llc_per_chain},
            {
                "loss_trace": ("chains", "draws"),
                "llc_trace": ("chains", "draws"),
                "llc_per_chain": ("chains",),
            },
        )
        if self.sample is not None:
            if not isinstance(self.sample, SampleResult):
                raise ValueError(f"sample must be a SampleResult or None, got {type(self.sample).__name__}")
            if self.sample.loss_trace.shape != self.loss_trace.shape:
                raise ValueError(
                    f"sample.loss_trace {self.sample.loss_trace.shape} is not of loss_trace's shape "
                    f"{self.loss_trace.shape} (chains {sizes['chains']}, draws {sizes['draws']})"
                )

    def to_devinterp(self) -> dict[str, Any]:
        """devinterp 1.x's summary dict: ``llc/mean``, ``llc/std``, ``llc-chain/<i>``, ``loss/trace``,
        ``init_loss`` (and ``llc/trace``)."""
        out: dict[str, Any] = {"llc/mean": float(self.llc_mean), "llc/std": float(self.llc_std)}
        out.update({f"llc-chain/{i}": float(v) for i, v in enumerate(self.llc_per_chain)})
        out["loss/trace"] = self.loss_trace.astype(np.float32)
        out["llc/trace"] = self.llc_trace.astype(np.float32)
        out["init_loss"] = float(self.init_loss)
        return out

    def to_pandas(self):
        """One row per (chain, draw): ``chain``, ``draw``, ``loss`` and ``llc`` (= ``nbeta * (loss - init_loss)``)."""
        return _draw_table(self.loss_trace, {"llc": self.llc_trace})

    def plot(self, ax=None, *, path=None, title: str | None = None):
        """Plot the loss trace of each chain and ``L_n(w*)`` (matplotlib); returns the axes.

        ``ax``: the axes to draw on (None: a new figure). ``path``: write the figure there (without ``ax``, a figure
        outside pyplot: matplotlib's backend and pyplot's figures are left as they are). A path (str or
        ``os.PathLike``) given in ``ax``'s place is read as ``path``, as the other results' ``plot`` take it."""
        if isinstance(ax, str | os.PathLike):
            if path is not None:
                raise TypeError(f"plot got a path twice: ax={ax!r} and path={path!r}; give one")
            ax, path = None, ax
        if ax is not None and not hasattr(ax, "plot"):
            raise TypeError(f"ax={ax!r} is not valid; give matplotlib axes, or None (a new figure)")
        fig, ax, own = figure_axes(path, ax, (7, 4))
        for c, tr in enumerate(self.loss_trace):
            ax.plot(tr, lw=0.8, label=f"chain {c}")
        ax.axhline(self.init_loss, color="k", ls="--", lw=1, label="L_n(w*)")
        ax.set_xlabel("draw")
        ax.set_ylabel("batch loss")
        ax.set_title(
            title
            or f"LLC = {self.llc_mean:.3g} +- {self.llc_se:.2g} (s.e.; chain std {self.llc_std:.2g}; "
            f"R-hat {self.r_hat:.3f})"
        )
        if len(self.loss_trace) <= 10:
            ax.legend(fontsize=7)
        finish(fig, path, own)
        return ax

    def __repr__(self) -> str:
        return (
            f"LLCResult(llc_mean={self.llc_mean:.6g}, llc_std={self.llc_std:.3g}, llc_se={self.llc_se:.3g}, "
            f"num_chains={len(self.llc_per_chain)}, num_draws={self.loss_trace.shape[1]}, "
            f"r_hat={self.r_hat:.3f}, ess={self.ess:.1f})"
        )
