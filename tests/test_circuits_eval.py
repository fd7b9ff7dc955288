"""Faithfulness, pruning curves, ACDC and the result objects."""

from __future__ import annotations

import math
import os

import pytest
import torch
from _circuits_reference import naive_patch, prompts, tiny

from pypattern.circuits import (
    Circuit,
    acdc,
    circuit_from_edges,
    edge_attribution,
    edges,
    faithfulness,
    patch_edges,
    pruning_curve,
)
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    model = tiny(seed=31)
    clean, corr, ans, wrong = prompts(model, B=6, seed=32)
    return model, clean, corr, LogitDiff(ans, wrong)


def _naive_faith(model, circuit_edges, clean, corr, metric, mode):
    g = edges(model)
    inside = set(circuit_edges)
    outside = [e for e in g if e not in inside]
    if mode == "noise":
        m_c = naive_patch(model, outside, clean, corr, metric, "noise", "resample").mean()
        m_full = naive_patch(model, [], clean, corr, metric, "noise", "resample").mean()
        m_empty = naive_patch(model, list(g), clean, corr, metric, "noise", "resample").mean()
    else:
        m_c = naive_patch(model, list(inside), clean, corr, metric, "denoise", "resample").mean()
        m_full = naive_patch(model, list(g), clean, corr, metric, "denoise", "resample").mean()
        m_empty = naive_patch(model, [], clean, corr, metric, "denoise", "resample").mean()
    return float((m_c - m_empty) / (m_full - m_empty))


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_faithfulness_matches_naive(setup, mode):
    model, clean, corr, metric = setup
    g = edges(model)
    gen = torch.Generator().manual_seed(1)
    circ = [g[i] for i in torch.randperm(len(g), generator=gen)[:30].tolist()]
    f = faithfulness(model, circ, clean, corr, metric=metric, mode=mode)
    assert f == pytest.approx(_naive_faith(model, circ, clean, corr, metric, mode), abs=1e-9)
    ends = faithfulness(model, [list(g), []], clean, corr, metric=metric, mode=mode)
    assert ends.tolist() == pytest.approx([1.0, 0.0], abs=1e-9)


def test_pruning_curve_points_are_faithfulness_of_top_edges(setup):
    model, clean, corr, metric = setup
    eap = edge_attribution(model, clean, corr, metric=metric, method="eap")
    ex = edge_attribution(model, clean, corr, metric=metric, method="exact")
    curve = pruning_curve(
        model, {"eap": eap, "exact": ex}, clean, corr, metric=metric, counts=[0, 3, 11, 55, 110]
    )
    assert curve.counts.tolist() == [0, 3, 11, 55, 110]
    for name, sc in (("eap", eap), ("exact", ex)):
        f = curve.faithfulness[name]
        assert float(f[0]) == pytest.approx(0.0, abs=1e-9) and float(f[-1]) == pytest.approx(1.0, abs=1e-9)
        for n, fn in zip([3, 11, 55], f[1:-1].tolist()):
            top = sc.circuit(n=n).edges
            assert fn == pytest.approx(_naive_faith(model, top, clean, corr, metric, "noise"), abs=1e-9)
    df = curve.to_pandas()
    assert set(df.columns) >= {"method", "edges", "fraction", "faithfulness", "metric"} and len(df) == 10
    assert curve.at(0.1)["exact"] == pytest.approx(float(curve.faithfulness["exact"][2]))
    # default fractions are turned into counts
    c2 = pruning_curve(model, ex.scores, clean, corr, metric=metric)
    assert c2.counts[0] == 0 and c2.counts[-1] == 110


def _acdc_reference(model, clean, corr, metric, threshold, mode="noise", graph=None):
    """The greedy rule with one patched run per test through :func:`patch_edges`: no batching, no shortcut for
    inputs that cannot change the metric. Returns the kept mask, the final metric and each tested edge's drop."""
    g = edges(model) if graph is None else graph
    keep = torch.ones(len(g), dtype=torch.bool)
    drops = {}

    def m(k):
        patched = ~k if mode == "noise" else k
        return float(patch_edges(model, patched, clean, corr, metric=metric, mode=mode, graph=g).mean())

    cur = m(keep)
    for d in reversed(range(g.n_dst)):
        for e in (g.dst_idx == d).nonzero().flatten().flip(0).tolist():
            trial = keep.clone()
            trial[e] = False
            new = m(trial)
            drops[e] = cur - new
            if cur - new < threshold:
                keep, cur = trial, new
    return keep, cur, drops


def assert_same_as_reference(circ, ref, min_untested=1):
    """Same kept edges and final metric; every edge ``acdc`` tested got the reference's drop; edges it removed
    untested were removed by the reference too (which tested them)."""
    keep_ref, m_ref, drops = ref
    assert torch.equal(circ.mask, keep_ref)
    assert circ.info["m_circuit"] == pytest.approx(m_ref, abs=1e-9)
    tested = circ.scores != 0
    idx = tested.nonzero().flatten().tolist()
    assert max(abs(float(circ.scores[i]) - drops[i]) for i in idx) <= 1e-9
    assert circ.info["num_untested"] >= min_untested
    assert circ.info["num_runs"] >= 2 + len(circ.graph) - circ.info["num_untested"]


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_acdc_equals_one_edge_at_a_time_reference(setup, mode):
    model, clean, corr, metric = setup
    full = float(
        patch_edges(
            model, [] if mode == "noise" else list(edges(model)), clean, corr, metric=metric, mode=mode
        ).mean()
    )
    empty = float(
        patch_edges(
            model, list(edges(model)) if mode == "noise" else [], clean, corr, metric=metric, mode=mode
        ).mean()
    )
    thr = 0.02 * abs(full - empty)
    circ = acdc(model, clean, corr, metric=metric, threshold=thr, mode=mode, max_batch=7)
    assert_same_as_reference(
        circ, _acdc_reference(model, clean, corr, metric, thr, mode), min_untested=int(mode == "noise")
    )
    assert 0 < len(circ) < 110
    assert circ.faithfulness == pytest.approx(
        faithfulness(model, circ.mask, clean, corr, metric=metric, mode=mode), abs=1e-9
    )
    nothing = acdc(model, clean, corr, metric=metric, threshold=1e9, mode=mode)
    assert len(nothing) == 0


def _ends(model, g, clean, corr, metric, mode):
    """Batch-mean metric of the full circuit and of the empty one."""
    everything = torch.ones(len(g), dtype=torch.bool)
    full = patch_edges(
        model, ~everything if mode == "noise" else everything, clean, corr, metric=metric, mode=mode
    )
    empty = patch_edges(
        model, everything if mode == "noise" else ~everything, clean, corr, metric=metric, mode=mode
    )
    return float(full.mean()), float(empty.mean())


@pytest.mark.parametrize("arch", ["mha", "gqa"])
@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_acdc_per_position_equals_one_edge_at_a_time_reference(arch, mode):
    """Per-position edges: the same decisions and kept set as testing every edge alone, and the shortcuts fire at
    positions that cannot reach the metric (logits before the last position, and what only they read)."""
    opts = {"heads": 2} if arch == "mha" else {"heads": 4, "n_key_value_heads": 2, "attn_only": True}
    model = tiny(seed=41, layers=2, n_ctx=4, **opts)
    clean, corr, ans, wrong = prompts(model, B=4, seed=42)
    clean, corr = clean[:, [0, 1, 3]], corr[:, [0, 1, 3]]  # the corrupted positions 1 and 3
    metric = LogitDiff(ans, wrong)
    g = edges(model, per_position=True, seq_len=3)
    full, empty = _ends(model, g, clean, corr, metric, mode)
    thr = 0.01 * abs(full - empty)
    circ = acdc(model, clean, corr, metric=metric, threshold=thr, mode=mode, per_position=True, max_batch=16)
    assert circ.graph.per_position and len(circ.graph) == len(g)
    ref = _acdc_reference(model, clean, corr, metric, thr, mode, graph=g)
    # at least the logits' edges at the two earlier positions need no test
    n_logit_edges = int((g.dst_idx == g.n_dst - 1).sum()) // 3
    assert_same_as_reference(circ, ref, min_untested=2 * n_logit_edges)
    assert 0 < len(circ) < len(g)
    kept_at = g.pos_idx[circ.mask]
    assert bool((kept_at[g.dst_idx[circ.mask] == g.n_dst - 1] == 2).all())
    assert circ.faithfulness == pytest.approx(
        faithfulness(model, circ.mask, clean, corr, metric=metric, mode=mode), abs=1e-9
    )


def test_acdc_per_position_with_per_example_positions():
    model = tiny(seed=43, layers=2, heads=2, n_ctx=4)
    clean, corr, ans, wrong = prompts(model, B=4, seed=44)
    clean, corr = clean[:, 1:], corr[:, 1:]
    metric = LogitDiff(ans, wrong, position=torch.tensor([1, 2, 1, 1]))
    g = edges(model, per_position=True, seq_len=3)
    full, empty = _ends(model, g, clean, corr, metric, "noise")
    thr = 0.01 * abs(full - empty)
    circ = acdc(model, clean, corr, metric=metric, threshold=thr, graph=g)
    assert_same_as_reference(circ, _acdc_reference(model, clean, corr, metric, thr, graph=g))
    kept_logits = g.pos_idx[circ.mask & (g.dst_idx == g.n_dst - 1)]
    assert set(kept_logits.tolist()) <= {1, 2} and circ.info["num_untested"] > 0


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_acdc_one_position_is_the_position_free_acdc(mode):
    """Prompts of one token: the per-position graph has the same edges (each at position 0) and ACDC makes the same
    decisions on both."""
    model = tiny(seed=45, heads=4, n_key_value_heads=2)
    clean, corr, ans, wrong = prompts(model, B=6, seed=46)
    clean, corr = clean[:, 3:4], corr[:, 3:4]  # position 3 differs between the prompts
    metric = LogitDiff(ans, wrong)
    g0, g1 = edges(model), edges(model, per_position=True, seq_len=1)
    assert [e.name + "@0" for e in g0] == [e.name for e in g1]
    full, empty = _ends(model, g0, clean, corr, metric, mode)
    thr = 0.02 * abs(full - empty)
    free = acdc(model, clean, corr, metric=metric, threshold=thr, mode=mode)
    per = acdc(model, clean, corr, metric=metric, threshold=thr, mode=mode, per_position=True)
    assert 0 < len(free) < len(g0)
    assert torch.equal(free.mask, per.mask) and (free.scores - per.scores).abs().max() <= 1e-12
    assert per.info["num_runs"] == free.info["num_runs"]
    assert per.info["num_untested"] == free.info["num_untested"]
    assert per.faithfulness == pytest.approx(free.faithfulness, abs=1e-12)


def test_results_drawing_and_io(setup, tmp_path):
    model, clean, corr, metric = setup
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=3)
    c = sc.circuit(n=12)
    png = os.path.join(tmp_path, "circuit.png")
    c.draw(path=png)
    assert os.path.getsize(png) > 5000
    curve = pruning_curve(model, sc, clean, corr, metric=metric)
    png2 = os.path.join(tmp_path, "curve.png")
    curve.plot(path=png2)
    assert os.path.getsize(png2) > 5000
    df = c.to_pandas()
    assert len(df) == 12 and df["score"].abs().is_monotonic_decreasing
    path = os.path.join(tmp_path, "c.npz")
    c.save(path)
    back = Circuit.load(path)
    assert torch.equal(back.mask, c.mask) and torch.equal(back.scores, c.scores)
    hand = circuit_from_edges(edges(model), ["L0H1->L1H2.k", "L1H2->logits"])
    assert len(hand) == 2 and "L1H2->logits" in hand
    # per-position circuits draw too (scores summed over positions)
    gp = edges(model, per_position=True, seq_len=clean.shape[1])
    pp = edge_attribution(model, clean, corr, metric=metric, per_position=True)
    assert len(pp.graph) == len(gp)
    pp.draw(n=10, path=os.path.join(tmp_path, "pp.png"))


def test_cli_on_a_local_model_directory(setup, tmp_path):
    import json

    import numpy as np

    from pypattern.circuits.cli import main, run_circuit_demo

    model, clean, corr, metric = setup
    d = tmp_path / "model"
    d.mkdir()
    cfg = model.cfg.to_dict()
    (d / "config.json").write_text(json.dumps(cfg))
    np.savez(d / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    tok = tmp_path / "prompts.npz"
    np.savez(
        tok,
        clean=clean.numpy(),
        corrupted=corr.numpy(),
        answer=metric.answer.numpy(),
        wrong=metric.wrong.numpy(),
    )
    out = tmp_path / "out"
    res = run_circuit_demo(
        str(out), model_dir=str(d), tokens=str(tok), methods=("eap", "exact"), fraction=0.1
    )
    for key in (
        "edge_scores",
        "circuit_table",
        "pruning_curve",
        "pruning_table",
        "circuit_drawing",
        "summary",
    ):
        assert os.path.getsize(res[key]) > 100
    with open(res["summary"]) as f:  # the command's printed result, in standard JSON
        assert json.load(f) == json.loads(json.dumps(res))
    ex = edge_attribution(model, clean, corr, metric=metric, method="exact")
    want = faithfulness(model, ex.circuit(fraction=0.1).mask, clean, corr, metric=metric)
    assert res["circuit_faithfulness"] == pytest.approx(want, abs=1e-9) and res["circuit_edges"] == 11
    assert main(["--out", str(out), "--model-dir", str(d), "--tokens", str(tok), "--methods", "eap"]) == 0
    with pytest.raises(ValueError, match="model_dir"):
        run_circuit_demo(str(out), model_dir=str(d))


def test_circuit_inputs_follow_the_patching_contract():
    """Edge patching checks its prompts and its metric as activation patching does: out-of-vocabulary ids and a
    batch-mean metric are refused, naming the argument."""
    import pypattern as pp
    from pypattern.circuits import edges, patch_edges
    from pypattern.patching import LogitDiff

    model = pp.Transformer(
        n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=11, n_ctx=6, dtype=torch.float64
    )
    clean = torch.randint(0, 11, (3, 6))
    corrupted = clean.roll(1, 0)
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    g = edges(model)
    with pytest.raises(ValueError, match="corrupted"):
        patch_edges(model, [g.edges[0]], clean, corrupted + 11, metric=metric)
    with pytest.raises(ValueError, match="metric"):
        patch_edges(model, [g.edges[0]], clean, corrupted, metric=lambda logits: metric(logits).mean(-1))


def test_bfloat16_model_scores_curve_save_and_plot(tmp_path):
    """A bfloat16 model (a converted bfloat16 checkpoint): the adapter's check allows bfloat16 rounding, edge
    scores and metric values are averaged and normalised in float32, and scores and curves save and plot (numpy has
    no bfloat16)."""
    from pypattern.circuits import EdgeScores
    from pypattern.patching import LogitDiff

    model = tiny(seed=21, dtype=torch.bfloat16)
    clean, corr, ans, wrong = prompts(model, seed=22)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    assert sc.values.dtype == torch.float32
    sc.save(tmp_path / "scores.npz")
    assert torch.equal(EdgeScores.load(tmp_path / "scores.npz").scores, sc.scores)
    curve = pruning_curve(model, sc, clean, corr, metric=metric, counts=[0, 5, len(g)])
    f = curve.faithfulness["eap"]
    assert f.dtype == torch.float32
    assert float(f[0]) == pytest.approx(0.0, abs=1e-6) and float(f[-1]) == pytest.approx(1.0, abs=1e-6)
    curve.plot(path=str(tmp_path / "curve.png"))
    assert os.path.getsize(tmp_path / "curve.png") > 0
    f_mid = faithfulness(model, sc.circuit(n=5).edges, clean, corr, metric=metric)
    assert isinstance(f_mid, float) and f_mid == pytest.approx(float(f[1]), abs=1e-6)


def test_faithfulness_undefined_warns_and_is_nan():
    """Clean and corrupted prompts that give the same metric leave faithfulness undefined (0 / 0): NaN, with a
    warning that says why, never a number."""
    import warnings

    from pypattern.circuits import edges, faithfulness
    from pypattern.models import Transformer, TransformerConfig
    from pypattern.patching import LogitDiff

    model = Transformer(
        TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=9, n_ctx=5, dtype=torch.float64)
    )
    x = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        f = faithfulness(
            model, torch.ones(len(edges(model)), dtype=torch.bool), x, x, metric=LogitDiff([1, 2], [3, 4])
        )
    assert math.isnan(float(f))
    assert any("faithfulness is undefined" in str(w.message) for w in seen)


def test_results_round_trip_and_damaged_files_are_refused(tmp_path):
    """Pruning curves save and load like every result; an EdgeScores or Circuit file whose arrays do not fit its
    graph (a mask of 3 entries for a graph of 110 edges, a missing array) is a FormatError naming the file."""
    import numpy as np

    from pypattern import io
    from pypattern.circuits import Circuit, EdgeScores, PruningCurve

    model = tiny(seed=3)
    clean, corr, ans, wrong = prompts(model, seed=4)
    metric = LogitDiff(ans, wrong)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    curve = pruning_curve(model, sc, clean, corr, metric=metric, counts=[0, 5, len(sc.graph)])
    curve.save(tmp_path / "curve.npz")
    back = PruningCurve.load(tmp_path / "curve.npz")
    assert torch.equal(back.counts, curve.counts) and back.m_full == curve.m_full
    assert all(torch.equal(back.faithfulness[k], curve.faithfulness[k]) for k in curve.faithfulness)
    circuit = sc.circuit(n=5)
    circuit.save(tmp_path / "c.npz")
    assert torch.equal(Circuit.load(tmp_path / "c.npz").mask, circuit.mask)
    arrays, meta = io.load(tmp_path / "c.npz", kind="Circuit")
    io.save(tmp_path / "short.npz", {"mask": np.ones(3, dtype=bool)}, meta, kind="Circuit")
    with pytest.raises(io.FormatError, match="short.npz"):
        Circuit.load(tmp_path / "short.npz")
    sc.save(tmp_path / "s.npz")
    arrays, meta = io.load(tmp_path / "s.npz", kind="EdgeScores")
    io.save(
        tmp_path / "noval.npz", {k: v for k, v in arrays.items() if k != "values"}, meta, kind="EdgeScores"
    )
    with pytest.raises(io.FormatError, match="noval.npz"):
        EdgeScores.load(tmp_path / "noval.npz")


def test_edge_sets_given_as_one_edge_a_name_or_a_circuit(setup):
    """One Edge, one edge name and a Circuit (as acdc returns) are edge sets like a list of them."""
    model, clean, corr, metric = setup
    g = edges(model)
    e = g[7]
    want = patch_edges(model, [e], clean, corr, metric=metric)
    torch.testing.assert_close(patch_edges(model, e, clean, corr, metric=metric), want, rtol=0, atol=0)
    torch.testing.assert_close(patch_edges(model, e.name, clean, corr, metric=metric), want, rtol=0, atol=0)
    circ = circuit_from_edges(g, [g[i] for i in range(0, len(g), 3)])
    f = faithfulness(model, circ, clean, corr, metric=metric)
    assert f == pytest.approx(faithfulness(model, circ.edges, clean, corr, metric=metric), abs=1e-12)


def test_metrics_of_other_dtypes_nan_values_and_no_gradient():
    """A metric computed in float64 (or returning bool) on a float32 model is cast; a NaN for one example is
    kept, not a crash; EAP with a metric that has no gradient is refused naming the metric and the exact method."""
    model = tiny(seed=5, dtype=torch.float32)
    clean, corr, ans, wrong = prompts(model, B=4, seed=6)
    ld = LogitDiff(ans, wrong)
    g = edges(model)
    sets = [[g[i] for i in range(j, len(g), 5)] for j in range(3)]
    want = patch_edges(model, sets, clean, corr, metric=ld)

    def ld64(logits):
        return ld(logits.double())

    got = patch_edges(model, sets, clean, corr, metric=ld64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    f = faithfulness(model, sets[0], clean, corr, metric=ld64)
    assert f == pytest.approx(faithfulness(model, sets[0], clean, corr, metric=ld), rel=1e-4)
    won = patch_edges(model, sets, clean, corr, metric=lambda x: ld(x) > 0)
    assert torch.equal(won, (want > 0).float())

    def with_nan(logits):
        v = ld(logits)
        return torch.cat([v[..., :1] * float("nan"), v[..., 1:]], -1)

    got = patch_edges(model, sets, clean, corr, metric=with_nan)
    assert torch.isnan(got[:, 0]).all()
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="metric has no gradient.*method='exact'"):
        edge_attribution(model, clean, corr, metric=lambda x: ld(x).detach(), method="eap")
    with pytest.raises(TypeError, match="clean is a list"):
        patch_edges(model, sets[0], clean.tolist(), corr, metric=ld)
    # a tokenizer's output is read as its ids (and mask): here none
    torch.testing.assert_close(
        edge_attribution(model, {"input_ids": clean}, corr, metric=ld).values,
        edge_attribution(model, clean, corr, metric=ld).values,
        rtol=0,
        atol=0,
    )
    with pytest.raises(TypeError, match=r"clean is a dict without 'input_ids'"):
        edge_attribution(model, {"ids": clean}, corr, metric=ld)


def test_edges_refuse_a_seq_len_without_positions(setup):
    model = setup[0]
    assert len(edges(model, per_position=True, seq_len=3)) == 3 * len(edges(model))
    with pytest.raises(ValueError, match="seq_len=5 counts the positions of per-position edges"):
        edges(model, seq_len=5)
    with pytest.raises(TypeError, match="per_position='yes' is not valid"):
        edges(model, per_position="yes")


def test_faithfulness_with_a_gap_at_rounding_level_warns():
    """Corrupted prompts that move the metric by a rounding-level amount make every faithfulness value mostly
    rounding: a warning that says so (the values are still returned)."""
    import warnings

    from pypattern.circuits import edges, faithfulness
    from pypattern.models import Transformer, TransformerConfig

    model = Transformer(
        TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=9, n_ctx=5, dtype=torch.float64)
    )
    x = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 9  # moves the metric a little

    def metric(logits):  # a large constant plus a tiny multiple of a logit: a gap of about 1e-9 of the metric
        return 1e3 + 1e-6 * logits[..., 1]

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        f = faithfulness(model, torch.ones(len(edges(model)), dtype=torch.bool), x, y, metric=metric)
    assert math.isfinite(float(f))
    assert any("gap at rounding level" in str(w.message) for w in seen)
    with warnings.catch_warnings(record=True) as seen:  # a real gap: no warning
        warnings.simplefilter("always")
        faithfulness(
            model, torch.ones(len(edges(model)), dtype=torch.bool), x, y, metric=lambda lg: lg[..., 1]
        )
    assert not any("rounding level" in str(w.message) for w in seen)


def test_exact_scores_resume_from_a_checkpoint_and_refuse_another_run(tmp_path, monkeypatch):
    """Exact scoring written to a checkpoint as it goes: a call stopped part-way resumes where it stopped and gives
    the uninterrupted scores; a finished file returns them without running; a call with other prompts, metric or
    weights is refused, naming what differs."""
    from pypattern import io
    from pypattern.circuits import api, edge_attribution
    from pypattern.circuits.engine import EdgeEngine
    from pypattern.models import Transformer, TransformerConfig
    from pypattern.patching import LogitDiff

    model = Transformer(
        TransformerConfig(
            n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, dtype=torch.float64
        )
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 20, (3, 6), generator=g), torch.randint(0, 20, (3, 6), generator=g)
    metric = LogitDiff([1, 2, 3], [4, 5, 6])
    kw = dict(metric=metric, method="exact", max_batch=7, quiet=True)
    ref = edge_attribution(model, clean, corr, **kw)
    path = str(tmp_path / "exact.npz")
    monkeypatch.setattr(api, "_CHECKPOINT_EVERY_S", 0.0)
    real_run, calls = EdgeEngine.run, {"n": 0}

    def stopping_run(self, masks):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_run(self, masks)

    monkeypatch.setattr(EdgeEngine, "run", stopping_run)
    with pytest.raises(KeyboardInterrupt):
        edge_attribution(model, clean, corr, checkpoint=path, **kw)
    _, meta = io.load(path, kind="ExactEdgeScoresCheckpoint")
    assert 0 < meta["done"] < len(ref.graph)
    calls["n"] = -(10**9)  # no more stops
    resumed = edge_attribution(model, clean, corr, checkpoint=path, **kw)
    torch.testing.assert_close(resumed.values, ref.values, rtol=0, atol=1e-12)
    monkeypatch.setattr(
        EdgeEngine, "run", lambda self, masks: pytest.fail("a finished checkpoint runs nothing")
    )
    again = edge_attribution(model, clean, corr, checkpoint=path, **kw)
    torch.testing.assert_close(again.values, ref.values, rtol=0, atol=1e-12)
    monkeypatch.setattr(EdgeEngine, "run", real_run)
    with pytest.raises(io.FingerprintMismatch, match="corrupted"):
        edge_attribution(model, clean, corr.flip(0), checkpoint=path, **kw)
    with pytest.raises(io.FingerprintMismatch, match="metric"):
        edge_attribution(
            model, clean, corr, checkpoint=path, **{**kw, "metric": LogitDiff([1, 2, 3], [4, 5, 7])}
        )
    with torch.no_grad():
        model.blocks[0].attn.W_Q.add_(1e-3)
    with pytest.raises(io.FingerprintMismatch, match="weights"):
        edge_attribution(model, clean, corr, checkpoint=path, **kw)
    with pytest.raises(ValueError, match="checkpoint= applies to method='exact' only"):
        edge_attribution(model, clean, corr, metric=metric, method="eap", checkpoint=path)
    with pytest.raises(TypeError, match="quiet="):
        edge_attribution(model, clean, corr, metric=metric, method="exact", quiet=1)


def test_acdc_refuses_a_quiet_that_is_not_a_bool():
    from pypattern.circuits import acdc
    from pypattern.models import Transformer, TransformerConfig
    from pypattern.patching import LogitDiff

    model = Transformer(TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=9, n_ctx=5))
    x = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="quiet="):
        acdc(model, x, x.flip(0), metric=LogitDiff([1, 2], [3, 4]), threshold=0.1, quiet="no")


@pytest.mark.parametrize("every", [0.0, 1e9])
@pytest.mark.parametrize("threshold,per_position", [(0.05, False), (0.0, False), (0.05, True)])
def test_acdc_resumes_from_a_checkpoint_and_refuses_another_run(
    tmp_path, monkeypatch, threshold, per_position, every
):
    """ACDC's state written to a checkpoint as it goes: a search stopped part-way (at several points) resumes and
    gives the uninterrupted circuit, scores and run count; a finished file returns the circuit without running; a
    call with another threshold, prompts or weights is refused, naming what differs. With ``every`` 1e9 seconds
    between timed writes, the only state before the stop is the one written when it stops (the state after the
    last finished destination input, not the half-decided one it was in)."""
    from pypattern import io
    from pypattern.circuits import acdc, api
    from pypattern.circuits.engine import EdgeEngine
    from pypattern.models import Transformer, TransformerConfig
    from pypattern.patching import LogitDiff

    model = Transformer(
        TransformerConfig(
            n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, dtype=torch.float64, seed=3
        )
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 20, (3, 5), generator=g), torch.randint(0, 20, (3, 5), generator=g)
    kw = dict(
        metric=LogitDiff([1, 2, 3], [4, 5, 6]), threshold=threshold, max_batch=3, quiet=True,
        per_position=per_position,
    )  # fmt: skip
    ref = acdc(model, clean, corr, **kw)
    assert 0 < int(ref.mask.sum()) < len(ref.graph) or threshold == 0.0
    monkeypatch.setattr(api, "_CHECKPOINT_EVERY_S", every)
    real_run = EdgeEngine.run
    resumes = 0
    for stop_at in (3, 9, 17):
        path = str(tmp_path / f"acdc{stop_at}.npz")
        calls = {"n": 0}

        def stopping_run(self, masks, calls=calls, stop_at=stop_at):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            return real_run(self, masks)

        monkeypatch.setattr(EdgeEngine, "run", stopping_run)
        with pytest.raises(KeyboardInterrupt):
            acdc(model, clean, corr, checkpoint=path, **kw)
        monkeypatch.setattr(EdgeEngine, "run", real_run)
        if not os.path.exists(path):  # stopped before the first destination input was done
            continue
        _, meta = io.load(path, kind="ACDCCheckpoint")
        assert 0 < meta["next"] < ref.graph.n_dst
        resumed = acdc(model, clean, corr, checkpoint=path, **kw)
        assert torch.equal(resumed.mask, ref.mask)
        torch.testing.assert_close(resumed.scores, ref.scores, rtol=0, atol=1e-12)
        assert resumed.info["num_runs"] == ref.info["num_runs"]
        assert resumed.info["num_untested"] == ref.info["num_untested"]
        assert resumed.faithfulness == pytest.approx(ref.faithfulness, abs=1e-12)
        resumes += 1
    assert resumes >= 2
    monkeypatch.setattr(EdgeEngine, "run", lambda self, masks: pytest.fail("a finished search runs nothing"))
    again = acdc(model, clean, corr, checkpoint=path, **kw)
    assert torch.equal(again.mask, ref.mask)
    monkeypatch.setattr(EdgeEngine, "run", real_run)
    with pytest.raises(io.FingerprintMismatch, match="threshold"):
        acdc(model, clean, corr, checkpoint=path, **{**kw, "threshold": threshold + 0.01})
    with pytest.raises(io.FingerprintMismatch, match="clean"):
        acdc(model, clean.flip(0), corr, checkpoint=path, **kw)
    with torch.no_grad():
        model.blocks[1].mlp.W_in.add_(1e-3)
    with pytest.raises(io.FingerprintMismatch, match="weights"):
        acdc(model, clean, corr, checkpoint=path, **kw)
    with pytest.raises(TypeError, match="checkpoint="):
        acdc(model, clean, corr, checkpoint=3, **kw)
