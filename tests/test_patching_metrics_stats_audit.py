"""Patching metrics and the statistics of PatchResult against formulas computed by hand in float64: LogitDiff,
Prob, LogProb and KL from the logits (16-bit, float32 and float64 logits, logits whose naive softmax overflows,
answers of every accepted form, per-example positions), and the normalised mean (a ratio of means), its
delta-method standard error, the percentile bootstrap interval, examples left out of the means, and the tables."""

import csv
import math
import warnings

import numpy as np
import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import KL, LogitDiff, LogProb, PatchResult, Prob, activation_patching
from pypattern.patching.metrics import logits_at, metric_positions

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# hand formulas, float64 and numpy


def _np(x):
    return x.detach().to(torch.float64).cpu().numpy()


def _log_softmax(z):
    """Row-wise log-softmax of a float64 array, the max subtracted first (no overflow)."""
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _ids(ids, B):
    """Token ids as a (B, k) int array: a scalar for every example, (B,) one per example, (B, k) several."""
    a = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    if a.ndim == 0:
        a = np.full(B, int(a))
    return a[:, None] if a.ndim == 1 else a


def _hand_logit_diff(z, ans, wrong):
    B = z.shape[0]
    a, w = _ids(ans, B), _ids(wrong, B)
    return np.array([z[i, a[i]].mean() - z[i, w[i]].mean() for i in range(B)])


def _hand_prob(z, ans):
    lp = _log_softmax(z)
    a = _ids(ans, z.shape[0])
    return np.array([np.exp(lp[i, a[i]]).mean() for i in range(z.shape[0])])


def _hand_logprob(z, ans):
    lp = _log_softmax(z)
    a = _ids(ans, z.shape[0])
    return np.array([lp[i, a[i]].mean() for i in range(z.shape[0])])


def _hand_neg_kl(clean, z):
    """-KL(P_clean || P) with P_clean the reference, 0 log 0 = 0."""
    lc, lz = _log_softmax(clean), _log_softmax(z)
    p = np.exp(lc)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lc - lz), 0.0)
    return -terms.sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# metrics


ANSWER_FORMS = {
    "int": (3, 5),
    "list": ([1, 2, 3, 0], [4, 5, 6, 7]),
    "numpy": (np.array([1, 2, 3, 0]), np.array([4, 5, 6, 7])),
    "0-d tensor": (torch.tensor(2), torch.tensor(9)),
    "int32 tensor": (torch.tensor([1, 2, 3, 0], dtype=torch.int32), torch.tensor([4, 5, 6, 7])),
    "(B, k) and (B,)": (torch.tensor([[1, 2], [3, 3], [0, 9], [4, 1]]), torch.tensor([4, 5, 6, 7])),
    "(B, 3) and (B, 2)": (torch.tensor([[1, 2, 8]] * 4), [[4, 5], [6, 7], [0, 0], [9, 1]]),
}


@pytest.mark.parametrize("form", list(ANSWER_FORMS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_logit_diff_prob_and_logprob_equal_the_hand_formulas(form, dtype):
    """Each metric equals its formula on the logits as given (float64 arithmetic): 16-bit logits are read in
    float32 (so the only error is float32's), any other dtype in its own; several answers are averaged."""
    ans, wrong = ANSWER_FORMS[form]
    g = torch.Generator().manual_seed(7)
    logits = (4 * torch.randn(4, 11, generator=g, dtype=torch.float64)).to(dtype)
    z = _np(logits)  # the 16-bit values themselves, exactly
    tol = {torch.float64: 1e-12}.get(dtype, 2e-6)
    for metric, want in (
        (LogitDiff(ans, wrong), _hand_logit_diff(z, ans, wrong)),
        (Prob(ans), _hand_prob(z, ans)),
        (LogProb(ans), _hand_logprob(z, ans)),
    ):
        got = metric(logits)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got.shape == (4,)
        np.testing.assert_allclose(_np(got), want, rtol=tol, atol=tol)
        # a stack of runs (cells, batch, vocab) gives each run's own values
        stacked = metric(torch.stack([logits, logits.flip(-1)]))
        assert stacked.shape == (2, 4)
        np.testing.assert_allclose(_np(stacked[0]), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kl_is_minus_the_divergence_from_the_clean_run(dtype):
    """KL is -KL(P_clean || P): P_clean the reference (not the reverse divergence), 0 on the clean run, in both its
    textbook and its near-clean forms."""
    g = torch.Generator().manual_seed(3)
    clean = (3 * torch.randn(5, 13, generator=g, dtype=torch.float64)).to(dtype)
    far = (3 * torch.randn(5, 13, generator=g, dtype=torch.float64)).to(dtype)
    near = (clean.double() + 0.3 * torch.rand(5, 13, generator=g, dtype=torch.float64)).to(dtype)
    m = KL()
    m.bind(clean)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for z in (far, near, clean):
        want = _hand_neg_kl(_np(clean), _np(z))
        np.testing.assert_allclose(_np(m(z)), want, rtol=tol, atol=tol)
    assert float(m(clean).abs().max()) == 0.0
    # the reverse divergence differs on these runs: the direction is the documented one
    reverse = _hand_neg_kl(_np(far), _np(clean))
    assert np.abs(_np(m(far)) - reverse).max() > 0.1


def test_metrics_of_logits_whose_naive_softmax_overflows():
    """Vocab-sized logits of size 1e3-3e4 (exp overflows in float32 and float16): every metric is finite and
    equal to the float64 formula."""
    g = torch.Generator().manual_seed(11)
    V = 50_000
    clean = 3e4 + 800 * torch.randn(3, V, generator=g, dtype=torch.float64)
    other = clean + 2 * torch.randn(3, V, generator=g, dtype=torch.float64)
    top = clean.argmax(-1)
    for dtype in (torch.float32, torch.float16, torch.float64):
        c, o = clean.to(dtype), other.to(dtype)
        zc, zo = _np(c), _np(o)
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        lp = LogProb(top)(o)
        assert bool(torch.isfinite(lp).all())
        # logits of 3e4 in float32: log-probabilities are exact to a few ulps of the logits' size
        np.testing.assert_allclose(_np(lp), _hand_logprob(zo, top), atol=rtol * 3e4)
        np.testing.assert_allclose(_np(Prob(top)(o)), _hand_prob(zo, top), atol=rtol * 3e4)
        m = KL()
        m.bind(c)
        got = m(o)
        assert bool(torch.isfinite(got).all()) and float(m(c).abs().max()) == 0.0
        np.testing.assert_allclose(_np(got), _hand_neg_kl(zc, zo), atol=rtol * 3e4)


def test_kl_with_tokens_the_clean_run_rules_out():
    """Logits of -inf (a vocabulary mask) on the clean run: those tokens weigh 0 in KL(P_clean || P) (0 log 0 = 0),
    on the clean run, near it and far from it; a token the clean run allows and the patched run rules out gives an
    infinite divergence."""
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(3, 9, generator=g, dtype=torch.float64)
    clean[:, [0, 4]] = -math.inf
    near = clean + 0.2 * torch.rand(3, 9, generator=g, dtype=torch.float64)
    far = clean + 3 * torch.randn(3, 9, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        m = KL()
        m.bind(clean.to(dtype))
        assert m(clean.to(dtype)).tolist() == [0.0, 0.0, 0.0]
        for z in (near, far):
            got = m(z.to(dtype))
            want = _hand_neg_kl(_np(clean.to(dtype)), _np(z.to(dtype)))
            assert np.isfinite(want).all()
            np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-6)
        # the patched run puts mass on a masked token: finite, and the hand formula's value
        opened = clean.clone()
        opened[:, 0] = 0.5
        np.testing.assert_allclose(
            _np(m(opened.to(dtype))), _hand_neg_kl(_np(clean), _np(opened)), rtol=1e-5, atol=1e-6
        )
        # the patched run rules out a token the clean run allows: -inf
        shut = clean.clone()
        shut[:, 2] = -math.inf
        assert m(shut.to(dtype)).tolist() == [-math.inf] * 3
    # the gradient a first-order method takes is finite
    m = KL()
    m.bind(clean)
    z = near.clone().requires_grad_(True)
    m(z).sum().backward()
    assert bool(torch.isfinite(z.grad).all())


@pytest.mark.parametrize("which", ["answer", "wrong"])
def test_an_empty_set_of_answer_tokens_is_refused(which):
    """``(batch, 0)`` ids would average over no token (NaN for every example): refused naming the argument."""
    logits = torch.randn(3, 8)
    none, some = torch.zeros(3, 0, dtype=torch.long), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=rf"{which}.*no token"):
        LogitDiff(none if which == "answer" else some, none if which == "wrong" else some)(logits)
    if which == "answer":
        for cls in (Prob, LogProb):
            with pytest.raises(ValueError, match="answer.*no token"):
                cls(none)(logits)


def test_per_example_positions_read_each_examples_row():
    """``metric_positions`` and ``logits_at`` read example i's logits at its own position (negative counted from
    the end) in every accepted form; the patching result's clean and corrupted metrics are the hand formula on
    the model's logits at those rows."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 10, generator=g, dtype=torch.float64)
    want = torch.stack([logits[0, 1], logits[1, 5], logits[2, 3], logits[3, 0]])
    for pos in ([1, -1, 3, 0], torch.tensor([1, 5, -3, -6]), np.array([1, 5, 3, 0])):
        p = metric_positions(LogitDiff(1, 2, position=pos), 4, 6)
        assert torch.equal(logits_at(logits, p), want)
    assert torch.equal(logits_at(logits, metric_positions(LogitDiff(1, 2, position=-2), 4, 6)), logits[:, 4])

    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=12, n_ctx=8, dtype=torch.float64, seed=5)
    model = Transformer(TransformerConfig(**cfg))
    clean = torch.randint(0, 12, (3, 6), generator=g)
    corr = clean.clone()
    corr[:, 1] = (clean[:, 1] + 3) % 12
    pos = torch.tensor([5, 2, 4])
    ans, wrong = torch.tensor([[1, 7], [2, 2], [3, 0]]), torch.tensor([4, 5, 6])
    r = activation_patching(
        model, "resid_pre", clean, corr, metric=LogitDiff(ans, wrong, position=pos), layers=[0]
    )
    rows = torch.arange(3)
    with torch.no_grad():
        zc, zk = _np(model(clean)[rows, pos]), _np(model(corr)[rows, pos])
    np.testing.assert_allclose(_np(r.clean), _hand_logit_diff(zc, ans, wrong), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(r.corrupted), _hand_logit_diff(zk, ans, wrong), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# PatchResult statistics


def _result(values, clean, corrupted, direction="denoising", dtype=torch.float64):
    values = torch.as_tensor(values, dtype=dtype)
    axes = tuple(f"a{i}" for i in range(values.dim() - 1))
    coords = {a: [f"{a}_{j}" for j in range(n)] for a, n in zip(axes, values.shape[1:])}
    cor = None if corrupted is None else torch.as_tensor(corrupted, dtype=dtype)
    return PatchResult(values, torch.as_tensor(clean, dtype=dtype), cor, axes, coords, direction=direction)


def _case(n=12, grid=(2, 3), seed=0):
    rng = np.random.default_rng(seed)
    corrupted = rng.normal(size=n)
    clean = corrupted + rng.uniform(0.5, 2.5, size=n)
    frac = rng.uniform(-0.3, 1.2, size=grid)
    col = (-1, *[1] * len(grid))
    values = corrupted.reshape(col) + frac * (clean - corrupted).reshape(col)
    values = values + 0.3 * rng.normal(size=(n, *grid))
    return values, clean, corrupted


def _hand_stats(values, clean, corrupted):
    """Ratio of means R = mean(a) / mean(b), a = patched - corrupted, b = clean - corrupted, and its delta-method
    standard error sqrt(var(a - R b) / n) / |mean(b)|, each cell by a loop."""
    n = values.shape[0]
    flat = values.reshape(n, -1)
    b = clean - corrupted
    R, se = np.empty(flat.shape[1]), np.empty(flat.shape[1])
    for j in range(flat.shape[1]):
        a = flat[:, j] - corrupted
        R[j] = a.mean() / b.mean()
        resid = a - R[j] * b
        se[j] = math.sqrt(((resid - resid.mean()) ** 2).sum() / (n - 1) / n) / abs(b.mean())
    return R.reshape(values.shape[1:]), se.reshape(values.shape[1:])


def _hand_ci(values, clean, corrupted, idx, level, normalized):
    """Percentile interval (linear interpolation between order statistics) of the resampled means, each cell by
    a loop; resamples whose mean gap is 0 are left out."""
    n = values.shape[0]
    flat = values.reshape(n, -1)
    lo, hi = np.empty(flat.shape[1]), np.empty(flat.shape[1])
    q = (1 - level) / 2
    for j in range(flat.shape[1]):
        stats = []
        for row in idx:
            m = flat[row, j].mean()
            if normalized:
                gap = clean[row].mean() - corrupted[row].mean()
                if gap == 0:
                    continue
                m = (m - corrupted[row].mean()) / gap
            stats.append(m)
        s = np.sort(stats)
        lo[j], hi[j] = (np.interp(t * (len(s) - 1), np.arange(len(s)), s) for t in (q, 1 - q))
    return lo.reshape(values.shape[1:]), hi.reshape(values.shape[1:])


def test_normalised_mean_se_and_unnormalised_statistics_by_hand():
    """The normalised mean is the ratio of means (not the mean of per-example ratios), its se the delta method's,
    the per-example normalised values divide by the mean gap; unnormalised: the mean patched metric and
    std / sqrt(n); effect and target per direction."""
    values, clean, corrupted = _case()
    r = _result(values, clean, corrupted)
    R, se = _hand_stats(values, clean, corrupted)
    np.testing.assert_allclose(_np(r.mean()), R, rtol=1e-12)
    np.testing.assert_allclose(_np(r.se()), se, rtol=1e-10)
    ratios = (values - corrupted.reshape(-1, 1, 1)) / (clean - corrupted).reshape(-1, 1, 1)
    assert np.abs(_np(r.mean()) - ratios.mean(0)).max() > 1e-3  # the other estimator differs here
    gap = (clean - corrupted).mean()
    np.testing.assert_allclose(_np(r.normalized), (values - corrupted.reshape(-1, 1, 1)) / gap, rtol=1e-12)
    np.testing.assert_allclose(_np(r.mean(False)), values.mean(0), rtol=1e-12)
    np.testing.assert_allclose(_np(r.se(False)), values.std(0, ddof=1) / math.sqrt(len(clean)), rtol=1e-12)
    np.testing.assert_allclose(_np(r.target), corrupted)
    np.testing.assert_allclose(_np(r.effect), values - corrupted.reshape(-1, 1, 1), rtol=1e-12)
    noising = _result(values, clean, corrupted, direction="noising")
    np.testing.assert_allclose(_np(noising.target), clean)
    np.testing.assert_allclose(_np(noising.effect), values - clean.reshape(-1, 1, 1), rtol=1e-12)
    np.testing.assert_allclose(_np(noising.mean()), R, rtol=1e-12)  # 1 = the clean level in both directions


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("level", [0.95, 0.8])
def test_ci_is_the_seeded_percentile_bootstrap(normalized, level):
    """ci draws n examples with replacement per resample from a generator seeded by ``seed`` and takes the
    (1 - level)/2 and (1 + level)/2 quantiles of the resampled means (normalised: each resample's own ratio of
    means); another seed gives another interval."""
    values, clean, corrupted = _case(n=9, grid=(2, 2), seed=4)
    r = _result(values, clean, corrupted)
    R = 300
    idx = torch.randint(0, 9, (R, 9), generator=torch.Generator().manual_seed(5)).numpy()
    lo, hi = r.ci(level=level, num_resamples=R, seed=5, normalized=normalized)
    want_lo, want_hi = _hand_ci(values, clean, corrupted, idx, level, normalized)
    np.testing.assert_allclose(_np(lo), want_lo, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(hi), want_hi, rtol=1e-10, atol=1e-12)
    assert bool((lo <= r.mean(normalized)).all() and (r.mean(normalized) <= hi).all())
    assert not torch.equal(r.ci(level=level, num_resamples=R, seed=6, normalized=normalized)[0], lo)


def test_examples_with_no_gap_stay_in_the_ratio_of_means():
    """Examples whose clean and corrupted metrics are equal are not divided by (no NaN, no warning): they count in
    the mean gap like the others."""
    values, clean, corrupted = _case(n=8, grid=(3,), seed=2)
    clean[[1, 5]] = corrupted[[1, 5]]
    r = _result(values, clean, corrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, se = r.mean(), r.se()
    R, want_se = _hand_stats(values, clean, corrupted)
    np.testing.assert_allclose(_np(mean), R, rtol=1e-12)
    np.testing.assert_allclose(_np(se), want_se, rtol=1e-10)
    assert bool(torch.isfinite(r.normalized).all())


def test_resamples_of_no_gap_are_left_out_of_the_interval_with_a_warning():
    """With most examples of gap 0, some resamples have a mean gap of 0: they are left out of the normalised
    interval, which is the percentile of the others, with a RuntimeWarning."""
    corrupted = np.array([0.0, 1.0, 2.0, 3.0])
    clean = corrupted.copy()
    clean[0] += 1.0
    values = np.stack([corrupted + 0.5 * (clean - corrupted), corrupted + 0.1], 1)
    r = _result(values, clean, corrupted)
    idx = torch.randint(0, 4, (200, 4), generator=torch.Generator().manual_seed(0)).numpy()
    assert (idx != 0).all(1).any()  # some resamples miss the one example with a gap
    with pytest.warns(RuntimeWarning, match="resamples have m_clean == m_corrupted"):
        lo, hi = r.ci(num_resamples=200, seed=0)
    want_lo, want_hi = _hand_ci(values, clean, corrupted, idx, 0.95, True)
    np.testing.assert_allclose(_np(lo), want_lo, rtol=1e-10)
    np.testing.assert_allclose(_np(hi), want_hi, rtol=1e-10)


def test_examples_not_finite_on_an_unpatched_run_are_left_out_of_every_statistic():
    """An example whose clean or corrupted metric is NaN or inf is left out of the mean, se and ci (all equal to
    the statistics of the other examples alone); a NaN on a patched run makes that cell's mean NaN."""
    values, clean, corrupted = _case(n=10, grid=(2, 2), seed=6)
    clean[3], corrupted[7] = math.nan, math.inf
    keep = np.isfinite(clean) & np.isfinite(corrupted)
    r = _result(values, clean, corrupted)
    sub = _result(values[keep], clean[keep], corrupted[keep])
    assert r.finite_examples.tolist() == keep.tolist()
    for normalized in (True, False):
        for a, b in ((r.mean(normalized), sub.mean(normalized)), (r.se(normalized), sub.se(normalized))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        for a, b in zip(r.ci(normalized=normalized), sub.ci(normalized=normalized)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    R, se = _hand_stats(values[keep], clean[keep], corrupted[keep])
    np.testing.assert_allclose(_np(r.mean()), R, rtol=1e-12)
    np.testing.assert_allclose(_np(r.se()), se, rtol=1e-10)
    values[0, 1, 0] = math.nan
    m = _result(values, clean, corrupted).mean()
    assert math.isnan(float(m[1, 0])) and bool(torch.isfinite(m.flatten()[[0, 1, 3]]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_statistics_keep_the_values_dtype(dtype):
    """mean, se and both ends of ci are in the values' dtype, for one example (NaN: undefined) as for several."""
    for n in (1, 5):
        values, clean, corrupted = _case(n=n, grid=(2,), seed=1)
        r = _result(values, clean, corrupted, dtype=dtype)
        for normalized in (True, False):
            stats = (r.mean(normalized), r.se(normalized), *r.ci(normalized=normalized))
            assert [s.dtype for s in stats] == [dtype] * 4
            if n == 1:
                assert all(bool(torch.isnan(s).all()) for s in stats[1:])


def test_ci_arguments_are_checked_by_name():
    """A normalised interval of an ablation result (no corrupted run) is refused whatever the number of examples;
    numbers of resamples, levels and seeds that are not valid are refused naming the argument."""
    for n in (1, 4):
        values, clean, _ = _case(n=n, grid=(2,), seed=3)
        ablation = _result(values, clean, None, direction="noising")
        with pytest.raises(ValueError, match="needs a corrupted run"):
            ablation.ci()
        assert ablation.ci(normalized=False)[0].shape == (2,)
    values, clean, corrupted = _case(n=5, grid=(2,), seed=3)
    r = _result(values, clean, corrupted)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises((TypeError, ValueError), match="num_resamples"):
            r.ci(num_resamples=bad)
    for bad in ("0.9", None, 0, 1, math.nan):
        with pytest.raises((TypeError, ValueError), match="level"):
            r.ci(level=bad)
    for bad in (1.5, "0", None, -1):
        with pytest.raises((TypeError, ValueError), match="seed"):
            r.ci(seed=bad)
    assert r.ci(level=np.float64(0.9), num_resamples=np.int64(50), seed=np.int64(2))[0].shape == (2,)


def test_effect_of_a_denoising_result_without_a_corrupted_run_names_what_is_missing():
    """A denoising result's target is its corrupted run; without one, effect and target say so by name."""
    values, clean, _ = _case(n=3, grid=(2,), seed=3)
    r = _result(values, clean, None, direction="denoising")
    for attr in ("target", "effect"):
        with pytest.raises(ValueError, match="corrupted run"):
            getattr(r, attr)


@pytest.mark.parametrize("normalized", [True, False])
def test_records_and_csv_hold_the_statistics(normalized, tmp_path):
    """to_records has one row per cell in grid order with its coordinates and the float of mean, se and the
    500-resample interval; to_csv writes those rows, read back exactly; an ablation result tabulates the
    unnormalised statistics when normalised ones are asked for."""
    values, clean, corrupted = _case(n=7, grid=(2, 3), seed=8)
    r = _result(values, clean, corrupted)
    rows = r.to_records(normalized)
    mean, se = r.mean(normalized), r.se(normalized)
    lo, hi = r.ci(normalized=normalized, num_resamples=500)
    assert len(rows) == 6
    for row, (i, j) in zip(rows, np.ndindex(2, 3)):
        assert row == {
            "a0": f"a0_{i}",
            "a1": f"a1_{j}",
            "mean": float(mean[i, j]),
            "se": float(se[i, j]),
            "ci_low": float(lo[i, j]),
            "ci_high": float(hi[i, j]),
        }
    path = tmp_path / "t.csv"
    r.to_csv(str(path), normalized)
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert [{k: (v if k in ("a0", "a1") else float(v)) for k, v in row.items()} for row in read] == rows
    ablation = _result(values, clean, None, direction="noising")
    plain = ablation.to_records(True)
    assert [row["mean"] for row in plain] == _np(ablation.mean(False)).flatten().tolist()
    assert [row["se"] for row in plain] == _np(ablation.se(False)).flatten().tolist()
