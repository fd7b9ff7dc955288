"""Builds pypattern._C from csrc/: ``csrc/module.cpp`` (the ``pypattern`` operator namespace and the Python
module) and one folder per kernel family (``csrc/sgld/``, ``csrc/covariance/``, ``csrc/grad_gram/``), mirroring
``pypattern/ops/<family>/``.

* C++ (OpenMP) always. Files named ``*_fast.cpp`` hold raw-pointer kernels with no torch headers; they are
  compiled on their own (about 1 s each, against 5 s or more for a file with ATen headers) with
  ``-O3 -fno-math-errno -fno-trapping-math`` (the latter lets gcc turn the selects into vector blends) and
  linked as objects. They carry their own branch-free math so that gcc vectorises it
  without ``-ffast-math``, which would reassociate error-compensating arithmetic and, as a link flag, turn on
  flush-to-zero for the whole Python process.
* CUDA (``csrc/**/*.cu`` and the registration files ``csrc/**/*_cuda.cpp``) only when a CUDA toolkit and a CUDA build
  of torch are both present; decided from ``torch.version.cuda`` and the toolkit, never from whether a GPU is
  visible. Without a GPU, ``TORCH_CUDA_ARCH_LIST`` defaults to ``7.5;8.0;9.0+PTX``: cubins for Turing (T4),
  Ampere and Hopper, and PTX that the driver compiles for any newer GPU (Blackwell and on).

Environment: ``PYPATTERN_PORTABLE=1`` replaces ``-march=native`` by ``-mavx2 -mfma`` (for builds that are copied
to other machines); ``PYPATTERN_NO_CUDA=1`` skips CUDA even where it could be built.
"""

import glob
import os
import platform
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
# The architectures a CUDA build on a machine without a GPU targets (a GPU's own build targets that GPU): sm_75,
# sm_80 and sm_90 cubins, plus compute_90 PTX so that any later GPU can JIT-compile the kernels.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"


def csrc_files(pattern: str) -> list[str]:
    """Files of csrc/ and its family folders matching ``pattern`` (relative paths, sorted)."""
    return sorted(glob.glob(os.path.join(CSRC, "**", pattern), recursive=True))


def arch_flags():
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["-mcpu=native"] if os.environ.get("PYPATTERN_PORTABLE") != "1" else []
    if os.environ.get("PYPATTERN_PORTABLE") == "1":
        return ["-mavx2", "-mfma"]
    # gcc's tuning for many AVX-512 CPUs keeps auto-vectorised loops at 256 bits; the kernels' math loops are
    # compute-bound and run faster at the full width where the CPU has it
    return ["-march=native", "-mprefer-vector-width=512"]


def want_cuda():
    if os.environ.get("PYPATTERN_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


class Build(cpp_extension.BuildExtension):
    def build_extension(self, ext):
        fast = [s for s in ext.sources if s.endswith("_fast.cpp")]
        ext.sources = [s for s in ext.sources if not s.endswith("_fast.cpp")]
        os.makedirs(self.build_temp, exist_ok=True)
        cxx = os.environ.get("CXX", "c++")
        for src in fast:
            obj = os.path.join(self.build_temp, "fast", os.path.relpath(src, CSRC)[:-4] + ".o")
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            cmd = [
                cxx,
                "-std=c++17",
                "-O3",
                "-fno-math-errno",
                "-fno-trapping-math",
                "-fopenmp",
                "-fPIC",
                *arch_flags(),
                "-I",
                os.path.join(HERE, CSRC),
                "-I",
                os.path.join(HERE, os.path.dirname(src)),
                "-c",
                os.path.join(HERE, src),
                "-o",
                obj,
            ]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            ext.extra_objects.append(obj)
        super().build_extension(ext)


def extension():
    cpp = csrc_files("*.cpp")
    cuda_cpp = [s for s in cpp if s.endswith("_cuda.cpp")]
    cpp = [s for s in cpp if s not in cuda_cpp]
    cxx_flags = ["-O3", "-fopenmp", *arch_flags()]
    common = dict(
        name="pypattern._C",
        include_dirs=[os.path.join(HERE, CSRC)],
        extra_link_args=["-fopenmp"],
    )
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        cu = csrc_files("*.cu")
        return cpp_extension.CUDAExtension(
            sources=cpp + cuda_cpp + cu,
            define_macros=[("PYPATTERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            **common,
        )
    return cpp_extension.CppExtension(sources=cpp, extra_compile_args={"cxx": cxx_flags}, **common)


setup(
    packages=find_packages(include=["pypattern", "pypattern.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
