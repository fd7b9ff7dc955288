"""The registered C++ ops called directly (``torch.ops.pypattern.*``, past the Python wrappers) against their
plain-torch references: the streaming covariance update on inputs holding inf and NaN, and every op's tensor
arguments carrying torch's lazy negation bit (``torch._neg_view``)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import pypattern  # noqa: F401  (loads pypattern._C, which registers the ops)
from pypattern.ops.covariance.op import cross_covariance_update_
from pypattern.ops.covariance.reference import cross_covariance_update_reference_
from pypattern.ops.rmsprop_sgld.reference import rmsprop_sgld_step_reference_
from pypattern.ops.sgld.reference import sgld_step_reference_
from pypattern.ops.sgnht.reference import sgnht_step_reference_
from pypattern.ops.sums.reference import signed_sums_reference_

pytestmark = pytest.mark.usefixtures("one_thread")
ops = torch.ops.pypattern
F64 = torch.float64


def neg_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor with ``t``'s values whose memory holds ``-t`` (is_neg() is True)."""
    v = torch._neg_view(-t)
    assert v.is_neg() and torch.equal(v.resolve_neg(), t)
    return v


# ---------------------------------------------------------------------------------------------------------------
# covariance_update_ with non-finite draws


def _state(k: int, n: int, mode: int) -> list[torch.Tensor]:
    m2 = {0: lambda d: torch.zeros(0, dtype=F64), 1: lambda d: torch.zeros(d, dtype=F64)}
    m2[2] = lambda d: torch.zeros(d, d, dtype=F64)
    z = [
        torch.zeros(k, dtype=F64),
        torch.zeros(n, dtype=F64),
        torch.zeros(k, dtype=F64),
        torch.zeros(n, dtype=F64),
    ]
    return [*z, torch.zeros(k, n, dtype=F64), m2[mode](k), m2[mode](n)]


def _run(update, chunks, k, n, mode) -> list[torch.Tensor]:
    state, count = _state(k, n, mode), 0
    for a, b in chunks:
        update(*state, a, b, count)
        count += a.shape[0]
    return state


def _assert_same_numbers(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """NaN where ``want`` is NaN, the same infinities, and the finite entries close."""
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{name}: NaN at {got.isnan()} but expected at {want.isnan()}"
    )
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf()), (
        f"{name}: infinities differ: got {got}, expected {want}"
    )
    fin = want.isfinite()
    scale = max(1.0, float(want[fin].abs().max())) if bool(fin.any()) else 1.0
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-9, atol=1e-9 * scale, msg=name)


NAMES = ("shift_a", "shift_b", "mean_a", "mean_b", "comoment", "m2_a", "m2_b")


def _chunks(case: str, dtype, gen: torch.Generator):
    k, n = 4, 3

    def draw(m):
        return (torch.randn(m, k, generator=gen, dtype=F64) * 3 + 1).to(dtype), torch.randn(
            m, n, generator=gen, dtype=F64
        ).to(dtype)

    (a0, b0), (a1, b1), (a2, b2) = draw(6), draw(5), draw(7)
    if case == "finite":
        pass
    elif case == "inf_later_chunk":
        a1[2, 0] = math.inf
        b1[4, 2] = -math.inf
    elif case == "nan_later_chunk":
        a1[0, 1] = math.nan
        b1[3, 0] = math.nan
    elif case == "inf_first_chunk":
        a0[1, 3] = -math.inf
        b0[0, 1] = math.inf
    elif case == "both_infinities":
        a1[0, 2], a1[3, 2] = math.inf, -math.inf
    elif case == "whole_column_inf":
        a1[:, 1] = math.inf
    elif case == "many_panels":  # one chunk of several 512-draw panels, the inf in the first panel only
        a1, b1 = draw(1100)
        a1[3, 0] = math.inf
        b1[10, 1] = -math.inf
        b1[900, 2] = math.nan
    elif case == "many_panels_first_chunk":
        a0, b0 = draw(1100)
        a0[3, 0] = math.inf
        a0[600, 2] = -math.inf
    else:
        raise AssertionError(case)
    return [(a0, b0), (a1, b1), (a2, b2)], k, n


CASES = [
    "finite",
    "inf_later_chunk",
    "nan_later_chunk",
    "inf_first_chunk",
    "both_infinities",
    "whole_column_inf",
    "many_panels",
    "many_panels_first_chunk",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_covariance_op_matches_reference_on_non_finite_draws(case, mode, dtype):
    gen = torch.Generator().manual_seed(hash((case, mode)) % 2**31)
    chunks, k, n = _chunks(case, dtype, gen)
    want = _run(cross_covariance_update_reference_, chunks, k, n, mode)
    got = _run(ops.covariance_update_, chunks, k, n, mode)
    for name, g, w in zip(NAMES, got, want):
        _assert_same_numbers(g, w, f"{case}/{name}")
    # after each chunk too, not only at the end
    state_ref, state_op, count = _state(k, n, mode), _state(k, n, mode), 0
    for a, b in chunks:
        cross_covariance_update_reference_(*state_ref, a, b, count)
        ops.covariance_update_(*state_op, a, b, count)
        count += a.shape[0]
        for name, g, w in zip(NAMES, state_op, state_ref):
            _assert_same_numbers(g, w, f"{case}/{name} after {count} draws")


@pytest.mark.parametrize("mode", [1, 2])
def test_covariance_public_update_mean_matches_reference_across_panels(mode):
    """Through the public update (backend "cpp"): an inf in the first 512-draw panel of a chunk leaves the column's
    mean +inf, as the reference gives, not NaN."""
    gen = torch.Generator().manual_seed(3)
    chunks, k, n = _chunks("many_panels", torch.float64, gen)
    want = _run(cross_covariance_update_reference_, chunks[:2], k, n, mode)
    state, count = _state(k, n, mode), 0
    for a, b in chunks[:2]:
        cross_covariance_update_(*state, a, b, count=count, backend="cpp")
        count += a.shape[0]
    assert float(want[2][0]) == math.inf and float(want[3][1]) == -math.inf
    for name, g, w in zip(NAMES, state, want):
        _assert_same_numbers(g, w, name)


# ---------------------------------------------------------------------------------------------------------------
# lazy negation bits


def _sampler_inputs(numel: int = 2500):
    gen = torch.Generator().manual_seed(11)

    def r(*s, lo=None):
        t = torch.randn(*s, generator=gen, dtype=F64)
        return t if lo is None else t.abs() + lo

    params = [r(numel), r(7, 5)]
    grads = [r(numel), r(7, 5)]
    anchors = [r(numel), r(7, 5)]
    masks = [torch.rand(numel, generator=gen, dtype=F64) * 2, (torch.rand(7, 5, generator=gen) > 0.3).to(F64)]
    states = [r(numel, lo=0.1), r(7, 5, lo=0.1)]
    return params, grads, anchors, masks, states


def _clone(ts):
    return [t.clone() for t in ts]


SGLD = dict(step_size=1e-3, nbeta=10.0, localization=1.0, weight_decay=0.1, bounding_box=None)


def _sgld_op(params, grads, anchors, masks, noise, seed=7, step=3):
    return ops.sgld_step_(params, grads, anchors, masks, 1e-3, 10.0, 1.0, 0.1, noise, None, seed, step)


def _sgnht_op(params, grads, anchors, momenta, xi, masks, noise):
    return ops.sgnht_step_(
        params, grads, anchors, momenta, xi, masks, 1e-3, 10.0, 1.0, 0.1, 0.01, noise, None, 7, 3
    )


def _rms_op(params, grads, anchors, avgs, masks, noise):
    return ops.rmsprop_sgld_step_(
        params, grads, anchors, avgs, masks, 1e-3, 10.0, 1.0, 0.1, 0.99, 0.1, noise, None, 7, 3
    )


@pytest.mark.parametrize("negated", ["masks", "grads", "anchors", "all"])
def test_sgld_op_reads_negative_views_as_their_values(negated):
    params, grads, anchors, masks, _ = _sampler_inputs()

    def inputs():
        g, a, m = _clone(grads), _clone(anchors), _clone(masks)
        if negated in ("grads", "all"):
            g = [neg_view(t) for t in g]
        if negated in ("anchors", "all"):
            a = [neg_view(t) for t in a]
        if negated in ("masks", "all"):
            m = [neg_view(t) for t in m]
        return g, a, m

    # noiseless: against the reference
    want = _clone(params)
    flags_ref = sgld_step_reference_(
        want, grads, anchors, **SGLD, noise_scale=0.0, masks=masks, seed=7, step=3
    )
    got = _clone(params)
    flags = _sgld_op(got, *inputs(), 0.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.equal(flags, flags_ref)
    # with noise: the same step as with plain tensors
    plain, viewed = _clone(params), _clone(params)
    _sgld_op(plain, _clone(grads), _clone(anchors), _clone(masks), 1.0)
    _sgld_op(viewed, *inputs(), 1.0)
    assert all(torch.equal(x, y) for x, y in zip(viewed, plain))


@pytest.mark.parametrize("negated", ["masks", "grads_anchors"])
def test_sgnht_op_reads_negative_views_as_their_values(negated):
    params, grads, anchors, masks, momenta = _sampler_inputs()
    g, a, m = _clone(grads), _clone(anchors), _clone(masks)
    if negated == "masks":
        m = [neg_view(t) for t in m]
    else:
        g, a = [neg_view(t) for t in g], [neg_view(t) for t in a]
    want_p, want_m, want_xi = _clone(params), _clone(momenta), torch.tensor([0.3], dtype=F64)
    sgnht_step_reference_(
        want_p, grads, anchors, want_m, want_xi, **SGLD, noise_scale=0.0, masks=masks, seed=7, step=3
    )
    got_p, got_m, got_xi = _clone(params), _clone(momenta), torch.tensor([0.3], dtype=F64)
    _sgnht_op(got_p, g, a, got_m, got_xi, m, 0.0)
    torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_m, want_m, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_xi, want_xi, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("negated", ["masks", "grads_anchors"])
def test_rmsprop_sgld_op_reads_negative_views_as_their_values(negated):
    params, grads, anchors, masks, avgs = _sampler_inputs()
    g, a, m = _clone(grads), _clone(anchors), _clone(masks)
    if negated == "masks":
        m = [neg_view(t) for t in m]
    else:
        g, a = [neg_view(t) for t in g], [neg_view(t) for t in a]
    want_p, want_v = _clone(params), _clone(avgs)
    rmsprop_sgld_step_reference_(
        want_p,
        grads,
        anchors,
        want_v,
        **SGLD,
        alpha=0.99,
        eps=0.1,
        noise_scale=0.0,
        masks=masks,
        seed=7,
        step=3,
    )
    got_p, got_v = _clone(params), _clone(avgs)
    _rms_op(got_p, g, a, got_v, m, 0.0)
    torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_v, want_v, rtol=1e-12, atol=1e-14)


def test_sums_and_covariance_ops_read_negative_views_as_their_values():
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(4, 6, generator=gen, dtype=F64) for _ in range(2)]
    terms = [torch.randn(4, 6, generator=gen, dtype=F64) for _ in range(3)]
    offsets, signs = [0, 2, 3], [1, -1, 1]
    want = [torch.empty(4, 6, dtype=F64) for _ in range(2)]
    signed_sums_reference_(want, base, terms, offsets, signs)
    got = [torch.empty(4, 6, dtype=F64) for _ in range(2)]
    ops.signed_sums_(got, [neg_view(t) for t in base], [neg_view(t) for t in terms], offsets, signs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    a, b = torch.randn(9, 3, generator=gen, dtype=F64), torch.randn(9, 2, generator=gen, dtype=F64)
    for count in (0, 4):
        want_s, got_s = _state(3, 2, 2), _state(3, 2, 2)
        for s in (want_s, got_s):
            for t in s:
                t.copy_(torch.rand(t.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
        cross_covariance_update_reference_(*want_s, a, b, count)
        ops.covariance_update_(*got_s, neg_view(a), neg_view(b), count)
        for name, g, w in zip(NAMES, got_s, want_s):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


# The written arguments: torch's own fallback for the bit fails an internal assert, or corrupts the heap (for an
# op returning nothing), so each call runs in a child process; each must be refused by name.
_WRITTEN_CHILD = textwrap.dedent(
    """
    import sys, torch
    import pypattern  # noqa: F401
    ops = torch.ops.pypattern
    nv = lambda t: torch._neg_view(-t)
    which = sys.argv[1]
    f = torch.float64
    p, g, a, s = (torch.rand(40, dtype=f) + 0.1 for _ in range(4))
    th = torch.tensor([0.3], dtype=f)
    calls = {
        "sgld.params": lambda: ops.sgld_step_([nv(p)], [g], [a], [], 1e-3, 1.0, 1.0, 0.0, 1.0, None, 1, 1),
        "sgnht.momenta": lambda: ops.sgnht_step_(
            [p], [g], [a], [nv(s)], th, [], 1e-3, 1.0, 1.0, 0.0, 0.01, 1.0, None, 1, 1),
        "sgnht.thermostat": lambda: ops.sgnht_step_(
            [p], [g], [a], [s], nv(th), [], 1e-3, 1.0, 1.0, 0.0, 0.01, 1.0, None, 1, 1),
        "rmsprop.square_avgs": lambda: ops.rmsprop_sgld_step_(
            [p], [g], [a], [nv(s)], [], 1e-3, 1.0, 1.0, 0.0, 0.99, 0.1, 1.0, None, 1, 1),
        "sums.out": lambda: ops.signed_sums_([nv(p)], [g], [a], [0, 1], [1]),
    }
    K, N = 3, 2
    names = ["shift_a", "shift_b", "mean_a", "mean_b", "comoment", "m2_a", "m2_b"]
    def cov(i):
        st = [torch.zeros(K, dtype=f), torch.zeros(N, dtype=f), torch.zeros(K, dtype=f), torch.zeros(N, dtype=f),
              torch.ones(K, N, dtype=f), torch.ones(K, dtype=f), torch.ones(N, N, dtype=f)]
        st[i] = nv(st[i])
        ops.covariance_update_(*st, torch.randn(5, K, dtype=f), torch.randn(5, N, dtype=f), 3)
    for i, n in enumerate(names):
        calls["covariance." + n] = lambda i=i: cov(i)
    for key, call in calls.items():
        try:
            call()
            print(key, "ACCEPTED")
        except Exception as e:
            print(key, type(e).__name__, str(e).splitlines()[0])
    print("END")
    """
)


def test_ops_refuse_written_arguments_with_the_negative_bit_by_name():
    out = subprocess.run(
        [sys.executable, "-c", _WRITTEN_CHILD, "x"], capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines and lines[-1] == "END", (
        out.returncode,
        out.stdout,
        out.stderr[-2000:],
    )
    for line in lines[:-1]:
        key, kind, *message = line.split(" ", 2)
        arg = key.split(".")[1]
        assert kind == "ValueError", line
        assert f"{arg}" in message[0] and "negative view" in message[0], line
    assert len(lines) == 1 + 5 + 7
