"""The exact patching engine for :class:`pypattern.models.Transformer`.

In a causal model a patch at (layer L, position p) can change only layers >= L at positions >= p. The engine
caches the unpatched target run (every activation, including attention keys and values), then for each cell
recomputes only what the patch can change:

- rows (positions) ``p .. m`` where ``m`` is the metric's position; positions after ``m`` are never computed,
  and in the last block only the metric's row (its query, MLP and unembedding) is computed;
- at the patched layer only what the site feeds: a patch of ``z`` at (L, h, p) changes ``attn_out``, the MLP and
  the residual at row p only (one head's ``W_O`` slice, as a delta on the cached ``attn_out``); a patch of
  ``k``/``v`` recomputes one head's attention; a patch of ``resid_pre`` recomputes q, k, v for one row;
- keys and values of positions < p come from the cache.

Cells that start at the same position are batched together: they share the row range and run as one batch
through the blocks (cells join the batch at their own layer).
"""

from __future__ import annotations

import math

import torch

from .sites import HEAD_SITES, Cell, hook_name

__all__ = ["ExactEngine", "truncate_cache"]


class _Patch:
    """Patch info for a batch of ``C`` cells at one layer: the site, the layer, ``active (C,)`` (which cells
    patch this layer), ``heads (C,)`` (head sites) and the position (``-1``: all positions)."""

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
    """

    def __init__(self, model, target_cache: dict, source: dict, site: str, metric, position) -> None:
        self.model, self.cfg = model, model.cfg
        self.tc, self.src, self.site, self.metric = target_cache, source, site, metric
        cfg = self.cfg
        self.H, self.dh, self.d = cfg.n_heads, cfg.d_head, cfg.d_model
        self.L = cfg.n_layers
        self.attn_only = cfg.attn_only
        self.uniform = isinstance(position, int)
        self.m = position
        x = target_cache["blocks.0.hook_resid_pre"]
        self.B, self.T = x.shape[0], x.shape[1]
        if self.uniform and position != self.T - 1:
            raise ValueError(
                f"position={position}: truncate the prompts so that the metric position is the last"
            )
        self.scale = math.sqrt(self.dh)
        self.w = [self._layer_weights(b) for b in model.blocks]
        self.tgt = [self._layer_cache(i) for i in range(self.L)]

    # ----- setup ---------------------------------------------------------------------------------------------
    def _layer_weights(self, blk) -> dict:
        a = blk.attn
        H, d, dh = a.W_Q.shape
        w = {
            "Wq": a.W_Q.detach().permute(1, 0, 2).reshape(d, H * dh),
            "Wk": a.W_K.detach().permute(1, 0, 2).reshape(d, H * dh),
            "Wv": a.W_V.detach().permute(1, 0, 2).reshape(d, H * dh),
            "bq": a.b_Q.detach(),
            "bk": a.b_K.detach(),
            "bv": a.b_V.detach(),
            "WoH": a.W_O.detach(),
            "Wo": a.W_O.detach().reshape(H * dh, d),
            "bo": a.b_O.detach(),
            "ln1": blk.ln1,
        }
        if not self.attn_only:
            w.update(
                ln2=blk.ln2,
                Win=blk.mlp.W_in.detach(),
                bin=blk.mlp.b_in.detach(),
                Wout=blk.mlp.W_out.detach(),
                bout=blk.mlp.b_out.detach(),
            )
        return w

    def _layer_cache(self, layer: int) -> dict:
        g = lambda s: self.tc[hook_name(s, layer)]
        c = {s: g(s) for s in ("resid_pre", "resid_post", "attn_out", "q", "k", "v", "z")}
        if not self.attn_only:
            c["resid_mid"] = g("resid_mid")
        return c

    # ----- building blocks (mirror the model's arithmetic) ---------------------------------------------------
    def _ln(self, x: torch.Tensor, mod) -> torch.Tensor:
        if self.cfg.normalization_type is None:
            return x
        x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + mod.eps).sqrt()
        return x / scale * mod.w + mod.b

    def _proj(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (x @ W).view(*x.shape[:-1], self.H, self.dh) + b

    def _mlp_resid(
        self, w: dict, resid_mid: torch.Tensor, patch: _Patch | None = None, rows=None
    ) -> torch.Tensor:
        """resid_mid -> resid_post (applies mlp_out / resid_post patches)."""
        if self.attn_only:
            return self._apply(resid_mid, patch, "resid_post", rows)
        from ..models.transformer import apply_act

        h = self._ln(resid_mid, w["ln2"])
        out = apply_act(h @ w["Win"] + w["bin"], self.cfg.act_fn) @ w["Wout"] + w["bout"]
        out = self._apply(out, patch, "mlp_out", rows)
        return self._apply(resid_mid + out, patch, "resid_post", rows)

    def _apply(self, x: torch.Tensor, patch: _Patch | None, stage: str, rows):
        """Replace the patched part of ``x`` (cells on dim 0; rows = absolute positions of x's position dim)
        with the source activation of ``stage`` at the patch's layer."""
        if patch is None or patch.site != stage:
            return x
        src = self.src[hook_name(stage, patch.layer)]
        C = x.shape[0]
        act = patch.active
        if stage == "pattern":  # x (C, B, H, R, Tk)
            s = src[:, :, rows].to(x.dtype)
            rmask = (rows == patch.pos) if patch.pos >= 0 else torch.ones_like(rows, dtype=torch.bool)
            hmask = torch.arange(self.H)[None, :] == patch.heads[:, None]
            mask = (
                act[:, None, None, None, None]
                & hmask[:, None, :, None, None]
                & rmask[None, None, None, :, None]
            )
            return torch.where(mask, s.unsqueeze(0), x)
        s = src[:, rows].to(x.dtype)
        rmask = (rows == patch.pos) if patch.pos >= 0 else torch.ones_like(rows, dtype=torch.bool)
        if stage in HEAD_SITES:  # x (C, B, R, H, dh)
            hmask = torch.arange(self.H)[None, :] == patch.heads[:, None]
            mask = (
                act[:, None, None, None, None]
                & rmask[None, None, :, None, None]
                & hmask[:, None, None, :, None]
            )
        else:
            mask = act.view(C, 1, 1, 1) & rmask[None, None, :, None]
        return torch.where(mask, s.unsqueeze(0), x)

    def _attend(
        self, q: torch.Tensor, qpos: torch.Tensor, k_new: torch.Tensor, p: int, layer: int
    ) -> torch.Tensor:
        """Attention pattern of queries ``q (C,B,Rq,H,dh)`` at ``qpos`` over keys 0..p-1 (cache) and
        ``k_new (C,B,R,H,dh)`` at p..p+R-1: returns ``(C,B,H,Rq,p+R)``."""
        parts = []
        if p > 0:
            K_old = self.tgt[layer]["k"][:, :p]
            parts.append(torch.einsum("cbrhe,bkhe->cbhrk", q, K_old))
        parts.append(torch.einsum("cbrhe,cbkhe->cbhrk", q, k_new))
        scores = (torch.cat(parts, -1) if len(parts) > 1 else parts[0]) / self.scale
        kpos = torch.arange(p + k_new.shape[2])
        mask = kpos[None, :] > qpos[:, None]
        return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)

    def _z(self, pattern: torch.Tensor, v_new: torch.Tensor, p: int, layer: int) -> torch.Tensor:
        z = torch.einsum("cbhrk,cbkhe->cbrhe", pattern[..., p:], v_new)
        if p > 0:
            z = z + torch.einsum("cbhrk,bkhe->cbrhe", pattern[..., :p], self.tgt[layer]["v"][:, :p])
        return z

    def _head_attn(self, q_h, qpos, K_h, V_h):
        """One head per cell: ``q_h (C,B,Rq,dh)``, keys ``K_h/V_h (C,B,Tk,dh)`` at 0..Tk-1 -> z ``(C,B,Rq,dh)``."""
        s = torch.einsum("cbre,cbke->cbrk", q_h, K_h) / self.scale
        mask = torch.arange(K_h.shape[2])[None, :] > qpos[:, None]
        pat = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        return torch.einsum("cbrk,cbke->cbre", pat, V_h)

    @staticmethod
    def _heads(t: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """``t (B, T, H, dh)`` -> ``(C, B, T, dh)`` for each cell's head."""
        return t.permute(2, 0, 1, 3)[heads]

    # ----- one block on changed rows ------------------------------------------------------------------------
    def _block_rows(self, layer: int, X: torch.Tensor, p: int, patch: _Patch | None, out_rows: torch.Tensor):
        """Block ``layer`` for cells whose residual rows ``p..`` (``X (C,B,R,d)``) changed; returns the
        residual after the block at ``out_rows`` (absolute positions): ``(C,B,len(out_rows),d)``."""
        w = self.w[layer]
        R = X.shape[2]
        rows = torch.arange(p, p + R)
        X = self._apply(X, patch, "resid_pre", rows)
        h = self._ln(X, w["ln1"])
        sel = out_rows - p
        full = len(out_rows) == R
        q = self._apply(self._proj(h if full else h[:, :, sel], w["Wq"], w["bq"]), patch, "q", out_rows)
        k = self._apply(self._proj(h, w["Wk"], w["bk"]), patch, "k", rows)
        v = self._apply(self._proj(h, w["Wv"], w["bv"]), patch, "v", rows)
        pat = self._apply(self._attend(q, out_rows, k, p, layer), patch, "pattern", out_rows)
        z = self._apply(self._z(pat, v, p, layer), patch, "z", out_rows)
        attn_out = self._apply(z.flatten(-2) @ w["Wo"] + w["bo"], patch, "attn_out", out_rows)
        resid = (X if full else X[:, :, sel]) + attn_out
        if not self.attn_only:
            resid = self._apply(resid, patch, "resid_mid", out_rows)
        return self._mlp_resid(w, resid, patch, out_rows)

    # ----- entering layer: the optimised first block of a cell ----------------------------------------------
    def _enter(self, layer: int, p: int, cells: list[Cell], out_rows: torch.Tensor, all_pos: bool):
        site, w, tg = self.site, self.w[layer], self.tgt[layer]
        C = len(cells)
        heads = torch.tensor([c.head for c in cells]) if site in HEAD_SITES else None
        src = self.src.get(hook_name(site, layer))
        if site == "resid_pre":
            if all_pos:
                X = src.to(tg["resid_pre"].dtype).unsqueeze(0).expand(C, -1, -1, -1)
                return self._block_rows(layer, X, 0, None, out_rows)
            x0 = src[:, p : p + 1].to(tg["resid_pre"].dtype)  # (B,1,d)
            h0 = self._ln(x0, w["ln1"])
            q0, k0, v0 = (self._proj(h0, w[W], w[b]) for W, b in (("Wq", "bq"), ("Wk", "bk"), ("Wv", "bv")))
            k = torch.cat([k0, tg["k"][:, p + 1 :]], 1).unsqueeze(0)
            v = torch.cat([v0, tg["v"][:, p + 1 :]], 1).unsqueeze(0)
            q = torch.cat([q0, tg["q"][:, p + 1 :]], 1)[:, out_rows - p].unsqueeze(0)
            pat = self._attend(q, out_rows, k, p, layer)
            z = self._z(pat, v, p, layer)
            x = torch.cat([x0, tg["resid_pre"][:, p + 1 :]], 1)[:, out_rows - p].unsqueeze(0)
            resid = x + (z.flatten(-2) @ w["Wo"] + w["bo"])
            out = self._mlp_resid(w, resid)
            return out.expand(C, -1, -1, -1)
        if site in ("k", "v"):
            K = self._heads(tg["k"], heads)
            V = self._heads(tg["v"], heads)
            s = self._heads(src, heads).to(K.dtype)
            rsel = slice(None) if all_pos else slice(p, p + 1)
            if site == "k":
                K = K.clone()
                K[:, :, rsel] = s[:, :, rsel]
            else:
                V = V.clone()
                V[:, :, rsel] = s[:, :, rsel]
            q_h = self._heads(tg["q"], heads)[:, :, out_rows]
            z_new = self._head_attn(q_h, out_rows, K, V)
            z_old = self._heads(tg["z"], heads)[:, :, out_rows]
            attn_out = tg["attn_out"][:, out_rows] + torch.einsum(
                "cbre,ced->cbrd", z_new - z_old, w["WoH"][heads]
            )
            resid = tg["resid_pre"][:, out_rows] + attn_out
            return self._mlp_resid(w, resid)
        # row-local sites: the residual changes only at the patched rows
        prow = out_rows if all_pos else out_rows[out_rows == p]
        base = tg["resid_post"][:, out_rows].unsqueeze(0).expand(C, -1, -1, -1)
        if len(prow) == 0:
            return base
        if site in ("z", "q", "pattern"):
            if site == "z":
                z_new = self._heads(src, heads)[:, :, prow].to(base.dtype)
            elif site == "q":
                q_h = self._heads(src, heads)[:, :, prow].to(base.dtype)
                z_new = self._head_attn(q_h, prow, self._heads(tg["k"], heads), self._heads(tg["v"], heads))
            else:
                pat = src[:, :, prow].transpose(0, 1)[heads].to(base.dtype)  # (C,B,R,Tk)
                z_new = torch.einsum("cbrk,cbke->cbre", pat, self._heads(tg["v"], heads))
            z_old = self._heads(tg["z"], heads)[:, :, prow]
            attn_out = tg["attn_out"][:, prow] + torch.einsum(
                "cbre,ced->cbrd", z_new - z_old, w["WoH"][heads]
            )
            new = self._mlp_resid(w, tg["resid_pre"][:, prow] + attn_out)
        else:
            s = src[:, prow].to(base.dtype).unsqueeze(0)
            if site == "attn_out":
                new = self._mlp_resid(w, tg["resid_pre"][:, prow].unsqueeze(0) + s)
            elif site == "resid_mid":
                new = self._mlp_resid(w, s)
            elif site == "mlp_out":
                new = tg["resid_mid"][:, prow].unsqueeze(0) + s
            else:  # resid_post
                new = s
            new = new.expand(C, -1, -1, -1)
        if all_pos:
            return new
        out = base.clone()
        out[:, :, (out_rows == p).nonzero().flatten()] = new
        return out

    # ----- driver ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, cells: list[Cell]) -> torch.Tensor:
        """Metric of every cell's patched run: ``(len(cells), batch)``."""
        out = torch.empty(len(cells), self.B, dtype=self.tc["blocks.0.hook_resid_pre"].dtype)
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(cells):
            groups.setdefault(c.pos, []).append(i)
        tgt_metric = self.target_metric()
        for pos, idx in groups.items():
            all_pos = pos < 0
            p = 0 if all_pos else pos
            if self.uniform and p > self.m:  # the patch cannot reach the metric position
                out[idx] = tgt_metric
                continue
            out[idx] = self._run_group(p, [cells[i] for i in idx], all_pos)
        return out

    def target_metric(self) -> torch.Tensor:
        """Metric of the unpatched target run ``(batch,)``."""
        return self._metric_from_final(self.tgt[-1]["resid_post"].unsqueeze(0), 0)[0]

    def _metric_from_final(self, X: torch.Tensor, p: int) -> torch.Tensor:
        """Metric from the final residual rows ``X (C,B,R,d)`` that end at the last position (``T - 1``) and
        start at ``p`` (or hold only the metric row, in the uniform case)."""
        model = self.model
        if self.uniform:  # prompts are truncated so that the metric position is the last one
            x = X[:, :, -1]
        else:
            C = X.shape[0]
            tgt_final = self.tgt[-1]["resid_post"]
            full = torch.cat([tgt_final[:, :p].unsqueeze(0).expand(C, -1, -1, -1), X], 2)
            idx = self.m.view(1, -1, 1, 1).expand(C, -1, 1, self.d)
            x = full.gather(2, idx).squeeze(2)
        return self.metric(model.unembed(model.ln_final(x)))

    def _run_group(self, p: int, cells: list[Cell], all_pos: bool) -> torch.Tensor:
        R = self.T - p
        X, active = None, []
        full_rows = torch.arange(p, self.T)
        last_rows = torch.tensor([self.m]) if self.uniform else full_rows
        for layer in range(self.L):
            out_rows = last_rows if layer == self.L - 1 else full_rows
            parts = []
            if active:
                act = torch.tensor([layer in c.layers for c in active])
                patch = None
                if bool(act.any()):
                    heads = torch.tensor([c.head for c in active]) if self.site in HEAD_SITES else None
                    patch = _Patch(self.site, layer, act, heads, -1 if all_pos else p)
                parts.append(self._block_rows(layer, X, p, patch, out_rows))
            new = [c for c in cells if c.layer == layer]
            if new:
                parts.append(self._enter(layer, p, new, out_rows, all_pos))
                active += new
            X = torch.cat(parts, 0) if len(parts) > 1 else parts[0] if parts else None
        assert X is not None and X.shape[2] in (1, R)
        order = {c: i for i, c in enumerate(active)}
        vals = self._metric_from_final(X, p)
        return vals[[order[c] for c in cells]]


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
