"""EAP, EAP-IG and exact edge scores against independent autograd through per-edge hooks."""

from __future__ import annotations

import pytest
import torch
from _circuits_reference import naive_first_order, prompts, tiny

from pypattern.circuits import edge_attribution, edges, patch_edges
from pypattern.patching import LogitDiff, LogProb

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["noise", "denoise"])
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_eap_equals_first_order_term(mode, ablation):
    model = tiny(seed=11)
    clean, corr, ans, wrong = prompts(model, seed=12)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap", mode=mode, ablation=ablation)
    ref = naive_first_order(model, g, clean, corr, metric, mode, ablation)
    assert sc.values.shape == (clean.shape[0], len(g))
    assert (sc.values - ref).abs().max() <= 1e-9
    assert ref.abs().max() > 1e-3


def test_eap_per_position_and_attn_only():
    model = tiny(seed=13, attn_only=True, layers=3, n_ctx=5)
    clean, corr, ans, wrong = prompts(model, seed=14)
    metric = LogProb(ans)
    g = edges(model, per_position=True, seq_len=5)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap", per_position=True)
    ref = naive_first_order(model, g, clean, corr, metric, "noise", "resample")
    assert (sc.values - ref).abs().max() <= 1e-9
    # summed over positions, the per-position scores are the position-free scores
    flat = edge_attribution(model, clean, corr, metric=metric, method="eap")
    gf = edges(model)
    summed = torch.zeros_like(flat.values)
    for i, e in enumerate(g):
        summed[:, gf.index(f"{e.src}->{e.dst_input}")] += sc.values[:, i]
    assert (summed - flat.values).abs().max() <= 1e-9


def test_eap_ig_equals_averaged_gradients_and_reduces_to_eap():
    model = tiny(seed=15)
    clean, corr, ans, wrong = prompts(model, seed=16)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    ig = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=3, max_batch=2)
    ref = naive_first_order(model, g, clean, corr, metric, "noise", "resample", alphas=(1 / 3, 2 / 3, 1.0))
    assert (ig.values - ref).abs().max() <= 1e-9
    ig1 = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=1)
    eap = edge_attribution(model, clean, corr, metric=metric, method="eap")
    assert (ig1.values - eap.values).abs().max() <= 1e-12
    assert ig.info["passes"] == 2  # 3 steps in batches of 2


def _linear_nodes_model(seed=0):
    """Attention-only, no norm, zero query weights and biases: every attention pattern is the uniform causal one
    whatever the input, so every node's output is affine in the embedding, while the metric (log-probability) is
    not linear."""
    model = tiny(seed=seed, attn_only=True, norm=None, layers=2)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.W_Q.zero_()
            blk.attn.b_Q.zero_()
        model.unembed.W_U.mul_(6.0)  # a strongly curved metric
    return model


def test_eap_ig_converges_to_exact_total_effect_on_linear_nodes():
    model = _linear_nodes_model(seed=17)
    clean, corr, ans, wrong = prompts(model, seed=18)
    metric = LogProb(ans)
    g = edges(model)
    into_logits = torch.tensor([e.dst == "logits" for e in g])
    # the exact effect of patching every edge (= the corrupted run), and of every edge into the logits
    every = patch_edges(model, torch.ones(len(g), dtype=torch.bool), clean, corr, metric=metric)
    cut = patch_edges(model, into_logits, clean, corr, metric=metric)
    with torch.no_grad():
        m_clean = metric(model(clean)[:, -1])
    exact = every - m_clean
    assert (cut - every).abs().max() <= 1e-9  # the logits' inputs are a cut of the graph
    errs = []
    for k in (1, 2, 4, 8, 16, 32):
        ig = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=k)
        total = ig.values[:, into_logits].sum(1)
        errs.append(float((total - exact).abs().max()))
    scale = float(exact.abs().max())
    assert errs[0] > 0.05 * scale  # EAP (k = 1) is far off on this curved metric
    # the error halves when k doubles: the O(1/k) error of the right Riemann sum of the path integral
    assert all(0.35 < b / a < 0.65 for a, b in zip(errs[1:], errs[2:]))
    assert errs[-1] < 0.01 * scale


def test_exact_scores_are_single_edge_patches():
    model = tiny(seed=19)
    clean, corr, ans, wrong = prompts(model, seed=20)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    ex = edge_attribution(model, clean, corr, metric=metric, method="exact", max_batch=16)
    single = patch_edges(model, torch.eye(len(g), dtype=torch.bool), clean, corr, metric=metric)
    with torch.no_grad():
        base = metric(model(clean)[:, -1])
    assert (ex.values - (single - base).T).abs().max() <= 1e-12
    # EAP is a first-order estimate of the same numbers: strongly correlated on this small model
    eap = edge_attribution(model, clean, corr, metric=metric, method="eap")
    r = torch.corrcoef(torch.stack([eap.scores, ex.scores]))[0, 1]
    assert r > 0.5


def test_edge_scores_table_and_errors(tmp_path):
    model = tiny(seed=21)
    clean, corr, ans, wrong = prompts(model, seed=22)
    metric = LogitDiff(ans, wrong)
    sc = edge_attribution(model, clean, corr, metric=metric)
    df = sc.to_pandas()
    assert len(df) == 110 and list(df["rank"])[:3] == [1, 2, 3]
    assert abs(df["score"].iloc[0]) == pytest.approx(float(sc.scores.abs().max()))
    top = sc.top(3)
    assert top[0][0].name == df["name"].iloc[0]
    c = sc.circuit(fraction=0.1)
    assert len(c) == 11 and top[0][0] in c.edges
    path = tmp_path / "scores.npz"
    sc.save(path)
    back = type(sc).load(path)
    assert torch.equal(back.values, sc.values) and len(back.graph) == 110
    with pytest.raises(ValueError, match="method="):
        edge_attribution(model, clean, corr, metric=metric, method="magic")
    with pytest.raises(ValueError, match="steps="):
        edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=0)


def test_eap_with_per_example_metric_positions():
    model = tiny(seed=23)
    clean, corr, ans, wrong = prompts(model, seed=24)
    metric = LogitDiff(ans, wrong, position=torch.tensor([5, 2, 4, 3, 5]))
    g = edges(model)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=2)
    ref = naive_first_order(model, g, clean, corr, metric, "noise", "resample", alphas=(0.5, 1.0))
    assert (sc.values - ref).abs().max() <= 1e-9


@pytest.mark.parametrize("norm", ["LN", "RMS"])
@pytest.mark.parametrize("norm_dtype", [None, torch.float32])
def test_norm_vjp_closed_form_equals_autograd(norm, norm_dtype):
    from pypattern.circuits import ModelView

    model = tiny(seed=3, norm=norm, norm_dtype=norm_dtype)
    view = ModelView(model)
    gen = torch.Generator().manual_seed(4)
    x = 3 * torch.randn(2, 5, 16, generator=gen, dtype=torch.float64) + 1
    g = torch.randn(4, 2, 5, 16, generator=gen, dtype=torch.float64)
    ln = model.blocks[1].ln1
    ref = torch.stack(
        [torch.autograd.functional.vjp(ln, x, g[h])[1] for h in range(4)]
    )  # one autograd VJP per head, on the module itself
    tol = 1e-12 if norm_dtype is None else 1e-5
    assert (view.norm_vjp(1, x, g) - ref).abs().max() <= tol * ref.abs().max()
    # a hook on the norm makes the view fall back to autograd; the result is the same
    remove = ln.hook_normalized.add_hook(lambda act, hook: None)
    try:
        assert (view.norm_vjp(1, x, g) - ref).abs().max() <= tol * ref.abs().max()
    finally:
        remove()


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_eap_runs_each_prompt_set_once(monkeypatch, mode):
    """EAP: one forward of the source prompts, one forward of the base prompts (with the gradient), one backward;
    EAP-IG: the source forward and the k interpolated runs, the base run among them."""
    from pypattern.circuits.model_view import ModelView

    model = tiny(seed=21, layers=2)
    clean, corr, ans, wrong = prompts(model, seed=22)
    metric = LogitDiff(ans, wrong)
    edge_attribution(model, clean, corr, metric=metric, method="eap", mode=mode)  # the view's one-off check
    rows = []
    orig = ModelView.mlp

    def counted(self, layer, x):
        if layer == 0:
            rows.append(x.shape[:-2].numel())  # prompts (times interpolated runs) through MLP 0
        return orig(self, layer, x)

    monkeypatch.setattr(ModelView, "mlp", counted)
    B = clean.shape[0]
    for method, steps, expect in (("eap", 1, [B, B]), ("eap-ig", 4, [B, 4 * B])):
        rows.clear()
        edge_attribution(model, clean, corr, metric=metric, method=method, steps=steps, mode=mode)
        assert rows == expect


def test_eap_ig_runs_per_pass_follow_the_memory_budget():
    """The interpolated runs per gradient pass are as many as ``memory_budget`` holds by the per-run estimate (the
    activations kept for the backward: it grows with the MLP's width, a gated MLP's third hidden tensor and the
    experts per token); the scores do not depend on the split."""
    from pypattern.circuits.api import _ig_bytes_per_run
    from pypattern.circuits.engine import prepare_runs

    model = tiny(seed=21)
    clean, corr, ans, wrong = prompts(model, seed=22)
    metric = LogitDiff(ans, wrong)
    engine, _ = prepare_runs(model, edges(model), clean, corr, metric, defer_base=True)
    per = _ig_bytes_per_run(engine)
    cfg = model.cfg
    item = 8  # tiny() is float64
    B, T = clean.shape
    expected = cfg.n_layers * B * T * (14 * cfg.d_model + 2 * cfg.d_mlp + 2 * cfg.n_heads * T) * item
    # and one run's logits over the vocabulary with the metric's and the backward's temporaries
    assert per == expected + engine.vocab_bytes_per_run(grad=True)
    one = edge_attribution(
        model, clean, corr, metric=metric, method="eap-ig", steps=5, memory_budget=per * 5.5
    )
    two = edge_attribution(
        model, clean, corr, metric=metric, method="eap-ig", steps=5, memory_budget=per * 2.5
    )
    assert one.info["passes"] == 1 and two.info["passes"] == 3
    assert (one.values - two.values).abs().max() <= 1e-12 * one.values.abs().max()
    # a gated MLP keeps three hidden tensors per token
    engine.view.model.cfg.gated_mlp = True
    try:
        assert _ig_bytes_per_run(engine) - per == cfg.n_layers * B * T * cfg.d_mlp * item
    finally:
        engine.view.model.cfg.gated_mlp = False


def test_eap_reads_the_sources_once_for_the_mlp_and_logit_inputs(monkeypatch):
    """The MLP inputs and the logits (one gradient row each) share one :func:`row_dots` product over the sources
    per set of rows, instead of one product each, and the scores are the same as each entry's own product."""
    from pypattern.circuits import api
    from pypattern.circuits.api import _product_groups

    model = tiny(seed=23, layers=3)
    clean, corr, ans, wrong = prompts(model, seed=24)
    metric = LogitDiff(ans, wrong)
    calls = []
    orig = api.row_dots

    def counted(a, g, **kw):
        calls.append([t.shape[1] for t in g])
        return orig(a, g, **kw)

    monkeypatch.setattr(api, "row_dots", counted)
    got = edge_attribution(model, clean, corr, metric=metric, method="eap").scores
    # per attention a product of its query, key and value inputs (4 heads' rows each), then one per set of rows
    # for the rest: MLP 2 and the logits at the last row (the metric's), MLPs 0 and 1 at every row
    assert [c for c in calls if c and all(v == 1 for v in c)] == [[1, 1], [1, 1]]
    monkeypatch.setattr(api, "_product_groups", lambda entries, n_of: [[i] for i in range(len(entries))])
    calls.clear()
    ref = edge_attribution(model, clean, corr, metric=metric, method="eap").scores
    assert len([c for c in calls if c == [1]]) == 4
    assert torch.allclose(got, ref, rtol=0, atol=1e-12 * ref.abs().max())

    # the grouping: same rows only; an entry joins while the products it does not need stay at most its own
    def entry(v, rows):
        return (torch.arange(v), torch.as_tensor(rows), torch.zeros(v, 1, len(rows), 2))

    all_rows, last = [0, 1, 2], [2]
    entries = [entry(1, all_rows), entry(1, all_rows), entry(1, last), entry(1, all_rows), entry(3, all_rows)]
    assert _product_groups(entries, [20, 13, 40, 2, 20]) == [[2], [0, 4, 1, 3]]
