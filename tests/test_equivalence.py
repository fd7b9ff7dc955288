"""Representation similarity (pypattern.equivalence) against ground truths: the U-statistic written out over all
4-tuples, Song et al.'s closed form, Kornblith et al.'s feature form, scipy's orthogonal Procrustes, and
invariances that must hold exactly."""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pypattern.equivalence import (
    MinibatchCKA,
    cka_matrix,
    hsic,
    linear_cka,
    permutation_test,
    procrustes,
    ridge_similarity,
    u_center,
)


def _rand(n, d, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + offset


def _hsic_brute(k, l):  # noqa: E741
    """Unbiased HSIC as the U-statistic over ordered 4-tuples of distinct samples (Song et al. 2012, eq. 5)."""
    n = k.shape[0]
    tot, cnt = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        tot += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        cnt += 1
    return tot / cnt


def _hsic_song(k, l):  # noqa: E741
    """Song et al.'s closed form with K~, L~ the Grams with zeroed diagonals."""
    n = k.shape[0]
    kt, lt = k.clone(), l.clone()
    kt.diagonal().zero_()
    lt.diagonal().zero_()
    one = torch.ones(n, dtype=k.dtype)
    val = (
        torch.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    )
    return val / (n * (n - 3))


def _rbf(x, gamma=0.3):
    return torch.exp(-gamma * torch.cdist(x, x) ** 2)


@pytest.mark.parametrize("n", [4, 5, 7])
def test_unbiased_hsic_equals_u_statistic(n):
    x, y = _rand(n, 3, 0), _rand(n, 2, 1)
    x[:, 0] += 2 * y[:, 0]
    for k, l in ((x @ x.T, y @ y.T), (_rbf(x), _rbf(y))):  # noqa: E741
        want = _hsic_brute(k, l)
        assert float(hsic(k, l)) == pytest.approx(float(want), rel=1e-10, abs=1e-12)
        assert float(_hsic_song(k, l)) == pytest.approx(float(want), rel=1e-10, abs=1e-12)


def test_feature_form_equals_gram_form_and_is_translation_invariant():
    for n, d1, d2, seed in ((4, 3, 5, 0), (9, 1, 1, 1), (33, 17, 4, 2), (200, 64, 96, 3)):
        x, y = _rand(n, d1, seed), _rand(n, d2, seed + 100)
        y[:, 0] += x[:, 0]
        for debiased in (True, False):
            ref_xy = hsic(x @ x.T, y @ y.T, debiased=debiased)
            ref = float(
                ref_xy
                / torch.sqrt(
                    hsic(x @ x.T, x @ x.T, debiased=debiased) * hsic(y @ y.T, y @ y.T, debiased=debiased)
                )
            )
            assert linear_cka(x, y, debiased=debiased) == pytest.approx(ref, rel=1e-9, abs=1e-12)
            # a constant offset per feature (a translation) changes neither estimator
            assert linear_cka(x + 50.0, y - 7.0, debiased=debiased) == pytest.approx(ref, rel=1e-7, abs=1e-9)


def test_biased_cka_equals_kornblith_feature_form():
    x, y = _rand(50, 8, 0), _rand(50, 12, 1)
    y[:, :3] += x[:, :3]
    xc, yc = x - x.mean(0), y - y.mean(0)
    want = torch.linalg.matrix_norm(yc.T @ xc) ** 2 / (
        torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    )
    assert linear_cka(x, y, debiased=False) == pytest.approx(float(want), rel=1e-12)


def test_cka_invariances_and_independent_data():
    x = _rand(100, 20, 0)
    q, _ = torch.linalg.qr(_rand(20, 20, 1))
    for debiased in (True, False):
        assert linear_cka(x, 3.5 * x @ q + 1.0, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
        # not invariant to a non-isotropic scaling of the features
        assert linear_cka(x, x * torch.linspace(0.1, 10, 20), debiased=debiased) < 0.9
    # few samples, many features: the biased estimator reports near-identity for independent data
    a, b = _rand(20, 5000, 2), _rand(20, 5000, 3)
    assert linear_cka(a, b, debiased=False) > 0.95
    assert abs(linear_cka(a, b)) < 0.3


def test_inputs_of_other_dtypes_layouts_and_ranks():
    x, y = _rand(30, 12, 0), _rand(30, 12, 1)
    y += x
    ref = linear_cka(x, y)
    # float32, a transposed (non-contiguous) view, a 3-D representation flattened to features, numpy
    assert linear_cka(x.float(), y.float()) == pytest.approx(ref, rel=1e-5)
    xt = x.T.contiguous().T
    assert not xt.is_contiguous()
    assert linear_cka(xt, y) == pytest.approx(ref, rel=1e-12)
    assert linear_cka(xt.reshape(30, 3, 4), y) == pytest.approx(ref, rel=1e-12)
    assert linear_cka(x.numpy(), y.numpy()) == pytest.approx(ref, rel=1e-12)
    yp = torch.zeros(30, 24, dtype=torch.float64)[:, ::2]
    yp.copy_(y)
    assert not yp.is_contiguous()
    assert linear_cka(x, yp) == pytest.approx(ref, rel=1e-12)


def test_bad_inputs_raise_clear_errors():
    x = _rand(10, 3, 0)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, _rand(9, 3, 1))
    bad = x.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="y contains 1 non-finite"):
        linear_cka(x, bad)
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3])
    with pytest.raises(ValueError, match="shape"):
        linear_cka(torch.ones(10), x)
    with pytest.raises(ValueError, match="no features"):
        linear_cka(torch.ones(10, 0), x)
    with pytest.raises(ValueError, match="at least one"):
        cka_matrix([], [x])
    with pytest.raises(TypeError, match="sequences"):
        cka_matrix(x, [x])
    with pytest.raises(ValueError, match="method"):
        cka_matrix([x], method="svd")
    with pytest.raises(ValueError, match="constant"):
        procrustes(torch.ones(10, 3), x)
    with pytest.raises(ValueError, match="square"):
        u_center(x)
    # a constant representation has no CKA: NaN, not a number that looks like an answer
    assert math.isnan(linear_cka(torch.ones(10, 3), x))


def test_cka_matrix_methods_agree_with_pairwise():
    base = _rand(40, 6, 0)
    xs = [base @ _rand(6, d, 10 + d) + 0.3 * _rand(40, d, 20 + d) for d in (5, 9, 60)]
    ys = [base[:, :3] @ _rand(3, d, 30 + d) + _rand(40, d, 40 + d) for d in (7, 2)]
    for debiased in (True, False):
        want = torch.tensor(
            [[linear_cka(x, y, debiased=debiased) for y in ys] for x in xs], dtype=torch.float64
        )
        for method in ("gram", "features", "auto"):
            got = cka_matrix(xs, ys, debiased=debiased, method=method)
            assert got.shape == (3, 2)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        sym = cka_matrix(xs, debiased=debiased, method="gram")
        torch.testing.assert_close(sym, sym.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            torch.diagonal(sym), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            sym, cka_matrix(xs, debiased=debiased, method="features"), rtol=1e-9, atol=1e-12
        )


def test_minibatch_cka():
    xs = [_rand(64, 8, 0)]
    ys = [xs[0] @ _rand(8, 5, 1) + _rand(64, 5, 2), _rand(64, 3, 3)]
    # one batch: the debiased CKA itself
    one = MinibatchCKA(1, 2).update(xs, ys).compute()
    torch.testing.assert_close(one, cka_matrix(xs, ys), rtol=1e-10, atol=1e-12)
    # several batches: ratios of the batch-averaged unbiased HSICs (written out with hsic())
    acc = MinibatchCKA(1, 2)
    sums = np.zeros((3,))
    for b in range(4):
        sl = slice(16 * b, 16 * (b + 1))
        acc.update([xs[0][sl]], [ys[0][sl], ys[1][sl]])
        k, l0 = xs[0][sl] @ xs[0][sl].T, ys[0][sl] @ ys[0][sl].T
        sums += [float(hsic(k, l0)), float(hsic(k, k)), float(hsic(l0, l0))]
    assert float(acc.compute()[0, 0]) == pytest.approx(sums[0] / math.sqrt(sums[1] * sums[2]), rel=1e-10)
    assert acc.num_batches == 4
    with pytest.raises(ValueError, match="expected 1"):
        acc.update([xs[0][:16], xs[0][:16]], [ys[0][:16], ys[1][:16]])
    with pytest.raises(ValueError, match="num_y"):
        acc.update([xs[0][:16]])
    with pytest.raises(RuntimeError, match="before any update"):
        MinibatchCKA(2).compute()
    for method in ("gram", "features"):  # both forms accumulate the same terms
        accm = MinibatchCKA(1, 2, method=method)
        for b in range(4):
            sl = slice(16 * b, 16 * (b + 1))
            accm.update([xs[0][sl]], [ys[0][sl], ys[1][sl]])
        torch.testing.assert_close(accm.compute(), acc.compute(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="method"):
        MinibatchCKA(1, method="svd")
    self_acc = MinibatchCKA(2).update([xs[0], ys[0]])
    torch.testing.assert_close(self_acc.compute(), cka_matrix([xs[0], ys[0]]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d1,d2", [(30, 5, 5), (30, 4, 7), (8, 20, 20), (8, 3, 50)])
def test_procrustes_against_scipy(n, d1, d2):
    x, y = _rand(n, d1, 0), _rand(n, d2, 1)
    y[:, : min(d1, d2)] += 0.5 * x[:, : min(d1, d2)]

    def norm(a, d):
        a = (a - a.mean(0)).numpy()
        a = a / np.linalg.norm(a)
        return np.pad(a, ((0, 0), (0, d - a.shape[1])))

    d = max(d1, d2)
    xa, ya = norm(x, d), norm(y, d)
    r, _ = scipy.linalg.orthogonal_procrustes(ya, xa)  # argmin_R ||ya R - xa||_F over orthogonal R
    want = np.linalg.norm(ya @ r - xa)
    assert procrustes(x, y) == pytest.approx(want, rel=1e-9, abs=1e-12)
    nuc = 1 - want**2 / 2
    assert procrustes(x, y, angular=True) == pytest.approx(math.acos(nuc), rel=1e-8)
    assert procrustes(x, y) == pytest.approx(procrustes(y, x), rel=1e-10)


def test_procrustes_invariances():
    x = _rand(50, 6, 0)
    q, _ = torch.linalg.qr(_rand(6, 6, 1))
    assert procrustes(x, -2.0 * x @ q + 4.0) == pytest.approx(0.0, abs=1e-6)
    assert procrustes(x, x @ q, angular=True) == pytest.approx(0.0, abs=1e-6)
    # a non-orthogonal map moves it
    assert procrustes(x, x @ torch.diag(torch.linspace(0.1, 5, 6, dtype=torch.float64))) > 0.2


def test_procrustes_resolves_small_distances():
    # the residual at the optimal rotation, not sqrt(2 - 2 nuc): no cancellation near 0
    rng = np.random.default_rng(0)
    for n, d in [(50, 8), (40, 60), (30, 300)]:
        x = rng.normal(size=(n, d))
        assert procrustes(x, x) == 0.0 and procrustes(x, x, angular=True) == 0.0
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        assert procrustes(x, -3.0 * x @ q + 1.0) < 1e-14
        assert procrustes(x, -3.0 * x @ q + 1.0, angular=True) < 1e-14
    x = rng.normal(size=(50, 8))
    y = x + 1e-10 * rng.normal(size=x.shape)

    def norm(a):
        a = a - a.mean(0)
        return a / np.linalg.norm(a)

    r, _ = scipy.linalg.orthogonal_procrustes(norm(y), norm(x))
    want = np.linalg.norm(norm(y) @ r - norm(x))  # about 9.5e-11
    assert 5e-11 < want < 2e-10
    assert procrustes(x, y) == pytest.approx(want, rel=1e-6)
    assert procrustes(x, y, angular=True) == pytest.approx(2 * math.asin(want / 2), rel=1e-6)


def test_permutation_test():
    x = _rand(60, 10, 0)
    y = x @ _rand(10, 4, 1) + 0.5 * _rand(60, 4, 2)
    t = permutation_test(x, y, num_permutations=200, seed=0)
    assert t.statistic == pytest.approx(linear_cka(x, y), rel=1e-10)
    assert t.p_value == pytest.approx(1 / 201)
    assert t.alternative == "greater" and t.null.shape == (200,)
    assert abs(t.null_mean) < 0.05  # debiased CKA of shuffled pairs is centred near 0
    # the null computed on permuted Grams is the measure recomputed on permuted rows, with the same permutations
    g = torch.Generator().manual_seed(0)
    for b in range(3):
        perm = torch.randperm(60, generator=g)
        assert t.null[b] == pytest.approx(linear_cka(x, y[perm]), rel=1e-9, abs=1e-12)
    # unrelated data: p is not small for most seeds
    ps = [
        permutation_test(_rand(40, 5, 10 + s), _rand(40, 5, 50 + s), num_permutations=99, seed=s).p_value
        for s in range(10)
    ]
    assert sum(p < 0.05 for p in ps) <= 3 and max(ps) > 0.3
    tp = permutation_test(x, y, "procrustes", num_permutations=50)
    assert tp.alternative == "less" and tp.p_value == pytest.approx(1 / 51)
    assert tp.statistic == pytest.approx(procrustes(x, y))
    g = torch.Generator().manual_seed(0)
    for b in range(3):  # normalised once, permuted after: the same as recomputing on permuted rows
        assert tp.null[b] == pytest.approx(procrustes(x, y[torch.randperm(60, generator=g)]), rel=1e-9)
    wide = permutation_test(x[:8], _rand(8, 30, 5), "procrustes_angular", num_permutations=3, seed=1)
    g = torch.Generator().manual_seed(1)
    assert wide.null[0] == pytest.approx(
        procrustes(x[:8], _rand(8, 30, 5)[torch.randperm(8, generator=g)], angular=True), rel=1e-9
    )
    tc = permutation_test(
        x, y, lambda a, b: float((a[:, 0] * b[:, 0]).sum()), num_permutations=20, alternative="greater"
    )
    assert 0 < tc.p_value <= 1
    with pytest.raises(ValueError, match="alternative"):
        permutation_test(x, y, lambda a, b: 0.0)
    with pytest.raises(ValueError, match="measure"):
        permutation_test(x, y, "cca")
    with pytest.raises(ValueError, match="num_permutations"):
        permutation_test(x, y, num_permutations=0)


def test_minibatch_jackknife_standard_error_matches_replicates():
    """The jackknife standard error over batches against the spread of the estimate over independent data sets
    drawn from the same model (x and y share 2 of 6 latent directions)."""

    wx, wy = _rand(6, 5, 1000), _rand(2, 4, 1001)  # the model: fixed; only the samples are redrawn

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(160, 6, generator=g, dtype=torch.float64)
        x = z @ wx
        y = z[:, :2] @ wy + torch.randn(160, 4, generator=g, dtype=torch.float64)
        acc = MinibatchCKA(1, 1)
        for b in range(10):
            acc.update([x[16 * b : 16 * (b + 1)]], [y[16 * b : 16 * (b + 1)]])
        return float(acc.compute()[0, 0]), float(acc.standard_error()[0, 0])

    vals = np.array([draw(s) for s in range(150)])
    spread, mean_se = vals[:, 0].std(ddof=1), vals[:, 1].mean()
    assert 0.7 < mean_se / spread < 1.4, (mean_se, spread)
    with pytest.raises(RuntimeError, match="at least 2 batches"):
        MinibatchCKA(1).update([_rand(8, 3, 0)]).standard_error()


# ------------------------------------------------------------------------------------------------ interpretive equivalence


def test_ridge_similarity_against_closed_forms():
    from pypattern.equivalence import ridge_similarity

    x = _rand(80, 6, 0)
    w = _rand(6, 3, 1)
    assert ridge_similarity(x, x @ w + 2.0, alpha=0.0) == pytest.approx(1.0, abs=1e-9)
    assert ridge_similarity(x, _rand(80, 3, 2), alpha=0.0) < 0.4  # unrelated: R^2 near or below 0
    # the same split and penalty written out with numpy, in the primal (d < k) and the dual (d > k) form
    for d, alpha in ((6, 0.3), (70, 0.05)):
        xx, yy = _rand(80, d, 3), _rand(80, 2, 4)
        yy[:, 0] += xx[:, :3].sum(1)
        perm = torch.randperm(80, generator=torch.Generator().manual_seed(7)).numpy()
        tr, te = perm[:40], perm[40:]
        xa, ya = xx.numpy(), yy.numpy()
        mx, my = xa[tr].mean(0), ya[tr].mean(0)
        xt = xa[tr] - mx
        lam = alpha * (xt**2).sum() / d
        w_ = np.linalg.solve(xt.T @ xt + lam * np.eye(d), xt.T @ (ya[tr] - my))
        pred = (xa[te] - mx) @ w_ + my
        r2 = 1 - ((ya[te] - pred) ** 2).sum() / ((ya[te] - ya[te].mean(0)) ** 2).sum()
        got = ridge_similarity(xx, yy, alpha=alpha, seed=7)
        assert got == pytest.approx(math.sqrt(max(r2, 0)), rel=1e-7)
    with pytest.raises(ValueError, match="train_fraction"):
        ridge_similarity(x, x, train_fraction=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ridge_similarity(x, x, alpha=-1)


def _latent_model(seed_w: int, use: slice, rotate: int | None = None):
    """A 'model' = a fixed random nonlinear read-out of chosen latent directions, optionally followed by a random
    rotation (the same computation in another basis); implementations add fresh noise."""
    w = _rand(8, 12, seed_w)
    q = (
        torch.linalg.qr(_rand(12, 12, rotate))[0]
        if rotate is not None
        else torch.eye(12, dtype=torch.float64)
    )

    def rep(z):
        h = torch.zeros_like(z)
        h[:, use] = z[:, use]
        return torch.tanh(h @ w) @ q

    return rep


def test_interpretive_equivalence_on_planted_models():
    from pypattern.equivalence import interpretive_equivalence

    z = _rand(300, 8, 0)
    a = _latent_model(1, slice(0, 4))
    b_same = _latent_model(1, slice(0, 4), rotate=5)  # the same computation in a rotated basis
    b_diff = _latent_model(3, slice(4, 8))  # other latent variables

    def sampler(model, noise):
        def sample(seed):
            g = torch.Generator().manual_seed(seed)
            return model(z) + noise * torch.randn(300, 12, generator=g, dtype=torch.float64)

        return sample

    noise = 0.05
    ra = sampler(a, noise)(10**6)
    same = interpretive_equivalence(
        ra, sampler(b_same, noise)(10**6 + 1), sampler(a, noise), sampler(b_same, noise), num_trials=30
    )
    diff = interpretive_equivalence(
        ra, sampler(b_diff, noise)(10**6 + 1), sampler(a, noise), sampler(b_diff, noise), num_trials=30
    )
    assert diff.score < 0.1 and diff.wins == 60  # always closer to its own implementation
    assert diff.own.min() > diff.other.max()
    assert same.score > 0.6  # wins near a coin flip: the other model is as close as an implementation
    assert same.own.shape == (30, 2) and 0 <= same.win_rate <= 1
    with pytest.raises(ValueError, match="similarity"):
        interpretive_equivalence(ra, ra, sampler(a, noise), sampler(a, noise), similarity="cosine")
    with pytest.raises(ValueError, match="same samples"):
        interpretive_equivalence(ra, ra[:10], sampler(a, noise), sampler(a, noise))


def test_resample_implementations_patch_what_they_say():
    from pypattern import InductionTask, Transformer
    from pypattern.equivalence import representations, resample_implementations

    task = InductionTask(d_vocab=16, seq_len=13)
    model = Transformer(task.model_config(d_model=16, n_heads=2, seed=0))
    tokens = task.sample(24, seed=1).tokens
    clean = representations(model, tokens)
    assert clean.shape == (24, 2 * 13 * 16)
    sample = resample_implementations(model, tokens, [("blocks.0.attn.hook_z", 1)])
    r1, r1b, r2 = sample(5), sample(5), sample(6)
    assert torch.equal(r1, r1b) and not torch.equal(r1, r2)  # keyed by the seed
    assert not torch.allclose(r1, clean)  # the patch changed something
    # the same patch written out by hand: head 1 of layer 0 takes input idx[i]'s activation, head 0 keeps its own
    # input i draws among the 23 others: j in 0..22, shifted past i
    j = torch.randint(0, 23, (24,), generator=torch.Generator().manual_seed(5))
    idx = torch.where(j >= torch.arange(24), j + 1, j)
    assert not bool((idx == torch.arange(24)).any())
    _, cf = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    z = cf["blocks.0.attn.hook_z"].clone()
    z[:, :, 1] = cf["blocks.0.attn.hook_z"][idx][:, :, 1]
    with model.hooks([("blocks.0.attn.hook_z", lambda x, h: z)]):
        _, by_hand = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    samp = resample_implementations(
        model, tokens, [("blocks.0.attn.hook_z", 1)], hooks=["blocks.0.hook_resid_post"]
    )
    torch.testing.assert_close(samp(5), by_hand["blocks.0.hook_resid_post"].reshape(24, -1))
    # a whole-activation site (head None) and counterfactual inputs from elsewhere
    other = task.sample(10, seed=9).tokens
    whole = resample_implementations(model, tokens, [("blocks.1.hook_attn_out", None)], counterfactual=other)
    assert whole(0).shape == clean.shape and not torch.allclose(whole(0), clean)
    # a head of the attention pattern (batch, head, query, key): the head axis is 1 there, not 2
    _, cfp = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    pat = cfp["blocks.1.attn.hook_pattern"].clone()
    pat[:, 1] = cfp["blocks.1.attn.hook_pattern"][idx][:, 1]
    with model.hooks([("blocks.1.attn.hook_pattern", lambda x, h: pat)]):
        _, by_hand_p = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    samp_p = resample_implementations(
        model, tokens, [("blocks.1.attn.hook_pattern", 1)], hooks=["blocks.1.hook_resid_post"]
    )
    torch.testing.assert_close(samp_p(5), by_hand_p["blocks.1.hook_resid_post"].reshape(24, -1))
    with pytest.raises(ValueError, match="not a per-head hook point"):
        resample_implementations(model, tokens, [("blocks.0.hook_resid_post", 0)])
    with pytest.raises(ValueError, match="sites is empty"):
        resample_implementations(model, tokens, [])
    with pytest.raises(ValueError, match="out of range"):
        resample_implementations(model, tokens, [("blocks.0.attn.hook_z", 5)])
    with pytest.raises(KeyError):
        resample_implementations(model, tokens, [("blocks.9.attn.hook_z", 0)])


def test_feature_form_in_chunks(monkeypatch):
    """Small chunks (several products per x) give the same matrix as one product."""
    import pypattern.equivalence as eq

    xs = [_rand(30, d, d) for d in (3, 7, 11)]
    ys = [_rand(30, d, 50 + d) + xs[0][:, :1] for d in (5, 2, 9, 4)]
    want = cka_matrix(xs, ys, method="features")
    monkeypatch.setattr(eq, "_CHUNK_ELEMENTS", 60)  # at most ~5-20 y columns per chunk
    torch.testing.assert_close(cka_matrix(xs, ys, method="features"), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cka_matrix(xs, ys, method="gram"), want, rtol=1e-9, atol=1e-12)
    # 6 samples x 500 features: auto picks the Gram form, unless the Grams may not fit
    calls = []
    real = eq._gram_stack
    monkeypatch.setattr(eq, "_gram_stack", lambda reps, deb: calls.append(1) or real(reps, deb))
    a, b = [_rand(6, 500, 1)], [_rand(6, 400, 2)]
    cka_matrix(a, b)
    assert calls
    calls.clear()
    monkeypatch.setattr(eq, "_GRAM_BYTES", 0)
    torch.testing.assert_close(cka_matrix(a, b), cka_matrix(a, b, method="features"))
    assert not calls


def test_float32_products_agree_with_float64():
    base = _rand(400, 10, 0)
    xs = [base @ _rand(10, d, d) + 0.5 * _rand(400, d, 10 + d) for d in (8, 40)]
    ys = [base[:, :4] @ _rand(4, d, 20 + d) + _rand(400, d, 30 + d) for d in (6, 30)]
    for debiased in (True, False):
        want = cka_matrix(xs, ys, debiased=debiased)
        for method in ("features", "gram"):
            got = cka_matrix(xs, ys, debiased=debiased, method=method, dtype=torch.float32)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert linear_cka(xs[0], ys[0], dtype=torch.float32) == pytest.approx(linear_cka(xs[0], ys[0]), abs=2e-5)
    acc = MinibatchCKA(2, 2, dtype=torch.float32)
    for b in range(4):
        acc.update([x[100 * b : 100 * (b + 1)] for x in xs], [y[100 * b : 100 * (b + 1)] for y in ys])
    acc64 = MinibatchCKA(2, 2)
    for b in range(4):
        acc64.update([x[100 * b : 100 * (b + 1)] for x in xs], [y[100 * b : 100 * (b + 1)] for y in ys])
    torch.testing.assert_close(acc.compute(), acc64.compute(), rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="dtype"):
        cka_matrix(xs, dtype=torch.float16)


def test_equivalence_demo_runs_small(tmp_path):
    """`pypattern demo cka` end to end at test size: report, plot, and self-consistent numbers."""
    import json

    from pypattern.experiments.equivalence_demo import EquivalenceDemoSettings, run_equivalence_demo

    out = run_equivalence_demo(tmp_path, EquivalenceDemoSettings.quick())  # `demo cka --quick`
    rep = json.loads((tmp_path / "equivalence.json").read_text())
    assert (tmp_path / "equivalence_cka.png").stat().st_size > 0
    assert set(rep["pairs"]) == {"0-1", "0-2", "1-2"} and rep["num_induction_tokens"] > 0
    for p in rep["pairs"].values():
        assert np.asarray(p["cka"]).shape == (2, 2)
        assert all(0 < v <= 1 for v in p["cka_p_value"]) and all(
            0 <= d <= math.sqrt(2) + 1e-9 for d in p["procrustes"]
        )
    assert out["report"].endswith("equivalence.json")


@pytest.mark.parametrize("n,d,scale", [(8, 20000, 1.0), (6, 2000, 1.0), (20, 30, 1e-20), (20, 30, 1e12)])
def test_linear_cka_in_float32_equals_float64_for_wide_and_extreme_scale_inputs(n, d, scale):
    """Wide representations (fewer samples than features) and inputs of extreme scale: float32 CKA is float64's
    to float32 rounding (its fourth-power sums stay in range and are taken in float64)."""
    from pypattern.equivalence import linear_cka

    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x[:, : min(d, 40)] @ torch.randn(min(d, 40), 25, generator=g, dtype=torch.float64)
    y = y + torch.randn(n, 25, generator=g, dtype=torch.float64) + 50.0
    for debiased in (True, False):
        want = linear_cka(x, y, debiased=debiased)
        got = linear_cka(x * scale, y, debiased=debiased, dtype=torch.float32)
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (debiased, got, want)
        assert got <= 1.0 + 1e-6


def test_numpy_views_with_negative_strides_are_read():
    from pypattern.cca import cca
    from pypattern.equivalence import linear_cka, procrustes
    from pypattern.ridge import ridge_cv

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 4))
    xr, yr = x[::-1], y[::-1]
    assert linear_cka(xr, yr) == pytest.approx(linear_cka(x[::-1].copy(), y[::-1].copy()), rel=1e-12)
    assert procrustes(xr, yr) == pytest.approx(procrustes(xr.copy(), yr.copy()), rel=1e-12)
    np.testing.assert_allclose(np.asarray(cca(xr, yr)), np.asarray(cca(xr.copy(), yr.copy())), rtol=1e-12)
    assert ridge_cv(xr, yr).alpha == ridge_cv(xr.copy(), yr.copy()).alpha


def test_measures_refuse_bad_inputs_and_keep_extreme_scales():
    """Ridge similarity: complex inputs, zero features and a non-finite alpha refused by name; CCA of wide data
    of low rank is defined (it equals SVCCA keeping all variance); the CKA permutation test and Procrustes do not
    depend on the data's scale, at 1e-45 or 1e160 too."""
    from pypattern.cca import cca, svcca
    from pypattern.equivalence import permutation_test, procrustes, ridge_similarity, ridge_similarity_cv

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 4, generator=g, dtype=torch.float64) + 0.5 * torch.randn(30, 4, generator=g)
    with pytest.raises(TypeError, match="x has dtype torch.complex128"):
        ridge_similarity_cv(x + 1j * x, y)
    with pytest.raises(ValueError, match="has no features"):
        ridge_similarity_cv(np.zeros((30, 0)), y)
    for alpha in (float("nan"), float("inf"), -1.0, True):
        with pytest.raises(ValueError, match="alpha=.* is not valid"):
            ridge_similarity(x, y, alpha=alpha)
    wide = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 30, generator=g, dtype=torch.float64
    )
    other = torch.randn(20, 4, generator=g, dtype=torch.float64)
    rho = cca(wide, other)
    assert rho.numel() == 3 and bool((rho < 1 - 1e-6).all())
    torch.testing.assert_close(rho, svcca(wide, other, threshold=1.0, reduce="none"), rtol=1e-8, atol=1e-10)
    ref_t = permutation_test(x, y, "cka", num_permutations=20, seed=1)
    ref_p = procrustes(x, y)
    for scale in (1e-45, 1e80, 1e160):
        t = permutation_test(x * scale, y * scale, "cka", num_permutations=20, seed=1)
        assert math.isclose(t.statistic, ref_t.statistic, rel_tol=1e-9) and t.p_value == ref_t.p_value
        assert math.isclose(procrustes(x * scale, y * scale), ref_p, rel_tol=1e-9)


def test_cca_keeps_a_small_scale_feature_of_float32_input():
    from pypattern.equivalence import cca, pwcca, svcca

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = x @ torch.randn(6, 5, generator=g) + 0.5 * torch.randn(200, 5, generator=g)
    x[:, 0] *= 1e-6  # CCA does not depend on a feature's scale
    x32 = x.float()
    x64 = x32.double()  # the same values
    torch.testing.assert_close(
        torch.as_tensor(cca(x32, y)), torch.as_tensor(cca(x64, y)), rtol=1e-6, atol=1e-6
    )
    assert svcca(x32, y, threshold=1.0) == pytest.approx(svcca(x64, y, threshold=1.0), abs=1e-6)
    assert pwcca(x32, y) == pytest.approx(pwcca(x64, y), abs=1e-6)


@pytest.mark.parametrize(
    "name", ["linear_cka", "procrustes", "cca", "svcca", "pwcca", "ridge_similarity", "ridge_similarity_cv"]
)
def test_empty_inputs_are_refused_by_name(name):
    import pypattern.equivalence as eq

    fn = getattr(eq, name)
    with pytest.raises(ValueError, match="x has 0 samples"):
        fn(np.zeros((0, 8)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="no features"):
        fn(np.zeros((10, 0)), np.ones((10, 4)))


def test_minibatch_cka_at_extreme_scales_equals_cka_matrix():
    from pypattern.equivalence import MinibatchCKA, cka_matrix

    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(40, 6, generator=g, dtype=torch.float64),
        torch.randn(40, 5, generator=g, dtype=torch.float64),
    )
    y = y + x[:, :5]
    want = float(cka_matrix([x.double()], [y.double()])[0, 0])
    for scale, dtype in (
        (1e20, torch.float32),
        (1e-20, torch.float32),
        (1e150, torch.float64),
        (1e-150, torch.float64),
    ):
        for method in ("gram", "features"):
            acc = MinibatchCKA(1, 1, dtype=dtype, method=method)
            acc.update([(x * scale).to(dtype)], [y.to(dtype)])
            assert float(acc.compute()[0, 0]) == pytest.approx(want, rel=1e-4), (scale, dtype, method)


def test_interpretive_equivalence_counts_ties_half_and_ridge_is_the_authors_measure():
    from pypattern.equivalence import interpretive_equivalence, ridge_similarity_cv

    g = torch.Generator().manual_seed(2)
    ra, rb = (
        torch.randn(60, 4, generator=g, dtype=torch.float64),
        torch.randn(60, 4, generator=g, dtype=torch.float64),
    )

    def sampler(r):
        return lambda seed: (
            r + 0.1 * torch.randn(r.shape, generator=torch.Generator().manual_seed(seed), dtype=r.dtype)
        )

    with pytest.warns(UserWarning, match="tied"):
        flat = interpretive_equivalence(
            ra, rb, sampler(ra), sampler(rb), num_trials=4, similarity=lambda x, y: 0.0
        )
    assert (flat.ties, flat.wins) == (8, 4.0)  # a tie counts half
    assert math.isnan(flat.score)  # no information: neither "equivalent" nor "always closer"
    res = interpretive_equivalence(ra, rb, sampler(ra), sampler(rb), num_trials=2, seed=3)
    for t in range(2):
        key = 3 * 100_003 + t
        ia, ib = sampler(ra)(2 * key), sampler(rb)(2 * key + 1)
        assert res.own[t, 0] == pytest.approx(ridge_similarity_cv(ra, ia, seed=key), abs=1e-12)
        assert res.own[t, 1] == pytest.approx(ridge_similarity_cv(rb, ib, seed=key), abs=1e-12)
        assert res.other[t, 0] == pytest.approx(ridge_similarity_cv(ra, rb, seed=key), abs=1e-12)


def test_resample_implementations_of_one_input_need_counterfactuals():
    """One input has no other input to draw from: refused, unless counterfactual inputs are given."""
    from pypattern import InductionTask, Transformer
    from pypattern.equivalence import resample_implementations

    task = InductionTask(d_vocab=16, seq_len=13)
    model = Transformer(task.model_config(d_model=16, n_heads=2, seed=0))
    tokens = task.sample(3, seed=1).tokens
    with pytest.raises(ValueError, match="tokens holds 1 input.*counterfactual"):
        resample_implementations(model, tokens[:1], [("blocks.0.attn.hook_z", 1)])
    sample = resample_implementations(
        model, tokens[:1], [("blocks.0.attn.hook_z", 1)], counterfactual=tokens[1:]
    )
    assert sample(0).shape[0] == 1


def test_interpretive_equivalence_comparing_implementations_scores_identical_and_rotated_models_as_equivalent():
    """compare='implementations' (the authors' released code: a, a' of A against b of B): a model against itself
    and against a copy in a rotated basis is a coin flip (score near 1), where comparing the models themselves gives
    0 for identical models; models of other latent variables score 0 either way. Bad values are named."""
    from pypattern.equivalence import interpretive_equivalence

    g = torch.Generator().manual_seed(7)
    n, k, d = 120, 3, 6
    z, z_other = (
        torch.randn(n, k, generator=g, dtype=torch.float64),
        torch.randn(n, k, generator=g, dtype=torch.float64),
    )
    W = torch.randn(k, d, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]

    def sampler(base, rot=None):
        def draw(seed):
            noise = 0.3 * torch.randn(
                n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            )
            x = base @ W + noise
            return x if rot is None else x @ rot

        return draw

    same = interpretive_equivalence(
        None, None, sampler(z), sampler(z), num_trials=20, compare="implementations", similarity="cka"
    )
    rotated = interpretive_equivalence(
        None, None, sampler(z), sampler(z, Q), num_trials=20, compare="implementations", similarity="cka"
    )
    other = interpretive_equivalence(
        None, None, sampler(z), sampler(z_other), num_trials=20, compare="implementations", similarity="cka"
    )
    assert same.score >= 0.6 and rotated.score >= 0.6, (same.score, rotated.score)
    assert other.score == 0.0 and other.wins == 40
    clean = z @ W
    as_model = interpretive_equivalence(clean, clean, sampler(z), sampler(z), num_trials=20, similarity="cka")
    assert as_model.score == 0.0  # the model's own representation is closer than any implementation
    with pytest.raises(ValueError, match="compare='both' is not valid"):
        interpretive_equivalence(clean, clean, sampler(z), sampler(z), compare="both")
    with pytest.raises(TypeError, match="rep_a"):
        interpretive_equivalence(None, None, sampler(z), sampler(z))
    with pytest.warns(UserWarning, match="same representation for different seeds"):
        interpretive_equivalence(
            None,
            None,
            lambda s: clean,
            lambda s: clean,
            num_trials=3,
            compare="implementations",
            similarity="cka",
        )


@pytest.mark.parametrize("scale", [1e-44, 1e-60, 1e-200, 1e60, 1e200])
def test_float32_cka_of_float64_inputs_of_any_scale_equals_float64(scale):
    """dtype=torch.float32 on float64 inputs of a scale outside float32's range (or in its subnormals): each
    representation is scaled to 1 before the cast, so the value is float64's to float32 rounding, not wrong or NaN
    (linear_cka, cka_matrix and MinibatchCKA alike)."""
    x = _rand(30, 5, 0)
    y = x @ _rand(5, 4, 1) + _rand(30, 4, 2)
    for debiased in (True, False):
        want = linear_cka(x, y, debiased=debiased)
        got = linear_cka(x * scale, y, debiased=debiased, dtype=torch.float32)
        assert got == pytest.approx(want, abs=2e-6), (debiased, got, want)
        m = cka_matrix([x * scale, y], [y * scale, x], debiased=debiased, dtype=torch.float32)
        torch.testing.assert_close(m, cka_matrix([x, y], [y, x], debiased=debiased), rtol=0, atol=2e-6)
    acc32, acc64 = MinibatchCKA(1, 1, dtype=torch.float32), MinibatchCKA(1, 1)
    for b in range(3):
        acc32.update([x[10 * b : 10 * (b + 1)] * scale], [y[10 * b : 10 * (b + 1)]])
        acc64.update([x[10 * b : 10 * (b + 1)]], [y[10 * b : 10 * (b + 1)]])
    torch.testing.assert_close(acc32.compute(), acc64.compute(), rtol=0, atol=2e-6)


def test_cka_boolean_arguments_refuse_other_types():
    """debiased, inplace: a string or None would read by truthiness (debiased=None as the biased estimate)."""
    xs = [_rand(20, 4, 0), _rand(20, 6, 1)]
    k = xs[0] @ xs[0].T
    for bad in ("no", None, 0.0, 1):
        with pytest.raises(TypeError, match=f"debiased={bad!r} is not valid; give True or False"):
            cka_matrix(xs, debiased=bad)
        with pytest.raises(TypeError, match=f"debiased={bad!r} is not valid"):
            hsic(k, k, debiased=bad)
        with pytest.raises(TypeError, match=f"inplace={bad!r} is not valid"):
            u_center(k, inplace=bad)
    assert float(cka_matrix(xs, debiased=np.bool_(False))[0, 1]) == pytest.approx(
        linear_cka(xs[0], xs[1], debiased=False), abs=1e-12
    )


def _minibatch_reference(xb, yb):
    """Minibatch CKA of one x and one y from the debiased HSIC of each batch's linear Grams, unscaled."""
    xy = xx = yy = 0.0
    for x, y in zip(xb, yb):
        kx, ky = x @ x.T, y @ y.T
        xy, xx, yy = xy + hsic(kx, ky), xx + hsic(kx, kx), yy + hsic(ky, ky)
    return float(xy / (xx * yy).sqrt())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minibatch_cka_takes_batches_of_very_different_scales(dtype):
    """A later batch far larger than the first: the running sums are rescaled to the largest scale seen, so the
    value is finite and right (a batch 1e200 times smaller than another contributes nothing representable)."""
    x1, x2, y1, y2 = _rand(10, 5, 0), _rand(10, 5, 1), _rand(10, 3, 2), _rand(10, 3, 3)
    y2 = y2 + x2[:, :3]
    # moderate scales: the unscaled reference, in either order
    for a, b in ((1.0, 30.0), (30.0, 1.0)):
        acc = MinibatchCKA(1, 1, dtype=dtype)
        acc.update([x1 * a], [y1]).update([x2 * b], [y2 * a])
        want = _minibatch_reference([x1 * a, x2 * b], [y1, y2 * a])
        assert float(acc.compute()[0, 0]) == pytest.approx(
            want, abs=1e-5 if dtype == torch.float32 else 1e-12
        )
    # extreme ones: batch 1 of x contributes 1e-800 relative, as if it were 0 (y's batch 1 counts in full)
    acc = MinibatchCKA(1, 1, dtype=dtype)
    acc.update([x1 * 1e-100], [y1]).update([x2 * 1e100], [y2])
    want = _minibatch_reference([torch.zeros_like(x1), x2], [y1, y2])
    got = acc.compute()
    assert float(got[0, 0]) == pytest.approx(want, abs=1e-5 if dtype == torch.float32 else 1e-12)
    assert bool(torch.isfinite(acc.standard_error()).all())
    # with ys = xs too
    same = MinibatchCKA(2)
    same.update([x1 * 1e-150, y1]).update([x2 * 1e150, y2])
    assert float(same.compute()[0, 1]) == pytest.approx(want, abs=1e-12)


def test_seeds_beyond_a_generators_range_are_refused_by_name():
    x, y = _rand(10, 2, 0), _rand(10, 1, 1)
    for fn in (
        lambda: permutation_test(x, y, "cka", num_permutations=2, seed=2**70),
        lambda: ridge_similarity(x, y, seed=-(2**64)),
    ):
        with pytest.raises(
            ValueError, match=r"seed=-?\d+ is not valid; give an int in \[-2\*\*63, 2\*\*64\)"
        ):
            fn()
