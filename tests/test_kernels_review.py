"""Kernel cases: sampler state that held inf/NaN before a step named as such (and SGNHT's thermostat kept),
a zero-variance column's correlation NaN on every backend, a layer given its input by keyword in the grad Gram,
float32 overflow of the Gram's outer path refused."""

import pytest
import torch
from torch import nn

from pypattern._backends import backends as op_backends
from pypattern.gram import per_sample_grad_gram, per_sample_grad_gram_reference
from pypattern.ops import (
    CrossCovariance,
    grad_gram_embedding,
    grad_gram_linear,
    rmsprop_sgld_step_,
    sgnht_step_,
)


def _step_args():
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64)
    return w, 1e-6 * torch.randn(5, dtype=torch.float64), w.clone()


KW = dict(step_size=1e-6, nbeta=1.0, localization=1.0, seed=0, step=0)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_sgnht_names_momenta_that_held_nan_and_keeps_the_thermostat(backend):
    w, g, a = _step_args()
    p = torch.zeros(5, dtype=torch.float64)
    p[2] = float("nan")
    th = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"held inf/NaN values before the step in momenta\[0\]") as e:
        sgnht_step_([w], [g], [a], [p], th, backend=backend, **KW)
    assert "step_size" not in str(e.value).split("at step")[0]  # not blamed on the step size
    assert th.item() == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("inf")])
def test_rmsprop_names_square_avgs_that_were_invalid(bad):
    w, g, a = _step_args()
    v = torch.zeros(5, dtype=torch.float64)
    v[1] = bad
    with pytest.raises(
        FloatingPointError, match=r"negative or inf/NaN values before the step in square_avgs\[0\]"
    ):
        rmsprop_sgld_step_([w], [g], [a], [v], **KW)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("value", [0.1, 0.3, 3.7])
def test_correlation_of_a_constant_column_is_nan(backend, value):
    if not op_backends("covariance_update_").get(backend, {}).get("available"):
        pytest.skip(f"{backend} not available")
    torch.manual_seed(0)
    acc = CrossCovariance(1, 2, backend=backend)
    acc.update(torch.full((1000, 1), value, dtype=torch.float64), torch.randn(1000, 2, dtype=torch.float64))
    assert torch.isnan(acc.corr()).all()


def test_grad_gram_reads_a_layer_input_given_by_keyword():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(4, 3)

        def forward(self, x):
            return self.l1(input=x)

    torch.manual_seed(0)
    m = M().double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def loss_fn(model, x):
        return model(x).pow(2).sum(-1)

    torch.testing.assert_close(
        per_sample_grad_gram(m, loss_fn, x),
        per_sample_grad_gram_reference(m, loss_fn, x),
        rtol=1e-12,
        atol=1e-12,
    )


def test_float32_gram_overflow_is_refused_on_the_outer_path():
    torch.manual_seed(0)
    a, d = torch.randn(4, 3, 8) * 1e10, torch.randn(4, 3, 8) * 1e10
    for method in ("auto", "outer", "pairwise"):
        with pytest.raises(FloatingPointError, match="give float64 inputs"):
            grad_gram_linear(a, d, method=method)
    assert torch.isfinite(grad_gram_linear(a.double(), d.double(), method="outer")).all()
    ids = torch.randint(0, 5, (4, 3))
    with pytest.raises(FloatingPointError, match="give float64 inputs"):
        grad_gram_embedding(ids, torch.randn(4, 3, 8) * 1e20, method="outer")
