"""Circuit discovery on model configurations at the edges of what the Transformer represents, against the
per-edge-hook reference (``_circuits_reference``) and the definitions.

Configurations not covered by ``_circuits_reference.ARCHS``: one layer with one head (attention only), one layer
without norms, no positions, ``logits_scaling``, parameter-free LayerNorms, ``d_head`` other than ``d_model /
n_heads``, per-head query/key norms with one key/value head and partial rotary, mixtures of experts with
renormalised routing and a shared expert, float32 norms in a float64 model, scaled embeddings with both soft caps,
a LayerNorm on a rotary model's embedding, parallel blocks with a shared RMSNorm (gated) or without norms,
``padding_idx``, ``1 + w`` norms scaled before the cast, attention-only grouped-query blocks marked parallel, and
three layers of one head. Also: prompts of one and two positions, a batch of one, per-example metric positions,
per-position graphs of another length, float32 / bfloat16 copies, the induction experiment's key-composition edge
under grouped-query attention, and the result files (a circuit's recorded edge count, an ACDC circuit's recorded
metrics and threshold, edge scores' scored examples) checked on load.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _circuits_reference import naive_first_order, naive_patch, prompts, tiny

from pypattern import io
from pypattern.circuits import (
    Circuit,
    EdgeGraph,
    EdgeScores,
    acdc,
    edge_attribution,
    edges,
    faithfulness,
    patch_edges,
    pruning_curve,
)
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")

_GQA_PARTIAL = dict(
    norm="RMS",
    positional_embedding_type="rotary",
    rotary_dim=2,
    n_key_value_heads=1,
    qk_norm=True,
    gated_mlp=True,
    act="silu",
)
_MOE = dict(
    norm="RMS",
    positional_embedding_type="rotary",
    gated_mlp=True,
    act="silu",
    mlp_bias=False,
    n_experts=3,
    experts_per_token=2,
    moe_renormalize=True,
    moe_shared_d_mlp=8,
)

CONFIGS = {
    "one_layer_one_head_attn_only": dict(layers=1, heads=1, attn_only=True),
    "one_layer_no_norm": dict(layers=1, heads=2, norm=None),
    "no_positions": dict(positional_embedding=False),
    "logits_scaling": dict(logits_scaling=0.5),
    "ln_pre": dict(norm="LNPre"),
    "narrow_heads": dict(d_head=3),
    "qk_norm_mqa_partial_rotary": _GQA_PARTIAL,
    "moe_renormalized_shared_expert": _MOE,
    "float32_norms": dict(norm_dtype=torch.float32),
    "embed_scale_soft_caps_logit_scale": dict(
        embed_scale=2.0, output_logits_soft_cap=2.0, attn_scores_soft_cap=1.0, logits_scaling=0.7
    ),
    "embedding_ln_rotary": dict(post_embedding_ln=True, positional_embedding_type="rotary"),
    "parallel_shared_rms_gated": dict(
        norm="RMS", parallel_attn_mlp=True, parallel_shared_norm=True, gated_mlp=True, act="silu"
    ),
    "parallel_no_norm": dict(norm=None, parallel_attn_mlp=True),
    "padding_idx": dict(padding_idx=0),
    "offset_norm_before_cast": dict(norm="RMS", norm_weight_offset=1.0, norm_weight_before_cast=True),
    "offset_layernorm": dict(norm="LN", norm_weight_offset=1.0),  # Nemotron's LayerNorm1P
    "attn_only_gqa_parallel_flag": dict(attn_only=True, parallel_attn_mlp=True, n_key_value_heads=2),
    "three_layers_one_head": dict(layers=3, heads=1),
}


def _reference_sets(model, g, masks, clean, corr, metric, mode="noise", ablation="resample"):
    return torch.stack(
        [
            naive_patch(
                model, [g[i] for i in m.nonzero().flatten().tolist()], clean, corr, metric, mode, ablation
            )
            for m in masks
        ]
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unusual_configuration_matches_the_edge_hook_reference(name):
    model = tiny(seed=3, **CONFIGS[name])
    clean, corr, ans, wrong = prompts(model, B=3, seed=4)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    E = len(g)
    # float32 norms: the hooks and the engine both round the norms to float32 (the reference's autograd as well)
    tol = 1e-5 if name == "float32_norms" else 1e-9
    gen = torch.Generator().manual_seed(0)
    masks = torch.cat(
        [
            torch.eye(E, dtype=torch.bool)[:: max(1, E // 12)],
            torch.rand(2, E, generator=gen) < 0.4,
            torch.ones(1, E, dtype=torch.bool),
            torch.zeros(1, E, dtype=torch.bool),
        ]
    )
    ours = patch_edges(model, masks, clean, corr, metric=metric, max_batch=4)
    ref = _reference_sets(model, g, masks, clean, corr, metric)
    assert (ours - ref).abs().max() <= tol
    assert (ours[-2] - ours[-1]).abs().max() > 1e-3  # the corruption moves the metric
    # EAP: the first-order term by autograd through per-edge coefficients on the hooked model
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    first = naive_first_order(model, g, clean, corr, metric, "noise", "resample")
    assert first.abs().max() > 1e-2
    assert (sc.values - first).abs().max() <= max(tol, 1e-6 * float(first.abs().max()))
    # EAP-IG, denoising from mean-ablated sources: gradients averaged over alpha = 1/3, 2/3, 1
    ig = edge_attribution(
        model, clean, corr, metric=metric, method="eap-ig", steps=3, mode="denoise", ablation="mean"
    )
    ref_ig = naive_first_order(model, g, clean, corr, metric, "denoise", "mean", alphas=(1 / 3, 2 / 3, 1.0))
    assert (ig.values - ref_ig).abs().max() <= max(tol, 1e-6 * float(ref_ig.abs().max()))
    # exact scores: each single edge patched minus the base run (the reference's runs)
    some = torch.arange(0, E, max(1, E // 12))
    ex = edge_attribution(model, clean, corr, metric=metric, method="exact")
    single = _reference_sets(model, g, torch.eye(E, dtype=torch.bool)[some], clean, corr, metric)
    base = naive_patch(model, [], clean, corr, metric, "noise", "resample")
    assert (ex.values[:, some] - (single - base).T).abs().max() <= tol
    # faithfulness by its definition: the full edge set 1, the empty set 0
    ends = faithfulness(model, [list(g), []], clean, corr, metric=metric)
    assert ends.tolist() == pytest.approx([1.0, 0.0], abs=1e-9)


@pytest.mark.parametrize("arch", ["gpt2", "mqa_partial"])
@pytest.mark.parametrize("T,B", [(1, 1), (2, 1), (2, 3)])
def test_one_and_two_positions_and_one_example(arch, T, B):
    opts = {} if arch == "gpt2" else _GQA_PARTIAL
    model = tiny(seed=5, **opts)
    gen = torch.Generator().manual_seed(10 * T + B)
    clean = torch.randint(0, 12, (B, T), generator=gen)
    corr = (clean + 1 + torch.randint(0, 11, (B, T), generator=gen)) % 12
    ans = torch.randint(0, 12, (B,), generator=gen)
    pos = torch.randint(0, T, (B,), generator=gen)  # the metric at each example's own position
    metric = LogitDiff(ans, (ans + 1) % 12, position=pos)
    for per_position in (False, True):
        g = edges(model, per_position=True, seq_len=T) if per_position else edges(model)
        E = len(g)
        sc = edge_attribution(model, clean, corr, metric=metric, per_position=per_position)
        first = naive_first_order(model, g, clean, corr, metric, "noise", "resample")
        assert (sc.values - first).abs().max() <= 1e-9
        ig1 = edge_attribution(
            model,
            clean,
            corr,
            metric=metric,
            method="eap-ig",
            steps=2,
            per_position=per_position,
            max_batch=1,
        )
        ig = edge_attribution(
            model, clean, corr, metric=metric, method="eap-ig", steps=2, per_position=per_position
        )
        ref = naive_first_order(model, g, clean, corr, metric, "noise", "resample", alphas=(0.5, 1.0))
        assert (ig.values - ref).abs().max() <= 1e-9 and (ig1.values - ig.values).abs().max() <= 1e-12
        ex = edge_attribution(model, clean, corr, metric=metric, method="exact", per_position=per_position)
        ex_small = edge_attribution(
            model, clean, corr, metric=metric, method="exact", per_position=per_position, memory_budget=1
        )
        base = naive_patch(model, [], clean, corr, metric, "noise", "resample")
        single = _reference_sets(model, g, torch.eye(E, dtype=torch.bool), clean, corr, metric)
        assert (ex.values - (single - base).T).abs().max() <= 1e-9
        assert (ex_small.values - ex.values).abs().max() <= 1e-12
        # pruning curve points are the faithfulness of the top-k edge sets
        counts = sorted({0, 1, E // 3, E})
        curve = pruning_curve(model, sc, clean, corr, metric=metric, counts=counts, max_batch=1)
        top = sc.ranking()
        sets = [g.mask([g[i] for i in top[:k].tolist()]) for k in counts]
        want = faithfulness(model, sets, clean, corr, metric=metric, graph=g)
        got = curve.faithfulness["eap"]
        assert (got - want).abs().max() <= 1e-12
        assert got[0].item() == pytest.approx(0.0, abs=1e-9) and got[-1].item() == pytest.approx(
            1.0, abs=1e-9
        )


@pytest.mark.filterwarnings(r"ignore:acdc\(mode='denoise'\)")
@pytest.mark.parametrize("name", ["moe_renormalized_shared_expert", "parallel_no_norm"])
def test_acdc_on_unusual_models_is_batch_independent_and_faithful_as_evaluated(name):
    model = tiny(seed=7, **CONFIGS[name])
    clean, corr, ans, wrong = prompts(model, B=3, seed=8)
    metric = LogitDiff(ans, wrong, position=torch.tensor([5, 0, 3]))
    for mode in ("noise", "denoise"):
        one = acdc(model, clean, corr, metric=metric, threshold=0.02, mode=mode, max_batch=1)
        many = acdc(model, clean, corr, metric=metric, threshold=0.02, mode=mode)
        assert torch.equal(one.mask, many.mask)
        f = faithfulness(model, one, clean, corr, metric=metric, mode=mode)
        assert one.faithfulness == pytest.approx(float(f), abs=1e-9)
        # the recorded metrics are the circuit's, the full model's and the empty circuit's
        m = patch_edges(
            model,
            [
                ~one.mask if mode == "noise" else one.mask,
                torch.zeros_like(one.mask),
                torch.ones_like(one.mask),
            ],
            clean,
            corr,
            metric=metric,
            mode=mode,
        ).mean(1)
        full, empty = (m[1], m[2]) if mode == "noise" else (m[2], m[1])
        assert one.info["m_circuit"] == pytest.approx(float(m[0]), abs=1e-9)
        assert one.info["m_full"] == pytest.approx(float(full), abs=1e-9)
        assert one.info["m_empty"] == pytest.approx(float(empty), abs=1e-9)


def test_per_position_graph_of_another_length_is_refused_naming_both_lengths():
    model = tiny(seed=5)
    clean, corr, ans, wrong = prompts(model, B=3)
    metric = LogitDiff(ans, wrong)
    g4 = edges(model, per_position=True, seq_len=4)
    calls = {
        "patch_edges": lambda: patch_edges(model, [], clean, corr, metric=metric, graph=g4),
        "edge_attribution": lambda: edge_attribution(model, clean, corr, metric=metric, graph=g4),
        "faithfulness": lambda: faithfulness(model, [], clean, corr, metric=metric, graph=g4),
        "acdc": lambda: acdc(model, clean, corr, metric=metric, graph=g4, threshold=0.1),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"n_pos=4 positions; the prompts have 6"):
            call()
    sc = edge_attribution(model, clean, corr, metric=metric, per_position=True)
    with pytest.raises(ValueError, match=r"n_pos=6 positions; the prompts have 4"):
        pruning_curve(model, sc, clean[:, :4], corr[:, :4], metric=metric, counts=[0, 5])
    with pytest.raises(ValueError, match="440 edges"):  # a per-position mask of 4 positions without its graph
        patch_edges(model, torch.zeros(len(g4), dtype=torch.bool), clean, corr, metric=metric)


def test_float32_copy_agrees_and_bfloat16_warns():
    model = tiny(seed=5, **_GQA_PARTIAL)
    clean, corr, ans, wrong = prompts(model, B=3)
    metric = LogitDiff(ans, wrong)
    m32 = copy.deepcopy(model).to(torch.float32)
    for method in ("eap", "eap-ig", "exact"):
        a = edge_attribution(m32, clean, corr, metric=metric, method=method).values
        b = edge_attribution(model, clean, corr, metric=metric, method=method).values
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()
    mbf = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="bfloat16"):
        v = edge_attribution(mbf, clean, corr, metric=metric).values
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


# ----------------------------------------------------------------------------------------------- graph inputs


def test_edge_graph_takes_a_numpy_key_value_head_count():
    g = EdgeGraph(np.int64(2), np.int64(4), n_kv_heads=np.int64(2))
    ref = EdgeGraph(2, 4, n_kv_heads=2)
    assert [e.name for e in g] == [e.name for e in ref] and len(g) == 82
    assert type(g.n_kv_heads) is int
    with pytest.raises(ValueError, match="n_kv_heads"):
        EdgeGraph(2, 4, n_kv_heads=True)
    with pytest.raises(ValueError, match="n_kv_heads"):
        EdgeGraph(2, 4, n_kv_heads=2.0)


# ----------------------------------------------------------------------------------------------- result files


def _edit(src, dst, meta_fn=None, arr_fn=None) -> None:
    """Rewrite the pypattern file ``src`` as ``dst`` with its header or arrays changed by hand."""
    arrays, meta = io.load(src)
    meta = copy.deepcopy(meta)
    if meta_fn is not None:
        meta_fn(meta)
    if arr_fn is not None:
        arr_fn(arrays)
    kind = meta.pop("kind")
    del meta["format"], meta["version"]
    io.save(dst, arrays, meta, kind=kind)


@pytest.fixture(scope="module")
def found_circuits(tmp_path_factory):
    model = tiny(seed=5, layers=1, **{k: v for k, v in _GQA_PARTIAL.items() if k != "n_key_value_heads"})
    clean, corr, ans, wrong = prompts(model, B=3)
    metric = LogitDiff(ans, wrong)
    d = tmp_path_factory.mktemp("circuits")
    top = edge_attribution(model, clean, corr, metric=metric).circuit(n=4)
    top.save(d / "top.npz")
    found = acdc(model, clean, corr, metric=metric, threshold=0.05)
    assert 0 < len(found) < len(found.graph) and found.info["num_untested"] > 0
    found.save(d / "acdc.npz")
    return d, top, found


def test_found_circuits_round_trip_exactly(found_circuits):
    d, top, found = found_circuits
    for c, name in ((top, "top"), (found, "acdc")):
        back = Circuit.load(d / f"{name}.npz")
        assert torch.equal(back.mask, c.mask) and torch.equal(back.scores, c.scores)
        assert back.info == c.info and back.method == c.method
        assert back.faithfulness == c.faithfulness or (c.faithfulness is None and back.faithfulness is None)
        assert [e.name for e in back.graph] == [e.name for e in c.graph]


def _flip_first(a):
    a["mask"] = a["mask"].copy()
    a["mask"][0] = not a["mask"][0]


CIRCUIT_EDITS = {
    "top: edge count changed": ("top", dict(meta_fn=lambda m: m["info"].__setitem__("n", 7))),
    "top: an edge added to the mask": ("top", dict(arr_fn=lambda a: _flip_first(a))),
    "top: faithfulness infinite": ("top", dict(meta_fn=lambda m: m.__setitem__("faithfulness", math.inf))),
    "acdc: faithfulness changed": (
        "acdc",
        dict(meta_fn=lambda m: m.__setitem__("faithfulness", m["faithfulness"] + 0.25)),
    ),
    "acdc: m_full changed": ("acdc", dict(meta_fn=lambda m: m["info"].__setitem__("m_full", 9.0))),
    "acdc: an edge flipped against its drop": ("acdc", dict(arr_fn=lambda a: _flip_first(a))),
    "acdc: threshold changed": ("acdc", dict(meta_fn=lambda m: m["info"].__setitem__("threshold", 1e6))),
    "acdc: more untested edges than removed": (
        "acdc",
        dict(meta_fn=lambda m: m["info"].__setitem__("num_untested", 10**6)),
    ),
}


@pytest.mark.parametrize("label", list(CIRCUIT_EDITS))
def test_a_circuit_file_edited_to_be_inconsistent_is_refused(found_circuits, tmp_path, label):
    d, _, _ = found_circuits
    name, how = CIRCUIT_EDITS[label]
    Circuit.load(d / f"{name}.npz")  # as written, it loads
    _edit(d / f"{name}.npz", tmp_path / "edited.npz", **how)
    with pytest.raises(io.FormatError, match="edited.npz"):
        Circuit.load(tmp_path / "edited.npz")


def test_a_circuit_whose_recorded_count_disagrees_is_refused_when_saved(found_circuits, tmp_path):
    _, top, _ = found_circuits
    c = copy.deepcopy(top)
    c.mask[c.mask.nonzero()[0]] = False  # one edge taken out by hand, info["n"] left as it was
    with pytest.raises(ValueError, match=r"info\['n'\]"):
        c.save(tmp_path / "c.npz")
    c.info = {}  # without the record the circuit saves and loads
    c.save(tmp_path / "c.npz")
    assert torch.equal(Circuit.load(tmp_path / "c.npz").mask, c.mask)
    # a circuit made by hand with method "acdc" and no recorded run loads as it was written
    bare = Circuit(top.graph, top.mask, top.scores, 0.5, "acdc")
    bare.save(tmp_path / "b.npz")
    assert Circuit.load(tmp_path / "b.npz").faithfulness == 0.5


# ----------------------------------------------------------------------------------------------- known circuits


def test_induction_key_composition_under_grouped_query_attention_names_the_key_value_input(monkeypatch):
    import dataclasses

    from pypattern.circuits import experiments
    from pypattern.models import Transformer
    from pypattern.tasks import InductionTask

    cfg = dataclasses.replace(InductionTask().model_config(seed=3), n_key_value_heads=2)
    model = Transformer(cfg)
    L, H = cfg.n_layers, cfg.n_heads
    group = H // 2
    prev, ind = torch.full((L, H), 0.1), torch.full((L, H), 0.05)
    prev[0, 1] = 0.9
    ind[1, H - 1] = 0.5  # the last head: key/value head 1
    monkeypatch.setattr(experiments, "head_roles", lambda *a, **k: {"previous_token": prev, "induction": ind})
    k = 6  # the prompts' copied prefix: the key composition is read at position k + 1
    want = f"L0H1->L1KV{(H - 1) // group}.k@{k + 1}"
    real = experiments.edge_attribution

    def scored(*args, **kwargs):  # the model's scores with the key-composition edge ranked first
        sc = real(*args, **kwargs)
        sc.values[:, sc.graph.index(want)] = 1e3
        return sc

    monkeypatch.setattr(experiments, "edge_attribution", scored)
    r = experiments.run_induction_circuit(
        model=model, num_prompts=4, k=k, methods=("eap",), fractions=(0.0, 1.0), quiet=True
    )
    assert r["prev_head"] == 1 and r["induction_heads"] == [H - 1]
    assert r["key_composition_in_top_5pct"]["eap"] == [want]


@pytest.fixture(scope="module")
def saved_scores(tmp_path_factory):
    model = tiny(seed=5, layers=1)
    clean, corr, ans, wrong = prompts(model, B=3)
    sc = edge_attribution(model, clean, corr, metric=LogitDiff(ans, wrong), method="eap")
    assert bool(sc.scored_examples.all())
    d = tmp_path_factory.mktemp("scores")
    sc.save(d / "s.npz")
    return d, sc


def _leave_out_first(a):
    a["scored_examples"] = a["scored_examples"].copy()
    a["scored_examples"][0] = False


def _base_not_finite(a):
    a["m_base"] = a["m_base"].copy()
    a["m_base"][1] = np.nan


@pytest.mark.parametrize("edit", [_leave_out_first, _base_not_finite], ids=["scored_left_out", "base_nan"])
def test_edge_scores_whose_scored_examples_disagree_with_their_values_are_refused(
    saved_scores, tmp_path, edit
):
    d, sc = saved_scores
    back = EdgeScores.load(d / "s.npz")
    assert torch.equal(back.scores, sc.scores)  # as written: the mean over every example
    _edit(d / "s.npz", tmp_path / "edited.npz", arr_fn=edit)
    with pytest.raises(io.FormatError, match="edited.npz"):
        EdgeScores.load(tmp_path / "edited.npz")


def test_edge_scores_of_an_example_left_out_load_with_its_nan_values(saved_scores, tmp_path):
    d, sc = saved_scores

    def left_out(a):  # as edge_attribution leaves out an example: its flag False and its values NaN
        _leave_out_first(a)
        a["values"] = a["values"].copy()
        a["values"][0] = np.nan

    _edit(d / "s.npz", tmp_path / "left_out.npz", arr_fn=left_out)
    back = EdgeScores.load(tmp_path / "left_out.npz")
    assert torch.allclose(back.scores, sc.values[1:].mean(0), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "kw", [dict(num_prompts=0), dict(num_prompts=-1), dict(num_prompts=2.0), dict(n=True)]
)
def test_induction_prompts_refuse_counts_that_are_not_positive_ints_by_name(kw):
    from pypattern.circuits import experiments

    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        experiments.induction_circuit_prompts(30, **kw)
    clean, corr, ans, wrong = experiments.induction_circuit_prompts(30, num_prompts=1)
    assert clean.shape == corr.shape == (1, 17) and torch.equal(ans, clean[:, 7])
