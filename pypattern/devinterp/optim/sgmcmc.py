"""``from devinterp.optim import SGMCMC`` (devinterp 1.3 and 2.x) on pypattern: its factories ``SGMCMC.sgld``,
``SGMCMC.sgnht``, ``SGMCMC.rmsprop_sgld`` and ``SGMCMC.get_method(name)`` build pypattern's fused samplers
(:class:`~pypattern.sampling.SGLD`, :class:`~pypattern.sampling.SGNHT`, :class:`~pypattern.sampling.RMSpropSGLD`)
with devinterp's arguments and defaults, and each is also a ``sampling_method`` of ``estimate_learning_coeff``
(picked by its name, as devinterp's are).

The factories take the arguments of both releases: 1.3's ``optimize_over`` and ``metrics`` and 2.x's ``mask``
(the same per-element mask), ``save_metrics``, ``sketch_dim`` and ``sketch_seed``. Optimizer metrics are not
recorded by the fused samplers: ``metrics`` other than empty, ``save_metrics=True`` and a ``sketch_dim`` raise
``NotImplementedError`` naming the argument, as does ``add_grad_correction=True``. ``SGMCMC.sgnht`` is
pypattern's SGNHT, the thermostat of devinterp's ``SGNHT`` class (devinterp's ``SGMCMC.sgnht`` preconditioner
moves its chains far less: see :func:`pypattern.sampling.llc.estimate_learning_coeff_with_summary`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from ...sampling.optim import SGLD
from ...sampling.samplers import SGNHT, RMSpropSGLD

__all__ = ["SGMCMC", "SamplingMethodLiteral"]

SamplingMethodLiteral = Literal["sgld", "rmsprop_sgld", "sgnht"]


def _refuse_unrecorded(factory: str, metrics, save_metrics, sketch_dim) -> None:
    given = {
        "metrics": metrics is not None and len(metrics) > 0,
        "save_metrics": bool(save_metrics),
        "sketch_dim": sketch_dim is not None,
    }
    value = {"metrics": metrics, "save_metrics": save_metrics, "sketch_dim": sketch_dim}
    for name, on in given.items():
        if on:
            raise NotImplementedError(
                f"SGMCMC.{factory}({name}={value[name]!r}): optimizer metrics are not recorded by pypattern's fused "
                f"samplers; leave {name} at its default"
            )


def _masked(factory: str, params, optimize_over, mask):
    """``params`` with devinterp's per-element mask set on every param group (``mask`` is 2.x's name of 1.3's
    ``optimize_over``)."""
    if optimize_over is not None and mask is not None:
        raise ValueError(
            f"SGMCMC.{factory} got mask= and optimize_over= (devinterp 1.3's name for mask): give one"
        )
    m = mask if mask is not None else optimize_over
    if m is None:
        return params
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if params and all(isinstance(g, dict) for g in params):
        return [{**g, "mask": g.get("mask", m)} for g in params]
    return [{"params": params, "mask": m}]


class SGMCMC:
    """devinterp's ``SGMCMC``: use its factories (``SGMCMC.sgld(params, lr=..., nbeta=...)``) or hand one to
    ``estimate_learning_coeff(..., sampling_method=SGMCMC.sgld)``. ``SGMCMC(params, ...)`` itself, devinterp's
    identity-preconditioned sampler, is SGLD: it returns :meth:`sgld`'s sampler (``lr``, ``noise_level`` and
    ``nbeta`` by position or name, the rest by name; ``prior`` and ``preconditioner`` other than their defaults
    raise ``NotImplementedError``)."""

    def __new__(
        cls,
        params,
        lr: float = 0.01,
        noise_level: float = 1.0,
        nbeta: float = 1.0,
        *,
        prior=None,
        preconditioner="identity",
        preconditioner_kwargs=None,
        bounding_box_size: float | None = None,
        mask: torch.Tensor | None = None,
        save_metrics: bool = False,
        sketch_dim: int | None = None,
        sketch_seed: int = 0,
        localization: float | None = None,
        weight_decay: float = 0.0,
        optimize_over: torch.Tensor | None = None,
        metrics: Sequence[str] | None = None,
        prior_kwargs=None,
    ):
        if prior is not None or prior_kwargs is not None:
            raise NotImplementedError(
                f"SGMCMC(prior={prior!r}): give the localization as localization= (SGMCMC.sgld(..., "
                "localization=...)); other priors are not supported"
            )
        if preconditioner not in ("identity", None) or preconditioner_kwargs is not None:
            raise NotImplementedError(
                f"SGMCMC(preconditioner={preconditioner!r}): use SGMCMC.rmsprop_sgld or SGMCMC.sgnht for a "
                "preconditioned sampler"
            )
        return cls.sgld(
            params,
            lr=lr,
            noise_level=noise_level,
            weight_decay=weight_decay,
            localization=0.0 if localization is None else localization,
            nbeta=nbeta,
            bounding_box_size=bounding_box_size,
            optimize_over=optimize_over,
            metrics=metrics,
            mask=mask,
            save_metrics=save_metrics,
            sketch_dim=sketch_dim,
            sketch_seed=sketch_seed,
        )

    @classmethod
    def sgld(
        cls,
        params: Iterable,
        lr: float = 0.01,
        noise_level: float = 1.0,
        weight_decay: float = 0.0,
        localization: float = 0.0,
        nbeta: float = 1.0,
        bounding_box_size: float | None = None,
        optimize_over: torch.Tensor | None = None,
        metrics: Sequence[str] | None = None,
        *,
        mask: torch.Tensor | None = None,
        save_metrics: bool = False,
        sketch_dim: int | None = None,
        sketch_seed: int = 0,
    ) -> SGLD:
        """SGLD with localization: :class:`pypattern.sampling.SGLD` with these settings."""
        _refuse_unrecorded("sgld", metrics, save_metrics, sketch_dim)
        return SGLD(
            _masked("sgld", params, optimize_over, mask),
            lr=lr,
            noise_level=noise_level,
            weight_decay=weight_decay,
            localization=localization,
            nbeta=nbeta,
            bounding_box_size=bounding_box_size,
        )

    @classmethod
    def sgnht(
        cls,
        params: Iterable,
        lr: float = 0.01,
        diffusion_factor: float = 0.01,
        nbeta: float = 1.0,
        bounding_box_size: float | None = None,
        metrics: Sequence[str] | None = None,
        *,
        save_metrics: bool = False,
        sketch_dim: int | None = None,
        sketch_seed: int = 0,
    ) -> SGNHT:
        """The Nosé-Hoover thermostat sampler: :class:`pypattern.sampling.SGNHT` with these settings."""
        _refuse_unrecorded("sgnht", metrics, save_metrics, sketch_dim)
        return SGNHT(
            params, lr=lr, diffusion_factor=diffusion_factor, nbeta=nbeta, bounding_box_size=bounding_box_size
        )

    @classmethod
    def rmsprop_sgld(
        cls,
        params: Iterable,
        lr: float = 0.01,
        noise_level: float = 1.0,
        weight_decay: float = 0.0,
        localization: float = 0.0,
        nbeta: float = 1.0,
        alpha: float = 0.99,
        eps: float = 0.1,
        add_grad_correction: bool = False,
        bounding_box_size: float | None = None,
        optimize_over: torch.Tensor | None = None,
        metrics: Sequence[str] | None = None,
        *,
        mask: torch.Tensor | None = None,
        save_metrics: bool = False,
        sketch_dim: int | None = None,
        sketch_seed: int = 0,
    ) -> RMSpropSGLD:
        """RMSprop-preconditioned SGLD: :class:`pypattern.sampling.RMSpropSGLD` with these settings."""
        if add_grad_correction:
            raise NotImplementedError(
                "SGMCMC.rmsprop_sgld(add_grad_correction=True) is not supported; leave it at False"
            )
        _refuse_unrecorded("rmsprop_sgld", metrics, save_metrics, sketch_dim)
        return RMSpropSGLD(
            _masked("rmsprop_sgld", params, optimize_over, mask),
            lr=lr,
            noise_level=noise_level,
            weight_decay=weight_decay,
            localization=localization,
            nbeta=nbeta,
            alpha=alpha,
            eps=eps,
            bounding_box_size=bounding_box_size,
        )

    @classmethod
    def get_method(cls, method: SamplingMethodLiteral):
        """The factory named ``method``: ``"sgld"``, ``"rmsprop_sgld"`` or ``"sgnht"``."""
        factories = {"sgld": cls.sgld, "rmsprop_sgld": cls.rmsprop_sgld, "sgnht": cls.sgnht}
        if method not in factories:
            raise ValueError(f"method should be one of 'sgld', 'rmsprop_sgld', or 'sgnht', got {method!r}")
        return factories[method]
