"""SGNHT and RMSprop-preconditioned SGLD as ``torch.optim.Optimizer`` s whose ``step`` is one call of a fused op
per parameter group (:func:`pypattern.ops.sgnht.sgnht_step_`, :func:`pypattern.ops.rmsprop_sgld.rmsprop_sgld_step_`),
and :func:`make_sampler`, which maps a ``sampling_method`` name to its optimizer.

Hyperparameters use the library's names (``step_size``, ``nbeta``, ``localization``, ``weight_decay``,
``noise_scale``, ``bounding_box``); devinterp's (``lr``, ``noise_level``, ``bounding_box_size``) are accepted too.

Noise keys: group ``k`` draws with seed ``group_seed(seed, k)`` (``seed`` itself for the first group), its ``i``-th
parameter (in the order given, restricted ones left out) is tensor index ``i`` of the op, and the ``n``-th call of
``step`` is op step ``n``. SGNHT's initial momentum of parameter ``i`` is ``sqrt(step_size) * noise_scale`` times
the noise of that key at step ``2**64 - 1`` (a step no run reaches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..ops.rmsprop_sgld import rmsprop_sgld_step_
from ..ops.sgld import philox_normals
from ..ops.sgnht import sgnht_step_
from .optim import SGLD, chain_seed, matches

__all__ = ["SAMPLERS", "RMSpropSGLD", "SGNHT", "group_seed", "make_sampler"]

_INIT_STEP = 2**64 - 1


def group_seed(seed: int, group: int) -> int:
    """The noise seed of parameter group ``group``: ``seed`` for group 0, else ``chain_seed(seed, group, 2)``."""
    return seed if group == 0 else chain_seed(seed, group, stream=2)


def _number(name: str, v, *, positive: bool) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or v < 0
        or (positive and v == 0)
    ):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


class _FusedSampler(torch.optim.Optimizer):
    """Shared parts: parameter groups of (optionally named) tensors, anchors ``w*``, masks, the step counter."""

    _op_name = ""

    def __init__(self, params, defaults: dict, *, restrict_to, masks, seed: int, backend: str | None):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: params is empty")
        raw_groups = params if isinstance(params[0], dict) else [{"params": params}]
        patterns = [restrict_to] if isinstance(restrict_to, str) else list(restrict_to or [])
        masks = dict(masks or {})
        groups, self.param_names = [], []
        for gi, g in enumerate(raw_groups):
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError(f"params[{gi}] must be a param-group dict with 'params' (as params[0] is)")
            names, tensors = [], []
            items = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
            for i, p in enumerate(items):
                if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
                    names.append(p[0]), tensors.append(p[1])
                elif isinstance(p, torch.Tensor):
                    names.append(None), tensors.append(p)
                else:
                    raise TypeError(
                        f"params[{i}] must be a Tensor or a (name, Tensor) pair, got {type(p).__name__}"
                    )
            if (patterns or masks) and any(n is None for n in names):
                raise ValueError("restrict_to and masks need named parameters: pass model.named_parameters()")
            keep = [
                t.requires_grad and (not patterns or matches(n, patterns)) for n, t in zip(names, tensors)
            ]
            names = [n for n, k in zip(names, keep) if k]
            tensors = [t for t, k in zip(tensors, keep) if k]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": tensors})
            self.param_names.append(names)
        if not any(g["params"] for g in groups):
            raise ValueError(f"restrict_to={patterns!r} leaves no parameter that requires grad")
        all_names = {n for ns in self.param_names for n in ns}
        unknown = set(masks) - all_names
        if unknown:
            raise ValueError(f"masks has names that are not (moving) parameters: {sorted(unknown)}")
        super().__init__(groups, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.seed = seed
        self.backend = backend
        self.anchors = [[t.detach().clone() for t in g["params"]] for g in self.param_groups]
        self.masks = [
            None
            if not masks
            else [masks[n].to(t.device) if n in masks else None for n, t in zip(ns, g["params"])]
            for ns, g in zip(self.param_names, self.param_groups)
        ]
        self.num_steps = 0
        self._validated = False

    def _check_group(self, group: dict) -> None:
        for old, new in (
            ("lr", "step_size"),
            ("noise_level", "noise_scale"),
            ("bounding_box_size", "bounding_box"),
        ):
            if old in group:  # devinterp's name in a group dict
                group[new] = group.pop(old)
        group["step_size"] = _number("step_size", group["step_size"], positive=True)
        for name in ("nbeta", "localization", "weight_decay", "noise_scale"):
            group[name] = _number(name, group[name], positive=False)
        if group["bounding_box"] is not None:
            group["bounding_box"] = _number("bounding_box", group["bounding_box"], positive=True)

    def _common(self, group: dict) -> dict:
        return {
            k: group[k]
            for k in ("step_size", "nbeta", "localization", "weight_decay", "noise_scale", "bounding_box")
        }

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter group (one fused-op call each). Parameters without a gradient get a zero
        one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for k, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group["params"]]
            self._group_step(k, group, grads, validate=not self._validated)
        self._validated = True
        self.num_steps += 1
        return loss

    def _group_step(self, k, group, grads, *, validate):  # pragma: no cover - overridden
        raise NotImplementedError

    def state_dict(self):
        sd = super().state_dict()
        sd["fused_sampler"] = {"num_steps": self.num_steps, "seed": self.seed, "anchors": self.anchors}
        return sd

    def load_state_dict(self, state_dict):
        extra = state_dict.get("fused_sampler")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "fused_sampler"})
        if extra is not None:
            self.num_steps, self.seed = int(extra["num_steps"]), int(extra["seed"])
            for mine, theirs in zip(self.anchors, extra["anchors"]):
                for a, b in zip(mine, theirs):
                    a.copy_(b)


def _defaults(step_size, lr, noise_scale, noise_level, bounding_box, bounding_box_size, **rest) -> dict:
    if step_size is None and lr is None:
        step_size = 0.01
    elif step_size is not None and lr is not None:
        raise ValueError(f"give step_size or its devinterp name lr, not both (got {step_size!r} and {lr!r})")
    if noise_level is not None:
        noise_scale = noise_level
    if bounding_box_size is not None:
        bounding_box = bounding_box_size
    return dict(
        step_size=step_size if step_size is not None else lr,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        **rest,
    )


class SGNHT(_FusedSampler):
    r"""Stochastic gradient Nosé-Hoover thermostat around the initial weights ``w*`` (devinterp's SGNHT, with
    SGLD's localization and weight decay), fused: see :mod:`pypattern.ops.sgnht` for the update.

    State: a momentum per parameter (``self.state[p]["momentum"]``, in units of a move) and a thermostat per
    parameter group (``group["thermostat"]``, a float64 tensor with one element starting at
    ``diffusion_factor``).

    Parameters
    ----------
    params : iterable of Tensor, of (name, Tensor) pairs, or of param-group dicts
        Pass ``model.named_parameters()`` to use ``restrict_to`` and ``masks``. Each group has its own thermostat.
    step_size : float
        ``eps`` > 0 (devinterp: ``lr``, default 0.01).
    nbeta, localization, weight_decay : float
        As in :class:`pypattern.sampling.SGLD`.
    diffusion_factor : float
        ``A`` >= 0 (devinterp's default 0.01): the momentum noise's variance is ``2 A eps noise_scale**2``.
    noise_scale : float
        >= 0 (devinterp: ``noise_level``).
    bounding_box : float, optional
        Half-width of the box around ``w*`` (devinterp: ``bounding_box_size``); an entry hitting it is clamped
        and its momentum reversed.
    restrict_to, masks, seed, backend
        As in :class:`pypattern.sampling.SGLD`.
    """

    def __init__(
        self,
        params: Iterable,
        step_size: float | None = None,
        nbeta: float = 1.0,
        localization: float = 0.0,
        weight_decay: float = 0.0,
        diffusion_factor: float = 0.01,
        noise_scale: float = 1.0,
        bounding_box: float | None = None,
        *,
        lr: float | None = None,
        noise_level: float | None = None,
        bounding_box_size: float | None = None,
        restrict_to: str | Sequence[str] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        backend: str | None = None,
    ):
        defaults = _defaults(
            step_size,
            lr,
            noise_scale,
            noise_level,
            bounding_box,
            bounding_box_size,
            nbeta=nbeta,
            localization=localization,
            weight_decay=weight_decay,
            diffusion_factor=diffusion_factor,
        )
        super().__init__(params, defaults, restrict_to=restrict_to, masks=masks, seed=seed, backend=backend)
        for k, group in enumerate(self.param_groups):
            group["diffusion_factor"] = _number("diffusion_factor", group["diffusion_factor"], positive=False)
            dev = group["params"][0].device if group["params"] else torch.device("cpu")
            group["thermostat"] = torch.full((1,), group["diffusion_factor"], dtype=torch.float64, device=dev)
            scale = math.sqrt(group["step_size"]) * group["noise_scale"]
            for i, p in enumerate(group["params"]):
                z = philox_normals(
                    p.numel(), seed=group_seed(seed, k), tensor_index=i, step=_INIT_STEP, device=p.device
                )
                self.state[p]["momentum"] = (scale * z).to(p.dtype).reshape(p.shape)

    def _group_step(self, k, group, grads, *, validate):
        params = group["params"]
        sgnht_step_(
            params,
            grads,
            self.anchors[k],
            [self.state[p]["momentum"] for p in params],
            group["thermostat"],
            diffusion_factor=group["diffusion_factor"],
            masks=self.masks[k],
            seed=group_seed(self.seed, k),
            step=self.num_steps,
            backend=self.backend,
            validate=validate,
            **self._common(group),
        )


class RMSpropSGLD(_FusedSampler):
    r"""RMSprop-preconditioned SGLD around the initial weights ``w*`` (devinterp's ``rmsprop_sgld``), fused: see
    :mod:`pypattern.ops.rmsprop_sgld` for the update.

    State: the running mean of squared gradients per parameter (``self.state[p]["square_avg"]``, zeros at first).

    Parameters
    ----------
    params : iterable of Tensor, of (name, Tensor) pairs, or of param-group dicts
        Pass ``model.named_parameters()`` to use ``restrict_to`` and ``masks``.
    step_size : float
        ``eps`` > 0 (devinterp: ``lr``, default 0.01).
    nbeta, localization, weight_decay, noise_scale, bounding_box
        As in :class:`SGNHT`; here the box clamps.
    alpha : float
        Decay of the running mean, in [0, 1) (devinterp's default 0.99).
    eps : float
        > 0, added to ``sqrt(V)`` (devinterp's default 0.1).
    restrict_to, masks, seed, backend
        As in :class:`pypattern.sampling.SGLD`.
    """

    def __init__(
        self,
        params: Iterable,
        step_size: float | None = None,
        nbeta: float = 1.0,
        localization: float = 0.0,
        weight_decay: float = 0.0,
        alpha: float = 0.99,
        eps: float = 0.1,
        noise_scale: float = 1.0,
        bounding_box: float | None = None,
        *,
        lr: float | None = None,
        noise_level: float | None = None,
        bounding_box_size: float | None = None,
        restrict_to: str | Sequence[str] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        backend: str | None = None,
    ):
        defaults = _defaults(
            step_size,
            lr,
            noise_scale,
            noise_level,
            bounding_box,
            bounding_box_size,
            nbeta=nbeta,
            localization=localization,
            weight_decay=weight_decay,
            alpha=alpha,
            eps=eps,
        )
        super().__init__(params, defaults, restrict_to=restrict_to, masks=masks, seed=seed, backend=backend)
        for group in self.param_groups:
            group["alpha"] = _number("alpha", group["alpha"], positive=False)
            if group["alpha"] >= 1:
                raise ValueError(f"alpha must be in [0, 1), got {group['alpha']!r}")
            group["eps"] = _number("eps", group["eps"], positive=True)
            for p in group["params"]:
                self.state[p]["square_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _group_step(self, k, group, grads, *, validate):
        params = group["params"]
        rmsprop_sgld_step_(
            params,
            grads,
            self.anchors[k],
            [self.state[p]["square_avg"] for p in params],
            alpha=group["alpha"],
            eps=group["eps"],
            masks=self.masks[k],
            seed=group_seed(self.seed, k),
            step=self.num_steps,
            backend=self.backend,
            validate=validate,
            **self._common(group),
        )


def _sgld(params, **hyper) -> SGLD:
    renames = {"step_size": "lr", "noise_scale": "noise_level", "bounding_box": "bounding_box_size"}
    for ours, theirs in renames.items():
        if ours in hyper:
            if theirs in hyper:
                raise ValueError(f"give {ours} or its devinterp name {theirs}, not both")
            hyper[theirs] = hyper.pop(ours)
    return SGLD(params, **hyper)


#: ``sampling_method`` names (lower case, ``-``/``_`` ignored) -> the optimizer class or factory.
SAMPLERS = {"sgld": _sgld, "sgnht": SGNHT, "rmspropsgld": RMSpropSGLD}


def make_sampler(name: str | type, params: Iterable, **hyper) -> torch.optim.Optimizer:
    """The sampler ``name`` over ``params`` with hyperparameters ``hyper``.

    Parameters
    ----------
    name : str or class
        ``"sgld"``, ``"sgnht"`` or ``"rmsprop_sgld"`` (devinterp's class names ``SGLD``, ``SGNHT``,
        ``RMSpropSGLD`` are accepted, any case), or one of the classes :class:`SGLD`, :class:`SGNHT`,
        :class:`RMSpropSGLD` (devinterp's classes by ``__name__``).
    params : iterable
        As the optimizer takes them (``model.named_parameters()`` for ``restrict_to`` and ``masks``).
    **hyper
        The optimizer's keywords; the library's names (``step_size``, ``noise_scale``, ``bounding_box``) and
        devinterp's (``lr``, ``noise_level``, ``bounding_box_size``) both work for every sampler.

    Returns
    -------
    torch.optim.Optimizer
    """
    key = name.__name__ if isinstance(name, type) else name
    if not isinstance(key, str):
        raise TypeError(f"sampling_method must be a str or a sampler class, got {type(name).__name__}")
    norm = key.lower().replace("_", "").replace("-", "")
    if norm not in SAMPLERS:
        raise ValueError(
            f"sampling_method={key!r} is not a known sampler; valid are 'sgld', 'sgnht', 'rmsprop_sgld' "
            "(or devinterp's SGLD, SGNHT, RMSpropSGLD)"
        )
    return SAMPLERS[norm](params, **hyper)
