"""Triton kernel of the fused SGLD step (see :mod:`pypattern.ops.sgld` for the update and the noise stream).

Imported only when the ``triton`` backend runs (it is registered by name in :mod:`pypattern.ops.sgld.op`).

One launch per tensor; each program updates ``BLOCK`` consecutive elements. Element ``e`` draws Philox counter
``e // 4`` and takes output ``e % 4``, exactly as the C++ and CUDA kernels do. On a GPU every element computes its
own Philox call (4x the integer work of sharing one call among four elements; the step stays memory-bound).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._triton_launch import launch_guard
from .reference import each_chain

# The launch arguments that key the noise stream. Triton specialises an int argument equal to 1 into a constexpr
# on a GPU (never in the interpreter), and philox_normal bitcasts these with ``.to(...)``, which a constexpr has
# not: without this, the 2nd tensor of a list (tensor_index 1) or step 1 would not compile. Kept as runtime ints
# they also compile once, not once per value class.
NOISE_KEY_ARGS = ["seed", "tensor_index", "step_lo", "step_hi"]


@triton.jit
def _uniform(x):
    # Triton's uint_to_uniform_float for 32-bit inputs.
    s = x.to(tl.int32, bitcast=True)
    s = tl.where(s < 0, -s - 1, s)
    return s.to(tl.float32) * 4.6566127342e-10


@triton.jit
def philox_normal(offs, seed, tensor_index, step_lo, step_hi):
    """Normal ``offs % 4`` of Philox counter ``offs // 4``: the noise stream every sampler's kernel draws."""
    ctr = (offs // 4).to(tl.uint32)
    zero = ctr * 0
    x0, x1, x2, x3 = tl.philox(
        seed,
        ctr,
        zero + tensor_index.to(tl.uint32, bitcast=True),
        zero + step_lo.to(tl.uint32, bitcast=True),
        zero + step_hi.to(tl.uint32, bitcast=True),
    )
    u0 = tl.maximum(1.0e-7, _uniform(x0))
    u2 = tl.maximum(1.0e-7, _uniform(x2))
    r0 = tl.sqrt(-2.0 * tl.log(u0))
    r1 = tl.sqrt(-2.0 * tl.log(u2))
    t0 = 6.283185307179586 * _uniform(x1)
    t1 = 6.283185307179586 * _uniform(x3)
    lane = offs % 4
    return tl.where(
        lane == 0,
        r0 * tl.cos(t0),
        tl.where(lane == 1, r0 * tl.sin(t0), tl.where(lane == 2, r1 * tl.cos(t1), r1 * tl.sin(t1))),
    )


@triton.jit
def nonfinite(x):
    """NaN or +-Inf, element by element."""
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def flag_bits(grad_nonfinite, update_nonfinite):
    """A program's flags (see :mod:`pypattern.ops.sgld.op`): 1 if any gradient was non-finite, 2 if any update of
    an entry with a finite gradient was."""
    return tl.max(grad_nonfinite.to(tl.int32), axis=0) | (tl.max(update_nonfinite.to(tl.int32), axis=0) * 2)


@triton.jit(do_not_specialize=NOISE_KEY_ARGS)
def _sgld_kernel(
    w_ptr,
    g_ptr,
    a_ptr,
    m_ptr,
    coef_ptr,
    flag_ptr,
    n,
    seed,
    tensor_index,
    step_lo,
    step_hi,
    HAS_MASK: tl.constexpr,
    HAS_BOX: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    a = tl.load(a_ptr + offs, mask=valid, other=0.0)
    c_grad = tl.load(coef_ptr + 0).to(w.dtype)
    c_loc = tl.load(coef_ptr + 1).to(w.dtype)
    c_wd = tl.load(coef_ptr + 2).to(w.dtype)
    c_noise = tl.load(coef_ptr + 3).to(w.dtype)
    delta = -(c_grad * g + c_loc * (w - a) + c_wd * w)
    if HAS_NOISE:
        xi = philox_normal(offs, seed, tensor_index, step_lo, step_hi)
        delta = delta + c_noise * xi.to(w.dtype)
    bad = nonfinite(g)
    active = valid
    if HAS_MASK:
        m = tl.load(m_ptr + offs, mask=valid, other=0.0).to(w.dtype)
        new = w + m * delta
        active = active & (m != 0)
    else:
        new = w + delta
    over = (
        nonfinite(new) & (tl.abs(g) < float("inf")) & active
    )  # tested before the box, which would hide an inf
    if HAS_BOX:
        box = tl.load(coef_ptr + 4).to(w.dtype)
        new = tl.minimum(tl.maximum(new, a - box), a + box)
    keep = bad | over
    if HAS_MASK:
        keep = keep | (m == 0)
    new = tl.where(keep, w, new)
    tl.store(w_ptr + offs, new, mask=valid)
    tl.atomic_or(flag_ptr, flag_bits(bad & valid, over))


def as_i32(x: int) -> int:
    """A 32-bit word as the signed int a Triton launch takes."""
    x &= 0xFFFFFFFF
    return x - 2**32 if x >= 2**31 else x


def sgld_step_triton_(
    params,
    grads,
    anchors,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay,
    noise_scale,
    bounding_box,
    masks,
    seed,
    step,
    block: int | None = None,
) -> torch.Tensor:
    """Launch the kernel once per tensor (inputs already validated by :func:`pypattern.ops.sgld.sgld_step_`).

    Returns the int32 flags per tensor (1: a non-finite gradient, 2: a non-finite update; see
    :func:`pypattern.ops.sgld.sgld_step_`), on the CPU.
    """
    if not params:
        return torch.zeros(0, dtype=torch.int32)
    device = params[0].device
    with launch_guard(device):
        coefs = torch.tensor(
            [
                0.5 * step_size * nbeta,
                0.5 * step_size * localization,
                0.5 * step_size * weight_decay,
                math.sqrt(step_size) * noise_scale,
                bounding_box if bounding_box is not None else 0.0,
            ],
            dtype=torch.float64,
            device=device,
        )
        flags = torch.zeros(len(params), dtype=torch.int32, device=device)
        seed_arg = seed - 2**64 if seed >= 2**63 else seed
        has_noise = math.sqrt(step_size) * noise_scale != 0.0
        for t, (p, g, a) in enumerate(zip(params, grads, anchors)):
            n = p.numel()
            if n == 0:
                continue
            w = p if p.is_contiguous() else p.contiguous()
            gc, ac = g.contiguous(), a.contiguous()
            m = None if masks is None else masks[t]
            mc = m.to(p.dtype).contiguous() if m is not None else w  # dummy pointer when there is no mask
            blk = block or (65536 if device.type == "cpu" else 1024)
            blk = min(blk, triton.next_power_of_2(n))
            _sgld_kernel[(triton.cdiv(n, blk),)](
                w,
                gc,
                ac,
                mc,
                coefs,
                flags[t:],
                n,
                seed_arg,
                as_i32(t),
                as_i32(step),
                as_i32(step >> 32),
                HAS_MASK=m is not None,
                HAS_BOX=bounding_box is not None,
                HAS_NOISE=has_noise,
                BLOCK=blk,
            )
            if w is not p:
                p.copy_(w)
        return flags.cpu()


def sgld_chains_step_triton_(
    params,
    grads,
    anchors,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay,
    noise_scale,
    bounding_box,
    masks,
    seeds,
    step,
    block: int | None = None,
) -> torch.Tensor:
    """Chain ``c``'s rows stepped by :func:`sgld_step_triton_` with seed ``seeds[c]`` (one launch per chain and
    tensor; inputs validated by :func:`pypattern.ops.sgld.op.sgld_chains_step_`). Returns the ``(C, len(params))``
    int32 flags, on the CPU."""
    return each_chain(
        sgld_step_triton_,
        params,
        grads,
        anchors,
        seeds=seeds,
        step_size=step_size,
        nbeta=nbeta,
        localization=localization,
        weight_decay=weight_decay,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        masks=masks,
        step=step,
        block=block,
    )
