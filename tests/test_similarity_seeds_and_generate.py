"""Seeds of the ridge similarity and of the win-counting protocol: NumPy integers read as the ints they hold, and
seeds the draws cannot take refused naming the argument, against the same call with a Python int."""

import math

import numpy as np
import pytest
import torch

from pypattern import equivalence as E
from pypattern import interpretive as I


def _reps(seed: int, n: int = 30):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, 3, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, 3, generator=g, dtype=torch.float64
    )
    return x, y


def _naive_ridge_r2(x, y, tr, te, alphas=(0.1, 1.0, 10.0)):
    """Held-out R^2 (mean over y's columns) of ridge with an intercept, the penalty chosen by leave-one-out on the
    fit rows, each LOO fit refitted from scratch."""
    x, y = x.numpy(), y.numpy()
    xt, yt = x[tr], y[tr]
    best = None
    for a in alphas:
        errs = []
        for i in range(len(tr)):
            m = np.ones(len(tr), bool)
            m[i] = False
            mx, my = xt[m].mean(0), yt[m].mean(0)
            w = np.linalg.solve(
                (xt[m] - mx).T @ (xt[m] - mx) + a * np.eye(x.shape[1]), (xt[m] - mx).T @ (yt[m] - my)
            )
            errs.append(((yt[i] - ((xt[i] - mx) @ w + my)) ** 2).mean())
        if best is None or np.mean(errs) < best[0]:
            best = (np.mean(errs), a)
    mx, my = xt.mean(0), yt.mean(0)
    w = np.linalg.solve((xt - mx).T @ (xt - mx) + best[1] * np.eye(x.shape[1]), (xt - mx).T @ (yt - my))
    pred = (x[te] - mx) @ w + my
    sse = ((y[te] - pred) ** 2).sum(0)
    sst = ((y[te] - y[te].mean(0)) ** 2).sum(0)
    return float((1 - sse / sst).mean())


@pytest.mark.parametrize("seed", [np.int64(3), np.int32(7), np.uint64(2**63 + 5)])
def test_ridge_similarity_cv_reads_a_numpy_integer_seed_as_its_int(seed):
    x, y = _reps(0)
    got = E.ridge_similarity_cv(x, y, seed=seed, sqrt=False)
    assert got == E.ridge_similarity_cv(x, y, seed=int(seed), sqrt=False)
    # the split of that seed, and the naive fit on it
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(int(seed))).numpy()
    k = 30 - 6  # 90% of 30 holds out 3: at least 6 held out
    assert math.isclose(got, _naive_ridge_r2(x, y, perm[:k], perm[k:]), rel_tol=1e-9, abs_tol=1e-12)
    assert I.similarity("ridge", x, [y], seed=seed) == I.similarity("ridge", x, [y], seed=int(seed))
    assert I.similarity("cka", x, [y], seed=seed) == I.similarity("cka", x, [y], seed=int(seed))


def _sets():
    a = [_reps(s)[0] for s in range(4)]
    b = [_reps(10 + s)[1] for s in range(4)]
    return a, b


def test_win_test_seed_keys_the_draws_and_bad_seeds_are_named():
    a, b = _sets()
    kw = dict(measure="cka", num_trials=3, num_repeats=2)
    one = I.win_test(a, b, seed=5, **kw)
    np.testing.assert_array_equal(one.own, I.win_test(a, b, seed=np.int64(5), **kw).own)
    # the draws are those of numpy's generator of that seed: the first trial's a, a' and b, and the similarity
    rng = np.random.default_rng(5)
    ia, ia2 = (int(i) for i in rng.choice(4, size=2, replace=False))
    ib = int(rng.integers(4))
    split = int(rng.integers(2**31))
    assert one.own[0, 0] == I.similarity("cka", a[ia], [a[ia2]], seed=split)[0]
    assert one.other[0, 0] == I.similarity("cka", a[ia], [b[ib]], seed=split)[0]
    for bad in (None, -1, 1.5, True, "0"):
        with pytest.raises((TypeError, ValueError), match="seed"):
            I.win_test(a, b, seed=bad, **kw)


def test_grid_and_selectivity_refuse_seeds_they_cannot_key_by_name():
    a, b = _sets()
    for bad in (None, -1, 1.5, True):
        with pytest.raises((TypeError, ValueError), match="seed"):
            I.distinguishability_grid({"a": a, "b": b}, measure="cka", num_trials=2, num_repeats=1, seed=bad)
        with pytest.raises((TypeError, ValueError), match="seed"):
            I.selectivity_curve(a, lambda i, k: a[i], [b], [0, 1], measure="cka", num_trials=2, seed=bad)
    # a NumPy integer is its int: the same curve
    one = I.selectivity_curve(a, lambda i, k: a[i] + k, [b], [0, 1], measure="cka", num_trials=3, seed=4)
    two = I.selectivity_curve(
        a, lambda i, k: a[i] + k, [b], [0, 1], measure="cka", num_trials=3, seed=np.int64(4)
    )
    assert one.num_wins == two.num_wins


def test_a_resampling_sampler_reads_a_numpy_integer_seed_and_names_a_bad_one():
    import pypattern as pp

    task = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=8)
    model = pp.Transformer(task.model_config(n_layers=2, d_model=16, n_heads=2, d_mlp=32, seed=0))
    tokens = task.sample(6, seed=0).tokens
    site = "blocks.0.attn.hook_z"
    sample = E.resample_implementations(model, tokens, [(site, 1)])
    rep = sample(np.int64(3))
    assert torch.equal(rep, sample(3))
    # independently: each input's head 1 output is that of one other input (the one the seed drew), the rest its own
    _, cache = model.run_with_cache(tokens, names_filter=site)
    z = cache[site]
    for i in range(tokens.shape[0]):
        matches = []
        for j in range(tokens.shape[0]):

            def patch(x, hook, i=i, j=j):
                x = x.clone()
                x[i, :, 1] = z[j, :, 1]
                return x

            with model.hooks([(site, patch)]):
                if torch.allclose(E.representations(model, tokens)[i], rep[i], atol=1e-6):
                    matches.append(j)
        assert matches and i not in matches
    for bad in (None, True, 1.5, 2**70):
        with pytest.raises((TypeError, ValueError), match="seed"):
            sample(bad)


def _naive_regularised_pwcca(x: np.ndarray, y: np.ndarray, ridge: float) -> float:
    """PWCCA of Morcos et al. with each scatter matrix ``S + ridge * mean_eig(S) * I``: canonical directions from
    the SVD of ``Wx Sxy Wy`` (``W = (S + lam I)^-1/2``), the unit-norm variates ``h_i = Xc Wx u_i`` of the
    ``min(rank x, rank y)`` correlations, weights ``alpha_i = sum_j |<h_i, x_j>|`` over x's centred columns."""
    xc, yc = x - x.mean(0), y - y.mean(0)

    def inv_sqrt(s):
        lam = ridge * np.trace(s) / s.shape[0]
        e, v = np.linalg.eigh(s)
        return (v / np.sqrt(e + lam)) @ v.T

    wx, wy = inv_sqrt(xc.T @ xc), inv_sqrt(yc.T @ yc)
    u, rho, _ = np.linalg.svd(wx @ xc.T @ yc @ wy)
    k = min(np.linalg.matrix_rank(xc), np.linalg.matrix_rank(yc))
    h = xc @ wx @ u[:, :k]
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ xc).sum(1)
    return float((alpha * rho[:k]).sum() / alpha.sum())


@pytest.mark.parametrize(
    "n,p,q,ridge", [(12, 30, 7, 0.1), (9, 20, 25, 1.0), (25, 6, 40, 10.0), (15, 15, 15, 1e-3)]
)
def test_regularised_pwcca_with_more_features_than_samples_is_the_whitening_formula(n, p, q, ridge):
    rng = np.random.default_rng(n * 100 + p)
    x = rng.standard_normal((n, p)) * rng.uniform(0.1, 3.0, p)
    y = x[:, : min(p, q)] @ rng.standard_normal((min(p, q), q)) + rng.standard_normal((n, q))
    assert math.isclose(E.pwcca(x, y, ridge=ridge), _naive_regularised_pwcca(x, y, ridge), rel_tol=1e-7)
    # invariant to a rotation of y (not of x: the weights are L1 sums over x's own neurons), an isotropic scale
    # and a translation of either side
    rot = np.linalg.qr(rng.standard_normal((q, q)))[0]
    got = E.pwcca(3.0 * x + 5.0, 0.5 * y @ rot - 2.0, ridge=ridge)
    assert math.isclose(got, E.pwcca(x, y, ridge=ridge), rel_tol=1e-7)


class _FixedLogits(torch.nn.Module):
    """A float64 causal LM whose next-token logits are ``logits`` at every position (a stand-in for a model whose
    two best continuations differ by less than float32's spacing)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.logits = logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*tokens.shape, -1) + self.bias


def test_generate_decodes_a_float64_model_in_float64():
    import pypattern as pp

    logits = torch.tensor([0.0, 1.0, 1.0 + 1e-12, -3.0], dtype=torch.float64)
    model = _FixedLogits(logits)
    out = pp.generate(model, torch.tensor([[0, 3]]), 3, greedy=True)
    assert out[0, 2:].tolist() == [int(logits.argmax())] * 3  # token 2, not its float32 tie with token 1
    # sampling draws from the float64 softmax: token 3's probability (about 0.007) is not rounded, and the draws
    # follow the distribution (chi-square against softmax(logits) over 4000 draws)
    draws = pp.generate(model, torch.zeros(4000, 1, dtype=torch.long), 1, seed=1)[:, 1]
    counts = torch.bincount(draws, minlength=4).double()
    expected = 4000 * torch.softmax(logits, 0)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001


@pytest.mark.parametrize("stage", [1, 2])
def test_a_flag_training_step_on_a_converted_float64_llama_is_the_naive_loss_step(stage):
    """One step of train_flags on a converted Llama (grouped-query attention) in float64 against AdamW on the
    loss written out: next-token cross entropy plus aux_weight times the mean squared error of the flags the model
    writes (before any overwrite) to the code of each position's concept; in stage 2 the flags at positions >=
    switch_pos - 1 are overwritten with the target concept's code before the model reads them."""
    import copy

    transformers = pytest.importorskip("transformers")
    import pypattern as pp
    from pypattern.tasks.base import generator

    torch.manual_seed(0)
    task = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=16)
    cfg = transformers.LlamaConfig(
        vocab_size=task.model_config().d_vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    model = pp.from_hf(transformers.LlamaForCausalLM(cfg).eval()).double()
    ref = copy.deepcopy(model)
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)
    pp.train_flags(
        model, task, spec, stage1_steps=int(stage == 1), stage2_steps=int(stage == 2), aux_weight=0.7,
        switch_prob=1.0, batch_size=8, lr=1e-2, seed=4, log_every=0, quiet=True,
    )  # fmt: skip
    # the batch of the first step: drawn from the run's generator of seed 4
    batch = task.sample(
        8, seed=int(torch.randint(0, 2**62, (), generator=generator(4))), switch_prob=float(stage == 2)
    )
    dims = list(spec.dims)
    written = {}

    def hook(x, hook):
        written["x"] = x
        if stage == 1:
            return x
        x = x.clone()
        after = torch.arange(x.shape[1])[None] >= batch.extra["switch_pos"][:, None] - 1
        code = spec.code(x.dtype)[batch.extra["target_concept"]]
        code = code if code.dim() == 3 else code[:, None].expand(-1, x.shape[1], -1)
        x[..., dims] = torch.where(after[..., None], code, x[..., dims])
        return x

    ref.train()
    with ref.hooks([(spec.hook, hook)]):
        logits = ref(batch.tokens)
    logp = torch.log_softmax(logits, -1)
    t = batch.targets
    real = t >= 0
    lm = -(logp.gather(-1, t.clamp_min(0)[..., None])[..., 0] * real).sum() / real.sum()
    lab = batch.extra["concept_pos"]
    known = lab >= 0
    flag = ((written["x"][..., dims] - spec.code(torch.float64)[lab.clamp_min(0)]) ** 2)[known].mean()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    (lm + 0.7 * flag).backward()
    opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12, msg=name)
