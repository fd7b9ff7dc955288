"""Edge graph and exact edge patching against an independent per-edge-hook implementation on the plain model."""

from __future__ import annotations

import pytest
import torch
from _circuits_reference import naive_patch, prompts, tiny

from pypattern.circuits import EdgeGraph, edges, patch_edges
from pypattern.patching import KL, LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ graph


def test_edge_count_110_and_structure():
    model = tiny()
    g = edges(model)
    assert len(g) == 110
    L, H = 2, 4
    # independent count: sources before each destination
    n = 0
    for layer in range(L):
        before = 1 + layer * (H + 1)
        n += 3 * H * before + (before + H)
    n += 1 + L * (H + 1)
    assert n == 110
    names = {e.name for e in g}
    assert "L0H1->MLP0" in names and "L0H1->L1H2.k" in names and "MLP1->logits" in names
    assert "L0H1->L0H2.q" not in names and "MLP0->L0H1.v" not in names and "L1H0->L1H1.k" not in names
    assert "MLP1->MLP1" not in names
    # every edge goes from an earlier node to a later one
    for s, d in zip(g.src_idx.tolist(), g.dst_idx.tolist()):
        assert g.src_stage[s] < g.dst_stage[d]
    assert g.index("embed->logits") == g.index(g[g.index("embed->logits")])


def test_edge_counts_other_shapes():
    assert len(edges(tiny(attn_only=True))) == 3 * 4 * 1 + 3 * 4 * 5 + 9  # 12 + 60 + 9 = 81
    g = EdgeGraph(3, 2, has_mlp=True)
    want = sum(3 * 2 * (1 + lay * 3) + (1 + lay * 3 + 2) for lay in range(3)) + (1 + 3 * 3)
    assert len(g) == want
    # parallel attention + MLP: the MLP of layer l does not read layer l's heads
    gp = EdgeGraph(2, 4, has_mlp=True, parallel=True)
    names = {e.name for e in gp}
    assert "L0H1->MLP0" not in names and "L0H1->MLP1" in names and "MLP0->MLP1" in names
    assert len(gp) == 110 - 2 * 4
    gpp = edges(tiny(), per_position=True, seq_len=5)
    assert len(gpp) == 550 and gpp[0].pos == 0


def test_graph_lookup_errors():
    g = edges(tiny())
    with pytest.raises(KeyError, match="not in the graph"):
        g.index("L0H0->L0H1.q")
    with pytest.raises(ValueError, match="110 entries"):
        g.mask(torch.ones(5, dtype=torch.bool))
    assert bool(g.mask(torch.ones(len(g), dtype=torch.complex64)).all())  # 0/1 in any dtype spells a mask
    # the message shows a name of each kind of input; under grouped-query attention a query head's key or value
    # input is named for its key/value head
    with pytest.raises(
        KeyError, match=r"'embed->L0H0\.q', 'embed->L0H0\.k', 'embed->L0H0\.v', 'embed->MLP0'"
    ):
        g.index("nonsense")
    gq = EdgeGraph(2, 4, n_kv_heads=2, has_mlp=True, n_pos=3)
    with pytest.raises(KeyError, match=r"head 3's is L0H1->L1KV1\.v@2"):
        gq.index("L0H1->L1H3.v@2")
    assert gq.index("L0H1->L1KV1.v@2") >= 0
    with pytest.raises(KeyError) as e:  # a head the graph does not have: no name suggested
        gq.index("L0H1->L1H7.k@0")
    assert "L{layer}KV{group}" in str(e.value) and "head 7's" not in str(e.value)


# ------------------------------------------------------------------------------------------ exact patching


def _random_sets(g, n, seed, p=0.3):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, len(g), generator=gen) < p


@pytest.mark.parametrize("mode", ["noise", "denoise"])
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_patch_every_single_edge_matches_naive(mode, ablation):
    model = tiny()
    clean, corr, ans, wrong = prompts(model)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    masks = torch.cat(
        [torch.eye(len(g), dtype=torch.bool), _random_sets(g, 6, 3), torch.ones(1, len(g), dtype=torch.bool)]
    )
    ours = patch_edges(model, masks, clean, corr, metric=metric, mode=mode, ablation=ablation, max_batch=37)
    ref = torch.stack(
        [
            naive_patch(model, [g[i] for i in m.nonzero().flatten()], clean, corr, metric, mode, ablation)
            for m in masks
        ]
    )
    assert ours.shape == (len(masks), clean.shape[0])
    assert (ours - ref).abs().max() <= 1e-9
    # the patches changed something (every edge type reaches the metric in this model)
    base = naive_patch(model, [], clean, corr, metric, mode, ablation)
    changed = (ref - base).abs().amax(1) > 1e-6
    assert changed.float().mean() > 0.9


def test_patch_edge_types_and_empty_set():
    model = tiny(seed=2)
    clean, corr, ans, wrong = prompts(model, seed=4)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    kinds = [
        "embed->L0H1.q",
        "embed->L0H2.k",
        "embed->L0H3.v",
        "embed->MLP0",
        "embed->logits",
        "L0H1->L1H2.q",
        "L0H0->L1H3.k",
        "L0H2->L1H0.v",
        "L0H3->MLP0",
        "L0H1->MLP1",
        "MLP0->L1H1.k",
        "MLP0->MLP1",
        "MLP0->logits",
        "L1H2->MLP1",
        "L1H1->logits",
        "MLP1->logits",
    ]
    sets = [[k] for k in kinds] + [kinds, []]
    ours = patch_edges(model, sets, clean, corr, metric=metric, graph=g)
    for s, o in zip(sets, ours):
        ref = naive_patch(model, [g[g.index(k)] for k in s], clean, corr, metric, "noise", "resample")
        assert (o - ref).abs().max() <= 1e-9
    # single set form, and the empty set is the clean run
    one = patch_edges(model, ["MLP0->MLP1"], clean, corr, metric=metric)
    assert one.shape == (clean.shape[0],) and torch.allclose(one, ours[kinds.index("MLP0->MLP1")], atol=1e-12)
    with torch.no_grad():
        m_clean = metric(model(clean)[:, -1])
    assert (ours[-1] - m_clean).abs().max() <= 1e-9


def test_all_edges_noised_is_corrupted_run():
    model = tiny(seed=3)
    clean, corr, ans, wrong = prompts(model, seed=5)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    full = patch_edges(model, torch.ones(len(g), dtype=torch.bool), clean, corr, metric=metric)
    den = patch_edges(model, torch.ones(len(g), dtype=torch.bool), clean, corr, metric=metric, mode="denoise")
    with torch.no_grad():
        m_corr = metric(model(corr)[:, -1])
        m_clean = metric(model(clean)[:, -1])
    assert (full - m_corr).abs().max() <= 1e-9  # every edge carries the corrupted value
    assert (den - m_clean).abs().max() <= 1e-9  # every edge restored from the clean run


@pytest.mark.parametrize("attn_only,norm", [(True, "LN"), (False, None)])
def test_patch_other_architectures(attn_only, norm):
    model = tiny(attn_only=attn_only, norm=norm, layers=3, heads=2, seed=5)
    clean, corr, ans, wrong = prompts(model, seed=6)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    masks = torch.cat([torch.eye(len(g), dtype=torch.bool), _random_sets(g, 4, 7)])
    for mode in ("noise", "denoise"):
        ours = patch_edges(model, masks, clean, corr, metric=metric, mode=mode)
        ref = torch.stack(
            [
                naive_patch(
                    model, [g[i] for i in m.nonzero().flatten()], clean, corr, metric, mode, "resample"
                )
                for m in masks
            ]
        )
        assert (ours - ref).abs().max() <= 1e-9


def test_per_example_metric_positions_and_kl():
    model = tiny(seed=6)
    clean, corr, ans, wrong = prompts(model, seed=7)
    B = clean.shape[0]
    pos = torch.tensor([5, 3, 4, 5, 2])[:B]
    g = edges(model)
    masks = torch.cat([torch.eye(len(g), dtype=torch.bool)[::3], _random_sets(g, 4, 9)])
    for metric in (LogitDiff(ans, wrong, position=pos), KL(position=4)):
        ours = patch_edges(model, masks, clean, corr, metric=metric)
        if isinstance(metric, KL):
            with torch.no_grad():
                metric.bind(model(clean)[:, 4])
        ref = torch.stack(
            [
                naive_patch(
                    model, [g[i] for i in m.nonzero().flatten()], clean, corr, metric, "noise", "resample"
                )
                for m in masks
            ]
        )
        assert (ours - ref).abs().max() <= 1e-9


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_per_position_edges_match_naive(mode):
    model = tiny(seed=7, n_ctx=5)
    clean, corr, ans, wrong = prompts(model, seed=8)
    metric = LogitDiff(ans, wrong)
    g = edges(model, per_position=True, seq_len=5)
    gen = torch.Generator().manual_seed(0)
    singles = torch.zeros(40, len(g), dtype=torch.bool)
    singles[torch.arange(40), torch.randperm(len(g), generator=gen)[:40]] = True
    masks = torch.cat([singles, _random_sets(g, 5, 11, p=0.2)])
    ours = patch_edges(model, masks, clean, corr, metric=metric, mode=mode, ablation="mean")
    ref = torch.stack(
        [
            naive_patch(model, [g[i] for i in m.nonzero().flatten()], clean, corr, metric, mode, "mean")
            for m in masks
        ]
    )
    assert (ours - ref).abs().max() <= 1e-9
    # names with positions select a per-position graph
    i = int(singles[0].nonzero())
    one = patch_edges(model, [str(g[i])], clean, corr, metric=metric, mode=mode, ablation="mean")
    assert "@" in str(g[i]) and (one - ours[0]).abs().max() <= 1e-12


def test_patch_errors():
    model = tiny()
    clean, corr, ans, wrong = prompts(model)
    metric = LogitDiff(ans, wrong)
    with pytest.raises(ValueError, match="mode="):
        patch_edges(model, [], clean, corr, metric=metric, mode="sideways")
    with pytest.raises(ValueError, match="ablation="):
        patch_edges(model, [], clean, corr, metric=metric, ablation="blur")
    with pytest.raises(ValueError, match="needs corrupted prompts"):
        patch_edges(model, [], clean, None, metric=metric)
    with pytest.raises(ValueError, match="clean shape"):
        patch_edges(model, [], clean, corr[:, :3], metric=metric)
    with pytest.raises(TypeError, match="pypattern's Transformer"):
        patch_edges(torch.nn.Linear(2, 2), [], clean, corr, metric=metric)


def test_causal_reuse_recomputes_only_from_the_first_patched_layer():
    from pypattern.circuits.engine import prepare_runs

    model = tiny(layers=3, seed=8)
    clean, corr, ans, wrong = prompts(model, seed=9)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    engine, _ = prepare_runs(model, g, clean, corr, metric)
    calls = []
    view = engine.view
    for name in ("qkv", "qkv_shared", "qkv_grouped", "mlp"):
        orig = getattr(view, name)

        def wrapped(layer, *a, _orig=orig, _name=name, **k):
            calls.append((_name, layer, k.get("heads")))
            return _orig(layer, *a, **k)

        setattr(view, name, wrapped)
    late = torch.tensor([e.dst in ("logits", "MLP2") or e.dst.startswith("L2") for e in g])
    engine.run(late[None])
    assert calls and all(layer == 2 for _, layer, _ in calls)
    calls.clear()
    engine.run(g.mask(["MLP0->L2H1.k"])[None])  # one head recomputed at its layer, then MLP2 and the logits
    assert calls == [("qkv_grouped", 2, [1]), ("mlp", 2, None)]
    calls.clear()
    engine.run(g.mask(["L1H0->logits"])[None])  # only the unembedding
    assert calls == []
    calls.clear()
    ref = naive_patch(model, [g[g.index("MLP0->L2H1.k")]], clean, corr, metric, "noise", "resample")
    assert (engine.run(g.mask(["MLP0->L2H1.k"])[None])[0] - ref).abs().max() <= 1e-9


def test_hooks_on_the_model_and_prompts_past_the_context_are_refused():
    """The circuits compute from the weights and never run the model's hooks: a model with hooks attached is
    refused naming them (a hook that changed later positions passed the logits self-check and was ignored);
    prompts longer than the learned positions get the model's own error."""
    from pypattern.circuits import edge_attribution

    model = tiny()
    clean, corr, ans, wrong = prompts(model)
    met = LogitDiff(ans, wrong)
    base = patch_edges(model, [], clean, corr, metric=met)
    remove = model.blocks[1].hook_resid_pre.add_hook(lambda x, hook: x)
    with pytest.raises(ValueError, match=r"hooks attached at \['blocks.1.hook_resid_pre \(hook point\)'\]"):
        patch_edges(model, [], clean, corr, metric=met)
    remove()
    h = model.blocks[0].mlp.register_forward_hook(lambda m, i, o: o)
    with pytest.raises(ValueError, match=r"hooks attached at \['blocks.0.mlp \(torch forward hook\)'\]"):
        edge_attribution(model, clean, corr, metric=met, method="eap")
    h.remove()
    torch.testing.assert_close(patch_edges(model, [], clean, corr, metric=met), base, rtol=0, atol=0)
    long = torch.randint(0, 12, (2, 8))
    for call in (
        lambda: patch_edges(model, [], long, long, metric=LogitDiff(ans[:2], wrong[:2])),
        lambda: edge_attribution(model, long, long, metric=LogitDiff(ans[:2], wrong[:2])),
    ):
        with pytest.raises(ValueError, match=r"8 positions; the model's n_ctx \(learned positions\) is 6"):
            call()


def test_edge_selections_and_acdc_thresholds_are_checked():
    from pypattern.circuits import acdc

    model = tiny()
    clean, corr, ans, wrong = prompts(model)
    met = LogitDiff(ans, wrong)
    g = edges(model)
    with pytest.raises(
        ValueError, match=r"must be boolean \(or hold only 0 and 1\); got torch.float32 values such as 0.4"
    ):
        g.mask(torch.full((len(g),), 0.4))
    with pytest.raises(ValueError, match=r"values other than 0 and 1 \(to select edges by index"):
        g.mask(torch.arange(len(g)))
    with pytest.raises(TypeError, match=r"edges contains 3 \(int\); give Edge objects or names"):
        patch_edges(model, [3], clean, corr, metric=met)
    assert torch.equal(g.mask(g[5].name), g.mask([g[5]]))  # one name is one edge
    assert torch.equal(g.mask(torch.ones(len(g))), torch.ones(len(g), dtype=torch.bool))
    for bad in (float("nan"), "0.1", True, float("inf")):
        with pytest.raises(ValueError, match=r"threshold=.* is not valid; give a finite number"):
            acdc(model, clean, corr, metric=met, threshold=bad)
    with pytest.warns(RuntimeWarning, match="faithfulness is undefined"):
        c = acdc(model, clean, clean, metric=met, threshold=0.1)
    assert c.faithfulness != c.faithfulness  # NaN


def test_generators_stack_unsafe_metrics_mismatched_graphs_and_settings():
    """Edges given as a generator are read whole (its first edge was lost); EAP in the default noising mode checks
    the metric on stacked logits as the other paths do; a graph of a model with other MLPs is refused; batch,
    memory, step, position and count settings are checked by name."""
    from pypattern.circuits import edge_attribution, faithfulness, pruning_curve

    model = tiny(seed=3)
    clean, corr, ans, wrong = prompts(model, seed=4)
    metric = LogitDiff(ans, wrong)
    chosen = [e for e in edges(model) if e.dst == "logits"]
    want = patch_edges(model, chosen, clean, corr, metric=metric)
    torch.testing.assert_close(patch_edges(model, (e for e in chosen), clean, corr, metric=metric), want)
    assert faithfulness(model, iter(chosen), clean, corr, metric=metric) == faithfulness(
        model, chosen, clean, corr, metric=metric
    )

    def first_axis(lg):  # right on (batch, vocab), wrong on a stack (runs, batch, vocab)
        return lg[:, 1] - lg[:, 2]

    for method in ("eap", "eap-ig"):
        with pytest.raises(ValueError, match="on a stack of runs"):
            edge_attribution(model, clean, corr, metric=first_axis, method=method)
    with pytest.raises(ValueError, match="has_mlp"):
        patch_edges(model, [], clean, corr, metric=metric, graph=edges(tiny(attn_only=True, seed=3)))
    for kw, match in (
        (dict(max_batch=0), "max_batch=0"),
        (dict(max_batch=2.5), "max_batch=2.5"),
        (dict(memory_budget=float("nan")), "memory_budget=nan"),
        (dict(per_position="no"), "per_position='no'"),
        (dict(method="eap-ig", steps=True), "steps=True"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            edge_attribution(model, clean, corr, metric=metric, **kw)
    sc = edge_attribution(model, clean, corr, metric=metric)
    with pytest.raises(ValueError, match="fractions must lie in"):
        pruning_curve(model, sc, clean, corr, metric=metric, fractions=[float("nan")])
    with pytest.raises(ValueError, match="counts must be ints"):
        pruning_curve(model, sc, clean, corr, metric=metric, counts=[2.7])


def test_a_batch_of_sets_whose_first_set_is_empty_reads_per_position_names():
    from pypattern.circuits import faithfulness

    cfg_model = tiny()
    clean, corr, ans, wrong = prompts(cfg_model, seed=3)
    metric = LogitDiff(ans, wrong)
    T = clean.shape[1]
    named = [f"embed->logits@{T - 1}", f"L1H0->logits@{T - 1}"]
    got = patch_edges(cfg_model, [[], named], clean, corr, metric=metric)
    want = patch_edges(cfg_model, [named, []], clean, corr, metric=metric)
    torch.testing.assert_close(got, want.flip(0), rtol=0, atol=0)
    f = faithfulness(cfg_model, [[], named], clean, corr, metric=metric)
    assert f.shape == (2,)
