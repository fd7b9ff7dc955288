"""Sampled implementations: the k = 0 control of the selectivity curves, and the held-out size of the pooled ridge
similarity."""

import math
import warnings

import numpy as np
import pytest
import torch

from pypattern.equivalence import ridge_similarity
from pypattern.interpretive import selectivity_curve, selectivity_curves


def _impls(seed: int, n: int = 40, d: int = 6, count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    return [base + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(count)]


# ------------------------------------------------------------------------------------------ the k = 0 control


def test_a_budget_of_zero_that_is_not_the_implementation_is_refused_naming_patched_a():
    impl_a, impl_b = _impls(0), _impls(1)

    def shifted(i, k):  # indexes implementations otherwise than impl_a: k = 0 is another implementation
        return impl_a[(i + 1) % len(impl_a)] + k

    with pytest.raises(
        ValueError, match=r"patched_a\(\d, 0\) \(patched_a is .*shifted\) is not impl_a\[\d\]"
    ):
        selectivity_curve(impl_a, shifted, [impl_b], [0, 1], measure="cka", num_trials=2)
    with pytest.raises(ValueError, match=r"patched_a\(\d, 0\) .* is not impl_a\[\d\].*values differ"):
        selectivity_curves(
            impl_a, lambda i, k: impl_a[i] + 0.1, [impl_b], [0], measures=("cka",), num_trials=1
        )
    with pytest.raises(
        ValueError, match=r"patched_a\(\d, 0\) .* has shape \(40, 5\) but impl_a\[\d\] has \(40, 6\)"
    ):
        selectivity_curve(impl_a, lambda i, k: impl_a[i][:, :5], [impl_b], [0], measure="cka", num_trials=1)
    # budgets without 0 have no control to check: a patched_a that adds k everywhere is accepted there
    selectivity_curve(impl_a, lambda i, k: impl_a[i] + k, [impl_b], [1], measure="cka", num_trials=1)


def test_a_budget_of_zero_recomputed_in_float32_is_the_control():
    """``patched_a(i, 0)`` recomputed at a coarser precision is accepted, and its control equals the exact one's
    up to the rounding: a win is ``s(a -> b) > s(a -> b)`` on independent splits, counted by a naive loop."""
    impl_a, impl_b = _impls(2), _impls(3)
    exact = selectivity_curve(
        impl_a, lambda i, k: impl_a[i], [impl_b], [0], measure="cka", num_trials=6, seed=5
    )
    coarse = selectivity_curve(
        impl_a, lambda i, k: impl_a[i].float(), [impl_b], [0], measure="cka", num_trials=6, seed=5
    )
    assert exact.num_comparisons == coarse.num_comparisons == {0: 6}
    # naive: the same draws as the protocol (a, b, then the two splits), CKA on each split's fit rows
    from pypattern.equivalence import linear_cka
    from pypattern.ridge import train_test_split

    rng = np.random.default_rng(5)
    wins = 0
    for _ in range(6):
        ia, ib = int(rng.integers(3)), int(rng.integers(3))
        s1, s2 = (int(v) for v in rng.integers(2**31, size=2))
        t1, _ = train_test_split(40, 0.9, s1)
        t2, _ = train_test_split(40, 0.9, s2)
        a, b = impl_a[ia], impl_b[ib]
        wins += int(linear_cka(a[t1], b[t1]) > linear_cka(a[t2], b[t2]))
    assert exact.num_wins[0] == wins
    assert 0 < wins < 6  # independent splits: the control is not degenerate


# ------------------------------------------------------------------------------------------ pooled ridge split


def _naive_pooled(x, y, alpha, train_fraction, seed):
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    k = min(max(int(round(train_fraction * n)), 2), n - 2)
    tr, te = perm[:k], perm[k:]
    mx, my = x[tr].mean(0), y[tr].mean(0)
    xt, yt = x[tr] - mx, y[tr] - my
    lam = alpha * (xt**2).sum() / x.shape[1]
    w = np.linalg.solve(xt.T @ xt + lam * np.eye(x.shape[1]), xt.T @ yt)
    pred = (x[te] - mx) @ w + my
    r2 = 1 - ((y[te] - pred) ** 2).sum() / ((y[te] - y[te].mean(0)) ** 2).sum()
    return math.sqrt(max(r2, 0.0)), len(te)


@pytest.mark.parametrize(("n", "train_fraction"), [(10, 0.5), (11, 0.5), (24, 0.9), (8, 0.6)])
def test_ridge_similarity_warns_on_few_held_out_samples_as_the_cv_form_does(n, train_fraction):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 3))
    y = x @ rng.standard_normal((3, 2)) + 0.5 * rng.standard_normal((n, 2))
    want, held = _naive_pooled(x, y, 0.01, train_fraction, 0)
    assert held < 6
    with pytest.warns(
        UserWarning,
        match=rf"ridge_similarity: train_fraction={train_fraction} on {n} inputs holds out {held}",
    ) as rec:
        got = ridge_similarity(x, y, train_fraction=train_fraction)
    assert got == pytest.approx(want, abs=1e-10)  # the value is kept
    assert rec[0].filename == __file__  # pointed at the caller's line
    fix = "train_fraction <= " if n >= 12 else "give at least 12 inputs"
    assert fix in str(rec[0].message)


def test_ridge_similarity_holding_out_six_or_more_does_not_warn():
    rng = np.random.default_rng(0)
    for n, tf in ((12, 0.5), (13, 0.5), (60, 0.9), (9, 0.2)):
        x = rng.standard_normal((n, 3))
        y = x @ rng.standard_normal((3, 2)) + 0.5 * rng.standard_normal((n, 2))
        want, held = _naive_pooled(x, y, 0.01, tf, 0)
        assert held >= 6
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ridge_similarity(x, y, train_fraction=tf) == pytest.approx(want, abs=1e-10)


def test_a_budget_above_a_chains_heads_is_refused_naming_it():
    """A budget above the heads of a chain would patch every head and repeat that point: refused, by
    ChainImplementations.patched naming the chain's head count, and up front by the settings."""
    from pypattern.experiments.interpretive import (
        ARCHS,
        ChainImplementations,
        InterpretiveSettings,
        check_settings,
    )
    from pypattern.models.transformer import Transformer
    from pypattern.tasks.algorithmic import RoutineTask

    routines = ("sort", "diff_next")
    pool = {r: [Transformer(RoutineTask(r).model_config(**ARCHS["L1d48h4"], seed=0))] for r in routines}
    g = torch.Generator().manual_seed(0)
    x, xcf = torch.randint(0, 10, (40, 10), generator=g), torch.randint(0, 10, (40, 10), generator=g)
    impl = ChainImplementations(routines, pool, x, xcf)
    n = len(impl.ranked_heads(0))
    assert n == 8  # two routines of one layer of 4 heads
    assert not torch.equal(impl.patched(0, n - 1), impl.patched(0, n))
    with pytest.raises(ValueError, match=rf"k={n + 5} is more heads than chain 0 has \({n}\)"):
        impl.patched(0, n + 5)
    s = InterpretiveSettings(members=(("L1d48h4", 0), ("L1d48h4", 1)), budgets=(0, 1, 64))
    with pytest.raises(ValueError, match=r"budgets=\(0, 1, 64\) is not valid"):
        check_settings(s)
    check_settings(InterpretiveSettings(members=(("L1d48h4", 0), ("L1d48h4", 1))))  # the default budgets fit
