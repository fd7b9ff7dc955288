"""A component the loss does not read, and refined_llc's diagnostics: both chain loops report such a component's
LLC as exactly 0 with a RuntimeWarning naming it (its loss trace varies with the batches only), estimate_llc
restricted to it too, while the components the loss reads keep estimate_llc's numbers; a loss with no gradient
at all is still refused; refined_llc warns as estimate_llc does on an estimate above d / 2."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pypattern.sampling import estimate_llc, refined_llc
from pypattern.sampling.context import LossContractError

KW = dict(
    num_chains=2,
    num_draws=5,
    step_size=1e-3,
    localization=100.0,
    nbeta=10.0,
    seed=1,
    quiet=True,
    warn_nonstationary=False,
)


class TwoHeads(nn.Module):
    """Two linear heads; the forward reads only ``a``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(3, 1)

    def forward(self, x):
        return self.a(x)


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]


def _mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _model():
    torch.manual_seed(0)
    return TwoHeads()


@pytest.mark.parametrize("batched", [True, False])
def test_an_unread_component_has_llc_zero_with_a_warning_naming_it_on_both_loops(batched):
    model, loader = _model(), _data()
    comps = {"A": ["a.weight", "a.bias"], "B": ["b.weight", "b.bias"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = refined_llc(model, loader, components=comps, loss_fn=_mse, batched=batched, **KW)
    unread = [w for w in caught if issubclass(w.category, RuntimeWarning) and "'B'" in str(w.message)]
    assert len(unread) == 1, [str(w.message) for w in caught]
    assert not any("'A'" in str(w.message) for w in caught)
    i = res.component.index("B")
    np.testing.assert_array_equal(res.llc_per_chain[i], np.zeros(2))
    assert res.llc_mean[i] == 0.0 and res.llc_std[i] == 0.0 and res.llc_se[i] == 0.0
    # the rows the loss reads are estimate_llc's own numbers (the unread component changes nothing there)
    for name, restrict in (("full", None), ("A", comps["A"])):
        alone = estimate_llc(model, loader, restrict_to=restrict, loss_fn=_mse, batched=batched, **KW)
        j = res.component.index(name)
        np.testing.assert_allclose(res.llc_per_chain[j], alone.llc_per_chain, rtol=1e-6, atol=1e-9)
        assert np.all(alone.llc_per_chain != 0.0)


def test_both_loops_agree_on_the_unread_component_and_on_the_read_ones():
    model, loader = _model(), _data()
    comps = {"A": ["a.weight", "a.bias"], "B": ["b.weight", "b.bias"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        seq = refined_llc(model, loader, components=comps, loss_fn=_mse, batched=False, **KW)
        bat = refined_llc(model, loader, components=comps, loss_fn=_mse, batched=True, **KW)
    np.testing.assert_allclose(seq.llc_per_chain, bat.llc_per_chain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batched", [True, False])
def test_estimate_llc_restricted_to_unread_weights_is_zero_with_a_warning(batched):
    model, loader = _model(), _data()
    with pytest.warns(RuntimeWarning, match=r"b\.weight"):
        res = estimate_llc(
            model, loader, restrict_to=["b.weight", "b.bias"], loss_fn=_mse, batched=batched, **KW
        )
    assert res.llc_mean == 0.0 and res.llc_std == 0.0
    np.testing.assert_array_equal(res.llc_trace, np.zeros((2, 5)))
    # the trace is still the loss at w* (nothing the loss reads moves), batch by batch
    with torch.no_grad():
        batch_losses = {round(float(_mse(model, b)), 5) for b in loader}
    assert {round(float(v), 5) for v in res.loss_trace.ravel()} <= batch_losses


@pytest.mark.parametrize("batched", [True, False])
def test_a_loss_without_any_gradient_is_still_refused(batched):
    model, loader = _model(), _data()

    def detached(model, batch):
        with torch.no_grad():
            return _mse(model, batch)

    with pytest.raises(LossContractError, match="no gradient"):
        estimate_llc(model, loader, restrict_to=["a.weight"], loss_fn=detached, batched=batched, **KW)


def test_refined_llc_warns_on_an_estimate_above_half_the_dimension_as_estimate_llc_does():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [2.0], [-1.0]]) + 0.1 * torch.randn(64, 1)
    model = nn.Linear(3, 1)
    with torch.no_grad():  # at the least-squares solution
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(64, 1)], 1), y).solution
        model.weight.copy_(sol[:3].T)
        model.bias.copy_(sol[3])
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    kw = dict(
        num_chains=3,
        num_draws=30,
        num_burnin_steps=30,
        step_size=2e-4,
        localization=1.0,
        nbeta=1000.0,
        seed=1,
    )
    kw["quiet"] = True

    def d_half_warnings(fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
        return out, [str(w.message) for w in caught if "exceeds d/2" in str(w.message)]

    alone, want = d_half_warnings(lambda: estimate_llc(model, loader, loss_fn=_mse, **kw))
    assert alone.llc_mean - 3 * alone.llc_se > 2.0 and len(want) == 1  # d = 4: the bound is 2
    res, got = d_half_warnings(
        lambda: refined_llc(model, loader, components={"w": ["weight"]}, loss_fn=_mse, **kw)
    )
    assert res.llc("full") == pytest.approx(alone.llc_mean, rel=1e-9)
    assert got == ["refined_llc(), the unrestricted run: " + want[0]]  # the same text, naming its run


@pytest.mark.parametrize("batched", [True, False])
def test_a_run_read_back_whole_from_its_checkpoint_is_still_reported_unread(tmp_path, batched):
    model, loader = _model(), _data()
    comps = {"A": ["a.weight", "a.bias"], "B": ["b.weight", "b.bias"]}
    path = str(tmp_path / "run.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first = refined_llc(
            model, loader, components=comps, loss_fn=_mse, batched=batched, checkpoint=path, **KW
        )
    with pytest.warns(RuntimeWarning, match="'B'"):
        again = refined_llc(
            model, loader, components=comps, loss_fn=_mse, batched=batched, checkpoint=path, **KW
        )
    np.testing.assert_array_equal(again.llc_per_chain, first.llc_per_chain)
    assert again.llc("B") == 0.0 and again.llc("A") != 0.0
