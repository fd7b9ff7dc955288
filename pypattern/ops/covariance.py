"""Streaming cross-covariance of two blocks of per-draw observables.

Draws arrive in chunks: ``a`` of shape ``(m, K)`` and ``b`` of shape ``(m, N)`` hold ``m`` draws of ``K`` and
``N`` observables (for susceptibilities: ``K`` component observables and ``N`` per-sample or per-token losses).
The accumulator keeps, all in float64 and of a size independent of the number of draws:

* ``count`` ``n`` (a Python int),
* ``shift_a`` ``(K,)``, ``shift_b`` ``(N,)``: the mean of the first non-empty chunk, subtracted from every later
  draw before anything else. Draws close to their shift then subtract exactly (Sterbenz), so inputs with a large
  mean and a tiny variance (``1e8 + 1e-3 * noise``) keep all their significant digits;
* ``mean_a`` ``(K,)``, ``mean_b`` ``(N,)``: the running means of the shifted draws;
* ``comoment`` ``(K, N)``: ``C_ab = sum_d (a_d - mean_a)(b_d - mean_b)^T``;
* optionally ``m2_a``, ``m2_b``: the auto co-moments, either their diagonals ``(K,)``/``(N,)`` (``"var"``,
  enough for correlations) or the full ``(K, K)``/``(N, N)`` matrices (``"full"``).

Chunk update (Welford/Chan): with the chunk's own mean ``ma`` (of its ``m`` shifted draws), its centred co-moment
``C_c = (a - ma)^T (b - mb)`` and ``delta_a = ma - mean_a``, ``delta_b = mb - mean_b``::

    C_ab   <- C_ab + C_c + (n m / (n + m)) delta_a delta_b^T
    mean_a <- mean_a + (m / (n + m)) delta_a          (and mean_b alike)
    n      <- n + m

Merging two accumulators (Chan, Golub and LeVeque's parallel formula) is the same update with the other
accumulator's ``(n, mean, C)`` in place of the chunk's, after moving its means to this one's shift; the result
equals a single pass over all draws up to rounding, so chains and ranks combine in any order.

:class:`CrossCovariance` wraps the state; it also gathers chunks of fewer than ``buffer_draws`` draws (one draw
at a time, typically) into a small float64 buffer, so that per-draw streaming runs as GEMMs too.

Results: ``cov = C_ab / (n - ddof)`` ``(K, N)``, the means, ``var``/``cov`` of each block and the Pearson
correlation ``C_ab / sqrt(diag(m2_a) diag(m2_b)^T)``.

Backends of :func:`cross_covariance_update_` (the chunk update; everything else is O(K N) torch):

* ``reference``: plain torch on the whole chunk (the specification).
* ``cpp``: row panels of 512 draws, each a full Chan update in one pass over the panel: cast to float64 (any
  dtype and strides), subtract the shift and the *running* mean, gather column sums (and sums of squares); the
  rank-one correction ``-(m^2 / (n + m)) delta_a delta_b^T`` rides in the same GEMM as one extra row, then one
  BLAS ``dgemm`` per panel (MKL through ATen). Workspace ``513 * (K + N)`` doubles, whatever the chunk size.
* ``triton``: the chunk means in torch; one kernel computes ``C_c`` tile by tile in float64 from the raw chunk
  (centring on load), adding the Chan term on the last step.
* ``cuda``: column-mean, tiled float64 co-moment (64 x 64 tiles, centring on load) and update kernels.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from .. import _backends

AutoMode = Literal["none", "var", "full"]
_AUTO_MODES = ("none", "var", "full")


def _auto_size(numel_dim: int, mode: str, device) -> torch.Tensor:
    if mode == "none":
        return torch.zeros(0, dtype=torch.float64, device=device)
    if mode == "var":
        return torch.zeros(numel_dim, dtype=torch.float64, device=device)
    return torch.zeros(numel_dim, numel_dim, dtype=torch.float64, device=device)


def cross_covariance_update_reference_(
    shift_a: torch.Tensor,
    shift_b: torch.Tensor,
    mean_a: torch.Tensor,
    mean_b: torch.Tensor,
    comoment: torch.Tensor,
    m2_a: torch.Tensor,
    m2_b: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    count: int,
) -> None:
    """Plain-torch specification of :func:`cross_covariance_update_` (inputs already validated)."""
    m = a.shape[0]
    if m == 0:
        return
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    if count == 0:
        shift_a.copy_(a64.mean(0))
        shift_b.copy_(b64.mean(0))
        mean_a.zero_()
        mean_b.zero_()
    da_rows, db_rows = a64 - shift_a, b64 - shift_b
    ma, mb = da_rows.mean(0), db_rows.mean(0)
    ac, bc = da_rows - ma, db_rows - mb
    n_new = count + m
    w = count * m / n_new
    delta_a, delta_b = ma - mean_a, mb - mean_b
    comoment += ac.T @ bc + w * torch.outer(delta_a, delta_b)
    for m2, xc, d in ((m2_a, ac, delta_a), (m2_b, bc, delta_b)):
        if m2.dim() == 1 and m2.numel() > 0:
            m2 += (xc * xc).sum(0) + w * d * d
        elif m2.dim() == 2:
            m2 += xc.T @ xc + w * torch.outer(d, d)
    mean_a += (m / n_new) * delta_a
    mean_b += (m / n_new) * delta_b


def _update_triton(shift_a, shift_b, mean_a, mean_b, comoment, m2_a, m2_b, a, b, count):
    from pypattern.kernels.covariance import comoment_update_triton_

    m = a.shape[0]
    if count == 0:
        shift_a.copy_(a.sum(0, dtype=torch.float64) / m)
        shift_b.copy_(b.sum(0, dtype=torch.float64) / m)
        mean_a.zero_()
        mean_b.zero_()
    ma = (a.to(torch.float64) - shift_a).sum(0) / m
    mb = (b.to(torch.float64) - shift_b).sum(0) / m
    n_new = count + m
    w = count * m / n_new
    delta_a, delta_b = ma - mean_a, mb - mean_b
    comoment_update_triton_(comoment, a, b, shift_a, ma, shift_b, mb, delta_a, delta_b, w)
    for m2, x, s, mx, d in ((m2_a, a, shift_a, ma, delta_a), (m2_b, b, shift_b, mb, delta_b)):
        if m2.dim() == 1 and m2.numel() > 0:
            xc = (x.to(torch.float64) - s) - mx
            m2 += (xc * xc).sum(0) + w * d * d
        elif m2.dim() == 2:
            comoment_update_triton_(m2, x, x, s, mx, s, mx, d, d, w)
    mean_a += (m / n_new) * delta_a
    mean_b += (m / n_new) * delta_b


def _check_chunk(a, b, k: int, n: int, device) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    for name, x, cols in (("a", a, k), ("b", b, n)):
        if x.dim() != 2 or x.shape[1] != cols:
            raise ValueError(f"{name} must have shape (draws, {cols}), got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} has dtype {x.dtype}; supported are torch.float32 and torch.float64")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the accumulator is on {device}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold the same number of draws, got {a.shape[0]} and {b.shape[0]}")


def _check_state(name: str, t: torch.Tensor, shape: tuple, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.float64:
        raise TypeError(f"{name} must be float64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the accumulator is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def cross_covariance_update_(
    shift_a: torch.Tensor,
    shift_b: torch.Tensor,
    mean_a: torch.Tensor,
    mean_b: torch.Tensor,
    comoment: torch.Tensor,
    m2_a: torch.Tensor,
    m2_b: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    count: int,
    backend: str | None = None,
) -> None:
    """Add one chunk of draws to an accumulator's state, in place (see the module docstring).

    Parameters
    ----------
    shift_a, mean_a : Tensor, shape ``(K,)``, float64
    shift_b, mean_b : Tensor, shape ``(N,)``, float64
        Set from the chunk when ``count == 0``.
    comoment : Tensor, shape ``(K, N)``, float64
    m2_a, m2_b : Tensor, float64
        Auto co-moments: shape ``(0,)`` (not tracked), ``(K,)``/``(N,)`` (diagonal) or ``(K, K)``/``(N, N)``.
    a : Tensor, shape ``(m, K)``
    b : Tensor, shape ``(m, N)``
        The chunk: float32 or float64, any strides, on the accumulator's device; ``m`` may be 0.
    count : int
        Number of draws already accumulated (the caller adds ``m`` to it).
    backend : {"cuda", "triton", "cpp", "reference"}, optional
        Force a backend (else ``PYPATTERN_BACKEND``, else the fastest available).
    """
    device = comoment.device
    if not isinstance(comoment, torch.Tensor) or comoment.dim() != 2:
        raise ValueError(f"comoment must be a 2-D tensor (K, N), got {getattr(comoment, 'shape', comoment)}")
    k, n = comoment.shape
    _check_chunk(a, b, k, n, device)
    _check_state("comoment", comoment, (k, n), device)
    for name, t, d in (
        ("shift_a", shift_a, k),
        ("mean_a", mean_a, k),
        ("shift_b", shift_b, n),
        ("mean_b", mean_b, n),
    ):
        _check_state(name, t, (d,), device)
    for name, t, d in (("m2_a", m2_a, k), ("m2_b", m2_b, n)):
        if tuple(t.shape) not in ((0,), (d,), (d, d)):
            raise ValueError(f"{name} must have shape (0,), ({d},) or ({d}, {d}), got {tuple(t.shape)}")
        _check_state(name, t, tuple(t.shape), device)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if a.shape[0] == 0:
        return
    name = _backends.choose("covariance_update_", device, backend)
    args = (shift_a, shift_b, mean_a, mean_b, comoment, m2_a, m2_b, a, b, count)
    if name == "reference":
        cross_covariance_update_reference_(*args)
    elif name == "triton":
        _update_triton(*args)
    else:
        _backends._load_c()
        torch.ops.pypattern.covariance_update_(*args)


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
        Where the state lives; chunks must be on this device.
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
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if track_auto not in _AUTO_MODES:
            raise ValueError(f"track_auto must be one of {_AUTO_MODES}, got {track_auto!r}")
        self.k, self.n, self.track_auto, self.backend = k, n, track_auto, backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
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
        _check_chunk(a, b, self.k, self.n, self.device)
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
        return self.comoment / torch.sqrt(torch.outer(va, vb))

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
        """Restore a state saved by :meth:`state_dict` (shapes and ``track_auto`` must match)."""
        for key in ("k", "n", "track_auto"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"state has {key}={state.get(key)!r} but this accumulator has {getattr(self, key)!r}"
                )
        for key, t in self._tensors().items():
            v = state[key]
            if tuple(v.shape) != tuple(t.shape):
                raise ValueError(f"state[{key!r}] has shape {tuple(v.shape)}, expected {tuple(t.shape)}")
            t.copy_(v.to(device=self.device, dtype=torch.float64))
        self._nbuf = 0
        self._count = int(state["count"])
        return self

    def __repr__(self) -> str:
        return (
            f"CrossCovariance(k={self.k}, n={self.n}, count={self.count}, track_auto={self.track_auto!r}, "
            f"device={self.device})"
        )
