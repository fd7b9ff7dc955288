"""Builds of a C++ kernel file once per instruction set, linked with a small driver, for the tests that compare
every path of the file (the extension itself is built with ``-march=native``: one path only)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX", "c++")


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


ISAS = {
    "portable": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mprefer-vector-width=512"],
}
RUNNABLE = {"portable": True, "avx2": _cpu_has("avx2"), "avx512": _cpu_has("avx512f")}


def build_drivers(folder, includes: list[str], sources: list[str]) -> dict:
    """``{isa: executable}``: ``sources`` (paths below the repository) compiled with each of :data:`ISAS`' flags
    into ``folder``, ``includes`` (folders below the repository) on the include path; the calling test is skipped
    when there is no C++ compiler."""
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX}) on PATH")
    out = {}
    for name, flags in ISAS.items():
        exe = folder / f"driver_{name}"
        cmd = [CXX, "-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", *flags]
        for inc in includes:
            cmd += ["-I", os.path.join(ROOT, inc)]
        cmd += [os.path.join(ROOT, src) for src in sources]
        subprocess.run([*cmd, "-o", str(exe)], check=True, capture_output=True, text=True)
        out[name] = exe
    return out
