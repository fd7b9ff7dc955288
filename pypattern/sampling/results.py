"""Result dataclasses of the sampler and the LLC estimator, saved as ``.npz`` with a JSON header (no pickle:
``numpy.load(..., allow_pickle=False)`` reads them, and loading never executes code)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LLCResult", "SampleResult", "load_npz", "save_npz_atomic"]

_META = "__meta_json__"


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``arrays`` and the JSON-serialisable ``meta`` to ``path`` atomically (temp file + fsync + rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_npz(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`save_npz_atomic`: ``(arrays, meta)``."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != _META}
        meta = json.loads(bytes(z[_META]).decode()) if _META in z.files else {}
    return arrays, meta


def _split(obj) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, meta = {}, {"type": type(obj).__name__}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, np.ndarray):
            arrays[f.name] = v
        elif isinstance(v, dict) and v and all(isinstance(a, np.ndarray) for a in v.values()):
            for k, a in v.items():
                arrays[f"{f.name}/{k}"] = a
            meta[f.name + "/__keys__"] = list(v)
        elif dataclasses.is_dataclass(v):
            sub_a, sub_m = _split(v)
            arrays.update({f"{f.name}.{k}": a for k, a in sub_a.items()})
            meta[f.name] = sub_m
        else:
            meta[f.name] = v
    return arrays, meta


def _join(cls, arrays, meta):
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in arrays:
            kw[f.name] = arrays[f.name]
        elif f.name + "/__keys__" in meta:
            kw[f.name] = {k: arrays[f"{f.name}/{k}"] for k in meta[f.name + "/__keys__"]}
        elif f.name == "sample" and isinstance(meta.get(f.name), dict):
            prefix = f.name + "."
            sub = {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)}
            kw[f.name] = _join(SampleResult, sub, meta[f.name])
        elif f.name in meta:
            kw[f.name] = meta[f.name]
    return cls(**kw)


def _draw_table(loss_trace: np.ndarray, columns: dict):
    """A long pandas table of ``(num_chains, num_draws)`` traces."""
    import pandas as pd

    c, d = np.asarray(loss_trace).shape
    out = {"chain": np.repeat(np.arange(c), d), "draw": np.tile(np.arange(d), c)}
    out["loss"] = np.asarray(loss_trace).reshape(-1)
    for k, v in columns.items():
        out[k] = np.asarray(v).reshape(-1)
    return pd.DataFrame(out)


class _Saveable:
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (``.npz``: arrays plus a JSON header; atomic)."""
        arrays, meta = _split(self)
        save_npz_atomic(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a result written by :meth:`save`."""
        arrays, meta = load_npz(path)
        if meta.get("type") != cls.__name__:
            raise ValueError(f"{os.fspath(path)!r} holds a {meta.get('type')!r}, not a {cls.__name__}")
        return _join(cls, arrays, meta)


@dataclass(eq=False)
class SampleResult(_Saveable):
    """What :func:`pypattern.sampling.sample` returns.

    Attributes
    ----------
    loss_trace : ndarray, ``(num_chains, num_draws)``, float64
        Batch-mean loss at each draw (evaluated at the weights before that step's update, as devinterp does).
    init_loss : float
        ``L_n(w*)``: the mean of ``init_losses``.
    init_losses : ndarray, ``(num_init_loss_batches,)``
        The loss at ``w*`` on each of the batches averaged into ``init_loss``.
    observables : dict of str to ndarray ``(num_chains, num_draws, *shape)``
        Traces of the observables.
    config : dict
        The hyperparameters of the run (step_size, nbeta, localization, ...).
    r_hat, ess : float
        Split R-hat and effective sample size of the loss trace.
    seconds : float
        Wall time of the sampling (excluding time before a resume).
    batched : bool
        Whether the chains ran batched (vmap) or one after another.
    """

    loss_trace: np.ndarray
    init_loss: float
    init_losses: np.ndarray
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


@dataclass(eq=False)
class LLCResult(_Saveable):
    """What :func:`pypattern.sampling.estimate_llc` returns.

    ``llc_per_chain[c] = nbeta * (mean(loss_trace[c]) - init_loss)``; ``llc_mean`` and ``llc_std`` (ddof=1, as
    devinterp) are over chains; ``llc_trace = nbeta * (loss_trace - init_loss)``, ``(num_chains, num_draws)``.
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
        ax.set_title(title or f"LLC = {self.llc_mean:.3g} +- {self.llc_std:.2g} (R-hat {self.r_hat:.3f})")
        if len(self.loss_trace) <= 10:
            ax.legend(fontsize=7)
        return ax

    def __repr__(self) -> str:
        return (
            f"LLCResult(llc_mean={self.llc_mean:.6g}, llc_std={self.llc_std:.3g}, "
            f"num_chains={len(self.llc_per_chain)}, num_draws={self.loss_trace.shape[1]}, "
            f"r_hat={self.r_hat:.3f}, ess={self.ess:.1f})"
        )
