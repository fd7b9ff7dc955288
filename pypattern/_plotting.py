"""Figures for the results' ``plot`` methods: one to be written to a file is made outside pyplot (no window, and
matplotlib's backend and pyplot's figures are left as they are); one to be shown is pyplot's."""

from __future__ import annotations


def new_figure(path, size: tuple[float, float]):
    """A figure of ``size`` inches: outside pyplot when it is to be written to ``path``, else pyplot's."""
    if path is not None:
        from matplotlib.figure import Figure

        return Figure(figsize=size)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size)


def _is_axes(x) -> bool:
    return hasattr(x, "figure") and hasattr(x, "imshow")


def figure_axes(path, ax, size: tuple[float, float]):
    """``(figure, axes, own)``: ``ax`` and its figure when given; else one axes on a :func:`new_figure`. Axes given
    as ``path`` (a plot's first argument, where some take ``ax``), and an ``ax`` that is not matplotlib axes, are
    refused naming them."""
    if _is_axes(path):
        raise TypeError(f"path={path!r} is matplotlib axes, not a file; give the axes as ax=...")
    if ax is not None and not _is_axes(ax):
        raise TypeError(f"ax={ax!r} is not valid; give matplotlib axes, or None (a new figure)")
    if ax is not None:
        return ax.figure, ax, False
    fig = new_figure(path, size)
    return fig, fig.add_subplot(), True


def finish(fig, path, own: bool, dpi: int = 110) -> None:
    """Lay out a figure made here (``own``) and write the figure to ``path`` when given."""
    if own:
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi)
