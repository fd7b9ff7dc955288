"""`pypattern circuit`: every file it writes (edge scores, circuit table, pruning curve table and plot, circuit
drawing, summary) holds the Python API's numbers for the same model, prompts, seed and settings; its options do
what --help says; bad values are usage errors naming the option; a run is deterministic."""

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
from pypattern.circuits import cli as circuit_cli  # noqa: E402
from pypattern.circuits import (  # noqa: E402
    edge_attribution,
    faithfulness,
    pruning_curve,
    results,
)
from pypattern.patching import LogProb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random GPT-2 and a tiny random Llama with grouped-query attention (save_pretrained), clean prompts
    as .npy and as text, and corrupted prompts."""
    d = tmp_path_factory.mktemp("circuit_cli")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(d / "gpt2")
    llama = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(d / "llama")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(6, 8))
    corrupted = rng.integers(0, VOCAB, size=(6, 8))
    np.save(d / "tokens.npy", tokens)
    np.save(d / "corrupted.npy", corrupted)
    (d / "tokens.txt").write_text("\n".join(" ".join(map(str, r)) for r in tokens) + "\n")
    return d, tokens, corrupted


@pytest.fixture
def drawn(monkeypatch):
    """The axes of the pruning-curve plot and of the circuit drawing the command makes (and saves)."""
    got = {}
    real_draw, real_plot = results.draw_circuit, results.PruningCurve.plot

    def draw(*a, **k):
        got["drawing"] = real_draw(*a, **k)
        return got["drawing"]

    def plot(self, *a, **k):
        got["plot"] = real_plot(self, *a, **k)
        return got["plot"]

    monkeypatch.setattr(results, "draw_circuit", draw)
    monkeypatch.setattr(results.PruningCurve, "plot", plot)
    return got


def _run(argv) -> dict:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert circuit_cli.main(argv) == 0
    return json.loads(out.getvalue())


def _plotted(ax) -> dict:
    """Per method: the (x, y) points of its line on the pruning-curve plot."""
    return {
        line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def _drawn_edges(ax, graph) -> dict:
    """The drawing's arrows read back as ``(src, dst, qkv) -> (line width, colour)``, by their end points."""
    from matplotlib.colors import to_rgba
    from matplotlib.patches import FancyArrowPatch

    pos = results._layout(graph)
    off = {"q": -0.22, "k": 0.0, "v": 0.22, None: 0.0}
    ends = {}
    for e in graph.edges:
        key = (e.src, e.dst, e.qkv)
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        ends[(round(x0, 6), round(y0 + 0.12, 6), round(x1 + off[e.qkv], 6), round(y1 - 0.14, 6))] = key
    got = {}
    for p in ax.patches:
        if isinstance(p, FancyArrowPatch):
            (x0, y0), (x1, y1) = p._posA_posB
            key = ends[(round(x0, 6), round(y0, 6), round(x1, 6), round(y1, 6))]
            assert key not in got, f"{key} drawn twice"
            got[key] = (p.get_linewidth(), to_rgba(p.get_edgecolor())[:3])
    return got


def _check_drawing(ax, circuit) -> None:
    """Each node pair of the circuit is one arrow, its width proportional to |score| (summed over positions) and
    blue for a positive score, red for a negative one; no other arrow."""
    from matplotlib.colors import to_rgba

    want = {}
    for i in circuit.mask.nonzero().flatten().tolist():
        e = circuit.graph[i]
        key = (e.src, e.dst, e.qkv)
        want[key] = want.get(key, 0.0) + float(circuit.scores[i])
    got = _drawn_edges(ax, circuit.graph)
    assert set(got) == set(want)
    top = max(abs(v) for v in want.values())
    for key, v in want.items():
        width, colour = got[key]
        assert width == pytest.approx(0.5 + 4.5 * abs(v) / top, rel=1e-9), key
        assert colour == to_rgba("tab:blue" if v >= 0 else "tab:red")[:3], key
    assert len(want) > 3


def _check_files_against_api(
    out, summary, model, clean, corr, metric, ablation, methods, frac, per_position, plot
):
    """edge_scores.csv, pruning_curve.csv (and its plot), circuit.csv and the summary's faithfulness are the API's
    numbers; returns the circuit the drawing should show."""
    kw = dict(metric=metric, ablation=ablation)
    scores = {
        m: edge_attribution(model, clean, corr, method=m, per_position=per_position, quiet=True, **kw)
        for m in methods
    }
    table = pd.read_csv(out / "edge_scores.csv")
    for m, sc in scores.items():
        ref, got = sc.to_pandas(), table[table["method"] == m]
        assert list(got["name"]) == list(ref["name"])
        assert np.array_equal(got["score"].to_numpy(), ref["score"].to_numpy())
        assert np.array_equal(got["rank"].to_numpy(), ref["rank"].to_numpy())
        assert float(np.abs(ref["score"]).max()) > 1e-4  # the edges act
    curve = pruning_curve(model, scores, clean, corr, quiet=True, **kw)
    got = pd.read_csv(out / "pruning_curve.csv")
    ref = curve.to_pandas()
    assert list(got["method"]) == list(ref["method"]) and list(got["edges"]) == list(ref["edges"])
    assert np.array_equal(got["faithfulness"].to_numpy(), ref["faithfulness"].to_numpy())
    assert np.array_equal(got["metric"].to_numpy(), ref["metric"].to_numpy())
    lines = _plotted(plot)
    assert sorted(lines) == sorted(methods)
    for m, (x, y) in lines.items():
        assert np.array_equal(x, curve.counts.numpy()) and np.array_equal(y, curve.faithfulness[m].numpy())
    chosen = methods[-1]
    n = int(round(frac * len(scores[chosen].graph)))
    circuit = scores[chosen].circuit(n=n)
    got = pd.read_csv(out / "circuit.csv")
    ref = circuit.to_pandas()
    assert list(got["name"]) == list(ref["name"]) and len(got) == n == summary["circuit_edges"]
    assert np.array_equal(got["score"].to_numpy(), ref["score"].to_numpy())
    for m, sc in scores.items():
        f = faithfulness(model, sc.circuit(n=n).mask, clean, corr, **kw)
        assert summary["faithfulness_at_fraction"][m] == f
    assert summary["circuit_faithfulness"] == summary["faithfulness_at_fraction"][chosen]
    assert summary["per_position"] is per_position and summary["circuit_method"] == chosen
    return circuit


@pytest.mark.parametrize("corrupted", [False, True])
def test_local_gpt2_files_are_the_api_numbers(files, tmp_path, drawn, corrupted):
    """A GPT-2 folder and a .npy token file: mean ablation over the prompts without --corrupted (one edge per node
    pair), resample ablation with it (one edge per position): every table, the plot's points, the drawing's
    arrows and the summary are edge_attribution / pruning_curve / faithfulness called directly."""
    d, tokens, corrupted_tokens = files
    argv = ["--model", str(d / "gpt2"), "--data", str(d / "tokens.npy"), "--methods", "eap,exact"]
    argv += ["--fraction", "0.2", "--quiet", "--out", str(tmp_path / "out")]
    if corrupted:
        argv += ["--corrupted", str(d / "corrupted.npy"), "--per-position", "yes"]
    summary = _run(argv)
    assert json.loads((tmp_path / "out" / "circuit_summary.json").read_text()) == summary
    model = pp.from_pretrained(d / "gpt2").eval()
    clean = torch.from_numpy(tokens)
    corr = torch.from_numpy(corrupted_tokens) if corrupted else None
    with torch.no_grad():
        metric = LogProb(model(clean)[:, -1].argmax(-1))
    ablation = "resample" if corrupted else "mean"
    assert summary["ablation"] == ablation
    circuit = _check_files_against_api(
        tmp_path / "out", summary, model, clean, corr, metric, ablation, ("eap", "exact"), 0.2, corrupted,
        drawn["plot"],
    )  # fmt: skip
    _check_drawing(drawn["drawing"], circuit)
    assert f"{ablation} ablation" in drawn["plot"].get_title()
    assert drawn["drawing"].get_title().endswith(f"faithfulness {summary['circuit_faithfulness']:.3f}")


def test_llama_with_shared_kv_heads_and_a_text_file_runs_as_the_api_and_repeats_byte_for_byte(
    files, tmp_path, drawn
):
    """A Llama folder (grouped-query attention: edges into the shared key/value heads) and a text token file, one
    edge per position, eap and eap-ig with --ig-steps 2: the files are the API's numbers, the drawing holds the
    circuit's node pairs, and a second run writes the same bytes in every table and picture."""
    d, tokens, _ = files
    argv = [
        "--model",
        str(d / "llama"),
        "--data",
        str(d / "tokens.txt"),
        "--methods",
        "eap-ig",
        "--ig-steps",
        "2",
    ]
    argv += ["--per-position", "yes", "--fraction", "0.3", "--quiet"]
    summary = _run([*argv, "--out", str(tmp_path / "a")])
    model = pp.from_pretrained(d / "llama").eval()
    clean = torch.from_numpy(tokens)
    with torch.no_grad():
        metric = LogProb(model(clean)[:, -1].argmax(-1))
    ig = edge_attribution(
        model, clean, metric=metric, method="eap-ig", steps=2, per_position=True, ablation="mean", quiet=True
    )
    table = pd.read_csv(tmp_path / "a" / "edge_scores.csv")
    assert list(table["name"]) == list(ig.to_pandas()["name"])
    assert np.array_equal(table["score"].to_numpy(), ig.to_pandas()["score"].to_numpy())
    ig5 = edge_attribution(
        model, clean, metric=metric, method="eap-ig", per_position=True, ablation="mean", quiet=True
    )
    assert not np.array_equal(
        table["score"].to_numpy(), ig5.to_pandas()["score"].to_numpy()
    )  # --ig-steps acts
    circuit = ig.circuit(n=int(round(0.3 * len(ig.graph))))
    assert any(e.dst.startswith("L") and "KV" in e.dst for e in circuit.edges)
    _check_drawing(drawn["drawing"], circuit)
    again = _run([*argv, "--out", str(tmp_path / "b")])
    for f in ("edge_scores.csv", "circuit.csv", "pruning_curve.csv", "pruning_curve.png", "circuit.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    drop = (
        "seconds",
        "edge_scores",
        "circuit_table",
        "pruning_curve",
        "pruning_table",
        "circuit_drawing",
        "summary",
    )
    assert {k: v for k, v in summary.items() if k not in drop} == {
        k: v for k, v in again.items() if k not in drop
    }


def test_built_in_task_files_are_the_api_numbers_and_the_seed_decides_them(tmp_path, drawn):
    """The built-in induction task at the fastest settings (--quick, eap): the tables, the plot and the drawing are
    those of run_induction_circuit's model, prompts and scores; the same seed writes the same bytes, another seed
    other scores; --per-position no scores node pairs."""
    from pypattern.circuits.experiments import run_induction_circuit

    argv = ["--quick", "--methods", "eap", "--fraction", "0.1", "--quiet"]
    summary = _run([*argv, "--out", str(tmp_path / "a")])
    res = run_induction_circuit(seed=0, steps=circuit_cli.QUICK_STEPS, methods=("eap",), quiet=True)
    model, (clean, corr, metric) = res["model"], res["prompts"]
    table = pd.read_csv(tmp_path / "a" / "edge_scores.csv")
    ref = res["scores"]["eap"].to_pandas()
    assert list(table["name"]) == list(ref["name"])
    assert np.array_equal(table["score"].to_numpy(), ref["score"].to_numpy())
    direct = edge_attribution(model, clean, corr, metric=metric, method="eap", per_position=True, quiet=True)
    assert torch.equal(direct.scores, res["scores"]["eap"].scores)
    curve = pd.read_csv(tmp_path / "a" / "pruning_curve.csv")
    want = pruning_curve(
        model, {"eap": direct}, clean, corr, metric=metric, counts=list(curve["edges"]), quiet=True
    )
    assert np.array_equal(curve["faithfulness"].to_numpy(), want.faithfulness["eap"].numpy())
    (x, y) = _plotted(drawn["plot"])["eap"]
    assert np.array_equal(x, curve["edges"].to_numpy()) and np.array_equal(
        y, curve["faithfulness"].to_numpy()
    )
    n = int(round(0.1 * len(direct.graph)))
    circuit = direct.circuit(n=n)
    assert list(pd.read_csv(tmp_path / "a" / "circuit.csv")["name"]) == list(circuit.to_pandas()["name"])
    assert summary["circuit_faithfulness"] == faithfulness(model, circuit.mask, clean, corr, metric=metric)
    _check_drawing(drawn["drawing"], circuit)
    _run([*argv, "--out", str(tmp_path / "b")])
    for f in ("edge_scores.csv", "circuit.csv", "pruning_curve.csv", "pruning_curve.png", "circuit.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    _run([*argv, "--seed", "1", "--out", str(tmp_path / "c")])
    other = pd.read_csv(tmp_path / "c" / "edge_scores.csv")
    assert not np.array_equal(other["score"].to_numpy(), table["score"].to_numpy())
    nodes = _run([*argv, "--per-position", "no", "--out", str(tmp_path / "d")])
    assert nodes["per_position"] is False and nodes["num_edges"] < summary["num_edges"]
    assert all(pd.isna(pd.read_csv(tmp_path / "d" / "edge_scores.csv")["pos"]))


def test_quiet_silences_the_stage_messages(files, tmp_path, capsys):
    d, _, _ = files
    argv = ["--model", str(d / "gpt2"), "--data", str(d / "tokens.npy"), "--methods", "eap"]
    assert circuit_cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "circuit: loaded" in err and "eap: scored" in err and "pruning curve done" in err
    assert circuit_cli.main([*argv, "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--fraction", "0"], "--fraction"),
        (["--fraction", "1.01"], "--fraction"),
        (["--fraction", "nan"], "--fraction"),
        (["--methods", "eap,acdc"], "--methods"),
        (["--methods", ","], "--methods"),
        (["--per-position", "maybe"], "--per-position"),
        (["--ig-steps", "0"], "--ig-steps"),
        (["--methods", "eap", "--ig-steps", "3"], "--ig-steps"),
        (["--seed", "-1"], "--seed"),
        (["--steps", "0"], "--steps"),
        (["--quick", "--steps", "5"], "--quick"),
        (["--checkpoint", "ck"], "--checkpoint"),
        (["--corrupted", "c.npy"], "--corrupted"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(extra, option, tmp_path, capsys):
    from pypattern.cli import main

    with pytest.raises(SystemExit) as e:
        main(["circuit", "--quiet", "--out", str(tmp_path / "out"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pypattern circuit: error: ") and option in err[-1]
    assert not (tmp_path / "out").exists()  # nothing is run


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"methods": "eap-ig", "ig_steps": 0}, r"ig_steps=0 is not valid"),
        ({"methods": "eap-ig", "ig_steps": 2.5}, r"ig_steps=2\.5 is not valid"),
        ({"methods": "eap-ig", "ig_steps": True}, r"ig_steps=True is not valid"),
        ({"threads": 0}, r"threads=0 is not valid"),
        ({"threads": "2"}, r"threads='2' is not valid"),
    ],
)
def test_run_circuit_demo_names_its_own_argument(files, tmp_path, kw, match):
    """run_circuit_demo refuses an interpolation step count or a thread count that is not a positive int naming
    its own argument (not edge_attribution's ``steps``, nor torch's set_num_threads) before any work."""
    d, _, _ = files
    kw = {"methods": "eap", **kw}
    with pytest.raises(ValueError, match=match):
        circuit_cli.run_circuit_demo(
            str(tmp_path / "out"), model_dir=str(d / "gpt2"), tokens=str(d / "tokens.npy"), **kw
        )
    assert not (tmp_path / "out").exists()
