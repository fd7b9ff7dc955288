"""The batched chain loop: all chains of a group together, their parameters stacked along a chain axis, one
``torch.func.vmap``-ed forward and one backward per step, and one fused step per chain (SGLD, SGNHT or
RMSprop-SGLD, on the chain's rows of the stacked weights and sampler state) with the noise keys of the sequential
loop (the same draws up to float rounding)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..losses import _describe, as_pytree, check_batch_values, map_batch, stacked_batches_checked
from ..ops.sgld import FLAG_GRAD_NONFINITE
from .context import (
    THERMOSTAT_OVERFLOW,
    LossContractError,
    RunContext,
    stacked_squared_distance,
    step_failure,
)
from .data import ChainData, to_device
from .samplers import StackedSamplerState, or_flags
from .sequential import extra_outputs, join_outputs

__all__ = ["UnstackableBatches", "VmapUnsupported", "run_batched"]


class VmapUnsupported(Exception):
    """The model or loss function does not run under ``torch.func.vmap`` (found at the first step)."""


class UnstackableBatches(Exception):
    """The chains' batches of one step cannot be stacked along a chain axis (tensors of different shapes, e.g. a
    collate that pads each batch to its own longest sequence; other keys; a leaf that is not a tensor).

    Attributes
    ----------
    step : int
        The step whose batches differ.
    resume : dict of int to (int, dict of str to Tensor, dict or None)
        Per chain, where the chains one after another take over: the step to resume at, the chain's moving weights
        and its sampler's state there (empty at the run's first step, where nothing has moved)."""

    def __init__(self, message: str, step: int, resume: dict):
        super().__init__(message)
        self.step, self.resume = step, resume


class _Apply(nn.Module):
    """``fn(module, *args)`` as a forward, so that :func:`torch.func.functional_call` runs a whole loss function or
    observable with ``module``'s tensors replaced: calls, submodules, ``parameters()`` and ``state_dict()`` all see
    the chain's weights (a loss with a weight penalty, an observable of a weight norm)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module

    def forward(self, fn: Callable, *args):
        return fn(self.m, *args)


def _aliases(module: nn.Module) -> dict[str, list[str]]:
    """For each name of ``module.named_parameters()`` / ``named_buffers()`` (which a model may override, as a
    TransformerLens bridge does with its wrapped model's names), the other paths of the module tree that hold the
    same tensor (a tied weight's other uses), as :func:`torch.func.functional_call` must be given them: it ties
    only the names it finds by walking the tree."""
    paths: dict[int, list[str]] = {}
    for walk in (nn.Module.named_parameters, nn.Module.named_buffers):
        for path, t in walk(module, remove_duplicate=False):
            paths.setdefault(id(t), []).append(path)
    out: dict[str, list[str]] = {}
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        others = [q for q in paths.get(id(t), ()) if q != name]
        if others and name not in paths.get(id(t), ()):  # a name the tree walk does not give
            out[name] = others
    return out


def _applier(module: nn.Module, fixed: dict[str, torch.Tensor]) -> Callable:
    """``apply(fn, p, *args)``: ``fn(module, *args)`` with ``module``'s tensors ``{**p, **fixed}`` (under every
    path that holds them, :func:`_aliases`)."""
    wrapper = _Apply(module)
    aliases = _aliases(module)

    def apply(fn: Callable, p: dict[str, torch.Tensor], *args):
        tensors = {}
        for k, v in {**p, **fixed}.items():
            tensors[f"m.{k}"] = v
            for a in aliases.get(k, ()):
                tensors[f"m.{a}"] = v
        return torch.func.functional_call(wrapper, tensors, (fn, *args), strict=False, tie_weights=True)

    return apply


def _split_vloss(out) -> tuple[torch.Tensor, tuple]:
    """(losses, other outputs) from the vmap-ed loss: a tensor, or a tuple with the losses first."""
    losses, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())  # extras come detached
    if losses.dim() > 1 and losses[0].numel() == 1:  # one number per chain given as (1,) or (1, 1)
        losses = losses.reshape(losses.shape[0])
    return losses, extra


def _layout(batch) -> str:
    """A batch's tree (a mapping of any kind walked, its class named) with its tensors' shapes and dtypes and its
    other leaves by value."""
    tree = map_batch(
        lambda x: (
            (tuple(x.shape), str(x.dtype))
            if isinstance(x, torch.Tensor)
            else (type(x).__name__, repr(x)[:100])
        ),
        batch,
    )
    return f"{type(batch).__name__}: {tree!r}"


def _structure(batch, shared: bool, n: int) -> tuple:
    """What decides the code path a function of a draw's batch takes under vmap: the number of chains, whether
    the batch is shared, and the batch's tree with its tensors' shapes and dtypes (its other leaves by value).
    Under vmap the weights and a stacked batch's values cannot steer Python code (data-dependent control flow
    is vmap's error whatever the values), so whether a call runs under vmap depends on this only."""
    return n, shared, _layout(batch)


def _stacked(batches: list) -> object:
    """The chains' batches of a step stacked along a new first axis (the batch's tree kept, a
    ``transformers.BatchEncoding`` or other mapping included); a ``ValueError`` describing the first two batches
    that differ when they cannot be: tensors of different shapes, other keys, a leaf that is not a tensor."""

    def stack(*xs):
        if not all(isinstance(x, torch.Tensor) for x in xs):
            raise ValueError(f"a leaf of type {type(xs[0]).__name__} is not a tensor")
        if len({x.shape for x in xs}) > 1:
            raise ValueError("tensors of different shapes")
        return torch.stack(xs)

    try:
        return map_batch(stack, *batches)
    except ValueError as e:
        first = _layout(batches[0])
        i = next((i for i in range(1, len(batches)) if _layout(batches[i]) != first), 1)
        raise ValueError(
            f"{e}: one chain read {_describe(batches[0])}, another {_describe(batches[min(i, len(batches) - 1)])}"
        ) from None


def _batched_observables(
    ctx: RunContext, apply: Callable, stacked: dict, vb, shared_data: bool, n: int
) -> dict[str, torch.Tensor]:
    """The observables of all ``n`` chains in one ``vmap``-ed call each. An observable whose call raises is left
    out: the draw evaluates it chain by chain (:meth:`RunContext.at_draw`), where an exception it raises without
    vmap too propagates as it is.

    A failure is remembered (in ``ctx.obs_per_chain``) for the draw's batch :func:`_structure` only, which is
    what decides it: each draw's values are computed the same way (vmap-ed, or chain by chain) whatever the draws
    before it, so a run resumed from a checkpoint, or run on other ``cores``, records what an uninterrupted run
    does (vmap-ed and chain-by-chain values may differ by float rounding)."""
    out = {}
    params = {k: v.detach() for k, v in stacked.items()}
    structure = _structure(vb, shared_data, n) if ctx.plan.observables else None
    # vmap walks dicts, not other mappings: the observables get the batch's own kind
    tree, rebuild = as_pytree(vb)
    for name, fn in ctx.plan.observables:
        if (name, structure) in ctx.obs_per_chain:
            continue

        def one(p, b, fn=fn):
            v = apply(fn, p, b)
            return v if isinstance(v, torch.Tensor) else torch.as_tensor(v)

        try:
            with torch.no_grad():
                v = torch.func.vmap(
                    one if tree is vb else lambda p, b, one=one: one(p, rebuild(b)),
                    in_dims=(0, None if shared_data else 0),
                )(params, tree)
            if v.dim() == 0 or v.shape[0] != n:
                raise ValueError(f"vmap returned shape {tuple(v.shape)}")
        except Exception:  # noqa: BLE001 - vmap's limit, or the observable's own error, which chain by chain raises
            ctx.obs_per_chain.add((name, structure))
            continue
        out[name] = v
    return out


def _chains_as_rows(vb: Mapping) -> dict:
    """A stacked mapping batch, ``(chains, batch, pos)`` tensors, as one batch of ``chains * batch`` rows (one
    sequence per chain, ``(chains, pos)``, is one already), for checks that read each row alone."""
    return {k: v.flatten(0, 1) if isinstance(v, torch.Tensor) and v.dim() >= 3 else v for k, v in vb.items()}


def _checkpointed(model: nn.Module | None) -> bool:
    """Whether ``model`` has Hugging Face's gradient checkpointing on (a layer with ``gradient_checkpointing``
    set: its forward runs through ``torch.utils.checkpoint``, which does not run under vmap)."""
    if model is None:
        return False
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _first_step_failure(
    error: Exception,
    vmapped: Callable[[], object],
    one_chain: Callable[[int], object],
    n: int,
    model: nn.Module | None = None,
) -> VmapUnsupported:
    """What the ``vmap``-ed loss's ``error`` at a run's first step means. The loss is called without vmap for
    each of the ``n`` chains on its weights and batch (``one_chain(i)``): an exception there is the loss
    function's own, raised as it is (as the chains run one after another raise it). When every chain runs
    without vmap, the vmap-ed call is made once more (``vmapped()``): a second failure is vmap's (the
    :class:`VmapUnsupported` returned), a success means the loss function raised ``error`` itself, once, and it
    is raised."""
    for i in range(n):
        try:
            one_chain(i)
        except Exception as e:  # noqa: BLE001 - the loss function's own error, raised as it is
            raise e from None
    try:
        vmapped()
    except Exception:  # noqa: BLE001 - fails under vmap only, every time: vmap's limit
        hint = (
            " (the model has gradient checkpointing on: its layers run through torch.utils.checkpoint, which "
            "does not run under vmap; model.gradient_checkpointing_disable() lets the chains run batched)"
            if _checkpointed(model)
            else ""
        )
        return VmapUnsupported(f"{type(error).__name__}: {str(error).rstrip('.')}{hint}")
    raise error


def run_batched(ctx: RunContext, chains: Sequence[int]) -> None:
    """Run the global chains ``chains`` (all at the same step) together; their draws go into ``ctx.state``.

    Raises :class:`VmapUnsupported` at the first step when the model or loss function does not run under vmap
    (nothing is recorded then); an exception the loss function raises there without vmap too is raised as it is
    (:func:`_first_step_failure`). Raises :class:`UnstackableBatches` at the first step whose batches cannot be
    stacked, holding where each chain is (the draws before it are recorded)."""
    plan, st = ctx.plan, ctx.state
    accum, total = plan.grad_accum_steps, plan.total_steps
    chains = list(chains)
    C = len(chains)
    # functional_call swaps the module's tensors while it runs: every group (thread) needs its own module
    base = copy.deepcopy(ctx.model)
    union = plan.union
    frozen = {n: t for n, t in ctx.w_star.items() if n not in union}
    buffers = dict(base.named_buffers())
    stacked = {}
    for n in union:
        rows = [st.params.get(g, {}).get(n, ctx.w_star[n]) for g in chains]
        stacked[n] = torch.stack([r.detach() for r in rows]).contiguous()
    locs = [g % plan.num_chains for g in chains]
    seeds = [plan.key(c) for c in locs]
    start = int(st.next_step[chains[0]])
    datas = [ChainData(ctx.loader, plan.key(c, stream=1), ctx.data_cache) for c in locs]
    m = plan.noise_coupling  # > 1: step t reads the batches of step m t of the chain it is coupled to
    for dd in datas:
        dd.skip(start * accum * m)
    shared_data = datas[0].single is not None
    loss_fn, split_loss = plan.loss_fn, ctx.split_loss
    from .runner import always_by_default_rule

    library = always_by_default_rule(loss_fn)  # the library's loss parses the batches
    # the library's loss under vmap: its value checks were made on the batches before stacking
    checked = stacked_batches_checked if library else contextlib.nullcontext

    apply = _applier(base, {**frozen, **buffers})
    view: dict = {}

    def chain_view(i: int) -> nn.Module:
        """A module holding chain ``i``'s weights now, for its observables and callbacks at a draw (one copy of
        the model per group, refilled per chain): a plain module, as the sequential loop gives."""
        if not view:
            view["m"] = copy.deepcopy(base)
            view["p"] = dict(view["m"].named_parameters())
        with torch.no_grad():
            for n, s in stacked.items():
                view["p"][n].copy_(s[i])
        return view["m"]

    want_outputs = any(keys is None or "outputs" in keys for _, keys in ctx.cb_keys)

    def chain_loss(p, batch):
        with checked():
            out = apply(loss_fn, p, batch)
        loss = split_loss(out)
        return (loss, *extra_outputs(out)) if want_outputs else loss

    def vloss(p, batch):
        # vmap walks dicts, not other mappings (a BatchEncoding): it gets dicts, the loss the batch's own kind
        tree, rebuild = as_pytree(batch)
        one = chain_loss if tree is batch else lambda p, b: chain_loss(p, rebuild(b))
        return torch.func.vmap(one, in_dims=(0, None if shared_data else 0))(p, tree)

    hyper = dict(plan.hyper)
    # per run: anchors and masks of its moving tensors; per chain: views of its rows of those tensors
    run_anchors = [[ctx.w_star[n] for n in r.moving] for r in plan.runs]
    run_masks = [None if not r.masks else [r.masks.get(n) for n in r.moving] for r in plan.runs]
    runs = [g // plan.num_chains for g in chains]
    index = {n: j for j, n in enumerate(union)}
    pick = [[index[n] for n in plan.runs[r].moving] for r in runs]
    views = [[stacked[union[j]][i] for j in pick[i]] for i in range(C)]
    # the sampler's state (SGNHT's momenta and thermostat, RMSprop-SGLD's running means), stacked like the weights
    sstate = StackedSamplerState(
        plan.sampler,
        stacked,
        [plan.runs[r].moving for r in runs],
        seeds,
        [st.sampler_state.get(g) for g in chains],
        hyper=hyper,
        own=plan.sampler_hyper,
        backend=plan.backend,
        noise_coupling=m,
    )
    shared_batch = to_device(datas[0].single, ctx.device) if shared_data else None
    groups: list[list[int]] = []  # [lo, hi, run]: consecutive chains of one run, stepped by one op call
    for i, r in enumerate(runs):
        if groups and groups[-1][2] == r:
            groups[-1][1] = i + 1
        else:
            groups.append([i, i + 1, r])
    for t in range(start, total):
        leaves = {n: s.detach().requires_grad_(True) for n, s in stacked.items()}
        grads, lvs, exs = None, [], []
        for j in range(accum):  # the weights do not change until the step
            if shared_data:
                bj, vbj = [shared_batch] * C, shared_batch
            else:
                bj = [to_device(dd.next(), ctx.device) for dd in datas]
                try:
                    vbj = _stacked(bj)
                except ValueError as e:
                    # the chains go on one after another from this step: their weights and sampler state now
                    # (none at the first step: nothing has moved, the state holds where they start)
                    resume = (
                        {}
                        if t == start
                        else {
                            g: (
                                t,
                                {n: stacked[n][i].detach().clone() for n in ctx.moving(g)},
                                sstate.state_of(i),
                            )
                            for i, g in enumerate(chains)
                        }
                    )
                    raise UnstackableBatches(
                        f"the chains' batches at step {t} cannot be stacked along a chain axis: {e}",
                        t,
                        resume,
                    ) from None
                if library and isinstance(vbj, Mapping) and "attention_mask" in vbj:
                    # the values the library's loss cannot read under vmap, of every chain's batch at once
                    check_batch_values(base, _chains_as_rows(vbj), "loader")
            if t == start and j == 0:  # the first step tells whether the model runs under vmap
                try:
                    losses, ex = _split_vloss(vloss(leaves, vbj))
                    if losses.shape != (C,):
                        raise VmapUnsupported(
                            f"the loss came out of shape {tuple(losses.shape[1:])} per chain, not one number"
                        )
                except (VmapUnsupported, LossContractError):
                    raise
                except Exception as e:  # noqa: BLE001 - vmap's limit (run sequentially) or the loss's own error
                    raise _first_step_failure(
                        e,
                        lambda leaves=leaves, vbj=vbj: vloss(leaves, vbj),
                        lambda i, leaves=leaves, bj=bj: apply(
                            loss_fn, {n: v[i] for n, v in leaves.items()}, bj[i]
                        ),
                        C,
                        base,
                    ) from e
            else:
                losses, ex = _split_vloss(vloss(leaves, vbj))
            if j == 0:
                batches, vb = bj, vbj
            if ctx.cb_keys:  # what the callbacks read of this micro-batch
                exs.append(ex)
            lvs.append(losses.detach().double().cpu().numpy())
            bad = np.flatnonzero(~np.isfinite(lvs[-1]))
            if bad.size:
                raise ctx.nonfinite_loss(chains[bad[0]], t, lvs[-1][bad[0]], bj[bad[0]])
            if losses.requires_grad:
                gj = torch.autograd.grad(
                    losses.sum() / accum if accum > 1 else losses.sum(),
                    list(leaves.values()),
                    allow_unused=True,
                )
            else:  # none of the runs' moving weights is read (or a contract error)
                ctx.unread_gradient(sorted(set(runs)), bj[0])
                gj = [None] * len(leaves)
            for r in set(runs):  # a run whose moving tensors all went without a gradient so far: read now?
                if r not in ctx.read_runs and any(gj[index[n]] is not None for n in plan.runs[r].moving):
                    with ctx.lock:
                        ctx.read_runs.add(r)
            ctx.stepped_runs.update(runs)
            # a parameter the loss does not read has gradient zero (as in the sequential chains)
            gj = [torch.zeros_like(v) if g is None else g for g, v in zip(gj, leaves.values())]
            grads = gj if grads is None else [a + b for a, b in zip(grads, gj)]
        if m > 1 and not shared_data:
            for dd in datas:
                for _ in range((m - 1) * accum):
                    dd.next()
        lv = lvs[0] if accum == 1 else np.mean(lvs, axis=0)
        for i, g in enumerate(chains):
            ctx.check_runaway(g, t, float(lv[i]))
        extra = join_outputs(exs, 1) if exs else ()  # (chain, ...): each chain's micro-batches joined
        d = plan.is_draw(t)
        after_update = []  # devinterp 1.x's callbacks: called once the step's update is taken, as devinterp does
        if d >= 0:
            if ctx.track_distance:
                st.dist[chains, d] = stacked_squared_distance(stacked, ctx.w_star)
            vobs = _batched_observables(ctx, apply, stacked, vb, shared_data, C) if plan.observables else {}
            for i, g in enumerate(chains):
                later = ctx.at_draw(
                    g,
                    d,
                    t,
                    float(lv[i]),
                    lambda i=i: chain_view(i),
                    batches[i],
                    {k: v[i] for k, v in vobs.items()},
                    tuple(x[i] if torch.is_tensor(x) else [y[i] for y in x] for x in extra),
                    defer=True,
                )
                if later is not None:
                    after_update.append(later)
        with torch.no_grad():
            flags = []
            if plan.sampler == "sgld" and t != start:
                # every chain of a run in one op call: the update each chain's own call gives
                for lo, hi, r in groups:
                    moving = plan.runs[r].moving
                    flags.append(
                        sstate.step_chains(
                            lo,
                            hi,
                            [stacked[n][lo:hi] for n in moving],
                            [grads[index[n]][lo:hi] for n in moving],
                            run_anchors[r],
                            masks=run_masks[r],
                            step=t,
                        )
                    )
            else:
                per_tensor = [gr.unbind(0) for gr in grads]
                for i, g in enumerate(chains):
                    r = runs[i]
                    gi = [per_tensor[j][i] for j in pick[i]]
                    try:
                        # validated once, at the first step; then unchecked: one flag per tensor, looked at once
                        # for all chains
                        f = sstate.step(
                            i,
                            views[i],
                            gi,
                            run_anchors[r],
                            masks=run_masks[r],
                            seed=seeds[i],
                            step=t,
                            validate=t == start,
                        )
                        if f is not None:
                            flags.append(or_flags(f))
                    except FloatingPointError as e:
                        raise ctx.diverged(g, t, step_failure(e)) from None
            th = sstate.thermostat
            if th is not None and t != start and not bool(torch.isfinite(th).all()):
                # the unchecked step leaves a thermostat whose update overflowed (finite squared momenta whose sum
                # exceeds float64) unflagged; the checked one raises on it: the same divergence at the same step
                i = int(torch.nonzero(~torch.isfinite(th.reshape(-1)))[0])
                raise ctx.diverged(chains[i], t, THERMOSTAT_OVERFLOW)
            if flags and bool((bits := torch.cat([f.reshape(-1) for f in flags])).any()):
                i = int(torch.nonzero(bits)[0])
                why = (
                    "a gradient is not finite"
                    if int(bits[i]) & FLAG_GRAD_NONFINITE
                    else "a finite gradient gave a non-finite update (the step size is too large)"
                )
                raise ctx.diverged(chains[i], t, why)
        for later in after_update:
            later()
        ctx.finish_step(
            chains,
            d,
            t,
            lambda g: {n: stacked[n][chains.index(g)].clone() for n in ctx.moving(g)},
            lambda g: sstate.state_of(chains.index(g)),
        )
    for n, s in stacked.items():
        finite = torch.isfinite(s.reshape(C, -1)).all(dim=1)
        if not bool(finite.all()):
            i = int(torch.nonzero(~finite)[0])
            raise ctx.diverged(chains[i], total - 1, f"parameter {n} is not finite")
    for i, g in enumerate(chains):
        ctx.keep_end(
            g,
            lambda i=i, g=g: {n: stacked[n][i].detach().clone() for n in ctx.moving(g)},
            lambda i=i: sstate.state_of(i),
        )
    with ctx.lock:
        for g in chains:
            st.params.pop(g, None)
            st.sampler_state.pop(g, None)
