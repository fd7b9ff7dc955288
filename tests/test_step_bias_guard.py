"""A step far too small is not called too large: the given-step bias check skips runs whose chains have not
relaxed, judged at the curvature that holds them, not at one read from a near-zero estimate."""

import warnings

import torch

from pypattern import truth
from pypattern.sampling import estimate_llc
from pypattern.sampling.diagnostics import StepBiasWarning


def test_a_step_far_too_small_is_not_warned_as_too_large():
    m = truth.NormalCrossing([1, 1], dtype=torch.float64)
    loader = torch.utils.data.DataLoader(
        truth.make_normal_crossing_data(2, dtype=torch.float64), batch_size=2
    )
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = estimate_llc(m, loader, step_size=1e-5, nbeta=100.0, localization=1.0, seed=0, quiet=True)
    assert abs(r.llc_mean) < 0.01  # the chains barely moved: the estimate is far below the true 0.35
    assert not [x for x in w if issubclass(x.category, StepBiasWarning)], [str(x.message)[:200] for x in w]
