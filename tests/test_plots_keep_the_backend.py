"""Writing a result's plot to a file leaves matplotlib's backend and pyplot's figures as they are (a user's
interactive or other backend is not switched to Agg), and the file is written."""

import numpy as np
import pytest
import torch
from _result_cases import susceptibility_result

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, activation_patching

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture
def svg_backend():
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    plt.close("all")
    yield plt
    plt.close("all")
    matplotlib.use(before)


def _patch_result():
    cfg = TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=0)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (3, 5), generator=g)
    corr = torch.randint(0, 20, (3, 5), generator=g)
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    return activation_patching(Transformer(cfg), "resid_pre", clean, corr, metric=metric, quiet=True)


def test_a_patching_plot_written_to_a_file_keeps_the_backend(svg_backend, tmp_path):
    plt = svg_backend
    _patch_result().plot(path=tmp_path / "grid.png")
    assert matplotlib.get_backend() == "svg"
    assert not plt.get_fignums()
    assert (tmp_path / "grid.png").stat().st_size > 0
    # drawn on the caller's axes, and written when a path is given with them
    fig, ax = plt.subplots()
    assert _patch_result().plot(ax=ax, path=tmp_path / "on_ax.png") is ax
    assert (tmp_path / "on_ax.png").stat().st_size > 0


def test_a_susceptibility_plot_written_to_a_file_keeps_the_backend(svg_backend, tmp_path):
    plt = svg_backend
    res = susceptibility_result(np.random.default_rng(0))
    fig = res.plot(tmp_path / "chi.png")
    assert matplotlib.get_backend() == "svg"
    assert not plt.get_fignums()
    assert len(fig.axes) >= 2 and (tmp_path / "chi.png").stat().st_size > 0
