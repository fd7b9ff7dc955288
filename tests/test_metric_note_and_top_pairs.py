"""A user's metric that raises on the logits it is given (written for another layout) gets a note naming the shape
it received and the contract; the circuits functions take ``EdgeScores.top(n)``'s (edge, score) pairs as the set
of those edges."""

import pytest
import torch

from pypattern.circuits import edge_attribution, faithfulness, patch_edges
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import activation_patching, attribution_patching

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=3, dtype=torch.float64)
    return Transformer(TransformerConfig(**cfg))


def _prompts():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (3, 6), generator=g)
    corr = torch.randint(0, 20, (3, 6), generator=g)
    return clean, corr


ANSWER = torch.tensor([1, 2, 3])


def _positions_metric(logits):
    # written for logits (batch, pos, vocab): on (batch, vocab) the index has one dimension too many
    return logits[:, -1].gather(-1, ANSWER[:, None]).mean()


def _metric(logits):
    return logits.gather(-1, ANSWER.expand(*logits.shape[:-1])[..., None])[..., 0]


CALLS = {
    "activation_patching": lambda m, c, r, f: activation_patching(m, "resid_pre", c, r, metric=f),
    "attribution_patching": lambda m, c, r, f: attribution_patching(m, c, r, metric=f, sites=["z"]),
    "edge_attribution eap": lambda m, c, r, f: edge_attribution(m, c, r, metric=f, method="eap"),
    "edge_attribution exact": lambda m, c, r, f: edge_attribution(m, c, r, metric=f, method="exact"),
    "patch_edges": lambda m, c, r, f: patch_edges(m, ["embed->L0H0.q"], c, r, metric=f),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_metric_raising_on_its_logits_names_what_it_was_given(call):
    model = _model()
    clean, corr = _prompts()
    with pytest.raises(RuntimeError) as info:
        CALLS[call](model, clean, corr, _positions_metric)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "metric=_positions_metric" in notes
    assert "logits of shape (3, 20)" in notes
    assert "per-example values (..., batch)" in notes
    # a metric within the contract runs
    CALLS[call](model, clean, corr, _metric)


def test_top_pairs_are_the_set_of_their_edges():
    model = _model()
    clean, corr = _prompts()
    scores = edge_attribution(model, clean, corr, metric=_metric, method="eap")
    top = scores.top(7)
    assert all(isinstance(p, tuple) and len(p) == 2 for p in top)
    named = [e for e, _ in top]
    want = faithfulness(model, named, clean, corr, metric=_metric)
    got = faithfulness(model, top, clean, corr, metric=_metric)
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
    assert torch.equal(
        patch_edges(model, top, clean, corr, metric=_metric),
        patch_edges(model, named, clean, corr, metric=_metric),
    )
    # the pairs name the same edges as the circuit of the top 7
    assert set(named) == set(scores.circuit(7).edges)


def test_a_list_of_sets_is_still_read_as_sets():
    model = _model()
    clean, corr = _prompts()
    sets = [["embed->L0H0.q"], ["embed->L0H0.q", "embed->L0H1.k"]]
    both = patch_edges(model, sets, clean, corr, metric=_metric)
    assert both.shape == (2, 3)
    for i, s in enumerate(sets):
        assert torch.equal(both[i], patch_edges(model, s, clean, corr, metric=_metric))
