"""Planning a sampler call: the arguments of :func:`pypattern.sample` checked and resolved, once, into a frozen
:class:`RunPlan` that the chain loops read (devinterp's names translated by :mod:`.vocabulary`)."""

from __future__ import annotations

import inspect
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import refuse_meta_model
from .data import batch_size_of
from .diagnostics import user_stacklevel
from .optim import SGLD_DEFAULTS, chain_seed, check_hyperparameters, matches, scalar_value
from .samplers import SAMPLER_HYPERPARAMETERS, sampler_hyperparameters, sampler_name
from .vocabulary import DEVINTERP_NAMES, _same, translate

__all__ = [
    "RunPlan",
    "RunSpec",
    "check_callables",
    "check_loader",
    "check_model",
    "check_settings",
    "default_nbeta",
    "make_plan",
    "refuse_unknown_keywords",
    "resolve_hyperparameters",
]


def refuse_unknown_keywords(
    given, accepted, who: str, takes: str, what: str = "unexpected keyword arguments"
) -> None:
    """Refuse the keywords among ``given`` that are not in ``accepted``: a ``TypeError`` (as Python raises for a
    keyword a function does not take) naming them, each with the closest accepted name (``difflib``) when one is
    close. ``who`` names the call (``"estimate_llc()"``), ``what`` the kind of keyword, ``takes`` whose keywords it
    takes and where they are documented; the accepted names are listed."""
    import difflib

    unknown = sorted(k for k in given if k not in accepted)
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), sorted(accepted), n=1, cutoff=0.6)
        if close:
            hints.append(f"{close[0]!r}" + (f" for {k!r}" if len(unknown) > 1 else ""))
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    raise TypeError(f"{who} got {what} {unknown}{hint}; it takes {takes}: {', '.join(sorted(accepted))}")


def default_nbeta(loader, grad_accum_steps: int = 1) -> float:
    """devinterp's default ``nbeta = m / ln m``, ``m = batch_size * grad_accum_steps`` (the batch size is read
    from ``loader.batch_size`` or from the first batch)."""
    bs = getattr(loader, "batch_size", None)
    first = None
    if bs is not None and not getattr(loader, "drop_last", False):
        try:  # a data set smaller than the batch size is one batch of all of it (an empty one is refused later)
            bs = min(int(bs), len(loader.dataset) or int(bs))
        except (TypeError, AttributeError):
            pass
    if bs is None:
        it = iter(loader)
        try:
            first = next(it)
        except StopIteration:
            raise ValueError("loader yielded no batch: give a loader with at least one batch") from None
        bs = batch_size_of(first)
        if isinstance(loader, Sequence) and len(loader) > 2:
            # a list of batches: a ragged last one is usual, other sizes that differ make the first one's arbitrary
            sizes = sorted({batch_size_of(b) for b in loader[:-1]})
            if len(sizes) > 1:
                warnings.warn(
                    f"loader's batches have {len(sizes)} sizes ({sizes[0]}..{sizes[-1]}); the default nbeta, "
                    f"m / ln m, reads the first batch's (m = {int(bs) * int(grad_accum_steps)}), so the batches' "
                    "order sets the LLC's scale: pass nbeta",
                    stacklevel=user_stacklevel(),
                )
    m = int(bs) * int(grad_accum_steps)
    if m < 2:
        why = ""
        if first is not None:  # say what the first batch was, and why the default loss could not read it
            from ..losses import _describe, parse_batch

            why = f" (the first batch: {_describe(first)}"
            try:
                parse_batch(first)
                why += ")"
            except (TypeError, ValueError) as e:
                why += f"; {e})"
        raise ValueError(f"default nbeta needs batch_size * grad_accum_steps >= 2, got {m}{why}; pass nbeta")
    return m / math.log(m)


def resolve_hyperparameters(
    given: Mapping[str, Any],
    optimizer_kwargs: Mapping[str, Any] | None,
    *,
    loader,
    grad_accum_steps: int = 1,
    sampler: str = "sgld",
) -> dict[str, float | None]:
    """The six SGLD hyperparameters under pypattern's names from a call's keywords (either vocabulary) and a
    devinterp-style ``optimizer_kwargs`` (a number given both ways must have one value; a keyword at its default
    counts as not given); defaults: ``step_size=1e-4``,
    ``nbeta = default_nbeta(loader)``, the others as :class:`SGLD`. Entries of ``optimizer_kwargs`` that are the
    ``sampler``'s own hyperparameters are left to :func:`pypattern.sampling.samplers.sampler_hyperparameters`;
    devinterp 1.x's diagnostic switches follow :func:`without_diagnostic_switches` (off: no effect)."""
    hyper = translate(given, where="the call")
    optimizer_kwargs = without_diagnostic_switches(optimizer_kwargs)
    okw = translate(dict(optimizer_kwargs or {}), where="optimizer_kwargs", drop_none=False)
    own = {k for hp in SAMPLER_HYPERPARAMETERS.values() for k in hp}
    unknown = set(okw) - set(SGLD_DEFAULTS) - own
    if unknown:
        known = sorted({*SGLD_DEFAULTS, *DEVINTERP_NAMES, *SAMPLER_HYPERPARAMETERS[sampler]})
        raise ValueError(
            f"optimizer_kwargs has unknown keys {sorted(unknown)}; known are {known}"
            + (f" (sampler={sampler!r})" if sampler != "sgld" else "")
        )
    okw = {k: v for k, v in okw.items() if k not in own}
    check_no_clash(hyper, okw, optimizer_kwargs)
    hyper.update(okw)
    hyper = {**SGLD_DEFAULTS, "step_size": 1e-4, "nbeta": None, **hyper}
    if hyper["nbeta"] is None:
        hyper["nbeta"] = default_nbeta(loader, grad_accum_steps)
    return check_hyperparameters(hyper)


def check_no_clash(
    hyper: Mapping[str, Any], okw: Mapping[str, Any], optimizer_kwargs: Mapping[str, Any] | None
) -> None:
    """Refuse a hyperparameter set to two values, by a keyword (``hyper``, pypattern's names) and by
    ``optimizer_kwargs`` (``okw``, translated; ``optimizer_kwargs`` as the caller gave it, to name its key). A
    keyword at its default value counts as not given (callers pass their defaults on): optimizer_kwargs sets it."""
    given_kw = {k: v for k, v in hyper.items() if not (k in SGLD_DEFAULTS and _same(v, SGLD_DEFAULTS[k]))}
    clash = [k for k, v in okw.items() if k in given_kw and not _same(given_kw[k], v)]
    if clash:
        k = clash[0]
        raise ValueError(
            f"{k}={hyper[k]!r} and optimizer_kwargs[{_okw_key(optimizer_kwargs or {}, k)!r}]={okw[k]!r} both set "
            f"{k}; give one"
        )


def _okw_key(optimizer_kwargs: Mapping[str, Any], name: str) -> str:
    """The key of ``optimizer_kwargs`` (either vocabulary) that sets the hyperparameter ``name``."""
    return next((k for k in optimizer_kwargs if DEVINTERP_NAMES.get(k, k) == name), name)


def observable_items(observables) -> tuple[tuple[str, Callable], ...]:
    """``(name, fn)`` pairs from a mapping or a sequence of callables (named by ``__name__``)."""
    if observables is None:
        return ()
    if isinstance(observables, Mapping):
        items = list(observables.items())
    else:
        items = [(getattr(fn, "__name__", None) or f"observable_{i}", fn) for i, fn in enumerate(observables)]
    seen = set()
    for name, fn in items:
        if not isinstance(name, str):
            raise TypeError(
                f"observables: the name {name!r} is not a str; give a dict {{name: fn}} with str names"
            )
        if name in seen:
            raise ValueError(
                f"observables: two observables are named {name!r} (callables are named by __name__); give a dict "
                "{name: fn} with a name for each"
            )
        seen.add(name)
        if not callable(fn):
            raise TypeError(f"observable {name!r} must be callable(model, batch), got {type(fn).__name__}")
    return tuple(items)


@dataclass(frozen=True)
class RunSpec:
    """One restricted sampler of a call: the patterns it was given, the parameters that move and their masks."""

    patterns: tuple[str, ...]
    moving: tuple[str, ...]
    masks: Mapping[str, torch.Tensor] | None


@dataclass(frozen=True)
class RunPlan:
    """Everything a sampler call decided before its first step (see :func:`pypattern.sample` for the meanings).

    Chains are numbered globally over runs: chain ``g`` is chain ``g % num_chains`` of run ``g // num_chains``.
    """

    num_chains: int
    num_draws: int
    num_burnin_steps: int
    num_steps_bw_draws: int
    grad_accum_steps: int
    seed: int | tuple[int, ...]  # as given (a sequence as a tuple)
    hyper: Mapping[str, float | None]  # pypattern's names (vocabulary.HYPERPARAMETERS)
    runs: tuple[RunSpec, ...]
    several_runs: bool  # runs= was given: one result per run
    union: tuple[str, ...]  # the parameters some run moves, in model order
    chains: tuple[int, ...] | None  # the global chains this call runs (None: all)
    loss_fn: Callable
    observables: tuple[tuple[str, Callable], ...]
    callbacks: tuple[Callable, ...]
    record_observables: bool
    init_loss: float | None
    num_init_loss_batches: int | None
    batched: bool | None
    cores: int
    backend: str | None
    checkpoint: str | None
    checkpoint_every: int
    checkpoint_state: Callable[[], Mapping[str, Any]] | None
    quiet: bool
    warn_nonstationary: bool
    sampler: str = "sgld"  # "sgld", "sgnht" or "rmsprop_sgld" (samplers.SAMPLER_NAMES)
    sampler_hyper: Mapping[str, float] = field(default_factory=dict)  # the sampler's own
    # m > 1: step t takes the summed noise of steps m t .. m t + m - 1 (over sqrt(m)) and the batches of step m t,
    # coupling the run to one at step_size / m with the same seed (the step-size calibration's halving pairs)
    noise_coupling: int = 1
    # the step-size calibration this run's step came from ({"key", "report"}), recorded in its checkpoint so that a
    # resume of the same call reuses it instead of calibrating again (auto.calibrate_or_resume)
    calibration: Mapping[str, Any] | None = None
    # the step comes from the step-size calibration (its trials judged the chains' relaxation from w*), not the caller
    calibrated: bool = False

    @property
    def total_steps(self) -> int:
        """Steps per chain: burn-in, then one draw every ``num_steps_bw_draws`` steps."""
        return self.num_burnin_steps + (self.num_draws - 1) * self.num_steps_bw_draws + 1

    @property
    def num_total_chains(self) -> int:
        return len(self.runs) * self.num_chains

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.seed if isinstance(self.seed, tuple) else (self.seed,)

    def mine(self) -> Sequence[int]:
        """The global chains this call runs."""
        return range(self.num_total_chains) if self.chains is None else self.chains

    def key(self, c: int, stream: int = 0) -> int:
        """Chain ``c``'s (index within its run) noise (stream 0) or data (stream 1) key."""
        seeds = self.seeds
        return chain_seed(seeds[c] if len(seeds) > 1 else seeds[0], c, stream=stream)

    def is_draw(self, t: int) -> int:
        """The draw index recorded at step ``t``, or -1."""
        k = t - self.num_burnin_steps
        if k < 0 or k % self.num_steps_bw_draws:
            return -1
        return k // self.num_steps_bw_draws

    def run_of(self, g: int) -> RunSpec:
        return self.runs[g // self.num_chains]


def _as_int(v):
    """``v`` as a Python int when it is an integer (numpy's included, bool excluded), else ``v`` unchanged."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_):
        return int(v)
    return v


def _int_at_least(name: str, v, lo: int) -> int:
    v = _as_int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


#: devinterp 1.x's switches for its optimizers' own per-step diagnostics (the noise, the MALA terms, norms), which
#: the fused samplers do not record
DIAGNOSTIC_SWITCHES = (
    "save_noise",
    "save_mala_vars",
    "noise_norm",
    "grad_norm",
    "weight_norm",
    "distance",
    "metrics",
)


def _switch_on(v) -> bool:
    try:
        return bool(v)
    except (TypeError, ValueError, RuntimeError):  # e.g. an array of metric names: asks for something
        return True


def without_diagnostic_switches(optimizer_kwargs, where: str = "optimizer_kwargs"):
    """``optimizer_kwargs`` without devinterp 1.x's diagnostic switches (:data:`DIAGNOSTIC_SWITCHES`), the rule of
    :class:`~pypattern.sampling.SGLD`'s constructor: off (``False``, ``None``, ``metrics=[]``, which devinterp
    1.3.2's ``sample()`` writes into the caller's dict) they are dropped; on (``True``, a non-empty ``metrics``)
    ``NotImplementedError`` naming them. Anything but a mapping is returned unchanged (for the checks that follow
    to name)."""
    if not isinstance(optimizer_kwargs, Mapping):
        return optimizer_kwargs
    on = [k for k in DIAGNOSTIC_SWITCHES if k in optimizer_kwargs and _switch_on(optimizer_kwargs[k])]
    if on:
        raise NotImplementedError(
            f"{where} {', '.join(f'{k}={optimizer_kwargs[k]!r}' for k in on)}: devinterp's per-step optimizer "
            "metrics (the noise, MALA terms and norms) are not recorded; leave them off (False, or metrics=[] / "
            "None), and read losses and draws through callbacks"
        )
    return {k: v for k, v in optimizer_kwargs.items() if k not in DIAGNOSTIC_SWITCHES}


def init_loss_value(init_loss) -> float | None:
    """``init_loss`` as a float (``None`` stays ``None``): a finite real number, or one held by a one-element
    tensor or array (``evaluate(model, batch)[0].detach()``, as devinterp accepts); anything else is a
    ``ValueError`` naming ``init_loss``."""
    if init_loss is None:
        return None
    v = init_loss
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex() or v.device.type == "meta":
            raise ValueError(
                "init_loss must be a finite number or None (a one-element real tensor is read as its number), got "
                f"a {v.dtype} tensor of shape {tuple(v.shape)}" + (" on the meta device" if v.is_meta else "")
            )
        v = v.detach().reshape(()).item()
    elif isinstance(v, np.ndarray):
        if v.size != 1 or v.dtype.kind not in "iuf":
            raise ValueError(
                "init_loss must be a finite number or None (a one-element real array is read as its number), got "
                f"a {v.dtype} array of shape {v.shape}"
            )
        v = v.reshape(()).item()
    if not (isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)) or not math.isfinite(v):
        raise ValueError(f"init_loss must be a finite number or None, got {init_loss!r}")
    return float(v)


def check_model(model) -> None:
    """Refuse a ``model`` the samplers cannot move, naming it: not a ``torch.nn.Module``, or with parameters on the
    meta device (shapes without values)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module at the weights to sample around, got {type(model).__name__}"
            + (" (a function: wrap it in an nn.Module whose parameters it reads)" if callable(model) else "")
        )
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in items:
            if nn.parameter.is_lazy(t):
                raise ValueError(
                    f"model {kind} {n!r} is not initialized yet (a lazy module, such as nn.LazyLinear, makes its "
                    "weights at its first forward): run the model once on a batch, then sample"
                )
    refuse_meta_model(model, needs="the sampler reads and moves their values")


def check_loader(loader, argument: str = "loader") -> None:
    """Refuse a ``loader`` (passed as ``argument``) that is not an iterable of batches, or has no batch, naming
    it."""
    if isinstance(loader, torch.Tensor):
        raise TypeError(
            f"{argument} is a tensor of shape {tuple(loader.shape)}: give an iterable of batches, e.g. [tokens] for "
            "one batch, or a DataLoader (iterating a tensor would make each of its rows a batch)"
        )
    if isinstance(loader, str | bytes) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{argument} must be an iterable of batches (a DataLoader, or a list of batches such as [(x, y)]), got "
            f"{type(loader).__name__}"
        )
    if isinstance(loader, Iterator) and iter(loader) is loader:
        # iter(loader) is loader: no new pass. L_n(w*) and every chain's epochs each start one; a finite iterator
        # has none left, an endless one would hand each reader the batches the last one left (chains sharing one
        # stream: not keyed by their seeds, batched and sequential runs differing, a resume not the same run)
        raise ValueError(
            f"{argument} is a one-shot iterator ({type(loader).__name__}: iter({argument}) returns it, not a new "
            f"pass over the data): L_n(w*) and every chain each read the data from its start, and after one reading "
            f"such a {argument} yielded no batch (a generator is read only once) or, if endless, would hand each "
            "reader the batches the last one left, so that the chains would share one stream (not keyed by the "
            "seed, not reproducible, not resumable); give a re-iterable loader: a list of batches (e.g. "
            "list(itertools.islice(generator, n))), a DataLoader (an IterableDataset for streamed data), or an "
            "object whose __iter__ starts a new pass"
        )
    try:
        n = len(loader)
    except TypeError:
        return
    if n == 0:
        hint = ""
        if isinstance(loader, torch.utils.data.DataLoader) and loader.drop_last and loader.batch_size:
            try:
                rows = len(loader.dataset)
            except TypeError:
                rows = None
            if rows:
                hint = (
                    f" (a DataLoader with drop_last=True over {rows} rows, fewer than its batch_size="
                    f"{loader.batch_size}: its only batch is dropped; give drop_last=False or a smaller batch_size)"
                )
        raise ValueError(f"{argument} yielded no batch (it has length 0){hint}: give at least one batch")


def _component_hint(model, patterns: list[str]) -> str:
    """A pointer to ``masks=`` for restrict_to patterns that are component names of ``model`` (a head, an MLP)."""
    from ..models.transformer import component_masks

    params = dict(model.named_parameters())
    for pat in patterns:
        try:
            masks = component_masks(model, pat)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError):
            continue
        if not any(n in params and params[n].requires_grad for n in masks):
            continue  # a name of frozen parameters only (component_masks reads a parameter-name prefix too)
        return (
            f"; {pat!r} is a component name, not a parameter-name pattern: pass "
            f"masks=pypattern.component_masks(model, {pat!r}) to move that component"
        )
    return ""


#: the keyword arguments the sampler hands a callback (those it declares; all of them to one taking ``**kwargs``):
#: ``optimizer`` only to chains run one after another
CALLBACK_ARGUMENTS = (
    "chain",
    "run",
    "draw",
    "step",
    "loss",
    "init_loss",
    "model",
    "batch",
    "observables",
    "outputs",
    "optimizer",
)


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or an extension's callable: not inspectable, not checked
        return None


def _named(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def check_callables(loss_fn, observables, callbacks, batched, loss_name: str = "loss_fn") -> bool:
    """Refuse, before anything runs, a loss function or an observable that cannot be called as ``fn(model,
    batch)`` and a callback requiring an argument the sampler does not pass (naming the argument given in:
    ``loss_name``, ``observable '<name>'``, ``callbacks[i]``); a callback that requires ``optimizer``, which only
    chains run one after another get, with ``batched=True`` (ValueError). Returns whether a callback requires
    ``optimizer`` (then ``batched=None`` runs the chains one after another). Callables without an inspectable
    signature, and arguments of other kinds, are left to the checks that follow."""
    fns = [] if loss_fn is None or not callable(loss_fn) else [(loss_name, loss_fn)]
    if observables is not None and (isinstance(observables, Mapping) or isinstance(observables, Sequence)):
        fns += [(f"observable {n!r}", fn) for n, fn in observable_items(observables)]
    for what, fn in fns:
        sig = _signature(fn)
        if sig is None:
            continue
        try:
            sig.bind(None, None)
        except TypeError as e:
            raise TypeError(
                f"{what}={_named(fn)}{sig} cannot be called as {what.split()[0]}(model, batch) ({e}): the sampler "
                "calls it with the model and one batch; give a function of those two arguments"
            ) from None
    needs_optimizer = False
    if not isinstance(callbacks, Sequence) or isinstance(callbacks, str | bytes):
        return needs_optimizer  # refused by check_settings
    for i, cb in enumerate(callbacks):
        sig = _signature(cb) if callable(cb) else None
        if sig is None:
            continue
        params = list(sig.parameters.values())
        positional = [p.name for p in params if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
        if positional:
            raise TypeError(
                f"callbacks[{i}]={_named(cb)}{sig} has positional-only arguments {positional}: the sampler calls "
                f"callbacks by keyword, with those they declare among {', '.join(CALLBACK_ARGUMENTS)}"
            )
        required = [
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
        ]
        unknown = [n for n in required if n not in CALLBACK_ARGUMENTS]
        if unknown:
            raise TypeError(
                f"callbacks[{i}]={_named(cb)}{sig} requires {', '.join(map(repr, unknown))}, which the sampler "
                f"does not pass: it calls a callback with those of {', '.join(CALLBACK_ARGUMENTS)} it declares "
                "(optimizer only to chains run one after another); give the others defaults"
            )
        if "optimizer" in required:
            if batched is True:
                raise ValueError(
                    f"callbacks[{i}]={_named(cb)}{sig} requires optimizer, which only chains run one after another "
                    "get, but batched=True: give batched=False or None, or optimizer a default"
                )
            needs_optimizer = True
    return needs_optimizer


def check_seed(seed, num_chains: int | None = None) -> int | list[int]:
    """``seed`` as :func:`pypattern.sample` reads it: one int in ``[0, 2**63)`` (a Python or numpy integer, a 0-d
    integer array) or one per chain (a sequence or 1-D integer array of ``num_chains`` of them, when given); a
    tensor, float, bool or string is refused (ValueError naming ``seed``). Returns a Python int or a list of
    them."""
    if isinstance(seed, np.ndarray) and seed.ndim <= 1 and seed.dtype.kind in "iu":
        seed = seed.tolist()  # per-chain seeds as an integer array, or one seed as a 0-d one
    seed = _as_int(seed)
    seeds = [_as_int(v) for v in seed] if isinstance(seed, Sequence) and not isinstance(seed, str) else [seed]
    bad = any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63 for v in seeds)
    if bad or (not seeds and num_chains is None):
        raise ValueError(
            f"seed must be an int in [0, 2**63), or a list (or 1-D integer array) of one per chain, got {seed!r}"
        )
    if not isinstance(seed, int) and num_chains is not None and len(seeds) != num_chains:
        raise ValueError(f"seed has {len(seeds)} entries but num_chains={num_chains}: give one per chain")
    return seed if isinstance(seed, int) else seeds


def check_settings(
    loader: Iterable,
    *,
    loss_fn: Callable,
    callbacks: Sequence[Callable],
    quiet,
    warn_nonstationary,
    record_observables,
    batched,
    num_chains,
    num_draws,
    num_burnin_steps,
    num_steps_bw_draws,
    checkpoint_every,
    cores,
    grad_accum_steps,
    num_init_loss_batches,
    init_loss,
    seed,
    hyperparameters: Mapping[str, Any],
    optimizer_kwargs: Mapping[str, Any] | None,
    sampler=None,
    sampling_method=None,
) -> dict[str, Any]:
    """The settings of :func:`pypattern.sample` that do not depend on the model checked and resolved (the loss
    function and callbacks callable, flags, counts, seed, sampler and hyperparameters; ``loader`` read for the
    default ``nbeta`` only): a dict of the resolved values by name (``hyper`` and ``own``: the SGLD and the
    sampler's own hyperparameters, ``sampler``: its name, ``seeds``: one per chain or the one seed). Errors name
    the argument, the value and what would be valid."""
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn={loss_fn!r} is not callable; give a function (model, batch) -> loss, or None"
        )
    if isinstance(loss_fn, nn.Module) and type(loss_fn).__module__ == "torch.nn.modules.loss":
        raise TypeError(
            f"loss_fn={loss_fn!r} is a torch loss module, called as loss_fn(outputs, targets); loss_fn is called "
            "as loss_fn(model, batch) and must return the batch's mean loss (a real tensor of one element): wrap "
            f"it, e.g. loss_fn=lambda model, batch: {type(loss_fn).__name__}()(model(batch[0]), batch[1]), or "
            "give None for the library's loss"
        )
    # a 0-d tensor is its number (step_size=torch.tensor(1e-3)), here and in the fingerprint
    hyperparameters = {k: scalar_value(v) for k, v in hyperparameters.items()}
    if isinstance(optimizer_kwargs, Mapping):
        optimizer_kwargs = {k: scalar_value(v) for k, v in optimizer_kwargs.items()}
    optimizer_kwargs = without_diagnostic_switches(optimizer_kwargs)  # devinterp's switches off: no-ops
    if callable(callbacks) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks={callbacks!r} is not valid; give a list of functions")
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if not callable(cb):
            raise TypeError(f"callbacks[{i}]={cb!r} is not callable")
    flags = dict(quiet=quiet, warn_nonstationary=warn_nonstationary, record_observables=record_observables)
    flags["batched"] = batched if batched is not None else False
    for name, v in flags.items():
        if not isinstance(v, bool | np.bool_):
            raise TypeError(
                f"{name}={v!r} is not valid; give True or False"
                + (" (or None: decide)" if name == "batched" else "")
            )
    quiet, warn_nonstationary, record_observables = (
        bool(quiet),
        bool(warn_nonstationary),
        bool(record_observables),
    )
    batched = None if batched is None else bool(batched)
    # numpy integers and floats are numbers: converted here, so a run fingerprints the same either way
    C = _int_at_least("num_chains", num_chains, 1)
    D = _int_at_least("num_draws", num_draws, 1)
    num_burnin_steps = _int_at_least("num_burnin_steps", num_burnin_steps, 0)
    num_steps_bw_draws = _int_at_least("num_steps_bw_draws", num_steps_bw_draws, 1)
    checkpoint_every = _int_at_least("checkpoint_every", checkpoint_every, 1)
    cores = _int_at_least("cores", cores, 1)
    grad_accum_steps = _int_at_least("grad_accum_steps", grad_accum_steps, 1)
    if num_init_loss_batches is not None:
        num_init_loss_batches = _int_at_least("num_init_loss_batches", num_init_loss_batches, 1)
    init_loss = init_loss_value(init_loss)
    seed = check_seed(seed, C)
    seeds = [seed] if isinstance(seed, int) else [int(v) for v in seed]
    name = sampler_name(sampler, sampling_method)
    hyper = resolve_hyperparameters(
        hyperparameters, optimizer_kwargs, loader=loader, grad_accum_steps=grad_accum_steps, sampler=name
    )
    own = sampler_hyperparameters(
        name, translate(dict(optimizer_kwargs or {}), where="optimizer_kwargs", drop_none=False)
    )
    return dict(
        callbacks=callbacks,
        quiet=quiet,
        warn_nonstationary=warn_nonstationary,
        record_observables=record_observables,
        batched=batched,
        num_chains=C,
        num_draws=D,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        checkpoint_every=checkpoint_every,
        cores=cores,
        grad_accum_steps=grad_accum_steps,
        num_init_loss_batches=num_init_loss_batches,
        init_loss=init_loss,
        seed=seed,
        seeds=seeds,
        sampler=name,
        hyper=hyper,
        own=own,
    )


def make_plan(
    model: nn.Module,
    loader: Iterable,
    *,
    loss_fn: Callable,
    num_chains: int,
    num_draws: int,
    num_burnin_steps: int,
    num_steps_bw_draws: int,
    hyperparameters: Mapping[str, Any],
    optimizer_kwargs: Mapping[str, Any] | None,
    restrict_to,
    masks,
    runs,
    observables,
    callbacks: Sequence[Callable],
    seed,
    init_loss: float | None,
    num_init_loss_batches: int | None,
    batched: bool | None,
    checkpoint,
    checkpoint_every: int,
    quiet: bool,
    backend: str | None,
    warn_nonstationary: bool,
    record_observables: bool,
    cores: int,
    grad_accum_steps: int,
    chains: Sequence[int] | None,
    checkpoint_state: Callable | None,
    sampler=None,
    sampling_method=None,
) -> RunPlan:
    """Check the arguments of :func:`pypattern.sample` and resolve them into a :class:`RunPlan`; errors name the
    argument, the value and what would be valid."""
    v = check_settings(
        loader,
        loss_fn=loss_fn,
        callbacks=callbacks,
        quiet=quiet,
        warn_nonstationary=warn_nonstationary,
        record_observables=record_observables,
        batched=batched,
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        checkpoint_every=checkpoint_every,
        cores=cores,
        grad_accum_steps=grad_accum_steps,
        num_init_loss_batches=num_init_loss_batches,
        init_loss=init_loss,
        seed=seed,
        hyperparameters=hyperparameters,
        optimizer_kwargs=optimizer_kwargs,
        sampler=sampler,
        sampling_method=sampling_method,
    )
    callbacks, quiet, warn_nonstationary = v["callbacks"], v["quiet"], v["warn_nonstationary"]
    record_observables, batched = v["record_observables"], v["batched"]
    C, D = v["num_chains"], v["num_draws"]
    num_burnin_steps, num_steps_bw_draws = v["num_burnin_steps"], v["num_steps_bw_draws"]
    checkpoint_every, cores, grad_accum_steps = v["checkpoint_every"], v["cores"], v["grad_accum_steps"]
    num_init_loss_batches, init_loss = v["num_init_loss_batches"], v["init_loss"]
    seed, seeds, name, hyper, own = v["seed"], v["seeds"], v["sampler"], v["hyper"], v["own"]

    named = [n for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "model has no parameter with requires_grad=True: "
            + (
                f"its {sum(1 for _ in model.parameters())} parameters are all frozen; unfreeze the ones to sample "
                "with requires_grad_(True) (the others stay at w*)"
                if any(True for _ in model.parameters())
                else "it has no parameters at all, and sampling moves a model's parameters"
            )
        )
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]

    def frozen_note(names) -> str:
        """A sentence naming the frozen parameters among ``names`` (empty when none is)."""
        hit = sorted(n for n in names if n in frozen)
        if not hit:
            return ""
        return (
            f" ({hit} {'is' if len(hit) == 1 else 'are'} frozen, requires_grad=False: sampling moves only "
            "parameters that require grad; unfreeze them with requires_grad_(True) or leave them out)"
        )

    # a Parameter used under several names (tied weights): named_parameters() names it once, by its first name
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.update({n: first_name[id(p)]} if id(p) in first_name else {})
        first_name.setdefault(id(p), n)

    def alias_note(names=(), patterns=()) -> str:
        """A sentence naming the tied parameters' other names among ``names`` or matched by ``patterns``."""
        hit = sorted(a for a in aliases if a in names or (patterns and matches(a, patterns)))
        if not hit:
            return ""
        said = ", ".join(f"{a!r} is {aliases[a]!r}" for a in hit)
        return (
            f" ({said}: one Parameter used under two names, tied; name it by its first name, which moves it "
            "wherever it is used)"
        )

    if runs is None:
        specs = [(restrict_to, masks)]
    else:
        if restrict_to is not None or masks is not None:
            raise ValueError("give restrict_to and masks inside runs, not next to it")
        specs = list(runs)
        if not specs:
            raise ValueError("runs is empty: give at least one (restrict_to, masks) pair")
    shapes = dict(model.named_parameters())
    run_specs = []
    for r, spec in enumerate(specs):
        if not (isinstance(spec, tuple | list) and len(spec) == 2):
            raise TypeError(f"runs[{r}] must be a (restrict_to, masks) pair, got {spec!r}")
        r_restrict, r_masks = spec
        where = f"runs[{r}]: " if runs is not None else ""
        if r_restrict is not None and not isinstance(r_restrict, str | re.Pattern):
            if not isinstance(r_restrict, Iterable) or not all(
                isinstance(x, str | re.Pattern) for x in r_restrict
            ):
                raise TypeError(
                    f"{where}restrict_to={r_restrict!r} is not valid; give a parameter-name pattern (a str: a glob "
                    "or a module name; or a compiled regex, re.Pattern), a list of them, or None"
                )
        patterns = [r_restrict] if isinstance(r_restrict, str | re.Pattern) else list(r_restrict or [])
        if r_restrict is not None and not patterns:
            raise ValueError(
                f"{where}restrict_to is empty: give None to sample every parameter, or the patterns of those to "
                "sample"
            )
        if r_masks is not None and not isinstance(r_masks, Mapping):
            raise TypeError(
                f"{where}masks must be a dict of parameter name -> 0/1 mask tensor, got {type(r_masks).__name__}"
            )
        r_masks = dict(r_masks or {})
        moving = [n for n in named if not patterns or matches(n, patterns)]
        if not patterns and r_masks:
            # masks without restrict_to: the masked parameters move (devinterp's optimize_over_per_model_param
            # optimises only the parameters it names); every other parameter stays at w*
            unknown = [n for n in r_masks if n not in named]
            if unknown:
                what = "moving parameters" if frozen_note(unknown) else "parameters"
                raise ValueError(
                    f"{where}masks has names that are not {what}: {sorted(unknown)}{frozen_note(unknown)}"
                    f"{alias_note(unknown)}; names are {named}"
                )
            moving = [n for n in named if n in r_masks]
        if not moving:
            hit = [n for n in frozen if patterns and matches(n, patterns)]
            raise ValueError(
                f"{where}restrict_to={r_restrict!r} matches no parameter{frozen_note(hit)}"
                f"{alias_note(patterns=patterns)}{_component_hint(model, patterns)}; names are {named}"
            )
        # a mistyped pattern among others: the run would cover less than asked (a pattern that names frozen
        # parameters only is not one: they stay at w*, as every frozen parameter does)
        unmatched = [p for p in patterns if not any(matches(n, [p]) for n in (*named, *frozen))]
        if unmatched:
            raise ValueError(
                f"{where}restrict_to: {unmatched} match{'' if len(unmatched) > 1 else 'es'} no parameter "
                f"(restrict_to={r_restrict!r}){alias_note(patterns=unmatched)}{_component_hint(model, unmatched)}; "
                f"names are {named}"
            )
        unknown = set(r_masks) - set(moving)
        if unknown:
            raise ValueError(
                f"{where}masks has names that are not (moving) parameters: {sorted(unknown)}{frozen_note(unknown)}"
                f"{alias_note(unknown)}"
            )
        for n, m in r_masks.items():
            if m is None:
                from .._masks import NONE_MASK

                raise TypeError(f"{where}masks[{n!r}] must be a tensor; {NONE_MASK}")
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{where}masks[{n!r}] must be a tensor, got {type(m).__name__}")
            if tuple(m.shape) != tuple(shapes[n].shape):
                raise ValueError(
                    f"{where}masks[{n!r}] has shape {tuple(m.shape)}; the parameter's is {tuple(shapes[n].shape)}"
                )
            if not (m.dtype == torch.bool or m.is_floating_point()):
                raise TypeError(f"{where}masks[{n!r}] has dtype {m.dtype}; give a bool or float (0/1) mask")
            if m.is_floating_point() and not bool(torch.isfinite(m).all()):
                raise ValueError(f"{where}masks[{n!r}] has NaN or Inf entries: give 0/1 values")
            if m.is_floating_point() and not bool(((m == 0) | (m == 1)).all()):
                bad = m[(m != 0) & (m != 1)].flatten()[:3].tolist()
                raise ValueError(
                    f"{where}masks[{n!r}] has values other than 0 and 1 ({bad}): a mask says which entries move "
                    "(1) and which stay (0); a fractional value would scale that entry's drift and noise, "
                    "sampling it at another temperature"
                )
        if r_masks and all(n in r_masks and not bool(r_masks[n].any()) for n in moving):
            raise ValueError(
                f"{where}masks are zero everywhere on the moving parameters {moving}: nothing would move"
            )
        # on their parameters' devices (a CPU mask for a model on a GPU): every chain loop, batched or not, and
        # every sampler reads them there (.to() returns a mask already there itself)
        r_masks = {n: m.to(shapes[n].device) for n, m in r_masks.items()}
        run_specs.append(RunSpec(tuple(patterns), tuple(moving), r_masks or None))
    in_some_run = set().union(*(s.moving for s in run_specs))
    G = len(run_specs) * C
    if chains is not None:
        given = chain_indices(chains, G)
        repeated = sorted({g for g in given if given.count(g) > 1})
        if repeated:
            raise ValueError(
                f"chains has repeated indices {repeated}: give each chain once, got {list(chains)}"
            )
        chains = tuple(sorted(given))
        if any(not 0 <= g < G for g in chains):
            raise ValueError(f"chains must be indices in [0, {G}), got {list(chains)}")
    return RunPlan(
        num_chains=C,
        num_draws=D,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        grad_accum_steps=grad_accum_steps,
        seed=seed if isinstance(seed, int) else tuple(seeds),
        hyper=hyper,
        runs=tuple(run_specs),
        several_runs=runs is not None,
        union=tuple(n for n in named if n in in_some_run),
        chains=chains,
        loss_fn=loss_fn,
        observables=observable_items(observables),
        callbacks=tuple(callbacks),
        record_observables=record_observables,
        init_loss=None if init_loss is None else float(init_loss),
        num_init_loss_batches=num_init_loss_batches,
        batched=batched,
        cores=cores,
        backend=backend,
        checkpoint=None if checkpoint is None else os.fspath(checkpoint),
        checkpoint_every=checkpoint_every,
        checkpoint_state=checkpoint_state,
        quiet=quiet,
        warn_nonstationary=warn_nonstationary,
        sampler=name,
        sampler_hyper=own,
    )


def chain_indices(chains, num_total: int | None = None) -> list[int]:
    """``chains`` as a list of ints; refused, naming it: not a sequence of integers, or empty outside a
    ``torch.distributed`` process group (where a rank's share of the chains may be none: its rows stay NaN and the
    ranks' results are combined), since a call that runs no chain returns only NaN draws. ``num_total``: the
    number of chains, for the messages (the range is checked by :func:`make_plan`)."""
    valid = "in [0, num_chains)" if num_total is None else f"in [0, {num_total})"
    if isinstance(chains, str | bytes) or not isinstance(chains, Iterable):
        raise TypeError(
            f"chains={chains!r} is not valid; give a list of chain indices {valid}, or None for all"
        )
    given = list(chains)
    bad = [g for g in given if isinstance(g, bool | np.bool_) or not isinstance(g, numbers.Integral)]
    if bad:
        raise TypeError(f"chains must hold int chain indices {valid}, got {given!r}")
    if not given and not _in_process_group():
        raise ValueError(
            f"chains is empty: no chain would run and every draw would be NaN; give the indices of the chains to "
            f"run, {valid}, or None to run all of them"
        )
    return [int(g) for g in given]


def _in_process_group() -> bool:
    """Whether a ``torch.distributed`` process group is initialized (chains spread over ranks)."""
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def check_checkpoint_file(checkpoint) -> None:
    """Refuse, before any work, a ``checkpoint`` that cannot be a file: not a path, a folder, a path ending in a
    separator, or a file under something that is not a folder."""
    try:
        path = os.fspath(checkpoint)
    except TypeError:
        raise TypeError(
            f"checkpoint must be a file path (str or os.PathLike), got {type(checkpoint).__name__}"
        ) from None
    if not isinstance(path, str) or not path:
        raise ValueError(f"checkpoint={checkpoint!r} is not valid; give a file path such as 'run.npz'")
    if os.path.isdir(path) or path.endswith((os.sep, "/")):
        raise ValueError(
            f"checkpoint={path!r} is a folder; give a file path such as {os.path.join(path, 'run.npz')!r}"
        )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest existing ancestor (the root always exists)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"checkpoint={path!r} lies under {parent!r}, which is a file, not a folder")
