"""Compile Triton kernels ahead of time for GPUs, on a machine without one.

Where there is no GPU the kernels run in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), which
accepts code that the GPU compiler rejects, so each Triton test file also compiles its kernels to sm_80/sm_90
cubins. That runs in a separate process without the interpreter, since the interpreter patches triton.language
in this one; it needs no GPU, and where there is one it checks the architectures that one may not be.
"""

import os
import subprocess
import sys

import pytest


def assert_compiles_for_gpus(script: str) -> None:
    """Run ``script`` (which compiles kernels and prints ``ok``) without the interpreter; fail with its stderr."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("triton's ptxas is unavailable")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
