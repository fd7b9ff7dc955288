"""The circuits module on every architecture the Transformer represents (RMSNorm, rotary positions, grouped- and
multi-query attention, gated MLPs, parallel attention + MLP, missing biases, tied embeddings, sliding windows):
exact edge patching and EAP against the independent per-edge-hook reference, and a model converted from a
Hugging Face Llama end to end."""

from __future__ import annotations

import os

import pytest
import torch
from _circuits_reference import (
    ARCHS,
    _sources,
    at_pos,
    naive_first_order,
    naive_patch,
    naive_run,
    prompts,
    tiny,
)

from pypattern.circuits import ModelView, edge_attribution, edges, faithfulness, patch_edges
from pypattern.circuits.engine import prepare_runs
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch, seed=0, **kw):
    return tiny(seed=seed, **{**ARCHS[arch], **kw})


def _expected_count(L, H, Hk, has_mlp=True, parallel=False):
    """Edges counted from the definition: every source written before a destination input reads."""
    n = 0
    for layer in range(L):
        before = 1 + layer * (H + (1 if has_mlp else 0))  # embedding, earlier heads and MLPs
        n += (H + 2 * Hk) * before  # each head's query input, each key/value head's key and value input
        if has_mlp:
            n += before + (0 if parallel else H)  # the MLP reads its own layer's heads only when sequential
    return n + 1 + L * (H + (1 if has_mlp else 0))


def _random_sets(n_edges, n, seed, p=0.3):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, n_edges, generator=gen) < p


def _reference(model, g, masks, clean, corr, metric, mode="noise", ablation="resample"):
    """``naive_patch`` of each mask's edges, ``(len(masks), batch)``, in one hooked forward of the base prompts
    repeated once per mask: every edge of any mask is rewired with coefficient 1 in the rows of the masks holding
    it and 0 (the input left as it is) in the others; every row of the model's forward is computed on its own."""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    n, B = masks.shape[0], clean.shape[0]
    base_tokens, src = _sources(model, clean, corr, mode, ablation)
    used = masks.any(0).nonzero().flatten()
    coef = masks[:, used].to(src["embed"].dtype).repeat_interleave(B, 0)  # (n * batch, edges used)
    src = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in src.items()}
    with torch.no_grad():
        logits = naive_run(model, [g[i] for i in used.tolist()], base_tokens.repeat(n, 1), src, coef=coef)
    return torch.stack([metric(at_pos(part, metric.position)) for part in logits.split(B)])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_view_forward_and_edge_count(arch):
    model = _model(arch, seed=1)
    view = ModelView(model)  # its self-check compares its forward with the model's
    tokens = prompts(model)[0]
    with torch.no_grad():
        ref = model(tokens)
        for per_head in (False, True):
            assert (view.forward(tokens, per_head=per_head) - ref).abs().max() <= 1e-12
    cfg = model.cfg
    g = edges(model)
    H, Hk = cfg.n_heads, cfg.n_key_value_heads
    assert len(g) == _expected_count(cfg.n_layers, H, Hk, parallel=cfg.parallel_attn_mlp)
    names = {e.name for e in g}
    if Hk < H:  # one key and one value input per key/value head, shared by its query heads
        assert "L0H1->L1KV0.k" in names and f"MLP0->L1KV{Hk - 1}.v" in names and "embed->L0H3.q" in names
        assert "embed->L0H3.k" not in names and f"embed->L0KV{Hk}.k" not in names
        assert sum(e.dst_input == "L1KV0.k" for e in g) == 1 + H + 1
    if cfg.parallel_attn_mlp:
        assert "L0H1->MLP0" not in names and "L0H1->MLP1" in names and "MLP0->MLP1" in names


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_patching_matches_reference(arch):
    model = _model(arch, seed=2)
    clean, corr, ans, wrong = prompts(model, seed=3)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    E = len(g)
    masks = torch.cat(
        [
            torch.eye(E, dtype=torch.bool),  # every single edge: every edge type
            _random_sets(E, 6, 4),
            _random_sets(E, 3, 5, p=0.03),
            torch.ones(1, E, dtype=torch.bool),
            torch.zeros(1, E, dtype=torch.bool),
        ]
    )
    ours = patch_edges(model, masks, clean, corr, metric=metric, max_batch=29)
    ref = _reference(model, g, masks, clean, corr, metric)
    assert (ours - ref).abs().max() <= 1e-9
    with torch.no_grad():  # full set = the corrupted run, empty set = the clean run
        assert (ours[-2] - metric(model(corr)[:, -1])).abs().max() <= 1e-9
        assert (ours[-1] - metric(model(clean)[:, -1])).abs().max() <= 1e-9
    changed = (ref[:E] - ref[-1]).abs().amax(1) > 1e-7  # nearly every single edge reaches the metric
    assert changed.float().mean() > 0.85
    # denoising with mean ablation on a subset (single edges of every kind and random sets)
    sub = torch.cat([masks[:E:5], masks[E:]])
    for mode, ablation in (("denoise", "resample"), ("noise", "mean"), ("noise", "zero")):
        ours = patch_edges(model, sub, clean, corr, metric=metric, mode=mode, ablation=ablation)
        ref = _reference(model, g, sub, clean, corr, metric, mode, ablation)
        assert (ours - ref).abs().max() <= 1e-9, (mode, ablation)


def _view_and_patching_equal_references(model):
    """The view's forward equals the model's, and exact edge patching of single edges and random sets equals the
    per-edge-hook reference; returns ``(clean, corr, metric, graph)``."""
    clean, corr, ans, wrong = prompts(model, seed=3)
    with torch.no_grad():
        for per_head in (False, True):
            assert (ModelView(model).forward(clean, per_head=per_head) - model(clean)).abs().max() <= 1e-12
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    E = len(g)
    masks = torch.cat([torch.eye(E, dtype=torch.bool)[::3], _random_sets(E, 4, 4)])
    ours = patch_edges(model, masks, clean, corr, metric=metric)
    assert (ours - _reference(model, g, masks, clean, corr, metric)).abs().max() <= 1e-9
    return clean, corr, metric, g


def test_edges_with_float32_query_key_products():
    """GPT-Neo multiplies queries and keys in float32 in a float64 model (``attn_scores_dtype``): the view's
    forward, exact edge patching and EAP equal the model and the per-edge-hook references."""
    model = _model("neo", seed=2, attn_scores_dtype=torch.float32, attn_softmax_dtype=torch.float64)
    clean, corr, metric, g = _view_and_patching_equal_references(model)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    assert (
        sc.values - naive_first_order(model, g, clean, corr, metric, "noise", "resample")
    ).abs().max() <= 1e-9


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_exact_patching_takes_the_models_softmax(arch):
    """A model taking its attention softmax in another dtype (``attn_softmax_dtype``; bfloat16 here, far from
    float64): the view's forward and exact edge patching equal the model and the per-edge-hook reference."""
    _view_and_patching_equal_references(_model(arch, seed=2, attn_softmax_dtype=torch.bfloat16))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_eap_matches_autograd_through_edge_hooks(arch):
    model = _model(arch, seed=5)
    clean, corr, ans, wrong = prompts(model, seed=6)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    ref = naive_first_order(model, g, clean, corr, metric, "noise", "resample")
    assert (sc.values - ref).abs().max() <= 1e-9
    assert ref.abs().max() > 1e-3
    ig = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=2, mode="denoise")
    ref = naive_first_order(model, g, clean, corr, metric, "denoise", "resample", alphas=(0.5, 1.0))
    assert (ig.values - ref).abs().max() <= 1e-9


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_per_position_edges_and_per_example_positions(arch):
    model = _model(arch, seed=7, n_ctx=5)
    clean, corr, ans, wrong = prompts(model, seed=8)
    g = edges(model, per_position=True, seq_len=5)
    gen = torch.Generator().manual_seed(0)
    singles = torch.zeros(30, len(g), dtype=torch.bool)
    singles[torch.arange(30), torch.randperm(len(g), generator=gen)[:30]] = True
    masks = torch.cat([singles, _random_sets(len(g), 3, 9, p=0.2)])
    metric = LogitDiff(ans, wrong)
    ours = patch_edges(model, masks, clean, corr, metric=metric, ablation="mean")
    assert (ours - _reference(model, g, masks, clean, corr, metric, "noise", "mean")).abs().max() <= 1e-9
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap", per_position=True)
    assert (
        sc.values - naive_first_order(model, g, clean, corr, metric, "noise", "resample")
    ).abs().max() <= 1e-9
    metric = LogitDiff(ans, wrong, position=torch.tensor([4, 2, 3, 4, 1]))
    gf = edges(model)
    masks = torch.cat([torch.eye(len(gf), dtype=torch.bool)[::4], _random_sets(len(gf), 3, 10)])
    ours = patch_edges(model, masks, clean, corr, metric=metric)
    assert (ours - _reference(model, gf, masks, clean, corr, metric)).abs().max() <= 1e-9


def test_shared_key_value_edge_recomputes_its_group_only():
    from pypattern.circuits.engine import prepare_runs

    model = _model("llama", seed=9, layers=3)  # 4 query heads, 2 key/value heads: groups {0, 1}, {2, 3}
    clean, corr, ans, wrong = prompts(model, seed=10)
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
    for edge, heads in (("MLP0->L2KV1.k", [2, 3]), ("L0H1->L2KV0.v", [0, 1]), ("embed->L2H2.q", [2])):
        calls.clear()
        val = engine.run(g.mask([edge])[None])[0]
        assert calls == [("qkv_grouped", 2, heads), ("mlp", 2, None)]
        ref = naive_patch(model, [g[g.index(edge)]], clean, corr, metric, "noise", "resample")
        assert (val - ref).abs().max() <= 1e-9


def test_parallel_mlp_edge_skips_the_attention():
    from pypattern.circuits.engine import prepare_runs

    model = _model("neox", seed=11, layers=3)
    clean, corr, ans, wrong = prompts(model, seed=12)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    engine, _ = prepare_runs(model, g, clean, corr, metric)
    calls = []
    view = engine.view
    for name in ("qkv", "qkv_shared", "mlp"):
        orig = getattr(view, name)

        def wrapped(layer, *a, _orig=orig, _name=name, **k):
            calls.append((_name, layer))
            return _orig(layer, *a, **k)

        setattr(view, name, wrapped)
    val = engine.run(g.mask(["L0H2->MLP1"])[None])[0]
    assert calls == [("mlp", 1), ("qkv_shared", 2), ("mlp", 2)]  # layer 1's heads are the base run's
    ref = naive_patch(model, [g[g.index("L0H2->MLP1")]], clean, corr, metric, "noise", "resample")
    assert (val - ref).abs().max() <= 1e-9


def _hf_llama(**kw):
    transformers = pytest.importorskip("transformers")
    from pypattern.models import from_hf

    cfg = transformers.LlamaConfig(
        vocab_size=14,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **kw,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # norm weights other than one
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return hf, from_hf(hf, dtype=torch.float64)


def test_converted_hf_llama_end_to_end():
    hf, model = _hf_llama()
    clean, corr, ans, wrong = prompts(model, seed=13)
    clean, corr = clean[:, :6], corr[:, :6]
    with torch.no_grad():  # the conversion is exact
        assert (hf(clean).logits - model(clean)).abs().max() <= 1e-5
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    assert len(g) == _expected_count(2, 4, 2)
    masks = torch.cat([torch.eye(len(g), dtype=torch.bool), _random_sets(len(g), 5, 14)])
    ours = patch_edges(model, masks, clean, corr, metric=metric)
    ref = _reference(model, g, masks, clean, corr, metric)
    assert (ours - ref).abs().max() <= 1e-9
    # the converted model computes its RMSNorms in float32 (as Hugging Face does), so their derivatives carry float32
    # rounding: EAP agrees to float32 precision; with the norms computing in float64 it agrees to 1e-9
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    ref = naive_first_order(model, g, clean, corr, metric, "noise", "resample")
    assert model.blocks[0].ln1.compute_dtype == torch.float32
    assert (sc.values - ref).abs().max() <= 1e-5 * ref.abs().max()
    norms = [m for n, m in model.named_modules() if n.endswith(("ln1", "ln2", "ln_final"))]
    for m in norms:
        m.compute_dtype = None
    sc64 = edge_attribution(model, clean, corr, metric=metric, method="eap")
    ref = naive_first_order(model, g, clean, corr, metric, "noise", "resample")
    assert (sc64.values - ref).abs().max() <= 1e-9
    for m in norms:
        m.compute_dtype = torch.float32
    top = sc.circuit(fraction=0.2)
    f = faithfulness(model, top.edges, clean, corr, metric=metric)
    inside = set(top.edges)
    m_c = naive_patch(
        model, [e for e in g if e not in inside], clean, corr, metric, "noise", "resample"
    ).mean()
    m_full = naive_patch(model, [], clean, corr, metric, "noise", "resample").mean()
    m_empty = naive_patch(model, list(g), clean, corr, metric, "noise", "resample").mean()
    assert f == pytest.approx(float((m_c - m_empty) / (m_full - m_empty)), abs=1e-9)


def test_converted_hf_llama_with_eager_attention():
    """Eager attention takes its softmax in float32 in a float64 model; the converted model, activation patching
    and edge patching take it there too, so each equals its reference to float64 rounding."""
    from pypattern.patching import activation_patching

    hf, model = _hf_llama(attn_implementation="eager")
    assert model.cfg.attn_softmax_dtype == torch.float32
    clean, corr, ans, wrong = prompts(model, seed=13)
    clean, corr = clean[:, :6], corr[:, :6]
    with torch.no_grad():
        ref = hf(clean).logits
        assert (model(clean) - ref).abs().max() <= 1e-10 * ref.abs().max()
    metric = LogitDiff(ans, wrong)
    for site in ("q", "k", "pattern", "resid_pre"):
        exact = activation_patching(model, site, clean, corr, metric=metric, method="exact")
        naive = activation_patching(model, site, clean, corr, metric=metric, method="naive")
        assert (exact.values - naive.values).abs().max() <= 1e-10
    g = edges(model)
    masks = torch.cat([torch.eye(len(g), dtype=torch.bool)[::4], _random_sets(len(g), 3, 14)])
    ours = patch_edges(model, masks, clean, corr, metric=metric)
    assert (ours - _reference(model, g, masks, clean, corr, metric)).abs().max() <= 1e-10


def test_grouped_query_results_save_load_and_draw(tmp_path):
    from pypattern.circuits import EdgeGraph, EdgeScores

    model = _model("llama", seed=15)
    clean, corr, ans, wrong = prompts(model, seed=16)
    sc = edge_attribution(model, clean, corr, metric=LogitDiff(ans, wrong))
    assert "n_kv_heads=2" in repr(sc.graph)
    sc.save(tmp_path / "s.npz")
    back = EdgeScores.load(tmp_path / "s.npz")
    assert back.graph.n_kv_heads == 2 and [e.name for e in back.graph] == [e.name for e in sc.graph]
    c = sc.circuit(fraction=0.5)
    assert any(e.dst.startswith("L1KV") for e in c.edges)
    c.draw(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        EdgeGraph(2, 4, n_kv_heads=3)


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_acdc_and_pruning_curve(arch):
    from test_circuits_eval import _acdc_reference, assert_same_as_reference

    from pypattern.circuits import acdc, pruning_curve

    model = _model(arch, seed=17)
    clean, corr, ans, wrong = prompts(model, seed=18)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    full = float(patch_edges(model, [], clean, corr, metric=metric).mean())
    empty = float(patch_edges(model, list(g), clean, corr, metric=metric).mean())
    thr = 0.02 * abs(full - empty)
    circ = acdc(model, clean, corr, metric=metric, threshold=thr)
    assert_same_as_reference(circ, _acdc_reference(model, clean, corr, metric, thr))
    assert 0 < len(circ) < len(g)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    curve = pruning_curve(model, sc, clean, corr, metric=metric, counts=[0, 5, len(g)])
    f = curve.faithfulness["eap"]
    assert float(f[0]) == pytest.approx(0.0, abs=1e-9) and float(f[-1]) == pytest.approx(1.0, abs=1e-9)
    inside = set(sc.circuit(n=5).edges)
    m_c = naive_patch(model, [e for e in g if e not in inside], clean, corr, metric, "noise", "resample")
    assert float(f[1]) == pytest.approx(float((m_c.mean() - empty) / (full - empty)), abs=1e-9)


def test_cli_on_a_hugging_face_llama_directory(tmp_path):
    import numpy as np

    from pypattern.circuits.cli import run_circuit_demo

    hf, model = _hf_llama()
    d = tmp_path / "llama"
    hf.save_pretrained(d, safe_serialization=True)
    clean, corr, ans, wrong = prompts(model, seed=19)
    tok = tmp_path / "prompts.npz"
    np.savez(tok, clean=clean.numpy(), corrupted=corr.numpy(), answer=ans.numpy(), wrong=wrong.numpy())
    res = run_circuit_demo(
        str(tmp_path / "out"), model_dir=str(d), tokens=str(tok), methods=("exact", "eap"), fraction=0.13
    )
    for key in ("edge_scores", "circuit_table", "pruning_curve", "circuit_drawing"):
        assert os.path.getsize(res[key]) > 100
    metric = LogitDiff(ans, wrong)
    for method in ("exact", "eap"):
        sc = edge_attribution(model, clean, corr, metric=metric, method=method)
        want = faithfulness(model, sc.circuit(fraction=0.13).mask, clean, corr, metric=metric)
        # at the fraction asked for, not at the nearest point of the pruning grid
        assert res["faithfulness_at_fraction"][method] == pytest.approx(want, abs=1e-9)
    assert res["circuit_faithfulness"] == pytest.approx(want, abs=1e-9)
    assert res["circuit_edges"] == round(0.13 * len(edges(model)))


def test_cli_with_plain_token_files(tmp_path):
    """``pypattern circuit --model DIR --data FILE [--corrupted FILE]``, as ``patch`` and ``llc`` take them: the
    metric is the log-probability of the model's own top prediction; mean ablation without corrupted prompts,
    resample ablation with them. The circuit and its faithfulness equal the API's on the same choices."""
    import numpy as np

    from pypattern.circuits.cli import main, run_circuit_demo
    from pypattern.patching import LogProb

    hf, model = _hf_llama()
    d = tmp_path / "llama"
    hf.save_pretrained(d, safe_serialization=True)
    clean, corr, _, _ = prompts(model, seed=21)
    np.save(tmp_path / "clean.npy", clean.numpy())
    (tmp_path / "corr.txt").write_text("\n".join(" ".join(map(str, r)) for r in corr.tolist()))
    with torch.no_grad():
        metric = LogProb(model(clean)[:, -1].argmax(-1))
    for corrupted, ablation in ((None, "mean"), (corr, "resample")):
        out = tmp_path / f"out_{ablation}"
        res = run_circuit_demo(
            str(out),
            model_dir=str(d),
            tokens=str(tmp_path / "clean.npy"),
            corrupted=None if corrupted is None else str(tmp_path / "corr.txt"),
            methods=("eap",),
            fraction=0.2,
        )
        assert res["ablation"] == ablation
        sc = edge_attribution(model, clean, corrupted, metric=metric, method="eap", ablation=ablation)
        got = sc.circuit(fraction=0.2)
        want = faithfulness(model, got.mask, clean, corrupted, metric=metric, ablation=ablation)
        assert res["circuit_faithfulness"] == pytest.approx(want, abs=1e-9)
        assert res["top_edges"] == [str(r) for r in got.to_pandas()["name"][:8]]
        assert res["circuit_edges"] == round(0.2 * len(edges(model)))
    argv = ["--model", str(d), "--data", str(tmp_path / "clean.npy"), "--out", str(tmp_path / "cli")]
    assert main([*argv, "--methods", "eap", "--corrupted", str(tmp_path / "corr.txt")]) == 0
    assert os.path.getsize(tmp_path / "cli" / "circuit.png") > 100
    bad = tmp_path / "short.npy"
    np.save(bad, clean[:, :-1].numpy())
    with pytest.raises(ValueError, match="must match"):
        main([*argv, "--corrupted", str(bad)])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_summed_runs_vjp_equals_per_head_vjp(arch, monkeypatch):
    """The head inputs' cotangents summed over runs before the per-head matmuls (EAP-IG's path with several runs
    in a pass) equal the per-run, per-head ones summed afterwards, in one run (EAP) and in several."""
    from pypattern.circuits import engine

    model = _model(arch, seed=7)
    clean, corr, ans, wrong = prompts(model, seed=8)
    metric = LogitDiff(ans, wrong)
    for method, steps in (("eap", 1), ("eap-ig", 3)):
        got = {}
        for mode in (False, True):
            monkeypatch.setattr(engine, "_VJP_RUNS", mode)
            got[mode] = edge_attribution(model, clean, corr, metric=metric, method=method, steps=steps).values
        assert (got[True] - got[False]).abs().max() <= 1e-12 * max(1.0, float(got[False].abs().max()))
        assert got[False].abs().max() > 1e-3


def test_sandwich_norms_are_refused_by_name():
    """Gemma 2 / 3's norm after the attention mixes every head's write before the residual stream: head-level
    edges are not defined there, and the circuits module says so instead of computing something else."""
    model = _model("gemma", use_normalization_before_and_after=True)
    with pytest.raises(NotImplementedError, match="use_normalization_before_and_after"):
        ModelView(model)
    clean, corr, ans, wrong = prompts(model)
    with pytest.raises(NotImplementedError, match="use_normalization_before_and_after"):
        edge_attribution(model, clean, corr, metric=LogitDiff(ans, wrong), method="eap")


def test_query_key_norm_across_heads_is_refused_by_name():
    """OLMo 2's one query norm over every head's projection: a head's query depends on the other heads' inputs,
    so head-level edges are not defined."""
    model = _model("qwen3", qk_norm="all")
    with pytest.raises(NotImplementedError, match="qk_norm='all'"):
        ModelView(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_complements_of_small_circuits_match_reference(arch):
    """Pruning-curve points patch the complement of a small circuit: most destination inputs then have every
    incoming edge patched, and read the all-ablated input, whose projections and MLP output the engine computes
    once and reuses across runs and calls. Against the per-edge-hook reference, for every ablation and both
    directions, in several calls on one engine (the second reads the cached values)."""
    per_layer = [len(v) for v in ARCHS[arch].values() if isinstance(v, tuple)]  # options given per layer
    model = _model(arch, seed=7, layers=per_layer[0] if per_layer else 3)
    clean, corr, ans, wrong = prompts(model, seed=8)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    keep = _random_sets(len(g), 5, 9, p=0.06)
    masks = torch.cat([~keep, ~torch.zeros(1, len(g), dtype=torch.bool)])
    for mode, ablation in (
        ("noise", "resample"),
        ("denoise", "resample"),
        ("noise", "mean"),
        ("noise", "zero"),
    ):
        ref = _reference(model, g, masks, clean, corr, metric, mode, ablation)
        for max_batch in (None, 2):
            ours = patch_edges(
                model, masks, clean, corr, metric=metric, mode=mode, ablation=ablation, max_batch=max_batch
            )
            assert (ours - ref).abs().max() <= 1e-9, (mode, ablation, max_batch)
    eng, _ = prepare_runs(model, g, clean, corr, metric)
    first = eng.run(masks)
    torch.testing.assert_close(eng.run(masks.flip(0)), first.flip(0), rtol=0, atol=1e-12)
    assert any(k[0] == "mlp" for k in eng._ablated if isinstance(k, tuple)) or model.cfg.attn_only
    assert any(k[0] == "proj" for k in eng._ablated if isinstance(k, tuple))


def test_clamped_projections_are_refused_by_name():
    """OLMo's ``clip_qkv``: the clamp makes the projections non-linear in the head inputs, which EAP's closed-form
    backward assumes; refused by name."""
    model = _model("llama", clip_qkv=0.5)
    with pytest.raises(NotImplementedError, match="clip_qkv=0.5"):
        ModelView(model)


def test_residual_multiplier_is_refused_by_name():
    """Granite's ``residual_multiplier`` scales every write before the residual stream; the edge graph's node
    outputs are the unscaled ones, so circuits refuse it by name (node-level patching covers the model)."""
    model = _model("llama", residual_multiplier=0.5)
    with pytest.raises(NotImplementedError, match="residual_multiplier=0.5"):
        ModelView(model)


def _skip_without_onednn() -> None:
    from pypattern.models.packed import _ops_present, packed_gemm_enabled

    if not (_ops_present() and packed_gemm_enabled()):
        pytest.skip("oneDNN's matmul is not used for fixed weights in this process")


def _spy_onednn_heads(monkeypatch) -> list:
    """Record every choice of :meth:`ModelView._onednn_heads` (True: the oneDNN path) from now on."""
    calls = []
    real = ModelView._onednn_heads

    def spy(x3, W):
        got = real(x3, W)
        calls.append(got)
        return got

    monkeypatch.setattr(ModelView, "_onednn_heads", staticmethod(spy))
    return calls


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_eap_through_onednn_per_head_products_equals_bmm(arch, monkeypatch):
    """EAP and EAP-IG with every per-head product through oneDNN (the head writes of the recorded runs, their sum
    with its one-product backward, the head inputs' cotangents with the norm's correction and their sum over heads,
    as taken for large float32 products) equal the batched-matmul path and the float64 autograd reference."""
    _skip_without_onednn()
    model = _model(arch, seed=6, dtype=torch.float32)
    clean, corr, ans, wrong = prompts(model, seed=7)
    metric = LogitDiff(ans, wrong)
    calls = _spy_onednn_heads(monkeypatch)
    for method, kw in (("eap", {}), ("eap-ig", dict(steps=3))):
        monkeypatch.setattr(ModelView, "ONEDNN_HEAD_MACS", 0)
        calls.clear()
        fast = edge_attribution(model, clean, corr, metric=metric, method=method, **kw).values
        assert sum(calls) >= 3 * model.cfg.n_layers  # the oneDNN path ran
        monkeypatch.setattr(ModelView, "ONEDNN_HEAD_MACS", 2**62)
        calls.clear()
        plain = edge_attribution(model, clean, corr, metric=metric, method=method, **kw).values
        assert not any(calls)
        assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max(), method
    g = edges(model)
    ref = naive_first_order(model.double(), g, clean, corr, metric, "noise", "resample")
    monkeypatch.setattr(ModelView, "ONEDNN_HEAD_MACS", 0)
    fast = edge_attribution(model.float(), clean, corr, metric=metric, method="eap").values
    assert (fast.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_per_head_projections_through_onednn_equal_bmm(arch, monkeypatch):
    """The formed head inputs' projections through oneDNN's matmul (taken for large float32 products where the
    process uses oneDNN) give the patched runs of the batched-matmul path and of the per-edge-hook reference."""
    _skip_without_onednn()
    model = _model(arch, seed=4, dtype=torch.float32)
    clean, corr, ans, wrong = prompts(model, seed=5)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    E = len(g)
    masks = torch.cat(
        [torch.eye(E, dtype=torch.bool)[::2], _random_sets(E, 5, 6), _random_sets(E, 3, 7, p=0.9)]
    )
    calls = _spy_onednn_heads(monkeypatch)
    monkeypatch.setattr(ModelView, "ONEDNN_HEAD_MACS", 0)
    fast = patch_edges(model, masks, clean, corr, metric=metric)
    assert any(calls)  # the oneDNN path ran
    monkeypatch.setattr(ModelView, "ONEDNN_HEAD_MACS", 2**62)
    plain = patch_edges(model, masks, clean, corr, metric=metric)
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()
    ref = _reference(model.double(), g, masks, clean, corr, metric)
    assert (fast.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
