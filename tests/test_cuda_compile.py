"""Every CUDA source in csrc/ (one folder per kernel family) must compile for sm_75, sm_80 and sm_90. This needs
nvcc but no GPU and proves only that the device code builds: the kernels' results are checked against the
references by the op tests where a GPU is present, and the whole extension against a CUDA torch by
`make check-cuda`. Also: every kernel launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK (an unchecked failed
launch surfaces later, in an unrelated call, with the state already half updated), and a build on a machine
without a GPU targets sm_75 to sm_90 with PTX for later GPUs."""

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
NVCC = shutil.which("nvcc")


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/ holds no .cu files"
    families = {os.path.basename(os.path.dirname(s)) for s in SOURCES}
    assert families == {"sgld", "covariance", "grad_gram", "samplers", "activations"}, families


def _torch_includes(tmp_path):
    """``-I`` flags for torch's headers (c10's launch check). A CPU build of torch ships c10/cuda's headers but not
    the generated ``c10/cuda/impl/cuda_cmake_macros.h``: write the one line it holds for a shared-library build."""
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    flags = ["-I", inc]
    if not os.path.exists(os.path.join(inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        stub = tmp_path / "stub"
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
        )
        flags = ["-I", str(stub)] + flags
    return flags


@pytest.mark.parametrize(
    "src", SOURCES, ids=[os.path.relpath(s, os.path.join(ROOT, "csrc")) for s in SOURCES]
)
def test_every_launch_is_checked(src):
    """Each ``<<<...>>>`` launch statement is followed directly by ``C10_CUDA_KERNEL_LAUNCH_CHECK();``."""
    text = open(src).read()
    launches = [m.start() for m in re.finditer(r"<<<", text)]
    assert launches, f"{src} launches nothing"
    for at in launches:
        end = text.index(";", at)  # the end of the launch statement
        after = text[end + 1 :].lstrip()
        line = text.count("\n", 0, at) + 1
        assert after.startswith("C10_CUDA_KERNEL_LAUNCH_CHECK();"), f"{src}:{line}: launch not checked"


def test_default_arch_list_covers_turing_to_hopper_with_ptx():
    """Built without a GPU, the kernels must run on a T4 (sm_75) and on GPUs newer than sm_90 (through PTX)."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    values = [
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCH_LIST" for t in n.targets)
    ]
    assert values == ["7.5;8.0;9.0+PTX"], values
    from torch.utils import cpp_extension

    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = values[0]
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    assert "-gencode=arch=compute_75,code=sm_75" in flags
    assert any(f.endswith("code=compute_90") for f in flags), flags


ARCHS = ("75", "80", "90")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA sources cannot be compile-checked here")
@pytest.mark.parametrize(
    "src", SOURCES, ids=[os.path.relpath(s, os.path.join(ROOT, "csrc")) for s in SOURCES]
)
def test_cu_compiles(src, tmp_path):
    """One nvcc call per source builds device code for sm_75, sm_80 and sm_90 (one ``-gencode`` each: the host
    side is compiled once); the object's fat binary holds a cubin of each."""
    gencodes = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [
        NVCC,
        "-c",
        "-O3",
        "--use_fast_math",
        "-std=c++17",
        *gencodes,
        "-I",
        os.path.join(ROOT, "csrc"),
        "-I",
        os.path.dirname(src),
        *_torch_includes(tmp_path),
        src,
        "-o",
        str(tmp_path / "out.o"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    obj = (tmp_path / "out.o").read_bytes()
    missing = [a for a in ARCHS if f"sm_{a}".encode() not in obj]
    assert not missing, f"{src}: no cubin for sm_{missing} in the object"
