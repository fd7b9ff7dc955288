"""Prefix attention (pypattern.ops.attention.prefix_attention): every backend against an independent float64
computation (one query at a time, in numpy) on random and adversarial inputs (shapes around the kernel's blocks of
four query rows and its vector width, grouped-query heads, shared and own keys of every length including none,
masks with fully masked rows, strided and non-contiguous views, large and non-finite values, empty sizes), the
automatic choice, bad input, and its use in exact patching."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch
from _backend_cases import backend_devices
from _isa_build import ISAS, RUNNABLE, build_drivers

import pypattern
from pypattern.ops.attention import prefix_attention, prefix_attention_reference

HAS_CPP = pypattern.backends("prefix_attention")["cpp"]["available"]
CASES = backend_devices("prefix_attention", automatic=True)


def _naive(q, kp, vp, kn, vn, mask, scale) -> np.ndarray:
    """Float64, one query row and head at a time; a row with no key NaN, no keys at all zeros."""
    q, kp, vp, kn, vn = (t.detach().double().cpu().numpy() for t in (q, kp, vp, kn, vn))
    mask = mask.cpu().numpy()
    C, B, Rq, H, dh = q.shape
    Hkv = kn.shape[3]
    G = H // Hkv
    out = np.zeros((C, B, Rq, H, dh))
    for c in range(C):
        for b in range(B):
            for h in range(H):
                K = np.concatenate([kp[b, :, h // G], kn[c, b, :, h // G]], 0)
                V = np.concatenate([vp[b, :, h // G], vn[c, b, :, h // G]], 0)
                for r in range(Rq):
                    if K.shape[0] == 0:
                        continue
                    keep = ~mask[r]
                    if not keep.any():
                        out[c, b, r, h] = np.nan
                        continue
                    s = (K[keep] @ q[c, b, r, h]) * scale
                    with np.errstate(invalid="ignore", over="ignore"):
                        e = np.exp(s - s.max())
                        out[c, b, r, h] = (e / e.sum()) @ V[keep]
    return out


def _inputs(C, B, Rq, H, Hkv, dh, P, Rk, dtype, device="cpu", mask="causal", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)
    q, kp, vp = r(C, B, Rq, H, dh), r(B, P, Hkv, dh), r(B, P, Hkv, dh)
    kn, vn = r(C, B, Rk, Hkv, dh), r(C, B, Rk, Hkv, dh)
    Tk = P + Rk
    if mask == "causal":  # queries at the last Rq positions
        m = torch.arange(Tk)[None, :] > torch.arange(Tk - Rq, Tk)[:, None]
    elif mask == "none":
        m = torch.zeros(Rq, Tk, dtype=torch.bool)
    else:  # random, with the first row fully masked
        m = torch.rand(Rq, Tk, generator=g) < 0.4
        if Rq:
            m[0] = True
    return q, kp, vp, kn, vn, m.to(device)


def _check(out, args, scale, dtype):
    want = _naive(*args, scale)
    got = out.detach().double().cpu().numpy()
    assert out.shape == args[0].shape and out.dtype == dtype and out.is_contiguous()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    fin = ~np.isnan(want)
    if fin.any():
        # each output a convex combination of values: errors relative to the values' size
        vmax = max([1.0] + [float(v.abs().max()) for v in (args[2], args[4]) if v.numel()])
        tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype] * vmax
        err = np.abs(got[fin] - want[fin]).max()
        assert err <= tol, f"max |error| {err} > {tol}"


SHAPES = [
    # C, B, Rq, H, Hkv, dh, P, Rk
    (1, 1, 1, 1, 1, 1, 0, 1),
    (3, 2, 5, 4, 2, 64, 7, 5),  # grouped heads, one block of four rows and a tail
    (2, 2, 8, 12, 12, 64, 24, 8),  # GPT-2-like heads, shared keys before the cells' own
    (2, 3, 6, 6, 3, 33, 40, 6),  # a head size off the vector width, keys past two vectors
    (1, 2, 3, 8, 1, 80, 0, 17),  # one key/value head (multi-query), no shared keys
    (2, 1, 1, 2, 2, 128, 100, 1),  # one query after a long prefix, the mix in two passes of dh
    (2, 2, 4, 2, 1, 16, 5, 0),  # no own keys
]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", ["causal", "random"])
def test_against_naive(backend, device, dtype, shape, mask):
    C, B, Rq, H, Hkv, dh, P, Rk = shape
    if mask == "causal" and Rq > P + Rk:
        pytest.skip("more queries than keys")
    args = _inputs(*shape, dtype, device, mask=mask)
    scale = 1 / math.sqrt(dh)
    _check(prefix_attention(*args, scale, backend=backend), args, scale, dtype)


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_views(backend, device):
    """Operands read in place at any strides: the layouts the engine hands over (keys (B, T, Hkv, dh) sliced to a
    prefix, queries permuted), a transposed last dimension (copied) and a 16-bit-offset view."""
    C, B, Rq, H, Hkv, dh, P, Rk = 2, 3, 5, 6, 2, 24, 9, 5
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().to(device)
    q = r(B, C, H, Rq, dh).permute(1, 0, 3, 2, 4)  # (C, B, Rq, H, dh), not contiguous
    kp = r(B, P + 7, Hkv, dh)[:, :P]  # a prefix of longer cached keys
    vp = r(B, dh, P, Hkv).permute(0, 2, 3, 1)  # last dimension strided: copied
    kn = r(C, B, Rk, Hkv, 2 * dh)[..., ::2]  # every other element: copied
    vn = r(C, B, Rk, Hkv + 1, dh)[:, :, :, 1:]  # offset view
    mask = (torch.arange(P + Rk)[None, :] > torch.arange(P, P + Rk)[:, None]).to(device)
    args = (q, kp, vp, kn, vn, mask)
    _check(prefix_attention(*args, 0.3, backend=backend), args, 0.3, torch.float32)
    assert not q.is_contiguous() and not kp.is_contiguous()


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_sizes(backend, device):
    for shape in [
        (0, 2, 3, 2, 1, 8, 4, 3),
        (2, 0, 3, 2, 1, 8, 4, 3),
        (2, 2, 0, 2, 1, 8, 4, 3),
        (2, 2, 3, 2, 1, 0, 4, 3),
    ]:
        args = _inputs(*shape, torch.float32, device, mask="none")
        out = prefix_attention(*args, 1.0, backend=backend)
        assert out.shape == args[0].shape and out.numel() == 0
    # no keys at all: zeros (the mix of an empty pattern)
    args = _inputs(2, 2, 3, 2, 1, 8, 0, 0, torch.float64, device, mask="none")
    out = prefix_attention(*args, 1.0, backend=backend)
    assert out.shape == (2, 2, 3, 2, 8) and torch.equal(
        out.cpu(), torch.zeros(2, 2, 3, 2, 8, dtype=torch.float64)
    )


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_and_nonfinite(backend, device, dtype):
    """Scores far apart (the softmax's max taken first: no overflow), and NaN or infinite inputs giving NaN rows
    exactly where the reference's softmax does."""
    args = list(_inputs(2, 2, 5, 4, 2, 16, 6, 5, dtype, device, mask="causal"))
    args[0] = args[0] * 30  # scores of hundreds: exp would overflow without the max
    args = tuple(args)
    _check(prefix_attention(*args, 1.0, backend=backend), args, 1.0, dtype)
    q = args[0].clone()
    q[0, 1, 2, 3, 0] = float("nan")
    q[1, 0, 4, 0, 5] = float("inf")
    bad = (q, *args[1:])
    out = prefix_attention(*bad, 1.0, backend=backend).cpu()
    ref = prefix_attention_reference(*(t.cpu() for t in bad), 1.0)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    fin = ~ref.isnan()
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-5)


@pytest.mark.skipif(not HAS_CPP, reason="no C++ kernel")
def test_threads_do_not_change_the_result():
    args = _inputs(3, 4, 7, 6, 3, 40, 11, 7, torch.float32, mask="random")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prefix_attention(*args, 0.2, backend="cpp")
        torch.set_num_threads(2)
        two = prefix_attention(*args, 0.2, backend="cpp")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one.isnan(), two.isnan())
    assert torch.equal(one.nan_to_num(), two.nan_to_num())


def test_automatic_choice_and_gradients():
    args = _inputs(2, 2, 3, 4, 2, 8, 3, 3, torch.float64)
    if HAS_CPP:
        assert torch.equal(prefix_attention(*args, 0.5), prefix_attention(*args, 0.5, backend="cpp"))
    # a 16-bit dtype takes the reference automatically; forcing the kernel on it is refused by name
    half = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in args)
    out = prefix_attention(*half, 0.5)
    torch.testing.assert_close(out.float(), prefix_attention_reference(*half, 0.5).float())
    if HAS_CPP:
        with pytest.raises(ValueError, match="q has dtype torch.bfloat16"):
            prefix_attention(*half, 0.5, backend="cpp")
    # inputs that need a gradient take the (differentiable) reference: the gradient is the reference's
    q = args[0].clone().requires_grad_(True)
    prefix_attention(q, *args[1:], 0.5).sum().backward()
    q2 = args[0].clone().requires_grad_(True)
    prefix_attention_reference(q2, *args[1:], 0.5).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)
    if HAS_CPP:
        with pytest.raises(ValueError, match="not differentiable"):
            prefix_attention(q, *args[1:], 0.5, backend="cpp")


def test_bad_input_is_refused_by_name():
    q, kp, vp, kn, vn, m = _inputs(2, 2, 3, 4, 2, 8, 3, 3, torch.float32)
    with pytest.raises(ValueError, match="q must be 5-D"):
        prefix_attention(q[0], kp, vp, kn, vn, m, 1.0)
    with pytest.raises(ValueError, match="k_new has shape"):
        prefix_attention(q, kp, vp, kn[:, :1], vn, m, 1.0)
    with pytest.raises(ValueError, match="positive multiple"):
        prefix_attention(q[:, :, :, :3], kp, vp, kn, vn, m, 1.0)
    with pytest.raises(ValueError, match="v_new has shape"):
        prefix_attention(q, kp, vp, kn, vn[:, :, :2], m, 1.0)
    with pytest.raises(ValueError, match="k_prefix has shape"):
        prefix_attention(q, kp[:1], vp, kn, vn, m, 1.0)
    with pytest.raises(ValueError, match="v_prefix has shape"):
        prefix_attention(q, kp, vp[:, :2], kn, vn, m, 1.0)
    with pytest.raises(ValueError, match="mask is torch.int64"):
        prefix_attention(q, kp, vp, kn, vn, m.long(), 1.0)
    with pytest.raises(ValueError, match=r"expected a bool tensor of shape \(3, 6\)"):
        prefix_attention(q, kp, vp, kn, vn, m[:, :5], 1.0)
    with pytest.raises(ValueError, match="v_new has dtype torch.float64"):
        prefix_attention(q, kp, vp, kn, vn.double(), m, 1.0)
    with pytest.raises(ValueError, match="q has dtype torch.int64"):
        prefix_attention(q.long(), kp.long(), vp.long(), kn.long(), vn.long(), m, 1.0)
    with pytest.raises(TypeError, match="scale must be a real number"):
        prefix_attention(q, kp, vp, kn, vn, m, torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale is nan"):
        prefix_attention(q, kp, vp, kn, vn, m, float("nan"))
    with pytest.raises(TypeError, match="k_prefix must be a Tensor"):
        prefix_attention(q, kp.numpy(), vp, kn, vn, m, 1.0)


@pytest.mark.skipif(not HAS_CPP, reason="no C++ kernel")
def test_exact_patching_uses_the_kernel_and_matches_the_torch_path(monkeypatch):
    """The engine's attention through the kernel equals the engine's torch path (the kernel turned off) and the
    naive patching loop's effects, on a grouped-query rotary model and GPT-2-shaped one."""
    from pypattern.patching import engine as E

    calls = []
    real = E.prefix_attention

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    for cfg in (
        dict(
            n_layers=2,
            d_model=24,
            n_heads=4,
            n_key_value_heads=2,
            d_head=6,
            d_mlp=32,
            d_vocab=19,
            n_ctx=16,
            positional_embedding_type="rotary",
            normalization_type="RMS",
            act_fn="silu",
            gated_mlp=True,
        ),
        dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=23, n_ctx=16, act_fn="gelu_new"),
    ):
        torch.manual_seed(0)
        model = pypattern.Transformer(pypattern.TransformerConfig(**cfg, dtype=torch.float64))
        clean = torch.randint(0, cfg["d_vocab"], (3, 9))
        corr = torch.randint(0, cfg["d_vocab"], (3, 9))
        metric = pypattern.patching.LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
        for site in ("resid_pre", "attn_out", "z", "v"):
            calls.clear()
            monkeypatch.setattr(E, "prefix_attention", counted)
            fast = pypattern.patching.activation_patching(model, site, clean, corr, metric=metric)
            assert calls, f"{site}: the kernel did not run"
            monkeypatch.setattr(E.ExactEngine, "_kernel_scale", lambda *a, **k: None)
            slow = pypattern.patching.activation_patching(model, site, clean, corr, metric=metric)
            monkeypatch.undo()
            torch.testing.assert_close(fast.values, slow.values, rtol=1e-10, atol=1e-10)


ISA_BUILDS = None


@pytest.mark.parametrize("isa", list(ISAS))
def test_every_instruction_set_against_a_scalar_loop(tmp_path_factory, isa):
    """The raw kernel compiled for each vector width (the extension is built for this CPU's only) against a
    long-double loop, over shapes around its blocks and vectors, in float32 and float64."""
    global ISA_BUILDS
    if not RUNNABLE[isa]:
        pytest.skip(f"this CPU cannot run {isa} code")
    if ISA_BUILDS is None:
        ISA_BUILDS = build_drivers(
            tmp_path_factory.mktemp("attention_isa"),
            ["csrc", "csrc/attention"],
            ["tests/attention_isa_driver.cpp", "csrc/attention/attention_cpu_fast.cpp"],
        )
    run = subprocess.run([str(ISA_BUILDS[isa])], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "checked" in run.stdout
