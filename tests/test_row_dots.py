"""Row dot products (pypattern.ops.dots.row_dots): every backend against a float64 computation on random and
adversarial inputs (shapes around the kernel's 4 x 6 register block and its vector width, chunks of terms, dtypes,
strided and non-contiguous views, several right-hand tensors, empty sizes, large and non-finite values), the
automatic choice, bad input, and its use in the edge scores."""

from __future__ import annotations

import subprocess

import pytest
import torch
from _backend_cases import backend_devices
from _isa_build import ISAS, RUNNABLE, build_drivers

import pypattern
from pypattern.ops.dots import row_dots, row_dots_reference

HAS_CPP = pypattern.backends("row_dots")["cpp"]["available"]


# on CUDA tensors: the CUDA registration where built, and the automatic choice
CASES = backend_devices("row_dots", automatic=True)


def _naive(a: torch.Tensor, gs) -> torch.Tensor:
    """Float64 products, one dot product at a time over the flattened rows (independent of bmm)."""
    a64 = a.double().cpu()
    G = torch.cat([g.double().cpu() for g in gs], 1)
    out = torch.zeros(a.shape[0], a.shape[1], G.shape[1], dtype=torch.float64)
    for b in range(a.shape[0]):
        out[b] = (a64[b][:, None, :] * G[b][None, :, :]).sum(-1)
    return out


def _check(out, a, gs):
    ref = _naive(a, gs)
    assert out.shape == ref.shape
    assert out.dtype == a.dtype
    K = a.shape[-1]
    # the rounding of a sum of K products: relative to the sum of |products|
    scale = (
        a.double().cpu().abs() @ torch.cat([g.double().cpu() for g in gs], 1).abs().transpose(1, 2)
    ).clamp_min(1e-300)
    eps = torch.finfo(a.dtype).eps
    err = ((out.double().cpu() - ref).abs() / scale).max().item() if ref.numel() else 0.0
    assert err <= 8 * eps * max(1.0, K**0.5), f"{a.dtype} K={K}: relative error {err}"


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "B,M,Ns,K",
    [
        (1, 1, (1,), 1),
        (2, 3, (5,), 17),  # tails of rows, columns and terms
        (3, 4, (6,), 16),  # exactly one register block and one vector
        (2, 9, (7, 13), 33),
        (1, 5, (1, 1, 1), 100),
        (2, 17, (12, 12, 12, 1), 515),
        (1, 8, (6,), 20000),  # several 16 KiB chunks of terms with a tail
        # several register blocks of a rows with tails of g rows and of terms
        (1, 12, (6,), 16),
        (1, 12, (3,), 7),  # fewer terms than a float32 vector
        (2, 13, (5, 2), 4100),  # a float32 chunk and a tail of terms shorter than a vector
        (1, 25, (7,), 20000),
    ],
)
def test_random(backend, device, dtype, B, M, Ns, K):
    gen = torch.Generator().manual_seed(B * 1000 + M * 10 + K)
    a = torch.randn(B, M, K, generator=gen, dtype=dtype).to(device)
    gs = [torch.randn(B, n, K, generator=gen, dtype=dtype).to(device) for n in Ns]
    _check(row_dots(a, gs, backend=backend), a, gs)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M", [9, 14])
def test_strided_views(backend, device, dtype, M):
    """Rows read in place from views: a slice of the rows, batch and rows transposed (the engine's (n, B, T*d)
    layout), a gap between rows, and a non-unit stride along the terms (copied)."""
    gen = torch.Generator().manual_seed(1)
    K = 70
    big = torch.randn(M + 2, 4, K + 6, generator=gen, dtype=dtype).to(device)
    a = big[:M, :, 3 : 3 + K].transpose(0, 1)  # (4, M, K), rows 4*(K+6) apart, a gap after each
    assert a.stride(-1) == 1 and not a.is_contiguous()
    g1 = torch.randn(5, 4, K, generator=gen, dtype=dtype).to(device).transpose(0, 1)  # (4, 5, K)
    g2 = (
        torch.randn(4, 2 * K, 3, generator=gen, dtype=dtype).to(device)[:, ::2, :].transpose(1, 2)
    )  # stride 6
    assert g2.stride(-1) != 1
    g3 = torch.randn(4, K, 2, generator=gen, dtype=dtype).to(device).transpose(1, 2)  # (4, 2, K), stride 2
    _check(row_dots(a, [g1, g2, g3], backend=backend), a, [g1, g2, g3])


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_sizes(backend, device):
    for B, M, N, K in [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)]:
        a = torch.randn(B, M, K, device=device)
        g = torch.randn(B, N, K, device=device)
        out = row_dots(a, [g], backend=backend)
        assert out.shape == (B, M, N)
        assert bool((out == 0).all())  # K = 0: empty sums


@pytest.mark.parametrize("backend,device", CASES)
def test_large_and_nonfinite(backend, device):
    """Values near float32's range keep their relative accuracy; an infinity or NaN in a row reaches exactly the
    products that read it."""
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(2, 7, 40, generator=gen) * 1e18).to(device)
    g = (torch.randn(2, 8, 40, generator=gen) * 1e18).to(device)
    _check(row_dots(a, [g], backend=backend), a, [g])
    a = torch.randn(1, 6, 35, generator=gen).to(device)
    g = torch.randn(1, 7, 35, generator=gen).to(device)
    a[0, 2, 34] = float("nan")  # in the term tail
    g[0, 5, 3] = float("inf")  # in the vector part
    out = row_dots(a, [g], backend=backend).cpu()
    assert bool(out[0, 2].isnan().all())
    others = [m for m in range(6) if m != 2]
    assert bool(out[0, others, 5].isinf().all())
    finite = out[0][torch.tensor(others)][:, [j for j in range(7) if j != 5]]
    assert bool(finite.isfinite().all())


@pytest.mark.skipif(not HAS_CPP, reason="C++ kernel not built")
def test_automatic_choice_and_threads():
    """On CPU float tensors the kernel is chosen; other dtypes take the reference; the result does not depend on
    the number of threads (each output is one thread's sum)."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 37, 3000, generator=gen)
    g = [torch.randn(3, 12, 3000, generator=gen), torch.randn(3, 25, 3000, generator=gen)]
    assert pypattern._backends.choose("row_dots", a.device, None) == "cpp"
    out = row_dots(a, g)
    assert torch.equal(out, torch.ops.pypattern.row_dots(a, g))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = row_dots(a, g)
        torch.set_num_threads(2)
        two = row_dots(a, g)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)
    h = row_dots(a.half(), [t.half() for t in g])  # the reference (bmm) for half precision
    assert h.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype torch.float16; the 'cpp' backend"):
        row_dots(a.half(), [t.half() for t in g], backend="cpp")


def test_bad_input():
    a = torch.randn(2, 3, 5)
    with pytest.raises(TypeError, match="g must be a sequence"):
        row_dots(a, torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="g is empty"):
        row_dots(a, [])
    with pytest.raises(ValueError, match="a must be 3-D"):
        row_dots(a[0], [torch.randn(2, 4, 5)])
    with pytest.raises(ValueError, match=r"g\[1\] has shape \(2, 4, 6\); expected \(2, rows, 5\)"):
        row_dots(a, [torch.randn(2, 4, 5), torch.randn(2, 4, 6)])
    with pytest.raises(ValueError, match=r"g\[0\] is torch.float64 on cpu, a is torch.float32"):
        row_dots(a, [torch.randn(2, 4, 5, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"g\[0\] must be a Tensor"):
        row_dots(a, [[1.0]])


def test_reference_is_bmm_of_the_concatenation():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 3, 9, generator=gen, dtype=torch.float64)
    g = [
        torch.randn(2, 2, 9, generator=gen, dtype=torch.float64),
        torch.randn(2, 4, 9, generator=gen, dtype=torch.float64),
    ]
    assert torch.allclose(row_dots_reference(a, g), _naive(a, g), rtol=0, atol=1e-13)


def test_other_devices_and_tracing():
    """Tensors on a device without a kernel (meta here) take the reference: the result's shape without data; the
    op's fake implementation gives the shape to tracing; no backend returns a result that carries a gradient."""
    a = torch.empty(2, 3, 9, device="meta")
    out = row_dots(a, [torch.empty(2, 4, 9, device="meta"), torch.empty(2, 1, 9, device="meta")])
    assert out.shape == (2, 3, 5) and out.device.type == "meta"
    assert pypattern._backends.choose("row_dots", a.device, None) == "reference"
    if HAS_CPP:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            x, y = torch.empty(2, 3, 9), torch.empty(2, 6, 9)
            assert torch.ops.pypattern.row_dots(x, [y]).shape == (2, 3, 6)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(1, 2, 5, dtype=dtype, requires_grad=True)
        y = torch.randn(1, 3, 5, dtype=dtype, requires_grad=True)
        assert not row_dots(x, [y]).requires_grad


def test_forward_mode_ad_and_vmap_take_the_reference():
    """Dual tensors of torch.autograd.forward_ad (on ``a``, on a ``g_i``, or both) and torch.func.jvp give the
    tangent of the bilinear product, ``row_dots(ta, g) + row_dots(a, tg)``, instead of dropping it; vmap over a
    batch of inputs equals the op on each; a forced kernel is refused for dual inputs."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    a, g0, g1 = r(2, 3, 40), r(2, 4, 40), r(2, 5, 40)
    ta, tg0 = r(2, 3, 40), r(2, 4, 40)
    zero = torch.zeros_like(g1)
    for da, dg0 in ((ta, None), (None, tg0), (ta, tg0)):
        want = _naive(da if da is not None else torch.zeros_like(a), [g0, g1]) + _naive(
            a, [dg0 if dg0 is not None else torch.zeros_like(g0), zero]
        )
        with fwAD.dual_level():
            x = fwAD.make_dual(a, da) if da is not None else a
            y0 = fwAD.make_dual(g0, dg0) if dg0 is not None else g0
            primal, tangent = fwAD.unpack_dual(row_dots(x, [y0, g1]))
            assert tangent is not None
            torch.testing.assert_close(tangent, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(primal, _naive(a, [g0, g1]), rtol=1e-12, atol=1e-12)
            if HAS_CPP:
                with pytest.raises(ValueError, match="backend='cpp' has no forward-AD or batching rule"):
                    row_dots(x, [y0, g1], backend="cpp")
    _, tangent = torch.func.jvp(lambda x, y: row_dots(x, [y, g1]), (a, g0), (ta, tg0))
    torch.testing.assert_close(tangent, _naive(ta, [g0, g1]) + _naive(a, [tg0, zero]), rtol=1e-12, atol=1e-12)
    A, G = r(4, 2, 3, 40), r(4, 2, 6, 40)
    out = torch.func.vmap(lambda x, y: row_dots(x, [y]))(A, G)
    torch.testing.assert_close(
        out, torch.stack([_naive(A[i], [G[i]]) for i in range(4)]), rtol=1e-12, atol=1e-12
    )


def test_compiled_whole_graph():
    """``torch.compile(fullgraph=True)`` traces the op (torch's bmm while compiling) and gives its values."""
    gen = torch.Generator().manual_seed(6)
    a, g = torch.randn(2, 3, 17, generator=gen), torch.randn(2, 5, 17, generator=gen)
    torch._dynamo.reset()
    f = torch.compile(lambda x, y: row_dots(x, [y]) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(f(a, g), 2 * _naive(a, [g]).float(), rtol=1e-5, atol=1e-5)
    # a backend given by name is traced as that backend's op (the C++ op through its fake implementation)
    for backend in ("reference", *(("cpp",) if HAS_CPP else ())):
        torch._dynamo.reset()
        f = torch.compile(
            lambda x, y, b=backend: row_dots(x, [y], backend=b) * 2, backend="eager", fullgraph=True
        )
        torch.testing.assert_close(f(a, g), 2 * _naive(a, [g]).float(), rtol=1e-5, atol=1e-5)


# ----- each instruction-set build of the kernel file ------------------------------------------------------------
@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    return build_drivers(
        tmp_path_factory.mktemp("dots_isa"),
        ["csrc", "csrc/dots"],
        ["csrc/dots/dots_cpu_fast.cpp", "tests/dots_isa_driver.cpp"],
    )


@pytest.mark.parametrize("isa", list(ISAS))
def test_isa_path_agrees_with_a_long_double_loop(drivers, isa):
    """Each build (portable, AVX2, AVX-512), float32 and float64, aligned rows and rows one element off, over row
    counts around the register blocks and the panel of g rows and term counts around the vector width and the
    chunk: every product within 1e-5 (float32) or 1e-13 (float64) of ``sum |a_k g_k|`` of a long-double loop, and
    nothing written past a row's products (the driver compares)."""
    if not RUNNABLE[isa]:
        pytest.skip(f"this CPU lacks {isa} (compiled only)")
    for misalign in (0, 1):
        r = subprocess.run([str(drivers[isa]), str(misalign)], capture_output=True, text=True)
        assert r.returncode == 0, (misalign, r.stderr)
