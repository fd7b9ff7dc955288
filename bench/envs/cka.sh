#!/usr/bin/env bash
# Bench-only venv for the CKA comparison (bench/bench_equivalence.py): .bench-venvs/cka with the peer
# pytorch-cka (import name `cka`, API `cka.cka_from_features`). The library never depends on it.
# torch is pinned to 2.13.0 (the CPU build on local disk; anything else pulls a multi-GB CUDA build) and the pin is
# repeated in the same resolve as the peer, so its `torch>=2.0` requirement cannot replace it.
# Usage: bash bench/envs/cka.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-python3}"
PEER="${PEER:-pytorch-cka==1.1.3}"
V="$ROOT/.bench-venvs/cka"
echo "== $V ($PEER)"
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
"$V/bin/pip" install -q --upgrade pip "setuptools>=70" wheel
"$V/bin/pip" install -q torch==2.13.0 numpy scipy pytest pytest-benchmark ninja
# pytorch-cka needs torch, numpy, tqdm and matplotlib (its viz module is imported by `import cka`)
"$V/bin/pip" install -q "$PEER" torch==2.13.0
# same lock as `make build`: the editable build writes pypattern/_C*.so into the source tree
flock /tmp/pypattern-build.lock env MAX_JOBS=2 "$V/bin/pip" install -q --no-build-isolation -e "$ROOT"
got="$("$V/bin/python" -c 'import torch; print(torch.__version__)')"
case "$got" in
  2.13.0*) ;;
  *) echo "torch was replaced: $got in $V (expected 2.13.0)" >&2; exit 1 ;;
esac
"$V/bin/python" -c 'import cka, pypattern, torch, importlib.metadata as m; print("pytorch-cka", m.version("pytorch-cka"), "torch", torch.__version__, "pypattern ok")'
echo "run: $V/bin/python -m pytest -q $ROOT/bench/bench_equivalence.py -s --benchmark-columns=min,median,rounds"
