#!/usr/bin/env bash
# Proof that pypattern builds from source for a GPU machine: in a throwaway environment with a CUDA build of torch
# (2.14.1), build the extension with its CUDA kernels (csrc/*/*.cu and csrc/*/*_cuda.cpp) for setup.py's default
# architectures (7.5, 8.0 and 9.0 with PTX), import it, and check that every op has a CUDA kernel registered. No
# GPU is needed: nothing runs on one.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
venv="$top/.venv-cuda"
nvcc_bin=$(command -v nvcc || true)
if [ -z "$nvcc_bin" ]; then
  echo "check-cuda: nvcc not found on PATH; cannot check the CUDA build" >&2
  exit 1
fi
# nvcc on PATH may be a wrapper script: take the toolkit root from the real binary it execs.
real=$(grep -o '/[^ "]*/bin/nvcc' "$nvcc_bin" 2>/dev/null | head -n 1 || true)
[ -n "$real" ] || real=$(readlink -f "$nvcc_bin")
cuda_home=$(dirname "$(dirname "$real")")
echo "check-cuda: toolkit at $cuda_home"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip "setuptools>=70" wheel
  # --no-compile: nothing here imports most of those modules, so compiling them all to bytecode is wasted work
  "$venv/bin/pip" install -q --no-compile torch==2.14.1 numpy ninja
fi
"$venv/bin/python" -c "import torch; print('check-cuda: torch', torch.__version__, 'cuda', torch.version.cuda)"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
# Build from a copy so the CUDA build never overwrites the CPU extension of the working tree.
(cd "$top" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$src")
(cd "$src" && CUDA_HOME="$cuda_home" MAX_JOBS=2 \
  "$venv/bin/pip" install -q --no-build-isolation --no-deps .)
cd /tmp
"$venv/bin/python" - <<'PY'
import os
import torch
import pypattern._C as C

ops = sorted(str(n) for n in torch._C._dispatch_get_all_op_names() if str(n).startswith("pypattern::"))
assert ops, "no pypattern ops registered"
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print("check-cuda: built", C.__file__)
for op in ops:
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    print(f"check-cuda: {op}: CPU={cpu} CUDA={cuda}")
if missing:
    raise SystemExit(f"check-cuda: ops without a CUDA kernel: {missing}")
print(f"check-cuda: OK, {len(ops)} ops with CUDA kernels (built for setup.py's default architectures, 7.5, 8.0 and 9.0 with PTX; none run by this check)")
PY
