"""Exact edge patching with causal reuse, and the gradient runs behind EAP / EAP-IG.

Definitions (``A_u`` the value an ablated edge carries, ``out_u`` a node's output in the run being computed):

- The *base* run is the clean run (``mode="noise"``) or the corrupted run (``mode="denoise"``).
- ``A_u`` comes from the *source* prompts: the corrupted prompts for noising, the clean ones for denoising.
  ``ablation="resample"``: ``u``'s output on the source prompts; ``"mean"``: its mean over the source batch, per
  position (given ``mean_mask``, over the prompts real at each position only); ``"zero"``: zero.
- Patching a set of edges ``S``: every destination input ``v`` reads
  ``in_v = (residual stream before v) - sum_{u: (u, v) in S} (out_u - A_u)``,
  i.e. ``u``'s current contribution is replaced by ``A_u`` on the patched edges only; everything else is computed
  as usual, so downstream nodes see the effects. With one edge this is "its clean input - u_clean + u_corrupted"
  (noising). Denoising swaps the roles of the prompts: the corrupted run with the patched edges reading the clean
  values (auto-circuit's edge patching; its tree patching is noising of the complement, see
  :func:`pypattern.circuits.faithfulness`).

Causal reuse: a mask whose first patched destination is at stage ``s`` (``2l`` attention of layer ``l``, ``2l+1``
its MLP, ``2L`` the logits; in a parallel block the MLP reads the block's input and shares stage ``2l``) starts from the cached base residual at ``s``; earlier nodes' outputs are the cached
ones. At that first attention stage only the heads with a patched input are recomputed (a patched key or value
input of a shared key/value head recomputes its group of query heads). When the metric reads one
position for every prompt (the last, after truncation), the last layer computes only that row (queries, MLP and
unembedding). Masks are grouped by their first stage (and first heads) and evaluated as a batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import _backends
from .._checks import is_count, is_real
from .._memory import huge_pages_hint, keep_freed_heap, warn_budget_too_small
from ..models.packed import block_weight_bytes, frozen_fixed_weights
from ..models.transformer import affine
from ..ops.sums import signed_sums
from ..patching.api import (
    _couples_examples,
    check_positions_real,
    check_tokens,
    mean_mask_under,
    patching_mask,
)
from ..patching.corruptions import (
    Corruption,
    GaussianNoise,
    MeanAblation,
    TokenReplacement,
    ZeroAblation,
    masked_mean,
)
from ..patching.corruptions import mean_mask as checked_mean_mask
from ..patching.engine import FALLBACK_VOCAB_COPIES, new_bytes
from ..patching.inert import reach_positions
from ..patching.metrics import bind_metric, check_metric_on_stacks, metric_on
from ..patching.metrics import metric_positions as patching_metric_positions
from .graph import EdgeGraph, check_graph_arg
from .model_view import ModelView

__all__ = ["EdgeEngine", "prepare_runs"]

_ABLATIONS = ("resample", "mean", "zero")
# the patched-source sums go term by term (each a B x R x d multiply-add) when the terms from the cheaper side of
# each destination input are at most this fraction of a dense sum (a matmul) over every source
_SPARSE = 0.2
# the batch of masks keeps one stage's destination inputs within this size (see EdgeEngine.chunk_size): a cap on
# the batch that memory_budget cannot raise
_STAGE_BYTES = 32 * 2**20
_MODES = ("noise", "denoise")
# copies of one attention stage's destination inputs (V, B, T, d) a patched run holds at once on a per-position graph
# (the dense inputs, a block's product of that size being added, the norm's output and temporaries)
_POS_STAGE_COPIES = 7
_STAGE_COPIES = 2  # the same without positions
# a destination input formed from terms whose norm is below this fraction of theirs (they nearly cancel) is warned
# of in float32 or 16 bits (EdgeEngine._check_cancellation): in float32 its rounding is then about 1e-3 of it
_CANCEL = 1e-4


@dataclass
class _Run:
    """One unpatched run: ``resid[s]`` the residual entering stage ``s`` ``(B, T, d)``, ``after_attn[l]``
    the residual after layer ``l``'s attention (parallel blocks: the block's input plus the attention output, without
    the MLP's), ``outs (n_src, B, T, d)`` node outputs, ``logits`` at the metric
    positions ``(B, vocab)``. A run for edge attribution (recorded by :meth:`EdgeEngine.gradients`, or
    :func:`_outputs_run`) has no ``resid`` or ``after_attn`` (None), and in the uniform case its last layer's outputs
    only at the metric row (zero elsewhere: the rows no edge score reads); a recorded base run's ``outs`` become
    the engine's ``D`` (then None)."""

    resid: dict
    after_attn: list
    outs: torch.Tensor
    logits: torch.Tensor


@dataclass
class _Grouped:
    """The inputs of one stage's destinations in ``C`` patched runs, grouped by what they equal: ``cls (C, V)`` is
    0 where the input is the run's residual ``R[c]``, 1 where it is the all-ablated input ``abl (B, R, d)``, 2
    where it is formed here, ``own[at[c, v]]`` (``own (P, B, R, d)``, one per pair of ``pairs (P, 2)`` as ``(v,
    c)``, ordered by ``v``)."""

    cls: torch.Tensor
    own: torch.Tensor
    pairs: torch.Tensor
    at: torch.Tensor
    abl: torch.Tensor | None


def metric_positions(metric, batch: int, seq_len: int):
    """The metric's position(s) as a non-negative int or a LongTensor ``(batch,)`` (checked by
    :func:`pypattern.patching.metrics.metric_positions`); one position shared by every example becomes an int."""
    pos = patching_metric_positions(metric, batch, seq_len)
    if isinstance(pos, torch.Tensor) and bool((pos == pos[0]).all()):
        return int(pos[0])
    return pos


class EdgeEngine:
    """Base run, source values and the batched patched forward for one (model, prompts, metric) setting.

    Build it with :func:`prepare_runs`. ``run(masks)`` evaluates boolean edge masks ``(C, num_edges)`` and
    returns the metric of each patched run ``(C, batch)``; ``gradients(embeds)`` returns ``dM/d(input)`` of
    every destination input for runs started from the given embeddings.
    """

    def __init__(
        self,
        view: ModelView,
        graph: EdgeGraph,
        base: _Run | None,
        source,
        base_embed: torch.Tensor,
        metric,
        pos,
        T: int,
        max_batch: int | None = None,
        memory_budget: float = 1e9,
        src_embed: torch.Tensor | None = None,
    ) -> None:
        keep_freed_heap()
        self.view, self.graph, self.metric = view, graph, metric
        self.base_embed = base_embed
        # where the runs live (the model's device): the engine's index tensors, masks, buffers and metric values
        # are made there; the bookkeeping over masks (first stages, groups) stays on the CPU
        self.device = base_embed.device
        self.pos = pos if isinstance(pos, int) else pos.to(self.device)
        self.T = T
        self.B = base_embed.shape[0]
        self.dtype = base_embed.dtype
        # the source values: a tensor, or "zero" / "mean" when they follow from a base run still to be recorded
        self.A = source if isinstance(source, torch.Tensor) else None
        self._pending_source = None if isinstance(source, torch.Tensor) else source
        self.src_embed = source[0] if isinstance(source, torch.Tensor) else src_embed  # the embedding's A
        self.base, self.D = None, None
        # the source values belong to this engine alone (a resample run of prepare_runs, src_embed then a copy):
        # a recorded base run may form D = A - out in their storage (see _gradients)
        self.source_owned = False
        self.bound = True  # the metric has been bound to the clean logits (prepare_runs says when not yet)
        self._examples_checked = False  # the gradient methods' check that the metric reads each example alone
        self._inert = None  # the edges that cannot change each example's metric (_inert_tables), found once
        if base is not None:
            self._set_base(base)
        self.uniform = isinstance(pos, int)
        if self.uniform and pos != T - 1:
            raise ValueError(f"position {pos}: truncate the prompts so the metric position is the last")
        self.H, self.L, self.d = view.n_heads, view.n_layers, view.d_model
        self.Hk = view.n_kv_heads
        self.nA = self.H + 2 * self.Hk  # destination inputs of one layer's attention: q, k, v
        self.parallel = view.parallel
        check_graph(view, graph)
        if max_batch is not None and (not is_count(max_batch) or max_batch < 1):
            raise ValueError(f"max_batch={max_batch!r} is not valid; give an int >= 1 or None")
        if not is_real(memory_budget) or not (math.isfinite(memory_budget) and memory_budget > 0):
            raise ValueError(
                f"memory_budget={memory_budget!r} is not valid; give a finite number of bytes > 0"
            )
        g = graph
        # destination inputs of each stage, in graph order: q (H), k (Hk), v (Hk) of a layer's attention, then
        # (parallel blocks) the MLP of the same layer; or one MLP; or the logits
        self.stage_dsts = {s: (g.dst_stage == s).nonzero().flatten().to(self.device) for s in g.stages}
        self.src_stage = g.src_stage
        self.n_read = {s: int((g.src_stage < s).sum()) for s in g.stages}  # sources read at each stage
        src_pos = {n: i for i, n in enumerate(g.src_names)}
        self.head_srcs = [
            torch.tensor([src_pos[f"L{layer}H{h}"] for h in range(self.H)], device="cpu")
            for layer in range(self.L)
        ]
        self.mlp_src = [src_pos.get(f"MLP{layer}") for layer in range(self.L)]
        self.max_batch = None if max_batch is None else int(max_batch)
        self.memory_budget = float(memory_budget)
        self._budget_warned = False  # memory_budget below one patched run (chunk_size), or one EAP-IG run
        # bytes of one run's logits over the vocabulary with the metric's temporaries: {False: a patched run,
        # True: a gradient run}, measured once (vocab_bytes_per_run)
        self._vocab_run: dict[bool, int] = {}
        self._ablated: dict = {}
        self._e_heads = None  # the query heads each edge changes directly (E, H), built once
        self._weights = None  # the model's parameters and block weights' bytes (fixed_weights), found once
        # what prepare_runs says: the ablation, and the public function the runs are for (warnings name it); whether
        # the inputs formed were checked for cancellation (once per engine: _check_cancellation)
        self.ablation, self.call, self._rounding_checked = None, "prepare_runs", _CALL_WARNED.get()
        self.mean_mask = None  # mean ablation's mask of the source prompts (B, T) bool, or None: every prompt
        # the runs' attention mask (B, T) bool (ModelView.set_mask), or None: prompts without padding
        self.keep = None
        self._checking = False  # a run() call checking the inputs it forms (_check_cancellation)
        # the recomputed blocks of the patched runs being computed, by id, and which of their terms are zero
        # (_dead_terms; each tensor is held so that its id is not reused)
        self._dead_cache: dict = {}

    def _set_base(self, base: _Run, D: torch.Tensor | None = None) -> None:
        """Take ``base`` as the base run: the source values that depend on it and ``D = A - out``; or, given
        ``D`` (formed in the source values' storage by a recorded run), that ``D``, the source values then
        gone."""
        self.base = base
        self._inert = None
        self._ablated = {}  # what follows from the base run (all-ablated inputs, their projections and MLPs)
        if D is not None:
            self.D, self.A = D, None
            return
        if self._pending_source == "zero":
            self.A = torch.zeros_like(base.outs)
        elif self._pending_source == "mean":
            self.A = masked_mean(base.outs, self.mean_mask, 1, 2).expand_as(base.outs)
        self._pending_source = None
        if base.resid is None:  # a recorded run: its outputs are needed only as D, which takes their storage
            self.D = base.outs.neg_().add_(self.A)
            base.outs = None
        else:
            self.D = self.A - base.outs  # ablated minus base value, (n_src, B, T, d)

    # ----- sizes ----------------------------------------------------------------------------------------------
    def chunk_size(self) -> int:
        """Masks evaluated per batched forward: ``max_batch``, else as many as ``memory_budget`` allows and at most
        as many as keep one stage's destination inputs ``(3H, C, B, T, d)`` within ``_STAGE_BYTES`` (32 MiB:
        larger tensors are mapped fresh from the system on every allocation by glibc's allocator, and their first
        writes fault in every page: ten 5% circuits of the bench model in one batch took 1.4x as long per circuit
        as in batches of five; so a budget above that point changes nothing).

        Per mask: the node outputs and stage inputs of one run (``n_src + 4 H + 4`` residual-sized tensors), one
        attention stage's inputs ``(H + 2 Hk, B, T, d)`` formed and normalised at once (counted ``_STAGE_COPIES`` times,
        ``_POS_STAGE_COPIES`` on a per-position graph, whose inputs are all formed dense), its dense mask, and its
        logits over the vocabulary with the metric's temporaries
        (:meth:`vocab_bytes_per_run`)."""
        if self.max_batch is not None:
            return max(1, int(self.max_batch))
        g = self.graph
        item = self.base_embed.element_size()
        per = (g.n_src + 4 * self.H + 4) * self.B * self.T * self.d * item
        per += g.n_src * g.n_dst * (g.n_pos or 1) * item
        # one attention stage's inputs formed dense and normalised at once, with the norm's temporaries: without
        # positions some of them (most inputs equal the residual or the all-ablated input, :class:`_Grouped`), per
        # position all of them, with a source block's product of their size being added (measured on GPT-2- and
        # Llama-shaped models: up to 1.5 and 6.5 times the stage's inputs per mask on top of the rest)
        copies = _POS_STAGE_COPIES if g.per_position else _STAGE_COPIES
        per += copies * self.nA * self.B * self.T * self.d * item
        per += self.vocab_bytes_per_run(grad=False)
        stage = self.nA * self.B * self.T * self.d * item
        if int(self.memory_budget // per) < 1 and not self._budget_warned:
            from ..sampling.diagnostics import user_stacklevel

            self._budget_warned = True  # once per engine: it sizes every call's batches
            warn_budget_too_small(
                "memory_budget", self.memory_budget, per, "one patched run", stacklevel=user_stacklevel()
            )
        return max(1, min(int(self.memory_budget // per), int(_STAGE_BYTES // stage)))

    def vocab_bytes_per_run(self, grad: bool) -> int:
        """Bytes that one run's logits over the vocabulary ``(B, vocab)``, the unembedding's and the metric's
        temporaries take (with ``grad``: also their gradients), counted once by :func:`_vocab_run_bytes` on the
        clean run's logits (:func:`prepare_runs`), or, before any run is recorded, on random logits (the metric
        bound to them in a copy when it is not bound yet)."""
        if grad not in self._vocab_run:
            g = torch.Generator(device="cpu").manual_seed(0)
            V = self.view.model.cfg.d_vocab
            logits = torch.randn(self.B, V, generator=g, dtype=torch.float32, device="cpu").to(
                self.device, self.dtype
            )
            metric = self.metric
            if not self.bound:  # a copy bound to the logits it is measured on
                try:
                    metric = copy.deepcopy(self.metric)
                    bind_metric(metric, logits)
                except Exception:
                    metric = None
            self._vocab_run[grad] = _vocab_run_bytes(self.view, metric, logits, grad)
        return self._vocab_run[grad]

    def _rows_after(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        if self.uniform and layer == self.L - 1:
            return torch.tensor([self.T - 1], device=self.device)
        return rows

    # ----- edges that cannot change the metric ------------------------------------------------------------------
    def _inert_tables(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(fixed (E, B), alone (E, B), coupled)`` on the CPU, found once per base run: the edges whose patch
        cannot change an example's metric.

        - ``fixed``: in any patched run. An edge at a row before the first row at which any source's value ``A_u``
          differs from its base output ``out_u`` (bit for bit: the rows before the first corrupted token, or every
          row of an example whose source prompt is its base prompt): by induction over the stages every patched
          run equals the base run at those rows of a causal model, so the edge carries exactly zero. An edge into
          a query input at a row whose query may attend one key only (the first row, each example's first real
          token under an attention mask), in every layer's rows it covers: that key's weight is 1 whatever the
          query. On a per-position graph also an edge whose destination input at its row cannot reach the
          metric's row (:func:`~pypattern.patching.inert.reach_positions`: rows after the metric's; the last
          layer's query and MLP inputs and the logits at other rows; keys and values out of a sliding window's
          reach); what such an edge changes is read only by edges of that kind. Under an attention mask, an edge
          into a padding row: no real token reads that row (a padding row's query attends no key).
        - ``alone``: ``fixed``, or an edge whose source has ``A_u == out_u`` at its row (without positions: at every
          row the metric can read; padding rows aside). A run whose patched edges are all ``alone`` edges for an
          example changes nothing its metric reads (each node's output is the base run's by induction, so each
          carries zero).
        - ``coupled``: the metric relates a run's examples (:func:`~pypattern.patching.api._couples_examples`): an
          example's metric is then left alone only where every example's is.

        Computed, such runs come out as the base run's metric plus rounding (their products are taken in other
        shapes than the base run's), where edge attribution gives exactly 0: :meth:`run` gives them the base run's
        metric exactly, and ACDC's tests (:meth:`inert_edges`) the current circuit's."""
        if self._inert is not None:
            return self._inert
        g, B, T = self.graph, self.B, self.T
        zero = (~(self.D != 0).any(-1)).cpu()  # (n_src, B, T): A_u == out_u at that row (a NaN differs)
        pad = None if self.keep is None else ~self.keep.cpu()  # (B, T): padding rows of the attention mask
        if pad is not None:
            # a padding row reaches no real token (its key and value are masked out of every query, its query
            # attends nothing, its MLP input and logits stay at that row): what a source carries there, or an
            # edge into it, changes no metric; the runs compute such rows all the same
            zero = zero | pad[None]
        pos = (
            torch.full((B,), T - 1, dtype=torch.long, device="cpu") if self.uniform else self.pos.cpu().long()
        )
        upto = (
            torch.arange(T, device="cpu")[None, :] <= pos[:, None]
        )  # (B, T): the rows the metric's row may read
        same = zero.all(0).int().cummin(1).values.bool()  # (B, T): before the first row any source differs
        # query inputs at rows whose query may attend one key only: its weight is 1 whatever the query
        one_key = self._one_key_rows(pad)  # (L, B, T)
        is_q = torch.tensor([q == "q" for q in g.dst_qkv], dtype=torch.bool, device="cpu")[g.dst_idx]
        lay = (g.dst_stage // 2).clamp(max=self.L - 1)[g.dst_idx]
        if not g.per_position:
            fixed = (same | ~upto).all(1)[None].expand(len(g), B)
            fixed = fixed | (is_q[:, None] & (one_key[lay] | ~upto[None]).all(2))
            alone = (zero | ~upto[None]).all(2)[g.src_idx]  # (E, B)
        else:
            t = g.pos_idx
            inside = t < T  # rows cut off after the metric's
            tc = t.clamp(max=T - 1)
            fixed = same[:, tc].T | ~inside[:, None] | ~self._reach(pos, tc)
            fixed = fixed | (is_q[:, None] & one_key[lay, :, tc])
            if pad is not None:  # an edge into a padding row
                fixed = fixed | pad[:, tc].T
            alone = zero[g.src_idx, :, tc]  # (E, B)
        alone = alone | fixed
        with torch.no_grad():
            logits = self.base.logits.detach()
            try:
                coupled = _couples_examples(self.metric, logits, self.metric(logits))
            except Exception:
                coupled = True
        self._inert = (fixed.contiguous(), alone.contiguous(), coupled)
        return self._inert

    def _one_key_rows(self, pad: torch.Tensor | None = None) -> torch.Tensor:
        """``(L, B, T)`` bool: the rows whose query may attend one key at most in each layer, for each example (the
        first row; every row of a sliding window of one), by the model's attention masks (none found: the first
        row). Under padding ``pad (B, T)`` (True at padding) the real keys only: each example's first real row,
        and its padding rows, whose queries attend nothing."""
        rows = torch.arange(self.T, device="cpu")
        out = torch.zeros(self.L, self.B, self.T, dtype=torch.bool, device="cpu")
        for layer in range(self.L):
            try:
                allowed = ~self.view.model.blocks[layer].attn.attn_mask(rows, rows).cpu()
            except (AttributeError, TypeError):
                allowed = rows[None, :] <= rows[:, None]
            if pad is None:
                out[layer] = (allowed.sum(1) == 1)[None]
            else:
                out[layer] = (allowed[None] & ~pad[:, None, :]).sum(-1) <= 1
        return out

    def _reach(self, pos: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        """``(E, B)`` bool of a per-position graph: whether each edge's destination input at its row (``tc``) can
        reach the metric's row of each example (``pos (B,)``) in the causal model."""
        g, T, L = self.graph, self.T, self.L
        layer = (g.dst_stage // 2).tolist()
        out = torch.zeros(len(g), self.B, dtype=torch.bool)
        for m in sorted(set(pos.tolist())):
            try:
                by_site = {
                    site: reach_positions(self.view.model, site, m, T).cpu() for site in ("q", "k", "mlp_out")
                }
            except (
                AttributeError,
                TypeError,
            ):  # no attention masks to read: the rows after the metric's only
                by_site = None
            reach = torch.zeros(g.n_dst, T, dtype=torch.bool)
            for d, qkv in enumerate(g.dst_qkv):
                if layer[d] >= L:  # the logits
                    reach[d, m] = True
                elif by_site is None:
                    reach[d, : m + 1] = True
                else:
                    site = "mlp_out" if qkv is None else ("q" if qkv == "q" else "k")
                    reach[d] = by_site[site][layer[d]]
            ex = (pos == m).nonzero().flatten()
            out[:, ex] = reach[g.dst_idx, tc][:, None]
        return out

    def inert_edges(self) -> torch.Tensor:
        """``(E, B)`` bool on the CPU: the edges whose patch cannot change an example's metric in any patched run
        (``fixed`` of :meth:`_inert_tables`; for a metric relating the examples, only where it holds for every
        example). Adding such an edge to a patched set leaves those examples' metrics as they are, exactly."""
        fixed, _, coupled = self._inert_tables()
        return fixed.all(1, keepdim=True).expand_as(fixed) if coupled else fixed

    def _inert_runs(self, live: torch.Tensor) -> torch.Tensor | None:
        """``(C, B)`` bool on the CPU: the examples of each run (``live (C, E)``: its patched edges) whose metric is
        the base run's exactly (every patched edge is an ``alone`` edge of :meth:`_inert_tables`), or None when
        there are none."""
        fixed, alone, coupled = self._inert_tables()
        never = ~alone.any(1)  # (E,): edges that may change every example's metric
        cand = ~(live & never[None]).any(1)
        if not bool(cand.any()):
            return None
        cols = ~alone.all(1) & ~never  # edges inert for some examples only
        ok = torch.ones(int(cand.sum()), self.B, dtype=torch.bool, device="cpu")
        if bool(cols.any()):
            sub = live[cand][:, cols].float()
            ok = (sub @ (~alone[cols]).float()) == 0
        if coupled:
            ok = ok.all(1, keepdim=True).expand_as(ok)
        out = torch.zeros(live.shape[0], self.B, dtype=torch.bool, device="cpu")
        out[cand] = ok
        return out if bool(out.any()) else None

    # ----- stage pieces ---------------------------------------------------------------------------------------
    def _attn(self, layer: int, X: torch.Tensor, qrows: torch.Tensor, rows: torch.Tensor, heads=None):
        """Head outputs ``(h, N, B, len(qrows), d)`` from per-destination inputs ``X (h + 2 hk, N, B, R, d)``
        (query inputs of the ``h`` heads, then key and value inputs of the ``hk`` key/value heads they read) over
        ``rows`` (absolute positions, starting at 0) for the heads ``heads`` (None: all)."""
        v = self.view
        h = self.H if heads is None else len(heads)
        hk = self.Hk if heads is None else len(v.kv_heads_of(heads))
        qsel = qrows if len(qrows) != len(rows) else slice(None)
        xq = v.attn_norm(layer, X[:h, :, :, qsel])
        xkv = v.attn_norm(layer, X[h:])
        q, k, vv = v.qkv(layer, xq, xkv[:hk], xkv[hk:], qrows, rows, heads=heads)
        return v.head_out(layer, v.attention(layer, q, k, vv, qrows, rows, heads=heads), heads=heads)

    def _attn_grouped(self, layer: int, X: _Grouped, R: torch.Tensor, qrows, rows, heads=None):
        """:meth:`_attn` from grouped inputs (:meth:`_inputs_sparse`): the inputs that equal the run's residual
        ``R (C, B, R, d)`` or the all-ablated input are normalised once per run (once in all) and projected for all
        the heads reading them in one matmul (:meth:`ModelView.qkv_grouped`); only the others one by one."""
        v = self.view
        H, Hk = self.H, self.Hk
        kv = list(range(Hk)) if heads is None else v.kv_heads_of(heads)
        hq = list(range(H)) if heads is None else list(heads)
        sel = hq + [H + g for g in kv] + [H + Hk + g for g in kv]  # stage indices of the inputs computed
        C = X.cls.shape[0]
        cls = X.cls[:, sel].tolist()
        shared, own = [], []
        abl = [(i, c) for c in range(C) for i in range(len(sel)) if cls[c][i] == 1]
        cached = (self._ablated_projections(layer, rows), abl) if abl else None
        for c in range(C):
            mine = [(i, c) for i in range(len(sel)) if cls[c][i] == 0]
            if mine:
                shared.append((R[c], mine))
        at = X.at[:, sel].tolist()
        own = sorted((at[c][i], i, c) for c in range(C) for i in range(len(sel)) if cls[c][i] == 2)
        own_x = None
        if own:
            ats = [a for a, _, _ in own]
            if ats == list(range(ats[0], ats[0] + len(ats))):  # pairs are ordered: usually a view
                own_x = (X.own[ats[0] : ats[0] + len(ats)], [(i, c) for _, i, c in own])
            else:
                own_x = (X.own[torch.tensor(ats, device=X.own.device)], [(i, c) for _, i, c in own])
        q, k, vv = v.qkv_grouped(layer, shared, own_x, C, qrows, rows, heads=heads, cached=cached)
        z = v.attention(layer, q, k, vv, qrows, rows, heads=heads)
        return v.head_out(layer, z, heads=heads)

    def _attn_shared(self, layer: int, R: torch.Tensor, qrows: torch.Tensor, rows: torch.Tensor):
        """Head outputs ``(H, N, B, len(qrows), d)`` when every head reads the residual ``R (N, B, R, d)``."""
        v = self.view
        hn = v.attn_norm(layer, R)
        hq = hn if len(qrows) == len(rows) else hn[:, :, qrows]
        q, k, vv = v.qkv_shared(layer, hq, hn, qrows, rows)
        return v.head_out(layer, v.attention(layer, q, k, vv, qrows, rows))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the metric positions ``(N, B, vocab)`` from the final residual ``x (N, B, R, d)`` (R = 1 in
        the uniform case, else all rows)."""
        if self.uniform:
            x = x[:, :, -1]
        else:
            idx = self.pos.view(1, -1, 1, 1).expand(x.shape[0], -1, 1, x.shape[-1])
            x = x.gather(2, idx).squeeze(2)
        return self.view.unembed(x)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        """Metric from the final residual ``x (N, B, R, d)``."""
        return self.metric(self._logits(x))

    # ----- unpatched forward ----------------------------------------------------------------------------------
    def base_metric(self) -> torch.Tensor:
        """Metric of the unpatched base run ``(batch,)``; a metric of integer or bool values (an accuracy, a rank)
        in the dtype of :meth:`run`'s values, so that differences of the two are scores."""
        return _scored(self.metric(self.base.logits), self.dtype)

    # ----- patched forward ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def fixed_weights(self) -> Iterator[None]:
        """The model's weights held fixed while the engine computes (:meth:`Transformer.fixed_weights
        <pypattern.models.Transformer.fixed_weights>`: on a CPU where oneDNN's matmul is the faster, the MLPs' products
        go through it, with at most one packed copy of the block weights), and no gradient taken for them: the
        engine's gradients are with respect to its inputs only (:func:`~pypattern.models.packed.frozen_fixed_weights`:
        each parameter's ``requires_grad`` is put back)."""
        if self._weights is None:  # the walk over the model's modules, once per engine
            model = self.view.model
            self._weights = (list(model.parameters()), block_weight_bytes(model))
        with frozen_fixed_weights(self.view.model, *self._weights):
            yield

    @torch.no_grad()
    def run(self, masks: torch.Tensor) -> torch.Tensor:
        """Metric of the run with each mask's edges patched: ``masks (C, num_edges)`` bool -> ``(C, batch)``. An
        example none of whose patched edges can change its metric (:meth:`_inert_tables`) gets the base run's
        metric exactly; a mask where that holds for every example is not run.

        On a model in float32 (or 16 bits), the first call checks the destination inputs it forms and warns, once
        per engine, when one is the sum of terms that nearly cancel (:meth:`_check_cancellation`)."""
        checking = not self._rounding_checked and torch.finfo(self.dtype).eps > 1e-10
        self._checking = checking
        try:
            with self.fixed_weights():
                return self._run(masks)
        finally:
            self._checking = False
            self._dead_cache = {}
            if checking:
                self._rounding_checked = True

    def _check_cancellation(self, blocks, Mv, s, rows, sub, R, comp, x) -> None:
        """Warn when a destination input formed from terms (a mask patches some but not all of its incoming edges)
        is far smaller than what its form adds up: the residual ``R (C, B, R, d)`` and the patched sources' ``A_u -
        out_u``, or (where ``comp (C, V[, R])``) the all-ablated input's terms (the ``A_u``, norms of
        :meth:`_term_norms`) and the unpatched sources' ``A_u - out_u``: the norms of the patched runs' terms (from
        ``blocks``) against the input's own (``x``: the formed inputs ``(V, C, B, R, d)`` or a :class:`_Grouped`).
        Its rounding is then that many times its roundoff unit relative to it, and the norm reading it scales that
        up to the input's full size: below ``_CANCEL`` of its terms (about 1e-3 of a float32 input lost to
        rounding) the patched metric can be off by a large part of its size. Each form is summed from its own terms
        (the one that adds up less where it costs no more), so what is left is the cancellation of the terms
        themselves (a kept set whose outputs nearly sum to zero)."""
        n = self.n_read[s]
        k = Mv.sum(1)
        formed = (k > 0) & (k < n)  # (C, V[, R]): neither the residual nor the all-ablated input
        if not bool(formed.any()):
            return
        per_pos = self.graph.per_position
        f64 = torch.float64
        C = Mv.shape[0]
        # norms of the terms A_u - out_u in each patched run: (n_src, C[, R])
        dims = (1, 3) if per_pos else (1, 2, 3)
        nD = torch.zeros(Mv.shape[1], C, *((len(rows),) if per_pos else ()), dtype=f64, device=self.device)
        for src_idx, tensor, shared, is_full in blocks:
            t = _rows(tensor, rows, 2 if shared else 3) if (is_full and sub) else tensor
            if shared:  # (u, B, R, d)
                nrm = torch.linalg.vector_norm(t, dim=dims, dtype=f64).unsqueeze(1)
            else:  # (u, C, B, R, d)
                nrm = torch.linalg.vector_norm(t, dim=tuple(d + 1 for d in dims), dtype=f64)
            nD[torch.tensor(src_idx, device=self.device)] = nrm.expand(len(src_idx), *nD.shape[1:])
        nR = torch.linalg.vector_norm(R, dim=(1, 3) if per_pos else (1, 2, 3), dtype=f64)  # (C[, R])
        nA = self._term_norms(rows)[1][:n]
        nA = nA.sum(0) if per_pos else nA.square().sum(1).sqrt().sum()
        m = Mv[:, :n].to(device=self.device, dtype=f64)
        eq = "cuvt,uct->cvt" if per_pos else "cuv,uc->cv"
        res = nR.unsqueeze(1) + torch.einsum(eq, m, nD[:n])
        abl = nA + torch.einsum(eq, 1 - m, nD[:n])
        scale = torch.where(comp.to(self.device), abl, res)
        if self.graph.per_position:  # (V, C, B, R, d) -> (C, V, R)
            size = torch.linalg.vector_norm(x, dim=(2, 4), dtype=torch.float64).permute(1, 0, 2)
        elif isinstance(x, _Grouped):
            size = torch.zeros(formed.shape, dtype=torch.float64, device=x.own.device)
            if len(x.pairs):
                norms = torch.linalg.vector_norm(x.own, dim=(1, 2, 3), dtype=torch.float64)
                size[x.pairs[:, 1], x.pairs[:, 0]] = norms
        else:
            size = torch.linalg.vector_norm(x, dim=(2, 3, 4), dtype=torch.float64).T
        eps = torch.finfo(self.dtype).eps
        limit = _CANCEL
        bad = formed.to(size.device) & (size < limit * scale.to(size.device))
        if not bool(bad.any()):
            return
        ratio = float((size / scale.to(size.device).clamp(min=torch.finfo(torch.float64).tiny))[bad].min())
        self._rounding_checked = True
        from ..sampling.diagnostics import user_stacklevel

        warnings.warn(
            f"{self.call}: in {str(self.dtype)[6:]} a destination input of a patched run is the sum of terms that "
            f"nearly cancel (its norm is {ratio:.1g} of theirs; {str(self.dtype)[6:]} rounds each to about {eps:.0e} of it), so its "
            "rounding is a large part of it, the norm reading it scales that up, and the patched metric can be off "
            "by much of its size; pass model.double() (float64) for these circuits",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def _run(self, masks: torch.Tensor) -> torch.Tensor:
        if self.base is None or self.base.resid is None:
            raise RuntimeError("this engine has no recorded base run to patch: build it with prepare_runs")
        # the bookkeeping below (first stages, groups) reads the masks on the CPU; the dense masks go to the device
        masks = self.graph.mask(masks).cpu()
        if masks.dim() == 1:
            masks = masks[None]
        C = masks.shape[0]
        # metrics of a 16-bit model are computed and kept in float32 (see patching.metrics._wide)
        out = torch.empty(C, self.B, dtype=torch.promote_types(self.dtype, torch.float32), device=self.device)
        if C == 0:
            return out
        g = self.graph
        # first stage of each mask, and its heads patched at that stage
        if g.per_position:
            live = masks & (g.pos_idx < self.T)[None]
        else:
            live = masks
        e_stage = g.edge_stage()
        big = 2 * self.L + 1
        first = torch.where(live, e_stage[None], torch.full_like(e_stage, big)[None]).min(1).values
        # the examples whose metric no patched edge can change (_inert_tables) take the base run's exactly, not
        # its rounding in a patched run; a mask that changes no example's metric is not run
        inert = self._inert_runs(live)
        if inert is not None:
            first[inert.all(1)] = big
        # the query heads each mask changes at its first stage (a patched key/value input changes its whole group)
        if self._e_heads is None:
            self._e_heads = self._dst_qheads()[g.dst_idx].float()  # (E, H)
        e_heads = self._e_heads
        hit = torch.empty(C, self.H, dtype=torch.bool, device="cpu")
        for i in range(0, C, 1024):
            at_first = live[i : i + 1024] & (e_stage[None] == first[i : i + 1024, None])
            hit[i : i + 1024] = (at_first.float() @ e_heads) > 0
        groups: dict[tuple, list[int]] = {}
        for c in range(C):
            s0 = int(first[c])
            if s0 >= big:
                key = (big, ())
            elif s0 % 2 == 0 and s0 < 2 * self.L:
                key = (s0, tuple(hit[c].nonzero().flatten().tolist()))
            else:
                key = (s0, ())
            groups.setdefault(key, []).append(c)
        chunk = self.chunk_size()
        for (s0, heads), idx in groups.items():
            if s0 >= big:
                out[idx] = self.base_metric().to(out.dtype)
                continue
            hsel = None if (len(heads) == self.H or s0 % 2 == 1 or s0 == 2 * self.L) else list(heads)
            for i in range(0, len(idx), chunk):
                part = idx[i : i + chunk]
                dense = g.dense(live[part], self.dtype, self.device)
                if g.per_position:
                    dense = dense[..., : self.T]
                # a metric computed in another dtype (float64 on a float32 model, a bool accuracy) is cast
                out[part] = self._patched(dense, s0, hsel).to(out.dtype)
        if inert is not None:
            at = inert.to(self.device)
            out[at] = self.base_metric().to(out.dtype).expand_as(out)[at]
        return out

    def _dst_qheads(self) -> torch.Tensor:
        """``(n_dst, H)`` bool: the query heads whose output each destination input changes directly (its own head
        for a query input, the group of its key/value head for a key or value input, none for MLPs and logits)."""
        g = self.graph
        out = torch.zeros(g.n_dst, self.H, dtype=torch.bool, device="cpu")
        G = self.H // self.Hk
        for i, qkv in enumerate(g.dst_qkv):
            if qkv is None:
                continue
            j = int(g.dst_node[i].rsplit("H" if qkv == "q" or self.Hk == self.H else "KV", 1)[1])
            if qkv == "q":
                out[i, j] = True
            else:
                out[i, j * G : (j + 1) * G] = True
        return out

    def _inputs(
        self,
        blocks,
        M: torch.Tensor,
        dsts: torch.Tensor,
        rows: torch.Tensor,
        R: torch.Tensor,
        s: int,
        grouped: bool = False,
    ):
        """Inputs of the destinations ``dsts`` of stage ``s`` at ``rows`` in the patched runs whose residual is ``R
        (C, B, R, d)``: ``R + sum over patched sources of (A_u - out_u)``, ``(V, C, B, R, d)``, or None when no mask
        patches any of them (every input is ``R``). ``grouped``: when the sums go term by term, a :class:`_Grouped`
        instead, which materialises only the inputs that equal neither ``R`` nor the all-ablated input."""
        Mv = M[:, :, dsts]
        if self.graph.per_position:
            Mv = Mv[..., rows]
        if not bool(Mv.any()):
            return None
        sub = len(rows) != self.T
        n = self.n_read[s]  # the sources read at stage s (a prefix)
        # each input from the side with fewer terms: R plus its patched sources' A_u - out_u, or, with more than
        # half of them patched, the all-ablated input minus its unpatched ones' (summing what the input keeps
        # rather than cancelling most of R: zero ablation is then exact where every edge is patched)
        dead = self._dead_terms(blocks, Mv.shape[0], Mv.shape[1])
        if dead is None:
            up = down = Mv
            k = Mv.sum(1)  # (C, V[, R]) patched edges into each destination input
            comp = k > n - k
        else:
            # a source whose A_u - out_u is exactly zero in a run (zero ablation: its output is zero, every input of
            # it ablated) is the same patched or not: counted as patched on the all-ablated side and as unpatched on
            # the residual side, it is a term of neither; ties go to the all-ablated side (summed from what is kept)
            d = dead.view(*dead.shape, *(1,) * (Mv.dim() - 2)).to(Mv.device)
            up = torch.where(d, torch.ones_like(Mv), Mv)
            down = torch.where(d, torch.zeros_like(Mv), Mv)
            comp = n - up[:, :n].sum(1) <= down.sum(1)
            Mv = torch.where(comp.unsqueeze(1), up, down)
            k = Mv.sum(1)
        x = None
        if not self.graph.per_position:
            terms = float(torch.where(comp, n - k, k).sum())
            if terms <= _SPARSE * Mv.shape[0] * Mv.shape[2] * n:
                x = self._inputs_sparse(blocks, Mv, rows, sub, R, s, comp, n, k if grouped else None)
        if (
            x is None
        ):  # a dense sum costs the same from either side: each input from the better-conditioned one
            comp = self._better_side(down, up, s, rows)
            if dead is not None:
                Mv = torch.where(comp.unsqueeze(1), up, down)
            W = self._weights_from(Mv, comp, n)
            if not self.graph.per_position:
                x = self._corr_flat(blocks, W, rows, sub, R, comp, s)
            else:
                x = self._corr_pos(blocks, W, rows, sub, self._bases(comp, R, s, rows))
        if self._checking and not self._rounding_checked:
            self._check_cancellation(blocks, Mv, s, rows, sub, R, comp, x)
        return x

    def _better_side(self, down: torch.Tensor, up: torch.Tensor, s: int, rows: torch.Tensor) -> torch.Tensor:
        """``(C, V[, R])`` bool: the inputs better formed from the all-ablated input than from the residual, by the
        size of what each form adds up (the roundings scale with it): the residual (the sum of every source's
        output read at ``s``) plus the ``A_u - out_u`` of the sources patched in ``down (C, n_src, V[, R])``,
        against the all-ablated input (the sum of their ``A_u``) plus those of the sources not patched in ``up``
        (the two masks differ where a term is known to be zero, :meth:`_dead_terms`); norms of the base run's values
        over the batch and the model dimension (:meth:`_term_norms`), and over the rows too but for a per-position
        graph."""
        n = self.n_read[s]
        nO, nA, nD = self._term_norms(rows)
        if not self.graph.per_position:  # one form for every row: the norms over the rows
            nO, nA, nD = (x.square().sum(1).sqrt() for x in (nO, nA, nD))
            eq = "cuv,u->cv"
        else:
            eq = "cuvt,ut->cvt"
        f = dict(device=nD.device, dtype=nD.dtype)
        res = nO[:n].sum(0) + torch.einsum(eq, down[:, :n].to(**f), nD[:n])
        abl = nA[:n].sum(0) + torch.einsum(eq, 1 - up[:, :n].to(**f), nD[:n])
        return (abl < res).to(down.device)

    def _dead_terms(self, blocks, C: int, n_src: int) -> torch.Tensor | None:
        """``(C, n_src)`` bool: the sources whose ``A_u - out_u`` is exactly zero in each run (zero ablation: a
        recomputed node's output is zero where every input of it is the all-ablated input of a model without
        biases), read off the recomputed blocks (once per block, ``_dead_cache``); None for the other ablations
        (``A_u`` then never equals ``out_u`` by construction) or when there are none."""
        if self.ablation != "zero":
            return None
        dead = None
        for src_idx, tensor, shared, _ in blocks:
            if shared:  # the base run's values, -out_u: not zero by construction
                continue
            key = id(tensor)
            if key not in self._dead_cache:
                t = tensor.reshape(tensor.shape[0], C, -1)
                # a zero output is zero at its first entries: only those runs are read whole
                maybe = ~t[:, :, : self.d].any(-1)
                if bool(maybe.any()):
                    idx = maybe.nonzero(as_tuple=True)
                    maybe[idx] = ~t[idx].any(-1)
                self._dead_cache[key] = (tensor, maybe)  # (u, C)
            flags = self._dead_cache[key][1]
            if bool(flags.any()):
                if dead is None:
                    dead = torch.zeros(C, n_src, dtype=torch.bool, device=flags.device)
                dead[:, torch.tensor(src_idx, device=flags.device)] = flags.T
        return dead

    def _term_norms(self, rows: torch.Tensor) -> tuple:
        """Norms over the batch and the model dimension of every source's base-run output, source value and ``A_u -
        out_u``, each ``(n_src, R)`` in float64 at ``rows`` (computed once, cached)."""
        if "norms" not in self._ablated:
            D = self.D
            A = self.A if self.A is not None and self.ablation != "zero" else None
            nD = torch.linalg.vector_norm(D, dim=(1, 3), dtype=torch.float64)
            nA = (
                torch.zeros_like(nD)
                if A is None
                else torch.linalg.vector_norm(A, dim=(1, 3), dtype=torch.float64)
            )
            if A is None and self.ablation == "zero":  # D is every output negated
                nO = nD
            elif self.base.outs is not None:
                nO = torch.linalg.vector_norm(self.base.outs, dim=(1, 3), dtype=torch.float64)
            else:  # an upper bound: out_u = A_u - D_u
                nO = nA + nD
            self._ablated["norms"] = (nO, nA, nD)
        return tuple(x[:, rows.to(x.device)] for x in self._ablated["norms"])

    @staticmethod
    def _weights_from(Mv: torch.Tensor, comp: torch.Tensor, n: int) -> torch.Tensor:
        """The dense sums' weights ``(C, n_src, V[, R])`` of the sources' ``A_u - out_u``: ``Mv`` (1 where patched)
        for an input formed from ``R``, ``-(1 - Mv)`` over the ``n`` sources read (-1 where not patched) for one
        formed from the all-ablated input (``comp (C, V[, R])``)."""
        if not bool(comp.any()):
            return Mv
        W = Mv.clone()
        W[:, :n] = torch.where(comp.unsqueeze(1), Mv[:, :n] - 1, Mv[:, :n])
        return W

    def _bases(self, comp: torch.Tensor, R: torch.Tensor, s: int, rows: torch.Tensor):
        """What the per-position sums add to: ``R (C, B, R, d)`` when every input is formed from it, else ``(V, C,
        B, R, d)`` with the all-ablated input where ``comp (C, V, R)``."""
        if not bool(comp.any()):
            return R
        abl = self._ablated_input(s, rows)
        c = comp.permute(1, 0, 2)[:, :, None, :, None]  # (C, V, R) -> (V, C, 1, R, 1)
        out = R.new_empty(comp.shape[1], *R.shape)
        return torch.where(c.to(R.device), abl, R, out=out)

    def _corr_pos(self, blocks, Mv: torch.Tensor, rows: torch.Tensor, sub: bool, base: torch.Tensor):
        """``base`` plus the weighted source sum, ``(V, C, B, R, d)``, of a per-position graph (weights ``Mv (C,
        n_src, V, R)``, :meth:`_weights_from`)."""
        total = None
        for src_idx, tensor, shared, is_full in blocks:
            m = Mv[:, src_idx]
            if not bool(m.any()):
                continue
            # shared blocks are (u, B, T, d), own blocks (u, C, B, T, d)
            if is_full and sub:
                tensor = tensor[:, :, rows] if shared else tensor[:, :, :, rows]
            term = torch.einsum("cuvt,ubtd->vcbtd" if shared else "cuvt,ucbtd->vcbtd", m, tensor)
            if total is None and base.dim() == 5:  # a fresh tensor of the inputs' bases: the sums go into it
                total = base
            total = term if total is None else total.add_(term)  # in place: fresh large tensors are costly
        if total is None:
            return base.expand(Mv.shape[2], *base.shape[-4:]).clone()
        return total if total is base else total.add_(base)

    def _ablated_input(self, s: int, rows: torch.Tensor) -> torch.Tensor:
        """``(B, R, d)``: the input of a destination at stage ``s`` with every incoming edge patched, ``sum_{u read
        at s} A_u`` plus the attention output biases before ``s``; the same in every patched run (cached).

        Summed from those terms themselves rather than formed as the residual plus every ``A_u - out_u`` (equal in
        exact arithmetic) unless the latter adds up less (the norms of :meth:`_term_norms`; a resample of the base
        prompts themselves, where every ``A_u - out_u`` is zero, then gives the residual itself): zero ablation of
        a model without biases gives exactly zero, not the rounding of the residual minus every node's output,
        which the norm reading the input would scale up to full size."""
        if s not in self._ablated:
            n = self.n_read[s]
            direct = self.ablation == "zero"
            if not direct and self.A is not None:
                full = torch.arange(self.T, device=self.device)
                nO, nA, nD = (x[:n].square().sum(1).sqrt().sum() for x in self._term_norms(full))
                direct = bool(nA < nO + nD)
            if not direct:
                self._ablated[s] = self.base.resid[s] + self.D[:n].sum(0)
                return _rows(self._ablated[s], rows, 1)
            abl = torch.zeros_like(self.base.resid[s]) if self.ablation == "zero" else self.A[:n].sum(0)
            for layer in range(self.L):
                if 2 * layer < s:  # the attention output biases written before stage s
                    abl = self.view.add_attn_bias(layer, abl)
            self._ablated[s] = abl
        return _rows(self._ablated[s], rows, 1)

    def _ablated_projections(self, layer: int, rows: torch.Tensor) -> tuple:
        """Every head's query, key and value projections (:meth:`ModelView.projections`) of the all-ablated input
        of ``layer``'s attention at ``rows``: the same in every patched run, computed once (cached) and read by
        each destination input whose every incoming edge is patched."""
        key = ("proj", layer, int(rows[0]), len(rows))
        if key not in self._ablated:
            self._ablated[key] = self.view.projections(layer, self._ablated_input(2 * layer, rows))
        return self._ablated[key]

    def _ablated_mlp(self, s: int, rows: torch.Tensor) -> torch.Tensor:
        """``(B, R, d)``: the MLP's output on the all-ablated input of stage ``s`` at ``rows`` (cached)."""
        key = ("mlp", s, int(rows[0]), len(rows))
        if key not in self._ablated:
            self._ablated[key] = self.view.mlp(s // 2, self._ablated_input(s, rows))
        return self._ablated[key]

    def _mlp_out(self, s: int, x, R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The MLP output ``(C, B, R, d)`` of stage ``s`` from its inputs ``x`` (:meth:`_inputs` with
        ``grouped``: None when every run reads ``R``, a dense ``(1, C, ...)`` tensor or a :class:`_Grouped`): the
        runs whose MLP input is the all-ablated one take its cached output instead of running the MLP."""
        v, layer = self.view, s // 2
        if not isinstance(x, _Grouped):
            return v.mlp(layer, self._first_input(x, R))
        cls = x.cls[:, 0]
        C = cls.shape[0]
        abl = cls == 1
        n_abl = int(abl.sum())
        if n_abl == C:
            return self._ablated_mlp(s, rows).unsqueeze(0).expand(C, -1, -1, -1)
        inp = self._first_input(x, R)
        if n_abl == 0:
            return v.mlp(layer, inp)
        keep = (~abl).nonzero().flatten()
        out = R.new_empty(C, *R.shape[1:])
        out[keep] = v.mlp(layer, inp[keep])
        out[abl] = self._ablated_mlp(s, rows)
        return out

    @staticmethod
    def _first_input(x, R: torch.Tensor) -> torch.Tensor:
        """The first destination input of every run, ``(C, B, R, d)``, from :meth:`_inputs`' result ``x``: ``R``
        itself when ``x`` is None, the first input of a dense ``(V, C, ...)`` tensor, or, from grouped inputs,
        ``R[c]``, the all-ablated input or the formed one, as ``x.cls`` says."""
        if x is None:
            return R
        if not isinstance(x, _Grouped):
            return x[0]
        cls = x.cls[:, 0]
        C = cls.shape[0]
        inp = torch.where((cls == 0).view(C, 1, 1, 1), R, x.abl if x.abl is not None else R.new_zeros(()))
        formed = (cls == 2).nonzero().flatten()
        if len(formed):
            inp[formed] = x.own[x.at[formed, 0]]
        return inp

    def _inputs_sparse(self, blocks, Mv, rows, sub, R, s, comp, n, k=None):
        """:meth:`_inputs` from the cheaper side of each (mask, destination input): ``R`` plus its patched
        sources' ``A_u - out_u``, or, when more than half of its sources are patched, the ablated input (the same in
        every patched run, :meth:`_ablated_input`) minus its unpatched sources' ``A_u - out_u``: ``min(k, n - k)``
        adds of ``B x R x d`` each (``k`` of the ``n`` sources patched), every input of the stage in one
        :func:`~pypattern.ops.sums.signed_sums` call. With ``k`` given (patched sources per mask and input ``(C,
        V)``), a :class:`_Grouped`: the inputs with no source patched are ``R`` and those with every source patched
        the ablated input, and only the others are formed."""
        C, V = Mv.shape[0], Mv.shape[2]
        abl = self._ablated_input(s, rows) if bool(comp.any()) else None
        if k is None:
            at = torch.arange(V * C, device="cpu").view(V, C).T  # (c, v) -> row of out viewed (V * C, ...)
            cs, cv = torch.arange(C, device="cpu").repeat(V), comp.T.reshape(-1)
        else:
            cls = torch.where(k == 0, 0, torch.where(k == n, 1, 2))  # (C, V): R, ablated, formed here
            pairs = (cls == 2).T.nonzero()  # (P, 2) as (v, c), by destination input first
            at = torch.full((C, V), -1, dtype=torch.long, device=k.device)
            at[pairs[:, 1], pairs[:, 0]] = torch.arange(len(pairs), device=k.device)
            cs, cv = pairs[:, 1], comp[pairs[:, 1], pairs[:, 0]]
        flat = R.new_empty(len(cs), self.B, len(rows), self.d)
        # every term of every block at once: (c, u, v) with u patched into a cheap-side input, or unpatched into a
        # complement-side one (u < n: the sources read at s)
        mb, cc = Mv[:, :n].bool(), comp[:, None, :]
        owner = {u: (i, j) for i, blk in enumerate(blocks) for j, u in enumerate(blk[0])}
        # each block as a tuple of per-source views (shared blocks) or per-(source, mask) views (own blocks, row
        # u * C + c): one call per block rather than one indexing per term
        views = []
        for _, tensor, shared, is_full in blocks:
            t = _rows(tensor, rows, 2 if shared else 3) if (is_full and sub) else tensor
            views.append(t.unbind(0) if shared else t.flatten(0, 1).unbind(0))
        atl = at.tolist()
        terms: list[list] = [[] for _ in range(len(cs))]
        signs: list[list] = [[] for _ in range(len(cs))]
        for sign, pick in ((1, mb & ~cc), (-1, ~mb & cc)):
            for c, u, v in pick.nonzero().tolist():
                i, j = owner[u]
                p = atl[c][v]
                terms[p].append(views[i][j] if blocks[i][2] else views[i][j * C + c])
                signs[p].append(sign)
        # each input its base (R or the ablated input) plus or minus its terms, all of them in one pass over the
        # blocks (a block read by several inputs comes from memory once)
        R_c = R.unbind(0)
        bases = [abl if cvp else R_c[c] for c, cvp in zip(cs.tolist(), cv.tolist())]
        offsets = [0]
        for tp in terms:
            offsets.append(offsets[-1] + len(tp))
        signed_sums(
            bases,
            [t for tp in terms for t in tp],
            offsets,
            [x for sp in signs for x in sp],
            out=flat.unbind(0),
            backend=_backends.internal_backend("signed_sums_", flat.device),
        )
        if k is None:
            return flat.view(V, C, self.B, len(rows), self.d)
        return _Grouped(cls, flat, pairs, at, abl)

    def _corr_flat(self, blocks, Mv, rows, sub, R: torch.Tensor, comp: torch.Tensor, s: int):
        """The destination inputs ``(V, C, B, R, d)`` without positions, dense: the weighted source sum (weights
        ``Mv (C, n_src, V)``, :meth:`_weights_from`), every block multiply-added into one ``(V, C, B*R*d)`` output
        by a matmul (shared blocks) or a batched matmul over the masks (own blocks), without a tensor per block;
        then each input's base added, the residual ``R (C, B, R, d)`` or where ``comp (C, V)`` the all-ablated
        input of stage ``s`` (one :func:`~pypattern.ops.sums.signed_sums` call)."""
        C, V = Mv.shape[0], Mv.shape[2]
        nr = len(rows)
        N = self.B * nr * self.d
        out = torch.empty(V, C, N, dtype=self.dtype, device=self.device)
        beta = 0.0  # the first product overwrites the uninitialised output
        for src_idx, tensor, shared, is_full in blocks:
            m = Mv[:, src_idx]  # (C, u, V)
            if not bool(m.any()):
                continue
            if is_full and sub:
                tensor = tensor[:, :, rows] if shared else tensor[:, :, :, rows]
            u = m.shape[1]
            if shared:  # (u, B, R, d): out[v, c] += sum_u m[c, u, v] tensor[u]
                out.view(V * C, N).addmm_(
                    m.permute(2, 0, 1).reshape(V * C, u), tensor.reshape(u, N), beta=beta
                )
            else:  # (u, C, B, R, d): out[v, c] += sum_u m[c, u, v] tensor[u, c]
                rhs = tensor.reshape(u, C, N).transpose(0, 1)
                out.transpose(0, 1).baddbmm_(m.transpose(1, 2), rhs, beta=beta)
            beta = 1.0
        if beta == 0.0:  # no block has a term: every input is its base
            out.zero_()
        out = out.view(V, C, self.B, nr, self.d)
        if not bool(comp.any()):
            return out.add_(R)
        abl = self._ablated_input(s, rows)
        R_c = R.unbind(0)
        terms = [abl if a else R_c[c] for v, row in enumerate(comp.T.tolist()) for c, a in enumerate(row)]
        rows_out = out.view(V * C, self.B, nr, self.d).unbind(0)
        signed_sums(
            rows_out,
            terms,
            range(V * C + 1),
            [1] * (V * C),
            out=rows_out,
            backend=_backends.internal_backend("signed_sums_", out.device),
        )
        return out

    def _mlp_block(self, layer: int, out: torch.Tensor, rows: torch.Tensor):
        """The correction block ``A_u - out_u`` of MLP ``layer`` whose patched-run output ``out (C, B, R, d)`` is
        at ``rows``."""
        u = self.mlp_src[layer]
        A_new = _rows(self.A[u], rows, 1)
        return ([u], (A_new.unsqueeze(0) - out).unsqueeze(0), False, len(rows) == self.T)

    def _patched(self, M: torch.Tensor, s0: int, heads) -> torch.Tensor:
        """Metric ``(C, B)`` of the masks ``M (C, n_src, n_dst[, T])`` that all start at stage ``s0``; ``heads``:
        the only query heads recomputed at ``s0`` (None: all)."""
        C = M.shape[0]
        base, v = self.base, self.view
        H, Hk, nA = self.H, self.Hk, self.nA
        self._dead_cache = {}
        before = (self.src_stage < s0).nonzero().flatten()  # a prefix: sources are in topological order
        blocks = [(before.tolist(), self.D[: len(before)], True, True)] if len(before) else []
        rows = torch.arange(self.T, device=self.device)
        if self.uniform and s0 > 2 * (self.L - 1):  # past the last attention: only the metric row matters
            rows = torch.tensor([self.T - 1], device=self.device)
        R = base.resid[s0][:, rows].unsqueeze(0).expand(C, -1, -1, -1)
        for s in self.graph.stages:
            if s < s0:
                continue
            dsts = self.stage_dsts[s]
            if s == 2 * self.L:  # logits
                x = self._inputs(blocks, M, dsts, rows, R, s)
                return self._final(R if x is None else x[0])
            layer = s // 2
            if s % 2 == 1:  # the MLP of a sequential block
                x = self._inputs(blocks, M, dsts, rows, R, s, grouped=True)
                out = self._mlp_out(s, x, R, rows)
                R = R + out
                blocks.append(self._mlp_block(layer, out, rows))
                continue
            # attention of `layer` (and, in a parallel block, its MLP, reading the same residual)
            X = self._inputs(blocks, M, dsts[:nA], rows, R, s, grouped=True)
            X_m = self._inputs(blocks, M, dsts[nA:], rows, R, s, grouped=True) if self.parallel else None
            qrows = self._rows_after(layer, rows)
            full = len(qrows) == self.T
            srcs = self.head_srcs[layer]
            R_pre = R
            if heads is not None and s == s0:
                hs = torch.tensor(heads, dtype=torch.long, device="cpu")
                if len(heads):
                    kv = torch.tensor(v.kv_heads_of(heads), dtype=torch.long, device="cpu")
                    sel = torch.cat([hs, H + kv, H + Hk + kv])
                    if isinstance(X, _Grouped):
                        O = self._attn_grouped(layer, X, R, qrows, rows, list(heads))
                    else:
                        O = self._attn(layer, X[sel], qrows, rows, list(heads))  # (h, C, B, Tq, d)
                    O_base = base.outs[srcs[hs]][:, :, qrows]  # (h, B, Tq, d)
                    R = base.after_attn[layer][:, qrows].unsqueeze(0) + (O - O_base.unsqueeze(1)).sum(0)
                    # A_u - out_u, in O's storage (O is not needed any more), in one pass
                    A_hs = self.A[srcs[hs]][:, :, qrows].unsqueeze(1)
                    blocks.append((srcs[hs].tolist(), torch.sub(A_hs, O, out=O), False, full))
                else:  # no head input patched (a parallel block's MLP only): the attention is the base run's
                    R = base.after_attn[layer][:, qrows].unsqueeze(0).expand(C, -1, -1, -1)
                others = srcs[[h for h in range(H) if h not in heads]].tolist()
                if len(others):
                    blocks.append((others, self.D[others], True, True))
            else:
                if X is None:
                    O = self._attn_shared(layer, R, qrows, rows)
                elif isinstance(X, _Grouped):
                    O = self._attn_grouped(layer, X, R, qrows, rows)
                else:
                    O = self._attn(layer, X, qrows, rows)
                Rq = R if len(qrows) == len(rows) else R[:, :, qrows]
                R = v.add_attn_bias(layer, Rq + O.sum(0))
                # a layer's heads are adjacent sources: a view, not a gather
                A_heads = _rows(self.A[int(srcs[0]) : int(srcs[-1]) + 1], qrows, 2)
                blocks.append((srcs.tolist(), torch.sub(A_heads.unsqueeze(1), O, out=O), False, full))
            if self.parallel:
                if len(qrows) == len(rows):
                    out = self._mlp_out(s, X_m, R_pre, rows)
                else:  # the metric row only
                    out = v.mlp(layer, self._first_input(X_m, R_pre)[:, :, qrows])
                R = R + out
                blocks.append(self._mlp_block(layer, out, qrows))
            rows = qrows
        raise AssertionError("the graph has no logits stage")

    # ----- gradients ------------------------------------------------------------------------------------------
    def gradients(
        self, embeds: torch.Tensor, record: int | None = None, sink=None
    ) -> tuple[list, torch.Tensor]:
        """``dM/d(input)`` of every destination input for runs started from ``embeds (N, B, T, d)``, summed over
        the ``N`` runs.

        ``record``: the index of the run (of the ``N``) that is the base run; its node outputs and logits are
        recorded and become the engine's base run (an engine built with ``prepare_runs(..., defer_base=True)``),
        so the base prompts are run once, with the gradient, rather than once more without it.

        Returns
        -------
        grads : list of ``(dsts, rows, G)`` per stage: the destination indices ``(V,)``, the absolute positions
            ``(R,)`` where the metric can depend on them, and ``G (V, B, R, d)`` (query inputs of the last layer
            only at the metric's row in the uniform case: elsewhere their gradient is zero).
        metric : ``(N, B)``

        ``sink``: a callable that takes each list of ``(dsts, rows, G)`` entries as soon as they are final (an
        attention's query, key and value inputs together, inside the backward, then every other input in one list) instead of
        their being returned (``grads`` is then empty): each layer's per-head cotangents are used and freed while
        the backward goes on, never all held at once. The base run (``record``) is set before the backward, so
        ``D`` is there for the sink.
        """
        with self.fixed_weights():
            return self._gradients(embeds, record, sink)

    def _gradients(
        self, embeds: torch.Tensor, record: int | None = None, sink=None
    ) -> tuple[list, torch.Tensor]:
        v, g = self.view, self.graph
        rows = torch.arange(self.T, device=self.device)
        handles, val = [], None
        outs = None
        # a recorded run whose source values are this engine's own: D = A - out formed in A's storage as the
        # outputs come (no buffer of outputs, no pass over it afterwards)
        in_place = (
            record is not None and self.source_owned and self.A is not None and self._pending_source is None
        )
        if record is not None:  # node outputs of the recorded run; rows that are not computed are zero
            kept = torch.zeros(g.n_src, dtype=torch.bool, device=self.device)
            if in_place:
                outs = self.A
                outs[0].sub_(embeds[record])
            else:
                outs = huge_pages_hint(embeds.new_empty(g.n_src, *embeds.shape[1:]))
                outs[0] = embeds[record]
            kept[0] = True

        def keep(src: int, rows_: torch.Tensor, value: torch.Tensor) -> None:  # value (u, B, R, d)
            part = outs[src : src + value.shape[0]]
            if in_place:  # A - out; rows not computed keep A (their output is zero)
                if len(rows_) == self.T:
                    part.sub_(value)
                else:
                    part.index_add_(2, rows_, value, alpha=-1)
            elif len(rows_) == self.T:
                part.copy_(value)
            else:
                part.zero_().index_copy_(2, rows_, value)
            kept[src : src + value.shape[0]] = True

        with torch.enable_grad():
            R = R0 = embeds.detach().requires_grad_(True)
            for s in g.stages:
                dsts = self.stage_dsts[s]
                if s == 2 * self.L:
                    x = R.clone()
                    handles.append(("logits", dsts, rows, x))
                    logits = self._logits(x)
                    if outs is not None:
                        base_logits = logits[record].detach()
                        if not self.bound:
                            bind_metric(self.metric, base_logits)
                            on_base = metric_on(self.metric, base_logits, self.B).detach()
                            # the runs below read the metric on stacks of logits: it must give each run's values,
                            # and the backward differentiates the sum over examples: each example's own
                            check_metric_on_stacks(self.metric, base_logits, on_base, per_example=True)
                            self.bound = self._examples_checked = True
                    if not self._examples_checked:
                        # the backward differentiates the sum over examples: each must be computed from its own
                        # logits (a metric centred over the batch would give every edge a zero score)
                        first = logits.reshape(-1, self.B, logits.shape[-1])[0].detach()
                        check_metric_on_stacks(
                            self.metric, first, self.metric(first).detach(), per_example=True
                        )
                        self._examples_checked = True
                    val = self.metric(logits)
                    break
                layer = s // 2
                if s % 2 == 0:
                    qrows = self._rows_after(layer, rows)
                    store: list = []  # the head inputs' cotangents, filled by the backward
                    put = (
                        store.extend if sink is None else self._attn_sink(sink, dsts[: self.nA], qrows, rows)
                    )
                    q, k, vv = _QKV.apply(R, v, layer, qrows, rows, put)
                    z = v.attention(layer, q, k, vv, qrows, rows)
                    if outs is None:
                        attn = v.head_out_sum(layer, z)
                    elif z.shape[1] == 1:
                        # each head's write, as in the plain run (the same multiply-adds as their sum)
                        src = int(self.head_srcs[layer][0])
                        attn = _HeadsSum.apply(
                            z, v, layer, lambda i, O, src=src, r=qrows: keep(src + i, r, O[record][None])
                        )
                    else:  # the heads' sum in every run, each head's write in the recorded one only
                        with torch.no_grad():
                            keep(
                                int(self.head_srcs[layer][0]),
                                qrows,
                                v.head_out(layer, z[:, record : record + 1])[:, 0],
                            )
                        attn = v.head_out_sum(layer, z)
                    Rq = R if len(qrows) == len(rows) else R[:, :, qrows]
                    handles.append(("attn", dsts[: self.nA], (qrows, rows), store))
                    R_new = v.add_attn_bias(layer, Rq + attn)
                    if self.parallel:  # the MLP reads the block's input (at the rows that matter after it)
                        x = Rq.clone()
                        handles.append(("mlp", dsts[self.nA :], qrows, x))
                        out = v.mlp(layer, x)
                        if outs is not None:
                            keep(self.mlp_src[layer], qrows, out[record].detach()[None])
                        R_new = R_new + out
                    R = R_new
                    rows = qrows
                else:
                    x = R.clone()
                    handles.append(("mlp", dsts, rows, x))
                    out = v.mlp(layer, x)
                    if outs is not None:
                        keep(self.mlp_src[layer], rows, out[record].detach()[None])
                    R = R + out
            # the embeddings last: every attention's backward (_QKV) runs on the way to them
            tensors = [h[3] for h in handles if h[0] != "attn"] + [R0]
            if not val.requires_grad:
                raise ValueError(
                    "metric has no gradient with respect to the logits (it returned values without a grad_fn: "
                    "detached, or an accuracy); EAP and EAP-IG need a differentiable metric, use method='exact'"
                )
            if outs is not None and in_place:  # the base run is complete: D before the backward (for a sink)
                self._set_base(_Run(None, None, None, base_logits), D=outs)
            elif outs is not None:
                if not bool(kept.all()):
                    outs[~kept] = 0
                self._set_base(_Run(None, None, outs, base_logits))
            elif sink is not None and self.D is None:
                raise RuntimeError("EdgeEngine.gradients: a sink needs the base run (record it in this pass)")
            grads = torch.autograd.grad(val.sum(), tensors, allow_unused=True)
        out, i = [], 0

        def over_runs(x, dim):  # sum over the N runs (a view for one run)
            return x.select(dim, 0) if x.shape[dim] == 1 else x.sum(dim)

        rest = []  # the entries other than the attentions' for a sink: one call, so that they share products
        with torch.no_grad():  # the input cotangents are values: no graph through the weights
            for kind, dsts, info, t in handles:
                if kind == "attn" and sink is not None:
                    continue  # taken by the sink in the backward
                if kind == "attn":
                    qrows, rows_kv = info
                    gqi, gki, gvi = t
                    H, Hk = self.H, self.Hk
                    out.append((dsts[:H], qrows, gqi))
                    out.append((dsts[H : H + Hk], rows_kv, gki))
                    out.append((dsts[H + Hk : H + 2 * Hk], rows_kv, gvi))
                else:
                    gr = grads[i] if grads[i] is not None else torch.zeros_like(t)
                    i += 1
                    entry = (dsts, info, over_runs(gr, 0).unsqueeze(0))
                    (out if sink is None else rest).append(entry)
            if rest:
                sink(rest)
        return out, val.detach()

    def _attn_sink(self, sink, dsts: torch.Tensor, qrows: torch.Tensor, rows: torch.Tensor):
        """What :class:`_QKV`'s backward calls with an attention's head input cotangents ``(gq, gk, gv)``: hands
        them to ``sink`` as the query, key and value entries of :meth:`gradients`."""
        H, Hk = self.H, self.Hk

        def put(items) -> None:
            gq, gk, gv = items
            with torch.no_grad():
                sink(
                    [
                        (dsts[:H], qrows, gq),
                        (dsts[H : H + Hk], rows, gk),
                        (dsts[H + Hk : H + 2 * Hk], rows, gv),
                    ]
                )

        return put


_VJP_RUNS = None  # None: with several runs; True / False: always / never (tests compare the two)


class _QKV(torch.autograd.Function):
    """Queries, keys and values of one attention from the residual ``R (N, B, T, d)`` it reads (every head reads
    it). The backward forms each head's own input cotangent (:meth:`ModelView.qkv_input_vjp`, the edge scores need
    them), hands them to ``store`` (a callable taking the three) summed over the ``N`` runs and returns their sum
    over heads as ``R``'s: the projections' backward is done once, per head, instead of once more for the
    residual."""

    @staticmethod
    def forward(ctx, R, view, layer, qrows, rows, store):
        hn = view.attn_norm(layer, R)
        part = len(qrows) != len(rows)
        q, k, v, lin = view.qkv_shared(layer, hn[:, :, qrows] if part else hn, hn, qrows, rows, linear=True)
        ctx.save_for_backward(R, *lin)
        ctx.args = (view, layer, qrows, rows, store, part)
        return q, k, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        R, *lin = ctx.saved_tensors
        view, layer, qrows, rows, store, part = ctx.args
        # several runs: the head inputs' cotangents summed over them before the per-head matmuls
        if _VJP_RUNS is not False and (R.shape[0] > 1 or _VJP_RUNS):
            got = view.qkv_input_vjp_runs(layer, R, gq, gk, gv, qrows, rows, lin)
            if got is not None:
                store(list(got[:3]))
                return got[3], None, None, None, None, None
        Rq = R[:, :, qrows] if part else R
        # the residual's cotangent, the sum over heads, added up as each head's is made
        dR = torch.zeros(R.shape, dtype=gq.dtype, device=R.device)
        dRq = torch.zeros(Rq.shape, dtype=gq.dtype, device=R.device) if part else dR
        gqi, gki, gvi = view.qkv_input_vjp(layer, Rq, R, gq, gk, gv, qrows, rows, linear=lin, sums=(dRq, dR))
        if part:
            dR.index_add_(2, qrows, dRq)
        # summed over the runs here: the per-run cotangents of every layer are never held at once
        store([g.select(1, 0) if g.shape[1] == 1 else g.sum(1) for g in (gqi, gki, gvi)])
        return dR, None, None, None, None, None


class _HeadsSum(torch.autograd.Function):
    """The sum over heads of their writes to the residual stream, ``sum_h z_h @ W_O[h]``, from ``z (H, ..., T,
    dh)``, handing each head's write to ``put(h, O_h)`` (``O_h (..., T, d)``, a value) on the way: the forward is
    the per-head products (what a record needs) and the backward the plain one, ``g @ W_O^T`` with every head's
    columns in one product, instead of a batched product per head of the sum's broadcast cotangent."""

    @staticmethod
    def forward(ctx, z, view, layer, put):
        ctx.args = (view, layer)
        W_O = view.model.blocks[layer].attn.W_O
        H, dh, d = W_O.shape
        z3 = z.reshape(H, -1, dh)
        if not view._onednn_heads(z3, W_O):
            O = view.head_out(layer, z)
            for h in range(H):
                put(h, O[h])
            return O.sum(0)
        total = None  # each head's write made, handed over and added while it is in cache
        for h in range(H):
            O_h = view.head_product(z3, W_O, h).view(*z.shape[1:-1], d)
            put(h, O_h)
            total = O_h if total is None else (total + O_h if h == 1 else total.add_(O_h))
        return total

    @staticmethod
    def backward(ctx, g):
        view, layer = ctx.args
        W_O = view.model.blocks[layer].attn.W_O
        H, dh, d = W_O.shape
        gz = affine(g.reshape(-1, d), W_O.detach().reshape(H * dh, d).t(), None).view(*g.shape[:-1], H, dh)
        return gz.movedim(-2, 0), None, None, None


def _vocab_run_bytes(view: ModelView, metric, logits: torch.Tensor, grad: bool) -> int:
    """Bytes of one run's unembedding of ``(B, d_model)`` rows and of ``metric`` on ``logits (B, vocab)`` (with
    ``grad``: their backward too), counted by :func:`~pypattern.patching.engine.new_bytes` (every temporary, as if
    none were freed: an upper bound); :data:`~pypattern.patching.engine.FALLBACK_VOCAB_COPIES` logits-sized
    tensors when they cannot be counted (``metric`` None, or it fails under the counting)."""
    B, V = logits.shape
    fallback = FALLBACK_VOCAB_COPIES * B * V * max(logits.element_size(), 4) * (2 if grad else 1)
    if metric is None:
        return fallback
    x = torch.zeros(1, B, view.d_model, dtype=logits.dtype, device=logits.device)
    L = logits.detach()[None]

    def one_run() -> None:
        if not grad:
            view.unembed(x)
            metric(L)
            return
        xg = x.clone().requires_grad_()
        out = view.unembed(xg)
        torch.autograd.grad(out, xg, torch.ones_like(out))
        Lg = L.clone().requires_grad_()
        m = metric(Lg)
        if isinstance(m, torch.Tensor) and m.requires_grad:
            torch.autograd.grad(m.sum(), Lg)

    with torch.enable_grad() if grad else torch.no_grad():
        got = new_bytes(one_run)
    return fallback if got is None else got


def _check_real(m) -> None:
    """Refuse metric values that are complex: scores, faithfulness and gradients are defined for real metrics only
    (a complex value would lose its imaginary part in a patched run's values, or stop the backward). For the values
    on stacks of runs; the first run's go through ``metric_on``, whose check refuses them the same way."""
    if isinstance(m, torch.Tensor) and m.is_complex():
        raise ValueError(
            f"metric returned complex values ({m.dtype}); it must map logits (..., batch, vocab) to real numbers "
            "(..., batch)"
        )


def _scored(m, dtype: torch.dtype):
    """Metric values ``m`` of integer or bool dtype (an accuracy, a rank) in the dtype of the engine's values for a
    model of ``dtype``, so that differences of them are scores; float values as they are; complex values are
    refused."""
    _check_real(m)
    if isinstance(m, torch.Tensor) and not m.is_floating_point():
        return m.to(torch.promote_types(dtype, torch.float32))
    return m


def _rows(t: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` at the positions ``rows`` along ``dim``: a view when they are consecutive (all rows, or the last)."""
    n = len(rows)
    if n == 1:
        return t.narrow(dim, int(rows), 1)
    if n:
        r0, r1 = rows[[0, -1]].tolist()
        if r1 - r0 == n - 1:
            return t.narrow(dim, r0, n)
    return t.index_select(dim, rows)


def _node_run(view: ModelView, graph: EdgeGraph, x0: torch.Tensor, pos) -> _Run:
    """A plain forward from embeddings ``x0 (B, T, d)`` recording the residual at every stage and every node's
    output."""
    B, T, d = x0.shape
    outs = [x0]
    resid, after_attn = {}, []
    R = x0
    rows = torch.arange(T, device=x0.device)
    for s in graph.stages:
        resid[s] = R
        if s == 2 * view.n_layers:
            break
        layer = s // 2
        if s % 2 == 0:
            pre = R
            hn = view.attn_norm(layer, R)
            q, k, v = view.qkv_shared(layer, hn, hn, rows, rows)
            O = view.head_out(layer, view.attention(layer, q, k, v, rows, rows))  # (H, B, T, d)
            R = view.add_attn_bias(layer, R + O.sum(0))
            after_attn.append(R)
            outs += list(O)
            if view.parallel:  # the MLP reads the block's input
                out = view.mlp(layer, pre)
                R = R + out
                outs.append(out)
        else:
            out = view.mlp(layer, R)
            R = R + out
            outs.append(out)
    if isinstance(pos, int):
        x = R[:, pos]
    else:
        x = R[torch.arange(B, device=R.device), pos]
    return _Run(resid, after_attn, torch.stack(outs), view.unembed(x))


def _outputs_run(view: ModelView, graph: EdgeGraph, x0: torch.Tensor, pos) -> _Run:
    """A plain forward from embeddings ``x0 (B, T, d)`` recording only every node's output and the logits at the
    metric positions (no residuals: a run for edge attribution, not for patching). With one metric position (the
    last), the last layer runs at that row only, but for its keys and values, and its nodes' outputs are zero at the
    other rows (no edge score reads them)."""
    B, T, d = x0.shape
    H, L = view.n_heads, view.n_layers
    outs = huge_pages_hint(x0.new_empty(graph.n_src, B, T, d))
    outs[0] = x0
    i, R, rows = 1, x0, torch.arange(T, device=x0.device)

    def put(k: int, value: torch.Tensor) -> None:  # value (k, B, Tq, d) at the rows computed
        if value.shape[2] == T:
            outs[i : i + k] = value
        else:
            outs[i : i + k, :, : T - 1].zero_()
            outs[i : i + k, :, T - 1 :] = value

    for layer in range(L):
        qrows = torch.tensor([T - 1], device=x0.device) if isinstance(pos, int) and layer == L - 1 else rows
        part = len(qrows) != T
        hn = view.attn_norm(layer, R)
        q, k, v = view.qkv_shared(layer, hn[:, qrows] if part else hn, hn, qrows, rows)
        z = view.attention(layer, q, k, v, qrows, rows)
        W_O = view.model.blocks[layer].attn.W_O
        if (
            part
            or z.dtype != outs.dtype
            or W_O.dtype != outs.dtype
            or (torch.is_grad_enabled() and (z.requires_grad or W_O.requires_grad))
        ):
            O = view.head_out(layer, z)  # (H, B, Tq, d)
            put(H, O)
        else:  # every row: the writes go straight into the record (no copy)
            O = view.head_out(layer, z, out=outs[i : i + H])
        pre = R[:, qrows] if part else R
        R = view.add_attn_bias(layer, pre + O.sum(0))
        i += H
        if view.has_mlp:
            out = view.mlp(layer, pre if view.parallel else R)
            R = R + out
            put(1, out[None])
            i += 1
    x = R[:, -1] if isinstance(pos, int) else R[torch.arange(B, device=R.device), pos]
    return _Run(None, None, outs, view.unembed(x))


@torch.no_grad()
def check_graph(view: ModelView, graph: EdgeGraph) -> None:
    """Refuse a graph built for another model (other layer, head or key/value-head counts, block layout or
    MLPs), naming both."""
    if (graph.n_heads, graph.n_kv_heads, graph.n_layers, graph.parallel, graph.has_mlp) != (
        view.n_heads,
        view.n_kv_heads,
        view.n_layers,
        view.parallel,
        view.has_mlp,
    ):
        raise ValueError(
            f"the graph ({graph!r}, n_kv_heads={graph.n_kv_heads}, parallel={graph.parallel}, has_mlp="
            f"{graph.has_mlp}) does not match the model (n_layers={view.n_layers}, n_heads={view.n_heads}, "
            f"n_kv_heads={view.n_kv_heads}, parallel={view.parallel}, has_mlp={view.has_mlp}); build it with "
            "edges(model)"
        )


_CALL_WARNED: contextvars.ContextVar[bool] = contextvars.ContextVar("pypattern_circuit_warned", default=False)


@contextlib.contextmanager
def call_warned() -> Iterator[None]:
    """The runs prepared inside give none of the once-per-call warnings (``corrupted`` not read,
    :func:`warn_if_corrupted_unread`; zero ablation's rounding, :meth:`EdgeEngine.run`): the public function that
    prepares them is warned for (or had nothing to warn of)."""
    token = _CALL_WARNED.set(True)
    try:
        yield
    finally:
        _CALL_WARNED.reset(token)


def warn_if_corrupted_unread(call: str, corrupted, mode: str, ablation: str) -> None:
    """Warn when ``corrupted`` is given but no run reads it: noising with zero ablation patches zeros into the clean
    run, so results are the same whatever corrupted prompts are given. Every circuit function prepares its runs
    with :func:`prepare_runs`, which calls this once per call."""
    if corrupted is None or mode != "noise" or ablation != "zero" or _CALL_WARNED.get():
        return
    from ..sampling.diagnostics import user_stacklevel

    warnings.warn(
        f"{call}: corrupted is given but not read: mode='noise' with ablation='zero' patches zeros into the clean "
        "run, so the corrupted prompts change nothing; leave corrupted out (None), or give ablation='resample' "
        "(their activations) or 'mean' (their per-position mean)",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def corruption_args(corrupted, ablation, mean_mask, mode: str, call: str):
    """``corrupted``, ``ablation`` and ``mean_mask`` as the circuits functions read them, with the corruption
    objects of :mod:`pypattern.patching` mapped to what they mean exactly: ``corrupted=TokenReplacement(t)`` is
    ``corrupted=t``; ``ablation=ZeroAblation()`` is ``"zero"``; ``ablation=MeanAblation(reference_tokens,
    attention_mask)`` is ``"mean"`` over ``reference_tokens`` (``corrupted``; the clean batch when None) with
    ``attention_mask`` as ``mean_mask``. What has no exact counterpart (:class:`GaussianNoise`, a mean over
    reference prompts in the denoising frame, a setting given twice) is refused, naming what to pass. Anything
    else is returned as given (checked by :func:`prepare_runs`)."""
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not valid; choose 'noise' or 'denoise'")
    if isinstance(corrupted, TokenReplacement):
        corrupted = corrupted.corrupted_tokens
    elif isinstance(corrupted, ZeroAblation | MeanAblation):
        name = "zero" if isinstance(corrupted, ZeroAblation) else "mean"
        raise TypeError(
            f"{call}: corrupted={type(corrupted).__name__}(...) is an ablation, not corrupted prompts: give it as "
            f"ablation={type(corrupted).__name__}(...) (or ablation={name!r})"
        )
    elif isinstance(corrupted, GaussianNoise) or isinstance(ablation, GaussianNoise):
        which = "corrupted" if isinstance(corrupted, GaussianNoise) else "ablation"
        raise TypeError(
            f"{call}: {which}=GaussianNoise(...) is not supported by the circuits functions (their runs start from "
            "token embeddings, without noise); give corrupted prompts (a LongTensor, or TokenReplacement(tokens)) "
            "with ablation='resample', or ablation='mean' / 'zero' (MeanAblation() / ZeroAblation())"
        )
    elif isinstance(corrupted, Corruption):
        raise TypeError(
            f"{call}: corrupted={type(corrupted).__name__}(...) is not supported; give corrupted prompts (a "
            "LongTensor (batch, pos), or TokenReplacement(tokens))"
        )
    if isinstance(ablation, TokenReplacement):
        raise TypeError(
            f"{call}: ablation=TokenReplacement(...) gives corrupted prompts: pass them as corrupted=... (the tokens "
            "or the TokenReplacement) with ablation='resample'"
        )
    if isinstance(ablation, ZeroAblation):
        return corrupted, "zero", mean_mask
    if not isinstance(ablation, MeanAblation):
        if isinstance(ablation, Corruption):
            raise TypeError(
                f"{call}: ablation={type(ablation).__name__}(...) is not supported; choose 'resample', 'mean' or "
                "'zero' (or ZeroAblation() / MeanAblation())"
            )
        return corrupted, ablation, mean_mask
    ref, mask = ablation.reference_tokens, ablation.attention_mask
    if mask is not None and mean_mask is not None:
        raise ValueError(
            f"{call}: mean_mask is given and ablation=MeanAblation(attention_mask=...) too: give the mask of the "
            "mean once"
        )
    if ref is None:
        if mode == "noise" and corrupted is not None:
            raise ValueError(
                f"{call}: ablation=MeanAblation() takes its mean over the clean batch (its reference_tokens is None), "
                "but corrupted is given, which mode='noise' would average instead: leave corrupted out, or give "
                "MeanAblation(reference_tokens=corrupted) (or ablation='mean') for the mean over the corrupted prompts"
            )
        # noising without corrupted prompts, or denoising (the clean run is the source): the clean batch's mean
        return corrupted, "mean", mask if mask is not None else mean_mask
    if mode != "noise":
        raise ValueError(
            f"{call}: ablation=MeanAblation(reference_tokens=...) with mode={mode!r}: the denoising frame patches the "
            "clean run's values (with a mean ablation, their mean over the clean batch) into the corrupted run, so "
            "other reference prompts cannot be honoured; give MeanAblation() (or ablation='mean'), or mode='noise'"
        )
    if corrupted is not None:
        raise ValueError(
            f"{call}: corrupted is given and ablation=MeanAblation(reference_tokens=...) too; in mode='noise' the "
            "mean is over one set of prompts: give the reference prompts once (as reference_tokens, or as corrupted "
            "with ablation='mean')"
        )
    return ref, "mean", mask if mask is not None else mean_mask


def _mean_with_mask(mean_mask, keep: torch.Tensor | None, mode: str, corrupted):
    """The ``mean_mask`` of ``ablation="mean"`` under the runs' attention mask ``keep (batch, pos)`` (bool, or
    None), by :func:`~pypattern.patching.api.mean_mask_under`'s rules (a mean over reference prompts of their own,
    noising with ``corrupted``, takes their own ``mean_mask``)."""
    refs = mode == "noise" and corrupted is not None
    return mean_mask_under(
        keep, mean_mask, refs, "ablation='mean'", "mean_mask", ", or use ablation='resample' or 'zero'"
    )


def prepare_runs(
    model,
    graph: EdgeGraph | None,
    clean: torch.Tensor,
    corrupted: torch.Tensor | None,
    metric,
    mode: str = "noise",
    ablation: str = "resample",
    max_batch: int | None = None,
    memory_budget: float = 1e9,
    view: ModelView | None = None,
    defer_base: bool = False,
    call: str = "prepare_runs",
    mean_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[EdgeEngine, dict]:
    """Run the clean, corrupted and source prompts and build the :class:`EdgeEngine`.

    Returns the engine and a dict with ``m_clean`` and ``m_base`` metric values ``(batch,)`` (the clean run's and
    the base run's: clean for noising, corrupted for denoising), ``T`` and ``pos``.

    ``defer_base``: do not run the base prompts; the engine's base run is recorded by its first
    :meth:`EdgeEngine.gradients` call with ``record`` set (edge attribution: the base prompts run once, with the
    gradient). ``m_base`` (and in noising mode ``m_clean``) are then None; read :meth:`EdgeEngine.base_metric`
    after that call.

    Warns (naming ``call``, the public function the runs are for) when ``corrupted`` is given but no run reads it
    (:func:`warn_if_corrupted_unread`).

    ``mean_mask``: with ``ablation="mean"``, ``(batch, pos)`` 0/1 of the source prompts (1 a real token, right
    padding): the mean at each position is over the prompts real there (0 where none is); refused with another
    ablation.

    ``attention_mask``: ``(batch, pos)`` of the clean prompts, shared by the corrupted ones (checked by
    :func:`~pypattern.patching.api.patching_mask`). With padding, every run (the base, source and patched runs,
    the gradient runs) computes under it (:meth:`ModelView.set_mask`): each row's real tokens as its prompt
    alone. The metric must read real tokens; a mean ablation takes the mask as its ``mean_mask`` (right padding;
    left padding is refused, as :func:`~pypattern.patching.api.mean_with_mask` refuses it), but for reference
    prompts of their own (noising with ``corrupted``), which run unmasked under their own ``mean_mask``.
    """
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not valid; choose 'noise' or 'denoise'")
    corrupted, ablation, mean_mask = corruption_args(corrupted, ablation, mean_mask, mode, call)
    if not isinstance(ablation, str) or ablation not in _ABLATIONS:
        raise ValueError(
            f"ablation={ablation!r} is not valid; choose 'resample', 'mean' or 'zero' (or "
            "pypattern.patching's ZeroAblation() / MeanAblation())"
        )
    view = ModelView(model) if view is None else view
    graph = EdgeGraph.from_model(model) if graph is None else graph
    check_graph_arg(graph)
    check_graph(view, graph)  # before any run is sized by the graph
    d_vocab = model.cfg.d_vocab
    clean = check_tokens(clean, "clean", d_vocab)
    if corrupted is not None:
        corrupted = check_tokens(corrupted, "corrupted", d_vocab)
    B, T_full = clean.shape
    keep = patching_mask(attention_mask, (B, T_full))
    # noising with a mean ablation reads corrupted only through its per-position mean: any number of reference
    # prompts of the clean prompts' length (as MeanAblation's reference_tokens)
    any_batch = mode == "noise" and ablation == "mean"
    if corrupted is not None and corrupted.shape != clean.shape:
        if not any_batch or corrupted.shape[1] != T_full:
            also = (
                f" (with mode='noise' and ablation='mean', which reads only their per-position mean: any number of "
                f"prompts of length {T_full})"
                if any_batch
                else " (any number of prompts of that length with mode='noise' and ablation='mean')"
            )
            raise ValueError(
                f"corrupted has shape {tuple(corrupted.shape)}; it must equal the clean shape {(B, T_full)}{also}"
            )
    if corrupted is None and (ablation == "resample" or mode == "denoise"):
        raise ValueError(
            f"corrupted=None: mode={mode!r} with ablation={ablation!r} needs corrupted prompts "
            "(or use mode='noise' with ablation='mean' or 'zero')"
        )
    warn_if_corrupted_unread(call, corrupted, mode, ablation)
    if mean_mask is not None and ablation != "mean":
        raise ValueError(
            f"mean_mask is given with ablation={ablation!r}: it masks the per-position mean of "
            "ablation='mean' only; give ablation='mean' or leave mean_mask out"
        )
    if mean_mask is not None:
        # the mask of the prompts the mean is over: corrupted when noising with them, else the clean ones
        src = corrupted if mode == "noise" and corrupted is not None else clean
        mean_mask = checked_mean_mask(mean_mask, "mean_mask", tuple(src.shape))
    if ablation == "mean":
        mean_mask = _mean_with_mask(mean_mask, keep, mode, corrupted)
    if graph.per_position and graph.n_pos != T_full:
        raise ValueError(f"the graph has n_pos={graph.n_pos} positions; the prompts have {T_full}")
    limit = model.cfg.max_positions
    # the positions the runs read: under a mask with padding each row's real tokens at 0 .. n-1 (the longest
    # prompt's n, whatever the padded length); without one, and for a mean ablation's reference prompts (run
    # unmasked), every column
    unmasked_refs = ablation == "mean" and mode == "noise" and corrupted is not None
    padded = keep is not None and not bool(keep.all())
    longest = int(keep.sum(1).max()) if padded and not unmasked_refs else T_full
    if limit is not None and longest > limit:
        if longest == T_full:
            raise ValueError(
                f"clean has {T_full} positions; the model's n_ctx (learned positions) is {limit}: give prompts of "
                f"at most {limit} tokens"
            )
        raise ValueError(
            f"clean's longest prompt has {longest} real tokens under attention_mask; the model's n_ctx (learned "
            f"positions) is {limit}: give prompts of at most {limit} tokens"
        )
    pos = metric_positions(metric, B, T_full)
    check_positions_real(keep, pos)
    T = (pos if isinstance(pos, int) else int(pos.max())) + 1
    clean, corrupted = clean[:, :T], (corrupted[:, :T] if corrupted is not None else None)
    mean_mask = mean_mask[:, :T] if mean_mask is not None else None
    view.set_mask(None if keep is None else keep[:, :T])  # (a mask without padding: none)
    # the runs are on the model's device: prompts and per-example positions go there (no copy when they are)
    device = view.device
    clean = clean.to(device)
    corrupted = corrupted.to(device) if corrupted is not None else None
    if not isinstance(pos, int):
        pos = pos.to(device)
    if mode == "noise":
        base_tokens, src_tokens = clean, (corrupted if corrupted is not None else clean)
    else:
        base_tokens, src_tokens = corrupted, clean
    # the runs' products as the engine's patched runs and gradients compute them (EdgeEngine.fixed_weights)
    weights = (list(model.parameters()), block_weight_bytes(model))  # found once, for the engine too
    with frozen_fixed_weights(model, *weights):
        engine, info = _record_runs(
            view, graph, clean, metric, mode, ablation, max_batch, memory_budget, defer_base, pos, T, B,
            base_tokens, src_tokens, mean_mask,
        )  # fmt: skip
    engine._weights = weights
    engine.call = call
    return engine, info


def _record_runs(
    view, graph, clean, metric, mode, ablation, max_batch, memory_budget, defer_base, pos, T, B, base_tokens,
    src_tokens, mean_mask=None,
) -> tuple[EdgeEngine, dict]:  # fmt: skip
    """:func:`prepare_runs` after its checks: the runs, and the engine built on them."""
    x_clean = view.embed(clean)
    x_base = x_clean if mode == "noise" else view.embed(base_tokens)
    clean_run, m_clean = None, None
    # without a base run to patch, the clean and source runs need only their node outputs (and logits)
    node_run = _outputs_run if defer_base else _node_run
    if not (defer_base and mode == "noise"):  # the clean run is the base run, recorded later
        clean_run = node_run(view, graph, x_clean, pos)
        bind_metric(metric, clean_run.logits.detach())
        m_clean = metric_on(metric, clean_run.logits, B)  # (which refuses complex values)
        check_metric_on_stacks(metric, clean_run.logits.detach(), m_clean)
        m_clean = _scored(m_clean, view.dtype)
    if defer_base:
        base = None
    else:
        base = clean_run if mode == "noise" else _node_run(view, graph, x_base, pos)
    src_embed = None
    if ablation == "zero":
        A = torch.zeros_like(base.outs) if base is not None else "zero"
        src_embed = torch.zeros_like(x_base)
    elif src_tokens is clean and clean_run is None:  # the source run is the base run, still to be recorded
        A = ablation  # "resample" cannot reach here: it needs corrupted prompts, the source in noising mode
        src_embed = masked_mean(x_clean, mean_mask, 0, 1).expand_as(x_clean)
    else:
        # a reference batch of another size (mean ablation): its node outputs at every row its mean is read at
        src_pos = (
            pos if isinstance(pos, int) or src_tokens.shape[0] == B else pos.new_zeros(src_tokens.shape[0])
        )
        if src_tokens is clean:
            src_run = clean_run
        else:
            # a mean ablation's reference prompts run unmasked (their own mean_mask masks the mean)
            own = view.unmasked() if ablation == "mean" else contextlib.nullcontext()
            with own:
                src_run = node_run(view, graph, view.embed(src_tokens), src_pos)
        A = src_run.outs
        if ablation == "mean":
            A = masked_mean(A, mean_mask, 1, 2).expand(A.shape[0], B, *A.shape[2:])
    engine = EdgeEngine(
        view, graph, base, A, x_base, metric, pos, T, max_batch, memory_budget, src_embed=src_embed
    )
    engine.mean_mask = mean_mask  # the pending mean (a base run still to be recorded) reads it
    engine.keep = view.keep
    engine.bound = clean_run is not None
    engine.ablation = ablation
    # one run's logits and the metric's temporaries, counted once
    if max_batch is None and clean_run is not None:
        engine._vocab_run[defer_base] = _vocab_run_bytes(view, metric, clean_run.logits, defer_base)
    # a resample run's outputs are the engine's alone (the clean run, when it is the source, is not the base)
    engine.source_owned = defer_base and ablation == "resample" and isinstance(A, torch.Tensor)
    if engine.source_owned:  # the embedding's source values, a view of A[0] (which may become D[0])
        engine.src_embed = engine.src_embed.clone()
    m_base = engine.base_metric() if base is not None else None
    info = {"m_clean": m_clean, "m_base": m_base, "T": T, "pos": pos}
    return engine, info
