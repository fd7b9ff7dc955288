"""Signed sums (pypattern.ops.sums.signed_sums): every backend against a float64 loop and, bit for bit, against the
chain of torch adds it replaces, on random and adversarial inputs (sizes around the vector width, the unrolled step,
the 4 KiB chunks and the threads' blocks; zero, one and many terms; repeated terms and bases; an output that is its
own base; strided, transposed and expanded views; outputs large enough to be streamed, aligned or not), float32 and
float64 and the reference for other dtypes, empty lists and sizes, bad input and aliasing (the errors name the
argument), forward-mode AD and tracing, and each instruction-set build of the kernel file."""

from __future__ import annotations

import subprocess

import pytest
import torch
from _backend_cases import backend_devices
from _isa_build import ISAS, RUNNABLE, build_drivers

import pypattern
from pypattern.ops.sums import signed_sums, signed_sums_reference_

HAS_CPP = pypattern.backends("signed_sums_")["cpp"]["available"]


# on CUDA tensors: the CUDA registration where built, and the automatic choice
CASES = backend_devices("signed_sums_", automatic=True)
BACKENDS_CPU = ["reference"] + (["cpp"] if HAS_CPP else [])


def _problem(shape, counts, dtype, device="cpu", pool=None, seed=0):
    """Bases (one per count), a pool of blocks and, per output, ``counts[p]`` terms drawn from the pool (outputs
    share terms) with random signs; returns base, terms, offsets, signs."""
    gen = torch.Generator().manual_seed(seed)
    P = len(counts)
    pool = pool or max(1, P + 2)
    blocks = [
        torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device) for _ in range(pool)
    ]
    base = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device) for _ in range(P)]
    picks = torch.randint(0, pool, (sum(counts),), generator=gen).tolist()
    terms = [blocks[i] for i in picks]
    signs = (torch.randint(0, 2, (len(picks),), generator=gen) * 2 - 1).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return base, terms, offsets, signs


def _chain(base, terms, offsets, signs):
    """The engine's former form: ``torch.add(base, t0, alpha=s0, out=o)``, then ``o.add_(t, alpha=s)``."""
    out = []
    for p, b in enumerate(base):
        o = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        i0, i1 = offsets[p], offsets[p + 1]
        if i1 == i0:
            o.copy_(b)
        else:
            torch.add(b, terms[i0], alpha=signs[i0], out=o)
            for i in range(i0 + 1, i1):
                o.add_(terms[i], alpha=signs[i])
        out.append(o)
    return out


def _naive(base, terms, offsets, signs):
    """Float64 sums, element by element in a Python loop over the terms (independent of the dtype's rounding)."""
    out = []
    for p, b in enumerate(base):
        acc = b.double().cpu().clone()
        for i in range(offsets[p], offsets[p + 1]):
            acc += signs[i] * terms[i].double().cpu()
        out.append(acc)
    return out


def _check(got, base, terms, offsets, signs, exact=True):
    assert len(got) == len(base)
    eps = torch.finfo(base[0].dtype).eps if base and base[0].is_floating_point() else 0.0
    for p, (g, want) in enumerate(zip(got, _naive(base, terms, offsets, signs))):
        assert g.shape == base[p].shape and g.dtype == base[p].dtype
        # the rounding of a left-to-right sum of m terms: within m * eps of the sum of magnitudes
        scale = base[p].double().cpu().abs()
        for i in range(offsets[p], offsets[p + 1]):
            scale = scale + terms[i].double().cpu().abs()
        m = offsets[p + 1] - offsets[p]
        err = (g.double().cpu() - want).abs()
        assert bool((err <= m * eps * scale + 1e-300).all()), f"output {p}: error {float(err.max())}"
    if exact:
        for g, c in zip(got, _chain(base, terms, offsets, signs)):
            assert torch.equal(g, c)


SHAPES = [
    (1,),
    (15,),
    (16,),  # one float32 vector (AVX-512)
    (17,),
    (63,),
    (64,),  # one unrolled step of float32
    (65,),
    (3, 5, 7),
    (1024,),  # one 4 KiB chunk of float32
    (3 * 1024 + 5,),  # chunks and a tail shorter than a vector
    (2, 32, 768),  # a destination input's block, smaller batch
    (40_000,),  # more than one block of the threads' split
]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random(backend, device, dtype, shape):
    counts = [0, 1, 2, 5, 3, 1]
    base, terms, offsets, signs = _problem(shape, counts, dtype, device, seed=sum(shape))
    _check(signed_sums(base, terms, offsets, signs, backend=backend), base, terms, offsets, signs)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_terms_and_outputs(backend, device, dtype):
    """Many terms per output (up to 60) and 40 outputs drawing from 12 blocks: repeated terms and bases."""
    counts = [(7 * p) % 61 for p in range(40)]
    base, terms, offsets, signs = _problem((5, 33), counts, dtype, device, pool=12, seed=3)
    base = [base[p % 4] for p in range(40)]  # repeated bases
    _check(signed_sums(base, terms, offsets, signs, backend=backend), base, terms, offsets, signs)


@pytest.mark.parametrize("backend,device", CASES)
def test_one_term_signs_and_into_out(backend, device):
    """One term of each sign; ``out`` given (views of one tensor) is written and returned; ``out[p]`` may be
    ``base[p]`` itself; signs as floats, offsets and signs as tensors."""
    gen = torch.Generator().manual_seed(4)
    b, t = torch.randn(2, 3, 70, generator=gen).to(device), torch.randn(3, 70, generator=gen).to(device)
    buf = torch.empty(2, 3, 70, device=device)
    got = signed_sums([b[0], b[1]], [t, t], [0, 1, 2], [1, -1], out=list(buf.unbind(0)), backend=backend)
    assert got[0].data_ptr() == buf[0].data_ptr() and got[1].data_ptr() == buf[1].data_ptr()
    assert torch.equal(buf[0], b[0] + t) and torch.equal(buf[1], b[1] - t)
    x = b[0].clone()
    want = x - t + t - t
    signed_sums(
        [x], [t, t, t], torch.tensor([0, 3]), torch.tensor([-1.0, 1.0, -1.0]), out=[x], backend=backend
    )
    assert torch.equal(x, want)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_views(backend, device, dtype):
    """Views read and written in place: rows of a larger tensor (the engine's last-row blocks), a gap after each row,
    a transposed tensor (no unit stride along the last dimension: copied), expanded inputs (stride 0 in an outer
    dimension and along the last), and outputs that are strided views or transposed."""
    gen = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    big = r(4, 9, 40)
    rows = big[:, 3:4]  # (4, 1, 40), rows 9 * 40 apart
    gap = r(4, 1, 47)[:, :, 2:42]  # a gap after each row
    tr = r(4, 40, 1).transpose(1, 2)  # (4, 1, 40), a size-1 dimension moved (strides (40, 1, 1))
    tr2 = r(40, 4).T.unsqueeze(1)  # (4, 1, 40), stride 4 along the last dimension
    assert tr2.stride(-1) != 1
    ex = r(1, 1, 40).expand(4, 1, 40)  # stride 0 along the batch
    ex_last = r(4, 1, 1).expand(4, 1, 40)  # stride 0 along the last dimension
    base = [gap, rows, ex, tr2]
    terms = [tr, ex_last, rows, gap, ex, tr2, big[:, 5:6]]
    offsets, signs = [0, 2, 4, 6, 7], [1, -1, -1, 1, 1, -1, 1]
    _check(signed_sums(base, terms, offsets, signs, backend=backend), base, terms, offsets, signs)
    out = [r(4, 3, 40)[:, 0:1], r(4, 2, 40)[:, 1:2], r(40, 4).T.unsqueeze(1), r(4, 1, 40)]
    assert out[2].stride(-1) != 1
    got = signed_sums(base, terms, offsets, signs, out=out, backend=backend)
    _check(got, base, terms, offsets, signs)
    assert all(g is o for g, o in zip(got, out))


@pytest.mark.parametrize("backend,device", CASES)
def test_streamed_outputs(backend, device):
    """Outputs of more than 8 MiB in all (written past the cache by the C++ kernel), some of them one element
    off the vector alignment, and all of them in float64 with threads splitting the elements."""
    for dtype, off in ((torch.float32, 0), (torch.float32, 1), (torch.float64, 0)):
        n = 300_000 + 3
        counts = [2, 0, 3, 1, 4, 2, 1, 3]
        base, terms, offsets, signs = _problem((n,), counts, dtype, device, pool=6, seed=6 + off)
        buf = torch.empty(len(counts) * n + off, dtype=dtype, device=device)
        out = [buf[off + p * n : off + (p + 1) * n] for p in range(len(counts))]
        got = signed_sums(base, terms, offsets, signs, out=out, backend=backend)
        _check(got, base, terms, offsets, signs)


@pytest.mark.parametrize("backend,device", CASES)
def test_empty(backend, device):
    """No outputs; outputs with no terms (a copy of the base); tensors with no elements; empty terms lists."""
    assert signed_sums([], [], [0], [], backend=backend) == []
    assert signed_sums([], [], [0], [], out=[], backend=backend) == []
    b = torch.randn(3, 4, device=device)
    (o,) = signed_sums([b], [], [0, 0], [], backend=backend)
    assert torch.equal(o, b) and o.data_ptr() != b.data_ptr()
    for shape in [(0,), (3, 0, 2)]:
        z = torch.empty(shape, device=device)
        got = signed_sums([z, z], [z, z, z], [0, 1, 3], [1, -1, 1], backend=backend)
        assert [g.shape for g in got] == [torch.Size(shape)] * 2


@pytest.mark.skipif(not HAS_CPP, reason="C++ kernel not built")
def test_automatic_choice_dtypes_and_threads():
    """On CPU float tensors the kernel is chosen; other dtypes take the reference (forcing the kernel on them is
    refused); the result does not depend on the number of threads (each element is one thread's sum)."""
    assert pypattern._backends.choose("signed_sums_", torch.device("cpu"), None) == "cpp"
    base, terms, offsets, signs = _problem((3, 50_000), [3, 0, 5, 2], torch.float32, seed=7)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = signed_sums(base, terms, offsets, signs)
        torch.set_num_threads(2)
        two = signed_sums(base, terms, offsets, signs)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    for dtype in (torch.float16, torch.bfloat16, torch.int32):
        hb, ht = [b.to(dtype) for b in base], [t.to(dtype) for t in terms]
        got = signed_sums(hb, ht, offsets, signs)
        assert got[0].dtype == dtype
        assert all(torch.equal(a, b) for a, b in zip(got, _chain(hb, ht, offsets, signs)))
        with pytest.raises(ValueError, match=f"base\\[0\\] has dtype {dtype}; the 'cpp' backend"):
            signed_sums(hb, ht, offsets, signs, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_bad_lists(backend):
    b, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(TypeError, match="base must be a sequence of Tensors, got a Tensor"):
        signed_sums(b, [t], [0, 1], [1], backend=backend)
    with pytest.raises(TypeError, match=r"terms\[1\] must be a Tensor, got list"):
        signed_sums([b], [t, [1.0]], [0, 2], [1, 1], backend=backend)
    with pytest.raises(TypeError, match="out must be a sequence of Tensors, got int"):
        signed_sums([b], [t], [0, 1], [1], out=3, backend=backend)
    with pytest.raises(ValueError, match=r"offsets has 3 entries; expected 2 \(one more than base\)"):
        signed_sums([b], [t], [0, 1, 1], [1], backend=backend)
    with pytest.raises(ValueError, match=r"offsets\[0\] is 1; expected 0"):
        signed_sums([b, b], [t], [1, 1, 1], [1], backend=backend)
    with pytest.raises(ValueError, match=r"offsets\[2\] = 0 is less than offsets\[1\] = 1"):
        signed_sums([b, b, b], [t], [0, 1, 0, 1], [1], backend=backend)
    with pytest.raises(ValueError, match=r"offsets\[-1\] is 1; expected 2 \(the number of terms\)"):
        signed_sums([b], [t, t], [0, 1], [1, 1], backend=backend)
    with pytest.raises(TypeError, match=r"offsets\[1\] is 1.0 \(float\); give ints"):
        signed_sums([b], [t], [0, 1.0], [1], backend=backend)
    with pytest.raises(ValueError, match="offsets is a tensor of shape"):
        signed_sums([b], [t], torch.tensor([0.0, 1.0]), [1], backend=backend)
    with pytest.raises(ValueError, match=r"signs has 2 entries; expected 1 \(one per term\)"):
        signed_sums([b], [t], [0, 1], [1, 1], backend=backend)
    for bad in (0, 2, 0.5, True, "1"):
        with pytest.raises(ValueError, match=r"signs\[1\] is .*; each sign must be 1 or -1"):
            signed_sums([b], [t, t], [0, 2], [1, bad], backend=backend)
    with pytest.raises(ValueError, match="out has 2 tensors, base has 1; give one output per base"):
        signed_sums([b], [t], [0, 1], [1], out=[b.clone(), b.clone()], backend=backend)
    with pytest.raises(ValueError, match="backend='nope' is not one of"):
        signed_sums([b], [t], [0, 1], [1], backend="nope")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_bad_tensors(backend):
    """Wrong shapes, dtypes and devices, each error naming the argument and its index."""
    b, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"terms\[1\] has shape \(3, 2\); expected \(2, 3\) as base\[0\]'s"):
        signed_sums([b], [t, t.T], [0, 2], [1, 1], backend=backend)
    with pytest.raises(ValueError, match=r"base\[1\] has shape \(6,\); expected \(2, 3\) as base\[0\]'s"):
        signed_sums([b, b.reshape(6)], [t], [0, 1, 1], [1], backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] has shape \(2, 4\); expected \(2, 3\)"):
        signed_sums([b], [t], [0, 1], [1], out=[torch.empty(2, 4)], backend=backend)
    with pytest.raises(
        ValueError,
        match=r"terms\[0\] is torch.float64 on cpu, base\[0\] is torch.float32 on cpu; they must match",
    ):
        signed_sums([b], [t.double()], [0, 1], [1], backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] is torch.float64 on cpu, base\[0\] is torch.float32"):
        signed_sums([b], [t], [0, 1], [1], out=[torch.empty(2, 3, dtype=torch.float64)], backend=backend)
    with pytest.raises(
        ValueError, match=r"terms\[0\] is torch.float32 on meta, base\[0\] is torch.float32 on cpu"
    ):
        signed_sums([b], [torch.empty(2, 3, device="meta")], [0, 1], [1], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_aliasing_refused(backend):
    """An output sharing memory with a term, with another output's base, with another output, or partly with its
    own base is refused naming both; an output that is exactly its base is taken (in place); an expanded output
    is refused."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 10, generator=gen)
    flat = x.view(-1)
    a, b = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    with pytest.raises(
        ValueError,
        match=r"terms\[1\] shares memory with out\[0\] \(their address ranges overlap\); an output may be its own base",
    ):
        signed_sums([a], [b, x[1]], [0, 2], [1, 1], out=[x[1]], backend=backend)
    with pytest.raises(ValueError, match=r"terms\[0\] shares memory with out\[1\]"):
        signed_sums([a, b], [flat[5:15]], [0, 0, 1], [1], out=[x[3], x[0]], backend=backend)
    with pytest.raises(ValueError, match=r"base\[0\] shares memory with out\[1\]"):
        signed_sums([x[2], a], [b], [0, 1, 1], [1], out=[x[0], x[2]], backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\] share memory"):
        signed_sums([a, b], [], [0, 0, 0], [], out=[flat[0:10], flat[5:15]], backend=backend)
    # interleaved views share no element but their address ranges overlap: refused too (the check compares ranges)
    with pytest.raises(
        ValueError, match=r"out\[0\] and out\[1\] share memory \(their address ranges overlap"
    ):
        signed_sums([x[0, :2], x[0, :2]], [], [0, 0, 0], [], out=[x[:2, 0], x[:2, 1]], backend=backend)
    with pytest.raises(ValueError, match=r"base\[0\] shares memory with out\[0\]"):
        signed_sums([flat[1:11]], [], [0, 0], [], out=[flat[0:10]], backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] has elements that share memory \(an expanded view\)"):
        signed_sums([a], [b], [0, 1], [1], out=[torch.zeros(1).expand(10)], backend=backend)
    y = x[1].clone()
    got = signed_sums([x[1], a], [b, b], [0, 1, 2], [-1, 1], out=[x[1], x[3]], backend=backend)
    assert got[0] is not None and torch.equal(x[1], y - b) and torch.equal(x[3], a + b)


@pytest.mark.skipif(not HAS_CPP, reason="C++ kernel not built")
def test_kernel_checks_for_itself():
    """The C++ op called directly makes the same checks as the Python layer."""
    b, t = torch.randn(5), torch.randn(5)
    op = torch.ops.pypattern.signed_sums_
    with pytest.raises(ValueError, match=r"signs\[0\] is 2; each sign must be 1 or -1"):
        op([torch.empty(5)], [b], [t], [0, 1], [2])
    with pytest.raises(ValueError, match=r"offsets\[-1\] is 2; expected 1"):
        op([torch.empty(5)], [b], [t], [0, 2], [1])
    with pytest.raises(ValueError, match=r"terms\[0\] shares memory with out\[0\]"):
        op([t], [b], [t], [0, 1], [1])
    with pytest.raises(ValueError, match=r"terms\[0\] has shape \(4,\); expected \(5,\) as base\[0\]'s"):
        op([torch.empty(5)], [b], [t[:4]], [0, 1], [1])


def test_reference_is_the_chain_and_not_differentiable():
    """The reference gives the chain of adds bit for bit; no backend returns an output that carries a gradient;
    tensors on a device without a kernel (meta) take the reference; the fake implementation serves tracing."""
    base, terms, offsets, signs = _problem((7, 9), [2, 3, 0], torch.float32, seed=9)
    out = [torch.empty(7, 9) for _ in base]
    signed_sums_reference_(out, base, terms, offsets, signs)
    assert all(torch.equal(a, b) for a, b in zip(out, _chain(base, terms, offsets, signs)))
    for backend in BACKENDS_CPU:
        x = [b.clone().requires_grad_(True) for b in base]
        got = signed_sums(x, terms, offsets, signs, backend=backend)
        assert not any(g.requires_grad for g in got)
    m = torch.empty(3, 4, device="meta")
    got = signed_sums([m, m], [m], [0, 1, 1], [-1])
    assert got[0].shape == (3, 4) and got[0].device.type == "meta"
    assert pypattern._backends.choose("signed_sums_", m.device, None) == "reference"


def test_forward_mode_ad_takes_the_reference():
    """Dual tensors of torch.autograd.forward_ad and torch.func.jvp give the tangent, the same signed sums of the
    tangents; a forced kernel is refused for dual inputs."""
    import torch.autograd.forward_ad as fwAD

    base, terms, offsets, signs = _problem((3, 20), [2, 1], torch.float64, seed=10)
    tb = torch.randn(3, 20, dtype=torch.float64)
    tt = torch.randn(3, 20, dtype=torch.float64)
    with fwAD.dual_level():
        db = fwAD.make_dual(base[0], tb)
        dt = fwAD.make_dual(terms[1], tt)
        got = signed_sums([db, base[1]], [terms[0], dt, terms[2]], offsets, signs)
        primal, tangent = fwAD.unpack_dual(got[0])
        torch.testing.assert_close(tangent, tb + signs[1] * tt, rtol=0, atol=1e-14)
        torch.testing.assert_close(
            primal, base[0] + signs[0] * terms[0] + signs[1] * terms[1], rtol=0, atol=1e-14
        )
        if HAS_CPP:
            with pytest.raises(ValueError, match="backend='cpp' has no forward-AD or batching rule"):
                signed_sums([db, base[1]], [terms[0], dt, terms[2]], offsets, signs, backend="cpp")
    _, tangent = torch.func.jvp(
        lambda b, t: signed_sums([b], [t, t], [0, 2], [1, -1])[0], (base[0], terms[0]), (tb, tt)
    )
    torch.testing.assert_close(tangent, tb + tt - tt, rtol=0, atol=0)


def test_compiled_whole_graph():
    """``torch.compile(fullgraph=True)`` traces the op (torch's adds while compiling) and gives its values."""
    gen = torch.Generator().manual_seed(11)
    b, t, u = (torch.randn(4, 17, generator=gen) for _ in range(3))
    torch._dynamo.reset()
    f = torch.compile(
        lambda b, t, u: signed_sums([b], [t, u], [0, 2], [1, -1])[0] * 2, backend="eager", fullgraph=True
    )
    torch.testing.assert_close(f(b, t, u), 2 * (b + t - u), rtol=0, atol=0)
    # a backend given by name is traced as that backend's op (the C++ op through its fake implementation)
    for backend in ("reference", *(("cpp",) if HAS_CPP else ())):
        torch._dynamo.reset()
        f = torch.compile(
            lambda b, t, u, k=backend: signed_sums([b], [t, u], [0, 2], [1, -1], backend=k)[0] * 2,
            backend="eager",
            fullgraph=True,
        )
        torch.testing.assert_close(f(b, t, u), 2 * (b + t - u), rtol=0, atol=0)


def test_vmap_without_out_gives_batched_outputs():
    """Under ``torch.func.vmap`` with no ``out`` given, the outputs are new batched tensors (the sums per batch
    element, bit for bit the chain of adds)."""
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    got = torch.func.vmap(lambda x, y: signed_sums([x, y, x], [y, x, y], [0, 2, 3, 3], [1, -1, 1]))(a, b)
    assert len(got) == 3 and all(g.shape == (4, 3) for g in got)
    torch.testing.assert_close(got[0], a + b - a, rtol=0, atol=0)
    torch.testing.assert_close(got[1], b + b, rtol=0, atol=0)
    torch.testing.assert_close(got[2], a, rtol=0, atol=0)


# ----- each instruction-set build of the kernel file ------------------------------------------------------------
@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    return build_drivers(
        tmp_path_factory.mktemp("sums_isa"),
        ["csrc", "csrc/sums"],
        ["csrc/sums/sums_cpu_fast.cpp", "tests/sums_isa_driver.cpp"],
    )


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 65, 1023, 1024, 1025, 5000])
def test_isa_path_equals_the_chain(drivers, isa, n):
    """Each build, float32 and float64, with and without streamed stores, aligned and one element off: every
    output equals a scalar left-to-right loop bit for bit (the driver compares)."""
    if not RUNNABLE[isa]:
        pytest.skip(f"this CPU lacks {isa} (compiled only)")
    for stream in (0, 1):
        for misalign in (0, 1):
            r = subprocess.run(
                [str(drivers[isa]), str(n), "9", "6", str(n + 17), str(stream), str(misalign)],
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, (stream, misalign, r.stderr)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_given_outputs_are_known_to_autograd_as_written(backend):
    """Outputs given as out= are written in place: their version counters move, so a backward that saved one of
    them refuses, as after any in-place op (the C++ kernel's writes went unseen and the backward used the new
    values)."""
    base, terms, offsets, signs = _problem((5,), [2], torch.float32)
    w = torch.randn(5, requires_grad=True)
    o = torch.randn(5)
    loss = (w * o).sum()  # saves o for its backward
    v0 = o._version
    signed_sums(base, terms, offsets, signs, out=[o], backend=backend)
    assert o._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    fresh = signed_sums(base, terms, offsets, signs, backend=backend)  # new outputs: nothing to tell
    torch.testing.assert_close(fresh[0], o, rtol=0, atol=0)


def test_bool_offsets_are_refused_like_bool_signs():
    """offsets [False, True] would read as [0, 1]: refused naming the entry, as a bool tensor of offsets is;
    numpy integers are ints."""
    import numpy as np

    b, t = torch.zeros(2), torch.ones(2)
    for bad, match in (
        ([False, True], r"offsets\[0\] is False \(a bool\); give ints"),
        ([0, np.True_], r"offsets\[1\] is np.True_ \(a bool\); give ints"),
        (torch.tensor([False, True]), "offsets is a bool tensor; give a 1-D integer tensor"),
    ):
        with pytest.raises(TypeError, match=match):
            signed_sums([b], [t], bad, [1])
    assert signed_sums([b], [t], [0, np.int64(1)], [-1])[0].tolist() == [-1.0, -1.0]
