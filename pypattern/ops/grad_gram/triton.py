"""Triton kernel of the per-sample gradient Gram's pairwise contraction (see :mod:`pypattern.ops.grad_gram`).

``G[i, j] = sum_{s,t} K[iT+s, jT+t] (y_{iT+s} . y_{jT+t})`` with ``K = x x^T`` or ``K = [ids equal and >= 0]``.
One program owns a ``(BLOCK, BLOCK)`` tile of row pairs (or several tiles of one row block, when the column tiles
outnumber the grid's second axis; see :func:`pairwise_grid`): both dot-product tiles come from ``tl.dot`` over slices
of ``BLOCK_F`` features (``input_precision="ieee"``: no TF32), their product is reduced into ``G`` (float64) by
atomic adds: one scalar add per tile when ``T`` is a multiple of ``BLOCK`` (the tile lies in one sample pair),
else one add per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_launch import MAX_GRID_YZ, launch_guard


@triton.jit
def _pairwise_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    ids_ptr,
    R,
    P,
    Q,
    T,
    B,
    USE_IDS: tl.constexpr,
    WHOLE_TILE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
):
    # the row tiles on grid axis 0 (up to 2**31 - 1 programs); the column tiles on axis 1, at most MAX_GRID_YZ
    # programs, each walking the column tiles in steps of the axis's size (see pairwise_grid)
    pid_r = tl.program_id(0)
    rows = pid_r * BLOCK + tl.arange(0, BLOCK)
    mr = rows < R
    rows64 = rows.to(tl.int64)
    for pid_c in range(tl.program_id(1), tl.cdiv(R, BLOCK), tl.num_programs(1)):
        cols = pid_c * BLOCK + tl.arange(0, BLOCK)
        mc = cols < R
        cols64 = cols.to(tl.int64)
        kd = tl.zeros((BLOCK, BLOCK), dtype=ACC)
        for f0 in range(0, Q, BLOCK_F):
            fo = f0 + tl.arange(0, BLOCK_F)
            mf = fo < Q
            yr = tl.load(y_ptr + rows64[:, None] * Q + fo[None, :], mask=mr[:, None] & mf[None, :], other=0.0)
            yc = tl.load(y_ptr + cols64[:, None] * Q + fo[None, :], mask=mc[:, None] & mf[None, :], other=0.0)
            kd += tl.dot(yr, tl.trans(yc), input_precision="ieee", out_dtype=ACC)
        if USE_IDS:
            ir = tl.load(ids_ptr + rows, mask=mr, other=-1)
            ic = tl.load(ids_ptr + cols, mask=mc, other=-2)
            p = tl.where((ir[:, None] == ic[None, :]) & (ir[:, None] >= 0), kd, 0.0)
        else:
            ka = tl.zeros((BLOCK, BLOCK), dtype=ACC)
            for f0 in range(0, P, BLOCK_F):
                fo = f0 + tl.arange(0, BLOCK_F)
                mf = fo < P
                xr = tl.load(
                    x_ptr + rows64[:, None] * P + fo[None, :], mask=mr[:, None] & mf[None, :], other=0.0
                )
                xc = tl.load(
                    x_ptr + cols64[:, None] * P + fo[None, :], mask=mc[:, None] & mf[None, :], other=0.0
                )
                ka += tl.dot(xr, tl.trans(xc), input_precision="ieee", out_dtype=ACC)
            p = ka * kd
        valid = mr[:, None] & mc[None, :]
        p = tl.where(valid, p, 0.0).to(tl.float64)
        if WHOLE_TILE:
            si = (pid_r * BLOCK) // T
            sj = (pid_c * BLOCK) // T
            tl.atomic_add(g_ptr + si.to(tl.int64) * B + sj, tl.sum(tl.sum(p, axis=1), axis=0))
        else:
            si = (rows // T).to(tl.int64)
            sj = (cols // T).to(tl.int64)
            tl.atomic_add(g_ptr + si[:, None] * B + sj[None, :], p, mask=valid)


def pairwise_grid(rows: int, block: int) -> tuple[int, int]:
    """The launch grid of ``_pairwise_kernel``: the row tiles on axis 0 (limit 2**31 - 1), the column tiles on
    axis 1 capped at ``MAX_GRID_YZ`` (CUDA's limit for axes 1 and 2; the kernel loops over the rest)."""
    tiles = triton.cdiv(rows, block)
    return (tiles, min(tiles, MAX_GRID_YZ))


def grad_gram_pairwise_triton(
    x: torch.Tensor | None,
    y: torch.Tensor,
    ids: torch.Tensor | None,
    batch: int,
    *,
    block: int = 32,
    block_f: int = 32,
) -> torch.Tensor:
    """``(batch, batch)`` float64 pairwise contraction (arguments as :func:`pypattern.ops.grad_gram_pairwise`).

    Products and tiles in the input dtype (float32 or float64); the reduction into ``G`` in float64.
    """
    y = y.contiguous()
    rows = y.shape[0]
    t = rows // batch
    g = torch.zeros(batch, batch, dtype=torch.float64, device=y.device)
    use_ids = ids is not None
    if use_ids:
        x = y  # unused
        ids = ids.contiguous()
    else:
        x = x.contiguous()
    grid = pairwise_grid(rows, block)
    with launch_guard(y.device):
        _pairwise_kernel[grid](
            g,
            x,
            y,
            ids if use_ids else y,
            rows,
            x.shape[1],
            y.shape[1],
            t,
            batch,
            USE_IDS=use_ids,
            WHOLE_TILE=(t % block == 0),
            BLOCK=block,
            BLOCK_F=block_f,
            ACC=tl.float64 if y.dtype == torch.float64 else tl.float32,
        )
    return g
