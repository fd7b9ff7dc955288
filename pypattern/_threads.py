"""Pin torch's intra-op thread count for a block and restore it afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def pinned_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (``None`` leaves it alone), the previous count after it.

    Small models run fastest, and steadiest on shared machines, on one thread: two OpenMP threads collapse when
    another process holds a core.
    """
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
