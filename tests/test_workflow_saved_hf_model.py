"""Results of a Hugging Face model's analyses, saved and read back, used where the API takes results, written
to files as figures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.circuits import edge_attribution, faithfulness, pruning_curve
from pypattern.circuits.results import Circuit, EdgeScores
from pypattern.patching.metrics import LogitDiff
from pypattern.sampling.results import LLCResult

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

V, T = 16, 6


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(1, V, (4, T), generator=g)
    corr = clean.clone()
    corr[:, 1] = clean[:, 1] % (V - 1) + 1
    return clean, corr, LogitDiff(clean[:, 1], corr[:, 1], position=-1)


def test_llc_plot_writes_a_file_given_as_path_like_every_result(saved_llama, prompts, tmp_path):
    import matplotlib

    model = pp.from_pretrained(saved_llama)
    clean = prompts[0]
    res = pp.estimate_llc(
        model, [clean] * 2, num_chains=2, num_draws=4, num_burnin_steps=0, step_size=1e-5, nbeta=5.0,
        localization=100.0, seed=0, quiet=True,
    )  # fmt: skip
    res.save(tmp_path / "llc")
    back = LLCResult.load(tmp_path / "llc")
    np.testing.assert_array_equal(back.loss_trace, res.loss_trace)
    backend = matplotlib.get_backend()
    for arg in [str(tmp_path / "a.png"), tmp_path / "b.png"]:
        ax = back.plot(arg)  # positional, as PatchResult.plot / SusceptibilityResult.plot take it
        assert os.path.getsize(arg) > 0
        # the figure shows the loss trace of each chain, read from the result itself
        for c in range(len(back.loss_trace)):
            np.testing.assert_array_equal(ax.lines[c].get_ydata(), back.loss_trace[c])
    back.plot(path=tmp_path / "c.png", title="x")
    assert os.path.getsize(tmp_path / "c.png") > 0
    assert matplotlib.get_backend() == backend
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert back.plot(ax) is ax  # an axes positionally still draws on it
    assert back.plot(ax=ax, path=tmp_path / "d.png") is ax and os.path.getsize(tmp_path / "d.png") > 0
    plt.close(fig)
    with pytest.raises(TypeError, match="ax"):
        back.plot(ax=3)


def test_results_in_the_wrong_argument_give_a_short_error_naming_it(saved_llama, prompts, tmp_path):
    model = pp.from_pretrained(saved_llama)
    clean, corr, metric = prompts
    scores = edge_attribution(model, clean, corr, metric=metric, method="eap", quiet=True)
    scores.save(tmp_path / "eap")
    back = EdgeScores.load(tmp_path / "eap")
    assert torch.equal(back.values, scores.values) and back.graph.n_layers == model.cfg.n_layers
    # the chain that works: a circuit of the loaded scores' top edges, read back, into faithfulness
    circ = back.circuit(n=5)
    circ.save(tmp_path / "circ")
    loaded = Circuit.load(tmp_path / "circ")
    want = faithfulness(model, [e for e, _ in scores.top(5)], clean, corr, metric=metric)
    assert faithfulness(model, loaded, clean, corr, metric=metric) == want
    curve = pruning_curve(model, back, clean, corr, metric=metric, counts=[0, 5, len(back.graph)], quiet=True)
    # the same circuit in a batch of other circuits: equal up to float32 rounding of the metric (1e-8), over a
    # gap m_full - m_empty of about 1e-3 on this untrained model
    assert float(curve.faithfulness["eap"][1]) == pytest.approx(float(want), abs=1e-4)
    # scores given where a circuit is expected: an error naming the argument, short enough to read
    with pytest.raises(TypeError, match="edges=") as e:
        faithfulness(model, back, clean, corr, metric=metric)
    assert len(str(e.value)) < 800, len(str(e.value))
    # the reprs name what the result is without printing its tensors
    grid = pp.activation_patching(model, "z", clean, corr, metric=metric, quiet=True)
    for r in (back, loaded, grid):
        text = repr(r)
        assert len(text) < 400 and type(r).__name__ in text, text
    assert "n_layers=2" in repr(back) and "4 examples" in repr(back) and "5 of" in repr(loaded)
    assert "(4, 2, 4, 6)" in repr(grid)  # (batch, layer, head, pos): the model's layers, heads and positions
    assert grid.coords == {"layer": [0, 1], "head": [0, 1, 2, 3], "pos": list(range(T))}
