"""The SGLD optimizer: a ``torch.optim.Optimizer`` whose ``step`` is one call of the fused op
:func:`pypattern.ops.sgld.sgld_step_` over all its parameters.

Noise keys: the optimizer of chain ``c`` is built with ``seed = chain_seed(seed, c)``; its parameter ``i`` (in the
order given, restricted ones left out) is tensor index ``i`` of the op, and its ``k``-th call of ``step`` is op step
``k``. The batched runner uses the same keys for the same chain, so both draw identical noise.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from .. import _backends
from .._checks import is_count
from ..ops.sgld import sgld_step_
from ..ops.sgld.op import check_key
from .vocabulary import DEVINTERP_NAMES, HYPERPARAMETERS, translate

__all__ = ["SGLD", "chain_seed"]

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The splitmix64 mixing function of a 64-bit integer (the key derivation of every noise and data stream)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def chain_seed(seed: int, chain: int, stream: int = 0) -> int:
    """The 64-bit noise seed of chain ``chain``: splitmix64 of ``(seed, chain, stream)``, in ``[0, 2**64)``.

    ``stream`` separates independent uses (0: SGLD noise, 1: data order).
    """
    if not is_count(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    for name, v in (("chain", chain), ("stream", stream)):
        if not is_count(v):
            raise TypeError(f"{name}={v!r} is not valid; give an int (numpy integers count)")
    seed, chain, stream = int(seed), int(chain), int(stream)
    return splitmix64(splitmix64(splitmix64(seed & _MASK64) ^ (chain & _MASK64)) ^ (stream & _MASK64))


def check_backend(backend, name: str = "backend") -> str | None:
    """``backend`` (passed as ``name``): None (the automatic choice) or the name of a kernel backend
    (:data:`pypattern._backends.NAMES`); anything else is refused here, before the first step would refuse it.
    Whether a named backend runs on the tensors' device is decided at the step."""
    if backend is None or backend == "":
        return backend
    if not isinstance(backend, str) or backend not in _backends.NAMES:
        raise ValueError(
            f"{name}={backend!r} is not a backend; give one of {', '.join(map(repr, _backends.NAMES))}, or None "
            "for the automatic choice"
        )
    return backend


def group_seed(seed: int, group: int) -> int:
    """The noise seed of parameter group ``group``: ``seed`` for group 0, else ``chain_seed(seed, group, 2)``."""
    return seed if group == 0 else chain_seed(seed, group, stream=2)


def generator_key(noise_generator: torch.Generator | None) -> int | None:
    """A noise key in ``[0, 2**63)`` drawn from ``noise_generator`` (devinterp's ``step(noise_generator=...)``),
    advancing it; None without one."""
    if noise_generator is None:
        return None
    if not isinstance(noise_generator, torch.Generator):
        raise TypeError(f"noise_generator must be a torch.Generator, got {type(noise_generator).__name__}")
    r = torch.randint(
        0, 2**63 - 1, (1,), generator=noise_generator, dtype=torch.int64, device=noise_generator.device
    )
    return int(r.item())


def op_kwargs(hyper: dict) -> dict:
    """The fused op's hyperparameter keywords from the optimizer's names (``lr``, ``noise_level``,
    ``bounding_box_size``, as devinterp names them): one mapping for the optimizer and the batched runner."""
    return dict(
        step_size=hyper["lr"],
        nbeta=hyper["nbeta"],
        localization=hyper["localization"],
        weight_decay=hyper["weight_decay"],
        noise_scale=hyper["noise_level"],
        bounding_box=hyper["bounding_box_size"],
    )


def resolve_step_fn(device: torch.device, backend: str | None = None):
    """The step for tensors on ``device``, with the backend chosen once: ``fn(params, grads, anchors, *,
    check=True, **op_kwargs)`` is :func:`sgld_step_` with ``validate=False`` (its fast path, for tensors
    validated once by a first call of :func:`sgld_step_`) and ``check_finite=check``. With ``check=False`` it
    returns the per-tensor flags (bit 1: a non-finite gradient; bit 2: a finite gradient whose update
    overflowed; flagged entries were left unchanged) instead of raising."""
    name = _backends.choose("sgld_step_", device, backend)

    def step_fn(params, grads, anchors, *, check=True, **kw):
        return sgld_step_(params, grads, anchors, backend=name, validate=False, check_finite=check, **kw)

    return step_fn


SGLD_DEFAULTS = dict(
    step_size=0.01, nbeta=1.0, localization=0.0, weight_decay=0.0, noise_scale=1.0, bounding_box=None
)  # devinterp's SGLD defaults


def check_hyperparameters(hyper: Mapping) -> dict:
    """The six SGLD hyperparameters (pypattern's names, see :mod:`pypattern.sampling.vocabulary`) checked and as
    Python floats (a 0-d real tensor counts as its number); ``ValueError`` naming the hyperparameter (and
    devinterp's name) and the valid range."""
    unknown = set(hyper) - set(HYPERPARAMETERS)
    if unknown:
        raise ValueError(f"unknown SGLD hyperparameters {sorted(unknown)}; valid are {list(HYPERPARAMETERS)}")
    alias = {v: k for k, v in DEVINTERP_NAMES.items() if k != "temperature"}
    out = {}
    for name in HYPERPARAMETERS:
        v = scalar_value(hyper[name])
        label = f"{name} ({alias[name]})" if name in alias else name
        if name == "bounding_box":
            if v is not None and not (_is_number(v) and v > 0):
                raise ValueError(f"{label} must be a number > 0 or None, got {v!r}")
        elif name in ("step_size", "nbeta"):
            if not (_is_number(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{label} must be a finite number > 0, got {v!r}")
        elif not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {v!r}")
        out[name] = None if v is None else float(v)
    return out


def scalar_value(v):
    """A 0-d real tensor (one number, not bool or complex) as its Python number; anything else unchanged (for the
    checks that follow to name)."""
    if (
        isinstance(v, torch.Tensor)
        and v.dim() == 0
        and v.dtype != torch.bool
        and not v.is_complex()
        and v.device.type != "meta"
    ):
        return v.item()
    return v


def _is_number(v) -> bool:
    import numbers

    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _compile_patterns(patterns) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, str | re.Pattern):
        patterns = [patterns]
    if isinstance(patterns, Mapping) or not isinstance(patterns, Iterable):
        raise TypeError(
            f"restrict_to must be a str (a glob or a module name), a compiled regex (re.Pattern) or a list of them, "
            f"got {patterns!r}"
        )
    patterns = list(patterns)
    if not patterns:
        raise ValueError(
            "restrict_to is empty: give None to sample every parameter, or the patterns of those to sample"
        )
    out = []
    for p in patterns:
        if not isinstance(p, str | re.Pattern):
            raise TypeError(
                f"restrict_to must be a str (a glob or a module name), a compiled regex (re.Pattern) or a list of "
                f"them, got {p!r}"
            )
        out.append(p)
    return out


def same_masks(ours: list, theirs: list) -> bool:
    """Whether two optimizers' per-group masks (a list per group of a tensor or None per tensor, or None) are
    equal, entry for entry."""
    if len(ours) != len(theirs):
        return False
    for a, b in zip(ours, theirs):
        a = [None] * (len(b) if b is not None else 0) if a is None else a
        b = [None] * len(a) if b is None else b
        if len(a) != len(b):
            return False
        for x, y in zip(a, b):
            if (x is None) != (y is None) or (x is not None and not torch.equal(x.cpu(), y.cpu())):
                return False
    return True


def split_named(params, where: str) -> tuple[list[str | None], list[torch.Tensor]]:
    """A param group's ``params`` (a tensor, or an iterable of tensors and ``(name, tensor)`` pairs) as ``(names,
    tensors)``, None for an unnamed tensor; anything else is a TypeError naming ``where[i]``."""
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    names: list[str | None] = []
    tensors: list[torch.Tensor] = []
    for i, p in enumerate(items):
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            names.append(p[0])
            tensors.append(p[1])
        elif isinstance(p, torch.Tensor):
            names.append(None)
            tensors.append(p)
        else:
            raise TypeError(f"{where}[{i}] must be a Tensor or a (name, Tensor) pair, got {type(p).__name__}")
    return names, tensors


def select_group(g: dict, where: str, patterns: list, masks: dict) -> tuple:
    """A param-group dict's moving tensors: ``(names, tensors, every name the group gives, their masks or None)``. A group's ``"mask"`` (devinterp's per-group mask: one tensor for every tensor of the group, or a list
    with one per tensor, None for none; ``"optimize_over"`` is devinterp 1.x's name) and ``masks`` by name combine;
    one tensor masked both ways is an error. Tensors that do not require grad, or that ``restrict_to`` leaves out,
    do not move."""
    names, tensors = split_named(g["params"], where)
    if (patterns or masks) and any(n is None for n in names):
        raise ValueError("restrict_to and masks need named parameters: pass model.named_parameters()")
    if g.get("mask") is not None and g.get("optimize_over") is not None:
        raise ValueError(f"{where} gives 'mask' and 'optimize_over' (devinterp 1.x's name for it): give one")
    own = g.get("mask") if g.get("mask") is not None else g.get("optimize_over")
    if own is None:
        own = [None] * len(tensors)
    elif isinstance(own, torch.Tensor):
        own = [own] * len(tensors)
    elif isinstance(own, (list, tuple)) and len(own) == len(tensors):
        own = list(own)
    else:
        raise TypeError(
            f"{where}['mask'] must be None, a tensor (for every tensor of the group) or a list of "
            f"{len(tensors)} (one per tensor), got {type(own).__name__}"
        )
    for i, (m, t) in enumerate(zip(own, tensors)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(t.shape):
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(
                f"{where}['mask'] for tensor {i} must have its shape {tuple(t.shape)}, got {got}"
            )
        if names[i] is not None and names[i] in masks:
            raise ValueError(f"{names[i]} has a mask in masks= and in its group's 'mask': give one")
    given = names
    keep = [t.requires_grad and (not patterns or matches(n, patterns)) for n, t in zip(names, tensors)]
    names = [n for n, k in zip(names, keep) if k]
    tensors = [t for t, k in zip(tensors, keep) if k]
    own = [m for m, k in zip(own, keep) if k]
    merged = [masks[n] if n is not None and n in masks else m for n, m in zip(names, own)]
    merged = [None if m is None else m.to(t.device) for m, t in zip(merged, tensors)]
    return names, tensors, given, (merged if any(m is not None for m in merged) else None)


def group_options(g: dict, where: str) -> dict:
    """A param-group dict's own hyperparameters (its keys but ``params`` and the masks), devinterp's names
    translated."""
    return translate(
        {k: v for k, v in g.items() if k not in ("params", "mask", "optimize_over")},
        where=where,
        drop_none=False,
    )


def _parse_group(g: dict, where: str, hyper: dict, patterns: list, masks: dict) -> tuple:
    """One param-group dict of :class:`SGLD`: ``(ParamGroup of the moving tensors with the group's own
    hyperparameters, their names, every name the group gives, their masks or None)`` (:func:`select_group`)."""
    names, tensors, given, merged = select_group(g, where, patterns, masks)
    options = group_options(g, where)  # over the constructor's
    group = ParamGroup(params=tensors)
    if options:
        try:
            group.update(check_hyperparameters({**hyper, **options}))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return group, names, given, merged


def matches(name: str, patterns: Sequence[str | re.Pattern]) -> bool:
    """True when ``name`` matches any pattern: a glob (``blocks.0.attn.*``, by :func:`fnmatch.fnmatchcase`, where
    ``.`` is a plain character: ``blocks.1.*`` does not cover ``blocks.10``), a module's dotted name
    (``blocks.0.attn`` covers ``blocks.0.attn.W_Q``, as component names do), or a regex, matched with
    ``fullmatch``: a compiled one (``re.compile("blocks[.][0-3][.]attn[.].*")``), or a string holding a backslash
    (an escaped name such as ``re.escape("blocks.0.attn.W_Q")``), which as a
    glob could match nothing (no parameter name holds a backslash). Any other string is a glob, never a regex."""
    for p in patterns:
        if isinstance(p, re.Pattern) or "\\" in p:
            try:
                if re.fullmatch(p, name):
                    return True
            except re.error:
                pass
        elif fnmatch.fnmatchcase(name, p) or name.startswith(p + "."):
            return True
    return False


def _saved_tensor(owner: str, what: str, p: torch.Tensor, t) -> None:
    """A saved tensor of parameter ``p``'s state (its anchor ``w*``, momentum or running mean) has ``p``'s shape
    and dtype; ``what`` names it with the parameter's index."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{owner}.load_state_dict: the saved {what} is a {type(t).__name__}, expected a tensor"
        )
    if t.shape != p.shape:
        raise ValueError(
            f"{owner}.load_state_dict: the saved {what} has shape {tuple(t.shape)}, expected {tuple(p.shape)} (the "
            "parameter's): the state was saved for other parameters; nothing was loaded"
        )
    if t.dtype != p.dtype:
        raise TypeError(
            f"{owner}.load_state_dict: the saved {what} has dtype {t.dtype}, expected {p.dtype} (the parameter's); "
            "nothing was loaded"
        )


def _in_group(k: int, groups: list) -> str:
    return "" if len(groups) == 1 else f" of param group {k}"


def check_saved_state(
    owner: str, param_groups: list[dict], state: dict, anchors, extra: Mapping | None, state_of
) -> None:
    """Refuse a saved optimizer state that does not fit this optimizer's parameters, before anything is loaded (a
    refused state leaves the optimizer as it was).

    Refused: another number of groups or of tensors per group; an anchor ``w*`` (``anchors``: one list per group)
    or a per-parameter state tensor whose shape or dtype is not its parameter's (``state_of(p)`` is the
    optimizer's own state of parameter ``p``: each of its kinds must be saved); a thermostat that is not one
    float64 value; a step counter or seed (in ``extra``) that is not an int in [0, 2**64). Errors name the
    parameter's index and the expected and given shapes."""
    from ..ops.sgld.op import check_key

    saved_groups = state.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(param_groups):
        n = len(saved_groups) if isinstance(saved_groups, list) else saved_groups
        raise ValueError(
            f"{owner}.load_state_dict: the state has {n} parameter groups, this optimizer {len(param_groups)}"
        )
    saved_state = state.get("state", {})
    for k, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        params, ids = group["params"], saved.get("params", [])
        if len(ids) != len(params):
            raise ValueError(
                f"{owner}.load_state_dict: the state has {len(ids)} parameters in group {k}, this optimizer "
                f"{len(params)}: it was saved for other parameters"
            )
        for i, (p, idx) in enumerate(zip(params, ids)):
            mine, theirs = state_of(p), saved_state.get(idx, {})
            for kind in mine:
                if kind not in theirs:
                    raise ValueError(
                        f"{owner}.load_state_dict: the state lacks the {kind} of params[{i}]"
                        f"{_in_group(k, param_groups)}"
                    )
                _saved_tensor(owner, f"{kind} of params[{i}]{_in_group(k, param_groups)}", p, theirs[kind])
        if "thermostat" in group:
            th = saved.get("thermostat")
            if not isinstance(th, torch.Tensor) or th.dtype != torch.float64 or th.numel() != 1:
                got = f"{th.dtype} of shape {tuple(th.shape)}" if isinstance(th, torch.Tensor) else repr(th)
                raise ValueError(
                    f"{owner}.load_state_dict: the saved thermostat{_in_group(k, param_groups)} must be a float64 "
                    f"tensor with one element, got {got}"
                )
    if extra is None:
        return
    if not isinstance(anchors, list | tuple) or len(anchors) != len(param_groups):
        n = len(anchors) if isinstance(anchors, list | tuple) else anchors
        raise ValueError(
            f"{owner}.load_state_dict: the state holds anchors of {n} parameter groups, this optimizer has "
            f"{len(param_groups)}"
        )
    for k, (group, saved) in enumerate(zip(param_groups, anchors)):
        params = group["params"]
        if not isinstance(saved, list | tuple) or len(saved) != len(params):
            n = len(saved) if isinstance(saved, list | tuple) else saved
            raise ValueError(
                f"{owner}.load_state_dict: the state holds {n} anchors for group {k}, which has {len(params)} "
                "parameters"
            )
        for i, (p, a) in enumerate(zip(params, saved)):
            _saved_tensor(owner, f"anchor w* of params[{i}]{_in_group(k, param_groups)}", p, a)
    for key in ("num_steps", "seed"):
        try:
            check_key(key, extra[key])
        except KeyError:
            raise ValueError(f"{owner}.load_state_dict: the state lacks {key}") from None
        except (TypeError, ValueError) as e:
            raise type(e)(f"{owner}.load_state_dict: the saved {e}") from None


def _no_metric(opt, name: str):
    raise AttributeError(
        f"{type(opt).__name__}.{name}: devinterp's per-step optimizer metrics (the noise, the MALA terms dws and "
        "localization_loss) are not recorded by the fused samplers; devinterp's NoiseNorm and MalaAcceptanceRate "
        "callbacks cannot run on pypattern"
    )


_SWITCHES = ("save_noise", "save_mala_vars", "noise_norm", "grad_norm", "weight_norm", "distance", "metrics")


def refuse_diagnostics(sampler: str, args: Mapping) -> None:
    """devinterp 1.x's switches for an optimizer's own per-step metrics (``save_noise``, ``save_mala_vars``, the
    norms, ``distance``, ``metrics``), read from a constructor's arguments ``args`` (its ``locals()``): off
    (``False``, ``None``, ``metrics=[]``) they do nothing; on, ``NotImplementedError`` naming them."""
    switches = {k: args[k] for k in _SWITCHES}
    on = sorted(k for k, v in switches.items() if v)
    if on:
        raise NotImplementedError(
            f"{sampler}({', '.join(f'{k}={switches[k]!r}' for k in on)}): devinterp's per-step optimizer metrics "
            "(the noise, MALA terms and norms) are not recorded; leave them off (False), and read losses and "
            "draws through pypattern.sample's callbacks"
        )


class ParamGroup(dict):
    """An :class:`SGLD` parameter group: it holds pypattern's names (``step_size``, ``nbeta``, ``noise_scale``,
    ``bounding_box``, ...), and reads and writes devinterp's names of them as the same entries: ``"lr"`` (torch's
    name too, what torch's learning-rate schedulers change) is ``step_size``, ``"noise_level"`` is
    ``noise_scale``, ``"bounding_box_size"`` is ``bounding_box`` and ``"temperature"`` is ``nbeta``. An alias is
    not a second copy: a value written under either name is read under both."""

    @staticmethod
    def _key(k):
        return DEVINTERP_NAMES.get(k, k) if isinstance(k, str) else k

    def __getitem__(self, k):
        return super().__getitem__(self._key(k))

    def __setitem__(self, k, v):
        super().__setitem__(self._key(k), v)

    def __contains__(self, k):
        return super().__contains__(self._key(k))

    def get(self, k, default=None):
        return super().get(self._key(k), default)

    def setdefault(self, k, default=None):
        return super().setdefault(self._key(k), default)


class SGLD(torch.optim.Optimizer):
    r"""Stochastic gradient Langevin dynamics around the initial weights ``w*`` (devinterp's SGLD, fused).

    Per parameter, with ``g`` the gradient of the batch-mean loss::

        w <- w - eps/2 * (nbeta * g + localization * (w - w*) + weight_decay * w) + sqrt(eps) * noise_scale * xi

    with ``eps = step_size``, clamped to ``w* +- bounding_box`` when that is set. The parameter group holds these
    names (``step_size``, ``nbeta``, ``localization``, ``weight_decay``, ``noise_scale``, ``bounding_box``: the
    op's); devinterp's names (``lr``, ``noise_level``, ``bounding_box_size``, ``temperature`` for ``nbeta``) are
    accepted as arguments and translated (:mod:`pypattern.sampling.vocabulary`), and ``group["lr"]`` reads and
    writes ``step_size``, so torch's learning-rate schedulers drive the step size. Values changed between steps
    are checked again before the next step. ``w*`` is the value of each parameter when the
    optimizer is built. The whole step is one call of the fused op (C++/CUDA/Triton kernels).

    Parameters
    ----------
    params : iterable of Tensor, of (name, Tensor) pairs, or of param-group dicts
        Pass ``model.named_parameters()`` to use ``restrict_to`` and ``masks``. A param-group dict may set its
        own hyperparameters (either library's names) over the constructor's; group ``k`` draws its noise with
        seed ``group_seed(seed, k)`` (``seed`` itself for the first group), one fused-op call per group. A group's
        ``"mask"`` (as devinterp's sampler passes it: one tensor for every tensor of the group, or a list with one
        per tensor; ``"optimize_over"``, devinterp 1.x's name, is the same) masks its tensors as ``masks`` does by
        name.
    optimize_over : Tensor, optional
        devinterp 1.x's mask of every group that does not name one (a group's ``"mask": None`` has none).
    save_noise, save_mala_vars, noise_norm, grad_norm, weight_norm, distance, metrics
        devinterp 1.x's switches for the optimizer's own per-step metrics: accepted off; on, NotImplementedError.
    save_metrics, sketch_dim, sketch_seed
        devinterp 2.x's switches for the same metrics and their random sketch: accepted off (``False``,
        ``None``; ``sketch_seed`` then has no effect); on, NotImplementedError.
    lr, step_size : float
        Step size ``eps`` > 0 (devinterp's name, pypattern's); default 0.01.
    noise_level, noise_scale : float
        Multiplies the noise (1 = Langevin, the default).
    weight_decay : float
        ``lambda_wd`` >= 0.
    localization : float
        ``gamma`` >= 0.
    nbeta : float
        ``n * beta`` > 0, default 1 (devinterp's default is ``batch_size / ln(batch_size)``; see
        :func:`pypattern.sampling.default_nbeta`).
    temperature : float, optional
        devinterp's older name for ``nbeta`` (both given must agree).
    bounding_box_size, bounding_box : float, optional
        Half-width of the box around ``w*``.
    restrict_to : str, re.Pattern or a list of them, optional
        Only parameters whose name matches one of these globs or module names move (e.g. ``"blocks.0.attn.*"``
        or ``"blocks.0.attn"``; in a glob ``.`` is a plain character, so ``"blocks.1.*"`` leaves ``blocks.10``
        out); a compiled regex (``re.compile(...)``), or a string holding a backslash (an escaped regex such as
        ``re.escape(name)``, which no parameter name holds), selects by regex (``fullmatch``). Needs named
        parameters.
    masks : mapping of str to Tensor, optional
        Per-element masks by parameter name (devinterp's ``optimize_over_per_model_param``): 0 freezes an entry.
        The optimizer moves every parameter it is given (or that ``restrict_to`` selects); one without a mask
        moves entirely. (:func:`pypattern.sample` and the estimators built on it, given ``masks`` without
        ``restrict_to``, move only the masked parameters, as devinterp does.)
    seed : int
        Noise seed in ``[0, 2**64)``; use :func:`chain_seed` for chain ``c`` of a run with seed ``s``.
    backend : str, optional
        Force a backend of the fused op.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        noise_level: float | None = None,
        weight_decay: float = 0.0,
        localization: float = 0.0,
        nbeta: float | None = None,
        bounding_box_size: float | None = None,
        *,
        restrict_to: str | re.Pattern | Sequence[str | re.Pattern] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        backend: str | None = None,
        temperature: float | None = None,
        step_size: float | None = None,
        noise_scale: float | None = None,
        bounding_box: float | None = None,
        optimize_over: torch.Tensor | None = None,
        save_noise: bool = False,
        save_mala_vars: bool = False,
        noise_norm: bool = False,
        grad_norm: bool = False,
        weight_norm: bool = False,
        distance: bool = False,
        metrics: Sequence[str] | None = None,
        save_metrics: bool = False,
        sketch_dim: int | None = None,
        sketch_seed: int = 0,
    ):
        refuse_diagnostics("SGLD", locals())
        if save_metrics or sketch_dim is not None:  # devinterp 2.x's recorded metrics and their sketch
            raise NotImplementedError(
                f"SGLD(save_metrics={save_metrics!r}, sketch_dim={sketch_dim!r}): devinterp's per-step optimizer "
                "metrics are not recorded; leave save_metrics=False and sketch_dim=None (sketch_seed then has no "
                "effect), and read losses and draws through pypattern.sample's callbacks"
            )
        hyper = translate(
            dict(
                step_size=step_size,
                lr=lr,
                nbeta=nbeta,
                temperature=temperature,
                localization=localization,
                weight_decay=weight_decay,
                noise_scale=noise_scale,
                noise_level=noise_level,
                bounding_box=bounding_box,
                bounding_box_size=bounding_box_size,
            ),
            where="SGLD",
        )
        hyper = check_hyperparameters({**SGLD_DEFAULTS, **hyper})
        params = list(params)
        if not params:
            raise ValueError("SGLD: params is empty")
        dicts = isinstance(params[0], dict)
        raw_groups = params if dicts else [{"params": params}]
        if optimize_over is not None:  # devinterp 1.x: the mask of every group that does not name one
            raw_groups = [
                g
                if not isinstance(g, dict) or "mask" in g or "optimize_over" in g
                else {**g, "mask": optimize_over}
                for g in raw_groups
            ]
        patterns = _compile_patterns(restrict_to)
        if masks is not None and not isinstance(masks, Mapping):
            raise TypeError(
                f"masks must be a dict of parameter name -> 0/1 mask tensor, got {type(masks).__name__}"
            )
        masks = dict(masks or {})
        groups, all_names, group_masks, given = [], [], [], []
        for gi, g in enumerate(raw_groups):
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError(f"params[{gi}] must be a param-group dict with 'params' (as params[0] is)")
            group, names, seen, gmask = _parse_group(
                g, f"params[{gi}]" if dicts else "params", hyper, patterns, masks
            )
            given += seen
            groups.append(group)
            all_names.append(names)
            group_masks.append(gmask)
        if patterns and not any(matches(n, patterns) for n in given):
            raise ValueError(f"restrict_to={patterns!r} matches no parameter; names are {given}")
        unmatched = [p for p in patterns if not any(matches(n, [p]) for n in given)]
        if unmatched:  # a mistyped pattern among others: the run would cover less than asked
            raise ValueError(
                f"restrict_to: the pattern{'s' if len(unmatched) > 1 else ''} {unmatched} match"
                f"{'' if len(unmatched) > 1 else 'es'} no parameter (restrict_to={patterns!r}); names are {given}"
            )
        flat = [n for ns in all_names for n in ns]
        unknown = set(masks) - set(flat)
        if unknown:
            raise ValueError(f"masks has names that are not (moving) parameters: {sorted(unknown)}")
        super().__init__(groups, hyper)
        self._checked = [tuple(g[k] for k in HYPERPARAMETERS) for g in self.param_groups]  # last checked
        self.seed = check_key("seed", seed)  # an int in [0, 2**64): a float would be truncated
        self.backend = check_backend(backend)
        # per group: the moving tensors' names, anchors w* and masks (None: no mask in that group)
        self.group_names = all_names
        self.group_anchors = [[t.detach().clone() for t in g["params"]] for g in self.param_groups]
        self.group_masks = group_masks
        # what add_param_group reads a new group with
        self._group_spec = (hyper, patterns, masks, optimize_over)
        self.num_steps = 0
        self._validated = False
        self._step_device: torch.device | None = None  # where the fast path's tensors were checked
        self._step_fn = None

    # devinterp 1.x's per-step optimizer metrics (read by its NoiseNorm and MalaAcceptanceRate callbacks)
    noise = property(lambda self: _no_metric(self, "noise"))
    dws = property(lambda self: _no_metric(self, "dws"))
    localization_loss = property(lambda self: _no_metric(self, "localization_loss"))

    # the first group's names, anchors and masks: the one group of the chain runners, which set its anchors
    @property
    def param_names(self) -> list[str | None]:
        return self.group_names[0]

    @property
    def anchors(self) -> list[torch.Tensor]:
        return self.group_anchors[0]

    @anchors.setter
    def anchors(self, value: list[torch.Tensor]) -> None:
        self.group_anchors[0] = value

    @property
    def masks(self) -> list | None:
        return self.group_masks[0]

    def add_param_group(self, param_group: dict) -> None:
        """Add a group as torch optimizers do (``params`` tensors or ``(name, tensor)`` pairs, and hyperparameters
        by either library's names over the constructor's). Its anchors ``w*`` are its values now; it draws its
        noise with seed :func:`group_seed` ``(seed, k)`` for its index ``k``; ``restrict_to`` and ``masks``
        given to the constructor apply to its named tensors."""
        # torch.optim.Optimizer.__init__ adds the constructor's groups, already read, before _group_spec is set
        if "_group_spec" not in self.__dict__:
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError("param_group must be a param-group dict with 'params'")
        hyper, patterns, masks, optimize_over = self._group_spec
        if optimize_over is not None and "mask" not in param_group and "optimize_over" not in param_group:
            param_group = {**param_group, "mask": optimize_over}
        k = len(self.param_groups)
        group, names, _, gmask = _parse_group(param_group, f"param_group (group {k})", hyper, patterns, masks)
        super().add_param_group(group)
        group = self.param_groups[-1]
        self._checked.append(tuple(group[n] for n in HYPERPARAMETERS))
        self.group_names.append(names)
        self.group_anchors.append([t.detach().clone() for t in group["params"]])
        self.group_masks.append(gmask)

    @torch.no_grad()
    def step(self, closure=None, noise_generator: torch.Generator | None = None):
        """One SGLD step over all parameters (one fused-op call). Parameters without a gradient get a zero one.

        ``noise_generator`` (devinterp's argument; a ``torch.Generator`` given as the first positional argument,
        as devinterp's ``step(noise_generator)`` takes it, is read as one): the step's noise comes from this
        generator instead of the optimizer's ``(seed, step)`` key. The fused kernels draw counter-based Philox
        noise, so the step draws one 63-bit key from the generator (advancing it) and keys its noise by it alone:
        two optimizers stepped with generators in equal states take equal steps (not the values of
        ``torch.normal(..., generator=noise_generator)``)."""
        if isinstance(closure, torch.Generator):
            if noise_generator is not None:
                raise TypeError("step(): noise_generator is given both positionally and by keyword")
            closure, noise_generator = None, closure
        key = generator_key(noise_generator)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sgld_step(key=key)
        return loss

    @torch.no_grad()
    def sgld_step(self, key: int | None = None) -> None:
        """The step itself, without ``torch.optim.Optimizer.step``'s hooks and profiler wrapper (the runner
        calls this directly: about 0.15 ms less per step). One fused-op call per parameter group; group ``k``
        draws its noise with seed :func:`group_seed` ``(seed, k)`` at op step ``num_steps``, or, given a ``key``
        (:func:`generator_key`), with seed :func:`group_seed` ``(key, k)`` at op step 0."""
        for k, group in enumerate(self.param_groups):
            params = group["params"]
            if not params:
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            kw = {n: group[n] for n in HYPERPARAMETERS}
            values = tuple(kw.values())
            # changed since the last step (a scheduler, or by hand): checked again
            if values != self._checked[k]:
                try:
                    check_hyperparameters(kw)
                except ValueError as e:
                    if len(self.param_groups) == 1:
                        raise
                    raise ValueError(f"param group {k}: {e}") from None
                self._checked[k] = values
            anchors = self.group_anchors[k]
            kw.update(
                masks=self.group_masks[k],
                seed=group_seed(self.seed if key is None else key, k),
                step=self.num_steps if key is None else 0,
            )
            # the fast path holds while the parameters stay on the device they were checked on (a model moved
            # since, e.g. to another GPU, is checked again: its anchors and masks did not move with it)
            if self._validated and params[0].device == self._step_device:
                if self._step_fn is None:
                    self._step_fn = resolve_step_fn(params[0].device, self.backend)
                self._step_fn(params, grads, anchors, **kw)
            else:
                sgld_step_(params, grads, anchors, backend=self.backend, **kw)
                self._step_device, self._step_fn = params[0].device, None
        self._validated = True
        self.num_steps += 1

    def resume_at(self, step: int) -> None:
        """Continue a chain at op step ``step`` (its noise key); the hyperparameters were checked by the run
        that took the earlier steps."""
        self.num_steps = int(step)
        if step:
            self._validated = True
            self._step_device = next((g["params"][0].device for g in self.param_groups if g["params"]), None)

    def state_dict(self):
        sd = super().state_dict()
        sd["sgld"] = {
            "num_steps": self.num_steps,
            "seed": self.seed,
            "anchors": self.group_anchors[0],
            "more_anchors": self.group_anchors[1:],
            "masks": self.group_masks,
        }
        return sd

    def load_state_dict(self, state_dict):
        extra = state_dict.get("sgld")
        if extra is not None and "masks" in extra and not same_masks(self.group_masks, extra["masks"]):
            raise ValueError(
                "state_dict was saved by an SGLD with other masks (masks=, a group's 'mask' or optimize_over): "
                "build this optimizer with the same masks to resume that run"
            )
        sd = {k: v for k, v in state_dict.items() if k != "sgld"}
        saved_anchors = None if extra is None else [extra.get("anchors"), *extra.get("more_anchors", [])]
        check_saved_state(
            "SGLD", self.param_groups, sd, saved_anchors, extra, lambda p: self.state.get(p, {})
        )
        super().load_state_dict(sd)
        self.param_groups = [ParamGroup(g) for g in self.param_groups]
        if extra is not None:
            self.num_steps = int(extra["num_steps"])
            self.seed = int(extra["seed"])
            with torch.no_grad():
                for mine, theirs in zip(self.group_anchors, saved_anchors):
                    for a, b in zip(mine, theirs):
                        a.copy_(b)
        self._checked = [None] * len(self.param_groups)  # the loaded values are checked at the next step
        self._validated, self._step_fn = False, None  # and the tensors with them
