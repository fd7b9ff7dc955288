"""The exact patching engine for :class:`pypattern.models.Transformer`, on every architecture it represents.

In a causal model a patch at (layer L, position p) can change only layers >= L at positions >= p. The engine
caches the unpatched target run (every activation, including attention keys and values), then for each cell
recomputes only what the patch can change:

- rows (positions) ``p .. m`` where ``m`` is the metric's position; positions after ``m`` are never computed,
  and in the last block only the metric's row (its query, attention, MLP and unembedding) is computed;
- at the patched layer only what the site feeds: a patch of ``z`` at (L, h, p) changes ``attn_out``, the MLP and
  the residual at row p only (one head's ``W_O`` slice, as a delta on the cached ``attn_out``); a patch of
  ``k``/``v`` recomputes the attention of the query heads that read that key/value head; a patch of ``resid_pre``
  computes q, k, v of one row;
- keys and values of positions < p come from the cache.

Every piece of arithmetic is the model's own (:meth:`Attention.compute_q` and its kin, with the weights laid out
once per call by :meth:`Transformer.fixed_weights`, :meth:`Attention.rotate`, :meth:`Attention.attn_mask`, the norms, :meth:`MLP.hidden`/:meth:`MLP.output`,
:meth:`TransformerBlock.combine`, the unembedding), applied to the rows that change:

- **Rotary positions**: the cache holds the *rotated* keys (``hook_rot_k``) and queries (``hook_rot_q``) at their
  own positions; recomputed queries and keys are rotated at their absolute positions. The ``q`` and ``k`` sites
  are ``hook_q``/``hook_k``, before the rotation (TransformerLens' convention): a patched query or key is rotated
  at the position it is patched into.
- **Grouped-query attention** (``n_key_value_heads < n_heads``): a ``k`` or ``v`` cell's head is a *key/value*
  head ``g`` (``0 .. n_key_value_heads - 1``; ``hook_k``/``hook_v`` have that many heads, and TransformerLens
  patches them the same way); patching it changes the attention of every query head that reads it (``g *
  n_groups .. (g + 1) * n_groups - 1``). ``q``, ``z`` and ``pattern`` cells are query heads.
- **Parallel attention and MLP** (GPT-NeoX): both read ``resid_pre``, so a patch of a head's output, of
  ``attn_out`` or of ``mlp_out`` leaves the other branch's cached output valid; there is no ``resid_mid`` site.
- **Sliding-window attention**: the model's own mask (:meth:`Attention.attn_mask`) on every recomputed score.
- **Attention masks** (``attention_mask``, ``position_ids``: padded prompts, left padding included): each
  recomputed score is computed as :meth:`Transformer.forward` computes it given the same mask and positions.
  Padding keys are masked out of every query's softmax on top of the causal and sliding-window masks (which read
  the columns, as the forward's do); a query left with no key (a padding row before its example's first real
  token) gets a pattern of zeros (:meth:`Attention.dead_queries`); rotary queries and keys are rotated, and ALiBi
  biases taken, at each example's ``position_ids``, not at the columns. Learned positions are in the cached
  residuals. The C++ prefix-attention kernel takes one mask for every example, so under a mask with padding the
  attention runs as batched products. Without a mask (or one of real tokens only, and positions ``0 .. T - 1``)
  nothing of this runs.

Cells that start at the same position are batched together (at most ``max_batch`` cells per batch): they share
the row range and run as one batch through the blocks (cells join the batch at their own layer). Batches of
several positions run together, layer by layer, as long as their rows (cells x positions) stay within those of one
full batch over every position. Each block runs over chunks of at most ``CHUNK_ROWS`` rows, so that its
temporaries stay in cache, and writes the residual into one of two buffers per batch; a chunk takes the cells of
several batches when those are few: the norms, the projections, the output projection and the MLP are row-wise, so
they run over the rows of all of them as one product per weight, and only the attention runs per batch (queries,
keys and values laid out head-major once, :meth:`ExactEngine._attend`). Cells entering a block at one position
(``resid_pre``) are finished together the same way. What a single-position cell computes at its own layer from the
patched row alone (``resid_pre``: that row's query, key and value; ``attn_out``/``resid_mid``: the row's MLP) is
computed for all positions of a layer in one pass before the batches run. The final rows of several batches
(about :attr:`ExactEngine.UNEMBED_ROWS`) are unembedded together (:func:`unembed_rows`).
"""

from __future__ import annotations

import torch

from .. import _backends
from .._memory import keep_freed_heap
from ..ops.attention import prefix_attention
from .sites import HEAD_SITES, KV_SITES, Cell, check_site, hook_name

__all__ = [
    "ExactEngine",
    "bytes_per_cell",
    "cells_that_fit",
    "engine_bytes",
    "metric_of_rows",
    "truncate_cache",
    "unembed_product",
    "unembed_rows",
]


def unembed_rows(model, x: torch.Tensor, metric=None) -> torch.Tensor:
    """The model's unembedding of ``x (..., d_model)`` (after the final norm): ``(..., d_vocab)``, by
    :func:`unembed_product`; the result is made contiguous unless ``metric`` is one of the library's metrics (which
    read any layout)."""
    from .metrics import Metric

    un = model.unembed
    W_U = getattr(un, "W_U", None)
    if W_U is None or not isinstance(W_U, torch.Tensor):  # an unembedding without a weight matrix
        return un(x)
    out = unembed_product(x.reshape(-1, x.shape[-1]), W_U)
    if getattr(un, "b_U", None) is not None:
        out = out + un.b_U
    if hasattr(un, "cap"):
        out = un.cap(out)  # the division by logits_scaling and the final soft cap (identity without them)
    if not isinstance(metric, Metric):
        out = out.contiguous()
    return out.reshape(*x.shape[:-1], W_U.shape[-1])  # a view: splits the row axis only


#: at most this many rows are unembedded as ``h @ W_U``; more as ``(W_U^T h^T)^T``
_FEW_ROWS = 8
#: from this many rows on, oneDNN's matmul where the process uses it for fixed weights
_ONEDNN_ROWS = 4


def unembed_product(h: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """``h (rows, d_model) @ W_U (d_model, d_vocab)`` in the form that is fast for its shape: oneDNN's matmul
    reading ``W_U`` in place for four rows or more, where the process uses oneDNN for fixed weights
    (:func:`~pypattern.models.packed.packed_gemm_enabled`; float32 CPU operands, no gradient into ``W_U``); else
    ``h @ W_U`` for a few rows and ``(W_U^T h^T)^T`` (a transposed view) for more. Over a vocabulary of 50,257
    on one AMD EPYC core, MKL's ``(W_U^T h^T)^T`` took 166-262 ms for 2-8 rows against 15-27 ms for ``h @ W_U``
    and 17-19 ms for oneDNN, and from about 16 rows ``h @ W_U`` is the slowest of the three (``bench/
    bench_unembed.py``, docs/benchmarks.md)."""
    from ..models.packed import PackedWeights

    rows = h.shape[0]
    grad_in = torch.is_grad_enabled() and h.requires_grad  # oneDNN's product has no backward
    if rows >= _ONEDNN_ROWS and not grad_in and PackedWeights.applies(h, W_U, None):
        w = PackedWeights.in_place(W_U)
        if w is not None:
            return PackedWeights.product(h, w, None)
    if rows <= _FEW_ROWS:
        return h @ W_U
    return (W_U.T @ h.T).T


def metric_of_rows(model, x: torch.Tensor, metric) -> torch.Tensor:
    """The metric of final-norm rows ``x (..., batch, d_model)``: from the columns it reads when it can
    (:meth:`~pypattern.patching.LogitDiff.of_rows`), else from the full logits (:func:`unembed_rows`)."""
    of_rows = getattr(metric, "of_rows", None)
    out = of_rows(model, x) if callable(of_rows) else None
    return metric(unembed_rows(model, x, metric)) if out is None else out


#: vocabulary-sized tensors per row assumed for the logits and a metric whose temporaries cannot be counted
#: (:func:`new_bytes` fails on it); -KL makes about ten
FALLBACK_VOCAB_COPIES = 12


def new_bytes(fn) -> int | None:
    """Bytes of the tensors that the torch operations of ``fn()`` make: every result whose storage is not one of
    the operation's inputs' (views and in-place results are not counted), as if none were freed, so an upper bound
    of the peak of what ``fn`` allocates; None when ``fn`` raises (under the counting, which a metric that leaves
    torch may not support)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {
                t.untyped_storage().data_ptr()
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                    self.total += t.untyped_storage().nbytes()
            return out

    try:
        with _Count() as c:
            fn()
    except Exception:
        return None
    return int(c.total)


def metric_row_bytes(model, x: torch.Tensor, metric) -> int:
    """Bytes per example row of :func:`metric_of_rows` on final-norm rows ``x (B, d_model)``: the logits over the
    vocabulary, the unembedding's and the metric's temporaries (:func:`new_bytes`; nothing vocabulary-sized for a
    metric that reads a few columns, :meth:`~pypattern.patching.LogitDiff.of_rows`), at least one row of logits
    when they cannot be counted (:data:`FALLBACK_VOCAB_COPIES` of them)."""
    B = x.shape[0]
    with torch.no_grad():
        got = new_bytes(lambda: metric_of_rows(model, x[None], metric))
    if got is None:
        item = max(x.element_size(), 4)  # a 16-bit model's metric is computed in float32
        return FALLBACK_VOCAB_COPIES * model.cfg.d_vocab * item
    return -(-got // max(B, 1))


def engine_bytes(
    cfg, batch: int, seq_len: int, cells: int = 1, site: str | None = None, dtype: torch.dtype | None = None
) -> int:
    """Working memory of :class:`ExactEngine` running batches of ``cells`` cells on prompts ``(batch, seq_len)``,
    an upper bound of the tensors it holds at once (the logits over the vocabulary and the metric's temporaries
    come at the end of a batch and are counted apart, :func:`metric_row_bytes`; the cached runs come on top).

    With ``R = batch * seq_len`` rows per cell and ``c`` the item size:

    - the residual of the cells, in two buffers: ``2 cells R d_model c``;
    - one chunk's temporaries, over ``min(cells R, max(CHUNK_ROWS, R))`` rows, those of the attention or of the
      MLP at once: the residual, its norm and the branch's output (``3 d_model``), the queries or z
      (``n_heads d_head``), and the larger of the MLP's hidden activations (``2 d_mlp``, ``3 d_mlp`` when gated)
      and the scores and pattern (``2 n_heads seq_len``) per row;
    - the chunk's keys and values, repeated per cell: ``2 n_key_value_heads d_head seq_len c`` per example
      and cell, over at most ``min(cells batch, max(CHUNK_ROWS, batch))`` of them;
    - the target run's keys and values laid out head-major, and what the cells of a single position compute at
      their own layer (``resid_pre``: that row's query, key and value; ``attn_out``/``resid_mid``: the residual
      after the block), for every layer.

    Against the peak of the tensors the engine makes, measured op by op on small models (d_model 64-128) over
    every site, per position and over all positions, this is an upper bound, 1.1-1.7x that peak for batches
    over the first positions (up to about 2.4x on grids whose later positions hold fewer rows;
    ``tests/test_patching_audit_memory.py``).

    Parameters
    ----------
    cfg : TransformerConfig
    batch, seq_len : int
        Prompts ``(batch, seq_len)`` (after truncation at the metric position).
    cells : int
        Cells per engine batch.
    site : str, optional
        The patched site (``resid_pre``, ``attn_out`` and ``resid_mid`` keep per-layer rows); None counts them.
    dtype : torch.dtype, optional
        Default ``cfg.dtype``.
    """
    item = torch.empty((), dtype=dtype or cfg.dtype, device="cpu").element_size()
    d, H, Hkv, dh, L = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.n_layers
    cells, R = max(1, int(cells)), int(batch) * int(seq_len)
    mlp = 0 if cfg.attn_only else (3 if cfg.gated_mlp else 2) * cfg.d_mlp
    per_row = 3 * d + H * dh + max(mlp, 2 * H * seq_len)
    chunk_rows = min(cells * R, max(ExactEngine.CHUNK_ROWS, R))
    key_rows = min(cells * int(batch), max(ExactEngine.CHUNK_ROWS, int(batch)))
    total = 2 * cells * R * d + chunk_rows * per_row + key_rows * 2 * Hkv * dh * seq_len
    total += L * 2 * R * Hkv * dh  # the cached keys and values, head-major
    if site is None or site == "resid_pre":
        total += L * R * (H + 2 * Hkv) * dh
    if site is None or site in ("attn_out", "resid_mid"):
        total += L * R * d
    return int(total * item)


def bytes_per_cell(cfg, batch: int, seq_len: int, dtype: torch.dtype | None = None) -> int:
    """Working memory of an engine batch of one cell: :func:`engine_bytes` with ``cells=1`` (every site's
    per-layer rows counted); a batch of ``n`` cells takes :func:`engine_bytes` with ``cells=n``, less than ``n``
    times this (a chunk's temporaries and the cached layouts are shared by the cells).

    Parameters
    ----------
    cfg : TransformerConfig
    batch, seq_len : int
        Prompts ``(batch, seq_len)`` (after truncation at the metric position).
    dtype : torch.dtype, optional
        Default ``cfg.dtype``.
    """
    return engine_bytes(cfg, batch, seq_len, 1, None, dtype)


def cells_that_fit(
    cfg, batch: int, seq_len: int, max_memory: float, site=None, dtype=None, extra=None
) -> int:
    """The most cells per engine batch whose :func:`engine_bytes` (plus ``extra(cells)`` bytes, when given) stays
    within ``max_memory`` bytes; 0 when not even one cell does."""

    def need(c: int) -> int:
        return engine_bytes(cfg, batch, seq_len, c, site, dtype) + (0 if extra is None else extra(c))

    if need(1) > max_memory:
        return 0
    lo, hi = 1, 2
    while need(hi) <= max_memory and hi < 2**40:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # need(lo) fits, need(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= max_memory else (lo, mid)
    return lo


class _Patch:
    """Patch info for a batch of ``C`` cells at one layer: ``active (C,)``, ``heads (C,)`` (query heads, or
    key/value heads for ``k``/``v``), the position (-1: all) and the layer."""

    def __init__(
        self, site: str, layer: int, active: torch.Tensor, heads: torch.Tensor | None, pos: int
    ) -> None:
        self.site, self.layer, self.active, self.heads, self.pos = site, layer, active, heads, pos


class ExactEngine:
    """Batched exact patching on a :class:`~pypattern.models.Transformer`.

    Parameters
    ----------
    model : Transformer
    target_cache : dict
        The target run's activations (every hook of every block) on the truncated prompts ``(batch, T)``.
    source : dict
        Source activations by hook name, ``(batch, T, ...)`` (``pattern``: ``(batch, heads, T, T)``).
    site : str
    metric : callable ``(logits (..., batch, vocab)) -> (..., batch)``
    position : int or LongTensor ``(batch,)``
        Metric position(s), non-negative, ``< T``.
    max_batch : int, optional
        At most this many cells per batch (bounds the working memory: see :func:`bytes_per_cell`); default all
        cells that start at the same position.
    max_pack_bytes : int, optional
        Bytes of weights packed for oneDNN's matmul that :meth:`run` may hold
        (:meth:`Transformer.fixed_weights <pypattern.models.Transformer.fixed_weights>`); 0 (default): none, None:
        no bound.
    max_memory : int, optional
        Bytes of working memory a batch may take (:meth:`memory_estimate`: :func:`engine_bytes` and the logits
        over the vocabulary with the metric's temporaries, :func:`metric_row_bytes`, measured once on the target
        run's rows): ``max_batch`` is lowered so that one batch fits, and fewer than :attr:`UNEMBED_ROWS` rows are
        unembedded together when those would not. None (default): no
        bound beyond ``max_batch``. A budget below one cell's working memory (:meth:`memory_estimate`) runs one
        cell per batch and sets :attr:`budget_too_small`.
    warn_budget : bool
        Warn (``RuntimeWarning``) when ``max_memory`` is below one cell's working memory (default True).
    attention_mask : BoolTensor ``(batch, T')``, optional
        The mask the cached runs were made with (True or 1: a real token; ``T' >= T``, cut to the first ``T``
        positions), as :meth:`Transformer.forward <pypattern.models.Transformer.forward>` takes it: every cell is
        computed as the forward with this mask computes it. None, or a mask of real tokens only: no mask.
    position_ids : LongTensor ``(batch, T')``, optional
        The positions the cached runs' rotary angles and ALiBi biases read (``T' >= T``); default the columns.
    """

    #: rows (cells x examples x positions) that one block processes at a time: the activations of a chunk stay
    #: in cache between its passes (a block over a whole batch of cells moves each temporary through memory)
    CHUNK_ROWS = 1024

    def __init__(
        self,
        model,
        target_cache: dict,
        source: dict,
        site: str,
        metric,
        position,
        max_batch: int | None = None,
        max_pack_bytes: int | None = 0,
        max_memory: int | None = None,
        warn_budget: bool = True,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        from .._checks import is_count, is_real

        self.model, self.cfg = model, model.cfg
        self.max_pack_bytes = max_pack_bytes
        self.tc, self.src, self.site, self.metric = target_cache, source, site, metric
        cfg = self.cfg
        self.H, self.Hkv, self.G = cfg.n_heads, cfg.n_key_value_heads, cfg.n_groups
        self.dh, self.d = cfg.d_head, cfg.d_model
        self.L = cfg.n_layers
        self.attn_only = cfg.attn_only
        self.parallel = cfg.parallel_attn_mlp and not cfg.attn_only
        check_site(cfg, site)
        keep_freed_heap()
        if max_batch is not None and (not is_count(max_batch) or max_batch < 1):
            raise ValueError(f"max_batch={max_batch!r} is not valid; give a positive int or None")
        if max_memory is not None and (not is_real(max_memory) or not 0 < max_memory < float("inf")):
            raise ValueError(
                f"max_memory={max_memory!r} is not valid; give a finite positive number of bytes or None"
            )
        self.max_batch = None if max_batch is None else int(max_batch)
        self._flush_rows = None  # rows unembedded together, when max_memory lowers UNEMBED_ROWS
        self._row: int | None = None  # bytes per row of logits and metric temporaries (_row_bytes)
        self._warn_budget = bool(warn_budget)
        #: True when ``max_memory`` is below the working memory of one cell (one cell per batch runs anyway)
        self.budget_too_small = False
        self.uniform = isinstance(position, int)
        self.m = position
        x = target_cache["blocks.0.hook_resid_pre"]
        self.B, self.T = x.shape[0], x.shape[1]
        self.dtype = x.dtype
        # every index, mask and buffer the engine makes lives on the device of the activations (the model's)
        self.device = x.device
        # positions 0 .. T - 1 (and head indices), made once: the engine's row, key and head ranges are slices of it
        self._ar = torch.arange(max(self.T, self.H, self.Hkv, self.G), device=self.device)
        # per-example metric positions as a gather index, on the activations' device
        self._m_idx = None if self.uniform else position.to(self.device)
        if self.uniform and position != self.T - 1:
            raise ValueError(
                f"position={position}: truncate the prompts so that the metric position is the last"
            )
        # the padding mask (B, T) (True: a real token) and the positions (B, T) rotary angles and ALiBi biases
        # read, None without padding and at the columns 0 .. T - 1 (the unmasked code path)
        self._keep = self._masking_input(attention_mask, "attention_mask", torch.bool)
        if self._keep is not None and bool(self._keep.all()):
            self._keep = None
        self._pos_ids = self._masking_input(position_ids, "position_ids", torch.long)
        if self._pos_ids is not None and self._keep is None:
            if torch.equal(self._pos_ids, self._range(0, self.T).expand(self.B, -1)):
                self._pos_ids = None
        self.tgt = [self._layer_cache(i) for i in range(self.L)]
        # what a cell at a single position computes at its own layer (_entry_rows; resid_pre: the patched row's
        # rotated query, key and value), per (layer, first position of a tile of positions), kept across runs
        self._entry_kept: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        # the run's cells' entries: per layer and position, (index of the position in its tile, the tile's rows)
        self._entry: dict[int, dict[int, tuple[int, tuple[torch.Tensor, ...]]]] = {}
        # the cached keys and values laid out head-major per layer (_cached_kv), made during a run
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # whether prefix_attention's C++ kernel runs the attention (decided on first use: _kernel_scale)
        self._kernel: bool | None = None
        if max_memory is not None:
            self._fit_logits(float(max_memory))

    def _row_bytes(self) -> int:
        """Bytes per row of the logits and the metric's temporaries (:func:`metric_row_bytes`, counted once on the
        target run's final rows)."""
        if self._row is None:
            with torch.no_grad():
                x = self._final_rows(self.tgt[-1]["resid_post"].unsqueeze(0), 0)[0]
                self._row = max(1, metric_row_bytes(self.model, x, self.metric))
        return self._row

    def memory_estimate(self, cells: int | None = None, grid_cells: int | None = None) -> int:
        """Bytes of working memory of a batch of ``cells`` cells (default :attr:`max_batch`; 1 without one):
        :func:`engine_bytes` and the logits and metric temporaries of the rows unembedded at once (the rows
        gathered before an unembedding, fewer than :attr:`UNEMBED_ROWS`, and the last batch's; at most those of
        ``grid_cells`` cells, the cells of the run, when given). The cached runs (``target_cache``, ``source``)
        come on top."""
        c = max(1, int(cells if cells is not None else self.max_batch or 1))
        flush = self.UNEMBED_ROWS if self._flush_rows is None else min(self.UNEMBED_ROWS, self._flush_rows)
        rows = flush - 1 + c * self.B
        if grid_cells is not None:
            rows = min(rows, max(c, int(grid_cells)) * self.B)
        cells_part = engine_bytes(self.cfg, self.B, self.T, c, self.site, self.dtype)
        return int(cells_part + rows * self._row_bytes())

    def _fit_logits(self, max_memory: float) -> None:
        """Lower ``max_batch`` so that one batch's working memory (:func:`engine_bytes`) with its logits (and the
        metric's temporaries) fits in ``max_memory``, and the rows gathered before an unembedding so that those
        gathered (fewer than the threshold, then a batch) fit too. When not even one cell fits, one cell per batch
        runs, with a ``RuntimeWarning`` unless ``warn_budget`` is False (:attr:`budget_too_small` is True)."""
        row = self._row_bytes()
        fit = cells_that_fit(
            self.cfg, self.B, self.T, max_memory, self.site, self.dtype, extra=lambda c: c * self.B * row
        )
        self.budget_too_small = fit == 0
        fit = max(1, fit)
        self.max_batch = fit if self.max_batch is None else min(fit, self.max_batch)
        used = engine_bytes(self.cfg, self.B, self.T, self.max_batch, self.site, self.dtype)
        # a flush holds fewer than the threshold's rows plus the last batch's
        left = int((max_memory - used) // row) - self.max_batch * self.B
        self._flush_rows = max(1, min(self.UNEMBED_ROWS, left + 1))
        if self.budget_too_small and self._warn_budget:
            from .._memory import warn_budget_too_small

            warn_budget_too_small(
                "max_memory",
                max_memory,
                self.memory_estimate(1),
                "one cell of the exact engine",
                stacklevel=3,
            )

    def _masking_input(self, t, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The engine's ``attention_mask`` or ``position_ids`` argument ``t`` cut to ``(B, T)`` on the engine's
        device in ``dtype`` (None for None), refused by ``name`` unless it is a ``(B, T')`` tensor with ``T' >= T``."""
        if t is None:
            return None
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != self.B or t.shape[1] < self.T:
            what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name} is {what}; give a (batch, pos) tensor of the cached runs' {self.B} examples and at least "
                f"their {self.T} positions"
            )
        return t[:, : self.T].to(self.device, dtype)

    def _at(self, rows: torch.Tensor) -> torch.Tensor:
        """The positions rotary angles and ALiBi biases read at the columns ``rows``: ``rows`` themselves, or each
        example's ``position_ids`` there, ``(B, len(rows))``."""
        return rows if self._pos_ids is None else self._pos_ids[:, rows]

    def _bias(self, attn, n_keys: int, dtype: torch.dtype) -> torch.Tensor | None:
        """ALiBi's bias of keys ``0 .. n_keys - 1``: ``(H, n_keys)``, or ``(B, H, n_keys)`` at each example's
        positions (:meth:`Attention.position_bias`); None without ALiBi."""
        if self._pos_ids is None:
            return attn.position_bias(n_keys, dtype, self.device)
        return attn.position_bias(self._pos_ids[:, :n_keys], dtype, self.device)

    def _pattern(self, attn, scores: torch.Tensor, mask: torch.Tensor, lay) -> torch.Tensor:
        """The pattern of scores (capped) under the model's mask ``mask (Rq, Tk)`` (True: may not attend). Under a
        padding mask its padding keys are masked too (``lay`` places a ``(B, Rq, x)`` tensor on the scores' axes),
        and a query left with no key gets a pattern of zeros, as :meth:`Attention.forward` gives it."""
        if self._keep is None:
            return attn.softmax(scores.masked_fill(mask, float("-inf")))
        full = mask[None] | ~self._keep[:, None, : mask.shape[1]]  # (B, Rq, Tk)
        return attn.dead_softmax(
            scores.masked_fill(lay(full), float("-inf")), lay(full.all(-1, keepdim=True))
        )

    def _range(self, start: int, stop: int) -> torch.Tensor:
        """``arange(start, stop)`` (int64) on the engine's device: a slice of the positions made once."""
        if stop <= len(self._ar):
            return self._ar[start:stop]
        return torch.arange(start, stop, device=self.device)

    def _index(self, values: list) -> torch.Tensor:
        """A list of ints (or bools) as a tensor on the engine's device."""
        return torch.tensor(values, device=self.device)

    def _proj(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """:meth:`Attention.compute_q`/``compute_k``/``compute_v`` (``which`` in ``"QKV"``) of ``x (..., d_model)``.
        :meth:`run` holds the weights fixed (:meth:`Transformer.fixed_weights`), so each weight is laid out for
        its matmul once per call, not on every projection."""
        attn = self.model.blocks[layer].attn
        return {"Q": attn.compute_q, "K": attn.compute_k, "V": attn.compute_v}[which](x)

    # ----- setup ---------------------------------------------------------------------------------------------
    def _layer_cache(self, layer: int) -> dict:
        g = lambda s: self.tc[hook_name(s, layer)]
        c = {s: g(s) for s in ("resid_pre", "resid_post", "attn_out", "q", "k", "v", "z")}
        # the attention's output projection before a sandwich norm or the residual multiplier (its heads add up
        # there); else attn_out
        post = self.cfg.use_normalization_before_and_after or self.cfg.residual_multiplier is not None
        c["attn_lin"] = self.model.blocks[layer].attn.output(c["z"]) if post else c["attn_out"]
        if self.cfg.rotary:  # queries and keys as the scores read them: rotated at their own positions
            c["qr"] = self.tc[f"blocks.{layer}.attn.hook_rot_q"]
            c["kr"] = self.tc[f"blocks.{layer}.attn.hook_rot_k"]
        else:
            c["qr"], c["kr"] = c["q"], c["k"]
        if not self.attn_only:
            c["mlp_out"] = g("mlp_out")
            if not self.parallel:
                c["resid_mid"] = g("resid_mid")
        return c

    # ----- building blocks -----------------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, patch: _Patch | None, stage: str, rows: torch.Tensor) -> torch.Tensor:
        """Replace the patched part of ``x`` (cells on dim 0; ``rows`` = absolute positions of x's row dim)."""
        if patch is None or patch.site != stage:
            return x
        src = self.src[hook_name(stage, patch.layer)]
        C = x.shape[0]
        act = patch.active
        rmask = (rows == patch.pos) if patch.pos >= 0 else torch.ones_like(rows, dtype=torch.bool)
        if stage == "pattern":  # x (C, B, H, R, Tk)
            s = src[:, :, rows].to(x.dtype)
            hmask = self._range(0, x.shape[2])[None, :] == patch.heads[:, None]
            mask = (
                act[:, None, None, None, None]
                & hmask[:, None, :, None, None]
                & rmask[None, None, None, :, None]
            )
            return torch.where(mask, s.unsqueeze(0), x)
        s = src[:, rows].to(x.dtype)
        if stage in HEAD_SITES:  # x (C, B, R, heads, dh): query heads, or key/value heads for k and v
            hmask = self._range(0, x.shape[3])[None, :] == patch.heads[:, None]
            mask = (
                act[:, None, None, None, None]
                & rmask[None, None, :, None, None]
                & hmask[:, None, None, :, None]
            )
        else:
            mask = act.view(C, 1, 1, 1) & rmask[None, None, :, None]
        return torch.where(mask, s.unsqueeze(0), x)

    def _mask(self, layer: int, qpos: torch.Tensor, n_keys: int) -> torch.Tensor:
        """The model's attention mask ``(len(qpos), n_keys)`` (True: may not attend) for keys ``0..n_keys-1``."""
        return self.model.blocks[layer].attn.attn_mask(qpos, self._range(0, n_keys))

    def _cached_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The target run's rotated keys and values of ``layer`` laid out head-major, ``(B, Hkv, T, dh)`` each (made
        once per :meth:`run`), so that the scores and the mix read the cached positions ``0 .. p - 1`` of every
        query of a batch in one batched product per key/value head."""
        kv = self._kv.get(layer)
        if kv is None:
            tg = self.tgt[layer]
            kv = (tg["kr"].permute(0, 2, 1, 3).contiguous(), tg["v"].permute(0, 2, 1, 3).contiguous())
            self._kv[layer] = kv
        return kv

    def _keys_of_cells(self, cached: torch.Tensor | None, new: torch.Tensor, p: int) -> torch.Tensor:
        """Keys (or values) ``new (C,B,Rk,Hkv,dh)`` head-major, ``(B,Hkv,C,Rk,dh)``, after the cached ones of
        positions ``0 .. p - 1`` (``cached (B,Hkv,T,dh)``, in every cell) when ``p > 0``: ``(B,Hkv,C,p+Rk,dh)``."""
        if p == 0:
            return new.permute(1, 3, 0, 2, 4).contiguous()
        C, B, Rk, Hkv, dh = new.shape
        out = torch.empty(B, Hkv, C, p + Rk, dh, dtype=new.dtype, device=new.device)
        out[:, :, :, :p] = cached[:, :, None, :p]  # cast to the new keys' dtype as .to() casts
        out[:, :, :, p:] = new.permute(1, 3, 0, 2, 4)
        return out

    def _kernel_scale(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, patch: _Patch | None
    ) -> float | None:
        """The scores' multiplier when :func:`~pypattern.ops.attention.prefix_attention`'s C++ kernel computes this
        block's attention as the model does (CPU tensors of float32 or float64; scores neither biased (ALiBi),
        capped nor taken in another dtype; no ``pattern`` patch, which needs the pattern itself; no padding mask,
        as the kernel takes one mask for every example); None otherwise."""
        cfg = self.cfg
        if self._keep is not None:
            return None
        if self._kernel is None:
            forced_elsewhere = _backends.internal_backend("prefix_attention", self.device) is not None
            self._kernel = (
                not forced_elsewhere and _backends.choose("prefix_attention", self.device, None) == "cpp"
            )
        if not self._kernel or (patch is not None and patch.site == "pattern"):
            return None
        if q.dtype not in (torch.float32, torch.float64) or k_new.dtype != q.dtype:
            return None
        tg = self.tgt[layer]
        if tg["kr"].dtype != q.dtype or tg["v"].dtype != q.dtype:
            return None
        if (
            cfg.positional_embedding_type == "alibi"
            or cfg.attn_scores_soft_cap is not None
            or cfg.attn_scores_dtype is not None
            or cfg.attn_softmax_dtype not in (None, q.dtype)
        ):
            return None
        m = cfg.scores_multiplier(layer)
        return float(m) if m is not None else 1.0 / cfg.attn_scale

    def _attend(
        self,
        layer: int,
        q: torch.Tensor,
        qpos: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        p: int,
        patch: _Patch | None = None,
    ) -> torch.Tensor:
        """``z (C,B,Rq,H,dh)`` of (rotated) queries ``q (C,B,Rq,H,dh)`` at ``qpos`` over the cached keys and values
        of positions ``0 .. p - 1`` and ``k_new``/``v_new (C,B,Rk,Hkv,dh)`` (keys rotated) at ``p .. p + Rk - 1``;
        a ``pattern`` patch is applied to the pattern ``(C,B,H,Rq,p+Rk)``. Query head ``h`` reads key/value head
        ``h // n_groups`` (the model's :meth:`~Attention.expand_kv`).

        Where :meth:`_kernel_scale` allows, this is one call of
        :func:`~pypattern.ops.attention.prefix_attention`'s C++ kernel, which reads the operands in place. Otherwise
        the queries, keys and values are laid out once, head-major (``(B, Hkv, C, n_groups, Rq, dh)``): the
        scores against the cached keys are then one batched product per (example, key/value head) over every
        query of every cell, those against the new keys one per (example, key/value head, cell), and the pattern
        multiplies the values in the same two parts; with fewer cached keys than new ones, each cell's cached and
        new keys (and values) are copied into one tensor and each part is one product per cell (measured faster
        there, slower with more cached keys than new ones)."""
        attn = self.model.blocks[layer].attn
        C, B, Rq = q.shape[:3]
        Rk, Tk = k_new.shape[2], p + k_new.shape[2]
        scale = self._kernel_scale(layer, q, k_new, patch)
        if scale is not None:
            tg = self.tgt[layer]
            mask = self._mask(layer, qpos, Tk)
            return prefix_attention(q, tg["kr"][:, :p], tg["v"][:, :p], k_new, v_new, mask, scale)
        Hkv, G, dh = self.Hkv, self.G, self.dh
        BH = B * Hkv
        q, k_new = attn.qk_cast(q, k_new)
        qt = q.reshape(C, B, Rq, Hkv, G, dh).permute(1, 3, 0, 4, 2, 5).contiguous()  # (B,Hkv,C,G,Rq,dh)
        K_old, V_old = self._cached_kv(layer) if p > 0 else (None, None)
        # fewer cached keys than new ones: each cell's keys (and values) in one tensor, one product per cell
        # (the copies of the cached ones cost less than a second product over them)
        whole = 0 < p < Rk
        kt = self._keys_of_cells(K_old, k_new, p if whole else 0)  # (B,Hkv,C,Rk or Tk,dh)
        scores = torch.bmm(qt.view(BH * C, G * Rq, dh), kt.view(BH * C, -1, dh).transpose(1, 2))
        scores = scores.view(B, Hkv, C, G, Rq, kt.shape[3])
        if p > 0 and not whole:
            K_old = K_old[:, :, :p].to(kt.dtype).reshape(BH, p, dh)
            old = torch.bmm(qt.view(BH, C * G * Rq, dh), K_old.transpose(1, 2))
            scores = torch.cat([old.view(B, Hkv, C, G, Rq, p), scores], -1)
        scores = attn.scale_scores(scores)
        bias = self._bias(attn, Tk, scores.dtype)
        if bias is not None:  # (H, Tk) or (B, H, Tk): query head h = g * n_groups + n
            scores = scores + bias.view(-1, Hkv, 1, G, 1, Tk).squeeze(0)
        scores = attn.cap(scores)
        pat = self._pattern(attn, scores, self._mask(layer, qpos, Tk), lambda t: t[:, None, None, None])
        if patch is not None and patch.site == "pattern":
            site = pat.permute(2, 0, 1, 3, 4, 5).reshape(C, B, self.H, Rq, Tk)
            site = self._apply(site, patch, "pattern", qpos)
            pat = site.view(C, B, Hkv, G, Rq, Tk).permute(1, 2, 0, 3, 4, 5).contiguous()
        vt = self._keys_of_cells(V_old, v_new, p if whole else 0)
        first = 0 if whole else p  # the pattern's first key that vt holds
        z = torch.bmm(pat[..., first:].reshape(BH * C, G * Rq, Tk - first), vt.view(BH * C, Tk - first, dh))
        z = z.view(B, Hkv, C, G, Rq, dh)
        if p > 0 and not whole:
            old = torch.bmm(pat[..., :p].reshape(BH, C * G * Rq, p), V_old[:, :, :p].reshape(BH, p, dh))
            z = z + old.view(B, Hkv, C, G, Rq, dh)
        return z.permute(2, 0, 4, 1, 3, 5).reshape(C, B, Rq, self.H, dh)

    def _head_attn(
        self,
        layer: int,
        q_h: torch.Tensor,
        qpos: torch.Tensor,
        K_h: torch.Tensor,
        V_h: torch.Tensor,
        qheads: torch.Tensor,
    ) -> torch.Tensor:
        """One query head per cell (a group of them when ``q_h`` has a head axis): ``q_h (C,B,Rq,[n,]dh)``
        (rotated), keys ``K_h``/``V_h (C,B,Tk,dh)`` at 0..Tk-1 -> z of the same shape as ``q_h``. ``qheads
        (C,[n])``: the query heads ``q_h`` holds (for a position bias)."""
        grouped = q_h.dim() == 5
        qh = q_h if grouped else q_h.unsqueeze(3)
        attn = self.model.blocks[layer].attn
        qh, Kc = attn.qk_cast(qh, K_h)
        s = attn.scale_scores(torch.einsum("cbrne,cbke->cbnrk", qh, Kc))
        bias = self._bias(attn, K_h.shape[2], s.dtype)
        if bias is not None:
            qh_idx = qheads.reshape(len(qheads), -1).to(s.device)
            if bias.dim() == 2:  # (C, n, Tk) -> (C, 1, n, 1, Tk)
                s = s + bias[qh_idx][:, None, :, None, :]
            else:  # per example: (B, C, n, Tk) -> (C, B, n, 1, Tk)
                s = s + bias[:, qh_idx].transpose(0, 1)[:, :, :, None, :]
        s = attn.cap(s)
        pat = self._pattern(attn, s, self._mask(layer, qpos, K_h.shape[2]), lambda t: t[None, :, None])
        z = torch.einsum("cbnrk,cbke->cbrne", pat, V_h)
        return z if grouped else z.squeeze(3)

    @staticmethod
    def _heads(t: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """``t (B, T, heads, dh)`` -> ``(C, B, T, dh)`` for each cell's head."""
        return t.permute(2, 0, 1, 3)[heads]

    def _finish(
        self,
        layer: int,
        x: torch.Tensor,
        attn_out: torch.Tensor,
        patch: _Patch | None = None,
        rows: torch.Tensor | None = None,
        mlp_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block's residual output from its input rows ``x`` and ``attn_out`` (applies ``resid_mid``,
        ``mlp_out`` and ``resid_post`` patches); a parallel block may pass the (unchanged) ``mlp_out``."""
        return self._finish_many(
            layer, [x], [attn_out], [patch], [rows], None if mlp_out is None else [mlp_out]
        )[0]

    def _finish_many(
        self,
        layer: int,
        xs: list[torch.Tensor],
        attn_outs: list[torch.Tensor],
        patches: list[_Patch | None],
        rows: list[torch.Tensor | None],
        mlp_outs: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`_finish` of several parts (cells of other rows or positions: ``xs[i]``, ``attn_outs[i]``,
        ``patches[i]`` at ``rows[i]``), the MLP over the rows of all of them at once (it is row-wise: one product
        per weight instead of one per part); a parallel block may pass every part's (unchanged) ``mlp_outs``."""
        blk = self.model.blocks[layer]
        parts = range(len(xs))
        if self.attn_only:
            return [self._apply(xs[i] + attn_outs[i], patches[i], "resid_post", rows[i]) for i in parts]
        if self.parallel:
            mlps = mlp_outs if mlp_outs is not None else self._rowwise(blk.mlp_write, xs)
            mlps = [self._apply(mlps[i], patches[i], "mlp_out", rows[i]) for i in parts]
            return [
                self._apply(blk.combine(xs[i], attn_outs[i], mlps[i]), patches[i], "resid_post", rows[i])
                for i in parts
            ]
        mids = [self._apply(xs[i] + attn_outs[i], patches[i], "resid_mid", rows[i]) for i in parts]
        outs = self._rowwise(blk.mlp_write, mids)
        outs = [self._apply(outs[i], patches[i], "mlp_out", rows[i]) for i in parts]
        return [self._apply(mids[i] + outs[i], patches[i], "resid_post", rows[i]) for i in parts]

    def _rowwise(self, fn, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[fn(x) for x in xs]`` for a row-wise ``fn`` (``(..., n) -> (..., m)``), by one call of ``fn`` on the
        rows of all of ``xs`` together; the results are views of its output."""
        if len(xs) == 1:
            return [fn(xs[0])]
        n = xs[0].shape[-1]
        out = fn(torch.cat([x.reshape(-1, n) for x in xs]))
        res, o = [], 0
        for x in xs:
            k = x.numel() // n
            res.append(out[o : o + k].view(*x.shape[:-1], *out.shape[1:]))
            o += k
        return res

    # ----- one block on changed rows ------------------------------------------------------------------------
    def _block_rows(self, layer: int, X: torch.Tensor, p: int, patch: _Patch | None, out_rows: torch.Tensor):
        """Block ``layer`` for cells whose residual rows ``p..`` (``X (C,B,R,d)``) changed; returns the
        residual after the block at ``out_rows`` (absolute positions): ``(C,B,len(out_rows),d)``."""
        return self._block_many(layer, [(X, p, patch, out_rows)])[0]

    def _block_many(self, layer: int, parts: list[tuple]) -> list[torch.Tensor]:
        """:meth:`_block_rows` of several parts ``(X, p, patch, out_rows)`` (cells of batches that start at other
        positions): the norms, projections, output projection and MLP over the rows of all parts at once, the
        attention per part."""
        blk = self.model.blocks[layer]
        attn = blk.attn
        xs = [self._apply(X, pt, "resid_pre", self._range(p, p + X.shape[2])) for X, p, pt, _ in parts]
        hq, sels = [], []
        hs = self._rowwise(blk.ln1, xs)
        for X, (_, p, _, out_rows), h in zip(xs, parts, hs):
            full = len(out_rows) == X.shape[2]
            sels.append(None if full else out_rows - p)
            hq.append(h if full else h[:, :, out_rows - p])
        ks = self._rowwise(lambda h: self._proj(layer, "K", h), hs)
        vs = self._rowwise(lambda h: self._proj(layer, "V", h), hs)
        qs = self._rowwise(lambda h: self._proj(layer, "Q", h), hq)
        zs = []
        for (_, p, patch, out_rows), q, k, v in zip(parts, qs, ks, vs):
            rows = self._range(p, p + k.shape[2])
            q = self._apply(q, patch, "q", out_rows)
            k = self._apply(k, patch, "k", rows)
            v = self._apply(v, patch, "v", rows)
            # identity without rotary positions
            q, k = attn.rotate(q, self._at(out_rows)), attn.rotate(k, self._at(rows))
            z = self._apply(self._attend(layer, q, out_rows, k, v, p, patch), patch, "z", out_rows)
            zs.append(z.reshape(*z.shape[:-2], self.H * self.dh))  # a row per query: (C, B, Rq, H * dh)
        outs = self._rowwise(lambda z: blk.attn_post(attn.output(z.view(*z.shape[:-1], self.H, self.dh))), zs)
        patches = [part[2] for part in parts]
        out_rows = [part[3] for part in parts]
        outs = [self._apply(a, pt, "attn_out", r) for a, pt, r in zip(outs, patches, out_rows)]
        xs = [x if sel is None else x[:, :, sel] for x, sel in zip(xs, sels)]
        return self._finish_many(layer, xs, outs, patches, out_rows)

    # ----- entering layer: the optimised first block of a cell ----------------------------------------------
    def _enter(
        self,
        layer: int,
        p: int,
        cells: list[Cell],
        out_rows: torch.Tensor,
        all_pos: bool,
        defer: bool = False,
    ):
        """The residual after block ``layer`` at ``out_rows`` of ``cells`` entering there at position ``p``:
        ``(C,B,len(out_rows),d)``. With ``defer``, a ``resid_pre`` cell at one position returns ``(x, z, mlp_out)``
        instead, for :meth:`_finish_entered` (its output projection and MLP over many rows at once)."""
        site, tg = self.site, self.tgt[layer]
        blk = self.model.blocks[layer]
        attn = blk.attn
        C, dt = len(cells), self.dtype
        heads = self._index([c.head for c in cells]) if site in HEAD_SITES else None
        src = self.src.get(hook_name(site, layer))
        if site == "resid_pre":
            if all_pos:
                X = src.to(dt).unsqueeze(0).expand(C, -1, -1, -1)
                return self._block_rows(layer, X, 0, None, out_rows)
            # only row p's q, k, v change; later rows keep their cached queries, keys and values
            x0 = src[:, p : p + 1].to(dt)  # (B,1,d)
            i, (qe, ke, ve) = self._entry[layer][p]
            q0, k0, v0 = qe[:, i : i + 1], ke[:, i : i + 1], ve[:, i : i + 1]
            sel = out_rows - p
            k = torch.cat([k0, tg["kr"][:, p + 1 :]], 1).unsqueeze(0)
            v = torch.cat([v0, tg["v"][:, p + 1 :]], 1).unsqueeze(0)
            q = torch.cat([q0, tg["qr"][:, p + 1 :]], 1)[:, sel].unsqueeze(0)
            z = self._attend(layer, q, out_rows, k, v, p)
            x = torch.cat([x0, tg["resid_pre"][:, p + 1 :]], 1)[:, sel].unsqueeze(0)
            mlp_out = None
            if self.parallel:  # the MLP reads resid_pre: only row p's output changes
                m0 = blk.mlp_write(x0)
                mlp_out = torch.cat([m0, tg["mlp_out"][:, p + 1 :]], 1)[:, sel].unsqueeze(0)
            if defer:
                return x, z, mlp_out
            out = self._finish(layer, x, blk.attn_post(attn.output(z)), mlp_out=mlp_out)
            return out.expand(C, -1, -1, -1)
        if site in KV_SITES:  # a key/value head: recompute the attention of the query heads that read it
            G, B = self.G, self.B
            K = self._heads(tg["kr"], heads)  # (C,B,T,dh)
            V = self._heads(tg["v"], heads)
            rsel = slice(None) if all_pos else slice(p, p + 1)
            rpos = self._range(0, self.T) if all_pos else self._range(p, p + 1)
            s = src[:, rsel].to(dt)
            if site == "k":  # a patched key is rotated at the position it is patched into
                K = K.clone()
                K[:, :, rsel] = self._heads(attn.rotate(s, self._at(rpos)), heads)
            else:
                V = V.clone()
                V[:, :, rsel] = self._heads(s, heads)
            Rq = len(out_rows)
            grp = lambda t: t[:, out_rows].reshape(B, Rq, self.Hkv, G, self.dh).permute(2, 0, 1, 3, 4)[heads]
            qheads = heads[:, None] * G + self._range(0, G)  # the query heads reading each key/value head
            z_new = self._head_attn(layer, grp(tg["qr"]), out_rows, K, V, qheads)  # (C,B,Rq,G,dh)
            W_O = attn.W_O.reshape(self.Hkv, G, self.dh, self.d)[heads]  # (C,G,dh,d)
            attn_out = blk.attn_post(
                tg["attn_lin"][:, out_rows] + torch.einsum("cbrne,cned->cbrd", z_new - grp(tg["z"]), W_O)
            )
            mlp_out = tg["mlp_out"][:, out_rows] if self.parallel else None
            return self._finish(layer, tg["resid_pre"][:, out_rows], attn_out, mlp_out=mlp_out)
        # row-local sites: the residual changes only at the patched rows
        prow = out_rows if all_pos else out_rows[out_rows == p]
        base = tg["resid_post"][:, out_rows].unsqueeze(0).expand(C, -1, -1, -1)
        if len(prow) == 0:
            return base
        x = tg["resid_pre"][:, prow]
        mlp_cached = tg["mlp_out"][:, prow] if self.parallel else None
        if site in ("z", "q", "pattern"):
            kvh = heads // self.G
            if site == "z":
                z_new = self._heads(src, heads)[:, :, prow].to(dt)
            elif site == "q":  # a patched query is rotated at its own position
                q_h = self._heads(attn.rotate(src[:, prow].to(dt), self._at(prow)), heads)
                z_new = self._head_attn(
                    layer, q_h, prow, self._heads(tg["kr"], kvh), self._heads(tg["v"], kvh), heads
                )
            else:
                pat = src[:, :, prow].transpose(0, 1)[heads].to(dt)  # (C,B,R,Tk)
                z_new = torch.einsum("cbrk,cbke->cbre", pat, self._heads(tg["v"], kvh))
            z_old = self._heads(tg["z"], heads)[:, :, prow]
            attn_out = blk.attn_post(
                tg["attn_lin"][:, prow] + torch.einsum("cbre,ced->cbrd", z_new - z_old, attn.W_O[heads])
            )
            new = self._finish(layer, x, attn_out, mlp_out=mlp_cached)
        elif not all_pos and p in self._entry.get(layer, {}):  # attn_out, resid_mid: rows made per tile
            i, (rows,) = self._entry[layer][p]
            new = rows[:, :, i : i + 1].expand(C, -1, -1, -1)
        else:
            s = src[:, prow].to(dt).unsqueeze(0)
            if site == "attn_out":
                new = self._finish(layer, x, s, mlp_out=mlp_cached)
            elif site == "resid_mid":  # sequential blocks only
                new = s + blk.mlp_write(s)
            elif site == "mlp_out":
                new = (
                    blk.combine(x, tg["attn_out"][:, prow], s)
                    if self.parallel
                    else tg["resid_mid"][:, prow] + s
                )
            else:  # resid_post
                new = s
            new = new.expand(C, -1, -1, -1)
        if all_pos:
            return new
        out = base.clone()
        out[:, :, (out_rows == p).nonzero().flatten()] = new
        return out

    #: positions of a layer whose entry rows (:meth:`_entry_rows`) are made together: a tile of about this many rows
    #: (positions x examples) per product
    ENTRY_ROWS = 256

    def _entry_rows(self, cells: list[Cell]) -> None:
        """What the patched row of a cell at a single position computes at its own layer, for every (layer,
        position) of ``cells``: for ``resid_pre`` the source rows' rotated queries, keys and values; for
        ``attn_out`` and ``resid_mid`` (sequential blocks with an MLP) the residual after the block.

        They are made per layer for tiles of consecutive positions (about :attr:`ENTRY_ROWS` rows each, one
        matmul per weight) and kept for later runs (at most three activations per layer): a grid computed in runs
        of a few positions each makes them once, in products of many rows, and each value is the same whatever
        the runs before (a resumed grid equals an uninterrupted one); the other positions of a tile cost at most
        one entering block of a cell there."""
        tile = max(1, -(-self.ENTRY_ROWS // self.B))
        self._entry = {}
        for c in cells:
            # in the last block a row-local patch reaches the metric only at the metric's row
            skip = c.layer == self.L - 1 and self.uniform and c.pos != self.m and self.site != "resid_pre"
            if c.pos < 0 or (self.uniform and c.pos > self.m) or skip:
                continue
            first = c.pos // tile * tile
            kept = self._entry_kept.get((c.layer, first))
            if kept is None:
                kept = self._entry_kept[(c.layer, first)] = self._entry_of(c.layer, first, first + tile)
            self._entry.setdefault(c.layer, {})[c.pos] = (c.pos - first, kept)

    def _entry_of(self, layer: int, first: int, stop: int) -> tuple[torch.Tensor, ...]:
        """:meth:`_entry_rows` of ``layer`` at positions ``first .. stop - 1`` (at most ``T - 1``)."""
        blk = self.model.blocks[layer]
        stop = min(stop, self.T)
        if self.site != "resid_pre":
            tg = self.tgt[layer]
            s = self.src[hook_name(self.site, layer)][:, first:stop].to(self.dtype).unsqueeze(0)
            if self.site == "attn_out":
                return (self._finish(layer, tg["resid_pre"][:, first:stop], s),)
            return (s + blk.mlp_write(s),)
        h = blk.ln1(self.src[hook_name("resid_pre", layer)][:, first:stop].to(self.dtype))  # (B,P,d)
        pt = self._range(first, stop)
        q = blk.attn.rotate(self._proj(layer, "Q", h), self._at(pt))
        k = blk.attn.rotate(self._proj(layer, "K", h), self._at(pt))
        return q, k, self._proj(layer, "V", h)

    #: final-norm rows of finished cells that are unembedded together (one matmul over the vocabulary for
    #: several batches, which runs near the full matmul rate where one of ``batch`` x a few cells does not)
    UNEMBED_ROWS = 256

    # ----- driver ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, cells: list[Cell]) -> torch.Tensor:
        """Metric of every cell's patched run: ``(len(cells), batch)``."""
        with self.model.fixed_weights(max_pack_bytes=self.max_pack_bytes):
            return self._run(cells)

    def _run(self, cells: list[Cell]) -> torch.Tensor:
        # metrics of a 16-bit model are computed and kept in float32 (see metrics._wide)
        out = torch.empty(
            len(cells), self.B, dtype=torch.promote_types(self.dtype, torch.float32), device=self.device
        )
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(cells):
            groups.setdefault(c.pos, []).append(i)
        seq_mlp = not self.attn_only and not self.parallel
        if self.site == "resid_pre" or (self.site in ("attn_out", "resid_mid") and seq_mlp):
            self._entry_rows(cells)
        tgt_metric = None
        step = self.max_batch or len(cells)
        pending: list[tuple[list[int], torch.Tensor]] = []  # (cell indices, final-norm rows (C, B, d))
        flush_rows = (
            self.UNEMBED_ROWS if self._flush_rows is None else min(self.UNEMBED_ROWS, self._flush_rows)
        )

        def flush() -> None:
            if pending:
                x = torch.cat([h for _, h in pending]) if len(pending) > 1 else pending[0][1]
                vals = metric_of_rows(self.model, x, self.metric)
                n = 0
                for idx, _ in pending:
                    # a metric computed in another dtype (float64 on a float32 model, a bool accuracy) is cast
                    out[idx] = vals[n : n + len(idx)].to(out.dtype)
                    n += len(idx)
                pending.clear()

        batches: list[tuple[int, list[int], bool]] = []  # (first position, cell indices, all positions)
        for pos, idx in groups.items():
            all_pos = pos < 0
            p = 0 if all_pos else pos
            if self.uniform and p > self.m:  # the patch cannot reach the metric position
                tgt_metric = self.target_metric() if tgt_metric is None else tgt_metric
                out[idx] = tgt_metric
                continue
            idx = sorted(idx, key=lambda i: cells[i].layer)  # a batch of late cells skips the early layers
            batches += [(p, idx[s : s + step], all_pos) for s in range(0, len(idx), step)]
        # batches run together, layer by layer, as long as their residual rows (cells x positions) stay within
        # those of one batch of `step` cells over every position, the largest a batch can hold
        budget, w = step * self.T, 0
        while w < len(batches):
            e, rows = w + 1, len(batches[w][1]) * (self.T - batches[w][0])
            while e < len(batches) and rows + len(batches[e][1]) * (self.T - batches[e][0]) <= budget:
                rows += len(batches[e][1]) * (self.T - batches[e][0])
                e += 1
            finals = self._run_wave([(p, [cells[i] for i in idx], a) for p, idx, a in batches[w:e]])
            for (_, idx, _), x in zip(batches[w:e], finals):
                pending.append((idx, x))
                if sum(len(i) for i, _ in pending) * self.B >= flush_rows:
                    flush()
            w = e
        flush()
        self._entry, self._kv = {}, {}
        return out

    @torch.no_grad()
    def target_metric(self) -> torch.Tensor:
        """Metric of the unpatched target run ``(batch,)``."""
        x = self._final_rows(self.tgt[-1]["resid_post"].unsqueeze(0), 0)
        return metric_of_rows(self.model, x, self.metric)[0]

    def _final_rows(self, X: torch.Tensor, p: int) -> torch.Tensor:
        """The final norm of the metric rows ``(C,B,d)`` from the final residual rows ``X (C,B,R,d)`` that end at
        the last position (``T - 1``) and start at ``p`` (or hold only the metric row, in the uniform case)."""
        model = self.model
        if self.uniform:  # prompts are truncated so that the metric position is the last one
            x = X[:, :, -1]
        else:
            C = X.shape[0]
            tgt_final = self.tgt[-1]["resid_post"]
            full = torch.cat([tgt_final[:, :p].unsqueeze(0).expand(C, -1, -1, -1), X], 2)
            idx = self._m_idx.view(1, -1, 1, 1).expand(C, -1, 1, self.d)
            x = full.gather(2, idx).squeeze(2)
        return model.ln_final(x)

    def _chunks(self, n_cells: int, rows: int) -> list[tuple[int, int]]:
        """Consecutive cell ranges of at most :attr:`CHUNK_ROWS` rows (``rows`` per example and cell) each, or one
        cell, as few as that allows and of sizes that differ by at most one cell (no small remainder: the
        products of a chunk over many rows run near the full matmul rate)."""
        k = max(1, self.CHUNK_ROWS // (self.B * rows))
        n = max(1, -(-n_cells // k))
        edges = [n_cells * i // n for i in range(n + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def _finish_entered(self, layer: int, entered: list[tuple]) -> None:
        """Writes the residual after block ``layer`` of cells entering it (``(Y, x, z, mlp_out)`` from
        :meth:`_enter` with ``defer``, ``Y`` the cells' output rows) into ``Y``: their output projection and MLP
        over the rows of several batches at once, in chunks of about :attr:`CHUNK_ROWS` rows."""
        blk = self.model.blocks[layer]
        attn, H, dh = blk.attn, self.H, self.dh
        k = 0
        while k < len(entered):
            e, rows = k + 1, entered[k][1].numel() // self.d
            while e < len(entered) and rows + entered[e][1].numel() // self.d <= self.CHUNK_ROWS:
                rows += entered[e][1].numel() // self.d
                e += 1
            part = entered[k:e]
            zs = [z.reshape(*z.shape[:-2], H * dh) for _, _, z, _ in part]
            outs = self._rowwise(lambda z: blk.attn_post(attn.output(z.view(*z.shape[:-1], H, dh))), zs)
            mlps = [m for *_, m in part] if self.parallel else None
            none = [None] * len(part)
            outs = self._finish_many(layer, [x for _, x, _, _ in part], outs, none, none, mlps)
            for (Y, *_), out in zip(part, outs):
                Y.copy_(out.expand_as(Y))
            k = e

    def _run_wave(self, batches: list[tuple[int, list[Cell], bool]]) -> list[torch.Tensor]:
        """The final-norm metric rows ``(C, B, d)`` of each batch ``(first position p, cells, all positions)``,
        the batches run together layer by layer: at each layer the active cells of every batch run over chunks of
        about :attr:`CHUNK_ROWS` rows, and a chunk takes the cells of several batches when those are few
        (:meth:`_block_many`: one product per weight over the rows of all of them); cells enter per batch."""
        is_head = self.site in HEAD_SITES
        state = []
        for p, cells, all_pos in batches:
            R = self.T - p
            # the residual after each block, for every cell of the batch, alternates between two buffers that the
            # chunks write into (one allocation per batch instead of one per block)
            bufs = [
                torch.empty(len(cells), self.B, R, self.d, dtype=self.dtype, device=self.device)
                for _ in range(2)
            ]
            full_rows = self._range(p, self.T)
            last_rows = self._range(self.m, self.m + 1) if self.uniform else full_rows
            state.append(dict(p=p, R=R, cells=cells, all_pos=all_pos, bufs=bufs, X=None, active=[],
                              full=full_rows, last=last_rows))  # fmt: skip
        for layer in range(min(c.layer for _, cells, _ in batches for c in cells), self.L):
            parts: list[tuple] = []  # (X, p, patch, out_rows, output rows Y[s:e], rows)
            entering = []
            for st in state:
                p, R, active = st["p"], st["R"], st["active"]
                out_rows = st["last"] if layer == self.L - 1 else st["full"]
                new = [c for c in st["cells"] if c.layer == layer]
                n_out = len(active) + len(new)
                if n_out == 0:
                    continue
                if len(out_rows) == R:
                    Y = st["bufs"][layer % 2][:n_out]
                else:
                    Y = torch.empty(
                        n_out, self.B, len(out_rows), self.d, dtype=self.dtype, device=self.device
                    )
                if active:
                    acts = [layer in c.layers for c in active]
                    act = self._index(acts)
                    heads = self._index([c.head for c in active]) if is_head else None
                    for s, e in self._chunks(len(active), R):
                        patch = None
                        if any(acts[s:e]):  # read on the host: no device synchronisation per chunk
                            hs = heads[s:e] if is_head else None
                            patch = _Patch(self.site, layer, act[s:e], hs, -1 if st["all_pos"] else p)
                        parts.append((st["X"][s:e], p, patch, out_rows, Y[s:e], (e - s) * self.B * R))
                entering.append((st, new, out_rows, Y))
            k = 0
            while k < len(parts):  # consecutive parts in chunks of about CHUNK_ROWS rows
                e, rows = k + 1, parts[k][5]
                while e < len(parts) and rows + parts[e][5] <= self.CHUNK_ROWS:
                    rows += parts[e][5]
                    e += 1
                outs = self._block_many(layer, [part[:4] for part in parts[k:e]])
                for part, y in zip(parts[k:e], outs):
                    part[4].copy_(y)
                k = e
            deferred: list[tuple] = []  # (output rows, x, z, mlp_out) of entering cells (_enter's defer)
            for st, new, out_rows, Y in entering:
                if new:
                    n0, p, all_pos = len(st["active"]), st["p"], st["all_pos"]
                    if is_head:  # the entering block depends on each cell's head
                        for s, e in self._chunks(len(new), st["R"]):
                            Y[n0 + s : n0 + e] = self._enter(layer, p, new[s:e], out_rows, all_pos)
                    else:  # the same for every entering cell (the site has no head)
                        got = self._enter(layer, p, new[:1], out_rows, all_pos, defer=True)
                        if isinstance(got, tuple):
                            deferred.append((Y[n0:], *got))
                        else:
                            Y[n0:] = got
                    st["active"] += new
                st["X"] = Y
            self._finish_entered(layer, deferred)
        finals = []
        for st in state:
            X, active = st["X"], st["active"]
            assert X is not None and X.shape[2] in (1, st["R"])
            order = {c: i for i, c in enumerate(active)}
            finals.append(self._final_rows(X, st["p"])[[order[c] for c in st["cells"]]])
        return finals


def truncate_cache(cache: dict, T: int) -> dict:
    """The activations of ``cache`` cut to the first ``T`` positions (attention patterns and scores on both
    position axes), for the engine, which never computes positions after the metric's."""
    out = {}
    for n, x in cache.items():
        if n.endswith(("hook_pattern", "hook_attn_scores")):
            out[n] = x[:, :, :T, :T]
        elif x.dim() >= 2 and x.shape[1] >= T:
            out[n] = x[:, :T]
        else:
            out[n] = x
    return out
