"""Triton kernel of the streaming cross-covariance update (see :mod:`pypattern.ops.covariance`).

One program owns a ``(BLOCK_K, BLOCK_N)`` tile of the co-moment (or several tiles of one column block, when the
K tiles outnumber the grid's second axis; see :func:`comoment_grid`) and walks over the chunk's draws in steps of
``BLOCK_M``: it loads the raw draws (float32 or float64, any strides), centres them in float64 on load
(``(x - shift) - chunk_mean``), accumulates ``ac^T bc`` with a float64 ``tl.dot``, adds the Chan term
``w * delta_a delta_b^T`` and writes the tile back once. The chunk means are computed in torch by
:func:`cross_covariance_update_triton_`, the ``triton`` backend of the op (imported only when that backend runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_launch import MAX_GRID_YZ, launch_guard


@triton.jit
def _comoment_kernel(
    c_ptr,
    a_ptr,
    b_ptr,
    sa_ptr,
    ma_ptr,
    sb_ptr,
    mb_ptr,
    da_ptr,
    db_ptr,
    w: tl.float64,  # the Chan weight: a Python float goes to a GPU kernel as float32 unless declared
    M,
    K,
    N,
    s_am,
    s_ak,
    s_bm,
    s_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # N on grid axis 0 (up to 2**31 - 1 programs); the K tiles on axis 1, at most MAX_GRID_YZ programs, each
    # walking the K tiles in steps of the axis's size (see comoment_grid)
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    sb = tl.load(sb_ptr + offs_n, mask=mn, other=0.0)
    mb = tl.load(mb_ptr + offs_n, mask=mn, other=0.0)
    db = tl.load(db_ptr + offs_n, mask=mn, other=0.0)
    for pid_k in range(tl.program_id(1), tl.cdiv(K, BLOCK_K), tl.num_programs(1)):
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        sa = tl.load(sa_ptr + offs_k, mask=mk, other=0.0)
        ma = tl.load(ma_ptr + offs_k, mask=mk, other=0.0)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float64)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mm = offs_m < M
            rows = offs_m.to(tl.int64)
            va = mm[:, None] & mk[None, :]
            a = tl.load(
                a_ptr + rows[:, None] * s_am + offs_k[None, :].to(tl.int64) * s_ak, mask=va, other=0.0
            )
            ac = tl.where(va, (a.to(tl.float64) - sa[None, :]) - ma[None, :], 0.0)
            vb = mm[:, None] & mn[None, :]
            b = tl.load(
                b_ptr + rows[:, None] * s_bm + offs_n[None, :].to(tl.int64) * s_bn, mask=vb, other=0.0
            )
            bc = tl.where(vb, (b.to(tl.float64) - sb[None, :]) - mb[None, :], 0.0)
            acc += tl.dot(tl.trans(ac), bc, input_precision="ieee", out_dtype=tl.float64)
        da = tl.load(da_ptr + offs_k, mask=mk, other=0.0)
        acc += w * (da[:, None] * db[None, :])
        c_ptrs = c_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :]
        vc = mk[:, None] & mn[None, :]
        c = tl.load(c_ptrs, mask=vc, other=0.0)
        tl.store(c_ptrs, c + acc, mask=vc)


def comoment_grid(K: int, N: int, block_k: int, block_n: int) -> tuple[int, int]:
    """The launch grid of ``_comoment_kernel``: the N tiles on axis 0 (whose limit, 2**31 - 1, no co-moment that
    fits in memory reaches), the K tiles on axis 1 capped at ``MAX_GRID_YZ`` (CUDA's limit for axes 1 and 2; the
    kernel loops over the rest)."""
    return (triton.cdiv(N, block_n), min(triton.cdiv(K, block_k), MAX_GRID_YZ))


def comoment_update_triton_(
    comoment: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    shift_a: torch.Tensor,
    mean_a: torch.Tensor,
    shift_b: torch.Tensor,
    mean_b: torch.Tensor,
    delta_a: torch.Tensor,
    delta_b: torch.Tensor,
    w: float,
    *,
    block_m: int = 32,
    block_k: int = 32,
    block_n: int = 32,
) -> None:
    """``comoment += ((a - shift_a) - mean_a)^T ((b - shift_b) - mean_b) + w * outer(delta_a, delta_b)``.

    ``comoment`` ``(K, N)`` contiguous float64; ``a`` ``(M, K)``, ``b`` ``(M, N)`` float32/float64, any strides;
    the vectors float64 and contiguous. Tiles are at least 16 wide (``tl.dot``'s minimum on a GPU).
    """
    M, K = a.shape
    N = b.shape[1]
    if K == 0 or N == 0:
        return
    grid = comoment_grid(K, N, block_k, block_n)
    with launch_guard(comoment.device):
        _comoment_kernel[grid](
            comoment,
            a,
            b,
            shift_a.contiguous(),
            mean_a.contiguous(),
            shift_b.contiguous(),
            mean_b.contiguous(),
            delta_a.contiguous(),
            delta_b.contiguous(),
            float(w),
            M,
            K,
            N,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            BLOCK_N=block_n,
        )


def cross_covariance_update_triton_(
    shift_a, shift_b, mean_a, mean_b, comoment, m2_a, m2_b, a, b, count
) -> None:
    """The chunk update (arguments as :func:`pypattern.ops.covariance.cross_covariance_update_`, validated): the
    chunk means in torch, the co-moments by :func:`comoment_update_triton_`."""
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
