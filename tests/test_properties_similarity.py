"""Property-based tests of the representation similarities (hypothesis): :func:`pypattern.linear_cka`,
:func:`pypattern.cka_matrix` and :func:`pypattern.cca.cca` on generated sample counts, widths, dtypes, layouts
(transposed and strided views, extra feature axes), rank-deficient and constant representations, and bad inputs
(too few samples, no features, NaN/Inf, mismatched rows). One invariant per call: a ValueError/TypeError naming the
offending argument, or the value of the naive numpy formula (written from the definitions, in float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pypattern
from pypattern.cca import cca

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IN_DTYPES = {"float64": torch.float64, "float32": torch.float32, "int32": torch.int32}


# ------------------------------------------------------------------------------------------------ naive formulas


def naive_hsic(k: np.ndarray, l: np.ndarray, debiased: bool) -> float:  # noqa: E741
    n = k.shape[0]
    if not debiased:
        h = np.eye(n) - 1.0 / n
        return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2
    # Song et al. (2012), eq. (5): the unbiased estimator from Grams with zeroed diagonals
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    total = (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    )
    return float(total) / (n * (n - 3))


def naive_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    xy, xx, yy = naive_hsic(k, l, debiased), naive_hsic(k, k, debiased), naive_hsic(l, l, debiased)
    return xy / np.sqrt(xx * yy) if xx * yy > 0 else float("nan")


def _rank_tol(z: np.ndarray, eps_in: float) -> float:
    """The documented rank cutoff of a representation ``z (n, p)`` held in a dtype of rounding level ``eps_in``:
    singular values of the centred data below ``max(n, p) * eps_in * max |z|`` (the input's rounding level) are
    rank deficiency."""
    return max(z.shape) * max(eps_in, np.finfo(np.float64).eps) * float(np.abs(z).max())


def _centred_sv(z: np.ndarray) -> np.ndarray:
    return np.linalg.svd(z - z.mean(0), compute_uv=False)


def naive_rank(z: np.ndarray, eps_in: float) -> int:
    z = z.reshape(z.shape[0], -1)
    return int((_centred_sv(z) > _rank_tol(z, eps_in)).sum())


def naive_cca(x: np.ndarray, y: np.ndarray, eps_x: float = 0.0, eps_y: float = 0.0) -> np.ndarray:
    """Canonical correlations: cosines of the principal angles between the centred column spaces (directions
    below the inputs' rounding level dropped)."""

    def basis(z, eps_in):
        zc = z - z.mean(0)
        u, s, _ = np.linalg.svd(zc, full_matrices=False)
        return u[:, s > _rank_tol(z, eps_in)]

    qx = basis(x.reshape(x.shape[0], -1), eps_x)
    qy = basis(y.reshape(y.shape[0], -1), eps_y)
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ generated inputs


@st.composite
def representation(draw, n: int):
    """``(numpy values (n, ...) as the tensor holds them, tensor)`` with a generated width, structure and layout."""
    width = draw(st.integers(1, 6))
    extra = draw(st.sampled_from([None, None, 2]))  # an extra feature axis, flattened by the measures
    shape = (n, width) if extra is None else (n, width, extra)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["normal", "normal", "low_rank", "constant", "offset", "scaled"]))
    v = rng.standard_normal(shape)
    if kind == "low_rank" and width > 1:
        v[:, 1:] = v[:, :1] * rng.standard_normal((1, width - 1) + shape[2:])  # rank 1 (per extra slice)
    elif kind == "constant":
        v = np.broadcast_to(rng.standard_normal(shape[1:]), shape).copy()
    elif kind == "offset":
        v = v + 1e3
    elif kind == "scaled":
        v = v * 1e-4
    dtype = draw(st.sampled_from(list(IN_DTYPES)))
    if dtype == "int32":
        v = np.round(v * 10)
    t = torch.tensor(v, dtype=IN_DTYPES[dtype])
    v = t.double().numpy()  # what the tensor holds
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "numpy"]))
    if layout == "transposed":
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "strided":
        big = torch.zeros((2 * n, *shape[1:]), dtype=t.dtype)
        big[::2] = t
        t = big[::2]
    elif layout == "numpy":
        t = t.numpy()
    event(f"representation: {kind}")
    return v, t


@st.composite
def pair_case(draw, min_n: int = 1):
    n = draw(st.integers(min_n, 9))
    x = draw(representation(n))
    y = draw(representation(n))
    fault = draw(st.sampled_from([None] * 8 + ["nan", "inf", "rows", "one_dim", "no_features", "complex"]))
    return n, x, y, fault


def _apply_fault(fault, x_t, side: str):
    """The faulty version of one argument (``side`` is which), and the name a correct error must use."""
    t = torch.as_tensor(x_t).clone().contiguous()
    if fault == "nan":
        t = t.double()
        t.view(-1)[0] = float("nan")
    elif fault == "inf":
        t = t.double()
        t.view(-1)[-1] = float("inf")
    elif fault == "rows":
        t = torch.cat([t, t[:1]])
    elif fault == "one_dim":
        t = t.reshape(-1)
    elif fault == "no_features":
        t = t[:, :0]
    elif fault == "complex":
        t = t.to(torch.complex128)
    return t


def _check_error(e: Exception, names) -> None:
    assert isinstance(e, ValueError | TypeError), repr(e)
    msg = str(e)
    assert any(n in msg for n in names), (msg, names)


# ------------------------------------------------------------------------------------------------ CKA


@given(pair_case(), st.booleans(), st.sampled_from([torch.float64, torch.float32]))
def test_linear_cka_is_an_error_naming_an_argument_or_the_naive_formula(case, debiased, dtype):
    n, (xv, xt), (yv, yt), fault = case
    side = "x" if n % 2 else "y"
    if fault is not None:
        if side == "x":
            xt = _apply_fault(fault, xt, "x")
        else:
            yt = _apply_fault(fault, yt, "y")
    min_n = 4 if debiased else 2
    try:
        got = pypattern.linear_cka(xt, yt, debiased=debiased, dtype=dtype)
    except (ValueError, TypeError) as e:
        event("error")
        named = [side] if fault is not None else []
        if n < min_n:
            named += ["x", "y"]
        assert named, f"unexpected error {e!r}"
        _check_error(e, named)
        return
    assert fault is None and n >= min_n, (fault, n)
    want = naive_cka(xv, yv, debiased)
    _compare_cka(got, want, xv, yv, dtype)


def _compare_cka(got: float, want: float, xv, yv, dtype) -> None:
    if np.isnan(want):
        event("cka: undefined")
        # undefined (a constant representation, or a debiased self-HSIC <= 0): NaN, never a number computed
        # from the rounding noise of the centring
        assert np.isnan(got), (got, want)
        return
    tol = 1e-7 if dtype == torch.float64 else 2e-3
    # the debiased estimator divides differences of similar terms: compare on the scale of its inputs
    assert got == pytest.approx(want, abs=tol * max(1.0, abs(want))) or _ill_conditioned(xv, yv), (got, want)


def _ill_conditioned(xv, yv) -> bool:
    """A representation dominated by its mean (offset 1e3 or more): float rounding of the centring decides."""
    return any(np.abs(r.mean(0)).max() > 1e2 * (r.std(0).max() + 1e-300) for r in (xv, yv))


@st.composite
def matrix_case(draw):
    n = draw(st.integers(4, 8))
    xs = draw(st.lists(representation(n), min_size=1, max_size=3))
    ys = draw(st.one_of(st.none(), st.lists(representation(n), min_size=1, max_size=2)))
    return n, xs, ys


@given(
    matrix_case(),
    st.booleans(),
    st.sampled_from(["auto", "gram", "features"]),
    st.sampled_from([torch.float64, torch.float32]),
)
def test_cka_matrix_is_the_naive_formula_for_every_pair(case, debiased, method, dtype):
    n, xs, ys = case
    got = pypattern.cka_matrix([t for _, t in xs], None if ys is None else [t for _, t in ys], debiased=debiased,
                               method=method, dtype=dtype)  # fmt: skip
    cols = xs if ys is None else ys
    assert tuple(got.shape) == (len(xs), len(cols)) and got.dtype == torch.float64
    for i, (xv, _) in enumerate(xs):
        for j, (yv, _) in enumerate(cols):
            _compare_cka(float(got[i, j]), naive_cka(xv, yv, debiased), xv, yv, dtype)


def test_cka_matrix_names_the_bad_representation():
    g = torch.Generator().manual_seed(0)
    good = [torch.randn(6, 3, generator=g) for _ in range(2)]
    bad = good[1].clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"xs\[1\] contains 1 non-finite"):
        pypattern.cka_matrix([good[0], bad])
    with pytest.raises(ValueError, match=r"ys\[0\] contains 1 non-finite"):
        pypattern.cka_matrix(good, [bad])
    with pytest.raises(ValueError, match=r"xs\[0\] and ys\[1\] must hold the same samples"):
        pypattern.cka_matrix(good, [good[0], good[1][:5]])
    with pytest.raises(TypeError, match="sequences of representations"):
        pypattern.cka_matrix(good[0])


# ------------------------------------------------------------------------------------------------ CCA


@given(pair_case(min_n=3), st.sampled_from([0.0, 0.0, 0.1]))
def test_cca_is_an_error_naming_an_argument_or_the_naive_formula(case, ridge):
    n, (xv, xt), (yv, yt), fault = case
    side = "x" if n % 2 else "y"
    if fault is not None:
        if side == "x":
            xt = _apply_fault(fault, xt, "x")
        else:
            yt = _apply_fault(fault, yt, "y")
    px, py = xv.reshape(n, -1).shape[1], yv.reshape(n, -1).shape[1]
    constant = [nm for nm, v in (("x", xv), ("y", yv)) if np.ptp(v.reshape(n, -1), axis=0).max() == 0]
    too_wide = [nm for nm, p in (("x", px), ("y", py)) if p >= n - 1] if ridge == 0 else []
    try:
        got = cca(xt, yt, ridge=ridge)
    except (ValueError, TypeError) as e:
        event("error")
        named = ([side] if fault is not None else []) + constant + too_wide
        assert named, f"unexpected error {e!r}"
        _check_error(e, named)
        return
    assert fault is None and not constant and not too_wide, (fault, constant, too_wide)
    ex, ey = (_eps_of(t) for t in (xt, yt))
    xf, yf = xv.reshape(n, -1), yv.reshape(n, -1)
    if ridge:  # the correlations of the directions both representations have: min(rank x, rank y) of them
        want = _naive_ridge_cca(xf, yf, ridge)[: min(naive_rank(xf, ex), naive_rank(yf, ey))]
    else:
        want = naive_cca(xv, yv, ex, ey)
    got = got.numpy()
    if _ill_conditioned(xv, yv) or _ambiguous_rank((xf, ex), (yf, ey)):
        event("cca: ill-conditioned")
        assert ((got >= 0) & (got <= 1)).all() and got.size <= min(px, py)
        return
    assert got.shape == want.shape, (got, want)
    np.testing.assert_allclose(got, want, atol=1e-6)


def _eps_of(t) -> float:
    dt = torch.as_tensor(t).dtype
    return torch.finfo(dt).eps if dt.is_floating_point else 0.0


def _ambiguous_rank(*reps) -> bool:
    """A centred representation with a singular value within a factor 100 of the rank cutoff: whether it is a
    direction of the data or its rounding noise is decided by rounding."""
    for r, eps_in in reps:
        s, tol = _centred_sv(r), _rank_tol(r, eps_in)
        if ((s > tol / 100) & (s < tol * 100)).any():
            return True
    return False


def test_cca_of_a_rounded_rank_deficient_representation():
    """y = [v, c v] held in float32 spans the column space of v: its CCA with x is the CCA with v alone (the
    rounding noise of the second column is below float32's rounding level, not a direction)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(6, 1, generator=g, dtype=torch.float64)
        v = torch.randn(6, 1, generator=g)
        y = torch.cat([v, v * 0.7037], 1)
        a, b = cca(x, y), cca(x, v)
        assert a.shape == b.shape and bool(((a - b).abs() < 1e-6).all()), (a, b)


def _naive_ridge_cca(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Singular values of (Sxx + r mean_eig(Sxx) I)^-1/2 Sxy (Syy + r mean_eig(Syy) I)^-1/2."""

    def inv_sqrt(s):
        e, v = np.linalg.eigh(s)
        e = np.clip(e, 0, None) + ridge * np.clip(e, 0, None).mean()
        return (v / np.sqrt(e)) @ v.T

    xc, yc = x - x.mean(0), y - y.mean(0)
    m = inv_sqrt(xc.T @ xc) @ (xc.T @ yc) @ inv_sqrt(yc.T @ yc)
    return np.clip(np.linalg.svd(m, compute_uv=False), 0.0, 1.0)
