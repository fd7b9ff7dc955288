"""The public SGNHT op: argument validation, then the backend chosen by :mod:`pypattern._backends`.

The update, the thermostat reduction and the noise stream are specified in :mod:`pypattern.ops.sgnht` and
:mod:`.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import _backends
from ..sgld import op as sgld_op
from .reference import sgnht_step_reference_


def validate_state(name: str, states, params) -> list:
    """``states`` as a list, checked to match ``params`` tensor by tensor (shape, dtype, device)."""
    states = sgld_op.as_list(name, states)
    if len(states) != len(params):
        raise ValueError(f"{name} must have one tensor per params entry: {len(states)} != {len(params)}")
    for i, (s, w) in enumerate(zip(states, params)):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(s).__name__}")
        _backends.refuse_non_strided("", f"{name}[{i}]", s)
        if s.shape != w.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(s.shape)} but params[{i}] has {tuple(w.shape)}")
        if s.dtype != w.dtype:
            raise TypeError(f"{name}[{i}] has dtype {s.dtype} but params[{i}] has {w.dtype}")
        if s.device != w.device:
            raise ValueError(f"{name}[{i}] is on {s.device} but params[{i}] is on {w.device}")
    return states


def _sgnht_step_c(
    params,
    grads,
    anchors,
    momenta,
    thermostat,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay,
    diffusion_factor,
    noise_scale,
    bounding_box,
    masks,
    seed,
    step,
) -> torch.Tensor:
    """The registered ``torch.ops.pypattern.sgnht_step_`` (csrc/sgnht/): C++ on CPU tensors, CUDA on CUDA ones."""
    return torch.ops.pypattern.sgnht_step_(
        list(params),
        list(grads),
        list(anchors),
        list(momenta),
        thermostat,
        [] if masks is None else list(masks),
        float(step_size),
        float(nbeta),
        float(localization),
        float(weight_decay),
        float(diffusion_factor),
        float(noise_scale),
        None if bounding_box is None else float(bounding_box),
        sgld_op.signed64(seed),
        sgld_op.signed64(step),
    )


_backends.register("sgnht_step_", "reference", sgnht_step_reference_)
_backends.register("sgnht_step_", "triton", "pypattern.ops.sgnht.triton:sgnht_step_triton_")
_backends.register("sgnht_step_", ("cpp", "cuda"), _sgnht_step_c)


def sgnht_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    momenta: Sequence[torch.Tensor],
    thermostat: torch.Tensor,
    *,
    step_size: float,
    nbeta: float,
    localization: float,
    weight_decay: float = 0.0,
    diffusion_factor: float = 0.01,
    noise_scale: float = 1.0,
    bounding_box: float | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    seed: int,
    step: int,
    backend: str | None = None,
    validate: bool = True,
    check_finite: bool = True,
) -> torch.Tensor:
    """One SGNHT step over lists of tensors, in place (see :mod:`pypattern.ops.sgnht` for the update).

    Parameters
    ----------
    params, grads, anchors, momenta : list of Tensor
        Same length; tensor ``i`` of each has the same shape, dtype (float32 or float64) and device. ``params``
        and ``momenta`` are updated in place (any strides); ``anchors`` are the trained weights ``w*``.
    thermostat : Tensor, shape ``(1,)`` or ``()``, float64
        The thermostat ``xi`` shared by all the tensors (one parameter group), on the params' device; updated in
        place from the mean squared momentum of this step.
    step_size : float
        ``eps`` > 0.
    nbeta, localization, weight_decay : float
        >= 0, the drift terms as in :func:`pypattern.ops.sgld.sgld_step_`.
    diffusion_factor : float
        ``A`` >= 0: the momentum noise has variance ``2 A eps noise_scale**2``; the thermostat settles near it.
    noise_scale : float
        >= 0; the thermostat's target is ``mean(p**2) = eps * noise_scale**2``.
    bounding_box : float or None
        Half-width > 0: an entry leaving ``w* +- bounding_box`` is clamped to it and its momentum reversed.
    masks : list of (Tensor or None), optional
        Bool or float, same shape as the params; 0 freezes an entry (its weight and momentum, and it is left out
        of the thermostat's mean), other values scale its momentum change and its move.
    seed, step : int
        In [0, 2**64). With the tensor index and element index they key the noise (the SGLD stream).
    backend : {"cuda", "triton", "cpp", "reference"}, optional
        Force a backend (else ``PYPATTERN_BACKEND``, else the fastest available).
    validate : bool
        Check every argument (``False``: the caller validated the same tensors and numbers once).
    check_finite : bool
        Raise ``FloatingPointError`` naming the tensors, the step and what to change when the returned flags are
        not all 0 (with ``validate`` True or False alike). Whatever its value, an entry whose gradient held NaN or
        Inf, or whose finite gradient gives a non-finite new weight or momentum, is never written: it keeps its
        weight and its momentum (and counts in the thermostat's mean with that momentum). With ``check_finite``,
        a thermostat that the step would make inf or NaN (finite squared momenta whose sum overflows float64)
        keeps its value and the step raises ``FloatingPointError`` naming it.

    Returns
    -------
    Tensor, shape ``(len(params),)``, int32
        Per tensor, its flags OR-ed over its entries, as :func:`pypattern.ops.sgld.sgld_step_`'s: bit ``1`` where a
        gradient held NaN or Inf, bit ``2`` where a finite gradient gave a non-finite new weight or momentum, or a
        momentum whose square overflows float64 (it would make the thermostat infinite); tested before the
        ``bounding_box`` clamp. The entries flagged were left unchanged.
    """
    if validate:
        params, grads, anchors, masks, device = sgld_op.validate_inputs(params, grads, anchors, masks)
        momenta = validate_state("momenta", momenta, params)
        sgld_op.check_states(
            "momenta",
            momenta,
            {"params": params, "grads": grads, "anchors": anchors, "masks": masks or []},
        )
        if not isinstance(thermostat, torch.Tensor):
            raise TypeError(
                f"thermostat must be a float64 tensor with one element, got {type(thermostat).__name__}"
            )
        _backends.refuse_non_strided("sgnht_step_", "thermostat", thermostat)
        if thermostat.dtype != torch.float64 or thermostat.numel() != 1:
            raise ValueError(
                f"thermostat must be a float64 tensor with one element, got dtype {thermostat.dtype} and shape "
                f"{tuple(thermostat.shape)}"
            )
        if params and thermostat.device != device:
            raise ValueError(f"thermostat is on {thermostat.device} but params are on {device}")
        if torch.is_grad_enabled() and thermostat.requires_grad:
            raise RuntimeError("thermostat requires grad and grad mode is on: step under torch.no_grad()")
        if not torch.is_inference_mode_enabled() and thermostat.is_inference():
            raise RuntimeError(sgld_op._inference_message("thermostat"))
        if thermostat.is_neg():
            raise ValueError(sgld_op.negative_view_message("thermostat", "the step"))
        for other, ts in (
            ("params", params),
            ("momenta", momenta),
            ("grads", grads),
            ("anchors", anchors),
            ("masks", masks or []),
        ):
            for j, t in enumerate(ts):
                if t is None:
                    continue
                status = sgld_op._overlap(thermostat, t)
                if status:
                    raise ValueError(
                        f"thermostat {sgld_op.shares(status)} with {other}[{j}]: the step would overwrite one with "
                        "the other; give the thermostat its own tensor"
                    )
        if not bool(torch.isfinite(thermostat).all()):
            raise ValueError(f"thermostat must be finite, got {float(thermostat.reshape(()))}")
        step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step = (
            sgld_op.check_hyperparameters(
                step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step
            )
        )
        diffusion_factor = sgld_op.check_scalar("diffusion_factor", diffusion_factor)
    if not params:
        return torch.zeros(0, dtype=torch.int32)
    thermostat0 = (
        thermostat.detach().clone() if check_finite else None
    )  # kept if the step turns it non-finite
    flags = _backends.dispatch("sgnht_step_", params[0].device, backend)(
        params,
        grads,
        anchors,
        momenta,
        thermostat,
        step_size=step_size,
        nbeta=nbeta,
        localization=localization,
        weight_decay=weight_decay,
        diffusion_factor=diffusion_factor,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        masks=masks,
        seed=seed,
        step=step,
    )
    torch.autograd.graph.increment_version([*params, *momenta, thermostat])
    if not check_finite:
        return flags
    flagged = bool(flags.any())
    if not bool(torch.isfinite(thermostat).all()):
        # the thermostat's update overflowed: each squared momentum was finite (else its entry is flagged and
        # kept), but their sum, or the thermostat plus their mean, was not
        with torch.no_grad():
            thermostat.copy_(thermostat0)
        if not flagged and not bool(torch.isfinite(thermostat0).all()):  # given so (validate=False)
            raise FloatingPointError(
                f"sgnht_step_: the thermostat held {float(thermostat0.reshape(()))} before step {step}; give a "
                "finite thermostat"
            )
        if not flagged:
            largest = max((float(p.abs().max()) for p in momenta if p.numel()), default=0.0)
            raise FloatingPointError(
                f"sgnht_step_: the thermostat's update overflowed to inf/NaN at step {step} (the sum of the squared "
                f"momenta exceeds float64, largest |momentum| {largest:.3g}); "
                "the thermostat keeps its value, params and momenta were updated. Use a smaller step_size (or a "
                "smaller nbeta), or give momenta of a sensible scale."
            )
    if flagged:
        sgld_op.raise_on_flags(
            "sgnht_step_",
            flags,
            params,
            step=step,
            step_size=step_size,
            nbeta=nbeta,
            state="momenta",
            states=momenta,
        )
    return flags
