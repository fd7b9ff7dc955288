"""Cells whose patch cannot change the metric, found from the recorded runs before any cell is computed.

A cell's patch writes the source run's activation into the target run at the cell's site, layers, head and
position(s). Where it writes what the target run holds already, or where what it changes cannot reach the metric,
the patched run's metric is the target run's, exactly. Computed, such a cell comes out as rounding noise (the
exact engine recomputes the changed rows in products of other shapes than the target run's), and rankings, rank
correlations with attribution patching (which gives exactly 0 there) and "no effect" checks would read that noise.
:func:`inert_cells` names those cells (per example), and the callers set them to the target run's metric (effect
exactly 0) after each block of cells is computed (:func:`set_inert`), so that a grid's blocks, and a checkpoint's,
are those of a grid without them. A block whose every cell is inert for every example is not computed at all
(its values would be overwritten whole); a block holding one other cell is computed whole, as the exact engine's
rounding of a cell depends on the cells sharing its call.

Two rules:

- **causal** (pypattern's :class:`~pypattern.models.Transformer`, run as its weights say: no functions attached to
  it): per example, the patch changes no activation the metric at that example's position ``m`` reads. What the
  metric reads is found backwards from the final residual at ``m``, block by block, through each block's own
  attention mask (:meth:`Attention.attn_mask`: later keys, and keys beyond a sliding window): the residual rows
  ``S_l`` entering block ``l`` that reach it are ``S_{l+1}`` and the keys any query of ``S_{l+1}`` may attend,
  ``K_l``. A ``resid_pre`` patch at (l, p) reaches the metric when ``p`` is in ``S_l``, a ``k``/``v`` patch when
  ``p`` is in ``K_l``, a patch of any other site (row-local within its block: ``q``, ``z``, ``pattern`` by its
  query row, ``attn_out``, ``resid_mid``, ``mlp_out``, ``resid_post``) when ``p`` is in ``S_{l+1}``. So positions
  after the metric's, and row-local patches in the last block at other rows than the metric's, are inert; so are
  patches whose source equals the target at every reachable position (tokens before the first corrupted one, or
  tokens that agree). The examples of a :class:`~pypattern.models.Transformer` do not mix, so each example is
  judged alone; a metric that relates the examples of a run (:attr:`PatchingRuns.coupled
  <pypattern.patching.api.PatchingRuns.coupled>`) makes a cell inert only where it is for every example. With an
  attention mask (the runs' forwards given ``attention_mask``, padding keys masked out of every query), a
  position an example holds padding at reaches none of its real rows: its key is masked, and its own query row
  changes nothing but itself; so each example's reach is the causal one restricted to its real tokens (a superset
  of what the masked forward reaches, so a cell found inert is inert). The source-equals-target comparisons are
  per example and position, between runs made with the same mask and positions, so "positions before the first
  corrupted token" holds per row, wherever its padding puts them.
- **any model** (the naive loop on other models, or on a Transformer with functions attached, which may mix
  positions or examples): a cell is inert only where its source equals the target at every position of the patch
  in every example (the patched forward is then the target run itself).

The activations are compared once per hook (one comparison over each patched layer's activation), not per cell.
"""

from __future__ import annotations

import torch

from .sites import HEAD_SITES, KV_SITES, Cell, hook_name

__all__ = ["changed_at", "inert_cells", "reach_positions", "set_inert"]

#: sites whose patch at (layer l, position p) changes block l's output at row p only
_ROW_LOCAL = ("q", "z", "pattern", "attn_out", "resid_mid", "mlp_out", "resid_post")


def reach_positions(model, site: str, m: int, T: int, device=None) -> torch.Tensor:
    """``(n_layers, T)`` bool: where a patch of ``site`` at (layer, position) can reach the final residual at
    position ``m`` of pypattern's causal :class:`~pypattern.models.Transformer` (see the module's docstring)."""
    L = len(model.blocks)
    pos = torch.arange(T, device=device)
    S = torch.zeros(T, dtype=torch.bool, device=device)
    S[m] = True
    out = torch.zeros(L, T, dtype=torch.bool, device=device)
    for layer in reversed(range(L)):
        allowed = ~model.blocks[layer].attn.attn_mask(pos, pos).to(device)  # (query, key): may attend
        keys = (allowed & S[:, None]).any(0)
        if site in KV_SITES:
            out[layer] = keys
        elif site in _ROW_LOCAL:
            out[layer] = S
        S = S | keys  # the residual rows entering this block that reach the metric
        if site == "resid_pre":
            out[layer] = S
    return out


def changed_at(src: torch.Tensor, tgt: torch.Tensor, site: str) -> torch.Tensor:
    """``(B, T, heads)`` bool (``heads`` 1 for a residual site): where the source differs from the target (a
    ``pattern``: at any key of a query row). A NaN counts as a difference."""
    d = src.to(tgt.dtype) != tgt
    if site == "pattern":  # (B, H, Tq, Tk)
        return d.any(-1).transpose(1, 2)
    if site in HEAD_SITES:  # (B, T, heads, d_head)
        return d.any(-1)
    return d.any(-1, keepdim=True)  # (B, T, d_model)


def _comparable(site: str, layers: list[int], target: dict, source: dict, batch: int) -> bool:
    """Whether every hook of ``layers`` holds a target and a source tensor of one shape, laid out as the sites'
    activations are (``(batch, T, ...)``, three axes at least; four for a head site or a pattern): a model of
    other hook shapes is left to compute every cell."""
    dims = 4 if site in HEAD_SITES else 3
    for layer in layers:
        name = hook_name(site, layer)
        # ``in`` and ``[]``, which every activation cache has (TransformerLens 3.x's ActivationCache has no ``get``)
        t = target[name] if name in target else None
        s = source[name] if name in source else None
        if not isinstance(t, torch.Tensor) or not isinstance(s, torch.Tensor):
            return False
        if t.dim() != dims or tuple(s.shape) != tuple(t.shape) or t.shape[0] != batch:
            return False
    return True


def inert_cells(
    model,
    site: str,
    cells: list[Cell],
    target: dict,
    source: dict,
    pos,
    causal: bool,
    batch: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(len(cells), batch)`` bool: True where the cell's patch cannot change the metric of that example (see the
    module's docstring), on the CPU.

    Parameters
    ----------
    model
        pypattern's :class:`~pypattern.models.Transformer` when ``causal`` (its blocks' attention masks are read).
    target, source : dict
        The target and source activations by hook name, ``(batch, T, ...)`` (``pattern``: ``(batch, heads, T,
        T)``), holding the hooks of the cells' layers.
    pos : int or LongTensor ``(batch,)``
        The metric's position(s), non-negative.
    causal : bool
        The causal rule, per example (pypattern's Transformer without functions attached); else a cell is inert
        only where its source equals its target everywhere in every example.
    batch : int
        Examples of the runs.
    keep : BoolTensor ``(batch, T)``, optional
        The runs' attention mask (True: a real token; the metric reads real tokens only): under the causal rule a
        patch at an example's padding is inert for it. Unused by the rule for any model.
    """
    n = len(cells)
    if n == 0:
        return torch.zeros(0, batch, dtype=torch.bool)
    layers = sorted({layer for c in cells for layer in c.layers})
    if not _comparable(site, layers, target, source, batch):
        return torch.zeros(n, batch, dtype=torch.bool)
    first = target[hook_name(site, layers[0])]
    B = batch
    dev = first.device
    T = first.shape[2] if site == "pattern" else first.shape[1]
    per_ex = None
    if causal:
        ms = [pos] * B if isinstance(pos, int) else [int(x) for x in pos.tolist()]
        distinct = sorted(set(ms))
        reach = torch.stack([reach_positions(model, site, m, T, dev) for m in distinct])  # (n_m, L, T)
        per_ex = reach[torch.tensor([distinct.index(m) for m in ms], device=dev)]  # (B, L, T)
        if keep is not None and tuple(keep.shape) == (B, T):  # padding reaches no real row: its key is masked
            per_ex = per_ex & keep.to(dev)[:, None, :]
    L = max(layers) + 1
    changed = None
    for layer in layers:
        name = hook_name(site, layer)
        d = changed_at(source[name], target[name], site)  # (B, T, heads)
        if per_ex is not None:
            d = d & per_ex[:, layer, :, None]
        else:  # any model: a difference in any example counts for every example
            d = d.any(0, keepdim=True).expand_as(d)
        if changed is None:
            changed = torch.zeros(L, *d.shape, dtype=torch.bool, device=dev)
        changed[layer] = d
    assert changed is not None
    anywhere = changed.any(2)  # (L, B, heads): an all-positions cell
    lay = torch.tensor([c.layer for c in cells], device=dev)
    head = torch.tensor([max(c.head, 0) for c in cells], device=dev)
    p = torch.tensor([max(c.pos, 0) for c in cells], device=dev)
    all_pos = torch.tensor([c.pos < 0 for c in cells], device=dev)
    out = torch.zeros(n, B, dtype=torch.bool, device=dev)
    for w in range(max(c.window for c in cells)):
        at = lay + w
        ok = at < L  # every cell of a grid has one window
        at = at.clamp(max=L - 1)
        one = changed[at, :, p, head]  # (n, B)
        every = anywhere[at, :, head]  # (n, B)
        out |= torch.where(all_pos[:, None], every, one) & ok[:, None]
    return (~out).cpu()


def set_inert(values: torch.Tensor, inert: torch.Tensor, target_metric: torch.Tensor) -> torch.Tensor:
    """``values (n, batch)`` with the inert cells' entries (``inert (n, batch)``) set to the target run's metric
    ``(batch,)`` (in place; returned)."""
    if bool(inert.any()):
        t = target_metric.to(values.device, values.dtype).expand_as(values)
        mask = inert.to(values.device)
        values[mask] = t[mask]
    return values
