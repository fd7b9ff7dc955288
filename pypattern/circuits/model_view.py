"""The one place where the circuits code touches the model's arithmetic.

Edge patching needs the model split at its residual-stream reads and writes: every head reads its query input, every
key/value head its key and value input, every MLP its own input, and every head's output ``z_h @ W_O[h]`` is a
separate write. :class:`ModelView` exposes exactly those pieces for a :class:`~pypattern.models.Transformer`,
calling the model's own modules and methods (its norms, :meth:`Attention.rotate`, :meth:`Attention.attn_mask`,
its MLP, embedding and unembedding), so every architecture the Transformer represents is covered: LayerNorm,
RMSNorm or no norm; learned, rotary (full or partial, GPT-NeoX or GPT-J pairing) or no positions; grouped-query and
multi-query attention; gated MLPs; attention and MLP in parallel; any subset of biases; tied embeddings; a custom
attention scale; sliding-window attention. Everything in :mod:`pypattern.circuits` goes through it.

Every method accepts any number of leading dimensions (masks, interpolation steps, batch) before the position
axis; per-head tensors put the head first, ``(heads, ..., pos, features)``, so that each head's projection is one
batched matmul. The residual stream of a sequential block is

``resid_mid = resid_pre + sum_h head_out_h + b_O``, ``resid_post = resid_mid + mlp(resid_mid)``;

with ``parallel`` (attention and MLP reading the same residual) ``resid_post = resid_pre + sum_h head_out_h +
b_O + mlp(resid_pre)``. ``b_O`` belongs to no head: it is a constant of the residual stream, never patched. The
MLP's output includes its output bias.

Query and key inputs are un-rotated residual vectors: a head's query input is normalised, projected (plus bias) and
then rotated at the absolute positions of its rows, the same for keys. With grouped-query attention (``n_kv_heads <
n_heads``) key/value head ``g`` is shared by query heads ``g * G .. (g + 1) * G - 1`` (``G = n_heads //
n_kv_heads``); it has one key input and one value input, shared by its group (the split-qkv inputs of
TransformerLens' grouped-query attention), so an edge into ``L{l}KV{g}.k`` changes the keys every head of the group
reads.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ..models.transformer import affine

__all__ = ["ModelView"]

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> signature of its passed check


def refuse_unsupported(cfg) -> None:
    """Refuse (``NotImplementedError``, naming the option) a model configuration whose head-level edges are not
    defined or not linear in the head inputs: sandwich norms, a residual multiplier, clamped projections, one query
    norm over every head."""
    if getattr(cfg, "use_normalization_before_and_after", False):
        raise NotImplementedError(
            "use_normalization_before_and_after=True (sandwich norms, as in Gemma 2 and 3): each attention's "
            "output is normalised as a whole before it enters the residual stream, so a head's write is not "
            "its own term of the stream and head-level edges are not defined; node-level patching and "
            "attribution (pypattern.patching) cover these models"
        )
    if getattr(cfg, "residual_multiplier", None) is not None:
        raise NotImplementedError(
            f"residual_multiplier={cfg.residual_multiplier!r} (Granite): the edge graph's node outputs are the "
            "unscaled head and MLP outputs; node-level patching and attribution (pypattern.patching) cover these "
            "models"
        )
    if getattr(cfg, "clip_qkv", None) is not None:
        raise NotImplementedError(
            f"clip_qkv={cfg.clip_qkv!r} (OLMo): the clamped query, key and value projections are not linear in "
            "the head inputs, which the edge attribution's closed-form backward needs; node-level patching and "
            "attribution (pypattern.patching) cover these models"
        )
    if getattr(cfg, "qk_norm", False) == "all":
        raise NotImplementedError(
            "qk_norm='all' (OLMo 2, OLMoE): one norm over every head's query projection couples the heads, so a "
            "head's query cannot be computed from its own input alone and head-level edges are not defined; "
            "node-level patching and attribution (pypattern.patching) cover these models"
        )


class ModelView:
    """Per-block pieces of a :class:`~pypattern.models.Transformer` for edge-level computations.

    Parameters
    ----------
    model : Transformer
    check : bool
        Run the view's own forward on a short probe prompt and compare its logits with ``model``'s (a model whose
        architecture the view does not cover fails here instead of giving wrong circuits).

    Attributes
    ----------
    n_layers, n_heads, n_kv_heads, d_model, d_head : int
    n_groups : int
        Query heads per key/value head.
    has_mlp : bool
    parallel : bool
        Attention and MLP of a block read the same residual (the MLP does not see its own block's heads).
    """

    def __init__(self, model, check: bool = True) -> None:
        from ..models.transformer import Transformer

        if not isinstance(model, Transformer):
            raise TypeError(
                f"model is a {type(model).__name__}; the circuits module needs pypattern's Transformer "
                "(convert other models with pypattern.models first)"
            )
        cfg = model.cfg
        refuse_unsupported(cfg)
        self.model, self.cfg = model, cfg
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        self.n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
        self.n_groups = self.n_heads // self.n_kv_heads
        self.d_model, self.d_head = cfg.d_model, cfg.d_head
        self.has_mlp = not cfg.attn_only
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False)) and self.has_mlp
        self.rotary = bool(getattr(cfg, "rotary", False))
        self.dtype = model.embed.W_E.dtype
        # the runs' attention mask (set_mask): ``keep (B, T)`` bool, True at a real token, and ``pos_ids (B, T)``
        # each row's positions; None without padding
        self.keep: torch.Tensor | None = None
        self.pos_ids: torch.Tensor | None = None
        if check:
            sig = self._signature()
            if _CHECKED.get(model) != sig:
                self._check()
                _CHECKED[model] = sig

    def set_mask(self, keep: torch.Tensor | None) -> None:
        """Compute every later run under the attention mask ``keep (B, T)`` (bool, True: a real token), as the model's
        masked forward does (:meth:`Transformer.forward <pypattern.models.Transformer.forward>` with
        ``attention_mask=keep`` and ``position_ids = real_token_positions(keep)``, 0 at padding): padding keys are
        masked out of every softmax on top of the causal (and sliding-window) mask, a query left with no key gets a
        pattern of zeros, and learned positions, rotary angles and ALiBi biases are read at each row's positions,
        so each row's real tokens are computed as its prompt alone. The runs' tensors hold the batch ``B`` right
        before the position axis. None, or a mask without padding: the unmasked runs."""
        from ..patching.api import masked_position_ids

        if keep is None or bool(keep.all()):
            self.keep = self.pos_ids = None
            return
        keep = keep.to(self.device, torch.bool)
        self.keep = keep
        self.pos_ids = masked_position_ids(keep)

    @contextlib.contextmanager
    def unmasked(self) -> Iterator[None]:
        """The runs inside take no attention mask (prompts of another batch: a mean ablation's reference
        prompts)."""
        keep, pos = self.keep, self.pos_ids
        self.keep = self.pos_ids = None
        try:
            yield
        finally:
            self.keep, self.pos_ids = keep, pos

    @property
    def device(self) -> torch.device:
        """The device of the model's weights (its embedding's): where the circuits compute."""
        return self.model.embed.W_E.device

    # ----- heads ---------------------------------------------------------------------------------------------
    def kv_heads_of(self, heads: list[int] | None) -> list[int] | None:
        """The key/value heads the query heads ``heads`` read, sorted (None: all)."""
        if heads is None:
            return None
        return sorted({h // self.n_groups for h in heads})

    def _sel(self, W: torch.Tensor, idx: list[int] | None) -> torch.Tensor:
        """``W`` at the heads ``idx`` along its first dimension: a view when they are consecutive."""
        if idx is None:
            return W
        idx = list(idx)
        if idx and idx == list(range(idx[0], idx[0] + len(idx))):
            return W if len(idx) == W.shape[0] else W.narrow(0, idx[0], len(idx))
        return W[torch.as_tensor(idx, dtype=torch.long, device=W.device)]

    # ----- embedding and unembedding -------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus positional embedding, one node: ``(batch, pos)`` -> ``(batch, pos, d_model)`` (under a mask,
        learned positions at each row's positions)."""
        if self.pos_ids is None:
            return self.model.embed_tokens(tokens)
        return self.model.embed_tokens(tokens, self.pos_ids)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding (tied or not, with its bias if any): ``(..., d_model)`` -> ``(..., d_vocab)``."""
        return self.model.unembed(self.model.ln_final(x))

    # ----- attention (head-first layout: per-head tensors are (heads, ..., pos, features)) ------------------
    def attn_norm(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The norm in front of attention, on any ``(..., d_model)`` (each head input normalised on its own).

        pypattern's LayerNorm without hooks or ``compute_dtype`` runs as torch's fused ``layer_norm`` with its
        weight and bias in the kernel (one pass over the per-head inputs; the module adds them in a second pass),
        equal to float rounding; any other norm is the model's module."""
        ln = self.model.blocks[layer].ln1
        if self._fused_ln(ln):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], ln.gain, ln.b, ln.eps)
        return ln(x)

    @staticmethod
    def _fused_ln(ln) -> bool:
        from ..models.transformer import LayerNorm

        return (
            type(ln) is LayerNorm
            and ln.compute_dtype is None
            and not (ln.hook_scale.active or ln.hook_normalized.active)
            and not (ln._forward_hooks or ln._forward_pre_hooks)
        )

    def _rotate(self, layer: int, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """The model's rotary embedding of head-first ``x (h, ..., T, d_head)`` at absolute positions ``pos (T,)``
        (identity without rotary positions); under a mask (:meth:`set_mask`) ``pos`` are columns and ``x`` is
        ``(h, ..., B, T, d_head)``, rotated at each row's positions there."""
        if not self.rotary:
            return x
        if pos is None:
            pos = torch.arange(x.shape[-2])
        pos = pos.to(x.device)
        if self.pos_ids is not None:
            pos = self.pos_ids[:, pos]  # (B, T)
        return self.model.blocks[layer].attn.rotate(x.unsqueeze(-2), pos).squeeze(-2)

    #: per-head products of at least this many multiply-adds go through oneDNN's matmul where the process uses it
    #: for fixed weights: on the EPYC of docs/benchmarks.md twelve (256, 768) x (768, 64) products took 3.6 ms
    #: that way against 4.3 ms in MKL's batched matmul (a cold cache); small ones stay with bmm (one call)
    ONEDNN_HEAD_MACS = 2**23

    @staticmethod
    def _bproj(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Per-head projection ``(h, ..., T, d) x (h, d, dh) (+ b (h, dh))`` -> ``(h, ..., T, dh)``."""
        h, d = x.shape[0], x.shape[-1]
        y = ModelView.heads_mm(x.reshape(h, -1, d), W).view(*x.shape[:-1], W.shape[-1])
        return y if b is None else y + b.view(h, *([1] * (x.dim() - 2)), -1)

    @staticmethod
    def heads_mm(x3: torch.Tensor, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head products ``x3 (h, rows, k) x W (h, k, n)`` -> ``(h, rows, n)`` (into ``out``, contiguous, when
        given): one oneDNN product per head where :meth:`_onednn_heads` allows (MKL's batched matmul runs these
        shapes, with ``k`` or ``n`` a head's width, at about half oneDNN's rate), else one batched matmul."""
        h = x3.shape[0]
        if not ModelView._onednn_heads(x3, W):
            return torch.bmm(x3, W) if out is None else torch.bmm(x3, W, out=out)
        y = x3.new_empty(h, x3.shape[1], W.shape[-1]) if out is None else out
        for i in range(h):
            y[i] = ModelView.head_product(x3, W, i)
        return y

    @staticmethod
    def head_product(x3: torch.Tensor, W: torch.Tensor, i: int) -> torch.Tensor:
        """Head ``i``'s product ``x3[i] @ W[i]`` through oneDNN (where :meth:`_onednn_heads` allows), a tensor of
        its own: ``W[i] (k, n)`` read in place as oneDNN's ``(out, in)`` operand, its transpose."""
        return torch.ops.mkldnn._linear_pointwise(x3[i], W[i].detach().t(), None, "none", [], "")

    @staticmethod
    def _onednn_heads(x3: torch.Tensor, W: torch.Tensor) -> bool:
        """Whether the per-head products ``x3 (h, rows, d) x W (h, d, dh)`` go through oneDNN: where each head's
        product may take the fixed-weights path (:meth:`PackedWeights.applies
        <pypattern.models.packed.PackedWeights.applies>`, with :attr:`ONEDNN_HEAD_MACS` as its threshold), no
        gradient is wanted into ``x3`` (the loop of products has no backward) and inference mode is off."""
        from ..models.packed import PackedWeights

        return (
            x3.shape[0] > 0
            and not (torch.is_grad_enabled() and x3.requires_grad)
            and not torch.is_inference_mode_enabled()
            and PackedWeights.applies(x3[0], W[0], None, min_macs=ModelView.ONEDNN_HEAD_MACS)
        )

    def qkv(
        self,
        layer: int,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        q_pos: torch.Tensor | None = None,
        k_pos: torch.Tensor | None = None,
        heads: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated at their positions) and values from separate, already normalised per-head
        inputs.

        Parameters
        ----------
        xq : ``(n_heads, ..., Tq, d_model)``
        xk, xv : ``(n_kv_heads, ..., Tk, d_model)``
        q_pos, k_pos : LongTensor ``(Tq,)``, ``(Tk,)``, optional
            Absolute positions of the rows (default ``arange``).
        heads : list of int, optional
            Compute only these query heads and the key/value heads they read (:meth:`kv_heads_of`); the inputs
            then hold ``len(heads)`` and ``len(kv_heads_of(heads))`` heads.

        Returns
        -------
        q ``(n_heads, ..., Tq, d_head)``, k, v ``(n_kv_heads, ..., Tk, d_head)``
        """
        a = self.model.blocks[layer].attn
        kv = self.kv_heads_of(heads)
        sb = lambda b, idx: None if b is None else self._sel(b, idx)  # noqa: E731
        q = a.qk_normed("q", self._bproj(xq, self._sel(a.W_Q, heads), sb(a.b_Q, heads)))
        k = a.qk_normed("k", self._bproj(xk, self._sel(a.W_K, kv), sb(a.b_K, kv)))
        v = self._bproj(xv, self._sel(a.W_V, kv), sb(a.b_V, kv))
        return self._rotate(layer, q, q_pos), self._rotate(layer, k, k_pos), v

    def qkv_shared(
        self,
        layer: int,
        xq: torch.Tensor,
        xkv: torch.Tensor,
        q_pos: torch.Tensor | None = None,
        k_pos: torch.Tensor | None = None,
        linear: bool = False,
    ) -> tuple:
        """Queries from one normalised input ``xq (..., Tq, d)`` shared by every head, keys and values from
        ``xkv (..., Tk, d)``: the same values as :meth:`qkv` with every head reading the same input, in one matmul
        each (the model's :meth:`Attention.compute_q` / ``compute_k`` / ``compute_v``). Returns head-first ``q
        (H, ..., Tq, dh)``, ``k, v (H_kv, ..., Tk, dh)``; ``q`` and ``k`` rotated at ``q_pos``, ``k_pos``. With
        ``linear``, a fourth item: the projections before rotation (and before the per-head query and key norms of
        a ``qk_norm`` model) ``(q, k, v)``, linear in the inputs (for :meth:`qkv_input_vjp`)."""
        a = self.model.blocks[layer].attn
        q = a.proj(xq, a.W_Q, a.b_Q).movedim(-2, 0)
        k = a.proj(xkv, a.W_K, a.b_K).movedim(-2, 0)
        v = a.compute_v(xkv).movedim(-2, 0)
        qn, kn = a.qk_normed("q", q), a.qk_normed("k", k)
        if linear:
            return self._rotate(layer, qn, q_pos), self._rotate(layer, kn, k_pos), v, (q, k, v)
        return self._rotate(layer, qn, q_pos), self._rotate(layer, kn, k_pos), v

    def qkv_grouped(
        self,
        layer: int,
        shared: list,
        own,
        n_runs: int,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        heads: list[int] | None = None,
        cached: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``n_runs`` runs in which many head inputs are the same tensor: each shared
        input is normalised once and projected for all the heads reading it in one matmul; the other inputs are
        normalised and projected one by one.

        Parameters
        ----------
        shared : list of ``(x, members)``
            ``x (..., Tk, d_model)`` an un-normalised input read by each ``(i, c)`` of ``members``: input ``i`` (the
            query inputs of ``heads``, then the key inputs and the value inputs of :meth:`kv_heads_of` them) of run
            ``c``.
        own : ``(x, members)`` or None
            ``x (P, ..., Tk, d_model)``, row ``p`` read by ``members[p]`` alone.
        cached : ``((yq, yk, yv), members)`` or None
            Inputs whose projections are known: ``yq (n_heads, ..., Tk, d_head)``, ``yk``, ``yv (n_kv_heads, ...,
            Tk, d_head)`` are every head's projections (with bias, before query/key norms and rotation,
            :meth:`projections`) of the one input the ``(i, c)`` of ``members`` read.
        q_pos, k_pos : LongTensor ``(Tq,)``, ``(Tk,)``
            Positions of the queries and keys; query inputs are read at their last ``Tq`` rows.

        Returns
        -------
        q ``(h, n_runs, ..., Tq, d_head)``, k, v ``(hk, n_runs, ..., Tk, d_head)`` (q and k rotated), equal to
        :meth:`qkv` on the inputs stacked per head.
        """
        a = self.model.blocks[layer].attn
        kv = list(range(self.n_kv_heads)) if heads is None else self.kv_heads_of(heads)
        hq = list(range(self.n_heads)) if heads is None else list(heads)
        h, hk = len(hq), len(kv)
        Ws = ((a.W_Q, a.b_Q, hq), (a.W_K, a.b_K, kv), (a.W_V, a.b_V, kv))
        first = (0, h, h + hk)
        x0 = shared[0][0] if shared else (own[0][0] if own is not None else cached[0][0])
        Tq, Tk = len(q_pos), len(k_pos)
        part = Tq != Tk
        dh = self.d_head

        def kind(i):
            return 0 if i < h else (1 if i < h + hk else 2)

        def rows_of(x, t):  # the query inputs at their rows only
            return x.narrow(-2, Tk - Tq, Tq) if (t == 0 and part) else x

        if not shared and own is None:
            base_shape = x0.shape[1:-2]
        else:
            base_shape = (shared[0][0].shape[:-2]) if shared else own[0].shape[1:-2]
        outs = [x0.new_empty(n, n_runs, *base_shape, T, dh) for n, T in ((h, Tq), (hk, Tk), (hk, Tk))]
        if cached is not None:  # projections known already: copied to their places
            ys, members = cached
            for t, (_, _, idx) in enumerate(Ws):
                mine = [(i, c) for i, c in members if kind(i) == t]
                if not mine:
                    continue
                y = rows_of(ys[t], t)
                src = [idx[i - first[t]] for i, _ in mine]  # the model's head index of each member
                dst = [(i - first[t]) * n_runs + c for i, c in mine]
                _put(outs[t], dst, y, src)
        for x, members in shared:
            xn = self.attn_norm(layer, x)
            for t, (W, b, idx) in enumerate(Ws):
                mine = [(i, c) for i, c in members if kind(i) == t]
                if not mine:
                    continue
                slots = sorted({i - first[t] for i, _ in mine})
                heads_t = [idx[j] for j in slots]
                xt = rows_of(xn, t)
                y = (xt @ self._sel(W, heads_t).permute(1, 0, 2).reshape(W.shape[1], len(slots) * dh)).view(
                    *xt.shape[:-1], len(slots), dh
                )
                if b is not None:
                    y += self._sel(b, heads_t)
                y = y.movedim(-2, 0)  # (slots, ..., T, dh)
                pos = {j: n for n, j in enumerate(slots)}
                src = [pos[i - first[t]] for i, _ in mine]
                dst = [(i - first[t]) * n_runs + c for i, c in mine]
                _put(outs[t], dst, y, src)
        if own is not None:
            x, members = own
            for t, (W, b, idx) in enumerate(Ws):
                rows_p = [p for p, (i, _) in enumerate(members) if kind(i) == t]
                if not rows_p:
                    continue
                r0, n = rows_p[0], len(rows_p)
                xt = x[r0 : r0 + n] if rows_p == list(range(r0, r0 + n)) else x[torch.tensor(rows_p)]
                xn = self.attn_norm(layer, rows_of(xt, t))
                heads_t = [idx[members[p][0] - first[t]] for p in rows_p]
                y = self._bproj(xn, self._sel(W, heads_t), None if b is None else self._sel(b, heads_t))
                dst = [(members[p][0] - first[t]) * n_runs + members[p][1] for p in rows_p]
                _put(outs[t], dst, y, list(range(len(rows_p))))
        q, k = a.qk_normed("q", outs[0]), a.qk_normed("k", outs[1])
        return self._rotate(layer, q, q_pos), self._rotate(layer, k, k_pos), outs[2]

    def projections(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every head's query, key and value projections of one un-normalised input ``x (..., T, d_model)``, with
        their biases and before the query/key norms and rotation: ``(H, ..., T, dh)``, ``(H_kv, ..., T, dh)`` twice
        (the pieces :meth:`qkv_grouped` puts together)."""
        a = self.model.blocks[layer].attn
        xn = self.attn_norm(layer, x)
        return tuple(
            a.proj(xn, W, b).movedim(-2, 0) for W, b in ((a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V))
        )

    def qkv_input_vjp(
        self,
        layer: int,
        xq: torch.Tensor,
        xkv: torch.Tensor,
        gq: torch.Tensor,
        gk: torch.Tensor,
        gv: torch.Tensor,
        q_pos: torch.Tensor | None = None,
        k_pos: torch.Tensor | None = None,
        linear: tuple | None = None,
        sums: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cotangents of each head's own (un-normalised, un-rotated) query, key and value input.

        Parameters
        ----------
        xq : ``(..., Tq, d)``; xkv : ``(..., Tk, d)``
            The shared un-normalised inputs at which :meth:`qkv_shared` was evaluated.
        gq : ``(H, ..., Tq, dh)``; gk, gv : ``(H_kv, ..., Tk, dh)``
            Cotangents of :meth:`qkv_shared`'s outputs (the rotated queries and keys).
        q_pos, k_pos : LongTensor ``(Tq,)``, ``(Tk,)``, optional
            Positions of the rows (default ``arange``): the rotation is undone at them.
        linear : tuple, optional
            The projections before rotation at these inputs (:meth:`qkv_shared` with ``linear``); with them,
            pypattern's LayerNorm and RMSNorm take :meth:`_proj_norm_vjp` (the projection's and the norm's VJP in one
            batched matmul and one pass).
        sums : ``(sq, skv)``, optional
            Tensors shaped as ``xq`` and ``xkv``, contiguous: the sum over heads of the query inputs' cotangents is
            added to ``sq``, that of the key and value inputs' to ``skv`` (``sq`` may be ``skv``), each head's
            while it is in cache.

        Returns
        -------
        ``(H, ..., Tq, d)`` and twice ``(H_kv, ..., Tk, d)``: the query input of each head, the key and value
        input of each key/value head.
        """
        a = self.model.blocks[layer].attn

        def back(g, W):  # (h, ..., T, dh) x (h, d, dh) -> (h, ..., T, d)
            h = g.shape[0]
            return torch.bmm(g.reshape(h, -1, g.shape[-1]), W.transpose(1, 2)).view(*g.shape[:-1], W.shape[1])

        gq, gk = self._projection_cotangents(layer, gq, gk, q_pos, k_pos, linear, xq, xkv)
        sq, skv = (None, None) if sums is None else sums
        if linear is not None and self._fast_norm_vjp(layer, xq, gq):
            return (
                self._proj_norm_vjp(layer, xq, gq, a.W_Q, a.b_Q, linear[0], sq),
                self._proj_norm_vjp(layer, xkv, gk, a.W_K, a.b_K, linear[1], skv),
                self._proj_norm_vjp(layer, xkv, gv, a.W_V, a.b_V, linear[2], skv),
            )
        got = (
            self.norm_vjp(layer, xq, back(gq, a.W_Q)),
            self.norm_vjp(layer, xkv, back(gk, a.W_K)),
            self.norm_vjp(layer, xkv, back(gv, a.W_V)),
        )
        if sums is not None:
            for g, acc in zip(got, (sq, skv, skv)):
                acc.add_(g.sum(0))
        return got

    def qkv_input_vjp_runs(
        self,
        layer: int,
        x: torch.Tensor,
        gq: torch.Tensor,
        gk: torch.Tensor,
        gv: torch.Tensor,
        qrows: torch.Tensor,
        rows: torch.Tensor,
        linear: tuple,
    ):
        """For ``N`` runs in which every head reads the residual ``x (N, ..., T, d)``: each head input's cotangent
        summed over the runs and the residual's cotangent in each run, without the per-run, per-head cotangents
        that :meth:`qkv_input_vjp` forms. None where that closed form does not apply (see :meth:`_fast_norm_vjp`).

        With :meth:`_proj_norm_vjp`'s notation, a head's input cotangent is ``g'_h W'_h^T - x_hat c2_h`` (``g'_h``
        its scaled projection cotangent and its mean column). Its sum over runs is ``(sum_n g'_hn) W'_h^T - sum_n
        x_hat_n c2_hn``: one batched matmul over the heads at one run's rows. The residual's cotangent in run ``n``
        is the sum over heads, ``[g'_1n .. g'_Hn] [W'_1; ..; W'_H]^T - x_hat_n sum_h c2_hn``: one matmul with
        every head's columns stacked (the plain backward's shape) instead of a matmul per head and a sum.

        Parameters
        ----------
        x : the residual ``(N, ..., T, d)`` at the key rows ``rows``; queries are read at ``qrows`` (a subset)
        gq, gk, gv, linear : as in :meth:`qkv_input_vjp`

        Returns
        -------
        ``(gq_in (H, ..., Tq, d), gk_in, gv_in (H_kv, ..., T, d), dx (N, ..., T, d))`` or None
        """
        a = self.model.blocks[layer].attn
        part = len(qrows) != len(rows)
        xq = x[..., qrows, :] if part else x
        if not self._fast_norm_vjp(layer, x, gq) or not (gq.dtype == gk.dtype == gv.dtype):
            return None
        gq, gk = self._projection_cotangents(layer, gq, gk, qrows, rows, linear)
        parts = [
            self._proj_norm_parts(layer, xin, g, W, b, lin, heads_last=True)
            for xin, g, W, b, lin in (
                (xq, gq, a.W_Q, a.b_Q, linear[0]),
                (x, gk, a.W_K, a.b_K, linear[1]),
                (x, gv, a.W_V, a.b_V, linear[2]),
            )
        ]
        summed = []
        # gs (h, N, ..., T, k), WwT (h, k, d), xhat (N, ..., T, d), c2 (h, N, ..., T)
        for gs, WwT, xhat, c2 in parts:
            h, k = gs.shape[0], gs.shape[-1]
            # minus sum_n x_hat_n c2_hn: the first run's with the product, a pass per other run
            out = self.heads_mm_sub(gs.sum(1).reshape(h, -1, k), WwT, xhat[0], c2[:, 0])
            out = out.view(*gs.shape[:1], *gs.shape[2:-1], -1)
            for n in range(1, gs.shape[1]):
                out.addcmul_(xhat[n], c2[:, n].unsqueeze(-1), value=-1)
            summed.append(out)

        # the residual's cotangent in every run: one matmul per input kind (queries only at their rows)
        def stacked(gs, WwT):  # (N * rows, h * k) x (h * k, d)
            h, k = gs.shape[0], gs.shape[-1]
            lhs = gs.movedim(0, -2).reshape(-1, h * k)
            return affine(lhs, WwT.reshape(h * k, -1), None)

        def xc2(xhat, c2):  # x_hat_n sum_h c2_hn
            return xhat * c2.sum(0).unsqueeze(-1)

        (gsq, Wq, xhq, c2q), (gsk, Wk, xhk, c2k), (gsv, Wv, _, c2v) = parts  # keys and values read the same x
        dx = (stacked(gsk, Wk) + stacked(gsv, Wv)).view(x.shape)
        dx.sub_(xc2(xhk, c2k + c2v))
        dq = stacked(gsq, Wq).view(xq.shape).sub_(xc2(xhq, c2q))
        if part:
            dx.index_add_(x.dim() - 2, qrows, dq)
        else:
            dx.add_(dq)
        return (*summed, dx)

    def _projection_cotangents(self, layer, gq, gk, q_pos, k_pos, linear, xq=None, xkv=None):
        """The cotangents of the queries' and keys' projections (before rotation and the per-head norms) from those
        of :meth:`qkv_shared`'s outputs: the rotation's VJP, then (``qk_norm``) the norms' VJP at the projections
        ``linear`` (from the forward), or at the projections of the un-normalised inputs ``xq``, ``xkv``."""
        a = self.model.blocks[layer].attn
        if self.rotary:
            gq, gk = self._unrotate(layer, gq, q_pos), self._unrotate(layer, gk, k_pos)
        if not a.cfg.qk_norm:
            return gq, gk
        with torch.no_grad():
            if linear is None:
                q = a.proj(self.attn_norm(layer, xq), a.W_Q, a.b_Q).movedim(-2, 0)
                k = a.proj(self.attn_norm(layer, xkv), a.W_K, a.b_K).movedim(-2, 0)
            else:
                q, k = linear[0], linear[1]
        if self._wide_qk_norm_vjp(a.q_norm, gq) and self._wide_qk_norm_vjp(a.k_norm, gk):
            return self._rms_vjp(a.q_norm, q, gq), self._rms_vjp(a.k_norm, k, gk)
        with torch.enable_grad():  # autograd through the norms: d_head-sized rows
            q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
            return torch.autograd.grad((a.qk_normed("q", q), a.qk_normed("k", k)), (q, k), (gq, gk))

    @staticmethod
    def _wide_qk_norm_vjp(norm, g: torch.Tensor) -> bool:
        """Whether a per-head query/key norm's VJP runs in closed form in the cotangent's dtype (:meth:`_rms_vjp`):
        pypattern's RMSNorm without hooks that computes in a narrower dtype than the model's (float32, as Hugging
        Face's Qwen3 norms, in a float64 model). Autograd through such a norm would round each cotangent to float32
        (a relative 6e-8), and a cotangent that differs in its last float64 bits (a padded batch against each prompt
        alone) would round apart; the closed form in float64 is the derivative of the same norm, exact to float64
        rounding. Any other norm (one computing in the model's dtype, a float32 or 16-bit model) takes autograd."""
        from ..models.transformer import RMSNorm

        cd = norm.compute_dtype
        return (
            type(norm) is RMSNorm
            and cd is not None
            and g.is_floating_point()
            and torch.promote_types(cd, g.dtype) == g.dtype != cd
            and norm.w.dtype == g.dtype
            and not (norm.hook_scale.active or norm.hook_normalized.active)
            and not (norm._forward_hooks or norm._forward_pre_hooks)
        )

    @staticmethod
    def _rms_vjp(norm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The VJP of the RMSNorm ``norm`` at ``x (..., k)`` applied to ``g (..., k)``, in ``g``'s dtype: with ``r =
        rsqrt(mean(x^2) + eps)``, ``x_hat = x r`` and ``g_w = g * (offset + w)``, ``r (g_w - x_hat mean(g_w
        x_hat))``."""
        with torch.no_grad():
            x = x.to(g.dtype)
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
            xhat = x * r
            gw = g * norm.gain
            return (gw - xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(r)

    def _unrotate(self, layer: int, g: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The rotary embedding's VJP at positions ``pos`` (it is linear: the same at every point)."""
        with torch.enable_grad():
            y = torch.zeros_like(g, requires_grad=True)
            (out,) = torch.autograd.grad(self._rotate(layer, y, pos), y, g)
        return out

    def _proj_norm_parts(self, layer, x, g, W, b, lin, heads_last: bool = False, rows_first: bool = False):
        """The pieces of :meth:`_proj_norm_vjp`: ``(g', W'^T, x_hat, c2)`` with the head input cotangent ``g'_h
        W'_h^T - x_hat c2_h``: ``g' (h, ..., T, k)``, ``W'^T (h, k, d)`` contiguous (``k = d_head + 1`` for
        LayerNorm, its mean row; ``d_head`` for RMSNorm), ``x_hat (..., T, d)``, ``c2 (h, ..., T)``. ``W'^T`` is
        laid out for a plain product ``g' @ W'^T``: a transposed view of ``W'`` as the right-hand side runs at half
        the rate in MKL's batched matmul when it is not in cache. ``heads_last``: ``g'`` is a view of a tensor laid
        out ``(..., T, h, k)`` (every head's columns of a row together). ``rows_first``: ``W'^T`` is instead the
        transposed view of ``W' (h, d, k)`` contiguous, oneDNN's layout of a product's weight (and ``W``'s own: no
        transposed read to make it)."""
        from ..models.transformer import LayerNorm

        ln = self.model.blocks[layer].ln1
        is_ln = type(ln) is LayerNorm
        d, h, dh = x.shape[-1], W.shape[0], W.shape[-1]
        hx = x - x.mean(-1, keepdim=True) if is_ln else x
        r = torch.rsqrt(hx.pow(2).mean(-1, keepdim=True) + ln.eps)  # (..., T, 1)
        xhat = hx * r
        k = dh + 1 if is_ln else dh
        if rows_first:
            WwT = W.new_empty(h, d, k).transpose(1, 2)
            torch.mul(W, ln.gain.view(1, d, 1), out=WwT.transpose(1, 2)[..., :dh])
        else:
            WwT = W.new_empty(h, k, d)
            torch.mul(W.transpose(1, 2), ln.gain.view(1, 1, d), out=WwT[:, :dh])
        shape = (h,) + (1,) * (g.dim() - 2) + (dh,)
        P = lin if b is None else lin - b.view(shape)
        if is_ln:
            P = P - torch.einsum("d,hdk->hk", ln.b, W).view(shape)
        if heads_last or is_ln:
            buf = (
                g.new_empty(*g.shape[1:-1], h, k).movedim(-2, 0)
                if heads_last
                else g.new_empty(*g.shape[:-1], k)
            )
            gs = torch.mul(g, r, out=buf[..., :dh])
        else:
            buf = gs = g * r
        c2 = (gs * P).sum(-1).div_(d)  # (h, ..., T)
        if is_ln:
            torch.sum(gs * WwT[:, :dh].sum(-1).view(shape), -1, keepdim=True, out=buf[..., dh:]).div_(-d)
            WwT[:, dh] = 1
        return buf, WwT, xhat, c2

    def _fast_norm_vjp(self, layer: int, x: torch.Tensor, g: torch.Tensor) -> bool:
        """pypattern's LayerNorm or RMSNorm without hooks, computing in the dtype of ``x``, ``g`` and its weight."""
        from ..models.transformer import LayerNorm, RMSNorm

        ln = self.model.blocks[layer].ln1
        return (
            type(ln) in (LayerNorm, RMSNorm)
            and not (ln.hook_scale.active or ln.hook_normalized.active)
            and not (ln._forward_hooks or ln._forward_pre_hooks)
            and (ln.compute_dtype or x.dtype) == x.dtype == g.dtype == ln.w.dtype
        )

    def _proj_norm_vjp(self, layer, x, g, W, b, lin, acc: torch.Tensor | None = None) -> torch.Tensor:
        """Each head's input cotangent ``norm_vjp(x, g_h @ W_h^T)`` from the cotangent ``g (h, ..., T, dh)`` of
        its projection ``lin = norm(x) @ W_h + b_h`` (``lin (h, ..., T, dh)`` from the forward, ``W (h, d, dh)``).

        With ``x_hat`` the normalised input, ``r`` the reciprocal scale, ``w`` (and ``beta``) the norm's weight
        (and bias), ``W'_h = diag(w) W_h`` and ``g' = r g``: LayerNorm's VJP is ``g' W'_h^T - g'.(1^T W'_h) / d -
        x_hat (g'.P_h) / d`` with ``P_h = x_hat W'_h = lin_h - b_h - beta W_h`` (from the forward: no projection
        of ``x_hat``); RMSNorm's the same without the middle term (and ``beta``). The first two terms are one
        batched matmul (the second as one more column of ``g'``), the third one pass over its output. ``acc``: a
        contiguous tensor shaped as ``x`` to which the sum over heads is added."""
        # the products' path (decided on d_head columns for their d_head + 1)
        onednn = self._onednn_heads(g, W.transpose(1, 2))
        gs, WwT, xhat, c2 = self._proj_norm_parts(layer, x, g, W, b, lin, rows_first=onednn)
        h, d = W.shape[0], x.shape[-1]
        acc2 = None if acc is None else acc.view(-1, d)
        return self.heads_mm_sub(gs.reshape(h, -1, gs.shape[-1]), WwT, xhat, c2, acc2).view(*g.shape[:-1], d)

    @staticmethod
    def heads_mm_sub(
        x3: torch.Tensor,
        W: torch.Tensor,
        xhat: torch.Tensor,
        c2: torch.Tensor,
        acc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x3 @ W - x_hat c2`` per head: ``x3 (h, rows, k)``, ``W (h, k, n)``, ``x_hat (..., n)`` and ``c2 (h,
        ...)`` with ``rows`` the product of ``...`` -> ``(h, rows, n)``. Through oneDNN, each head's product is
        written to the result by the subtraction (no copy of it). ``acc (rows, n)``: the sum over heads is added
        to it (each head's while in cache)."""
        h, n = x3.shape[0], W.shape[-1]
        xh, c = xhat.reshape(-1, n), c2.reshape(h, -1, 1)
        if not ModelView._onednn_heads(x3, W):
            out = torch.bmm(x3, W).addcmul_(xh, c, value=-1)
            if acc is not None:
                acc.add_(out.sum(0))
            return out
        out = x3.new_empty(h, x3.shape[1], n)
        for i in range(h):
            torch.addcmul(ModelView.head_product(x3, W, i), xh, c[i], value=-1, out=out[i])
            if acc is not None:
                acc.add_(out[i])
        return out

    def norm_vjp(self, layer: int, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The attention norm's VJP at ``x (..., T, d)`` applied to each head's cotangent ``g (h, ..., T, d)``.

        pypattern's LayerNorm and RMSNorm (without hooks) in closed form from ``x``'s statistics, computed once:
        with ``x_hat`` the normalised input, ``r`` the reciprocal scale and ``g_w = g * w``, LayerNorm gives
        ``r (g_w - mean(g_w) - x_hat mean(g_w x_hat))`` and RMSNorm ``r (g_w - x_hat mean(g_w x_hat))`` (in the
        norm's compute dtype); any other norm through autograd on a copy of ``x`` per head."""
        from ..models.transformer import LayerNorm, RMSNorm

        ln = self.model.blocks[layer].ln1
        if isinstance(ln, nn.Identity):
            return g
        plain = (
            type(ln) in (LayerNorm, RMSNorm)
            and not (ln.hook_scale.active or ln.hook_normalized.active)
            and not (ln._forward_hooks or ln._forward_pre_hooks)
        )
        if not plain:
            with torch.enable_grad():
                xr = x.detach().unsqueeze(0).expand(g.shape[0], *x.shape).clone().requires_grad_(True)
                (out,) = torch.autograd.grad(self.attn_norm(layer, xr), xr, g)
            return out
        cd = ln.compute_dtype or x.dtype
        with torch.no_grad():
            h = x.to(cd)
            is_ln = type(ln) is LayerNorm
            if is_ln:
                h = h - h.mean(-1, keepdim=True)
            r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ln.eps)
            xhat = h * r
            if g.dtype == cd and ln.w.dtype == cd:
                # r (g w - mean(g w) - x_hat mean(g w x_hat)) = g (w r) - r mean(g w) - (x_hat r) mean(g (w x_hat)):
                # the two means are row dot products of g (a matrix-vector product and one product-sum) and the
                # result two fused passes over g's size, with no per-head copy of g w
                d = g.shape[-1]
                w = ln.gain
                proj = (g * (xhat * w)).sum(-1, keepdim=True).div_(d)  # (h, ..., T, 1)
                if is_ln:
                    mean_gw = (g.reshape(-1, d) @ w).view(*g.shape[:-1], 1).div_(d)
                    out = torch.addcmul(-(r * mean_gw), g, w * r)
                else:
                    out = g * (w * r)
                return out.addcmul_(xhat * r, proj, value=-1)
            gw = (g * ln.gain).to(cd)
            out = gw * xhat  # two per-head temporaries in all: fresh large tensors are costly
            proj = out.mean(-1, keepdim=True)
            torch.addcmul(gw, xhat, proj, value=-1, out=out)
            if type(ln) is LayerNorm:
                out.sub_(gw.mean(-1, keepdim=True))
            return out.mul_(r).to(g.dtype)

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor | None = None,
        heads: list[int] | None = None,
    ) -> torch.Tensor:
        """Causal attention core, head-first.

        Parameters
        ----------
        q : ``(H, ..., Tq, dh)`` (rotated) at absolute positions ``q_pos (Tq,)``
        k, v : ``(H_kv, ..., Tk, dh)`` at positions ``k_pos (Tk,)`` (default ``0 .. Tk-1``)
        heads : list of int, optional
            The query heads ``q`` holds (then ``k``, ``v`` hold :meth:`kv_heads_of` of them).

        Returns
        -------
        z ``(H, ..., Tq, dh)``: ``softmax(q . k / attn_scale, soft-capped as the model caps it, masked by the
        model's attn_mask) @ v`` (the softmax
        taken as the model takes it: :meth:`~pypattern.models.transformer.Attention.softmax`).
        """
        a = self.model.blocks[layer].attn
        if k_pos is None:
            k_pos = torch.arange(k.shape[-2])
        mask = a.attn_mask(q_pos.to(q.device), k_pos.to(q.device))
        dead = None
        if self.keep is not None:  # padding keys masked too (B, Tq, Tk); a query with no key left is dead
            mask = mask[None] | ~self.keep[:, None, k_pos.to(q.device)]
            dead = mask.all(-1, keepdim=True)
        G = self.n_groups
        if heads is not None:
            kv = self.kv_heads_of(heads)
            if G > 1 or kv != heads:
                at = {g: i for i, g in enumerate(kv)}
                idx = torch.tensor([at[h // G] for h in heads], device=k.device)
                k, v = k[idx], v[idx]
            G = 1
        q, k = a.qk_cast(q, k)
        if self.pos_ids is None:
            bias = a.position_bias(k_pos.to(q.device), q.dtype)  # (n_heads, Tk) or None
        else:  # each row's keys at its positions: (B, n_heads, Tk) -> (n_heads, B, Tk)
            bias = a.position_bias(self.pos_ids[:, k_pos.to(q.device)], q.dtype)
            bias = None if bias is None else bias.movedim(1, 0)
        if bias is not None and heads is not None:
            bias = bias[torch.tensor(heads, device=q.device)]
        # the bias over the scores' axes: (..., 1, Tk), or (..., B, 1, Tk) at each row's positions
        tail = None
        if bias is not None:
            tail = [bias.shape[-1]] if bias.dim() == 2 else [bias.shape[1], 1, bias.shape[-1]]
        if G > 1:  # each key/value head serves G consecutive query heads
            Hk = k.shape[0]
            qg = q.reshape(Hk, G, *q.shape[1:])
            scores = a.scale_scores(qg @ k.unsqueeze(1).transpose(-1, -2))
            if bias is not None:  # (Hk, G, ..., 1, Tk)
                scores = scores + bias.reshape(Hk, G, *[1] * (scores.dim() - 2 - len(tail)), *tail)
            pattern = self._pattern(a, scores, mask, dead)
            return (pattern @ v.unsqueeze(1)).reshape(q.shape)
        scores = a.scale_scores(q @ k.transpose(-1, -2))
        if bias is not None:  # (H, ..., 1, Tk)
            scores = scores + bias.reshape(bias.shape[0], *[1] * (scores.dim() - 1 - len(tail)), *tail)
        pattern = self._pattern(a, scores, mask, dead)
        return pattern @ v

    @staticmethod
    def _pattern(a, scores: torch.Tensor, mask: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        """The pattern of ``scores`` (capped) under ``mask`` (True: may not attend); under a padding mask a dead
        query (``dead``: no key left) gets a pattern of zeros, as :meth:`Attention.forward
        <pypattern.models.transformer.Attention.forward>` gives it (no NaN, in the values or their gradient)."""
        return a.dead_softmax(a.cap(scores).masked_fill(mask, float("-inf")), dead)

    def head_out(
        self, layer: int, z: torch.Tensor, heads: list[int] | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each head's write to the residual stream, ``z_h @ W_O[h]``: ``(H, ..., T, dh)`` -> ``(H, ..., T, d)``
        (only ``heads``, when given). ``out``: a contiguous tensor of that shape and dtype to write into, when no
        gradient is wanted through the product (returned)."""
        W_O = self._sel(self.model.blocks[layer].attn.W_O, heads)
        h = z.shape[0]
        z3 = z.reshape(h, -1, z.shape[-1])
        if out is not None:
            self.heads_mm(z3, W_O, out=out.view(h, -1, W_O.shape[-1]))
            return out
        return self.heads_mm(z3, W_O).view(*z.shape[:-1], W_O.shape[-1])

    def head_out_sum(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The sum of every head's write, ``sum_h z_h @ W_O[h]``, in one matmul: ``(H, ..., T, dh)`` ->
        ``(..., T, d)`` (bias not included)."""
        W_O = self.model.blocks[layer].attn.W_O
        H, dh, d = W_O.shape
        return affine(z.movedim(0, -2).flatten(-2), W_O.reshape(H * dh, d), None)

    def attn_bias(self, layer: int) -> torch.Tensor | None:
        """The attention output bias ``(d_model,)`` (part of no head), or None when the model has none."""
        return self.model.blocks[layer].attn.b_O

    def add_attn_bias(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x + b_O`` (``x`` itself when the model has no ``b_O``)."""
        b = self.attn_bias(layer)
        return x if b is None else x + b

    # ----- MLP -----------------------------------------------------------------------------------------------
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP's write to the residual stream from its (un-normalised) input: ``(..., d)`` -> ``(..., d)``
        (the model's norm and MLP: gated or not, with or without biases)."""
        blk = self.model.blocks[layer]
        return blk.mlp(blk.ln2(x))

    # ----- a plain forward through the view (used by the self-check) -----------------------------------------
    def forward(self, tokens: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """Logits ``(batch, pos, d_vocab)`` computed from the view's pieces (equal to the model's forward); with
        ``per_head`` every head reads its own copy of the residual (the per-head path of edge patching)."""
        x = self.embed(tokens)
        T = x.shape[-2]
        pos = torch.arange(T, device=x.device)
        for layer in range(self.n_layers):
            if per_head:
                xq = self.attn_norm(layer, x.unsqueeze(0).expand(self.n_heads, *x.shape))
                xk = self.attn_norm(layer, x.unsqueeze(0).expand(self.n_kv_heads, *x.shape))
                q, k, v = self.qkv(layer, xq, xk, xk, pos, pos)
            else:
                h = self.attn_norm(layer, x)
                q, k, v = self.qkv_shared(layer, h, h, pos, pos)
            z = self.attention(layer, q, k, v, pos, pos)
            attn = self.add_attn_bias(layer, self.head_out(layer, z).sum(0))
            if self.has_mlp:
                mid = x + attn
                x = mid + self.mlp(layer, x if self.parallel else mid)
            else:
                x = x + attn
        return self.unembed(x)

    def _signature(self) -> tuple:
        """What the self-check depends on besides the weights' values: the configuration, the weights' dtype and
        device, and every module's type and hooks. A model checked with the same signature is not checked again."""
        from ..models.hooks import HookPoint

        mods = tuple(
            (
                name,
                type(m),
                tuple(m._forward_hooks),
                tuple(m._forward_pre_hooks),
                tuple(map(id, m._fns)) if isinstance(m, HookPoint) else None,
            )
            for name, m in self.model.named_modules()
        )
        from torch.nn.modules import module as _module

        glob = tuple(tuple(_module._global_forward_hooks)) + tuple(_module._global_forward_pre_hooks)
        W = self.model.embed.W_E
        return (repr(self.cfg), W.dtype, W.device, mods, glob)

    @torch.no_grad()
    def _check(self) -> None:
        from ..models.hooks import attached_hooks

        # the circuits compute from the weights and never run the model's hooks: a hook would be ignored
        hooked = attached_hooks(self.model)
        if hooked:
            raise ValueError(
                f"model has hooks attached at {hooked[:6]}{' ...' if len(hooked) > 6 else ''}: pypattern.circuits "
                "computes from the model's weights and does not run its hooks, so their effect would be ignored; "
                "remove them (model.reset_hooks() / remove_hooks(), handle.remove()) before calling it"
            )
        T = min(6, self.cfg.n_ctx)
        g = torch.Generator().manual_seed(0)
        dev = self.model.embed.W_E.device
        tokens = torch.randint(0, self.cfg.d_vocab, (1, T), generator=g, device="cpu").to(dev)
        ref = self.model(tokens)
        err = max(float((ref - self.forward(tokens, per_head=ph)).abs().max()) for ph in (False, True))
        # half precision: the two orders of operations round differently, by a few units of the dtype's last
        # place (measured up to 5.4 eps in bfloat16, 3.2 eps in float16 on the test architectures)
        half = self.dtype in (torch.float16, torch.bfloat16)
        tol = 16 * torch.finfo(self.dtype).eps if half else 1e-4
        scale = max(1.0, float(ref.abs().max()))
        if not err <= tol * scale:
            raise NotImplementedError(
                f"the circuits adapter's forward differs from the model's by {err:.3g} (logits up to {scale:.3g}, "
                f"{self.dtype}): this architecture is not covered by pypattern.circuits.model_view"
            )


def _put(out: torch.Tensor, dst: list[int], y: torch.Tensor, src: list[int]) -> None:
    """``out (n, C, ...)`` viewed ``(n * C, ...)`` takes ``y[src[j]]`` at row ``dst[j]``, in one indexed copy."""
    flat = out.view(-1, *out.shape[2:])
    if src != list(range(len(src))):
        y = y.index_select(0, torch.tensor(src, dtype=torch.long, device=y.device))
    elif len(src) != y.shape[0]:
        y = y.narrow(0, 0, len(src))
    if dst == list(range(dst[0], dst[0] + len(dst))):
        flat.narrow(0, dst[0], len(dst)).copy_(y)
    else:
        flat.index_copy_(0, torch.tensor(dst, dtype=torch.long, device=y.device), y)
