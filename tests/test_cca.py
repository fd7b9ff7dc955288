"""The CCA family (pypattern.cca) against closed forms, invariances and independent numpy/scipy computations."""

import numpy as np
import pytest
import scipy.linalg
import torch

from pypattern.cca import cca, pwcca, svcca


def _rng(seed):
    return np.random.default_rng(seed)


def _planted(n, rho, extra_x=0, extra_y=0, seed=0):
    """x, y whose canonical correlations are exactly ``rho`` (then zeros for the extra dimensions)."""
    r = _rng(seed)
    k = len(rho)
    z = r.standard_normal((n, 2 * k + extra_x + extra_y))
    z -= z.mean(0)
    q, _ = np.linalg.qr(z)  # orthonormal, centred columns
    qx = np.concatenate([q[:, :k], q[:, 2 * k : 2 * k + extra_x]], 1)
    qy = q[:, :k] * rho + q[:, k : 2 * k] * np.sqrt(1 - np.asarray(rho) ** 2)
    qy = np.concatenate([qy, q[:, 2 * k + extra_x :]], 1)
    a = r.standard_normal((qx.shape[1], qx.shape[1]))
    b = r.standard_normal((qy.shape[1], qy.shape[1]))
    return qx @ a + 3.0, qy @ b - 1.0


def test_cca_recovers_planted_correlations_and_is_invariant_to_invertible_maps():
    rho = [0.95, 0.7, 0.3, 0.1]
    x, y = _planted(200, rho, extra_x=2, extra_y=1)
    got = cca(x, y).numpy()
    assert got.shape == (5,)  # min(p, q) = min(6, 5)
    np.testing.assert_allclose(got[:4], rho, atol=1e-10)
    assert abs(got[4]) < 1e-10
    r = _rng(5)
    a, b = r.standard_normal((6, 6)), r.standard_normal((5, 5))
    np.testing.assert_allclose(cca(x @ a + 7.0, y @ b).numpy(), got, atol=1e-9)
    np.testing.assert_allclose(cca(y, x).numpy(), got, atol=1e-10)  # symmetric
    # a torch input and a 3-d input give the same numbers
    np.testing.assert_allclose(cca(torch.from_numpy(x).reshape(200, 2, 3), y).numpy(), got, atol=1e-12)


def test_cca_against_scipy_principal_angles():
    r = _rng(1)
    x = r.standard_normal((150, 8)) @ r.standard_normal((8, 8))
    y = np.tanh(x[:, :5] @ r.standard_normal((5, 7))) + 0.5 * r.standard_normal((150, 7))
    ref = np.sort(np.cos(scipy.linalg.subspace_angles(x - x.mean(0), y - y.mean(0))))[::-1]
    np.testing.assert_allclose(cca(x, y).numpy(), ref, atol=1e-9)


def test_cca_rank_deficient_counts_rank():
    r = _rng(2)
    x = r.standard_normal((100, 4))
    x = np.concatenate([x, x[:, :2] + x[:, 2:3]], 1)  # 6 columns, rank 4
    y = r.standard_normal((100, 5))
    assert cca(x, y).shape == (4,)


def test_cca_ridge_against_numpy_and_refusal():
    r = _rng(3)
    x, y = r.standard_normal((40, 60)), r.standard_normal((40, 10))
    x[:, :10] += y
    with pytest.raises(ValueError, match="ridge"):
        cca(x, y)
    with pytest.raises(ValueError, match="ridge"):
        svcca(x, y, threshold=1.0)
    with pytest.raises(ValueError, match="ridge"):
        cca(x, x[:, :5], ridge=-1.0)
    with pytest.raises(ValueError, match="same samples"):
        cca(x, y[:30])
    ridge = 0.5

    def inv_sqrt(s):
        lam = ridge * np.trace(s) / s.shape[0]
        e, v = np.linalg.eigh(s + lam * np.eye(s.shape[0]))
        return v @ np.diag(e**-0.5) @ v.T

    xc, yc = x - x.mean(0), y - y.mean(0)
    m = inv_sqrt(xc.T @ xc) @ xc.T @ yc @ inv_sqrt(yc.T @ yc)
    ref = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(cca(x, y, ridge=ridge).numpy(), ref[: min(60, 10)], atol=1e-10)
    # ridge shrinks the correlations; a small ridge on well-posed data is close to plain CCA
    x2, y2 = x[:, :8], y
    plain = cca(x2, y2).numpy()
    assert (cca(x2, y2, ridge=1.0).numpy() <= plain + 1e-12).all()
    np.testing.assert_allclose(cca(x2, y2, ridge=1e-9).numpy(), plain, atol=1e-6)


def test_svcca_against_numpy_and_orthogonal_invariance():
    r = _rng(4)
    lat = r.standard_normal((300, 4))
    x = lat @ r.standard_normal((4, 12)) * 3 + 0.05 * r.standard_normal((300, 12))
    y = np.tanh(lat @ r.standard_normal((4, 10))) + 0.05 * r.standard_normal((300, 10))
    thr = 0.95

    def reduce(a):
        ac = a - a.mean(0)
        u, s, _ = np.linalg.svd(ac, full_matrices=False)
        frac = np.cumsum(s**2) / (s**2).sum()
        k = int(np.argmax(frac >= thr)) + 1
        return u[:, :k] * s[:k]

    rx, ry = reduce(x), reduce(y)
    ref = np.sort(np.cos(scipy.linalg.subspace_angles(rx, ry)))[::-1]
    got = svcca(x, y, threshold=thr, reduce="none").numpy()
    np.testing.assert_allclose(got, ref, atol=1e-8)
    assert svcca(x, y, threshold=thr) == pytest.approx(ref.mean(), abs=1e-8)
    q, _ = np.linalg.qr(r.standard_normal((12, 12)))
    assert svcca(x @ q * 2.0 + 1.0, y, threshold=thr) == pytest.approx(svcca(x, y, threshold=thr), abs=1e-9)
    # threshold 1 keeps every direction: plain CCA
    assert svcca(x, y, threshold=1.0) == pytest.approx(float(cca(x, y).mean()), abs=1e-9)
    with pytest.raises(ValueError, match="threshold"):
        svcca(x, y, threshold=0.0)


def test_pwcca_against_numpy():
    r = _rng(6)
    lat = r.standard_normal((250, 3))
    x = np.concatenate([lat @ r.standard_normal((3, 6)), 0.3 * r.standard_normal((250, 3))], 1)
    x[:, :6] += 0.05 * r.standard_normal((250, 6))  # full rank
    y = np.tanh(lat @ r.standard_normal((3, 5))) + 0.2 * r.standard_normal((250, 5))
    xc, yc = x - x.mean(0), y - y.mean(0)
    ux = np.linalg.svd(xc, full_matrices=False)[0]
    uy = np.linalg.svd(yc, full_matrices=False)[0]
    left, rho, _ = np.linalg.svd(ux.T @ uy, full_matrices=False)
    h = ux @ left  # canonical variates of x, unit norm
    alpha = np.abs(h.T @ xc).sum(1)
    ref = (alpha * rho).sum() / alpha.sum()
    assert pwcca(x, y) == pytest.approx(ref, abs=1e-9)
    assert pwcca(x, x) == pytest.approx(1.0, abs=1e-9)
    assert pwcca(x, y) != pytest.approx(pwcca(y, x), abs=1e-4)  # weights come from the first argument
    # weighting favours the directions x's neurons use: pwcca >= the plain mean here
    assert pwcca(x, y) > float(cca(x, y).mean())


def test_ridge_cca_returns_the_defined_correlations_only():
    """With a ridge and more features than samples, the directions without variance (correlation 0) are not
    returned: ``min(rank x, rank y)`` values, as documented, so their mean is not diluted."""

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64)
    y = x @ torch.randn(10, 12, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        6, 12, generator=g, dtype=torch.float64
    )
    rho = cca(x, y, ridge=0.1)
    assert rho.shape == (5,)  # centred rank n - 1
    assert float(rho.min()) > 1e-3


def test_cca_keeps_invariance_to_invertible_maps_on_ill_conditioned_data():
    """The canonical correlations come from orthonormal bases of the data (its SVD), not from the scatter
    matrices, whose condition number is the square of the data's: a map of condition 1e10 leaves them unchanged."""
    rho = [0.9, 0.6, 0.2]
    x, y = _planted(400, rho, extra_x=1, extra_y=0)
    got = cca(x, y).numpy()
    np.testing.assert_allclose(got[:3], rho, atol=1e-10)
    r = _rng(11)
    q, _ = np.linalg.qr(r.standard_normal((4, 4)))
    a = q * np.logspace(0, -10, 4)[None, :] @ np.linalg.qr(r.standard_normal((4, 4)))[0]  # condition 1e10
    assert np.linalg.cond(a) > 1e9
    np.testing.assert_allclose(cca(x @ a, y).numpy(), got, atol=1e-5)
    # float32 data of the same rank: the rounding level of float32 decides what is a direction
    np.testing.assert_allclose(cca(x.astype(np.float32), y).numpy(), got, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, p", [(2000, 16), (40, 10), (300, 40)])
def test_rank_of_low_precision_inputs_is_read_above_their_rounding(dtype, n, p):
    """A 16- or 32-bit representation of full rank keeps every direction (its smallest singular value is far above
    the rounding of its entries: the cutoff grows like sqrt(n), as the rounding's spectral norm does, not like n),
    the same values given in float64 give the same correlations, and a column that is the sum of two others is
    one direction less, in every dtype."""

    g = torch.Generator().manual_seed(n + p)
    base = torch.randn(n, p, generator=g, dtype=torch.float64) * torch.logspace(
        0, -1.3, p, dtype=torch.float64
    )
    y = base @ torch.randn(p, p, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, p, generator=g, dtype=torch.float64
    )
    x, y = base.to(dtype), y.to(dtype)
    got = cca(x, y)
    assert len(got) == p
    assert torch.allclose(got, cca(x.double(), y.double()), rtol=0, atol=1e-12)
    deficient = base.clone()
    deficient[:, -1] = deficient[:, 0] + deficient[:, 1]
    assert len(cca(deficient.to(dtype), y)) == p - 1


def test_sixteen_bit_data_with_an_offset_keeps_its_real_directions():
    """A bfloat16 representation with a common offset (entries near 100, spread 1) keeps every direction the
    rounded values hold: the result equals CCA of the same rounded values given in float64, and a low-rank one keeps
    exactly its rank."""
    g = torch.Generator().manual_seed(0)
    n, d = 200, 16
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    for offset in (30.0, 100.0):
        xb = (x + offset).bfloat16()
        got, same_values = cca(xb, y), cca(xb.double(), y)
        assert got.numel() == d
        torch.testing.assert_close(got, same_values, rtol=1e-10, atol=1e-12)
    low = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, d, generator=g, dtype=torch.float64
    )
    for dtype in (torch.bfloat16, torch.float16):
        assert cca((low + 100.0).to(dtype), y).numel() == 3


def test_variation_below_the_input_rounding_is_refused_as_such():
    """Entries near 1000 with a spread of 1.5 in bfloat16 (spacing 8): no direction is above the rounding, and the
    error says so rather than calling the data constant."""
    g = torch.Generator().manual_seed(1)
    x = (1000.0 + 1.5 * torch.randn(200, 8, generator=g, dtype=torch.float64)).bfloat16()
    assert not bool((x == x[:1]).all())
    with pytest.raises(ValueError, match="below the rounding of its input dtype"):
        cca(x, torch.randn(200, 8, generator=g, dtype=torch.float64))
