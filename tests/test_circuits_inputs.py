"""Arguments of pypattern.circuits that must not be silently ignored or fail deep inside: another model's graph
before any run is sized by it, per_position against a given graph, an empty dict of scores, steps checked."""

import numpy as np
import pytest
import torch

from pypattern.circuits import acdc, edge_attribution, edges, pruning_curve
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw):
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=3, dtype=torch.float64)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


def _prompts():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (3, 6), generator=g)
    corr = torch.randint(0, 20, (3, 6), generator=g)
    return clean, corr, LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


@pytest.mark.parametrize("method", ["eap", "eap-ig", "exact"])
@pytest.mark.parametrize("other", [dict(d_mlp=None), dict(n_layers=3), dict(n_heads=4, d_head=8)])
def test_another_models_graph_is_refused_by_name(method, other):
    model = _model()
    clean, corr, metric = _prompts()
    with pytest.raises(ValueError, match=r"does not match the model .*build it with edges\(model\)"):
        edge_attribution(model, clean, corr, metric=metric, method=method, graph=edges(_model(**other)))


def test_per_position_against_a_flat_graph_is_refused():
    model = _model()
    clean, corr, metric = _prompts()
    flat = edges(model)
    for call in (
        lambda: edge_attribution(model, clean, corr, metric=metric, per_position=True, graph=flat),
        lambda: acdc(model, clean, corr, metric=metric, threshold=0.1, per_position=True, graph=flat),
    ):
        with pytest.raises(ValueError, match="per_position=True and graph="):
            call()
    # a per-position graph given alone is used as it is
    pos = edges(model, per_position=True, seq_len=6)
    assert edge_attribution(model, clean, corr, metric=metric, graph=pos).graph.per_position


def test_pruning_curve_of_no_scores_and_bad_steps_are_refused():
    model = _model()
    clean, corr, metric = _prompts()
    with pytest.raises(ValueError, match="scores is an empty dict"):
        pruning_curve(model, {}, clean, corr, metric=metric, counts=[1])
    for method in ("eap", "exact"):
        with pytest.raises(ValueError, match="steps=0 is not valid"):
            edge_attribution(model, clean, corr, metric=metric, method=method, steps=0)
    a = edge_attribution(model, clean, corr, metric=metric, method="eap", steps=7)
    assert a.info["steps"] is None and torch.equal(
        a.values, edge_attribution(model, clean, corr, metric=metric, method="eap").values
    )


@pytest.mark.parametrize("kind", ["bool", "int"])
def test_exact_scores_of_an_accuracy_or_integer_metric_are_float_differences(kind):
    """An accuracy (bool per example) or a rank (int64) metric: exact scores are the float differences of each
    edge patched alone from the base run, as patch_edges computes them, and the scores' mean over the examples is
    finite."""
    from pypattern.circuits import patch_edges

    model = _model()
    clean, corr, _ = _prompts()
    with torch.no_grad():
        top = model(clean)[:, -1].argmax(-1)
    if kind == "bool":
        metric = lambda lg: lg.argmax(-1) == top  # noqa: E731
    else:
        metric = lambda lg: (lg > lg[..., torch.arange(3), top, None]).sum(-1)  # noqa: E731
    g = edges(model)
    sc = edge_attribution(model, clean, corr, metric=metric, method="exact", quiet=True)
    assert sc.values.is_floating_point() and sc.values.shape == (3, len(g))
    base = patch_edges(model, torch.zeros(len(g), dtype=torch.bool), clean, corr, metric=metric)
    for e in range(len(g)):
        one = torch.zeros(len(g), dtype=torch.bool)
        one[e] = True
        want = patch_edges(model, one, clean, corr, metric=metric).to(torch.float64) - base.to(torch.float64)
        torch.testing.assert_close(sc.values[:, e].to(torch.float64), want, rtol=0, atol=0)
    assert torch.isfinite(sc.scores).all()


def test_pruning_curve_takes_counts_and_fractions_as_tensors():
    model = _model()
    clean, corr, metric = _prompts()
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    for key, listed in (("counts", [1, 5, 9]), ("fractions", [0.0, 0.25, 1.0])):
        want = pruning_curve(model, sc, clean, corr, metric=metric, **{key: listed})
        for given in (torch.tensor(listed), np.asarray(listed)):
            got = pruning_curve(model, sc, clean, corr, metric=metric, **{key: given})
            assert got.counts.tolist() == want.counts.tolist()
            for k in want.faithfulness:
                torch.testing.assert_close(got.faithfulness[k], want.faithfulness[k])
    with pytest.raises(ValueError, match="counts must be ints"):
        pruning_curve(model, sc, clean, corr, metric=metric, counts=torch.tensor([1.5, 2.0]))


def test_gradient_scores_of_a_model_made_in_inference_mode_are_refused_and_its_flags_kept():
    with torch.inference_mode():
        model = _model()
    clean, corr, metric = _prompts()
    flags = [p.requires_grad for p in model.parameters()]
    for method in ("eap", "eap-ig"):
        with pytest.raises(ValueError, match="inference tensors"):
            edge_attribution(model, clean, corr, metric=metric, method=method)
    assert [p.requires_grad for p in model.parameters()] == flags
    # exact scores need no gradient: they run on it, and leave its flags as they were
    edge_attribution(model, clean, corr, metric=metric, method="exact", quiet=True)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_per_position_edges_over_a_long_context_need_seq_len():
    """A per-position graph defaults to the model's n_ctx only while that stays small: a model with rotary positions
    and a 131,072-token context (as recent Llama configurations have) would lay out millions of edges, so seq_len is
    asked for; with it the graph has the edges of every position, and a small n_ctx still needs none."""
    import pypattern.circuits.graph as graph
    from pypattern.models import Transformer, TransformerConfig

    small = Transformer(TransformerConfig(n_layers=2, n_heads=4, d_model=16, d_mlp=32, n_ctx=8, d_vocab=10))
    assert len(graph.edges(small, per_position=True)) == 8 * len(graph.edges(small)) == 880
    cfg = dict(n_layers=2, n_heads=4, d_model=16, d_mlp=32, d_vocab=10, positional_embedding_type="rotary")
    long = Transformer(TransformerConfig(n_ctx=131072, **cfg)).to("meta")
    assert len(graph.edges(long)) * 131072 > graph.MAX_DEFAULT_POSITION_EDGES
    with pytest.raises(ValueError, match="give seq_len="):
        graph.edges(long, per_position=True)
    assert len(graph.edges(long, per_position=True, seq_len=5)) == 5 * len(graph.edges(long))
