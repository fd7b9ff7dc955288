"""A gradient that is not finite at the very first step is the gradient at w*: the error says so instead of
advising a smaller step size (which cannot help), on both loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pypattern as pp


class SqrtAtZero(nn.Module):
    """loss = sqrt(|w|) summed: finite at w = 0, its gradient is not (d sqrt(x) / dx at 0 is inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        return self.w.abs().sqrt().sum() + 0 * x.sum()


@pytest.mark.parametrize("batched", [True, False])
def test_a_non_finite_gradient_at_w_star_is_named_as_such(batched):
    m = SqrtAtZero()
    data = [torch.ones(2, 1, dtype=torch.float64)] * 4
    with pytest.raises(pp.SamplingDivergedError) as err:
        pp.sample(
            m,
            data,
            loss_fn=lambda model, batch: model(batch),
            num_chains=1,
            num_draws=2,
            num_burnin_steps=0,
            step_size=1e-3,
            nbeta=1.0,
            batched=batched,
            quiet=True,
        )
    msg = str(err.value)
    assert "gradient of the loss at the initial weights w* is not finite" in msg
    assert "smaller step_size" not in msg
    assert err.value.step == 0
