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


class Terminated(KeyboardInterrupt):
    """A SIGTERM received inside :func:`sigterm_as_interrupt`: a :class:`KeyboardInterrupt`, so that the paths that
    write a checkpoint when a long computation is stopped with Ctrl-C write it on SIGTERM too."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """For the block: SIGTERM (what ``kill``, ``timeout`` and batch schedulers send) raises :class:`Terminated`, a
    :class:`KeyboardInterrupt`, in the main thread, so that the block's interrupt path (writing the finished work
    to a checkpoint) runs; a second SIGTERM then ends the process as SIGTERM does by default. Only in the main
    thread and only when SIGTERM's handler is the default one (a handler the program installed is left alone);
    the previous handler is restored when the block ends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - a platform without SIGTERM
        previous = None
    if previous is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
