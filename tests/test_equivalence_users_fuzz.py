"""Representation similarity and interpretive equivalence as a user meets them: every public measure against a
naive float64 computation written from its definition, its invariances, the inputs users hand it (fewer samples
than features, constant features, float32, views, 3-d activations, numpy, tensors that track gradients, bad rows,
NaN), activations of converted Hugging Face models, and the interpretive-equivalence estimator on small samples and
on identical models."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import equivalence as E
from pypattern import interpretive as I
from pypattern.io import FormatError, _write_result
from pypattern.ridge import ridge_similarity_cv, train_test_split

# ------------------------------------------------------------------------------------------------ naive references


def _np(x) -> np.ndarray:
    x = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    return x.reshape(x.shape[0], -1)


def naive_hsic(k: np.ndarray, l: np.ndarray, debiased: bool) -> float:  # noqa: E741
    n = k.shape[0]
    if not debiased:
        h = np.eye(n) - 1.0 / n
        return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(k @ l)
            + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l @ one)
        )
        / (n * (n - 3))
    )


def naive_cka(x, y, debiased: bool = True) -> float:
    x, y = _np(x), _np(y)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return naive_hsic(k, l, debiased) / math.sqrt(naive_hsic(k, k, debiased) * naive_hsic(l, l, debiased))


def naive_procrustes(x, y, angular: bool = False) -> float:
    x, y = _np(x), _np(y)
    x, y = x - x.mean(0), y - y.mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    nuc = np.linalg.svd(x.T @ y, compute_uv=False).sum()
    return math.acos(min(nuc, 1.0)) if angular else math.sqrt(max(2.0 - 2.0 * nuc, 0.0))


def naive_cca(x, y) -> np.ndarray:
    x, y = _np(x), _np(y)
    qx, qy = np.linalg.qr(x - x.mean(0))[0], np.linalg.qr(y - y.mean(0))[0]
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def naive_ridge_r2(x, y, tr, te, alphas=(0.1, 1.0, 10.0)) -> float:
    """Held-out R^2 averaged over y's columns of ridge with an intercept, the penalty chosen by explicit
    leave-one-out refits on the fit rows (the smallest mean squared LOO residual, the first on ties)."""
    x, y = _np(x), _np(y)
    xtr, ytr = x[tr], y[tr]

    def fit(a, b, alpha):
        ma, mb = a.mean(0), b.mean(0)
        w = np.linalg.solve((a - ma).T @ (a - ma) + alpha * np.eye(a.shape[1]), (a - ma).T @ (b - mb))
        return w, mb - ma @ w

    loo = []
    for alpha in alphas:
        err = []
        for i in range(len(xtr)):
            keep = np.arange(len(xtr)) != i
            w, b = fit(xtr[keep], ytr[keep], alpha)
            err.append((ytr[i] - xtr[i] @ w - b) ** 2)
        loo.append(np.mean(err))
    w, b = fit(xtr, ytr, alphas[int(np.argmin(loo))])
    pred, yt = x[te] @ w + b, y[te]
    return float(np.mean(1.0 - ((yt - pred) ** 2).sum(0) / ((yt - yt.mean(0)) ** 2).sum(0)))


def _data(n, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64)


def _related(n, d1, d2, seed):
    x = _data(n, d1, seed)
    w = _data(d1, d2, seed + 1)
    return x, x @ w / math.sqrt(d1) + 0.7 * _data(n, d2, seed + 2)


def _orthogonal(d, seed):
    return torch.linalg.qr(_data(d, d, seed))[0]


# ------------------------------------------------------------------------------------------------ closed forms

SHAPES = [(4, 3, 2), (5, 40, 7), (12, 3, 30), (30, 8, 5), (9, 100, 100), (50, 2, 1)]


@pytest.mark.parametrize("n,d1,d2", SHAPES)
@pytest.mark.parametrize("debiased", [True, False])
def test_cka_and_cka_matrix_are_the_naive_gram_formula(n, d1, d2, debiased):
    x, y = _related(n, d1, d2, n + d1)
    want = naive_cka(x, y, debiased)
    assert E.linear_cka(x, y, debiased=debiased) == pytest.approx(want, abs=1e-10)
    assert E.linear_cka(x.float(), y.float(), debiased=debiased, dtype=torch.float32) == pytest.approx(
        want, abs=2e-4
    )
    for method in ("gram", "features"):
        m = E.cka_matrix([x, y], [y, x], debiased=debiased, method=method)
        np.testing.assert_allclose(m.numpy(), [[want, naive_cka(x, x, debiased)], [1.0, want]], atol=1e-10)
    assert E.hsic(x @ x.T, y @ y.T, debiased=debiased).item() == pytest.approx(
        naive_hsic(_np(x) @ _np(x).T, _np(y) @ _np(y).T, debiased), rel=1e-9, abs=1e-12
    )


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_procrustes_and_its_permutation_null_are_the_naive_nuclear_norm(n, d1, d2):
    x, y = _related(n, d1, d2, 3 * n + d2)
    assert E.procrustes(x, y) == pytest.approx(naive_procrustes(x, y), abs=1e-9)
    assert E.procrustes(x, y, angular=True) == pytest.approx(naive_procrustes(x, y, True), abs=1e-7)
    res = E.permutation_test(x, y, "procrustes", num_permutations=5, seed=4)
    g = torch.Generator().manual_seed(4)
    null = [naive_procrustes(x, y[torch.randperm(n, generator=g)]) for _ in range(5)]
    np.testing.assert_allclose(res.null, null, atol=1e-9)
    assert res.p_value == (1 + sum(v <= res.statistic for v in null)) / 6


def test_cka_permutation_null_is_the_naive_formula_on_shuffled_rows():
    x, y = _related(20, 6, 9, 5)
    res = E.permutation_test(x, y, "cka", num_permutations=6, seed=2)
    g = torch.Generator().manual_seed(2)
    null = [naive_cka(x, y[torch.randperm(20, generator=g)]) for _ in range(6)]
    assert res.statistic == pytest.approx(naive_cka(x, y), abs=1e-10)
    np.testing.assert_allclose(res.null, null, atol=1e-10)


def test_minibatch_cka_is_the_ratio_of_batch_averaged_naive_unbiased_hsic():
    x, y = _related(40, 7, 5, 8)
    acc = E.MinibatchCKA(1, 1)
    terms = []
    for b in range(4):
        xb, yb = _np(x[10 * b : 10 * b + 10]), _np(y[10 * b : 10 * b + 10])
        acc.update([torch.as_tensor(xb)], [yb])  # a tensor and a numpy array
        k, l = xb @ xb.T, yb @ yb.T  # noqa: E741
        terms.append([naive_hsic(k, l, True), naive_hsic(k, k, True), naive_hsic(l, l, True)])
    xy, xx, yy = np.mean(terms, 0)
    assert float(acc.compute()[0, 0]) == pytest.approx(xy / math.sqrt(xx * yy), abs=1e-10)


@pytest.mark.parametrize("n,d1,d2", [(12, 3, 4), (30, 8, 5), (60, 20, 2)])
def test_cca_family_is_the_naive_principal_angles(n, d1, d2):
    x, y = _related(n, d1, d2, 7 * n)
    rho = naive_cca(x, y)
    np.testing.assert_allclose(E.cca(x, y).numpy(), rho, atol=1e-8)
    assert E.svcca(x, y, threshold=1.0) == pytest.approx(rho.mean(), abs=1e-8)
    # PWCCA (Morcos et al.): canonical variates h_i of x in sample space, weights sum_j |<h_i, x_j>|
    xc, yc = _np(x) - _np(x).mean(0), _np(y) - _np(y).mean(0)
    qx, qy = np.linalg.qr(xc)[0], np.linalg.qr(yc)[0]
    u, s, _ = np.linalg.svd(qx.T @ qy)
    h = qx @ u[:, : len(s)]
    alpha = np.abs(h.T @ xc).sum(1)
    assert E.pwcca(x, y) == pytest.approx(float((alpha * s).sum() / alpha.sum()), abs=1e-8)


def test_ridge_similarities_are_the_naive_fits():
    x, y = _related(40, 6, 3, 11)
    tr, te = train_test_split(40, None, 3)  # 34 fit, 6 held out
    r2 = naive_ridge_r2(x, y, tr.numpy(), te.numpy())
    assert ridge_similarity_cv(x, y, seed=3, sqrt=False) == pytest.approx(r2, abs=1e-9)
    assert ridge_similarity_cv(x, y, seed=3) == pytest.approx(math.sqrt(max(r2, 0.0)), abs=1e-9)
    # ridge_similarity: a penalty alpha times the mean eigenvalue of the training scatter, R^2 pooled over columns
    n = 40
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()
    trs, tes = perm[:20], perm[20:]
    xn, yn = _np(x), _np(y)
    mx, my = xn[trs].mean(0), yn[trs].mean(0)
    xt = xn[trs] - mx
    lam = 0.01 * (xt**2).sum() / xt.shape[1]
    w = np.linalg.solve(xt.T @ xt + lam * np.eye(6), xt.T @ (yn[trs] - my))
    pred = (xn[tes] - mx) @ w + my
    pooled = 1 - ((yn[tes] - pred) ** 2).sum() / ((yn[tes] - yn[tes].mean(0)) ** 2).sum()
    assert E.ridge_similarity(x, y) == pytest.approx(math.sqrt(max(pooled, 0.0)), abs=1e-9)


# ------------------------------------------------------------------------------------------------ invariances


@pytest.mark.parametrize("n,d1,d2", [(10, 30, 4), (40, 6, 9)])
def test_invariances_symmetry_and_identity(n, d1, d2):
    x, y = _related(n, d1, d2, n)
    q = _orthogonal(d1, 5)
    perm = torch.randperm(d2, generator=torch.Generator().manual_seed(1))
    xt, yt = 1e6 * x @ q + 3.0, 1e-3 * y[:, perm] - 7.0  # rotation, isotropic scale, offset; units permuted
    for f in (E.linear_cka, lambda a, b: E.linear_cka(a, b, debiased=False), E.procrustes):
        assert f(xt, yt) == pytest.approx(f(x, y), abs=1e-9)
        assert f(y, x) == pytest.approx(f(x, y), abs=1e-12)
    assert E.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert E.linear_cka(x, 5 * x @ q) == pytest.approx(1.0, abs=1e-12)
    assert E.procrustes(x, x @ q) == pytest.approx(0.0, abs=1e-9)
    assert -0.2 < E.linear_cka(x, y) <= 1.0 and 0 <= E.procrustes(x, y) <= math.sqrt(2)
    # the ridge similarity: invariant to rotations and offsets of x (the penalty is isotropic, the intercept free)
    # and to the scale, offset and order of y's columns
    if n >= 12:
        a = ridge_similarity_cv(x, y, sqrt=False)
        assert ridge_similarity_cv(x @ q + 3.0, yt, sqrt=False) == pytest.approx(a, abs=1e-9)
    if d1 < n - 1 and d2 < n - 1:
        np.testing.assert_allclose(E.cca(xt, yt).numpy(), E.cca(x, y).numpy(), atol=1e-8)
        np.testing.assert_allclose(E.cca(x, x @ q).numpy(), 1.0, atol=1e-9)


# ------------------------------------------------------------------------------------------ inputs users hand over


def test_layouts_dtypes_and_sources_give_the_same_numbers():
    x, y = _related(24, 12, 6, 2)
    base = [E.linear_cka(x, y), E.procrustes(x, y), float(E.cca(x, y).sum()), ridge_similarity_cv(x, y)]
    variants = [
        (x.reshape(24, 3, 4), y.reshape(24, 2, 3)),  # (batch, pos, d) activations: features flattened
        (x.T.contiguous().T, y.T.contiguous().T),  # transposed views
        (x[:, ::1].numpy(), y.numpy()[::-1][::-1]),  # numpy, a view with negative strides
        (x.clone().requires_grad_(), y.clone().requires_grad_()),  # activations that track gradients
    ]
    for a, b in variants:
        got = [E.linear_cka(a, b), E.procrustes(a, b), float(E.cca(a, b).sum()), ridge_similarity_cv(a, b)]
        np.testing.assert_allclose(got, base, rtol=1e-10, atol=1e-12)
    got32 = [E.linear_cka(x.float(), y.float()), E.procrustes(x.float(), y.float())]
    np.testing.assert_allclose(got32, base[:2], atol=1e-5)


def test_a_constant_feature_does_not_change_cka_or_procrustes_and_a_constant_representation_is_named():
    x, y = _related(20, 5, 4, 6)
    xc = torch.cat([x, torch.full((20, 1), 4.0, dtype=torch.float64)], 1)
    assert E.linear_cka(xc, y) == pytest.approx(naive_cka(x, y), abs=1e-10)
    assert E.procrustes(xc, y) == pytest.approx(naive_procrustes(x, y), abs=1e-9)
    np.testing.assert_allclose(E.cca(xc, y).numpy(), naive_cca(x, y), atol=1e-8)
    const = torch.ones(20, 3)
    assert math.isnan(E.linear_cka(const, y))
    with pytest.raises(ValueError, match="x is constant"):
        E.procrustes(const, y)
    with pytest.raises(ValueError, match="x is constant"):
        E.cca(const, y)


def test_bad_inputs_are_named():
    x, y = _related(20, 5, 4, 9)
    bad_rows = [
        lambda: E.linear_cka(x, y[:12]),
        lambda: E.procrustes(x, y[:12]),
        lambda: E.cca(x, y[:12]),
        lambda: E.pwcca(x, y[:12]),
        lambda: E.cka_matrix([x], [y[:12]]),
    ]
    for f in bad_rows:
        with pytest.raises(ValueError, match=r"20 rows.* 12"):
            f()
    with pytest.raises(ValueError, match=r"ys\[0\] has 12"):
        ridge_similarity_cv(x, y[:12])
    xn, yi = x.clone(), y.clone()
    xn[3, 1], yi[0, 0] = math.nan, math.inf
    for f, name in (
        (E.linear_cka, "x"),
        (E.procrustes, "x"),
        (E.cca, "x"),
        (lambda a, b: E.permutation_test(a, b, num_permutations=2), "x"),
    ):
        with pytest.raises(ValueError, match=f"^{name} contains 1 non-finite"):
            f(xn, y)
    with pytest.raises(ValueError, match=r"ys\[0\] contains 1 non-finite"):
        ridge_similarity_cv(x, yi)
    with pytest.raises(ValueError, match="needs at least 4"):
        E.linear_cka(x[:3], y[:3])
    assert E.linear_cka(x[:2], y[:2], debiased=False) == pytest.approx(1.0)  # two points: one direction
    with pytest.raises(ValueError, match="CCA needs at least 3"):
        E.cca(x[:2], y[:2])
    for bad in (True, "0.9", math.nan, 0.0, 1.5):  # True is not the threshold 1
        with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\], got"):
            E.svcca(x, y, threshold=bad)
    assert E.svcca(x, y, threshold=1) == pytest.approx(naive_cca(x, y).mean(), abs=1e-8)


def test_split_similarities_name_the_shape_given():
    x, y = _related(30, 5, 4, 1)
    for measure in ("cka", "procrustes"):
        with pytest.raises(ValueError, match=r"x must have shape .* got shape \(30,\)"):
            I.similarity(measure, x[:, 0], [y], seed=0)
        with pytest.raises(ValueError, match=r"ys\[0\] must have shape .* got shape \(30,\)"):
            I.similarity(measure, x, [y[:, 0]], seed=0)


# ------------------------------------------------------------------------------------------------ small samples


def test_default_ridge_split_holds_out_six_inputs_and_keeps_r2_sane():
    """On 24 inputs the authors' 90% holds out 2: each column's held-out R^2 then divides by a sum of squares of
    one degree of freedom and the mean over columns reaches -1e2 to -1e4 for unrelated data. The default split
    holds out 6 (and is the authors' 90% from 60 inputs up)."""
    for n, fit in ((24, 18), (12, 6), (60, 54), (100, 90), (1000, 900)):
        tr, te = train_test_split(n, None, 0)
        assert (len(tr), len(te)) == (fit, n - fit)
        assert sorted(torch.cat([tr, te]).tolist()) == list(range(n))
    r2 = []
    g = torch.Generator().manual_seed(0)
    for seed in range(10):
        x = torch.randn(24, 64, generator=g, dtype=torch.float64)
        y = torch.randn(24, 32, generator=g, dtype=torch.float64)
        got = ridge_similarity_cv(x, y, sqrt=False, seed=seed)
        if seed < 2:  # against the naive fit on the split it documents
            tr, te = train_test_split(24, None, seed)
            assert got == pytest.approx(naive_ridge_r2(x, y, tr.numpy(), te.numpy()), abs=1e-9)
        r2.append(got)
    assert min(r2) > -10 and np.median(r2) > -3, r2
    # a split asked for that holds out fewer than 6 is kept, with a warning naming train_fraction and the fix
    x, y = _related(24, 5, 3, 4)
    with pytest.warns(
        UserWarning, match=r"train_fraction=0.9 on 24 inputs holds out 2.*train_fraction <= 0.75"
    ):
        kept = ridge_similarity_cv(x, y, train_fraction=0.9, sqrt=False)
    tr, te = train_test_split(24, 0.9, 0)
    assert len(te) == 2 and kept == pytest.approx(naive_ridge_r2(x, y, tr.numpy(), te.numpy()), abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ridge_similarity_cv(x, y)  # the default on 24 inputs: no warning
        I.similarity("ridge", x, [y], seed=0)


# ------------------------------------------------------------------------------------------------ converted models


def _gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return pp.from_hf(GPT2LMHeadModel(cfg).eval())


def _llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return pp.from_hf(LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def converted():
    pytest.importorskip("transformers")
    tokens = torch.randint(0, 50, (24, 8), generator=torch.Generator().manual_seed(3))
    return _gpt2(0), _llama(1), tokens


def test_measures_on_converted_models_activations_are_the_naive_formulas(converted):
    ma, mb, tokens = converted
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(2)]
    _, ca = ma.run_with_cache(tokens, names_filter=names)
    _, cb = mb.run_with_cache(tokens, names_filter=names)
    acts_a, acts_b = [ca[n] for n in names], [cb[n] for n in names]  # (batch, pos, d_model), float32
    m = E.cka_matrix(acts_a, acts_b)
    for i in range(2):
        for j in range(2):
            assert float(m[i, j]) == pytest.approx(naive_cka(acts_a[i], acts_b[j]), abs=1e-6)
    flat_a, flat_b = acts_a[1].flatten(0, 1), acts_b[1].flatten(0, 1)  # (tokens, d_model)
    assert E.linear_cka(flat_a, flat_b, debiased=False) == pytest.approx(
        naive_cka(flat_a, flat_b, False), abs=1e-6
    )
    assert E.procrustes(flat_a, flat_b) == pytest.approx(naive_procrustes(flat_a, flat_b), abs=1e-6)
    np.testing.assert_allclose(E.cca(flat_a, flat_b).numpy(), naive_cca(flat_a, flat_b), atol=1e-6)
    # 24 inputs, 256 features each: plain CCA is refused by name, a ridge is accepted
    with pytest.raises(ValueError, match="ridge > 0"):
        E.cca(acts_a[1], acts_b[1])
    assert 0 < float(E.cca(acts_a[1], acts_b[1], ridge=0.1).max()) <= 1
    # the accumulated residual: the embedding and each layer's output, mean-pooled over positions
    rep, _ = I.accumulated_residual(ma, tokens)
    _, pre = ma.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre"])
    want = torch.cat([pre["blocks.0.hook_resid_pre"].mean(1)] + [a.mean(1) for a in acts_a], 1)
    assert rep.shape == (24, 3 * 32)
    np.testing.assert_allclose(rep.numpy(), want.numpy(), atol=1e-6)


def test_interpretive_equivalence_on_converted_models(converted):
    ma, mb, tokens = converted
    ra, rb = E.representations(ma, tokens), E.representations(mb, tokens)
    sa = E.resample_implementations(ma, tokens, [("blocks.1.attn.hook_z", 0)])
    sb = E.resample_implementations(mb, tokens, [("blocks.1.attn.hook_z", 1)])
    # CKA similarities are the naive formula of the sampled implementations
    res = E.interpretive_equivalence(ra, rb, sa, sb, num_trials=3, similarity="cka")
    for t in range(3):
        ia, ib = sa(2 * t), sb(2 * t + 1)
        np.testing.assert_allclose(res.own[t], [naive_cka(ra, ia), naive_cka(rb, ib)], atol=1e-8)
        np.testing.assert_allclose(res.other[t], [naive_cka(ra, rb), naive_cka(rb, ra)], atol=1e-8)
    assert res.wins == float((res.own > res.other).sum()) and res.score == 1 - abs(res.wins / 3 - 1)
    # ridge on 24 inputs of 512 features: held-out R^2 <= 0 everywhere; the warning gives the sizes and the ways out
    with pytest.warns(
        UserWarning,
        match=r"all 6 comparisons tied.*24 inputs of up to 512 features, fit on 18 and scored on 6 held out",
    ):
        tied = E.interpretive_equivalence(ra, rb, sa, sb, num_trials=3)
    assert math.isnan(tied.score) and tied.ties == 6
    for t in range(3):  # each similarity is the default ridge similarity, on the split that holds out 6
        assert tied.own[t, 0] == pytest.approx(ridge_similarity_cv(ra, sa(2 * t), seed=t), abs=1e-12)
    # a similarity that ranks the negative R^2 too (the warning's suggestion) leaves no tie
    ranked = E.interpretive_equivalence(
        ra, rb, sa, sb, num_trials=3, similarity=lambda x, y: ridge_similarity_cv(x, y, sqrt=False)
    )
    assert ranked.ties == 0 and math.isfinite(ranked.score)
    assert ranked.other[0, 1] == pytest.approx(ridge_similarity_cv(rb, ra, sqrt=False), abs=1e-12)


def test_identical_models_compare_model_warns_and_implementations_is_a_coin_flip(converted):
    ma, _, tokens = converted
    ra = E.representations(ma, tokens)
    sa = E.resample_implementations(ma, tokens, [("blocks.1.attn.hook_z", 0)])
    with pytest.warns(
        UserWarning, match="other model was closer than an implementation.*compare='implementations'"
    ):
        lit = E.interpretive_equivalence(ra, ra.clone(), sa, sa, num_trials=5, similarity="cka")
    assert lit.wins == 0 and lit.score == 0.0  # the paper's description read literally: documented
    assert (lit.other == 1.0).all() and (lit.own < 1.0).all()
    same = E.interpretive_equivalence(
        None, None, sa, sa, num_trials=20, similarity="cka", compare="implementations"
    )
    assert 12 <= same.wins <= 28 and same.score >= 0.6, same.wins  # a coin flip over 40 comparisons


def test_minibatch_cka_takes_any_iterable_of_representations_as_cka_matrix_does():
    x, y = _related(16, 5, 4, 12)
    acc = E.MinibatchCKA(2, 1)
    acc.update((r for r in (x, 2 * x)), iter([y]))
    want = naive_cka(x, y)
    np.testing.assert_allclose(acc.compute().numpy(), [[want], [want]], atol=1e-10)
    with pytest.raises(TypeError, match="ys is a dict"):
        acc.update([x, x], {"a": y})


def test_grid_and_resampling_name_what_the_user_gave():
    g = torch.Generator().manual_seed(0)
    reps = [torch.randn(10, 3, generator=g) for _ in range(4)]
    with pytest.raises(ValueError, match=r"impls\['A'\] has 2 implementations; this test draws 3"):
        I.distinguishability_grid({"A": reps[:2], "B": reps}, measure="cka", num_trials=2, num_repeats=1)
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    hooked = pp.hooked_hf(GPT2LMHeadModel(cfg).eval())  # residual-stream hooks only: no per-head hook_z
    tokens = torch.randint(0, 20, (6, 5), generator=g)
    with pytest.raises(KeyError, match=r"site hooks \['blocks.0.attn.hook_z'\] are not hook points"):
        E.resample_implementations(hooked, tokens, [("blocks.0.attn.hook_z", 1)])


def test_equivalence_result_saves_and_loads_and_a_changed_file_is_refused(tmp_path):
    x = _data(20, 4, 3)

    def noisy(seed):
        return x + 0.1 * torch.randn(
            20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )

    res = E.interpretive_equivalence(
        None,
        None,
        noisy,
        lambda s: 2 * noisy(s + 7),
        num_trials=4,
        similarity="cka",
        compare="implementations",
    )
    res.save(tmp_path / "r.npz")
    back = E.EquivalenceResult.load(tmp_path / "r.npz")
    assert (back.score, back.wins, back.ties, back.num_trials) == (res.score, res.wins, res.ties, 4)
    np.testing.assert_array_equal(back.own, res.own)
    np.testing.assert_array_equal(back.other, res.other)
    # a score no count of wins gives (they are multiples of 1 / 8 here), and a count of ties that is not own's
    for name, change in (("score=0.123 is not", {"score": 0.123}), ("ties=9", {"ties": 9})):
        fields = {k: getattr(res, k) for k in ("score", "wins", "num_trials", "own", "other", "ties")}
        bad = E.EquivalenceResult(**{**fields, **change})
        with pytest.raises(ValueError, match=name):  # save refuses what load would refuse
            bad.save(tmp_path / "f.npz")
        _write_result(bad, tmp_path / "f.npz")  # a file written without that check
        with pytest.raises(FormatError, match=name):
            E.EquivalenceResult.load(tmp_path / "f.npz")


def test_a_model_in_training_mode_with_dropout_is_read_with_its_eval_forward():
    """A Hugging Face model built from a config is in train() mode, with dropout: its representations (and its
    implementations) are read with the eval() forward, as the converted model computes them, with a warning."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    hf = GPT2LMHeadModel(cfg)
    assert hf.training
    hooked = pp.hooked_hf(hf)
    tokens = torch.randint(0, 20, (8, 6), generator=torch.Generator().manual_seed(1))
    with pytest.warns(
        UserWarning, match="training mode and has dropout.*representations runs it in eval mode"
    ):
        got = [E.representations(hooked, tokens) for _ in range(2)]
    assert hf.training and hooked.training  # left in its mode
    hf.eval()
    want = E.representations(hooked, tokens)
    hf.train()
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)
    torch.testing.assert_close(got[1], want, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="dropout"):
        sample = E.resample_implementations(hooked, tokens, [("blocks.1.hook_attn_out", None)])
    with pytest.warns(UserWarning, match="the sampler runs it in eval mode"):
        a, b = sample(3), sample(3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert hf.training
    # and the implementation is the model with that site resampled, read in eval mode
    hf.eval()
    torch.testing.assert_close(
        a, E.resample_implementations(hooked, tokens, [("blocks.1.hook_attn_out", None)])(3)
    )


@pytest.mark.filterwarnings("ignore:.*same representation for different seeds")
def test_a_similarity_without_a_value_names_the_comparison():
    """A sampler that returns a constant representation has no CKA with the model (NaN): the error names which
    similarity of which trial, in the terms of the arguments."""
    x = _data(20, 3, 0)
    with pytest.raises(ValueError, match=r"the similarity rep_a -> sample_a\(seed\) in trial 0 is nan"):
        E.interpretive_equivalence(
            x, x + 1, lambda s: torch.ones(20, 3), lambda s: x, num_trials=2, similarity="cka"
        )
    with pytest.raises(ValueError, match=r"the similarity sample_b -> another sample_b in trial 0 is nan"):
        E.interpretive_equivalence(
            None,
            None,
            lambda s: x + s,
            lambda s: torch.ones(20, 3),
            num_trials=2,
            compare="implementations",
            similarity="cka",
        )
