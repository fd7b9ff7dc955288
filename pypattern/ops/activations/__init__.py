"""The tanh-form GELU of GPT-2 and its descendants (Hugging Face's ``gelu_new``, ``gelu_fast`` and
``gelu_pytorch_tanh``): :func:`gelu_tanh` (the op, differentiable), its specification in ``reference.py``; the C++
kernels are in ``csrc/activations/``.

::

    gelu_tanh(x, c) = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))        c = sqrt(2 / pi) unless given

On CPU tensors of float32 or float64 the C++ kernel computes it, and its derivative, in one vectorised pass as
``x sigmoid(2u)`` (the same function, without the cancellation of ``1 + tanh(u)`` for negative ``u``), with its
own branch-free ``exp``: within 1 ulp or so of the float64 formula (tested: 5e-7 absolute in float32, 1e-15 in
float64 on inputs up to 30 standard deviations). torch's own CPU kernel of the tanh GELU is several times slower
and slows down as its arguments grow (``bench/bench_activations.py``; figures in docs/benchmarks.md). On CUDA tensors of those dtypes
a CUDA kernel of the same arithmetic is registered (``csrc/activations/activations.cu``; compiled in CUDA builds,
not measured here), and everywhere else (half precision) torch's ``F.gelu(x, approximate="tanh")`` (the
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
