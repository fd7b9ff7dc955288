"""The fused SGNHT and RMSprop-SGLD steps: every backend against the plain-torch reference (random and adversarial
inputs, masks, bounding box, non-contiguous views, many tensors), the shared noise stream, the thermostat's
reduction, bad input; and the truth: on a Gaussian posterior each sampler's draws (SGLD too) match the exact
stationary mean and covariance of its discretised dynamics within Monte Carlo error, that covariance being the
exact posterior's up to a known O(step) bias. Each backend runs on the tensors of its device
(see tests/_backend_cases.py)."""

import math

import numpy as np
import pytest
import torch
from _backend_cases import backend_devices, to
from _overflow_case import check_step
from _triton_aot import assert_compiles_for_gpus

import pypattern
from pypattern import _backends
from pypattern.ops.rmsprop_sgld import rmsprop_sgld_step_
from pypattern.ops.sgld import philox_normals, sgld_step_
from pypattern.ops.sgnht import sgnht_step_

OPS = ("sgnht_step_", "rmsprop_sgld_step_")
CASES = {op: backend_devices(op) for op in OPS}
FAST = {op: backend_devices(op, reference=False) for op in OPS}
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}
KW = dict(step_size=1e-3, nbeta=37.0, localization=100.0, weight_decay=0.01, seed=7, step=3)


def _inputs(shape, dtype, *, noncontig=False, seed=0, device="cpu"):
    """(w, g, anchor, state): state >= 0 so that it is a valid V for RMSprop (and a momentum for SGNHT)."""
    gen = torch.Generator().manual_seed(seed)
    if noncontig:  # a transposed view of a larger tensor, with a step in the last dimension
        big = [torch.randn(shape[1] * 2 + 1, shape[0], generator=gen, dtype=dtype) for _ in range(4)]
        big[3] = big[3].abs() * 0.1
        out = tuple(b.to(device)[::2][: shape[1]].t() for b in big)
        assert not out[0].is_contiguous()
        return out
    w, g, a, s = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(4))
    return to(device, w, g, a, s.abs() * 0.1)


def _clone(t):
    return t.clone() if t.is_contiguous() else t.t().clone().t()


def _run(op, backend, params, grads, anchors, states, *, xi=0.05, **kw):
    """One step of ``op`` on copies; returns (params, states, thermostat or None, flags)."""
    ws, ss = [_clone(p) for p in params], [_clone(s) for s in states]
    if op == "sgnht_step_":
        dev = params[0].device if params else torch.device("cpu")
        th = torch.tensor([xi], dtype=torch.float64, device=dev)
        flags = sgnht_step_(ws, grads, anchors, ss, th, backend=backend, **kw)
        return ws, ss, th, flags
    flags = rmsprop_sgld_step_(ws, grads, anchors, ss, backend=backend, **kw)
    return ws, ss, None, flags


@pytest.mark.parametrize("op", OPS)
def test_backends_registered(op):
    info = pypattern.backends(op)
    assert info["reference"]["available"] and info["cpp"]["available"], info["cpp"]["reason"]
    assert _backends.registered(op) == _backends.NAMES
    assert _backends.choose(op, torch.device("cpu"), None) == "cpp"


def _both(op):
    return [pytest.param(op, b, id=f"{op}-{b.id}", marks=b.marks) for b in FAST[op]]


ALL_FAST = _both("sgnht_step_") + _both("rmsprop_sgld_step_")
ALL_CASES = [pytest.param(op, b, id=f"{op}-{b.id}", marks=b.marks) for op in OPS for b in CASES[op]]


@pytest.mark.parametrize("op, case", ALL_FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [0, 1, 3, 63, 64, 65, 127, 128, 129, 257, 1001, 1025])
@pytest.mark.parametrize("extras", ["plain", "mask", "box", "mask+box"])
def test_equals_reference_without_noise(op, case, dtype, size, extras):
    backend, device = case.values
    w, g, a, s = _inputs((size,), dtype, seed=size, device=device)
    masks = (
        [to(device, torch.rand(size, generator=torch.Generator().manual_seed(size)) > 0.3)]
        if "mask" in extras
        else None
    )
    box = 0.05 if "box" in extras else None
    kw = dict(KW, noise_scale=0.0, bounding_box=box, masks=masks)
    rw, rs, rt, _ = _run(op, "reference", [w], [g], [a], [s], **kw)
    ow, os_, ot, _ = _run(op, backend, [w], [g], [a], [s], **kw)
    torch.testing.assert_close(ow[0], rw[0], rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(os_[0], rs[0], rtol=TOL[dtype], atol=TOL[dtype])
    if rt is not None:
        # the thermostat sums p^2 of float32 or float64 momenta in float64
        torch.testing.assert_close(ot.cpu(), rt.cpu(), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    if size and (masks is None or bool(masks[0].any())):
        assert not torch.equal(ow[0], w)  # the step did something
    if masks is not None:
        frozen = ~masks[0]
        assert torch.equal(ow[0][frozen], w[frozen]) and torch.equal(os_[0][frozen], s[frozen])
    if box is not None:
        moved = masks[0] if masks is not None else torch.ones(size, dtype=torch.bool, device=device)
        assert bool(((ow[0] - a)[moved].abs() <= box + 1e-7).all())


@pytest.mark.parametrize("backend, device", FAST["rmsprop_sgld_step_"])
@pytest.mark.parametrize("alpha", [0.9999, 0.99999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsprop_long_window_equals_reference(backend, device, alpha, dtype):
    """With alpha near 1 (a long window), ``1 - alpha`` is formed in float64 and then cast, as the reference
    does: in float32 after casting alpha it would be off by 1e-4 (alpha = 0.9999) to 1e-3 (0.99999) relative,
    and so would ``V`` starting from zeros and the step."""
    w, g, a, _ = _inputs((1000,), dtype, seed=11, device=device)
    for v in (torch.zeros_like(w), _inputs((1000,), dtype, seed=12, device=device)[3]):
        kw = dict(KW, noise_scale=0.0, alpha=alpha, eps=1e-3)
        rw, rs, _, _ = _run("rmsprop_sgld_step_", "reference", [w], [g], [a], [v], **kw)
        ow, os_, _, _ = _run("rmsprop_sgld_step_", backend, [w], [g], [a], [v], **kw)
        torch.testing.assert_close(os_[0], rs[0], rtol=TOL[dtype], atol=0)
        torch.testing.assert_close(ow[0], rw[0], rtol=TOL[dtype], atol=TOL[dtype])
        assert not torch.equal(ow[0], w)


@pytest.mark.parametrize("op, case", ALL_FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_reference_with_noise_many_tensors_noncontiguous(op, case, dtype):
    backend, device = case.values
    shapes = [(5, 7), (1,), (0, 3), (130, 3), (2, 3, 4)]
    ins = [_inputs(s, dtype, seed=i, device=device) for i, s in enumerate(shapes)]
    ins.append(_inputs((40, 9), dtype, noncontig=True, seed=99, device=device))
    params, grads, anchors, states = (list(x) for x in zip(*ins))
    masks = [None, None, None, to(device, torch.rand(130, 3) > 0.5), None, None]
    kw = dict(KW, noise_scale=1.0, bounding_box=0.2, masks=masks)
    rw, rs, rt, _ = _run(op, "reference", params, grads, anchors, states, **kw)
    ow, os_, ot, _ = _run(op, backend, params, grads, anchors, states, **kw)
    for r, o in zip(rw + rs, ow + os_):
        # same Philox integers; float rounding of log/cos differs between math libraries
        torch.testing.assert_close(o, r, rtol=1e-5, atol=5e-6)
    if rt is not None:
        torch.testing.assert_close(ot.cpu(), rt.cpu(), rtol=1e-6, atol=1e-9)
    # a non-contiguous view gets the noise of its contiguous copy
    nc = ins[-1]
    kw1 = dict(kw, masks=None)
    a1 = _run(op, backend, *([t.contiguous()] for t in nc), **kw1)
    a2 = _run(op, backend, *([t] for t in nc), **kw1)
    torch.testing.assert_close(a1[0][0], a2[0][0], rtol=0, atol=0)
    torch.testing.assert_close(a1[1][0], a2[1][0], rtol=0, atol=0)


@pytest.mark.parametrize("op, case", ALL_FAST)
@pytest.mark.parametrize("masked", [False, True])
def test_equals_reference_1e6(op, case, masked):
    """Noise on, many blocks and thread splits (and many programs of the GPU kernels); the thermostat's sum over
    a million entries agrees with the reference's."""
    backend, device = case.values
    w, g, a, s = _inputs((1_000_003,), torch.float32, seed=5, device=device)
    kw = dict(KW, noise_scale=0.5, bounding_box=0.3)
    if masked:
        kw["masks"] = [to(device, torch.rand(1_000_003, generator=torch.Generator().manual_seed(1)) > 0.3)]
    rw, rs, rt, _ = _run(op, "reference", [w], [g], [a], [s], **kw)
    ow, os_, ot, _ = _run(op, backend, [w], [g], [a], [s], **kw)
    torch.testing.assert_close(ow[0], rw[0], rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(os_[0], rs[0], rtol=1e-5, atol=5e-6)
    if rt is not None:
        torch.testing.assert_close(ot.cpu(), rt.cpu(), rtol=1e-6, atol=1e-9)


def test_thermostat_update_is_mean_square_momentum_minus_target():
    """An independent computation of phase two: xi_new - xi = mean over active entries of p_new^2 - eps * s^2."""
    gen = torch.Generator().manual_seed(3)
    ps = [
        torch.randn(50, generator=gen, dtype=torch.float64),
        torch.randn(7, 3, generator=gen, dtype=torch.float64),
    ]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.rand(50, generator=gen) > 0.4, None]
    for backend in ("reference", "cpp"):
        w = [p.clone() for p in ps]
        mom = [0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        th = torch.tensor([0.2], dtype=torch.float64)
        sgnht_step_(
            w, gs, [p.clone() for p in ps], mom, th, masks=ms, backend=backend, **dict(KW, noise_scale=0.8)
        )
        active = torch.cat([mom[0][ms[0]], mom[1].reshape(-1)])
        expected = 0.2 + float((active**2).mean()) - KW["step_size"] * 0.8**2
        assert abs(float(th) - expected) < 1e-12, backend
    # nothing active: the thermostat stays
    th = torch.tensor([0.2], dtype=torch.float64)
    sgnht_step_(
        [torch.zeros(3)],
        [torch.ones(3)],
        [torch.zeros(3)],
        [torch.zeros(3)],
        th,
        masks=[torch.zeros(3, dtype=torch.bool)],
        **KW,
    )
    assert float(th) == 0.2


@pytest.mark.parametrize("op, case", ALL_CASES)
def test_noise_is_the_sgld_stream(op, case):
    """With zero drift and zero state, one step moves w by (a multiple of) the SGLD noise of the same key."""
    backend, device = case.values
    n, seed, step = 10_000, 2**63 + 11, 2**40 + 1
    w = [torch.zeros(3, device=device), torch.zeros(n, device=device)]
    z = [torch.zeros_like(t) for t in w]
    kw = dict(step_size=1.0, nbeta=0.0, localization=0.0, seed=seed, step=step, backend=backend)
    if op == "sgnht_step_":
        th = torch.zeros(1, dtype=torch.float64, device=device)
        sgnht_step_(
            w, z, z, [torch.zeros_like(t) for t in w], th, diffusion_factor=0.5, **kw
        )  # noise sqrt(2*.5*1)
        scale = 1.0
    else:
        rmsprop_sgld_step_(
            w, z, z, [torch.zeros_like(t) for t in w], eps=0.25, **kw
        )  # G = 4: noise sqrt(4) xi
        scale = 2.0
    ref = philox_normals(n, seed=seed, tensor_index=1, step=step) * scale
    torch.testing.assert_close(w[1].cpu(), ref, rtol=1e-5, atol=4e-6)


@pytest.mark.parametrize("op, case", ALL_CASES)
def test_nan_grad_names_tensor_and_keeps_entries(op, case):
    backend, device = case.values
    p = [torch.zeros(3, device=device), torch.ones(5, device=device)]
    g = to(device, torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0, float("inf"), 1.0]))
    s = [torch.full_like(t, 0.5) for t in p]
    kw = dict(KW, noise_scale=1.0, backend=backend)
    args = (p, list(g), [torch.zeros_like(t) for t in p], s)
    call = (
        (lambda **k: sgnht_step_(*args, torch.zeros(1, dtype=torch.float64, device=device), **k))
        if op == "sgnht_step_"
        else (lambda **k: rmsprop_sgld_step_(*args, **k))
    )
    with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
        call(**kw)
    assert all(bool(torch.isfinite(t).all()) for t in p + s)
    assert p[1][1] == 1 and p[1][3] == 1 and s[1][1] == 0.5 and s[1][3] == 0.5
    assert call(check_finite=False, **kw).tolist() == [0, 1]
    assert call(check_finite=False, validate=False, **kw).tolist() == [0, 1]


@pytest.mark.parametrize("op, case", ALL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extras", ["plain", "mask", "box"])
@pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value) encountered:RuntimeWarning"
)  # Triton's interpreter
def test_overflowing_update_is_not_written_and_names_the_tensor(op, case, dtype, extras):
    """A huge finite gradient (1e38 in float32, 1e308 in float64) whose update overflows the weight and the state
    (momentum or V), NaN/Inf gradients elsewhere, a non-contiguous view and an empty tensor: neither the entry nor
    its state is written, the flags say so, the op names the tensor (see tests/_overflow_case.py)."""
    backend, device = case.values
    check_step(op, backend, device, dtype, extras)


@pytest.mark.parametrize("op, case", ALL_CASES)
def test_fast_path_equals_validated_path(op, case):
    backend, device = case.values
    ins = [_inputs(s, torch.float32, seed=i, device=device) for i, s in enumerate([(5, 3), (7,)])]
    params, grads, anchors, states = (list(x) for x in zip(*ins))
    kw = dict(KW, noise_scale=0.7, bounding_box=0.9, seed=2**63 + 5, step=2**40 + 3)
    slow = _run(op, backend, params, grads, anchors, states, **kw)
    fast = _run(op, backend, params, grads, anchors, states, validate=False, **kw)
    for a, b in zip(slow[0] + slow[1], fast[0] + fast[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert slow[3].tolist() == fast[3].tolist() == [0, 0]


@pytest.mark.parametrize("op", OPS)
def test_empty_inputs(op):
    assert _run(op, None, [], [], [], [], **KW)[3].shape == (0,)
    w, g, a, s = _inputs((0, 4), torch.float32)
    out = _run(op, None, [w], [g], [a], [s], **KW)
    assert out[0][0].shape == (0, 4) and out[3].tolist() == [0]
    if out[2] is not None:
        assert float(out[2]) == 0.05  # no active entry: thermostat unchanged


def _ok(op):
    p, g, a, s = [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)]
    if op == "sgnht_step_":
        return lambda **kw: sgnht_step_(
            p, g, a, s, kw.pop("thermostat", torch.zeros(1, dtype=torch.float64)), **kw
        )
    return lambda **kw: rmsprop_sgld_step_(p, g, a, s, **kw)


@pytest.mark.parametrize(
    "op, kw, exc, match",
    [
        (op, kw, exc, match)
        for op in OPS
        for kw, exc, match in [
            (dict(step_size=0.0), ValueError, "step_size must be > 0"),
            (dict(step_size=float("nan")), ValueError, "step_size must be finite"),
            (dict(nbeta=-1.0), ValueError, "nbeta must be >= 0"),
            (dict(bounding_box=0.0), ValueError, "bounding_box must be > 0"),
            (dict(seed=-1), ValueError, "seed must be in"),
            (dict(step=1.5), TypeError, "step must be an int"),
            (dict(backend="gpu"), ValueError, "backend='gpu' is not one of"),
            (dict(noise_scale=-1.0), ValueError, "noise_scale must be >= 0"),
        ]
    ]
    + [
        ("sgnht_step_", dict(diffusion_factor=-0.1), ValueError, "diffusion_factor must be >= 0"),
        ("sgnht_step_", dict(thermostat=torch.zeros(1)), ValueError, "thermostat must be a float64 tensor"),
        ("sgnht_step_", dict(thermostat=torch.zeros(2, dtype=torch.float64)), ValueError, r"shape \(2,\)"),
        ("sgnht_step_", dict(thermostat=0.1), TypeError, "thermostat must be a float64 tensor"),
        (
            "sgnht_step_",
            dict(thermostat=torch.full((1,), float("nan"), dtype=torch.float64)),
            ValueError,
            "finite",
        ),
        ("rmsprop_sgld_step_", dict(alpha=1.0), ValueError, r"alpha must be in \[0, 1\)"),
        ("rmsprop_sgld_step_", dict(alpha=-0.1), ValueError, "alpha must be >= 0"),
        ("rmsprop_sgld_step_", dict(eps=0.0), ValueError, "eps must be > 0"),
    ],
)
def test_bad_scalars(op, kw, exc, match):
    with pytest.raises(exc, match=match):
        _ok(op)(**{**KW, **kw})


@pytest.mark.parametrize("op", OPS)
def test_bad_state_tensors(op):
    name = "momenta" if op == "sgnht_step_" else "square_avgs"
    p, g, a = [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)]
    th = [torch.zeros(1, dtype=torch.float64)] if op == "sgnht_step_" else []
    fn = sgnht_step_ if op == "sgnht_step_" else rmsprop_sgld_step_
    with pytest.raises(ValueError, match=rf"{name}\[0\] has shape \(4,\) but params\[0\] has \(3,\)"):
        fn(p, g, a, [torch.zeros(4)], *th, **KW)
    with pytest.raises(
        TypeError, match=rf"{name}\[0\] has dtype torch.float64 but params\[0\] has torch.float32"
    ):
        fn(p, g, a, [torch.zeros(3, dtype=torch.float64)], *th, **KW)
    with pytest.raises(ValueError, match=rf"{name} must have one tensor per params entry: 2 != 1"):
        fn(p, g, a, [torch.zeros(3)] * 2, *th, **KW)
    with pytest.raises(TypeError, match=rf"{name}\[0\] must be a tensor"):
        fn(p, g, a, [3.0], *th, **KW)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        fn(p, [torch.zeros(2)], a, [torch.zeros(3)], *th, **KW)
    with pytest.raises(ValueError, match=rf"{name}\[0\] is on meta"):
        fn(p, g, a, [torch.zeros(3, device="meta")], *th, **KW)


# ------------------------------------------------------------------------------------------------------ truth
#
# Model: L(w) = 0.5 (w - m)^T A (w - m) in d = 3 dimensions, so the localized tempered posterior
# exp(-nbeta L(w) - (gamma/2) |w - w*|^2) is Gaussian with precision H = nbeta A + gamma I and mean
# mu = H^-1 (nbeta A m + gamma w*). C chains run side by side as the rows of one (C, d) tensor (the samplers are
# element-wise; SGNHT's thermostat is then shared by the C independent chains, which is the same Nose-Hoover
# dynamics of the product system). Every step the gradient is exact, so each sampler is a linear recursion (for
# SGNHT at a fixed thermostat, for RMSprop-SGLD at a fixed preconditioner) whose fixed point is mu and whose
# stationary covariance solves a discrete Lyapunov equation S = B S B^T + Q:
#
# * SGLD, B = I - (eps/2) H, Q = eps I: S = H^-1 (I - eps H / 4)^-1 exactly; the O(eps) bias is up to 14% here.
# * SGNHT per eigenmode h of H, state (w, p): p' = (1 - xi) p - eps h w + s z, w' = w + p' with s^2 = 2 A_d eps.
#   The thermostat settles where the mean of E[p^2] over the modes is eps (its update has zero mean there);
#   we solve for that xi* and predict Var(w) per mode. What is neglected: the fluctuation of xi about xi*
#   (its standard deviation over the run is measured and asserted to be small relative to xi*).
# * RMSprop-SGLD, B = I - (eps/2) G H, Q = eps G with G = diag(1/(sqrt(V)+eps_rms)) frozen at its mean over the
#   run. Neglected: V's fluctuation (the anchor is placed so that the mean gradient dominates its fluctuation,
#   and the relative spread of G over the run is asserted small). The mean stays mu for any fixed G.
#
# The Monte Carlo error comes from the spread of the per-chain time averages over the C independent chains.

D = 3
NBETA, GAMMA = 10.0, 5.0


def _gaussian_model():
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)) @ q.T
    m = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    w_star = torch.tensor([-1.0, 1.5, 2.0], dtype=torch.float64)
    h = NBETA * a + GAMMA * torch.eye(D, dtype=torch.float64)
    mu = torch.linalg.solve(h, NBETA * a @ m + GAMMA * w_star)
    return a, m, w_star, h, mu


def _lyapunov(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    return np.linalg.solve(np.eye(n * n) - np.kron(b, b), q.reshape(-1)).reshape(n, n)


def _sgnht_mode(h: float, eps: float, xi: float, a_d: float) -> tuple[float, float]:
    """Stationary (Var w, Var p) of one eigenmode of SGNHT's recursion at a fixed thermostat xi."""
    c = eps * h
    b = np.array([[1 - c, 1 - xi], [-c, 1 - xi]])
    s2 = 2 * a_d * eps
    cov = _lyapunov(b, s2 * np.ones((2, 2)))
    return cov[0, 0], cov[1, 1]


def _run_chains(sampler, *, chains, burnin, draws, eps, **hyper):
    """Run ``chains`` chains of ``sampler`` on the Gaussian model; returns (per-chain mean (C, d), per-chain
    second moment about mu (C, d, d), record of extra quantities)."""
    a, m, w_star, h, mu = _gaussian_model()
    w = w_star.expand(chains, D).clone()
    anchor = w_star.expand(chains, D).clone()
    state = torch.zeros_like(w)
    th = torch.tensor([hyper.get("diffusion_factor", 0.0)], dtype=torch.float64)
    if sampler == "sgnht":
        state = math.sqrt(eps) * torch.randn(
            chains, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )
    sum_w = torch.zeros(chains, D, dtype=torch.float64)
    sum_ww = torch.zeros(chains, D, D, dtype=torch.float64)
    record = {
        "xi": [],
        "g": torch.zeros(chains, D, dtype=torch.float64),
        "g2": torch.zeros(chains, D, dtype=torch.float64),
    }
    common = dict(step_size=eps, nbeta=NBETA, localization=GAMMA, seed=11, validate=False)
    for t in range(burnin + draws):
        g = (w - m) @ a
        if sampler == "sgld":
            sgld_step_([w], [g], [anchor], step=t, **common)
        elif sampler == "sgnht":
            sgnht_step_(
                [w], [g], [anchor], [state], th, step=t, diffusion_factor=hyper["diffusion_factor"], **common
            )
        else:
            rmsprop_sgld_step_(
                [w], [g], [anchor], [state], step=t, alpha=hyper["alpha"], eps=hyper["rms_eps"], **common
            )
        if t >= burnin:
            dw = w - mu
            sum_w += w
            sum_ww += dw[:, :, None] * dw[:, None, :]
            if sampler == "sgnht":
                record["xi"].append(float(th))
            if sampler == "rmsprop_sgld":
                precond = 1.0 / (state.sqrt() + hyper["rms_eps"])
                record["g"] += precond
                record["g2"] += precond**2
    record["g"] /= draws
    record["g2"] /= draws
    return sum_w / draws, sum_ww / draws, record


def _assert_matches(means, second, mu, cov_pred, cov_exact, *, k=4.0):
    """Chain-averaged mean and covariance about mu against the prediction, within k standard errors."""
    chains = means.shape[0]
    mean, se_mean = means.mean(0), means.std(0) / math.sqrt(chains)
    cov, se_cov = second.mean(0), second.std(0) / math.sqrt(chains)
    z_mean = ((mean - mu) / se_mean).abs().max().item()
    z_cov = ((cov - cov_pred) / se_cov).abs().max().item()
    assert z_mean < k, (mean, mu, se_mean)
    assert z_cov < k, (cov, cov_pred, se_cov)
    # and the standard errors are small enough for the comparison to mean something (< 2% of the variances)
    assert (se_cov.diagonal() / cov_exact.diagonal()).max() < 0.02
    return ((cov - cov_exact) / se_cov).abs().max().item()


def test_truth_sgld_gaussian():
    a, m, w_star, h, mu = _gaussian_model()
    eps = 0.02
    means, second, _ = _run_chains("sgld", chains=64, burnin=300, draws=3000, eps=eps)
    cov_exact = torch.linalg.inv(h)
    cov_pred = torch.linalg.inv(h @ (torch.eye(D, dtype=torch.float64) - eps * h / 4))
    z_exact = _assert_matches(means, second, mu, cov_pred, cov_exact)
    assert z_exact > 4, "the O(eps) bias must be resolved by this test (else it could not tell it apart)"


def test_truth_sgnht_gaussian():
    a, m, w_star, h, mu = _gaussian_model()
    eps, a_d = 0.002, 0.05
    means, second, rec = _run_chains(
        "sgnht", chains=64, burnin=1500, draws=4000, eps=eps, diffusion_factor=a_d
    )
    evals, evecs = np.linalg.eigh(h.numpy())

    def excess(xi):
        return np.mean([_sgnht_mode(e, eps, xi, a_d)[1] for e in evals]) - eps

    lo, hi = 1e-4, 0.5  # mean E[p^2] decreases with the friction: bisect for xi*
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    xi_star = 0.5 * (lo + hi)
    var_w = np.array([_sgnht_mode(e, eps, xi_star, a_d)[0] for e in evals])
    cov_pred = torch.from_numpy(evecs @ np.diag(var_w) @ evecs.T)
    xi = np.array(rec["xi"])
    assert abs(xi.mean() - xi_star) < 0.05 * xi_star, (xi.mean(), xi_star)
    assert xi.std() < 0.25 * xi_star, (xi.std(), xi_star)
    _assert_matches(means, second, mu, cov_pred, torch.linalg.inv(h))


def test_truth_rmsprop_sgld_gaussian():
    a, m, w_star, h, mu = _gaussian_model()
    eps, alpha, eps_rms = 0.02, 0.99, 0.1
    means, second, rec = _run_chains(
        "rmsprop_sgld", chains=64, burnin=500, draws=3000, eps=eps, alpha=alpha, rms_eps=eps_rms
    )
    g_mean = rec["g"].mean(0)  # the preconditioner's mean per coordinate
    g_spread = (rec["g2"] - rec["g"] ** 2).clamp_min(0).sqrt().mean(0)  # its spread over the run
    assert (g_spread / g_mean).max() < 0.1, g_spread / g_mean
    gd = np.diag(g_mean.numpy())
    b = np.eye(D) - 0.5 * eps * gd @ h.numpy()
    cov_pred = torch.from_numpy(_lyapunov(b, eps * gd))
    z_exact = _assert_matches(means, second, mu, cov_pred, torch.linalg.inv(h))
    assert z_exact > 4, (
        "the discretisation bias must be resolved by this test (else it could not tell it apart)"
    )


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pypattern.ops.sgnht.triton import _sgnht_kernel
from pypattern.ops.rmsprop_sgld.triton import _rmsprop_sgld_kernel

for dtype in ("fp32", "fp64"):
    sigs = {
        _sgnht_kernel: {"w_ptr": "*" + dtype, "p_ptr": "*" + dtype, "g_ptr": "*" + dtype, "a_ptr": "*" + dtype,
                        "m_ptr": "*" + dtype, "coef_ptr": "*fp64", "xi_ptr": "*fp64", "part_ptr": "*fp64",
                        "flag_ptr": "*i32", "n": "i64", "seed": "i64", "tensor_index": "i32", "step_lo": "i32",
                        "step_hi": "i32"},
        _rmsprop_sgld_kernel: {"w_ptr": "*" + dtype, "v_ptr": "*" + dtype, "g_ptr": "*" + dtype,
                               "a_ptr": "*" + dtype, "m_ptr": "*" + dtype, "coef_ptr": "*fp64", "flag_ptr": "*i32",
                               "n": "i64", "seed": "i64", "tensor_index": "i32", "step_lo": "i32", "step_hi": "i32"},
    }
    for fn, sig in sigs.items():
        for flags in ((True, True, True), (False, False, False)):
            const = dict(zip(("HAS_MASK", "HAS_BOX", "HAS_NOISE"), flags), BLOCK=1024)
            sig.update({k: "constexpr" for k in const})
            for arch in (80, 90):
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                   target=GPUTarget("cuda", arch, 32))
                assert len(k.asm["cubin"]) > 0
print("ok")
"""


def test_triton_kernels_compile_for_gpus():
    """The interpreter accepts more than the GPU compiler: compile both kernels to sm_80/sm_90 cubin for both
    dtypes and several specialisations (no GPU needed; a separate process without TRITON_INTERPRET)."""
    assert_compiles_for_gpus(_AOT)


# ------------------------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize("name", ["SGNHT", "RMSpropSGLD"])
def test_lr_schedulers_drive_the_step_size_of_every_sampler(name):
    # torch's schedulers write group["lr"]: for SGNHT and RMSprop-SGLD too it is the step size, also after a
    # state_dict round trip; the halved step equals a sampler built with it (same noise key, same state)
    from pypattern.sampling import samplers

    cls = getattr(samplers, name)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, generator=gen)
    grads = [torch.randn(6, generator=gen) for _ in range(2)]

    def run(step_sizes, schedule):
        w = w0.clone().requires_grad_()
        opt = cls([w], step_size=step_sizes[0], nbeta=10.0, seed=3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: [1.0, 0.5][min(e, 1)]) if schedule else None
        for t, g in enumerate(grads):
            if not schedule and t:
                opt.param_groups[0]["step_size"] = step_sizes[t]
            w.grad = g.clone()
            opt.step()
            if sched is not None:
                sched.step()
                opt.load_state_dict(opt.state_dict())
        return w.detach(), opt.param_groups[0]

    w, group = run([1e-2], True)
    assert group["step_size"] == group["lr"] == 5e-3
    ref, _ = run([1e-2, 5e-3], False)
    torch.testing.assert_close(w, ref, rtol=0, atol=0)


def test_sgnht_optimizer_is_the_op_with_its_state():
    """Two steps of the optimizer equal two op calls on copies of its initial momenta and thermostat; the
    initial momentum is sqrt(step_size) * noise_scale times the keyed noise at the reserved step."""
    from pypattern.sampling.samplers import SGNHT

    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
    hyper = dict(step_size=1e-3, nbeta=20.0, localization=3.0, weight_decay=0.01, diffusion_factor=0.02)
    opt = SGNHT(ws, seed=9, noise_scale=0.5, **hyper)
    ref_w = [w.detach().clone() for w in ws]
    anchors = [w.clone() for w in ref_w]
    mom = [opt.state[w]["momentum"].clone() for w in ws]
    expected0 = math.sqrt(1e-3) * 0.5 * philox_normals(5, seed=9, tensor_index=1, step=2**64 - 1)
    torch.testing.assert_close(mom[1], expected0)
    th = torch.tensor([0.02], dtype=torch.float64)
    assert float(opt.param_groups[0]["thermostat"]) == 0.02
    for t in range(2):
        grads = [torch.randn(w.shape, generator=gen) for w in ws]
        for w, g in zip(ws, grads):
            w.grad = g.clone()
        opt.step()
        sgnht_step_(ref_w, grads, anchors, mom, th, seed=9, step=t, noise_scale=0.5, **hyper)
    for a, b in zip(ws, ref_w):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    torch.testing.assert_close(opt.param_groups[0]["thermostat"], th, rtol=0, atol=0)
    sd = opt.state_dict()
    assert sd["fused_sampler"]["num_steps"] == 2


def test_rmsprop_optimizer_groups_names_and_masks():
    """devinterp's names in groups, a mask by name, one seed per group (different noise in each group)."""
    from pypattern.sampling.samplers import RMSpropSGLD, group_seed

    a = torch.zeros(64, requires_grad=True)
    b = torch.zeros(64, requires_grad=True)
    mask = torch.ones(64, dtype=torch.bool)
    mask[:10] = False
    opt = RMSpropSGLD(
        [{"params": [("a", a)]}, {"params": [("b", b)], "lr": 0.04}],
        lr=0.01,
        noise_level=1.0,
        masks={"a": mask},
        seed=3,
    )
    assert opt.param_groups[1]["step_size"] == 0.04 and opt.param_groups[0]["step_size"] == 0.01
    a.grad, b.grad = torch.zeros(64), torch.zeros(64)
    opt.step()
    # V stays 0 with zero gradients: G = 1/eps = 10; the move is sqrt(step_size * 10) * xi
    xa = philox_normals(64, seed=3, tensor_index=0, step=0)
    xb = philox_normals(64, seed=group_seed(3, 1), tensor_index=0, step=0)
    torch.testing.assert_close(a.detach(), torch.where(mask, math.sqrt(0.1) * xa, 0.0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), math.sqrt(0.4) * xb, rtol=1e-6, atol=1e-7)
    assert abs(torch.corrcoef(torch.stack([xa, xb]))[0, 1]) < 0.5


@pytest.mark.parametrize(
    "name, cls",
    [
        ("sgld", "SGLD"),
        ("SGLD", "SGLD"),
        ("sgnht", "SGNHT"),
        ("SGNHT", "SGNHT"),
        ("rmsprop_sgld", "RMSpropSGLD"),
        ("RMSpropSGLD", "RMSpropSGLD"),
        ("rmsprop-sgld", "RMSpropSGLD"),
    ],
)
def test_make_sampler_names(name, cls):
    from pypattern.sampling.samplers import make_sampler

    w = torch.zeros(3, requires_grad=True)
    opt = make_sampler(
        name, [w], step_size=1e-3, nbeta=5.0, localization=1.0, noise_scale=1.0, bounding_box=2.0
    )
    assert type(opt).__name__ == cls
    w.grad = torch.ones(3)
    opt.step()
    assert bool(torch.isfinite(w).all()) and not torch.equal(w.detach(), torch.zeros(3))
    assert type(make_sampler(type(opt), [torch.zeros(2, requires_grad=True)], lr=1e-3, nbeta=2.0)) is type(
        opt
    )


def test_make_sampler_bad_names_and_values():
    from pypattern.sampling.samplers import SGNHT, make_sampler

    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="sampling_method='hmc' is not a known sampler; valid are 'sgld'"):
        make_sampler("hmc", w)
    with pytest.raises(TypeError, match="sampling_method must be a str"):
        make_sampler(3, w)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0, got -1"):
        SGNHT(w, step_size=-1)
    # devinterp's names through the one vocabulary: two names of one hyperparameter must agree
    with pytest.raises(
        ValueError, match="SGNHT gives step_size=0.1 and lr=0.2: both set step_size; give one"
    ):
        SGNHT(w, step_size=0.1, lr=0.2)
    with pytest.raises(ValueError, match="RMSpropSGLD gives noise_scale=1.0 and noise_level=0.5"):
        make_sampler("rmsprop_sgld", w, noise_scale=1.0, noise_level=0.5)
    with pytest.raises(ValueError, match="SGNHT gives bounding_box=1.0 and bounding_box_size=2.0"):
        SGNHT(w, bounding_box=1.0, bounding_box_size=2.0)
    with pytest.raises(ValueError, match=r"params\[0\] gives lr=0.1 and step_size=0.2"):
        SGNHT([{"params": w, "lr": 0.1, "step_size": 0.2}])
    with pytest.raises(ValueError, match="diffusion_factor must be a finite number >= 0"):
        SGNHT(w, diffusion_factor=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        make_sampler("rmsprop_sgld", w, alpha=1.0)
    with pytest.raises(ValueError, match="masks has names that are not"):
        SGNHT([("w", w[0])], masks={"v": torch.ones(3)})


@pytest.mark.parametrize("cls_name", ["SGNHT", "RMSpropSGLD"])
def test_fused_samplers_translate_devinterp_names(cls_name):
    """devinterp's names (lr, noise_level, bounding_box_size, temperature) land on pypattern's, in the
    constructor and in group dicts; the same value under both names is accepted."""
    from pypattern.sampling import samplers

    cls = getattr(samplers, cls_name)
    w = [torch.zeros(3, requires_grad=True)]
    opt = cls(w, lr=0.2, noise_level=0.5, bounding_box_size=3.0, temperature=7.0, step_size=0.2)
    g = opt.param_groups[0]
    assert (g["step_size"], g["noise_scale"], g["bounding_box"], g["nbeta"]) == (0.2, 0.5, 3.0, 7.0)
    assert not {"lr", "noise_level", "bounding_box_size", "temperature"} & set(g)
    v = torch.zeros(2, requires_grad=True)
    opt = cls([{"params": w}, {"params": [v], "lr": 0.05, "noise_level": 0.0}], step_size=0.1)
    g0, g1 = opt.param_groups
    assert (g0["step_size"], g0["noise_scale"], g1["step_size"], g1["noise_scale"]) == (0.1, 1.0, 0.05, 0.0)
    default = cls(w)
    assert (default.param_groups[0]["step_size"], default.param_groups[0]["nbeta"]) == (0.01, 1.0)


@pytest.mark.parametrize("name", ["sgnht", "rmsprop_sgld"])
def test_optimizer_samples_the_gaussian_mean(name):
    """Through autograd and the optimizer: 64 chains on the Gaussian model hit the exact posterior mean."""
    from pypattern.sampling.samplers import make_sampler

    a, m, w_star, h, mu = _gaussian_model()
    w = w_star.expand(64, D).clone().requires_grad_()
    hyper = dict(step_size=0.002, diffusion_factor=0.05) if name == "sgnht" else dict(step_size=0.02)
    opt = make_sampler(name, [w], nbeta=NBETA, localization=GAMMA, seed=5, **hyper)
    total = torch.zeros(64, D, dtype=torch.float64)
    burnin, draws = 1000, 1500
    for t in range(burnin + draws):
        opt.zero_grad()
        (0.5 * ((w - m) @ a * (w - m)).sum()).backward()
        opt.step()
        if t >= burnin:
            total += w.detach()
    chain_means = total / draws
    se = chain_means.std(0) / 8
    assert ((chain_means.mean(0) - mu).abs() / se).max() < 4.5


@pytest.mark.parametrize("backend, device", CASES["sgnht_step_"])
@pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value) encountered:RuntimeWarning"
)  # Triton's interpreter
def test_sgnht_momentum_whose_square_overflows_is_not_written(backend, device):
    """A finite float64 gradient of 1e160 gives a finite momentum of -1e158 whose square is inf in the thermostat's
    float64 sum: the entry keeps its weight and momentum, is flagged 2, and the thermostat stays finite (the mean
    square of the momenta after the step, the kept one included)."""
    w = [torch.zeros(5, dtype=torch.float64, device=device)]
    p0 = torch.tensor([0.1, 0.0, -0.2, 0.3, 0.0], dtype=torch.float64)
    p = [p0.clone().to(device)]
    g = torch.tensor([0.0, 1e160, 0.0, 0.0, 0.0], dtype=torch.float64, device=device)
    th = torch.zeros(1, dtype=torch.float64, device=device)
    kw = dict(step_size=1e-2, nbeta=1.0, localization=0.0, noise_scale=0.0, seed=0, step=0, backend=backend)
    args = (w, [g], [torch.zeros_like(w[0])], p, th)
    with pytest.raises(FloatingPointError, match=r"params\[0\]/momenta\[0\] \(shape \(5,\)\)"):
        sgnht_step_(*args, **kw)
    assert torch.equal(p[0].cpu(), p0) and torch.equal(
        w[0].cpu(), p0
    )  # xi = 0, no noise: w += p; entry 1 kept
    assert math.isclose(float(th), float((p0**2).mean()), rel_tol=1e-12)
    th.zero_()
    assert sgnht_step_(*args, check_finite=False, validate=False, **kw).tolist() == [2]


# ------------------------------------------------------------------------------------------ through pypattern.sample

RUNNER_SAMPLERS = [
    ("sgld", {}),
    ("sgnht", {"diffusion_factor": 0.02}),
    ("rmsprop_sgld", {"alpha": 0.9, "eps": 0.05}),
]


def _mlp_task(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    return model, loader


def _sample(model, loader, **kw):
    base = dict(
        num_chains=3,
        num_draws=12,
        num_burnin_steps=4,
        num_steps_bw_draws=2,
        step_size=1e-3,
        localization=10.0,
        nbeta=20.0,
        seed=5,
        quiet=True,
        warn_nonstationary=False,
        observables={"logit0": lambda m, b: m(b[0])[0]},
    )
    base.update(kw)
    return pypattern.sample(model, loader, **base)


@pytest.mark.parametrize("sampler, own", RUNNER_SAMPLERS)
def test_sample_batched_equals_sequential_for_each_sampler(sampler, own):
    """Batched chains (stacked weights and sampler state, one op call per chain) draw the same noise as
    sequential ones (one optimizer per chain): the same traces up to float rounding; and the sampler is the
    one asked for (its draws differ from SGLD's), named in the result's config with its hyperparameters."""
    model, loader = _mlp_task()
    a = _sample(model, loader, sampler=sampler, optimizer_kwargs=own, batched=True)
    b = _sample(model, loader, sampler=sampler, optimizer_kwargs=own, batched=False)
    assert a.batched and not b.batched
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(a.observables["logit0"], b.observables["logit0"], rtol=2e-5, atol=1e-5)
    assert a.config["sampler"] == sampler and all(a.config[k] == v for k, v in own.items())
    if sampler != "sgld":
        sgld = _sample(model, loader, batched=False)
        assert np.abs(sgld.loss_trace - b.loss_trace).max() > 1e-4
        # devinterp's name for the argument, and a class for the value
        cls = {"sgnht": pypattern.sampling.SGNHT, "rmsprop_sgld": pypattern.sampling.RMSpropSGLD}[sampler]
        c = _sample(model, loader, sampling_method=cls, optimizer_kwargs=own, batched=False)
        np.testing.assert_array_equal(c.loss_trace, b.loss_trace)


@pytest.mark.parametrize("sampler, own", RUNNER_SAMPLERS[1:])
def test_sample_runs_with_masks_equal_separate_calls(sampler, own):
    """Restricted runs batched together (each chain its own moving tensors, mask and thermostat) equal separate
    sequential calls."""
    model, loader = _mlp_task()
    mask = {"0.weight": torch.rand(8, 6, generator=torch.Generator().manual_seed(1)) > 0.5}
    specs = [("0.*", None), (["0.weight"], mask), (None, None)]
    together = _sample(model, loader, sampler=sampler, optimizer_kwargs=own, batched=True, runs=specs)
    for (restrict, masks), res in zip(specs, together):
        alone = _sample(
            model,
            loader,
            sampler=sampler,
            optimizer_kwargs=own,
            batched=False,
            restrict_to=restrict,
            masks=masks,
        )
        np.testing.assert_allclose(res.loss_trace, alone.loss_trace, rtol=2e-5, atol=1e-6)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("sampler, own", RUNNER_SAMPLERS)
def test_sample_checkpoint_resume_bit_identical_for_each_sampler(tmp_path, sampler, own, batched):
    """A run killed mid-way and resumed from its checkpoint equals the uninterrupted run bit for bit: the
    checkpoint holds the unfinished chains' sampler state (SGNHT's momenta and thermostat, RMSprop-SGLD's running
    means), and a resume without it would differ. A checkpoint of another sampler, or other hyperparameters of
    the sampler, is refused naming the item."""
    from pypattern import io

    model, loader = _mlp_task()
    kw = dict(sampler=sampler, optimizer_kwargs=own, batched=batched)
    full = _sample(model, loader, **kw)
    path = tmp_path / "run.npz"

    def killer(chain, draw):
        if chain == 1 and draw == 7:
            raise _Stop

    with pytest.raises(_Stop):
        _sample(model, loader, checkpoint=path, callbacks=[killer], **kw)
    arrays, meta = io.load(path, kind="sample-checkpoint")
    kinds = {k.split("/")[2] for k in arrays if k.startswith("sampler/")}
    assert (
        kinds == {"sgld": set(), "sgnht": {"momentum", "thermostat"}, "rmsprop_sgld": {"square_avg"}}[sampler]
    )
    if sampler != "sgld":
        assert meta["checkpoint"]["fingerprint"]["sampler"] == sampler
        other = "rmsprop_sgld" if sampler == "sgnht" else "sgnht"
        with pytest.raises(
            io.FingerprintMismatch, match=f"sampler='{sampler}', this run has sampler='{other}'"
        ):
            _sample(model, loader, checkpoint=path, sampler=other, batched=batched)
        with pytest.raises(io.FingerprintMismatch, match=f"sampler='{sampler}', this run has sampler='sgld'"):
            _sample(model, loader, checkpoint=path, batched=batched)
        key = next(iter(own))
        with pytest.raises(io.FingerprintMismatch, match=f"{key} = "):
            _sample(model, loader, checkpoint=path, **{**kw, "optimizer_kwargs": {**own, key: own[key] / 2}})
        # the same checkpoint without the sampler state (the chains would restart it and differ): refused
        bare = tmp_path / "bare.npz"
        io.save(
            bare,
            {k: v for k, v in arrays.items() if not k.startswith("sampler/")},
            meta,
            kind="sample-checkpoint",
        )
        with pytest.raises(io.FormatError, match=f"its {sampler} state is missing"):
            _sample(model, loader, checkpoint=bare, **kw)
    res = _sample(model, loader, checkpoint=path, **kw)
    np.testing.assert_array_equal(res.loss_trace, full.loss_trace)
    np.testing.assert_array_equal(res.observables["logit0"], full.observables["logit0"])


def test_sample_sampler_arguments_refused_with_names():
    model, loader = _mlp_task()
    kw = dict(num_chains=1, num_draws=2)
    with pytest.raises(
        ValueError, match="sampler='sgnht' and sampling_method='SGLD' name different samplers"
    ):
        _sample(model, loader, sampler="sgnht", sampling_method=pypattern.SGLD, **kw)
    with pytest.raises(ValueError, match="sampler='hmc' is not a known sampler; valid are 'sgld', 'sgnht'"):
        _sample(model, loader, sampler="hmc", **kw)
    with pytest.raises(
        ValueError, match="optimizer_kwargs has alpha=0.9, a hyperparameter of sampler='rmsprop_sgld'"
    ):
        _sample(model, loader, sampler="sgnht", optimizer_kwargs={"alpha": 0.9}, **kw)
    with pytest.raises(ValueError, match="diffusion_factor must be a finite number >= 0"):
        _sample(model, loader, sampler="sgnht", optimizer_kwargs={"diffusion_factor": -1.0}, **kw)
    with pytest.raises(ValueError, match=r"optimizer_kwargs has unknown keys \['momentum'\]"):
        _sample(model, loader, sampler="sgnht", optimizer_kwargs={"momentum": 0.9}, **kw)
    # the same sampler under both names is accepted
    r = _sample(model, loader, sampler="rmsprop-sgld", sampling_method="RMSpropSGLD", **kw)
    assert r.config["sampler"] == "rmsprop_sgld" and (r.config["alpha"], r.config["eps"]) == (0.99, 0.1)


# The truth through pypattern.sample: the Gaussian model above as a module whose parameter holds K independent
# rows w_k (a chain moves all of them; the loss is the sum of the rows' quadratic losses, so each row's tempered
# localized posterior is the Gaussian N(mu, H^-1) and the chain's dynamics are the recursions above, row by row;
# SGNHT's thermostat is shared by the rows of a chain, as in the product system above). The draws are read by an
# observable; the Monte Carlo error comes from the spread of the rows' time averages over all chains' rows.
# Predictions, with the discretisation bias of each method:
# * SGLD: N(mu, H^-1 (I - eps H / 4)^-1).
# * SGNHT: mu, and per eigenmode the stationary Var(w) of the recursion at the thermostat's fixed point xi*.
# * RMSprop-SGLD, which leaves out the term in the derivative of its preconditioner: once the running mean V has
#   settled, G = 1/(sqrt(V) + eps_rms) is nearly constant, and for a constant G the preconditioned Langevin
#   dynamics target the same posterior N(mu, H^-1) (the left-out term vanishes); the discrete chain's stationary
#   law is N(mu, S) with S solving S = B S B^T + eps G, B = I - (eps/2) G H. G is predicted without reading the
#   sampler's state: V settles at E[g^2] = (A (mu - m))^2 + diag(A S A) per coordinate (g the gradient of the
#   loss), so G and S are solved together by fixed-point iteration. Neglected: the fluctuation of V about its mean,
#   which follows the recent gradients and so correlates with w; through the left-out term it shifts the mean by
#   about 3 of this test's standard errors at the w* of test_truth_rmsprop_sgld_gaussian (measured over seeds; the
#   covariance is unaffected at this precision). The shift falls as the mean gradient grows against its
#   fluctuation, so here w* is 6 times as far from the loss minimum (the regime where G is constant), with the
#   step scaled so that step_size * G, the discretisation, stays about the same.


class _Rows(torch.nn.Module):
    def __init__(self, rows: int, w_star: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w_star.expand(rows, D).clone())

    def forward(self, *args):
        return self.w


def _far_anchor(scale: float):
    """The Gaussian model with w* moved ``scale`` times as far from the loss minimum m: (w*, mu)."""
    a, m, w_star, h, mu = _gaussian_model()
    w_star = m + scale * (w_star - m)
    return w_star, torch.linalg.solve(h, NBETA * a @ m + GAMMA * w_star)


def _sample_rows(
    sampler, *, step_size, chains=2, rows=512, burnin, draws, batched=None, seed=3, anchor_scale=1.0, **own
):
    """(per-row mean (chains * rows, d), per-row second moment about mu (chains * rows, d, d)) of the draws of
    ``pypattern.sample`` on the Gaussian model (w* as :func:`_far_anchor` places it)."""
    a, m, *_ = _gaussian_model()
    w_star, mu = _far_anchor(anchor_scale)

    def loss_fn(model, batch):
        w = model()
        return 0.5 * ((w - m) @ a * (w - m)).sum()

    res = pypattern.sample(
        _Rows(rows, w_star),
        [torch.zeros(1)],
        loss_fn=loss_fn,
        sampler=sampler,
        optimizer_kwargs=own,
        num_chains=chains,
        num_draws=draws,
        num_burnin_steps=burnin,
        step_size=step_size,
        nbeta=NBETA,
        localization=GAMMA,
        observables={"w": lambda model, batch: model()},
        batched=batched,
        seed=seed,
        quiet=True,
        warn_nonstationary=False,
    )
    w = torch.from_numpy(res.observables["w"])  # (chains, draws, rows, d)
    w = w.permute(0, 2, 1, 3).reshape(chains * rows, draws, D)
    dw = w - mu
    return w.mean(1), torch.einsum("rti,rtj->rij", dw, dw) / draws


def test_truth_sample_sgld_gaussian():
    a, m, w_star, h, mu = _gaussian_model()
    eps = 0.02
    means, second = _sample_rows("sgld", step_size=eps, burnin=200, draws=600)
    cov_pred = torch.linalg.inv(h @ (torch.eye(D, dtype=torch.float64) - eps * h / 4))
    assert (
        _assert_matches(means, second, mu, cov_pred, torch.linalg.inv(h)) > 4
    )  # the O(eps) bias is resolved


def _sgnht_xi_star(evals, eps, a_d):
    """The thermostat's fixed point: where the mean stationary E[p^2] over the modes is eps (bisection)."""

    def excess(xi):
        return np.mean([_sgnht_mode(e, eps, xi, a_d)[1] for e in evals]) - eps

    lo, hi = 1e-4, 0.5
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def test_truth_sample_sgnht_gaussian():
    a, m, w_star, h, mu = _gaussian_model()
    eps, a_d = 0.002, 0.05
    means, second = _sample_rows("sgnht", step_size=eps, burnin=600, draws=1000, diffusion_factor=a_d)
    evals, evecs = np.linalg.eigh(h.numpy())
    xi_star = _sgnht_xi_star(evals, eps, a_d)
    var_w = np.array([_sgnht_mode(e, eps, xi_star, a_d)[0] for e in evals])
    cov_pred = torch.from_numpy(evecs @ np.diag(var_w) @ evecs.T)
    _assert_matches(means, second, mu, cov_pred, torch.linalg.inv(h))


def test_truth_sample_rmsprop_sgld_gaussian():
    a, m, _, h, _ = _gaussian_model()
    w_star, mu = _far_anchor(6.0)
    eps, alpha, eps_rms = 0.1, 0.99, 0.1
    means, second = _sample_rows(
        "rmsprop_sgld", step_size=eps, burnin=500, draws=600, anchor_scale=6.0, alpha=alpha, eps=eps_rms
    )
    an, hn = a.numpy(), h.numpy()
    gbar = an @ (mu - m).numpy()  # the mean gradient at the posterior mean
    g = np.ones(D)
    for _ in range(200):  # G and S together: V = E[g^2] under N(mu, S), S the Lyapunov solution for G
        s = _lyapunov(np.eye(D) - 0.5 * eps * np.diag(g) @ hn, eps * np.diag(g))
        g = 1.0 / (np.sqrt(gbar**2 + np.diag(an @ s @ an)) + eps_rms)
    assert np.ptp(g) > 0.1 * g.mean()  # a preconditioner that is not a multiple of the identity
    z_exact = _assert_matches(means, second, mu, torch.from_numpy(s), torch.linalg.inv(h))
    assert z_exact > 4  # the discretisation bias is resolved


def test_sgnht_positional_arguments_are_devinterps():
    """devinterp's SGNHT(params, lr, diffusion_factor, bounding_box_size): the same positions mean the same."""
    from pypattern.sampling import SGNHT

    w = [torch.nn.Parameter(torch.zeros(3))]
    opt = SGNHT(w, 1e-4, 0.05, 2.0)
    g = opt.param_groups[0]
    assert (g["step_size"], g["diffusion_factor"], g["bounding_box"], g["nbeta"]) == (1e-4, 0.05, 2.0, 1.0)
    with pytest.raises(TypeError):
        SGNHT(w, 1e-4, 0.05, 2.0, 10.0)  # nbeta is keyword-only
