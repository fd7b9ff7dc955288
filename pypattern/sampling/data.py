"""The data a chain reads: a deterministic stream of batches keyed by ``(seed, chain, epoch)``."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable

import torch

from .._checks import refuse_meta
from ..losses import batch_tensors, map_batch
from .optim import splitmix64

__all__ = [
    "ChainData",
    "batch_size_of",
    "batches_per_epoch",
    "covering_batches",
    "ragged_last_batch",
    "rows_dropped_by_shuffle",
    "to_device",
]

GLOBAL_RNG_LOCK = threading.Lock()  # torch's global RNG, seeded per epoch of a chain's data (cores > 1)


def batch_size_of(batch) -> int:
    """Samples in ``batch`` by the library's one rule (:func:`pypattern.losses.batch_size`: a 1-D token tensor is
    one sequence; a batch the defaults do not read counts the leading axis of its first tensor)."""
    from ..losses import batch_size

    try:
        return batch_size(batch)
    except ValueError as e:
        raise ValueError(f"loader: {e}") from None


def ragged_last_batch(loader) -> bool:
    """Whether ``loader`` is a ``DataLoader`` whose last batch of an epoch is smaller than the others (its
    ``batch_size`` does not divide the data set and ``drop_last`` is off). Chains never read that batch (``L_n(w*)``
    over a whole epoch counts it by its samples): each batch's
    mean loss counts alike in SGLD's steps and draws, so a batch of a few samples would weigh as much as a full one
    and the chains would sample another loss than ``L_n`` (measured: 512 samples in batches of 500 and 12 gave an
    LLC 2.6 times the one of any even split)."""
    dl = loader if isinstance(loader, torch.utils.data.DataLoader) else None
    if dl is None or dl.batch_size is None or dl.drop_last:
        return False
    try:
        n = len(dl.dataset)
    except TypeError:
        return False
    return n > dl.batch_size and n % dl.batch_size != 0


def rows_dropped_by_shuffle(loader) -> list[int] | None:
    """The rows a shuffling ``DataLoader`` with ``drop_last`` can yield, in order, when some epochs leave some of
    them out: its batch sampler is torch's ``BatchSampler`` dropping a last batch smaller than ``batch_size``, over
    a ``RandomSampler`` without replacement (every row of the data set) or a ``SubsetRandomSampler`` (its
    indices), whose rows ``batch_size`` does not divide. Each epoch's order leaves other rows out, so the chains
    read every one of them over their epochs. None for any other loader (one that yields the same rows every
    epoch, or that draws them otherwise)."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return None
    bs = loader.batch_sampler
    if type(bs) is not torch.utils.data.BatchSampler or not bs.drop_last:
        return None
    s = bs.sampler
    if type(s) is torch.utils.data.RandomSampler and not s.replacement and s._num_samples is None:
        try:
            rows = list(range(len(loader.dataset)))
        except TypeError:
            return None
    elif type(s) is torch.utils.data.SubsetRandomSampler:
        rows = sorted(int(i) for i in s.indices)
    else:
        return None
    if len(rows) <= bs.batch_size or len(rows) % bs.batch_size == 0:
        return None
    return rows


def covering_batches(loader, rows: list[int]) -> list:
    """The rows ``rows`` of ``loader``'s data set cut in order into batches of its ``batch_size`` (the last one
    smaller), each built as the loader builds its batches (a ``TensorDataset`` with the default collate as
    :class:`ChainData` reads it, any other through the dataset and the loader's ``collate_fn``)."""
    b = int(loader.batch_sampler.batch_size)
    chunks = [rows[i : i + b] for i in range(0, len(rows), b)]
    ds = loader.dataset
    if (
        isinstance(ds, torch.utils.data.TensorDataset)
        and loader.collate_fn is torch.utils.data.default_collate
        and loader.num_workers == 0
    ):
        return [
            tuple(
                t.index_select(0, torch.as_tensor(c, dtype=torch.long, device=t.device)) for t in ds.tensors
            )
            for c in chunks
        ]
    getitems = getattr(ds, "__getitems__", None)
    return [loader.collate_fn(getitems(c) if getitems is not None else [ds[i] for i in c]) for c in chunks]


def batches_per_epoch(loader) -> int | None:
    """The batches of one epoch a chain reads (``len(loader)``, less a ragged last batch; None without a length)."""
    try:
        n = int(len(loader))
    except TypeError:
        return None
    return n - 1 if ragged_last_batch(loader) else n


def _ordinary_needed(x: torch.Tensor) -> bool:
    """Whether ``x`` is an inference tensor that autograd would be asked to save (outside inference mode)."""
    return x.is_inference() and not torch.is_inference_mode_enabled()


def to_device(batch, device):
    """``batch`` with its tensors on ``device`` (the batch itself, the same object, when they all are there
    already; a mapping of any kind, such as a ``transformers.BatchEncoding``, keeps its kind); a meta tensor (a
    shape without values) in it is refused. A tensor made under ``torch.inference_mode()`` is copied into an
    ordinary one (outside inference mode): autograd cannot save it for the backward passes of the sampler."""

    def moved(x):
        if not isinstance(x, torch.Tensor):
            return x
        if device.type != "meta":
            refuse_meta(x, "a tensor of a batch of data", "the data themselves")
        x = x.to(device)
        return x.clone() if _ordinary_needed(x) else x

    if all(x.device == device and not _ordinary_needed(x) for x in batch_tensors(batch)):
        return batch
    return map_batch(moved, batch)


def _one_batch_of_all(loader) -> bool:
    """Whether ``loader`` is one batch holding every sample (read once): a loader of length 1, unless it is a
    ``DataLoader`` whose one batch draws from the data (``drop_last`` with a batch smaller than the data set, or a
    sampler with replacement or of its own number of samples), which gives a new batch each epoch."""
    try:
        if len(loader) != 1:
            return False
    except TypeError:
        return False
    if not isinstance(loader, torch.utils.data.DataLoader):
        return True
    s = _stream_sampler(loader)
    s = loader.sampler if s is None else s
    # a sampler that draws (with replacement, weighted, or its own number of samples) gives another batch each epoch
    if isinstance(s, torch.utils.data.WeightedRandomSampler) or getattr(s, "replacement", False) is True:
        return False
    if isinstance(s, torch.utils.data.RandomSampler) and s._num_samples is not None:
        return False
    try:
        n = len(loader.dataset)
    except TypeError:
        return True
    bs = loader.batch_size
    return bs is None or bs >= n


def _stream_sampler(loader):
    """The sampler that orders a ``DataLoader``'s samples: its batch sampler's (a ``batch_sampler=`` given leaves
    ``loader.sampler`` at an unused default), or ``loader.sampler`` when it has none (``batch_size=None``: one
    sample a step). None for anything but a ``DataLoader``."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return None
    bs = loader.batch_sampler
    if bs is not None:
        return getattr(bs, "sampler", None)
    return loader.sampler


def plain_batches(bs) -> bool:
    """Whether a ``DataLoader``'s batch sampler ``bs`` cuts the samples in order, or in one uniform shuffle of them
    all, into batches (what :class:`ChainData` reads as a permutation and :func:`hash_data` as its settings)."""
    return type(bs) is torch.utils.data.BatchSampler and (
        type(bs.sampler) is torch.utils.data.SequentialSampler
        or (
            type(bs.sampler) is torch.utils.data.RandomSampler
            and not bs.sampler.replacement
            and bs.sampler._num_samples is None
        )
    )


class ChainData:
    """The batches of one chain: a deterministic stream keyed by ``(seed, chain, epoch)``.

    Each epoch starts ``iter(loader)`` with torch's RNG (and the loader's own generator, if it has one) seeded
    from the key, so shuffling is reproducible, differs between chains and does not depend on the order in which
    chains run. A ``DataLoader`` over a ``TensorDataset`` with the default collate is read by indexing the tensors
    with a keyed permutation (same batch sizes, no per-sample collate). A loader with one batch is read once. A
    ``DataLoader``'s ragged last batch (:func:`ragged_last_batch`) is not read: an epoch ends before it.
    """

    def __init__(self, loader, key: int, cache: dict):
        self.loader, self.key, self.cache = loader, key, cache
        self.epoch, self.it, self.single, self.pos = 0, None, None, 0
        dl = loader if isinstance(loader, torch.utils.data.DataLoader) else None
        self.fast = (
            dl is not None
            and isinstance(dl.dataset, torch.utils.data.TensorDataset)
            and dl.num_workers == 0
            and dl.collate_fn is torch.utils.data.default_collate
            and dl.batch_sampler is not None
        )
        self.sequential = isinstance(_stream_sampler(loader), torch.utils.data.SequentialSampler)
        self.length = batches_per_epoch(loader)
        # one batch: the whole data set, read once (not the first batch of a ragged split, whose length is 1 too)
        whole = _one_batch_of_all(loader)
        if whole:
            if "single" not in cache:
                # read once, in an order keyed like an epoch's but by no chain (a shuffling loader's one batch has
                # its rows permuted: unkeyed, the loss's float sums would differ between calls of one seed)
                key, self.key = self.key, 0
                try:
                    cache["single"] = self._new_epoch()
                finally:
                    self.key, self.it, self.pos = key, None, 0
            self.single = cache["single"]

    def _iter(self):
        if self.fast:
            tensors = self.loader.dataset.tensors
            bs = self.loader.batch_sampler
            if plain_batches(bs):  # index with a permutation tensor: no per-batch list of ints
                n = len(tensors[0])
                # on the CPU whatever torch's default device: the keyed permutation comes from the CPU generator
                if type(bs.sampler) is torch.utils.data.RandomSampler:
                    order = torch.randperm(n, device="cpu")
                else:
                    order = torch.arange(n, device="cpu")
                chunks = order.split(bs.batch_size)
                if bs.drop_last and n % bs.batch_size:
                    chunks = chunks[:-1]
                # index_select: torch's advanced indexing took 5x longer for a batch of rows (measured); the
                # order is drawn on the CPU (keyed as on any device), each batch's indices go to its tensor's device
                return (tuple(t.index_select(0, ix.to(t.device)) for t in tensors) for ix in chunks)

            def gen():
                for idx in bs:
                    ix = torch.as_tensor(idx, dtype=torch.long, device="cpu")
                    yield tuple(t.index_select(0, ix.to(t.device)) for t in tensors)

            return gen()
        return iter(self.loader)

    def _new_epoch(self):
        self.pos = 1
        return self._start() if self.sequential else self.seeded(self._start)

    def _start(self):
        self.it = self._iter()
        return self._first()

    def seeded(self, fn: Callable):
        """``fn()`` with torch's global RNG (and the loader's generator) seeded for this epoch's order of the stream:
        one chain at a time when chains run in threads; the generator's state is given back."""
        seed = splitmix64(self.key ^ self.epoch) & ((1 << 63) - 1)
        # (the plain batches of a fast loader are a permutation from torch's RNG: the sampler's generator unused)
        gen = (
            getattr(_stream_sampler(self.loader), "generator", None)
            if not (self.fast and plain_batches(self.loader.batch_sampler))
            else None
        )
        with GLOBAL_RNG_LOCK:
            gen_state = gen.get_state() if isinstance(gen, torch.Generator) else None
            try:
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only (what samplers and randperm draw from): torch.manual_seed would
                    # also reseed every CUDA generator, which fork_rng(devices=[]) does not give back
                    torch.default_generator.manual_seed(seed)
                    if gen_state is not None:  # the loader's own generator: key it too, then give it back
                        gen.manual_seed(seed)
                    return fn()
            finally:
                if gen_state is not None:
                    gen.set_state(gen_state)

    def _first(self):
        try:
            return next(self.it)
        except StopIteration:
            raise ValueError(
                f"loader yielded no batch (epoch {self.epoch} of a chain's stream): give a re-iterable loader with "
                "at least one batch (a DataLoader or a list of batches; a generator is read only once)"
            ) from None

    def next(self):
        if self.single is not None:
            return self.single
        if self.it is None:
            return self._new_epoch()
        # the epoch's batches are read (a ragged last one is not)
        if self.length is not None and self.pos >= self.length:
            self.epoch += 1
            return self._new_epoch()
        try:
            batch = next(self.it)
        except StopIteration:
            self.epoch += 1
            return self._new_epoch()
        self.pos += 1
        return batch

    def skip(self, n: int) -> None:
        if self.single is not None or n == 0:
            return
        if self.length:
            self.epoch, n = n // self.length, n % self.length
            self.it = None
        for _ in range(n):
            self.next()


def hash_data(loader, key: int, cache: dict) -> str:
    """A hash of the data a chain reads, for a checkpoint's fingerprint: a ``DataLoader`` over a ``TensorDataset``
    by its tensors and its batching (no batch is read; a sampler other than in-order or one uniform shuffle by the
    indices of the stream's first epoch); any other loader by every batch of the first epoch of the
    stream keyed by ``key``, read through once in order (a loader without a length: by its first batch only, as
    its epochs cannot be told apart)."""
    from .. import io

    d = ChainData(loader, key, cache)
    if d.fast:
        bs = loader.batch_sampler
        parts = {
            "tensors": list(loader.dataset.tensors),
            "batching": [
                type(bs).__name__,
                type(getattr(bs, "sampler", None)).__name__,
                getattr(bs, "batch_size", None),
                getattr(bs, "drop_last", None),
            ],
        }
        if not plain_batches(bs):
            # any other sampler (a subset's indices, weights, replacement, a number of samples, one of the user's)
            # by the indices of the stream's first epoch, drawn as the stream draws them
            # (an epoch's batches, or the first batch of a sampler without a length, as for other loaders)
            n = 1 if d.length is None else d.length
            parts["indices"] = d.seeded(
                lambda: [torch.as_tensor(list(idx), dtype=torch.long) for idx in itertools.islice(bs, n)]
            )
        return io.hash_batch(parts)
    n = 1 if d.single is not None or d.length is None else d.length
    h = hashlib.sha256()
    for _ in range(n):
        h.update(io.hash_batch(d.next()).encode())
    return h.hexdigest()[:16]
