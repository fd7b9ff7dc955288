"""Plots of susceptibilities and their principal directions: ``SusceptibilityResult.plot(ax=...)`` draws its
heatmap on the caller's axes, a chi holding NaN plots (its colour scale from the finite entries), and
``PCAResult.plot`` scatters the probe points' scores. Each drawing is read back from matplotlib's artists and compared
with the numbers it shows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _result_cases import susceptibility_result  # noqa: E402


def test_the_heatmap_goes_on_the_axes_given():
    res = susceptibility_result(np.random.default_rng(0))
    fig, ax = plt.subplots()
    try:
        got = res.plot(ax=ax)
        # the axes given and the colour bar: no principal-directions panel
        assert got is fig and len(fig.axes) == 2
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), res.chi)
        lim = np.abs(res.chi).max()
        assert ax.images[0].get_clim() == pytest.approx((-lim, lim))
    finally:
        plt.close(fig)
    with pytest.raises(TypeError, match="ax=.*not valid"):
        res.plot(ax="heat.png")


def test_a_chi_with_nan_plots_with_the_scale_of_its_finite_entries(tmp_path):
    rng = np.random.default_rng(1)
    chi = rng.normal(size=(2, 6))
    chi[0, 2] = np.nan
    res = susceptibility_result(
        rng,
        chi=chi,
        chi_se=rng.random((2, 6)),
        chi_chains=rng.normal(size=(2, 3, 6)),
        probe_sample=np.arange(6),
        probe_position=np.arange(6),
        probe_token=-np.ones(6, dtype=np.int64),
        loss_mean=rng.normal(size=(2, 6)),
    )
    fig = res.plot(tmp_path / "chi.png")
    assert (tmp_path / "chi.png").stat().st_size > 0
    heat = fig.axes[0]
    lim = np.abs(chi[np.isfinite(chi)]).max()
    assert heat.images[0].get_clim() == pytest.approx((-lim, lim))
    # the principal directions need finite chi at the counted points: that panel stays empty
    assert len(fig.axes[1].collections) == 0
    nothing = susceptibility_result(rng, chi=np.full((2, 4), np.nan))
    assert nothing.plot(tmp_path / "nan.png").axes[0].images[0].get_clim() == pytest.approx((-1.0, 1.0))


def test_the_principal_directions_scatter_the_scores():
    rng = np.random.default_rng(2)
    chi = rng.normal(size=(3, 12))
    res = susceptibility_result(
        rng,
        chi=chi,
        chi_se=rng.random((3, 12)),
        chi_chains=rng.normal(size=(3, 3, 12)),
        components=["a", "b", "c"],
        probe_sample=np.arange(12),
        probe_position=np.arange(12),
        probe_token=-np.ones(12, dtype=np.int64),
        phi_mean=rng.normal(size=3),
        loss_mean=rng.normal(size=(3, 12)),
    )
    p = res.pca(2)
    # the scores by hand: the centred columns of chi on the directions
    centred = chi - chi.mean(1, keepdims=True)
    np.testing.assert_allclose(p.scores, centred.T @ p.directions.T, rtol=1e-10, atol=1e-12)
    fig, ax = plt.subplots()
    try:
        p.plot(ax=ax, color=np.arange(12))
        np.testing.assert_allclose(ax.collections[0].get_offsets(), p.scores[:, :2], rtol=0, atol=0)
        assert ax.get_xlabel() == f"PC1 ({100 * p.explained_variance_ratio[0]:.0f}%)"
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match=r"color has shape \(3,\)"):
        p.plot(color=np.arange(3))
    # the full figure's second panel is the same scatter
    fig = res.plot()
    try:
        np.testing.assert_allclose(fig.axes[1].collections[0].get_offsets(), p.scores[:, :2], rtol=0, atol=0)
    finally:
        plt.close(fig)
