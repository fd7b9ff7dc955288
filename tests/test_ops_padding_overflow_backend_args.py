"""Audit of the ops layer: every backend that runs here (``reference`` and ``cpp`` on CPU tensors, ``triton`` in
the interpreter where no GPU is visible, compiled on CUDA tensors where one is; see tests/_backend_cases.py) against
computations written out here (naive loops over the terms, autograd through torch's own modules)."""

from __future__ import annotations

import math

import pytest
import torch
from _backend_cases import backend_devices, to

from pypattern.ops import grad_gram_embedding, grad_gram_embedding_reference, grad_gram_pairwise

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairwise_ids_naive(y: torch.Tensor, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``G[i, j] = sum of y_r . y_c`` over the row pairs ``r`` of sample ``i`` and ``c`` of sample ``j`` whose ids
    are equal and >= 0, one term at a time in float64 (pairs that do not match are no term)."""
    y = y.double().cpu()
    ids = ids.cpu().tolist()
    t = y.shape[0] // batch
    g = torch.zeros(batch, batch, dtype=torch.float64)
    for r in range(y.shape[0]):
        for c in range(y.shape[0]):
            if ids[r] >= 0 and ids[r] == ids[c]:
                g[r // t, c // t] += float(y[r] @ y[c])
    return g


@pytest.mark.parametrize("backend, device", backend_devices("grad_gram_pairwise"))
@pytest.mark.parametrize("value", [math.nan, math.inf, 1e200])
def test_grad_gram_pairwise_ids_adds_nothing_for_pairs_that_do_not_match(backend, device, value):
    # A padding row (id -1) or a row whose id no other row has, holding NaN, inf or a float64 value whose
    # products overflow: the pairs it does not match are no term of the sum, on every backend alike (the
    # kernels skip them; 0 * NaN in a dense mask would poison the whole row and column of its sample)
    gen = torch.Generator().manual_seed(31)
    ids = torch.tensor([0, -1, 2, 0, 1, 2, 5, 0])
    for row in (1, 6):  # the padding row, the row with an id of its own
        y = torch.randn(8, 3, generator=gen, dtype=torch.float64)
        y[row, 1] = value
        ref = _pairwise_ids_naive(y, ids, 4)
        got = grad_gram_pairwise(None, *to(device, y, ids), batch=4, backend=backend).cpu()
        assert torch.equal(got.isnan(), ref.isnan()), (row, got, ref)
        assert torch.equal(got.isinf(), ref.isinf()), (row, got, ref)
        finite = torch.isfinite(ref)
        torch.testing.assert_close(got[finite], ref[finite], rtol=1e-12, atol=1e-12)
        assert bool(
            finite[[0, 1, 2, 3], :].sum() >= 12
        )  # only the sample of the row itself may be non-finite


def test_grad_gram_embedding_with_a_gradient_ignores_padding_positions_as_autograd_does():
    # d requires grad, so the automatic choice is the differentiable reference: a NaN in the gradient at a padding
    # position (which nn.Embedding's backward never reads) must not reach the Gram, as with the kernels
    gen = torch.Generator().manual_seed(32)
    ids = torch.tensor([[0, 3, 1], [1, 3, 2], [3, 4, 4]])
    d = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64)
    d[0, 1, 2] = math.nan
    d[2, 0, 0] = math.inf
    emb = torch.nn.Embedding(5, 4, padding_idx=3).double()
    grads = []
    for i in range(3):
        emb.zero_grad()
        emb(ids[i]).backward(d[i])
        grads.append(emb.weight.grad.flatten().clone())
    per_sample = torch.stack(grads)
    assert bool(torch.isfinite(per_sample).all())
    expected = per_sample @ per_sample.T
    dg = d.clone().requires_grad_()
    got = grad_gram_embedding(ids, dg, padding_idx=3, method="pairwise")
    torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)
    # and it stays differentiable: sample 1's rows meet no non-finite value, so its gradient is finite
    (grad,) = torch.autograd.grad(got.sum(), dg)
    assert bool(torch.isfinite(grad[1]).all())
    spec = grad_gram_embedding_reference(ids, d, num_embeddings=5, padding_idx=3)
    torch.testing.assert_close(spec, expected, rtol=1e-12, atol=1e-12)
    for method, backend in (("outer", None), ("pairwise", "cpp"), ("pairwise", "reference")):
        g = grad_gram_embedding(ids, d, padding_idx=3, method=method, backend=backend)
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def _calls_with(backend):
    """One call of every public op with ``backend`` given by the caller."""
    from pypattern.ops import (
        cross_covariance_update_,
        prefix_attention,
        rmsprop_sgld_step_,
        row_dots,
        sgld_step_,
        sgnht_step_,
        signed_sums,
    )
    from pypattern.ops.activations import gelu_tanh

    x = torch.randn(1, 2, 3)
    step = dict(step_size=0.1, nbeta=1.0, localization=1.0, seed=0, step=0, backend=backend)
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    q, kp, kn = torch.randn(1, 1, 2, 2, 4), torch.randn(1, 3, 2, 4), torch.randn(1, 1, 2, 2, 4)
    return {
        "row_dots": lambda: row_dots(x, [x], backend=backend),
        "gelu_tanh": lambda: gelu_tanh(x, backend=backend),
        "signed_sums": lambda: signed_sums([x], [x], [0, 1], [1], backend=backend),
        "prefix_attention": lambda: prefix_attention(
            q, kp, kp, kn, kn, torch.zeros(2, 5, dtype=torch.bool), 0.5, backend=backend
        ),
        "grad_gram_pairwise": lambda: grad_gram_pairwise(x[0], x[0], batch=2, backend=backend),
        "covariance": lambda: cross_covariance_update_(
            z(3), z(3), z(3), z(3), z(3, 3), z(0), z(0), x[0], x[0], count=0, backend=backend
        ),
        "sgld_step_": lambda: sgld_step_([x.clone()], [x], [x.clone()], **step),
        "sgnht_step_": lambda: sgnht_step_([x.clone()], [x], [x.clone()], [x.clone()], z(1), **step),
        "rmsprop_sgld_step_": lambda: rmsprop_sgld_step_([x.clone()], [x], [x.clone()], [x.abs()], **step),
    }


@pytest.mark.parametrize("op", sorted(_calls_with(None)))
def test_a_backend_that_is_no_string_is_refused_by_name(op):
    # 0, False or a list is no backend's name: it must not read as "not given" and quietly take the automatic choice
    for bad in (0, False, ["cpp"]):
        with pytest.raises(TypeError, match=r"backend must be one of .* or None, got "):
            _calls_with(bad)[op]()
    for fine in (None, "", "reference"):  # "" is the automatic choice, as PYPATTERN_BACKEND="" is
        _calls_with(fine)[op]()


@pytest.mark.parametrize("backend, device", backend_devices("sgnht_step_"))
def test_sgnht_thermostat_overflow_of_finite_squared_momenta_is_refused_and_kept(backend, device):
    # every squared momentum is finite (1e308), so no entry is flagged, but their sum overflows float64: the
    # thermostat would silently become inf (and the next step refuse it); it keeps its value and the step says so
    from pypattern.ops import sgnht_step_

    w, g = to(device, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    a = w.clone()
    p = torch.full((4,), 1e154, dtype=torch.float64, device=device)
    assert math.isinf(sum(float(v) ** 2 for v in p.cpu()))  # the float64 sum of the squares is inf
    thermostat = torch.tensor([0.25], dtype=torch.float64, device=device)
    with pytest.raises(
        FloatingPointError, match=r"sgnht_step_: the thermostat's update overflowed .* at step 3"
    ):
        sgnht_step_(
            [w],
            [g],
            [a],
            [p],
            thermostat,
            step_size=1e-3,
            nbeta=1.0,
            localization=0.0,
            noise_scale=0.0,
            seed=0,
            step=3,
            backend=backend,
        )
    assert thermostat.item() == 0.25
    # the moves themselves were finite and are made: p <- p - xi p (no drift, no noise), w <- w + p
    p0 = torch.full((4,), 1e154, dtype=torch.float64)
    assert torch.equal(w.cpu(), p0 + (-0.25 * p0))
    # without check_finite the flags are all 0 (no entry overflowed), as before
    thermostat2 = torch.tensor([0.25], dtype=torch.float64, device=device)
    flags = sgnht_step_(
        [torch.zeros(4, dtype=torch.float64, device=device)],
        [g],
        [a],
        [p.clone()],
        thermostat2,
        step_size=1e-3,
        nbeta=1.0,
        localization=0.0,
        noise_scale=0.0,
        seed=0,
        step=3,
        backend=backend,
        check_finite=False,
    )
    assert flags.tolist() == [0]
