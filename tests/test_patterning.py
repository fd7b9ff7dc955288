"""Patterning inversion on synthetic linear-response systems with a planted chi and a planted intervention."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from pypattern.patterning import OnlinePatterner, direction_target, invert, reweight


def _system(k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, n)), rng


def test_pinv_recovers_planted_intervention_overdetermined():
    chi, rng = _system(12, 5)
    h_true = rng.normal(size=5) * 0.01
    h_true -= h_true.mean()  # a re-weighting: mean-1 weights
    iv = invert(chi, chi @ h_true, method="pinv")
    np.testing.assert_allclose(iv.h, h_true, rtol=1e-10, atol=1e-14)
    assert iv.residual < 1e-10
    np.testing.assert_allclose(iv.weights, 1 + 5 * h_true)


def test_pinv_minimum_norm_underdetermined():
    chi, rng = _system(3, 40)
    h_true = rng.normal(size=40) * 0.01
    h_true -= h_true.mean()
    iv = invert(chi, chi @ h_true)
    np.testing.assert_allclose(chi @ iv.h, chi @ h_true, atol=1e-12)  # target reached exactly
    assert np.linalg.norm(iv.h) <= np.linalg.norm(h_true) + 1e-15  # with the smallest intervention
    # the minimum-norm sum-zero solution lies in the row space of the row-centred chi
    chi_c = chi - chi.mean(1, keepdims=True)
    proj = chi_c.T @ np.linalg.lstsq(chi_c.T, iv.h, rcond=None)[0]
    np.testing.assert_allclose(proj, iv.h, atol=1e-12)


@pytest.mark.parametrize("method", ["pinv", "ridge"])
def test_unconstrained_weights_have_mean_one_and_their_response_is_the_predicted_one(method):
    """Rows of an estimated chi do not sum to 0: h is still sum-zero, so the weights have mean 1, and the
    response of the re-weighting they describe (renormalised or not) is ``predicted``."""
    chi, rng = _system(2, 30)
    chi += 0.5  # rows far from summing to 0
    tgt = rng.normal(size=2) * 0.01
    iv = invert(chi, tgt, method=method, **({"alpha": 1e-8} if method == "ridge" else {}))
    assert abs(iv.weights.mean() - 1) < 1e-12 and abs(iv.h.sum()) < 1e-14
    applied = (iv.weights / iv.weights.mean() - 1) / 30
    np.testing.assert_allclose(chi @ applied, iv.predicted, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(iv.predicted, tgt, rtol=1e-5)


def test_weight_bounds_and_settings_are_checked():
    chi, rng = _system(2, 6)
    tgt = rng.normal(size=2) * 0.01
    with pytest.raises(
        ValueError, match="min_weight/max_weight bound the weights of method='constrained' only"
    ):
        invert(chi, tgt, method="pinv", min_weight=0.0)
    with pytest.raises(ValueError, match="min_weight=-1 is not valid; weights are data multiplicities"):
        invert(chi, tgt, method="constrained", min_weight=-1)
    with pytest.raises(ValueError, match="alpha='1' is not valid"):
        invert(chi, tgt, method="ridge", alpha="1")


def test_ridge_tends_to_pinv_and_shrinks():
    chi, rng = _system(4, 20)
    tgt = rng.normal(size=4)
    small = invert(chi, tgt, method="ridge", alpha=1e-10)
    np.testing.assert_allclose(small.h, invert(chi, tgt).h, rtol=1e-6)
    big = invert(chi, tgt, method="ridge", alpha=10.0)
    assert np.linalg.norm(big.h) < np.linalg.norm(small.h) and big.residual > small.residual


def test_constrained_recovers_planted_reweighting_and_holds_constraints_exactly():
    chi, rng = _system(30, 10)
    w_true = rng.uniform(0.2, 2.0, size=10)
    w_true *= 10 / w_true.sum()
    tgt = chi @ (w_true - 1) / 10
    iv = invert(chi, tgt, method="constrained")
    np.testing.assert_allclose(iv.weights, w_true, atol=1e-5)
    assert iv.residual < 1e-4
    assert (iv.weights >= 0).all() and abs(iv.weights.sum() - 10) < 1e-12


def test_constrained_with_group_fractions_keeps_the_data_mean():
    """Groups of unequal size: the fixed total is the data-weighted one, so the weights need no rescaling and the
    predicted response is the response to the weights returned."""
    chi, rng = _system(8, 4)
    f = np.array([0.1, 0.2, 0.3, 0.4])
    w_true = np.array([2.0, 0.5, 1.5, 0.5])
    w_true = w_true / (f @ w_true)  # data mean 1
    tgt = chi @ (w_true - 1) / 4
    iv = invert(chi, tgt, method="constrained", fractions=f)
    np.testing.assert_allclose(iv.weights, w_true, atol=1e-5)
    assert abs(f @ iv.weights - 1) < 1e-12
    np.testing.assert_allclose(iv.predicted, chi @ (iv.weights - 1) / 4, atol=1e-12)
    # bounds and the weighted total hold together on an unreachable target
    far = invert(chi, 1e3 * tgt, method="constrained", fractions=10 * f, min_weight=0.1, max_weight=3.0)
    assert far.weights.min() >= 0.1 - 1e-12 and far.weights.max() <= 3.0 + 1e-12
    assert abs(f @ far.weights - 1) < 1e-12
    # without fractions the unweighted total is kept instead, so the data mean moves
    plain = invert(chi, tgt, method="constrained")
    assert abs(plain.weights.sum() - 4) < 1e-12
    with pytest.raises(ValueError, match="fractions must be 4 finite positive"):
        invert(chi, tgt, method="constrained", fractions=[1, 0, 1, 1])
    with pytest.raises(ValueError, match="fractions apply to method='constrained' only"):
        invert(chi, tgt, method="pinv", fractions=f)


def test_constrained_unreachable_target_stays_feasible():
    chi, rng = _system(2, 50)
    tgt = np.array([1e3, -1e3])  # far beyond any re-weighting
    iv = invert(chi, tgt, method="constrained", min_weight=0.1, max_weight=5.0)
    assert iv.weights.min() >= 0.1 - 1e-12 and iv.weights.max() <= 5.0 + 1e-12
    assert abs(iv.weights.mean() - 1) < 1e-12
    assert 0 < iv.residual < 1  # partly reached, and says so
    # it moves in the right direction
    assert iv.predicted @ tgt > 0


def test_direction_target_and_sign():
    chi, _ = _system(3, 30)
    d = np.array([1.0, -2.0, 2.0])
    t = direction_target(d, -0.3)
    np.testing.assert_allclose(np.linalg.norm(t), 0.3)
    iv = invert(chi, t)
    assert iv.predicted @ d < 0  # against the direction


def test_reweight_loss_and_sampler():
    data = torch.arange(10).float().unsqueeze(1)
    w = np.zeros(10)
    w[3] = 1.0
    w[7] = 3.0
    lw = reweight(data, w, mode="loss")
    assert lw.shape == (10,) and abs(float(lw.mean()) - 1) < 1e-6
    loader = reweight(
        data, w, mode="sampler", batch_size=50, num_samples=4000, generator=torch.Generator().manual_seed(0)
    )
    seen = torch.cat([b[0] for b in loader]).flatten()  # a TensorDataset's batches: [rows]
    assert set(seen.long().tolist()) == {3, 7}
    frac7 = float((seen == 7).float().mean())
    assert abs(frac7 - 0.75) < 0.03


def test_reweight_keeps_a_data_loaders_collate_fn_and_batch_size():
    """A DataLoader over dict samples with its own collate_fn (a padding collator, say) stays that loader, drawn
    by the weights: its batch size, collate_fn and drop_last are kept unless batch_size is given."""
    samples = [{"input_ids": torch.arange(i + 1)} for i in range(6)]

    def pad(items):
        n = max(len(x["input_ids"]) for x in items)
        ids = torch.zeros(len(items), n, dtype=torch.long)
        mask = torch.zeros(len(items), n, dtype=torch.long)
        for j, x in enumerate(items):
            ids[j, : len(x["input_ids"])] = x["input_ids"]
            mask[j, : len(x["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask}

    src = torch.utils.data.DataLoader(samples, batch_size=4, collate_fn=pad, drop_last=True)
    w = np.array([0, 0, 0, 0, 1.0, 1.0])
    loader = reweight(src, w, num_samples=12, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 4 for b in batches)
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    assert set(lengths.tolist()) <= {5, 6}
    assert reweight(src, w, batch_size=6, num_samples=12).batch_size == 6
    with pytest.raises(ValueError, match=r"batch_size=0 is not valid"):
        reweight(src, w, batch_size=0)


def test_reweight_of_an_unbatched_loader_an_iterable_one_and_an_intervention():
    """A DataLoader yielding samples one by one (``batch_size=None``) gives collated batches of 32 (not lists of
    samples); a DataLoader over an IterableDataset cannot be drawn from by index and is refused naming it; an
    Intervention is read as its weights."""
    ds = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.randint(0, 3, (6,)))
    w = np.array([0, 1, 2, 3, 0.5, 0.5])
    b = next(iter(reweight(torch.utils.data.DataLoader(ds, batch_size=None), w)))
    assert [tuple(t.shape) for t in b] == [(6, 4), (6,)]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(ds)

    with pytest.raises(TypeError, match="a DataLoader over Stream, which cannot be drawn from by index"):
        reweight(torch.utils.data.DataLoader(Stream(), batch_size=2), w)
    iv = invert(np.random.default_rng(0).normal(size=(1, 6)), [0.1], method="constrained")
    torch.testing.assert_close(reweight(ds, iv, mode="loss"), reweight(ds, iv.weights, mode="loss"))
    with pytest.raises(
        TypeError, match=r"weights must be an array of real numbers, got object values; give per-sample"
    ):
        reweight(ds, object())
    with pytest.raises(TypeError) as e:  # weights named once
        reweight(ds, "a")
    assert str(e.value).count("weights") == 2 and "of type str" in str(e.value)


def _rows_dataset(n=10):
    return TensorDataset(torch.arange(n).float()[:, None])


def _rows_read(loader) -> list[int]:
    return [int(x) for b in loader for x in b[0][:, 0]]


def test_reweight_draws_only_among_the_rows_a_subset_random_sampler_reads():
    ds = _rows_dataset()
    train = DataLoader(ds, batch_size=5, sampler=SubsetRandomSampler(range(5)))
    out = reweight(train, torch.ones(10), generator=torch.Generator().manual_seed(0))
    assert len(out.sampler) == 5  # an epoch as long as the split's
    many = reweight(train, torch.ones(10), num_samples=2000, generator=torch.Generator().manual_seed(0))
    assert set(_rows_read(many)) == {0, 1, 2, 3, 4}
    # the weights are per data set row: only the split's rows with positive weight are drawn
    w = torch.zeros(10)
    w[3], w[4], w[7] = 1.0, 3.0, 100.0
    drawn = np.array(
        _rows_read(reweight(train, w, num_samples=4000, generator=torch.Generator().manual_seed(1)))
    )
    assert set(drawn.tolist()) == {3, 4}
    assert abs((drawn == 4).mean() - 0.75) < 0.03


def test_reweight_counts_a_row_a_subset_sampler_lists_twice_twice():
    loader = DataLoader(_rows_dataset(), batch_size=4, sampler=SubsetRandomSampler([1, 1, 2]))
    drawn = np.array(
        _rows_read(
            reweight(loader, np.ones(10), num_samples=6000, generator=torch.Generator().manual_seed(0))
        )
    )
    assert set(drawn.tolist()) == {1, 2}
    assert abs((drawn == 1).mean() - 2 / 3) < 0.03
    assert len(reweight(loader, np.ones(10)).sampler) == 3


def test_reweight_of_a_sequential_sampler_over_part_of_the_data_draws_that_part():
    loader = DataLoader(_rows_dataset(), batch_size=2, sampler=SequentialSampler(range(4)))
    assert _rows_read(loader) == [0, 1, 2, 3]
    out = reweight(loader, np.ones(10), num_samples=1000, generator=torch.Generator().manual_seed(0))
    assert set(_rows_read(out)) == {0, 1, 2, 3}


@pytest.mark.parametrize("shuffle", [False, True])
def test_reweight_of_a_loader_over_every_row_draws_every_row(shuffle):
    loader = DataLoader(_rows_dataset(), batch_size=5, shuffle=shuffle)
    out = reweight(loader, np.ones(10), num_samples=2000, generator=torch.Generator().manual_seed(0))
    assert set(_rows_read(out)) == set(range(10))
    assert len(reweight(loader, np.ones(10)).sampler) == 10
    # a subset sampler listing every row once is the whole data set
    every = DataLoader(
        _rows_dataset(), batch_size=5, sampler=SubsetRandomSampler([3, 1, 2, 0, 4, 5, 6, 7, 8, 9])
    )
    assert len(reweight(every, np.ones(10)).sampler) == 10


def test_reweight_refuses_zero_weights_on_the_rows_the_sampler_reads():
    train = DataLoader(_rows_dataset(), batch_size=5, sampler=SubsetRandomSampler(range(5)))
    w = torch.zeros(10)
    w[5:] = 1.0
    with pytest.raises(
        ValueError, match=r"all zero on the 5 rows data's sampler reads \(SubsetRandomSampler\)"
    ):
        reweight(train, w)


def test_reweight_says_weights_are_per_data_set_row_when_given_one_per_split_row():
    train = DataLoader(_rows_dataset(), batch_size=5, sampler=SubsetRandomSampler(range(5)))
    with pytest.raises(
        ValueError, match=r"weights has 5 entries but the data has 10 samples .*data\.dataset"
    ):
        reweight(train, torch.ones(5))


def test_reweight_refuses_subset_indices_outside_the_data_set():
    loader = DataLoader(_rows_dataset(), batch_size=5, sampler=SubsetRandomSampler([0, 12]))
    with pytest.raises(ValueError, match=r"SubsetRandomSampler reads rows \[12\], outside 0\.\.9"):
        reweight(loader, torch.ones(10))


class _EvenRows(Sampler):
    def __iter__(self):
        return iter(range(0, 10, 2))

    def __len__(self):
        return 5


@pytest.mark.parametrize(
    "loader_kw, name",
    [
        (dict(sampler=WeightedRandomSampler(torch.ones(10), 10)), "WeightedRandomSampler"),
        (dict(sampler=RandomSampler(range(10), replacement=True)), "RandomSampler"),
        (dict(sampler=RandomSampler(range(10), num_samples=3)), "RandomSampler"),
        (dict(sampler=_EvenRows()), "_EvenRows"),
        (dict(batch_sampler=BatchSampler(SubsetRandomSampler(range(5)), 2, False)), "BatchSampler"),
    ],
)
def test_reweight_refuses_a_sampler_it_cannot_keep_by_name(loader_kw, name):
    loader = DataLoader(_rows_dataset(), **({"batch_size": 2} if "sampler" in loader_kw else {}), **loader_kw)
    with pytest.raises(ValueError, match=rf"data is a DataLoader .*{name}.*data=loader\.dataset"):
        reweight(loader, torch.ones(10))
    # the loss weights are per data set row whatever the sampler
    torch.testing.assert_close(reweight(loader, torch.ones(10), mode="loss"), torch.ones(10))


def test_online_patterner_follows_a_drifting_system():
    """The true chi drifts during 'training'; re-estimating keeps the response on target."""
    rng = np.random.default_rng(1)
    base, drift = rng.normal(size=(3, 25)), rng.normal(size=(3, 25))

    def chi_at(step):
        return base + 0.02 * step * drift

    tgt = np.array([0.01, -0.02, 0.005])
    op = OnlinePatterner(chi_at, tgt, every=10, invert_kwargs={"method": "pinv"})
    for step in range(50):
        w = op.weights_for(step)
        if step % 10 == 0:
            np.testing.assert_allclose(chi_at(step) @ (w - 1) / 25, tgt, atol=1e-12)
    assert [s for s, _ in op.history] == [0, 10, 20, 30, 40]
    stale = op.history[0][1].weights
    assert np.linalg.norm(chi_at(40) @ (stale - 1) / 25 - tgt) > 1e-3  # the first solution no longer works


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(chi=np.zeros((2, 0)), target=[0, 0]), "no data columns"),
        (dict(chi=np.ones((2, 3)), target=[0]), "one entry per observable"),
        (dict(chi=np.full((2, 3), np.nan), target=[0, 0]), "NaN"),
        (dict(chi=np.ones((2, 3)), target=[0, 0], method="ridge"), "alpha > 0"),
        (dict(chi=np.ones((2, 3)), target=[0, 0], method="lasso"), "method must be"),
        (dict(chi=np.ones((2, 3)), target=[0, 0], method="constrained", min_weight=2.0), "must contain"),
    ],
)
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        invert(**kw)
    with pytest.raises(ValueError, match="non-negative"):
        reweight(torch.zeros(3), [1, -1, 1])
    with pytest.raises(ValueError, match="3 samples"):
        reweight(torch.zeros(3), [1, 1])


@pytest.mark.parametrize("arg", ["min_weight", "max_weight"])
def test_invert_refuses_nan_bounds(arg):
    chi = np.eye(2, 3)
    with pytest.raises(ValueError, match=f"{arg}=nan is not valid"):
        invert(chi, np.ones(2), method="constrained", **{arg: float("nan")})


@pytest.mark.parametrize("rcond", [float("nan"), float("inf"), -1.0, "0.1"])
def test_invert_refuses_bad_rcond(rcond):
    chi = np.eye(2, 3)
    with pytest.raises(ValueError, match="rcond=.* is not valid; give a finite number >= 0"):
        invert(chi, np.ones(2), rcond=rcond)
    assert invert(chi, np.ones(2), rcond=1e-12).weights.shape == (3,)


def test_constrained_without_penalty_is_the_smallest_change_reaching_the_target():
    """alpha=0: where the minimum-norm weights reaching the target respect the bounds, method='constrained' returns
    them (the same as pinv), not any other exact re-weighting farther from uniform."""
    rng = np.random.default_rng(0)
    for k, n in ((3, 20), (2, 100), (1, 10)):
        chi = rng.normal(size=(k, n))
        t = rng.normal(size=k) * 0.002
        c, p = invert(chi, t, method="constrained"), invert(chi, t, method="pinv")
        assert p.weights.min() >= 0
        np.testing.assert_allclose(c.weights, p.weights, rtol=0, atol=1e-10)
        assert c.residual <= 1e-12
        assert abs(c.weights.mean() - 1) <= 1e-14


def test_patterning_refuses_bool_bounds_float_groups_and_zero_samples():
    chi = np.random.default_rng(0).normal(size=(2, 6))
    with pytest.raises(ValueError, match="max_weight=True is not valid"):
        invert(chi, [0.05, 0.05], method="constrained", max_weight=True)
    iv = invert(chi, [0.01, 0.01], method="constrained")
    with pytest.raises(ValueError, match="integer group indices"):
        iv.per_sample([0.5, 1.7, 2])
    np.testing.assert_array_equal(iv.per_sample(np.array([0, 5])), iv.weights[[0, 5]])
    data = torch.utils.data.TensorDataset(torch.arange(6.0))
    with pytest.raises(ValueError, match="num_samples=0 is not valid"):
        reweight(data, np.ones(6), num_samples=0)
    assert len(reweight(data, np.ones(6), num_samples=4).sampler) == 4


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-5, 1e-6, 1e-8])
@pytest.mark.parametrize("alpha", [0.01, 1.0])
def test_constrained_inversion_of_a_small_target_reaches_the_closed_form_optimum(scale, alpha):
    # bounds that do not bind: the optimum is the sum-zero ridge solution, linear in the target, reached however
    # small the target (weights that move by 1e-5 or less included), not stopped short or at the uniform weights
    rng = np.random.default_rng(0)
    chi = 40 * rng.standard_normal((3, 8))
    tgt = scale * np.array([1.0, -0.5, 0.3])
    n = chi.shape[1]
    a = chi / n
    # the KKT system of min |a d - t|^2 + (alpha / n) |d|^2, sum(d) = 0, solved densely
    kkt = np.block(
        [[2 * (a.T @ a + alpha / n * np.eye(n)), np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]]
    )
    d = np.linalg.solve(kkt, np.concatenate([2 * a.T @ tgt, [0.0]]))[:n]
    iv = invert(chi, tgt, method="constrained", alpha=alpha)
    np.testing.assert_allclose(iv.weights - 1, d, rtol=1e-6, atol=1e-9 * scale)
    assert abs(iv.weights.sum() - n) < 1e-9


def test_inputs_that_track_gradients_huge_weights_and_nan_directions():
    """Targets and weights held as tensors that track gradients are read as values; loss weights near float64's
    largest value keep their proportions (their mean does not overflow into all zeros); a non-finite direction or
    amount is refused (it would give a NaN target)."""
    chi = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    res = invert(chi, target)
    ref = invert(chi.numpy(), [0.1, 0.2])
    assert np.allclose(res.weights, ref.weights)
    data = torch.arange(6.0)[:, None]
    w = reweight(data, torch.ones(6, requires_grad=True), mode="loss")
    assert torch.equal(w, torch.ones(6))
    big = reweight(data, [1e308, 1e308, 1, 1, 1, 1], mode="loss")
    assert torch.allclose(big, torch.tensor([3.0, 3.0, 0.0, 0.0, 0.0, 0.0]))
    for direction, amount in (([np.nan, 1.0], 1.0), ([1.0, 1.0], np.nan), ([np.inf, 0.0], 1.0)):
        with pytest.raises(ValueError, match="must be finite"):
            direction_target(direction, amount)
    assert np.allclose(direction_target(torch.tensor([3.0, 4.0], requires_grad=True), 5.0), [3.0, 4.0])


def _kkt_gap(chi, tgt, alpha, lo, hi, w, c=None):
    """How far weights are from optimal for method='constrained', by the KKT conditions (an independent
    certificate): some multiplier ``lam`` of the fixed total must make ``grad + lam c`` vanish on the weights
    inside the bounds and point inward at each bound; the answer is the gap between the largest lower limit on
    ``lam`` and the smallest upper one, relative to the gradient's size (0: optimal)."""
    n = chi.shape[1]
    a = chi / n
    c = np.ones(n) if c is None else c * n / c.sum()
    ratio = -(2 * a.T @ (a @ (w - 1) - tgt) + 2 * alpha * (w - 1) / n) / c
    at_lo = w <= lo + 1e-7
    at_hi = np.zeros(n, bool) if hi is None else w >= hi - 1e-7
    free = ~at_lo & ~at_hi
    lower = max(ratio[at_lo].max(initial=-np.inf), ratio[free].max(initial=-np.inf))  # lam >= these
    upper = min(ratio[at_hi].min(initial=np.inf), ratio[free].min(initial=np.inf))  # lam <= these
    return max(0.0, lower - upper) / float(np.abs(ratio).max())


def test_constrained_with_binding_bounds_matches_an_independent_solver():
    """Targets far beyond what the bounds allow, on random systems of every scale: the objective equals scipy's
    SLSQP on the same problem (to 1e-9), the bounds and the fixed total hold exactly."""
    from scipy.optimize import Bounds, LinearConstraint, minimize

    rng = np.random.default_rng(5)
    for trial in range(40):
        k, n = int(rng.integers(1, 5)), int(rng.integers(3, 50))
        chi = rng.normal(size=(k, n)) * 10 ** rng.uniform(-3, 3)
        alpha = [0.0, 1e-3, 1.0][trial % 3]
        lo, hi = float(rng.choice([0.0, 0.5])), [None, 1.5, 3.0][trial % 3 if trial % 2 else 0]
        c = rng.uniform(0.5, 2, n) if trial % 4 == 0 else None
        cw = np.ones(n) if c is None else c * n / c.sum()
        tgt = chi @ rng.normal(size=n) / n * rng.choice([0.1, 10, 100])
        w = invert(
            chi, tgt, method="constrained", alpha=alpha, min_weight=lo, max_weight=hi, fractions=c
        ).weights
        a, s = chi / n, 1 / float(tgt @ tgt)

        def f(v, a=a, tgt=tgt, s=s, alpha=alpha, n=n):
            return s * (np.sum((a @ (v - 1) - tgt) ** 2) + alpha * np.sum((v - 1) ** 2) / n)

        ref = minimize(
            f,
            np.ones(n),
            jac=lambda v, a=a, tgt=tgt, s=s, alpha=alpha, n=n: (
                s * (2 * a.T @ (a @ (v - 1) - tgt) + 2 * alpha * (v - 1) / n)
            ),
            bounds=Bounds(np.full(n, lo), np.full(n, np.inf if hi is None else hi)),
            constraints=[LinearConstraint(cw[None], n, n)],
            method="SLSQP",
            options=dict(maxiter=2000, ftol=1e-15),
        )
        assert f(w) <= f(ref.x) + 1e-9, (trial, f(w), f(ref.x))
        assert w.min() >= lo and (hi is None or w.max() <= hi)
        assert abs(cw @ w - n) <= 1e-9 * n


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_constrained_on_many_samples_with_a_binding_bound_is_optimal(alpha):
    """Tens of thousands of samples with a max_weight that binds (the target is far out of reach): the answer is
    optimal by the KKT conditions, within the bounds, with mean weight 1 (no n x n matrix is formed)."""
    rng = np.random.default_rng(0)
    n = 30_000
    chi = rng.normal(size=(3, n))
    tgt = np.array([5.0, -3.0, 2.0])
    iv = invert(chi, tgt, method="constrained", max_weight=2.0, alpha=alpha)
    w = iv.weights
    assert w.min() >= 0 and w.max() <= 2.0
    assert abs(w.mean() - 1) < 1e-12
    assert (w == 2.0).sum() > n // 10 and (w == 0).sum() > n // 10  # the bounds bind
    assert _kkt_gap(chi, tgt, alpha, 0.0, 2.0, w) < 1e-6
    assert 0.5 < iv.residual < 1  # out of reach, but moved toward it


def test_invert_refuses_chi_without_observables():
    with pytest.raises(ValueError, match="no observables"):
        invert(np.zeros((0, 5)), np.zeros(0))


def test_constrained_is_invariant_to_the_units_of_chi_and_handles_more_observables_than_data():
    """chi in other units (chi and the target times s, the penalty times s^2) gives the same weights, from 1e-150
    to 1e150; more observables than data points with a tiny penalty converges."""
    rng = np.random.default_rng(0)
    chi, t = rng.normal(size=(3, 300)), np.array([3.0, -2.0, 1.0])
    for alpha in (0.0, 0.3):
        w = invert(chi, t, method="constrained", alpha=alpha, max_weight=2.0).weights
        for s in (1e-150, 1e-4, 1e3, 1e150):
            ws = invert(chi * s, t * s, method="constrained", alpha=alpha * s * s, max_weight=2.0).weights
            np.testing.assert_allclose(ws, w, atol=1e-9)
    chi, t = rng.normal(size=(8, 3)), rng.normal(size=8)
    for alpha in (0.0, 1e-8, 1.0):
        iv = invert(chi, t, method="constrained", alpha=alpha)
        assert iv.weights.min() >= 0 and abs(iv.weights.mean() - 1) < 1e-12
        assert _kkt_gap(chi, t, alpha, 0.0, None, iv.weights) < 1e-6


@pytest.mark.parametrize("method", ["pinv", "ridge", "constrained"])
def test_invert_warns_when_no_reweighting_moves_an_observable(method):
    """chi zero, or constant along each row (every data point moves each observable alike): no re-weighting moves
    anything; the uniform weights come back with residual 1 and a warning saying why. A chi that responds gives no
    warning."""
    alpha = 0.1 if method == "ridge" else 0.0
    for chi in (np.zeros((2, 10)), np.outer([1.0, -2.0], np.ones(10))):
        with pytest.warns(UserWarning, match="re-weighting the data moves no observable"):
            r = invert(chi, np.array([1.0, 0.0]), method=method, alpha=alpha)
        np.testing.assert_allclose(r.weights, np.ones(10))
        assert r.residual == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        invert(
            np.random.default_rng(0).normal(size=(2, 10)), np.array([1.0, 0.0]), method=method, alpha=alpha
        )
        invert(np.zeros((2, 10)), np.zeros(2), method=method, alpha=alpha)  # nothing asked: nothing to say


def test_group_columns_in_the_documented_convention_predict_the_per_point_response():
    """Unequal groups: columns built as the module docstring says (``G / N_data`` times the sum of the group's
    per-point susceptibilities, or ``G f_g`` times the mixing derivative) and ``fractions`` give an intervention
    whose predicted response is the response of the per-point weights it means (each point weighted by its group's
    weight), which keep mean weight 1."""
    rng = np.random.default_rng(0)
    n_data, sizes = 40, [25, 10, 5]
    groups = np.repeat(np.arange(3), sizes)
    chi_z = rng.normal(size=(2, n_data))
    G, f = 3, np.array(sizes) / n_data
    cols = np.stack([chi_z[:, groups == g].sum(1) for g in range(G)], 1) * G / n_data
    mixing = np.stack(
        [chi_z[:, groups == g].sum(1) / sizes[g] for g in range(G)], 1
    )  # d mu / d h, q + h (q_g - q)
    np.testing.assert_allclose(cols, mixing * G * f, rtol=1e-12)
    r = invert(cols, np.array([0.3, -0.1]), method="constrained", fractions=f)
    w = r.weights[groups]  # per-point weights
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(chi_z @ (w - 1) / n_data, r.predicted, rtol=1e-9, atol=1e-12)


def test_constrained_converges_where_newton_on_the_dual_stalls():
    """Problems where Newton's steps on the dual stall between kinks (the active set changing back and forth: more
    observables than samples, or a tight box): the solver goes on with a quasi-Newton ascent and ends at the
    optimum (SLSQP's objective or better), within the bounds and the fixed total, without raising."""
    from scipy.optimize import Bounds, LinearConstraint, minimize

    rng = np.random.default_rng(5)
    for _ in range(25):  # the 25th draw of this stream is one such problem (k = 10, n = 50, bounds [0, 2])
        k = int(rng.integers(2, 12))
        n = int(rng.choice([50, 500, 5000]))
        chi = rng.normal(size=(k, n)) * rng.uniform(0.1, 10, size=(k, 1))
        tgt = rng.normal(size=k) * 10 ** rng.uniform(-2, 1)
        lo, hi = float(rng.choice([0, 0.5, 0.9])), [None, 1.2, 2.0][rng.integers(3)]
        rng.choice([0, 0, 1e-4, 1e-1])
    assert (k, n, lo, hi) == (10, 50, 0.0, 2.0)
    w = invert(chi, tgt, method="constrained", min_weight=lo, max_weight=hi).weights
    a, s = chi / n, 1 / float(tgt @ tgt)

    def f(v):
        return s * np.sum((a @ (v - 1) - tgt) ** 2)

    ref = minimize(
        f,
        np.ones(n),
        jac=lambda v: s * 2 * a.T @ (a @ (v - 1) - tgt),
        bounds=Bounds(np.full(n, lo), np.full(n, hi)),
        constraints=[LinearConstraint(np.ones((1, n)), n, n)],
        method="SLSQP",
        options=dict(maxiter=2000, ftol=1e-15),
    )
    assert f(w) <= f(ref.x) + 1e-9, (f(w), f(ref.x))
    assert w.min() >= lo and w.max() <= hi and abs(w.sum() - n) <= 1e-9 * n


def test_invert_reads_a_column_target_and_refuses_a_matrix():
    """A target of shape (K, 1) or (1, K) is the vector of K changes; a (2, 2) target for K = 4 observables is not
    read as one (it is refused, not flattened)."""
    rng = np.random.default_rng(0)
    chi = rng.normal(size=(4, 9))
    t = rng.normal(size=4)
    ref = invert(chi, t).weights
    np.testing.assert_array_equal(invert(chi, t[:, None]).weights, ref)
    np.testing.assert_array_equal(invert(chi, t[None, :]).weights, ref)
    with pytest.raises(
        ValueError, match=r"target has shape \(2, 2\); give one entry per observable, shape \(4,\)"
    ):
        invert(chi, t.reshape(2, 2))


@pytest.mark.parametrize("scale", [1e10, 1e160, 1e300])
def test_the_residual_of_a_target_near_float64s_largest_is_finite(scale):
    """The residual is relative to the target: finite for any finite target (its norm is taken at the target's
    scale), 1 where weights bounded by min/max_weight reach none of it, rounding where pinv reaches all of it."""
    chi = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -0.4]])
    target = np.array([scale, -scale])
    assert invert(chi, target, method="constrained").residual == pytest.approx(1.0, abs=1e-6)
    assert invert(chi, target, method="pinv").residual < 1e-12


def _ridge_reference(chi, tgt, alpha, digits=80):
    """``chi_c^T (chi_c chi_c^T + alpha I)^-1 tgt`` in ``digits``-digit arithmetic (mpmath), from the float64
    inputs as they are (each converted exactly), ``chi_c`` centred exactly."""
    import mpmath

    with mpmath.workdps(digits):
        k, n = chi.shape
        c = mpmath.matrix([[mpmath.mpf(float(v)) for v in row] for row in chi])
        for i in range(k):
            mean = mpmath.fsum(c[i, j] for j in range(n)) / n
            for j in range(n):
                c[i, j] -= mean
        m = c * c.T + mpmath.mpf(alpha) * mpmath.eye(k)
        h = c.T * mpmath.lu_solve(m, mpmath.matrix([mpmath.mpf(float(v)) for v in tgt]))
        return np.array([float(h[j]) for j in range(n)])


@pytest.mark.parametrize(
    "case",
    ["more_observables_than_data", "duplicated_rows", "chi_near_1e160", "chi_near_1e-160", "moderate"],
)
def test_ridge_matches_a_high_precision_computation(case):
    """method='ridge' is the ridge formula to rounding (an 80-digit computation of it) with more observables
    than data and an alpha far below chi's scale squared (where the K x K normal equations lose every digit),
    with rank-deficient chi (where they are singular in float64) and with chi near float64's largest or smallest
    (where its products overflow or underflow); as alpha -> 0 it is the minimum-norm (pinv) solution."""
    rng = np.random.default_rng(1)
    if case == "more_observables_than_data":
        chi, tgt, alpha = rng.normal(size=(8, 3)), rng.normal(size=8), 1e-30
    elif case == "duplicated_rows":
        row = rng.normal(size=(1, 6))
        chi, tgt, alpha = np.vstack([row, row]), np.array([0.1, 0.1]), 1e-20
    elif case == "chi_near_1e160":
        chi, tgt, alpha = rng.normal(size=(3, 10)) * 1e160, np.array([1.0, -2.0, 0.5]) * 1e158, 1e300
    elif case == "chi_near_1e-160":
        chi, tgt, alpha = rng.normal(size=(3, 10)) * 1e-160, np.array([1.0, -2.0, 0.5]) * 1e-162, 1e-321
    else:
        chi, tgt, alpha = rng.normal(size=(4, 12)), rng.normal(size=4), 0.3
    iv = invert(chi, tgt, method="ridge", alpha=alpha)
    assert np.isfinite(iv.h).all() and np.isfinite(iv.weights).all()
    ref = _ridge_reference(chi, tgt, alpha)
    np.testing.assert_allclose(iv.h, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    if case not in (
        "moderate",
        "chi_near_1e-160",
    ):  # alpha negligible against chi_c chi_c^T: the pinv solution
        pinv = invert(chi, tgt, method="pinv")
        np.testing.assert_allclose(iv.h, pinv.h, rtol=1e-9, atol=1e-12 * np.abs(pinv.h).max())
        assert iv.residual == pytest.approx(pinv.residual, rel=1e-9, abs=1e-12)
    if case == "more_observables_than_data":  # the part of the target no h reaches, reported as such
        assert iv.residual == pytest.approx(np.linalg.norm(chi @ ref - tgt) / np.linalg.norm(tgt), rel=1e-9)
        assert iv.residual == pytest.approx(0.7641646, abs=1e-7)
    if case == "chi_near_1e-160":  # alpha = 0.1 in chi's units squared: a real shrinkage
        assert np.linalg.norm(iv.h) < 0.97 * np.linalg.norm(invert(chi, tgt, method="pinv").h)


def test_ridge_at_a_scale_is_ridge_with_the_penalty_scaled():
    """ridge(s chi, s t, alpha s^2) = ridge(chi, t, alpha) for s far from 1 (the penalty is in chi's units squared,
    as given), and ridge's shrinkage against the float64 SVD formula on well-scaled data."""
    rng = np.random.default_rng(2)
    chi, t = rng.normal(size=(3, 15)), rng.normal(size=3)
    chi_c = chi - chi.mean(1, keepdims=True)
    u, s, vt = np.linalg.svd(chi_c, full_matrices=False)
    for alpha in (1e-3, 0.5, 40.0):
        ref = vt.T @ (s / (s**2 + alpha) * (u.T @ t))
        np.testing.assert_allclose(invert(chi, t, method="ridge", alpha=alpha).h, ref, rtol=1e-12, atol=1e-15)
        for scale in (2.0**-500, 3e-100, 7e100, 2.0**500):
            h = invert(chi * scale, t * scale, method="ridge", alpha=alpha * scale * scale).h
            np.testing.assert_allclose(h, ref, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize(
    ("direction", "expected"),
    [
        ([1e300, 1e300], [2**-0.5, 2**-0.5]),
        ([1e300, -1e300, 1e300], [3**-0.5, -(3**-0.5), 3**-0.5]),
        ([1e-320, 0.0], [1.0, 0.0]),
        ([3e-310, 4e-310], [0.6, 0.8]),
        ([3.0, 4.0], [0.6, 0.8]),
    ],
)
def test_direction_target_of_directions_near_float64s_limits(direction, expected):
    """The direction's norm is taken at its own scale: entries near float64's largest do not overflow into a zero
    target, subnormal ones are not taken for a zero direction."""
    np.testing.assert_allclose(direction_target(direction, 2.0), 2.0 * np.array(expected), rtol=1e-15)
    with pytest.raises(ValueError, match=r"direction must have a non-zero entry, got \[0.0, 0.0\]"):
        direction_target([0.0, 0.0], 1.0)


def test_reweight_of_a_loader_over_a_tensor_yields_its_batches_structure():
    """A DataLoader over a bare tensor yields tensors of rows; the re-weighted loader draws from that tensor as it
    is and yields tensors too (not one-element lists), the rows the weights pick. A bare tensor is a TensorDataset
    of it (one-element lists, as documented)."""
    x = torch.arange(30.0).reshape(10, 3)
    src = DataLoader(x, batch_size=4)
    w = np.zeros(10)
    w[[2, 5]] = 1.0
    out = reweight(src, w, generator=torch.Generator().manual_seed(0))
    assert out.dataset is x
    batches = list(out)
    assert all(type(b) is torch.Tensor for b in batches) and type(next(iter(src))) is torch.Tensor
    assert [tuple(b.shape) for b in batches] == [(4, 3), (4, 3), (2, 3)]
    assert set(torch.cat(batches)[:, 0].tolist()) == {6.0, 15.0}  # rows 2 and 5
    dict_src = DataLoader([{"x": r} for r in x], batch_size=4)  # a list of dicts: dict batches
    assert set(next(iter(reweight(dict_src, w)))) == {"x"}
    bare = next(iter(reweight(x, w, batch_size=4)))
    assert isinstance(bare, list) and len(bare) == 1 and bare[0].shape == (4, 3)


def _worker_init(worker_id):  # module level: picklable for worker processes
    torch.manual_seed(worker_id)


def test_reweight_keeps_a_loaders_worker_settings_and_generator():
    """The worker settings of the given DataLoader stay the re-weighted loader's; its generator seeds the workers
    and, unless reweight is given one, draws the rows: two loaders from equally seeded generators draw the same
    rows, and a generator given to reweight draws them instead."""
    x = torch.arange(20.0)[:, None]
    src = DataLoader(
        x,
        batch_size=5,
        num_workers=2,
        worker_init_fn=_worker_init,
        prefetch_factor=3,
        persistent_workers=True,
        timeout=30.0,
        generator=torch.Generator().manual_seed(7),
    )
    out = reweight(src, np.ones(20))
    assert out.num_workers == 2 and out.worker_init_fn is _worker_init
    assert out.prefetch_factor == 3 and out.persistent_workers and out.timeout == 30.0
    assert out.generator is src.generator and out.sampler.generator is src.generator
    given = torch.Generator().manual_seed(1)
    assert reweight(src, np.ones(20), generator=given).sampler.generator is given

    def rows(seed):
        loader = DataLoader(x, batch_size=5, generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(reweight(loader, np.arange(1.0, 21.0)))).flatten().tolist()

    assert rows(3) == rows(3) and rows(3) != rows(4)
    plain = reweight(DataLoader(x, batch_size=5), np.ones(20))  # no workers: their settings stay unset
    assert plain.num_workers == 0 and plain.prefetch_factor is None and not plain.persistent_workers


def test_constrained_far_out_of_reach_on_many_samples_is_optimal_in_few_steps(monkeypatch):
    """A target far out of reach with weights unbounded above on 10^5 samples: the optimum puts all the weight on
    a few points (the response is the projection of the target on the convex hull of chi's columns). The answer
    is that optimum by the KKT conditions (to rounding), reached in a few proximal steps (each one dual solve):
    the weights at their bound are identified early and the rest solved exactly."""
    import pypattern.patterning as patterning

    steps = []
    dual = patterning._box_dual
    monkeypatch.setattr(patterning, "_box_dual", lambda *a, **k: steps.append(1) or dual(*a, **k))
    rng = np.random.default_rng(0)
    n = 100_000
    chi = rng.normal(size=(3, n))
    tgt = rng.normal(size=3) * 100
    iv = invert(chi, tgt, method="constrained")
    w = iv.weights
    assert _kkt_gap(chi, tgt, 0.0, 0.0, None, w) < 1e-12
    assert w.min() >= 0 and abs(w.mean() - 1) < 1e-12
    assert (w > 0).sum() <= 3  # a face of the hull in 3 dimensions: at most 3 points
    assert iv.residual == pytest.approx(0.98410091, abs=1e-8)
    assert len(steps) <= 20


def test_total_root_matches_the_search_over_sorted_breakpoints():
    """The total's multiplier from Newton's steps (any start) is the root the exact breakpoint search finds: the
    fixed total holds to rounding, with bounds finite, infinite or zero width on one side."""
    from pypattern.patterning import _total_root, _total_root_sorted

    rng = np.random.default_rng(3)
    for _ in range(2000):
        n = int(rng.choice([1, 2, 5, 50, 1000]))
        u = rng.normal(size=n) * 10 ** rng.uniform(-3, 3)
        if rng.random() < 0.3:
            u = np.round(u)  # ties among the breakpoints
        c = rng.uniform(0.1, 3, size=n) if rng.random() < 0.5 else np.ones(n)
        lo = -rng.uniform(0, 2, size=n) if rng.random() < 0.8 else np.zeros(n)
        hi = rng.uniform(0, 3, size=n) if rng.random() < 0.5 else np.full(n, np.inf)
        if rng.random() < 0.2:
            hi[:] = 0.0
        guess = None if rng.random() < 0.5 else rng.normal() * 10 ** rng.uniform(-5, 4)
        lam, ref = _total_root(u, c, lo, hi, guess), _total_root_sorted(u, c, lo, hi)
        size = float(c @ (np.abs(u) + c * abs(ref) + np.abs(lo) + np.where(np.isfinite(hi), hi, 0.0)))
        assert abs(float(c @ np.clip(-(u + c * lam), lo, hi))) <= 1e-15 * size + 1e-300


def test_pinv_of_chi_near_float64s_largest_is_the_scaled_answer():
    """chi near float64's largest value (row sums beyond it): the rows are centred in units of a power of two, so
    pinv's weights are the unscaled problem's, scaled back (no overflow, no warning)."""
    rng = np.random.default_rng(0)
    chi = rng.normal(size=(3, 2000))
    tgt = np.array([1.0, -2.0, 0.5])
    base = invert(chi, tgt, method="pinv")
    for k in (1000, -1000, 1020):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = invert(np.ldexp(chi, k), tgt, method="pinv")
        if (
            k != 1020
        ):  # at 2^1020 the weights' changes h (about 1e-311) are subnormal: the residual is the check
            np.testing.assert_allclose(
                np.ldexp(got.h, k), base.h, rtol=1e-12, atol=1e-12 * np.abs(base.h).max()
            )
        assert np.isfinite(got.h).all() and got.residual < 1e-6


def _enumerated_optimum(chi, tgt, alpha, lo, hi):
    """The global minimiser of method='constrained''s objective ``|chi (w - 1) / N - tgt|^2 + alpha |w - 1|^2 / N``
    (``lo <= w <= hi``, ``sum(w) = N``) by enumeration, for N <= 7: every assignment of each weight to its lower
    bound, its upper bound or free; the free weights solved exactly for their least squares along the sum-zero
    directions (an orthonormal basis of them, ``np.linalg.lstsq``); the best assignment within the bounds kept."""
    k, n = chi.shape
    size = float(np.abs(chi).max())
    a, t, al = chi / size / n, tgt / size, alpha / size / size  # the same minimiser, in chi's units

    def objective(w):
        r = a @ (w - 1) - t
        return float(r @ r + al * ((w - 1) @ (w - 1)) / n)

    best, best_w = np.inf, None
    for state in itertools.product(range(2 if hi is None else 3), repeat=n):
        state = np.array(state)
        w = np.where(state == 1, lo, hi if hi is not None else 1.0).astype(np.float64)
        free = state == 0
        nf = int(free.sum())
        rest = n - float(w[~free].sum())
        if nf == 0:
            if abs(rest) > 1e-9:
                continue
        else:
            x0 = np.full(nf, rest / nf)
            basis = np.linalg.svd(np.eye(nf) - 1.0 / nf)[0][:, : nf - 1]  # sum-zero, orthonormal
            m = np.vstack([a[:, free] @ basis, np.sqrt(al / n) * basis])
            rhs = np.concatenate(
                [t - a[:, ~free] @ (w[~free] - 1) - a[:, free] @ (x0 - 1), -np.sqrt(al / n) * (x0 - 1)]
            )
            x = x0 + basis @ np.linalg.lstsq(m, rhs, rcond=None)[0]
            if (x < lo - 1e-12).any() or (hi is not None and (x > hi + 1e-12).any()):
                continue
            w[free] = x
        if objective(w) < best:
            best, best_w = objective(w), w
    return best_w


def _constrained_objective(chi, tgt, alpha, w):
    n = chi.shape[1]
    r = chi @ (w - 1) / n - tgt
    return float(r @ r + alpha * ((w - 1) @ (w - 1)) / n)


def test_constrained_reaches_the_optimum_when_rows_of_chi_differ_greatly_in_scale():
    """One observable of order 1, another of order 1e6 (N = 5, weights >= 0): the small row's part of the KKT
    conditions is far below the large row's scale but well above its rounding. The weights are the global optimum
    that enumerating every active set finds, [0, 4.25, 0, 0, 0.75] (objective 0.70478); [0, 2.97, 0, 2.03, 0],
    whose conditions hold only to the large row's scale, is 16% worse (0.8155)."""
    chi = np.array(
        [
            [
                -0.03908279771702316,
                -1.416104206201203,
                0.16586583406235444,
                -1.2038196342115577,
                -1.2639361282142565,
            ],
            [
                118579.45392169376,
                -78214.32580871404,
                -1661761.6997896088,
                748223.7180713578,
                2163096.688484254,
            ],
        ]
    )
    tgt = np.array([-1.4813757442910636, 1.819849718777903])
    iv = invert(chi, tgt, method="constrained")
    best = _enumerated_optimum(chi, tgt, 0.0, 0.0, None)
    np.testing.assert_allclose(best, [0.0, 4.24999, 0.0, 0.0, 0.75001], atol=1e-5)
    np.testing.assert_allclose(iv.weights, best, rtol=0, atol=1e-9)
    got, opt = _constrained_objective(chi, tgt, 0.0, iv.weights), _constrained_objective(chi, tgt, 0.0, best)
    assert got <= opt * (1 + 1e-12), (got, opt)
    assert iv.residual == pytest.approx(0.35776357797, abs=1e-9)
    assert iv.weights.min() >= 0 and abs(iv.weights.sum() - 5) <= 1e-12


def test_constrained_matches_exact_enumeration_for_rows_of_any_relative_scale():
    """Random chi with rows of log-spread scales (largest over smallest 1, 1e2, 1e4, 1e6), every bound and
    penalty: the objective of the weights returned is the global optimum's from enumerating the active sets
    (_enumerated_optimum), to 1e-12 of it (the rounding of the weights themselves aside: 1e-15 of the uniform
    weights' objective), within the bounds and with sum N."""
    rng = np.random.default_rng(7)
    for ratio in (1.0, 1e2, 1e4, 1e6):
        for trial in range(18):
            k, n = int(rng.integers(1, 4)), int(rng.integers(3, 8))
            lo, hi = [(0.0, None), (0.5, 1.5), (0.9, 1.1)][trial % 3]
            if hi is not None:
                n = min(n, 6)
            alpha = [0.0, 1e-3, 1.0][(trial // 3) % 3]
            chi = rng.normal(size=(k, n)) * np.logspace(0, np.log10(ratio), k)[:, None]
            chi = chi[rng.permutation(k)]
            tgt = rng.normal(size=k) * (3.0 if trial % 2 else 1.0)
            w = invert(chi, tgt, method="constrained", alpha=alpha, min_weight=lo, max_weight=hi).weights
            assert w.min() >= lo and (hi is None or w.max() <= hi) and abs(w.sum() - n) <= 1e-12 * n
            best = _enumerated_optimum(chi, tgt, alpha, lo, hi)
            got, opt = (
                _constrained_objective(chi, tgt, alpha, w),
                _constrained_objective(chi, tgt, alpha, best),
            )
            uniform = _constrained_objective(chi, tgt, alpha, np.ones(n))
            assert got <= opt * (1 + 1e-12) + 1e-15 * uniform, (ratio, trial, k, n, lo, hi, alpha, got, opt)
