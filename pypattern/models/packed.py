"""Matmuls against weights held fixed, through oneDNN's pre-packed weights on the CPU.

Inside :meth:`Transformer.fixed_weights <pypattern.models.Transformer.fixed_weights>` the caller promises not to
change the model's weights, so their products can go through oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``): a weight used for few rows is read in place, and one used for many is
laid out once in the blocked format of oneDNN's kernels (``torch.ops.mkldnn._reorder_linear_weight``), so every
later product against it skips the operand packing that a BLAS ``sgemm`` repeats on each call. Whether oneDNN is
faster than the BLAS ``mm`` depends on the CPU and its BLAS (on AMD CPUs MKL does not use its fastest kernels;
oneDNN picks its kernel by instruction set), so the choice is made once per process by timing both on one product
(:func:`packed_gemm_enabled`); ``PYPATTERN_GEMM=onednn`` or ``PYPATTERN_GEMM=blas`` fixes it.

The path applies to float32 CPU products of at least :attr:`PackedWeights.MIN_MACS` multiply-adds, with no
gradient flowing into the weight or bias; a gradient flowing into the input is taken through the weight's
transpose the same way, so attribution patching's backward uses the same kernels. Everything else (float64, GPUs,
small products, ``torch.func`` transforms, forward-mode AD, CPU autocast, weights that take gradients) goes
through ``torch.mm``; inference tensors are read in place, never packed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
from torch.autograd import forward_ad

from .._training import frozen_parameters

__all__ = [
    "PackedWeights",
    "block_weight_bytes",
    "frozen_fixed_weights",
    "pack_budget",
    "packed_gemm_enabled",
]

_CHOICE: bool | None = None
_STEP_HOOK = None  # the optimiser step hook of :func:`_watch_fused_steps`, once registered


def _advance_fused_versions(optimizer, args, kwargs) -> None:
    """After an optimiser's step: its parameters in fused groups (``fused=True``) that took a step get their
    version counters advanced. Fused kernels write the parameters without advancing them (the foreach and
    per-tensor steps do), so a packed copy, an attention layout or a graph saved before the step would be read as
    current."""
    params = [
        p
        for group in optimizer.param_groups
        if group.get("fused")
        for p in group["params"]
        if p.grad is not None and not p.is_inference()
    ]
    if params:
        torch.autograd.graph.increment_version(params)


def _watch_fused_steps() -> None:
    """Register :func:`_advance_fused_versions` for every optimiser's step (once per process, when the first
    block of fixed weights opens)."""
    global _STEP_HOOK
    if _STEP_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK = register_optimizer_step_post_hook(_advance_fused_versions)


def _ops_present() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


def _best_of_interleaved(fs: list, reps: int = 2, rounds: int = 7) -> list[float]:
    """The fastest of ``rounds`` timings of ``reps`` calls of each of ``fs``, the functions timed in turn within
    each round (so that a slow moment of the CPU falls on all of them, not on one), after one call of each."""
    for f in fs:
        f()
    best = [float("inf")] * len(fs)
    for _ in range(rounds):
        for i, f in enumerate(fs):
            t = time.perf_counter()
            for _ in range(reps):
                f()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def _calibrate() -> bool:
    """Whether oneDNN's packed matmul beats ``torch.mm`` by at least 5% on a ``(256, 768) @ (768, 768)`` product
    (the fastest of seven rounds of two calls each, the two timed in turn within each round; about 0.1 s on one
    core)."""
    gen = torch.Generator().manual_seed(0)
    # float32 whatever torch's default dtype (the path serves float32 products only)
    # on the CPU whatever torch's default device (CPU products are timed; a CPU generator)
    a = torch.randn(256, 768, generator=gen, dtype=torch.float32, device="cpu")
    W = torch.randn(768, 768, generator=gen, dtype=torch.float32, device="cpu")
    packed = torch.ops.mkldnn._reorder_linear_weight(W.t().contiguous())
    blas, onednn = _best_of_interleaved(
        [lambda: torch.mm(a, W), lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")]
    )
    return onednn < 0.95 * blas


def packed_gemm_enabled() -> bool:
    """Whether products against fixed weights go through oneDNN's packed matmul in this process: ``PYPATTERN_GEMM``
    (``onednn`` or ``blas``) if set, else the faster of the two on this CPU, timed once per process."""
    global _CHOICE
    if _CHOICE is None:
        want = os.environ.get("PYPATTERN_GEMM", "auto").strip().lower()
        if want not in ("auto", "onednn", "blas"):
            raise ValueError(f"PYPATTERN_GEMM={want!r} is not valid; give 'auto', 'onednn' or 'blas'")
        if want == "blas" or not _ops_present():
            _CHOICE = False
        elif want == "onednn":
            _CHOICE = True
        else:
            with torch.no_grad():
                _CHOICE = _calibrate()
    return _CHOICE


class _PackedLinear(torch.autograd.Function):
    """``x (rows, n) @ W (+ b)`` through oneDNN; the input's gradient ``dy @ W^T`` through oneDNN too (through
    ``torch.mm`` when a graph of the backward is asked for, ``create_graph=True``, so that higher derivatives are
    right). No gradient for ``W`` or ``b`` (the caller checks that none is asked for); ``W`` is saved for the
    backward, so changing it in place before the backward raises autograd's error, as ``mm`` does."""

    @staticmethod
    def forward(ctx, x, b, cache, W, w):  # noqa: D401 - autograd signature
        ctx.cache = cache
        ctx.save_for_backward(W)
        return cache.product(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        (W,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable in dy
            return dy @ W.t(), None, None, None, None
        w = ctx.cache.operand(W, dy.shape[0], transpose=True)
        dx = dy @ W.t() if w is None else ctx.cache.product(dy, w, None)
        return dx, None, None, None, None


def functorch_wrapped(*ts: torch.Tensor) -> bool:
    """Whether any of ``ts`` is a ``torch.func`` transform's wrapper (a vmapped or functionalised tensor)."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts)


def _padded_bytes(W: torch.Tensor) -> int:
    """Bytes of ``W``'s packed copy, charged with both axes rounded up to 64 (oneDNN pads the blocked layout)."""
    n, m = W.shape
    return -(-n // 64) * 64 * (-(-m // 64) * 64) * W.element_size()


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # an older signature
        return torch.is_autocast_cpu_enabled()


class PackedWeights:
    """Packed copies of the weights met while the model's weights are held fixed: ``W (n, m)`` packed for
    ``x @ W`` (and its transpose for gradients into ``x``), keyed by storage, shape and strides, and checked
    against the weight's version counter on every use (a weight changed in place through autograd-visible ops is
    packed anew, a fused optimiser's step included: :func:`_watch_fused_steps`; values changed in place through
    ``.data`` (``p.data.copy_(t)``, ``p.data[h] = 0``) are not seen, as no version counter records them and no
    check of O(1) cost can, and the block's contract excludes them: change weights in place under
    ``torch.no_grad()`` instead).

    A weight is packed only once it has been multiplied by :attr:`PACK_AFTER_ROWS` rows in the block (before that,
    oneDNN reads it in place): a pack costs about a 100-row product and saves 5-15% of each later one against the
    in-place read, so a weight used for a few hundred rows (attribution patching's two runs and one backward) is
    not packed. Inference tensors (made under ``torch.inference_mode``) have no version counter and are always
    read in place."""

    PACK_AFTER_ROWS = 1024

    #: products of fewer multiply-adds stay with ``torch.mm``: a oneDNN call costs about 13 us more than an ``mm``
    #: call, which its faster kernels make up only from about 10 million multiply-adds
    MIN_MACS = 1 << 24

    def __init__(self, max_bytes: int | None = None) -> None:
        #: at most this many bytes of packed copies at once (None: no bound), each charged at its padded size; a
        #: weight that would exceed it is read in place instead
        self.max_bytes = max_bytes
        self._packs: dict[tuple, tuple] = {}  # version, packed copy, weight, bytes, storage
        self._rows: dict[tuple, int] = {}
        self._bytes = 0
        _watch_fused_steps()

    @staticmethod
    def applies(
        x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, min_macs: int | None = None
    ) -> bool:
        """Whether ``affine(x, W, b)`` may take the oneDNN path: float32 CPU operands, a 2-d weight, a bias of
        its width or none, no gradient into ``W``/``b``, no ``torch.func`` wrapper, forward-mode AD or CPU
        autocast, at least ``min_macs`` multiply-adds (default :attr:`MIN_MACS`), and the path chosen for this
        process (timed on the first product that gets this far)."""
        if W.dim() != 2 or x.dim() < 1 or x.device.type != "cpu" or W.device.type != "cpu":
            return False
        if x.dtype != torch.float32 or W.dtype != torch.float32:
            return False
        if b is not None and (
            b.dim() != 1 or b.shape[0] != W.shape[1] or b.dtype != torch.float32 or b.device.type != "cpu"
        ):
            return False
        if torch.is_grad_enabled() and (W.requires_grad or (b is not None and b.requires_grad)):
            return False
        if x.shape[-1] != W.shape[0] or x.numel() == 0 or W.numel() == 0:
            return False
        if x.numel() * W.shape[1] < (
            PackedWeights.MIN_MACS if min_macs is None else min_macs
        ):  # rows x n x m
            return False
        if functorch_wrapped(x, W) or (b is not None and functorch_wrapped(b)):
            return False
        # dual tensors may flow (no forward-mode formula); autocast would cast mm's inputs
        if forward_ad._current_level >= 0 or _autocast_on():
            return False
        return packed_gemm_enabled()

    def packed(self, W: torch.Tensor, rows: int, transpose: bool = False) -> torch.Tensor | None:
        """``W`` packed (as ``W^T`` for ``x @ W``, as ``W`` itself with ``transpose`` for ``dy @ W^T``), or None
        while fewer than :attr:`PACK_AFTER_ROWS` rows, these ``rows`` included, have been multiplied by it, when
        the copy would exceed :attr:`max_bytes`, or for an inference tensor."""
        if W.is_inference():
            return None
        key = (W.data_ptr(), tuple(W.shape), tuple(W.stride()), transpose)
        hit = self._packs.get(key)
        if hit is not None and hit[2].data_ptr() != key[0]:
            # the weight the copy was packed from holds other data now (``.to(dtype)`` / ``.half()`` give a
            # parameter new data and keep its version counter), and W is another tensor at the old address
            self._bytes -= self._packs.pop(key)[3]
            hit = None
        if hit is not None and hit[0] == W._version:
            return hit[1]
        seen = self._rows.get(key, 0) + rows
        self._rows[key] = seen
        if seen < self.PACK_AFTER_ROWS:
            return None
        size = _padded_bytes(W)
        held = self._bytes - (0 if hit is None else hit[3])
        if self.max_bytes is not None and held + size > self.max_bytes:
            return None
        with torch.no_grad():
            w = W.detach()
            # oneDNN's linear takes the weight as (out, in): W^T for x @ W, W itself for dy @ W^T
            packed = torch.ops.mkldnn._reorder_linear_weight((w if transpose else w.t()).contiguous())
        # the entry holds W and its storage: W alone does not keep the storage (``.to(dtype)`` / ``.half()`` give a
        # parameter new data and keep its version counter), and new data must not land at the packed address
        self._packs[key] = (W._version, packed, W, size, W.untyped_storage())
        self._bytes = held + size
        return packed

    def forget(self, tensors) -> None:
        """Drop the packed copies of ``tensors`` (weights that are about to be released, e.g. the attention
        layouts of a nested :meth:`Transformer.fixed_weights` block that ends)."""
        ids = {id(t) for t in tensors}
        for key in [k for k, e in self._packs.items() if id(e[2]) in ids]:
            self._bytes -= self._packs.pop(key)[3]
            self._rows.pop(key, None)

    @staticmethod
    def product(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``x2 (rows, n)`` times oneDNN's weight operand ``w`` (packed, or an ``(out, in)`` view) plus ``b``:
        ``(rows, m)``, a tensor of its own (not a view)."""
        # oneDNN reads its operands as dense row-major buffers: strided views are copied first
        b = None if b is None else b.detach().contiguous()
        return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), w, b, "none", [], "")

    def operand(self, W: torch.Tensor, rows: int, transpose: bool = False) -> torch.Tensor | None:
        """oneDNN's weight operand for ``x @ W`` (``dy @ W^T`` with ``transpose``) over ``rows`` more rows: the
        packed weight (:meth:`packed`); before it is packed, ``W`` itself as an ``(out, in)`` view, which oneDNN
        reads in place when one of its two axes is dense (else None: the caller uses ``torch.mm``)."""
        packed = self.packed(W, rows, transpose)
        if packed is not None:
            return packed
        return self.in_place(W, transpose)

    @staticmethod
    def in_place(W: torch.Tensor, transpose: bool = False) -> torch.Tensor | None:
        """``W`` as oneDNN's ``(out, in)`` operand for ``x @ W`` (``W^T``; ``W`` itself for ``dy @ W^T`` with
        ``transpose``), a view that oneDNN reads in place when one of its two axes is dense; else None."""
        w = W if transpose else W.t()
        return w if (w.stride(-1) == 1 or w.stride(-2) == 1) else None

    def affine(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
        """``x (..., n) @ W (n, m) (+ b (m,))`` through oneDNN (call only where :meth:`applies`), or None for a
        weight it cannot read in place before it is packed (the caller then multiplies with ``torch.mm``)."""
        x2 = x.reshape(-1, x.shape[-1])
        w = self.operand(W, x2.shape[0])
        if w is None:
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            out = _PackedLinear.apply(x2, b, self, W, w)
        else:
            out = self.product(x2, w, b)
        # the view is taken outside the autograd function: in-place edits of it (a hook's) stay allowed
        return out.view(*x.shape[:-1], W.shape[1])


def block_weight_bytes(model) -> int:
    """Bytes of ``model``'s block weights that products may pack: every float32 CPU parameter of two or more axes
    under ``model.blocks`` (0 when any of them is of another dtype or device: packing then never applies)."""
    params = [p for blk in getattr(model, "blocks", []) for p in blk.parameters() if p.dim() >= 2]
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return 0
    return sum(p.numel() * p.element_size() for p in params)


def pack_budget(model, max_memory: int | float | None) -> int | None:
    """Bytes of packed weight copies a patching run on ``model`` may hold within ``max_memory`` bytes: the model's
    block weights (:func:`block_weight_bytes`) when packing applies (the packed path chosen for this process) and
    they take at most half of ``max_memory``, else 0 (weights are then read in place, with no copy). None when
    ``max_memory`` is None (no bound)."""
    if max_memory is None:
        return None
    need = block_weight_bytes(model)
    if need == 0 or need > max_memory // 2 or not packed_gemm_enabled():
        return 0
    return int(need)


@contextlib.contextmanager
def frozen_fixed_weights(model, params: list | None = None, pack_bytes: int | None = None) -> Iterator[None]:
    """``model.fixed_weights`` with at most one packed copy of its block weights (:func:`block_weight_bytes`),
    and no gradient taken for the weights: every parameter's ``requires_grad`` is turned off for the block and the
    ones that had it are put back, so products with a gradient into their input only take the oneDNN path too.
    For computations whose gradients are with respect to inputs (the circuits engine, and its bench bounds).
    ``params`` (the model's parameters) and ``pack_bytes`` (its block weights' bytes), when the caller has them,
    spare the walk over the model's modules."""
    nbytes = block_weight_bytes(model) if pack_bytes is None else pack_bytes
    with frozen_parameters(model, params), model.fixed_weights(max_pack_bytes=nbytes):
        yield
