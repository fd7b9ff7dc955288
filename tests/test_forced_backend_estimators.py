"""A backend forced by ``PYPATTERN_BACKEND`` for the ops that have it (``triton`` for the samplers' kernels, ``cuda``)
does not stop exact patching or the circuits, whose own kernels (prefix attention, signed sums, row dot products)
lack it or cannot run on the tensors given: those take the reference, and the results equal the unforced ones. A
value that is no backend's name is still refused."""

from __future__ import annotations

import pytest
import torch

import pypattern
from pypattern import _backends


def _setup():
    torch.manual_seed(0)
    cfg = pypattern.TransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_mlp=64,
        d_vocab=23,
        n_ctx=16,
        act_fn="gelu_new",
        dtype=torch.float64,
    )
    model = pypattern.Transformer(cfg)
    clean, corr = torch.randint(0, 23, (3, 9)), torch.randint(0, 23, (3, 9))
    metric = pypattern.patching.LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    return model, clean, corr, metric


def _results(model, clean, corr, metric):
    patched = pypattern.patching.activation_patching(model, "resid_pre", clean, corr, metric=metric)
    exact = pypattern.circuits.edge_attribution(model, clean, corr, metric=metric, method="exact")
    eap = pypattern.circuits.edge_attribution(model, clean, corr, metric=metric, method="eap")
    return patched.values, exact.scores, eap.scores


@pytest.mark.parametrize("forced", ["triton", "cuda", "reference"])
def test_estimators_run_under_a_backend_forced_for_other_ops(monkeypatch, forced):
    args = _setup()
    want = _results(*args)
    monkeypatch.setenv("PYPATTERN_BACKEND", forced)
    for op in ("prefix_attention", "signed_sums_", "row_dots"):
        assert _backends.internal_backend(op, torch.device("cpu")) in (None, "reference")
    got = _results(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_name_that_is_no_backend_is_still_refused(monkeypatch):
    monkeypatch.setenv("PYPATTERN_BACKEND", "garbage")
    with pytest.raises(ValueError, match="PYPATTERN_BACKEND='garbage' is not one of"):
        _backends.internal_backend("prefix_attention", torch.device("cpu"))
