"""Arguments of pypattern.circuits that must not be silently ignored or fail deep inside: another model's graph
before any run is sized by it, per_position against a given graph, an empty dict of scores, steps checked."""

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
