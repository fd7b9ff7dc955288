"""The one place where the circuits code touches the model's arithmetic.

Edge patching needs the model split at its residual-stream reads and writes: every head reads its query, key and
value input separately, every MLP reads its own input, and every head's output ``z_h @ W_O[h]`` is a separate
write. :class:`ModelView` exposes exactly those pieces for a :class:`~pypattern.models.Transformer`; everything in
:mod:`pypattern.circuits` goes through it, so a model with other blocks (RMSNorm, rotary embeddings, grouped-query
attention, gated MLPs, parallel attention + MLP) needs changes here only.

Every method accepts any number of leading dimensions (masks, interpolation steps, batch) before the position
axis; per-head tensors put the head first, ``(heads, ..., pos, features)``, so that each head's projection is one
batched matmul. The residual stream of a sequential block is

``resid_mid = resid_pre + sum_h head_out_h + attn_bias``, ``resid_post = resid_mid + mlp(resid_mid)``;

with ``parallel`` (attention and MLP reading the same residual) ``resid_post = resid_pre + sum_h head_out_h +
attn_bias + mlp(resid_pre)``. ``attn_bias`` (``b_O``) belongs to no head: it is a constant of the residual stream,
never patched. The MLP's output includes its output bias.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ModelView"]


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
        self.model, self.cfg = model, cfg
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        self.n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
        self.d_model, self.d_head = cfg.d_model, cfg.d_head
        self.has_mlp = not cfg.attn_only
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.dtype = model.embed.W_E.dtype
        self._scale = math.sqrt(cfg.d_head)
        if self.n_kv_heads != self.n_heads or self.parallel:
            raise NotImplementedError(
                "the circuits adapter covers sequential blocks with one key/value head per query head "
                f"(this model: n_kv_heads={self.n_kv_heads}, n_heads={self.n_heads}, parallel={self.parallel})"
            )
        if check:
            self._check()

    # ----- embedding and unembedding -------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus positional embedding, one node: ``(batch, pos)`` -> ``(batch, pos, d_model)``."""
        return self.model.embed_tokens(tokens)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding: ``(..., d_model)`` -> ``(..., d_vocab)``."""
        return self.model.unembed(self.model.ln_final(x))

    # ----- attention (head-first layout: per-head tensors are (heads, ..., pos, features)) ------------------
    def attn_norm(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The norm in front of attention, on any ``(..., d_model)`` (each head input normalised on its own)."""
        return self.model.blocks[layer].ln1(x)

    def qkv(
        self,
        layer: int,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        q_pos=None,
        k_pos=None,
        heads: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values from separate, already normalised per-head inputs.

        Parameters
        ----------
        xq : ``(n_heads, ..., Tq, d_model)``
        xk, xv : ``(n_kv_heads, ..., Tk, d_model)``
        q_pos, k_pos : LongTensor ``(Tq,)``, ``(Tk,)``, optional
            Absolute positions of the rows (for position-dependent projections such as rotary embeddings).
        heads : list of int, optional
            Compute only these heads (the inputs then hold ``len(heads)`` heads).

        Returns
        -------
        q ``(n_heads, ..., Tq, d_head)``, k, v ``(n_kv_heads, ..., Tk, d_head)``
        """
        a = self.model.blocks[layer].attn
        sel = slice(None) if heads is None else torch.as_tensor(heads, device=a.W_Q.device)

        def proj(x, W, b):
            h, d = x.shape[0], x.shape[-1]
            y = torch.bmm(x.reshape(h, -1, d), W[sel])
            return y.view(*x.shape[:-1], W.shape[-1]) + b[sel].view(h, *([1] * (x.dim() - 2)), -1)

        return proj(xq, a.W_Q, a.b_Q), proj(xk, a.W_K, a.b_K), proj(xv, a.W_V, a.b_V)

    def qkv_shared(
        self, layer: int, xq: torch.Tensor, xkv: torch.Tensor, q_pos=None, k_pos=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries from one normalised input ``xq (..., Tq, d)`` shared by every head, keys and values from
        ``xkv (..., Tk, d)``: the same values as :meth:`qkv` with every head reading the same input, in one matmul.
        Returns head-first ``q (H, ..., Tq, dh)``, ``k, v (H_kv, ..., Tk, dh)``."""
        a = self.model.blocks[layer].attn

        def proj(x, W, b):
            H, d, dh = W.shape
            y = (x @ W.permute(1, 0, 2).reshape(d, H * dh)).view(*x.shape[:-1], H, dh) + b
            return y.movedim(-2, 0)

        return proj(xq, a.W_Q, a.b_Q), proj(xkv, a.W_K, a.b_K), proj(xkv, a.W_V, a.b_V)

    def qkv_input_vjp(
        self,
        layer: int,
        xq: torch.Tensor,
        xkv: torch.Tensor,
        gq: torch.Tensor,
        gk: torch.Tensor,
        gv: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cotangents of each head's own (un-normalised) query, key and value input, given the cotangents
        ``gq (H, ..., Tq, dh)``, ``gk, gv (H_kv, ..., Tk, dh)`` of :meth:`qkv_shared`'s outputs at the shared
        un-normalised inputs ``xq (..., Tq, d)`` and ``xkv (..., Tk, d)``. Returns ``(H, ..., Tq, d)`` and twice
        ``(H_kv, ..., Tk, d)``."""
        a = self.model.blocks[layer].attn

        def back(g, W):  # (h, ..., T, dh) x (h, d, dh) -> (h, ..., T, d)
            h = g.shape[0]
            return torch.bmm(g.reshape(h, -1, g.shape[-1]), W.transpose(1, 2)).view(*g.shape[:-1], W.shape[1])

        def norm_vjp(x, g):  # the norm's VJP at x applied to each head's cotangent g (h, ..., T, d)
            with torch.enable_grad():
                xr = x.detach().unsqueeze(0).expand(g.shape[0], *x.shape).clone().requires_grad_(True)
                (out,) = torch.autograd.grad(self.attn_norm(layer, xr), xr, g)
            return out

        gq_in = norm_vjp(xq, back(gq, a.W_Q))
        gk_in = norm_vjp(xkv, back(gk, a.W_K))
        gv_in = norm_vjp(xkv, back(gv, a.W_V))
        return gq_in, gk_in, gv_in

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor
    ) -> torch.Tensor:
        """Causal attention core, head-first: ``q (H, ..., Tq, dh)`` at absolute positions ``q_pos (Tq,)``, keys
        and values ``(H_kv, ..., Tk, dh)`` at positions ``0 .. Tk-1`` -> ``z (H, ..., Tq, dh)``."""
        scores = (q @ k.transpose(-1, -2)) / self._scale
        mask = torch.arange(k.shape[-2], device=q.device)[None, :] > q_pos.to(q.device)[:, None]
        pattern = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        return pattern @ v

    def head_out(self, layer: int, z: torch.Tensor, heads: list[int] | None = None) -> torch.Tensor:
        """Each head's write to the residual stream, ``z_h @ W_O[h]``: ``(H, ..., T, dh)`` -> ``(H, ..., T, d)``
        (only ``heads``, when given)."""
        W_O = self.model.blocks[layer].attn.W_O
        if heads is not None:
            W_O = W_O[torch.as_tensor(heads, device=W_O.device)]
        h = z.shape[0]
        return torch.bmm(z.reshape(h, -1, z.shape[-1]), W_O).view(*z.shape[:-1], W_O.shape[-1])

    def head_out_sum(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The sum of every head's write, ``sum_h z_h @ W_O[h]``, in one matmul: ``(H, ..., T, dh)`` ->
        ``(..., T, d)`` (bias not included)."""
        W_O = self.model.blocks[layer].attn.W_O
        H, dh, d = W_O.shape
        return z.movedim(0, -2).flatten(-2) @ W_O.reshape(H * dh, d)

    def attn_bias(self, layer: int) -> torch.Tensor:
        """The attention output bias ``(d_model,)`` (part of no head)."""
        return self.model.blocks[layer].attn.b_O

    # ----- MLP -----------------------------------------------------------------------------------------------
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP's write to the residual stream from its (un-normalised) input: ``(..., d)`` -> ``(..., d)``."""
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
            z = self.attention(layer, q, k, v, pos)
            attn = self.head_out(layer, z).sum(0) + self.attn_bias(layer)
            if self.has_mlp:
                mid = x + attn
                x = mid + self.mlp(layer, x if self.parallel else mid)
            else:
                x = x + attn
        return self.unembed(x)

    @torch.no_grad()
    def _check(self) -> None:
        T = min(4, self.cfg.n_ctx)
        g = torch.Generator().manual_seed(0)
        dev = self.model.embed.W_E.device
        tokens = torch.randint(0, self.cfg.d_vocab, (1, T), generator=g).to(dev)
        ref = self.model(tokens)
        err = max(float((ref - self.forward(tokens, per_head=ph)).abs().max()) for ph in (False, True))
        tol = 1e-3 if self.dtype in (torch.float16, torch.bfloat16) else 1e-4
        scale = max(1.0, float(ref.abs().max()))
        if not err <= tol * scale:
            raise NotImplementedError(
                f"the circuits adapter's forward differs from the model's by {err:.3g} (logits up to {scale:.3g}): "
                "this architecture is not covered by pypattern.circuits.model_view yet"
            )
