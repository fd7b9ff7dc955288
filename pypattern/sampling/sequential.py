"""The sequential chain loop: one chain after another, each with its own optimizer (:class:`SGLD`, or the
:class:`~.samplers.SGNHT` or :class:`~.samplers.RMSpropSGLD` the plan names) on a copy of the model."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .context import RunContext, step_failure
from .data import ChainData, to_device
from .optim import SGLD
from .samplers import chain_sampler

__all__ = ["extra_outputs", "join_outputs", "run_sequential"]


def extra_outputs(out) -> tuple:
    """The tensors a loss function returned after the loss (a tuple or list return), detached."""
    if isinstance(out, tuple | list):
        return tuple(x.detach() for x in out[1:] if isinstance(x, torch.Tensor))
    return ()


def join_outputs(parts: list[tuple], dim: int = 0) -> tuple:
    """The loss function's other outputs over a step's gradient-accumulation micro-batches ``parts`` (one tuple
    each): each output concatenated along the batch dimension ``dim`` (stacked along a new ``dim`` where it has
    no such dimension: a number per micro-batch; a list of the micro-batches' tensors where their other
    dimensions differ, e.g. batches padded to their own lengths); the one tuple itself without accumulation."""
    if len(parts) == 1:
        return parts[0]
    out = []
    for xs in zip(*parts):
        if all(x.dim() > dim for x in xs) and len({x.shape[:dim] + x.shape[dim + 1 :] for x in xs}) == 1:
            out.append(torch.cat(xs, dim))
        elif all(x.dim() <= dim for x in xs) and len({x.shape for x in xs}) == 1:
            out.append(torch.stack(xs, dim))
        else:
            out.append(list(xs))
    return tuple(out)


def run_sequential(
    ctx: RunContext,
    chains: Sequence[int],
    resume: Mapping[int, tuple[int, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None]]
    | None = None,
) -> None:
    """Run the global chains ``chains`` one after another from where the state left them; their draws go into
    ``ctx.state``. ``resume`` maps a chain to the step it goes on from, with its moving weights and its sampler's
    state there (batched chains handed over mid-run), instead of the state's."""
    resume = resume or {}
    plan, st = ctx.plan, ctx.state
    accum, total = plan.grad_accum_steps, plan.total_steps
    work = copy.deepcopy(ctx.model)
    wparams = dict(work.named_parameters())
    # the buffers as the call found them: every chain starts from them (a buffer its forwards update, such as a
    # running statistic or spectral norm's power-iteration vector, would otherwise carry over from the chain
    # before, and a chain's draws would depend on which chains ran before it in this process)
    wbuffers = dict(work.named_buffers())
    buffers0 = {n: b.detach().clone() for n, b in wbuffers.items()}
    trainable = {n for n, p in wparams.items() if p.requires_grad}
    for g in chains:
        c, run = g % plan.num_chains, plan.run_of(g)
        moving = run.moving
        with torch.no_grad():
            for n, b in wbuffers.items():
                b.copy_(buffers0[n])
            for n, p in wparams.items():
                p.copy_(ctx.w_star[n])
                # no gradient for weights this run does not move: the backward skips their weight grads
                p.requires_grad_(n in trainable and n in moving)
            for n, t in (resume[g][1] if g in resume else st.params.get(g, {})).items():
                wparams[n].copy_(t)
        opt = chain_sampler(
            plan.sampler,
            [(n, wparams[n]) for n in moving],
            hyper=plan.hyper,
            own=plan.sampler_hyper,
            masks=run.masks,
            seed=plan.key(c),
            backend=plan.backend,
        )
        anchors = [ctx.w_star[n] for n in moving]
        moved = [wparams[n] for n in moving]
        if isinstance(opt, SGLD):
            opt.anchors, take_step, state_of = anchors, opt.sgld_step, None
        else:  # SGNHT, RMSprop-SGLD: one group; their state goes into the checkpoint too
            opt.anchors, take_step = [anchors], opt.sampler_step
            state = resume[g][2] if g in resume else st.sampler_state.get(g)
            if state:
                opt.load_chain_state(state)

            def state_of(g, opt=opt):
                return opt.chain_state()

        start = int(resume[g][0] if g in resume else st.next_step[g])
        opt.resume_at(start)
        data = ChainData(ctx.loader, plan.key(c, stream=1), ctx.data_cache)
        data.skip(start * accum)
        params = opt.param_groups[0]["params"]
        for t in range(start, total):
            for p in params:
                p.grad = None
            vals, extras = [], []
            for j in range(accum):  # the weights do not change until the step
                b = to_device(data.next(), ctx.device)
                o = plan.loss_fn(work, b)
                loss = ctx.split_loss(o)
                vals.append(float(loss.detach()))
                if not math.isfinite(vals[-1]):
                    raise ctx.nonfinite_loss(g, t, vals[-1], b)
                if j == 0:
                    batch = b
                if ctx.cb_keys:  # what the callbacks read of this micro-batch
                    extras.append(extra_outputs(o))
                if not loss.requires_grad:  # none of the run's moving weights is read (or a contract error)
                    ctx.unread_gradient([g // plan.num_chains], b)
                    continue
                (loss / accum if accum > 1 else loss).backward()
            r = g // plan.num_chains
            ctx.stepped_runs.add(r)
            if r not in ctx.read_runs and any(p.grad is not None for p in moved):
                with ctx.lock:
                    ctx.read_runs.add(r)
            if t == start:  # a moving parameter the backward left without a gradient, though the loss uses it
                ctx.check_gradients(
                    moving, moved, work, lambda b=batch: float(ctx.split_loss(plan.loss_fn(work, b)).detach())
                )
            lv = vals[0] if accum == 1 else float(np.mean(vals))
            ctx.check_runaway(g, t, lv)
            d = plan.is_draw(t)
            after_step = None
            if d >= 0:
                if ctx.track_distance:
                    ctx.record_distance(g, d, moved, anchors)
                after_step = ctx.at_draw(
                    g,
                    d,
                    t,
                    lv,
                    lambda: work,
                    batch,
                    outputs=join_outputs(extras) if extras else (),
                    optimizer=opt,
                    defer=True,
                )
            try:
                take_step()
            except FloatingPointError as e:  # a non-finite gradient, update or SGNHT thermostat
                raise ctx.diverged(g, t, step_failure(e)) from None
            if after_step is not None:  # devinterp 1.x's callbacks see the model after the update
                after_step()
            ctx.finish_step(
                (g,), d, t, lambda g, mv=moving: {n: wparams[n].detach().clone() for n in mv}, state_of
            )
        for n in moving:
            if not bool(torch.isfinite(wparams[n]).all()):
                raise ctx.diverged(g, total - 1, f"parameter {n} is not finite")
        ctx.keep_end(
            g,
            lambda mv=moving: {n: wparams[n].detach().clone() for n in mv},
            None if state_of is None else (lambda g=g, f=state_of: f(g)),
        )
        with ctx.lock:
            st.params.pop(g, None)
            st.sampler_state.pop(g, None)
