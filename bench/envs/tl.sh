#!/usr/bin/env bash
# Bench-only venv for the TransformerLens comparison (bench/bench_patching.py).
# TransformerLens is never a dependency of pypattern: it lives only in .bench-venvs/tl (git-ignored).
# torch is pinned to 2.13.0: any other torch resolves to a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/.bench-venvs/tl"
PY="${PY:-python3}"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip "setuptools>=70" wheel
"$VENV/bin/pip" install -q torch==2.13.0 numpy scipy tqdm ninja pytest pytest-benchmark
# The torch pin is repeated so the resolver cannot swap it for another build.
"$VENV/bin/pip" install -q torch==2.13.0 transformer-lens==4.3.0
# pypattern itself, editable, built against the venv's torch (the C++ extension compiles under a lock).
flock /tmp/pypattern-build.lock env MAX_JOBS=2 "$VENV/bin/pip" install -q --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import torch, transformer_lens, pypattern; print('tl venv ok: torch', torch.__version__, 'transformer_lens', getattr(transformer_lens, '__version__', '?'))"
echo "run: $VENV/bin/python -m pytest -q $ROOT/bench/bench_patching.py --benchmark-only"
