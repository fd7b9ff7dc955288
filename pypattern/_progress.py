"""Progress bars of the long computations."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(quiet: bool, **bar):
    """A progress bar (tqdm's, with ``bar``'s settings) for the block, shown once it has run for two seconds and
    closed however it ends; None when ``quiet``."""
    if quiet:
        yield None
        return
    from tqdm.auto import tqdm

    pbar = tqdm(delay=2.0, leave=False, **bar)
    try:
        yield pbar
    finally:
        pbar.close()
