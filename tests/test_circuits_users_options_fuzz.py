"""The circuits API's options and result objects as users meet them, against the per-edge-hook reference and the
definitions: edge sets in every accepted form, ablations and modes, per-position edges, EdgeScores / Circuit /
PruningCurve tables, drawings and files (round trips, files edited by hand refused), ACDC's thresholds, undefined
faithfulness, converted Hugging Face models and the ``pypattern circuit`` command."""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from _circuits_reference import naive_patch, prompts, tiny

from pypattern import io
from pypattern.circuits import (
    Circuit,
    EdgeGraph,
    EdgeScores,
    PruningCurve,
    acdc,
    circuit_from_edges,
    draw_circuit,
    edge_attribution,
    edges,
    faithfulness,
    patch_edges,
    pruning_curve,
)
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {
    "default": {},
    "attn_only": {"attn_only": True},
    "gqa": {"n_key_value_heads": 2},
    "parallel": {"parallel_attn_mlp": True},
}


def _setup(arch="default", layers=2, B=4):
    model = tiny(seed=3, layers=layers, **ARCHS[arch])
    clean, corr, ans, wrong = prompts(model, B=B, seed=4)
    return model, clean, corr, LogitDiff(ans, wrong)


def _naive_mean(model, patched, clean, corr, metric, mode, ablation) -> float:
    return float(naive_patch(model, patched, clean, corr, metric, mode, ablation).mean())


def _naive_ends(model, graph, clean, corr, metric, mode, ablation):
    """``(M_full, M_empty)`` by the definitions: noising patches nothing / every edge, denoising every edge /
    nothing."""
    none = _naive_mean(model, [], clean, corr, metric, mode, ablation)
    every = _naive_mean(model, list(graph), clean, corr, metric, mode, ablation)
    return (none, every) if mode == "noise" else (every, none)


# ------------------------------------------------------------------------------------------------ edge sets


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("per_position", [False, True])
def test_every_form_of_an_edge_set_patches_as_the_reference(arch, per_position):
    model, clean, corr, metric = _setup(arch, layers=1)
    g = edges(model, per_position=per_position, seq_len=clean.shape[1] if per_position else None)
    sel = torch.randperm(len(g), generator=torch.Generator().manual_seed(1))[:6]
    chosen = [g[i] for i in sel.tolist()]
    mask = torch.zeros(len(g), dtype=torch.bool)
    mask[sel] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupted prompts not read by a zero ablation
        for mode, ablation in itertools.product(["noise", "denoise"], ["resample", "mean", "zero"]):
            ref = naive_patch(model, chosen, clean, corr, metric, mode, ablation)
            ref_few = naive_patch(model, chosen[:2], clean, corr, metric, mode, ablation)
            forms = {
                "edges": chosen,
                "names": [e.name for e in chosen],
                "set": set(chosen),
                "generator": (e for e in chosen),
                "bool mask": mask,
                "0/1 ints": mask.long(),
                "0/1 floats": mask.double(),
                "circuit": circuit_from_edges(g, chosen),
            }
            for name, form in forms.items():
                got = patch_edges(
                    model, form, clean, corr, metric=metric, mode=mode, ablation=ablation, graph=g
                )
                assert torch.allclose(got, ref, atol=1e-10), (mode, ablation, name)
            # a batch: a list of sets in different forms, one empty
            got = patch_edges(
                model,
                [chosen, [e.name for e in chosen[:2]], [], mask.int()],
                clean,
                corr,
                metric=metric,
                mode=mode,
                ablation=ablation,
            )
            empty = naive_patch(model, [], clean, corr, metric, mode, ablation)
            assert torch.allclose(got, torch.stack([ref, ref_few, empty, ref]), atol=1e-10), (mode, ablation)


def test_a_numpy_mask_patches_as_the_torch_mask():
    model, clean, corr, metric = _setup(layers=1)
    mask = torch.zeros(len(edges(model)), dtype=torch.bool)
    mask[:5] = True
    want = patch_edges(model, mask, clean, corr, metric=metric)
    assert torch.equal(patch_edges(model, mask.numpy(), clean, corr, metric=metric), want)


# ------------------------------------------------------------------------------------------------ EdgeScores


@pytest.fixture(scope="module")
def exact_scores():
    model, clean, corr, metric = _setup(layers=1, B=5)
    sc = edge_attribution(model, clean, corr, metric=metric, method="exact", quiet=True)
    return model, clean, corr, metric, sc


def test_edge_scores_top_ranking_circuit_and_table_follow_the_definitions(exact_scores):
    model, clean, corr, metric, sc = exact_scores
    g, E = sc.graph, len(sc.graph)
    # exact values: each edge patched alone, minus the clean run
    base = naive_patch(model, [], clean, corr, metric, "noise", "resample")
    for i in (0, 7, E - 1):
        alone = naive_patch(model, [g[i]], clean, corr, metric, "noise", "resample")
        assert torch.allclose(sc.values[:, i], alone - base, atol=1e-10)
    v = sc.values.numpy()
    mean = v.mean(0)
    order = sorted(range(E), key=lambda i: (-abs(mean[i]), i))  # |score| descending, ties in graph order
    assert sc.ranking().tolist() == order
    assert [(e.name, s) for e, s in sc.top(4)] == [
        (g[i].name, pytest.approx(mean[i], abs=1e-12)) for i in order[:4]
    ]
    assert len(sc.top(10 * E)) == E
    for n in (0, 1, 7, E):
        c = sc.circuit(n=n)
        assert len(c) == n and set(c.edges) == {g[i] for i in order[:n]} and c.fraction == n / E
    for f in (0.0, 0.01, 0.3, 1.0):
        assert len(sc.circuit(fraction=f)) == round(f * E)
    df = sc.to_pandas().set_index("name")
    for i, e in enumerate(g):
        row = df.loc[e.name]
        assert row["score"] == pytest.approx(mean[i], abs=1e-12)
        assert row["se"] == pytest.approx(v[:, i].std(ddof=1) / np.sqrt(v.shape[0]), abs=1e-12)
        assert row["rank"] == order.index(i) + 1
    for bad in (
        dict(n=3, fraction=0.1),
        dict(n=-1),
        dict(n=E + 1),
        dict(fraction=1.5),
        dict(n=2.0),
        dict(n=True),
    ):
        with pytest.raises(ValueError, match="n=|fraction="):
            sc.circuit(**bad)


@pytest.mark.parametrize("arch", ["default", "gqa", "parallel"])
@pytest.mark.parametrize("per_position", [False, True])
def test_edge_scores_and_circuits_round_trip_through_files(arch, per_position, tmp_path):
    model, clean, corr, metric = _setup(arch, layers=1)
    sc = edge_attribution(
        model, clean, corr, metric=metric, method="eap-ig", steps=2, per_position=per_position
    )
    sc.save(tmp_path / "s.npz")
    back = EdgeScores.load(tmp_path / "s.npz")
    assert [e.name for e in back.graph] == [e.name for e in sc.graph]
    for k in ("values", "m_base", "m_clean"):
        assert torch.equal(getattr(back, k), getattr(sc, k))
    assert (back.method, back.mode, back.ablation, back.metric) == (
        sc.method,
        sc.mode,
        sc.ablation,
        sc.metric,
    )
    assert torch.equal(back.info["scored_examples"], sc.info["scored_examples"])
    assert back.info["steps"] == 2 and torch.equal(back.ranking(), sc.ranking())
    c = sc.circuit(n=5)
    c.faithfulness = faithfulness(model, c, clean, corr, metric=metric)
    c.save(tmp_path / "c.npz")
    cb = Circuit.load(tmp_path / "c.npz")
    assert torch.equal(cb.mask, c.mask) and torch.equal(cb.scores, c.scores)
    assert cb.faithfulness == c.faithfulness and cb.method == c.method and cb.info == c.info
    assert all(e in cb and e.name in cb for e in c.edges) and len(cb) == 5
    assert faithfulness(model, cb, clean, corr, metric=metric) == c.faithfulness
    # one circuit's faithfulness out of a batch's tensor (or a NumPy number) saves as its value
    for value in (faithfulness(model, [c, []], clean, corr, metric=metric)[0], np.float32(0.5)):
        c.faithfulness = value
        c.save(tmp_path / "c.npz")
        assert Circuit.load(tmp_path / "c.npz").faithfulness == float(value)
    # loading never unpickles: a pickle, and an archive whose member needs pickle, are refused by name
    with open(tmp_path / "p.npz", "wb") as f:
        pickle.dump({"values": sc.values}, f)
    with pytest.raises(io.FormatError, match="p.npz"):
        EdgeScores.load(tmp_path / "p.npz")
    np.savez(tmp_path / "o.npz", mask=np.array([object()], dtype=object))
    with pytest.raises(io.FormatError, match="o.npz"):
        Circuit.load(tmp_path / "o.npz")


def _edit(src, dst, meta_fn=None, arr_fn=None) -> None:
    """Rewrite the pypattern file ``src`` as ``dst`` with its header or its arrays changed (by hand, as it were)."""
    arrays, meta = io.load(src)
    meta = copy.deepcopy(meta)
    if meta_fn is not None:
        meta_fn(meta)
    if arr_fn is not None:
        arr_fn(arrays)
    kind = meta.pop("kind")
    del meta["format"], meta["version"]
    io.save(dst, arrays, meta, kind=kind)


def _set(*keys, value):
    def fn(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return fn


def _arr(key, fn):
    return lambda a: a.__setitem__(key, fn(a[key]))


SCORE_EDITS = {
    "graph has_mlp a string": dict(meta_fn=_set("graph", "has_mlp", value="no")),
    "mode a number": dict(meta_fn=_set("mode", value=1)),
    "ablation a list": dict(meta_fn=_set("ablation", value=["mean"])),
    "method a number": dict(meta_fn=_set("method", value=3)),
    "values integers": dict(arr_fn=_arr("values", lambda x: x.astype(np.int64))),
    "values bools": dict(arr_fn=_arr("values", lambda x: x > 0)),
    "values complex": dict(arr_fn=_arr("values", lambda x: x.astype(np.complex128))),
    "m_base bools": dict(arr_fn=_arr("m_base", lambda x: x > 0)),
    "values strings": dict(arr_fn=_arr("values", lambda x: x.astype("U4"))),
    "a member it does not have": dict(arr_fn=lambda a: a.__setitem__("extra", np.zeros(3))),
    "bfloat16 entry not a list": dict(meta_fn=_set("bfloat16", value=5)),
}
CIRCUIT_EDITS = {
    "graph parallel a string": dict(meta_fn=_set("graph", "parallel", value="false")),
    "info a list": dict(meta_fn=_set("info", value=[1])),
    "method a number": dict(meta_fn=_set("method", value=1)),
    "mask integers": dict(arr_fn=_arr("mask", lambda x: x.astype(np.int64))),
    "mask strings": dict(arr_fn=_arr("mask", lambda x: x.astype("U4"))),
    "a member it does not have": dict(arr_fn=lambda a: a.__setitem__("extra", np.zeros(3))),
}
CURVE_EDITS = {
    "faithfulness changed": dict(arr_fn=_arr("faithfulness/exact", lambda x: x + 0.5)),
    "m_full changed": dict(meta_fn=_set("fields", "m_full", value=7.0)),
    "counts out of order": dict(arr_fn=_arr("counts", lambda x: x[::-1].copy())),
    "a count twice": dict(arr_fn=_arr("counts", lambda x: np.array([0, 0, x[-1]]))),
    "info a list": dict(meta_fn=_set("fields", "info", value=[1])),
}


@pytest.fixture(scope="module")
def saved_results(exact_scores, tmp_path_factory):
    model, clean, corr, metric, sc = exact_scores
    d = tmp_path_factory.mktemp("results")
    sc.save(d / "s.npz")
    c = sc.circuit(n=4)
    c.faithfulness = 0.25
    c.save(d / "c.npz")
    curve = pruning_curve(model, sc, clean, corr, metric=metric, counts=[0, 5, len(sc.graph)])
    curve.save(d / "p.npz")
    return d


@pytest.mark.parametrize(
    "cls, name, edit",
    [(EdgeScores, "s", (k, v)) for k, v in SCORE_EDITS.items()]
    + [(Circuit, "c", (k, v)) for k, v in CIRCUIT_EDITS.items()]
    + [(PruningCurve, "p", (k, v)) for k, v in CURVE_EDITS.items()],
    ids=lambda v: v[0] if isinstance(v, tuple) else getattr(v, "__name__", str(v)),
)
def test_result_files_edited_by_hand_are_refused(saved_results, tmp_path, cls, name, edit):
    label, how = edit
    cls.load(saved_results / f"{name}.npz")  # the file as written loads
    _edit(saved_results / f"{name}.npz", tmp_path / "edited.npz", **how)
    with pytest.raises(io.FormatError, match="edited.npz"):
        cls.load(tmp_path / "edited.npz")


def test_edge_graph_refuses_architecture_flags_that_are_not_bools():
    for k, v in (("has_mlp", "no"), ("parallel", "yes"), ("has_mlp", 1)):
        with pytest.raises(TypeError, match=k):
            EdgeGraph(2, 4, **{k: v})
    assert len(EdgeGraph(2, 4, has_mlp=np.bool_(True))) == 110


# ------------------------------------------------------------------------------------------------ Circuit


def test_circuit_takes_0_1_masks_and_edge_lists_and_refuses_other_masks(tmp_path):
    g = edges(tiny(layers=1))
    E = len(g)
    ints = torch.zeros(E, dtype=torch.long)
    ints[[0, 3, 5]] = 1
    want = {g[0], g[3], g[5]}
    for mask in (ints, ints.double(), ints.numpy(), [g[0], g[3].name, g[5]]):
        c = Circuit(g, mask)
        assert c.mask.dtype == torch.bool and set(c.edges) == want and len(c) == 3
        assert set(c.to_pandas()["name"]) == {e.name for e in want}
        c.save(tmp_path / "c.npz")
        assert torch.equal(Circuit.load(tmp_path / "c.npz").mask, c.mask)
    with pytest.raises(ValueError, match="mask"):
        Circuit(g, torch.rand(E))  # a threshold's input, not a mask
    with pytest.raises(ValueError, match="mask"):
        Circuit(g, torch.ones(E - 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores"):
        Circuit(g, ints, torch.ones(3))
    for mask in (torch.ones(E + 5, dtype=torch.bool), torch.ones(E - 5, dtype=torch.bool), torch.rand(E)):
        with pytest.raises(ValueError, match="mask"):
            draw_circuit(g, mask)
    with pytest.raises(ValueError, match="scores"):
        draw_circuit(g, ints.bool(), torch.ones(3))
    ax = draw_circuit(g, [g[0].name, g[3]], path=str(tmp_path / "d.png"))
    assert len(ax.patches) == 2 and os.path.getsize(tmp_path / "d.png") > 1000


@pytest.mark.parametrize("arch", list(ARCHS))
def test_drawings_of_no_edge_and_of_every_edge(arch, tmp_path):
    model, clean, corr, metric = _setup(arch, layers=2)
    for per_position in (False, True):
        sc = edge_attribution(model, clean, corr, metric=metric, per_position=per_position)
        g = sc.graph
        for n in (0, len(g)):
            c = sc.circuit(n=n)
            path = tmp_path / f"{per_position}-{n}.png"
            ax = c.draw(path=str(path))
            assert os.path.getsize(path) > 1000
            # an arrow per (source, destination input) kept, positions summed; every node labelled
            pairs = {(e.src, e.dst, e.qkv) for e in c.edges}
            assert len(ax.patches) == min(len(pairs), 200)
            assert {t.get_text() for t in ax.texts} >= set(g.src_names) | {"logits"}
            assert f"{n} of {len(g)} edges" in ax.get_title()


# ------------------------------------------------------------------------------------------------ PruningCurve


@pytest.mark.parametrize("mode, ablation", [("noise", "resample"), ("noise", "mean"), ("denoise", "zero")])
def test_pruning_curve_endpoints_points_and_table_follow_the_definitions(mode, ablation):
    model, clean, corr, metric = _setup(layers=1)
    g = edges(model)
    E = len(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = edge_attribution(model, clean, corr, metric=metric, mode=mode, ablation=ablation)
        curve = pruning_curve(
            model, {"eap": sc, "reversed": -sc.scores.abs()}, clean, corr, metric=metric, mode=mode,
            ablation=ablation, fractions=[0.0, 0.25, 1.0],
        )  # fmt: skip
    full, empty = _naive_ends(model, g, clean, corr, metric, mode, ablation)
    assert curve.m_full == pytest.approx(full, abs=1e-10) and curve.m_empty == pytest.approx(empty, abs=1e-10)
    assert curve.counts.tolist() == [0, round(0.25 * E), E]
    assert torch.allclose(curve.fractions, curve.counts.double() / E)
    for name in ("eap", "reversed"):
        f = curve.faithfulness[name]
        assert float(f[0]) == pytest.approx(0.0, abs=1e-12) and float(f[-1]) == pytest.approx(1.0, abs=1e-12)
    kept = set(sc.circuit(n=int(curve.counts[1])).edges)
    m_c = _naive_mean(
        model,
        [e for e in g if e not in kept] if mode == "noise" else list(kept),
        clean,
        corr,
        metric,
        mode,
        ablation,
    )
    assert float(curve.faithfulness["eap"][1]) == pytest.approx((m_c - empty) / (full - empty), abs=1e-9)
    assert curve.at(0.0) == {"eap": pytest.approx(0.0, abs=1e-12), "reversed": pytest.approx(0.0, abs=1e-12)}
    assert curve.at(0.3)["eap"] == float(curve.faithfulness["eap"][1])
    assert curve.at(0.9) == {"eap": pytest.approx(1.0), "reversed": pytest.approx(1.0)}
    df = curve.to_pandas()
    assert len(df) == 6 and list(df.columns) == ["method", "edges", "fraction", "faithfulness", "metric"]
    row = df[(df["method"] == "eap") & (df["edges"] == E)].iloc[0]
    assert row["fraction"] == 1.0 and row["metric"] == pytest.approx(full, abs=1e-10)


def test_pruning_curve_plot_writes_labelled_axes_with_both_endpoints(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    curve = PruningCurve(
        counts=torch.tensor([0, 1, 5, 110]),
        num_edges=110,
        faithfulness={"a": torch.tensor([0.0, 0.2, 0.6, 1.0])},
        metric_values={"a": torch.tensor([0.0, 0.2, 0.6, 1.0])},
        m_full=1.0,
        m_empty=0.0,
        mode="noise",
        ablation="resample",
        metric="logit_diff",
    )
    backend = matplotlib.get_backend()
    figures = plt.get_fignums()
    ax = curve.plot(path=str(tmp_path / "c.png"))
    assert os.path.getsize(tmp_path / "c.png") > 1000
    assert ax.get_xlabel() == "edges kept (of 110)" and ax.get_ylabel() == "faithfulness"
    assert "noise" in ax.get_title() and "resample" in ax.get_title()
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "a"]
    assert list(line.get_xdata()) == [0, 1, 5, 110]  # the empty circuit drawn on the logarithmic axis too
    assert list(line.get_ydata()) == pytest.approx([0.0, 0.2, 0.6, 1.0])
    # writing a file leaves matplotlib's backend and pyplot's figures alone
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
    fig, own_ax = plt.subplots()
    try:
        curve.plot(ax=own_ax, path=str(tmp_path / "on_ax.png"), log_x=False)
        assert os.path.getsize(tmp_path / "on_ax.png") > 1000  # the path is written with a given ax too
        assert own_ax.get_xscale() == "linear"
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ ACDC


def _naive_acdc(model, graph, clean, corr, metric, mode, ablation, threshold):
    """ACDC by its stopping rule, each test one re-patched run of the reference: destination inputs from the last,
    edges latest source first; an edge is removed when the mean metric drops by less than ``threshold`` (drops at
    rounding level read as 0)."""
    keep = [True] * len(graph)

    def value(k):
        patched = [e for e, kept in zip(graph, k) if (not kept if mode == "noise" else kept)]
        return _naive_mean(model, patched, clean, corr, metric, mode, ablation)

    cur = value(keep)
    for d in reversed(range(graph.n_dst)):
        for i in (graph.dst_idx == d).nonzero().flatten().flip(0).tolist():
            trial = list(keep)
            trial[i] = False
            v = value(trial)
            drop = cur - v
            if abs(drop) <= 16 * torch.finfo(torch.float64).eps * max(abs(cur), abs(v)):
                drop = 0.0
            if drop < threshold:
                keep, cur = trial, v
    return torch.tensor(keep), cur


@pytest.mark.filterwarnings("ignore:acdc\\(mode='denoise'\\)")
@pytest.mark.filterwarnings("ignore:acdc. corrupted is given but not read")
@pytest.mark.parametrize(
    "mode, ablation",
    [
        ("noise", "resample"),
        ("noise", "mean"),
        ("noise", "zero"),
        ("denoise", "resample"),
        ("denoise", "zero"),
    ],
)
def test_acdc_keeps_what_its_stopping_rule_keeps_and_takes_extreme_thresholds(mode, ablation):
    model, clean, corr, metric = _setup(layers=1)
    g = edges(model)
    full, empty = _naive_ends(model, g, clean, corr, metric, mode, ablation)
    kw = dict(metric=metric, mode=mode, ablation=ablation, quiet=True)
    for threshold in (0, 0.05):
        c = acdc(model, clean, corr, threshold=threshold, **kw)
        keep, m_cur = _naive_acdc(model, g, clean, corr, metric, mode, ablation, threshold)
        assert torch.equal(c.mask, keep), threshold
        assert c.info["m_circuit"] == pytest.approx(m_cur, abs=1e-10)
        assert c.faithfulness == pytest.approx((m_cur - empty) / (full - empty), abs=1e-9)
        assert bool((c.scores[c.mask] >= threshold).all())  # every kept edge's measured drop
    huge = acdc(model, clean, corr, threshold=1e9, **kw)
    assert len(huge) == 0 and huge.faithfulness == pytest.approx(0.0, abs=1e-12)
    for bad in (-0.1, -1):
        with pytest.raises(ValueError, match="threshold"):
            acdc(model, clean, corr, threshold=bad, **kw)


# ------------------------------------------------------------------------------------ undefined faithfulness


def test_faithfulness_is_nan_with_a_warning_when_clean_and_corrupted_metrics_agree(tmp_path):
    model, clean, _, metric = _setup(layers=1)
    same = clean.clone()
    g = edges(model)
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert np.isnan(faithfulness(model, list(g)[:3], clean, same, metric=metric))
    scores = torch.arange(len(g), dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="undefined"):
        curve = pruning_curve(model, scores, clean, same, metric=metric, counts=[0, 3, len(g)])
    assert bool(torch.isnan(curve.faithfulness["scores"]).all())
    curve.save(tmp_path / "nan.npz")  # an undefined curve is a consistent file
    back = PruningCurve.load(tmp_path / "nan.npz")
    assert bool(torch.isnan(back.faithfulness["scores"]).all()) and np.isnan(back.at(0.5)["scores"])
    back.plot(path=str(tmp_path / "nan.png"))
    with pytest.warns(RuntimeWarning, match="undefined"):
        c = acdc(model, clean, same, metric=metric, threshold=0.0, quiet=True)
    assert np.isnan(c.faithfulness)


# ------------------------------------------------------------------------------------------------ converted models


def test_converted_gpt2_and_llama_patch_and_score_as_the_reference():
    transformers = pytest.importorskip("transformers")
    import pypattern

    torch.manual_seed(0)
    hfs = {
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=20, n_positions=8)
        ),
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=32, vocab_size=20, max_position_embeddings=16,
            )
        ),
    }  # fmt: skip
    g_ = torch.Generator().manual_seed(1)
    clean, corr = torch.randint(0, 20, (3, 6), generator=g_), torch.randint(0, 20, (3, 6), generator=g_)
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    for name, hf in hfs.items():
        hf = hf.double().eval()
        net = pypattern.from_hf(hf)
        g = edges(hf)
        assert len(g) == (110 if name == "gpt2" else 82)
        chosen = [g[i] for i in (0, 5, 17, len(g) - 1)]
        for mode, ablation in itertools.product(["noise", "denoise"], ["resample", "mean", "zero"]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = patch_edges(hf, chosen, clean, corr, metric=metric, mode=mode, ablation=ablation)
            ref = naive_patch(net, chosen, clean, corr, metric, mode, ablation)
            assert torch.allclose(got, ref, atol=1e-10), (name, mode, ablation)
        sc = edge_attribution(hf, clean, corr, metric=metric, method="eap")
        curve = pruning_curve(hf, sc, clean, corr, metric=metric, fractions=[0, 1])
        assert curve.faithfulness["eap"].tolist() == pytest.approx([0.0, 1.0], abs=1e-12)


# ------------------------------------------------------------------------------------------------ the command


def test_circuit_command_writes_its_outputs_and_names_the_flags(tmp_path, capsys):
    from pypattern.cli import main

    model, clean, corr, metric = _setup(layers=1)
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.cfg.to_dict()))
    np.savez(d / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    np.savez(
        tmp_path / "prompts.npz",
        clean=clean.numpy(),
        corrupted=corr.numpy(),
        answer=metric.answer.numpy(),
        wrong=metric.wrong.numpy(),
    )
    np.save(tmp_path / "tokens.npy", clean.numpy())
    np.save(tmp_path / "short.npy", corr.numpy()[:2])
    out = tmp_path / "out"
    argv = ["circuit", "--model", str(d), "--data", str(tmp_path / "prompts.npz"), "--out", str(out)]
    assert main([*argv, "--methods", "eap,exact", "--fraction", "0.2", "--quiet"]) == 0
    summary = json.loads((out / "circuit_summary.json").read_text())
    for key in ("edge_scores", "circuit_table", "pruning_curve", "pruning_table", "circuit_drawing"):
        assert os.path.getsize(summary[key]) > 100, key
    ex = edge_attribution(model, clean, corr, metric=metric, method="exact", quiet=True)
    n = round(0.2 * len(ex.graph))
    assert summary["circuit_edges"] == n
    assert summary["circuit_faithfulness"] == pytest.approx(
        faithfulness(model, ex.circuit(n=n), clean, corr, metric=metric), abs=1e-9
    )
    # the Python entry point takes the methods as the command line spells them too
    from pypattern.circuits.cli import run_circuit_demo

    res = run_circuit_demo(
        str(tmp_path / "one"),
        model_dir=str(d),
        tokens=str(tmp_path / "prompts.npz"),
        methods="eap",
        fraction=0.2,
    )
    assert res["circuit_method"] == "eap" and list(res["faithfulness_at_fraction"]) == ["eap"]
    capsys.readouterr()

    def error(args) -> str:
        with pytest.raises(SystemExit) as e:
            main(["circuit", "--model", str(d), "--out", str(tmp_path / "o2"), "--quiet", *args])
        assert e.value.code == 2
        return capsys.readouterr().err

    err = error(["--data", str(tmp_path / "prompts.npz"), "--corrupted", str(tmp_path / "tokens.npy")])
    assert "--corrupted" in err and "--data" in err and "Traceback" not in err
    err = error(["--data", str(tmp_path / "tokens.npy"), "--corrupted", str(tmp_path / "short.npy")])
    assert "--corrupted" in err and "--data" in err and "(2, 6)" in err
    for flag, value in (("--fraction", "0"), ("--fraction", "1.5"), ("--methods", "eapx")):
        err = error(["--data", str(tmp_path / "prompts.npz"), flag, value])
        assert flag in err


@pytest.mark.parametrize(
    "threshold",
    [np.float32(0.05), np.int64(0), torch.tensor(0.05), torch.tensor([0.05], dtype=torch.float64)],
)
def test_acdc_takes_numpy_and_tensor_thresholds_as_the_float(threshold):
    model, clean, corr, metric = _setup(layers=1)
    want = acdc(model, clean, corr, metric=metric, threshold=float(threshold), quiet=True)
    got = acdc(model, clean, corr, metric=metric, threshold=threshold, quiet=True)
    assert torch.equal(got.mask, want.mask)


def test_per_position_scores_without_their_graph_are_named():
    model, clean, corr, metric = _setup(layers=1)
    flat = len(edges(model))
    scores = torch.randn(flat * clean.shape[1])
    with pytest.raises(
        ValueError, match=r"per-position graph's over \d+ positions: give graph=edges\(model, per_p"
    ):
        pruning_curve(model, scores, clean, corr, metric=metric, fractions=[0.1], quiet=True)
