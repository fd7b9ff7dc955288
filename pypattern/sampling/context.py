"""What the chain loops (sequential and batched) share while a call runs: the plan, the state the draws go into,
callbacks, checkpoint writes, progress, divergence errors; one lock serialises them across threads."""

from __future__ import annotations

import inspect
import math
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._training import buffers_kept
from .checkpoint import State
from .diagnostics import NonFiniteLossError, SamplingDivergedError, user_stacklevel
from .plan import RunPlan

__all__ = ["RUNAWAY_STEPS", "LossContractError", "RunContext", "Stopped", "runaway_limit"]

# a chain has run away after this many consecutive steps (burn-in and steps between draws included) above its
# runaway limit, or when its mean loss over its draws is above it (a run too short for the count)
RUNAWAY_STEPS = 5


def runaway_limit(init_loss: float, num_moving: int, nbeta: float) -> float:
    """The loss above which a chain is running away: ``L_n(w*) + max(10 |L_n(w*)|, 10 d / nbeta)`` for ``d``
    moving parameters.

    A chain in equilibrium sits about ``lambda / nbeta`` above ``L_n(w*)``, and the learning coefficient
    ``lambda`` is at most ``d / 2``: a loss ``10 d / nbeta`` above it would mean an LLC of twenty times its largest
    possible value, so a chain there has left the localized posterior (step size too large); the
    ``10 |L_n(w*)|`` term keeps a limit for tiny ``d / nbeta``."""
    return init_loss + max(10.0 * abs(init_loss), 10.0 * num_moving / nbeta)


def squared_distance(moved: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> float:
    """``sum_i |moved_i - anchors_i|^2`` (float64 sum of the tensors' float32 or float64 norms)."""
    if not moved:
        return 0.0
    with torch.no_grad():
        norms = torch._foreach_norm(torch._foreach_sub(list(moved), list(anchors)))
        return float(torch.stack(norms).double().square().sum())


def stacked_squared_distance(
    stacked: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor]
) -> np.ndarray:
    """Per chain (the first dimension of every ``stacked`` tensor), ``sum_n |stacked[n][i] - anchors[n]|^2``."""
    with torch.no_grad():
        total = None
        for n, s in stacked.items():
            v = torch.linalg.vector_norm((s - anchors[n]).reshape(s.shape[0], -1), dim=1).double().square()
            total = v if total is None else total + v
        return total.cpu().numpy()


class Stopped(Exception):
    """Another group of chains failed (cores > 1): this one stops."""


NO_GRADIENT = (
    "loss_fn returned a loss with no gradient (a constant, or computed from detached tensors or under no_grad): "
    "the sampler needs the loss as a differentiable function of the model's parameters"
)


#: why a chain stopped when the SGNHT thermostat's update overflowed (both chain loops give it)
THERMOSTAT_OVERFLOW = (
    "the SGNHT thermostat's update overflowed to inf/NaN (the sum of the squared momenta exceeds float64)"
)


def step_failure(e: FloatingPointError) -> str:
    """Why a chain stopped, from the ``FloatingPointError`` a checked sampler step raised: the thermostat's
    overflow, else a non-finite gradient or update (named by ``e``)."""
    if "thermostat" in str(e):
        return THERMOSTAT_OVERFLOW
    return f"a gradient or its update is not finite ({e})"


class LossContractError(ValueError):
    """``loss_fn`` returned something other than one number: the caller's error, raised as it is by the batched
    loop too (not taken for a model that does not run under vmap)."""


def _keywords(fn: Callable) -> frozenset | None:
    """The keyword arguments ``fn`` takes, or None when it takes any (``**kwargs``, or no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


@dataclass(eq=False)
class RunContext:
    """The shared side of a sampler call (one per call, shared by its groups of chains)."""

    plan: RunPlan
    model: nn.Module
    loader: Any
    w_star: Mapping[str, torch.Tensor]
    state: State
    fingerprint: Mapping | None
    device: torch.device
    split_loss: Callable  # the loss from what loss_fn returned
    init_loss: float
    data_cache: dict = field(default_factory=dict)
    loss_argument: str = "loss_fn"  # the argument the loss function came in, which errors about it name
    pbar: Any = None
    # (observable name, batch structure) pairs, the structure as batched._structure gives it: the observables
    # whose vmap-ed call raises on batches of that structure, evaluated chain by chain on them
    obs_per_chain: set = field(default_factory=set)
    # the most elements of chains' last weights kept in ``state.ends`` (0: none), for the checks of a given step
    keep_ends: int = 0
    # record each draw's squared distance from w* (state.dist) for the drift check (runner._checks_drift)
    track_distance: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)
    stop: threading.Event = field(
        default_factory=threading.Event
    )  # another group failed: stop at the next step

    def __post_init__(self):
        self.cb_keys = [(cb, _keywords(cb)) for cb in self.plan.callbacks]  # inspected once
        params = dict(self.model.named_parameters())
        nbeta = self.plan.hyper["nbeta"]
        self.runaway_at = [  # per run
            runaway_limit(self.init_loss, sum(params[n].numel() for n in r.moving), nbeta)
            for r in self.plan.runs
        ]
        self.above: dict[int, int] = {}  # per chain: consecutive steps above its run's limit
        self.nonfinite_obs: set[str] = set()  # observables that returned a non-finite value (warned once)
        self.gradients_checked = False  # moving parameters without a gradient: checked once per call
        # runs (indices into plan.runs) some step of which gave one of the run's moving tensors a gradient, and
        # runs that took a step in this call: a run that stepped with no gradient ever is one the loss does not read
        self.read_runs: set[int] = set()
        self.stepped_runs: set[int] = set()
        self.unread_ok: set[int] = set()  # runs whose loss without gradient unread_gradient accepted

    def unread_gradient(self, runs: Sequence[int], batch) -> None:
        """The loss of ``batch`` came out without a gradient for the moving tensors of ``runs``: go on with a
        zero gradient when each of those runs moves part of the model only and the loss does depend on the model's
        trainable parameters (it does not read those runs' weights: they are reported unread, LLC 0); else raise
        :class:`LossContractError` (the loss is a constant, detached or computed under ``no_grad``)."""
        if all(r in self.unread_ok for r in runs):  # decided at an earlier step
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        restricted = all(len(self.plan.runs[r].moving) < len(params) for r in runs)
        reads = False
        if restricted:
            with self.lock, torch.enable_grad(), buffers_kept(self.model):
                try:
                    reads = bool(self.split_loss(self.plan.loss_fn(self.model, batch)).requires_grad)
                except Exception:  # noqa: BLE001 - the contract error below is the clearer report
                    reads = False
        if not reads:
            raise LossContractError(NO_GRADIENT)
        with self.lock:
            self.unread_ok.update(runs)

    def moving(self, g: int) -> tuple[str, ...]:
        return self.plan.run_of(g).moving

    def keep_end(
        self, g: int, weights: Callable[[], dict], sampler_state: Callable[[], dict] | None = None
    ) -> None:
        """Keep chain ``g``'s moving weights at its last step (``weights()``, copies) in ``state.ends`` while the
        kept weights stay within ``keep_ends`` elements; with ``sampler_state``, RMSprop-SGLD's running means of
        the squared gradients there too (``state.end_states``, for its preconditioner)."""
        if self.keep_ends <= 0:
            return
        with self.lock:
            held = sum(t.numel() for w in self.state.ends.values() for t in w.values())
            size = sum(self.w_star[n].numel() for n in self.moving(g))
            if held + size <= self.keep_ends:
                self.state.ends[g] = weights()
                if sampler_state is not None and self.plan.sampler == "rmsprop_sgld":
                    self.state.end_states[g] = {
                        k: v for k, v in sampler_state().items() if k.startswith("square_avg/")
                    }

    def record_distance(self, g: int, d: int, moved: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]):
        """Record chain ``g``'s squared distance from ``w*`` at its draw ``d``, ``|w - w*|^2`` over its moving
        tensors ``moved`` (``anchors``: their values at ``w*``), in float64: what :func:`.diagnostics.check_drift`
        reads. One fused norm over the tensors (no copy of the weights kept)."""
        self.state.dist[g, d] = squared_distance(moved, anchors)

    def checkpoint_now(self, finished_draws: int) -> bool:
        plan = self.plan
        return plan.checkpoint is not None and (
            finished_draws % plan.checkpoint_every == 0 or finished_draws == plan.num_draws
        )

    def finish_step(
        self,
        chains: Sequence[int],
        d: int,
        t: int,
        params_of: Callable[[int], dict],
        sampler_state_of: Callable[[int], dict] | None = None,
    ) -> None:
        """After a step: progress, and at a draw the chains' bookkeeping and (when due) the checkpoint, which
        keeps each unfinished chain's moving weights (``params_of(g)``) and sampler state
        (``sampler_state_of(g)``: SGNHT's momenta and thermostat, RMSprop-SGLD's running means)."""
        if self.stop.is_set():
            raise Stopped
        if self.pbar is not None:
            self.pbar.update(len(chains))
        if d < 0:
            return
        st = self.state
        with self.lock:
            for g in chains:
                st.done[g], st.next_step[g] = d + 1, t + 1
            if self.checkpoint_now(d + 1) or (self.plan.checkpoint is not None and self.plan.cores > 1):
                # with cores > 1 every draw's weights are kept, not only those of a draw this group writes at:
                # another group of chains writes the file at its own draws, and the file must hold each unfinished
                # chain's weights at the draw its 'done' records (else the resume restarts from older weights, or
                # finds none); one group's chains are all at the draw it writes at
                for g in chains:
                    if d + 1 < self.plan.num_draws:
                        st.params[g] = params_of(g)
                        if sampler_state_of is not None:
                            st.sampler_state[g] = sampler_state_of(g)
                    else:
                        st.params.pop(g, None)
                        st.sampler_state.pop(g, None)
            if self.checkpoint_now(d + 1):
                st.save(self.plan.checkpoint, self.fingerprint, self.plan.checkpoint_state)

    def diverged(self, g: int, t: int, what: str) -> SamplingDivergedError:
        plan = self.plan
        d = plan.is_draw(t)
        burnin, thin = plan.num_burnin_steps, plan.num_steps_bw_draws
        where = (
            f"during burn-in (step {t} of {burnin})"
            if t < burnin
            else f"at draw {d if d >= 0 else (t - burnin) // thin} (step {t})"
        )
        gamma, eps = plan.hyper["localization"], plan.hyper["step_size"]
        which = f"chain {g}"
        if len(plan.runs) > 1:  # chains are numbered over the runs: say which run's chain, and what it moves
            run = plan.run_of(g)
            moves = list(run.moving)
            shown = ", ".join(map(repr, moves[:3])) + (
                f" and {len(moves) - 3} more" if len(moves) > 3 else ""
            )
            masked = " (masked)" if run.masks else ""
            which += (
                f" (chain {g % plan.num_chains} of run {g // plan.num_chains} of {len(plan.runs)}, which moves "
                f"{shown or 'no parameter'}{masked})"
            )
        if t == 0 and "non-finite gradient" in what and "update overflowed" not in what:
            # no step has been taken: the weights are w*, so no step size or localization is the cause (the op's
            # own advice about diverging chains does not apply either)
            what = what.replace(
                " A diverging chain usually needs a smaller step_size or a larger localization.", ""
            )
            msg = (
                f"{which} stopped at its first step: {what}. No step has been taken yet, so the gradient of the "
                "loss at the initial weights w* is not finite on this batch, whatever the step_size: check the "
                "model and the loss at w* (rows of padding only, a log of 0, an overflow in 16 bits, non-finite "
                "inputs). No estimate is returned."
            )
        else:
            msg = (
                f"{which} diverged {where} with step_size={eps:g}: {what}. The sampler stopped; no estimate is "
                f"returned. Use a smaller step_size (lr), e.g. {eps / 10:g}, or a larger localization (now {gamma:g})"
                + (", and delete the checkpoint before rerunning" if plan.checkpoint else "")
                + "."
            )
        return SamplingDivergedError(
            msg, chain=g, draw=d, step=t, step_size=eps, suggested_step_size=eps / 10
        )

    def check_runaway(self, g: int, t: int, loss: float) -> None:
        """Raise :class:`SamplingDivergedError` when chain ``g``'s loss at step ``t`` (any step: burn-in and steps
        between draws count) has run away: above its run's :func:`runaway_limit` at ``RUNAWAY_STEPS``
        consecutive steps."""
        limit = self.runaway_at[g // self.plan.num_chains]
        if not loss > limit:
            self.above.pop(g, None)
            return
        n = self.above[g] = self.above.get(g, 0) + 1
        if n >= RUNAWAY_STEPS:
            raise self.diverged(
                g,
                t,
                f"the loss ran away: {loss:.4g} at this step and above {limit:.4g} (far above L_n(w*) = "
                f"{self.init_loss:.4g}) at the last {n} steps",
            )

    def check_mean_runaway(self, g: int, t: int) -> None:
        """At chain ``g``'s last draw: raise :class:`SamplingDivergedError` when the mean of its draws' losses is
        above its run's :func:`runaway_limit`, an LLC estimate over twenty times the largest possible (a run too
        short for ``RUNAWAY_STEPS`` consecutive steps above the limit, whose loss grows without bound)."""
        limit = self.runaway_at[g // self.plan.num_chains]
        mean = float(np.mean(self.state.loss[g]))
        if mean > limit:
            raise self.diverged(
                g,
                t,
                f"the loss ran away: its mean over the chain's {self.plan.num_draws} draws is {mean:.4g}, above "
                f"{limit:.4g} (far above L_n(w*) = {self.init_loss:.4g}; an LLC over twenty times the largest "
                "possible)",
            )

    def nonfinite_loss(self, g: int, t: int, value: float, batch) -> SamplingDivergedError:
        """The error for chain ``g``'s non-finite loss ``value`` at step ``t`` on ``batch``: when the loss at the
        initial weights ``w*`` on that batch is not finite either, the data or the model are the cause (a
        :class:`NonFiniteLossError`), else the chain diverged."""
        try:
            with torch.no_grad():
                at_start = float(self.split_loss(self.plan.loss_fn(self.model, batch)).detach())
        except Exception:  # noqa: BLE001 - the check only chooses the message: the divergence error stands
            at_start = 0.0
        if math.isfinite(at_start):
            return self.diverged(g, t, f"the loss is {value}")
        undefined = self._undefined_by_rule(batch)
        if undefined is not None:  # a batch the library's rule has no mean loss for (no counted target)
            return NonFiniteLossError(
                f"chain {g}'s loss is {value} at step {t}: {undefined}. Every batch the chains read needs a counted "
                "target (the L_n(w*) batches were checked, this one was not among them): drop such batches from the "
                "loader",
                chain=g,
                draw=self.plan.is_draw(t),
                step=t,
                step_size=self.plan.hyper["step_size"],
            )
        return NonFiniteLossError(
            f"chain {g}'s loss is {value} at step {t}, and {at_start} at the initial weights w* on the same batch: "
            "the data or the model give a non-finite loss before any step (look for NaN or Inf in the batch's "
            "tensors and in the model's weights); a smaller step size would not help",
            chain=g,
            draw=self.plan.is_draw(t),
            step=t,
            step_size=self.plan.hyper["step_size"],
        )

    def check_gradients(
        self,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        model: nn.Module,
        loss_at: Callable[[], float],
    ) -> None:
        """Warn (once per call) when moving parameters ``params`` (named ``names``, of ``model``) hold no gradient
        after a step's backward (``grad`` None) although the loss depends on them: the forward cut their gradient
        (a reentrant ``torch.utils.checkpoint`` whose inputs do not require grad, e.g. after frozen embeddings;
        ``.detach()``; ``torch.no_grad()``), and the sampler would move them by noise and localization alone while
        the loss changes with them. ``loss_at()`` is the loss of the step's batch at the model's current weights;
        it is evaluated (no gradient) before and after a small change of those parameters, restored afterwards
        with the model's buffers. Parameters the loss does not use (a mixture-of-experts layer's expert no token
        of the batch was routed to) are left alone. Checked at most once per call."""
        if self.gradients_checked:
            return
        missing = [(n, p) for n, p in zip(names, params, strict=True) if p.grad is None]
        if not missing:
            return
        with self.lock:
            if self.gradients_checked:
                return
            self.gradients_checked = True
        kept = {n: p.detach().clone() for n, p in missing}

        def changed(which) -> tuple[float, float] | None:
            """The loss before and after a small random change of ``which``, restored afterwards (the buffers
            too)."""
            g = torch.Generator(device="cpu").manual_seed(0)
            try:
                with torch.no_grad(), buffers_kept(model):
                    before = loss_at()
                    for _, p in which:
                        step = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)
                        p.add_(step * (1e-2 * (float(p.detach().abs().mean()) + 1e-2)))
                    after = loss_at()
            except Exception:  # noqa: BLE001 - the check only decides a warning
                return None
            finally:
                with torch.no_grad():
                    for n, p in which:
                        p.copy_(kept[n])
            if not (math.isfinite(before) and math.isfinite(after)) or after == before:
                return None
            return before, after

        change = changed(missing)
        if change is None:  # the loss does not use them
            return
        before, after = change
        # name the tensors the loss changes with (one probe each, at most 16; the rest unnamed)
        cut = [(n, p) for n, p in missing[:16] if changed([(n, p)]) is not None]
        if not cut:
            cut = missing
        missing = cut + missing[16:]
        shown = ", ".join(repr(n) for n, _ in missing[:5]) + (", ..." if len(missing) > 5 else "")
        warnings.warn(
            f"{len(missing)} of the {len(names)} moving parameters got no gradient from {self.loss_argument} "
            f"({shown}) although the loss changes with them ({before:.6g} -> {after:.6g} under a small change "
            "of them): the forward cuts their gradient, and the sampler moves them by noise and localization "
            "alone, so the estimate is wrong. A torch.utils.checkpoint(..., use_reentrant=True) whose inputs do "
            "not require grad (after frozen embeddings) does this: give use_reentrant=False; or a .detach() or "
            "torch.no_grad() in the forward. Else freeze them with requires_grad_(False)",
            stacklevel=user_stacklevel(),
        )

    def _undefined_by_rule(self, batch) -> str | None:
        """Why the library's one rule has no loss for ``batch`` (its refusal by
        :func:`pypattern.losses.check_batch`, e.g. a batch without a counted token), when the run's loss function
        computes its loss by that rule; else None."""
        from ..losses import check_batch
        from .runner import reads_by_default_rule

        try:
            if not reads_by_default_rule(self.plan.loss_fn, self.model, batch):
                return None
            check_batch(self.model, batch, "loader")
        except ValueError as e:
            return str(e)
        except Exception:  # noqa: BLE001 - the check only chooses the message
            return None
        return None

    def _warn_nonfinite(self, values: Mapping, g: int, d: int) -> None:
        """Warn (once per observable and call) when an observable's value at chain ``g``'s draw ``d`` holds NaN or
        Inf: it is recorded as it is, and its trace's means and covariances are not finite
        (:func:`pypattern.susceptibilities` and :func:`pypattern.bif`, which need finite values, raise)."""
        for name, v in values.items():
            if name in self.nonfinite_obs:
                continue
            try:
                a = v.detach().to("cpu") if isinstance(v, torch.Tensor) else np.asarray(v)
                finite = bool(
                    np.isfinite(
                        np.asarray(a, dtype=np.complex128 if np.iscomplexobj(a) else np.float64)
                    ).all()
                )
            except (TypeError, ValueError):  # not numbers: State.record_obs names it
                continue
            if not finite:
                with self.lock:
                    self.nonfinite_obs.add(name)
                warnings.warn(
                    f"observable {name!r} returned a non-finite value (NaN or Inf) at draw {d} of chain {g} (a "
                    "diverging chain, or an observable undefined on the draw's batch): the value is recorded as it "
                    "is, so its trace's means are not finite; warned once per observable",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )

    def at_draw(
        self,
        g: int,
        d: int,
        t: int,
        loss: float,
        model_view: Callable[[], Any],
        batch,
        precomputed: Mapping | None = None,
        outputs: tuple = (),
        optimizer: Any = None,
        defer: bool = False,
    ) -> Callable[[], None] | None:
        """Record chain ``g``'s draw ``d``: its loss, its observables (those not already in ``precomputed``,
        evaluated on ``model_view()``) and the callbacks (``outputs``: the loss function's other returned tensors;
        ``optimizer``: the chain's sampler, handed to the callbacks when given). With ``defer``, the callbacks
        marked ``after_step`` (devinterp 1.x's, which devinterp calls after the update) are not called here: the
        function returned calls them, for the caller to run once the step is taken (None when there are none)."""
        plan, st = self.plan, self.state
        st.loss[g, d] = loss
        if d == plan.num_draws - 1:
            self.check_mean_runaway(g, t)
        if not (plan.observables or self.cb_keys):
            return None
        obs_vals = dict(precomputed or {})
        view = None
        if plan.observables:
            with torch.no_grad():
                for name, fn in plan.observables:
                    if name not in obs_vals:
                        view = model_view() if view is None else view
                        obs_vals[name] = fn(view, batch)
            self._warn_nonfinite(obs_vals, g, d)
            if plan.record_observables:
                with self.lock:
                    for name, _ in plan.observables:
                        st.record_obs(name, g, d, obs_vals[name])
        args = dict(
            chain=g,
            run=g // plan.num_chains,
            draw=d,
            step=t,
            loss=loss,
            batch=batch,
            observables=obs_vals,
            outputs=outputs,
            init_loss=self.init_loss,
        )
        if optimizer is not None:
            args["optimizer"] = optimizer
        later = [(cb, keys) for cb, keys in self.cb_keys if defer and getattr(cb, "after_step", False)]

        def call(items, view) -> None:
            for cb, keys in items:
                if keys is None or "model" in keys:
                    view = model_view() if view is None else view
                    args["model"] = view
                with self.lock:
                    cb(**(args if keys is None else {k: v for k, v in args.items() if k in keys}))

        call([item for item in self.cb_keys if item not in later], view)
        if not later:
            return None
        return lambda: call(later, None)  # the model as the step left it
