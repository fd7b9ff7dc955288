#!/usr/bin/env bash
# Bench-only venv for the CCA-family and ridge comparisons (bench/bench_cca.py, bench/bench_ridge.py):
# .bench-venvs/repsim with the peers repsim 0.1.5 (C++/Eigen CCA, SVCCA, PWCCA) and scikit-learn (RidgeCV).
# The library never depends on them. torch is pinned to 2.13.0 (the CPU build on local disk; anything else pulls a
# multi-GB CUDA build) and the pin is repeated in the same resolve as the peers.
# Usage: bash bench/envs/repsim.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-python3}"
PEERS="${PEERS:-repsim==0.1.5 scikit-learn}"
V="$ROOT/.bench-venvs/repsim"
echo "== $V ($PEERS)"
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
"$V/bin/pip" install -q --upgrade pip "setuptools>=70" wheel
"$V/bin/pip" install -q torch==2.13.0 numpy scipy pytest pytest-benchmark ninja
# repsim 0.1.5 ships as a source distribution: pip builds its pybind11/Eigen extension (needs a C++17 compiler)
# shellcheck disable=SC2086
"$V/bin/pip" install -q $PEERS torch==2.13.0
# same lock as `make build`: the editable build writes pypattern/_C*.so into the source tree
flock /tmp/pypattern-build.lock env MAX_JOBS=2 "$V/bin/pip" install -q --no-build-isolation -e "$ROOT"
got="$("$V/bin/python" -c 'import torch; print(torch.__version__)')"
case "$got" in
  2.13.0*) ;;
  *) echo "torch was replaced: $got in $V (expected 2.13.0)" >&2; exit 1 ;;
esac
"$V/bin/python" -c 'import repsim, sklearn, pypattern, torch, importlib.metadata as m; print("repsim", m.version("repsim"), "scikit-learn", sklearn.__version__, "torch", torch.__version__, "pypattern ok")'
echo "run: $V/bin/python -m pytest -q $ROOT/bench/bench_cca.py $ROOT/bench/bench_ridge.py -s --benchmark-columns=min,median,rounds"
