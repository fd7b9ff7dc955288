"""Loading files and paths: saved results whose members disagree in shape are refused when read, naming the file
and the member; every result the library writes loads back; a torch.save token file is told apart from an .npz;
from_pretrained names ``path`` when it is not a path, and names the tensor whose shape config.json contradicts."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern import io
from pypattern.circuits import Circuit, EdgeScores, PruningCurve, edge_attribution, pruning_curve
from pypattern.equivalence import SimilarityTest
from pypattern.flags import FlagTrainResult
from pypattern.patching import LogitDiff, LogProb
from pypattern.sampling import AutoStepReport, CalibrationResult, OnlineLLC, OnlineLLCResult, RefinedLLCResult

pytestmark = pytest.mark.usefixtures("one_thread")


def _rewrite(src, dst, kind: str, arrays: dict | None = None, fields: dict | None = None) -> str:
    """``src`` written again as ``dst`` with some members (``arrays``) or header fields (``fields``, as JSON)
    replaced: a file a reader of another program, or an edit, could leave."""
    a, meta = io.load(src, kind=kind)
    a.update(arrays or {})
    if fields:
        target = meta["fields"] if "fields" in meta else meta
        target.update(fields)
    io.save(dst, a, meta, kind=kind)
    return os.fspath(dst)


def _refused(cls, path, *words):
    """``cls.load(path)`` raises FormatError naming the file and each of ``words`` (the member at fault)."""
    with pytest.raises(io.FormatError) as e:
        cls.load(path)
    msg = str(e.value)
    assert os.path.basename(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ------------------------------------------------------------------------------------------------ models, data


@pytest.fixture(scope="module")
def induction():
    task = pp.InductionTask(d_vocab=16, seq_len=9)
    model = pp.Transformer(task.model_config(d_model=16, n_heads=2, seed=0))
    clean, corr = task.sample(4, seed=1).tokens, task.sample(4, seed=2).tokens
    return model, clean, corr


def _regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(48, 1, generator=g)
    return x, y, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))


KW = dict(
    num_chains=2, num_draws=8, num_burnin_steps=2, step_size=1e-3, nbeta=10.0, localization=10.0, quiet=True
)


# ------------------------------------------------------------------------------------------------ PatchResult


@pytest.fixture(scope="module")
def patch_file(induction, tmp_path_factory):
    model, clean, corr = induction
    res = pp.activation_patching(
        model, "resid_pre", clean, corr, metric=LogProb(torch.zeros(4, dtype=torch.long)), quiet=True
    )
    path = tmp_path_factory.mktemp("patch") / "p.npz"
    res.save(path)
    return res, path


@pytest.mark.parametrize(
    "label, edit, words",
    [
        ("flat", lambda v: v.reshape(-1)[:1], ["values (1,)", "clean (4,)"]),
        ("short", lambda v: v[..., :-1], ["coords['pos']", "values (4, 2, 8)"]),
        ("batch", lambda v: v[:2], ["clean (4,)", "values (2, 2, 9)"]),
        ("grid", lambda v: v[:, :, :, None], ["axes ('layer', 'pos')", "3 grid dimensions"]),
    ],
)
def test_patch_result_whose_values_disagree_with_the_file_is_refused(
    patch_file, tmp_path, label, edit, words
):
    """A PatchResult whose values lost an example, a position or a dimension (so that top() would return cells
    without coordinates, or a later call fail inside torch) is refused on loading, naming the file and the
    members that disagree."""
    res, path = patch_file
    values = io.load(path, kind="PatchResult")[0]["values"]
    bad = _rewrite(
        path, tmp_path / f"{label}.npz", "PatchResult", arrays={"values": np.ascontiguousarray(edit(values))}
    )
    _refused(pp.PatchResult, bad, *words)


def test_patch_result_whose_coords_or_corrupted_disagree_is_refused(patch_file, tmp_path):
    res, path = patch_file
    bad = _rewrite(
        path, tmp_path / "cor.npz", "PatchResult", arrays={"corrupted": np.zeros(3, dtype=np.float32)}
    )
    _refused(pp.PatchResult, bad, "corrupted (3,)")
    fields = io.load(path, kind="PatchResult")[1]["fields"]
    coords = dict(fields["coords"], layer=[0])
    bad = _rewrite(path, tmp_path / "coords.npz", "PatchResult", fields={"coords": coords})
    _refused(pp.PatchResult, bad, "coords['layer']", "1 labels")
    bad = _rewrite(
        path, tmp_path / "axes.npz", "PatchResult", fields={"axes": {"__tuple__": ["layer", "head"]}}
    )
    _refused(pp.PatchResult, bad, "coords", "('layer', 'head')")


def test_patch_results_the_library_writes_load(induction, tmp_path):
    """Exact patching of a per-head site, one without positions, and AtP* (with its graddrop member) load back."""
    model, clean, corr = induction
    metric = LogProb(torch.zeros(4, dtype=torch.long))
    made = [
        pp.activation_patching(model, "z", clean, corr, metric=metric, quiet=True),
        pp.activation_patching(model, "attn_out", clean, corr, metric=metric, per_position=False, quiet=True),
    ]
    made += list(
        pp.attribution_patching(
            model, clean, corr, metric=metric, sites=("z", "resid_pre"), qk_fix=True, grad_drop=True
        ).values()
    )
    for i, r in enumerate(made):
        r.save(tmp_path / f"{i}.npz")
        back = pp.PatchResult.load(tmp_path / f"{i}.npz")
        assert torch.equal(back.values, r.values) and back.axes == r.axes and back.coords == r.coords
        assert back.top(1)[0][0].keys() == set(r.axes)


# ------------------------------------------------------------------------------------------------ circuits


@pytest.fixture(scope="module")
def circuit_files(induction, tmp_path_factory):
    model, clean, corr = induction
    metric = LogitDiff(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    E = len(sc.graph)
    curve = pruning_curve(model, {"eap": sc, "neg": sc}, clean, corr, metric=metric, counts=[0, 3, E])
    circuit = sc.circuit(n=3)
    folder = tmp_path_factory.mktemp("circuits")
    paths = {}
    for name, r in (("EdgeScores", sc), ("PruningCurve", curve), ("Circuit", circuit)):
        paths[name] = folder / f"{name}.npz"
        r.save(paths[name])
    return (sc, curve, circuit), paths


def test_circuit_results_the_library_writes_load(circuit_files):
    (sc, curve, circuit), paths = circuit_files
    assert torch.equal(EdgeScores.load(paths["EdgeScores"]).m_base, sc.m_base)
    back = PruningCurve.load(paths["PruningCurve"])
    assert torch.equal(back.counts, curve.counts) and list(back.faithfulness) == ["eap", "neg"]
    assert torch.equal(Circuit.load(paths["Circuit"]).mask, circuit.mask)


def test_edge_scores_whose_metrics_disagree_with_values_are_refused(circuit_files, tmp_path):
    """m_base and m_clean hold one metric per example of values."""
    _, paths = circuit_files
    p = paths["EdgeScores"]
    bad = _rewrite(p, tmp_path / "mb.npz", "EdgeScores", arrays={"m_base": np.zeros(3)})
    _refused(EdgeScores, bad, "m_base", "(3,)")
    bad = _rewrite(p, tmp_path / "mc.npz", "EdgeScores", arrays={"m_clean": np.zeros((4, 2))})
    _refused(EdgeScores, bad, "m_clean", "(4, 2)")


def test_circuit_whose_faithfulness_is_not_a_number_is_refused(circuit_files, tmp_path):
    _, paths = circuit_files
    bad = _rewrite(paths["Circuit"], tmp_path / "f.npz", "Circuit", fields={"faithfulness": "high"})
    _refused(Circuit, bad, "faithfulness", "'high'")


def test_pruning_curve_whose_curves_disagree_with_counts_is_refused(circuit_files, tmp_path):
    """Each method's faithfulness and metric curve has a point per count; counts lie in 0..num_edges; both dicts
    name the same methods."""
    (_, curve, _), paths = circuit_files
    p = paths["PruningCurve"]
    a = io.load(p, kind="PruningCurve")[0]
    member = next(k for k in a if k.startswith("faithfulness/") and k.endswith("neg"))
    bad = _rewrite(p, tmp_path / "short.npz", "PruningCurve", arrays={member: a[member][:2]})
    _refused(PruningCurve, bad, "faithfulness['neg'] (2,)", "counts (3,)")
    bad = _rewrite(p, tmp_path / "count.npz", "PruningCurve", arrays={"counts": a["counts"] + 1000})
    _refused(PruningCurve, bad, "counts", f"num_edges={curve.num_edges}")
    mv = io.load(p, kind="PruningCurve")[1]["fields"]["metric_values"]
    bad = _rewrite(
        p,
        tmp_path / "keys.npz",
        "PruningCurve",
        fields={"metric_values": {"eap": mv["eap"], "pos": mv["neg"]}},
    )
    _refused(PruningCurve, bad, "metric_values ['eap', 'pos']")


# ------------------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def sampling_results():
    x, y, data = _regression()
    out = {}
    with warnings.catch_warnings():  # advice on the sweep's step sizes: not what these tests are about
        warnings.simplefilter("ignore", UserWarning)
        out["calibration"] = pp.calibrate_step_size(
            _mlp(), data, step_sizes=(1e-4, 1e-3), **{k: v for k, v in KW.items() if k != "step_size"}
        )
    out["refined"] = pp.refined_llc(_mlp(), data, components={"first": ["0.weight", "0.bias"]}, **KW)
    online = OnlineLLC(data, every=1, components={"first": ["0.weight"]}, **KW)
    model = _mlp()
    for step in range(2):
        online(model, step, loss=0.5)
    out["online"] = online.result
    lin = nn.Linear(3, 1)
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
    with torch.no_grad():
        lin.weight.copy_(sol[:3].T)
        lin.bias.copy_(sol[3])
    with warnings.catch_warnings():  # the chosen step's bias against llc_se: not what these tests are about
        warnings.simplefilter("ignore", UserWarning)
        auto = pp.estimate_llc(lin, data, **{**KW, "step_size": "auto"})
    out["auto"] = AutoStepReport.from_dict(auto.sample.config["auto_step"])
    return out


def test_sampling_results_the_library_writes_load(sampling_results, tmp_path):
    for name, r in sampling_results.items():
        r.save(tmp_path / f"{name}.npz")
        back = type(r).load(tmp_path / f"{name}.npz")
        assert type(back) is type(r)
    assert len(sampling_results["auto"].step_size) > 0 and sampling_results["online"].refined


def test_calibration_result_whose_rows_disagree_is_refused(sampling_results, tmp_path):
    p = tmp_path / "c.npz"
    sampling_results["calibration"].save(p)
    bad = _rewrite(p, tmp_path / "llc.npz", "CalibrationResult", arrays={"llc_mean": np.zeros(1)})
    _refused(CalibrationResult, bad, "llc_mean (1,)", "step_sizes (2,)")
    bad = _rewrite(p, tmp_path / "why.npz", "CalibrationResult", fields={"reasons": ["ok"]})
    _refused(CalibrationResult, bad, "reasons", "1 entries")


def test_refined_llc_result_whose_rows_disagree_is_refused(sampling_results, tmp_path):
    p = tmp_path / "r.npz"
    sampling_results["refined"].save(p)
    bad = _rewrite(p, tmp_path / "pc.npz", "RefinedLLCResult", arrays={"llc_per_chain": np.zeros((3, 2))})
    _refused(RefinedLLCResult, bad, "llc_per_chain (3, 2)")
    bad = _rewrite(p, tmp_path / "comp.npz", "RefinedLLCResult", fields={"component": ["full"]})
    _refused(RefinedLLCResult, bad, "component", "1 entries")


def test_online_llc_result_whose_estimates_disagree_is_refused(sampling_results, tmp_path):
    p = tmp_path / "o.npz"
    sampling_results["online"].save(p)
    bad = _rewrite(p, tmp_path / "tl.npz", "OnlineLLCResult", arrays={"train_loss": np.zeros(5)})
    _refused(OnlineLLCResult, bad, "train_loss (5,)", "(estimates,)")
    a = io.load(p, kind="OnlineLLCResult")[0]
    member = next(k for k in a if k.startswith("refined"))
    bad = _rewrite(p, tmp_path / "ref.npz", "OnlineLLCResult", arrays={member: a[member][:1]})
    _refused(OnlineLLCResult, bad, "refined['first'] (1,)")


def test_auto_step_report_whose_trials_disagree_is_refused(sampling_results, tmp_path):
    rep = sampling_results["auto"]
    p = tmp_path / "a.npz"
    rep.save(p)
    bad = _rewrite(p, tmp_path / "llc.npz", "AutoStepReport", fields={"llc": rep.llc[:-1]})
    _refused(AutoStepReport, bad, "llc", f"{len(rep.llc) - 1} entries")
    bad = _rewrite(p, tmp_path / "v.npz", "AutoStepReport", fields={"verdict": [1.0] * len(rep.llc)})
    _refused(AutoStepReport, bad, "verdict", "texts")


# ------------------------------------------------------------------------------------------------ others


def test_similarity_test_whose_members_disagree_is_refused(tmp_path):
    a = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    b = torch.randn(30, 5, generator=torch.Generator().manual_seed(2))
    for i, measure in enumerate(("cka", "procrustes")):
        t = pp.permutation_test(a, b, measure, num_permutations=7)
        t.save(tmp_path / f"{i}.npz")
        assert SimilarityTest.load(tmp_path / f"{i}.npz").p_value == t.p_value
    p = tmp_path / "0.npz"
    bad = _rewrite(p, tmp_path / "null.npz", "SimilarityTest", arrays={"null": np.zeros((7, 2))})
    _refused(SimilarityTest, bad, "null (7, 2)")
    bad = _rewrite(p, tmp_path / "alt.npz", "SimilarityTest", fields={"alternative": "sideways"})
    _refused(SimilarityTest, bad, "alternative", "'sideways'")
    bad = _rewrite(p, tmp_path / "p.npz", "SimilarityTest", fields={"p_value": 0.0})
    _refused(SimilarityTest, bad, "p_value=0.0", "7 permutations")


@pytest.fixture(scope="module")
def flag_results():
    topics = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=12)
    lm = pp.Transformer(topics.model_config(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0))
    spec = pp.FlagSpec("blocks.0.hook_resid_post", dims=(0, 1), num_concepts=2)
    ref = pp.Transformer(topics.model_config(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0))
    train = pp.train_flags(lm, topics, spec, stage1_steps=3, stage2_steps=3, log_every=1, batch_size=8)
    report = pp.flag_report(lm, topics, spec, num_samples=16, gen_steps=2, reference_model=ref)
    return train, report


def test_flag_results_whose_members_disagree_are_refused(flag_results, tmp_path):
    train, report = flag_results
    train.save(tmp_path / "t.npz")
    report.save(tmp_path / "r.npz")
    assert FlagTrainResult.load(tmp_path / "t.npz").stages == train.stages == [1, 1, 1, 2, 2, 2]
    assert pp.FlagReport.load(tmp_path / "r.npz").reference == report.reference
    bad = _rewrite(tmp_path / "t.npz", tmp_path / "tl.npz", "FlagTrainResult", fields={"lm_losses": [1.0]})
    _refused(FlagTrainResult, bad, "lm_losses", "1 entries")
    bad = _rewrite(tmp_path / "t.npz", tmp_path / "st.npz", "FlagTrainResult", fields={"stages": [3] * 6})
    _refused(FlagTrainResult, bad, "stages", "3")
    bad = _rewrite(tmp_path / "r.npz", tmp_path / "acc.npz", "FlagReport", fields={"flag_accuracy": 1.5})
    _refused(pp.FlagReport, bad, "flag_accuracy=1.5")
    bad = _rewrite(
        tmp_path / "r.npz", tmp_path / "rel.npz", "FlagReport", fields={"reliance": report.reliance + 1}
    )
    _refused(pp.FlagReport, bad, "reliance", "loss_ablated - loss_clean")


# ------------------------------------------------------------------------------------------------ token files


def test_torch_save_token_file_is_named_as_such_not_sent_to_npz(tmp_path):
    """A torch.save file (a zip whose pickle is */data.pkl) is not called an .npz: the hint says it is a
    torch.save pickle, which is never loaded, and to write the ids with numpy.save."""
    from pypattern.experiments.user_model import load_tokens

    ids = torch.arange(12).reshape(3, 4)
    for name, legacy in (("t.pt", False), ("t.bin", False), ("t.txt", False), ("old.pt", True)):
        p = tmp_path / name
        torch.save(ids, p, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError) as e:
            load_tokens(p)
        msg = str(e.value)
        assert f"data={str(p)!r}" in msg and "numpy.save (.npy)" in msg, msg
        assert "suffix .npz" not in msg, msg
        assert ("torch.save file" if not legacy else "torch.save's legacy format") in msg, msg
    with open(tmp_path / "z.dat", "wb") as f:
        np.savez(f, tokens=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"as numpy.savez writes: name it with the suffix .npz"):
        load_tokens(tmp_path / "z.dat")


# ------------------------------------------------------------------------------------------------ from_pretrained


@pytest.mark.parametrize("value", [None, 123, b"/tmp/model", 1.5])
def test_from_pretrained_names_path_when_it_is_not_a_path(value):
    with pytest.raises(TypeError) as e:
        pp.from_pretrained(value)
    msg = str(e.value)
    assert msg.startswith(f"path={value!r} ({type(value).__name__}) is not valid"), msg


def test_from_pretrained_names_the_tensor_config_json_contradicts(tmp_path):
    """config.json of another width than the weights: the error names the path, the first tensor whose shape
    differs and both shapes (not transformers' "look at the above report")."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    c = json.loads((tmp_path / "config.json").read_text())
    c["n_embd"] = 32
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError) as e:
        pp.from_pretrained(tmp_path)
    msg = str(e.value)
    assert f"path={str(tmp_path)!r}" in msg, msg
    assert "'transformer.wte.weight' has shape [50, 16] in the checkpoint, [50, 32]" in msg, msg
    assert "above report" not in msg, msg


# ------------------------------------------------------------------------------------------------ bench


def test_bench_torch_load_reads_weights_only():
    """Every torch.load in the benchmarks passes weights_only=True (a state file is never unpickled freely)."""
    bench = pathlib.Path(pp.__file__).resolve().parents[1] / "bench"
    calls = []
    for f in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = (
                    "weights_only" in kw
                    and isinstance(kw["weights_only"], ast.Constant)
                    and kw["weights_only"].value
                )
                calls.append((f.name, node.lineno, bool(ok)))
    assert calls, "no torch.load in bench/"
    assert all(ok for *_, ok in calls), [c for c in calls if not c[2]]
