"""Compile the launches a Triton wrapper makes, specialised as Triton's GPU launcher would, without a GPU.

A signature written by hand (``"n": "i32"``) misses what the launcher does with the actual arguments: on a GPU,
Triton 3.7 turns an int argument equal to 1 into a constexpr and marks ints and pointers divisible by 16, so a
kernel that compiles from a hand-written signature can still fail at its first launch with a 1 (the 2nd tensor of
a list, step 1). Here the wrapper runs on CPU tensors with its kernel replaced by a recorder; each recorded launch
goes through the kernel's own binder for the CUDA backend, and the resulting specialisation is compiled to a cubin
exactly as ``JITFunction.run`` would compile it. Used from a subprocess without ``TRITON_INTERPRET`` (see
``_triton_aot.assert_compiles_for_gpus``); importing this module imports no Triton.
"""

from __future__ import annotations

import contextlib


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((tuple(grid), args, kwargs))

        return launch


@contextlib.contextmanager
def recording(module, name: str):
    """Replace ``module.name`` (a jitted kernel) by a :class:`Recorder` for the duration of the block."""
    rec = Recorder(getattr(module, name))
    setattr(module, name, rec)
    try:
        yield rec
    finally:
        setattr(module, name, rec.fn)


def compile_like_launcher(fn, args, kwargs, arch: int = 80):
    """Compile one launch of ``fn`` for ``sm_<arch>`` with the specialisation the CUDA launcher would give it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    assert len(kernel.asm["cubin"]) > 0
    return kernel


def compile_recorded(rec: Recorder, archs=(80,)) -> int:
    """Compile every launch ``rec`` recorded (see :func:`compile_like_launcher`); returns how many there were."""
    assert rec.calls, "the wrapper launched nothing"
    for _, args, kwargs in rec.calls:
        for arch in archs:
            compile_like_launcher(rec.fn, args, kwargs, arch)
    return len(rec.calls)
