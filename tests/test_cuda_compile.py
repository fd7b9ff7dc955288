"""Every CUDA source in csrc/ (one folder per kernel family) must compile for sm_80 and sm_90. This needs nvcc but
no GPU and proves only that the device code builds: the kernels' results are checked against the references by
the op tests where a GPU is present, and the whole extension against a CUDA torch by `make check-cuda`."""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
NVCC = shutil.which("nvcc")


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/ holds no .cu files"
    families = {os.path.basename(os.path.dirname(s)) for s in SOURCES}
    assert families == {"sgld", "covariance", "grad_gram", "samplers", "activations"}, families


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA sources cannot be compile-checked here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize(
    "src", SOURCES, ids=[os.path.relpath(s, os.path.join(ROOT, "csrc")) for s in SOURCES]
)
def test_cu_compiles(src, arch, tmp_path):
    cmd = [
        NVCC,
        "-c",
        "-O3",
        "--use_fast_math",
        "-std=c++17",
        f"-arch={arch}",
        "-I",
        os.path.join(ROOT, "csrc"),
        "-I",
        os.path.dirname(src),
        src,
        "-o",
        str(tmp_path / "out.o"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0
