"""Streaming cross-covariance: our accumulator against the torch reference and against storing every draw and
calling numpy.cov, on K = 64 observables x N = 2048 tokens over 4096 float32 draws.

Work: the co-moment needs ``draws * K * N`` multiply-adds (plus ``draws * (K + N)`` for the variances). Its bound is
one float64 GEMM ``(K x draws) @ (draws x N)`` on already-centred float64 data, measured in the same run. numpy.cov
of the stacked draws computes the whole ``(K + N)^2`` matrix (what one gets from ``numpy.cov(a.T, b.T)``); the
second baseline stores the draws and does the two-pass centred product in numpy (the best one can do by storing).
Streaming keeps ``K N + buffer * (K + N)`` doubles whatever the number of draws; storing keeps all draws.
Threads: bench/conftest.py (default 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pypattern.ops.covariance import CrossCovariance

K, N, DRAWS = 64, 2048, 4096
MADDS = DRAWS * K * N
GROUP = f"covariance: K={K}, N={N}, {DRAWS} float32 draws"


@pytest.fixture(scope="module")
def draws():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(DRAWS, K, generator=g) + 3.0
    b = torch.randn(DRAWS, N, generator=g) + 0.2 * a[:, :1]
    return a, b


def _info(benchmark, role, label, **kw):
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role, label=label, madds=MADDS, threads=torch.get_num_threads(), **kw)


def _stream(a, b, backend, chunk, buffer_draws):
    acc = CrossCovariance(K, N, track_auto="var", backend=backend, buffer_draws=buffer_draws)
    for i in range(0, DRAWS, chunk):
        acc.update(a[i : i + chunk], b[i : i + chunk])
    return acc.cov()


@pytest.mark.parametrize(
    "backend,chunk,buffer_draws,role",
    [
        ("cpp", 256, 0, "ours"),
        ("cpp", 1, 256, "ours"),
        ("reference", 256, 0, "reference"),
        ("reference", 1, 0, "reference"),
    ],
    ids=["cpp-chunk256", "cpp-per-draw-buffered256", "reference-chunk256", "reference-per-draw"],
)
def test_stream(benchmark, draws, backend, chunk, buffer_draws, role):
    a, b = draws
    label = f"{backend}, chunks of {chunk}" + (f" (buffer {buffer_draws})" if buffer_draws else "")
    _info(benchmark, role, label, state_bytes=8 * (K * N + 2 * (K + N) + buffer_draws * (K + N)))
    rounds = 1 if (backend, chunk) == ("reference", 1) else 3
    out = benchmark.pedantic(_stream, args=(a, b, backend, chunk, buffer_draws), rounds=rounds, iterations=1)
    ref = np.cov(a.double().numpy().T, b.double().numpy().T)[:K, K:]
    assert np.abs(out.numpy() - ref).max() < 1e-10 * np.abs(ref).max() + 1e-12


def _store_then_numpy_cov(a, b):
    stored_a, stored_b = [], []
    for i in range(0, DRAWS, 256):  # draws arrive in chunks and are kept
        stored_a.append(a[i : i + 256].numpy())
        stored_b.append(b[i : i + 256].numpy())
    sa, sb = np.concatenate(stored_a).astype(np.float64), np.concatenate(stored_b).astype(np.float64)
    return np.cov(sa.T, sb.T)[:K, K:]


def _store_then_centred_product(a, b):
    sa = np.concatenate([a[i : i + 256].numpy() for i in range(0, DRAWS, 256)]).astype(np.float64)
    sb = np.concatenate([b[i : i + 256].numpy() for i in range(0, DRAWS, 256)]).astype(np.float64)
    sa -= sa.mean(0)
    sb -= sb.mean(0)
    return sa.T @ sb / (DRAWS - 1)


def test_store_then_numpy_cov(benchmark, draws):
    _info(benchmark, "reference", "store all + numpy.cov", state_bytes=8 * DRAWS * (K + N))
    benchmark.pedantic(_store_then_numpy_cov, args=draws, rounds=2, iterations=1)


def test_store_then_centred_product(benchmark, draws):
    _info(benchmark, "reference", "store all + centred product", state_bytes=8 * DRAWS * (K + N))
    benchmark.pedantic(_store_then_centred_product, args=draws, rounds=3, iterations=1)


def test_dgemm_bound(benchmark, draws):
    a, b = draws
    at = (a.double() - a.double().mean(0)).T.contiguous()
    bc = b.double() - b.double().mean(0)
    _info(benchmark, "bound", "one float64 GEMM")
    benchmark.pedantic(torch.mm, args=(at, bc), rounds=5, iterations=1)
