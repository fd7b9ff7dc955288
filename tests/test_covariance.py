"""The streaming cross-covariance accumulator against numpy.cov, for every backend on its device's tensors (see
tests/_backend_cases.py).

Ground truth for large-mean inputs is numpy.cov of the data minus its first row: that subtraction is exact
(Sterbenz) and leaves the covariance unchanged, while numpy.cov of the raw data itself loses about 8 digits there.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _backend_cases import backend_devices, to
from _triton_aot import assert_compiles_for_gpus

import pypattern
from pypattern.ops.covariance import CrossCovariance, cross_covariance_update_

BACKENDS = backend_devices("covariance_update_")


def _truth(a: np.ndarray, b: np.ndarray, ddof: int = 1):
    a = a.astype(np.float64) - a[0].astype(np.float64)
    b = b.astype(np.float64) - b[0].astype(np.float64)
    k = a.shape[1]
    full = np.cov(a.T, b.T, ddof=ddof)
    return full[:k, k:], full[:k, :k], full[k:, k:]


def _stream(acc: CrossCovariance, a: torch.Tensor, b: torch.Tensor, sizes) -> CrossCovariance:
    """Feed ``a`` and ``b`` (moved to the accumulator's device) in chunks of ``sizes`` draws."""
    a, b = to(acc.device, a, b)
    i = 0
    for s in sizes:
        acc.update(a[i : i + s], b[i : i + s])
        i += s
    assert i == a.shape[0]
    return acc


def _np(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _rel(x, y) -> float:
    x, y = _np(x), _np(y)
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-300))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_vs_numpy(backend, device, dtype):
    k, n, m = 19, 37, 700
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(m, n, dtype=dtype) + 0.3 * a[:, :1]
    acc = _stream(
        CrossCovariance(k, n, track_auto="full", backend=backend, device=device), a, b, [0, 1, 250, 0, 3, 446]
    )
    cab, caa, cbb = _truth(a.numpy(), b.numpy())
    assert acc.count == m
    assert _rel(_np(acc.cov()), cab) < 1e-12
    assert _rel(_np(acc.cov_aa()), caa) < 1e-12
    assert _rel(_np(acc.cov_bb()), cbb) < 1e-12
    np.testing.assert_allclose(_np(acc.mean_a), a.double().mean(0).numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(
        _np(acc.cov(ddof=0)), _truth(a.numpy(), b.numpy(), ddof=0)[0], rtol=1e-11, atol=1e-14
    )


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_large_mean_tiny_variance(backend, device):
    # Catastrophic cancellation: mean 1e8, standard deviation 1e-3 (11 significant digits of float64 are noise
    # around the mean). The shifted float64 accumulation keeps the covariance to ~1e-13 relative.
    k, n, m = 5, 17, 600
    g = torch.Generator().manual_seed(1)
    a = 1e8 + 1e-3 * torch.randn(m, k, dtype=torch.float64, generator=g)
    b = -3e7 + 1e-3 * torch.randn(m, n, dtype=torch.float64, generator=g)
    b[:, :k] += 0.5 * (a - 1e8)
    acc = _stream(
        CrossCovariance(k, n, track_auto="var", backend=backend, device=device), a, b, [1, 299, 200, 100]
    )
    cab, caa, cbb = _truth(a.numpy(), b.numpy())
    assert _rel(_np(acc.cov()), cab) < 1e-10
    assert _rel(_np(acc.var_a()), np.diag(caa)) < 1e-10
    assert _rel(_np(acc.var_b()), np.diag(cbb)) < 1e-10
    corr = np.corrcoef(a.numpy().T - a.numpy()[0:1].T, b.numpy().T - b.numpy()[0:1].T)[:k, k:]
    assert np.abs(_np(acc.corr()) - corr).max() < 1e-9
    # the naive one-pass formula E[ab] - E[a]E[b] would be pure noise here
    naive = (a.T @ b) / m - torch.outer(a.mean(0), b.mean(0))
    assert _rel(naive.numpy(), cab) > 1e-2


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_non_contiguous_and_mixed_dtypes(backend, device):
    k, n, m = 16, 20, 90
    big = torch.randn(m, 2 * k, dtype=torch.float64)
    a = big[:, ::2]  # strided columns
    b = torch.randn(n, m, dtype=torch.float32).T  # transposed (column-major)
    assert not a.is_contiguous() and not b.is_contiguous()
    acc = _stream(CrossCovariance(k, n, backend=backend, device=device), a, b, [40, 50])
    cab, _, cbb = _truth(a.numpy(), b.numpy())
    assert _rel(_np(acc.cov()), cab) < 1e-12
    assert _rel(_np(acc.var_b()), np.diag(cbb)) < 1e-12


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_one_draw_and_empty(backend, device):
    acc = CrossCovariance(3, 4, backend=backend, device=device)
    acc.update(*to(device, torch.empty(0, 3), torch.empty(0, 4)))
    assert acc.count == 0
    x, y = to(device, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0, 7.0]))
    acc.update(x, y)  # a single draw as vectors
    assert acc.count == 1
    torch.testing.assert_close(acc.mean_a, x.double())
    torch.testing.assert_close(acc.cov(ddof=0).cpu(), torch.zeros(3, 4, dtype=torch.float64))
    with pytest.warns(UserWarning, match="count - ddof"):
        assert torch.isnan(acc.cov()).all()  # as numpy.cov: undefined with one draw and ddof=1
    acc.update(x + 1, y - 1)
    torch.testing.assert_close(acc.cov().cpu(), torch.full((3, 4), -0.5, dtype=torch.float64))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_merge_equals_single_pass(backend, device):
    k, n = 6, 9
    a = torch.randn(400, k, dtype=torch.float64) * 3 + torch.arange(k)
    b = torch.randn(400, n, dtype=torch.float64) + 1e5
    b[:200] += 0.01  # the parts have different means, so their shifts differ
    single = _stream(CrossCovariance(k, n, track_auto="full", backend=backend, device=device), a, b, [400])
    parts = [
        _stream(
            CrossCovariance(k, n, track_auto="full", backend=backend, device=device),
            a[s],
            b[s],
            [len(range(400)[s])],
        )
        for s in (slice(0, 50), slice(50, 260), slice(260, 400))
    ]
    empty = CrossCovariance(k, n, track_auto="full")
    # a CPU accumulator merges parts from any device
    merged = CrossCovariance(k, n, track_auto="full").merge(empty).merge(parts[1]).merge(parts[0])
    merged.merge(parts[2]).merge(empty)
    assert merged.count == 400
    for f in ("cov", "cov_aa", "cov_bb"):
        assert _rel(_np(getattr(merged, f)()), _np(getattr(single, f)())) < 1e-12
    np.testing.assert_allclose(_np(merged.mean_b), _np(single.mean_b), rtol=1e-15)
    assert _rel(_np(merged.cov()), _truth(a.numpy(), b.numpy())[0]) < 1e-12


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_per_draw_updates_buffered(backend, device):
    a, b = torch.randn(70, 4, dtype=torch.float64) + 1e6, torch.randn(70, 20, dtype=torch.float32)
    acc = CrossCovariance(4, 20, device=device, backend=backend, buffer_draws=16)
    for i in range(70):
        acc.update(*to(device, a[i], b[i]))
        assert acc.count == i + 1
    assert acc._nbuf == 70 % 16  # the tail is still buffered until a result is read
    unbuffered = _stream(
        CrossCovariance(4, 20, device=device, backend=backend, buffer_draws=0), a, b, [1] * 70
    )
    cab, caa, cbb = _truth(a.numpy(), b.numpy())
    for x in (acc, unbuffered):
        assert _rel(_np(x.cov()), cab) < 1e-11
        assert _rel(_np(x.var_a()), np.diag(caa)) < 1e-11


def test_state_dict_roundtrip(tmp_path):
    a, b = torch.randn(300, 4), torch.randn(300, 3)
    acc = CrossCovariance(4, 3).update(a[:100], b[:100])
    path = tmp_path / "acc.pt"
    torch.save(acc.state_dict(), path)
    restored = CrossCovariance(4, 3).load_state_dict(torch.load(path))
    restored.update(a[100:], b[100:])
    acc.update(a[100:], b[100:])
    torch.testing.assert_close(restored.cov(), acc.cov(), rtol=0, atol=0)
    torch.testing.assert_close(restored.corr(), acc.corr(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="track_auto"):
        CrossCovariance(4, 3, track_auto="full").load_state_dict(acc.state_dict())


def test_load_state_dict_refuses_a_bad_entry_before_copying_anything():
    """A state with one wrong entry (shape, dtype, a fractional or bool count) is refused with the accumulator
    left exactly as it was; a count given as a NumPy integer or a one-element integer tensor is taken."""
    torch.manual_seed(0)
    acc = CrossCovariance(3, 4).update(torch.randn(100, 3, dtype=torch.float64) + 5, torch.randn(100, 4))
    other = CrossCovariance(3, 4).update(
        torch.randn(50, 3, dtype=torch.float64) - 50, torch.randn(50, 4) * 10
    )
    before = {k: v.clone() for k, v in acc._tensors().items()}
    good = other.state_dict()
    bad_entries = [
        (
            "comoment",
            torch.zeros(4, 3, dtype=torch.float64),
            ValueError,
            r"state\['comoment'\] has shape \(4, 3\)",
        ),
        ("m2_b", torch.zeros(3, dtype=torch.float64), ValueError, r"state\['m2_b'\] has shape \(3,\)"),
        ("comoment", good["comoment"].float(), TypeError, r"state\['comoment'\] has dtype torch.float32"),
        ("m2_a", good["m2_a"].long(), TypeError, r"state\['m2_a'\] has dtype torch.int64"),
        ("count", 2.7, ValueError, r"state\['count'\] is 2.7"),
        ("count", True, ValueError, r"state\['count'\] is True"),
        ("count", torch.tensor(50.0), ValueError, r"state\['count'\] is a tensor of dtype torch.float32"),
        ("count", torch.tensor([50, 1]), ValueError, r"state\['count'\] is a tensor .* shape \(2,\)"),
        ("count", -1, ValueError, r"state\['count'\] is -1"),
    ]
    for key, value, exc, match in bad_entries:
        with pytest.raises(exc, match=match):
            acc.load_state_dict({**good, key: value})
        assert acc.count == 100
        for k, v in acc._tensors().items():
            assert torch.equal(v, before[k]), (key, k)
    for count in (np.int64(50), torch.tensor(50), torch.tensor([50])):
        fresh = CrossCovariance(3, 4).load_state_dict({**good, "count": count})
        assert fresh.count == 50 and isinstance(fresh.count, int)
        torch.testing.assert_close(fresh.cov(), other.cov(), rtol=0, atol=0)


def test_device_with_an_index_takes_the_chunks_of_that_device():
    """``device="cpu:0"`` (like ``"cuda"`` for ``cuda:0``) names the device the chunks report as ``cpu``: they are
    taken, and the accumulator reports the device as its tensors do."""
    a, b = torch.randn(100, 3), torch.randn(100, 4)
    for device in ("cpu:0", torch.device("cpu", 0), "cpu"):
        acc = CrossCovariance(3, 4, device=device)
        assert acc.device == acc.comoment.device == torch.device("cpu")
        acc.update(a, b)
        torch.testing.assert_close(acc.cov(), CrossCovariance(3, 4).update(a, b).cov(), rtol=0, atol=0)
        assert "device=cpu)" in repr(acc)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_shifts_are_written_by_the_first_chunk_so_may_not_alias_it(backend, device):
    """With ``count == 0`` the update sets the shifts from the chunk: a shift that is a view of the chunk (or
    that is the other shift) is refused, the chunk untouched; with ``count > 0`` the shifts are only read, and
    a view of the chunk is taken."""
    k, n, m = 3, 2, 50

    def f64(*shape):
        return torch.zeros(*shape, dtype=torch.float64, device=device)

    a, b = to(device, torch.randn(m, k, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64))
    a0 = a.clone()
    kw = dict(backend=backend)
    e = f64(0)
    with pytest.raises(ValueError, match="shift_a shares memory with a"):
        cross_covariance_update_(a[0], f64(n), f64(k), f64(n), f64(k, n), e, e, a, b, count=0, **kw)
    with pytest.raises(ValueError, match="shift_b shares memory with b"):
        cross_covariance_update_(f64(k), b[1], f64(k), f64(n), f64(k, n), e, e, a, b, count=0, **kw)
    s = f64(k)
    with pytest.raises(ValueError, match="shift_a shares memory with shift_b"):
        cross_covariance_update_(s, s[:n], f64(k), f64(n), f64(k, n), e, e, a, b, count=0, **kw)
    assert torch.equal(a, a0)
    # later chunks only read the shifts: a shift inside the chunk gives the result of its copy
    outs = []
    for shift_a in (a[0], a[0].clone()):
        state = [f64(n), f64(k), f64(n), f64(k, n)]
        cross_covariance_update_(shift_a, *state, e, e, a, b, count=10, **kw)
        outs.append(state)
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert torch.equal(a, a0)


def test_cpp_panels_match_reference():
    info = pypattern.backends("covariance_update_")["cpp"]
    if not info["available"]:
        pytest.skip(f"cpp: {info['reason']}")
    # more draws than one C++ panel (512), float32, with a mean offset
    a = torch.randn(1300, 33) + 50
    b = torch.randn(1300, 21) - 7
    ref = _stream(CrossCovariance(33, 21, track_auto="full", backend="reference"), a, b, [1300])
    cpp = _stream(CrossCovariance(33, 21, track_auto="full", backend="cpp"), a, b, [1300])
    for f in ("cov", "cov_aa", "cov_bb"):
        assert _rel(_np(getattr(cpp, f)()), _np(getattr(ref, f)())) < 1e-12


def test_memory_independent_of_draws():
    acc = CrossCovariance(8, 5, track_auto="var")
    sizes0 = [t.numel() for t in acc._tensors().values()]
    for _ in range(5):
        acc.update(torch.randn(1000, 8), torch.randn(1000, 5))
    assert [t.numel() for t in acc._tensors().values()] == sizes0


def test_errors_name_the_argument():
    acc = CrossCovariance(3, 4)
    with pytest.raises(ValueError, match=r"a must have shape \(draws, 3\)"):
        acc.update(torch.randn(5, 2), torch.randn(5, 4))
    with pytest.raises(ValueError, match="same number of draws"):
        acc.update(torch.randn(5, 3), torch.randn(6, 4))
    with pytest.raises(TypeError, match="b has dtype torch.int64"):
        acc.update(torch.randn(5, 3), torch.ones(5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="track_auto"):
        CrossCovariance(3, 4, track_auto="diag")
    with pytest.raises(RuntimeError, match="track_auto"):
        CrossCovariance(3, 4, track_auto="none").corr()
    with pytest.raises(ValueError, match="ddof"):
        acc.cov(ddof=-1)
    with pytest.raises(ValueError, match="backend="):
        CrossCovariance(3, 4, backend="fortran").update(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="shape"):
        acc.merge(CrossCovariance(3, 5))
    z = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="count"):
        cross_covariance_update_(
            z,
            z.new_zeros(4),
            z.clone(),
            z.new_zeros(4),
            z.new_zeros(3, 4),
            z.new_zeros(0),
            z.new_zeros(0),
            torch.randn(2, 3),
            torch.randn(2, 4),
            count=-1,
        )


_AOT = """
import sys
sys.path.insert(0, TESTS_DIR)
import torch
from _triton_binder import compile_recorded, recording
import pypattern.ops.covariance.triton as ct

# the wrapper's own launches, specialised as Triton's GPU launcher would (an int equal to 1 becomes a constexpr,
# ints divisible by 16 are marked): sizes and strides of 1, 2 and multiples of 16, contiguous and transposed draws
for dtype in (torch.float32, torch.float64):
    for m, k, n, transposed in ((1, 1, 1, False), (2, 3, 2, False), (17, 16, 32, True)):
        a = torch.randn(k, m, dtype=dtype).t() if transposed else torch.randn(m, k, dtype=dtype)
        b = torch.randn(m, n, dtype=dtype)
        v = lambda c: torch.randn(c, dtype=torch.float64)
        with recording(ct, "_comoment_kernel") as rec:
            ct.comoment_update_triton_(torch.zeros(k, n, dtype=torch.float64), a, b, v(k), v(k), v(n), v(n), v(k),
                                       v(n), 0.5)
        compile_recorded(rec, archs=(80, 90) if (m, dtype) == (2, torch.float32) else (80,))
print("ok")
""".replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__))))


def test_triton_kernel_compiles_for_gpus():
    """The interpreter accepts more than the GPU compiler: compile the wrapper's launches to sm_80/sm_90 cubin,
    specialised as Triton's GPU launcher would (no GPU needed; a separate process, since the interpreter patches
    triton.language)."""
    assert_compiles_for_gpus(_AOT)


def test_chunks_that_require_grad_leave_no_graph_in_the_state():
    from pypattern.ops.covariance import CrossCovariance

    for backend in ("reference", "cpp"):
        acc = CrossCovariance(2, 3, backend=backend)
        a = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        acc.update(a * 2, b)
        acc.flush()
        assert all(not v.requires_grad for v in acc.state_dict().values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_a_count_beyond_int64_is_refused_by_name_on_every_backend(backend, device):
    """count is a 64-bit integer in every backend (the C++ op's schema): one that does not fit is refused by name
    before any backend is called, the state untouched (the C++ op failed in torch's dispatcher)."""
    k, n, m = 3, 2, 5
    a, b = to(device, torch.randn(m, k, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64))
    state = [torch.zeros(*s, dtype=torch.float64, device=device) for s in ((k,), (n,), (k,), (n,), (k, n))]
    e = torch.zeros(0, dtype=torch.float64, device=device)
    for count in (2**63, -1):
        with pytest.raises(ValueError, match=r"count must be an int in 0 \.\. 2\*\*63 - 1"):
            cross_covariance_update_(*state, e, e, a, b, count=count, backend=backend)
    assert all(not bool(s.any()) for s in state)
    cross_covariance_update_(
        *state, e, e, a, b, count=2**63 - 1 - m, backend=backend
    )  # the largest that fits
