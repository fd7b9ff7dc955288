"""A diverging SGNHT run is stopped alike by the sequential chains (the checked step) and the batched chains (the
unchecked fused step after the first): the same chain, the same step and the same reason, for a thermostat whose
update overflows float64 (finite momenta whose squares sum past it) and for an update that overflows the
weights. The momentum kick is checked against the SGNHT update by hand: ``|p| = step_size * nbeta * |grad|``."""

import warnings

import pytest
import torch
from torch import nn

from pypattern.sampling import sample
from pypattern.sampling.diagnostics import SamplingDivergedError


class Weights(nn.Module):
    def __init__(self, n=4, dtype=torch.float64):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=dtype))

    def forward(self, x):
        return self.w + 0 * x.sum()


def _abs_loss(model, batch):
    # gradient 0 at w* = 0 (so the first, checked, step moves by the initial momenta alone), then sign(w): a kick
    # of step_size * nbeta per entry at the second step, of any size nbeta sets, at a loss near L_n(w*) = 1
    return 1.0 + model(batch).abs().sum()


def _run(batched, nbeta, num_draws, dtype=torch.float64):
    loader = [torch.zeros(2, dtype=dtype)]
    kw = dict(
        sampler="sgnht",
        step_size=1e-2,
        nbeta=nbeta,
        localization=0.0,
        num_chains=2,
        num_draws=num_draws,
        num_burnin_steps=0,
        seed=0,
        quiet=True,
        batched=batched,
        warn_nonstationary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sample(Weights(dtype=dtype), loader, loss_fn=_abs_loss, **kw)


def _divergence(batched, nbeta, num_draws, dtype=torch.float64):
    with pytest.raises(SamplingDivergedError) as e:
        _run(batched, nbeta, num_draws, dtype)
    return str(e.value)


@pytest.mark.parametrize("num_draws", [2, 3])
def test_a_thermostat_overflow_stops_both_loops_at_the_same_step(num_draws):
    # a kick of 1e154 per entry: each squared momentum (1e308) is finite, their sum over 4 entries is not
    seq = _divergence(False, 1e156, num_draws)
    bat = _divergence(True, 1e156, num_draws)
    assert "chain 0 diverged at draw 1 (step 1)" in seq
    assert "thermostat" in seq
    assert bat == seq


def test_below_the_overflow_both_loops_run_and_agree():
    # a kick of 1e150: squares sum to about 4e300, finite; the second draw's loss is 1 + |w| after a step of the
    # first momenta alone, the same on both loops
    seq, bat = _run(False, 1e150, 2), _run(True, 1e150, 2)
    torch.testing.assert_close(torch.as_tensor(bat.loss_trace), torch.as_tensor(seq.loss_trace))
    assert (seq.loss_trace[:, 0] == 1.0).all()


def test_an_update_that_overflows_the_weights_stops_both_loops_at_the_same_step():
    # float32 weights: kicks of 3e36 (nbeta near float32's largest number) make a thermostat of ~1e70 (float64,
    # finite) whose friction then drives the next update past float32's range
    seq = _divergence(False, 3e38, 5, torch.float32)
    bat = _divergence(True, 3e38, 5, torch.float32)
    assert "chain 0 diverged at draw 2 (step 2)" in seq
    assert bat.split(":")[0] == seq.split(":")[0]  # the chain, the draw, the step and the step size
    assert "update is not finite" in seq and "non-finite update" in bat
