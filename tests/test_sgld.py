"""The fused SGLD step: every backend against the plain-torch reference, the noise stream, the fast path, and bad
input. Each backend runs on the tensors of its device (see tests/_backend_cases.py)."""

import math
import os

import pytest
import torch
from _backend_cases import backend_devices, device_of, to
from _overflow_case import check_step
from _triton_aot import assert_compiles_for_gpus

import pypattern
from pypattern import _backends
from pypattern.ops.sgld import philox_normals, sgld_step_
from pypattern.ops.sgld import reference as spec

CASES = backend_devices("sgld_step_")
FAST = backend_devices("sgld_step_", reference=False)
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _inputs(shape, dtype, *, noncontig=False, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    if noncontig:  # a transposed view of a larger tensor, with a step in the last dimension
        big = [
            torch.randn(shape[1] * 2 + 1, shape[0], generator=gen, dtype=dtype).to(device) for _ in range(3)
        ]
        w, g, a = (b[::2][: shape[1]].t() for b in big)
        assert not w.is_contiguous()
        return w, g, a
    return tuple(torch.randn(shape, generator=gen, dtype=dtype).to(device) for _ in range(3))


def _run(backend, params, grads, anchors, **kw):
    ws = [p.clone() if p.is_contiguous() else p.t().clone().t() for p in params]
    sgld_step_(ws, grads, anchors, backend=backend, **kw)
    return ws


KW = dict(step_size=1e-3, nbeta=37.0, localization=100.0, weight_decay=0.01, seed=7, step=3)


@pytest.mark.parametrize("op", ["sgld_step_", "covariance_update_", "grad_gram_pairwise"])
def test_backends_report(op):
    info = pypattern.backends(op)
    assert set(info) == {"cuda", "triton", "cpp", "reference"}
    for name, v in info.items():
        assert isinstance(v["available"], bool) and isinstance(v["reason"], str) and v["reason"], name
    assert info["reference"]["available"]
    assert info["cpp"]["available"], info["cpp"]["reason"]  # the extension is built by `make test`
    if info["cuda"]["available"]:  # a CUDA kernel runs only where torch sees a GPU
        assert torch.cuda.is_available()
    # every op registers all four backends in the one registry, and the chooser hands out those functions
    assert _backends.registered(op) == _backends.NAMES
    for name in _backends.NAMES:
        if info[name]["available"] or name == "reference":
            impl = _backends.dispatch(op, torch.device(device_of(name)), name)
            assert impl is _backends.implementation(op, name) and callable(impl)


def test_registry_errors_name_op_and_backend():
    with pytest.raises(KeyError, match="op 'no_such_op' has no implementation for backend 'cpp'"):
        _backends.implementation("no_such_op", "cpp")
    with pytest.raises(ValueError, match="backend 'fortran' is not one of"):
        _backends.register("sgld_step_", "fortran", lambda *a, **k: None)
    assert _backends.registered("sgld_step_") == _backends.NAMES  # the failed registration changed nothing


def test_automatic_choice_on_cpu_is_cpp():
    """On CPU tensors the chooser takes the C++ kernel (the interpreter is used only when forced)."""
    assert _backends.choose("sgld_step_", torch.device("cpu"), None) == "cpp"


@pytest.mark.parametrize("backend, device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [0, 1, 3, 63, 64, 65, 127, 128, 129, 257, 1001])
@pytest.mark.parametrize("extras", ["plain", "mask", "box", "mask+box"])
def test_equals_reference_without_noise(backend, device, dtype, size, extras):
    w, g, a = _inputs((size,), dtype, seed=size, device=device)
    masks = [to(device, torch.rand(size) > 0.3)] if "mask" in extras else None
    box = 0.05 if "box" in extras else None
    kw = dict(KW, noise_scale=0.0, bounding_box=box, masks=masks)
    ref = _run("reference", [w], [g], [a], **kw)[0]
    out = _run(backend, [w], [g], [a], **kw)[0]
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    if size:
        assert not torch.equal(out, w)  # the step did something
    if masks is not None:
        frozen = ~masks[0]
        assert torch.equal(out[frozen], w[frozen])  # masked entries untouched, bit for bit
    if box is not None:
        moved = masks[0] if masks is not None else torch.ones(size, dtype=torch.bool, device=device)
        assert bool(((out - a)[moved].abs() <= box + 1e-7).all())


@pytest.mark.parametrize("backend, device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_reference_with_noise_many_tensors_noncontiguous(backend, device, dtype):
    shapes = [(5, 7), (1,), (0, 3), (130, 3), (2, 3, 4)]
    params, grads, anchors = [], [], []
    for i, s in enumerate(shapes):
        w, g, a = _inputs(s, dtype, seed=i, device=device)
        params.append(w), grads.append(g), anchors.append(a)
    nc = _inputs((40, 9), dtype, noncontig=True, seed=99, device=device)
    params.append(nc[0]), grads.append(nc[1]), anchors.append(nc[2])
    masks = [None, None, None, to(device, torch.rand(130, 3) > 0.5), None, None]
    kw = dict(KW, noise_scale=1.0, bounding_box=0.2, masks=masks)
    ref = _run("reference", params, grads, anchors, **kw)
    out = _run(backend, params, grads, anchors, **kw)
    for r, o in zip(ref, out):
        # same Philox integers; float rounding of log/cos differs between math libraries
        torch.testing.assert_close(o, r, rtol=1e-5, atol=5e-6)
    # a non-contiguous view gets the noise of its contiguous copy
    contiguous = [t.contiguous() for t in (nc[0], nc[1], nc[2])]
    kw1 = dict(kw, masks=None)
    a1 = _run(backend, [contiguous[0]], [contiguous[1]], [contiguous[2]], **kw1)[0]
    a2 = _run(backend, [nc[0]], [nc[1]], [nc[2]], **kw1)[0]
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", FAST)
@pytest.mark.parametrize("masked", [False, True])
def test_equals_reference_1e6(backend, device, masked):
    """Noise on, every block size and thread split of the kernel (and many programs of the GPU kernels), with and
    without a mask."""
    w, g, a = _inputs((1_000_003,), torch.float32, seed=5, device=device)
    kw = dict(KW, noise_scale=0.5, bounding_box=0.3)
    if masked:
        kw["masks"] = [to(device, torch.rand(1_000_003, generator=torch.Generator().manual_seed(1)) > 0.3)]
    ref = _run("reference", [w], [g], [a], **kw)[0]
    out = _run(backend, [w], [g], [a], **kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=5e-6)


def _noise(backend, n, *, seed, step, tensor_index=0, dtype=torch.float32, device="cpu"):
    """Recover xi from one step with zero drift: w0 = w = 0, g = 0, step_size 1 -> w = xi."""
    params = [torch.zeros(1, dtype=dtype, device=device) for _ in range(tensor_index)]
    params.append(torch.zeros(n, dtype=dtype, device=device))
    grads = [torch.zeros_like(p) for p in params]
    sgld_step_(
        params,
        grads,
        [torch.zeros_like(p) for p in params],
        step_size=1.0,
        nbeta=0.0,
        localization=0.0,
        seed=seed,
        step=step,
        backend=backend,
    )
    return params[-1]


@pytest.mark.parametrize("backend, device", CASES)
def test_noise_statistics(backend, device):
    n = 200_000
    xi = _noise(backend, n, seed=123, step=0, device=device).double().cpu()
    assert abs(xi.mean().item()) < 5 / math.sqrt(n)
    assert abs(xi.var().item() - 1) < 5 * math.sqrt(2 / n)
    # fourth moment of a normal is 3; lag-1..4 correlations vanish (lags within and across Philox outputs)
    assert abs((xi**4).mean().item() - 3) < 0.1
    for lag in (1, 2, 3, 4, 5):
        r = torch.corrcoef(torch.stack([xi[:-lag], xi[lag:]]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(n), (lag, r)
    # tails: fraction beyond 3 sigma is 0.27%
    assert abs((xi.abs() > 3).double().mean().item() - 0.0027) < 0.001


@pytest.mark.parametrize("backend, device", CASES)
def test_noise_keyed(backend, device):
    def noise(**kw):
        return _noise(backend, 4096, device=device, **kw).cpu()

    base = noise(seed=1, step=2)
    assert torch.equal(base, noise(seed=1, step=2))
    others = [
        noise(seed=2, step=2),
        noise(seed=1, step=3),
        noise(seed=1, step=2 + 2**32),  # high word of the step counts
        noise(seed=1 + 2**32, step=2),  # high word of the seed counts
        noise(seed=1, step=2, tensor_index=1),
    ]
    for o in others:
        assert torch.corrcoef(torch.stack([base, o]))[0, 1].abs() < 0.08
        assert not torch.isclose(base, o).any()


@pytest.mark.parametrize("backend, device", FAST)
def test_noise_matches_reference_stream(backend, device):
    ref = philox_normals(10_000, seed=2**63 + 11, tensor_index=0, step=2**40 + 1)
    out = _noise(backend, 10_000, seed=2**63 + 11, step=2**40 + 1, device=device).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.skipif(not pypattern.backends()["cpp"]["available"], reason="C++ kernel not built")
def test_cpp_noise_within_three_float32_ulps_of_the_reference():
    """The README's figure: the C++ kernel's float32 noise and the reference's agree to within 3 float32 ulps
    (of the reference value) over 2^20 draws."""
    import numpy as np

    n = 1 << 20
    out = {}
    for backend in ("reference", "cpp"):
        w = torch.zeros(n)
        kw = dict(step_size=1.0, nbeta=0.0, localization=0.0, seed=123, step=7, backend=backend)
        sgld_step_([w], [torch.zeros(n)], [torch.zeros(n)], **kw)
        out[backend] = w.numpy().astype(np.float64)
    ulp = np.spacing(np.abs(out["reference"]).astype(np.float32)).astype(np.float64)
    assert float(np.max(np.abs(out["cpp"] - out["reference"]) / ulp)) <= 3.0


def test_noise_matches_triton_philox_stream():
    """The reference's integer Philox equals Triton's own tl.philox (so the stream is Triton's)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    info = pypattern.backends()["triton"]
    if not info["available"]:
        pytest.skip(f"triton: {info['reason']}")

    @triton.jit
    def k(out_ptr, seed, N: tl.constexpr):
        offs = tl.arange(0, N)
        ctr = (offs // 4).to(tl.uint32)
        z = ctr * 0
        x0, x1, x2, x3 = tl.philox(seed, ctr, z + 5, z + 9, z)
        tl.store(out_ptr + offs * 4 + 0, x0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + offs * 4 + 1, x1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + offs * 4 + 2, x2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + offs * 4 + 3, x3.to(tl.int64) & 0xFFFFFFFF)

    out = torch.zeros(64 * 4, dtype=torch.int64, device=device_of("triton"))
    k[(1,)](out, 1234, N=64)

    # reproduce the integer stream of the reference for counters 0..15 (element // 4), tensor 5, step 9
    c0 = torch.arange(16, dtype=torch.int64)
    c1, c2, c3 = torch.full_like(c0, 5), torch.full_like(c0, 9), torch.zeros_like(c0)
    k0, k1 = 1234, 0
    for _ in range(10):
        hi0, lo0 = spec._mul_hi_lo(c0, spec._PHILOX_ROUND_A)
        hi2, lo2 = spec._mul_hi_lo(c2, spec._PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + spec._PHILOX_KEY_A) & 0xFFFFFFFF, (k1 + spec._PHILOX_KEY_B) & 0xFFFFFFFF
    mine = torch.stack([c0, c1, c2, c3], 1)
    theirs = out.cpu().view(64, 4)[::4]  # every element of a counter holds the same four words
    assert torch.equal(mine, theirs)


# ----------------------------------------------------------------------------------------------- bad input


def _ok():
    return [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)]


def _nan_case(device):
    p = [torch.zeros(3, device=device), torch.zeros(5, device=device)]
    g = [torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0, float("inf"), 1.0])]
    return p, to(device, *g), [torch.zeros_like(t) for t in p]


@pytest.mark.parametrize("backend, device", CASES)
def test_nan_grad_names_tensor_and_keeps_params_finite(backend, device):
    p, g, a = _nan_case(device)
    with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
        sgld_step_(p, g, a, backend=backend, **dict(KW, noise_scale=1.0))
    assert all(torch.isfinite(t).all() for t in p)
    assert p[1][1] == 0 and p[1][3] == 0


@pytest.mark.parametrize("backend, device", CASES)
def test_fast_path_equals_validated_path_and_returns_flags(backend, device):
    """validate=False (the fast path) gives the validated step's result bit for bit; both return the per-tensor
    flags; check_finite=False returns them instead of raising."""
    (p0, g0, a0), (p1, g1, a1) = (
        _inputs(s, torch.float32, seed=i, device=device) for i, s in enumerate([(5, 3), (7,)])
    )
    ps, gs, an = [p0, p1], [g0, g1], [a0, a1]
    kw = dict(KW, noise_scale=0.7, bounding_box=0.9, seed=2**63 + 5, step=2**40 + 3, backend=backend)
    slow, fast = [p.clone() for p in ps], [p.clone() for p in ps]
    flags = sgld_step_(slow, gs, an, **kw)
    assert flags.dtype == torch.int32 and flags.tolist() == [0, 0]
    assert sgld_step_(fast, gs, an, validate=False, **kw).tolist() == [0, 0]
    for a, b in zip(slow, fast):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    p, g, a = _nan_case(device)
    assert sgld_step_(p, g, a, validate=False, check_finite=False, **dict(KW, backend=backend)).tolist() == [
        0,
        1,
    ]
    assert sgld_step_(p, g, a, check_finite=False, **dict(KW, backend=backend)).tolist() == [0, 1]
    assert p[1][1] == 0 and p[1][3] == 0 and bool(torch.isfinite(p[1]).all())
    with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
        sgld_step_(p, g, a, validate=False, **dict(KW, backend=backend))
    assert sgld_step_([], [], [], validate=False, **KW).shape == (0,)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(step_size=-1e-3), ValueError, "step_size must be > 0"),
        (dict(step_size=0.0), ValueError, "step_size must be > 0"),
        (dict(step_size=float("nan")), ValueError, "step_size must be finite"),
        (dict(step_size=float("inf")), ValueError, "step_size must be finite"),
        (dict(nbeta=-1.0), ValueError, "nbeta must be >= 0"),
        (dict(localization=float("nan")), ValueError, "localization must be finite"),
        (dict(bounding_box=0.0), ValueError, "bounding_box must be > 0"),
        (dict(seed=-1), ValueError, "seed must be in"),
        (dict(step=1.5), TypeError, "step must be an int"),
        (dict(backend="gpu"), ValueError, "backend='gpu' is not one of"),
    ],
)
def test_bad_scalars(kw, exc, match):
    with pytest.raises(exc, match=match):
        sgld_step_(*_ok(), **{**KW, **kw})


def test_bad_tensors():
    p, g, a = _ok()
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4,\) but params\[0\] has \(3,\)"):
        sgld_step_(p, [torch.zeros(4)], a, **KW)
    with pytest.raises(TypeError, match=r"anchors\[0\] has dtype torch.float64"):
        sgld_step_(p, g, [torch.zeros(3, dtype=torch.float64)], **KW)
    with pytest.raises(ValueError, match="same length"):
        sgld_step_(p, g + g, a, **KW)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.int64"):
        sgld_step_([torch.zeros(3, dtype=torch.long)], g, a, **KW)
    with pytest.raises(ValueError, match=r"masks\[0\] has shape"):
        sgld_step_(p, g, a, masks=[torch.ones(2, dtype=torch.bool)], **KW)
    with pytest.raises(ValueError, match="masks must have one entry"):
        sgld_step_(p, g, a, masks=[], **KW)
    meta = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match=r"anchors\[0\] is on meta"):
        sgld_step_(p, g, [meta], **KW)


def test_forced_backend_that_cannot_run_is_clear_error(monkeypatch):
    """Forcing cuda on CPU tensors fails, saying why: the backend is unavailable, or it needs CUDA tensors."""
    match = (
        "backend 'cuda' runs on CUDA tensors only"
        if pypattern.backends()["cuda"]["available"]
        else "backend 'cuda' was forced but is unavailable"
    )
    with pytest.raises(RuntimeError, match=match):
        sgld_step_(*_ok(), backend="cuda", **KW)
    monkeypatch.setenv("PYPATTERN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' "):
        sgld_step_(*_ok(), **KW)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cpp' runs on CPU tensors only"):
            sgld_step_(*to("cuda", *(t[0] for t in _ok())), backend="cpp", **KW)
    if os.environ.get("TRITON_INTERPRET") != "1" and pypattern.backends()["triton"]["available"]:
        with pytest.raises(RuntimeError, match="backend 'triton' on CPU tensors needs TRITON_INTERPRET=1"):
            sgld_step_(*_ok(), backend="triton", **KW)


def test_env_forces_backend(monkeypatch):
    """PYPATTERN_BACKEND=reference gives the reference's exact result (the cpp kernel's differs in the last bits)."""
    w, g, a = _inputs((4096,), torch.float32)
    kw = dict(KW, noise_scale=1.0)
    ref = _run("reference", [w], [g], [a], **kw)[0]
    monkeypatch.setenv("PYPATTERN_BACKEND", "reference")
    out = _run(None, [w], [g], [a], **kw)[0]
    assert torch.equal(out, ref)


def test_env_backend_that_is_not_a_backend_names_the_variable(monkeypatch):
    """PYPATTERN_BACKEND=garbage: the error names the environment variable (not a backend= the caller never
    passed), the value and the valid names; the sampler reports the same."""
    monkeypatch.setenv("PYPATTERN_BACKEND", "garbage")
    match = r"environment variable PYPATTERN_BACKEND='garbage' is not one of \('cuda', 'triton', 'cpp', 'reference'\)"
    with pytest.raises(ValueError, match=match + "; unset it"):
        sgld_step_(*_ok(), **KW)
    model = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match=match):
        pypattern.sample(model, [(x, x[:, :1])], num_chains=1, num_draws=2, nbeta=1.0, quiet=True)
    # an argument still wins over the variable
    out = _run("reference", *_ok(), **KW)
    monkeypatch.delenv("PYPATTERN_BACKEND")
    assert torch.equal(out[0], _run("reference", *_ok(), **KW)[0])


@pytest.mark.parametrize("backend, device", CASES)
def test_numpy_scalars_are_numbers(backend, device):
    """np.float32 / np.float64 hyperparameters and np.int64 keys give exactly the step of the equal Python
    numbers (the float32 value is converted exactly, as float(np.float32(1e-4)) is)."""
    import numpy as np

    w, g, a = to(device, *_inputs((257,), torch.float32, seed=4))
    plain = dict(
        step_size=float(np.float32(1e-4)), nbeta=37.0, localization=2.5, weight_decay=0.01, seed=7, step=3
    )
    numpy = dict(
        step_size=np.float32(1e-4),
        nbeta=np.float64(37.0),
        localization=np.float32(2.5),
        weight_decay=np.float64(0.01),
        seed=np.int64(7),
        step=np.uint64(3),
    )
    ref = _run(backend, [w], [g], [a], **plain)[0]
    out = _run(backend, [w], [g], [a], **numpy)[0]
    assert torch.equal(out, ref)


def test_empty_list_is_noop():
    assert sgld_step_([], [], [], **KW).shape == (0,)


_AOT = """
import sys
sys.path.insert(0, TESTS_DIR)
import torch
from _triton_binder import compile_recorded, recording
import pypattern.ops.sgld.triton as st

# three tensors (tensor_index 0, 1, 2; sizes 1, 2 and 1027), steps whose low and high words take 0, 1 and 2, and
# seeds 0, 1, 2: Triton's launcher specialises an int equal to 1 as a constexpr and ints divisible by 16 apart
kw = dict(nbeta=10.0, localization=1.0, weight_decay=0.0, noise_scale=1.0, block=1024)
for dtype in (torch.float32, torch.float64):
    ps = [torch.randn(1, dtype=dtype), torch.randn(2, dtype=dtype), torch.randn(1027, dtype=dtype)]
    for step, seed, mask, box in ((0, 0, False, None), (1, 1, True, 0.5), (2, 2, False, 0.5), (2**32 + 1, 7, True, None),
                                  (2 * 2**32 + 2, 2**63 + 1, False, None)):
        with recording(st, "_sgld_kernel") as rec:
            st.sgld_step_triton_([p.clone() for p in ps], [p.clone() for p in ps], [p.clone() for p in ps],
                                 step_size=1e-3, bounding_box=box, seed=seed, step=step,
                                 masks=[torch.ones_like(p) for p in ps] if mask else None, **kw)
        assert [c[1][8] for c in rec.calls] == [0, 1, 2]  # tensor_index
        compile_recorded(rec, archs=(80, 90) if step == 1 else (80,))
    with recording(st, "_sgld_kernel") as rec:  # no noise
        st.sgld_step_triton_([p.clone() for p in ps], [p.clone() for p in ps], [p.clone() for p in ps],
                             step_size=1e-3, bounding_box=None, seed=1, step=1, masks=None, **{**kw, "noise_scale": 0.0})
    compile_recorded(rec)
print("ok")
""".replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__))))


def test_triton_kernel_compiles_for_gpus():
    """The interpreter accepts more than the GPU compiler: compile the SGLD kernel to sm_80/sm_90 cubin for both
    dtypes, with and without mask, box and noise, specialised as Triton's GPU launcher specialises the wrapper's
    own launches (tensor_index, step words and seed of 0, 1 and 2; no GPU needed; a separate process without
    TRITON_INTERPRET)."""
    assert_compiles_for_gpus(_AOT)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_validation_refuses_non_finite_masks_and_anchors(backend):
    from pypattern.ops.sgld.op import sgld_step_ as step

    common = dict(step_size=1e-3, nbeta=10.0, localization=1.0, seed=0, step=0, backend=backend)
    w = torch.zeros(2, 3, dtype=torch.float64)
    v = torch.zeros(4, dtype=torch.float64)
    bad_anchor = v.clone()
    bad_anchor[2] = float("nan")
    with pytest.raises(ValueError, match=r"anchors\[1\] holds 1 NaN or Inf"):
        step([w, v], [torch.ones_like(w), torch.ones_like(v)], [w.clone(), bad_anchor], **common)
    mask = torch.ones_like(v)
    mask[0] = float("inf")
    with pytest.raises(ValueError, match=r"masks\[1\] holds 1 NaN or Inf"):
        step(
            [w, v],
            [torch.ones_like(w), torch.ones_like(v)],
            [w.clone(), v.clone()],
            masks=[None, mask],
            **common,
        )
    assert torch.equal(w, torch.zeros_like(w)) and torch.equal(v, torch.zeros_like(v))  # nothing written


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_validation_refuses_anchors_that_are_the_parameters(backend):
    from pypattern.ops.sgld.op import sgld_step_ as step

    common = dict(step_size=1e-3, nbeta=10.0, localization=1.0, seed=0, step=0, backend=backend)
    w = torch.zeros(2, 3, dtype=torch.float64)
    for alias in (w, w.detach(), w.view(6).view(2, 3)):
        with pytest.raises(ValueError, match=r"anchors\[0\] shares memory with params\[0\]"):
            step([w], [torch.ones_like(w)], [alias], **common)
    flat = torch.zeros(12, dtype=torch.float64)  # disjoint halves of one buffer are fine
    step([flat[:6]], [torch.ones(6, dtype=torch.float64)], [flat[6:]], **common)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overflowing_update_from_a_finite_gradient_is_reported(backend, dtype):
    from pypattern.ops.sgld.op import sgld_step_ as step

    big = torch.finfo(dtype).max / 10
    w = torch.zeros(4, dtype=dtype)
    g = torch.full((4,), big, dtype=dtype)
    assert torch.isfinite(g).all()
    with pytest.raises(FloatingPointError, match=r"overflowed .* params\[0\] .*step_size=1.0"):
        step(
            [w],
            [g],
            [w.clone()],
            step_size=1.0,
            nbeta=100.0,
            localization=0.0,
            seed=0,
            step=0,
            backend=backend,
        )
    assert torch.equal(w, torch.zeros_like(w))  # nothing written


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value) encountered:RuntimeWarning"
)  # Triton's interpreter
def test_parameters_already_non_finite_are_named_as_such(backend, device):
    # a weight that is NaN/inf before the step is the model's fault, not an overflow of the update
    w, ok, g, a = to(
        device, torch.tensor([0.0, float("nan"), 1.0]), torch.zeros(3), torch.ones(3), torch.zeros(3)
    )
    with pytest.raises(
        FloatingPointError, match=r"already held inf/NaN .*params\[1\].*Give finite weights"
    ) as e:
        sgld_step_(
            [ok, w],
            [g, g.clone()],
            [a, a.clone()],
            step_size=1e-3,
            nbeta=1.0,
            localization=0.0,
            seed=0,
            step=0,
            backend=backend,
        )
    assert "overflowed" not in str(e.value) and "params[0]" not in str(e.value)
    with pytest.raises(TypeError, match="string '0.1'"):
        sgld_step_(
            [ok], [g], [a], step_size="0.1", nbeta=1.0, localization=0.0, seed=0, step=0, backend=backend
        )


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extras", ["plain", "mask", "box"])
@pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value) encountered:RuntimeWarning"
)  # Triton's interpreter
def test_overflowing_update_is_not_written_and_names_the_tensor(backend, device, dtype, extras):
    """A huge finite gradient (1e38 in float32, 1e308 in float64) whose update overflows, NaN/Inf gradients
    elsewhere, a non-contiguous view and an empty tensor: see tests/_overflow_case.py."""
    check_step("sgld_step_", backend, device, dtype, extras)


def test_a_tensor_listed_twice_or_a_gradient_aliasing_its_parameter_is_refused():
    from pypattern import sgld_step_

    w = torch.randn(5, 4)
    g, a = torch.randn(5, 4), w.clone()
    kw = dict(step_size=1e-3, nbeta=10.0, localization=1.0, seed=0, step=0)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        sgld_step_([w, w], [g, g.clone()], [a, a.clone()], **kw)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        sgld_step_([w[:3], w[2:]], [g[:3], g[2:]], [a[:3], a[2:]], **kw)
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[0\]"):
        sgld_step_([w], [w], [a], **kw)
    # disjoint views of one tensor are fine
    sgld_step_([w[:2], w[2:]], [g[:2], g[2:]], [a[:2], a[2:]], **kw)


@pytest.mark.parametrize("op", ["sgld_step_", "sgnht_step_", "rmsprop_sgld_step_"])
def test_anchor_gradient_or_mask_aliasing_another_tensors_parameter_is_refused(op):
    """An anchor, gradient or mask that shares memory with the parameter of another index (not only its own) is
    refused naming both, before anything is written: the step would read it after, or while, that parameter is
    updated. Disjoint parts of one buffer are fine."""
    from pypattern.ops.rmsprop_sgld import rmsprop_sgld_step_
    from pypattern.ops.sgnht import sgnht_step_

    def step(params, grads, anchors, masks=None):
        kw = dict(step_size=0.1, nbeta=1.0, localization=3.0, noise_scale=0.0, seed=0, step=0, masks=masks)
        states = [torch.zeros_like(p) for p in params]
        if op == "sgnht_step_":
            return sgnht_step_(params, grads, anchors, states, torch.zeros(1, dtype=torch.float64), **kw)
        if op == "rmsprop_sgld_step_":
            return rmsprop_sgld_step_(params, grads, anchors, states, **kw)
        return sgld_step_(params, grads, anchors, **kw)

    p0, p1 = torch.zeros(3), torch.zeros(2, 3)
    g, a = [torch.full((3,), 10.0), torch.ones(2, 3)], [torch.zeros(3), torch.zeros(2, 3)]
    cases = [
        (
            r"anchors\[1\] shares memory with params\[0\]: the step writes params\[0\]",
            g,
            [a[0], p0.expand(2, 3)],
            None,
        ),
        (r"anchors\[0\] shares memory with params\[1\]", g, [p1[1], a[1]], None),
        (
            r"grads\[1\] shares memory with params\[0\]: the step would read a gradient",
            [g[0], p0.expand(2, 3)],
            a,
            None,
        ),
        (r"masks\[0\] shares memory with params\[1\]: the step would read a mask", g, a, [p1[0], None]),
        (r"anchors\[0\] shares memory with params\[0\]: the anchors must be a copy", g, [p0, a[1]], None),
    ]
    for match, grads, anchors, masks in cases:
        with pytest.raises(ValueError, match=match):
            step([p0, p1], grads, anchors, masks)
        assert not p0.any() and not p1.any()  # nothing written
    buf = torch.zeros(12)
    step([buf[:3], buf[3:9].view(2, 3)], g, [buf[9:12], a[1]], [None, torch.ones(2, 3)])
    assert buf[:3].ne(0).all() and buf[9:].eq(0).all()


_BROKEN_TRITON_SCRIPT = """
import os, sys
import torch
import pypattern
from pypattern.ops import CrossCovariance, row_dots
from pypattern.ops.activations import gelu_tanh

marker = os.environ["FAKE_TRITON_MARKER"]
pypattern.sgld_step_([torch.zeros(3)], [torch.ones(3)], [torch.zeros(3)], step_size=1e-2, nbeta=1.0,
                     localization=1.0, seed=0, step=0)
CrossCovariance(2, 3).update(torch.randn(100, 2), torch.randn(100, 3)).cov()
row_dots(torch.ones(1, 2, 3), [torch.ones(1, 2, 3)])
gelu_tanh(torch.ones(3))
print("cpu ops imported triton:", os.path.exists(marker))
print("triton:", pypattern.backends("sgld_step_")["triton"])
try:
    pypattern.sgld_step_([torch.zeros(3)], [torch.ones(3)], [torch.zeros(3)], step_size=1e-2, nbeta=1.0,
                         localization=1.0, seed=0, step=0, backend="triton")
except RuntimeError as e:
    print("forced:", e)
"""


def test_cpu_dispatch_does_not_import_triton_and_a_broken_triton_is_unavailable(tmp_path):
    """The automatic choice on CPU tensors never imports triton (it cannot choose it there), so a triton whose
    import raises (here a RuntimeError, as a mismatched driver can) leaves the CPU ops working; reported or forced,
    it is an unavailable backend with that reason, not an error from inside the import."""
    import subprocess
    import sys

    fake = tmp_path / "site" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os\n"
        "open(os.environ['FAKE_TRITON_MARKER'], 'a').write('imported')\n"
        "raise RuntimeError('simulated: triton failed to initialise')\n"
    )
    root = os.path.dirname(os.path.dirname(pypattern.__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), root]),
        "FAKE_TRITON_MARKER": str(tmp_path / "marker"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYPATTERN_BACKEND", None)
    r = subprocess.run(
        [sys.executable, "-c", _BROKEN_TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "cpu ops imported triton: False" in out, out
    assert "'available': False" in out and "triton failed to import (RuntimeError: simulated" in out, out
    assert (
        "forced: backend 'triton' was forced but is unavailable: triton failed to import (RuntimeError" in out
    )


def _shared_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two views of one storage have a byte in common, listing every element's bytes."""
    from pypattern.ops.sgld.op import _offsets

    def addresses(t):
        out = set()
        for off in _offsets(t, 0).tolist():
            start = t.data_ptr() + off * t.element_size()
            out.update(range(start, start + t.element_size()))
        return out

    return bool(addresses(x) & addresses(y))


def test_memory_overlap_of_strided_views_is_exact():
    """The overlap tests against a listing of every element's bytes, on random strided views of one storage
    (several dimensions, zero and repeated strides, element sizes that differ): both the overlap of two views and
    the overlap of a view with itself are decided, and decided right."""
    from pypattern.ops.sgld.op import DISJOINT, OVERLAP, _internal_overlap, _offsets, _overlap

    gen = torch.Generator().manual_seed(1)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    strides = [0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 16, 24, 30, 60, 97]
    for trial in range(1500):
        base = torch.zeros(2000, dtype=[torch.float32, torch.float64, torch.uint8, torch.int16][trial % 4])

        def view(base=base):
            shape = [randint(1, 5) for _ in range(randint(1, 4))]
            st = [strides[randint(0, len(strides) - 1)] for _ in shape]
            extent = sum((n - 1) * s for n, s in zip(shape, st))
            return base.as_strided(shape, st, randint(0, 1999 - extent))

        x, y = view(), view()
        if trial % 5 == 0 and y.stride()[-1] == 1 and y.element_size() > 1:
            y = y.view(torch.uint8)  # another element size: byte offsets that are not whole elements
        assert _overlap(x, y) == (OVERLAP if _shared_bytes(x, y) else DISJOINT), (
            x.shape,
            x.stride(),
            y.stride(),
        )
        repeated = torch.unique(_offsets(x, 0)).numel() != x.numel()
        assert _internal_overlap(x) == (OVERLAP if repeated else DISJOINT), (x.shape, x.stride())


def test_interleaved_views_of_a_large_tensor_are_distinct_params(monkeypatch):
    """The halves W[:, ::2] and W[:, 1::2] share no element whatever their size (past 2**24 elements together
    they are decided from their strides, not listed); where the test cannot decide, the refusal says the tensors
    may share memory instead of asserting that they do."""
    from pypattern.ops.sgld import op as sgld_op

    W = torch.zeros(4096, 4098)
    left, right = W[:, ::2], W[:, 1::2]
    assert left.numel() + right.numel() > 1 << 24
    assert sgld_op._overlap(left, right) == sgld_op.DISJOINT
    assert sgld_op._overlap(left, W[:, 2::2]) == sgld_op.OVERLAP
    grads = [torch.ones(left.shape), torch.full(right.shape, 2.0)]
    sgld_step_(
        [left, right],
        grads,
        [torch.zeros(left.shape), torch.zeros(right.shape)],
        step_size=0.1,
        nbeta=1.0,
        localization=0.0,
        noise_scale=0.0,
        seed=0,
        step=0,
    )
    assert bool((W[:, ::2] == -0.05).all()) and bool((W[:, 1::2] == -0.1).all())
    del W, left, right, grads
    monkeypatch.setattr(sgld_op, "_SEARCH_BUDGET", 0)  # an undecidable case stands in: nothing decides
    monkeypatch.setattr(sgld_op, "_ENUMERATE_LIMIT", 0)
    w = torch.zeros(4, 6)
    halves = [w[:, ::2], w[:, 1::2]]
    zeros = [torch.zeros(4, 3), torch.zeros(4, 3)]
    with pytest.raises(
        ValueError, match=r"params\[0\] and params\[1\] may share memory \(could not rule it out\)"
    ):
        sgld_step_(halves, zeros, zeros, step_size=0.1, nbeta=1.0, localization=0.0, seed=0, step=0)


@pytest.mark.parametrize("backend, device", CASES)
def test_every_backend_tells_autograd_and_refuses_aliased_or_expanded_state(backend, device):
    """A step bumps the version of what it writes on every backend (a graph that saved the old weights then
    refuses to backpropagate, as after any in-place op), refuses params that require grad in grad mode, and
    refuses expanded params and momenta / running means that alias another tensor; interleaved strided views
    that share no element are distinct tensors."""
    from pypattern.ops.rmsprop_sgld import rmsprop_sgld_step_
    from pypattern.ops.sgnht import sgnht_step_

    kw = dict(step_size=1e-2, nbeta=1.0, localization=1.0, seed=1, step=0, backend=backend)
    w = torch.randn(6, device=device, requires_grad=True)
    y = (w * w).sum()
    with torch.no_grad():
        v0 = w._version
        sgld_step_([w], [torch.ones_like(w)], [w.detach().clone()], **kw)
    assert w._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with pytest.raises(RuntimeError, match=r"params\[0\] requires grad and grad mode is on"):
        sgld_step_([w], [torch.ones_like(w)], [w.detach().clone()], **kw)
    p = torch.randn(3, device=device)
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory"):
        sgld_step_(
            [p, torch.zeros(3, device=device).expand(2, 3)],
            [torch.ones(3, device=device), torch.ones(2, 3, device=device)],
            [p.clone(), torch.zeros(2, 3, device=device)],
            **kw,
        )
    x, g, a = torch.randn(4, device=device), torch.randn(4, device=device), torch.randn(4, device=device)
    th = torch.zeros(1, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"momenta\[0\] shares memory with params\[0\]"):
        sgnht_step_([x], [g], [a], [x], th, **kw)
    m = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match=r"momenta\[0\] and momenta\[1\] share memory"):
        sgnht_step_([x, a], [g, g.clone()], [a.clone(), x.clone()], [m, m], th, **kw)
    with pytest.raises(ValueError, match=r"square_avgs\[0\] shares memory with grads\[0\]"):
        rmsprop_sgld_step_([x], [g], [a], [g], **kw)
    W = torch.randn(4, 6, device=device)
    left, right = W[:, ::2], W[:, 1::2]  # interleaved, no common element
    before = W.clone()
    sgld_step_(
        [left, right], [torch.ones_like(left), torch.ones_like(right)], [left.clone(), right.clone()], **kw
    )
    assert not torch.equal(W, before)
    with pytest.raises(TypeError, match="step_size must be a real number, got True"):
        sgld_step_([x], [g], [a], **{**kw, "step_size": True})
