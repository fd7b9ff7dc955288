"""pruning_curve given a result that is not a set of edge scores is refused by name."""

import pytest
import torch

import pypattern as pp
from pypattern import circuits
from pypattern.patching import LogitDiff


def _setup():
    cfg = pp.TransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8, seed=0
    )
    m = pp.Transformer(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 11, (3, 5), generator=g)
    corr = torch.randint(0, 11, (3, 5), generator=g)
    return m, clean, corr, LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


def test_a_circuit_as_scores_is_refused_naming_faithfulness():
    m, clean, corr, metric = _setup()
    sc = circuits.edge_attribution(m, clean, corr, metric=metric, method="eap")
    circ = sc.circuit(n=3)
    with pytest.raises(TypeError, match="faithfulness"):
        circuits.pruning_curve(m, circ, clean, corr, metric=metric, counts=[1, 2])
    with pytest.raises(TypeError, match=r"scores\['c'\]"):
        circuits.pruning_curve(m, {"eap": sc, "c": circ}, clean, corr, metric=metric, counts=[1, 2])
    # the accepted forms give the same curve
    a = circuits.pruning_curve(m, sc, clean, corr, metric=metric, counts=[1, 2])
    b = circuits.pruning_curve(m, sc.scores.numpy(), clean, corr, metric=metric, counts=[1, 2])
    assert torch.allclose(torch.as_tensor(a.faithfulness["eap"]), torch.as_tensor(b.faithfulness["scores"]))
