"""The CCA family: pypattern's ``cca``, ``svcca`` and ``pwcca`` against repsim 0.1.5 (C++/Eigen) on the same data,
in the same run.

Run in the bench venv that has repsim (created by ``bash bench/envs/repsim.sh``)::

    .bench-venvs/repsim/bin/python -m pytest -q bench/bench_cca.py -s --benchmark-columns=min,median,rounds

Without repsim the peer cases skip and the rest still runs.

Work: ``x (2000, 128)``, ``y (2000, 96)`` float64 (y a noisy nonlinear read-out of x's latents). repsim reports
summaries, which are computed here from our canonical correlations ``rho``:

* ``repsim.cca(..., "yanai")`` = ``sum rho^2 / min(p, q)``; ``"pillai"`` = ``sum rho / min(p, q)`` (the
  dimensions are the ranks of the *uncentred* inputs, here ``p`` and ``q``);
* ``repsim.pwcca`` = ``(pwcca(x, y) + pwcca(y, x)) / 2`` (it averages both weightings);
* ``repsim.svcca`` reduces the *orthonormal basis of the uncentred input* (centred, then its leading directions
  with 99% of the variance), not the input itself, and divides by the unreduced ranks: equal to our
  ``svcca(Qx, Qy, reduce="none")`` with ``Qx`` that basis, summarised the same way. (Our ``svcca`` reduces the
  data by its own variance, as Raghu et al. do.)

Checked: every repsim number equals ours to 1e-8.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pypattern.cca import cca, pwcca, svcca

try:
    from importlib.metadata import version as _version

    import repsim

    PEER = f"repsim {_version('repsim')}"
except ImportError:  # pragma: no cover - the main venv has no repsim
    repsim = None
    PEER = None

needs_peer = pytest.mark.skipif(repsim is None, reason="repsim is not importable here")

N, P, Q = 2000, 128, 96
GROUP = f"CCA family {N}x{P} vs {N}x{Q}"


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(N, 24, generator=g, dtype=torch.float64)
    x = lat @ torch.randn(24, P, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        N, P, generator=g, dtype=torch.float64
    )
    y = torch.tanh(lat @ torch.randn(24, Q, generator=g, dtype=torch.float64) / 3) + 0.2 * torch.randn(
        N, Q, generator=g, dtype=torch.float64
    )
    return x.numpy(), y.numpy()


def ours_all(x, y):
    rho = cca(x, y)
    d = min(x.shape[1], y.shape[1])
    pw = 0.5 * (pwcca(x, y) + pwcca(y, x))
    return float((rho**2).sum() / d), float(rho.sum() / d), pw


def peer_all(x, y):
    return (repsim.cca([x, y], "yanai")[0, 1], repsim.cca([x, y], "pillai")[0, 1], repsim.pwcca([x, y])[0, 1])


def _onb(a):
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    return u[:, s > 1e-12 * s[0]]


@needs_peer
def test_same_numbers(data):
    x, y = data
    ours, peer = ours_all(x, y), peer_all(x, y)
    rho = svcca(_onb(x), _onb(y), threshold=0.99, reduce="none")
    sv = float((rho**2).sum() / min(P, Q))
    sv_peer = repsim.svcca([x, y], "yanai")[0, 1]
    print(f"\nvs {PEER}: cca yanai {ours[0]:.10f} / {peer[0]:.10f}, pillai {ours[1]:.10f} / {peer[1]:.10f}, "
          f"pwcca {ours[2]:.10f} / {peer[2]:.10f}, svcca yanai {sv:.10f} / {sv_peer:.10f}")  # fmt: skip
    np.testing.assert_allclose(ours, peer, atol=1e-8)
    assert abs(sv - sv_peer) < 1e-8


def test_ours(benchmark, data):
    x, y = data
    benchmark.extra_info.update(role="ours")
    benchmark.group = GROUP
    benchmark.pedantic(ours_all, args=(x, y), rounds=5, iterations=1, warmup_rounds=1)


@needs_peer
def test_peer(benchmark, data):
    x, y = data
    benchmark.extra_info.update(role="peer", label=PEER)
    benchmark.group = GROUP
    benchmark.pedantic(peer_all, args=(x, y), rounds=3, iterations=1, warmup_rounds=1)
