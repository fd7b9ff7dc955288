"""A circuits memory_budget below one unit of work (one patched run, one interpolated EAP-IG run) runs one at a
time, as documented, and says so: the warning names memory_budget, the budget and the bytes one unit needs."""

from __future__ import annotations

import warnings

import pytest
import torch

from pypattern import circuits as C
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff


def _setup():
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8)
    model = Transformer(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 11, (3, 6), generator=g)
    corr = torch.randint(0, 11, (3, 6), generator=g)
    return model, clean, corr, LogitDiff(answer=torch.tensor([1, 2, 3]), wrong=torch.tensor([4, 5, 6]))


@pytest.mark.parametrize("method", ["exact", "eap-ig"])
def test_a_budget_below_one_unit_warns_once_naming_it_and_gives_the_same_scores(method):
    model, clean, corr, metric = _setup()
    kw = dict(metric=metric, method=method, quiet=True)
    if method == "eap-ig":
        kw["steps"] = 3
    ref = C.edge_attribution(model, clean, corr, **kw)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = C.edge_attribution(model, clean, corr, memory_budget=1, **kw)
    mine = [w for w in seen if "memory_budget=1 bytes is below" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in seen]
    assert issubclass(mine[0].category, RuntimeWarning)
    assert mine[0].filename == __file__  # points at the caller's line
    need = int(str(mine[0].message).split("an estimated ")[1].split(" bytes")[0])
    assert need > 1
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-12, atol=1e-14)


def test_a_budget_that_fits_one_run_does_not_warn():
    model, clean, corr, metric = _setup()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        C.edge_attribution(model, clean, corr, metric=metric, method="exact", memory_budget=1e9, quiet=True)
    assert not [w for w in seen if "is below the working memory" in str(w.message)]
