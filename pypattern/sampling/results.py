"""Result dataclasses of the sampler and the LLC estimator, saved with :mod:`pypattern.io` (``.npz`` with a JSON
header; no pickle: loading never executes code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..io import Saveable, register

__all__ = ["LLCResult", "SampleResult"]


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
        """The arrays' shapes agree (a file read by :meth:`load`): ``(chains, draws)`` traces, one LLC per chain."""
        C = self.loss_trace.shape[0] if self.loss_trace.ndim == 2 else -1
        if C < 0 or self.llc_trace.shape != self.loss_trace.shape or self.llc_per_chain.shape != (C,):
            raise ValueError(
                f"loss_trace {self.loss_trace.shape}, llc_trace {self.llc_trace.shape} and llc_per_chain "
                f"{self.llc_per_chain.shape} are not (chains, draws), (chains, draws) and (chains,)"
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

    def plot(self, ax=None, *, title: str | None = None):
        """Plot the loss trace of each chain and ``L_n(w*)`` (matplotlib); returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
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
        return ax

    def __repr__(self) -> str:
        return (
            f"LLCResult(llc_mean={self.llc_mean:.6g}, llc_std={self.llc_std:.3g}, llc_se={self.llc_se:.3g}, "
            f"num_chains={len(self.llc_per_chain)}, num_draws={self.loss_trace.shape[1]}, "
            f"r_hat={self.r_hat:.3f}, ess={self.ess:.1f})"
        )
