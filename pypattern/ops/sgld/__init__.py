"""The fused SGLD step: :func:`sgld_step_` (the op), its specification in ``reference.py`` and its Triton
kernel in ``triton.py``; the C++ and CUDA kernels are in ``csrc/sgld/``.

For every tensor ``w`` with gradient ``g``, anchor ``w0`` (the trained weights ``w*``) and optional mask ``m``::

    w <- w + m * ( -(eps/2) * (nbeta * g + localization * (w - w0) + weight_decay * w) + sqrt(eps) * noise_scale * xi )

then, if ``bounding_box`` is given, ``w`` is clamped to ``w0 +- bounding_box``. Entries whose mask is 0 are left
exactly as they were (no drift, no noise, no clamp). ``g`` is the gradient of the *batch-mean* loss.

No entry is ever written with a non-finite value. The op returns one int32 of flags per tensor, OR-ed over its
entries: ``FLAG_GRAD_NONFINITE`` (1) where the gradient held NaN or Inf, ``FLAG_UPDATE_NONFINITE`` (2) where a
finite gradient gave a non-finite new value (tested before the clamp); such an entry keeps its old value, the
others are updated. With ``check_finite`` (the default) the op raises ``FloatingPointError`` naming the tensors.
The SGNHT and RMSprop-SGLD steps return the same flags and also keep the entry's state (momentum, ``V``).

The noise ``xi`` is standard normal, drawn from a counter-based generator keyed by ``(seed, step, tensor index,
element index)``: Philox4x32-10 with Triton's constants, key = the 64-bit ``seed``, counter =
``(element // 4, tensor_index, step & 0xffffffff, step >> 32)``; the four 32-bit outputs become uniforms with
Triton's ``uint_to_uniform_float`` and normals by Box-Muller, element ``e`` taking normal ``e % 4``. The element
index is the position in row-major order of the tensor's shape, whatever its strides, so a non-contiguous view
gets the same noise as a contiguous copy. The same key gives the same noise on every call.

Many chains in one call: :func:`sgld_chains_step_` takes each tensor stacked over ``C`` chains, ``(C, *shape)``,
with one seed per chain; chain ``c``'s row gets exactly the update (noise included) that :func:`sgld_step_` gives
it with ``seed=seeds[c]``. The chain runner steps a group of SGLD chains with one such call per step.

Streams across backends: ``reference`` (integer Philox in torch), ``cpp``, ``triton`` and ``cuda`` compute the
*same* Philox integers, so their noise agrees element by element up to the float rounding of ``log``, ``sqrt`` and
``cos`` in each backend's math library (measured max difference about 1e-6, see tests/test_sgld.py); they are
not bit-identical. Noise is drawn in float32 and cast for float64 tensors. The stream differs from
``torch.randn``'s, which matches the others only in distribution.
"""

from .op import FLAG_GRAD_NONFINITE, FLAG_UPDATE_NONFINITE, sgld_chains_step_, sgld_step_
from .reference import philox_normals, sgld_chains_step_reference_, sgld_step_reference_

__all__ = [
    "FLAG_GRAD_NONFINITE",
    "FLAG_UPDATE_NONFINITE",
    "philox_normals",
    "sgld_chains_step_",
    "sgld_chains_step_reference_",
    "sgld_step_",
    "sgld_step_reference_",
]
