"""Patching inputs found by review: a metric that is not finite on the unpatched model, batch limits of the naive
path, restrictions that select no cell."""

import pytest
import torch

import pypattern as pp
from pypattern.models import Transformer, TransformerConfig


@pytest.fixture(scope="module")
def setup():
    m = Transformer(
        TransformerConfig(
            n_layers=2, d_model=16, n_heads=4, d_mlp=32, d_vocab=20, n_ctx=8, dtype=torch.float64
        )
    )
    c = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    return m, c, (c + 1) % 20, pp.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_metric_that_is_not_finite_on_the_clean_run_is_refused_or_flagged(setup, bad):
    """Not finite for every example: refused (nothing to measure); for some: a warning naming them, the others
    measured as usual."""
    m, c, k, md = setup

    def metric(lg):
        return lg[..., 0] * bad

    def some(lg):
        v = md(lg)
        return torch.cat([v[..., :1] * bad, v[..., 1:]], -1)

    for f in (
        lambda mt: pp.activation_patching(m, "resid_pre", c, k, metric=mt),
        lambda mt: pp.activation_patching(m, "resid_pre", c, k, metric=mt, method="naive"),
        lambda mt: pp.attribution_patching(m, c, k, metric=mt),
    ):
        with pytest.raises(ValueError, match="on the clean run: every example"):
            f(metric)
        with pytest.warns(RuntimeWarning, match="for example 0 on the clean run"):
            r = f(some)
        r = r if isinstance(r, pp.PatchResult) else next(iter(r.values()))  # AtP: one result per site
        assert torch.isfinite(r.values[1]).all()


@pytest.mark.parametrize("kw", [dict(max_batch=0), dict(max_batch="x"), dict(max_memory=-5)])
def test_the_naive_path_checks_its_batch_limits(setup, kw):
    m, c, k, md = setup
    with pytest.raises(ValueError, match="is not valid"):
        pp.activation_patching(m, "resid_pre", c, k, metric=md, method="naive", **kw)


@pytest.mark.parametrize(
    "site, kw",
    [("resid_pre", dict(positions=[])), ("resid_pre", dict(layers=[])), ("z", dict(heads=[]))],
)
def test_restrictions_that_select_nothing_are_refused(setup, site, kw):
    m, c, k, md = setup
    with pytest.raises(ValueError, match="is empty"):
        pp.activation_patching(m, site, c, k, metric=md, **kw)
