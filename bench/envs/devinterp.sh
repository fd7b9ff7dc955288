#!/usr/bin/env bash
# Bench-only environments for the LLC comparison (bench/bench_llc.py). The library never depends on devinterp.
#   .bench-venvs/devinterp13: devinterp==1.3.2 (estimate_learning_coeff_with_summary)
#   .bench-venvs/devinterp20: devinterp==2.0.1 (llc / sample)
# Each pins torch==2.13.0 (the CPU build on local disk; anything else pulls a multi-GB CUDA build) and installs
# pypattern from this checkout with --no-build-isolation (PYPATTERN_LINK=1: no build, the checkout and its already
# built pypattern/_C*.so go on the venv's path instead). Usage: bash bench/envs/devinterp.sh [13|20 ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-python3}"
if [ $# -eq 0 ]; then WANT=(13 20); else WANT=("$@"); fi

for tag in "${WANT[@]}"; do
  case "$tag" in
    13) pkg="devinterp==1.3.2" ;;
    20) pkg="devinterp==2.0.1" ;;
    *) echo "unknown version tag $tag (use 13 or 20)" >&2; exit 2 ;;
  esac
  V="$ROOT/.bench-venvs/devinterp$tag"
  echo "== $V ($pkg)"
  [ -x "$V/bin/python" ] || "$PY" -m venv "$V"
  "$V/bin/pip" install -q --upgrade pip "setuptools>=70" wheel
  "$V/bin/pip" install -q torch==2.13.0 numpy scipy tqdm matplotlib pytest pytest-benchmark ninja
  # the pin again in the same resolve, so that devinterp's requirements cannot replace torch
  "$V/bin/pip" install -q "$pkg" torch==2.13.0
  if [ "${PYPATTERN_LINK:-0}" = "1" ]; then
    # no build: put this checkout on the venv's path (its pypattern/_C*.so must exist, built against torch 2.13.0)
    ls "$ROOT"/pypattern/_C*.so >/dev/null
    site="$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$ROOT" >"$site/pypattern-checkout.pth"
  else
    # same lock as `make build`: the editable build writes pypattern/_C*.so into the source tree
    flock /tmp/pypattern-build.lock env MAX_JOBS=2 "$V/bin/pip" install -q --no-build-isolation -e "$ROOT"
  fi
  got="$("$V/bin/python" -c 'import torch; print(torch.__version__)')"
  case "$got" in
    2.13.0*) ;;
    *) echo "torch was replaced: $got in $V (expected 2.13.0)" >&2; exit 1 ;;
  esac
  "$V/bin/python" -c 'import devinterp, pypattern, importlib.metadata as m; print("devinterp", m.version("devinterp"), "torch ok, pypattern ok")'
done
