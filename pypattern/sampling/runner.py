"""The chain runner: burn-in, draws, thinning, many chains (one after another, or batched with torch.func),
divergence detection, observables, callbacks, checkpoints and resume."""

from __future__ import annotations

import copy
import inspect
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .. import io
from .._threads import pinned_threads
from ..ops.sgld import sgld_step_
from .diagnostics import check_stationarity, ess, r_hat
from .optim import (
    SGLD,
    SGLD_DEFAULTS,
    chain_seed,
    check_hyperparameters,
    matches,
    resolve_step_fn,
    splitmix64,
)
from .results import SampleResult
from .vocabulary import translate

__all__ = ["SamplingDivergedError", "default_nbeta", "load_checkpoint_state", "sample"]

_CKPT_VERSION = 1
CHECKPOINT_KIND = "sample-checkpoint"


BATCHED_MAX_PARAMS = 4096  # batched=None runs chains batched (vmap) up to this many parameters,
BATCHED_MIN_CHAINS = 8  # or when at least this many chains run together
BATCHED_MAX_STACKED = 1 << 24  # and chains x parameters stay under this (64 MB of float32 weights)
_GLOBAL_RNG_LOCK = threading.Lock()  # torch's global RNG, seeded per epoch of a chain's data (cores > 1)


class SamplingDivergedError(FloatingPointError):
    """A chain's loss, gradient or parameters became NaN or Inf. Attributes: ``chain``, ``draw``, ``step``,
    ``step_size``."""

    def __init__(self, msg, *, chain, draw, step, step_size):
        super().__init__(msg)
        self.chain, self.draw, self.step, self.step_size = chain, draw, step, step_size


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _batch_size_of(batch) -> int:
    leaves = []
    tree_map(lambda x: leaves.append(x) if isinstance(x, torch.Tensor) else None, batch)
    if not leaves:
        raise ValueError("cannot infer the batch size: the batch holds no tensor")
    return int(leaves[0].shape[0])


def default_nbeta(loader, grad_accum_steps: int = 1) -> float:
    """devinterp's default ``nbeta = m / ln m``, ``m = batch_size * grad_accum_steps`` (the batch size is read
    from ``loader.batch_size`` or from the first batch)."""
    bs = getattr(loader, "batch_size", None)
    if bs is None:
        bs = _batch_size_of(next(iter(loader)))
    m = int(bs) * int(grad_accum_steps)
    if m < 2:
        raise ValueError(f"default nbeta needs batch_size * grad_accum_steps >= 2, got {m}; pass nbeta")
    return m / math.log(m)


def resolve_hyperparameters(
    given: Mapping[str, Any], optimizer_kwargs: Mapping[str, Any] | None, *, loader, grad_accum_steps: int = 1
) -> dict[str, float | None]:
    """The six SGLD hyperparameters under pypattern's names from a call's keywords (either vocabulary) and a
    devinterp-style ``optimizer_kwargs`` (whose entries override the keywords); defaults: ``step_size=1e-4``,
    ``nbeta = default_nbeta(loader)``, the others as :class:`SGLD`."""
    hyper = translate(given, where="the keyword arguments")
    okw = translate(dict(optimizer_kwargs or {}), where="optimizer_kwargs", drop_none=False)
    unknown = set(okw) - set(SGLD_DEFAULTS)
    if unknown:
        known = sorted({*SGLD_DEFAULTS, "lr", "noise_level", "bounding_box_size", "temperature"})
        raise ValueError(f"optimizer_kwargs has unknown keys {sorted(unknown)}; known are {known}")
    hyper.update(okw)
    hyper = {**SGLD_DEFAULTS, "step_size": 1e-4, **hyper}
    if hyper.get("nbeta") is None:
        hyper["nbeta"] = default_nbeta(loader, grad_accum_steps)
    return check_hyperparameters(hyper)


def split_loss(out) -> torch.Tensor:
    """The loss from what a loss function returned: a tensor, a tuple (loss first), a dict with ``"loss"`` or an
    object with ``.loss`` (devinterp's rules)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out:
        return out[0]
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if hasattr(out, "loss"):
        return out.loss
    raise TypeError(
        f"loss_fn must return a tensor, a tuple, a dict with 'loss' or an object with .loss, got {out!r}"
    )


def default_loss_fn(model, batch) -> torch.Tensor:
    """``batch = (x, y)``: cross-entropy of ``model(x)`` for integer ``y``, else mean squared error."""
    if not isinstance(batch, tuple | list) or len(batch) < 2:
        raise TypeError("the default loss_fn needs batches (x, y); pass loss_fn(model, batch) for other data")
    x, y = batch[0], batch[1]
    out = model(x)
    if not torch.is_floating_point(y):
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, y)


def _to_device(batch, device):
    if isinstance(batch, tuple | list) and all(
        isinstance(x, torch.Tensor) and x.device == device for x in batch
    ):
        return batch
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


class _ChainData:
    """The batches of one chain: a deterministic stream keyed by ``(seed, chain, epoch)``.

    Each epoch starts ``iter(loader)`` with torch's RNG (and the loader's own generator, if it has one) seeded
    from the key, so shuffling is reproducible, differs between chains and does not depend on the order in which
    chains run. A ``DataLoader`` over a ``TensorDataset`` with the default collate is read by indexing the tensors
    with a keyed permutation (same batch sizes, no per-sample collate). A loader with one batch is read once.
    """

    def __init__(self, loader, key: int, cache: dict):
        self.loader, self.key, self.cache = loader, key, cache
        self.epoch, self.it, self.single = 0, None, None
        dl = loader if isinstance(loader, torch.utils.data.DataLoader) else None
        self.fast = (
            dl is not None
            and isinstance(dl.dataset, torch.utils.data.TensorDataset)
            and dl.num_workers == 0
            and dl.collate_fn is torch.utils.data.default_collate
            and dl.batch_sampler is not None
        )
        self.sequential = dl is not None and isinstance(dl.sampler, torch.utils.data.SequentialSampler)
        try:
            self.length = len(loader)
        except TypeError:
            self.length = None
        if self.length == 1:
            if "single" not in cache:
                cache["single"] = next(iter(loader))
            self.single = cache["single"]

    def _iter(self):
        if self.fast:
            tensors = self.loader.dataset.tensors
            bs = self.loader.batch_sampler
            simple = type(bs) is torch.utils.data.BatchSampler and (
                type(bs.sampler) is torch.utils.data.SequentialSampler
                or (
                    type(bs.sampler) is torch.utils.data.RandomSampler
                    and not bs.sampler.replacement
                    and bs.sampler._num_samples is None
                )
            )
            if simple:  # index with a permutation tensor: no per-batch list of ints
                n = len(tensors[0])
                if type(bs.sampler) is torch.utils.data.RandomSampler:
                    order = torch.randperm(n)
                else:
                    order = torch.arange(n)
                chunks = order.split(bs.batch_size)
                if bs.drop_last and n % bs.batch_size:
                    chunks = chunks[:-1]
                # index_select: torch's advanced indexing took 5x longer for a batch of rows (measured)
                return (tuple(t.index_select(0, ix) for t in tensors) for ix in chunks)

            def gen():
                for idx in bs:
                    ix = torch.as_tensor(idx, dtype=torch.long)
                    yield tuple(t.index_select(0, ix) for t in tensors)

            return gen()
        return iter(self.loader)

    def _new_epoch(self):
        if self.sequential:
            self.it = self._iter()
            return next(self.it)
        seed = splitmix64(self.key ^ self.epoch) & ((1 << 63) - 1)
        sampler = getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)
        gen = getattr(sampler, "generator", None) if not self.fast else None
        # torch's global RNG (and the loader's generator) are seeded for the epoch's order: one chain at a time
        # when chains run in threads
        with _GLOBAL_RNG_LOCK:
            gen_state = gen.get_state() if isinstance(gen, torch.Generator) else None
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    if gen_state is not None:  # the loader's own generator: key it too, then give it back
                        gen.manual_seed(seed)
                    self.it = self._iter()
                    return next(self.it)
            finally:
                if gen_state is not None:
                    gen.set_state(gen_state)

    def next(self):
        if self.single is not None:
            return self.single
        if self.it is None:
            return self._new_epoch()
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            return self._new_epoch()

    def skip(self, n: int) -> None:
        if self.single is not None or n == 0:
            return
        if self.length:
            self.epoch, n = n // self.length, n % self.length
            self.it = None
        for _ in range(n):
            self.next()


class _FunctionalModel:
    """Calls ``module`` with the given parameter/buffer tensors (``torch.func.functional_call``); other
    attributes come from the module."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]):
        self.__dict__["_m"] = module
        self.__dict__["_t"] = tensors

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self._m, self._t, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._m, name)


def _keywords(fn: Callable) -> frozenset | None:
    """The keyword arguments ``fn`` takes, or None when it takes any (``**kwargs``, or no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def _extra_outputs(out) -> tuple:
    """The tensors a loss function returned after the loss (a tuple or list return), detached."""
    if isinstance(out, tuple | list):
        return tuple(x.detach() for x in out[1:] if isinstance(x, torch.Tensor))
    return ()


def _observable_items(observables) -> list[tuple[str, Callable]]:
    if observables is None:
        return []
    if isinstance(observables, Mapping):
        items = list(observables.items())
    else:
        items = []
        for i, fn in enumerate(observables):
            items.append((getattr(fn, "__name__", None) or f"observable_{i}", fn))
    for name, fn in items:
        if not callable(fn):
            raise TypeError(f"observable {name!r} must be callable(model, batch), got {type(fn).__name__}")
    return items


# ----------------------------------------------------------------------------------------------------------------
# run state (what a checkpoint holds)
# ----------------------------------------------------------------------------------------------------------------
class _State:
    def __init__(self, C: int, D: int):
        self.loss = np.full((C, D), np.nan)
        self.done = np.zeros(C, dtype=np.int64)
        self.next_step = np.zeros(C, dtype=np.int64)
        self.obs: dict[str, np.ndarray] = {}
        self.params: dict[int, dict[str, torch.Tensor]] = {}  # in-progress chains' moving params
        self.init_losses: np.ndarray | None = None
        self.seconds = 0.0

    def record_obs(self, name: str, c: int, d: int, value, C: int, D: int) -> None:
        v = (
            value.detach().to("cpu", torch.float64).numpy()
            if isinstance(value, torch.Tensor)
            else np.asarray(value)
        )
        if name not in self.obs:
            self.obs[name] = np.full((C, D, *v.shape), np.nan)
        self.obs[name][c, d] = v

    def save(self, path, fingerprint: dict, mode: str, extra: Callable | None = None) -> None:
        arrays = {"loss_trace": self.loss, "done": self.done, "next_step": self.next_step}
        if extra is not None:  # the caller's state that goes with these draws (e.g. accumulators)
            for k, v in extra().items():
                arrays[f"state/{k}"] = np.asarray(v)
        if self.init_losses is not None:
            arrays["init_losses"] = self.init_losses
        for k, v in self.obs.items():
            arrays[f"obs/{k}"] = v
        for c, ps in self.params.items():
            for n, t in ps.items():
                arrays[f"params/{c}/{n}"] = t.detach().cpu().numpy()
        meta = {"version": _CKPT_VERSION, "fingerprint": fingerprint, "mode": mode, "seconds": self.seconds}
        io.save(path, arrays, {"checkpoint": meta}, kind=CHECKPOINT_KIND)

    @classmethod
    def load(cls, path, C: int, D: int, fingerprint: dict, device, dtypes: dict) -> _State:
        arrays, meta = io.load(path, kind=CHECKPOINT_KIND)
        meta = meta.get("checkpoint", {})
        if meta.get("version") != _CKPT_VERSION:
            raise io.FormatError(
                f"checkpoint {path!r} has version {meta.get('version')}, expected {_CKPT_VERSION}"
            )
        io.check_fingerprint(meta.get("fingerprint"), fingerprint, path)
        st = cls(C, D)
        st.loss, st.done, st.next_step = arrays["loss_trace"], arrays["done"], arrays["next_step"]
        st.init_losses = arrays.get("init_losses")
        st.seconds = float(meta.get("seconds", 0.0))
        for k, v in arrays.items():
            if k.startswith("obs/"):
                st.obs[k[4:]] = v
            elif k.startswith("params/"):
                _, c, n = k.split("/", 2)
                st.params.setdefault(int(c), {})[n] = torch.from_numpy(v).to(device=device, dtype=dtypes[n])
        return st


# ----------------------------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------------------------
def sample(
    model: nn.Module,
    loader: Iterable,
    *,
    loss_fn: Callable | None = None,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    step_size: float | None = None,
    nbeta: float | None = None,
    localization: float = 0.0,
    weight_decay: float = 0.0,
    noise_scale: float | None = None,
    bounding_box: float | None = None,
    noise_level: float | None = None,
    bounding_box_size: float | None = None,
    temperature: float | None = None,
    restrict_to: str | Sequence[str] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    observables: Mapping[str, Callable] | Sequence[Callable] = (),
    callbacks: Sequence[Callable] = (),
    seed: int | Sequence[int] = 0,
    init_loss: float | None = None,
    num_init_loss_batches: int | None = None,
    batched: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    quiet: bool = False,
    backend: str | None = None,
    warn_nonstationary: bool = True,
    runs: Sequence[tuple[str | Sequence[str] | None, Mapping[str, torch.Tensor] | None]] | None = None,
    record_observables: bool = True,
    cores: int = 1,
    grad_accum_steps: int = 1,
    chains: Sequence[int] | None = None,
    checkpoint_state: Callable[[], Mapping[str, np.ndarray]] | None = None,
) -> SampleResult | list[SampleResult]:
    """Run ``num_chains`` SGLD chains from the trained weights ``w*`` (the model's current parameters).

    Chain ``c`` takes ``num_burnin_steps`` steps, then records a draw every ``num_steps_bw_draws`` steps until it
    has ``num_draws``. At each step it evaluates ``loss_fn(model, batch)`` on its next batch, records it (at a
    draw) together with the observables, and takes one SGLD step (:class:`SGLD`, the fused op). The model passed
    in is not modified.

    Parameters
    ----------
    model : nn.Module
        At the weights ``w*`` to sample around.
    loader : iterable of batches
        A ``DataLoader`` (or any re-iterable). Each chain reads its own deterministic stream of batches, keyed by
        ``(seed, chain, epoch)``: shuffling is reproducible and differs between chains.
    loss_fn : callable(model, batch) -> loss, optional
        The batch-mean loss; may return a tensor, a tuple (loss first), a dict with ``"loss"`` or an object with
        ``.loss`` (devinterp's ``evaluate``). Default: cross-entropy for integer targets, else MSE, on
        ``batch = (x, y)``.
    num_chains, num_draws, num_burnin_steps, num_steps_bw_draws : int
        Chain layout (devinterp's names and meanings).
    step_size : float
        SGLD step size ``eps`` (devinterp's ``lr``); default ``1e-4``.
    nbeta : float, optional
        ``n * beta``; default ``batch_size / ln(batch_size)`` (devinterp's default). ``temperature`` is devinterp's
        older name for it.
    localization, weight_decay, noise_scale, bounding_box, restrict_to, masks
        See :class:`SGLD`. ``noise_level`` and ``bounding_box_size`` are devinterp's names for ``noise_scale``
        (default 1) and ``bounding_box``; two names of one hyperparameter must not disagree (ValueError).
    optimizer_kwargs : dict, optional
        devinterp-style ``{"lr", "nbeta", "localization", "weight_decay", "noise_level", "bounding_box_size"}``
        (pypattern's names work too); entries override the keyword arguments above. The result's ``config`` and
        checkpoints use pypattern's names (:mod:`pypattern.sampling.vocabulary`).
    observables : mapping name -> callable(model, batch) -> Tensor or float, or a sequence of callables
        Evaluated (without gradient) at every draw on the draw's batch; traces ``(num_chains, num_draws, *shape)``.
        With batched chains each observable is first tried under ``torch.func.vmap`` (all chains in one call);
        one that does not run under vmap is evaluated chain by chain.
    callbacks : sequence of callable
        Called at every draw with the keyword arguments they accept among ``chain``, ``run``, ``draw``,
        ``step``, ``loss`` (float), ``model`` (the chain's model), ``batch``, ``observables`` (dict) and
        ``outputs`` (the tensors ``loss_fn`` returned after the loss, detached: a loss function returning
        ``(loss, per_sample_losses)`` hands the per-sample losses of the draw's forward to the callbacks without
        a second forward). Stream values into accumulators here. An exception raised by a callback stops the
        run (a checkpoint keeps finished draws).
    seed : int or sequence of ``num_chains`` ints
        Keys every noise value (through :func:`chain_seed`) and the data order; a sequence gives each chain its
        own (chain ``c`` is keyed by ``chain_seed(seed[c], c)``, devinterp's per-chain seeds).
    init_loss : float, optional
        ``L_n(w*)``; default: the mean loss at ``w*`` over ``num_init_loss_batches`` batches.
    num_init_loss_batches : int, optional
        Default ``max(4, num_chains)``, at most one epoch.
    batched : bool, optional
        ``True``: run the chains together (parameters stacked along a chain axis, one ``vmap``-ed forward and
        one backward per step); ``False``: one chain after another; ``None`` (default): batched, if the model
        runs under ``torch.func.vmap`` (no in-place buffer updates, no random ops), for small models (at most
        ``BATCHED_MAX_PARAMS`` = 4096 parameters, where per-step overhead dominates) and whenever at least
        ``BATCHED_MIN_CHAINS`` = 8 chains run together with at most ``BATCHED_MAX_STACKED`` = 2^24 stacked
        parameters; else sequential. Measured per chain-step, one thread (session 2): 4 chains of an MLP with 22k
        / 101k parameters 1.49 / 4.60 ms batched vs 1.35 / 3.86 sequential; 20 chains 1.03 / 3.49 vs 1.52 / 4.02;
        a 10k-parameter transformer 3.62 vs 4.88 (4 chains) and 2.64 vs 4.78 (20 chains). Both give the same
        draws for the same seed, up to float rounding.
    checkpoint : path, optional
        ``.npz`` file (no pickle) rewritten atomically every ``checkpoint_every`` draws with the finished draws and
        the state of unfinished chains. If it exists, the run resumes from it and ends with the same result as an
        uninterrupted run; it must have been written by the same call (checked).
    quiet : bool
        No progress bar.
    backend : str, optional
        Force a backend of the fused SGLD op.
    warn_nonstationary : bool
        Warn (:class:`NonStationaryWarning`) when the split R-hat of the loss trace exceeds 1.1.
    runs : sequence of ``(restrict_to, masks)`` pairs, optional
        Several restricted samplers in one call (instead of ``restrict_to`` and ``masks``): ``num_chains`` chains
        for each run, all batched together when ``batched`` allows (one forward and backward per step for every
        run). Chain ``c`` of run ``r`` has the global index ``r * num_chains + c`` (the ``chain`` a callback
        receives, with ``run=r``) and the noise and data of chain ``c`` of a separate call with that run's
        ``restrict_to`` and ``masks``: the draws are the same up to float rounding. Returns one
        :class:`SampleResult` per run.
    record_observables : bool
        Keep the observables' traces (default). ``False``: evaluate them at every draw and hand them to the
        callbacks only (memory independent of the number of draws).
    grad_accum_steps : int
        Batches per step (devinterp's meaning): the step's loss and gradient are the means over
        ``grad_accum_steps`` consecutive batches of the chain's stream; the recorded loss is that mean, and
        observables and callbacks see the step's first batch. The default ``nbeta`` becomes
        ``m / ln m`` with ``m = batch_size * grad_accum_steps``.
    checkpoint_state : callable() -> dict of str to ndarray, optional
        Called at every checkpoint write: its arrays go into the same file, atomically with the draws they
        describe (state the callbacks build, e.g. accumulators). Read them back with
        :func:`load_checkpoint_state` before resuming: the draws in the file are not replayed.
    chains : sequence of int, optional
        Run only these chains (global indices ``r * num_chains + c``); the others' rows of the traces stay NaN.
        :mod:`pypattern.distributed` gives each rank its share this way.
    cores : int
        Run the chains in ``cores`` groups at once, one Python thread each, with torch pinned to one intra-op
        thread (each op runs on its calling thread, so the groups use ``cores`` cores; torch releases the GIL
        inside its ops). Each group is sequential or batched as ``batched`` says. The draws do not depend on it.
        Callbacks and checkpoint writes are serialised under a lock; a chain's draws reach the callbacks in
        order. Use it for models whose steps are large enough to outweigh the GIL (measured: see the README);
        small ops are faster in one thread.

    Returns
    -------
    SampleResult, or a list of them (one per run) when ``runs`` is given

    Raises
    ------
    SamplingDivergedError
        A loss, gradient or parameter became NaN or Inf; the message names the chain, draw, step and step size.
    """
    hyper = resolve_hyperparameters(
        dict(
            step_size=step_size,
            nbeta=nbeta,
            temperature=temperature,
            localization=localization,
            weight_decay=weight_decay,
            noise_scale=noise_scale,
            noise_level=noise_level,
            bounding_box=bounding_box,
            bounding_box_size=bounding_box_size,
        ),
        optimizer_kwargs,
        loader=loader,
        grad_accum_steps=grad_accum_steps,
    )
    for name, v, lo in (
        ("num_chains", num_chains, 1),
        ("num_draws", num_draws, 1),
        ("num_burnin_steps", num_burnin_steps, 0),
        ("num_steps_bw_draws", num_steps_bw_draws, 1),
        ("checkpoint_every", checkpoint_every, 1),
        ("cores", cores, 1),
        ("grad_accum_steps", grad_accum_steps, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    seeds = list(seed) if isinstance(seed, Sequence) and not isinstance(seed, str) else [seed]
    for v in seeds:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63) or a list of them, got {seed!r}")
    if not isinstance(seed, int) and len(seeds) != num_chains:
        raise ValueError(f"seed has {len(seeds)} entries but num_chains={num_chains}: give one per chain")
    loss_fn = loss_fn or default_loss_fn
    obs_items = _observable_items(observables)
    C, D = num_chains, num_draws
    total_steps = num_burnin_steps + (D - 1) * num_steps_bw_draws + 1

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter with requires_grad=True")
    if runs is None:
        specs = [(restrict_to, masks)]
    else:
        if restrict_to is not None or masks is not None:
            raise ValueError("give restrict_to and masks inside runs, not next to it")
        specs = list(runs)
        if not specs:
            raise ValueError("runs is empty: give at least one (restrict_to, masks) pair")
    run_patterns, run_moving, run_masks = [], [], []
    for r, spec in enumerate(specs):
        if not (isinstance(spec, tuple | list) and len(spec) == 2):
            raise TypeError(f"runs[{r}] must be a (restrict_to, masks) pair, got {spec!r}")
        r_restrict, r_masks = spec
        where = f"runs[{r}]: " if runs is not None else ""
        patterns = [r_restrict] if isinstance(r_restrict, str) else list(r_restrict or [])
        moving = [n for n, _ in named if not patterns or matches(n, patterns)]
        if not moving:
            raise ValueError(
                f"{where}restrict_to={r_restrict!r} matches no parameter; names are {[n for n, _ in named]}"
            )
        r_masks = dict(r_masks or {})
        unknown = set(r_masks) - set(moving)
        if unknown:
            raise ValueError(f"{where}masks has names that are not (moving) parameters: {sorted(unknown)}")
        run_patterns.append(patterns)
        run_moving.append(moving)
        run_masks.append(r_masks or None)
    in_some_run = set().union(*run_moving)
    union = [n for n, _ in named if n in in_some_run]
    device = named[0][1].device
    w_star = {n: p.detach().clone() for n, p in model.named_parameters()}
    dtypes = {n: t.dtype for n, t in w_star.items()}
    R = len(specs)
    G = R * C  # chains over all runs
    if chains is not None:
        chains = sorted({int(g) for g in chains})
        if any(not 0 <= g < G for g in chains):
            raise ValueError(f"chains must be indices in [0, {G}), got {chains}")
    ckpt = os.fspath(checkpoint) if checkpoint is not None else None
    data_cache: dict = {}
    fingerprint = None
    if ckpt is not None:
        # what identifies the run: a checkpoint written by any other run is refused, naming the first difference
        first_batch = _ChainData(loader, chain_seed(seeds[0], 0, stream=1), data_cache).next()
        fingerprint = io.fingerprint(
            num_chains=C,
            num_draws=D,
            num_burnin_steps=num_burnin_steps,
            num_steps_bw_draws=num_steps_bw_draws,
            seed=seed,
            **hyper,
            grad_accum_steps=grad_accum_steps,
            init_loss=init_loss,
            chains=chains,
            moving=run_moving[0] if runs is None else run_moving,
            masks=[{n: m.to(torch.float64) for n, m in (rm or {}).items()} for rm in run_masks],
            loss_fn=loss_fn,
            observables={n: fn for n, fn in obs_items},
            data=io.hash_batch(first_batch),
            **{f"weights[{n}]": t for n, t in w_star.items()},
            **{f"buffers[{n}]": b for n, b in model.named_buffers()},
        )

    # ---- state: fresh or from a checkpoint
    if ckpt is not None and os.path.exists(ckpt):
        st = _State.load(ckpt, G, D, fingerprint, device, dtypes)
    else:
        st = _State(G, D)

    # ---- L_n(w*) over several batches
    if st.init_losses is None:
        if init_loss is not None:
            st.init_losses = np.array([float(init_loss)])
        else:
            k = num_init_loss_batches or max(4, C)
            try:
                k = min(k, len(loader))
            except TypeError:
                pass
            stream = _ChainData(loader, chain_seed(seeds[0], 0, stream=2), data_cache)
            vals = []
            with torch.no_grad():
                for _ in range(k):
                    vals.append(float(split_loss(loss_fn(model, _to_device(stream.next(), device)))))
            st.init_losses = np.array(vals)
            if not np.all(np.isfinite(st.init_losses)):
                raise SamplingDivergedError(
                    f"the loss at w* is not finite ({st.init_losses}): check the model and loss_fn",
                    chain=-1,
                    draw=-1,
                    step=-1,
                    step_size=hyper["step_size"],
                )

    pbar = None
    mine = range(G) if chains is None else chains
    remaining = int(sum(total_steps - int(st.next_step[g]) for g in mine if st.done[g] < D))
    if not quiet and remaining:
        from tqdm.auto import tqdm

        pbar = tqdm(total=remaining, desc="SGLD", unit="step", mininterval=0.5, leave=False)

    ctx = _Run(
        model=model,
        loader=loader,
        loss_fn=loss_fn,
        C=C,
        D=D,
        burnin=num_burnin_steps,
        thin=num_steps_bw_draws,
        total=total_steps,
        G=G,
        hyper=hyper,
        run_moving=run_moving,
        run_masks=run_masks,
        union=union,
        w_star=w_star,
        seeds=seeds,
        accum=grad_accum_steps,
        obs_items=obs_items,
        record=record_observables,
        callbacks=list(callbacks),
        st=st,
        ckpt=ckpt,
        every=checkpoint_every,
        extra=checkpoint_state,
        fingerprint=fingerprint,
        backend=backend,
        pbar=pbar,
        device=device,
        data_cache=data_cache,
    )
    t0 = time.perf_counter()
    try:
        todo = [g for g in mine if st.done[g] < D]
        parts = [todo[i::cores] for i in range(min(cores, len(todo)))]
        if len(parts) <= 1:
            ctx.run_part(todo, batched)
        else:
            with pinned_threads(1):
                ctx.run_threads(parts, batched)
    finally:
        st.seconds += time.perf_counter() - t0
        if pbar is not None:
            pbar.close()
    if ckpt is not None:
        st.save(ckpt, fingerprint, ctx.mode, checkpoint_state)

    def ran_rows(r: int) -> list[int]:
        """Run ``r``'s rows whose chains this call ran (all of them unless ``chains`` was given)."""
        return [g - r * C for g in mine if r * C <= g < (r + 1) * C]

    def result(r: int) -> SampleResult:
        rows = slice(r * C, (r + 1) * C)
        loss = st.loss[rows].copy()
        ran = loss[ran_rows(r)]  # diagnostics over the chains run
        return SampleResult(
            loss_trace=loss,
            init_loss=float(np.mean(st.init_losses)),
            init_losses=np.asarray(st.init_losses, dtype=np.float64),
            observables={k: v[rows].copy() for k, v in st.obs.items()},
            config=dict(
                num_chains=C,
                num_draws=D,
                num_burnin_steps=num_burnin_steps,
                num_steps_bw_draws=num_steps_bw_draws,
                seed=seed,
                **hyper,
                restrict_to=run_patterns[r] or None,
            ),
            r_hat=r_hat(ran) if len(ran) else float("nan"),
            ess=ess(ran) if len(ran) else float("nan"),
            seconds=st.seconds,
            batched=ctx.mode == "batched",
        )

    results = [result(r) for r in range(R)]
    if warn_nonstationary:
        for r, res in enumerate(results):
            ran = res.loss_trace[ran_rows(r)]
            if len(ran):
                check_stationarity(ran)
    return results if runs is not None else results[0]


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``checkpoint_state`` arrays of a checkpoint written by :func:`sample` (empty if none)."""
    arrays, _ = io.load(path, kind=CHECKPOINT_KIND)
    return {k[6:]: v for k, v in arrays.items() if k.startswith("state/")}


class _VmapUnsupported(Exception):
    pass


class _Stopped(Exception):
    """Another group of chains failed (cores > 1): this one stops."""


def _split_vloss(out) -> tuple[torch.Tensor, tuple]:
    """(losses, other outputs) from the vmap-ed loss: a tensor, or a tuple with the losses first."""
    if isinstance(out, tuple):
        return out[0], out[1:]  # chain_loss returns the extra outputs detached
    return out, ()


class _Run:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.mode = "sequential"
        self.obs_per_chain: set[str] = set()  # observables that do not run under vmap
        self.cb_keys = [(cb, _keywords(cb)) for cb in self.callbacks]  # inspected once, not at every draw
        self.lock = threading.RLock()  # state, checkpoint and callbacks, with cores > 1
        self.stop = threading.Event()  # another group failed: stop at the next step

    # -- which path runs a group of chains
    def run_part(self, chains: list[int], batched: bool | None) -> None:
        st = self.st
        same_step = len({int(st.next_step[g]) for g in chains}) <= 1
        use_batched = batched
        if use_batched is None:
            n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            many = len(chains) >= BATCHED_MIN_CHAINS and len(chains) * n_params <= BATCHED_MAX_STACKED
            use_batched = len(chains) > 1 and same_step and (n_params <= BATCHED_MAX_PARAMS or many)
        if use_batched and same_step and chains:
            try:
                self.run_batched(chains)
                return
            except _VmapUnsupported as e:
                if batched:
                    raise RuntimeError(
                        f"batched=True but the model or loss_fn does not run under vmap: {e}"
                    ) from e
            chains = [g for g in chains if st.done[g] < self.D]
        if chains:
            self.run_sequential(chains)

    def run_threads(self, parts: list[list[int]], batched: bool | None) -> None:
        errors: list[BaseException] = []

        def work(part):
            try:
                self.run_part(part, batched)
            except _Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread below
                errors.append(e)
                self.stop.set()

        threads = [
            threading.Thread(target=work, args=(p,), name=f"pypattern-chains-{i}")
            for i, p in enumerate(parts)
        ]
        for th in threads:
            th.start()
        try:
            for th in threads:
                th.join()
        except BaseException:  # Ctrl-C in the caller: stop the groups at their next step
            self.stop.set()
            for th in threads:
                th.join()
            raise
        if errors:
            raise errors[0]

    def finish_step(self, chains: Sequence[int], d: int, t: int, params_of: Callable[[int], dict]) -> None:
        """After a step: progress, and at a draw the chains' bookkeeping and (when due) the checkpoint."""
        if self.stop.is_set():
            raise _Stopped
        if self.pbar is not None:
            self.pbar.update(len(chains))
        if d < 0:
            return
        st = self.st
        with self.lock:
            for g in chains:
                st.done[g], st.next_step[g] = d + 1, t + 1
            if self.checkpoint_now(d + 1):
                for g in chains:
                    if d + 1 < self.D:
                        st.params[g] = params_of(g)
                    else:
                        st.params.pop(g, None)
                st.save(self.ckpt, self.fingerprint, self.mode, self.extra)

    # -- shared pieces
    def is_draw(self, t: int) -> int:
        """The draw index recorded at step ``t``, or -1."""
        k = t - self.burnin
        if k < 0 or k % self.thin:
            return -1
        return k // self.thin

    def diverged(self, c: int, t: int, what: str) -> SamplingDivergedError:
        d = self.is_draw(t)
        where = (
            f"during burn-in (step {t} of {self.burnin})"
            if t < self.burnin
            else f"at draw {d if d >= 0 else (t - self.burnin) // self.thin} (step {t})"
        )
        gamma, eps = self.hyper["localization"], self.hyper["step_size"]
        msg = (
            f"chain {c} diverged {where} with step_size={eps:g}: {what}. The sampler stopped; no "
            f"estimate is returned. Use a smaller step_size (lr) or a larger localization (now {gamma:g})"
            + (", and delete the checkpoint before rerunning" if self.ckpt else "")
            + "."
        )
        return SamplingDivergedError(msg, chain=c, draw=d, step=t, step_size=eps)

    def at_draw(
        self,
        g: int,
        d: int,
        t: int,
        lv: float,
        model_view,
        batch,
        precomputed: dict | None = None,
        outputs=(),
    ) -> None:
        """Record chain ``g``'s draw ``d``: its loss, its observables (those not already in ``precomputed``, evaluated
        on ``model_view()``) and the callbacks (``outputs``: the loss function's other returned tensors)."""
        st = self.st
        st.loss[g, d] = lv
        if not (self.obs_items or self.callbacks):
            return
        obs_vals = dict(precomputed or {})
        view = None
        if self.obs_items:
            with torch.no_grad():
                for name, fn in self.obs_items:
                    if name not in obs_vals:
                        view = view or model_view()
                        obs_vals[name] = fn(view, batch)
            if self.record:
                with self.lock:
                    for name, _ in self.obs_items:
                        st.record_obs(name, g, d, obs_vals[name], self.G, self.D)
        args = dict(
            chain=g,
            run=g // self.C,
            draw=d,
            step=t,
            loss=lv,
            batch=batch,
            observables=obs_vals,
            outputs=outputs,
        )
        for cb, keys in self.cb_keys:
            if keys is None or "model" in keys:
                view = view or model_view()
                args["model"] = view
            with self.lock:
                cb(**(args if keys is None else {k: v for k, v in args.items() if k in keys}))

    def checkpoint_now(self, finished_draws: int) -> bool:
        return self.ckpt is not None and (finished_draws % self.every == 0 or finished_draws == self.D)

    def moving(self, g: int) -> list[str]:
        return self.run_moving[g // self.C]

    def key(self, c: int, stream: int = 0) -> int:
        """Chain ``c``'s noise (stream 0) or data (stream 1) key."""
        return chain_seed(self.seeds[c] if len(self.seeds) > 1 else self.seeds[0], c, stream=stream)

    # -- one chain after another
    def run_sequential(self, chains: list[int]) -> None:
        self.mode = "sequential"
        st = self.st
        work = copy.deepcopy(self.model)
        wparams = dict(work.named_parameters())
        trainable = {n for n, p in wparams.items() if p.requires_grad}
        for g in chains:
            c, moving = g % self.C, self.moving(g)
            with torch.no_grad():
                for n, p in wparams.items():
                    p.copy_(self.w_star[n])
                    # no gradient for weights this run does not move: the backward skips their weight grads
                    p.requires_grad_(n in trainable and n in moving)
                for n, t in st.params.get(g, {}).items():
                    wparams[n].copy_(t)
            opt = SGLD(
                [(n, wparams[n]) for n in moving],
                masks=self.run_masks[g // self.C],
                seed=self.key(c),
                backend=self.backend,
                **self.hyper,
            )
            opt.anchors = [self.w_star[n] for n in opt.param_names]
            start = int(st.next_step[g])
            opt.num_steps = start
            if start:
                opt._validated = True
            data = _ChainData(self.loader, self.key(c, stream=1), self.data_cache)
            data.skip(start * self.accum)
            for t in range(start, self.total):
                for p in opt.param_groups[0]["params"]:
                    p.grad = None
                vals = []
                for j in range(self.accum):  # the weights do not change until the step
                    b = _to_device(data.next(), self.device)
                    o = self.loss_fn(work, b)
                    loss = split_loss(o)
                    vals.append(float(loss.detach()))
                    if not math.isfinite(vals[-1]):
                        raise self.diverged(g, t, f"the loss is {vals[-1]}")
                    if j == 0:
                        batch, out = b, o
                    (loss / self.accum if self.accum > 1 else loss).backward()
                lv = vals[0] if self.accum == 1 else float(np.mean(vals))
                d = self.is_draw(t)
                if d >= 0:
                    self.at_draw(g, d, t, lv, lambda: work, batch, outputs=_extra_outputs(out))
                try:
                    opt.sgld_step()
                except FloatingPointError as e:
                    raise self.diverged(g, t, f"a gradient is not finite ({e})") from None
                self.finish_step(
                    (g,), d, t, lambda g, mv=moving: {n: wparams[n].detach().clone() for n in mv}
                )
            for n in moving:
                if not bool(torch.isfinite(wparams[n]).all()):
                    raise self.diverged(g, self.total - 1, f"parameter {n} is not finite")
            with self.lock:
                st.params.pop(g, None)

    def batched_observables(self, fmodel: Callable, stacked: dict, vb, shared_data: bool, n: int) -> dict:
        """The observables of all ``n`` chains in one ``vmap``-ed call each; an observable that does not run
        under vmap is left out (and evaluated chain by chain from then on)."""
        out = {}
        params = {k: v.detach() for k, v in stacked.items()}
        for name, fn in self.obs_items:
            if name in self.obs_per_chain:
                continue

            def one(p, b, fn=fn):
                v = fn(fmodel(p), b)
                return v if isinstance(v, torch.Tensor) else torch.as_tensor(v)

            try:
                with torch.no_grad():
                    v = torch.func.vmap(one, in_dims=(0, None if shared_data else 0))(params, vb)
                if v.dim() == 0 or v.shape[0] != n:
                    raise ValueError(f"vmap returned shape {tuple(v.shape)}")
            except Exception:  # noqa: BLE001 - anything vmap rejects: evaluate this one chain by chain
                self.obs_per_chain.add(name)
                continue
            out[name] = v
        return out

    # -- all chains together
    def run_batched(self, chains: list[int]) -> None:
        st = self.st
        C = len(chains)
        # functional_call swaps the module's tensors while it runs: every group (thread) needs its own module
        base = copy.deepcopy(self.model)
        frozen = {n: t for n, t in self.w_star.items() if n not in self.union}
        buffers = dict(base.named_buffers())
        stacked = {}
        for n in self.union:
            rows = [st.params.get(g, {}).get(n, self.w_star[n]) for g in chains]
            stacked[n] = torch.stack([r.detach() for r in rows]).contiguous()
        locs = [g % self.C for g in chains]
        seeds = [self.key(c) for c in locs]
        start = int(st.next_step[chains[0]])
        datas = [_ChainData(self.loader, self.key(c, stream=1), self.data_cache) for c in locs]
        for dd in datas:
            dd.skip(start * self.accum)
        shared_data = datas[0].single is not None
        loss_fn = self.loss_fn

        def fmodel(p):
            return _FunctionalModel(base, {**p, **frozen, **buffers})

        want_outputs = any(keys is None or "outputs" in keys for _, keys in self.cb_keys)

        def chain_loss(p, batch):
            out = loss_fn(fmodel(p), batch)
            loss = split_loss(out)
            return (loss, *_extra_outputs(out)) if want_outputs else loss

        vloss = torch.func.vmap(chain_loss, in_dims=(0, None if shared_data else 0))
        hk = dict(self.hyper)
        # per run: anchors and masks of its moving tensors; per chain: views of its rows of those tensors
        run_anchors = [[self.w_star[n] for n in mv] for mv in self.run_moving]
        run_masks = [
            None if not m else [m.get(n) for n in mv] for m, mv in zip(self.run_masks, self.run_moving)
        ]
        runs = [g // self.C for g in chains]
        index = {n: j for j, n in enumerate(self.union)}
        pick = [[index[n] for n in self.run_moving[r]] for r in runs]
        views = [[stacked[self.union[j]][i] for j in pick[i]] for i in range(C)]
        step_fn = resolve_step_fn(self.device, self.backend)
        raw = getattr(step_fn, "__name__", "") == "raw"
        shared_batch = _to_device(datas[0].single, self.device) if shared_data else None
        for t in range(start, self.total):
            leaves = {n: s.detach().requires_grad_(True) for n, s in stacked.items()}
            grads, lvs = None, []
            for j in range(self.accum):  # the weights do not change until the step
                if shared_data:
                    bj, vbj = [shared_batch] * C, shared_batch
                else:
                    bj = [_to_device(dd.next(), self.device) for dd in datas]
                    vbj = tree_map(lambda *xs: torch.stack(xs), *bj)
                if t == start and j == 0 and self.mode != "batched":
                    try:
                        losses, ex = _split_vloss(vloss(leaves, vbj))
                        if losses.shape != (C,):
                            raise _VmapUnsupported(
                                f"loss_fn returned shape {tuple(losses.shape[1:])}, not a scalar"
                            )
                    except _VmapUnsupported:
                        raise
                    except Exception as e:  # noqa: BLE001 - anything vmap rejects means: run sequentially
                        raise _VmapUnsupported(f"{type(e).__name__}: {e}") from e
                    self.mode = "batched"
                else:
                    losses, ex = _split_vloss(vloss(leaves, vbj))
                if j == 0:
                    batches, vb, extra = bj, vbj, ex
                lvs.append(losses.detach().double().cpu().numpy())
                bad = np.flatnonzero(~np.isfinite(lvs[-1]))
                if bad.size:
                    raise self.diverged(chains[bad[0]], t, f"the loss is {lvs[-1][bad[0]]}")
                gj = torch.autograd.grad(
                    losses.sum() / self.accum if self.accum > 1 else losses.sum(), list(leaves.values())
                )
                grads = gj if grads is None else [a + b for a, b in zip(grads, gj)]
            lv = lvs[0] if self.accum == 1 else np.mean(lvs, axis=0)
            d = self.is_draw(t)
            if d >= 0:
                vobs = self.batched_observables(fmodel, stacked, vb, shared_data, C) if self.obs_items else {}
                for i, g in enumerate(chains):
                    self.at_draw(
                        g,
                        d,
                        t,
                        float(lv[i]),
                        lambda i=i: fmodel({n: s[i] for n, s in stacked.items()}),
                        batches[i],
                        {k: v[i] for k, v in vobs.items()},
                        tuple(x[i] for x in extra),
                    )
            per_tensor = [gr.unbind(0) for gr in grads]
            with torch.no_grad():
                flags = []
                for i, g in enumerate(chains):
                    r = runs[i]
                    gi = [per_tensor[j][i] for j in pick[i]]
                    kw = dict(seed=seeds[i], step=t, masks=run_masks[r], **hk)
                    try:
                        if t == start:
                            sgld_step_(views[i], gi, run_anchors[r], backend=self.backend, **kw)
                        elif raw:  # unchecked: one flag per tensor, looked at once for all chains
                            flags.append(step_fn(views[i], gi, run_anchors[r], check=False, **kw).any())
                        else:
                            step_fn(views[i], gi, run_anchors[r], **kw)
                    except FloatingPointError as e:
                        raise self.diverged(g, t, f"a gradient is not finite ({e})") from None
                if flags and bool(torch.stack(flags).any()):
                    i = int(torch.nonzero(torch.stack(flags))[0])
                    raise self.diverged(chains[i], t, "a gradient is not finite")
            self.finish_step(
                chains, d, t, lambda g: {n: stacked[n][chains.index(g)].clone() for n in self.moving(g)}
            )
        for n, s in stacked.items():
            finite = torch.isfinite(s.reshape(C, -1)).all(dim=1)
            if not bool(finite.all()):
                i = int(torch.nonzero(~finite)[0])
                raise self.diverged(chains[i], self.total - 1, f"parameter {n} is not finite")
        with self.lock:
            for g in chains:
                st.params.pop(g, None)
