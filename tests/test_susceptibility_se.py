"""The jackknife standard error of devinterp-convention susceptibilities leaves each chain out of both runs."""

import numpy as np
import torch
from torch import nn

import pypattern as pp


def test_devinterp_standard_errors_include_the_unrestricted_runs_error():
    """For a component that moves every weight, the unrestricted run and the component's run share their noise,
    so the devinterp chi is the physics chi / nbeta * (D - 1) / D (D pooled draws) draw for draw, and so are its
    leave-one-chain-out estimates: the standard errors scale by the same factor. They did not (ratios 0.56-1.13):
    the leave-one-out estimates used the unrestricted run's means over every chain, leaving its error out."""
    torch.manual_seed(0)
    n, d = 20, 3
    x = torch.randn(n, d, dtype=torch.float64)
    y = x @ torch.randn(d, dtype=torch.float64) + 0.3 * torch.randn(n, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():  # off the least-squares minimum: E_full moves, the devinterp term is not zero
        th = torch.linalg.lstsq(torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1), y[:, None]).solution
        model.weight.copy_(th[:d, 0][None] + 0.3)
        model.bias.copy_(th[d:, 0] - 0.3)
    xp = torch.randn(6, d, dtype=torch.float64)
    probe = (xp, xp.sum(1, keepdim=True))
    C, draws, nbeta = 6, 60, 10.0
    kw = dict(
        num_chains=C, num_draws=draws, num_steps_bw_draws=2, num_burnin_steps=50, step_size=1e-2, nbeta=nbeta,
        localization=5.0, seed=7, quiet=True, warn_nonstationary=False,
    )  # fmt: skip
    comp = {"all": ["weight", "bias"]}
    dev = pp.susceptibilities(model, [(x, y[:, None])], probe, comp, convention="devinterp", **kw)
    phy = pp.susceptibilities(model, [(x, y[:, None])], probe, comp, convention="physics", **kw)
    D = C * draws
    np.testing.assert_allclose(dev.chi[0], phy.chi[0] / nbeta * (D - 1) / D, rtol=1e-9)
    # each leave-one-out estimate pools (C - 1) * draws draws
    Dl = (C - 1) * draws
    np.testing.assert_allclose(dev.chi_se[0], phy.chi_se[0] / nbeta * (Dl - 1) / Dl, rtol=1e-6)
