"""Progress bars of the long computations."""

from __future__ import annotations

import contextlib
import os
import sys

#: seconds between two lines of a bar written to a log (a file or pipe, not a terminal or a notebook): tqdm's own
#: 0.1 s would write ten lines a second, tens of thousands in a long run's log
LOG_INTERVAL_S = 30.0

#: seconds a bar waits before it is first shown: a computation that ends sooner writes no line
BAR_DELAY_S = 2.0


def bar_settings(tqdm_class: type, **bar) -> dict:
    """The settings of a tqdm bar of ``tqdm_class``: ``bar``'s over the defaults (shown after two seconds, removed
    when closed), with ``mininterval`` (and ``maxinterval``) at least ``LOG_INTERVAL_S`` when the bar is written
    to a log: its file (``bar["file"]``, else stderr) is not a terminal and the class is not a notebook's widget.
    A ``TQDM_MININTERVAL`` set in the environment (tqdm's own setting) is left to tqdm."""
    out = {"delay": BAR_DELAY_S, "leave": False, **bar}
    target = out.get("file") or sys.stderr
    try:
        terminal = bool(target.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        terminal = False
    notebook = "notebook" in getattr(tqdm_class, "__module__", "")
    if not terminal and not notebook and "TQDM_MININTERVAL" not in os.environ:
        out["mininterval"] = max(float(out.get("mininterval", 0.1)), LOG_INTERVAL_S)
        out["maxinterval"] = max(float(out.get("maxinterval", 10.0)), out["mininterval"])
    return out


def open_bar(**bar):
    """A tqdm progress bar with ``bar``'s settings over those of :func:`bar_settings`: shown once it has run for
    two seconds (a computation that ends sooner writes nothing; in a log: a first line then, and one every
    ``LOG_INTERVAL_S`` seconds after it). The caller closes it."""
    from tqdm.auto import tqdm

    settings = bar_settings(tqdm, **bar)
    pbar = tqdm(**settings)
    if settings.get("mininterval", 0.0) > bar.get("mininterval", 0.1):  # written to a log
        # in a log: the first line once the bar is due (after ``delay``), not one interval after the start
        pbar.last_print_t = pbar.start_t + settings.get("delay", 0.0) - settings["mininterval"]
    return pbar


@contextlib.contextmanager
def progress_bar(quiet: bool, **bar):
    """A progress bar (:func:`open_bar`) for the block, shown once it has run for two seconds (in a log: a first
    line then, and one every ``LOG_INTERVAL_S`` seconds after it) and closed however it ends; None when
    ``quiet``."""
    if quiet:
        yield None
        return
    pbar = open_bar(**bar)
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
