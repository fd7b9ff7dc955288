"""Every instruction-set path of the C++ SGLD kernel gives the reference's update and noise.

The extension is built with ``-march=native`` (here: the AVX-512 Philox path); the AVX2 path (most laptops) and
the portable path are only compiled on machines without those instructions. So this test compiles the kernel
file itself once per instruction set, with a small driver (``tests/sgld_isa_driver.cpp``), and compares each
with :func:`pypattern.sgld_step_`'s reference on the same inputs: one tensor, noise on, with and without a mask
and a bounding box, sizes around the kernel's 128-element blocks.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from _isa_build import ISAS, RUNNABLE, build_drivers

from pypattern.ops.sgld import sgld_step_


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    d = tmp_path_factory.mktemp("isa")
    exes = build_drivers(d, ["csrc/sgld"], ["csrc/sgld/sgld_cpu_fast.cpp", "tests/sgld_isa_driver.cpp"])
    return exes, d


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("n", [1, 127, 128, 129, 1000, 4099])
@pytest.mark.parametrize("extras", ["plain", "mask+box", "overflow"])
def test_isa_path_equals_reference(drivers, isa, n, extras):
    """``overflow``: a huge finite gradient (its update overflows float32) and a NaN one in the last block, with a
    mask and a box: both entries are left as they were and the kernel reports flags 1 | 2."""
    if not RUNNABLE[isa]:
        pytest.skip(f"this CPU lacks {isa} (compiled only)")
    exes, d = drivers
    gen = torch.Generator().manual_seed(n)
    w, g, w0 = (torch.randn(n, generator=gen) for _ in range(3))
    if extras == "overflow":
        g[n - 1] = 1e38 if n == 1 else -1e38
        if n > 1:
            g[n // 2] = float("nan")
    mask = (torch.rand(n, generator=gen) > 0.3).float() if extras != "plain" else None
    if mask is not None:
        mask[n - 1] = 1.0  # the huge gradient's entry moves
    box = 0.05 if extras != "plain" else None
    kw = dict(
        step_size=1e-3, nbeta=37.0, localization=100.0, weight_decay=0.01, noise_scale=1.0, seed=2**40 + 7
    )
    if extras == "overflow":
        kw["nbeta"] = 1e5  # eps/2 * nbeta * 1e38 overflows float32
    kw.update(step=3)
    inp = d / f"in_{isa}_{n}_{extras}.bin"
    outp = d / f"out_{isa}_{n}_{extras}.bin"
    arrays = [w, g, w0] + ([mask] if mask is not None else [])
    np.concatenate([a.numpy() for a in arrays]).astype(np.float32).tofile(inp)
    tensor_index = 0
    args = [
        str(exes[isa]),
        str(inp),
        str(outp),
        str(n),
        str(int(mask is not None)),
        repr(kw["step_size"]),
        repr(kw["nbeta"]),
        repr(kw["localization"]),
        repr(kw["weight_decay"]),
        repr(kw["noise_scale"]),
        repr(-1.0 if box is None else box),
        str(kw["seed"]),
        str(kw["step"]),
        str(tensor_index),
    ]
    r = subprocess.run(args, capture_output=True, text=True)
    ref = [w.clone()]
    flags = sgld_step_(
        ref,
        [g],
        [w0],
        backend="reference",
        bounding_box=box,
        masks=None if mask is None else [mask],
        check_finite=False,
        **kw,
    )
    assert r.returncode == (16 + int(flags[0]) if int(flags[0]) else 0), (r.returncode, r.stderr)
    if extras == "overflow":
        assert int(flags[0]) == (3 if n > 1 else 2)
    got = torch.from_numpy(np.fromfile(outp, dtype=np.float32))
    torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=5e-6)
    if mask is not None:  # masked entries are left exactly as they were
        assert torch.equal(got[mask == 0], w[mask == 0])
    if extras == "overflow":  # so are the flagged ones
        assert got[n - 1] == w[n - 1] and got[n // 2] == w[n // 2]
