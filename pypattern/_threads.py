"""Pin torch's intra-op thread count for a block and restore it afterwards; the command line's ``--threads``."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

#: the thread count a whole command runs with (``--threads``), which every :func:`pinned_threads` inside takes in
#: place of its own count; None: none was given
_COMMAND_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("command_threads", default=None)


@contextlib.contextmanager
def pinned_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (``None`` leaves it alone), the previous count after it.

    Small models run fastest, and steadiest on shared machines, on one thread: two OpenMP threads collapse when
    another process holds a core. Inside :func:`command_threads` the command's count is pinned instead of ``n``
    (a user's ``--threads`` overrides an experiment's default).
    """
    override = _COMMAND_THREADS.get()
    if override is not None:
        n = override
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def command_threads(n: int | None) -> Iterator[None]:
    """The block runs on ``n`` threads (``torch.set_num_threads``), and every :func:`pinned_threads` inside it pins
    ``n`` in place of its own count; the previous count after it. ``None`` changes nothing: torch's own count
    (its default follows ``OMP_NUM_THREADS``, else the cores) and each experiment's own policy stay."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads={n!r} is not valid; give the number of threads as an int >= 1, or None")
    token = _COMMAND_THREADS.set(n)
    try:
        with pinned_threads(n):
            yield
    finally:
        _COMMAND_THREADS.reset(token)
