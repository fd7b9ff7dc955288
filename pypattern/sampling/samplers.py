"""SGNHT and RMSprop-preconditioned SGLD as ``torch.optim.Optimizer`` s whose ``step`` is one call of a fused op
per parameter group (:func:`pypattern.ops.sgnht.sgnht_step_`, :func:`pypattern.ops.rmsprop_sgld.rmsprop_sgld_step_`),
:func:`make_sampler`, which maps a ``sampling_method`` name to its optimizer, and what the chain runner
(:func:`pypattern.sample`) needs to run any of the three samplers: :func:`sampler_name`,
:func:`sampler_hyperparameters`, :func:`chain_sampler` (a chain's optimizer) and :class:`StackedSamplerState`
(the state of chains run together).

Hyperparameters use the library's names (``step_size``, ``nbeta``, ``localization``, ``weight_decay``,
``noise_scale``, ``bounding_box``); devinterp's (``lr``, ``noise_level``, ``bounding_box_size``, ``temperature``)
are translated by :func:`pypattern.sampling.vocabulary.translate`: two names of one hyperparameter that disagree
are refused. Each sampler's own hyperparameters (:data:`SAMPLER_HYPERPARAMETERS`) are SGNHT's
``diffusion_factor`` and RMSprop-SGLD's ``alpha`` and ``eps``.

Noise keys: group ``k`` draws with seed ``group_seed(seed, k)`` (``seed`` itself for the first group), its ``i``-th
parameter (in the order given, restricted ones left out) is tensor index ``i`` of the op, and the ``n``-th call of
``step`` is op step ``n``. SGNHT's initial momentum of parameter ``i`` is ``sqrt(step_size) * noise_scale`` times
the noise of that key at step ``2**64 - 1`` (a step no run reaches).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .. import _backends
from ..ops.rmsprop_sgld import rmsprop_sgld_step_
from ..ops.sgld import philox_normals, sgld_step_
from ..ops.sgld.op import check_key, sgld_chains_step_
from ..ops.sgnht import sgnht_step_
from .optim import (
    SGLD,
    ParamGroup,
    check_backend,
    check_saved_state,
    generator_key,
    group_options,
    group_seed,
    refuse_diagnostics,
    resolve_step_fn,
    same_masks,
    scalar_value,
    select_group,
)
from .vocabulary import translate

__all__ = [
    "SAMPLERS",
    "SAMPLER_HYPERPARAMETERS",
    "SAMPLER_NAMES",
    "RMSpropSGLD",
    "SGNHT",
    "StackedSamplerState",
    "chain_sampler",
    "check_sampler_hyperparameters",
    "group_seed",
    "initial_momenta",
    "make_sampler",
    "sampler_hyperparameters",
    "sampler_name",
]

_INIT_STEP = 2**64 - 1

SAMPLER_NAMES = ("sgld", "sgnht", "rmsprop_sgld")
#: Each sampler's own hyperparameters and their defaults (devinterp's), beyond the six of SGLD.
SAMPLER_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "sgld": {},
    "sgnht": {"diffusion_factor": 0.01},
    "rmsprop_sgld": {"alpha": 0.99, "eps": 0.1},
}
# names (lower case, "_" and "-" dropped) -> sampler: pypattern's, devinterp 2.x's strings ("sgmcmc_sgld", the
# SGMCMC factories sgld/sgnht/rmsprop_sgld) and the class names of both libraries
_ALIASES = {
    "sgld": "sgld",
    "sgmcmcsgld": "sgld",
    "sgmcmc": "sgld",  # devinterp's SGMCMC class itself: SGMCMC(params, ...) is SGLD
    "sgnht": "sgnht",
    "sgmcmcsgnht": "sgnht",
    "rmspropsgld": "rmsprop_sgld",
    "sgmcmcrmspropsgld": "rmsprop_sgld",
}


#: the six SGLD hyperparameters and whether each must be > 0 (else >= 0)
_RANGES = (
    ("step_size", True),
    ("nbeta", True),
    ("localization", False),
    ("weight_decay", False),
    ("noise_scale", False),
    ("bounding_box", True),
)


def _number(name: str, v, *, positive: bool) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, numbers.Real)
        or not math.isfinite(v)
        or v < 0
        or (positive and v == 0)
    ):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


def _normalise(arg: str, value) -> str:
    key = value if isinstance(value, str) else getattr(value, "__name__", None)
    if not isinstance(key, str):
        raise TypeError(
            f"{arg} must be a str or a sampler class (SGLD, SGNHT, RMSpropSGLD), got {type(value).__name__}"
        )
    norm = _ALIASES.get(key.lower().replace("_", "").replace("-", ""))
    if norm is None:
        raise ValueError(
            f"{arg}={key!r} is not a known sampler; valid are 'sgld', 'sgnht', 'rmsprop_sgld' (or devinterp's "
            "SGLD, SGNHT, RMSpropSGLD, 'sgmcmc_sgld')"
        )
    return norm


def sampler_name(sampler=None, sampling_method=None) -> str:
    """The sampler a call asks for: ``"sgld"`` (the default), ``"sgnht"`` or ``"rmsprop_sgld"``.

    Parameters
    ----------
    sampler : str or class, optional
        A name (any case; ``-`` and ``_`` ignored; devinterp's ``"sgmcmc_sgld"`` too) or a class
        (:class:`~pypattern.sampling.SGLD`, :class:`SGNHT`, :class:`RMSpropSGLD`, devinterp's classes and
        ``SGMCMC`` factories, by ``__name__``).
    sampling_method : str or class, optional
        devinterp's name for ``sampler``; given with ``sampler``, both must name the same sampler.

    Raises
    ------
    ValueError
        An unknown name, or ``sampler`` and ``sampling_method`` naming different samplers.
    """
    names = {}
    for arg, value in (("sampler", sampler), ("sampling_method", sampling_method)):
        if value is not None:
            names[arg] = _normalise(arg, value)
    if len(set(names.values())) > 1:
        shown = [getattr(v, "__name__", v) for v in (sampler, sampling_method)]
        raise ValueError(
            f"sampler={shown[0]!r} and sampling_method={shown[1]!r} name different samplers "
            f"({names['sampler']!r} and {names['sampling_method']!r}); sampling_method is devinterp's name for "
            "sampler: give one"
        )
    return next(iter(names.values()), "sgld")


def check_sampler_hyperparameters(sampler: str, values: Mapping[str, Any]) -> dict[str, float]:
    """``sampler``'s own hyperparameters (:data:`SAMPLER_HYPERPARAMETERS`, defaults filled in) checked and as
    Python floats: ``diffusion_factor`` >= 0, ``alpha`` in [0, 1), ``eps`` > 0."""
    out = dict(SAMPLER_HYPERPARAMETERS[sampler])
    out.update({k: v for k, v in values.items() if v is not None})
    if "diffusion_factor" in out:
        out["diffusion_factor"] = _number("diffusion_factor", out["diffusion_factor"], positive=False)
    if "alpha" in out:
        out["alpha"] = _number("alpha", out["alpha"], positive=False)
        if out["alpha"] >= 1:
            raise ValueError(f"alpha must be in [0, 1), got {out['alpha']!r}")
    if "eps" in out:
        out["eps"] = _number("eps", out["eps"], positive=True)
    return out


def sampler_hyperparameters(
    sampler: str, optimizer_kwargs: Mapping[str, Any] | None, *, where: str = "optimizer_kwargs"
) -> dict[str, float]:
    """``sampler``'s own hyperparameters from a call's ``optimizer_kwargs`` (the other entries are left to
    :func:`pypattern.sampling.plan.resolve_hyperparameters`), checked, with defaults; an entry that belongs to
    another sampler is refused naming it."""
    own = SAMPLER_HYPERPARAMETERS[sampler]
    given = dict(optimizer_kwargs or {})
    for key, value in given.items():
        owner = [s for s, hp in SAMPLER_HYPERPARAMETERS.items() if key in hp]
        if owner and key not in own:
            raise ValueError(
                f"{where} has {key}={value!r}, a hyperparameter of sampler={owner[0]!r}, but the sampler is "
                f"{sampler!r}" + (f" (whose own are {sorted(own)})" if own else "") + ": give sampler="
                f"{owner[0]!r} or leave {key} out"
            )
    return check_sampler_hyperparameters(sampler, {k: given[k] for k in own if k in given})


def initial_momenta(
    tensors: Sequence[torch.Tensor], *, seed: int, step_size: float, noise_scale: float
) -> list:
    """SGNHT's initial momenta of ``tensors`` (one group keyed by ``seed``): ``sqrt(step_size) * noise_scale``
    times the noise of tensor index ``i`` at step ``2**64 - 1``, in each tensor's shape, dtype and device."""
    scale = math.sqrt(step_size) * noise_scale
    out = []
    for i, p in enumerate(tensors):
        z = philox_normals(p.numel(), seed=seed, tensor_index=i, step=_INIT_STEP, device=p.device)
        out.append((scale * z).to(p.dtype).reshape(p.shape))
    return out


class _FusedSampler(torch.optim.Optimizer):
    """Shared parts: parameter groups of (optionally named) tensors, anchors ``w*``, masks, the step counter."""

    _op_name = ""
    _noise_key: int | None = None  # a step's key drawn from a noise_generator (None: the (seed, step) key)
    noise, dws, localization_loss = (
        SGLD.noise,
        SGLD.dws,
        SGLD.localization_loss,
    )  # devinterp's metrics: refused

    def __init__(self, params, defaults: dict, *, restrict_to, masks, seed: int, backend: str | None):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: params is empty")
        raw_groups = params if isinstance(params[0], dict) else [{"params": params}]
        patterns = [restrict_to] if isinstance(restrict_to, str | re.Pattern) else list(restrict_to or [])
        masks = dict(masks or {})
        groups, self.param_names, group_masks = [], [], []
        for gi, g in enumerate(raw_groups):
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError(f"params[{gi}] must be a param-group dict with 'params' (as params[0] is)")
            where = f"params[{gi}]"
            names, tensors, _, gmask = select_group(g, where, patterns, masks)
            # devinterp's names in a group dict, translated (two names of one hyperparameter must agree)
            options = group_options(g, where)
            unknown_keys = sorted(set(options) - set(defaults))
            if unknown_keys:
                raise ValueError(
                    f"{where} has {unknown_keys}, not hyperparameters of {type(self).__name__}; valid are "
                    f"{sorted(defaults)} (and 'mask' / 'optimize_over')"
                )
            groups.append(ParamGroup({**options, "params": tensors}))  # group["lr"] is step_size
            self.param_names.append(names)
            group_masks.append(gmask)
        if not any(g["params"] for g in groups):
            raise ValueError(f"restrict_to={patterns!r} leaves no parameter that requires grad")
        all_names = {n for ns in self.param_names for n in ns}
        unknown = set(masks) - all_names
        if unknown:
            raise ValueError(f"masks has names that are not (moving) parameters: {sorted(unknown)}")
        super().__init__(groups, defaults)
        self._checked: dict[int, tuple] = {}  # per group (by id): the hyperparameters last checked
        for group in self.param_groups:
            self._check_group(group)
        self.seed = check_key("seed", seed)  # an int in [0, 2**64): a float would be truncated
        self.backend = check_backend(backend)
        self.anchors = [[t.detach().clone() for t in g["params"]] for g in self.param_groups]
        self.masks = group_masks
        self.num_steps = 0
        self._validated = False
        self._step_device: torch.device | None = None  # where the fast path's tensors were checked

    def _check_group(self, group: dict) -> None:
        """The six SGLD hyperparameters of ``group`` checked (as :class:`SGLD` checks them: ``step_size`` and
        ``nbeta`` > 0, the others >= 0, ``bounding_box`` > 0 or None) and made Python floats; the error names the
        hyperparameter."""
        for name, positive in _RANGES:
            if name == "bounding_box" and group[name] is None:
                continue
            group[name] = _number(name, scalar_value(group[name]), positive=positive)
        self._checked[id(group)] = self._values(group)

    @staticmethod
    def _values(group: dict) -> tuple:
        return tuple(group[name] for name, _ in _RANGES)

    def _op_keywords(self, k: int, group: dict, validate: bool) -> dict:
        """The keywords every fused op takes for group ``k``: its masks, its noise's key (the step's key drawn
        from a noise_generator, else the seed and the step), the backend, ``validate`` and the six SGLD
        hyperparameters."""
        return {
            "masks": self.masks[k],
            "seed": group_seed(self.seed if self._noise_key is None else self._noise_key, k),
            "step": self.num_steps if self._noise_key is None else 0,
            "backend": self.backend,
            "validate": validate,
            **{name: group[name] for name, _ in _RANGES},
        }

    @torch.no_grad()
    def step(self, closure=None, noise_generator: torch.Generator | None = None):
        """One step of every parameter group (one fused-op call each). Parameters without a gradient get a zero
        one. ``noise_generator``: the step's noise is keyed by one key drawn from it, as in :meth:`SGLD.step`."""
        if isinstance(closure, torch.Generator):
            if noise_generator is not None:
                raise TypeError("step(): noise_generator is given both positionally and by keyword")
            closure, noise_generator = None, closure
        key = generator_key(noise_generator)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sampler_step(key=key)
        return loss

    @torch.no_grad()
    def sampler_step(self, key: int | None = None) -> None:
        """The step itself, without ``torch.optim.Optimizer.step``'s hooks and profiler wrapper (the chain runner
        calls this directly, as it calls :meth:`SGLD.sgld_step`); ``key`` as there."""
        for k, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group["params"]]
            if self._checked.get(id(group)) != self._values(group):  # changed since (a scheduler, or by hand)
                try:
                    self._check_group(group)
                except ValueError as e:
                    if len(self.param_groups) == 1:
                        raise
                    raise ValueError(f"param group {k}: {e}") from None
            self._noise_key = key
            # a model moved since its tensors were checked (e.g. to another GPU) is checked again: its anchors,
            # masks and states did not move with it
            device = group["params"][0].device
            validate = not self._validated or device != self._step_device
            try:
                self._group_step(k, group, grads, validate=validate)
            finally:
                self._noise_key = None
            if validate:
                self._step_device = device
        self._validated = True
        self.num_steps += 1

    def _group_step(self, k, group, grads, *, validate):  # pragma: no cover - overridden
        raise NotImplementedError

    def resume_at(self, step: int) -> None:
        """Continue a chain at op step ``step`` (its noise key); the hyperparameters were checked by the run
        that took the earlier steps."""
        self.num_steps = int(step)
        if step:
            self._validated = True
            self._step_device = next((g["params"][0].device for g in self.param_groups if g["params"]), None)

    def chain_state(self) -> dict[str, torch.Tensor]:
        """The sampler's state (copies) by key, for a chain's checkpoint: ``"<kind>/<name>"`` per named parameter
        (SGNHT's ``momentum``, RMSprop-SGLD's ``square_avg``) and SGNHT's ``"thermostat"``. One parameter group of
        named parameters."""
        if len(self.param_groups) != 1 or any(n is None for n in self.param_names[0]):
            raise ValueError("chain_state needs one parameter group of named parameters")
        group = self.param_groups[0]
        out = {}
        for n, p in zip(self.param_names[0], group["params"]):
            for kind, t in self.state[p].items():
                out[f"{kind}/{n}"] = t.detach().clone()
        if "thermostat" in group:
            out["thermostat"] = group["thermostat"].detach().clone()
        return out

    def load_chain_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`chain_state` returned (every key must be present, each tensor of the shape and dtype
        of the one it replaces; a state that does not fit is refused before anything is copied)."""
        group = self.param_groups[0]
        mine = self.chain_state()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise ValueError(
                f"state has no entry {missing[0]!r}: it was not saved by this sampler's chain_state()"
            )
        for k, t in mine.items():
            v = state[k]
            if not isinstance(v, torch.Tensor) or v.shape != t.shape or v.dtype != t.dtype:
                got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"state[{k!r}] is {got}; this sampler holds {tuple(t.shape)} {t.dtype} there (a state of "
                    "other parameters)"
                )
        with torch.no_grad():
            for n, p in zip(self.param_names[0], group["params"]):
                for kind, t in self.state[p].items():
                    t.copy_(state[f"{kind}/{n}"])
            if "thermostat" in group:
                group["thermostat"].copy_(state["thermostat"])

    def state_dict(self):
        sd = super().state_dict()
        sd["fused_sampler"] = {
            "num_steps": self.num_steps,
            "seed": self.seed,
            "anchors": self.anchors,
            "masks": self.masks,
        }
        return sd

    def load_state_dict(self, state_dict):
        extra = state_dict.get("fused_sampler")
        if extra is not None and "masks" in extra and not same_masks(self.masks, extra["masks"]):
            raise ValueError(
                f"state_dict was saved by a {type(self).__name__} with other masks (masks= or a group's 'mask'): "
                "build this optimizer with the same masks to resume that run"
            )
        sd = {k: v for k, v in state_dict.items() if k != "fused_sampler"}
        owner = type(self).__name__
        anchors = None if extra is None else extra.get("anchors")
        check_saved_state(owner, self.param_groups, sd, anchors, extra, lambda p: self.state.get(p, {}))
        super().load_state_dict(sd)
        self.param_groups = [ParamGroup(g) for g in self.param_groups]
        for group in self.param_groups:
            if "thermostat" in group and group["params"]:
                group["thermostat"] = group["thermostat"].to(group["params"][0].device)
        if extra is not None:
            self.num_steps, self.seed = int(extra["num_steps"]), int(extra["seed"])
            with torch.no_grad():
                for mine, theirs in zip(self.anchors, anchors):
                    for a, b in zip(mine, theirs):
                        a.copy_(b)
        self._validated = False  # the first step after a load checks the tensors again


#: The hyperparameters a fused sampler's constructor takes under either name (pypattern's, devinterp's).
_TWO_NAMED = (
    "step_size",
    "lr",
    "nbeta",
    "temperature",
    "noise_scale",
    "noise_level",
    "bounding_box",
    "bounding_box_size",
)


def _defaults(where: str, args: Mapping[str, Any], **rest) -> dict:
    """The group defaults from the constructor's keywords in either vocabulary (read from its arguments ``args``,
    its ``locals()``; translated, two names of one hyperparameter that disagree are refused), with devinterp's
    defaults for those not given."""
    hyper = translate({k: args[k] for k in _TWO_NAMED}, where=where)
    return {"step_size": 0.01, "nbeta": 1.0, "noise_scale": 1.0, "bounding_box": None, **hyper, **rest}


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
        As in :class:`pypattern.sampling.SGLD` (``temperature`` is devinterp's older name for ``nbeta``).
    diffusion_factor : float
        ``A`` >= 0 (devinterp's default 0.01): the momentum noise's variance is ``2 A eps noise_scale**2``.
    noise_scale : float
        >= 0 (devinterp: ``noise_level``), default 1.
    bounding_box : float, optional
        Half-width of the box around ``w*`` (devinterp: ``bounding_box_size``); an entry hitting it is clamped
        and its momentum reversed.
    restrict_to, masks, seed, backend
        As in :class:`pypattern.sampling.SGLD`.
    lr, noise_level, bounding_box_size, temperature : optional
        devinterp's names for ``step_size``, ``noise_scale``, ``bounding_box`` and ``nbeta`` (both names given
        must agree).
    save_noise, save_mala_vars, noise_norm, grad_norm, weight_norm, distance, metrics
        devinterp 1.x's switches for the optimizer's own per-step metrics: accepted off (``metrics=[]``
        included); on, NotImplementedError.

    Positional arguments after ``params`` are devinterp's: ``(lr, diffusion_factor, bounding_box_size)``; the
    rest are keyword-only.
    """

    def __init__(
        self,
        params: Iterable,
        step_size: float | None = None,
        diffusion_factor: float = 0.01,
        bounding_box: float | None = None,
        *,
        nbeta: float | None = None,
        localization: float = 0.0,
        weight_decay: float = 0.0,
        noise_scale: float | None = None,
        lr: float | None = None,
        noise_level: float | None = None,
        bounding_box_size: float | None = None,
        temperature: float | None = None,
        restrict_to: str | re.Pattern | Sequence[str | re.Pattern] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        backend: str | None = None,
        save_noise: bool = False,
        save_mala_vars: bool = False,
        noise_norm: bool = False,
        grad_norm: bool = False,
        weight_norm: bool = False,
        distance: bool = False,
        metrics: Sequence[str] | None = None,
    ):
        refuse_diagnostics("SGNHT", locals())
        defaults = _defaults(
            "SGNHT",
            locals(),
            localization=localization,
            weight_decay=weight_decay,
            diffusion_factor=diffusion_factor,
        )
        super().__init__(params, defaults, restrict_to=restrict_to, masks=masks, seed=seed, backend=backend)
        for k, group in enumerate(self.param_groups):
            group.update(
                check_sampler_hyperparameters("sgnht", {"diffusion_factor": group["diffusion_factor"]})
            )
            dev = group["params"][0].device if group["params"] else torch.device("cpu")
            group["thermostat"] = torch.full((1,), group["diffusion_factor"], dtype=torch.float64, device=dev)
            momenta = initial_momenta(
                group["params"],
                seed=group_seed(seed, k),
                step_size=group["step_size"],
                noise_scale=group["noise_scale"],
            )
            for p, m in zip(group["params"], momenta):
                self.state[p]["momentum"] = m

    def _group_step(self, k, group, grads, *, validate):
        params = group["params"]
        sgnht_step_(
            params,
            grads,
            self.anchors[k],
            [self.state[p]["momentum"] for p in params],
            group["thermostat"],
            diffusion_factor=group["diffusion_factor"],
            **self._op_keywords(k, group, validate),
        )


class RMSpropSGLD(_FusedSampler):
    r"""RMSprop-preconditioned SGLD around the initial weights ``w*`` (devinterp's ``rmsprop_sgld``), fused: see
    :mod:`pypattern.ops.rmsprop_sgld` for the update.

    The derivative of the preconditioner is left out (as devinterp does): the draws are biased towards larger
    gradients when the running mean ``V`` follows the chain's position, that is when ``step_size / (1 - alpha)``
    is short against the posterior's relaxation time. The bias grows as the step shrinks at a fixed ``alpha``
    (+9 % at step 1e-3 and +32 % at 1e-4 on a linear regression with ``alpha = 0.99``, ``eps = 0.1``); a longer
    window (``alpha`` nearer 1) or a larger ``eps`` reduces it.

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
    lr, noise_level, bounding_box_size, temperature : optional
        devinterp's names for ``step_size``, ``noise_scale``, ``bounding_box`` and ``nbeta`` (both names given
        must agree).
    save_noise, save_mala_vars, noise_norm, grad_norm, weight_norm, distance, metrics
        devinterp 1.x's switches for the optimizer's own per-step metrics: accepted off (``metrics=[]``
        included); on, NotImplementedError.
    """

    def __init__(
        self,
        params: Iterable,
        step_size: float | None = None,
        nbeta: float | None = None,
        localization: float = 0.0,
        weight_decay: float = 0.0,
        alpha: float = 0.99,
        eps: float = 0.1,
        noise_scale: float | None = None,
        bounding_box: float | None = None,
        *,
        lr: float | None = None,
        noise_level: float | None = None,
        bounding_box_size: float | None = None,
        temperature: float | None = None,
        restrict_to: str | re.Pattern | Sequence[str | re.Pattern] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        backend: str | None = None,
        save_noise: bool = False,
        save_mala_vars: bool = False,
        noise_norm: bool = False,
        grad_norm: bool = False,
        weight_norm: bool = False,
        distance: bool = False,
        metrics: Sequence[str] | None = None,
    ):
        refuse_diagnostics("RMSpropSGLD", locals())
        defaults = _defaults(
            "RMSpropSGLD",
            locals(),
            localization=localization,
            weight_decay=weight_decay,
            alpha=alpha,
            eps=eps,
        )
        super().__init__(params, defaults, restrict_to=restrict_to, masks=masks, seed=seed, backend=backend)
        for group in self.param_groups:
            own = check_sampler_hyperparameters(
                "rmsprop_sgld", {"alpha": group["alpha"], "eps": group["eps"]}
            )
            group.update(own)
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
            **self._op_keywords(k, group, validate),
        )


#: ``sampling_method`` names -> the optimizer class.
SAMPLERS = {"sgld": SGLD, "sgnht": SGNHT, "rmsprop_sgld": RMSpropSGLD}


def make_sampler(name: str | type, params: Iterable, **hyper) -> torch.optim.Optimizer:
    """The sampler ``name`` over ``params`` with hyperparameters ``hyper``.

    Parameters
    ----------
    name : str or class
        ``"sgld"``, ``"sgnht"`` or ``"rmsprop_sgld"`` (devinterp's class names ``SGLD``, ``SGNHT``,
        ``RMSpropSGLD`` are accepted, any case), or one of the classes :class:`SGLD`, :class:`SGNHT`,
        :class:`RMSpropSGLD` (devinterp's classes by ``__name__``); see :func:`sampler_name`.
    params : iterable
        As the optimizer takes them (``model.named_parameters()`` for ``restrict_to`` and ``masks``).
    **hyper
        The optimizer's keywords; the library's names (``step_size``, ``noise_scale``, ``bounding_box``) and
        devinterp's (``lr``, ``noise_level``, ``bounding_box_size``) both work for every sampler.

    Returns
    -------
    torch.optim.Optimizer
    """
    return SAMPLERS[_normalise("sampling_method", name)](params, **hyper)


# ------------------------------------------------------------------------------------------------ chain runner


def chain_sampler(
    sampler: str,
    named_params: Sequence[tuple[str, torch.Tensor]],
    *,
    hyper: Mapping[str, Any],
    own: Mapping[str, float],
    masks: Mapping[str, torch.Tensor] | None,
    seed: int,
    backend: str | None,
) -> torch.optim.Optimizer:
    """The optimizer of one chain of :func:`pypattern.sample`: ``sampler`` over ``named_params`` (one group) with
    the six SGLD hyperparameters ``hyper`` (pypattern's names) and the sampler's own ``own``."""
    if sampler == "sgld":
        return SGLD(named_params, masks=masks, seed=seed, backend=backend, **hyper)
    return SAMPLERS[sampler](named_params, masks=masks, seed=seed, backend=backend, **hyper, **own)


def or_flags(flags: torch.Tensor) -> torch.Tensor:
    """The fused steps' int32 flags (bit 1: a non-finite gradient, bit 2: an update that overflowed) OR-ed over the
    last dimension (a chain's tensors)."""
    if flags.shape[-1] == 0:
        return flags.new_zeros(flags.shape[:-1])
    return (flags & 1).amax(dim=-1) | (flags & 2).amax(dim=-1)


class StackedSamplerState:
    """The sampler state of chains run together (the batched runner), stacked along a chain axis, and one step
    of a chain on its rows.

    Chain ``i`` of the group moves the tensors ``names[i]`` (in that order: tensor index ``j`` of its op calls is
    ``names[i][j]``) with noise seed ``seeds[i]``; its state starts as a chain's optimizer
    (:func:`chain_sampler`) would start it, or from ``saved[i]`` (what :meth:`state_of` returned, from a
    checkpoint). SGLD has no state; SGNHT keeps ``momentum`` rows ``(C, *shape)`` per tensor and a thermostat per
    chain ``(C,)`` float64; RMSprop-SGLD keeps ``square_avg`` rows.

    Parameters
    ----------
    sampler : str
        ``"sgld"``, ``"sgnht"`` or ``"rmsprop_sgld"``.
    stacked : dict of str to Tensor ``(C, *shape)``
        The chains' parameters (state tensors get their shapes, dtypes and device).
    names, seeds, saved
        Per chain: its moving tensors, noise seed and saved state (or None).
    hyper, own : mapping
        The six SGLD hyperparameters and the sampler's own (as for :func:`chain_sampler`).
    backend : str, optional
        Force a backend of the op.
    noise_coupling : int
        ``m > 1``: each step takes the summed noise of ``m`` steps of the run at ``step_size / m`` (see
        :func:`pypattern.sample`'s ``noise_coupling``); SGLD without a bounding box only. Default 1.
    """

    _KIND = {"sgld": None, "sgnht": "momentum", "rmsprop_sgld": "square_avg"}

    def __init__(
        self,
        sampler: str,
        stacked: Mapping[str, torch.Tensor],
        names: Sequence[Sequence[str]],
        seeds: Sequence[int],
        saved: Sequence[Mapping[str, torch.Tensor] | None],
        *,
        hyper: Mapping[str, Any],
        own: Mapping[str, float],
        backend: str | None,
        noise_coupling: int = 1,
    ):
        self.sampler, self.names, self.hyper, self.own = sampler, [list(n) for n in names], dict(hyper), own
        self.coupling = int(noise_coupling)
        if self.coupling > 1 and (sampler != "sgld" or self.hyper.get("bounding_box") is not None):
            raise ValueError(
                f"noise_coupling={noise_coupling} couples SGLD steps without a bounding box; got sampler={sampler!r}, "
                f"bounding_box={self.hyper.get('bounding_box')!r}"
            )
        self.kind = self._KIND[sampler]
        device = next(iter(stacked.values())).device
        self.backend = backend
        self.op = {"sgld": "sgld_step_", "sgnht": "sgnht_step_", "rmsprop_sgld": "rmsprop_sgld_step_"}[
            sampler
        ]
        self._fast = resolve_step_fn(device, backend) if sampler == "sgld" else None
        self.seeds = list(seeds)
        if sampler == "sgld":
            chains_backend = _backends.choose("sgld_chains_step_", device, backend)

            def chains_fast(params, grads, anchors, **kw):
                return sgld_chains_step_(
                    params, grads, anchors, backend=chains_backend, validate=False, check_finite=False, **kw
                )

            self._chains_fast = chains_fast
        self._backend_name = _backends.choose(self.op, device, backend) if sampler != "sgld" else None
        self.rows: dict[str, torch.Tensor] = {}
        self.thermostat = None
        if self.kind is None:
            return
        self.rows = {n: torch.zeros_like(s) for n, s in stacked.items()}
        C = len(self.names)
        if sampler == "sgnht":
            self.thermostat = torch.full((C,), own["diffusion_factor"], dtype=torch.float64, device=device)
        with torch.no_grad():
            for i, ns in enumerate(self.names):
                if saved[i] is not None:
                    for n in ns:
                        self.rows[n][i].copy_(saved[i][f"{self.kind}/{n}"])
                    if self.thermostat is not None:
                        self.thermostat[i : i + 1].copy_(saved[i]["thermostat"])
                elif sampler == "sgnht":
                    rows = [stacked[n][i] for n in ns]
                    init = initial_momenta(
                        rows, seed=seeds[i], step_size=hyper["step_size"], noise_scale=hyper["noise_scale"]
                    )
                    for n, m in zip(ns, init):
                        self.rows[n][i].copy_(m)

    def step(
        self,
        i: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        anchors: list[torch.Tensor],
        *,
        masks,
        seed: int,
        step: int,
        validate: bool,
    ) -> torch.Tensor | None:
        """One step of chain ``i`` on its parameter rows ``params`` (its tensors ``names[i]``). ``validate``:
        check every argument and raise ``FloatingPointError`` on a non-finite gradient (returns None); else the
        unchecked fast path, returning the per-tensor flags (bit 1: a non-finite gradient, bit 2: an update that
        overflowed; flagged entries left as they were)."""
        kw = dict(seed=seed, step=step, masks=masks, **self.hyper)
        if self.coupling > 1:
            return self._coupled_step(params, grads, anchors, kw, validate)
        if self.sampler == "sgld":
            if validate:
                sgld_step_(params, grads, anchors, backend=self.backend, **kw)
                return None
            return self._fast(params, grads, anchors, check=False, **kw)
        state = [self.rows[n][i] for n in self.names[i]]
        common = dict(
            backend=self.backend if validate else self._backend_name,
            validate=validate,
            check_finite=validate,
            **kw,
        )
        if self.sampler == "sgnht":
            flags = sgnht_step_(
                params,
                grads,
                anchors,
                state,
                self.thermostat[i : i + 1],
                diffusion_factor=self.own["diffusion_factor"],
                **common,
            )
        else:
            flags = rmsprop_sgld_step_(
                params, grads, anchors, state, alpha=self.own["alpha"], eps=self.own["eps"], **common
            )
        return None if validate else flags

    def _coupled_step(self, params, grads, anchors, kw: dict, validate: bool) -> torch.Tensor | None:
        """SGLD step ``t`` at step size ``eps`` whose noise is the sum of the noises of steps ``m t ... m t + m - 1``
        of a chain with the same seed, over ``sqrt(m)``: the Euler step of the Brownian path that a chain at step
        ``eps / m`` follows in ``m`` steps. The drift step runs in the op without noise; the noise is read from the
        op's own stream (the op stepping zeros with unit step, no drift) and added on the unmasked entries."""
        drift = dict(kw, noise_scale=0.0)
        if validate:
            sgld_step_(params, grads, anchors, backend=self.backend, **drift)
            flags = None
        else:
            flags = self._fast(params, grads, anchors, check=False, **drift)
        if kw["noise_scale"] != 0.0:
            self._add_coupled_noise(
                lambda *a, **k: self._fast(*a, check=False, **k), params, anchors, kw, dict(seed=kw["seed"])
            )
        return flags

    def _add_coupled_noise(self, step_fn, params, anchors, kw: dict, key: dict) -> None:
        """Add to ``params`` the coupled step's noise: the sum of the noises of the ``m`` unit steps ``m t ...
        m t + m - 1`` of the stream ``key`` (``seed`` or ``seeds``), drawn by ``step_fn`` (an unchecked step op)
        stepping zeros with no drift, times ``sqrt(eps / m) * noise_scale``, on the unmasked entries."""
        m = self.coupling
        xi = [torch.zeros_like(p) for p in params]
        zero_grads = [torch.zeros_like(p) for p in params]
        zero_anchors = [torch.zeros_like(a) for a in anchors]
        unit = dict(
            step_size=1.0, nbeta=1.0, localization=0.0, weight_decay=0.0, noise_scale=1.0, bounding_box=None
        )
        for j in range(m):
            step_fn(xi, zero_grads, zero_anchors, step=m * kw["step"] + j, masks=None, **unit, **key)
        c = math.sqrt(kw["step_size"] / m) * kw["noise_scale"]
        masks = kw["masks"]
        for t, (p, z) in enumerate(zip(params, xi, strict=True)):
            mask = None if masks is None else masks[t]
            p.add_(z if mask is None else z * mask.to(z.dtype), alpha=c)

    def step_chains(
        self,
        lo: int,
        hi: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        anchors: list[torch.Tensor],
        *,
        masks,
        step: int,
    ) -> torch.Tensor:
        """The unchecked SGLD step of chains ``lo .. hi - 1`` in one op call (:func:`sgld_chains_step_`):
        ``params`` and ``grads`` hold their rows ``(hi - lo, *shape)`` of the tensors they all move (the same
        ones, in the order of :meth:`step`'s lists), ``anchors`` and ``masks`` are shared. Each chain's update is
        the one :meth:`step` with ``validate=False`` gives it. Returns each chain's flags OR-ed over its tensors,
        shape ``(hi - lo,)``."""
        kw = dict(seeds=self.seeds[lo:hi], step=step, masks=masks, **self.hyper)
        flags = self._chains_fast(
            params, grads, anchors, **dict(kw, noise_scale=0.0) if self.coupling > 1 else kw
        )
        if self.coupling > 1 and kw["noise_scale"] != 0.0:
            self._add_coupled_noise(self._chains_fast, params, anchors, kw, dict(seeds=kw["seeds"]))
        return or_flags(flags)

    def state_of(self, i: int) -> dict[str, torch.Tensor]:
        """Chain ``i``'s state (copies), keyed as :meth:`SGNHT.chain_state` keys it; ``{}`` for SGLD."""
        if self.kind is None:
            return {}
        out = {f"{self.kind}/{n}": self.rows[n][i].clone() for n in self.names[i]}
        if self.thermostat is not None:
            out["thermostat"] = self.thermostat[i : i + 1].clone()
        return out
