"""Input checks of the circuits API that name what was given (an index tensor for a mask, scores or a circuit of
another graph), and the circuits functions against per-edge hooks on the plain model (tests/_circuits_reference.py)
where the engine batches, bounds memory and reads metrics at several positions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _circuits_reference import naive_patch, prompts, tiny

from pypattern.circuits import edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setting():
    model = tiny()
    clean, corr, ans, wrong = prompts(model)
    return model, clean, corr, LogitDiff(ans, wrong, position=-1)


# ------------------------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize("call", ["patch_edges", "faithfulness"])
def test_an_index_tensor_for_edges_gets_the_index_hint_not_a_length_mismatch(setting, call):
    model, clean, corr, metric = setting
    fn = patch_edges if call == "patch_edges" else faithfulness
    with pytest.raises(ValueError, match=r"\[graph\.edges\[i\] for i in idx\]") as err:
        fn(model, torch.tensor([0, 5, 7]), clean, corr, metric=metric)
    assert "mask over 3 edges" not in str(err.value)
    with pytest.raises(ValueError, match=r"0\.5.*edges\.bool\(\) of a threshold"):
        fn(model, torch.full((len(edges(model)),), 0.5), clean, corr, metric=metric)
    # a mask of 0s and 1s is still a mask: the set it spells, as its boolean form
    E = len(edges(model))
    ints = (torch.arange(E) % 3 == 0).long()
    assert torch.equal(
        patch_edges(model, ints, clean, corr, metric=metric),
        patch_edges(model, ints.bool(), clean, corr, metric=metric),
    )


def test_pruning_curve_of_scores_on_two_graphs_names_both(setting):
    model, clean, corr, metric = setting
    flat = edge_attribution(model, clean, corr, metric=metric)
    perpos = edge_attribution(model, clean, corr, metric=metric, per_position=True)
    E, T = len(flat.graph), clean.shape[1]
    with pytest.raises(
        ValueError,
        match=rf"scores\['b'\] is on a graph of {E * T} edges \(per_position=True\), "
        rf"scores\['a'\] on one of {E}",
    ) as err:
        pruning_curve(model, {"a": flat, "b": perpos}, clean, corr, metric=metric, counts=[3], quiet=True)
    assert "give graph=edges" not in str(err.value)
    with pytest.raises(
        ValueError,
        match=rf"scores\['a'\] is on a graph of {E} edges.*scores\['b'\] on one of "
        rf"{E * T}",
    ):
        pruning_curve(model, {"b": perpos, "a": flat}, clean, corr, metric=metric, counts=[3], quiet=True)
    with pytest.raises(ValueError, match=rf"scores is on a graph of {E * T} edges.*graph= on one of {E}"):
        pruning_curve(model, perpos, clean, corr, metric=metric, counts=[3], quiet=True, graph=edges(model))
    with pytest.raises(
        ValueError, match=rf"scores\['b'\] is on a graph of {E * T} edges.*scores\['t'\] \(a tensor"
    ):
        pruning_curve(
            model, {"t": flat.scores, "b": perpos}, clean, corr, metric=metric, counts=[3], quiet=True
        )
    # scores of one graph still make one curve each
    curve = pruning_curve(model, {"a": flat, "b": flat}, clean, corr, metric=metric, counts=[3], quiet=True)
    assert torch.equal(torch.as_tensor(curve.faithfulness["a"]), torch.as_tensor(curve.faithfulness["b"]))


def test_faithfulness_of_a_circuit_with_the_graph_of_another_shape_names_both(setting):
    model, clean, corr, metric = setting
    perpos = edge_attribution(model, clean, corr, metric=metric, per_position=True)
    circuit = perpos.circuit(n=5)
    E, T = len(edges(model)), clean.shape[1]
    with pytest.raises(
        ValueError,
        match=rf"Circuit on a graph of {E * T} edges \(per_position=True\).*one of {E} "
        r"\(per_position=False\)",
    ):
        faithfulness(model, circuit, clean, corr, metric=metric, graph=edges(model))
    with pytest.raises(ValueError, match=rf"Circuit on a graph of {E * T} edges"):
        patch_edges(model, circuit, clean, corr, metric=metric, graph=edges(model))
    # with its own graph, given or not, the circuit is the set of its edges
    want = faithfulness(model, list(circuit.edges), clean, corr, metric=metric, graph=perpos.graph)
    assert faithfulness(model, circuit, clean, corr, metric=metric) == pytest.approx(want, abs=1e-12)
    assert faithfulness(model, circuit, clean, corr, metric=metric, graph=perpos.graph) == pytest.approx(
        want, abs=1e-12
    )


# ------------------------------------------------------------------------------------------------ memory


_MEMORY_CHILD = r"""
import resource, warnings
import torch, pypattern as pp
from pypattern import circuits as C
warnings.simplefilter("ignore")
B, T = 8, 24
m = pp.Transformer(pp.TransformerConfig(n_layers=4, d_model=128, n_heads=8, d_mlp=512, d_vocab=200, n_ctx=32,
                                        dtype=torch.float32, seed=0{opts}))
g = torch.Generator().manual_seed(0)
clean, corr = torch.randint(0, 200, (B, T), generator=g), torch.randint(0, 200, (B, T), generator=g)
metric = pp.LogitDiff(torch.randint(0, 200, (B,), generator=g), torch.randint(0, 200, (B,), generator=g))
graph = C.edges(m, per_position=True, seq_len=T) if {pp} else C.edges(m)
masks = torch.rand(40, len(graph), generator=g) < 0.5
eng, _ = C.prepare_runs(m, graph, clean, corr, metric, memory_budget={budget})
eng.run(masks[:1])  # the engine's caches and the allocator's first pages: the baseline peak
p0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
eng.run(masks)
print(f"chunk={{eng.chunk_size()}} extra={{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - p0}}")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in bytes of ru_maxrss * 1024")
@pytest.mark.parametrize(
    "opts, per_position",
    [("", True), (", normalization_type='RMS', n_key_value_heads=2, gated_mlp=True", True), ("", False)],
    ids=["layernorm per position", "grouped RMS per position", "layernorm"],
)
def test_memory_budget_bounds_the_patched_runs_of_a_wide_model(opts, per_position):
    """A model whose runs are residual-bound (a small vocabulary): the batched patched runs' peak beyond the
    recorded runs stays within the budget (measured in a fresh process), per-position graphs included, whose
    attention inputs are all formed dense."""
    budget = 1e8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = _MEMORY_CHILD.format(opts=opts, pp=per_position, budget=budget)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = {k: float(v) for k, v in (line.split("=") for line in out.stdout.split() if "=" in line)}
    assert 1 < got["chunk"] < 40
    assert got["extra"] <= 1.3 * budget, (
        got
    )  # about 2x the budget per position before their inputs were counted


# ------------------------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batches_are_bounded_and_change_no_value(arch, monkeypatch):
    """Per-position edges, per-example metric positions, both modes: the engine's batches hold at most
    ``max_batch`` edge sets (one under a budget of one byte), and every batching gives the per-edge hooks' values."""
    from _circuits_reference import ARCHS

    from pypattern.circuits.engine import EdgeEngine

    model = tiny(**ARCHS[arch])
    clean, corr, ans, wrong = prompts(model)
    metric = LogitDiff(ans, wrong, position=torch.tensor([5, 3, 5, 4, 2]))
    graph = edges(model, per_position=True, seq_len=clean.shape[1])
    masks = torch.rand(7, len(graph), generator=torch.Generator().manual_seed(3)) < 0.3
    sizes = []
    patched = EdgeEngine._patched
    monkeypatch.setattr(
        EdgeEngine, "_patched", lambda self, M, *a: sizes.append(M.shape[0]) or patched(self, M, *a)
    )
    for mode in ("noise", "denoise"):
        want = torch.stack(
            [naive_patch(model, [graph[i] for i in m.nonzero().flatten()], clean, corr, metric, mode, "resample")
             for m in masks]
        )  # fmt: skip
        for limit in (dict(max_batch=1), dict(max_batch=3), dict(max_memory=1), {}):
            sizes.clear()
            got = patch_edges(model, masks, clean, corr, metric=metric, mode=mode, graph=graph, **limit)
            assert max(sizes) <= limit.get("max_batch", 1 if limit else 7) and sum(sizes) == 7
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
