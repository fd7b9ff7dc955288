"""A sampler call's state (what a checkpoint holds), its file through :mod:`pypattern.io`, and the fingerprint
that ties a checkpoint to the run that wrote it."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .. import io
from .._training import random_in_training
from .data import hash_data
from .plan import RunPlan

__all__ = ["CHECKPOINT_KIND", "State", "load_checkpoint_state", "run_fingerprint", "training_modes"]

CHECKPOINT_KIND = "sample-checkpoint"
VERSION = 2


class State:
    """The draws so far of every chain of a call, and the moving weights of chains in progress.

    Attributes
    ----------
    loss : ndarray ``(num_total_chains, num_draws)``
        NaN where not drawn yet.
    dist : ndarray ``(num_total_chains, num_draws)``
        Each draw's squared distance ``|w - w*|^2`` over the chain's moving weights (float64; NaN where not drawn,
        and for draws of a checkpoint written without it).
    done, next_step : ndarray ``(num_total_chains,)``
        Finished draws and the next step of each chain.
    obs : dict of str to ndarray ``(num_total_chains, num_draws, *shape)``
    params : dict of int to dict of str to Tensor
        The moving weights of chains stopped between steps (resumed from there).
    sampler_state : dict of int to dict of str to Tensor
        The sampler's state of those chains (SGNHT's momenta and thermostat, RMSprop-SGLD's running means, keyed
        as :meth:`pypattern.sampling.SGNHT.chain_state` keys them; none for SGLD).
    init_losses : ndarray or None
        ``L_n(w*)`` on each of its batches.
    seconds : float
        Sampling time so far.
    ends : dict of int to dict of str to Tensor
        The moving weights of chains at their last step, of the chains the run keeps them for
        (:meth:`~.context.RunContext.keep_end`; in memory only, not written to a checkpoint).
    end_states : dict of int to dict of str to Tensor
        RMSprop-SGLD's running means of the squared gradients of those chains at their last step (keyed
        ``"square_avg/<name>"``; in memory only).
    """

    def __init__(self, num_total_chains: int, num_draws: int):
        # the step-size calibration the run's step came from (the runner sets it; written, not read)
        self.calibration: Mapping | None = None
        self.loss = np.full((num_total_chains, num_draws), np.nan)
        # each draw's squared distance |w - w*|^2 over the chain's moving weights (the drift check's trace)
        self.dist = np.full((num_total_chains, num_draws), np.nan)
        self.done = np.zeros(num_total_chains, dtype=np.int64)
        self.next_step = np.zeros(num_total_chains, dtype=np.int64)
        self.obs: dict[str, np.ndarray] = {}
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.sampler_state: dict[int, dict[str, torch.Tensor]] = {}
        self.init_losses: np.ndarray | None = None
        self.seconds = 0.0
        self.ends: dict[int, dict[str, torch.Tensor]] = {}
        self.end_states: dict[int, dict[str, torch.Tensor]] = {}

    def record_obs(self, name: str, g: int, d: int, value) -> None:
        """Record observable ``name``'s ``value`` at chain ``g``'s draw ``d`` (as float64).

        The first draw recorded fixes the trace's shape: a value of another shape (a per-sample observable on a
        batch of another size), a complex value and one that is not numbers are refused with a ValueError naming
        the observable: a value is recorded as it is, never broadcast to the trace's shape, truncated to its real
        part or cast from something that is not numbers."""
        where = f"observable {name!r} returned"
        at = f"at draw {d} of chain {g}"
        if isinstance(value, torch.Tensor):
            if value.is_complex():
                raise ValueError(
                    f"{where} a complex value (dtype {value.dtype}) {at}: traces hold real numbers; record the real "
                    "and imaginary parts (or the absolute value) as observables of their own"
                )
            v = value.detach().to("cpu", torch.float64).numpy()
        else:
            v = np.asarray(value)
            if v.dtype.kind == "c":
                raise ValueError(
                    f"{where} a complex value (dtype {v.dtype}) {at}: traces hold real numbers; record the real "
                    "and imaginary parts (or the absolute value) as observables of their own"
                )
            if v.dtype.kind not in "biuf":
                raise ValueError(
                    f"{where} a {type(value).__name__} of dtype {v.dtype} {at}: an observable returns a tensor or "
                    "an array of real numbers, or a number"
                )
        trace = self.obs.get(name)
        if trace is None:
            self.obs[name] = trace = np.full((*self.loss.shape, *v.shape), np.nan)
        elif trace.shape[2:] != v.shape:
            raise ValueError(
                f"{where} a value of shape {v.shape} {at}, but of shape {trace.shape[2:]} at its earlier draws: its "
                "shape must not change (a per-sample observable on batches of different sizes: give the loader "
                "batches of one size, e.g. DataLoader(..., drop_last=True), or reduce the values over the batch)"
            )
        trace[g, d] = v

    def save(self, path: str, fingerprint: Mapping, extra: Callable[[], Mapping] | None = None) -> None:
        """Write the state atomically; ``extra()``'s arrays (the caller's state that goes with these draws, e.g.
        accumulators) go into the same file under ``state/``."""
        arrays = {
            "loss_trace": self.loss,
            "distance_trace": self.dist,
            "done": self.done,
            "next_step": self.next_step,
        }
        if extra is not None:
            for k, v in extra().items():
                arrays[f"state/{k}"] = np.asarray(v)
        if self.init_losses is not None:
            arrays["init_losses"] = self.init_losses
        for k, v in self.obs.items():
            arrays[f"obs/{k}"] = v
        for g, ps in self.params.items():
            for n, t in ps.items():
                arrays[f"params/{g}/{n}"] = t.detach().cpu().numpy()
        for g, ss in self.sampler_state.items():
            for k, t in ss.items():
                arrays[f"sampler/{g}/{k}"] = t.detach().cpu().numpy()
        meta = {"version": VERSION, "fingerprint": dict(fingerprint), "seconds": self.seconds}
        if self.calibration is not None:
            meta["calibration"] = dict(self.calibration)
        io.save(path, arrays, {"checkpoint": meta}, kind=CHECKPOINT_KIND)

    @classmethod
    def load(
        cls, path: str, plan: RunPlan, fingerprint: Mapping, device, like: Mapping[str, torch.Tensor]
    ) -> State:
        """Read a checkpoint of the run ``fingerprint`` identifies; a file of any other run, another format
        version, or a damaged file (truncated, an array missing or of the wrong shape or dtype) is refused with
        :class:`pypattern.io.FormatError` naming the file (and the first differing item or the bad array).
        ``like`` maps each parameter name to a tensor of its shape and dtype (the trained weights)."""
        arrays, meta = io.load(path, kind=CHECKPOINT_KIND)
        meta = meta.get("checkpoint", {})
        if not isinstance(meta, Mapping):
            raise io.FormatError(f"checkpoint {path!r} is damaged: its header is not a mapping; delete it")
        if meta.get("version") != VERSION:
            raise io.FormatError(version_message(path, meta.get("version"), VERSION, repr_version=False))
        stored = meta.get("fingerprint")
        if isinstance(
            stored, Mapping
        ):  # the sampler first, named (an SGLD run's fingerprint has no sampler item)
            was, now = stored.get("sampler", "sgld"), fingerprint.get("sampler", "sgld")
            if was != now:
                raise io.FingerprintMismatch(
                    f"checkpoint {path!r} was written by a run with sampler={was!r}, this run has sampler={now!r}: "
                    f"resume with sampler={was!r}, or use another checkpoint path, or delete this one to start "
                    "afresh.",
                    path=path,
                    item="sampler",
                    stored=was,
                    current=now,
                )
        full_stored, full_current = stored, fingerprint
        stored, fingerprint = _without_settings(stored), _without_settings(fingerprint)
        try:
            io.check_fingerprint(stored, fingerprint, path, defaults=FINGERPRINT_DEFAULTS)
        except io.FingerprintMismatch as e:
            if e.item.startswith(("weights[", "buffers[")):  # named by its dtype when that is what changed
                check_dtypes(full_stored, full_current, path)
            raise _with_batching_hint(e, stored, fingerprint) from None
        from .diagnostics import user_stacklevel

        # the same run: resumed, with a warning when it computes its draws otherwise
        warn_changed_settings(full_stored, full_current, path, stacklevel=user_stacklevel(1))
        G, D = plan.num_total_chains, plan.num_draws

        def bad(what: str) -> io.FormatError:
            return io.FormatError(f"checkpoint {path!r} is damaged: {what}; delete it to start afresh")

        def get(key: str, shape: tuple | None, kind: str) -> np.ndarray:
            if key not in arrays:
                raise bad(f"it lacks the array {key!r}")
            a = arrays[key]
            if shape is not None and a.shape != shape:
                raise bad(f"{key!r} has shape {a.shape}, expected {shape}")
            if a.dtype.kind not in kind:
                raise bad(f"{key!r} has dtype {a.dtype}, expected {'integers' if kind == 'iu' else 'floats'}")
            return a

        # the dtype the run writes (a float16 copy loses digits)
        def exact(key: str, a: np.ndarray, want) -> None:
            if a.dtype != want:
                raise bad(f"{key!r} has dtype {a.dtype}, this run writes {np.dtype(want)}")

        st = cls(G, D)
        st.loss = get("loss_trace", (G, D), "f")
        exact("loss_trace", st.loss, np.float64)
        if "distance_trace" in arrays:  # (a file without one: the drift check reads the draws recorded since)
            st.dist = get("distance_trace", (G, D), "f").astype(np.float64)
        st.done = get("done", (G,), "iu").astype(np.int64)
        st.next_step = get("next_step", (G,), "iu").astype(np.int64)
        if ((st.done < 0) | (st.done > D)).any() or (
            (st.next_step < 0) | (st.next_step > plan.total_steps)
        ).any():
            raise bad(
                f"'done' {st.done.tolist()} or 'next_step' {st.next_step.tolist()} is out of range "
                f"(0 .. {D} draws, 0 .. {plan.total_steps} steps)"
            )
        if "init_losses" in arrays:
            st.init_losses = get("init_losses", None, "f")
            if st.init_losses.ndim != 1 or not len(st.init_losses) or not np.isfinite(st.init_losses).all():
                raise bad(f"'init_losses' {st.init_losses!r} is not a non-empty vector of finite losses")
        seconds = meta.get("seconds", 0.0)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < math.inf:
            raise bad(f"its header's 'seconds' is {seconds!r}, not a time in seconds")
        st.seconds = float(seconds)
        for k, v in arrays.items():
            if k.startswith("obs/"):
                if v.shape[:2] != (G, D):
                    raise bad(f"{k!r} has shape {v.shape}, expected ({G}, {D}, ...)")
                st.obs[k[4:]] = v
            elif k.startswith("params/"):
                _, g, n = k.split("/", 2)
                if not g.isdigit() or not 0 <= int(g) < G or n not in like:
                    raise bad(f"{k!r} is not a parameter of a chain of this run")
                if v.shape != tuple(like[n].shape) or v.dtype.kind != "f":
                    raise bad(
                        f"{k!r} has shape {v.shape} and dtype {v.dtype}, expected {tuple(like[n].shape)} floats"
                    )
                exact(k, v, _numpy_dtype(like[n].dtype, v.dtype))
                if not np.isfinite(v).all():
                    raise bad(f"{k!r} holds values that are not finite")
                t = torch.from_numpy(v).to(device=device, dtype=like[n].dtype)
                st.params.setdefault(int(g), {})[n] = t
            elif k.startswith("sampler/"):
                _, g, key = k.split("/", 2)  # "thermostat" or "<kind>/<parameter name>"
                pname = key.split("/", 1)[1] if "/" in key else None
                if not g.isdigit() or not 0 <= int(g) < G or (key != "thermostat" and pname not in like):
                    raise bad(f"{k!r} is not sampler state of a chain of this run")
                if v.dtype.kind != "f" or (pname is not None and v.shape != tuple(like[pname].shape)):
                    raise bad(f"{k!r} has shape {v.shape} and dtype {v.dtype}")
                if not np.isfinite(v).all():
                    raise bad(f"{k!r} holds values that are not finite")
                dtype = torch.float64 if key == "thermostat" else like[pname].dtype
                t = torch.from_numpy(v).to(device=device, dtype=dtype)
                st.sampler_state.setdefault(int(g), {})[key] = t
        # each chain's bookkeeping agrees with itself: draw d is recorded at step burn-in + d * thinning, and a
        # chain stopped between its first and last draw has its moving weights (and its sampler's state) saved
        for g in range(G):
            d = int(st.done[g])
            # a draw is recorded only when its loss is finite (a chain that diverges stops the run)
            if not np.isfinite(st.loss[g, :d]).all():
                raise bad(f"chain {g}'s recorded losses (its first {d} draws) are not all finite")
            if not 0 < d < D and (g in st.params or g in st.sampler_state):
                # weights are kept only for a chain stopped between its first and last draw: a chain with none
                # starts from w*, a finished one needs none
                raise bad(f"it holds weights or sampler state of chain {g}, which has {d} of {D} draws done")
            want = 0 if d == 0 else plan.num_burnin_steps + (d - 1) * plan.num_steps_bw_draws + 1
            if int(st.next_step[g]) != want:
                raise bad(
                    f"chain {g} has {d} draws done but resumes at step {int(st.next_step[g])} (expected {want})"
                )
            if 0 < d < D:
                missing = [n for n in plan.run_of(g).moving if n not in st.params.get(g, {})]
                if missing:
                    raise bad(
                        f"chain {g} stopped after {d} of {D} draws, but its weights {missing[:3]} are missing"
                    )
                if plan.sampler != "sgld" and not st.sampler_state.get(g):
                    raise bad(
                        f"chain {g} stopped after {d} of {D} draws, but its {plan.sampler} state is missing"
                    )
        return st


#: settings stored with a checkpoint's fingerprint but not compared: how the draws are computed, not what they
#: are; another value resumes (with a warning: the draws after the resume may differ at float rounding). The
#: device is one: every noise value is keyed by (seed, chain, step) on every device and backend, and the weights,
#: sampler state and data a resume reads are the same, so a run moved to another device is the same run
RESUMABLE_SETTINGS = ("backend", "batched", "device")


def warn_changed_settings(stored: Mapping, current: Mapping, path, stacklevel: int = 2) -> bool:
    """Warn once, naming the first of :data:`RESUMABLE_SETTINGS` whose value in ``current`` differs from the one
    a checkpoint recorded (``stored``); a checkpoint that recorded none (written before they were) warns not.
    ``stacklevel``: ``warnings.warn``'s, for the call in this function. Whether it warned."""
    import warnings

    for k in RESUMABLE_SETTINGS:
        if k in stored and k in current and stored[k] != current[k]:
            warnings.warn(
                f"checkpoint {os.fspath(path)!r} was written with {k}={stored[k]!r}, this run has {k}={current[k]!r}: "
                "resuming; the values computed after the resume may differ from an uninterrupted run's at float "
                f"rounding (resume with {k}={stored[k]!r} for the same numbers)",
                UserWarning,
                stacklevel=stacklevel,
            )
            return True
    return False


def _with_batching_hint(e: io.FingerprintMismatch, stored, current: Mapping) -> io.FingerprintMismatch:
    """``e`` naming nbeta, with the reason when the batching changed too: the default nbeta is ``m / ln m`` of the
    batch size ``m = batch_size * grad_accum_steps``, so a changed DataLoader batch size or ``grad_accum_steps``
    shows first as an nbeta the user never set."""
    if e.item != "nbeta" or not isinstance(stored, Mapping):
        return e
    was, now = stored.get("grad_accum_steps", 1), current.get("grad_accum_steps", 1)
    if was != now:
        why = f"grad_accum_steps = {was!r} there, {now!r} now"
    elif stored.get("data") != current.get("data"):
        why = "the data or their batching differ too, e.g. another DataLoader batch_size"
    else:
        return e
    hint = (
        f" ({why}: the default nbeta is m / ln m of the batch size m = batch_size x grad_accum_steps, so a changed "
        "batch size or grad_accum_steps changes it)"
    )
    message = str(e)
    cut = message.find(". Use another checkpoint path")
    message = message + hint if cut < 0 else message[:cut] + hint + message[cut:]
    return io.FingerprintMismatch(message, path=e.path, item=e.item, stored=e.stored, current=e.current)


def _without_settings(fingerprint):
    """``fingerprint`` without :data:`RESUMABLE_SETTINGS` and the ``dtype`` item (what is compared)."""
    if not isinstance(fingerprint, Mapping):
        return fingerprint
    return {k: v for k, v in fingerprint.items() if k not in RESUMABLE_SETTINGS and k != DTYPE_ITEM}


#: the fingerprint item holding the dtype of each floating-point weight and buffer (:func:`model_dtypes`): stored,
#: and compared by :func:`check_dtypes` only, so that a checkpoint written without it resumes as before
DTYPE_ITEM = "dtype"


def model_dtypes(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """The dtype of each floating-point tensor of ``(name, tensor)`` pairs, by name (``"float32"``), for a
    fingerprint's ``dtype`` item."""
    return {n: str(t.dtype).removeprefix("torch.") for n, t in tensors if t.is_floating_point()}


def check_dtypes(stored, current: Mapping, path) -> None:
    """Refuse (:class:`pypattern.io.FingerprintMismatch` with item ``"dtype"``) a resume whose model holds a weight
    or buffer in another dtype than the checkpoint records, naming it and both dtypes: called when a weight's or
    buffer's hash differs, which two hashes alone do not explain. Nothing when either fingerprint has no ``dtype``
    item (a checkpoint written without one), or they agree."""
    if not isinstance(stored, Mapping):
        return
    was, now = stored.get(DTYPE_ITEM), current.get(DTYPE_ITEM)
    if not isinstance(was, Mapping) or not isinstance(now, Mapping) or dict(was) == dict(now):
        return
    name = next((n for n in now if n in was and was[n] != now[n]), None)
    if name is None:  # a tensor floating in one and not the other (or not there): the weights' check names it
        return
    raise io.FingerprintMismatch(
        f"checkpoint {os.fspath(path)!r} was written by a run whose model holds {name} in {was[name]}, this run's "
        f"holds it in {now[name]}: resume with the model in {was[name]} (e.g. model.to(torch.{was[name]})), or use "
        "another checkpoint path, or delete this one to start afresh.",
        path=os.fspath(path),
        item=DTYPE_ITEM,
        stored=dict(was),
        current=dict(now),
    )


def version_message(path, version, current: int, repr_version: bool = True) -> str:
    """A checkpoint of another format ``version`` than ``current`` (the one this pypattern writes): one of a newer
    pypattern says to upgrade, any other to start afresh."""
    shown = repr(version) if repr_version else version
    message = f"checkpoint {os.fspath(path)!r} has version {shown}, this pypattern writes version {current}: "
    if type(version) is int and version > current:
        return (
            message
            + "it was written by a newer pypattern; upgrade pypattern to resume it, or delete it to start afresh"
        )
    return message + "delete it to start afresh"


def _numpy_dtype(dtype: torch.dtype, fallback: np.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (``fallback`` for one numpy lacks, e.g. bfloat16)."""
    try:
        # on the CPU whatever torch's default device (a CUDA tensor has no numpy view: TypeError, the fallback)
        return torch.empty(0, dtype=dtype, device="cpu").numpy().dtype
    except TypeError:
        return fallback


def model_architecture(model: nn.Module) -> str:
    """A hash of what the weights do not say about a model: its module tree (``repr``: layer types, activation
    modules, sizes) and its configuration (pypattern's ``cfg``, a Hugging Face ``config``), so that a checkpoint
    does not resume on another architecture with the same weights."""
    parts = [type(model).__qualname__, repr(model)]
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        parts.append(repr(cfg))
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):
        parts.append(config.to_json_string())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _hook_id(fn) -> str:
    """A hook by its name and the hash of its code (of its class's ``__call__`` for a callable object), not by what
    it captured: hooks commonly keep what they saw in a dict or list they close over, which changes with every
    forward and would make the same run look like another."""
    name = io.callable_name(fn)
    f = getattr(getattr(fn, "func", fn), "__func__", getattr(fn, "func", fn))  # partials and bound methods
    code = getattr(f, "__code__", None)
    if code is None:
        code = getattr(vars(type(f)).get("__call__"), "__code__", None)
    return f"{name}:{io._code_hash(code)}" if code is not None else name


def model_hooks(model: nn.Module) -> list[list[str]] | None:
    """The hooks that change what ``model`` computes, for a fingerprint: each forward (pre-)hook and backward
    (pre-)hook registered on one of its modules (by module name, kind, and the hook's name and code), and torch's
    global module hooks. None when there is none (the usual case: the item is then left out of the fingerprint).
    A hook registered again is the same hook; a hook added, removed or with other code is another run (what a hook
    captures is not compared: the caller's promise, as for a loss function's state)."""
    from torch.nn.modules import module as torch_module

    out = []
    for name, m in model.named_modules():
        for kind in _HOOK_DICTS:
            for fn in (getattr(m, kind, None) or {}).values():
                out.append([name, kind.strip("_"), _hook_id(fn)])
    for kind in (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
    ):
        for fn in (getattr(torch_module, kind, None) or {}).values():
            out.append(["(global)", kind.strip("_"), _hook_id(fn)])
    return out or None


def training_modes(model: nn.Module) -> list[str] | None:
    """The modules of ``model`` whose loss depends on their ``train()`` / ``eval()`` mode and that are in
    ``train()`` mode as the samplers run it, for a fingerprint: the norms with running statistics (a BatchNorm
    normalises by the batch's statistics in ``train()`` mode, by its running ones in ``eval()`` mode: two different
    losses), by name (``""`` for the model itself). None when there is none, or when the forward is random in
    ``train()`` mode (dropout), which the samplers run in ``eval()`` mode. The mode of any other module does not
    enter the fingerprint: a model whose forward reads no mode resumes in either."""
    if random_in_training(model):
        return None
    names = [
        n
        for n, m in model.named_modules()
        if m.training
        and isinstance(m, nn.modules.batchnorm._NormBase)
        and getattr(m, "running_mean", None) is not None
    ]
    return names or None


def sub_run_path(path: str | os.PathLike | None, tag: str) -> str | None:
    """The checkpoint file of one of several sampler runs a call makes (``run.npz`` -> ``run.<tag>.npz``), so that
    each resumes from its own file; None stays None."""
    if path is None:
        return None
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.{tag}{ext or '.npz'}"


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``checkpoint_state`` arrays of a checkpoint written by :func:`pypattern.sample` (empty if none)."""
    arrays, _ = io.load(path, kind=CHECKPOINT_KIND)
    return {k[6:]: v for k, v in arrays.items() if k.startswith("state/")}


#: the items :func:`run_fingerprint` leaves out at these values (a mismatch message shows them)
FINGERPRINT_DEFAULTS = {
    "sampler": "sgld",
    "num_init_loss_batches": None,
    "record_observables": True,
    "training": "no norm with running statistics in train() mode",
}


def stored_calibration(path: str) -> Mapping | None:
    """The step-size calibration recorded in the checkpoint ``path`` (``{"key": ..., "report": ...}``, see
    :func:`pypattern.sampling.auto.calibrate_or_resume`), read from its header alone; None when the file holds none
    or is not a checkpoint this pypattern reads (the run's own load then names what is wrong with it)."""
    return stored_step(path)[0]


def stored_step(path: str) -> tuple[Mapping | None, int | float | None]:
    """What the checkpoint ``path`` records of its run's step size, from one read of its header (without its
    arrays): ``(calibration, given)``, the step-size calibration of :func:`stored_calibration`, or, for a run at a
    given step (no calibration in the header), that step (its fingerprint's ``step_size``). ``(None, None)`` when
    the file is missing, unreadable or a checkpoint of another format version (the run's own load then names what
    is wrong with it)."""
    try:
        with io._Archive(os.fspath(path), CHECKPOINT_KIND) as archive:
            meta = archive.meta.get("checkpoint")
    except (OSError, ValueError):
        return None, None
    if not isinstance(meta, Mapping) or meta.get("version") != VERSION:
        return None, None
    calibration = meta.get("calibration")
    if calibration is not None:
        return (calibration if isinstance(calibration, Mapping) else None), None
    fp = meta.get("fingerprint")
    step = fp.get("step_size") if isinstance(fp, Mapping) else None
    return None, (step if isinstance(step, int | float) and not isinstance(step, bool) else None)


def run_fingerprint(
    plan: RunPlan, model: nn.Module, loader: Iterable, w_star: Mapping[str, torch.Tensor], data_cache: dict
) -> dict:
    """What identifies a sampler run (see :func:`pypattern.io.fingerprint`): the chain layout, seed and
    hyperparameters (with the sampler and its own hyperparameters, for SGNHT and RMSprop-SGLD), the loss function
    and observables by name, the moving parameters and masks, the modules in ``train()`` mode
    (:func:`training_modes`), a hash of every weight and buffer of ``model``, and a hash of the data
    (:func:`~pypattern.sampling.data.hash_data`)."""
    return io.fingerprint(
        num_chains=plan.num_chains,
        num_draws=plan.num_draws,
        num_burnin_steps=plan.num_burnin_steps,
        num_steps_bw_draws=plan.num_steps_bw_draws,
        seed=plan.seed,
        **plan.hyper,
        # the default sampler, SGLD, adds no item
        **({} if plan.sampler == "sgld" else {"sampler": plan.sampler, **plan.sampler_hyper}),
        grad_accum_steps=plan.grad_accum_steps,
        init_loss=plan.init_loss,
        # L_n(w*) from the first k batches (None, the whole epoch, adds no item)
        **(
            {}
            if plan.num_init_loss_batches is None
            else {"num_init_loss_batches": plan.num_init_loss_batches}
        ),
        chains=plan.chains,
        # masks before the moving parameters they choose when restrict_to is not given (a refusal names masks)
        masks=[{n: m.to(torch.float64) for n, m in (r.masks or {}).items()} for r in plan.runs],
        moving=[list(r.moving) for r in plan.runs],
        loss_fn=plan.loss_fn,
        observables=dict(plan.observables),
        # observables computed but not recorded (their traces would be missing from the draws before a resume)
        **({} if plan.record_observables or not plan.observables else {"record_observables": False}),
        data=hash_data(loader, plan.key(0, stream=1), data_cache),
        architecture=model_architecture(model),
        # the modules in train() mode (none, the default, adds no item): a BatchNorm's loss differs between modes
        **({} if (modes := training_modes(model)) is None else {"training": modes}),
        # forward and backward hooks on the model's modules (none, the usual case, adds no item)
        **({} if (hooks := model_hooks(model)) is None else {"hooks": hooks}),
        **{f"weights[{n}]": t for n, t in w_star.items()},
        **{f"buffers[{n}]": b for n, b in model.named_buffers()},
        # how the draws are computed (RESUMABLE_SETTINGS): stored, not compared; another value resumes with a warning
        backend=plan.backend,
        batched=plan.batched,
        # the device of the moving weights, the chains' device (the device type alone: cuda:0 and cuda:1 compute
        # alike)
        device=next((p.device.type for p in model.parameters() if p.requires_grad), None),
        # the weights' and buffers' dtypes: not compared, but named when a weight differs by its dtype (check_dtypes)
        **{DTYPE_ITEM: model_dtypes([*w_star.items(), *model.named_buffers()])},
    )
