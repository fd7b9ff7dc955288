"""The public RMSprop-preconditioned SGLD op: argument validation, then the backend chosen by
:mod:`pypattern._backends`. The update is specified in :mod:`pypattern.ops.rmsprop_sgld` and :mod:`.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import _backends
from ..sgld import op as sgld_op
from ..sgnht.op import validate_state
from .reference import rmsprop_sgld_step_reference_


def _rmsprop_sgld_step_c(
    params,
    grads,
    anchors,
    square_avgs,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay,
    alpha,
    eps,
    noise_scale,
    bounding_box,
    masks,
    seed,
    step,
) -> torch.Tensor:
    """The registered ``torch.ops.pypattern.rmsprop_sgld_step_`` (csrc/rmsprop_sgld/)."""
    return torch.ops.pypattern.rmsprop_sgld_step_(
        list(params),
        list(grads),
        list(anchors),
        list(square_avgs),
        [] if masks is None else list(masks),
        float(step_size),
        float(nbeta),
        float(localization),
        float(weight_decay),
        float(alpha),
        float(eps),
        float(noise_scale),
        None if bounding_box is None else float(bounding_box),
        sgld_op.signed64(seed),
        sgld_op.signed64(step),
    )


_backends.register("rmsprop_sgld_step_", "reference", rmsprop_sgld_step_reference_)
_backends.register(
    "rmsprop_sgld_step_", "triton", "pypattern.ops.rmsprop_sgld.triton:rmsprop_sgld_step_triton_"
)
_backends.register("rmsprop_sgld_step_", ("cpp", "cuda"), _rmsprop_sgld_step_c)


def rmsprop_sgld_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    square_avgs: Sequence[torch.Tensor],
    *,
    step_size: float,
    nbeta: float,
    localization: float,
    weight_decay: float = 0.0,
    alpha: float = 0.99,
    eps: float = 0.1,
    noise_scale: float = 1.0,
    bounding_box: float | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    seed: int,
    step: int,
    backend: str | None = None,
    validate: bool = True,
    check_finite: bool = True,
) -> torch.Tensor:
    """One RMSprop-preconditioned SGLD step over lists of tensors, in place (see
    :mod:`pypattern.ops.rmsprop_sgld` for the update).

    Parameters
    ----------
    params, grads, anchors, square_avgs : list of Tensor
        Same length; tensor ``i`` of each has the same shape, dtype (float32 or float64) and device. ``params``
        and ``square_avgs`` (the running mean ``V`` of squared gradients, zeros at the start) are updated in
        place (any strides).
    step_size : float
        ``eps`` of the SGLD step, > 0.
    nbeta, localization, weight_decay, noise_scale : float
        >= 0, as in :func:`pypattern.ops.sgld.sgld_step_`.
    alpha : float
        In [0, 1): the decay of ``V``.
    eps : float
        > 0: the preconditioner is ``1 / (sqrt(V) + eps)``.
    bounding_box : float or None
        Half-width > 0 of the box around the anchors that the result is clamped to.
    masks : list of (Tensor or None), optional
        Bool or float; 0 freezes an entry (its weight and its ``V``), other values scale its update.
    seed, step : int
        In [0, 2**64). With the tensor index and element index they key the noise (the SGLD stream).
    backend : {"cuda", "triton", "cpp", "reference"}, optional
        Force a backend (else ``PYPATTERN_BACKEND``, else the fastest available).
    validate, check_finite : bool
        As in :func:`pypattern.ops.sgld.sgld_step_`.

    Returns
    -------
    Tensor, shape ``(len(params),)``, int32
        Per tensor, its flags OR-ed over its entries, as :func:`pypattern.ops.sgld.sgld_step_`'s: bit ``1`` where a
        gradient held NaN or Inf, bit ``2`` where a finite gradient gave a non-finite new weight or ``V`` (tested
        before the ``bounding_box`` clamp). The entries flagged were left unchanged, their ``V`` too.
    """
    if validate:
        params, grads, anchors, masks, _ = sgld_op.validate_inputs(params, grads, anchors, masks)
        square_avgs = validate_state("square_avgs", square_avgs, params)
        sgld_op.check_states(
            "square_avgs",
            square_avgs,
            {"params": params, "grads": grads, "anchors": anchors, "masks": masks or []},
        )
        step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step = (
            sgld_op.check_hyperparameters(
                step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step
            )
        )
        alpha = sgld_op.check_scalar("alpha", alpha)
        if alpha >= 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        eps = sgld_op.check_scalar("eps", eps, positive=True)
    if not params:
        return torch.zeros(0, dtype=torch.int32)
    flags = _backends.dispatch("rmsprop_sgld_step_", params[0].device, backend)(
        params,
        grads,
        anchors,
        square_avgs,
        step_size=step_size,
        nbeta=nbeta,
        localization=localization,
        weight_decay=weight_decay,
        alpha=alpha,
        eps=eps,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        masks=masks,
        seed=seed,
        step=step,
    )
    torch.autograd.graph.increment_version([*params, *square_avgs])
    if check_finite and bool(flags.any()):
        sgld_op.raise_on_flags(
            "rmsprop_sgld_step_",
            flags,
            params,
            step=step,
            step_size=step_size,
            nbeta=nbeta,
            state="square_avgs",
            states=square_avgs,
            nonnegative=True,
        )
    return flags
