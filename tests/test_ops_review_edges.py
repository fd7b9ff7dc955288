"""Edge cases of the kernels' entry points: empty inputs with unusual strides, meta tensors, and PWCCA where the
canonical variates are not unique."""

import pytest
import torch

from pypattern import CrossCovariance
from pypattern.cca import pwcca
from pypattern.ops.covariance import cross_covariance_update_
from pypattern.ops.dots import row_dots


@pytest.mark.parametrize(
    "a",
    [
        torch.randn(0, 5, 3).transpose(1, 2),  # no batch, last dimension of stride 3
        torch.randn(1, 0, 1).expand(1, 0, 5),  # no rows, last dimension of stride 0
    ],
)
def test_row_dots_on_empty_inputs_of_any_strides(a):
    """An empty ``a`` whose last dimension does not have unit stride gives the empty result (torch calls every
    empty tensor contiguous, so a copy "to contiguous" kept its strides and the kernel refused it)."""
    g = [torch.randn(a.shape[0], 2, a.shape[-1])]
    want = row_dots(a, g, backend="reference")
    got = row_dots(a, g)
    assert got.shape == want.shape == (a.shape[0], a.shape[1], 2)


def test_covariance_on_the_meta_device_is_refused_by_name():
    """Meta tensors have no data (and all share address 0, which the aliasing check read as shared memory)."""
    with pytest.raises(ValueError, match="device='meta'"):
        CrossCovariance(3, 2, device="meta")
    m = dict(device="meta", dtype=torch.float64)
    state = [torch.empty(3, **m), torch.empty(2, **m), torch.empty(3, **m), torch.empty(2, **m)]
    with pytest.raises(ValueError, match="meta device"):
        cross_covariance_update_(
            *state, torch.empty(3, 2, **m), torch.empty(0, **m), torch.empty(0, **m),
            torch.empty(4, 3, **m), torch.empty(4, 2, **m), count=0,
        )  # fmt: skip


def _shared(n, p, q, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64), torch.randn(
        n, q, generator=g, dtype=torch.float64
    )


def test_pwcca_refuses_tied_unit_correlations_next_to_others():
    """With 10 + 9 directions of variance over 16 samples (15 after centring) x and y share 4 directions: four
    canonical correlations are 1, their variates any basis of the shared subspace, and PWCCA's L1 weights differ
    between bases (a rotation of y moved the value by 2e-3). Refused, naming the count and why; all correlations
    equal to 1 (x against itself) are fine, and so is the same data with enough samples."""
    x, y = _shared(16, 10, 9)
    with pytest.raises(ValueError, match=r"4 canonical correlations equal 1 \(x has 10 and y 9 directions"):
        pwcca(x, y)
    with pytest.raises(ValueError, match="2 canonical correlations equal 1; "):  # two columns in common
        pwcca(x[:, :5], torch.cat([x[:, :2], y[:, :3]], 1))
    assert abs(pwcca(x[:, :5], x[:, :5]) - 1.0) < 1e-12
    x, y = _shared(40, 10, 9)
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    assert abs(pwcca(x, y) - pwcca(x, y @ q)) < 1e-12  # unique variates: a rotation of y changes nothing
