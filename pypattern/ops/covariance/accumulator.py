"""The streaming cross-covariance accumulator: a float64 state of size independent of the number of draws,
updated chunk by chunk with :func:`~pypattern.ops.covariance.cross_covariance_update_`, and mergeable exactly."""

from __future__ import annotations

import numbers
import warnings
from typing import Literal

import torch

from ... import _backends
from .op import check_chunk, cross_covariance_update_

AutoMode = Literal["none", "var", "full"]
_AUTO_MODES = ("none", "var", "full")


def _state_count(count) -> int:
    """A saved ``count``: an int >= 0 (a Python or NumPy integer, or an integer tensor of one element), not a bool
    and not a float (a fractional count is no number of draws; truncating it would hide a damaged state)."""
    if isinstance(count, torch.Tensor):
        if count.numel() != 1 or count.dtype == torch.bool or count.is_floating_point() or count.is_complex():
            raise ValueError(
                f"state['count'] is a tensor of dtype {count.dtype} and shape {tuple(count.shape)}; a count of draws "
                "is an int >= 0"
            )
        count = int(count.reshape(()).item())
    elif isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise ValueError(
            f"state['count'] is {count!r} ({type(count).__name__}); a count of draws is an int >= 0"
        )
    count = int(count)
    if count < 0:
        raise ValueError(f"state['count'] is {count}; a count of draws is an int >= 0")
    return count


def _tensor_device(device) -> torch.device:
    """The device that tensors made on ``device`` report, which chunks are compared with: ``"cpu:0"`` is ``cpu``,
    ``"cuda"`` the current CUDA device ``cuda:<index>`` (where the state is allocated)."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device={device!r} is not a torch device ('cpu', 'cuda', 'cuda:0', ...): {e}"
        ) from None
    return torch.empty(0, device=device).device


def _auto_size(numel_dim: int, mode: str, device) -> torch.Tensor:
    if mode == "none":
        return torch.zeros(0, dtype=torch.float64, device=device)
    if mode == "var":
        return torch.zeros(numel_dim, dtype=torch.float64, device=device)
    return torch.zeros(numel_dim, numel_dim, dtype=torch.float64, device=device)


class CrossCovariance:
    """Streaming cross-covariance ``Cov(a, b)`` of two blocks of observables, with exact merging.

    Memory is ``O(K N)`` (plus ``O(K^2 + N^2)`` with ``track_auto="full"``), independent of the number of draws.
    Sums are kept in float64 after subtracting a per-column shift (see :mod:`pypattern.ops.covariance`).

    Parameters
    ----------
    k, n : int
        Number of columns of ``a`` and of ``b``.
    track_auto : {"none", "var", "full"}
        Also accumulate the variances (``"var"``: needed by :meth:`corr` and :meth:`var_a`) or the full
        auto-covariances of ``a`` and ``b`` (``"full"``: :meth:`cov_aa`, :meth:`cov_bb`).
    device : torch.device or str, optional
        Where the state lives (default CPU); chunks must be on this device. A device without an index is the
        current one of its type (``"cuda"`` is ``cuda:<torch.cuda.current_device()>`` when the accumulator is
        built), and :attr:`device` reports it as tensors do.
    backend : str, optional
        Backend of the chunk update (see :func:`cross_covariance_update_`).
    buffer_draws : int
        Chunks of fewer draws are gathered (exactly, in float64) into a buffer of this many draws before the
        update, so that one draw at a time still runs as a GEMM; ``0`` updates at once. Memory
        ``buffer_draws * (K + N)`` doubles.

    Examples
    --------
    >>> acc = CrossCovariance(3, 5)
    >>> for _ in range(10):
    ...     acc.update(torch.randn(100, 3), torch.randn(100, 5))
    >>> acc.cov().shape
    torch.Size([3, 5])
    """

    def __init__(
        self,
        k: int,
        n: int,
        *,
        track_auto: AutoMode = "var",
        device: torch.device | str | None = None,
        backend: str | None = None,
        buffer_draws: int = 64,
    ) -> None:
        for name, v in (("k", k), ("n", n), ("buffer_draws", buffer_draws)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        k, n, buffer_draws = int(k), int(n), int(buffer_draws)
        if track_auto not in _AUTO_MODES:
            raise ValueError(f"track_auto must be one of {_AUTO_MODES}, got {track_auto!r}")
        self.k, self.n, self.track_auto, self.backend = k, n, track_auto, backend
        self.device = _tensor_device(device)
        if self.device.type == "meta":
            raise ValueError(
                "device='meta': the accumulator holds values (sums of the draws); give a device with data"
            )
        if backend is not None:
            _backends.choose("covariance_update_", self.device, backend)  # fail early on a bad choice
        f64 = dict(dtype=torch.float64, device=self.device)
        self._count = 0  # draws in the state (buffered ones not included)
        self.buffer_draws = buffer_draws
        self._buf_a = torch.zeros(buffer_draws if k * n else 0, k, **f64)
        self._buf_b = torch.zeros(buffer_draws if k * n else 0, n, **f64)
        self._nbuf = 0
        self.shift_a, self.shift_b = torch.zeros(k, **f64), torch.zeros(n, **f64)
        self.mean_a_rel, self.mean_b_rel = torch.zeros(k, **f64), torch.zeros(n, **f64)
        self.comoment = torch.zeros(k, n, **f64)
        self.m2_a = _auto_size(k, track_auto, self.device)
        self.m2_b = _auto_size(n, track_auto, self.device)

    # ------------------------------------------------------------------ accumulation
    @property
    def count(self) -> int:
        """Number of draws added so far."""
        return self._count + self._nbuf

    def update(self, a: torch.Tensor, b: torch.Tensor) -> CrossCovariance:
        """Add a chunk of draws: ``a`` ``(m, K)`` and ``b`` ``(m, N)`` (or one draw as ``(K,)`` and ``(N,)``).

        Chunks smaller than ``buffer_draws`` are copied (as float64, exactly) into a buffer that is folded into
        the state when full, so that per-draw updates run as GEMMs too.
        """
        if isinstance(a, torch.Tensor) and a.dim() == 1:
            a = a.unsqueeze(0)
        if isinstance(b, torch.Tensor) and b.dim() == 1:
            b = b.unsqueeze(0)
        check_chunk(a, b, self.k, self.n, self.device)
        a, b = a.detach(), b.detach()  # draws are data: the running sums never join an autograd graph
        m = int(a.shape[0])
        if m == 0:
            return self
        cap = self._buf_a.shape[0]
        if m >= cap:
            self.flush()
            self._apply(a, b)
            return self
        if self._nbuf + m > cap:
            self.flush()
        self._buf_a[self._nbuf : self._nbuf + m].copy_(a)
        self._buf_b[self._nbuf : self._nbuf + m].copy_(b)
        self._nbuf += m
        if self._nbuf == cap:
            self.flush()
        return self

    def _apply(self, a: torch.Tensor, b: torch.Tensor) -> None:
        cross_covariance_update_(
            self.shift_a,
            self.shift_b,
            self.mean_a_rel,
            self.mean_b_rel,
            self.comoment,
            self.m2_a,
            self.m2_b,
            a,
            b,
            count=self._count,
            backend=self.backend,
        )
        self._count += int(a.shape[0])

    def flush(self) -> CrossCovariance:
        """Fold the buffered draws into the state (done automatically before any result is read)."""
        if self._nbuf:
            n, self._nbuf = self._nbuf, 0
            self._apply(self._buf_a[:n], self._buf_b[:n])
        return self

    def merge(self, other: CrossCovariance) -> CrossCovariance:
        """Add another accumulator's draws to this one, exactly (Chan et al.); ``other`` is not changed."""
        if not isinstance(other, CrossCovariance):
            raise TypeError(f"other must be a CrossCovariance, got {type(other).__name__}")
        if (other.k, other.n) != (self.k, self.n):
            raise ValueError(f"other has shape (k, n) = {(other.k, other.n)}, this one {(self.k, self.n)}")
        if other.track_auto != self.track_auto:
            raise ValueError(f"other tracks track_auto={other.track_auto!r}, this one {self.track_auto!r}")
        self.flush()
        other.flush()
        if other.count == 0:
            return self
        o = {k: v.to(self.device) for k, v in other._tensors().items()}
        if self.count == 0:
            for key, v in o.items():
                getattr(self, key).copy_(v)
            self._count = other.count
            return self
        n1, n2 = self.count, other.count
        n_new = n1 + n2
        w = n1 * n2 / n_new
        d_a = (o["mean_a_rel"] + (o["shift_a"] - self.shift_a)) - self.mean_a_rel
        d_b = (o["mean_b_rel"] + (o["shift_b"] - self.shift_b)) - self.mean_b_rel
        self.comoment += o["comoment"] + w * torch.outer(d_a, d_b)
        for m2, om2, d in ((self.m2_a, o["m2_a"], d_a), (self.m2_b, o["m2_b"], d_b)):
            if m2.dim() == 1 and m2.numel() > 0:
                m2 += om2 + w * d * d
            elif m2.dim() == 2:
                m2 += om2 + w * torch.outer(d, d)
        self.mean_a_rel += (n2 / n_new) * d_a
        self.mean_b_rel += (n2 / n_new) * d_b
        self._count = n_new
        return self

    def all_reduce(self, group=None) -> CrossCovariance:
        """Merge the accumulators of every rank of ``torch.distributed`` (each rank ends with the total).

        Gathers each rank's state (``O(world_size * K * N)`` transient memory) and merges in rank order.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        states = [None] * world
        dist.all_gather_object(states, self.state_dict(), group=group)
        total = CrossCovariance(
            self.k, self.n, track_auto=self.track_auto, device=self.device, backend=self.backend
        )
        for s in states:
            part = CrossCovariance(self.k, self.n, track_auto=self.track_auto, device=self.device)
            part.load_state_dict(s)
            total.merge(part)
        self.load_state_dict(total.state_dict())
        return self

    # ------------------------------------------------------------------ results
    def _denominator(self, ddof: int) -> float:
        if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
            raise ValueError(f"ddof must be an int >= 0, got {ddof!r}")
        self.flush()
        den = self.count - ddof
        if den <= 0:
            warnings.warn(f"CrossCovariance: count - ddof = {den} <= 0; the covariance is NaN", stacklevel=3)
            return float("nan")
        return float(den)

    @property
    def mean_a(self) -> torch.Tensor:
        """Mean of ``a`` over the draws, ``(K,)`` float64 (zeros before the first draw)."""
        self.flush()
        return self.shift_a + self.mean_a_rel

    @property
    def mean_b(self) -> torch.Tensor:
        """Mean of ``b`` over the draws, ``(N,)`` float64."""
        self.flush()
        return self.shift_b + self.mean_b_rel

    def cov(self, ddof: int = 1) -> torch.Tensor:
        """``Cov(a, b)``, shape ``(K, N)``, float64: ``comoment / (count - ddof)`` (``ddof=1``: unbiased)."""
        return self.comoment / self._denominator(ddof)

    def _need(self, *modes: str) -> None:
        if self.track_auto not in modes:
            raise RuntimeError(
                f"this needs track_auto in {modes}, but the accumulator was built with track_auto={self.track_auto!r}"
            )

    def var_a(self, ddof: int = 1) -> torch.Tensor:
        """Variances of the columns of ``a``, ``(K,)`` (needs ``track_auto`` ``"var"`` or ``"full"``)."""
        self._need("var", "full")
        d = self.m2_a if self.m2_a.dim() == 1 else torch.diagonal(self.m2_a)
        return d / self._denominator(ddof)

    def var_b(self, ddof: int = 1) -> torch.Tensor:
        """Variances of the columns of ``b``, ``(N,)`` (needs ``track_auto`` ``"var"`` or ``"full"``)."""
        self._need("var", "full")
        d = self.m2_b if self.m2_b.dim() == 1 else torch.diagonal(self.m2_b)
        return d / self._denominator(ddof)

    def cov_aa(self, ddof: int = 1) -> torch.Tensor:
        """``Cov(a, a)``, ``(K, K)`` (needs ``track_auto="full"``)."""
        self._need("full")
        return self.m2_a / self._denominator(ddof)

    def cov_bb(self, ddof: int = 1) -> torch.Tensor:
        """``Cov(b, b)``, ``(N, N)`` (needs ``track_auto="full"``)."""
        self._need("full")
        return self.m2_b / self._denominator(ddof)

    def corr(self) -> torch.Tensor:
        """Pearson correlation of each column of ``a`` with each column of ``b``, ``(K, N)``.

        NaN where a column has zero variance (as :func:`numpy.corrcoef`). Needs ``track_auto`` ``"var"`` or
        ``"full"``.
        """
        self._need("var", "full")
        self.flush()
        va = self.m2_a if self.m2_a.dim() == 1 else torch.diagonal(self.m2_a)
        vb = self.m2_b if self.m2_b.dim() == 1 else torch.diagonal(self.m2_b)
        denom = torch.sqrt(torch.outer(va, vb))
        # a zero-variance column is NaN whatever rounding residue its co-moment holds (the fused kernel's
        # centring on the running mean can leave one of order 1e-47)
        return torch.where(denom > 0, self.comoment / denom, torch.full_like(denom, float("nan")))

    # ------------------------------------------------------------------ checkpoints
    def _tensors(self) -> dict[str, torch.Tensor]:
        self.flush()
        return {
            "shift_a": self.shift_a,
            "shift_b": self.shift_b,
            "mean_a_rel": self.mean_a_rel,
            "mean_b_rel": self.mean_b_rel,
            "comoment": self.comoment,
            "m2_a": self.m2_a,
            "m2_b": self.m2_b,
        }

    def state_dict(self) -> dict[str, object]:
        """Copy of the state (CPU tensors and ints): restore with :meth:`load_state_dict` or ``torch.save``."""
        out: dict[str, object] = {k: v.detach().cpu().clone() for k, v in self._tensors().items()}
        out.update(count=self.count, k=self.k, n=self.n, track_auto=self.track_auto)
        return out

    def load_state_dict(self, state: dict[str, object]) -> CrossCovariance:
        """Restore a state saved by :meth:`state_dict` (shapes and ``track_auto`` must match).

        Every entry is checked before anything is copied: a refused state leaves the accumulator as it was.
        """
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict saved by CrossCovariance.state_dict(), got {type(state).__name__}"
            )
        for key in ("k", "n", "track_auto"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"state has {key}={state.get(key)!r} but this accumulator has {getattr(self, key)!r}"
                )
        mine = self._tensors()
        missing = [key for key in (*mine, "count") if key not in state]
        if missing:
            raise ValueError(f"state lacks {missing}: give a dict saved by CrossCovariance.state_dict()")
        count = _state_count(state["count"])
        for key, t in mine.items():
            v = state[key]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state[{key!r}] must be a tensor, got {type(v).__name__}")
            if tuple(v.shape) != tuple(t.shape):
                raise ValueError(f"state[{key!r}] has shape {tuple(v.shape)}, expected {tuple(t.shape)}")
            if v.dtype != torch.float64:
                raise TypeError(
                    f"state[{key!r}] has dtype {v.dtype}, expected torch.float64 (the accumulator's sums are "
                    "float64; a state in another dtype was not saved by CrossCovariance.state_dict())"
                )
        for key, t in mine.items():
            t.copy_(state[key].to(device=self.device))
        self._nbuf = 0
        self._count = count
        return self

    def __repr__(self) -> str:
        return (
            f"CrossCovariance(k={self.k}, n={self.n}, count={self.count}, track_auto={self.track_auto!r}, "
            f"device={self.device})"
        )
