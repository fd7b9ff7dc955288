"""Figures written to files by the experiments, made outside pyplot: matplotlib's backend and pyplot's open figures
are left as they are (``from . import _figures as plt`` stands in for ``matplotlib.pyplot`` there)."""

from __future__ import annotations


def subplots(*args, figsize: tuple[float, float] | None = None, **kwargs):
    """``(figure, axes)`` like ``matplotlib.pyplot.subplots``, on a figure pyplot does not track."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def close(fig) -> None:
    """Nothing to release: pyplot never held the figure."""
