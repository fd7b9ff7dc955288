"""Chains over ranks: the sampler, the LLC and susceptibilities with ``torch.distributed``.

Launch one process per rank (``torchrun --nproc-per-node N script.py``, or any ``init_process_group``: gloo on CPU,
nccl on GPU) and call these instead of the single-process functions, with the same arguments, on every rank.
Chain ``g`` (global index, over runs) runs on rank ``g % world_size`` with exactly the noise and data it has in a
single-process call, so the result is the single-process result: every rank ends with the whole loss trace (and
observables, and susceptibility accumulators), combined exactly (each chain's rows come from the one rank that
ran it). Callbacks run on the rank that owns the chain. With ``checkpoint=path`` each rank writes and resumes its
own file (``path`` with ``.rank{r}of{world}`` before the suffix). A failure on one rank (a diverging chain, a bad
argument) makes every rank raise instead of leaving the others waiting in a collective. Every call first checks
that the ranks were given the same model (its architecture, named where it differs, its BatchNorms' modes and
its hooks) and the same arguments (hyperparameters, chain layout, seed, model weights, the data: its first batch,
its batches per epoch and its samples, ...): a difference raises ``ValueError`` on every rank, naming the first
differing argument and its value on each rank (an argument left out as its default's value; numbers by value, so
``nbeta=20`` and ``nbeta=20.0`` are the same call). Every rank reads the whole data set: do not shard it over the
ranks (the chains are what is spread). Checkpoint paths that name one place in other words (relative
and absolute, through a symbolic link to a folder, a trailing separator) are the same argument; a checkpoint of
a run over another number of ranks is not resumed (each number has its own files), with a warning. Callables
(loss functions, observables, metrics) are compared by what they compute (:func:`pypattern.io.callable_id`: their code, defaults, closure values
and the module globals they read), with devices taken without their index (``cuda:0`` on one rank is ``cuda:1`` on
the next): a loss function that reads its rank (or another value that differs between ranks) is refused, as it
would not give the single-process result.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import io
from .sampling.data import ChainData
from .sampling.diagnostics import (
    NonFiniteLossError,
    SamplingDivergedError,
    check_mixing,
    check_stationarity,
    ess,
    r_hat,
    user_stacklevel,
)
from .sampling.llc import LLCResult, llc_of_samples
from .sampling.optim import chain_seed
from .sampling.plan import check_seed, refuse_unknown_keywords
from .sampling.results import SampleResult
from .sampling.runner import sample as _sample

__all__ = ["owned_chains", "sample", "estimate_llc", "susceptibilities", "rank_path"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "pypattern.distributed needs an initialised process group: launch with torchrun, or call "
            "torch.distributed.init_process_group first"
        )
    return dist


def owned_chains(num_total: int, rank: int, world_size: int) -> list[int]:
    """The global chain indices rank ``rank`` runs: ``rank, rank + world_size, ...``."""
    return list(range(rank, num_total, world_size))


def rank_path(path: str | os.PathLike, rank: int, world_size: int) -> str:
    """Rank ``rank``'s checkpoint: ``run.npz`` -> ``run.rank0of2.npz``."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.rank{rank}of{world_size}{ext}"


def _hash64(value) -> int:
    return int(hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:15], 16)


def _first_batch_hash(loader, seed) -> str:
    """A hash of the first batch chain 0 reads (or of the error reading it)."""
    try:
        seed = check_seed(seed)  # (an integer array as the sampler reads it)
        seed0 = seed if isinstance(seed, int) else seed[0]
        return io.hash_batch(ChainData(loader, chain_seed(seed0, 0, stream=1), {}).next())
    except Exception as e:  # noqa: BLE001 - compared across ranks; the sampler reports it
        return f"error: {type(e).__name__}: {e}"


def _data_summary(loader, seed) -> dict:
    """What the ranks compare of the data: the first batch chain 0 reads, the batches of an epoch and the samples
    of the data set (None where the loader has no length), so that ranks given data sets of other sizes whose
    first batches agree (an unshuffled loader over a longer data set on one rank) are refused instead of each
    sampling, and measuring ``L_n(w*)`` on, its own data."""
    from .sampling.data import batches_per_epoch

    try:
        samples = int(len(loader.dataset))
    except (AttributeError, TypeError):
        samples = None
    try:
        batches = batches_per_epoch(loader)
    except Exception:  # noqa: BLE001 - a loader the sampler refuses: compared as unknown, the sampler reports it
        batches = None
    return {"first_batch": _first_batch_hash(loader, seed), "batches_per_epoch": batches, "samples": samples}


#: a device with its index (``device(type='cuda', index=1)`` as ``repr`` writes it, or ``"cuda:1"``): the rank's own
_DEVICE_REPR = re.compile(r"device\(type='(\w+)', index=\d+\)")
_DEVICE_NAME = re.compile(r"(cpu|cuda|mps|xpu|xla|meta|hpu|mtia|npu|ipu|privateuseone):\d+")


def _without_device_index(v):
    """A canonical (JSON) value with every device's index dropped: each rank captures its own device."""
    if isinstance(v, dict):
        return {k: _without_device_index(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_without_device_index(x) for x in v]
    if isinstance(v, str):
        return _DEVICE_NAME.sub(r"\1", _DEVICE_REPR.sub(r"device(type='\1')", v))
    return v


def _by_value(v):
    """A canonical (JSON) value with its integers that a float holds exactly written as floats, for comparing
    across ranks: ``nbeta=20`` on one rank and ``20.0`` on another (or ``weight_decay=0`` against its default
    ``0.0``) are the same call."""
    if isinstance(v, dict):
        return {k: _by_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_by_value(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) <= 2**53:
        return float(v)
    return v


def _rank_fingerprint(items: dict) -> dict:
    """``items`` canonicalised as :func:`pypattern.io.fingerprint` does (callables as
    :func:`pypattern.io.callable_id`: by their code, defaults, closure values and the globals they read, so two
    loss functions of one name that compute different things differ), without device indices."""
    return {k: _without_device_index(v) for k, v in io.fingerprint(**items).items()}


def check_same_arguments(group, defaults: dict | None = None, **items) -> None:
    """Raise ``ValueError`` on every rank when the ranks of ``group`` were given different ``items`` (compared by
    :func:`pypattern.io.fingerprint`: tensors by a hash of their bytes, callables by :func:`pypattern.io.callable_id`;
    devices without their index, as each rank has its own), naming the first differing one and its value on each
    rank; nothing when all agree. An item a rank leaves out counts as its value in ``defaults`` (the value the
    call takes when it is not given), so a default given on one rank only is the same call; an item without a
    default given on some ranks only is named as such. Every rank runs the same collectives either way."""
    dist = _dist()
    defaults = defaults or {}
    # on every rank, or raised on every rank (a weight one rank cannot read, such as a meta tensor, would otherwise
    # leave the others waiting in the collectives below)
    fp = _agree(lambda: _rank_fingerprint(items), group)
    names = sorted(fp)
    implied: set[str] = set()  # the items left out here that count as their defaults

    def spread(values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor(values + [-v for v in values], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t[: len(values)], -t[len(values) :]  # max and min over ranks

    hi, lo = spread([_hash64(names)])
    if hi[0] != lo[0]:
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, names, group=group)
        union = sorted(set().union(*map(set, every)))
        odd = [k for k in union if k not in defaults and not all(k in ns for ns in every)]
        if odd:
            given = [r for r, ns in enumerate(every) if odd[0] in ns]
            raise ValueError(
                f"the ranks were given different arguments: {odd[0]!r} is given on rank(s) {given} only (this is "
                f"rank {dist.get_rank(group)}); every rank must make the same call"
            )
        implied = {k for k in union if k not in fp}
        fp.update(_rank_fingerprint({k: defaults[k] for k in sorted(implied)}))
        names = union
    hi, lo = spread([_hash64(_by_value(fp[k])) for k in names])
    differ = [k for k, a, b in zip(names, hi.tolist(), lo.tolist()) if a != b]
    if differ:
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, {k: (fp[k], k in implied) for k in differ}, group=group)
        # the first differing item in the caller's order, the arguments left out here (keyword arguments, which
        # come before what the caller adds: the data's hash, the weights) first
        order = {k: i for i, k in enumerate([*sorted(implied), *items])}
        k = min(differ, key=order.__getitem__)
        raise ValueError(
            f"the ranks were given different values of {k!r}: {_values_by_rank(k, [e[k] for e in every])} (this "
            f"is rank {dist.get_rank(group)}); every rank must make the same call with the same arguments"
        )


def _values_by_rank(name: str, values: list) -> str:
    """What each rank holds for item ``name`` (``values[r]``: its canonical value and whether it is the default
    the rank left out): the values with the ranks that hold them, or, for long values (a callable's code and
    captures), where the first rank whose value differs from rank 0's departs from it."""

    def text(v) -> str:
        value, implied = v
        return f"{io._short(value, 60)}{' (the default)' if implied else ''}"

    groups: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(json.dumps(v[0], sort_keys=True), []).append(r)
    if all(len(io._short(v[0], 61)) <= 60 for v in values):
        return ", ".join(f"{text(values[rs[0]])} on rank(s) {rs}" for rs in groups.values())
    other = next(r for r, v in enumerate(values) if v[0] != values[0][0])
    where, a, b = io._first_difference(name, values[0][0], values[other][0])
    # a key one rank lacks is shown as none
    a, b = ("(none)" if isinstance(v, io._NotSet) else io._short(v, 60) for v in (a, b))
    return f"{where} = {a} on rank 0, {b} on rank {other}"


def _sample_defaults() -> dict:
    """The keyword arguments of :func:`pypattern.sample` that have defaults, and their defaults."""
    import inspect

    return {
        k: p.default
        for k, p in inspect.signature(_sample).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _sample_items(model, loader, kwargs: dict) -> dict:
    """What the ranks of a distributed call must agree on: the keyword arguments (callbacks aside: they run on
    the rank that owns the chain; ``device`` aside: each rank's own) under pypattern's names and without those
    equal to their defaults (``lr=`` on one rank and ``step_size=`` on another, or a default given on one rank
    only, are the same call; :func:`check_same_arguments` compares a left-out argument as its default), the
    model's weights and buffers, and the first batch the data gives."""
    from .sampling.vocabulary import translate

    # (callbacks run on their rank; each rank samples on its own device)
    items = {k: v for k, v in kwargs.items() if k not in ("callbacks", "checkpoint_state", "quiet", "device")}
    items = translate(items, where="the call")
    if "seed" in items:  # as the sampler reads it: [3, 4] on one rank and np.array([3, 4]) on another agree
        items["seed"] = check_seed(items["seed"])
    defaults = _sample_defaults()
    for k in list(items):
        if k not in defaults:
            continue
        d, v = defaults[k], items[k]
        if type(v) is type(d) and isinstance(v, (int, float, str, bool)) and v == d:
            del items[k]
    items["data"] = _data_summary(loader, kwargs.get("seed", 0))
    items.update({f"weights[{n}]": t for n, t in model.state_dict().items()})
    return items


#: fields of pypattern's ``TransformerConfig`` that set only the initial weights (compared as weights)
_INIT_FIELDS = ("seed", "init_range")


def _architecture(model) -> dict:
    """The model's architecture as the ranks compare it: its class, its configuration (pypattern's ``cfg``, a
    Hugging Face ``config`` without its bookkeeping: the path it was read from, the library version) and each
    module's type and settings by name, so that a difference is named where it lies
    (``architecture.cfg.positional_embedding_type``, ``architecture.modules.blocks.0.mlp``)."""
    out: dict = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        fields = cfg.to_dict() if callable(getattr(cfg, "to_dict", None)) else repr(cfg)
        # (how the weights were first drawn is left out: the weights themselves are compared)
        out["cfg"] = (
            {k: v for k, v in fields.items() if k not in _INIT_FIELDS} if isinstance(fields, dict) else fields
        )
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
        out["config"] = {
            k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
        }
    out["modules"] = {
        name or "(the model)": f"{type(m).__qualname__}({m.extra_repr()})"
        for name, m in model.named_modules()
    }
    return out


def _model_items(model) -> dict:
    """What the ranks' models must agree on besides their weights, compared before the weights (a model of
    another architecture has other weights, which would be named first): the architecture, the modules in
    ``train()`` mode whose loss depends on it (BatchNorm) and the hooks on the model's modules (as a sampler's
    checkpoint records them: :func:`pypattern.sampling.checkpoint.training_modes` and ``model_hooks``)."""
    from .sampling.checkpoint import model_hooks, training_modes

    hooks: dict = {}  # "module (kind)" -> the hooks in order, so that a difference is named by module and kind
    for module, kind, hook in model_hooks(model) or []:
        hooks.setdefault(f"{module or '(the model)'} ({kind})", []).append(hook)
    return {"architecture": _architecture(model), "training": training_modes(model) or [], "hooks": hooks}


def _checkpoint_compared(items: dict, group, folder: bool) -> None:
    """Put in ``items`` the ``checkpoint`` the ranks compare: the path as given when every rank gave the same one
    (a ``str`` or an ``os.PathLike`` of it), else where it resolves to, so that paths naming one place in other
    words (relative and absolute, through a symbolic link to a folder, with a trailing separator, a ``Path`` and a
    ``str``) are the same call. A ``folder`` (susceptibilities' checkpoint, whose files are made in it) resolves
    whole; a file resolves its folder, and keeps its name, as each rank's file is made beside it from that name
    (``run.rank{r}of{world}.npz``). Every rank takes part in the same collective."""
    dist = _dist()
    given = items.get("checkpoint")
    raw = os.fsdecode(given) if isinstance(given, str | bytes | os.PathLike) else None
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, raw, group=group)
    if raw is None or all(r == raw for r in every):
        if raw is not None:
            items["checkpoint"] = raw
        return
    full = os.path.abspath(raw)
    if folder:
        items["checkpoint"] = os.path.realpath(full)
    else:
        items["checkpoint"] = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))


def _warn_other_world_sizes(path, world: int) -> None:
    """Warn when ``path`` has no file of a run over ``world`` ranks but has files of a run over another number of
    ranks (``run.rank0of4.npz`` beside ``run.npz``): each world size has its own files, so this run starts afresh
    instead of resuming that one."""
    import warnings

    try:
        path = os.fspath(path)
        root, ext = os.path.splitext(path)
        folder, stem = os.path.split(root)
        if os.path.exists(rank_path(path, 0, world)):
            return
        pattern = re.compile(re.escape(stem) + r"\.rank(\d+)of(\d+)" + re.escape(ext) + "$")
        sizes = sorted(
            {int(m[2]) for n in os.listdir(folder or ".") if (m := pattern.match(n)) and int(m[2]) != world}
        )
    except (OSError, TypeError, ValueError):
        return  # not a folder that can be listed: the sampler names what is wrong with the path
    if sizes:
        other = sizes[0]
        warnings.warn(
            f"checkpoint={path!r}: files of a run over {other} rank(s) exist ({rank_path(path, 0, other)!r}, ...), "
            f"none of one over {world}: each number of ranks has its own files, so this run starts afresh; "
            f"launch {other} rank(s) to resume that run",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _agree(fn: Callable, group):
    """Run ``fn`` on every rank; if it raised on any rank, raise on all (the local error where there is one)."""
    dist = _dist()
    err, out = None, None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        err = e
    flag = torch.tensor([0 if err is None else dist.get_rank(group) + 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag):
        return out
    # which rank diverged, if one did: every rank then raises SamplingDivergedError, so that a caller that runs a
    # diverged run again at half the step (susceptibilities at a calibrated step) does so on every rank
    diverged = None
    if isinstance(err, SamplingDivergedError) and not isinstance(err, NonFiniteLossError):
        diverged = (dist.get_rank(group), str(err), err.chain, err.draw, err.step, err.step_size)
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, diverged, group=group)
    if err is not None:
        raise err
    first = next((d for d in every if d is not None), None)
    if first is not None:
        r, msg, chain, draw, step, step_size = first
        raise SamplingDivergedError(
            f"rank {r} failed: {msg}", chain=chain, draw=draw, step=step, step_size=step_size
        )
    raise RuntimeError(f"rank {int(flag) - 1} failed (see its error); this rank stops too")


def _combine_rows(arr: np.ndarray, rows: Sequence[int], group) -> np.ndarray:
    """Rows ``rows`` from this rank, the others from the ranks that own them (sum of zero-filled copies: exact)."""
    dist = _dist()
    part = np.zeros_like(arr, dtype=np.float64)
    if len(rows):
        part[list(rows)] = arr[list(rows)]
    t = torch.from_numpy(part)
    dist.all_reduce(t, group=group)
    return t.numpy()


def sample(model, loader, *, group=None, **kwargs) -> SampleResult | list[SampleResult]:
    """:func:`pypattern.sample` with the chains spread over the ranks of ``group`` (the default group if None);
    every rank returns the whole result. Takes the same keyword arguments. Rank 0 warns when the whole loss trace
    is not stationary (split R-hat) or mixes poorly (effective sample size), as one process does; the checks that
    need the chains' last weights (a given step's relaxation and discretisation bias, drift) are not made. At a
    calibrated step (``step_size="auto"``) that runs away on some ranks' chains only, every rank ends at the step
    one process would have run again at (see :func:`_same_calibrated_step`). A chain that diverges raises
    :class:`~pypattern.SamplingDivergedError` on every rank (naming the rank where it diverged). A warning every
    rank gives alike (``step_size="auto"``'s calibration: every rank runs its trials, the same) comes from rank 0
    only, one about a rank's own chains from that rank (:func:`_warned_once`)."""
    return _sample_on_ranks(model, loader, group, kwargs)


def _sample_on_ranks(model, loader, group, kwargs: dict, burnin_default=None):
    """:func:`sample`; ``burnin_default``: the ``num_burnin_steps`` of a call that gives none (``"auto"`` for
    :func:`estimate_llc`), set after the ranks' arguments are compared (a mismatch names what each rank gave)."""
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    runs = kwargs.get("runs")
    R = 1 if runs is None else len(runs)

    def preflight():  # every rank raises if any rank's arguments cannot be read (none waits in a collective)
        if kwargs.get("chains") is not None:
            raise ValueError("pypattern.distributed.sample assigns the chains itself: do not pass chains")
        refuse_unknown_keywords(
            kwargs,
            set(_sample_defaults()) - {"chains"},  # assigned per rank (refused above)
            "pypattern.distributed.sample()",
            "pypattern.sample()'s keywords (documented there) and group",
        )
        c = kwargs.get("num_chains", 4)
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
            raise ValueError(f"num_chains must be an int >= 1, got {c!r}")
        return int(c), _model_items(model), _sample_items(model, loader, kwargs)

    C, model_items, items = _agree(preflight, group)
    check_same_arguments(group, **model_items)
    _checkpoint_compared(items, group, folder=False)
    check_same_arguments(group, _sample_defaults(), **items)
    if burnin_default is not None and kwargs.get("num_burnin_steps") is None:
        kwargs = dict(kwargs, num_burnin_steps=burnin_default)
    mine = owned_chains(R * C, rank, world)
    warn = kwargs.pop("warn_nonstationary", True)
    ckpt = kwargs.pop("checkpoint", None)
    if ckpt is not None:
        if rank == 0:
            _warn_other_world_sizes(ckpt, world)
        ckpt = rank_path(ckpt, rank, world)
    t0 = time.perf_counter()

    def run():
        out = _agree(
            lambda: _sample(model, loader, chains=mine, checkpoint=ckpt, warn_nonstationary=False, **kwargs),
            group,
        )
        results = out if runs is not None else [out]
        if results and results[0].config.get("auto_step") is not None:
            out = _same_calibrated_step(out, model, loader, mine, ckpt, kwargs, group)
        return out

    # a warning every rank gives alike (the step calibration's: its trials are the same on every rank) once
    out = _warned_once(run, group)
    results = out if runs is not None else [out]
    seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
    for r, res in enumerate(results):
        rows = [g - r * C for g in mine if r * C <= g < (r + 1) * C]
        res.loss_trace = _combine_rows(res.loss_trace, rows, group)
        # a rank that owns none of this run's chains recorded no observable: every rank combines the same names
        shapes: list = [None] * world
        dist.all_gather_object(shapes, {k: tuple(v.shape) for k, v in res.observables.items()}, group=group)
        names = sorted({k for sh in shapes for k in sh})
        res.observables = {
            k: _combine_rows(
                res.observables[k]
                if k in res.observables
                else np.zeros(next(sh[k] for sh in shapes if k in sh), dtype=np.float64),
                rows,
                group,
            )
            for k in names
        }
        res.r_hat, res.ess = r_hat(res.loss_trace), ess(res.loss_trace)
        res.seconds = float(seconds)
        if warn and rank == 0:
            # the whole trace's R-hat, then its effective sample size, as one process warns
            check_stationarity(res.loss_trace) and check_mixing(res.loss_trace)
    return out


def _warned_once(fn: Callable, group):
    """``fn()``, called on every rank, with the warnings it gives shown once over the ranks: rank 0's all, another
    rank's only those rank 0 did not give (another category or text). A warning that reads only results every rank
    holds alike (a step calibration's, whose trials every rank runs the same) so comes from rank 0 alone, and one
    of a rank's own chains (a callback's, a run at a calibrated step that ran away there) from its rank. The
    warnings are shown when ``fn`` returns, through the ``warnings.showwarning`` in force, after the filters in
    force chose them (an ignored warning is not shown, one turned into an error raises where it is given). When
    ``fn`` raises, each rank shows its own before the error propagates (no collective then)."""
    dist = _dist()
    kept: list = []
    shown = warnings.showwarning

    def keep(message, category, filename, lineno, file=None, line=None):
        kept.append((message, category, filename, lineno, file, line))

    warnings.showwarning = keep
    try:
        out = fn()
    except BaseException:
        warnings.showwarning = shown
        for w in kept:
            shown(*w)
        raise
    warnings.showwarning = shown
    mine = [(f"{w[1].__module__}.{w[1].__qualname__}", str(w[0])) for w in kept]
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    first = set() if dist.get_rank(group) == 0 else set(every[0])
    for w, key in zip(kept, mine, strict=True):
        if key not in first:
            shown(*w)
    return out


def _same_calibrated_step(out, model, loader, mine, ckpt, kwargs: dict, group):
    """The ranks' results at one calibrated step. A run at a calibrated step that diverges or runs away is run
    again at half the step (:func:`pypattern.sampling.runner.rerun_at_half_step`), in one process for every chain;
    here each rank reruns its own chains only, so a rank whose chains ran away ends at a smaller step than the
    others. Until the ranks agree, each rank at a larger step than the smallest runs its chains again at the
    smallest (halving it further where they run away there, within the reruns one process allows): the step is
    the largest of the halvings at which no chain runs away, the single-process step, and every rank ends with the
    report of a rank that reached it."""
    from .sampling.runner import AUTO_RUN_HALVINGS, step_calibrated_by_caller

    dist = _dist()
    world = dist.get_world_size(group)

    def first(o):
        return o[0] if isinstance(o, list) else o

    while True:
        config = first(out).config
        mine_step = (float(config["step_size"]), config["auto_step"])
        every: list = [None] * world
        dist.all_gather_object(every, mine_step, group=group)
        smallest = min(step for step, _ in every)
        if all(step == smallest for step, _ in every):
            break
        report = next(rep for step, rep in every if step == smallest)

        def rerun(report=report, smallest=smallest, out=out, config=config):
            if float(first(out).config["step_size"]) == smallest:
                return out
            for cb in kwargs.get("callbacks") or ():
                cb.reset()
            left = AUTO_RUN_HALVINGS - len(report.get("reruns") or ())
            given = {
                **{k: v for k, v in kwargs.items() if k not in ("step_size", "auto_step_options")},
                "num_burnin_steps": int(config["num_burnin_steps"]),
            }
            step, rep = smallest, dict(report, reruns=list(report.get("reruns") or ()))
            for k in range(left + 1):
                try:
                    with step_calibrated_by_caller():
                        res = _sample(
                            model,
                            loader,
                            chains=mine,
                            checkpoint=ckpt,
                            warn_nonstationary=False,
                            step_size=step,
                            **given,
                        )
                except SamplingDivergedError as e:
                    if k == left or isinstance(e, NonFiniteLossError):
                        raise
                    old, step = step, step / 2
                    rep["reruns"].append(
                        dict(
                            step_size=old,
                            chain=int(e.chain),
                            draw=int(e.draw),
                            step=int(e.step),
                            message=str(e),
                        )
                    )
                    rep["reason"] = (
                        f"{rep.get('reason', '')}; the run at {old:.3g} diverged or ran away (chain {e.chain}, "
                        f"step {e.step}: an excursion the trials did not meet) and was run again from the start "
                        f"at {step:.3g}"
                    )
                    continue
                rep["chosen"] = step
                for r in res if isinstance(res, list) else [res]:
                    r.config["auto_step"] = rep
                return res
            raise AssertionError("unreachable")

        out = _agree(rerun, group)
    # one report on every rank: that of the lowest rank at the step
    report = next(rep for step, rep in every if step == smallest)
    for r in out if isinstance(out, list) else [out]:
        r.config["auto_step"] = report
    return out


def estimate_llc(model, loader, *, group=None, **kwargs) -> LLCResult | list[LLCResult]:
    """:func:`pypattern.estimate_llc` with the chains spread over the ranks; every rank returns the estimate (one
    per run with ``runs=``). Rank 0 gives the estimate's warnings (a calibrated step's bias and short trials, an
    estimate above ``d / 2``), once, as one process does: they read the whole result, which every rank holds.
    With a calibrated step and no ``num_burnin_steps`` the run burns in as :func:`pypattern.estimate_llc`'s does
    (``num_burnin_steps="auto"``): every rank runs the same calibration, so chooses the same burn-in."""
    # a calibrated step's run burns in as long as the step needs (when no num_burnin_steps is given)
    out = _sample_on_ranks(model, loader, group, dict(kwargs), burnin_default="auto")
    if _dist().get_rank(group) == 0:
        return llc_of_samples(out, model, kwargs.get("masks"), kwargs.get("warn_nonstationary", True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return llc_of_samples(out, model, kwargs.get("masks"), kwargs.get("warn_nonstationary", True))


def susceptibilities(model, loader, probe, components, *, group=None, **kwargs):
    """:func:`pypattern.susceptibilities` with every run's chains spread over the ranks (each component's
    per-chain accumulators are exchanged at the end, so chi, its standard error and the per-chain estimates equal
    the single-process ones); every rank returns the result. ``checkpoint`` must be a folder every rank sees:
    rank 0 writes the finished rows, every rank reads them, and each rank checkpoints its chains of the group
    being sampled (draws and accumulators) in its own file."""
    from . import susceptibility as sus

    dist = _dist()
    rank = dist.get_rank(group)

    def preflight():  # every rank raises if any rank's arguments cannot be read (none waits in a collective)
        comps = dict(components) if isinstance(components, dict) else list(components)
        return _model_items(model), _sample_items(model, loader, kwargs), comps

    model_items, items, comps = _agree(preflight, group)
    check_same_arguments(group, **model_items)
    _checkpoint_compared(items, group, folder=True)
    check_same_arguments(group, _sample_defaults(), probe=probe, components=comps, **items)

    def sampler(m, ld, *, callbacks, **kw):
        return sample(m, ld, group=group, callbacks=callbacks, **kw)

    def reduce(accs):
        # each chain's accumulator is filled on its owner rank only: gather and keep the owner's state
        states = [a.state_dict() if a.count else None for a in accs]
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, states, group=group)
        for i, a in enumerate(accs):
            owners = [s[i] for s in every if s[i] is not None]
            if len(owners) != 1:
                raise RuntimeError(f"chain {i}: {len(owners)} ranks hold draws, expected exactly one")
            a.load_state_dict(owners[0])
        return accs

    world = dist.get_world_size(group)
    execution = sus.Execution(
        sample=sampler,
        reduce=reduce,
        write_rows=rank == 0,
        local_path=lambda p: rank_path(p, rank, world),
        # rank 0 writes the finished rows: a failed write raises on every rank
        agree=lambda fn: _agree(fn, group),
    )

    def run():
        with sus.executing(execution):
            return sus.susceptibilities(model, loader, probe, components, **kwargs)

    # a warning every rank gives alike (the step calibration's, a row's estimate read from the whole result) once
    return _warned_once(run, group)
