"""The public op :func:`signed_sums`: validation and the backend's choice."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence

import numpy as np
import torch

from ... import _backends
from ..sgld.op import _internal_overlap, shares
from .reference import signed_sums_reference_

_OP = "signed_sums_"
_C_DTYPES = (torch.float32, torch.float64)


def _signed_sums_c(out, base, terms, offsets, signs) -> None:
    torch.ops.pypattern.signed_sums_(out, base, terms, offsets, signs)


_backends.register(_OP, "reference", signed_sums_reference_)
_backends.register(_OP, ("cpp", "cuda"), _signed_sums_c)


def _fake_signed_sums(out, base, terms, offsets, signs) -> None:
    return None


# the C++ op's fake implementation (it returns nothing and writes ``out``), so that torch.compile and meta tensors
# can trace through it
_backends.register_fake("pypattern::signed_sums_", _fake_signed_sums)


def _tensors(name: str, xs) -> list[torch.Tensor]:
    """``xs`` as a list of Tensors, refusing a Tensor (give a sequence of them) and anything else in it."""
    if isinstance(xs, torch.Tensor):
        raise TypeError(
            f"signed_sums: {name} must be a sequence of Tensors, got a Tensor (give a list of tensors)"
        )
    try:
        xs = list(xs)
    except TypeError:
        raise TypeError(
            f"signed_sums: {name} must be a sequence of Tensors, got {type(xs).__name__}"
        ) from None
    if not all(isinstance(t, torch.Tensor) for t in xs):
        i = next(i for i, t in enumerate(xs) if not isinstance(t, torch.Tensor))
        raise TypeError(f"signed_sums: {name}[{i}] must be a Tensor, got {type(xs[i]).__name__}")
    if not all(t.layout == torch.strided for t in xs):
        for i, t in enumerate(xs):
            _backends.refuse_non_strided("signed_sums", f"{name}[{i}]", t)
    return xs


def _ints(name: str, xs, integer: bool = True) -> list:
    """``xs`` (a sequence, or a 1-D tensor: of an integer dtype where ``integer``) as a list of its entries."""
    if isinstance(xs, torch.Tensor):
        if xs.dim() != 1 or xs.is_complex() or (integer and xs.is_floating_point()):
            kind = "integer " if integer else ""
            raise ValueError(
                f"signed_sums: {name} is a tensor of shape {tuple(xs.shape)} and dtype {xs.dtype}; give a 1-D "
                f"{kind}tensor or a sequence of ints"
            )
        if integer and xs.dtype == torch.bool:
            raise TypeError(
                f"signed_sums: {name} is a bool tensor; give a 1-D integer tensor or a sequence of ints"
            )
        return xs.tolist()
    try:
        out = list(xs)
    except TypeError:
        raise TypeError(f"signed_sums: {name} must be a sequence of ints, got {type(xs).__name__}") from None
    for i, x in enumerate(out if integer else ()):
        if isinstance(x, bool | np.bool_):  # an index-like bool reads as 0 or 1
            raise TypeError(f"signed_sums: {name}[{i}] is {x!r} (a bool); give ints")
    return out


def _check_lists(P: int, N: int, offsets: list, signs: list) -> tuple[list, list]:
    """The checks of the offsets and signs; returns them as lists of ints."""
    if len(offsets) != P + 1:
        raise ValueError(
            f"signed_sums: offsets has {len(offsets)} entries; expected {P + 1} (one more than base)"
        )
    if not all(type(x) is int for x in offsets):
        try:
            offsets = [operator.index(x) for x in offsets]
        except TypeError:
            i = next(i for i, x in enumerate(offsets) if not hasattr(x, "__index__"))
            raise TypeError(
                f"signed_sums: offsets[{i}] is {offsets[i]!r} ({type(offsets[i]).__name__}); give ints"
            ) from None
    if offsets[0] != 0:
        raise ValueError(f"signed_sums: offsets[0] is {offsets[0]}; expected 0")
    for p in range(P):
        if offsets[p + 1] < offsets[p]:
            raise ValueError(
                f"signed_sums: offsets[{p + 1}] = {offsets[p + 1]} is less than offsets[{p}] = {offsets[p]}; offsets "
                "must not decrease"
            )
    if offsets[P] != N:
        raise ValueError(f"signed_sums: offsets[-1] is {offsets[P]}; expected {N} (the number of terms)")
    if len(signs) != N:
        raise ValueError(f"signed_sums: signs has {len(signs)} entries; expected {N} (one per term)")
    if not all(type(s) is int and (s == 1 or s == -1) for s in signs):
        for i, s in enumerate(signs):
            if isinstance(s, bool) or not (s == 1 or s == -1):
                raise ValueError(f"signed_sums: signs[{i}] is {s!r}; each sign must be 1 or -1")
        signs = [1 if s == 1 else -1 for s in signs]
    return offsets, signs


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[lo, hi)`` that a non-empty tensor's elements span."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    return lo, lo + (last + 1) * t.element_size()


def _check_outputs_writable(out: list) -> None:
    """No output has two elements at one memory location (an expanded view, or strides that fold the tensor onto
    itself, e.g. ``as_strided((3, 3), (2, 1))``): each such location would be written once per element, and the
    last write wins. torch's own test answers "too hard" for the second kind; the exact search of the SGLD op's
    checks decides it (a contiguous tensor never overlaps itself and is not searched)."""
    for p, o in enumerate(out):
        if o.numel() <= 1 or o.is_contiguous():
            continue
        status = _internal_overlap(o)  # torch's test first, then the exact search where it is too hard
        if status and any(st == 0 and n > 1 for n, st in zip(o.shape, o.stride())):
            raise ValueError(
                f"signed_sums: out[{p}] has elements that share memory (an expanded view); give a tensor that can "
                "be written"
            )
        if status:
            raise ValueError(
                f"signed_sums: out[{p}] {shares(status, elements=True)} (its strides {o.stride()} fold its shape "
                f"{tuple(o.shape)} onto itself); give a tensor that can be written"
            )


def _check_overlap(out: list, base: list, terms: list) -> None:
    """``out[p]`` may be ``base[p]`` itself (the same view); no output's address range may overlap another
    output's, a base's or a term's (as the C++ kernel checks; interleaved views are refused too)."""
    spans = []
    _check_outputs_writable(out)
    for p, o in enumerate(out):
        if o.numel():
            spans.append((*_span(o), p))
    spans.sort()
    for j in range(1, len(spans)):
        if spans[j][0] < spans[j - 1][1]:
            raise ValueError(
                f"signed_sums: out[{spans[j - 1][2]}] and out[{spans[j][2]}] share memory (their address ranges "
                "overlap); give outputs in memory apart"
            )
    if not spans:
        return
    his = [s[1] for s in spans]

    def visit(name: str, i: int, t: torch.Tensor, own: int | None) -> None:
        if not t.numel():
            return
        lo, hi = _span(t)
        for j in range(bisect.bisect_right(his, lo), len(spans)):
            olo, _, p = spans[j]
            if olo >= hi:
                break
            o = out[p]
            if not (p == own and o.data_ptr() == t.data_ptr() and o.stride() == t.stride()):
                raise ValueError(
                    f"signed_sums: {name}[{i}] shares memory with out[{p}] (their address ranges overlap); an output "
                    "may be its own base (the same view) but must not overlap a term or another output's base"
                )

    for p, b in enumerate(base):
        visit("base", p, b, p)
    for i, t in enumerate(terms):
        visit("terms", i, t, None)


def _check_tensors(out: list, base: list, terms: list, overlap: bool = True) -> None:
    """Every tensor of ``base[0]``'s shape, dtype and device, and (``overlap``) the outputs' memory apart from the
    inputs' (as the C++ kernel checks for itself; not while tracing or under ``torch.func``, where tensors have no
    memory to compare)."""
    ref = base[0]
    shape, dtype, device = ref.shape, ref.dtype, ref.device
    for name, ts in (("base", base), ("out", out), ("terms", terms)):
        for i, t in enumerate(ts):
            if t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"signed_sums: {name}[{i}] is {t.dtype} on {t.device}, base[0] is {dtype} on {device}; they must "
                    "match"
                )
            if t.shape != shape:
                raise ValueError(
                    f"signed_sums: {name}[{i}] has shape {tuple(t.shape)}; expected {tuple(shape)} as base[0]'s"
                )
    if overlap and device.type != "meta":
        _check_overlap(out, base, terms)


def _chain(base: torch.Tensor, terms: list, signs: list, i0: int, i1: int) -> torch.Tensor:
    """``base + signs[i0] terms[i0] + ...`` as a new tensor, one torch add per term, left to right."""
    acc = base.clone()
    for i in range(i0, i1):
        acc = torch.add(acc, terms[i], alpha=signs[i])
    return acc


def signed_sums(
    base: Sequence[torch.Tensor],
    terms: Sequence[torch.Tensor],
    offsets: Sequence[int] | torch.Tensor,
    signs: Sequence[int] | torch.Tensor,
    *,
    out: Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Each of ``P`` outputs its base plus its own signed terms:
    ``out[p] = base[p] + signs[i0] * terms[i0] + ... + signs[i1 - 1] * terms[i1 - 1]`` with ``i0 = offsets[p]``,
    ``i1 = offsets[p + 1]``, summed left to right in the tensors' dtype (each sign ``+1`` or ``-1``: an exact add or
    subtract rounded once, so the result equals the chain ``torch.add(base[p], terms[i0], alpha=signs[i0], out=o)``,
    ``o.add_(terms[i], alpha=signs[i])``, ... bit for bit).

    The destination inputs of exact edge patching (:mod:`pypattern.circuits`): each is the residual stream or the
    all-ablated input plus or minus the outputs of a few sources (at GPT-2-small shape a pruning point forms about
    370 inputs from about 1,600 source blocks in 23 calls, and about half of a call's terms repeat a block that
    another of its inputs reads). The C++ kernel (CPU tensors of float32 or float64) forms every output of a call
    in one pass over chunks of 4 KiB of each tensor, all outputs of a chunk before the next, so that a term read
    by several outputs comes from memory once; outputs of 8 MiB or more in all are written with non-temporal
    stores where aligned to the vector width. It reads every tensor in place when the trailing dimensions are contiguous in all of
    them and walks the others with their strides (a tensor without unit stride along its last dimension is copied,
    or for an output computed in a buffer and copied back). On CUDA tensors a CUDA build registers torch's
    multi-tensor (foreach) copy and adds: one launch per sign for each round of terms (compiled, not run on the
    CPU-only machines measured); elsewhere (other dtypes, a CPU-only build) the reference, the same sums one
    tensor operation at a time. Not differentiable: the outputs are written as data (the inputs are detached).
    Forward-mode AD dual tensors and ``torch.func`` transforms, and ``torch.compile``'s tracing with the automatic
    choice, take the reference on the inputs as given (under ``vmap`` without ``out``, new batched outputs); a
    backend given by name is traced by ``torch.compile`` as that backend's op.

    Parameters
    ----------
    base : sequence of ``P`` Tensors
        All of one shape, dtype and device (``base[0]``'s; every other tensor too). Entries may repeat.
    terms : sequence of ``N`` Tensors
        The terms of output ``p`` are ``terms[offsets[p]:offsets[p + 1]]``; entries may repeat.
    offsets : ``P + 1`` ints (or a 1-D integer tensor)
        ``offsets[0] == 0``, non-decreasing, ``offsets[P] == N``.
    signs : ``N`` values, each ``1`` or ``-1`` (or a 1-D integer tensor)
    out : sequence of ``P`` Tensors, optional
        Written in place and returned. ``out[p]`` may be ``base[p]`` itself (the same view: ``base[p]`` is added
        to); otherwise no output may share memory with another output, a base or a term (refused, naming both;
        the check compares address ranges, so views that interleave without sharing an element are refused too).
        Default: new contiguous tensors.
    backend : {"cpp", "cuda", "reference"}, optional
        Forces a backend (default: the C++ kernel on CPU tensors of float32 or float64, the CUDA registration on
        CUDA tensors where built, else the reference).

    Returns
    -------
    list of ``P`` Tensors: ``out``.
    """
    base = _tensors("base", base)
    terms = _tensors("terms", terms)
    P, N = len(base), len(terms)
    offsets, signs = _check_lists(P, N, _ints("offsets", offsets), _ints("signs", signs, integer=False))
    if out is not None:
        out = _tensors("out", out)
        if len(out) != P:
            raise ValueError(
                f"signed_sums: out has {len(out)} tensors, base has {P}; give one output per base"
            )
        # (not while torch.compile traces: these checks are not traceable, and traced tensors have no memory)
        if not torch.compiler.is_compiling():
            inference = torch.is_inference_mode_enabled()
            for p, o in enumerate(out):
                # torch forbids it; the C++ kernel would write it regardless
                if not inference and o.is_inference():
                    raise RuntimeError(
                        f"signed_sums: out[{p}] is an inference tensor (made under torch.inference_mode()) and the sums "
                        "are written to it outside inference mode, which torch forbids; call inside "
                        "torch.inference_mode(), or give a normal tensor (.clone() it outside inference mode)"
                    )
                if o.is_neg():  # torch's fallback for the C++ op fails on it (naming no argument), or crashes
                    raise ValueError(
                        f"signed_sums: out[{p}] is a negative view (torch applies its negation lazily, is_neg() is "
                        "True: the imaginary part of a conjugated complex tensor); the sums are written to its memory "
                        "directly; give a tensor without it (.resolve_neg() makes one)"
                    )
    if P == 0:
        return [] if out is None else out
    ref = base[0]
    if ref.dtype == torch.bool:  # + would be a logical or, - is no operation of bools
        raise TypeError(
            "signed_sums: base[0] has dtype torch.bool; signed sums take a floating-point, integer or complex dtype"
        )
    given = out is not None
    if out is None:
        out = [torch.empty(ref.shape, dtype=ref.dtype, device=ref.device) for _ in range(P)]
    if torch.compiler.is_compiling() and backend is None:  # traced: torch's adds, which the compiler handles
        _check_tensors(out, base, terms, overlap=False)
        signed_sums_reference_(out, base, terms, offsets, signs)
        return out
    everything = (*out, *base, *terms)
    # torch.func's wrapped tensors exist only while a transform runs (the scan costs a fifth of a µs per tensor);
    # not while torch.compile traces a forced backend (these checks are not traceable, and the op is)
    compiling = torch.compiler.is_compiling()
    wrapped = (
        not compiling
        and torch._C._functorch.peek_interpreter_stack() is not None
        and any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in everything)
    )
    if wrapped or (not compiling and _backends.has_tangent(*everything)):
        if backend not in (None, "reference"):
            raise ValueError(
                f"signed_sums: backend={backend!r} has no forward-AD or batching rule, and the inputs are dual "
                "tensors or run under torch.func transforms; give backend=None"
            )
        _check_tensors(out, base, terms, overlap=not wrapped)
        if wrapped and not given:  # new outputs out of place: under vmap they are batched as the inputs are
            return [_chain(base[p], terms, signs, offsets[p], offsets[p + 1]) for p in range(P)]
        signed_sums_reference_(out, base, terms, offsets, signs)
        return out
    # the CUDA registration (foreach adds) takes every dtype torch's adds do; the C++ kernel float32 and float64
    name = _backends.choose_for_dtype(_OP, ref, backend, _C_DTYPES, kernels=("cpp",), arg="base[0]")
    if torch.is_grad_enabled() and any(t.requires_grad for t in everything):
        o, b, t = ([x.detach() for x in xs] for xs in (out, base, terms))
    else:
        o, b, t = out, base, terms
    # the C++ kernel checks the tensors itself, with the same errors (tensors on other devices would be dispatched
    # away from it), except an output whose elements overlap in a way torch's test calls too hard to decide
    if name != "cpp" or not all(x.is_cpu for x in everything):
        _check_tensors(o, b, t, overlap=not compiling)
    elif given and not compiling:
        _check_outputs_writable(o)
    _backends.implementation(_OP, name)(o, b, t, offsets, signs)
    if given and not compiling:  # the kernels write through the outputs' memory: autograd learns of it
        torch.autograd.graph.increment_version(out)
    return out
