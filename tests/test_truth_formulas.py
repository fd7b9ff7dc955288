"""pypattern.truth against independent computations.

* Reduced-rank regression: Aoyagi & Watanabe (2005), main theorem, written here case by case.
* Deep linear networks: Aoyagi (2024), Theorem 1, by a search over every index subset (not only the smallest
  ``M_i``); and, independently of Aoyagi, ``lambda = r (H_0 + H_L - r) / 2 + C / 2`` with ``C`` the codimension of
  the fibre ``{W_L ... W_1 = 0}`` for the widths ``H_i - r`` (Pepin Lehalleur & Rimanyi 2024), ``C`` computed from
  the representations of the linear quiver.
* Normal crossings: the tempered expectation ``E[n K]`` under ``exp(-n K)`` on ``[0, 1]^2``, which equals
  ``lambda - (m - 1) / log n + o(1 / log n)``; the localized expectation against scipy quadrature.
* The toy models and data makers: their documented identities, and their input checks.
"""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import integrate, special

from pypattern import truth


# ----------------------------------------------------------------------------------------------------------------
# Reduced-rank regression
# ----------------------------------------------------------------------------------------------------------------
def _aoyagi_watanabe(M, H, N, r):
    """(lambda, m) for y = B A x, x in R^M, y in R^N, H hidden units, true rank r (Aoyagi & Watanabe 2005)."""
    if M + H < N + r:
        return Fraction(H * M - H * r + N * r, 2), 1
    if N + H < M + r:
        return Fraction(H * N - H * r + M * r, 2), 1
    if M + N < H + r:
        return Fraction(M * N, 2), 1
    core = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + H + N + r) % 2 == 0:
        return Fraction(core, 8), 1
    return Fraction(core + 1, 8), 2


def test_rrr_and_depth_two_dln_match_the_aoyagi_watanabe_cases():
    n = 0
    for M, H, N in itertools.product(range(1, 8), repeat=3):
        for r in range(min(M, H, N) + 1):
            lam, m = _aoyagi_watanabe(M, H, N, r)
            assert truth.rrr_learning_coefficient(M, H, N, r) == float(lam), (M, H, N, r)
            assert truth.dln_learning_coefficient((M, H, N), r, multiplicity=True) == (float(lam), m), (
                M,
                H,
                N,
                r,
            )
            n += 1
    assert n == 1127


def test_rrr_known_values():
    # square case M = H = N, r = 0: (3 H^2 + [H odd]) / 8
    for H in range(1, 9):
        assert truth.rrr_learning_coefficient(H, H, H) == (3 * H * H + H % 2) / 8
    # enough hidden units (H >= M + N - r): the product is unconstrained near the truth, lambda = M N / 2
    for M, N in itertools.product(range(1, 5), repeat=2):
        for r in range(min(M, N) + 1):
            assert truth.rrr_learning_coefficient(M, M + N - r + 1, N, r) == M * N / 2
    # H = min(M, N) at full-rank truth: regular in the product, lambda = (M + N - r) r / 2 + 0 = H (M + N - H) / 2
    for M, N in itertools.product(range(1, 6), repeat=2):
        H = min(M, N)
        assert truth.rrr_learning_coefficient(M, H, N, H) == H * (M + N - H) / 2
    # one hidden unit, r = 0: K = |a|^2 |b|^2, poles M/2 and N/2 (polar coordinates)
    for M, N in itertools.product(range(1, 6), repeat=2):
        lam, m = truth.dln_learning_coefficient((M, 1, N), 0, multiplicity=True)
        assert (lam, m) == (min(M, N) / 2, 2 if M == N else 1)
    # transposing the map leaves lambda unchanged
    for M, H, N in itertools.product(range(1, 6), repeat=3):
        for r in range(min(M, H, N) + 1):
            assert truth.rrr_learning_coefficient(M, H, N, r) == truth.rrr_learning_coefficient(N, H, M, r)
    # the values the library's own check list and docstring quote
    assert truth.dln_learning_coefficient((5, 3, 5)) == 6.5
    assert truth.dln_learning_coefficient((4, 3, 8)) == 6.0


# ----------------------------------------------------------------------------------------------------------------
# Deep linear networks
# ----------------------------------------------------------------------------------------------------------------
def _aoyagi_by_subset_search(widths, r):
    """Aoyagi (2024), Theorem 1: the index set S (|S| = l + 1 >= 2) with max_S M < min_notS M,
    sum_S M >= l max_S M and sum_S M < l min_notS M; every such set is found and must give one answer."""
    Ms = [h - r for h in widths]
    answers = set()
    for size in range(2, len(Ms) + 1):
        for S in itertools.combinations(range(len(Ms)), size):
            ell = size - 1
            inside = [Ms[i] for i in S]
            outside = [Ms[i] for i in range(len(Ms)) if i not in S]
            s = sum(inside)
            if s < ell * max(inside):
                continue
            if outside and not (max(inside) < min(outside) and s < ell * min(outside)):
                continue
            a = s - (-(-s // ell) - 1) * ell
            pairs = sum(x * y for x, y in itertools.combinations(inside, 2))
            lam = (
                Fraction(r * (widths[0] + widths[-1]) - r * r, 2)
                + Fraction(a * (ell - a), 4 * ell)
                - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2
                + Fraction(pairs, 2)
            )
            answers.add((lam, a * (ell - a) + 1))
    assert len(answers) == 1, (widths, r, answers)
    return answers.pop()


def test_dln_matches_aoyagi_subset_search_on_all_small_networks():
    n = 0
    for L in (1, 2, 3, 4):
        for widths in itertools.product(range(1, 6), repeat=L + 1):
            for r in range(min(widths) + 1):
                lam, m = _aoyagi_by_subset_search(widths, r)
                assert truth.dln_learning_coefficient(widths, r, multiplicity=True) == (float(lam), m), (
                    widths,
                    r,
                )
                d = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
                assert 0 <= lam <= Fraction(d, 2)
                n += 1
    assert n == 9584


def _fibre_codimension(dims):
    """Codimension of {W_L ... W_1 = 0} in the space of (W_1, ..., W_L) for widths ``dims``: the fibre is the union
    of the orbits of the representations V of the quiver 0 -> 1 -> ... -> L without the summand [0, L]; an orbit
    has codimension dim Ext^1(V, V) = dim End(V) - <d, d>. V is a sum of interval modules [i, j];
    Hom([i, j], [k, l]) is one-dimensional when k <= i <= l <= j, else 0."""
    if min(dims) == 0:
        return 0
    L = len(dims) - 1
    intervals = [(i, j) for i in range(L + 1) for j in range(i, L + 1) if (i, j) != (0, L)]
    euler = sum(x * x for x in dims) - sum(x * y for x, y in zip(dims[:-1], dims[1:]))
    best = [None]

    def search(k, mult, remaining):
        if k == len(intervals):
            end = sum(
                mult[p] * mult[q]
                for p in range(len(intervals))
                for q in range(len(intervals))
                if intervals[q][0] <= intervals[p][0] <= intervals[q][1] <= intervals[p][1]
            )
            best[0] = end - euler if best[0] is None else min(best[0], end - euler)
            return
        i, j = intervals[k]
        last_from_i = k + 1 == len(intervals) or intervals[k + 1][0] != i
        for m in range(min(remaining[i : j + 1]) + 1):
            rest = [x - m if i <= t <= j else x for t, x in enumerate(remaining)]
            if last_from_i and rest[i]:
                continue
            search(k + 1, mult + [m], rest)

    search(0, [], list(dims))
    return best[0]


def test_dln_lambda_is_half_the_fibre_codimension():
    n = 0
    for L, top in ((1, 5), (2, 5), (3, 4), (4, 3)):
        for widths in itertools.product(range(1, top + 1), repeat=L + 1):
            for r in range(min(widths) + 1):
                C = _fibre_codimension([h - r for h in widths])
                lam = Fraction(r * (widths[0] + widths[-1] - r), 2) + Fraction(C, 2)
                assert truth.dln_learning_coefficient(widths, r) == float(lam), (widths, r, C)
                n += 1
    assert n > 1500


def test_dln_chains_through_width_one_are_normal_crossings():
    # widths (H0, 1, ..., 1, HL), r = 0: K = |a|^2 b_1^2 ... b_{L-2}^2 |c|^2, poles H0/2, 1/2 (L - 2 times), HL/2
    for L in range(2, 7):
        for H0, HL in itertools.product(range(1, 6), repeat=2):
            poles = [Fraction(H0, 2), Fraction(HL, 2)] + [Fraction(1, 2)] * (L - 2)
            lam = min(poles)
            widths = (H0,) + (1,) * (L - 1) + (HL,)
            assert truth.dln_learning_coefficient(widths, 0, multiplicity=True) == (
                float(lam),
                poles.count(lam),
            )


def test_single_matrix_is_regular():
    for a, b in itertools.product(range(1, 7), repeat=2):
        for r in range(min(a, b) + 1):
            assert truth.dln_learning_coefficient((a, b), r, multiplicity=True) == (
                truth.regular_learning_coefficient(a * b),
                1,
            )


# ----------------------------------------------------------------------------------------------------------------
# Normal crossings and regular models
# ----------------------------------------------------------------------------------------------------------------
def _tempered_expectation(k, n):
    """E[n K] under exp(-n K) on [0, 1]^2, K = x^(2 k0) y^(2 k1); the y-integrals in closed form (incomplete gamma)."""
    p = 2 * k[1]

    def inner(x, first):
        c = n * x ** (2 * k[0])
        if c == 0:
            return 0.0 if first else 1.0
        s = 1 / p + (1 if first else 0)
        return c ** (-1 / p) / p * special.gamma(s) * special.gammainc(s, c)

    cuts = [0.0] + [10.0**-e for e in range(12, 0, -1)] + [1.0]

    def quad(f):
        return sum(
            integrate.quad(f, a, b, epsabs=0, epsrel=1e-12, limit=200)[0] for a, b in zip(cuts, cuts[1:])
        )

    return quad(lambda x: inner(x, True)) / quad(lambda x: inner(x, False))


@pytest.mark.parametrize("k", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 3)])
def test_normal_crossing_lambda_and_multiplicity_from_tempered_expectation(k):
    # Z(n) ~ c n^-lambda (log n)^(m-1), so E[n K] = -dlog Z / dlog n = lambda - (m - 1) / log n + O(1 / log^2 n)
    lam, m = truth.normal_crossing_learning_coefficient(k, multiplicity=True)
    assert lam == truth.normal_crossing_learning_coefficient(k)
    e1, e2 = (_tempered_expectation(k, n) for n in (1e20, 1e40))
    if m == 1:
        # the next pole's term n^-(lambda' - lambda) fades
        assert abs(e2 - lam) < min(abs(e1 - lam), 1e-3 * lam), (k, e1, e2, lam)
    else:
        # (lambda - E) log n -> m - 1, the correction shrinking like 1 / log n
        g1, g2 = ((lam - e) * math.log(n) for e, n in ((e1, 1e20), (e2, 1e40)))
        assert abs(g2 - (m - 1)) < abs(g1 - (m - 1)) < 0.25 * (m - 1), (k, g1, g2)


def test_normal_crossing_multiplicity_counts_the_largest_powers():
    for k in itertools.product(range(1, 5), repeat=3):
        lam, m = truth.normal_crossing_learning_coefficient(list(k), multiplicity=True)
        assert lam == min(1 / (2 * x) for x in k)
        assert m == sum(1 / (2 * x) == lam for x in k)


def test_regular_is_the_gaussian_tempered_expectation():
    # K = |w|^2 in d dimensions: E[n K] under exp(-n K) is d / 2 for every n
    for d in range(0, 8):
        assert truth.regular_learning_coefficient(d) == d / 2
        x = np.linspace(-8, 8, 20001)
        w1 = np.exp(-(x**2))
        one_dim = float(np.sum(x**2 * w1) / np.sum(w1))
        assert truth.regular_learning_coefficient(d) == pytest.approx(d * one_dim, rel=1e-9)


def _localized_direct(k, nbeta, gamma):
    def dens(y, x):
        return math.exp(-nbeta * x ** (2 * k[0]) * y ** (2 * k[1]) - 0.5 * gamma * (x * x + y * y))

    def moment(y, x):
        return nbeta * x ** (2 * k[0]) * y ** (2 * k[1]) * dens(y, x)

    top = 12 / math.sqrt(gamma)
    opts = dict(epsabs=0, epsrel=1e-10)
    return (
        integrate.dblquad(moment, 0, top, 0, top, **opts)[0]
        / integrate.dblquad(dens, 0, top, 0, top, **opts)[0]
    )


@pytest.mark.parametrize(
    "k, nbeta, gamma", [((1, 1), 30.0, 1.0), ((1, 2), 1e3, 1.0), ((2, 3), 30.0, 1.0), ((3, 1), 100.0, 10.0)]
)
def test_localized_expectation_matches_direct_quadrature(k, nbeta, gamma):
    direct = _localized_direct(k, nbeta, gamma)
    assert truth.localized_normal_crossing_expectation(k, nbeta, gamma, grid=601) == pytest.approx(
        direct, rel=1e-4
    )
    assert truth.localized_normal_crossing_expectation(k, nbeta, gamma, grid=1201) == pytest.approx(
        direct, rel=3e-5
    )


def test_localized_expectation_k11_at_large_nbeta():
    # k = (1, 1): the w2-integral is Gaussian, leaving a one-dimensional integral
    nbeta, gamma = 1e8, 1.0

    def both(x):
        a = nbeta * x * x + gamma / 2
        base = math.exp(-gamma * x * x / 2) / math.sqrt(a)
        return base * nbeta * x * x / (2 * a), base

    cuts = [0.0] + [10.0**-e for e in range(8, 0, -1)] + [40.0]
    num = sum(integrate.quad(lambda x: both(x)[0], a, b, epsrel=1e-12)[0] for a, b in zip(cuts, cuts[1:]))
    den = sum(integrate.quad(lambda x: both(x)[1], a, b, epsrel=1e-12)[0] for a, b in zip(cuts, cuts[1:]))
    got = truth.localized_normal_crossing_expectation((1, 1), nbeta, gamma, grid=1201)
    assert got == pytest.approx(num / den, rel=5e-4)


def test_localized_expectation_scaling():
    # w -> s w maps (nbeta, gamma) to (nbeta s^(2 (k1 + k2)), gamma s^2) and leaves E[nbeta K] unchanged
    for k, s in (((1, 1), 0.5), ((1, 2), 2.0)):
        a = truth.localized_normal_crossing_expectation(k, 50.0, 1.0, grid=1201)
        b = truth.localized_normal_crossing_expectation(k, 50.0 / s ** (2 * sum(k)), 1.0 / s**2, grid=1201)
        assert a == pytest.approx(b, rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(powers=[1.5, 2]), "powers"),
        (dict(powers=[0, 2]), "powers"),
        (dict(powers=[-1, 2]), "powers"),
        (dict(nbeta=float("nan")), "nbeta"),
        (dict(nbeta=float("inf")), "nbeta"),
        (dict(nbeta=True), "nbeta"),
        (dict(localization=float("nan")), "localization"),
        (dict(localization=0.0), "localization"),
        (dict(grid=2), "grid"),
        (dict(grid=600.5), "grid"),
        (dict(width=0.0), "width"),
        (dict(width=-1.0), "width"),
    ],
)
def test_localized_expectation_refuses_bad_input(kwargs, name):
    args = dict(powers=[1, 2], nbeta=30.0, localization=1.0, grid=601, width=8.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        truth.localized_normal_crossing_expectation(
            args["powers"], args["nbeta"], args["localization"], grid=args["grid"], width=args["width"]
        )


# ----------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------
def test_regression_design_is_orthonormal():
    for k in range(1, 10):
        for reps in (1, 2, 3):
            for dtype in (torch.float32, torch.float64):
                model = truth.DeepLinearNetwork((k, 2), dtype=dtype)
                x, _ = truth.make_regression_data(model, k, k * reps, dtype=dtype).tensors
                gram = x.T @ x / len(x)
                eye = torch.eye(k, dtype=dtype)
                if math.isqrt(k) ** 2 == k:
                    assert torch.equal(gram, eye)
                else:
                    assert (gram - eye).abs().max() <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("widths", [(3, 2, 4), (4, 3, 3, 2), (2, 5), (5, 1, 1, 3)])
def test_regression_loss_is_frobenius_distance_over_outputs(widths):
    for rank in range(min(widths) + 1):
        teacher = truth.DeepLinearNetwork(widths, dtype=torch.float64).set_teacher(rank, seed=rank, scale=0.7)
        x, y = truth.make_regression_data(teacher, widths[0], 4 * widths[0], dtype=torch.float64).tensors
        torch.manual_seed(rank)
        student = truth.DeepLinearNetwork(widths, dtype=torch.float64)
        loss = torch.nn.functional.mse_loss(student(x), y).item()
        diff = student.product().detach() - teacher.product().detach()
        assert loss == pytest.approx(float((diff**2).sum()) / widths[-1], rel=1e-13)


def test_set_teacher_gives_the_stated_rank():
    n = 0
    for L in (1, 2, 3):
        for widths in itertools.product(range(1, 5), repeat=L + 1):
            for rank in range(min(widths) + 1):
                model = truth.DeepLinearNetwork(widths, dtype=torch.float64).set_teacher(rank, seed=n)
                assert int(torch.linalg.matrix_rank(model.product().detach())) == rank, (widths, rank)
                n += 1
    assert n > 300


@pytest.mark.parametrize("widths", [(3, 4), (3, 2, 4), (3, 2, 2, 4)])
def test_set_teacher_scale_scales_the_product_by_its_square(widths):
    a = truth.DeepLinearNetwork(widths, dtype=torch.float64).set_teacher(2, seed=5).product().detach()
    b = (
        truth.DeepLinearNetwork(widths, dtype=torch.float64)
        .set_teacher(2, seed=5, scale=0.5)
        .product()
        .detach()
    )
    assert torch.allclose(b, 0.25 * a, rtol=1e-14, atol=0)


def test_set_teacher_refuses_bad_input():
    model = truth.DeepLinearNetwork((3, 2, 4))
    for kwargs, name in (
        (dict(rank=3), "rank"),
        (dict(rank=-1), "rank"),
        (dict(rank=1.0), "rank"),
        (dict(rank=1, seed=1.5), "seed"),
        (dict(rank=1, scale=float("nan")), "scale"),
        (dict(rank=1, scale=0.0), "scale"),
        (dict(rank=1, scale=float("inf")), "scale"),
    ):
        with pytest.raises(ValueError, match=name):
            model.set_teacher(**kwargs)


def test_make_regression_data_refuses_bad_input():
    model = truth.DeepLinearNetwork((3, 2))
    for args, name in (
        ((0,), "in_features"),
        ((-3,), "in_features"),
        ((3.0,), "in_features"),
        ((3, 0), "n"),
        ((3, -6), "n"),
        ((3, 6.0), "n"),
        ((3, 4), "n"),
        ((2,), "in_features"),  # the model takes 3 inputs
    ):
        with pytest.raises(ValueError, match=name):
            truth.make_regression_data(model, *args)


def test_formulas_refuse_bad_widths_and_ranks():
    for widths in ((3, 0, 3), (3, -1, 3), (3,), (3.0, 2, 3), 3):
        with pytest.raises(ValueError, match="widths"):
            truth.dln_learning_coefficient(widths)
        with pytest.raises(ValueError, match="widths"):
            truth.DeepLinearNetwork(widths)
    for rank in (-1, 3, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            truth.dln_learning_coefficient((3, 2, 3), rank)
    for args, name in (
        ((0, 2, 3), "input_dim"),
        ((3, -1, 3), "hidden_dim"),
        ((3, 2, 2.0), "output_dim"),
        ((3, 2, 3, 3), "rank"),
    ):
        with pytest.raises(ValueError, match=name):
            truth.rrr_learning_coefficient(*args)
    with pytest.raises(ValueError, match="num_params"):
        truth.regular_learning_coefficient(-1)
    with pytest.raises(ValueError, match="powers"):
        truth.normal_crossing_learning_coefficient([1, 0])


def test_normal_crossing_model_loss_is_K():
    g = torch.Generator().manual_seed(0)
    for powers in ([1, 2], [2, 3], [1, 1, 2], [3]):
        model = truth.NormalCrossing(powers, dtype=torch.float64)
        x, y = truth.make_normal_crossing_data(6, dtype=torch.float64).tensors
        for _ in range(5):
            w = torch.randn(len(powers), generator=g, dtype=torch.float64) * 1.5
            with torch.no_grad():
                model.weight.copy_(w)
            loss = torch.nn.functional.mse_loss(model(x), y).item()
            K = math.prod(float(wi) ** (2 * k) for wi, k in zip(w, powers))
            assert loss == pytest.approx(K, rel=1e-12)


def test_train_refuses_bad_input():
    model, data = truth.make_teacher_task((4, 8, 2), n=32, seed=0)
    for kwargs, name in (
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2.5), "batch_size"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.0), "steps"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=0.0), "lr"),
        (dict(seed=1.5), "seed"),
    ):
        with pytest.raises(ValueError, match=name):
            truth.train(model, data, **kwargs)
