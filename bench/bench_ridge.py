"""Ridge with the penalty chosen by efficient leave-one-out: pypattern's ``ridge_cv`` against scikit-learn's
``RidgeCV`` on the same data, in the same run, and against the bound of the work both must do.

Run in the bench venv that has scikit-learn (created by ``bash bench/envs/repsim.sh``)::

    .bench-venvs/repsim/bin/python -m pytest -q bench/bench_ridge.py -s --benchmark-columns=min,median,rounds

Without scikit-learn the peer case skips and the rest still runs.

Work: ``x (1000, 2000)``, ``y (1000, 2000)`` float64 (y a noisy linear map of x), penalties ``(0.1, 1, 10)``, one
penalty for all targets (``RidgeCV`` defaults: intercept, mean squared LOO error). With ``n <= p`` both use the
eigendecomposition of the centred Gram ``Xc Xc^T``. Checked: the chosen penalty is the same, coefficients,
intercepts and the best mean LOO error agree to 1e-8.

Bound: the decomposition plus the products, timed bare here: ``Xc Xc^T`` (``n^2 p``), ``eigh`` of it, ``U^T Yc``
(``n^2 t``), one ``U (f * B)`` per penalty (``3 n^2 t``), and the coefficients ``Xc^T (U (d * B))``
(``n^2 t + n p t``): 14 G multiply-adds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pypattern.ridge import ridge_cv

try:
    import sklearn
    from sklearn.linear_model import RidgeCV

    PEER = f"scikit-learn {sklearn.__version__}"
except ImportError:  # pragma: no cover - the main venv has no scikit-learn
    RidgeCV = None
    PEER = None

needs_peer = pytest.mark.skipif(RidgeCV is None, reason="scikit-learn is not importable here")

N, P, T = 1000, 2000, 2000
ALPHAS = (0.1, 1.0, 10.0)
MADDS = N * N * P + N * N * T + len(ALPHAS) * N * N * T + N * N * T + N * P * T


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, P, generator=g, dtype=torch.float64) * torch.rand(P, generator=g, dtype=torch.float64)
    w = torch.randn(P, T, generator=g, dtype=torch.float64) / math.sqrt(P)
    y = x @ w + 0.5 * torch.randn(N, T, generator=g, dtype=torch.float64) + 1.0
    return x, y


def _bound(x, y):
    xc, yc = x - x.mean(0), y - y.mean(0)
    w, u = torch.linalg.eigh(xc @ xc.T)
    b = u.T @ yc
    for a in ALPHAS:
        r = u @ ((w / (w + a))[:, None] * b)
    return xc.T @ (u @ (b / (w + 1.0)[:, None])), r


def test_ours(benchmark, data):
    x, y = data
    benchmark.extra_info.update(role="ours", madds=MADDS)
    benchmark.group = "ridge LOO 1000x2000 -> 2000"
    res = benchmark.pedantic(ridge_cv, args=(x, y, ALPHAS), rounds=5, iterations=1, warmup_rounds=1)
    assert res.alpha in ALPHAS


def test_bound(benchmark, data):
    x, y = data
    benchmark.extra_info.update(role="bound", madds=MADDS, label="eigh + products")
    benchmark.group = "ridge LOO 1000x2000 -> 2000"
    benchmark.pedantic(_bound, args=(x, y), rounds=5, iterations=1, warmup_rounds=1)


@needs_peer
def test_peer_same_numbers(data):
    x, y = data
    ours = ridge_cv(x, y, ALPHAS)
    ref = RidgeCV(alphas=ALPHAS).fit(x.numpy(), y.numpy())
    assert ours.alpha == ref.alpha_
    coef_err = float(np.abs(ours.coef.numpy() - ref.coef_.T).max())
    icpt_err = float(np.abs(ours.intercept.numpy() - ref.intercept_).max())
    score_err = abs(float(ours.loo_mse.min()) + ref.best_score_)
    print(f"\nvs {PEER}: alpha {ours.alpha} / {ref.alpha_}; max |coef diff| {coef_err:.2e}, "
          f"|intercept diff| {icpt_err:.2e}, |best LOO mse diff| {score_err:.2e}")  # fmt: skip
    assert coef_err < 1e-8 and icpt_err < 1e-8 and score_err < 1e-8 * abs(ref.best_score_)


@needs_peer
def test_peer(benchmark, data):
    x, y = data
    xn, yn = x.numpy(), y.numpy()
    benchmark.extra_info.update(role="peer", label=PEER, madds=MADDS)
    benchmark.group = "ridge LOO 1000x2000 -> 2000"
    benchmark.pedantic(lambda: RidgeCV(alphas=ALPHAS).fit(xn, yn), rounds=3, iterations=1, warmup_rounds=1)
