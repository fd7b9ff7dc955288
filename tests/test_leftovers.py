"""Edge membership of circuits and graphs, shortlist_and_confirm's memory bound on its AtP stage, and
run_induction_circuit's refusal of training settings for a given model."""

import pytest
import torch

import pypattern.patching.attribution as attribution
from pypattern.circuits import edges
from pypattern.circuits.graph import Edge
from pypattern.circuits.results import Circuit
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw):
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=None, d_vocab=12, n_ctx=8, normalization_type=None)
    cfg.update(kw)
    return Transformer(TransformerConfig(dtype=torch.float64, seed=2, **cfg))


def _prompts():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 12, (4, 6), generator=g)
    corr = clean.clone()
    corr[:, 2] = (clean[:, 2] + 3) % 12
    return clean, corr, LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))


@pytest.mark.parametrize(
    "kw, per_position",
    [({}, False), ({}, True), (dict(d_mlp=32, n_heads=4, n_key_value_heads=2), False)],
)
def test_edge_in_circuit_is_membership_and_refuses_malformed_names(kw, per_position):
    graph = edges(_model(**kw), per_position=per_position, seq_len=3 if per_position else None)
    names = [e.name for e in graph]
    chosen = set(names[::3])
    circ = Circuit(graph, graph.mask(chosen))
    for e in graph:  # membership equals the set the circuit was made from, by name and by Edge
        assert (e.name in circ) == (e.name in chosen) == (e in circ)
        assert e.name in graph and e in graph  # every name the graph makes is spelled as an edge name
    # well formed, but not in this graph (a layer it lacks; a position beyond seq_len; positions on a flat graph)
    for absent in ("L7H0->logits", "embed->L9H1.q", "embed->logits@99", Edge("embed", "MLP5")):
        assert absent not in circ and absent not in graph
    for bad in ("garbage", "L0H0->", "L0H0->L1H1.x", "embed->logits@"):
        with pytest.raises(ValueError, match="edge=.*not an edge name") as err:
            bad in circ  # noqa: B015
        assert not isinstance(err.value, KeyError)
    with pytest.raises(TypeError, match=r"edge=3 \(int\)"):
        3 in circ  # noqa: B015


def _spy_parts(monkeypatch):
    """Record the part size of every split AtP run."""
    seen, orig = [], attribution._atp_in_parts

    def spy(*args, **kwargs):
        seen.append(args[5])
        return orig(*args, **kwargs)

    monkeypatch.setattr(attribution, "_atp_in_parts", spy)
    return seen


def test_shortlist_and_confirm_bounds_its_atp_stage_by_a_given_max_memory(monkeypatch):
    model = _model()
    clean, corr, metric = _prompts()
    ref = attribution.shortlist_and_confirm(model, "z", clean, corr, metric=metric, k=3, max_memory=None)
    seen = _spy_parts(monkeypatch)
    one = attribution.atp_prompt_bytes(model, clean.shape[1], metric, False, ["z"], False)
    budget = int(2.5 * one) + attribution.pack_budget(model, 10**12)
    rows = attribution.shortlist_and_confirm(model, "z", clean, corr, metric=metric, k=3, max_memory=budget)
    assert seen == [2]  # 4 prompts in parts of 2: what fits 2.5 prompts' bytes
    assert [{a: r[a] for a in ("layer", "head", "pos")} for r in rows] == [
        {a: r[a] for a in ("layer", "head", "pos")} for r in ref
    ]
    for r, q in zip(rows, ref):  # per-example estimates: the split changes nothing
        assert r["atp"] == pytest.approx(q["atp"], rel=1e-9, abs=1e-12)
        assert r["exact"] == pytest.approx(q["exact"], rel=1e-9, abs=1e-12)


def test_shortlist_and_confirm_default_memory_leaves_atp_unbounded(monkeypatch):
    """The default bounds the exact stage only: AtP runs unsplit, so a plain callable metric still works."""
    model = _model()
    clean, corr, metric = _prompts()
    got = {}
    orig = attribution.attribution_patching

    def spy(*args, **kwargs):
        got.update(kwargs)
        return orig(*args, **kwargs)

    monkeypatch.setattr(attribution, "attribution_patching", spy)
    rows = attribution.shortlist_and_confirm(
        model, "z", clean, corr, metric=lambda logits: metric(logits), k=2
    )
    assert got["max_memory"] is None and len(rows) == 2


def test_run_induction_circuit_refuses_steps_with_a_given_model(monkeypatch):
    from pypattern.circuits import experiments

    def ran(*a, **k):
        raise AssertionError("the experiment ran")

    monkeypatch.setattr(experiments, "induction_circuit_prompts", ran)
    with pytest.raises(ValueError, match=r"steps=5 .*model=\.\.\."):
        experiments.run_induction_circuit(model=_model(), steps=5)
    with pytest.raises(AssertionError, match="the experiment ran"):  # the default steps: runs
        experiments.run_induction_circuit(model=_model())
