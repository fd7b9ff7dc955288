"""The tanh-form GELU of GPT-2 and its descendants (Hugging Face's ``gelu_new``, ``gelu_fast`` and
``gelu_pytorch_tanh``): :func:`gelu_tanh` (the op, differentiable), its specification in ``reference.py``; the C++
kernels are in ``csrc/activations/``.

::

    gelu_tanh(x, c) = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))        c = sqrt(2 / pi) unless given

On CPU tensors of float32 or float64 the C++ kernel computes it, and its derivative, in one vectorised pass as
``x sigmoid(2u)`` (the same function, without the cancellation of ``1 + tanh(u)`` for negative ``u``), with its
own branch-free ``exp``, whose rounding error grows with the size of its argument. Against the exact formula
(measured on a grid over [-30, 10], float32 and float64 alike in ulps): within 2 ulps for ``x >= 0``; for
negative ``x``, where the result is small, up to 8 ulps on [-2, 0), 45 on [-5, -2) and 165 on [-9, -5) (relative
error at most 1.1e-5 in float32, 2.3e-14 in float64), and further out up to 200 ulps in float32 and 2000 in
float64 (relative 1.3e-5 and 2.4e-13). Absolute errors stay below 5.2e-7 in float32 and 1.2e-15 in float64. The
exponent is clamped so that ``exp`` stays normal, and past the clamp the kernel returns ``-0``: for ``x`` in
about [-10.8, -9.67] (float32) and [-21.55, -21.05] (float64) the exact value is representable (as large as
1.8e-34 and 2.1e-303 in magnitude) and is lost (the derivative returned there is 0); below those ranges it rounds
to ``-0`` anyway. torch's own CPU kernel of the tanh GELU is several times slower and slows down as its arguments
grow (``bench/bench_activations.py``; figures in docs/benchmarks.md). On CUDA tensors of those dtypes a CUDA
kernel of the same arithmetic is registered (``csrc/activations/activations.cu``; compiled in CUDA builds, not
measured here), and everywhere else (half precision) torch's ``F.gelu(x, approximate="tanh")`` (the
``reference`` backend). Inside a model's forward (:func:`gelu_tanh_unchecked`) the C++ kernel runs on CPU tensors
and torch's fused kernel on every other device. No Triton kernel is registered: an elementwise pass gains nothing
over the CUDA one.
"""

from .op import gelu_tanh, gelu_tanh_unchecked
from .reference import SQRT_2_OVER_PI, gelu_tanh_backward_reference, gelu_tanh_reference

__all__ = [
    "SQRT_2_OVER_PI",
    "gelu_tanh",
    "gelu_tanh_backward_reference",
    "gelu_tanh_reference",
    "gelu_tanh_unchecked",
]
