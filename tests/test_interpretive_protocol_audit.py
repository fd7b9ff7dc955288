"""The win-counting test of pypattern.interpretive step by step against independent computations: which
implementations are drawn under a seed, which pairs are compared in which direction, how wins and ties count, the
one-sided criterion; known answers by construction (exact reparameterisations of converted Hugging Face models
are not distinguishable under CKA and Procrustes, a model computing another function is); a set against itself;
invariances; right padding on converted models; bad inputs refused by name."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
from pypattern.interpretive import (  # noqa: E402
    accumulated_residual,
    distinguishability_grid,
    selectivity_curve,
    similarity,
    win_test,
)
from pypattern.ridge import ridge_similarity_cv, train_test_split  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, T, D = 40, 10, 16


def _procrustes_naive(x, y):
    """1 - arccos(||X^T Y||_*) / (pi / 2) on centred, unit-Frobenius X, Y (numpy, float64)."""
    x = np.asarray(x, float) - np.asarray(x, float).mean(0)
    y = np.asarray(y, float) - np.asarray(y, float).mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    nuc = np.linalg.svd(x.T @ y, compute_uv=False).sum()
    return 1 - math.acos(min(nuc, 1.0)) / (math.pi / 2)


def _cka_naive(x, y):
    """Debiased linear CKA from the unbiased HSIC estimator (Song et al.), written out with Gram matrices."""

    def hsic(k, l):  # noqa: E741
        n = k.shape[0]
        k, l = k.copy(), l.copy()  # noqa: E741
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        one = np.ones(n)
        return (
            np.trace(k @ l)
            + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 * one @ k @ l @ one / (n - 2)
        ) / (n * (n - 3))

    x, y = np.asarray(x, float), np.asarray(y, float)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def _naive(measure, x, y, split):
    if measure == "ridge":
        return ridge_similarity_cv(
            x, y, seed=split
        )  # one target per call (not the shared-decomposition list)
    tr, _ = train_test_split(x.shape[0], 0.9, split)
    xs, ys = x[tr].numpy(), y[tr].numpy()
    return _cka_naive(xs, ys) if measure == "cka" else _procrustes_naive(xs, ys)


def _planted(seed, n=60, count=5, latent=(0, 1, 2), noise=0.3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = torch.tanh(z[:, list(latent)] @ torch.randn(len(latent), 5, generator=g, dtype=torch.float64))
    return [base + noise * torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(count)]


@pytest.mark.parametrize("measure", ["ridge", "cka", "procrustes"])
def test_win_test_draws_pairs_and_counts_as_a_replay_by_hand(measure):
    """Each trial draws a != a' from A and b from B (the control: b a third member of A) with the seed's generator,
    compares s(a -> a') with s(a -> b) on one split, counts strict wins; the criterion is p - z se > 0.5."""
    a, b = _planted(1), _planted(2, count=4, latent=(1, 2, 3))
    nt, nr, seed = 4, 2, 7
    for impl_b in (b, None):
        res = win_test(a, impl_b, measure=measure, num_trials=nt, num_repeats=nr, seed=seed)
        rng = np.random.default_rng(seed)
        own, other = np.empty((nr, nt)), np.empty((nr, nt))
        for r in range(nr):
            for t in range(nt):
                if impl_b is None:
                    i, i2, j = rng.choice(len(a), 3, replace=False)
                    target = a[j]
                    assert len({int(i), int(i2), int(j)}) == 3
                else:
                    i, i2 = rng.choice(len(a), 2, replace=False)
                    target = b[int(rng.integers(len(b)))]
                assert i != i2
                split = int(rng.integers(2**31))
                own[r, t] = _naive(measure, a[i], a[i2], split)
                other[r, t] = _naive(measure, a[i], target, split)
        np.testing.assert_allclose(res.own, own, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res.other, other, rtol=1e-9, atol=1e-12)
        p = np.array([sum(own[r, t] > other[r, t] for t in range(nt)) / nt for r in range(nr)])
        np.testing.assert_array_equal(res.p, p)
        positive = [pr - 1.96 * math.sqrt(pr * (1 - pr) / nt) > 0.5 for pr in p]
        np.testing.assert_array_equal(res.positive, positive)
        assert res.fraction_positive == np.mean(positive)


def test_same_set_twice_and_identical_by_chance_ties_never_win():
    """win_test(A, A): b may be a' (identical: a tie, not a win) or a itself (closer than any a'): neither wins;
    every other trial is a comparison between distinct members. A set of identical copies ties everywhere (warned)."""
    a = _planted(3, count=4)
    res = win_test(a, a, measure="cka", num_trials=20, num_repeats=3, seed=5)
    rng = np.random.default_rng(5)
    for r in range(3):
        for t in range(20):
            i, i2 = (int(v) for v in rng.choice(4, 2, replace=False))
            j = int(rng.integers(4))
            rng.integers(2**31)
            if j == i2:  # identical by construction: a tie, counted as a loss
                assert res.own[r, t] == res.other[r, t]
            elif j == i:  # a itself: the closest there is
                assert res.other[r, t] == pytest.approx(1.0) and not res.own[r, t] > res.other[r, t]
    ctrl = win_test(a, None, measure="cka", num_trials=20, num_repeats=3, seed=5)
    assert not (ctrl.own == ctrl.other).any()  # distinct members: no tie by construction
    same = [a[0].clone() for _ in range(3)]
    with pytest.warns(UserWarning, match="all 6 comparisons tied"):
        tied = win_test(same, same, measure="procrustes", num_trials=3, num_repeats=2, seed=0)
    assert (tied.p == 0).all() and tied.fraction_positive == 0.0


def test_seed_determinism_and_the_grid_entries_are_their_own_win_tests():
    a, b = _planted(1), _planted(2, latent=(3, 4, 5))
    r1 = win_test(a, b, measure="cka", num_trials=5, num_repeats=2, seed=3)
    r2 = win_test(a, b, measure="cka", num_trials=5, num_repeats=2, seed=3)
    r3 = win_test(a, b, measure="cka", num_trials=5, num_repeats=2, seed=4)
    np.testing.assert_array_equal(r1.own, r2.own)
    np.testing.assert_array_equal(r1.other, r2.other)
    assert not np.array_equal(r1.own, r3.own)
    grid = distinguishability_grid({"A": a, "B": b}, measure="cka", num_trials=5, num_repeats=2, seed=3)
    for (i, x), (j, y) in ((p, q) for p in enumerate("AB") for q in enumerate("AB")):
        one = win_test(
            {"A": a, "B": b}[x],
            None if i == j else {"A": a, "B": b}[y],
            measure="cka",
            num_trials=5,
            num_repeats=2,
            seed=3 * 1_000_003 + 2 * i + j,
        )
        np.testing.assert_array_equal(grid.tests[(x, y)].own, one.own)
        assert grid.fraction[i, j] == one.fraction_positive
    # different algorithms: every trial a win, p = 1, so every repeat positive (even with one trial: se = 0)
    assert grid.fraction[0, 1] == 1.0 and grid.fraction[1, 0] == 1.0
    assert win_test(a, b, measure="cka", num_trials=1, num_repeats=3, seed=0).fraction_positive == 1.0


def test_invariances_of_the_statistic():
    """CKA and Procrustes: unchanged by one orthogonal change of basis and scale of every representation; ridge:
    unchanged by one permutation of the feature columns (its penalty and its uniform mean over columns are)."""
    a, b = _planted(1), _planted(2, latent=(1, 2, 4))
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(2))
    for measure, f in (
        ("cka", lambda x: 3.0 * x @ q),
        ("procrustes", lambda x: 0.5 * x @ q),
        ("ridge", lambda x: x[:, perm]),
    ):
        base = win_test(a, b, measure=measure, num_trials=6, num_repeats=2, seed=1)
        moved = win_test(
            [f(x) for x in a], [f(x) for x in b], measure=measure, num_trials=6, num_repeats=2, seed=1
        )
        np.testing.assert_allclose(moved.own, base.own, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(moved.other, base.other, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(moved.p, base.p)


# ----- converted Hugging Face models --------------------------------------------------------------------------
def _llama(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=T,
    )
    return transformers.LlamaForCausalLM(cfg).eval().double()


def _gpt2(seed, vocab=V):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=T,
        n_embd=D,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval().double()


def _rotated_llama(hf, q):
    """The same function with its residual stream rotated by q (the RMSNorm weights are 1 at initialisation, and
    the RMS of a vector does not change under rotation): every residual stream is x q."""
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(hf.model.embed_tokens.weight @ q)
        for layer in hf.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(lin.weight @ q)  # reads x q
            for lin in (at.o_proj, mlp.down_proj):
                lin.weight.copy_(q.T @ lin.weight)  # writes (its output) q
        hf.lm_head.weight.copy_(hf.lm_head.weight @ q)
    return hf


def _permuted_gpt2(hf, head_perm, neuron_perm):
    """The same function with its heads and MLP neurons permuted (GPT-2's Conv1D weights are (in, out))."""
    hf = copy.deepcopy(hf)
    dh = D // 4
    cols = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in head_perm])
    with torch.no_grad():
        for blk in hf.transformer.h:
            w, bias = blk.attn.c_attn.weight, blk.attn.c_attn.bias
            idx = torch.cat([cols + k * D for k in range(3)])
            w.copy_(w[:, idx])
            bias.copy_(bias[idx])
            blk.attn.c_proj.weight.copy_(blk.attn.c_proj.weight[cols])
            blk.mlp.c_fc.weight.copy_(blk.mlp.c_fc.weight[:, neuron_perm])
            blk.mlp.c_fc.bias.copy_(blk.mlp.c_fc.bias[neuron_perm])
            blk.mlp.c_proj.weight.copy_(blk.mlp.c_proj.weight[neuron_perm])
    return hf


class Resampled:
    """Implementations of a model: implementation i resamples layer i % 2's attention output from other inputs
    (a permutation drawn from seed 100 + i), read with accumulated_residual."""

    def __init__(self, model, tokens, count=6):
        self.model, self.tokens, self.count, self.cache = model, tokens, count, {}

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if i not in self.cache:
            perm = torch.randperm(self.tokens.shape[0], generator=torch.Generator().manual_seed(100 + i))
            name = f"blocks.{i % 2}.hook_attn_out"
            _, cf = self.model.run_with_cache(self.tokens[perm], names_filter=[name])
            self.cache[i] = accumulated_residual(
                self.model, self.tokens, fwd_hooks=[(name, lambda x, hook, src=cf[name]: src)]
            )[0]
        return self.cache[i]


def test_reparameterised_converted_models_are_not_distinguishable_and_another_function_is():
    tokens = torch.randint(0, V, (120, T), generator=torch.Generator().manual_seed(1))
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    llama = _llama(0)
    gpt2 = _gpt2(0)
    g = torch.Generator().manual_seed(5)
    cases = {
        "rotated residual": (llama, _rotated_llama(llama, q), _llama(3), torch.block_diag(q, q, q)),
        "permuted heads and neurons": (
            gpt2,
            _permuted_gpt2(gpt2, torch.randperm(4, generator=g), torch.randperm(4 * D, generator=g)),
            _gpt2(3),
            torch.eye(3 * D, dtype=torch.float64),
        ),
    }
    for name, (hf, twin, stranger, basis) in cases.items():
        a, b, c = (Resampled(pp.from_hf(m), tokens) for m in (hf, twin, stranger))
        # precondition: the twin computes the same function, its representations those of the model in its basis
        for i in range(len(a)):
            torch.testing.assert_close(b[i], a[i] @ basis, rtol=1e-7, atol=1e-7)
        assert not torch.allclose(a[0], a[1])  # the resampling acted
        for measure in ("cka", "procrustes"):
            twin_res = win_test(a, b, measure=measure, num_trials=20, num_repeats=2, seed=0)
            back = win_test(b, a, measure=measure, num_trials=20, num_repeats=2, seed=0)
            far = win_test(a, c, measure=measure, num_trials=20, num_repeats=2, seed=0)
            assert twin_res.fraction_positive == 0.0 and back.fraction_positive == 0.0, (name, measure)
            assert far.fraction_positive == 1.0, (name, measure, far.p)
            # against the twin each comparison is that of a with another member of its own set
            for r in range(2):
                assert (twin_res.other[r] <= 1 + 1e-9).all()
            assert twin_res.win_rate < 0.75
    # ridge's uniform mean of R^2 over the target's columns changes when the target is rotated: the documented
    # reason a rotated copy can read as distinguishable under "ridge" (CKA and Procrustes do not change)
    a, b = Resampled(pp.from_hf(llama), tokens), Resampled(pp.from_hf(_rotated_llama(llama, q)), tokens)
    for measure in ("cka", "procrustes", "ridge"):
        s = similarity(measure, a[0], [a[1], b[1]], seed=3)
        naive = [_naive(measure, a[0], y, 3) for y in (a[1], b[1])]
        np.testing.assert_allclose(s, naive, rtol=1e-7)
        if measure == "ridge":
            assert abs(s[0] - s[1]) > 1e-3
        else:
            assert s[0] == pytest.approx(s[1], rel=1e-7)


def _hf_pooled(hf, ids, last_only=False):
    """Embedding + every decoder layer's output of the unconverted model on one unpadded input, read with
    output_hidden_states (entry 0) and forward hooks on the layers (the last hidden state is after the final norm),
    averaged over the positions (or the last position)."""
    layers = list(hf.transformer.h) if hasattr(hf, "transformer") else list(hf.model.layers)
    got = {}
    hs = [
        layer.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            emb = hf(ids[None], output_hidden_states=True).hidden_states[0]
    finally:
        for h in hs:
            h.remove()
    streams = [emb] + [got[i] for i in range(len(layers))]
    return torch.cat([(x[0, -1] if last_only else x[0].mean(0)) for x in streams])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_right_padded_batches_on_converted_models_pool_each_input_alone(arch):
    hf = _gpt2(1) if arch == "gpt2" else _llama(1)
    tf = pp.from_hf(hf)
    g = torch.Generator().manual_seed(2)
    lengths = [10, 4, 7, 1]
    tokens = torch.randint(0, V, (4, T), generator=g)
    mask = torch.zeros(4, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    padded = torch.where(mask.bool(), tokens, torch.zeros_like(tokens))
    mean, _ = accumulated_residual(tf, {"input_ids": padded, "attention_mask": mask})
    last, _ = accumulated_residual(tf, padded, attention_mask=mask, positions=-1)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(mean[i], _hf_pooled(hf, tokens[i, :n]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            last[i], _hf_pooled(hf, tokens[i, :n], last_only=True), rtol=1e-9, atol=1e-9
        )
    # left padding (the real tokens at the end, position ids from the first of them): the same pooled stream
    left = torch.flip(mask, [1])
    left_ids = torch.zeros_like(tokens)
    for i, n in enumerate(lengths):
        left_ids[i, T - n :] = tokens[i, :n]
    pos = (left.cumsum(1) - 1).clamp(min=0)
    mean_left, _ = accumulated_residual(
        tf, {"input_ids": left_ids, "attention_mask": left, "position_ids": pos}
    )
    torch.testing.assert_close(mean_left, mean, rtol=1e-9, atol=1e-9)


def test_bad_inputs_are_refused_naming_the_argument():
    a = _planted(1)
    short = [x[:40] for x in _planted(2)]
    with pytest.raises(ValueError, match=r"impl_b\[\d\] has 40 inputs \(rows\) but impl_a\[\d\] has 60"):
        win_test(a, short, measure="cka", num_trials=2, num_repeats=1)
    with pytest.raises(ValueError, match=r"impl_a\[\d\] has 0 inputs"):
        win_test([x[:0] for x in a], None, measure="ridge", num_trials=1, num_repeats=1)
    with pytest.raises(ValueError, match=r"impls\['B'\]\[\d\] has 40 inputs"):
        distinguishability_grid({"A": a, "B": a[:2] + short}, measure="cka", num_trials=3, num_repeats=1)
    with pytest.raises(ValueError, match=r"others\[0\]\[\d\] has 40 inputs"):
        selectivity_curve(a, lambda i, k: a[i], [short], [0], measure="cka", num_trials=1)
    for call in (
        lambda: win_test(a, a, measure="cosine"),
        lambda: distinguishability_grid({"A": a}, measure="cosine"),
        lambda: similarity("cosine", a[0], [a[1]], seed=0),
    ):
        with pytest.raises(ValueError, match="measure must be one of") as err:
            call()
        assert "grid's" not in str(err.value)  # the grid's own argument, not one of its entries
    for kw in ({"num_trials": 0}, {"num_repeats": 0}):
        with pytest.raises(ValueError, match="num_trials and num_repeats must be >= 1"):
            win_test(a, a, **kw)
    with pytest.raises(ValueError, match="seed=-1 is not valid"):
        win_test(a, a, seed=-1)
    # a model of a smaller vocabulary is not given the other model's inputs: tokens refused by name
    small = pp.from_hf(_gpt2(0, vocab=20))
    tokens = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(0))
    tokens[0, 0] = V - 1
    with pytest.raises(ValueError, match="tokens"):
        accumulated_residual(small, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="train_frac"):
            win_test(a, a, num_trials=1, num_repeats=1, train_frac=0.5)


# ----- the experiments' settings and reports --------------------------------------------------------------------
def test_negative_pipeline_seeds_are_refused_before_the_pool_is_trained(tmp_path, monkeypatch):
    """A pipeline seed keys the grid's draws, which take seeds >= 0: refused by the settings check, not after
    the pool is trained."""
    from pypattern.experiments import interpretive

    monkeypatch.setattr(interpretive, "train_pools", lambda *a, **k: pytest.fail("the pool was trained"))
    s = interpretive.quick_interpretive_settings()
    s.pipeline_seeds = (0, -1)
    with pytest.raises(
        ValueError, match=r"pipeline_seeds=\(0, -1\) is not valid; give one or more ints >= 0"
    ):
        interpretive.run_interpretive(tmp_path, s, log=None)
    with pytest.raises(
        ValueError, match="seed=-1 is not valid"
    ):  # what the run would have met after training
        distinguishability_grid({"A": _planted(1), "B": _planted(2)}, measure="cka", num_trials=1, seed=-1)
    with pytest.raises(SystemExit):
        interpretive.main([str(tmp_path), "--seeds", "0,-1"])


def _fake_report(path, settings, seed, measure, value):
    k = len(settings["algorithms"])
    grid = np.full((k, k), value)
    np.fill_diagonal(grid, 0.0)
    rep = {
        "settings": settings,
        "per_seed": [
            {
                "pipeline_seed": seed,
                "grid": {measure: {"fraction_positive": grid.tolist()}},
                "selectivity": {
                    measure: {a: {str(b): value for b in settings["budgets"]} for a in settings["algorithms"]}
                },
            }
        ],
        "seconds": 1.0,
    }
    path.write_text(__import__("json").dumps(rep))
    return path


def test_merge_reports_refuses_reports_of_other_settings_and_averages_the_rest(tmp_path):
    import dataclasses

    from pypattern.experiments.interpretive import merge_reports, quick_interpretive_settings

    base = dataclasses.asdict(quick_interpretive_settings())
    p0 = _fake_report(tmp_path / "a.json", dict(base, pipeline_seeds=[0]), 0, "cka", 0.5)
    p1 = _fake_report(tmp_path / "b.json", dict(base, pipeline_seeds=[1], num_workers=2), 1, "cka", 1.0)
    merged = merge_reports([p0, p1], tmp_path / "m")
    k = len(base["algorithms"])
    off = k * (k - 1)
    assert merged["settings"]["pipeline_seeds"] == [0, 1]
    assert merged["summary"]["cka"]["off_diagonal_mean"] == pytest.approx((0.5 * off + 1.0 * off) / (2 * off))
    assert merged["summary"]["cka"]["diagonal_mean"] == 0.0
    assert merged["summary"]["cka"]["selectivity"]["0"] == pytest.approx(0.75)
    other = _fake_report(tmp_path / "c.json", dict(base, pipeline_seeds=[1], num_trials=99), 1, "cka", 1.0)
    with pytest.raises(ValueError, match=r"c\.json.* other settings .*num_trials: 99 vs 6"):
        merge_reports([p0, other], tmp_path / "m2")


def test_cka_demo_settings_are_checked_before_any_model_is_trained(tmp_path, monkeypatch):
    import dataclasses

    from pypattern.experiments import equivalence_demo

    monkeypatch.setattr(equivalence_demo, "train", lambda *a, **k: pytest.fail("a model was trained"))
    quick = equivalence_demo.EquivalenceDemoSettings.quick()
    for field, value in (
        ("seeds", (0,)),  # no pair to compare
        ("seeds", (0, -1)),
        ("seeds", (1, 1)),
        ("num_permutations", 0),
        ("num_inputs", 0),
        ("steps", 0),
        ("lr", float("nan")),
    ):
        with pytest.raises(ValueError, match=f"{field}="):
            equivalence_demo.run_equivalence_demo(tmp_path, dataclasses.replace(quick, **{field: value}))
    with pytest.raises(ValueError, match="num_inputs=1 gives 3 tokens predictable by induction"):
        equivalence_demo.run_equivalence_demo(tmp_path, dataclasses.replace(quick, num_inputs=1))
    assert equivalence_demo.check_settings(equivalence_demo.EquivalenceDemoSettings()) is not None
