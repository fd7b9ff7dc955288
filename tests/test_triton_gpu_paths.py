"""The GPU side of the Triton wrappers (pypattern/ops/*/triton.py) that the interpreter cannot show by itself:

- the launches compile as Triton's GPU launcher specialises them (an int equal to 1 becomes a constexpr there, never
  in the interpreter): the sampler kernels with tensor_index, step words and seed of 0, 1 and 2;
- every launch happens inside the device guard of its tensors' device (a Triton launch goes to torch's current
  device and stream, not the tensors'), and with >= 2 GPUs a ``cuda:1`` call gives ``cuda:0``'s numbers;
- no grid axis but the first exceeds CUDA's 65535 however large the inputs, and the kernels loop over the tiles
  beyond the cap (checked in the interpreter with a tiny cap, on the GPU where there is one).

Kernels run compiled on CUDA tensors where a GPU is visible and in the interpreter on CPU tensors where none is
(tests/conftest.py sets TRITON_INTERPRET before triton is imported).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from _triton_aot import assert_compiles_for_gpus
from _triton_binder import recording

pytest.importorskip("triton")

import pypattern.ops._triton_launch as tlaunch  # noqa: E402
import pypattern.ops.covariance.triton as ct  # noqa: E402
import pypattern.ops.grad_gram.triton as gt  # noqa: E402
import pypattern.ops.rmsprop_sgld.triton as rt  # noqa: E402
import pypattern.ops.sgld.triton as st  # noqa: E402
import pypattern.ops.sgnht.triton as snt  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TESTS = os.path.dirname(os.path.abspath(__file__))
SAMPLER_KW = dict(step_size=1e-3, nbeta=10.0, localization=1.0, weight_decay=0.01, noise_scale=1.0)


def _sampler_calls(device):
    """(module, kernel name, call) for each sampler wrapper on three tensors of ``device`` (tensor_index 0, 1, 2)."""

    def tensors():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(s, generator=g).to(device) for s in ((5,), (3, 4), (1031,))]

    ps, gs, an = tensors(), tensors(), tensors()
    gs = [g * 0.5 for g in gs]

    def sgld(step=1, seed=1):
        w = [p.clone() for p in ps]
        f = st.sgld_step_triton_(w, gs, an, bounding_box=None, masks=None, seed=seed, step=step, **SAMPLER_KW)
        return w, f

    def sgnht(step=1, seed=1):
        w, mom = [p.clone() for p in ps], [0.1 * g for g in gs]
        xi = torch.full((1,), 0.01, dtype=torch.float64, device=device)
        f = snt.sgnht_step_triton_(
            w, gs, an, mom, xi, diffusion_factor=0.01, bounding_box=1.0, masks=None, seed=seed, step=step,
            **SAMPLER_KW,
        )  # fmt: skip
        return w + mom + [xi], f

    def rmsprop(step=1, seed=1):
        w, v = [p.clone() for p in ps], [g * g + 0.1 for g in gs]
        f = rt.rmsprop_sgld_step_triton_(
            w, gs, an, v, alpha=0.99, eps=0.1, bounding_box=None, masks=[torch.ones_like(p) for p in ps],
            seed=seed, step=step, **SAMPLER_KW,
        )  # fmt: skip
        return w + v, f

    return [(st, "_sgld_kernel", sgld), (snt, "_sgnht_kernel", sgnht), (rt, "_rmsprop_sgld_kernel", rmsprop)]


def _cov_call(device, k=3, n=5, m=7):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(m, k, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(m, n, generator=g, dtype=torch.float64).to(device)

    def call():
        c = torch.zeros(k, n, dtype=torch.float64, device=device)
        z = lambda s: torch.zeros(s, dtype=torch.float64, device=device)  # noqa: E731
        ct.comoment_update_triton_(c, a, b, z(k), a.mean(0), z(n), b.mean(0), z(k), z(n), 0.0)
        return [c]

    ref = (a - a.mean(0)).T @ (b - b.mean(0))
    return call, ref


def _gram_call(device, rows=12, batch=3):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(rows, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(rows, 3, generator=g, dtype=torch.float64).to(device)

    def call():
        return [gt.grad_gram_pairwise_triton(x, y, None, batch)]

    t = rows // batch
    ref = ((x @ x.T) * (y @ y.T)).reshape(batch, t, batch, t).sum((1, 3))
    return call, ref


_SAMPLER_AOT = """
import sys
sys.path.insert(0, TESTS_DIR)
import torch
from _triton_binder import compile_recorded, recording
import pypattern.ops.sgnht.triton as snt
import pypattern.ops.rmsprop_sgld.triton as rt

kw = dict(step_size=1e-3, nbeta=10.0, localization=1.0, weight_decay=0.0, block=1024)
for dtype in (torch.float32, torch.float64):
    ps = [torch.randn(1, dtype=dtype), torch.randn(2, dtype=dtype), torch.randn(1027, dtype=dtype)]
    c = lambda: [p.clone() for p in ps]
    for step, seed, mask, box, noise in ((0, 0, False, None, 1.0), (1, 1, True, 0.5, 1.0), (2, 2, False, 0.5, 1.0),
                                         (2**32 + 1, 7, True, None, 1.0), (1, 1, False, None, 0.0)):
        masks = [torch.ones_like(p) for p in ps] if mask else None
        with recording(snt, "_sgnht_kernel") as rec:
            snt.sgnht_step_triton_(c(), c(), c(), c(), torch.zeros(1, dtype=torch.float64), diffusion_factor=0.01,
                                   noise_scale=noise, bounding_box=box, masks=masks, seed=seed, step=step, **kw)
        assert [call[1][11] for call in rec.calls] == [0, 1, 2]  # tensor_index
        compile_recorded(rec, archs=(80, 90) if step == 1 and noise else (80,))
        with recording(rt, "_rmsprop_sgld_kernel") as rec:
            rt.rmsprop_sgld_step_triton_(c(), c(), c(), [p.abs() for p in ps], alpha=0.99, eps=0.1,
                                         noise_scale=noise, bounding_box=box, masks=masks, seed=seed, step=step, **kw)
        assert [call[1][9] for call in rec.calls] == [0, 1, 2]  # tensor_index
        compile_recorded(rec, archs=(80, 90) if step == 1 and noise else (80,))
print("ok")
""".replace("TESTS_DIR", repr(TESTS))


def test_sampler_kernels_compile_as_the_gpu_launcher_specialises_them():
    """SGNHT and RMSprop-SGLD (SGLD: tests/test_sgld.py): the wrappers' own launches for three tensors, steps
    whose low and high words are 0, 1 and 2, seeds 0, 1, 2, compiled for sm_80/sm_90 through Triton's binder for
    the CUDA backend. Triton 3.7 specialises an int equal to 1 as a constexpr there, which ``philox_normal``'s
    bitcasts did not compile with (the 2nd tensor of every list, step 1 of every chain)."""
    assert_compiles_for_gpus(_SAMPLER_AOT)


def test_noise_key_arguments_are_not_specialised():
    for fn in (st._sgld_kernel, snt._sgnht_kernel, rt._rmsprop_sgld_kernel):
        if hasattr(fn, "params"):  # compiled: a JITFunction
            names = [p.name for p in fn.params if p.do_not_specialize]
        else:  # the interpreter's InterpretedFunction keeps the decorator's arguments
            names = list(fn.kwargs.get("do_not_specialize") or [])
        assert set(names) >= {"seed", "tensor_index", "step_lo", "step_hi"}, names


# ---- device guard ---------------------------------------------------------------------------------------------


def test_launch_guard_is_the_tensors_cuda_device():
    assert isinstance(tlaunch.launch_guard(torch.device("cpu")), contextlib.nullcontext)
    g = tlaunch.launch_guard(torch.device("cuda", 1))  # built, not entered: needs no GPU
    assert isinstance(g, torch.cuda.device) and g.idx == 1


class _Guard:
    """Stands in for ``launch_guard``: records the device it is given and whether a launch is inside it."""

    def __init__(self):
        self.devices, self.inside = [], False

    def __call__(self, device):
        self.devices.append(torch.device(device))

        @contextlib.contextmanager
        def ctx():
            self.inside = True
            try:
                yield
            finally:
                self.inside = False

        return ctx()


class _GuardedRecorder:
    """Stands in for a kernel: records its launches and fails one made outside ``guard``."""

    def __init__(self, module, name, guard):
        self.where, self.guard, self.calls = f"{module.__name__}.{name}", guard, []

    def __getitem__(self, grid):
        assert self.guard.inside, f"{self.where} launched outside the device guard"
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _checked_launches(monkeypatch, module, name, call):
    guard = _Guard()
    monkeypatch.setattr(module, "launch_guard", guard)
    rec = _GuardedRecorder(module, name, guard)
    monkeypatch.setattr(module, name, rec)
    call()
    assert rec.calls, "nothing launched"
    return guard


@pytest.mark.parametrize("which", ["sgld", "sgnht", "rmsprop_sgld"])
def test_sampler_launches_are_inside_the_device_guard(monkeypatch, which):
    module, name, call = {m.__name__.split(".")[-2]: (m, n, c) for m, n, c in _sampler_calls("cpu")}[which]
    guard = _checked_launches(monkeypatch, module, name, call)
    assert guard.devices and all(d == torch.device("cpu") for d in guard.devices)


@pytest.mark.parametrize("which", ["covariance", "grad_gram"])
def test_contraction_launches_are_inside_the_device_guard(monkeypatch, which):
    module, name, (call, _) = {
        "covariance": (ct, "_comoment_kernel", _cov_call("cpu")),
        "grad_gram": (gt, "_pairwise_kernel", _gram_call("cpu")),
    }[which]
    guard = _checked_launches(monkeypatch, module, name, call)
    assert guard.devices and all(d == torch.device("cpu") for d in guard.devices)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_gives_the_first_gpus_numbers():
    """Tensors on cuda:1 while cuda:0 is current (and a non-default stream is current on cuda:1): every wrapper
    launches on device 1 and gives what it gives on device 0."""
    assert torch.cuda.current_device() == 0
    runs = {}
    for dev in ("cuda:0", "cuda:1"):
        calls = [c for _, _, c in _sampler_calls(dev)] + [_cov_call(dev)[0], _gram_call(dev)[0]]
        side = torch.cuda.Stream(device=dev)
        with torch.cuda.stream(side) if dev == "cuda:1" else contextlib.nullcontext():
            out = []
            for c in calls:
                r = c()
                out += list(r[0]) + [r[1]] if isinstance(r, tuple) else r
            torch.cuda.synchronize(dev)
        assert torch.cuda.current_device() == 0
        runs[dev] = [t.cpu() for t in out]
    for a, b in zip(runs["cuda:0"], runs["cuda:1"]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


# ---- grid sizes -----------------------------------------------------------------------------------------------


def test_comoment_grid_keeps_axis_1_within_cuda_limits():
    for k, n in ((1, 3_000_000), (10, 2_097_153), (3_000_000, 1), (65535 * 32 + 1, 7), (40, 50)):
        g = ct.comoment_grid(k, n, 32, 32)
        assert len(g) <= 3 and all(1 <= s <= 65535 for s in g[1:]), (k, n, g)
        assert g[0] <= 2**31 - 1
        assert g[0] * 32 >= n and g[1] >= 1


def test_comoment_wrapper_launches_a_large_n_within_cuda_limits():
    """N = 2,097,153 (one more than 65535 tiles of 32): the grid the wrapper launches has its second axis <= 65535."""
    k, n = 1, 65535 * 32 + 1
    a, b = torch.zeros(1, k), torch.zeros(1, n)
    z = lambda s: torch.zeros(s, dtype=torch.float64)  # noqa: E731
    with recording(ct, "_comoment_kernel") as rec:
        ct.comoment_update_triton_(
            torch.zeros(k, n, dtype=torch.float64), a, b, z(k), z(k), z(n), z(n), z(k), z(n), 0.0
        )
    ((grid, _, _),) = rec.calls
    assert all(s <= 65535 for s in grid[1:]) and grid[0] <= 2**31 - 1, grid


def test_pairwise_wrapper_launches_many_rows_within_cuda_limits():
    rows = 65535 * 32 + 1
    y = torch.zeros(rows, 1)
    with recording(gt, "_pairwise_kernel") as rec:
        gt.grad_gram_pairwise_triton(None, y, torch.zeros(rows, dtype=torch.int64), 1)
    ((grid, _, _),) = rec.calls
    assert all(s <= 65535 for s in grid[1:]) and grid[0] <= 2**31 - 1, grid
    assert gt.pairwise_grid(rows, 32) == (65536, 65535)


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_kernels_loop_over_the_tiles_beyond_the_capped_axis(monkeypatch, cap):
    """With the second axis capped at 1-3 programs, the co-moment (5 K tiles) and the Gram (5 column tiles) still
    equal the direct contraction: each program walks the tiles beyond the cap."""
    monkeypatch.setattr(ct, "MAX_GRID_YZ", cap)
    monkeypatch.setattr(gt, "MAX_GRID_YZ", cap)
    call, ref = _cov_call(DEV, k=5 * 32 - 3, n=40, m=9)
    torch.testing.assert_close(call()[0], ref, rtol=1e-10, atol=1e-10)
    call, ref = _gram_call(DEV, rows=5 * 32 - 4, batch=4)
    torch.testing.assert_close(call()[0], ref, rtol=1e-10, atol=1e-10)
