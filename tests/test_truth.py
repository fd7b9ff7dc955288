"""pypattern.truth: Aoyagi's formula against its check values and the independent reduced-rank-regression case
formula, the simple truths, and the toy models' losses against their closed forms."""

import itertools
import math

import pytest
import torch

from pypattern import truth


@pytest.mark.parametrize(
    "widths, expected",
    [((5, 3, 5), 6.5), ((5, 4, 5), 8.0), ((4, 3, 8), 6.0), ((8, 3, 4), 6.0), ((3, 8, 4), 6.0)],
)
def test_aoyagi_check_values_rank0(widths, expected):
    assert truth.dln_learning_coefficient(widths, 0) == expected


def test_aoyagi_equals_rrr_case_formula_on_all_small_shapes():
    # Aoyagi & Watanabe (2005) give reduced-rank regression by cases; the general DLN formula must agree.
    n = 0
    for M, H, N in itertools.product(range(1, 9), repeat=3):
        for r in range(min(M, H, N) + 1):
            assert truth.dln_learning_coefficient((M, H, N), r) == pytest.approx(
                truth.rrr_learning_coefficient(M, H, N, r), abs=1e-12
            ), (M, H, N, r)
            n += 1
    assert n > 1000


def test_aoyagi_single_matrix_is_regular():
    for a, b in itertools.product(range(1, 6), repeat=2):
        for r in range(min(a, b) + 1):
            assert truth.dln_learning_coefficient((a, b), r) == a * b / 2


def test_aoyagi_properties_deep():
    # at full rank with no bottleneck, the product of L matrices is regular in the H_L x H_0 entries... the
    # learning coefficient is at most half the parameter count and at least that of the end-to-end map's rank-r set
    for widths in [(3, 4, 4, 3), (2, 5, 3, 4, 2), (6, 2, 6, 2)]:
        d = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        for r in range(min(widths) + 1):
            lam, m = truth.dln_learning_coefficient(widths, r, multiplicity=True)
            assert 0 <= lam <= d / 2 + 1e-12
            assert m >= 1
            base = (-(r**2) + r * (widths[0] + widths[-1])) / 2
            assert lam >= base - 1e-12
    # a width-1 bottleneck anywhere: rank-0 lambda equals that of the narrow chain of two vectors (H0 + HL) / 2
    assert truth.dln_learning_coefficient((4, 1, 3), 0) == pytest.approx(3 / 2)  # min(H0, HL)/2 for M=(4,1,3)
    assert truth.rrr_learning_coefficient(4, 1, 3, 0) == pytest.approx(3 / 2)


def test_simple_truths():
    assert truth.normal_crossing_learning_coefficient([1, 1]) == 0.5
    assert truth.normal_crossing_learning_coefficient([1, 2]) == 0.25
    assert truth.normal_crossing_learning_coefficient([2, 3]) == pytest.approx(1 / 6)
    assert truth.regular_learning_coefficient(7) == 3.5
    with pytest.raises(ValueError, match="powers"):
        truth.normal_crossing_learning_coefficient([0, 1])
    with pytest.raises(ValueError, match="rank"):
        truth.dln_learning_coefficient((3, 2, 3), 3)
    with pytest.raises(ValueError, match="widths"):
        truth.dln_learning_coefficient((3,), 0)


def test_localized_expectation_tends_to_lambda():
    # the LLC estimator's exact target at finite nbeta approaches lambda as nbeta grows (slowly: log n terms)
    for k in ([1, 1], [1, 2], [2, 3]):
        lam = truth.normal_crossing_learning_coefficient(k)
        vals = [truth.localized_normal_crossing_expectation(k, t, 1.0, grid=1201) for t in (1e2, 1e4, 1e8)]
        assert vals[0] < vals[1] < vals[2] < lam * 1.01
        assert abs(vals[2] - lam) / lam < 0.1, (k, vals)


def test_localized_expectation_quadratic_is_exact():
    # K = w1^2 w2^2 ... a Gaussian case: with k = (1, 1) and w2 fixed the w1-integral is Gaussian; check the grid
    # against a finer grid instead (quadrature accuracy)
    a = truth.localized_normal_crossing_expectation([1, 2], 1e3, 1.0, grid=1201)
    b = truth.localized_normal_crossing_expectation([1, 2], 1e3, 1.0, grid=3001)
    assert a == pytest.approx(b, rel=2e-3)


def test_normal_crossing_loss_is_K():
    m = truth.NormalCrossing([1, 2], dtype=torch.float64)
    ds = truth.make_normal_crossing_data(4, dtype=torch.float64)
    x, y = ds.tensors
    for w in ([0.3, -0.7], [1.5, 0.2], [0.0, 2.0]):
        with torch.no_grad():
            m.weight.copy_(torch.tensor(w, dtype=torch.float64))
        loss = torch.nn.functional.mse_loss(m(x), y).detach()
        assert float(loss) == pytest.approx(w[0] ** 2 * w[1] ** 4, rel=1e-12, abs=1e-15)


def test_dln_regression_loss_is_frobenius_distance():
    torch.manual_seed(1)
    teacher = truth.DeepLinearNetwork((4, 3, 5), dtype=torch.float64).set_teacher(2, seed=3)
    assert torch.linalg.matrix_rank(teacher.product()) == 2
    ds = truth.make_regression_data(teacher, 4, 8, dtype=torch.float64)
    x, y = ds.tensors
    assert torch.allclose(x.T @ x / len(x), torch.eye(4, dtype=torch.float64))
    student = truth.DeepLinearNetwork((4, 3, 5), dtype=torch.float64)
    loss = torch.nn.functional.mse_loss(student(x), y).detach()
    expect = (((student.product() - teacher.product()) ** 2).sum() / 5).detach()
    assert float(loss) == pytest.approx(float(expect), rel=1e-12)


def test_teacher_task_and_train():
    student, ds = truth.make_teacher_task((8, 16, 4), n=512, seed=0)
    assert sum(p.numel() for p in student.parameters()) == 8 * 16 + 16 + 16 * 4 + 4
    losses = truth.train(student, ds, steps=150, batch_size=64, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    big, _ = truth.make_teacher_task(n=8)
    assert sum(p.numel() for p in big.parameters()) == 101_386
    assert math.isfinite(losses[-1])
