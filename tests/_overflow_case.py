"""The step the fused ops' overflow tests share: gradients that mix huge finite values (whose update overflows),
NaN/Inf and ordinary values, over a list of tensors holding a non-contiguous view and an empty tensor.

With ``step_size * nbeta / 2 = 50`` a gradient of ``HUGE[dtype]`` overflows every op's update (SGLD's weight,
SGNHT's momentum, RMSprop-SGLD's ``V``), an ordinary one moves the weight by tens. The expected flags and the
entries that must stay untouched follow from the construction (which entries are huge or non-finite, where the
masks are 0), not from any backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pypattern.ops.rmsprop_sgld import rmsprop_sgld_step_
from pypattern.ops.sgld import sgld_step_
from pypattern.ops.sgnht import sgnht_step_

HUGE = {torch.float32: 1e38, torch.float64: 1e308}
HYPER = dict(
    step_size=1e-3, nbeta=1e5, localization=10.0, weight_decay=0.01, noise_scale=1.0, seed=11, step=3
)
XI0 = 0.05  # SGNHT's thermostat at the start
STATE = {"sgld_step_": None, "sgnht_step_": "momenta", "rmsprop_sgld_step_": "square_avgs"}


@dataclass
class Case:
    params: list
    grads: list
    anchors: list
    states: list
    masks: list | None
    bounding_box: float | None
    bases: list  # (base, its copy before the step) of the non-contiguous views: what lies outside must not change
    untouched: list  # per tensor, bool: entries that must keep their values (flagged or masked out)
    expected_flags: list
    thermostat: torch.Tensor

    def clean_grads(self) -> list:
        """The gradients with every huge or non-finite entry replaced by 0."""
        out = []
        for g in self.grads:
            bad = ~torch.isfinite(g) | (g.abs() >= HUGE[g.dtype] / 10)
            out.append(torch.where(bad, torch.zeros_like(g), g))
        return out


def make_case(dtype: torch.dtype, device: str, extras: str) -> Case:
    """``extras``: ``"plain"``, ``"mask"`` (float masks with 0, 0.5 and 1, including 0 at some huge and NaN
    entries) or ``"box"`` (a bounding box, which must not hide an overflow)."""
    gen = torch.Generator().manual_seed(17)
    big = HUGE[dtype]
    shapes = [(5, 7), (0, 3), (11,), (40, 37), (9,), (6,), (3, 4)]
    bases, params, grads, anchors, states = [], [], [], [], []
    for k, shape in enumerate(shapes):
        four = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(4)]
        four[2] = four[0] + 0.1 * four[2]  # anchors near the weights
        four[3] = four[3].abs() * 0.1  # a valid V, and a momentum
        if k == 0:  # a transposed view of every other row of a larger tensor
            views = []
            for t in four:
                base = torch.randn(2 * shape[1] + 1, shape[0], generator=gen, dtype=dtype).to(device)
                base[::2][: shape[1]] = t.t().to(device)
                views.append(base[::2][: shape[1]].t())
                bases.append((base, base.clone()))
            assert not views[0].is_contiguous()
            four = views
        else:
            four = [t.to(device) for t in four]
        for lst, t in zip((params, grads, anchors, states), four):
            lst.append(t)
    huge = [torch.zeros(s, dtype=torch.bool) for s in shapes]
    g = grads
    for t, idx, sign in [(0, (0, 0), 1), (0, (2, 3), -1), (0, (4, 6), 1), (3, (35, 5), -1), (4, (0,), 1)]:
        g[t][idx] = sign * big
        huge[t][idx] = True
    for t, idx in [(4, (5,)), (5, (2,))]:
        g[t][idx] = big
        huge[t][idx] = True
    g[0][1, 1] = float("nan")
    g[2][3], g[2][7] = float("inf"), -float("inf")
    masks = None
    if extras == "mask":
        masks = []
        for k, shape in enumerate(shapes):
            if k in (1, 2):
                masks.append(None)
                continue
            m = torch.tensor([0.0, 0.5, 1.0], dtype=dtype)[torch.randint(0, 3, shape, generator=gen)]
            m[huge[k]] = 1.0
            masks.append(m)
        masks[0][2, 3] = masks[0][1, 1] = 0.0  # a huge and a NaN entry frozen
        masks[4][0] = 0.0  # one of tensor 4's two huge entries frozen: still flagged by the other
        masks[5][2] = 0.0  # tensor 5's only huge entry frozen: not flagged
        masks = [None if m is None else m.to(device) for m in masks]
    untouched, expected = [], []
    for k in range(len(shapes)):
        gk = grads[k].cpu()
        active = (
            torch.ones(shapes[k], dtype=torch.bool)
            if masks is None or masks[k] is None
            else masks[k].cpu() != 0
        )
        nonfinite = ~torch.isfinite(gk)
        untouched.append((nonfinite | (huge[k] & active) | ~active).to(device))
        expected.append(int(bool(nonfinite.any())) | 2 * int(bool((huge[k] & active).any())))
    return Case(
        params,
        grads,
        anchors,
        states,
        masks,
        0.5 if extras == "box" else None,
        bases,
        untouched,
        expected,
        torch.tensor([XI0], dtype=torch.float64, device=device),
    )


def run(op: str, backend: str, case: Case, *, grads=None, **kw) -> torch.Tensor:
    """One step of ``op`` on the case's tensors (in place), with ``grads`` instead of the case's if given."""
    args = (case.params, case.grads if grads is None else grads, case.anchors)
    kw = dict(HYPER, masks=case.masks, bounding_box=case.bounding_box, backend=backend, **kw)
    if op == "sgld_step_":
        return sgld_step_(*args, **kw)
    if op == "sgnht_step_":
        return sgnht_step_(*args, case.states, case.thermostat, **kw)
    return rmsprop_sgld_step_(*args, case.states, **kw)


def check_message(msg: str, op: str, case: Case) -> None:
    """The error names the op, exactly the tensors flagged (by their kind), the step and what to do."""
    assert msg.startswith(f"{op}: "), msg
    for i, f in enumerate(case.expected_flags):
        shape = tuple(case.params[i].shape)
        assert (f"grads[{i}] (shape {shape})" in msg) == bool(f & 1), (i, msg)
        state = STATE[op]
        name = f"params[{i}]" + ("" if state is None else f"/{state}[{i}]") + f" (shape {shape})"
        assert (name in msg) == bool(f & 2), (i, msg)
    assert f"at step {HYPER['step']}" in msg and "not updated" in msg, msg
    assert "Use a smaller step_size" in msg and f"step_size={HYPER['step_size']}" in msg, msg


def check_step(op: str, backend: str, device: str, dtype: torch.dtype, extras: str) -> None:
    """The whole contract on one (op, backend): with ``validate`` True and False alike the op raises naming the
    right tensors; the flags are the expected ones (so equal across backends); the entries flagged (and those
    masked out) keep their weight and state bit for bit, every other entry gets the update the same backend gives
    when the bad gradients are replaced by 0, and agrees with the reference backend; storage outside the
    non-contiguous view is untouched; SGNHT's thermostat is the mean square momentum of the result."""
    tol = dict(rtol=1e-5, atol=5e-6)  # the float32 noise: log/cos round differently in each math library
    outs = []
    for validate in (True, False):
        case = make_case(dtype, device, extras)
        before = [t.clone() for t in case.params + case.states]
        with pytest.raises(FloatingPointError) as err:
            run(op, backend, case, validate=validate)
        check_message(str(err.value), op, case)
        after = case.params + (case.states if STATE[op] else [])
        for k, (new, old) in enumerate(zip(after, before)):
            keep = case.untouched[k % len(case.params)]
            assert torch.equal(new[keep], old[keep]), (op, backend, k)
            assert bool(torch.isfinite(new).all()), (op, backend, k)
            if k % len(case.params) in (3, 6):  # tensors with ordinary entries: they moved
                assert not torch.equal(new[~keep], old[~keep]), (op, backend, k)
        for base, copy in case.bases:
            outside = torch.ones(base.shape[0], dtype=torch.bool)
            outside[::2][: case.params[0].shape[1]] = False
            assert torch.equal(base[outside.to(base.device)], copy[outside.to(base.device)])
        outs.append(case)
    slow, fast = outs
    for a, b in zip(
        slow.params + slow.states + [slow.thermostat], fast.params + fast.states + [fast.thermostat]
    ):
        assert torch.equal(a, b), (op, backend)  # the fast path is the same step

    # check_finite=False: the flags, no error; the same backend on clean gradients updates the other entries alike
    case = make_case(dtype, device, extras)
    flags = run(op, backend, case, check_finite=False)
    assert flags.dtype == torch.int32 and flags.cpu().tolist() == case.expected_flags, (op, backend)
    clean = make_case(dtype, device, extras)
    assert run(op, backend, clean, grads=clean.clean_grads()).cpu().tolist() == [0] * len(clean.params)
    n = len(case.params)
    for k, (a, b) in enumerate(zip(case.params + case.states, clean.params + clean.states)):
        keep = case.untouched[k % n]
        if STATE[op] is None and k >= n:
            break
        assert torch.equal(a[~keep], b[~keep]), (op, backend, k)
    ref = make_case(dtype, "cpu", extras)  # the same values (drawn on the CPU, then moved)
    assert run(op, "reference", ref, check_finite=False).tolist() == case.expected_flags
    for a, b in zip(case.params + case.states, ref.params + ref.states):
        torch.testing.assert_close(a.cpu(), b, **tol)
    if op == "sgnht_step_":
        torch.testing.assert_close(case.thermostat.cpu(), ref.thermostat, rtol=1e-6, atol=1e-9)
        active = []
        for k, p in enumerate(case.states):
            m = None if case.masks is None else case.masks[k]
            active.append((p if m is None else p[m != 0]).reshape(-1).to(torch.float64).cpu())
        active = torch.cat(active)
        expected = XI0 + float((active**2).mean()) - HYPER["step_size"] * HYPER["noise_scale"] ** 2
        assert abs(float(case.thermostat) - expected) < 1e-9 * abs(expected), (
            float(case.thermostat),
            expected,
        )
