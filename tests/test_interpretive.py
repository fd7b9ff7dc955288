"""The interpretive-equivalence protocol (pypattern.interpretive) on planted implementation sets, and the
experiment's pieces (pool cache, chained implementations, patching) on a tiny pool trained for a few steps."""

import math

import numpy as np
import pytest
import torch

from pypattern.interpretive import (
    accumulated_residual,
    distinguishability_grid,
    selectivity_curve,
    selectivity_curves,
    similarity,
    win_test,
)


class Planted:
    """Implementations of a planted 'algorithm': a fixed nonlinear read-out of some latent variables, each
    implementation in its own random basis with its own noise."""

    def __init__(self, z, use, seed, count=12, noise=0.1):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.tanh(z[:, use] @ torch.randn(len(use), 10, generator=g, dtype=torch.float64))
        self.impls = []
        for _ in range(count):
            q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
            self.impls.append(
                self.base @ q + noise * torch.randn(z.shape[0], 10, generator=g, dtype=torch.float64)
            )

    def __len__(self):
        return len(self.impls)

    def __getitem__(self, i):
        return self.impls[i]


@pytest.fixture(scope="module")
def planted():
    z = torch.randn(400, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {
        "A": Planted(z, [0, 1, 2], 1),
        "B": Planted(z, [3, 4, 5], 2),
        "C": Planted(z, [5, 6, 7], 3),
    }


def test_grid_separates_planted_algorithms(planted):
    for measure in ("ridge", "cka", "procrustes"):
        grid = distinguishability_grid(planted, measure=measure, num_trials=20, num_repeats=3, seed=1)
        assert grid.fraction.shape == (3, 3)
        assert (np.diag(grid.fraction) <= 0.25).all(), (
            measure,
            grid.fraction,
        )  # same algorithm: not distinguishable
        assert grid.off_diagonal().min() == 1.0, (measure, grid.fraction)
        assert (np.diag(grid.win_rate) < 0.8).all() and grid.win_rate[0, 1] == 1.0


def test_win_test_criterion_by_hand(planted):
    res = win_test(planted["A"], planted["B"], num_trials=10, num_repeats=3, seed=4)
    wins = (res.own > res.other).mean(1)
    np.testing.assert_allclose(res.p, wins)
    se = np.sqrt(wins * (1 - wins) / 10)
    np.testing.assert_array_equal(res.positive, wins - 1.96 * se > 0.5)
    # a repeat with 8 wins of 10: 0.8 - 1.96 * 0.126 = 0.552 > 0.5; with 7 of 10: 0.416 < 0.5
    from pypattern.interpretive import _criterion

    assert _criterion(np.array([0.8, 0.7, 1.0]), 10, 1.96).tolist() == [True, False, True]
    # the draws are reproducible and each ridge similarity is the library's
    again = win_test(planted["A"], planted["B"], num_trials=10, num_repeats=3, seed=4)
    np.testing.assert_array_equal(res.own, again.own)
    with pytest.raises(ValueError, match="impl_a"):
        win_test(
            Planted(torch.randn(50, 8, dtype=torch.float64), [0], 0, count=2),
            None,
            num_trials=1,
            num_repeats=1,
        )


def test_selectivity_control_and_budget(planted):
    a = planted["A"]
    g = torch.Generator().manual_seed(3)
    noise = {k: torch.randn(400, 10, generator=g, dtype=torch.float64) for k in (1, 8)}

    def patched(i, k):  # a budget k destroys a k/8 share of the representation
        return a[i] if k == 0 else (1 - k / 8) * a[i] + (k / 8) * noise[k]

    z = torch.randn(400, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    near = Planted(z, [1, 2, 3], 5)  # shares two latent variables with A: s(a -> b) is well above 0
    res = selectivity_curve(a, patched, [near], [0, 1, 8], num_trials=60, seed=0)
    assert 0.3 < res.win_rate[0] < 0.7  # control: independent splits, a coin flip
    assert res.win_rate[8] > 0.9
    assert res.num_comparisons[0] == 60
    # several measures at once: the same trials, each equal to its own call
    both = selectivity_curves(a, patched, [near], [0, 8], measures=("ridge", "cka"), num_trials=15, seed=2)
    for m in ("ridge", "cka"):
        one = selectivity_curve(a, patched, [near], [0, 8], measure=m, num_trials=15, seed=2)
        assert both[m].num_wins == one.num_wins and both[m].win_rate == one.win_rate
    with pytest.raises(ValueError, match="measures"):
        selectivity_curves(a, patched, [near], [0], measures=("cosine",))


def test_similarity_measures_are_the_library_ones():
    from pypattern.equivalence import linear_cka, procrustes
    from pypattern.ridge import ridge_similarity_cv, train_test_split

    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 4, generator=g, dtype=torch.float64)
    tr, _ = train_test_split(100, 0.9, 11)
    assert similarity("ridge", x, [y], seed=11)[0] == ridge_similarity_cv(x, y, seed=11)
    assert similarity("cka", x, [y], seed=11)[0] == pytest.approx(linear_cka(x[tr], y[tr]))
    ang = procrustes(x[tr], y[tr], angular=True)
    assert similarity("procrustes", x, [y], seed=11)[0] == pytest.approx(1 - ang / (math.pi / 2))
    with pytest.raises(ValueError, match="measure"):
        similarity("cosine", x, [y], seed=0)


def test_pool_cache_chains_and_patching(tmp_path):
    from pypattern.experiments.interpretive import ChainImplementations, InterpretiveSettings, train_pool
    from pypattern.tasks.algorithmic import ALGORITHMS, decode, encode

    s = InterpretiveSettings(
        algorithms=("sort_diff", "sort_sum"), members=(("L1d48h4", 0), ("L2d32h4", 1)), steps=3, num_workers=1
    )
    logs = []
    with pytest.warns(UserWarning, match="did not learn their routine") as rec:  # 3 steps teach nothing
        pool, info = train_pool(s, tmp_path, log=logs.append)
    assert info["trained_now"] == 6 and info["cached"] == 0
    assert len(list(tmp_path.glob("*.npz"))) == 6
    accs = {k: m["sequence_accuracy"] for k, m in info["members"].items()}
    assert info["failed_members"] == {k: v for k, v in accs.items() if v < 0.9} and info["failed_members"]
    assert all(k in str(rec[0].message) for k in info["failed_members"])
    pool2, info2 = train_pool(
        s, tmp_path, log=logs.append, min_sequence_accuracy=0.0
    )  # loads, does not retrain
    assert info2["trained_now"] == 0 and info2["cached"] == 6 and info2["failed_members"] == {}
    x = torch.randint(0, 11, (64, 10), generator=torch.Generator().manual_seed(0))
    for m1, m2 in zip(pool["sort"], pool2["sort"]):
        torch.testing.assert_close(m1(encode(x)), m2(encode(x)), rtol=0, atol=0)

    model = pool["sort"][1]
    rep, logits = accumulated_residual(model, encode(x))
    _, cache = model.run_with_cache(encode(x))
    manual = torch.cat(
        [
            cache[n].mean(1)
            for n in ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
        ],
        1,
    )
    torch.testing.assert_close(rep, manual)
    assert rep.shape == (64, 3 * 32)

    x_cf = torch.randint(0, 11, (64, 10), generator=torch.Generator().manual_seed(1))
    impl = ChainImplementations(ALGORITHMS["sort_diff"], pool, x, x_cf)
    assert len(impl) == 4 and impl.members(3) == (1, 1) and impl.members(1) == (0, 1)
    # chain 1 = sort member 0, then diff_next member 1 on its argmax output
    r0, l0 = accumulated_residual(pool["sort"][0], encode(x))
    r1, _ = accumulated_residual(pool["diff_next"][1], encode(decode(l0)))
    torch.testing.assert_close(impl[1], torch.cat([r0, r1], 1).double())
    assert impl[1].shape == (64, 2 * 48 + 3 * 32)
    torch.testing.assert_close(impl.patched(1, 0), impl[1])
    heads = impl.ranked_heads(1)
    assert len(heads) == 4 + 2 * 4 and len(set(heads)) == len(heads)
    p_all = impl.patched(1, len(heads))
    assert p_all.shape == impl[1].shape and not torch.allclose(p_all, impl[1])
    # patching every head of stage 0 with its counterfactual values = running stage 0's attention on x_cf
    one = impl.patched(1, 1)
    assert not torch.equal(one, impl[1])


def test_stage_cache_shares_identical_stages_and_patching_by_hand(tmp_path):
    from pypattern.experiments.interpretive import (
        ChainImplementations,
        InterpretiveSettings,
        StageCache,
        pool_members,
        train_pools,
    )
    from pypattern.tasks.algorithmic import ALGORITHMS, decode, encode

    s = InterpretiveSettings(
        algorithms=("sort_diff", "sort_sum"),
        members=(("L1d48h4", 0), ("L2d32h4", 1)),
        steps=3,
        num_workers=1,
        pipeline_seeds=(0, 2),
    )
    assert pool_members(s, 2) == (("L1d48h4", 2000), ("L2d32h4", 2001))
    pools, info = train_pools(s, tmp_path, log=lambda *a: None)
    assert info["trained_now"] == 3 * 4 and sorted(pools) == [0, 2]
    x = torch.randint(0, 11, (48, 10), generator=torch.Generator().manual_seed(0))
    # independently trained pools: other weights
    assert not torch.equal(pools[0]["sort"][0](encode(x)), pools[2]["sort"][0](encode(x)))

    pool = pools[0]
    x_cf = torch.randint(0, 11, (48, 10), generator=torch.Generator().manual_seed(1))
    cache = StageCache()
    a = ChainImplementations(ALGORITHMS["sort_diff"], pool, x, x_cf, cache)
    b = ChainImplementations(ALGORITHMS["sort_sum"], pool, x, x_cf, cache)
    for i in range(len(a)):
        a[i]
    n = cache.forwards["stages"]
    b[0]  # the sort stage on x is sort_diff's: only the sum_next stage runs (clean and counterfactual)
    assert cache.forwards["stages"] == n + 2
    assert b._stage(b.members(0)[:1]) is a._stage(a.members(0)[:1])

    # patching by hand: chain 3, its 2 most important heads, each hook_z replaced by the value on the
    # counterfactual stream of the same chain
    i, k = 3, 2
    heads = a.ranked_heads(i)[:k]
    key = a.members(i)
    inp, inp_cf, reps = x, x_cf, []
    for st, m in enumerate(key):
        model = pool[a.routines[st]][m]
        z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
        _, cf = model.run_with_cache(encode(inp_cf), names_filter=z_names)
        hooks = []
        for layer in range(model.cfg.n_layers):
            hs = [h for (ss, la, h) in heads if ss == st and la == layer]
            if hs:
                name = f"blocks.{layer}.attn.hook_z"

                def fn(z, hook, src=cf[name], hs=hs):
                    z = z.clone()
                    z[:, :, hs] = src[:, :, hs]
                    return z

                hooks.append((name, fn))
        rep, logits = accumulated_residual(model, encode(inp), fwd_hooks=hooks)
        reps.append(rep.double())
        with torch.no_grad():
            inp_cf = decode(model(encode(inp_cf)))
        inp = decode(logits)
    torch.testing.assert_close(a.patched(i, k), torch.cat(reps, 1), rtol=0, atol=0)


def test_demo_equivalence_quick_writes_the_grid_plot(tmp_path, capsys):
    """`pypattern demo equivalence --quick` end to end: report, plots, and numbers consistent with each other."""
    import json

    from pypattern import cli
    from pypattern.interpretive import _criterion

    assert cli.main(["demo", "equivalence", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    d = tmp_path / "equivalence"
    grid_png = d / "interpretive_grid.png"
    assert str(grid_png) in out and len(out) < 3000
    for p in (grid_png, d / "interpretive_selectivity.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    rep = json.loads((d / "interpretive.json").read_text())
    st = rep["settings"]
    k = len(st["algorithms"])
    (seed,) = rep["per_seed"]
    for m in ("ridge", "cka", "procrustes"):
        g = seed["grid"][m]
        p = np.array(g["p"])  # (k, k, repeats): win fractions, multiples of 1 / trials
        assert p.shape == (k, k, st["num_repeats"])
        np.testing.assert_allclose(p * st["num_trials"], np.round(p * st["num_trials"]), atol=1e-9)
        np.testing.assert_array_equal(np.array(g["positive"]), _criterion(p, st["num_trials"], st["z"]))
        np.testing.assert_allclose(np.array(g["fraction_positive"]), np.array(g["positive"]).mean(-1))
        np.testing.assert_allclose(np.array(g["win_rate"]), p.mean(-1))
        for own, other in zip(g["mean_own"], g["mean_other"]):
            assert all(-1 <= v <= 1 for v in own + other)
        for a in st["algorithms"]:
            for b in st["budgets"]:
                w, c = seed["selectivity_counts"][m][a][str(b)]
                assert c == st["selectivity_trials"] * (k - 1) and 0 <= w <= c
                assert seed["selectivity"][m][a][str(b)] == w / c
    assert rep["pool"]["trained_now"] == 5 * 2  # 5 routines, 2 members each (the cache: test above)


def test_similarity_and_selectivity_refuse_mismatched_or_empty_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    for measure in ("cka", "procrustes", "ridge"):
        for rows in (40, 20):
            y = torch.randn(rows, 8, generator=g, dtype=torch.float64)
            with pytest.raises(ValueError, match="samples"):
                similarity(measure, x, [y], seed=0)
    impl = [x, x + 0.1]
    with pytest.raises(ValueError, match="others is empty"):
        selectivity_curve(impl, lambda i, k: impl[i], [], [0, 1], measure="cka")
    with pytest.raises(ValueError, match="num_trials=0 is not valid"):
        selectivity_curve(impl, lambda i, k: impl[i], [impl], [0, 1], measure="cka", num_trials=0)


def test_head_ranking_of_a_chain_is_its_own_whatever_the_call_order():
    """A chain's stage input depends on every member before it: its head importances (and so its patched
    representations) are the same whether another chain sharing a later member was ranked first or not."""
    from pypattern.experiments.interpretive import ARCHS, ChainImplementations
    from pypattern.models.transformer import Transformer
    from pypattern.tasks.algorithmic import ALGORITHMS, SEQ_LEN, VOCAB, RoutineTask

    routines = ALGORITHMS["sort_diff"]
    pool = {
        r: [
            Transformer(RoutineTask(r).model_config(**ARCHS["L1d48h4"], seed=10 * j + i)).eval()
            for j in range(3)
        ]
        for i, r in enumerate(routines)
    }
    g = torch.Generator().manual_seed(1)
    x, x_cf = (torch.randint(0, VOCAB, (40, SEQ_LEN), generator=g) for _ in range(2))
    first = ChainImplementations(routines, pool, x, x_cf)
    first.ranked_heads(0)  # a chain with another stage-0 member and the same stage-1 member
    alone = ChainImplementations(routines, pool, x, x_cf)
    assert first.ranked_heads(3) == alone.ranked_heads(3)
    assert torch.equal(first.patched(3, 2), alone.patched(3, 2))
    with pytest.raises(ValueError, match="k=-1 is not valid"):
        alone.patched(3, -1)


def test_tests_refuse_non_finite_similarities_and_bad_settings():
    g = torch.Generator().manual_seed(0)
    impl = [torch.randn(30, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    const = [torch.ones(30, 6, dtype=torch.float64) for _ in range(2)]
    for measure in ("ridge", "cka"):
        with pytest.raises(ValueError, match="similarity of x to ys"):
            win_test(impl, const, measure=measure, num_trials=2, num_repeats=1)
    with pytest.raises(ValueError, match="z=-3.0 is not valid"):
        win_test(impl, impl, z=-3.0, num_trials=2, num_repeats=1)
    with pytest.raises(ValueError, match="impl_b holds no implementation"):
        win_test(impl, [], num_trials=2, num_repeats=1)
    with pytest.raises(ValueError, match="budgets=.* is not valid"):
        selectivity_curve(impl, lambda i, k: impl[i], [impl], [0, -1], measure="cka")


def test_selectivity_warns_when_every_comparison_ties():
    """Unrelated representations with more features than inputs: held-out R^2 <= 0 everywhere, every similarity 0,
    every comparison a tie (counted as a loss): a warning says the win rates carry no information."""
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(20, 30, generator=g, dtype=torch.float64) for _ in range(2)]
    other = [torch.randn(20, 30, generator=g, dtype=torch.float64)]
    noise = torch.randn(20, 30, generator=g, dtype=torch.float64)
    with pytest.warns(UserWarning, match="all 6 comparisons of measure 'ridge' tied"):
        res = selectivity_curve(
            a, lambda i, k: a[i] if k == 0 else noise, [other], [0, 1], num_trials=3, seed=0
        )
    assert res.win_rate == {0: 0.0, 1: 0.0}


def test_a_damaged_cached_pool_member_is_refused_naming_its_file(tmp_path):
    """A cached member whose weights file is truncated or pickled, or whose metadata is not JSON: a ValueError
    naming the file and saying how to train it again (nothing unpickled)."""
    import json
    import pickle

    import numpy as np

    from pypattern.experiments.interpretive import load_member
    from pypattern.models import Transformer, TransformerConfig

    model = Transformer(
        TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=11, n_ctx=8, seed=0)
    )
    path = str(tmp_path / "member")
    cfg = model.cfg.to_dict()
    np.savez(path + ".npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    (tmp_path / "member.json").write_text(json.dumps({"config": cfg}))
    got, _ = load_member(path)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), model.state_dict().values()))
    good = (tmp_path / "member.npz").read_bytes()
    for damaged in (good[:200], pickle.dumps({"a": 1})):
        (tmp_path / "member.npz").write_bytes(damaged)
        with pytest.raises(ValueError, match=r"cached pool member '.*member\.npz' cannot be read"):
            load_member(path)
    (tmp_path / "member.npz").write_bytes(good)
    (tmp_path / "member.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cached pool member '.*member\.json' cannot be read"):
        load_member(path)


def test_accumulated_residual_takes_a_numpy_integer_position():
    from pypattern.models import Transformer
    from pypattern.tasks.topics import TopicTask

    task = TopicTask(num_topics=2, tokens_per_topic=8, seq_len=16)
    model = Transformer(task.model_config(n_layers=2, d_model=32, n_heads=2, d_mlp=64, seed=0))
    tokens = task.sample(3, seed=0).tokens
    want, _ = accumulated_residual(model, tokens, positions=-1)
    for pos in (np.int64(-1), np.int32(15)):
        got, _ = accumulated_residual(model, tokens, positions=pos)
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match="positions=np.True_ is not valid"):
        accumulated_residual(model, tokens, positions=np.True_)
